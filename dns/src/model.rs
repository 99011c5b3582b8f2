//! What DNS keeps of the cluster: per Service and per EndpointSlice only what records are made
//! of (names, named ports, addresses, endpoint hostnames and readiness), and per Pod (only in
//! `pods verified` mode) its namespace and addresses. Converted from the core types at once, so
//! the process holds no Kubernetes or core objects: a ClusterIP Service is a few dozen bytes
//! here against ~1.25 KiB as a core `Service` in a `Snapshot`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use fairlead_core::{ClusterIps, EndpointSlice, Pod, PodPhase, Protocol, Service, ServiceType};

/// How pod records (`a-b-c-d.<ns>.pod.<zone>`) are answered, as CoreDNS's `pods` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodMode {
    /// From the query name alone, in any namespace, without knowing the pods (what kube-dns
    /// did and CoreDNS's `pods insecure` does): no Pod is watched or held.
    #[default]
    Insecure,
    /// Only when a pod with that address runs in that namespace (not host-networked, not
    /// finished); the DNS process watches Pods and keeps one (namespace, address) pair each.
    Verified,
    /// No pod records: every name under `pod.<zone>` is NXDOMAIN.
    Disabled,
}

impl std::str::FromStr for PodMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "insecure" => Ok(PodMode::Insecure),
            "verified" => Ok(PodMode::Verified),
            "disabled" => Ok(PodMode::Disabled),
            _ => Err(()),
        }
    }
}

/// A named port, as SRV records need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedPort {
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Addresses {
    ClusterIps(Box<[IpAddr]>),
    Headless,
    /// The target as the Service spells it (checked when records are made).
    ExternalName(Option<Box<str>>),
    Unassigned,
}

/// One Service, as DNS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsService {
    pub addresses: Addresses,
    /// Named ports only (an unnamed port has no SRV record).
    pub ports: Box<[NamedPort]>,
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsEndpoint {
    pub addresses: Box<[IpAddr]>,
    pub hostname: Option<Box<str>>,
    pub ready: bool,
}

/// One EndpointSlice of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsSlice {
    /// The owning Service's name (same namespace).
    pub service: Box<str>,
    pub endpoints: Box<[DnsEndpoint]>,
    /// Named ports with a number only.
    pub ports: Box<[NamedPort]>,
}

/// A pod that has records in `verified` mode: its addresses, if it is not host-networked (its
/// address would be the node's, shared by many pods) and not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsPod {
    pub namespace: String,
    pub ips: Box<[IpAddr]>,
}

impl From<&Service> for DnsService {
    fn from(svc: &Service) -> Self {
        let addresses = if svc.service_type == ServiceType::ExternalName {
            Addresses::ExternalName(svc.external_name.as_deref().map(Box::from))
        } else {
            match &svc.cluster_ips {
                ClusterIps::Assigned(ips) => Addresses::ClusterIps(ips.as_slice().into()),
                ClusterIps::Headless => Addresses::Headless,
                ClusterIps::Unassigned => Addresses::Unassigned,
            }
        };
        let ports = svc
            .ports
            .iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| NamedPort {
                name: p.name.as_str().into(),
                protocol: p.protocol,
                port: p.port,
            })
            .collect();
        DnsService {
            addresses,
            ports,
            publish_not_ready: svc.publish_not_ready_addresses,
        }
    }
}

/// A reader of [`DnsService::encode`]'s bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn text(&mut self) -> Box<str> {
        let len = usize::from(self.u16());
        String::from_utf8_lossy(self.take(len)).into()
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    let text = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text);
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

