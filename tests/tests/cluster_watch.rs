//! kube-rs watchers, a reflector and Fairlead's snapshot watcher, all
//! unmodified, against the embedded API server: a thousand Services and their
//! EndpointSlices arrive, updates and deletes arrive in order, and a restart
//! from a stale resourceVersion gets 410 Gone and relists.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_core::{ObjectKey, Snapshot};

const N: usize = 1000;

async fn start() -> (ApiServer, Client) {
    let cfg = ServerConfig {
        bookmark_interval: Duration::from_millis(500),
        ..Default::default()
    };
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let client = Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    (server, client)
}

fn service(i: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i:04}"), "namespace": "load", "labels": {"gen": "0"}},
        "spec": {"selector": {"app": format!("a{i}")}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]}})
}

fn slice(i: usize) -> serde_json::Value {
    let a = (i / 250) as u8;
    let b = (i % 250) as u8;
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": format!("svc-{i:04}-x1"), "namespace": "load", "labels": {"kubernetes.io/service-name": format!("svc-{i:04}")}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
    "endpoints": [
        {"addresses": [format!("10.244.{a}.{}", b + 1)], "nodeName": "node-1", "conditions": {"ready": true}},
        {"addresses": [format!("10.245.{a}.{}", b + 1)], "nodeName": "node-2", "conditions": {"ready": false, "serving": true, "terminating": true}},
    ]})
}

/// Creates the namespace and N Services and slices over HTTP, 16 at a time.
async fn populate(client: &Client) {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "load"}})).unwrap(),
    )
    .await
    .unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "load");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "load");
    futures::stream::iter(0..N)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                svcs.create(
                    &PostParams::default(),
                    &serde_json::from_value(service(i)).unwrap(),
                )
                .await
                .unwrap();
                slices
                    .create(
                        &PostParams::default(),
                        &serde_json::from_value(slice(i)).unwrap(),
                    )
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Waits (bounded) for a snapshot that satisfies `pred`.
async fn wait_for(
    cluster: &mut fairlead_core::watch::SnapshotWatch,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let snap = cluster.current();
        if pred(&snap) {
            return snap;
        }
        match tokio::time::timeout_at(deadline, cluster.changed()).await {
            Ok(r) => {
                r.unwrap();
            }
            Err(_) => panic!("timed out waiting for: {what}"),
        }
    }
}

fn gen_of(s: &Snapshot, name: &str) -> Option<u32> {
    s.service("load", name).map(|svc| {
        svc.labels
            .get("gen")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0)
    })
}

#[tokio::test]
async fn thousand_services_in_the_snapshot_and_in_a_reflector() {
    let (server, client) = start().await;
    populate(&client).await;

    // Fairlead's own snapshot watcher: ready only after every kind's first list.
    let mut cluster = fairlead_core::watch::spawn(client.clone()).unwrap();
    let snap = tokio::time::timeout(Duration::from_secs(30), cluster.ready())
        .await
        .unwrap()
        .unwrap();
    assert!(snap.ready);
    assert_eq!(snap.services().in_namespace("load").count(), N);
    assert_eq!(snap.endpoint_slices().in_namespace("load").count(), N);
    let svc = snap.service("load", "svc-0742").unwrap();
    assert_eq!(svc.ports.len(), 2);
    let ip = svc.cluster_ips.ipv4().expect("allocated clusterIP");
    assert!(
        matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10 && (96..112).contains(&v4.octets()[1])),
        "{ip}"
    );
    let slices: Vec<_> = snap
        .endpoint_slices_of(&ObjectKey::new("load", "svc-0742"))
        .collect();
    assert_eq!(slices.len(), 1);
    let eps = &slices[0].endpoints;
    assert_eq!(
        eps[0].addresses,
        vec!["10.244.2.243".parse::<IpAddr>().unwrap()]
    );
    assert!(eps[0].conditions.ready && eps[0].conditions.serving && !eps[0].conditions.terminating);
    assert!(!eps[1].conditions.ready && eps[1].conditions.serving && eps[1].conditions.terminating);
    // Every clusterIP is distinct.
    let mut ips: Vec<IpAddr> = snap
        .services()
        .values()
        .filter_map(|s| s.cluster_ips.ipv4())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N + 1);

    // A kube-rs reflector over the same server holds the same set.
    let (reader, writer) = reflector::store::<Service>();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "load");
    let rf = reflector::reflector(writer, watcher(svcs.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(rf.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(30), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), N);
    task.abort();
    // Paged lists were used (kube-rs lists 500 at a time): the thousand came in pages.
    assert!(server.stats().lists >= 2);
}

