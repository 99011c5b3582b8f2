//! Certificates rotate during steady traffic with no failed request; a connection opened
//! before the rotations carries on after them; a failing CA leaves the proxy serving with
//! its valid certificate while it retries with backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead_controller::{new_key_and_csr, Ca, SpiffeId};
use fairlead_proxy::inbound::{self, Authorization};
use fairlead_proxy::outbound;
use fairlead_proxy::rotation::{renew, Backoff, CertSource, CredentialStore, Fetched};
use fairlead_proxy::transparent::Dialer;
use fairlead_proxy::MeshTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod support;

struct TestCa {
    ca: Ca,
    id: SpiffeId,
    ttl: Duration,
    calls: AtomicUsize,
    failing: AtomicBool,
}

impl CertSource for TestCa {
    fn fetch<'a>(
        &'a self,
        csr_pem: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'a>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err("the CA is down".into());
            }
            let leaf = self
                .ca
                .issue(csr_pem, &self.id, self.ttl)
                .map_err(|e| e.to_string())?;
            Ok(Fetched {
                chain_pem: leaf.chain_pem,
                bundle_pem: self.ca.cert_pem().to_owned(),
            })
        })
    }
}

fn credentials(ca: &Ca, id: &SpiffeId, ttl: Duration) -> MeshTls {
    let (key, csr) = new_key_and_csr().unwrap();
    let leaf = ca.issue(&csr, id, ttl).unwrap();
    MeshTls::from_pem(&leaf.chain_pem, &key, ca.cert_pem()).unwrap()
}

async fn roundtrip(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").await.is_ok() && s.read_exact(&mut buf).await.is_ok() && &buf == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_and_survive_a_failing_ca() {
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let server_id = SpiffeId::new("cluster.local", "shop", "catalog");
    // Short-lived server certificates: renewed about every second.
    let ttl = Duration::from_secs(2);
    let store = CredentialStore::new(credentials(&ca, &server_id, ttl)).unwrap();
    let source = Arc::new(TestCa {
        ca: Ca::from_pem("cluster.local", ca.cert_pem(), &ca.key_pem()).unwrap(),
        id: server_id.clone(),
        ttl,
        calls: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
    });
    let renewer = tokio::spawn(renew(
        Arc::clone(&store),
        Arc::clone(&source) as Arc<dyn CertSource>,
        || new_key_and_csr().map_err(|e| e.to_string()),
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(400),
        },
    ));

    let app_addr = support::echo_app().await;
    let sidecar = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sidecar.local_addr().unwrap();
    tokio::spawn(inbound::serve(
        sidecar,
        Arc::clone(&store),
        inbound::AppTarget::Fixed(app_addr),
        Authorization::TrustDomain,
        Arc::new(|_| {}),
        fairlead_proxy::admin::Metrics::new(),
        Dialer::here(),
    ));

    let client = credentials(
        &ca,
        &SpiffeId::new("cluster.local", "shop", "cart"),
        Duration::from_secs(3600),
    );
    let mut long_lived = outbound::connect(&client, addr, vec![], &Dialer::here())
        .await
        .unwrap();
    assert!(roundtrip(&mut long_lived).await);

    // Steady traffic, a new connection every 20 ms, across several rotations.
    let (mut ok, mut failed) = (0, Vec::new());
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        match outbound::connect(&client, addr, vec![], &Dialer::here()).await {
            Ok(mut s) => {
                if roundtrip(&mut s).await {
                    ok += 1;
                } else {
                    failed.push("echo".to_string());
                }
            }
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    let rotations = store.generation() - 1;
    assert!(rotations >= 3, "only {rotations} rotations in 4 s");
    assert!(
        roundtrip(&mut long_lived).await,
        "the connection from before carries on"
    );

    // The CA fails: the proxy keeps its (still valid) certificate and retries with backoff.
    source.failing.store(true, Ordering::SeqCst);
    let generation = store.generation();
    let calls = source.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retries = source.calls.load(Ordering::SeqCst) - calls;
    assert!(
        (2..=10).contains(&retries),
        "{retries} attempts in 1.5 s with 100-400 ms backoff"
    );
    assert_eq!(
        store.generation(),
        generation,
        "nothing installed while failing"
    );
    renewer.abort();
}
