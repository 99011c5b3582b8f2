//! The network config on stdin: decoding, version negotiation, validation.
//!
//! What the agent writes (as the one plugin of its conflist; the runtime adds
//! `cniVersion` and `name` from the list), with the defaults spelled out:
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0",
//!   "name": "fairlead",
//!   "type": "fairlead-cni",
//!   "mtu": 1500,
//!   "enableForwarding": true,
//!   "agentSocket": "/run/fairlead/agent.sock",
//!   "agentHandoffTimeoutMs": 100,
//!   "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
//!   "capabilities": {"io.kubernetes.cri.pod-annotations": true},
//!   "ipam": {
//!     "type": "fairlead",
//!     "ranges": ["10.244.1.0/24", "fd00:10:244:1::/64"],
//!     "dataDir": "/var/lib/fairlead/ipam",
//!     "lockTimeoutMs": 10000
//!   }
//! }
//! ```
//!
//! Required: `cniVersion` (or a `cniVersions` list), `name`, and `ipam` with
//! `type` and `ranges` (at most one IPv4 and one IPv6 subnet, host bits clear)
//! for ADD, DEL, CHECK and GC. GC also needs `cni.dev/valid-attachments`.
//!
//! With the `io.kubernetes.cri.pod-annotations` capability the runtime (containerd, CRI-O)
//! passes the pod's annotations in `runtimeConfig`; a pod annotated `fairlead.io/inject:
//! "true"` gets the mesh's interception rules in its namespace at ADD
//! (`fairlead.io/skip-inbound-ports` lists inbound ports left alone), before it can run.
//!
//! Decoding is lenient where the spec asks for it (unknown top-level fields
//! are ignored: the runtime adds `runtimeConfig`, `args` and others) and strict
//! where a wrong value would build a broken pod network: every invalid value
//! names its field, the value and what would be accepted.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use crate::{ipam::Cidr, types::CniResult, types::Dns};

/// Spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_AGENT_SOCKET: &str = "/run/fairlead/agent.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/fairlead/ipam";
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 10_000;
/// How long DEL waits for the agent to take a tombstoned veth before it
/// deletes the veth itself.
pub const DEFAULT_AGENT_HANDOFF_TIMEOUT_MS: u64 = 100;
/// Longer waits would make a hung agent cost every DEL more than the
/// synchronous delete it is meant to save.
pub const MAX_AGENT_HANDOFF_TIMEOUT_MS: u64 = 10_000;
/// The only IPAM this plugin drives, in-process.
pub const IPAM_TYPE: &str = "fairlead";

/// The pod's IPv4 gateway: link-local, answered by the host veth, so no
/// address of the PodCIDR is spent on it and every pod sees the same one.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const LATEST: Version = Version::V1_1_0;

    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "0.4.0" => Some(Version::V0_4_0),
            "1.0.0" => Some(Version::V1_0_0),
            "1.1.0" => Some(Version::V1_1_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot decode the network config on stdin as JSON: {source}")]
    Decode {
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "CNI version {requested} is not supported; this plugin supports {}",
        SUPPORTED_VERSIONS.join(", ")
    )]
    IncompatibleVersion { requested: String },

    #[error("network config field `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        field: String,
        value: String,
        reason: String,
    },

    #[error("invalid network config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The config as it arrives; see [`NetConf`] for the validated form.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: Option<String>,
    #[serde(default = "default_mtu")]
    mtu: u32,
    #[serde(default = "default_true")]
    enable_forwarding: bool,
    #[serde(default = "default_agent_socket")]
    agent_socket: PathBuf,
    #[serde(default = "default_agent_handoff_timeout_ms")]
    agent_handoff_timeout_ms: u64,
    #[serde(default)]
    attach_datapath: bool,
    ipam: Option<RawIpam>,
    #[serde(default)]
    dns: Dns,
    prev_result: Option<Value>,
    #[serde(default)]
    runtime_config: RawRuntimeConfig,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// The parts of `runtimeConfig` this plugin reads (the runtime fills in what the
