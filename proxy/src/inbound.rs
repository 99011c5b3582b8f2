//! Inbound: accept mTLS from other sidecars, verify the client's identity, forward the
//! stream to the application. A client that does not finish its handshake in time (slow or
//! half-open) is dropped with a log line; plaintext fails the handshake (strict mode).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

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

/// Whether clients without mTLS are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only mTLS clients with an allowed identity.
    Strict,
    /// mTLS clients as in strict mode; plaintext clients (no TLS ClientHello within
    /// [`http::DETECT_WAIT`]) go to the application without an identity (any identity header
    /// they send is removed). For moving workloads into the mesh one by one.
    Permissive,
}

/// How the inbound listener treats what it accepts.
#[derive(Debug, Clone)]
pub struct InboundOptions {
    pub mode: Mode,
    /// Application ports whose protocol is opaque (server-speaks-first, such as MySQL or
    /// SMTP): no protocol detection, so the client is not kept waiting for
    /// [`http::DETECT_WAIT`] before the server's first bytes.
    pub opaque_ports: Vec<u16>,
}

impl InboundOptions {
    pub fn strict() -> Self {
        Self {
            mode: Mode::Strict,
            opaque_ports: Vec::new(),
        }
    }
}

/// The pod annotation (or namespace label) that sets the mode: `strict` or `permissive`.
pub use fairlead_netns::mesh::MODE_ANNOTATION;

impl Mode {
    /// The mode for a workload: its own annotation, else its namespace's label, else
    /// strict. An unknown value is an error naming it (callers stay strict).
    pub fn for_workload(pod: Option<&str>, namespace: Option<&str>) -> Result<Mode, String> {
        match pod.or(namespace) {
            None => Ok(Mode::Strict),
            Some(v) => v.parse().map_err(|e| format!("{MODE_ANNOTATION}: {e}")),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Mode::Strict),
            "permissive" => Ok(Mode::Permissive),
            other => Err(format!("mode {other:?}: expected `strict` or `permissive`")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::Permissive => "permissive",
        })
    }
}

/// Serves `listener` in strict mode until the task is dropped: each accepted connection is
/// handed to `app` once its client proved an allowed identity; `on_accept` sees that
/// identity (the HTTP path passes it on as a header; tests record it).
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
    serve_with(
        listener,
        creds,
        app,
        authz,
        InboundOptions::strict(),
        on_accept,
        metrics,
        dialer,
    )
    .await
}

