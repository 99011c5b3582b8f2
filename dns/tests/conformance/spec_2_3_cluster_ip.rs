//! §2.3 Records for a Service with ClusterIP: A/AAAA (§2.3.1), SRV per named port (§2.3.2),
//! PTR (§2.3.3).

use hickory_proto::rr::RecordType;

use crate::support::*;

const WEB: &str = "web.shop.svc.cluster.local.";

#[test]
fn a_and_aaaa_per_family() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, WEB, RecordType::A),
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );
    assert_records(
        ask(&index, WEB, RecordType::AAAA),
        vec!["web.shop.svc.cluster.local. 5 IN AAAA fd00:10:96::20"],
    );
}

#[test]
fn single_stack_service_has_nodata_for_the_other_family() {
    let snap = fairlead_core::Snapshot::builder()
        .service(cluster_ip(
            "shop",
            "v4only",
            &["10.96.0.30"],
            &[("", 80, "TCP")],
        ))
        .build();
    let index = index_of(snap);
    assert_nodata(
        ask(&index, "v4only.shop.svc.cluster.local", RecordType::AAAA),
        SOA,
    );
    // An unnamed port has no SRV record.
    assert_nxdomain(
        ask(
            &index,
            "_.tcp.v4only.shop.svc.cluster.local",
            RecordType::SRV,
        ),
        SOA,
    );
}

#[test]
fn srv_per_named_port_and_protocol() {
    let index = index_of(cluster());
    assert_records(
        ask(
            &index,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        ),
        vec![
            "_http._tcp.web.shop.svc.cluster.local. 5 IN SRV 0 100 80 web.shop.svc.cluster.local.",
        ],
    );
    assert_records(
        ask(
            &index,
            "_dns._udp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        ),
        vec!["_dns._udp.web.shop.svc.cluster.local. 5 IN SRV 0 100 53 web.shop.svc.cluster.local."],
    );
    // The port exists only over UDP.
    assert_nxdomain(
        ask(
            &index,
            "_dns._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        ),
        SOA,
    );
    // `_tcp.<svc>` is an empty non-terminal: NODATA, not NXDOMAIN.
    assert_nodata(
        ask(&index, "_tcp.web.shop.svc.cluster.local.", RecordType::SRV),
        SOA,
    );
}

#[test]
fn ptr_for_each_cluster_ip() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "20.0.96.10.in-addr.arpa.", RecordType::PTR),
        vec!["20.0.96.10.in-addr.arpa. 5 IN PTR web.shop.svc.cluster.local."],
    );
    let v6 = "0.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa.";
    assert_records(
        ask(&index, v6, RecordType::PTR),
        vec![&format!("{v6} 5 IN PTR web.shop.svc.cluster.local.")],
    );
}

#[test]
fn unknown_reverse_names_in_cluster_ranges_are_nxdomain_here() {
    let index = index_of(cluster());
    assert_nxdomain(
        ask(&index, "99.0.96.10.in-addr.arpa.", RecordType::PTR),
        "in-addr.arpa. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5",
    );
}

#[test]
fn names_of_the_tree_are_empty_non_terminals() {
    let index = index_of(cluster());
    for ent in [
        "svc.cluster.local",
        "shop.svc.cluster.local",
        "pod.cluster.local",
    ] {
        assert_nodata(ask(&index, ent, RecordType::A), SOA);
    }
    assert_nxdomain(
        ask(&index, "nope.shop.svc.cluster.local", RecordType::A),
        SOA,
    );
    assert_nxdomain(
        ask(&index, "web.other.svc.cluster.local", RecordType::A),
        SOA,
    );
    assert_nxdomain(
        ask(&index, "x.web.shop.svc.cluster.local", RecordType::A),
        SOA,
    );
}
