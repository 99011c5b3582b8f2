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
