//! Sidecar to sidecar over loopback, with identities from the real mesh CA: the server sees
//! the client's SPIFFE ID; plaintext, garbage, another trust domain, an expired certificate
//! and a server with the wrong identity are each refused, and the proxy keeps serving.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fairlead_controller::{new_key_and_csr, Ca, SpiffeId};
use fairlead_proxy::inbound::{self, Authorization};
use fairlead_proxy::outbound;
use fairlead_proxy::rotation::CredentialStore;
use fairlead_proxy::transparent::Dialer;
use fairlead_proxy::{MeshTls, PeerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::identity_for as identity;

fn peer(ca: &Ca, ns: &str, sa: &str) -> PeerId {
    PeerId(SpiffeId::new(ca.trust_domain(), ns, sa).uri())
}

const DAY: Duration = Duration::from_secs(86_400);

/// An echo application, and a sidecar in front of it; returns the sidecar's address and the
/// identities it accepted.
async fn server(tls: MeshTls, authz: Authorization) -> (SocketAddr, Arc<Mutex<Vec<PeerId>>>) {
    server_with(CredentialStore::new(tls).unwrap(), authz).await
}

async fn server_with(
    creds: Arc<CredentialStore>,
    authz: Authorization,
) -> (SocketAddr, Arc<Mutex<Vec<PeerId>>>) {
    let app_addr = support::echo_app().await;
    let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sidecar.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(inbound::serve(
        sidecar,
        creds,
        inbound::AppTarget::Fixed(app_addr),
        authz,
        Arc::new(move |id: &PeerId| record.lock().unwrap().push(id.clone())),
        fairlead_proxy::admin::Metrics::new(),
        Dialer::here(),
    ));
    (addr, seen)
}

async fn echo_through(
    client: &MeshTls,
    addr: SocketAddr,
    expected: Vec<PeerId>,
) -> Result<String, String> {
    let mut s = outbound::connect(client, addr, expected, &Dialer::here())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello mesh")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn the_server_sees_the_clients_identity() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let (addr, seen) = server(
        identity(&ca, "shop", "catalog", DAY),
        Authorization::TrustDomain,
    )
    .await;
    let client = identity(&ca, "shop", "cart", DAY);
    let reply = echo_through(&client, addr, vec![peer(&ca, "shop", "catalog")])
        .await
        .unwrap();
    assert_eq!(reply, "hello mesh");
    assert_eq!(*seen.lock().unwrap(), [peer(&ca, "shop", "cart")]);
}

#[tokio::test]
async fn plaintext_and_garbage_are_refused_and_the_proxy_keeps_serving() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let (addr, seen) = server(
        identity(&ca, "shop", "catalog", DAY),
        Authorization::TrustDomain,
    )
    .await;
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2][..],
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        // The server answers with a TLS alert or closes; it never echoes the bytes.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("refused promptly")
            .unwrap_or(0);
        assert!(
            !buf[..n].starts_with(junk),
            "plaintext reached the application"
        );
    }
    assert!(seen.lock().unwrap().is_empty());
    let client = identity(&ca, "shop", "cart", DAY);
    assert_eq!(
        echo_through(&client, addr, vec![]).await.unwrap(),
        "hello mesh"
    );
}

#[tokio::test]
async fn foreign_expired_and_unauthorized_clients_are_refused() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let (addr, seen) = server(
        identity(&ca, "shop", "catalog", DAY),
        Authorization::Only(vec![peer(&ca, "shop", "cart")]),
    )
    .await;
    // Another trust domain's CA: the server does not trust its certificate.
    let other = Ca::generate("other.mesh", DAY).unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let leaf = other
        .issue(&csr, &SpiffeId::new("other.mesh", "shop", "cart"), DAY)
        .unwrap();
    // It trusts our root for the server side, so only the server's check can refuse it.
    let foreign = MeshTls::from_pem(
        &leaf.chain_pem,
        &key,
        &format!("{}{}", other.cert_pem(), ca.cert_pem()),
    )
    .unwrap();
    assert!(
        echo_through(&foreign, addr, vec![]).await.is_err(),
        "another trust domain"
    );
    // Expired: valid until the second it was issued.
    let expired = identity(&ca, "shop", "cart", Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        echo_through(&expired, addr, vec![]).await.is_err(),
        "expired"
    );
    // Trusted and valid, but not on the allow list.
    let stranger = identity(&ca, "shop", "reports", DAY);
    assert!(
        echo_through(&stranger, addr, vec![]).await.is_err(),
        "not authorized"
    );
    assert!(seen.lock().unwrap().is_empty());
    // The one that is allowed still gets through.
    let cart = identity(&ca, "shop", "cart", DAY);
    assert_eq!(
        echo_through(&cart, addr, vec![]).await.unwrap(),
        "hello mesh"
    );
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_by_the_client() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    // An impostor: a valid mesh identity, but not the destination's.
    let (addr, _) = server(
        identity(&ca, "shop", "impostor", DAY),
        Authorization::TrustDomain,
    )
    .await;
    let client = identity(&ca, "shop", "cart", DAY);
    let err = echo_through(&client, addr, vec![peer(&ca, "shop", "catalog")])
        .await
        .unwrap_err();
    assert!(err.contains("not one this destination may have"), "{err}");
}

#[tokio::test]
async fn the_admin_port_reports_readiness_metrics_and_config() {
    use fairlead_proxy::admin::{self, Metrics, ProxyConfig as Config};
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let creds = CredentialStore::new(identity(&ca, "shop", "catalog", DAY)).unwrap();
    let metrics = Metrics::new();
    // A sidecar counting into `metrics`, in front of an app nobody needs to answer.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sidecar.local_addr().unwrap();
    tokio::spawn(inbound::serve(
        sidecar,
        Arc::clone(&creds),
        inbound::AppTarget::Fixed(app_addr),
        Authorization::TrustDomain,
        Arc::new(|_| {}),
        Arc::clone(&metrics),
        Dialer::here(),
    ));
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&creds),
        Arc::clone(&metrics),
        Config {
            inbound: Some(addr),
            application: Some(app_addr),
            mode: "strict".into(),
            ..Default::default()
        },
    ));
    let client = identity(&ca, "shop", "cart", DAY);
    let _s = outbound::connect(&client, addr, vec![], &Dialer::here())
        .await
        .unwrap();
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = plain.read(&mut [0u8; 16]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let get = |path: &'static str| async move {
        let mut s = TcpStream::connect(admin_addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/live").await.starts_with("HTTP/1.1 200"));
    let ready = get("/ready").await;
    assert!(
        ready.starts_with("HTTP/1.1 200")
            && ready.contains("spiffe://cluster.local/ns/shop/sa/catalog"),
        "{ready}"
    );
    let m = get("/metrics").await;
    assert!(
        m.contains("fairlead_proxy_inbound_connections_total{client=\"spiffe://cluster.local/ns/shop/sa/cart\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fairlead_proxy_inbound_refused_total{reason=\"handshake_failed\"} 1"),
        "{m}"
    );
    assert!(m.contains("fairlead_proxy_certificate_generation 1"), "{m}");
    let config = get("/config").await;
    assert!(
        config.contains("\"mode\":\"strict\"") && config.contains(&addr.to_string()),
        "{config}"
    );
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
}