#[tokio::test]
async fn updates_and_deletes_arrive_in_order() {
    let (_server, client) = start().await;
    populate(&client).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "load");

    // A raw kube-rs watcher sees every event in the order it happened.
    let mut events = watcher(
        svcs.clone(),
        watcher::Config::default().fields("metadata.name=svc-0001"),
    )
    .boxed();
    loop {
        if let watcher::Event::InitDone = events.try_next().await.unwrap().unwrap() {
            break;
        }
    }
    let mut cluster = fairlead_core::watch::spawn(client.clone()).unwrap();
    cluster.ready().await.unwrap();
    let mut seen_gens = Vec::new();
    let mut rx = cluster.subscribe();
    let observer = tokio::spawn(async move {
        let mut gens: Vec<Option<u32>> = Vec::new();
        while rx.changed().await.is_ok() {
            let s = rx.borrow_and_update().clone();
            gens.push(gen_of(&s, "svc-0001"));
            if gen_of(&s, "svc-0001").is_none() {
                break;
            }
        }
        gens
    });

    for g in 1..=20 {
        svcs.patch(
            "svc-0001",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gen": g.to_string()}}})),
        )
        .await
        .unwrap();
    }
    svcs.delete("svc-0001", &DeleteParams::default())
        .await
        .unwrap();

    let mut order = Vec::new();
    while order.last() != Some(&"deleted".to_string()) {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(s) => order.push(s.metadata.labels.unwrap()["gen"].clone()),
            watcher::Event::Delete(_) => order.push("deleted".to_string()),
            _ => {}
        }
    }
    let want: Vec<String> = (1..=20)
        .map(|g| g.to_string())
        .chain(["deleted".to_string()])
        .collect();
    assert_eq!(
        order, want,
        "the watcher sees each update, then the delete, in order"
    );

    // The snapshot may coalesce bursts, but never goes backwards and ends deleted.
    let gens = tokio::time::timeout(Duration::from_secs(10), observer)
        .await
        .unwrap()
        .unwrap();
    seen_gens.extend(gens);
    let numbers: Vec<u32> = seen_gens.iter().flatten().copied().collect();
    assert!(
        numbers.windows(2).all(|w| w[0] <= w[1]),
        "snapshots went backwards: {seen_gens:?}"
    );
    assert_eq!(
        seen_gens.last(),
        Some(&None),
        "the last snapshot has the Service deleted"
    );
    assert!(cluster.current().service("load", "svc-0002").is_some());
}

#[tokio::test]
async fn stale_resource_version_gets_410_and_the_watchers_relist() {
    let (server, client) = start().await;
    populate(&client).await;
    let mut cluster = fairlead_core::watch::spawn(client.clone()).unwrap();
    let before = cluster.ready().await.unwrap();
    assert_eq!(before.services().in_namespace("load").count(), N);
    let stats = server.stats();

    // The server "restarts": watches are cut, and while nobody watches, 100
    // Services go, one is changed and one is added; then the history is
    // compacted, so the watchers' last resourceVersion is stale.
    server.restart_with(|txn| {
        for i in 0..100 {
            txn.delete("v1", "Service", "load", &format!("svc-{i:04}"))
                .unwrap();
        }
        txn.delete(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "load",
            "svc-0500-x1",
        )
        .unwrap();
        txn.create(service(5000)).unwrap();
    });

    let after = wait_for(&mut cluster, "the relisted snapshot", |s| {
        s.service("load", "svc-5000").is_some()
            && s.services().in_namespace("load").count() == N - 99
            && s.endpoint_slices().in_namespace("load").count() == N - 1
    })
    .await;
    assert!(
        after.service("load", "svc-0000").is_none(),
        "objects deleted during the outage are removed by the relist"
    );
    assert_eq!(
        after
            .endpoint_slices_of(&ObjectKey::new("load", "svc-0500"))
            .count(),
        0
    );
    let now = server.stats();
    assert!(
        now.gone > stats.gone,
        "the watchers were told 410 Gone ({:?} -> {:?})",
        stats,
        now
    );
    assert!(now.lists > stats.lists, "and relisted");

    // Untouched objects keep their Arc across the relist: consumers diff cheaply.
    let d = Snapshot::diff(&before, &after);
    let svc_diff = d
        .kinds()
        .into_iter()
        .find(|(k, _)| k.as_str() == "Service")
        .unwrap()
        .1
        .clone();
    assert_eq!(svc_diff.removed.len(), 100);
    assert_eq!(svc_diff.added.len(), 1);
    assert!(svc_diff.updated.is_empty(), "{:?}", svc_diff.updated);
}