impl DnsService {
    /// The Service as bytes, for the index to keep it in one allocation with its name (a few
    /// dozen bytes for a ClusterIP Service with one port); [`DnsService::decode`] reads them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.publish_not_ready));
        match &self.addresses {
            Addresses::ClusterIps(ips) => {
                out.push(0);
                out.push(ips.len().min(255) as u8);
                for ip in ips.iter().take(255) {
                    match ip {
                        IpAddr::V4(v4) => {
                            out.push(4);
                            out.extend_from_slice(&v4.octets());
                        }
                        IpAddr::V6(v6) => {
                            out.push(16);
                            out.extend_from_slice(&v6.octets());
                        }
                    }
                }
            }
            Addresses::Headless => out.push(1),
            Addresses::ExternalName(None) => out.push(2),
            Addresses::ExternalName(Some(target)) => {
                out.push(3);
                put_text(out, target);
            }
            Addresses::Unassigned => out.push(4),
        }
        out.extend_from_slice(&(self.ports.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
        for p in self.ports.iter().take(usize::from(u16::MAX)) {
            let proto = PROTOCOLS.iter().position(|x| *x == p.protocol).unwrap_or(0);
            out.push(proto as u8);
            out.extend_from_slice(&p.port.to_le_bytes());
            put_text(out, &p.name);
        }
    }

    /// Reads what [`DnsService::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> DnsService {
        let mut r = Reader(bytes);
        let publish_not_ready = r.u8() != 0;
        let addresses = match r.u8() {
            0 => {
                let n = r.u8();
                let ips = (0..n)
                    .map(|_| match r.u8() {
                        4 => {
                            let b = r.take(4);
                            IpAddr::from([b[0], b[1], b[2], b[3]])
                        }
                        _ => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(r.take(16));
                            IpAddr::from(o)
                        }
                    })
                    .collect();
                Addresses::ClusterIps(ips)
            }
            1 => Addresses::Headless,
            2 => Addresses::ExternalName(None),
            3 => Addresses::ExternalName(Some(r.text())),
            _ => Addresses::Unassigned,
        };
        let ports = (0..r.u16())
            .map(|_| {
                let protocol = PROTOCOLS[usize::from(r.u8()).min(2)];
                let port = r.u16();
                NamedPort {
                    name: r.text(),
                    protocol,
                    port,
                }
            })
            .collect();
        DnsService {
            addresses,
            ports,
            publish_not_ready,
        }
    }
}

impl DnsSlice {
    /// `None` for a slice that names no Service (it makes no records).
    pub fn from_core(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.service.as_deref()?.into();
        let endpoints = slice
            .endpoints
            .iter()
            .map(|ep| DnsEndpoint {
                addresses: ep.addresses.as_slice().into(),
                hostname: ep.hostname.as_deref().map(Box::from),
                ready: ep.conditions.ready,
            })
            .collect();
        let ports = slice
            .ports
            .iter()
            .filter(|p| !p.name.is_empty())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.as_str().into(),
                    protocol: p.protocol,
                    port: p.port?,
                })
            })
            .collect();
        Some(DnsSlice {
            service,
            endpoints,
            ports,
        })
    }
}

impl DnsPod {
    /// `None` for a pod that has no records (host network, finished, or no address yet).
    pub fn from_core(pod: &Pod) -> Option<Self> {
        if pod.host_network
            || matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
            || pod.ips.is_empty()
        {
            return None;
        }
        Some(DnsPod {
            namespace: pod.namespace.clone(),
            ips: pod.ips.as_slice().into(),
        })
    }
}

/// Namespace names, each held once and named by a small number.
#[derive(Default)]
pub(crate) struct Namespaces {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Namespaces {
    pub fn intern(&mut self, ns: &str) -> u32 {
        if let Some(&id) = self.ids.get(ns) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = ns.into();
        self.names.push(Arc::clone(&name));
        self.ids.insert(name, id);
        id
    }

    pub fn get(&self, ns: &str) -> Option<u32> {
        self.ids.get(ns).copied()
    }

    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_round_trip_through_bytes() {
        let port = |name: &str, protocol, port| NamedPort {
            name: name.into(),
            protocol,
            port,
        };
        let services = [
            DnsService {
                addresses: Addresses::ClusterIps(
                    ["10.96.0.20", "fd00:10:96::20"]
                        .map(|s| s.parse().unwrap())
                        .into(),
                ),
                ports: [
                    port("http", Protocol::Tcp, 80),
                    port("dns", Protocol::Udp, 53),
                    port("sig", Protocol::Sctp, 9),
                ]
                .into(),
                publish_not_ready: false,
            },
            DnsService {
                addresses: Addresses::Headless,
                ports: Box::new([]),
                publish_not_ready: true,
            },
            DnsService {
                addresses: Addresses::ExternalName(Some("Example.COM.".into())),
                ports: Box::new([]),
                publish_not_ready: false,
            },
            DnsService {
                addresses: Addresses::ExternalName(None),
                ports: Box::new([]),
                publish_not_ready: false,
            },
            DnsService {
                addresses: Addresses::Unassigned,
                ports: [port("x", Protocol::Tcp, 1)].into(),
                publish_not_ready: false,
            },
        ];
        for svc in services {
            let mut bytes = Vec::new();
            svc.encode(&mut bytes);
            assert_eq!(DnsService::decode(&bytes), svc);
        }
    }
}
