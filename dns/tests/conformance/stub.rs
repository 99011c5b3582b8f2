//! Stub domains (`FAIRLEAD_DNS_STUB_DOMAINS`): a zone's names go to that zone's servers only,
//! the longest matching zone wins, names compare case-insensitively, and the cluster zone is
//! never forwarded.

use std::net::Ipv4Addr;

use fairlead_core::Snapshot;
use fairlead_dns::{Config, Server};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::json;
use tokio::sync::watch;

use crate::loopback::*;
use crate::support::*;

#[tokio::test]
async fn stub_zones_go_to_their_own_servers_longest_zone_first() {
    let default = FakeDns::fixed(Ipv4Addr::new(192, 0, 2, 1), 300).await;
    let corp = FakeDns::fixed(Ipv4Addr::new(198, 51, 100, 1), 300).await;
    let team = FakeDns::fixed(Ipv4Addr::new(203, 0, 113, 1), 300).await;
    let local = FakeDns::fixed(Ipv4Addr::new(192, 0, 2, 99), 300).await;
    let down = FakeDns::silent().await;
    // The configuration as an operator writes it: mixed case, trailing dots, spaces.
    let stubs = format!(
        "Corp.Example={}; team.corp.example.={} ;local={};down.example={}",
        corp.addr, team.addr, local.addr, down.addr
    );
    let upstreams = default.addr.to_string();
    let config = Config::from_vars(|k| match k {
        "FAIRLEAD_DNS_LISTEN" => Some("127.0.0.1:0".into()),
        "FAIRLEAD_DNS_UPSTREAMS" => Some(upstreams.clone()),
        "FAIRLEAD_DNS_STUB_DOMAINS" => Some(stubs.clone()),
        "FAIRLEAD_DNS_UPSTREAM_TIMEOUT_MS" => Some("200".into()),
        _ => None,
    })
    .unwrap();
    // A Service whose ExternalName is in a stub domain.
    let snap = Snapshot::builder()
        .service(cluster_ip(
            "shop",
            "web",
            &["10.96.0.20"],
            &[("http", 80, "TCP")],
        ))
        .service(service(json!({
            "metadata": {"name": "wiki", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "wiki.corp.example"}
        })))
        .build();
    let (_tx, rx) = watch::channel(std::sync::Arc::new(snap));
    let server = Server::bind(config, rx).await.unwrap();
    let a = |name: &'static str| udp(&server, name, RecordType::A);

    for (name, ip) in [
        ("www.corp.example.", "198.51.100.1"),
        ("corp.example.", "198.51.100.1"),
        ("WWW.Team.CORP.example.", "203.0.113.1"),
        ("team.corp.example.", "203.0.113.1"),
        ("x.y.team.corp.example.", "203.0.113.1"),
        ("notcorp.example.", "192.0.2.1"),
        ("corp.example.org.", "192.0.2.1"),
        ("example.", "192.0.2.1"),
        ("printer.local.", "192.0.2.99"),
    ] {
        let got = a(name).await;
        assert_eq!(got.answers, [format!("{name} 300 IN A {ip}")], "{name}");
    }
    // The cluster zone is answered from the cluster, even under the `local` stub.
    assert_records(
        a("web.shop.svc.cluster.local.").await,
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );
    assert_eq!(
        a("gone.shop.svc.cluster.local.").await.rcode,
        ResponseCode::NXDomain
    );
    // An ExternalName into a stub domain is chased through that domain's servers.
    assert_eq!(
        a("wiki.shop.svc.cluster.local.").await.answers,
        [
            "wiki.shop.svc.cluster.local. 5 IN CNAME wiki.corp.example.",
            "wiki.corp.example. 300 IN A 198.51.100.1"
        ]
    );
    // A stub domain whose servers fail is SERVFAIL: its names never leak to the default
    // upstreams.
    assert_eq!(
        a("secret.down.example.").await.rcode,
        ResponseCode::ServFail
    );

    assert_eq!(
        default.asked_sorted(),
        ["corp.example.org.", "example.", "notcorp.example."]
    );
    assert_eq!(
        corp.asked_sorted(),
        ["corp.example.", "wiki.corp.example.", "www.corp.example."]
    );
    assert_eq!(
        team.asked_sorted(),
        [
            "team.corp.example.",
            "www.team.corp.example.",
            "x.y.team.corp.example."
        ]
    );
    assert_eq!(local.asked(), ["printer.local."]);
    assert_eq!(down.asked(), ["secret.down.example."]);

    // Counted per upstream, labelled with the zone it serves.
    let m = server.metrics();
    let requests = |zone: &str, fake: &FakeDns| m.upstream(zone, fake.addr).unwrap().requests;
    assert_eq!(requests(".", &default), 3);
    assert_eq!(requests("corp.example.", &corp), 3);
    assert_eq!(requests("team.corp.example.", &team), 3);
    assert_eq!(requests("local.", &local), 1);
    let d = m.upstream("down.example.", down.addr).unwrap();
    assert_eq!((d.requests, d.timeouts, d.up), (1, 1, false));
    assert!(m.upstream(".", corp.addr).is_none());
}

#[tokio::test]
async fn a_stub_in_the_cluster_zone_is_refused_at_start() {
    let (_tx, rx) = watch::channel(std::sync::Arc::new(cluster()));
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.stub_domains.insert(
        "svc.Cluster.Local.".into(),
        vec!["127.0.0.1:53".parse().unwrap()],
    );
    let err = Server::bind(config, rx).await.err().unwrap().to_string();
    assert!(
        err.contains("svc.Cluster.Local.") && err.contains("inside the cluster zone cluster.local"),
        "{err}"
    );
}
