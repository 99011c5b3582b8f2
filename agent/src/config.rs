//! Agent configuration: defaults that work on a typical node, overridden by
//! `FAIRLEAD_AGENT_<NAME>` environment variables. A bad value names the variable, the value
//! and what would be accepted.

use std::path::PathBuf;

use crate::netns::RootNetns;
use crate::routes::{RoutingMode, DEFAULT_VNI, DEFAULT_VXLAN_PORT};

pub const DEFAULT_UNDERLAY_IFNAME: &str = "eth0";
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_IPAM_DATA_DIR: &str = "/var/lib/fairlead/ipam";
pub const DEFAULT_SOCKET: &str = "/run/fairlead/agent.sock";

/// Where the mesh CA is, for the node's sidecars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshCaConfig {
    pub url: String,
    pub bundle: PathBuf,
    pub trust_domain: String,
}

/// Everything the agent needs to run on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This node's name (the Node object the agent acts for). `FAIRLEAD_AGENT_NODE_NAME`,
    /// required (the DaemonSet sets it from `spec.nodeName`).
    pub node_name: String,
    /// The network namespace to program, e.g. `/var/run/netns/NAME` or `/proc/1/ns/net`.
    /// `FAIRLEAD_AGENT_NETNS`, required: there is no default, so an agent started by mistake
    /// cannot change the namespace it happens to run in.
    pub netns: PathBuf,
    /// Whether `netns` may be the root namespace (a real node: `true`; tests, sandbox:
    /// `false`). `FAIRLEAD_AGENT_ALLOW_ROOT_NETNS`, default `false`.
    pub root_netns: RootNetns,
    /// The interface carrying the node's InternalIP. `FAIRLEAD_AGENT_UNDERLAY_IFNAME`,
    /// default `eth0`.
    pub underlay_ifname: String,
    /// `FAIRLEAD_AGENT_ROUTING_MODE=native|vxlan` (default `vxlan`, which works on any
    /// underlay), with `FAIRLEAD_AGENT_VXLAN_VNI` (default 1) and `FAIRLEAD_AGENT_VXLAN_PORT`
    /// (default 8472).
    pub mode: RoutingMode,
    /// The `fairlead-cni` executable to install. `FAIRLEAD_AGENT_CNI_PLUGIN`, default
    /// `fairlead-cni` next to the agent's own executable.
    pub cni_plugin: PathBuf,
    /// `FAIRLEAD_AGENT_CNI_BIN_DIR`, default `/opt/cni/bin`.
    pub cni_bin_dir: PathBuf,
    /// `FAIRLEAD_AGENT_CNI_CONF_DIR`, default `/etc/cni/net.d`.
    pub cni_conf_dir: PathBuf,
    /// Where the plugin keeps IP allocations. `FAIRLEAD_AGENT_IPAM_DATA_DIR`, default
    /// `/var/lib/fairlead/ipam`.
    pub ipam_data_dir: PathBuf,
    /// The status socket. `FAIRLEAD_AGENT_SOCKET`, default `/run/fairlead/agent.sock`.
    pub socket: PathBuf,
    /// HTTP `/metrics` for Prometheus, bound inside `netns`. `FAIRLEAD_AGENT_METRICS_LISTEN`
    /// (default `0.0.0.0:9962`; `off` disables); the library default is off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Pod MTU. `FAIRLEAD_AGENT_MTU`; default: the underlay's MTU minus the mode's overhead.
    pub mtu: Option<u32>,
    /// The mesh CA the node's sidecars get certificates from, through this agent
    /// (`MESH-CERT`). `FAIRLEAD_AGENT_MESH_CA_URL` (e.g.
    /// `https://fairlead-controller.fairlead-system.svc:9443`; unset: no mesh),
    /// `FAIRLEAD_AGENT_MESH_CA_BUNDLE` (the mesh roots, default `/etc/fairlead/ca/ca.crt`,
    /// the ConfigMap `fairlead-ca-bundle` the controller publishes),
    /// `FAIRLEAD_AGENT_MESH_TRUST_DOMAIN` (default `cluster.local`).
    pub mesh_ca: Option<MeshCaConfig>,
    /// Where the node's sidecars reach the agent over TCP (`MESH-CERT`, `MESH-ROUTES` only,
    /// from this node's pods only), bound inside `netns`: `FAIRLEAD_AGENT_MESH_LISTEN`, e.g.
    /// `10.0.0.5:15012` (the chart passes the node's `status.hostIP`); unset: the status
    /// socket only. What lets injected pods do without a hostPath volume.
    pub mesh_listen: Option<std::net::SocketAddr>,
    /// Remove the CNI config when the agent stops. `FAIRLEAD_AGENT_UNINSTALL_CNI_ON_SHUTDOWN`,
    /// default `false`: on a rolling update the node keeps its config, and pods keep starting.
    pub uninstall_cni_on_shutdown: bool,
    /// Service load balancing in eBPF (the kube-proxy replacement). `None`: off (the library
    /// default, for tests of routing alone). From the environment it is on unless
    /// `FAIRLEAD_AGENT_SERVICE_LB=false`, with `FAIRLEAD_AGENT_LB_INSTANCE` (pin directory
    /// `/sys/fs/bpf/fairlead-<instance>`, default `node`), `FAIRLEAD_AGENT_LB_ALGORITHM`
    /// (`random`, the default, or `maglev`), `FAIRLEAD_AGENT_SERVICE_CIDRS` (comma-separated,
    /// default `10.96.0.0/12,fd00:10:96::/112`) and `FAIRLEAD_AGENT_POD_CGROUP` (a cgroup v2
    /// directory for socket-level balancing; unset: tc only).
    pub service_lb: Option<crate::services::LbSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {why}")]
    Missing {
        var: &'static str,
        why: &'static str,
    },

    #[error("{var}={value:?} is invalid: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: String,
    },
}

