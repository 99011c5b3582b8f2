//! Service load balancing: from the cluster snapshot to the eBPF maps.
//!
//! [`frontends_for`] compiles one Service and its EndpointSlices into the
//! frontends the datapath serves (pure, unit-tested): a ClusterIP per family
//! (internal scope, internalTrafficPolicy), and for NodePort/LoadBalancer
//! Services the node's addresses at the nodePort plus externalIPs and
//! LoadBalancer ingress IPs at the port, each twice: internal scope (pods on
//! this node: every endpoint) and external scope (from the network:
//! externalTrafficPolicy). Backends follow kube-proxy: ready endpoints; if
//! none, serving-and-terminating ones; with publishNotReadyAddresses, all.
//!
//! [`ServiceLb`] keeps the maps in line with snapshots: only the Services a
//! diff names are recompiled and rewritten (see `fairlead_ebpf::lb::table`
//! for the write ordering), and a Service that cannot be programmed (a bad
//! port, an address outside the service CIDRs) is skipped with a log line and
//! an Event, leaving every other Service's entries as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use fairlead_core::{
    EndpointSlice, IpNet, ObjectKey, Protocol, Service, ServiceType, SessionAffinity, Snapshot,
    TrafficPolicy,
};
use fairlead_ebpf::lb::{
    ApplyReport, BackendAddr, Frontend, FrontendKey, Lb, Persistence, Proto, Scope,
};
use tracing::{info, warn};

/// How the agent balances Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSettings {
    /// Pin directory instance: `/sys/fs/bpf/fairlead-<instance>/`.
    pub instance: String,
    /// Maglev consistent hashing instead of a random backend per flow.
    pub maglev: bool,
    /// ClusterIPs outside these are refused (a typo or a foreign allocator).
    pub service_cidrs: Vec<IpNet>,
    /// cgroup v2 directory (created by the runtime or sandbox) for socket-LB.
    pub pod_cgroup: Option<PathBuf>,
    /// Leave maps and links pinned when the agent stops (a real node: true).
    pub keep_pins: bool,
    /// Enforce NetworkPolicy on this node's pods (`FAIRLEAD_AGENT_NETWORK_POLICY`, default
    /// true). On, a pod's packets pass only once its policy is programmed (at ATTACH).
    pub network_policy: bool,
}

impl LbSettings {
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            maglev: false,
            service_cidrs: default_service_cidrs(),
            pod_cgroup: None,
            keep_pins: true,
            network_policy: true,
        }
    }
}

pub fn default_service_cidrs() -> Vec<IpNet> {
    ["10.96.0.0/12", "fd00:10:96::/112"]
        .iter()
        .map(|c| c.parse().expect("valid default CIDR"))
        .collect()
}

/// What the compiler needs to know about this node.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    pub name: &'a str,
    /// Addresses NodePorts answer on.
    pub addresses: &'a [IpAddr],
    pub settings: &'a LbSettings,
}

/// Why a Service (or part of it) was not programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub service: ObjectKey,
    pub reason: String,
}

