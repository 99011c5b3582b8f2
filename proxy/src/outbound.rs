//! Outbound: originate mTLS to a peer sidecar, accepting only the identities the
//! destination may have.

use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::tls::{MeshTls, PeerId};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with an intercepted outbound connection.
#[derive(Debug, Clone)]
pub enum Route {
    /// A meshed destination: mTLS to this endpoint, whose sidecar must be one of these.
    Mesh {
        endpoint: SocketAddr,
        expected: Vec<PeerId>,
    },
    /// Outside the mesh: straight to the original destination, in the clear.
    Passthrough,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS with {0} failed: {1}")]
    Handshake(SocketAddr, std::io::Error),
    #[error("{0} did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A mutually authenticated stream to `peer`, whose sidecar must present one of `expected`.
pub async fn connect(
    tls: &MeshTls,
    peer: SocketAddr,
    expected: Vec<PeerId>,
    dialer: &crate::transparent::Dialer,
) -> Result<TlsStream<TcpStream>, OutboundError> {
    let connector = TlsConnector::from(tls.client_config(expected)?);
    let attempt = async {
        let tcp = dialer
            .connect(peer, true)
            .await
            .map_err(|e| OutboundError::Connect(peer, e))?;
        // SPIFFE certificates carry no DNS name; the verifier checks the identity instead.
        let name = ServerName::IpAddress(peer.ip().into());
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| OutboundError::Handshake(peer, e))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| OutboundError::Timeout(peer))?
}

/// Serves intercepted outbound connections until the task is dropped: each goes where
/// `route` says for its original destination.
pub async fn serve_transparent(
    listener: tokio::net::TcpListener,
    creds: std::sync::Arc<crate::rotation::CredentialStore>,
    route: std::sync::Arc<dyn Fn(SocketAddr) -> Route + Send + Sync>,
    metrics: std::sync::Arc<crate::admin::Metrics>,
    dialer: crate::transparent::Dialer,
) -> std::io::Result<()> {
    use crate::admin::label;
    loop {
        let (mut local, _) = listener.accept().await?;
        let (creds, route, metrics, dialer) = (
            std::sync::Arc::clone(&creds),
            std::sync::Arc::clone(&route),
            std::sync::Arc::clone(&metrics),
            dialer.clone(),
        );
        tokio::spawn(async move {
            let orig = match crate::transparent::original_dst(&local) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound connection without an original destination");
                    return;
                }
            };
            match route(orig) {
                Route::Mesh { endpoint, expected } => {
                    match connect(&creds.tls(), endpoint, expected, &dialer).await {
                        Ok(mut tls) => {
                            let server = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(crate::tls::spiffe_id)
                                .map(|p| p.0)
                                .unwrap_or_default();
                            metrics.inc(
                                "fairlead_proxy_outbound_connections_total",
                                label("server", &server),
                            );
                            let _ = tokio::io::copy_bidirectional(&mut local, &mut tls).await;
                        }
                        Err(e) => {
                            metrics.inc(
                                "fairlead_proxy_outbound_refused_total",
                                label("destination", &orig.to_string()),
                            );
                            tracing::warn!(%orig, %endpoint, error = %e, "outbound mTLS failed");
                        }
                    }
                }
                Route::Passthrough => match dialer.connect(orig, true).await {
                    Ok(mut remote) => {
                        metrics.inc("fairlead_proxy_outbound_passthrough_total", String::new());
                        let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                    }
                    Err(e) => tracing::debug!(%orig, error = %e, "passthrough connect failed"),
                },
            }
        });
    }
}
