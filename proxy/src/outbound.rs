//! Outbound: originate mTLS to a peer sidecar, accepting only the identities the
//! destination may have.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::admin::{label, Metrics};
use crate::rotation::CredentialStore;
use crate::tls::{MeshTls, PeerId};
use crate::transparent::Dialer;

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
    connect_with(tls.client_config(expected)?, peer, dialer).await
}

/// As [`connect`], with a client configuration already built (the proxy keeps one per
/// expected identity set, so sessions can be resumed and nothing is rebuilt per connection).
pub async fn connect_with(
    config: Arc<ClientConfig>,
    peer: SocketAddr,
    dialer: &crate::transparent::Dialer,
) -> Result<TlsStream<TcpStream>, OutboundError> {
    let connector = TlsConnector::from(config);
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

/// Where an outbound listener sends what it accepts.
#[derive(Clone)]
pub enum Destination {
    /// Intercepted connections: each goes where the function says for its original
    /// destination (the sidecar's transparent listener).
    Transparent(Arc<dyn Fn(SocketAddr) -> Route + Send + Sync>),
    /// Every connection to one meshed endpoint, whose sidecar must be one of `expected`
    /// (an explicit listener: a gateway, or a client that dials the proxy itself).
    Fixed {
        endpoint: SocketAddr,
        expected: Vec<PeerId>,
    },
}

/// Serves outbound connections from `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    creds: Arc<CredentialStore>,
    destination: Destination,
    metrics: Arc<Metrics>,
    dialer: Dialer,
) -> std::io::Result<()> {
    let slots = crate::admin::connection_slots();
    loop {
        let (local, peer) = listener.accept().await?;
        let Some(permit) = crate::admin::admit(&slots, &metrics, "outbound", peer) else {
            continue;
        };
        let _ = local.set_nodelay(true);
        let (creds, destination, metrics, dialer) = (
            Arc::clone(&creds),
            destination.clone(),
            Arc::clone(&metrics),
            dialer.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let (orig, route) = match &destination {
                Destination::Fixed { endpoint, expected } => (
                    *endpoint,
                    Route::Mesh {
                        endpoint: *endpoint,
                        expected: expected.clone(),
                    },
                ),
                Destination::Transparent(route) => match crate::transparent::original_dst(&local) {
                    Ok(o) => (o, route(o)),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound connection without an original destination");
                        return;
                    }
                },
            };
            forward(local, orig, route, &creds, &metrics, &dialer).await;
        });
    }
}

/// Serves intercepted outbound connections: [`serve`] with [`Destination::Transparent`].
pub async fn serve_transparent(
    listener: tokio::net::TcpListener,
    creds: Arc<CredentialStore>,
    route: Arc<dyn Fn(SocketAddr) -> Route + Send + Sync>,
    metrics: Arc<Metrics>,
    dialer: Dialer,
) -> std::io::Result<()> {
    serve(
        listener,
        creds,
        Destination::Transparent(route),
        metrics,
        dialer,
    )
    .await
}

async fn forward(
    mut local: TcpStream,
    orig: SocketAddr,
    route: Route,
    creds: &CredentialStore,
    metrics: &Metrics,
    dialer: &Dialer,
) {
    match route {
        Route::Mesh { endpoint, expected } => {
            let attempt = match creds.client_config(expected) {
                Ok(config) => connect_with(config, endpoint, dialer).await,
                Err(e) => Err(OutboundError::from(e)),
            };
            match attempt {
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
}
