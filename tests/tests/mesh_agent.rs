//! The sidecar's production path through its node agent to the controller: the
//! `fairlead-proxy` binary gets its certificate over the agent's socket (`MESH-CERT`: its
//! own key's CSR and its ServiceAccount token), the agent forwards it over HTTPS to the
//! controller's CA API (configured as `fairlead agent` is: URL and bundle file), which
//! checks the token with TokenReview on the API server; the proxy then serves with it.
//! Another account's token gets no certificate and a log line that says why; the agent
//! streams the mesh's routing table (`MESH-ROUTES follow`) and each change.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead_agent::config::MeshCaConfig;
use fairlead_agent::mesh::{MeshService, MeshSettings};
use fairlead_agent::status::StatusServer;
use fairlead_agent::Readiness;
use fairlead_controller::server::{self, Limits, ServingCert};
use fairlead_controller::webhook::InjectConfig;
use fairlead_controller::{CertIssuer, IssuerConfig};
use fairlead_core::{EndpointSlice, Pod, Service, Snapshot};
use fairlead_proxy::routes::MeshRoutes;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

mod common;
use common::proxy_binary;

/// The real chain behind the agent: the controller's CA API over HTTPS (its serving
/// certificate from the mesh CA, for `localhost`), checking tokens with TokenReview on the
/// embedded API server. Returns the API server (for tokens), the agent's mesh settings
/// (built from configuration, as `fairlead agent` builds them) and the server task.
struct ControllerCa {
    api: fairlead_apiserver::ApiServer,
    settings: MeshSettings,
    task: tokio::task::JoinHandle<()>,
    issuer: Arc<CertIssuer>,
    serving: Arc<ServingCert>,
    bundle: std::path::PathBuf,
}

async fn controller_ca(dir: &std::path::Path) -> ControllerCa {
    let api = fairlead_apiserver::ApiServer::start(
        "127.0.0.1:0".parse().unwrap(),
        fairlead_apiserver::ServerConfig::default(),
    )
    .await
    .unwrap();
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "cart", "namespace": "shop"}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admin", "namespace": "shop"}}),
    ] {
        api.create(obj).unwrap();
    }
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let issuer = Arc::new(
        CertIssuer::load_or_create(client, IssuerConfig::default())
            .await
            .unwrap(),
    );
    let (leaf, key) = issuer
        .issue_serving(&["localhost".to_owned()], Duration::from_secs(3600))
        .unwrap();
    let serving = ServingCert::from_pem(&leaf.chain_pem, &key).unwrap();
    let tls = serving.tls_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(server::serve_with_ca(
        listener,
        tls,
        Arc::new(InjectConfig::default()),
        Limits::default(),
        Some(Arc::clone(&issuer)),
    ));
    let bundle = dir.join("ca.crt");
    std::fs::write(&bundle, issuer.bundle()).unwrap();
    let settings = MeshSettings::from_config(&MeshCaConfig {
        url: format!("https://localhost:{port}"),
        bundle: bundle.clone(),
        trust_domain: "cluster.local".into(),
    });
    ControllerCa {
        api,
        settings,
        task,
        issuer,
        serving,
        bundle,
    }
}

