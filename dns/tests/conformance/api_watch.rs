//! `fairlead dns`'s own path: the server's watchers (Services, EndpointSlices, and Pods only in
//! `verified` mode) against the embedded API server, unmodified kube-rs over HTTP. The first
//! list makes it ready, live changes show up at once, and a relist after an outage (410 Gone)
//! removes what went away meanwhile.

use std::time::{Duration, Instant};

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_dns::{Config, PodMode, Server};
use hickory_proto::rr::RecordType;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::net::UdpSocket;

use crate::support::*;

async fn api() -> (ApiServer, kube::Client) {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    for ns in ["shop", "other"] {
        server
            .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .unwrap();
    }
    (server, client)
}

fn web(ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn db_slice(ip: &str) -> serde_json::Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.7"], "hostname": "db-2", "conditions": {"ready": false}}
        ],
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]})
}

async fn dns(client: kube::Client, pods: PodMode) -> Server {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp_workers: 1,
        pods,
        ..Config::default()
    };
    let server = Server::bind_api(config, client).await.unwrap();
    let start = Instant::now();
    while !server.is_ready() {
        assert!(start.elapsed() < WAIT, "not ready after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server
}

const WAIT: Duration = Duration::from_secs(5);

async fn udp(server: &Server, name: &str, t: RecordType) -> Answer {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query_bytes(name, t, Some(1232)), server.udp_addr())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    decode(&buf[..n])
}

/// Asks until the answer section is `want`; returns how long that took.
async fn until(server: &Server, name: &str, t: RecordType, want: &[&str]) -> Duration {
    let start = Instant::now();
    loop {
        let got = udp(server, name, t).await.answers;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < WAIT,
            "{name} {t}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn lists_then_follows_services_and_slices() {
    let (api, client) = api().await;
    api.create(web("10.96.0.20")).unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}))
        .unwrap();
    api.create(db_slice("10.244.1.5")).unwrap();
    let server = dns(client.clone(), PodMode::Insecure).await;

    assert_records(
        udp(&server, "web.shop.svc.cluster.local", RecordType::A).await,
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );
    assert_records(
        udp(
            &server,
            "_http._tcp.web.shop.svc.cluster.local",
            RecordType::SRV,
        )
        .await,
        vec![
            "_http._tcp.web.shop.svc.cluster.local. 5 IN SRV 0 100 80 web.shop.svc.cluster.local.",
        ],
    );
    // Headless: ready endpoints only, named by their hostnames.
    assert_records(
        udp(&server, "db.shop.svc.cluster.local", RecordType::A).await,
        vec!["db.shop.svc.cluster.local. 5 IN A 10.244.1.5"],
    );
    assert_records(
        udp(&server, "db-0.db.shop.svc.cluster.local", RecordType::A).await,
        vec!["db-0.db.shop.svc.cluster.local. 5 IN A 10.244.1.5"],
    );
    assert_records(
        udp(&server, "5.1.244.10.in-addr.arpa", RecordType::PTR).await,
        vec!["5.1.244.10.in-addr.arpa. 5 IN PTR db-0.db.shop.svc.cluster.local."],
    );
    // Insecure pod records need no Pod watch.
    assert_records(
        udp(&server, "10-244-3-4.shop.pod.cluster.local", RecordType::A).await,
        vec!["10-244-3-4.shop.pod.cluster.local. 5 IN A 10.244.3.4"],
    );

    // Live changes: a slice's endpoint moves, a Service is deleted.
    let slices: Api<discoveryv1::EndpointSlice> = Api::namespaced(client.clone(), "shop");
    slices
        .patch(
            "db-abc",
            &PatchParams::default(),
            &Patch::Merge(db_slice("10.244.1.50")),
        )
        .await
        .unwrap();
    let moved = until(
        &server,
        "db-0.db.shop.svc.cluster.local",
        RecordType::A,
        &["db-0.db.shop.svc.cluster.local. 5 IN A 10.244.1.50"],
    )
    .await;
    let services: Api<corev1::Service> = Api::namespaced(client.clone(), "shop");
    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = until(&server, "web.shop.svc.cluster.local", RecordType::A, &[]).await;
    assert_nxdomain(
        udp(&server, "web.shop.svc.cluster.local", RecordType::A).await,
        SOA,
    );
    assert_nxdomain(
        udp(&server, "20.0.96.10.in-addr.arpa", RecordType::PTR).await,
        "in-addr.arpa. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5",
    );
    // The target is 100 ms; the bound here leaves room for a loaded test machine.
    eprintln!("update visible after {moved:?}, deletion after {deleted:?}");
    assert!(moved < Duration::from_secs(1) && deleted < Duration::from_secs(1));

    // An outage in which the slice is deleted and web comes back: the relist (410 Gone after
    // compaction) finds both.
    api.restart_with(|txn| {
        txn.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "db-abc")
            .unwrap();
        txn.create(web("10.96.0.21")).unwrap();
    });
    until(
        &server,
        "web.shop.svc.cluster.local",
        RecordType::A,
        &["web.shop.svc.cluster.local. 5 IN A 10.96.0.21"],
    )
    .await;
    until(
        &server,
        "db-0.db.shop.svc.cluster.local",
        RecordType::A,
        &[],
    )
    .await;
    // A headless Service without endpoints has no records (§2.4, as before the outage).
    assert_nxdomain(
        udp(&server, "db.shop.svc.cluster.local", RecordType::A).await,
        SOA,
    );
}

#[tokio::test]
async fn verified_pods_come_from_a_pod_watch() {
    let (api, client) = api().await;
    let pod = |name: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    };
    api.create(pod("web-0", "10.244.1.9")).unwrap();
    let server = dns(client.clone(), PodMode::Verified).await;
    assert_records(
        udp(&server, "10-244-1-9.shop.pod.cluster.local", RecordType::A).await,
        vec!["10-244-1-9.shop.pod.cluster.local. 5 IN A 10.244.1.9"],
    );
    assert_nxdomain(
        udp(&server, "10-244-1-9.other.pod.cluster.local", RecordType::A).await,
        SOA,
    );
    assert_nxdomain(
        udp(&server, "10-244-1-10.shop.pod.cluster.local", RecordType::A).await,
        SOA,
    );

    api.create(pod("web-1", "10.244.1.10")).unwrap();
    until(
        &server,
        "10-244-1-10.shop.pod.cluster.local",
        RecordType::A,
        &["10-244-1-10.shop.pod.cluster.local. 5 IN A 10.244.1.10"],
    )
    .await;
    let pods: Api<corev1::Pod> = Api::namespaced(client, "shop");
    pods.delete("web-0", &DeleteParams::default())
        .await
        .unwrap();
    until(
        &server,
        "10-244-1-9.shop.pod.cluster.local",
        RecordType::A,
        &[],
    )
    .await;
    assert_nxdomain(
        udp(&server, "10-244-1-9.shop.pod.cluster.local", RecordType::A).await,
        SOA,
    );
}
