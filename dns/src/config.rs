//! Configuration: defaults that work, a file form with `deny_unknown_fields`, and
//! `FAIRLEAD_DNS_*` environment variables whose errors name the variable, value and reason.

use std::net::SocketAddr;
use std::time::Duration;

use fairlead_core::IpNet;
use serde::Deserialize;

/// What to do with a query that arrives while the forwarder is at its in-flight bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShedAction {
    /// Answer REFUSED at once, so the client tries its next server.
    #[default]
    Refuse,
    /// Send nothing.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP and TCP address to serve on. `FAIRLEAD_DNS_LISTEN`.
    pub listen: SocketAddr,
    /// The cluster zone. `FAIRLEAD_DNS_ZONE`.
    pub zone: String,
    /// TTL of cluster records, seconds. `FAIRLEAD_DNS_TTL`.
    pub ttl: u32,
    /// Upstream servers for names outside the cluster zone, tried in order.
    /// `FAIRLEAD_DNS_UPSTREAMS` (comma-separated `ip:port`).
    pub upstreams: Vec<SocketAddr>,
    /// Per-upstream timeout, milliseconds. `FAIRLEAD_DNS_UPSTREAM_TIMEOUT_MS`.
    pub upstream_timeout_ms: u64,
    /// Reverse zones answered here (unknown addresses are NXDOMAIN, never forwarded).
    /// `FAIRLEAD_DNS_REVERSE_CIDRS` (comma-separated).
    pub reverse_cidrs: Vec<String>,
    /// Forwarded answers kept. `FAIRLEAD_DNS_CACHE_ENTRIES`.
    pub cache_entries: usize,
    /// Cap on the TTL of cached positive answers, seconds. `FAIRLEAD_DNS_CACHE_POSITIVE_TTL`.
    pub cache_positive_ttl: u32,
    /// Cap on the TTL of cached NXDOMAIN/NODATA answers, seconds. `FAIRLEAD_DNS_CACHE_NEGATIVE_TTL`.
    pub cache_negative_ttl: u32,
    /// How long past expiry a cached answer may be served when every upstream fails, seconds
    /// (RFC 8767). 0 disables serve-stale. `FAIRLEAD_DNS_SERVE_STALE`.
    pub serve_stale: u32,
    /// Forwarded queries in flight before new ones are shed. `FAIRLEAD_DNS_MAX_INFLIGHT`.
    pub max_inflight: usize,
    /// Open TCP connections before new ones are closed at once. `FAIRLEAD_DNS_MAX_TCP`.
    pub max_tcp_connections: usize,
    /// `refuse` or `drop`. `FAIRLEAD_DNS_SHED`.
    pub shed: ShedAction,
    /// Our EDNS0 UDP payload size. `FAIRLEAD_DNS_EDNS_UDP_SIZE`.
    pub edns_udp_size: u16,
    /// UDP receive loops; 0 means one per CPU. `FAIRLEAD_DNS_UDP_WORKERS`.
    pub udp_workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            zone: "cluster.local".into(),
            ttl: 5,
            upstreams: Vec::new(),
            upstream_timeout_ms: 2000,
            reverse_cidrs: [
                "10.96.0.0/12",
                "10.244.0.0/16",
                "fd00:10:96::/112",
                "fd00:10:244::/56",
            ]
            .map(String::from)
            .to_vec(),
            cache_entries: 10_000,
            cache_positive_ttl: 3600,
            cache_negative_ttl: 300,
            serve_stale: 3600,
            max_inflight: 1024,
            max_tcp_connections: 256,
            shed: ShedAction::Refuse,
            edns_udp_size: 1232,
            udp_workers: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}={value:?} is invalid: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("DNS config field {field} = {value:?} is invalid: {reason}")]
    Field {
        field: &'static str,
        value: String,
        reason: String,
    },
}

fn env_parse<T: std::str::FromStr>(
    var: &'static str,
    raw: &str,
    expect: &str,
) -> Result<T, ConfigError> {
    raw.trim().parse().map_err(|_| ConfigError::Env {
        var,
        value: raw.into(),
        reason: format!("expected {expect}"),
    })
}

fn env_list<T: std::str::FromStr>(
    var: &'static str,
    raw: &str,
    expect: &str,
) -> Result<Vec<T>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| env_parse(var, s, expect))
        .collect()
}

