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
use crate::balance::{Balancer, Chosen};
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
    /// A Service: the proxy chooses one of its endpoints ([`crate::balance`]).
    Balance(Vec<Endpoint>),
}

/// One endpoint of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identities its sidecar may present; `None` for an endpoint outside the mesh
    /// (reached in the clear).
    pub expected: Option<Vec<PeerId>>,
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
    /// Every connection to the same meshed endpoints, chosen among them when there are
    /// several (an explicit listener: a gateway, or a client that dials the proxy itself).
    Fixed(Vec<Endpoint>),
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
    let balancer = Balancer::new();
    loop {
        let (local, peer) = listener.accept().await?;
        let Some(permit) = crate::admin::admit(&slots, &metrics, "outbound", peer) else {
            continue;
        };
        let _ = local.set_nodelay(true);
        let (creds, destination, metrics, dialer, balancer) = (
            Arc::clone(&creds),
            destination.clone(),
            Arc::clone(&metrics),
            dialer.clone(),
            Arc::clone(&balancer),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let (orig, route) = match &destination {
                Destination::Fixed(endpoints) => match endpoints.first() {
                    Some(first) => (first.addr, Route::Balance(endpoints.clone())),
                    None => return,
                },
                Destination::Transparent(route) => match crate::transparent::original_dst(&local) {
                    Ok(o) => (o, route(o)),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound connection without an original destination");
                        return;
                    }
                },
            };
            let (hop, chosen) = match route {
                Route::Mesh { endpoint, expected } => (Hop::Mesh { endpoint, expected }, None),
                Route::Passthrough => (Hop::Clear(orig), None),
                Route::Balance(endpoints) => {
                    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                    let Some(chosen) = balancer.pick(&addrs) else {
                        metrics.inc(
                            "fairlead_proxy_outbound_refused_total",
                            label("destination", &orig.to_string()),
                        );
                        tracing::warn!(%orig, "outbound: the Service has no endpoint");
                        return;
                    };
                    let hop = match endpoints.into_iter().find(|e| e.addr == chosen.addr) {
                        Some(Endpoint {
                            addr,
                            expected: Some(expected),
                        }) => Hop::Mesh {
                            endpoint: addr,
                            expected,
                        },
                        _ => Hop::Clear(chosen.addr),
                    };
                    (hop, Some(chosen))
                }
            };
            forward(local, orig, hop, &creds, &metrics, &dialer, chosen.as_ref()).await;
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

/// Where one outbound connection goes, once routed.
enum Hop {
    /// mTLS to this sidecar, which must be one of `expected`.
    Mesh {
        endpoint: SocketAddr,
        expected: Vec<PeerId>,
    },
    /// In the clear to this address.
    Clear(SocketAddr),
}

/// Forwards `local` (whose original destination was `orig`) to `hop`. A balanced choice is
/// told how the connection setup went.
async fn forward(
    mut local: TcpStream,
    orig: SocketAddr,
    hop: Hop,
    creds: &CredentialStore,
    metrics: &Metrics,
    dialer: &Dialer,
    chosen: Option<&Chosen>,
) {
    let setup = |ok: bool| {
        if let Some(c) = chosen {
            if ok {
                c.connected()
            } else {
                c.failed()
            }
        }
    };
    match hop {
        Hop::Mesh { endpoint, expected } => {
            let attempt = match creds.client_config(expected) {
                Ok(config) => connect_with(config, endpoint, dialer).await,
                Err(e) => Err(OutboundError::from(e)),
            };
            setup(attempt.is_ok());
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
                        format!(
                            "{},{}",
                            label("server", &server),
                            label("destination", &orig.to_string())
                        ),
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
        Hop::Clear(to) => match dialer.connect(to, true).await.inspect(|_| setup(true)) {
            Ok(mut remote) => {
                metrics.inc("fairlead_proxy_outbound_passthrough_total", String::new());
                let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
            }
            Err(e) => {
                setup(false);
                tracing::debug!(%orig, %to, error = %e, "passthrough connect failed")
            }
        },
    }
}
