//! Updates from `Snapshot::diff`: only the changed owners are rebuilt.

use std::sync::Arc;

use fairlead_core::{ClusterIps, Store};
use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn a_changed_service_changes_its_answers_and_only_its_records_are_rebuilt() {
    let mut store = Store::new();
    let mut services: Vec<_> = (0..200)
        .map(|i| {
            cluster_ip(
                "bulk",
                &format!("s{i}"),
                &[&format!("10.96.1.{}", i % 250)],
                &[("http", 80, "TCP")],
            )
        })
        .collect();
    services.push(cluster_ip(
        "shop",
        "web",
        &["10.96.0.20"],
        &[("http", 80, "TCP")],
    ));
    store.list(services);
    store.list(Vec::<fairlead_core::EndpointSlice>::new());
    store.list(Vec::<fairlead_core::Pod>::new());
    store.list(Vec::<fairlead_core::Namespace>::new());
    store.list(Vec::<fairlead_core::Node>::new());
    store.list(Vec::<fairlead_core::NetworkPolicy>::new());
    let first = store.snapshot();
    assert!(first.ready);

    let mut index = fairlead_dns::Index::new(&config()).unwrap();
    let stats = index.apply(Arc::clone(&first));
    assert_eq!(stats.services_rebuilt, 201);
    let names = index.len();
    assert_records(
        ask(&index, "web.shop.svc.cluster.local", RecordType::A),
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );

    let mut web = (**first.service("shop", "web").unwrap()).clone();
    web.cluster_ips = ClusterIps::Assigned(vec!["10.96.0.21".parse().unwrap()]);
    store.apply(fairlead_core::Event::Apply(web));
    let second = store.snapshot();
    let stats = index.apply(second);
    // A, PTR and SRV of web only: three out, three in.
    assert_eq!(
        stats,
        fairlead_dns::UpdateStats {
            services_rebuilt: 1,
            pods_rebuilt: 0,
            records_removed: 3,
            records_added: 3
        }
    );
    assert_records(
        ask(&index, "web.shop.svc.cluster.local", RecordType::A),
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.21"],
    );
    assert_records(
        ask(&index, "21.0.96.10.in-addr.arpa", RecordType::PTR),
        vec!["21.0.96.10.in-addr.arpa. 5 IN PTR web.shop.svc.cluster.local."],
    );
    assert_nxdomain(
        ask(&index, "20.0.96.10.in-addr.arpa", RecordType::PTR),
        "in-addr.arpa. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5",
    );
    // The reverse tree changed shape (a new leaf, an old one gone), nothing else did.
    assert_eq!(index.len(), names);
    assert_records(
        ask(&index, "s7.bulk.svc.cluster.local", RecordType::A),
        vec!["s7.bulk.svc.cluster.local. 5 IN A 10.96.1.7"],
    );
}

#[test]
fn endpoint_changes_rebuild_their_service_and_deletions_empty_the_tree() {
    let snap = Arc::new(cluster());
    let mut index = fairlead_dns::Index::new(&config()).unwrap();
    index.apply(Arc::clone(&snap));
    let statics = fairlead_dns::Index::new(&config()).unwrap().len();
    assert!(index.len() > statics);

    // Everything deleted: only the static records (and their tree) remain.
    let empty = Arc::new(fairlead_core::Snapshot::builder().build());
    let stats = index.apply(empty);
    assert_eq!(stats.records_added, 0);
    assert_eq!(index.len(), statics);
    assert_nxdomain(ask(&index, "db.shop.svc.cluster.local", RecordType::A), SOA);
    assert_nxdomain(ask(&index, "shop.svc.cluster.local", RecordType::A), SOA);
}

#[test]
fn a_slice_relabeled_to_another_service_moves_its_records() {
    let slice_of = |svc: &str| {
        slice(serde_json::json!({
            "metadata": {"name": "s1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.2.1"], "hostname": "h", "conditions": {"ready": true}}],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
        }))
    };
    let snap = |svc: &str| {
        Arc::new(
            fairlead_core::Snapshot::builder()
                .service(headless("shop", "a", &[("pg", 5432)]))
                .service(headless("shop", "b", &[("pg", 5432)]))
                .endpoint_slice(slice_of(svc))
                .build(),
        )
    };
    let mut index = fairlead_dns::Index::new(&config()).unwrap();
    index.apply(snap("a"));
    assert_records(
        ask(&index, "h.a.shop.svc.cluster.local", RecordType::A),
        vec!["h.a.shop.svc.cluster.local. 5 IN A 10.244.2.1"],
    );
    assert_nxdomain(ask(&index, "b.shop.svc.cluster.local", RecordType::A), SOA);

    let stats = index.apply(snap("b"));
    // Both Services are rebuilt: the one the slice left and the one it joined.
    assert_eq!(stats.services_rebuilt, 2);
    assert_nxdomain(
        ask(&index, "h.a.shop.svc.cluster.local", RecordType::A),
        SOA,
    );
    assert_nxdomain(ask(&index, "a.shop.svc.cluster.local", RecordType::A), SOA);
    assert_records(
        ask(&index, "h.b.shop.svc.cluster.local", RecordType::A),
        vec!["h.b.shop.svc.cluster.local. 5 IN A 10.244.2.1"],
    );
    assert_records(
        ask(&index, "_pg._tcp.b.shop.svc.cluster.local", RecordType::SRV),
        vec!["_pg._tcp.b.shop.svc.cluster.local. 5 IN SRV 0 100 5432 h.b.shop.svc.cluster.local."],
    );
    assert_records(
        ask(&index, "1.2.244.10.in-addr.arpa", RecordType::PTR),
        vec!["1.2.244.10.in-addr.arpa. 5 IN PTR h.b.shop.svc.cluster.local."],
    );
}