impl Config {
    /// Defaults overridden by `FAIRLEAD_DNS_*` variables from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Defaults overridden by variables from `get` (the environment, or a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        macro_rules! var {
            ($name:literal, $field:ident, $expect:literal) => {
                if let Some(raw) = get($name) {
                    c.$field = env_parse($name, &raw, $expect)?;
                }
            };
        }
        var!(
            "FAIRLEAD_DNS_LISTEN",
            listen,
            "an address such as 0.0.0.0:53 or [::]:53"
        );
        var!("FAIRLEAD_DNS_TTL", ttl, "seconds, 0 to 4294967295");
        var!(
            "FAIRLEAD_DNS_UPSTREAM_TIMEOUT_MS",
            upstream_timeout_ms,
            "milliseconds"
        );
        var!("FAIRLEAD_DNS_CACHE_ENTRIES", cache_entries, "a count");
        var!(
            "FAIRLEAD_DNS_CACHE_POSITIVE_TTL",
            cache_positive_ttl,
            "seconds"
        );
        var!(
            "FAIRLEAD_DNS_CACHE_NEGATIVE_TTL",
            cache_negative_ttl,
            "seconds"
        );
        var!("FAIRLEAD_DNS_SERVE_STALE", serve_stale, "seconds");
        var!("FAIRLEAD_DNS_MAX_INFLIGHT", max_inflight, "a count");
        var!("FAIRLEAD_DNS_MAX_TCP", max_tcp_connections, "a count");
        var!(
            "FAIRLEAD_DNS_EDNS_UDP_SIZE",
            edns_udp_size,
            "bytes, 512 to 65535"
        );
        var!(
            "FAIRLEAD_DNS_UDP_WORKERS",
            udp_workers,
            "a count (0: one per CPU)"
        );
        if let Some(raw) = get("FAIRLEAD_DNS_ZONE") {
            c.zone = raw;
        }
        if let Some(raw) = get("FAIRLEAD_DNS_UPSTREAMS") {
            c.upstreams = env_list("FAIRLEAD_DNS_UPSTREAMS", &raw, "ip:port[,ip:port...]")?;
        }
        if let Some(raw) = get("FAIRLEAD_DNS_REVERSE_CIDRS") {
            c.reverse_cidrs = env_list::<IpNet>("FAIRLEAD_DNS_REVERSE_CIDRS", &raw, "CIDRs")?
                .iter()
                .map(ToString::to_string)
                .collect();
        }
        if let Some(raw) = get("FAIRLEAD_DNS_SHED") {
            c.shed = match raw.trim() {
                "refuse" => ShedAction::Refuse,
                "drop" => ShedAction::Drop,
                _ => {
                    return Err(ConfigError::Env {
                        var: "FAIRLEAD_DNS_SHED",
                        value: raw,
                        reason: "expected refuse or drop".into(),
                    })
                }
            };
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, reason: &str| {
            Err(ConfigError::Field {
                field,
                value,
                reason: reason.into(),
            })
        };
        if crate::name::encode(&self.zone).is_none_or(|n| n.len() < 2) {
            return bad(
                "zone",
                self.zone.clone(),
                "must be a DNS name below the root, such as cluster.local",
            );
        }
        if self.edns_udp_size < 512 {
            return bad(
                "edns_udp_size",
                self.edns_udp_size.to_string(),
                "must be at least 512",
            );
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "0".into(), "must be at least 1");
        }
        if self.upstream_timeout_ms == 0 {
            return bad("upstream_timeout_ms", "0".into(), "must be at least 1");
        }
        self.reverse_nets()?;
        Ok(())
    }

    pub(crate) fn reverse_nets(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.reverse_cidrs
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e: fairlead_core::IpNetParseError| ConfigError::Field {
                        field: "reverse_cidrs",
                        value: s.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect()
    }

    pub(crate) fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_overrides_defaults() {
        let c = Config::from_vars(vars(&[
            ("FAIRLEAD_DNS_ZONE", "corp.example"),
            ("FAIRLEAD_DNS_TTL", "30"),
            ("FAIRLEAD_DNS_UPSTREAMS", "127.0.0.1:5353, [::1]:53"),
            ("FAIRLEAD_DNS_SHED", "drop"),
        ]))
        .unwrap();
        assert_eq!(c.zone, "corp.example");
        assert_eq!(c.ttl, 30);
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.shed, ShedAction::Drop);
        assert_eq!(Config::from_vars(vars(&[])).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_variable() {
        let err = Config::from_vars(vars(&[("FAIRLEAD_DNS_TTL", "five")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "FAIRLEAD_DNS_TTL=\"five\" is invalid: expected seconds, 0 to 4294967295"
        );
        let err = Config::from_vars(vars(&[("FAIRLEAD_DNS_REVERSE_CIDRS", "10.0.0.0/8,nope")]))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("FAIRLEAD_DNS_REVERSE_CIDRS=\"nope\""),
            "{err}"
        );
        let err = Config::from_vars(vars(&[("FAIRLEAD_DNS_ZONE", "a..b")])).unwrap_err();
        assert!(err.to_string().contains("zone"), "{err}");
    }

    #[test]
    fn file_form_rejects_unknown_fields() {
        let c: Config = serde_json::from_str(r#"{"zone": "k8s.local", "ttl": 10}"#).unwrap();
        assert_eq!((c.zone.as_str(), c.ttl), ("k8s.local", 10));
        let err = serde_json::from_str::<Config>(r#"{"zonee": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `zonee`"), "{err}");
    }
}
