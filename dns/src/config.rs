//! Configuration: defaults that work, a file form with `deny_unknown_fields`, and
//! `FAIRLEAD_DNS_*` environment variables whose errors name the variable, value and reason.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fairlead_core::IpNet;
use serde::Deserialize;

pub use crate::model::PodMode;

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
    /// `FAIRLEAD_DNS_UPSTREAMS` (comma-separated `ip[:port]`, port 53 if omitted).
    pub upstreams: Vec<SocketAddr>,
    /// Zones forwarded to their own servers instead of `upstreams` (kube-dns stubDomains,
    /// CoreDNS `forward` per zone): the longest zone a name is in wins; names are compared
    /// case-insensitively; the cluster zone is never forwarded. `FAIRLEAD_DNS_STUB_DOMAINS`:
    /// `zone=ip[:port][,ip[:port]...]` entries separated by `;`, e.g.
    /// `example.corp=10.0.0.53,10.0.0.54:5353;lab.example=[fd00::53]:53`.
    pub stub_domains: BTreeMap<String, Vec<SocketAddr>>,
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
    /// HTTP address of the admin server (`/metrics`, `/health`, `/ready`), started by
    /// `Server::start_admin` (`fairlead dns` does); `None` leaves it off.
    /// `FAIRLEAD_DNS_ADMIN_LISTEN` (empty or `off` for none).
    pub admin_listen: Option<SocketAddr>,
    /// A cached forwarded answer asked at least this many times while cached (the query that
    /// filled the cache counts) is refreshed in the background when asked in the last
    /// `prefetch_percent` of its TTL, so popular names do not expire for clients. 0 disables.
    /// `FAIRLEAD_DNS_PREFETCH_AMOUNT`.
    pub prefetch_amount: u32,
    /// The tail of a cached answer's TTL, in percent, in which a popular answer is refreshed.
    /// 0 disables prefetch. `FAIRLEAD_DNS_PREFETCH_PERCENT`.
    pub prefetch_percent: u8,
    /// Pod records `a-b-c-d.<ns>.pod.<zone>`, as CoreDNS's `pods` option: `insecure` (from the
    /// name alone; no Pods are watched), `verified` (only for a pod with that address in that
    /// namespace; Pods are watched) or `disabled` (NXDOMAIN). `FAIRLEAD_DNS_PODS`.
    pub pods: PodMode,
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
            stub_domains: BTreeMap::new(),
            admin_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9153))),
            prefetch_amount: 2,
            prefetch_percent: 10,
            pods: PodMode::Insecure,
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

/// `ip:port`, `[v6]:port`, or a bare address meaning port 53.
fn parse_server(s: &str) -> Option<SocketAddr> {
    s.parse()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

fn env_servers(var: &'static str, raw: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            parse_server(s).ok_or_else(|| ConfigError::Env {
                var,
                value: s.into(),
                reason: "expected ip[:port][,ip[:port]...] (port 53 if omitted)".into(),
            })
        })
        .collect()
}

const STUB_SYNTAX: &str = "expected zone=ip[:port][,ip[:port]...] entries separated by ;";