/// conflist's `capabilities` ask for; the rest is ignored).
#[derive(Debug, Default, Deserialize)]
struct RawRuntimeConfig {
    #[serde(rename = "io.kubernetes.cri.pod-annotations", default)]
    pod_annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    ipam_type: String,
    #[serde(default)]
    ranges: Vec<String>,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_lock_timeout_ms")]
    lock_timeout_ms: u64,
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}
fn default_true() -> bool {
    true
}
fn default_agent_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}
fn default_agent_handoff_timeout_ms() -> u64 {
    DEFAULT_AGENT_HANDOFF_TIMEOUT_MS
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_lock_timeout_ms() -> u64 {
    DEFAULT_LOCK_TIMEOUT_MS
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A validated network config.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    /// The network name; keys IPAM allocations (and names their directory).
    pub name: String,
    pub mtu: u32,
    pub enable_forwarding: bool,
    pub agent_socket: PathBuf,
    /// `agentHandoffTimeoutMs` (default 100): DEL renames the pod's veth
    /// to a tombstone and asks the agent at `agent_socket` to delete it,
    /// and deletes it itself (one RCU grace period, 15-40 ms here) when
    /// the agent has not taken it within this time. `0` (None): never ask,
    /// always delete synchronously. See [`crate::teardown`].
    pub agent_handoff_timeout: Option<Duration>,
    /// `attachDatapath` (default false; the agent writes true when it runs
    /// the eBPF datapath): ADD asks the agent at `agent_socket` to attach
    /// its programs (Service load balancing) to the new host veth, and
    /// fails (rolled back) if it cannot, so no pod runs without them.
    pub attach_datapath: bool,
    pub ipam: Option<IpamConf>,
    pub dns: Dns,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The pod asked for the mesh (`fairlead.io/inject: "true"` in the annotations the
    /// runtime passed): ADD installs the interception rules in its namespace.
    pub mesh: Option<MeshConf>,
}

/// Interception for a meshed pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConf {
    /// Inbound ports left alone (`fairlead.io/skip-inbound-ports`).
    pub skip_inbound: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct IpamConf {
    /// At most one per family, in config order.
    pub ranges: Vec<Cidr>,
    pub data_dir: PathBuf,
    pub lock_timeout: Duration,
}

/// Decodes stdin far enough to learn the version the runtime asked for.
/// Errors before this point are reported in the latest version.
pub fn decode(stdin: &[u8]) -> Result<(Value, Version), ConfigError> {
    let value: Value =
        serde_json::from_slice(stdin).map_err(|source| ConfigError::Decode { source })?;
    if !value.is_object() {
        return Err(ConfigError::invalid(
            ".",
            format!("expected a JSON object, got {}", short(&value)),
        ));
    }
    let version = negotiate(&value)?;
    Ok((value, version))
}

/// `cniVersion` wins; a config that only lists `cniVersions` (CNI 1.1 lists
/// may) gets the newest version both sides speak.
fn negotiate(value: &Value) -> Result<Version, ConfigError> {
    match value.get("cniVersion") {
        Some(Value::String(v)) => {
            Version::parse(v).ok_or_else(|| ConfigError::IncompatibleVersion {
                requested: v.clone(),
            })
        }
        Some(other) => Err(ConfigError::invalid(
            "cniVersion",
            format!(
                "expected a version string such as \"1.1.0\", got {}",
                short(other)
            ),
        )),
        None => match value.get("cniVersions") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().and_then(Version::parse))
                .max()
                .ok_or_else(|| ConfigError::IncompatibleVersion {
                    requested: short(&Value::Array(list.clone())),
                }),
            Some(other) => Err(ConfigError::invalid(
                "cniVersions",
                format!("expected a list of version strings, got {}", short(other)),
            )),
            None => Err(ConfigError::invalid(
                "cniVersion",
                "missing; set it to one of 0.4.0, 1.0.0, 1.1.0",
            )),
        },
    }
}