impl AgentConfig {
    /// The defaults, for `node_name` working in `netns`.
    pub fn new(node_name: impl Into<String>, netns: impl Into<PathBuf>) -> Self {
        AgentConfig {
            node_name: node_name.into(),
            netns: netns.into(),
            root_netns: RootNetns::Refuse,
            underlay_ifname: DEFAULT_UNDERLAY_IFNAME.to_owned(),
            mode: RoutingMode::vxlan(),
            cni_plugin: default_plugin(),
            cni_bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            cni_conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            ipam_data_dir: DEFAULT_IPAM_DATA_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            metrics_listen: None,
            mesh_listen: None,
            mtu: None,
            uninstall_cni_on_shutdown: false,
            service_lb: None,
            mesh_ca: None,
        }
    }

    /// Reads the `FAIRLEAD_AGENT_*` environment variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`AgentConfig::from_env`], with variables looked up by `lookup` (for tests).
    /// An empty value counts as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        let node_name = get(VAR_NODE_NAME).ok_or(ConfigError::Missing {
            var: VAR_NODE_NAME,
            why: "set it to this node's name (in a DaemonSet: valueFrom fieldRef spec.nodeName)",
        })?;
        let netns = get(VAR_NETNS).ok_or(ConfigError::Missing {
            var: VAR_NETNS,
            why: "set it to the network namespace to program: /proc/1/ns/net on a real node \
                  (with FAIRLEAD_AGENT_ALLOW_ROOT_NETNS=true), /var/run/netns/NAME in a sandbox",
        })?;
        let mut config = AgentConfig::new(node_name, netns);

        if let Some(v) = get(VAR_ALLOW_ROOT_NETNS) {
            config.root_netns = if parse_bool(VAR_ALLOW_ROOT_NETNS, &v)? {
                RootNetns::Allow
            } else {
                RootNetns::Refuse
            };
        }
        if let Some(v) = get(VAR_UNDERLAY_IFNAME) {
            // IFNAMSIZ is 16 with the terminating NUL.
            if v.len() > 15 || v.contains(['/', ' ', '\0']) {
                return Err(invalid(
                    VAR_UNDERLAY_IFNAME,
                    &v,
                    "not an interface name (at most 15 characters, no '/' or spaces)",
                ));
            }
            config.underlay_ifname = v;
        }
        if let Some(v) = get(VAR_ROUTING_MODE) {
            config.mode = v
                .parse()
                .map_err(|why: String| invalid(VAR_ROUTING_MODE, &v, why))?;
        }
        let vni = match get(VAR_VXLAN_VNI) {
            Some(v) => parse_num::<u32>(VAR_VXLAN_VNI, &v, 1, (1 << 24) - 1)?,
            None => DEFAULT_VNI,
        };
        let port = match get(VAR_VXLAN_PORT) {
            Some(v) => parse_num::<u16>(VAR_VXLAN_PORT, &v, 1, u16::MAX)?,
            None => DEFAULT_VXLAN_PORT,
        };
        if let RoutingMode::Vxlan { .. } = config.mode {
            config.mode = RoutingMode::Vxlan { vni, port };
        }
        if let Some(v) = get(VAR_CNI_PLUGIN) {
            config.cni_plugin = v.into();
        }
        if let Some(v) = get(VAR_CNI_BIN_DIR) {
            config.cni_bin_dir = v.into();
        }
        if let Some(v) = get(VAR_CNI_CONF_DIR) {
            config.cni_conf_dir = v.into();
        }
        if let Some(v) = get(VAR_IPAM_DATA_DIR) {
            config.ipam_data_dir = v.into();
        }
        if let Some(v) = get(VAR_SOCKET) {
            config.socket = v.into();
        }
        config.metrics_listen = match get(VAR_METRICS_LISTEN).as_deref() {
            Some("off") => None,
            Some(v) => Some(v.parse().map_err(|_| {
                invalid(
                    VAR_METRICS_LISTEN,
                    v,
                    "use ADDRESS:PORT (e.g. 0.0.0.0:9962) or off",
                )
            })?),
            None => Some(std::net::SocketAddr::from(([0, 0, 0, 0], 9962))),
        };
        if let Some(v) = get(VAR_MESH_LISTEN) {
            config.mesh_listen =
                Some(fairlead_netns::mesh::parse_host_port(&v).ok_or_else(|| {
                    invalid(
                        VAR_MESH_LISTEN,
                        &v,
                        "use ADDRESS:PORT, the node's address (e.g. 10.0.0.5:15012)",
                    )
                })?);
        }
        if let Some(url) = get(VAR_MESH_CA_URL) {
            if !url.starts_with("https://") {
                return Err(invalid(
                    VAR_MESH_CA_URL,
                    &url,
                    "use https://HOST:PORT (the controller's service)",
                ));
            }
            config.mesh_ca = Some(MeshCaConfig {
                url,
                bundle: get(VAR_MESH_CA_BUNDLE)
                    .unwrap_or_else(|| "/etc/fairlead/ca/ca.crt".into())
                    .into(),
                trust_domain: get(VAR_MESH_TRUST_DOMAIN).unwrap_or_else(|| "cluster.local".into()),
            });
        }
        if let Some(v) = get(VAR_MTU) {
            // 1280: the IPv6 minimum; pods are dual-stack.
            config.mtu = Some(parse_num::<u32>(VAR_MTU, &v, 1280, 65535)?);
        }
        if let Some(v) = get(VAR_UNINSTALL_CNI_ON_SHUTDOWN) {
            config.uninstall_cni_on_shutdown = parse_bool(VAR_UNINSTALL_CNI_ON_SHUTDOWN, &v)?;
        }
        let lb_on = match get(VAR_SERVICE_LB) {
            Some(v) => parse_bool(VAR_SERVICE_LB, &v)?,
            None => true,
        };
        if lb_on {
            let instance = get(VAR_LB_INSTANCE).unwrap_or_else(|| "node".to_owned());
            let ok = instance.len() <= 64
                && !instance.starts_with('.')
                && instance
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(invalid(
                    VAR_LB_INSTANCE,
                    &instance,
                    "use 1-64 characters from [A-Za-z0-9._-], not starting with '.'",
                ));
            }
            let mut lb = crate::services::LbSettings::new(instance);
            if let Some(v) = get(VAR_LB_ALGORITHM) {
                lb.maglev = match v.as_str() {
                    "random" => false,
                    "maglev" => true,
                    _ => return Err(invalid(VAR_LB_ALGORITHM, &v, "use random or maglev")),
                };
            }
            if let Some(v) = get(VAR_SERVICE_CIDRS) {
                lb.service_cidrs = v
                    .split(',')
                    .map(|c| c.trim().parse())
                    .collect::<Result<_, _>>()
                    .map_err(|e: fairlead_core::IpNetParseError| {
                        invalid(VAR_SERVICE_CIDRS, &v, e.0)
                    })?;
            }
            if let Some(v) = get(VAR_POD_CGROUP) {
                lb.pod_cgroup = Some(v.into());
            }
            if let Some(v) = get(VAR_NETWORK_POLICY) {
                lb.network_policy = parse_bool(VAR_NETWORK_POLICY, &v)?;
            }
            config.service_lb = Some(lb);
        }
        Ok(config)
    }
}

