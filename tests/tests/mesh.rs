//! The mesh end to end in the sandbox: pods annotated `fairlead.io/inject: "true"` get a
//! sidecar with a certificate for their ServiceAccount from the mesh CA; a meshed client
//! calls a meshed server by its Service address and by its Service name in plain HTTP, and
//! the server's application sees the client's SPIFFE ID; a client without a sidecar is
//! refused by the strict server, and so are a client certificate from another trust domain,
//! an expired one and one naming no workload; a permissive server takes plain text without
//! an identity;
//! raw TCP of a server-speaks-first app on an opaque port passes at once; HTTP/2 and gRPC
//! (a grpcio client) pass too; certificates rotate under steady traffic with no failed
//! request; a meshed client reaches a pod outside the mesh in the clear; the sidecar's admin
//! port answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use fairlead_sandbox::{kubelet, netns, topology::Topology};

mod common;
use common::{apply, with_sandbox_config};

const CERT_TTL: Duration = Duration::from_secs(6);

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: cart, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: catalog, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: catalog, namespace: shop, labels: {app: catalog}, annotations: {fairlead.io/inject: "true", fairlead.io/opaque-ports: "5000"}}
spec:
  nodeName: node-2
  serviceAccountName: catalog
  containers: [{name: c, image: fairlead/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, annotations: {fairlead.io/inject: "true"}}
spec:
  nodeName: node-1
  serviceAccountName: cart
  containers: [{name: c, image: fairlead/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, annotations: {fairlead.io/inject: "true", fairlead.io/mode: permissive}}
spec:
  nodeName: node-2
  serviceAccountName: catalog
  containers: [{name: c, image: fairlead/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop}
spec:
  nodeName: node-1
  containers: [{name: c, image: fairlead/echo}]
"#;

/// A unary call with Python's grpcio (Debian's python3-grpcio, so Debian's /usr/bin/python3, not
/// another python3 on PATH) to the address in argv[1];
/// prints the reply. The sandbox workload answers any method.
const GRPC_CLIENT: &str = r#"
import sys, grpc
with grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)]) as ch:
    call = ch.unary_unary("/fairlead.test.Echo/Who")
    sys.stdout.write(call(b"who am I", timeout=5).decode())
"#;

/// Connections the sidecar's inbound refused, whatever the reason.
fn refusals(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fairlead_proxy_inbound_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A plain HTTP GET from inside `ns`; the answer's last line.
fn get(ns: &str, to: SocketAddr) -> Result<String, String> {
    netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET /mesh HTTP/1.1\r\nhost: catalog\r\nconnection: close\r\nx-fairlead-client-id: forged\r\n\r\n")
            .map_err(|e| format!("send {to}: {e}"))?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines()
            .last()
            .filter(|l| l.starts_with("pod="))
            .map(str::to_owned)
            .ok_or_else(|| format!("no answer from {to}: {out:?}"))
    })
    .map_err(|e| e.to_string())?
}

/// An mTLS request with `tls`'s certificate from inside `pod_ns` (a pod outside the mesh,
/// so nothing intercepts it) to `to`, a meshed pod's app port (its sidecar's inbound takes
/// it); the app's answer line, or why there was none.
async fn mtls_from(
    pod_ns: &str,
    to: SocketAddr,
    tls: &fairlead_proxy::MeshTls,
) -> Result<String, String> {
    let netns_file = std::fs::File::open(netns::path(pod_ns)).map_err(|e| e.to_string())?;
    let dialer =
        fairlead_proxy::transparent::Dialer::in_netns(netns_file).map_err(|e| e.to_string())?;
    let mut s = fairlead_proxy::outbound::connect(tls, to, vec![], &dialer)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    get_over(&mut s).await
}

/// Accepts any server certificate: the client side of [`raw_mtls_from`] only has to get as
/// far as presenting its own.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// As [`mtls_from`], with a plain rustls client presenting `chain_pem`/`key_pem` whatever
/// they name.
async fn raw_mtls_from(
    pod_ns: &str,
    to: SocketAddr,
    chain_pem: &str,
    key_pem: &str,
) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    let netns_file = std::fs::File::open(netns::path(pod_ns)).map_err(|e| e.to_string())?;
    let dialer =
        fairlead_proxy::transparent::Dialer::in_netns(netns_file).map_err(|e| e.to_string())?;
    let tcp = dialer.connect(to, false).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("catalog.shop.svc").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    get_over(&mut s).await
}