impl NetConf {
    /// Validates a decoded config. IPAM is checked only when present; the
    /// verbs that need it call [`NetConf::ipam`].
    pub fn from_value(value: Value, version: Version) -> Result<NetConf, ConfigError> {
        let raw: RawConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::invalid(
                if field == "." {
                    "(top level)".to_owned()
                } else {
                    field
                },
                e.inner().to_string(),
            )
        })?;

        let name = raw
            .name
            .ok_or_else(|| ConfigError::invalid("name", "missing; the network name is required"))?;
        if !valid_name(&name) {
            return Err(ConfigError::invalid(
                "name",
                format!(
                    "{name:?} must start with a letter or digit followed by letters, digits, \
                     '_', '.' or '-'"
                ),
            ));
        }

        let ipam = raw.ipam.map(validate_ipam).transpose()?;
        let has_v6 = ipam
            .as_ref()
            .is_some_and(|i| i.ranges.iter().any(|r| r.addr.is_ipv6()));
        let min_mtu = if has_v6 { 1280 } else { 68 };
        if !(min_mtu..=65535).contains(&raw.mtu) {
            return Err(ConfigError::invalid(
                "mtu",
                format!(
                    "{} is outside {min_mtu}..=65535{}",
                    raw.mtu,
                    if has_v6 {
                        " (IPv6 needs at least 1280)"
                    } else {
                        ""
                    }
                ),
            ));
        }

        if raw.agent_handoff_timeout_ms > MAX_AGENT_HANDOFF_TIMEOUT_MS {
            return Err(ConfigError::invalid(
                "agentHandoffTimeoutMs",
                format!(
                    "{} is above {MAX_AGENT_HANDOFF_TIMEOUT_MS}; DEL deletes the veth itself in \
                     about 20 ms, so a longer wait on the agent cannot pay off (0 turns the \
                     hand-off off)",
                    raw.agent_handoff_timeout_ms
                ),
            ));
        }

        let prev_result = raw
            .prev_result
            .map(|v| {
                serde_path_to_error::deserialize::<_, CniResult>(v).map_err(|e| {
                    ConfigError::invalid(format!("prevResult.{}", e.path()), e.inner().to_string())
                })
            })
            .transpose()?;

        let mesh = match &raw.runtime_config.pod_annotations {
            Some(a) if fairlead_netns::mesh::wants_mesh(|k| a.get(k).map(String::as_str)) => {
                let skip = a
                    .get(fairlead_netns::mesh::SKIP_INBOUND_PORTS_ANNOTATION)
                    .map(|v| fairlead_netns::mesh::parse_ports(v))
                    .transpose()
                    .map_err(|reason| {
                        ConfigError::invalid(
                            format!(
                                "runtimeConfig.io.kubernetes.cri.pod-annotations.{}",
                                fairlead_netns::mesh::SKIP_INBOUND_PORTS_ANNOTATION
                            ),
                            reason,
                        )
                    })?;
                Some(MeshConf {
                    skip_inbound: skip.unwrap_or_default(),
                })
            }
            _ => None,
        };

        Ok(NetConf {
            version,
            name,
            mtu: raw.mtu,
            enable_forwarding: raw.enable_forwarding,
            agent_socket: raw.agent_socket,
            agent_handoff_timeout: (raw.agent_handoff_timeout_ms > 0)
                .then(|| Duration::from_millis(raw.agent_handoff_timeout_ms)),
            attach_datapath: raw.attach_datapath,
            ipam,
            dns: raw.dns,
            prev_result,
            valid_attachments: raw.valid_attachments,
            mesh,
        })
    }

    pub fn ipam(&self) -> Result<&IpamConf, ConfigError> {
        self.ipam.as_ref().ok_or_else(|| {
            ConfigError::invalid(
                "ipam",
                format!(
                    "missing; expected {{\"type\": \"{IPAM_TYPE}\", \"ranges\": [\"10.244.1.0/24\", \
                     \"fd00:10:244:1::/64\"]}}"
                ),
            )
        })
    }
}

