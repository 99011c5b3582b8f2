//! Small constructors of model objects for this crate's tests.

use std::net::IpAddr;

use crate::*;

pub fn service(ns: &str, name: &str, port: u16) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        service_type: ServiceType::ClusterIP,
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port,
            target_port: PortRef::Number(port),
            node_port: None,
            app_protocol: None,
        }],
        cluster_ips: ClusterIps::Unassigned,
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

pub fn slice(ns: &str, name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        namespace: ns.into(),
        name: name.into(),
        service: Some(service.into()),
        address_type: AddressType::IPv4,
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.parse::<IpAddr>().unwrap()],
                conditions: EndpointConditions::default(),
                node_name: None,
                zone: None,
                hostname: None,
                target_pod: None,
                hints_for_zones: vec![],
                hints_for_nodes: vec![],
            })
            .collect(),
        ports: vec![],
        labels: Labels::new(),
    }
}

pub fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ips: vec![ip.parse().unwrap()],
        labels: Labels::new(),
        annotations: Labels::new(),
        node_name: Some(node.into()),
        service_account: "default".into(),
        phase: PodPhase::Running,
        host_network: false,
        ports: vec![],
        ready: true,
        terminating: false,
    }
}

pub fn namespace(name: &str) -> Namespace {
    Namespace {
        name: name.into(),
        labels: Labels::new(),
    }
}

/// A store in which every kind has been listed (empty), so it is ready.
pub fn ready_store() -> Store {
    let mut store = Store::new();
    store.list(Vec::<Service>::new());
    store.list(Vec::<EndpointSlice>::new());
    store.list(Vec::<Pod>::new());
    store.list(Vec::<Namespace>::new());
    store.list(Vec::<Node>::new());
    store.list(Vec::<NetworkPolicy>::new());
    store
}