/// The frontends of one Service, and what was skipped. A Service-level
/// problem (an address outside the service CIDRs) skips the whole Service;
/// a bad port skips that port only.
pub fn frontends_for<'s>(
    svc: &Service,
    slices: impl Iterator<Item = &'s Arc<EndpointSlice>>,
    node: &NodeView<'_>,
) -> (Vec<Frontend>, Vec<String>) {
    let mut skipped = Vec::new();
    if svc.service_type == ServiceType::ExternalName || svc.cluster_ips.is_headless() {
        return (Vec::new(), skipped);
    }
    let cluster_ips = svc.cluster_ips.ips();
    if cluster_ips.is_empty() {
        return (Vec::new(), skipped);
    }
    if let Some(bad) = cluster_ips
        .iter()
        .find(|ip| !node.settings.service_cidrs.iter().any(|c| c.contains(ip)))
    {
        let cidrs: Vec<String> = node
            .settings
            .service_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        skipped.push(format!(
            "clusterIP {bad} is outside the service CIDRs ({})",
            cidrs.join(", ")
        ));
        return (Vec::new(), skipped);
    }
    let slices: Vec<&Arc<EndpointSlice>> = slices.collect();
    let affinity = match svc.session_affinity {
        SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds.max(1)),
        SessionAffinity::None => None,
    };
    let node_ports = matches!(
        svc.service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let mut externals: Vec<IpAddr> = svc.external_ips.clone();
    if svc.service_type == ServiceType::LoadBalancer {
        externals.extend(
            svc.load_balancer_ingress
                .iter()
                .filter(|i| i.ip_mode == fairlead_core::IpMode::Vip)
                .map(|i| i.ip),
        );
    }

    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for port in &svc.ports {
        let proto = match port.protocol {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Sctp => {
                skipped.push(format!(
                    "port {} ({}): SCTP is not load-balanced by Fairlead",
                    port.port,
                    port_label(&port.name)
                ));
                continue;
            }
        };
        if port.port == 0 {
            skipped.push(format!(
                "port {}: port 0 is not valid",
                port_label(&port.name)
            ));
            continue;
        }
        if !seen.insert((port.port, proto)) {
            skipped.push(format!(
                "port {}/{proto} ({}) is listed twice",
                port.port,
                port_label(&port.name)
            ));
            continue;
        }
        let node_port = if node_ports {
            match port.node_port {
                Some(np) if np != 0 => Some(np),
                _ => {
                    skipped.push(format!(
                        "port {}/{proto} ({}): a {:?} Service needs a nodePort",
                        port.port,
                        port_label(&port.name),
                        svc.service_type
                    ));
                    None
                }
            }
        } else {
            None
        };
        for family_ip in cluster_ips {
            let v4 = family_ip.is_ipv4();
            let all = backends(&slices, &port.name, proto, v4, svc, node.name);
            let itp_local = svc.internal_traffic_policy == TrafficPolicy::Local;
            let etp_local = svc.external_traffic_policy == TrafficPolicy::Local;
            let local: Vec<BackendAddr> = all.iter().copied().filter(|b| b.local).collect();
            let base = |key: FrontendKey, node_fe: bool, local_policy: bool, backends| Frontend {
                key,
                node: node_fe,
                local_policy,
                affinity_timeout_s: affinity,
                maglev: node.settings.maglev,
                backends,
            };
            out.push(base(
                FrontendKey {
                    addr: *family_ip,
                    port: port.port,
                    proto,
                    scope: Scope::Internal,
                },
                false,
                false,
                if itp_local {
                    local.clone()
                } else {
                    all.clone()
                },
            ));
            let mut add_external = |addr: IpAddr, fport: u16| {
                for (scope, backends, local_policy) in [
                    (Scope::Internal, all.clone(), false),
                    (
                        Scope::External,
                        if etp_local {
                            local.clone()
                        } else {
                            all.clone()
                        },
                        etp_local,
                    ),
                ] {
                    out.push(base(
                        FrontendKey {
                            addr,
                            port: fport,
                            proto,
                            scope,
                        },
                        true,
                        local_policy,
                        backends,
                    ));
                }
            };
            if let Some(np) = node_port {
                for addr in node.addresses.iter().filter(|a| a.is_ipv4() == v4) {
                    add_external(*addr, np);
                }
            }
            for addr in externals.iter().filter(|a| a.is_ipv4() == v4) {
                add_external(*addr, port.port);
            }
        }
    }
    // Two frontends on one key (an externalIP equal to a node address and
    // port equal to a nodePort): the first wins, as the API would refuse it.
    let mut keys = HashSet::new();
    out.retain(|f| keys.insert(f.key));
    (out, skipped)
}

fn port_label(name: &str) -> &str {
    if name.is_empty() {
        "unnamed"
    } else {
        name
    }
}

