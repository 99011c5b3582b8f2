//! `fairlead_core::watch::spawn` against a minimal fake API server on 127.0.0.1: real kube-rs
//! watchers, real HTTP list and watch requests. It checks the wiring (kinds, URLs, readiness after
//! every first list, live events, bad objects skipped); the full protocol (410 Gone, bookmarks)
//! is the embedded API server's integration test.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fairlead_core::{ObjectKey, Snapshot};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Lists by collection path, and live watch events as (path, event).
struct FakeApi {
    lists: HashMap<&'static str, (&'static str, &'static str, Vec<Value>)>,
    events: broadcast::Sender<(String, Value)>,
}

async fn serve(listener: TcpListener, api: Arc<FakeApi>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            let _ = handle(sock, api).await;
        });
    }
}

async fn handle(mut sock: TcpStream, api: Arc<FakeApi>) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if sock.read(&mut byte).await? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let Some((api_version, list_kind, items)) = api.lists.get(path) else {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            let resp = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await?;
            continue;
        };
        if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            // Stream events for this collection until the test ends.
            let mut events = api.events.subscribe();
            sock.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await?;
            while let Ok((p, event)) = events.recv().await {
                if p == path {
                    let line = format!("{event}\n");
                    sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                        .await?;
                }
            }
            return Ok(());
        }
        let body = json!({
            "apiVersion": api_version, "kind": list_kind,
            "metadata": {"resourceVersion": "1"},
            "items": items,
        })
        .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await?;
    }
}

fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": name},
                    "ports": [{"port": port, "targetPort": 8080}]}})
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1", "labels": {"app": "web"}},
           "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "x"}]},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]}})
}

#[tokio::test]
async fn spawn_lists_every_kind_then_follows_events() {
    let (events, _) = broadcast::channel(16);
    let mut lists = HashMap::new();
    lists.insert(
        "/api/v1/services",
        (
            "v1",
            "ServiceList",
            // The second Service has an invalid IP: it is skipped, the first is kept.
            vec![
                service("web", "10.96.0.20", 80),
                service("broken", "10.96.0.999", 80),
            ],
        ),
    );
    lists.insert(
        "/apis/discovery.k8s.io/v1/endpointslices",
        (
            "discovery.k8s.io/v1",
            "EndpointSliceList",
            vec![
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "1",
                                     "labels": {"kubernetes.io/service-name": "web"}},
                        "addressType": "IPv4",
                        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-a"}],
                        "ports": [{"port": 8080}]}),
            ],
        ),
    );
    lists.insert("/api/v1/pods", ("v1", "PodList", vec![pod("web-0")]));
    lists.insert(
        "/api/v1/namespaces",
        ("v1", "NamespaceList", vec![json!({"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": "shop", "resourceVersion": "1"}})]),
    );
    lists.insert(
        "/api/v1/nodes",
        (
            "v1",
            "NodeList",
            vec![json!({"apiVersion": "v1", "kind": "Node",
                                       "metadata": {"name": "node-a", "resourceVersion": "1"},
                                       "spec": {"podCIDRs": ["10.244.1.0/24"]}})],
        ),
    );
    lists.insert(
        "/apis/networking.k8s.io/v1/networkpolicies",
        ("networking.k8s.io/v1", "NetworkPolicyList", vec![]),
    );
    let api = Arc::new(FakeApi {
        lists,
        events: events.clone(),
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener, api));

    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let mut cluster = fairlead_core::watch::spawn(client).unwrap();
    let first = tokio::time::timeout(TIMEOUT, cluster.ready())
        .await
        .expect("snapshot became ready")
        .unwrap();

    assert!(first.ready);
    let services: Vec<_> = first.services().keys().cloned().collect();
    assert_eq!(
        services,
        vec![ObjectKey::new("shop", "web")],
        "the broken Service is skipped"
    );
    assert_eq!(
        first
            .endpoint_slices_of(&ObjectKey::new("shop", "web"))
            .count(),
        1
    );
    assert_eq!(first.pods_on_node("node-a").count(), 1);
    assert_eq!(
        first.node("node-a").unwrap().pod_cidrs[0].to_string(),
        "10.244.1.0/24"
    );
    assert!(first.namespace("shop").is_some());

    // Live events: the watch connections are open once ready, but give them a moment to subscribe.
    let mut applied: Arc<Snapshot> = first;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let _ = events.send((
            "/api/v1/services".into(),
            json!({"type": "MODIFIED", "object": service("web", "10.96.0.20", 8443)}),
        ));
        let _ = events.send((
            "/api/v1/pods".into(),
            json!({"type": "DELETED", "object": pod("web-0")}),
        ));
        if let Ok(Ok(next)) =
            tokio::time::timeout(Duration::from_millis(200), cluster.changed()).await
        {
            let diff = Snapshot::diff(&applied, &next);
            applied = next;
            if applied.service("shop", "web").unwrap().ports[0].port == 8443
                && applied.pods().is_empty()
            {
                assert!(diff.services.removed.is_empty());
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch events never arrived"
        );
    }

    drop(cluster);
    server.abort();
}
