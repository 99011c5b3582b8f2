//! Outbound endpoint choice through real sidecars: connections to a Service with two live
//! endpoints and a dead one spread over the live ones, and the dead one, once it failed,
//! gets no more (power of two choices over connection latency, failures penalised).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fairlead_controller::Ca;
use fairlead_proxy::admin::Metrics;
use fairlead_proxy::inbound::{self, AppTarget, Authorization};
use fairlead_proxy::outbound::{self, Destination, Endpoint};
use fairlead_proxy::rotation::CredentialStore;
use fairlead_proxy::transparent::Dialer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod support;
use support::identity;

/// An application that answers every connection with its name, behind a sidecar.
async fn endpoint(ca: &Ca, name: &'static str) -> SocketAddr {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(name.as_bytes()).await;
            });
        }
    });
    let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sidecar.local_addr().unwrap();
    tokio::spawn(inbound::serve(
        sidecar,
        CredentialStore::new(identity(ca, "shop", "catalog")).unwrap(),
        AppTarget::Fixed(app_addr),
        Authorization::TrustDomain,
        Arc::new(|_| {}),
        Metrics::new(),
        Dialer::here(),
    ));
    addr
}

#[tokio::test]
async fn connections_spread_over_live_endpoints_and_avoid_a_dead_one() {
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let a = endpoint(&ca, "a").await;
    let b = endpoint(&ca, "b").await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let expected = Some(vec![fairlead_proxy::PeerId(
        "spiffe://cluster.local/ns/shop/sa/catalog".into(),
    )]);
    let out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out_addr = out.local_addr().unwrap();
    tokio::spawn(outbound::serve(
        out,
        CredentialStore::new(identity(&ca, "shop", "cart")).unwrap(),
        Destination::Fixed(
            [a, b, dead]
                .into_iter()
                .map(|addr| Endpoint {
                    addr,
                    expected: expected.clone(),
                })
                .collect(),
        ),
        Metrics::new(),
        Dialer::here(),
    ));
    let mut count: HashMap<String, u32> = HashMap::new();
    for _ in 0..90 {
        let mut s = tokio::net::TcpStream::connect(out_addr).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        let who = match String::from_utf8_lossy(&got).as_ref() {
            "" => "failed".to_owned(),
            w => w.to_owned(),
        };
        *count.entry(who).or_default() += 1;
    }
    let n = |k: &str| count.get(k).copied().unwrap_or(0);
    // The dead endpoint is tried at most once (unmeasured endpoints are explored first);
    // after its failure it loses every draw.
    assert!(n("failed") <= 1, "{count:?}");
    // Each live one wins at least the draws it shares with the dead one (about a third).
    assert!(n("a") >= 15 && n("b") >= 15, "{count:?}");
    assert_eq!(n("a") + n("b") + n("failed"), 90, "{count:?}");
}