/// Backends of one Service port in one family, sorted (slot order must not
/// depend on slice order).
fn backends(
    slices: &[&Arc<EndpointSlice>],
    port_name: &str,
    proto: Proto,
    v4: bool,
    svc: &Service,
    node: &str,
) -> Vec<BackendAddr> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().find(|p| {
            p.name == port_name
                && matches!(
                    (p.protocol, proto),
                    (Protocol::Tcp, Proto::Tcp) | (Protocol::Udp, Proto::Udp)
                )
        }) else {
            continue;
        };
        let Some(number) = port.port.filter(|p| *p != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = ep.conditions;
            let local = ep.node_name.as_deref() == Some(node);
            for addr in ep.addresses.iter().filter(|a| a.is_ipv4() == v4) {
                let b = BackendAddr {
                    addr: *addr,
                    port: number,
                    local,
                };
                if c.ready || svc.publish_not_ready_addresses {
                    ready.insert(b);
                } else if c.serving && c.terminating {
                    terminating.insert(b);
                }
            }
        }
    }
    if ready.is_empty() {
        terminating.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

/// The Services a diff touches: changed Services, and the Services of
/// changed EndpointSlices.
pub fn touched(old: &Snapshot, new: &Snapshot) -> BTreeSet<ObjectKey> {
    let diff = Snapshot::diff(old, new);
    let mut keys: BTreeSet<ObjectKey> = diff
        .services
        .added
        .iter()
        .chain(&diff.services.updated)
        .chain(&diff.services.removed)
        .cloned()
        .collect();
    for key in diff
        .endpoint_slices
        .added
        .iter()
        .chain(&diff.endpoint_slices.updated)
        .chain(&diff.endpoint_slices.removed)
    {
        for snap in [old, new] {
            if let Some(svc) = snap
                .endpoint_slices()
                .get_key(key)
                .and_then(|s| s.service.clone())
            {
                keys.insert(ObjectKey::new(&key.namespace, &svc));
            }
        }
    }
    keys
}

/// The agent's Service load balancer: the loaded programs and their maps.
pub struct ServiceLb {
    pub lb: Lb,
    settings: LbSettings,
    /// Skips reported, so each is logged (and evented) once per reason.
    reported: BTreeMap<ObjectKey, Vec<String>>,
    pruned: bool,
    /// The node addresses last written to the datapath.
    node_addresses: Option<Vec<IpAddr>>,
    /// NetworkPolicy ids handed to the datapath.
    pub policy_ids: crate::policy::PolicyIds,
    /// Pod addresses the CNI plugin announced (ATTACH), with their pod and when: a pod is
    /// programmed before it runs, even before the snapshot has its addresses.
    attached: HashMap<IpAddr, (ObjectKey, std::time::Instant)>,
}

/// How long an announced pod address is kept while the snapshot does not know its pod yet.
const ATTACH_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Result of one sync.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub services: usize,
    pub apply: ApplyReport,
    /// Newly skipped Services with their reasons (for Events).
    pub skips: Vec<Skip>,
}

impl ServiceLb {
    /// Loads (or re-adopts) the programs and maps. Blocking.
    pub fn load(settings: LbSettings) -> Result<Self, fairlead_ebpf::Error> {
        let persistence = if settings.keep_pins {
            Persistence::Keep
        } else {
            Persistence::RemoveOnDrop
        };
        let lb = Lb::load(&settings.instance, persistence)?;
        Ok(Self {
            lb,
            settings,
            reported: BTreeMap::new(),
            pruned: false,
            node_addresses: None,
            policy_ids: Default::default(),
            attached: HashMap::new(),
        })
    }

    /// Programs the policy of a pod that is about to start (the CNI plugin's ATTACH) at the
    /// addresses it was given, from `snapshot` as it is now. A pod the snapshot does not know
    /// gets deny-all both ways until it does (fail closed).
    pub fn attach_endpoint(
        &mut self,
        snapshot: &Snapshot,
        pod: ObjectKey,
        ips: &[IpAddr],
    ) -> Result<(), fairlead_ebpf::Error> {
        if !self.settings.network_policy {
            return Ok(());
        }
        for ip in ips {
            self.attached
                .insert(*ip, (pod.clone(), std::time::Instant::now()));
            let policy = self.endpoint_policy(snapshot, &pod, *ip);
            self.lb.set_endpoint_policy(*ip, &policy)?;
        }
        Ok(())
    }