const VAR_NODE_NAME: &str = "FAIRLEAD_AGENT_NODE_NAME";
const VAR_NETNS: &str = "FAIRLEAD_AGENT_NETNS";
const VAR_ALLOW_ROOT_NETNS: &str = "FAIRLEAD_AGENT_ALLOW_ROOT_NETNS";
const VAR_UNDERLAY_IFNAME: &str = "FAIRLEAD_AGENT_UNDERLAY_IFNAME";
const VAR_ROUTING_MODE: &str = "FAIRLEAD_AGENT_ROUTING_MODE";
const VAR_VXLAN_VNI: &str = "FAIRLEAD_AGENT_VXLAN_VNI";
const VAR_VXLAN_PORT: &str = "FAIRLEAD_AGENT_VXLAN_PORT";
const VAR_CNI_PLUGIN: &str = "FAIRLEAD_AGENT_CNI_PLUGIN";
const VAR_CNI_BIN_DIR: &str = "FAIRLEAD_AGENT_CNI_BIN_DIR";
const VAR_CNI_CONF_DIR: &str = "FAIRLEAD_AGENT_CNI_CONF_DIR";
const VAR_IPAM_DATA_DIR: &str = "FAIRLEAD_AGENT_IPAM_DATA_DIR";
const VAR_SOCKET: &str = "FAIRLEAD_AGENT_SOCKET";
const VAR_METRICS_LISTEN: &str = "FAIRLEAD_AGENT_METRICS_LISTEN";
const VAR_MTU: &str = "FAIRLEAD_AGENT_MTU";
const VAR_MESH_CA_URL: &str = "FAIRLEAD_AGENT_MESH_CA_URL";
const VAR_MESH_LISTEN: &str = "FAIRLEAD_AGENT_MESH_LISTEN";
const VAR_MESH_CA_BUNDLE: &str = "FAIRLEAD_AGENT_MESH_CA_BUNDLE";
const VAR_MESH_TRUST_DOMAIN: &str = "FAIRLEAD_AGENT_MESH_TRUST_DOMAIN";
const VAR_UNINSTALL_CNI_ON_SHUTDOWN: &str = "FAIRLEAD_AGENT_UNINSTALL_CNI_ON_SHUTDOWN";
const VAR_SERVICE_LB: &str = "FAIRLEAD_AGENT_SERVICE_LB";
const VAR_LB_INSTANCE: &str = "FAIRLEAD_AGENT_LB_INSTANCE";
const VAR_LB_ALGORITHM: &str = "FAIRLEAD_AGENT_LB_ALGORITHM";
const VAR_SERVICE_CIDRS: &str = "FAIRLEAD_AGENT_SERVICE_CIDRS";
const VAR_POD_CGROUP: &str = "FAIRLEAD_AGENT_POD_CGROUP";
const VAR_NETWORK_POLICY: &str = "FAIRLEAD_AGENT_NETWORK_POLICY";

