//! What each cluster object contributes to the zone, per the Kubernetes DNS-Based Service
//! Discovery specification, schema 1.0.1 (kubernetes/dns, docs/specification.md).
//!
//! Every record comes out pre-encoded: owner `C0 0C` (a compression pointer to the question,
//! which is always at offset 12 and always the owner of the records at the name asked for), then
//! type, class, TTL and rdata with uncompressed names. An answer is these bytes copied after the
//! question.

use std::collections::BTreeSet;
use std::net::IpAddr;

use fairlead_core::Protocol;

use crate::model::{Addresses, DnsService, DnsSlice};

use crate::name;
use crate::wire::{
    CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_PTR, TYPE_SOA, TYPE_SRV, TYPE_TXT,
};

/// The schema version served at `dns-version.<zone>` (spec §2.2).
pub const SCHEMA_VERSION: &str = "1.0.1";

/// One record: owner name (lowercased wire form), type, and the encoded record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rec {
    pub name: Vec<u8>,
    pub rtype: u16,
    pub rr: Vec<u8>,
}

/// The zone's apex and TTL: all record generation needs.
pub(crate) struct Zone {
    pub apex: Vec<u8>,
    pub ttl: u32,
}

/// Encodes a record whose owner is the question (`C0 0C`).
pub(crate) fn encode_rr(rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut rr = Vec::with_capacity(12 + rdata.len());
    rr.extend_from_slice(&[0xc0, 0x0c]);
    rr.extend_from_slice(&rtype.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&ttl.to_be_bytes());
    rr.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    rr.extend_from_slice(rdata);
    rr
}

/// The same record with an explicit owner instead of the pointer.
pub(crate) fn with_owner(owner: &[u8], rr: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(owner.len() + rr.len() - 2);
    out.extend_from_slice(owner);
    out.extend_from_slice(&rr[2..]);
    out
}

/// The rdata of a pre-encoded record.
pub(crate) fn rdata(rr: &[u8]) -> &[u8] {
    &rr[12..]
}

pub(crate) fn address(ip: &IpAddr) -> (u16, Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
        IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
    }
}

fn srv(port: u16, target: &[u8]) -> Vec<u8> {
    // Priority 0, weight 100: one tier, equal shares (as CoreDNS answers a single record).
    let mut rd = vec![0, 0, 0, 100];
    rd.extend_from_slice(&port.to_be_bytes());
    rd.extend_from_slice(target);
    rd
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// `_<port>._<proto>.<parent>`, when the port name makes a valid label.
fn srv_name(port: &str, proto: Protocol, parent: &[u8]) -> Option<Vec<u8>> {
    let proto = name::prepend(proto_label(proto), parent)?;
    name::prepend(&format!("_{port}"), &proto)
}

impl Zone {
    fn rec(&self, name: Vec<u8>, rtype: u16, rdata: &[u8]) -> Rec {
        Rec {
            name,
            rtype,
            rr: encode_rr(rtype, self.ttl, rdata),
        }
    }

    /// `<a>.<b>.svc.<zone>`.
    fn under(&self, kind: &str, ns: &str, leaf: &str) -> Option<Vec<u8>> {
        let kind = name::prepend(kind, &self.apex)?;
        let ns = name::prepend(ns, &kind)?;
        name::prepend(leaf, &ns)
    }

    /// The SOA rdata of this zone; the minimum (negative-caching TTL) is the record TTL.
    pub fn soa_rdata(&self) -> Vec<u8> {
        let mut rd = name::prepend("ns", &name::prepend("dns", &self.apex).unwrap_or_default())
            .unwrap_or_else(|| self.apex.clone());
        rd.extend(name::prepend("hostmaster", &self.apex).unwrap_or_else(|| self.apex.clone()));
        for v in [1u32, 7200, 1800, 86400, self.ttl] {
            rd.extend_from_slice(&v.to_be_bytes());
        }
        rd
    }

    /// Records that exist whatever the cluster holds: the apex SOA and `dns-version` TXT (§2.2).
    pub fn static_records(&self) -> Vec<Rec> {
        let mut out = vec![self.rec(self.apex.clone(), TYPE_SOA, &self.soa_rdata())];
        if let Some(n) = name::prepend("dns-version", &self.apex) {
            let mut txt = vec![SCHEMA_VERSION.len() as u8];
            txt.extend_from_slice(SCHEMA_VERSION.as_bytes());
            out.push(self.rec(n, TYPE_TXT, &txt));
        }
        out
    }

    /// Records of one Service and its EndpointSlices (§2.3 ClusterIP, §2.4 headless, §2.5
    /// ExternalName), sorted and without duplicates.
    pub fn service_records<'a>(
        &self,
        namespace: &str,
        service: &str,
        svc: &DnsService,
        slices: impl Iterator<Item = &'a DnsSlice>,
    ) -> Vec<Rec> {
        let mut out = BTreeSet::new();
        let Some(base) = self.under("svc", namespace, service) else {
            return Vec::new();
        };
        match &svc.addresses {
            Addresses::ExternalName(external_name) => {
                // §2.5: a CNAME to the external name; a bad name gets no record.
                match external_name.as_deref().and_then(name::encode) {
                    Some(target) => {
                        out.insert(self.rec(base, TYPE_CNAME, &target));
                    }
                    None => tracing::warn!(
                        %namespace, %service, ?external_name,
                        "spec.externalName is not a valid DNS name; no CNAME is served for it"
                    ),
                }
            }
            Addresses::ClusterIps(ips) => {
                // §2.3.1 A/AAAA and §2.3.4 PTR per cluster IP.
                for ip in ips {
                    let (t, rd) = address(ip);
                    out.insert(self.rec(base.clone(), t, &rd));
                    out.insert(self.rec(name::reverse(ip), TYPE_PTR, &base));
                }
                // §2.3.2 SRV per named port, targeting the Service name.
                for p in &svc.ports {
                    if let Some(n) = srv_name(&p.name, p.protocol, &base) {
                        out.insert(self.rec(n, TYPE_SRV, &srv(p.port, &base)));
                    }
                }
            }
            Addresses::Headless => {
                for slice in slices {
                    for ep in &slice.endpoints {
                        if !(ep.ready || svc.publish_not_ready) {
                            continue;
                        }
                        for ip in &ep.addresses {
                            // §2.4.1: an endpoint without a hostname is named by its address, as
                            // CoreDNS does, so that it too has a target for SRV and PTR.
                            let host_name = match &ep.hostname {
                                Some(h) => name::prepend(h, &base),
                                None => name::prepend(&name::dashed(ip), &base),
                            };
                            let Some(host_name) = host_name else {
                                continue;
                            };
                            let (t, rd) = address(ip);
                            out.insert(self.rec(base.clone(), t, &rd));
                            out.insert(self.rec(host_name.clone(), t, &rd));
                            // §2.4.3 PTR per ready endpoint.
                            out.insert(self.rec(name::reverse(ip), TYPE_PTR, &host_name));
                            // §2.4.2 SRV per named port and endpoint, on the endpoint's port.
                            for p in &slice.ports {
                                if let Some(n) = srv_name(&p.name, p.protocol, &base) {
                                    out.insert(self.rec(n, TYPE_SRV, &srv(p.port, &host_name)));
                                }
                            }
                        }
                    }
                }
            }
            Addresses::Unassigned => {}
        }
        out.into_iter().collect()
    }
}
