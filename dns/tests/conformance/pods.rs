//! Pod records: `<a-b-c-d>.<ns>.pod.<zone>` and the IPv6 form with dashes, in the three modes
//! of CoreDNS's `pods` option.

use fairlead_dns::PodMode;
use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn a_and_aaaa_by_dashed_address() {
    let index = index_with(PodMode::Verified, cluster());
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
    // Verified: an address no pod has is NXDOMAIN; the namespace of a pod is a name.
    assert_nxdomain(
        ask(&index, "10-244-1-10.shop.pod.cluster.local", RecordType::A),
        SOA,
    );
    assert_nodata(ask(&index, "shop.pod.cluster.local", RecordType::A), SOA);
    assert_nxdomain(ask(&index, "other.pod.cluster.local", RecordType::A), SOA);
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
    let index = index_with(PodMode::Verified, snap);
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

#[test]
fn verified_follows_pod_updates_and_deletions() {
    let mut store = fairlead_core::Store::new();
    let running = |ip: &str| {
        pod(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
    };
    store.list(vec![running("10.244.1.9")]);
    let mut index = index_with(PodMode::Verified, fairlead_core::Snapshot::empty());
    index.apply(store.snapshot());
    assert_records(
        ask(&index, "10-244-1-9.shop.pod.cluster.local", RecordType::A),
        vec!["10-244-1-9.shop.pod.cluster.local. 5 IN A 10.244.1.9"],
    );
    // The same pod with another address: the old one goes.
    store.apply(fairlead_core::Event::Apply(running("10.244.1.10")));
    index.apply(store.snapshot());
    assert_nxdomain(
        ask(&index, "10-244-1-9.shop.pod.cluster.local", RecordType::A),
        SOA,
    );
    assert_records(
        ask(&index, "10-244-1-10.shop.pod.cluster.local", RecordType::A),
        vec!["10-244-1-10.shop.pod.cluster.local. 5 IN A 10.244.1.10"],
    );
    store.apply(fairlead_core::Event::<fairlead_core::Pod>::Delete(
        fairlead_core::ObjectKey::new("shop", "web-0"),
    ));
    index.apply(store.snapshot());
    assert_nxdomain(
        ask(&index, "10-244-1-10.shop.pod.cluster.local", RecordType::A),
        SOA,
    );
    assert_nxdomain(ask(&index, "shop.pod.cluster.local", RecordType::A), SOA);
}

#[test]
fn insecure_answers_from_the_name_alone() {
    // No pods at all: the name carries the address (CoreDNS `pods insecure`, kube-dns).
    let index = index_with(PodMode::Insecure, fairlead_core::Snapshot::empty());
    assert_records(
        ask(&index, "10-244-7-7.any.pod.cluster.local", RecordType::A),
        vec!["10-244-7-7.any.pod.cluster.local. 5 IN A 10.244.7.7"],
    );
    assert_records(
        ask(
            &index,
            "FD00-10-244-1--9.Shop.pod.cluster.local",
            RecordType::AAAA,
        ),
        // The owner is the question, as asked.
        vec!["FD00-10-244-1--9.Shop.pod.cluster.local. 5 IN AAAA fd00:10:244:1::9"],
    );
    assert_records(
        ask(&index, "10-244-7-7.any.pod.cluster.local", RecordType::ANY),
        vec!["10-244-7-7.any.pod.cluster.local. 5 IN A 10.244.7.7"],
    );
    // The other family, or another type: NODATA.
    assert_nodata(
        ask(&index, "10-244-7-7.any.pod.cluster.local", RecordType::AAAA),
        SOA,
    );
    assert_nodata(
        ask(&index, "10-244-7-7.any.pod.cluster.local", RecordType::TXT),
        SOA,
    );
    // Namespaces and the pod subtree are names; what is not an address is not.
    assert_nodata(ask(&index, "any.pod.cluster.local", RecordType::A), SOA);
    assert_nodata(ask(&index, "pod.cluster.local", RecordType::A), SOA);
    for bad in [
        "web-0.any.pod.cluster.local",
        "10-244-07-7.any.pod.cluster.local",
        "10-244-7-256.any.pod.cluster.local",
        "x.10-244-7-7.any.pod.cluster.local",
    ] {
        assert_nxdomain(ask(&index, bad, RecordType::A), SOA);
    }
    // Service names are unaffected.
    let index = index_with(PodMode::Insecure, cluster());
    assert_records(
        ask(&index, "web.shop.svc.cluster.local", RecordType::A),
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );
}

#[test]
fn disabled_answers_nxdomain_under_pod() {
    let index = index_with(PodMode::Disabled, cluster());
    for name in [
        "10-244-1-9.shop.pod.cluster.local",
        "shop.pod.cluster.local",
        "pod.cluster.local",
    ] {
        assert_nxdomain(ask(&index, name, RecordType::A), SOA);
    }
}