/// `FAIRLEAD_DNS_STUB_DOMAINS`: `zone=server,server;zone=server`. Errors name the entry and
/// the part of it that is wrong.
fn env_stub_domains(raw: &str) -> Result<BTreeMap<String, Vec<SocketAddr>>, ConfigError> {
    let bad = |entry: &str, reason: String| ConfigError::Env {
        var: "FAIRLEAD_DNS_STUB_DOMAINS",
        value: entry.into(),
        reason,
    };
    let mut out = BTreeMap::new();
    for entry in raw.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((zone, servers)) = entry.split_once('=') else {
            return Err(bad(entry, format!("no `=` after the zone: {STUB_SYNTAX}")));
        };
        let zone = zone.trim();
        let servers = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                parse_server(s).ok_or_else(|| {
                    bad(
                        entry,
                        format!("`{s}` (a server of zone {zone}) is not an address: expected ip or ip:port"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = zone.to_ascii_lowercase();
        let key = key.strip_suffix('.').unwrap_or(&key);
        if out.insert(key.to_owned(), servers).is_some() {
            return Err(bad(entry, format!("zone {zone} is listed twice")));
        }
    }
    Ok(out)
}

/// A stub domain, checked: its zone in lowercased wire form and as text, and its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StubZone {
    pub name: Vec<u8>,
    /// Lowercased, with the trailing dot: `example.corp.`.
    pub text: String,
    pub servers: Vec<SocketAddr>,
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
        var!(
            "FAIRLEAD_DNS_PREFETCH_AMOUNT",
            prefetch_amount,
            "a count of queries (0 disables prefetch)"
        );
        var!(
            "FAIRLEAD_DNS_PREFETCH_PERCENT",
            prefetch_percent,
            "a percentage of the TTL, 0 to 100 (0 disables prefetch)"
        );
        var!("FAIRLEAD_DNS_PODS", pods, "insecure, verified or disabled");
        if c.prefetch_percent > 100 {
            return Err(ConfigError::Env {
                var: "FAIRLEAD_DNS_PREFETCH_PERCENT",
                value: c.prefetch_percent.to_string(),
                reason: "expected a percentage of the TTL, 0 to 100 (0 disables prefetch)".into(),
            });
        }
        if let Some(raw) = get("FAIRLEAD_DNS_ZONE") {
            c.zone = raw;
        }
        if let Some(raw) = get("FAIRLEAD_DNS_UPSTREAMS") {
            c.upstreams = env_servers("FAIRLEAD_DNS_UPSTREAMS", &raw)?;
        }
        if let Some(raw) = get("FAIRLEAD_DNS_STUB_DOMAINS") {
            c.stub_domains = env_stub_domains(&raw)?;
            // Checked here too, so the error names the variable rather than the field.
            c.stub_zones().map_err(|e| match e {
                ConfigError::Field { value, reason, .. } => ConfigError::Env {
                    var: "FAIRLEAD_DNS_STUB_DOMAINS",
                    value,
                    reason,
                },
                e => e,
            })?;
        }
        if let Some(raw) = get("FAIRLEAD_DNS_ADMIN_LISTEN") {
            let v = raw.trim();
            c.admin_listen = if v.is_empty() || v.eq_ignore_ascii_case("off") {
                None
            } else {
                Some(env_parse(
                    "FAIRLEAD_DNS_ADMIN_LISTEN",
                    v,
                    "an address such as 0.0.0.0:9153 or [::]:9153, or off",
                )?)
            };
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
        if self.prefetch_percent > 100 {
            return bad(
                "prefetch_percent",
                self.prefetch_percent.to_string(),
                "must be 0 (off) to 100",
            );
        }
        self.reverse_nets()?;
        self.stub_zones()?;
        Ok(())
    }

    /// The stub domains, checked: each a DNS name below the root and outside the cluster zone,
    /// each with at least one server, none listed twice (names compare case-insensitively).
    /// Sorted by zone.
    pub(crate) fn stub_zones(&self) -> Result<Vec<StubZone>, ConfigError> {
        let bad = |value: &str, reason: String| ConfigError::Field {
            field: "stub_domains",
            value: value.into(),
            reason,
        };
        let cluster = crate::name::encode(&self.zone).unwrap_or_default();
        let mut out: Vec<StubZone> = Vec::with_capacity(self.stub_domains.len());
        for (zone, servers) in &self.stub_domains {
            let name = crate::name::encode(zone)
                .filter(|n| n.len() >= 2)
                .ok_or_else(|| {
                    bad(
                        zone,
                        format!("zone {zone:?} is not a DNS name below the root, such as example.corp (the root is what upstreams are for)"),
                    )
                })?;
            if crate::name::is_within(&name, &cluster) {
                return Err(bad(
                    zone,
                    format!(
                        "zone {zone} is inside the cluster zone {}, which is answered from the cluster and never forwarded",
                        self.zone
                    ),
                ));
            }
            if servers.is_empty() {
                return Err(bad(
                    zone,
                    format!("zone {zone} has no servers: {STUB_SYNTAX}"),
                ));
            }
            if out.iter().any(|s| s.name == name) {
                return Err(bad(zone, format!("zone {zone} is listed twice")));
            }
            out.push(StubZone {
                text: crate::name::to_text(&name),
                name,
                servers: servers.clone(),
            });
        }
        out.sort_by(|a, b| a.text.cmp(&b.text));
        Ok(out)
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
    fn stub_domains_parse_case_insensitively_with_default_port() {
        let c = Config::from_vars(vars(&[(
            "FAIRLEAD_DNS_STUB_DOMAINS",
            " Example.Corp.=10.0.0.53, 10.0.0.54:5353 ; lab.example=[fd00::53]:53;v6.example=fd00::54;",
        )]))
        .unwrap();
        let want: BTreeMap<String, Vec<SocketAddr>> = [
            (
                "example.corp",
                vec![
                    "10.0.0.53:53".parse().unwrap(),
                    "10.0.0.54:5353".parse().unwrap(),
                ],
            ),
            ("lab.example", vec!["[fd00::53]:53".parse().unwrap()]),
            ("v6.example", vec!["[fd00::54]:53".parse().unwrap()]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(c.stub_domains, want);
        let zones = c.stub_zones().unwrap();
        assert_eq!(zones[0].text, "example.corp.");
        assert_eq!(zones[0].name, b"\x07example\x04corp\x00");
        // A parent of the cluster zone is fine: cluster names never reach the forwarder.
        Config::from_vars(vars(&[("FAIRLEAD_DNS_STUB_DOMAINS", "local=10.0.0.53")])).unwrap();
    }

    #[test]
    fn stub_domain_errors_name_the_bad_part() {
        let err = |raw: &str| {
            Config::from_vars(vars(&[("FAIRLEAD_DNS_STUB_DOMAINS", raw)]))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("example.corp=10.0.0.53;other.zone"),
            "FAIRLEAD_DNS_STUB_DOMAINS=\"other.zone\" is invalid: no `=` after the zone: \
             expected zone=ip[:port][,ip[:port]...] entries separated by ;"
        );
        assert_eq!(
            err("example.corp=10.0.0.53,10.0.0.x:53"),
            "FAIRLEAD_DNS_STUB_DOMAINS=\"example.corp=10.0.0.53,10.0.0.x:53\" is invalid: \
             `10.0.0.x:53` (a server of zone example.corp) is not an address: expected ip or ip:port"
        );
        assert_eq!(
            err("Svc.Cluster.Local=10.0.0.53"),
            "FAIRLEAD_DNS_STUB_DOMAINS=\"svc.cluster.local\" is invalid: zone svc.cluster.local is \
             inside the cluster zone cluster.local, which is answered from the cluster and never forwarded"
        );
        assert!(err("cluster.local=10.0.0.53").contains("inside the cluster zone"));
        assert!(
            err("a..b=10.0.0.53").contains("zone \"a..b\" is not a DNS name"),
            "{}",
            err("a..b=10.0.0.53")
        );
        assert!(err(".=10.0.0.53").contains("below the root"));
        assert!(err("example.corp=").contains("zone example.corp has no servers"));
        assert!(err("a.b=10.0.0.1;A.B.=10.0.0.2").contains("zone A.B. is listed twice"));
        // The file form gets the same checks.
        let mut c = Config::default();
        c.stub_domains
            .insert("Corp.Example".into(), vec!["10.0.0.1:53".parse().unwrap()]);
        c.stub_domains
            .insert("corp.example.".into(), vec!["10.0.0.2:53".parse().unwrap()]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("listed twice"),
            "{:?}",
            c.validate()
        );
    }

    #[test]
    fn admin_listen_and_prefetch() {
        let c = Config::default();
        assert_eq!(c.admin_listen, Some("0.0.0.0:9153".parse().unwrap()));
        assert_eq!((c.prefetch_amount, c.prefetch_percent), (2, 10));
        for off in ["off", "OFF", "", " "] {
            let c = Config::from_vars(vars(&[("FAIRLEAD_DNS_ADMIN_LISTEN", off)])).unwrap();
            assert_eq!(c.admin_listen, None, "{off:?}");
        }
        let c = Config::from_vars(vars(&[
            ("FAIRLEAD_DNS_ADMIN_LISTEN", "[::1]:9154"),
            ("FAIRLEAD_DNS_PREFETCH_AMOUNT", "5"),
            ("FAIRLEAD_DNS_PREFETCH_PERCENT", "0"),
        ]))
        .unwrap();
        assert_eq!(c.admin_listen, Some("[::1]:9154".parse().unwrap()));
        assert_eq!((c.prefetch_amount, c.prefetch_percent), (5, 0));
        let err = Config::from_vars(vars(&[("FAIRLEAD_DNS_ADMIN_LISTEN", "9153")])).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "FAIRLEAD_DNS_ADMIN_LISTEN=\"9153\" is invalid: expected an address such as 0.0.0.0:9153"
            ),
            "{err}"
        );
        let err = Config::from_vars(vars(&[("FAIRLEAD_DNS_PREFETCH_PERCENT", "101")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("FAIRLEAD_DNS_PREFETCH_PERCENT=\"101\" is invalid"),
            "{err}"
        );
        let c: Config = serde_json::from_str(
            r#"{"admin_listen": null, "stub_domains": {"corp.example": ["10.0.0.53:53"]}}"#,
        )
        .unwrap();
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.stub_zones().unwrap().len(), 1);
    }

    #[test]
    fn file_form_rejects_unknown_fields() {
        let c: Config = serde_json::from_str(r#"{"zone": "k8s.local", "ttl": 10}"#).unwrap();
        assert_eq!((c.zone.as_str(), c.ttl), ("k8s.local", 10));
        let err = serde_json::from_str::<Config>(r#"{"zonee": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `zonee`"), "{err}");
    }
}
