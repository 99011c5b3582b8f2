//! §2.5 Records for an ExternalName Service: a CNAME to the external name.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn cname_for_every_type() {
    let index = index_of(cluster());
    for t in [
        RecordType::CNAME,
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
    ] {
        let a = ask(&index, "ext.shop.svc.cluster.local", t);
        // Lowercased and trailing-dot tolerant: "Example.COM." becomes example.com.
        assert_records(
            a,
            vec!["ext.shop.svc.cluster.local. 5 IN CNAME example.com."],
        );
    }
}

#[test]
fn cname_to_a_cluster_name_is_chased_in_the_index() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "alias.shop.svc.cluster.local", RecordType::A),
        vec![
            "alias.shop.svc.cluster.local. 5 IN CNAME web.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local. 5 IN A 10.96.0.20",
        ],
    );
}

#[test]
fn cname_to_a_missing_cluster_name_is_nxdomain_with_the_cname() {
    let snap = fairlead_core::Snapshot::builder()
        .service(service(serde_json::json!({
            "metadata": {"name": "dangling", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "gone.shop.svc.cluster.local"}
        })))
        .build();
    let a = ask(
        &index_of(snap),
        "dangling.shop.svc.cluster.local",
        RecordType::A,
    );
    assert_eq!(a.rcode, ResponseCode::NXDomain);
    assert_eq!(
        a.answers,
        vec!["dangling.shop.svc.cluster.local. 5 IN CNAME gone.shop.svc.cluster.local."]
    );
    assert_eq!(a.authority, vec![SOA]);
}