/// As [`serve`], with the given mode and opaque ports.
#[allow(clippy::too_many_arguments)]
pub async fn serve_with(
    listener: TcpListener,
    creds: Arc<CredentialStore>,
    app: AppTarget,
    authz: Authorization,
    options: InboundOptions,
    on_accept: Arc<dyn Fn(&PeerId) + Send + Sync>,
    metrics: Arc<Metrics>,
    dialer: Dialer,
) -> std::io::Result<()> {
    let slots = crate::admin::connection_slots();
    loop {
        let (stream, peer) = listener.accept().await?;
        let Some(permit) = crate::admin::admit(&slots, &metrics, "inbound", peer) else {
            continue;
        };
        let (acceptor, tls, authz, on_accept, metrics, dialer, options) = (
            TlsAcceptor::from(creds.server_config()),
            creds.tls(),
            authz.clone(),
            Arc::clone(&on_accept),
            Arc::clone(&metrics),
            dialer.clone(),
            options.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
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
            let _ = stream.set_nodelay(true);
            let opaque = options.opaque_ports.contains(&app.port());
            if options.mode == Mode::Permissive && !starts_with_tls(&stream).await {
                if let Err((kind, reason)) = plaintext(stream, app, &metrics, &dialer).await {
                    metrics.inc(
                        "fairlead_proxy_inbound_refused_total",
                        label("reason", kind),
                    );
                    warn!(%peer, %reason, "inbound plaintext connection failed");
                }
                return;
            }
            match handle(
                stream,
                acceptor,
                &tls,
                app,
                &authz,
                &*on_accept,
                &metrics,
                &dialer,
                opaque,
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

/// Whether the client's first bytes are a TLS handshake record, waiting at most
/// [`http::DETECT_WAIT`] (a silent client is taken as plaintext: a server-speaks-first
/// protocol).
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 3];
    let peek = async {
        loop {
            match stream.peek(&mut first).await {
                Ok(n) if n >= 3 => return true,
                // Fewer than 3 bytes so far: wait for more (bounded by the timeout below).
                Ok(n) if n > 0 => {
                    if first[0] != 0x16 {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => return false,
            }
        }
    };
    let got = tokio::time::timeout(http::DETECT_WAIT, peek)
        .await
        .unwrap_or(false);
    // A TLS handshake record: content type 22, version 3.x.
    got && first[0] == 0x16 && first[1] == 0x03
}

/// A plaintext client in permissive mode: to the application with no identity.
async fn plaintext(
    mut stream: TcpStream,
    app: SocketAddr,
    metrics: &Metrics,
    dialer: &Dialer,
) -> Result<(), Refusal> {
    metrics.inc("fairlead_proxy_inbound_plaintext_total", String::new());
    let (protocol, prefix) = http::detect(&mut stream, false, http::DETECT_WAIT)
        .await
        .map_err(|e| ("client_gone", format!("reading the first bytes: {e}")))?;
    if protocol != http::Protocol::Opaque {
        let stats = metrics.requests("inbound", "plaintext", &app.to_string());
        if let Err(e) = http::serve(
            http::Prefixed::new(prefix, stream),
            protocol,
            app,
            None,
            dialer,
            stats,
        )
        .await
        {
            metrics.inc(
                "fairlead_proxy_inbound_http_errors_total",
                label("client", ""),
            );
            debug!(error = %e, "inbound plaintext HTTP connection ended with an error");
        }
        return Ok(());
    }
    forward_opaque(stream, prefix, app, dialer, "plaintext").await
}

/// Opaque bytes both ways between the client and the application, starting with the
/// `prefix` already read from the client.
async fn forward_opaque<S>(
    mut client: S,
    prefix: Vec<u8>,
    app: SocketAddr,
    dialer: &Dialer,
    who: &str,
) -> Result<(), Refusal>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
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
    debug!(client = who, %app, "inbound TCP connection");
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_app, from_app)) => debug!(client = who, to_app, from_app, "inbound closed"),
        Err(e) => debug!(client = who, error = %e, "inbound ended"),
    }
    Ok(())
}

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
    opaque: bool,
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
    let (protocol, prefix) = if opaque {
        (http::Protocol::Opaque, Vec::new())
    } else {
        http::detect(&mut tls_stream, alpn_h2, http::DETECT_WAIT)
            .await
            .map_err(|e| ("client_gone", format!("reading the first bytes: {e}")))?
    };
    metrics.inc(
        "fairlead_proxy_inbound_protocol_total",
        label("protocol", &format!("{protocol:?}").to_lowercase()),
    );
    if protocol != http::Protocol::Opaque {
        debug!(client = %id, %app, ?protocol, "inbound HTTP connection");
        // The client was admitted: an HTTP error from here on (a client closing mid-request,
        // an application going away) ends this connection but is no refusal.
        let stats = metrics.requests("inbound", &id.0, &app.to_string());
        if let Err(e) = http::serve(
            http::Prefixed::new(prefix, tls_stream),
            protocol,
            app,
            Some(id.0.clone()),
            dialer,
            stats,
        )
        .await
        {
            metrics.inc(
                "fairlead_proxy_inbound_http_errors_total",
                label("client", &id.0),
            );
            debug!(client = %id, error = %e, "inbound HTTP connection ended with an error");
        }
        return Ok(id);
    }
    forward_opaque(tls_stream, prefix, app, dialer, &id.0).await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_mode_comes_from_the_pod_then_the_namespace() {
        assert_eq!(Mode::for_workload(None, None), Ok(Mode::Strict));
        assert_eq!(
            Mode::for_workload(None, Some("permissive")),
            Ok(Mode::Permissive)
        );
        assert_eq!(
            Mode::for_workload(Some("strict"), Some("permissive")),
            Ok(Mode::Strict)
        );
        assert_eq!(
            Mode::for_workload(Some("open"), None),
            Err("fairlead.io/mode: mode \"open\": expected `strict` or `permissive`".into())
        );
    }
}
