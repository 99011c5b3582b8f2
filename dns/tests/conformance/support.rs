//! Objects from Kubernetes JSON (as core's tests build them), queries, and a readable view of
//! answers decoded with hickory-proto.

use std::sync::Arc;

use fairlead_core::{EndpointSlice, Pod, Service, Snapshot};
use fairlead_dns::{Index, IndexConfig, PodMode};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use serde_json::{json, Value};

pub fn service(v: Value) -> Service {
    let s: corev1::Service = serde_json::from_value(v).unwrap();
    Service::try_from(&s).unwrap()
}

pub fn slice(v: Value) -> EndpointSlice {
    let s: discoveryv1::EndpointSlice = serde_json::from_value(v).unwrap();
    EndpointSlice::try_from(&s).unwrap()
}

pub fn pod(v: Value) -> Pod {
    let p: corev1::Pod = serde_json::from_value(v).unwrap();
    Pod::try_from(&p).unwrap()
}

/// A ClusterIP Service with these cluster IPs and (name, port, protocol) ports.
pub fn cluster_ip(ns: &str, name: &str, ips: &[&str], ports: &[(&str, u16, &str)]) -> Service {
    service(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": ips[0], "clusterIPs": ips,
            "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>()
        }
    }))
}

pub fn headless(ns: &str, name: &str, ports: &[(&str, u16)]) -> Service {
    service(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": "None",
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p})).collect::<Vec<_>>()
        }
    }))
}

/// The cluster most sections use.
pub fn cluster() -> Snapshot {
    Snapshot::builder()
        .service(cluster_ip(
            "shop",
            "web",
            &["10.96.0.20", "fd00:10:96::20"],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ))
        .service(headless("shop", "db", &[("pg", 5432)]))
        .endpoint_slice(slice(json!({
            "metadata": {"name": "db-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.7"], "hostname": "db-2", "conditions": {"ready": false}}
            ],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
        })))
        .endpoint_slice(slice(json!({
            "metadata": {"name": "db-v6", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00:10:244:1::5"], "hostname": "db-0"}],
            "ports": [{"name": "pg", "port": 5432}]
        })))
        .service(headless("shop", "empty", &[("pg", 5432)]))
        .service(service(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "Example.COM."}
        })))
        .service(service(json!({
            "metadata": {"name": "alias", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "web.shop.svc.cluster.local"}
        })))
        .pod(pod(json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.9"}, {"ip": "fd00:10:244:1::9"}]}
        })))
        .build()
}

pub fn config() -> IndexConfig {
    IndexConfig {
        zone: "cluster.local".into(),
        ttl: 5,
        reverse_cidrs: [
            "10.96.0.0/12",
            "10.244.0.0/16",
            "fd00:10:96::/112",
            "fd00:10:244::/56",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect(),
        pods: PodMode::Insecure,
    }
}

pub fn index_of(snap: Snapshot) -> Index {
    index_with(PodMode::Insecure, snap)
}

pub fn index_with(pods: PodMode, snap: Snapshot) -> Index {
    let mut index = Index::new(&IndexConfig { pods, ..config() }).unwrap();
    index.apply(Arc::new(snap));
    index
}

pub fn query_bytes(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0xbeef;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// An answer as text: rcode, AA, and each section as `name ttl class type rdata` lines.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub aa: bool,
    pub tc: bool,
    pub answers: Vec<String>,
    pub authority: Vec<String>,
}

pub fn decode(bytes: &[u8]) -> Answer {
    let m = Message::from_vec(bytes).expect("our answer decodes with hickory-proto");
    assert_eq!(m.metadata.id, 0xbeef);
    Answer {
        rcode: m.metadata.response_code,
        aa: m.metadata.authoritative,
        tc: m.metadata.truncation,
        answers: m.answers.iter().map(ToString::to_string).collect(),
        authority: m.authorities.iter().map(ToString::to_string).collect(),
    }
}

pub fn ask(index: &Index, name: &str, rtype: RecordType) -> Answer {
    let q = query_bytes(name, rtype, Some(1232));
    decode(&fairlead_dns::answer_from_index(index, &q, 1232).unwrap())
}

pub const SOA: &str =
    "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5";

/// NOERROR, authoritative, exactly these answers (in any order), no authority.
pub fn assert_records(a: Answer, mut expected: Vec<&str>) {
    let mut got = a.answers.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{a:#?}");
    assert_eq!((a.rcode, a.aa), (ResponseCode::NoError, true), "{a:#?}");
    assert!(a.authority.is_empty(), "{a:#?}");
}

pub fn assert_nodata(a: Answer, soa: &str) {
    assert_eq!(a.rcode, ResponseCode::NoError, "{a:#?}");
    assert!(a.answers.is_empty() && a.aa, "{a:#?}");
    assert_eq!(a.authority, vec![soa.to_owned()]);
}

pub fn assert_nxdomain(a: Answer, soa: &str) {
    assert_eq!(a.rcode, ResponseCode::NXDomain, "{a:#?}");
    assert!(a.answers.is_empty() && a.aa, "{a:#?}");
    assert_eq!(a.authority, vec![soa.to_owned()]);
}

/// Makes `m` a fake upstream's NXDOMAIN for a name in `zone`: the rcode and the zone's SOA
/// (minimum 60) in the authority section.
pub fn nxdomain_from(m: &mut Message, zone: &str) {
    use hickory_proto::rr::rdata::SOA;
    use hickory_proto::rr::{RData, Record};
    m.metadata.response_code = ResponseCode::NXDomain;
    let soa = SOA::new(
        Name::from_ascii(format!("ns.{zone}")).unwrap(),
        Name::from_ascii(format!("root.{zone}")).unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    m.add_authority(Record::from_rdata(
        Name::from_ascii(zone).unwrap(),
        3600,
        RData::SOA(soa),
    ));
}