fn default_plugin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .map(|dir| dir.join(crate::cni_install::PLUGIN_NAME))
        })
        .unwrap_or_else(|| crate::cni_install::PLUGIN_NAME.into())
}

fn invalid(var: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_owned(),
        why: why.into(),
    }
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(var, value, "expected `true` or `false`")),
    }
}

fn parse_num<T>(var: &'static str, value: &str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match value.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(invalid(
            var,
            value,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AgentConfig::from_lookup(|name| vars.get(name).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("FAIRLEAD_AGENT_NODE_NAME", "node-1"),
        ("FAIRLEAD_AGENT_NETNS", "/var/run/netns/node-1"),
    ];

    #[test]
    fn defaults_need_only_node_and_namespace() {
        let config = from(&BASE).unwrap();
        assert_eq!(config.node_name, "node-1");
        assert_eq!(config.mode, RoutingMode::vxlan());
        assert_eq!(config.root_netns, RootNetns::Refuse);
        assert_eq!(config.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(config.mtu, None);

        let err = from(&BASE[..1]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("FAIRLEAD_AGENT_NETNS is not set"),
            "{err}"
        );
    }

    #[test]
    fn every_variable_is_read() {
        let mut vars = BASE.to_vec();
        vars.extend([
            ("FAIRLEAD_AGENT_ALLOW_ROOT_NETNS", "true"),
            ("FAIRLEAD_AGENT_UNDERLAY_IFNAME", "ens5"),
            ("FAIRLEAD_AGENT_ROUTING_MODE", "vxlan"),
            ("FAIRLEAD_AGENT_VXLAN_VNI", "42"),
            ("FAIRLEAD_AGENT_VXLAN_PORT", "4789"),
            ("FAIRLEAD_AGENT_CNI_PLUGIN", "/opt/fairlead/fairlead-cni"),
            ("FAIRLEAD_AGENT_CNI_BIN_DIR", "/b"),
            ("FAIRLEAD_AGENT_CNI_CONF_DIR", "/c"),
            ("FAIRLEAD_AGENT_IPAM_DATA_DIR", "/d"),
            ("FAIRLEAD_AGENT_SOCKET", "/s.sock"),
            ("FAIRLEAD_AGENT_MTU", "1400"),
            ("FAIRLEAD_AGENT_UNINSTALL_CNI_ON_SHUTDOWN", "1"),
        ]);
        let config = from(&vars).unwrap();
        assert_eq!(config.root_netns, RootNetns::Allow);
        assert_eq!(config.underlay_ifname, "ens5");
        assert_eq!(
            config.mode,
            RoutingMode::Vxlan {
                vni: 42,
                port: 4789
            }
        );
        assert_eq!(
            config.cni_plugin,
            PathBuf::from("/opt/fairlead/fairlead-cni")
        );
        assert_eq!(config.socket, PathBuf::from("/s.sock"));
        assert_eq!(config.mtu, Some(1400));
        assert!(config.uninstall_cni_on_shutdown);

        let native = from(&[BASE[0], BASE[1], ("FAIRLEAD_AGENT_ROUTING_MODE", "native")]);
        assert_eq!(native.unwrap().mode, RoutingMode::Native);
    }

    #[test]
    fn errors_name_the_variable_and_the_value() {
        for (var, value, expect) in [
            (
                "FAIRLEAD_AGENT_ROUTING_MODE",
                "bgp",
                "expected `native` or `vxlan`",
            ),
            ("FAIRLEAD_AGENT_VXLAN_VNI", "16777216", "from 1 to 16777215"),
            ("FAIRLEAD_AGENT_VXLAN_PORT", "0", "from 1 to 65535"),
            ("FAIRLEAD_AGENT_MTU", "9k", "from 1280 to 65535"),
            (
                "FAIRLEAD_AGENT_ALLOW_ROOT_NETNS",
                "yes",
                "`true` or `false`",
            ),
            (
                "FAIRLEAD_AGENT_UNDERLAY_IFNAME",
                "a-very-long-interface",
                "15 characters",
            ),
        ] {
            let err = from(&[BASE[0], BASE[1], (var, value)]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("{var}={value:?} is invalid")) && text.contains(expect),
                "{text}"
            );
        }
    }
}