fn snapshot(with_pod: bool) -> Snapshot {
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "catalog", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "catalog-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "catalog"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "catalog", "namespace": "shop",
                     "annotations": {"fairlead.io/inject": "true"}},
        "spec": {"serviceAccountName": "catalog", "containers": [{"name": "c"}], "nodeName": "n1"},
        "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}
    }))
    .unwrap();
    let mut b = Snapshot::builder()
        .service(Service::try_from(&svc).unwrap())
        .endpoint_slice(EndpointSlice::try_from(&slice).unwrap());
    if with_pod {
        b = b.pod(Pod::try_from(&pod).unwrap());
    }
    b.build()
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_gets_its_certificate_and_routes_from_the_agent() {
    let dir = std::env::temp_dir().join(format!("fairlead-mesh-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let ControllerCa {
        api,
        settings,
        task: ca_task,
        ..
    } = controller_ca(&dir).await;
    let (snap_tx, snap_rx) = tokio::sync::watch::channel(Arc::new(snapshot(true)));
    let (_ready_tx, ready_rx) = tokio::sync::watch::channel(Readiness::Ready);
    let server = StatusServer::bind(&socket, ready_rx)
        .unwrap()
        .with_mesh(MeshService {
            issuer: settings.issuer,
            snapshots: snap_rx,
            trust_domain: settings.trust_domain,
        });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.serve(async move {
        let _ = stop_rx.await;
    }));

    let run_proxy = |token: &str, tag: &str| {
        let token_file = dir.join(format!("token-{tag}"));
        std::fs::write(&token_file, token).unwrap();
        let admin = free_port();
        let log = dir.join(format!("proxy-{tag}.log"));
        let child = Command::new(proxy_binary())
            .arg("--agent-socket")
            .arg(&socket)
            .args(["--namespace", "shop", "--service-account", "cart"])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--inbound", &free_port().to_string()])
            .args(["--app", "127.0.0.1:9"])
            .args(["--outbound", "none"])
            .args(["--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (Proc(child), admin, log)
    };

    // A good token: a certificate for spiffe://cluster.local/ns/shop/sa/cart, ready.
    let good_token = api
        .issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))
        .unwrap();
    let (_good, admin, _) = run_proxy(&good_token, "good");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        match admin_get(admin, "/ready") {
            Some(r) if r.starts_with("HTTP/1.1 200") => break r,
            _ if Instant::now() > deadline => panic!("the proxy never got ready"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(
        ready.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{ready}"
    );

    // Another account's token: refused by the CA, said in the log, never ready.
    let admin_token = api
        .issue_token("shop", "admin", &["fairlead"], Duration::from_secs(600))
        .unwrap();
    let (_bad, admin_bad, log_bad) = run_proxy(&admin_token, "bad");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(admin_get(admin_bad, "/ready").is_none());
    let log = std::fs::read_to_string(&log_bad).unwrap();
    assert!(
        log.contains("the mesh CA refused shop/cart") && log.contains("may not take the identity"),
        "{log}"
    );

    // The routing table, then its change when the meshed pod goes.
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(b"MESH-ROUTES follow\n").await.unwrap();
    let mut lines = BufReader::new(r).lines();
    let first: MeshRoutes =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    assert_eq!(
        first.services[&vip][0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/catalog")
    );
    assert_eq!(
        first.services[&vip][0].addr,
        "10.244.1.5:8080".parse().unwrap()
    );
    snap_tx.send_replace(Arc::new(snapshot(false)));
    let second: MeshRoutes = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .map(|l| serde_json::from_str(&l).unwrap())
        .unwrap();
    assert!(second.pods.is_empty());
    assert_eq!(second.services[&vip][0].identity, None);

    // Garbage on MESH-CERT gets a clear error.
    let reply = fairlead_agent::status::request(&socket, "MESH-CERT {\"nope\":1}")
        .await
        .unwrap();
    assert!(
        reply.starts_with("ERROR the certificate request is not"),
        "{reply}"
    );

    let _ = stop_tx.send(());
    let _ = served.await;
    ca_task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent reads the bundle file on every request: without it a sidecar's request gets
/// the reason; once it is there, certificates flow; after a root rotation the controller
/// serves a certificate from the new root, which the old bundle does not verify, and the
/// rewritten file (as kubelet rewrites a mounted ConfigMap) is picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_the_bundle_file_through_a_root_rotation() {
    let dir = std::env::temp_dir().join(format!("fairlead-mesh-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = controller_ca(&dir).await;
    let token = ca
        .api
        .issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))
        .unwrap();
    let (_key, csr) = fairlead_controller::new_key_and_csr().unwrap();
    let request = fairlead_agent::mesh::CertRequest {
        namespace: "shop".into(),
        service_account: "cart".into(),
        token,
        csr,
    };
    let issue = || ca.settings.issuer.issue(&request);

    let bundle = std::fs::read_to_string(&ca.bundle).unwrap();
    std::fs::remove_file(&ca.bundle).unwrap();
    let err = issue().await.unwrap_err();
    assert!(err.contains("reading the bundle"), "{err}");
    std::fs::write(&ca.bundle, &bundle).unwrap();
    issue()
        .await
        .expect("a certificate once the bundle is there");

    // The root rotates (no propagation wait here) and the controller serves a certificate
    // from the new root.
    ca.issuer
        .rotate(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    let (leaf, key) = ca
        .issuer
        .issue_serving(&["localhost".to_owned()], Duration::from_secs(3600))
        .unwrap();
    ca.serving.set(&leaf.chain_pem, &key).unwrap();
    // The agent's client resumes its TLS session (no certificate is checked then), so only a
    // changed file makes it handshake afresh: the old root alone (the file as it was, but
    // re-saved with a trailing newline, as a rewrite can) does not verify the new
    // certificate...
    std::fs::write(&ca.bundle, format!("{bundle}\n")).unwrap();
    let err = issue().await.unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "the old bundle does not trust the new root: {err}"
    );
    // ...and the bundle the controller publishes after the rotation does.
    std::fs::write(&ca.bundle, ca.issuer.bundle()).unwrap();
    let reply = issue().await.expect("the new bundle is read");
    assert_eq!(reply.bundle.matches("BEGIN CERTIFICATE").count(), 2);
    ca.task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's TCP side for sidecars without the host socket: only this node's pods (by
/// source address in the node's pod CIDRs) and only the two mesh requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_tcp_side_serves_only_its_pods_and_only_mesh_requests() {
    use tokio::io::AsyncReadExt;
    let node = |cidr: &str| {
        let n: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}
        }))
        .unwrap();
        fairlead_core::Node::try_from(&n).unwrap()
    };
    let dir = std::env::temp_dir().join(format!("fairlead-mesh-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = controller_ca(&dir).await;
    let ask = |snap: Snapshot, line: &'static str| {
        let settings = MeshSettings {
            issuer: Arc::clone(&ca.settings.issuer),
            trust_domain: "cluster.local".into(),
        };
        async move {
            let (_tx, rx) = tokio::sync::watch::channel(Arc::new(snap));
            let service = MeshService {
                issuer: settings.issuer,
                snapshots: rx,
                trust_domain: settings.trust_domain,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(fairlead_agent::mesh::serve_tcp(
                listener,
                service,
                "n1".into(),
                async move {
                    let _ = stopped.await;
                },
            ));
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(line.as_bytes()).await.unwrap();
            let mut first = String::new();
            let mut buf = [0u8; 4096];
            // The first line is enough (MESH-ROUTES follow would keep streaming).
            while !first.contains('\n') {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .expect("an answer")
                    .unwrap();
                if n == 0 {
                    break;
                }
                first.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            let _ = stop.send(());
            served.await.unwrap();
            first
        }
    };
    // 127.0.0.1 is no pod of a node whose pods are in 10.244.1.0/24.
    let snap = || Snapshot::builder().node(node("10.244.1.0/24")).build();
    let refused = ask(snap(), "MESH-ROUTES\n").await;
    assert!(
        refused.starts_with("ERROR 127.0.0.1 is not a pod of node n1"),
        "{refused}"
    );
    // A node whose pod CIDR holds the client's address: routes flow, nothing else does.
    let local = || Snapshot::builder().node(node("127.0.0.0/8")).build();
    let routes = ask(local(), "MESH-ROUTES\n").await;
    assert!(routes.starts_with('{'), "{routes}");
    let status = ask(local(), "STATUS\n").await;
    assert!(
        status.starts_with("ERROR only MESH-CERT and MESH-ROUTES are served here"),
        "{status}"
    );
    let garbage = ask(local(), "MESH-CERT {not json\n").await;
    assert!(
        garbage.starts_with("ERROR the certificate request is not"),
        "{garbage}"
    );
    ca.task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
