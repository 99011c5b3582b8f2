//! Inbound: accept mTLS from other sidecars, verify the client's identity, forward the
//! stream to the application. A client that does not finish its handshake in time (slow or
//! half-open) is dropped with a log line; plaintext fails the handshake (strict mode).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use tokio::io::AsyncWriteExt;

use crate::admin::{label, Metrics};
use crate::http;
use crate::rotation::CredentialStore;
use crate::tls::{spiffe_id, MeshTls, PeerId};
use crate::transparent::Dialer;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the application listens.
#[derive(Debug, Clone, Copy)]
pub enum AppTarget {
    /// One fixed address.
    Fixed(SocketAddr),
    /// Localhost at the port the client asked for (transparent interception: the
    /// connection's original destination).
    OriginalPort,
}

/// Who may connect.
#[derive(Debug, Clone)]
pub enum Authorization {
    /// Any identity of this mesh's trust domain.
    TrustDomain,
    /// Only these identities.
    Only(Vec<PeerId>),
}

/// Serves `listener` until the task is dropped: each accepted connection is handed to
/// `app` once its client proved an allowed identity; `on_accept` sees that identity (the
/// HTTP path passes it on as a header; tests record it).
///
/// Each handshake takes the credentials current in `creds`, so a renewed certificate is
/// used from the next connection on while established ones carry on.
pub async fn serve(
    listener: TcpListener,
    creds: Arc<CredentialStore>,
    app: AppTarget,
    authz: Authorization,
    on_accept: Arc<dyn Fn(&PeerId) + Send + Sync>,
    metrics: Arc<Metrics>,
    dialer: Dialer,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (acceptor, tls, authz, on_accept, metrics, dialer) = (
            TlsAcceptor::from(creds.server_config()),
            creds.tls(),
            authz.clone(),
            Arc::clone(&on_accept),
            Arc::clone(&metrics),
            dialer.clone(),
        );
        tokio::spawn(async move {
            let app = match app {
                AppTarget::Fixed(a) => a,
                AppTarget::OriginalPort => match crate::transparent::original_dst(&stream) {
                    Ok(orig) if orig.is_ipv4() => SocketAddr::from(([127, 0, 0, 1], orig.port())),
                    Ok(orig) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, orig.port())),
                    Err(e) => {
                        warn!(%peer, error = %e, "inbound connection without an original destination (not intercepted?)");
                        return;
                    }
                },
            };
            match handle(
                stream,
                acceptor,
                &tls,
                app,
                &authz,
                &*on_accept,
                &metrics,
                &dialer,
            )
            .await
            {
                Ok(_) => {}
                Err((kind, reason)) => {
                    metrics.inc(
                        "fairlead_proxy_inbound_refused_total",
                        label("reason", kind),
                    );
                    warn!(%peer, %reason, "inbound connection refused");
                }
            }
        });
    }
}

/// Why a connection was refused: a metric label and a log line.
type Refusal = (&'static str, String);

#[allow(clippy::too_many_arguments)]
async fn handle(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    tls: &MeshTls,
    app: SocketAddr,
    authz: &Authorization,
    on_accept: &(dyn Fn(&PeerId) + Send + Sync),
    metrics: &Metrics,
    dialer: &Dialer,
) -> Result<PeerId, Refusal> {
    let mut tls_stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| {
            (
                "handshake_timeout",
                format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| {
            (
                "handshake_failed",
                format!(
                    "TLS handshake failed (plaintext, or a certificate this mesh does not trust): {e}"
                ),
            )
        })?;
    let id = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(spiffe_id)
        .ok_or((
            "no_identity",
            "the client certificate has no SPIFFE ID".to_owned(),
        ))?;
    let allowed = match authz {
        Authorization::TrustDomain => tls.same_trust_domain(&id),
        Authorization::Only(ids) => ids.contains(&id),
    };
    if !allowed {
        return Err(("unauthorized", format!("client {id} is not allowed here")));
    }
    on_accept(&id);
    metrics.inc(
        "fairlead_proxy_inbound_connections_total",
        label("client", &id.0),
    );
    // What the client speaks: HTTP gets the identity header, the rest passes as bytes.
    let alpn_h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let (protocol, prefix) = http::detect(&mut tls_stream, alpn_h2, http::DETECT_WAIT)
        .await
        .map_err(|e| ("client_gone", format!("reading the first bytes: {e}")))?;
    metrics.inc(
        "fairlead_proxy_inbound_protocol_total",
        label("protocol", &format!("{protocol:?}").to_lowercase()),
    );
    if protocol != http::Protocol::Opaque {
        info!(client = %id, %app, ?protocol, "inbound HTTP connection");
        return http::serve(
            http::Prefixed::new(prefix, tls_stream),
            protocol,
            app,
            id.0.clone(),
            dialer,
        )
        .await
        .map(|()| id)
        .map_err(|e| ("http", e));
    }
    let mut upstream = dialer.connect(app, false).await.map_err(|e| {
        (
            "app_unreachable",
            format!("the application at {app} is not reachable: {e}"),
        )
    })?;
    upstream
        .write_all(&prefix)
        .await
        .map_err(|e| ("app_unreachable", format!("writing to {app}: {e}")))?;
    info!(client = %id, %app, "inbound TCP connection");
    match tokio::io::copy_bidirectional(&mut tls_stream, &mut upstream).await {
        Ok((to_app, from_app)) => debug!(client = %id, to_app, from_app, "inbound closed"),
        Err(e) => debug!(client = %id, error = %e, "inbound ended"),
    }
    Ok(id)
}