fn validate_ipam(raw: RawIpam) -> Result<IpamConf, ConfigError> {
    if raw.ipam_type != IPAM_TYPE {
        return Err(ConfigError::Unsupported {
            field: "ipam.type".into(),
            value: format!("{:?}", raw.ipam_type),
            reason: format!(
                "fairlead-cni allocates addresses itself; set it to \"{IPAM_TYPE}\" \
                 (delegating to another IPAM plugin is not supported)"
            ),
        });
    }
    if raw.ranges.is_empty() {
        return Err(ConfigError::invalid(
            "ipam.ranges",
            "empty; list the node's PodCIDRs, at most one IPv4 and one IPv6",
        ));
    }
    let mut ranges: Vec<Cidr> = Vec::with_capacity(raw.ranges.len());
    for (i, text) in raw.ranges.iter().enumerate() {
        let field = format!("ipam.ranges[{i}]");
        let cidr = Cidr::parse(text).map_err(|reason| {
            ConfigError::invalid(&field, format!("{text:?} is not a subnet: {reason}"))
        })?;
        if ranges
            .iter()
            .any(|r| r.addr.is_ipv4() == cidr.addr.is_ipv4())
        {
            return Err(ConfigError::invalid(
                &field,
                format!("{text} is a second range of the same family; give at most one IPv4 and one IPv6"),
            ));
        }
        if cidr.contains(IpAddr::V4(GATEWAY_V4)) {
            return Err(ConfigError::invalid(
                &field,
                format!("{text} contains the pod gateway {GATEWAY_V4}"),
            ));
        }
        ranges.push(cidr);
    }
    if !raw.data_dir.is_absolute() {
        return Err(ConfigError::invalid(
            "ipam.dataDir",
            format!("{} is not an absolute path", raw.data_dir.display()),
        ));
    }
    if raw.lock_timeout_ms == 0 {
        return Err(ConfigError::invalid(
            "ipam.lockTimeoutMs",
            "must be at least 1",
        ));
    }
    Ok(IpamConf {
        ranges,
        data_dir: raw.data_dir,
        lock_timeout: Duration::from_millis(raw.lock_timeout_ms),
    })
}

/// The spec's rule for network names (and container IDs): an alphanumeric
/// first character, then alphanumerics, '_', '.', '-'. It also keeps them
/// safe as a directory name and as one line of an allocation file.
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn short(value: &Value) -> String {
    let mut s = value.to_string();
    if s.len() > 60 {
        s.truncate(57);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, ConfigError> {
        let (value, version) = decode(v.to_string().as_bytes())?;
        NetConf::from_value(value, version)
    }

    fn base() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "fairlead",
            "type": "fairlead-cni",
            "unknownField": {"ignored": true},
            "ipam": {"type": "fairlead", "ranges": ["10.244.1.0/24", "fd00:10:244:1::/64"]}
        })
    }

    #[test]
    fn defaults() {
        let conf = parse(base()).unwrap();
        assert_eq!(conf.version, Version::V1_1_0);
        assert_eq!(conf.mtu, 1500);
        assert!(conf.enable_forwarding);
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(
            conf.agent_handoff_timeout,
            Some(Duration::from_millis(100)),
            "DEL hands the veth to the agent by default"
        );
        let ipam = conf.ipam().unwrap();
        assert_eq!(ipam.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(ipam.ranges.len(), 2);
    }

    #[test]
    fn negotiates_from_cni_versions() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("cniVersion");
        v["cniVersions"] = json!(["0.3.1", "1.0.0", "9.9.9"]);
        assert_eq!(parse(v).unwrap().version, Version::V1_0_0);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v["cniVersion"] = json!("0.3.1");
        assert!(matches!(
            parse(v),
            Err(ConfigError::IncompatibleVersion { .. })
        ));

        let mut v = base();
        v["ipam"]["ranges"][0] = json!("10.244.1.0/33");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("ipam.ranges[0]"), "{err}");

        let mut v = base();
        v["ipam"]["ranges"][0] = json!("10.244.1.7/24");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("10.244.1.0/24"), "{err}");

        let mut v = base();
        v["ipam"]["type"] = json!("host-local");
        assert!(matches!(parse(v), Err(ConfigError::Unsupported { .. })));

        let mut v = base();
        v["mtu"] = json!("big");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("`mtu`"), "{err}");

        let mut v = base();
        v["mtu"] = json!(1000);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("1280"), "{err}");

        let mut v = base();
        v["agentHandoffTimeoutMs"] = json!("fast");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("agentHandoffTimeoutMs"), "{err}");

        let mut v = base();
        v["agentHandoffTimeoutMs"] = json!(60_000);
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("agentHandoffTimeoutMs") && err.contains("10000"),
            "{err}"
        );

        let mut v = base();
        v["agentHandoffTimeoutMs"] = json!(0);
        assert_eq!(
            parse(v).unwrap().agent_handoff_timeout,
            None,
            "0 turns it off"
        );

        let mut v = base();
        v["name"] = json!("../etc");
        assert!(parse(v).unwrap_err().to_string().contains("`name`"));

        assert!(matches!(
            decode(b"{not json"),
            Err(ConfigError::Decode { .. })
        ));
    }
}
