//! Installs the CNI plugin and its network configuration onto the node.
//!
//! The container runtime loads the first config in its conf dir and execs the plugin that the
//! config names. So the order is fixed: the binary first, the config last, each replaced by an
//! atomic rename of a complete, fsync'ed file in the same directory. A runtime therefore never
//! sees the config while the binary is missing or half-written, and never reads a half-written
//! config. Temporary files start with `.` and end in `.tmp`, names that runtimes (libcni loads
//! `*.conf`, `*.conflist`, `*.json`) ignore.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fairlead_core::Node;
use serde::{Deserialize, Serialize};

/// File name of the plugin in the CNI bin dir; also the `type` in the config.
pub const PLUGIN_NAME: &str = "fairlead-cni";
/// File name of the config in the CNI conf dir; `10-` sorts it before most others.
pub const CONFLIST_NAME: &str = "10-fairlead.conflist";
pub const CNI_VERSION: &str = "1.1.0";
/// The network's name in the config.
pub const NETWORK_NAME: &str = "fairlead";
/// The IPAM `type` the plugin implements itself (it is not a separate executable).
pub const IPAM_TYPE: &str = "fairlead";

/// The network configuration list, as agreed with the plugin (`cni/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conflist {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<PluginConf>,
}

/// The `fairlead-cni` entry of [`Conflist::plugins`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConf {
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// MTU of pod interfaces: the underlay's minus the routing mode's overhead.
    pub mtu: u32,
    /// The agent's status socket, which the plugin's STATUS verb asks.
    pub agent_socket: PathBuf,
    /// The plugin turns on IP forwarding in the node namespace when it adds a pod.
    pub enable_forwarding: bool,
    /// ADD asks the agent to attach its eBPF datapath to the new veth (when the agent runs one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attach_datapath: bool,
    /// What the plugin asks the runtime for in `runtimeConfig`: the pod's annotations
    /// (`io.kubernetes.cri.pod-annotations`, containerd and CRI-O), so a pod that asks for
    /// the mesh gets its interception rules at ADD.
    pub capabilities: std::collections::BTreeMap<String, bool>,
    pub ipam: IpamConf,
}

/// The runtime capability that passes a pod's annotations to the plugin.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub ipam_type: String,
    /// The node's pod CIDRs, one per family, e.g. `10.244.1.0/24`, `fd00:10:244:1::/64`.
    pub ranges: Vec<String>,
    /// Where the plugin keeps its allocations.
    pub data_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error(
        "node {node} has no podCIDRs yet, so there is no CNI config to write; it is written \
         once the Node gets spec.podCIDRs (kube-controller-manager --allocate-node-cidrs, or \
         the sandbox)"
    )]
    NoPodCidrs { node: String },

    #[error(
        "cannot read the CNI plugin binary {path}: {source}; set FAIRLEAD_AGENT_CNI_PLUGIN to \
         the fairlead-cni executable", path = .path.display()
    )]
    ReadPlugin { path: PathBuf, source: io::Error },

    #[error(
        "cannot write {path}: {source}; the agent needs write access to the host's CNI \
         directories (mount them into the agent)", path = .path.display()
    )]
    Write { path: PathBuf, source: io::Error },

    #[error("cannot remove {path}: {source}", path = .path.display())]
    Remove { path: PathBuf, source: io::Error },
}

impl Conflist {
    /// The config for `node`: IPAM ranges are its pod CIDRs.
    pub fn for_node(
        node: &Node,
        mtu: u32,
        agent_socket: &Path,
        ipam_data_dir: &Path,
    ) -> Result<Self, CniInstallError> {
        if node.pod_cidrs.is_empty() {
            return Err(CniInstallError::NoPodCidrs {
                node: node.name.clone(),
            });
        }
        Ok(Conflist {
            cni_version: CNI_VERSION.to_owned(),
            name: NETWORK_NAME.to_owned(),
            plugins: vec![PluginConf {
                plugin_type: PLUGIN_NAME.to_owned(),
                mtu,
                agent_socket: agent_socket.to_owned(),
                enable_forwarding: true,
                attach_datapath: false,
                capabilities: [(POD_ANNOTATIONS_CAPABILITY.to_owned(), true)].into(),
                ipam: IpamConf {
                    ipam_type: IPAM_TYPE.to_owned(),
                    ranges: node.pod_cidrs.iter().map(|c| c.to_string()).collect(),
                    data_dir: ipam_data_dir.to_owned(),
                },
            }],
        })
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and paths cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// Copies `plugin_binary` to `bin_dir/fairlead-cni` (mode 0755), then writes
/// `conf_dir/10-fairlead.conflist`, each atomically; creates the directories if missing.
pub fn install(
    plugin_binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    conflist: &Conflist,
) -> Result<(), CniInstallError> {
    let mut source = File::open(plugin_binary).map_err(|source| CniInstallError::ReadPlugin {
        path: plugin_binary.to_owned(),
        source,
    })?;
    write_atomically(bin_dir, PLUGIN_NAME, 0o755, |out| {
        io::copy(&mut source, out).map(drop)
    })?;
    let json = conflist.to_json();
    write_atomically(conf_dir, CONFLIST_NAME, 0o644, |out| {
        out.write_all(json.as_bytes())
    })
}

/// Removes `conf_dir/10-fairlead.conflist`, so the runtime stops adding pods to this network;
/// the binary stays, because pods that exist still need it for DEL. Returns whether a file
/// was removed.
pub fn uninstall(conf_dir: &Path) -> Result<bool, CniInstallError> {
    let path = conf_dir.join(CONFLIST_NAME);
    match fs::remove_file(&path) {
        Ok(()) => {
            sync_dir(conf_dir).map_err(|source| CniInstallError::Remove {
                path: path.clone(),
                source,
            })?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CniInstallError::Remove { path, source }),
    }
}

/// Writes `dir/name` through a temporary file in `dir`: fill, fsync, chmod, rename, fsync the
/// directory (so the rename itself survives a crash).
fn write_atomically(
    dir: &Path,
    name: &str,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), CniInstallError> {
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write_error = |source| CniInstallError::Write {
        path: target.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(write_error)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        fill(&mut file)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, &target)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairlead_core::Labels;

    #[test]
    fn conflist_has_the_agreed_shape() {
        let node = Node {
            name: "node-1".into(),
            labels: Labels::default(),
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            internal_ips: vec![],
            external_ips: vec![],
            zone: None,
        };
        let conf = Conflist::for_node(
            &node,
            1450,
            Path::new("/run/fairlead/agent.sock"),
            Path::new("/var/lib/fairlead/ipam"),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&conf.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "name": "fairlead",
                "plugins": [{
                    "type": "fairlead-cni",
                    "mtu": 1450,
                    "agentSocket": "/run/fairlead/agent.sock",
                    "enableForwarding": true,
                    "capabilities": {"io.kubernetes.cri.pod-annotations": true},
                    "ipam": {
                        "type": "fairlead",
                        "ranges": ["10.244.1.0/24", "fd00:10:244:1::/64"],
                        "dataDir": "/var/lib/fairlead/ipam"
                    }
                }]
            })
        );
        let back: Conflist = serde_json::from_value(json).unwrap();
        assert_eq!(back, conf);

        let bare = Node {
            pod_cidrs: vec![],
            ..node
        };
        assert!(matches!(
            Conflist::for_node(&bare, 1450, Path::new("/s"), Path::new("/d")),
            Err(CniInstallError::NoPodCidrs { node }) if node == "node-1"
        ));
    }
}