    fn endpoint_policy(
        &mut self,
        snapshot: &Snapshot,
        pod: &ObjectKey,
        ip: IpAddr,
    ) -> fairlead_ebpf::policy::EndpointPolicy {
        match snapshot.pods().get_key(pod) {
            Some(p) => crate::policy::compile_endpoint(snapshot, p, ip, &mut self.policy_ids),
            None => fairlead_ebpf::policy::EndpointPolicy {
                ingress_isolated: true,
                egress_isolated: true,
                ..Default::default()
            },
        }
    }

    /// Brings every local pod's policy in line with `snapshot`: pods on this node with
    /// addresses, and addresses announced by ATTACH whose pod the snapshot does not show
    /// yet. Endpoints of pods that are gone are forgotten. Only differing entries are
    /// written.
    pub fn sync_policy(
        &mut self,
        snapshot: &Snapshot,
        node_name: &str,
    ) -> Result<usize, fairlead_ebpf::Error> {
        if !self.settings.network_policy {
            return Ok(0);
        }
        let mut want: HashMap<IpAddr, ObjectKey> = HashMap::new();
        for p in snapshot.pods_on_node(node_name) {
            if p.host_network {
                continue;
            }
            for ip in &p.ips {
                want.insert(*ip, ObjectKey::new(&p.namespace, &p.name));
            }
        }
        let now = std::time::Instant::now();
        self.attached.retain(|ip, (key, at)| {
            if want.get(ip) == Some(key) {
                return false; // the snapshot has it now
            }
            snapshot.pods().get_key(key).is_some() || now.duration_since(*at) < ATTACH_GRACE
        });
        for (ip, (key, _)) in &self.attached {
            want.entry(*ip).or_insert_with(|| key.clone());
        }
        let mut ops = 0;
        for (ip, key) in &want {
            let policy = self.endpoint_policy(snapshot, key, *ip);
            let report = match self.lb.set_endpoint_policy(*ip, &policy) {
                Ok(r) => r,
                Err(e) => {
                    // The pod is left closed both ways; the others still get theirs.
                    warn!(pod = %key, %ip, error = %e, "NetworkPolicy could not be programmed; the pod's traffic is denied until it can");
                    continue;
                }
            };
            for (_, _, prefix) in &report.overflow {
                warn!(pod = %key, %ip, %prefix, "more port rules for one peer prefix than the policy map holds; that peer is denied (fail closed)");
            }
            ops += report.map_ops;
        }
        for ip in self.lb.policy_endpoints() {
            if !want.contains_key(&ip) {
                self.lb.remove_endpoint_policy(ip)?;
                ops += 1;
            }
        }
        Ok(ops)
    }

    pub fn settings(&self) -> &LbSettings {
        &self.settings
    }

