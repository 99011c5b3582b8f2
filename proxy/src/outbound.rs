//! Outbound: originate mTLS to a peer sidecar, accepting only the identities the
//! destination may have.

use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::tls::{MeshTls, PeerId};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
) -> Result<TlsStream<TcpStream>, OutboundError> {
    let connector = TlsConnector::from(tls.client_config(expected)?);
    let attempt = async {
        let tcp = TcpStream::connect(peer)
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
