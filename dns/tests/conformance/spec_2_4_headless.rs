//! §2.4 Records for a headless Service: A/AAAA per ready endpoint and per endpoint hostname
//! (§2.4.1), SRV per named port and endpoint (§2.4.2), PTR per ready endpoint (§2.4.3).

use hickory_proto::rr::RecordType;

use crate::support::*;

const DB: &str = "db.shop.svc.cluster.local.";

#[test]
fn a_and_aaaa_per_ready_endpoint() {
    let index = index_of(cluster());
    // 10.244.1.7 is not ready and so not served.
    assert_records(
        ask(&index, DB, RecordType::A),
        vec![
            "db.shop.svc.cluster.local. 5 IN A 10.244.1.5",
            "db.shop.svc.cluster.local. 5 IN A 10.244.1.6",
        ],
    );
    assert_records(
        ask(&index, DB, RecordType::AAAA),
        vec!["db.shop.svc.cluster.local. 5 IN AAAA fd00:10:244:1::5"],
    );
}

#[test]
fn a_record_per_endpoint_hostname() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "db-0.db.shop.svc.cluster.local", RecordType::A),
        vec!["db-0.db.shop.svc.cluster.local. 5 IN A 10.244.1.5"],
    );
    assert_records(
        ask(&index, "db-0.db.shop.svc.cluster.local", RecordType::AAAA),
        vec!["db-0.db.shop.svc.cluster.local. 5 IN AAAA fd00:10:244:1::5"],
    );
    // Without a hostname the endpoint is named by its address, as CoreDNS does.
    assert_records(
        ask(
            &index,
            "10-244-1-6.db.shop.svc.cluster.local",
            RecordType::A,
        ),
        vec!["10-244-1-6.db.shop.svc.cluster.local. 5 IN A 10.244.1.6"],
    );
    // Not ready: no record.
    assert_nxdomain(
        ask(&index, "db-2.db.shop.svc.cluster.local", RecordType::A),
        SOA,
    );
}

#[test]
fn srv_per_named_port_and_endpoint() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "_pg._tcp.db.shop.svc.cluster.local", RecordType::SRV),
        vec![
            "_pg._tcp.db.shop.svc.cluster.local. 5 IN SRV 0 100 5432 10-244-1-6.db.shop.svc.cluster.local.",
            "_pg._tcp.db.shop.svc.cluster.local. 5 IN SRV 0 100 5432 db-0.db.shop.svc.cluster.local.",
        ],
    );
}

#[test]
fn ptr_per_ready_endpoint() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "5.1.244.10.in-addr.arpa", RecordType::PTR),
        vec!["5.1.244.10.in-addr.arpa. 5 IN PTR db-0.db.shop.svc.cluster.local."],
    );
    assert_records(
        ask(&index, "6.1.244.10.in-addr.arpa", RecordType::PTR),
        vec!["6.1.244.10.in-addr.arpa. 5 IN PTR 10-244-1-6.db.shop.svc.cluster.local."],
    );
    assert_nxdomain(
        ask(&index, "7.1.244.10.in-addr.arpa", RecordType::PTR),
        "in-addr.arpa. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5",
    );
}

#[test]
fn headless_without_ready_endpoints_is_nxdomain() {
    let index = index_of(cluster());
    assert_nxdomain(
        ask(&index, "empty.shop.svc.cluster.local", RecordType::A),
        SOA,
    );
    assert_nxdomain(
        ask(
            &index,
            "_pg._tcp.empty.shop.svc.cluster.local",
            RecordType::SRV,
        ),
        SOA,
    );
}

#[test]
fn publish_not_ready_addresses_serves_every_endpoint() {
    let mut svc = headless("shop", "peers", &[]);
    svc.publish_not_ready_addresses = true;
    let snap = fairlead_core::Snapshot::builder()
        .service(svc)
        .endpoint_slice(slice(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "labels": {"kubernetes.io/service-name": "peers"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.2.1"], "conditions": {"ready": false}}]
        })))
        .build();
    let index = index_of(snap);
    assert_records(
        ask(&index, "peers.shop.svc.cluster.local", RecordType::A),
        vec!["peers.shop.svc.cluster.local. 5 IN A 10.244.2.1"],
    );
}