    /// Programs the Services in `keys` (all of them when `None`) as they are
    /// in `snapshot`. Blocking (map syscalls).
    pub fn sync(
        &mut self,
        snapshot: &Snapshot,
        node_name: &str,
        keys: Option<&BTreeSet<ObjectKey>>,
    ) -> Result<SyncReport, fairlead_ebpf::Error> {
        let addresses: Vec<IpAddr> = snapshot
            .node(node_name)
            .map(|n| n.internal_ips.clone())
            .unwrap_or_default();
        if self.node_addresses.as_ref() != Some(&addresses) {
            self.lb.set_node_addresses(&addresses)?;
            self.node_addresses = Some(addresses.clone());
        }
        let settings = self.settings.clone();
        let view = NodeView {
            name: node_name,
            addresses: &addresses,
            settings: &settings,
        };
        let all: Vec<ObjectKey>;
        let keys: Box<dyn Iterator<Item = &ObjectKey>> = match keys {
            Some(k) => Box::new(k.iter()),
            None => {
                all = snapshot.services().keys().cloned().collect();
                Box::new(all.iter())
            }
        };
        let mut report = SyncReport::default();
        for key in keys {
            report.services += 1;
            let owner = key.to_string();
            let Some(svc) = snapshot.services().get_key(key) else {
                report.apply.merge(self.lb.remove_service(&owner)?);
                self.reported.remove(key);
                continue;
            };
            let (frontends, skipped) = frontends_for(svc, snapshot.endpoint_slices_of(key), &view);
            let applied = self.lb.set_service(&owner, frontends)?;
            let mut reasons = skipped;
            reasons.extend(
                applied.conflicts.iter().map(|(fe, other)| {
                    format!("frontend {fe} is already served for Service {other}")
                }),
            );
            report.apply.merge(applied);
            if reasons.is_empty() {
                self.reported.remove(key);
            } else if self.reported.get(key) != Some(&reasons) {
                for reason in &reasons {
                    warn!(service = %key, %reason, "Service skipped (in part) by the load balancer");
                }
                report.skips.extend(reasons.iter().map(|r| Skip {
                    service: key.clone(),
                    reason: r.clone(),
                }));
                self.reported.insert(key.clone(), reasons);
            }
        }
        if keys_were_all(&report, snapshot) && !self.pruned {
            let pruned = self.lb.prune_unowned()?;
            if pruned.removed > 0 {
                info!(
                    removed = pruned.removed,
                    "removed Services deleted while the agent was away"
                );
            }
            report.apply.merge(pruned);
            self.pruned = true;
        }
        Ok(report)
    }
}

