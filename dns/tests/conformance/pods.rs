//! Pod records: `<a-b-c-d>.<ns>.pod.<zone>` and the IPv6 form with dashes.

use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn a_and_aaaa_by_dashed_address() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "10-244-1-9.shop.pod.cluster.local", RecordType::A),
        vec!["10-244-1-9.shop.pod.cluster.local. 5 IN A 10.244.1.9"],
    );
    assert_records(
        ask(
            &index,
            "fd00-10-244-1--9.shop.pod.cluster.local",
            RecordType::AAAA,
        ),
        vec!["fd00-10-244-1--9.shop.pod.cluster.local. 5 IN AAAA fd00:10:244:1::9"],
    );
    // Only in the pod's namespace.
    assert_nxdomain(
        ask(&index, "10-244-1-9.other.pod.cluster.local", RecordType::A),
        SOA,
    );
    assert_nodata(
        ask(
            &index,
            "10-244-1-9.shop.pod.cluster.local",
            RecordType::AAAA,
        ),
        SOA,
    );
}

#[test]
fn host_network_and_finished_pods_have_no_records() {
    let snap = fairlead_core::Snapshot::builder()
        .pod(pod(serde_json::json!({
            "metadata": {"name": "host", "namespace": "kube-system"},
            "spec": {"containers": [], "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "172.30.0.11"}
        })))
        .pod(pod(serde_json::json!({
            "metadata": {"name": "done", "namespace": "kube-system"},
            "spec": {"containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.244.0.3"}
        })))
        .build();
    let index = index_of(snap);
    assert_nxdomain(
        ask(
            &index,
            "172-30-0-11.kube-system.pod.cluster.local",
            RecordType::A,
        ),
        SOA,
    );
    assert_nxdomain(
        ask(
            &index,
            "10-244-0-3.kube-system.pod.cluster.local",
            RecordType::A,
        ),
        SOA,
    );
}
