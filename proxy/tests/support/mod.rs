//! What the proxy's tests share: credentials from a test CA, and reading the identity
//! header an application received.
#![allow(dead_code)] // each test file uses its part

use std::time::Duration;

use fairlead_controller::{new_key_and_csr, Ca, SpiffeId};
use fairlead_proxy::http::CLIENT_ID_HEADER;
use fairlead_proxy::MeshTls;

/// Credentials for `ns/sa` from `ca`, valid for `ttl`.
pub fn identity_for(ca: &Ca, ns: &str, sa: &str, ttl: Duration) -> MeshTls {
    let (key, csr) = new_key_and_csr().unwrap();
    let id = SpiffeId::new(ca.trust_domain(), ns, sa);
    let leaf = ca.issue(&csr, &id, ttl).unwrap();
    MeshTls::from_pem(&leaf.chain_pem, &key, ca.cert_pem()).unwrap()
}

/// Credentials for `ns/sa` from `ca`, valid for an hour.
pub fn identity(ca: &Ca, ns: &str, sa: &str) -> MeshTls {
    identity_for(ca, ns, sa, Duration::from_secs(3600))
}

/// The client identity the proxy passed to the application, or "none".
pub fn client_id(headers: &hyper::HeaderMap) -> String {
    headers
        .get(CLIENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

/// A TCP echo application on 127.0.0.1; its address.
pub async fn echo_app() -> std::net::SocketAddr {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