/// A GET over an established (TLS) stream; the app's answer line, or why there was none.
async fn get_over(
    s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /bad-cert HTTP/1.1\r\nhost: catalog\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        Ok(Ok(_)) if text.contains("pod=") => Ok(text.lines().last().unwrap_or("").to_owned()),
        Ok(Ok(_)) => Err(format!("no answer: {text:?}")),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_pods_talk_mtls_with_identities() {
    // Certificates live 6 s, so they rotate (at half their life, through each node agent's
    // MESH-CERT to the CA) while the test sends steady traffic.
    let ttl = |c: &mut fairlead_sandbox::cluster::SandboxConfig| {
        c.mesh_cert_ttl = Some(CERT_TTL);
    };
    with_sandbox_config("ms", ttl, |sandbox, name| {
        async move {
            apply(sandbox, "mesh", MANIFEST).await;
            sandbox
                .wait_for_pods(5, Duration::from_secs(60))
                .await
                .expect("pods running");
            let snap = sandbox.snapshot();
            let prefix = Topology::prefix(name);
            let ns = |pod: &str| kubelet::pod_netns(&prefix, "shop", pod);
            let v4 = |pod: &str| {
                *snap
                    .pod("shop", pod)
                    .and_then(|p| p.ips.iter().find(|i| i.is_ipv4()))
                    .expect("pod IPv4")
            };
            let vip = snap
                .service("shop", "catalog")
                .and_then(|s| s.cluster_ips.ipv4())
                .expect("ClusterIP");

            // Meshed client -> Service -> meshed server: the app sees the verified identity.
            let deadline = Instant::now() + Duration::from_secs(15);
            let line = loop {
                match get(&ns("cart"), SocketAddr::new(vip, 80)) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() > deadline => panic!("cart -> catalog: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            assert_eq!(field(&line, "pod"), "catalog", "{line}");
            assert_eq!(
                field(&line, "identity"),
                "spiffe://cluster.local/ns/shop/sa/cart",
                "the server's app sees the client's SPIFFE ID (not the forged header): {line}"
            );
            // Over IPv6 too (the pods are dual-stack; interception is an inet table and the
            // proxy recovers IPv6 original destinations).
            let v6 = *snap
                .pod("shop", "catalog")
                .and_then(|p| p.ips.iter().find(|i| i.is_ipv6()))
                .expect("pod IPv6");
            let line = get(&ns("cart"), SocketAddr::new(v6, 8080)).unwrap();
            assert_eq!(
                field(&line, "identity"),
                "spiffe://cluster.local/ns/shop/sa/cart",
                "over IPv6: {line}"
            );
            // By pod address too, several times.
            for _ in 0..5 {
                let line = get(&ns("cart"), SocketAddr::new(v4("catalog"), 8080)).unwrap();
                assert_eq!(
                    field(&line, "identity"),
                    "spiffe://cluster.local/ns/shop/sa/cart"
                );
            }

            // No sidecar on the client: the strict server refuses plain text.
            let refused = get(&ns("plain"), SocketAddr::new(v4("catalog"), 8080));
            assert!(
                refused.is_err(),
                "plaintext reached the meshed app: {refused:?}"
            );

            let admin = |pod: &str, path: &'static str| {
                netns::run_in(&ns(pod), move || {
                    let mut s = TcpStream::connect("127.0.0.1:15020").unwrap();
                    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).unwrap();
                    out
                })
                .unwrap()
            };
            // Raw TCP through both sidecars: the pod's TCP echo speaks first (its name), then
            // echoes; its port is declared opaque, so the banner is not held back for
            // protocol detection.
            let to = SocketAddr::new(v4("catalog"), 5000);
            let (banner, echoed, took) = netns::run_in(&ns("cart"), move || {
                let t = Instant::now();
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut banner = [0u8; 8];
                s.read_exact(&mut banner).unwrap();
                let took = t.elapsed();
                s.write_all(b"raw bytes through the mesh\n").unwrap();
                let mut echoed = [0u8; 27];
                s.read_exact(&mut echoed).unwrap();
                (banner, echoed, took)
            })
            .unwrap();
            assert_eq!(&banner, b"catalog\n");
            assert_eq!(&echoed, b"raw bytes through the mesh\n");
            assert!(
                took < Duration::from_millis(250),
                "the banner of an opaque port waited {took:?}"
            );

            // Steady traffic across certificate rotations: a new connection every 25 ms for
            // longer than a certificate lives; none may fail.
            let generation = |pod: &str| {
                let m = admin(pod, "/metrics");
                m.lines()
                    .find_map(|l| l.strip_prefix("fairlead_proxy_certificate_generation "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            // A certificate that will have expired after the steady traffic below (the
            // sandbox's CA issues for CERT_TTL here).
            let mesh = sandbox.mesh().clone();
            let bundle = mesh.issuer().bundle();
            let (soon_key, csr) = fairlead_controller::new_key_and_csr().unwrap();
            let soon = mesh.issue_for("shop", "cart", &csr).await.unwrap();
            let (cart0, catalog0) = (generation("cart"), generation("catalog"));
            let until = Instant::now() + CERT_TTL + Duration::from_secs(2);
            let mut sent = 0;
            while Instant::now() < until {
                let line = get(&ns("cart"), SocketAddr::new(v4("catalog"), 8080))
                    .unwrap_or_else(|e| panic!("request {sent} during rotation failed: {e}"));
                assert_eq!(
                    field(&line, "identity"),
                    "spiffe://cluster.local/ns/shop/sa/cart"
                );
                sent += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let (cart1, catalog1) = (generation("cart"), generation("catalog"));
            assert!(
                cart1 > cart0 && catalog1 > catalog0,
                "both sidecars renewed during {sent} requests: cart {cart0}->{cart1}, catalog {catalog0}->{catalog1}"
            );

            // Bad client certificates, presented by a pod outside the mesh straight to the
            // strict server's sidecar, are each refused; a good one from the same pod passes
            // (so the refusals are the certificates', not the path's).
            let to = SocketAddr::new(v4("catalog"), 8080);
            let (key, csr) = fairlead_controller::new_key_and_csr().unwrap();
            let good = mesh.issue_for("shop", "cart", &csr).await.unwrap();
            let good = fairlead_proxy::MeshTls::from_pem(&good.chain, &key, &bundle).unwrap();
            let line = mtls_from(&ns("plain"), to, &good).await.unwrap();
            assert_eq!(
                field(&line, "identity"),
                "spiffe://cluster.local/ns/shop/sa/cart",
                "{line}"
            );
            let refused_before = refusals(&admin("catalog", "/metrics"));
            // Another trust domain (the client trusts the mesh's roots too, so only the
            // server's check can refuse it).
            let other = fairlead_controller::Ca::generate("evil.example", Duration::from_secs(3600))
                .unwrap();
            let (key, csr) = fairlead_controller::new_key_and_csr().unwrap();
            let leaf = other
                .issue(
                    &csr,
                    &fairlead_controller::SpiffeId::new("evil.example", "shop", "cart"),
                    Duration::from_secs(3600),
                )
                .unwrap();
            let foreign = fairlead_proxy::MeshTls::from_pem(
                &leaf.chain_pem,
                &key,
                &format!("{}{bundle}", other.cert_pem()),
            )
            .unwrap();
            let r = mtls_from(&ns("plain"), to, &foreign).await;
            assert!(r.is_err(), "another trust domain got through: {r:?}");
            // Expired: the mesh CA's own certificate for cart, past its life.
            let expired =
                fairlead_proxy::MeshTls::from_pem(&soon.chain, &soon_key, &bundle).unwrap();
            let r = mtls_from(&ns("plain"), to, &expired).await;
            assert!(r.is_err(), "an expired certificate got through: {r:?}");
            // The wrong identity: signed by the mesh CA, but naming no workload (a serving
            // certificate for a DNS name, no SPIFFE ID).
            let (leaf, key) = mesh
                .issuer()
                .issue_serving(&["catalog.shop.svc".to_owned()], Duration::from_secs(3600))
                .unwrap();
            // The proxy library will not load such a certificate, so a plain rustls client
            // presents it.
            assert!(fairlead_proxy::MeshTls::from_pem(&leaf.chain_pem, &key, &bundle).is_err());
            let r = raw_mtls_from(&ns("plain"), to, &leaf.chain_pem, &key).await;
            assert!(
                r.is_err(),
                "a certificate without a SPIFFE ID got through: {r:?}"
            );
            let refused_after = refusals(&admin("catalog", "/metrics"));
            assert!(
                refused_after >= refused_before + 3,
                "the sidecar counted the refusals: {refused_before} -> {refused_after}"
            );

            // A permissive server (migrating into the mesh) takes plain text, without any
            // identity (the forged header is removed), and still gets meshed clients' ones.
            let line = get(&ns("plain"), SocketAddr::new(v4("legacy"), 8080)).unwrap();
            assert_eq!(field(&line, "pod"), "legacy", "{line}");
            assert_ne!(field(&line, "identity"), "forged", "{line}");
            let line = get(&ns("cart"), SocketAddr::new(v4("legacy"), 8080)).unwrap();
            assert_eq!(
                field(&line, "identity"),
                "spiffe://cluster.local/ns/shop/sa/cart",
                "{line}"
            );

            // A meshed client reaches a pod outside the mesh in the clear.
            let line = get(&ns("cart"), SocketAddr::new(v4("plain"), 8080)).unwrap();
            assert_eq!(field(&line, "pod"), "plain");
            assert_eq!(
                field(&line, "identity"),
                "forged",
                "no sidecar there: the header is the client's own"
            );

            // The sidecar's admin port: readiness, its mode, and request metrics by client.
            let ready = admin("cart", "/ready");
            assert!(
                ready.starts_with("HTTP/1.1 200") && ready.contains("sa/cart"),
                "{ready}"
            );
            // A process of the meshed client (in its cgroup, where socket-LB applies) calls
            // the ClusterIP: socket-LB leaves a meshed pod's connects alone (its namespace is
            // named at ATTACH), so the sidecar sees the Service address and chooses the
            // endpoint itself.
            let via_service = format!(
                "fairlead_proxy_outbound_connections_total{{server=\"spiffe://cluster.local/ns/shop/sa/catalog\",destination=\"{vip}:80\"}} "
            );
            let count_via_service = || {
                admin("cart", "/metrics")
                    .lines()
                    .find_map(|l| l.strip_prefix(via_service.as_str()))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let before = count_via_service();
            let out = common::curl_in_pod(name, &ns("cart"), &format!("http://{vip}/"));
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(
                body.contains("identity=spiffe://cluster.local/ns/shop/sa/cart"),
                "{body}"
            );
            assert_eq!(
                count_via_service(),
                before + 1,
                "the sidecar saw the Service address of a connect made in the pod's cgroup"
            );
            let config = admin("legacy", "/config");
            assert!(config.contains("\"mode\":\"permissive\""), "{config}");
            // Every request with cart's identity to catalog's app over IPv4: 2 by the Service
            // (one from the pod's cgroup), 5 by pod address, the steady traffic, and the one
            // from the plain pod with a good certificate for cart.
            let metrics = admin("catalog", "/metrics");
            let want = format!(
                "fairlead_proxy_requests_total{{direction=\"inbound\",peer=\"spiffe://cluster.local/ns/shop/sa/cart\",route=\"127.0.0.1:8080\",status_class=\"2xx\"}} {}",
                8 + sent
            );
            assert!(metrics.contains(&want), "{want}\n{metrics}");

            // HTTP/2 (prior knowledge, as gRPC clients speak it in the clear) and gRPC from a
            // real gRPC client (Python's grpcio), through both sidecars by the Service: the
            // server's app sees the client's identity in both.
            let out = common::run_in_pod(
                name,
                &ns("cart"),
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "3",
                    "--http2-prior-knowledge",
                    "-w",
                    "version=%{http_version}",
                    &format!("http://{vip}/h2"),
                ],
            );
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(
                body.contains("path=/h2 identity=spiffe://cluster.local/ns/shop/sa/cart")
                    && body.ends_with("version=2"),
                "HTTP/2 through the mesh: {body} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = common::run_in_pod(
                name,
                &ns("cart"),
                &["/usr/bin/python3", "-c", GRPC_CLIENT, &format!("{vip}:80")],
            );
            let reply = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success()
                    && reply.contains(
                        "path=/fairlead.test.Echo/Who identity=spiffe://cluster.local/ns/shop/sa/cart"
                    ),
                "gRPC through the mesh: {reply} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // By the Service's name, as an app calls it: the pod's resolv.conf and the cluster
            // DNS (UDP, not intercepted) give the ClusterIP, and the sidecar does the rest.
            let out = common::curl_in_pod(name, &ns("cart"), "http://catalog.shop/by-name");
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(
                body.contains("path=/by-name identity=spiffe://cluster.local/ns/shop/sa/cart"),
                "by name: {body} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // All counted as requests from cart, as the HTTP/1.1 ones were.
            let metrics = admin("catalog", "/metrics");
            let want = want.replace(&format!("}} {}", 8 + sent), &format!("}} {}", 11 + sent));
            assert!(metrics.contains(&want), "{want}\n{metrics}");
        }
        .boxed()
    })
    .await;
}
