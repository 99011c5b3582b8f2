//! The `CNI_*` environment the runtime execs us with.

use std::{fmt, path::PathBuf};

use crate::config::valid_name;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable {var} is missing; the runtime must set it for {command}")]
    Missing { var: &'static str, command: Command },

    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// The parsed environment. Presence of the per-verb variables is checked by
/// the `require_*` accessors, so DEL can run without `CNI_NETNS` and GC and
/// STATUS without any of them.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    container_id: Option<String>,
    netns: Option<PathBuf>,
    ifname: Option<String>,
    /// `CNI_ARGS` pairs: `K8S_POD_NAMESPACE` and `K8S_POD_NAME` name the pod to
    /// the agent (NetworkPolicy); the rest are ignored, but a malformed value is
    /// still reported.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`. Parsed, never used: this plugin execs no delegates.
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let command_text = lookup("CNI_COMMAND").ok_or(EnvError::Missing {
            var: "CNI_COMMAND",
            // Any verb needs it; VERSION is the one that needs nothing else.
            command: Command::Version,
        })?;
        let command = Command::parse(&command_text).ok_or_else(|| EnvError::Invalid {
            var: "CNI_COMMAND",
            value: command_text.clone(),
            reason: "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION".into(),
        })?;
        let non_empty = |var| lookup(var).filter(|v| !v.is_empty());

        let container_id = non_empty("CNI_CONTAINERID");
        if let Some(id) = &container_id {
            if !valid_name(id) {
                return Err(EnvError::Invalid {
                    var: "CNI_CONTAINERID",
                    value: id.clone(),
                    reason: "must start with a letter or digit followed by letters, digits, \
                             '_', '.' or '-'"
                        .into(),
                });
            }
        }
        let ifname = non_empty("CNI_IFNAME");
        if let Some(name) = &ifname {
            if let Err(reason) = check_ifname(name) {
                return Err(EnvError::Invalid {
                    var: "CNI_IFNAME",
                    value: name.clone(),
                    reason,
                });
            }
        }
        let args = match non_empty("CNI_ARGS") {
            None => Vec::new(),
            Some(text) => parse_args(&text).map_err(|reason| EnvError::Invalid {
                var: "CNI_ARGS",
                value: text.clone(),
                reason,
            })?,
        };
        let path = non_empty("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id,
            netns: non_empty("CNI_NETNS").map(PathBuf::from),
            ifname,
            args,
            path,
        })
    }

    pub fn require_container_id(&self) -> Result<&str, EnvError> {
        self.container_id.as_deref().ok_or(EnvError::Missing {
            var: "CNI_CONTAINERID",
            command: self.command,
        })
    }

    pub fn require_netns(&self) -> Result<&PathBuf, EnvError> {
        self.netns.as_ref().ok_or(EnvError::Missing {
            var: "CNI_NETNS",
            command: self.command,
        })
    }

    /// DEL may come without a namespace (it is already gone).
    pub fn netns(&self) -> Option<&PathBuf> {
        self.netns.as_ref()
    }

    pub fn require_ifname(&self) -> Result<&str, EnvError> {
        self.ifname.as_deref().ok_or(EnvError::Missing {
            var: "CNI_IFNAME",
            command: self.command,
        })
    }
}

/// Linux's rules for interface names (`dev_valid_name`).
fn check_ifname(name: &str) -> Result<(), String> {
    if name.len() > 15 {
        return Err(format!("{} bytes; Linux allows at most 15", name.len()));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not interface names".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("must not contain '/', ':' or whitespace".into());
    }
    Ok(())
}

/// `K1=V1;K2=V2` (the spec's CNI_ARGS format).
fn parse_args(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("{pair:?} is not KEY=VALUE; use K1=V1;K2=V2")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn parses_a_runtime_environment() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=web;K8S_POD_NAMESPACE=default"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.require_ifname().unwrap(), "eth0");
        assert_eq!(e.args.len(), 2);
        assert_eq!(e.path.len(), 2);
    }

    #[test]
    fn names_the_bad_variable() {
        let err = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "a/b")]).unwrap_err();
        assert!(err.to_string().contains("CNI_IFNAME"));
        let err = env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "novalue")]).unwrap_err();
        assert!(err.to_string().contains("CNI_ARGS"));
        let err = env(&[("CNI_COMMAND", "FLY")]).unwrap_err();
        assert!(err.to_string().contains("CNI_COMMAND"));
        let e = env(&[("CNI_COMMAND", "ADD")]).unwrap();
        assert!(e
            .require_netns()
            .unwrap_err()
            .to_string()
            .contains("CNI_NETNS"));
    }
}