fn keys_were_all(report: &SyncReport, snapshot: &Snapshot) -> bool {
    report.services >= snapshot.services().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairlead_core::{
        AddressType, ClusterIps, Endpoint, EndpointConditions, EndpointPort, IpFamilyPolicy,
        Labels, PortRef, ServicePort,
    };

    fn service(ips: &[&str], ports: &[(&str, u16, Protocol, Option<u16>)]) -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            service_type: ServiceType::ClusterIP,
            ports: ports
                .iter()
                .map(|(name, port, protocol, node_port)| ServicePort {
                    name: (*name).into(),
                    protocol: *protocol,
                    port: *port,
                    target_port: PortRef::Number(8080),
                    node_port: *node_port,
                    app_protocol: None,
                })
                .collect(),
            cluster_ips: ClusterIps::Assigned(ips.iter().map(|i| i.parse().unwrap()).collect()),
            ip_families: vec![],
            ip_family_policy: IpFamilyPolicy::SingleStack,
            selector: Labels::new(),
            session_affinity: SessionAffinity::None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            load_balancer_ingress: vec![],
            external_name: None,
            publish_not_ready_addresses: false,
            health_check_node_port: None,
            labels: Labels::new(),
        }
    }

    /// (address, node, ready, serving, terminating)
    type Ep<'a> = (&'a str, &'a str, bool, bool, bool);

    fn slice(
        name: &str,
        v4: bool,
        eps: &[Ep<'_>],
        ports: &[(&str, u16, Protocol)],
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            namespace: "default".into(),
            name: name.into(),
            service: Some("web".into()),
            address_type: if v4 {
                AddressType::IPv4
            } else {
                AddressType::IPv6
            },
            endpoints: eps
                .iter()
                .map(|(ip, node, ready, serving, terminating)| Endpoint {
                    addresses: vec![ip.parse().unwrap()],
                    conditions: EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    },
                    node_name: Some((*node).into()),
                    zone: None,
                    hostname: None,
                    target_pod: None,
                    hints_for_zones: vec![],
                    hints_for_nodes: vec![],
                })
                .collect(),
            ports: ports
                .iter()
                .map(|(name, port, protocol)| EndpointPort {
                    name: (*name).into(),
                    protocol: *protocol,
                    port: Some(*port),
                    app_protocol: None,
                })
                .collect(),
            labels: Labels::new(),
        })
    }

    fn compile(svc: &Service, slices: &[Arc<EndpointSlice>]) -> (Vec<Frontend>, Vec<String>) {
        let s = LbSettings::new("t");
        let addrs: Vec<IpAddr> = vec![
            "172.30.0.11".parse().unwrap(),
            "fd00:172:30::11".parse().unwrap(),
        ];
        let view = NodeView {
            name: "node-1",
            addresses: &addrs,
            settings: &s,
        };
        frontends_for(svc, slices.iter(), &view)
    }

    fn find<'a>(fes: &'a [Frontend], addr: &str, port: u16, scope: Scope) -> &'a Frontend {
        let addr: IpAddr = addr.parse().unwrap();
        fes.iter()
            .find(|f| f.key.addr == addr && f.key.port == port && f.key.scope == scope)
            .unwrap_or_else(|| panic!("no frontend {addr}:{port} {scope:?} in {fes:#?}"))
    }

    fn addrs(f: &Frontend) -> Vec<String> {
        f.backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    #[test]
    fn dual_stack_clusterip_maps_each_port_to_its_endpoint_port() {
        let svc = service(
            &["10.96.0.20", "fd00:10:96::20"],
            &[
                ("http", 80, Protocol::Tcp, None),
                ("dns", 53, Protocol::Udp, None),
            ],
        );
        let ports = [("http", 8080, Protocol::Tcp), ("dns", 5353, Protocol::Udp)];
        let slices = [
            slice(
                "a",
                true,
                &[
                    ("10.244.1.5", "node-1", true, true, false),
                    ("10.244.2.6", "node-2", true, true, false),
                ],
                &ports,
            ),
            slice(
                "b",
                false,
                &[("fd00:10:244:1::5", "node-1", true, true, false)],
                &ports,
            ),
        ];
        let (fes, skipped) = compile(&svc, &slices);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(fes.len(), 4, "2 ports x 2 families, internal only");
        assert_eq!(
            addrs(find(&fes, "10.96.0.20", 80, Scope::Internal)),
            ["10.244.1.5:8080", "10.244.2.6:8080"]
        );
        assert_eq!(
            addrs(find(&fes, "10.96.0.20", 53, Scope::Internal)),
            ["10.244.1.5:5353", "10.244.2.6:5353"]
        );
        assert_eq!(
            addrs(find(&fes, "fd00:10:96::20", 80, Scope::Internal)),
            ["fd00:10:244:1::5:8080"]
        );
        assert!(find(&fes, "10.96.0.20", 80, Scope::Internal).backends[0].local);
        assert!(!find(&fes, "10.96.0.20", 80, Scope::Internal).backends[1].local);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let svc = service(&["10.96.0.20"], &[("", 80, Protocol::Tcp, None)]);
        let ports = [("", 8080, Protocol::Tcp)];
        let both = [slice(
            "a",
            true,
            &[
                ("10.244.1.5", "node-1", true, true, false),
                ("10.244.1.6", "node-1", false, true, true),
                ("10.244.1.7", "node-1", false, false, false),
            ],
            &ports,
        )];
        let (fes, _) = compile(&svc, &both);
        assert_eq!(addrs(&fes[0]), ["10.244.1.5:8080"]);
        let draining = [slice(
            "a",
            true,
            &[
                ("10.244.1.6", "node-1", false, true, true),
                ("10.244.1.7", "node-1", false, false, false),
            ],
            &ports,
        )];
        let (fes, _) = compile(&svc, &draining);
        assert_eq!(
            addrs(&fes[0]),
            ["10.244.1.6:8080"],
            "serving and terminating, as kube-proxy"
        );
        let (fes, _) = compile(&svc, &[]);
        assert!(
            fes[0].backends.is_empty(),
            "no endpoints: programmed empty, so it rejects"
        );
    }

    #[test]
    fn nodeport_and_external_ips_with_traffic_policies() {
        let mut svc = service(&["10.96.0.20"], &[("", 80, Protocol::Tcp, Some(30080))]);
        svc.service_type = ServiceType::NodePort;
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.internal_traffic_policy = TrafficPolicy::Local;
        svc.external_ips = vec!["192.0.2.10".parse().unwrap()];
        svc.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 600,
        };
        let ports = [("", 8080, Protocol::Tcp)];
        let slices = [slice(
            "a",
            true,
            &[
                ("10.244.1.5", "node-1", true, true, false),
                ("10.244.2.6", "node-2", true, true, false),
            ],
            &ports,
        )];
        let (fes, skipped) = compile(&svc, &slices);
        assert!(skipped.is_empty(), "{skipped:?}");
        // ClusterIP + (node IP + external IP) x (internal + external).
        assert_eq!(fes.len(), 5);
        assert_eq!(
            addrs(find(&fes, "10.96.0.20", 80, Scope::Internal)),
            ["10.244.1.5:8080"],
            "internalTrafficPolicy Local"
        );
        let np_ext = find(&fes, "172.30.0.11", 30080, Scope::External);
        assert_eq!(
            addrs(np_ext),
            ["10.244.1.5:8080"],
            "externalTrafficPolicy Local"
        );
        assert!(np_ext.node && np_ext.local_policy);
        assert_eq!(
            addrs(find(&fes, "172.30.0.11", 30080, Scope::Internal)).len(),
            2
        );
        assert_eq!(
            addrs(find(&fes, "192.0.2.10", 80, Scope::External)),
            ["10.244.1.5:8080"]
        );
        assert!(fes.iter().all(|f| f.affinity_timeout_s == Some(600)));
    }

    #[test]
    fn load_balancer_ingress_ips_unless_the_balancer_proxies() {
        let mut svc = service(&["10.96.0.20"], &[("", 443, Protocol::Tcp, Some(30443))]);
        svc.service_type = ServiceType::LoadBalancer;
        svc.load_balancer_ingress = vec![
            fairlead_core::LoadBalancerIngress {
                ip: "198.51.100.7".parse().unwrap(),
                ip_mode: fairlead_core::IpMode::Vip,
            },
            fairlead_core::LoadBalancerIngress {
                ip: "198.51.100.8".parse().unwrap(),
                ip_mode: fairlead_core::IpMode::Proxy,
            },
        ];
        let ports = [("", 8443, Protocol::Tcp)];
        let slices = [slice(
            "a",
            true,
            &[("10.244.2.6", "node-2", true, true, false)],
            &ports,
        )];
        let (fes, skipped) = compile(&svc, &slices);
        assert!(skipped.is_empty(), "{skipped:?}");
        let lb = find(&fes, "198.51.100.7", 443, Scope::External);
        assert_eq!(addrs(lb), ["10.244.2.6:8443"]);
        assert!(lb.node, "answered by the node, replies leave through it");
        find(&fes, "172.30.0.11", 30443, Scope::External);
        let proxied: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(
            fes.iter().all(|f| f.key.addr != proxied),
            "ipMode Proxy: the load balancer rewrites, the node must not capture"
        );
    }

    #[test]
    fn bad_services_are_skipped_with_reasons() {
        let outside = service(&["192.168.5.5"], &[("", 80, Protocol::Tcp, None)]);
        let (fes, skipped) = compile(&outside, &[]);
        assert!(fes.is_empty());
        assert!(
            skipped[0].contains("outside the service CIDRs"),
            "{skipped:?}"
        );

        let ports = service(
            &["10.96.0.20"],
            &[
                ("zero", 0, Protocol::Tcp, None),
                ("sctp", 9, Protocol::Sctp, None),
                ("a", 80, Protocol::Tcp, None),
                ("b", 80, Protocol::Tcp, None),
            ],
        );
        let (fes, skipped) = compile(&ports, &[]);
        assert_eq!(fes.len(), 1, "only the first port 80/TCP");
        assert_eq!(skipped.len(), 3, "{skipped:?}");

        let mut headless = service(&[], &[("", 80, Protocol::Tcp, None)]);
        headless.cluster_ips = ClusterIps::Headless;
        assert_eq!(compile(&headless, &[]), (vec![], vec![]));
    }
}
