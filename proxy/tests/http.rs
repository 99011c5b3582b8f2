//! HTTP through the inbound sidecar: HTTP/1.1 (keep-alive) and HTTP/2 are detected after
//! the mTLS handshake and every request reaches the application with the client's verified
//! SPIFFE ID in `x-fairlead-client-id`, replacing whatever the client claimed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fairlead_controller::Ca;
use fairlead_proxy::admin::Metrics;
use fairlead_proxy::http::CLIENT_ID_HEADER;
use fairlead_proxy::inbound::{self, Authorization};
use fairlead_proxy::outbound;
use fairlead_proxy::rotation::CredentialStore;
use fairlead_proxy::transparent::Dialer;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

mod support;
use support::{client_id, identity};

/// Answers every request with the identity header it received and the HTTP version.
async fn who(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = client_id(req.headers());
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{id} {:?}",
        req.version()
    )))))
}

/// An application speaking HTTP/1.1 or HTTP/2 (prior knowledge), and a sidecar before it.
async fn app_and_sidecar(ca: &Ca, h2: bool) -> (SocketAddr, SocketAddr, Arc<Metrics>) {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = app.accept().await {
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                let svc = hyper::service::service_fn(who);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sidecar.local_addr().unwrap();
    let metrics = Metrics::new();
    tokio::spawn(inbound::serve(
        sidecar,
        CredentialStore::new(identity(ca, "shop", "catalog")).unwrap(),
        inbound::AppTarget::Fixed(app_addr),
        Authorization::TrustDomain,
        Arc::new(|_| {}),
        Arc::clone(&metrics),
        Dialer::here(),
    ));
    (addr, app_addr, metrics)
}

fn forged(uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(uri)
        .header(
            CLIENT_ID_HEADER,
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn body(resp: Response<Incoming>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

#[tokio::test]
async fn http1_requests_carry_the_verified_identity() {
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let (addr, app, metrics) = app_and_sidecar(&ca, false).await;
    let client = identity(&ca, "shop", "cart");
    let tls = outbound::connect(&client, addr, vec![], &Dialer::here())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Two requests on one keep-alive connection, both claiming to be someone else.
    for path in ["/a", "/b"] {
        let resp = sender.send_request(forged(path)).await.unwrap();
        assert_eq!(
            body(resp).await,
            "spiffe://cluster.local/ns/shop/sa/cart HTTP/1.1"
        );
    }
    // Both requests counted for the client and the route, as 2xx with latencies.
    let stats = metrics.requests(
        "inbound",
        "spiffe://cluster.local/ns/shop/sa/cart",
        &app.to_string(),
    );
    assert_eq!((stats.answered_total(2), stats.failures_total()), (2, 0));
}

#[tokio::test]
async fn http2_and_grpc_style_requests_carry_the_verified_identity() {
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let (addr, _, _) = app_and_sidecar(&ca, true).await;
    let client = identity(&ca, "shop", "cart");
    let tls = outbound::connect(&client, addr, vec![], &Dialer::here())
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = forged("http://catalog/shop.Catalog/List");
    *req.method_mut() = hyper::Method::POST;
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(
        body(resp).await,
        "spiffe://cluster.local/ns/shop/sa/cart HTTP/2.0"
    );
}

/// A server-speaks-first application (a banner on accept, like SMTP or MySQL) behind a
/// sidecar: on a port configured opaque the banner arrives at once; elsewhere the proxy
/// first waits for the client's bytes (protocol detection) for up to its bounded wait.
#[tokio::test]
async fn opaque_ports_skip_protocol_detection() {
    use fairlead_proxy::http::DETECT_WAIT;
    use fairlead_proxy::inbound::{InboundOptions, Mode};
    use tokio::io::AsyncReadExt;
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let banner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_addr = banner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = banner.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"220 ready\r\n").await;
        }
    });
    let first_bytes_after = |opaque: Vec<u16>| {
        let ca = &ca;
        async move {
            let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = sidecar.local_addr().unwrap();
            tokio::spawn(inbound::serve_with(
                sidecar,
                CredentialStore::new(identity(ca, "db", "mysql")).unwrap(),
                inbound::AppTarget::Fixed(banner_addr),
                Authorization::TrustDomain,
                InboundOptions {
                    mode: Mode::Strict,
                    opaque_ports: opaque,
                },
                Arc::new(|_| {}),
                Metrics::new(),
                Dialer::here(),
            ));
            let mut tls =
                outbound::connect(&identity(ca, "shop", "cart"), addr, vec![], &Dialer::here())
                    .await
                    .unwrap();
            let t = std::time::Instant::now();
            let mut b = [0u8; 11];
            tls.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"220 ready\r\n");
            t.elapsed()
        }
    };
    let opaque = first_bytes_after(vec![banner_addr.port()]).await;
    let detected = first_bytes_after(vec![]).await;
    assert!(
        opaque < DETECT_WAIT / 2,
        "opaque port: banner after {opaque:?}"
    );
    assert!(
        detected >= DETECT_WAIT,
        "detected port: banner after {detected:?}"
    );
}
