//! The webhook's HTTPS server: `POST /mutate-pods` answers AdmissionReviews
//! ([`crate::webhook`]), `GET /healthz` answers `ok` for the Deployment's probes.
//!
//! The API server is the only intended client, but the port is reachable from the pod
//! network, so every connection is bounded: the TLS handshake and the request head must
//! arrive within the read timeout, the body within the same timeout again, and a body over
//! the limit is refused with 413 before it is read (by its Content-Length) or as soon as it
//! passes the limit (chunked).
//!
//! The serving certificate comes from PEM files (a cert-manager Certificate's Secret,
//! mounted; read once at start, so a renewed Secret needs a restart to be served) or is
//! issued at start by the mesh CA ([`crate::CertIssuer::issue_serving`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::webhook::{self, InjectConfig};

/// The webhook's path, as the MutatingWebhookConfiguration names it.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (1 MiB by default; the API server sends a pod, well under it).
    pub max_body: usize,
    /// For the TLS handshake plus request head, and again for the body (10 s by default;
    /// the API server's webhook timeout is at most 30 s).
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 1 << 20,
            read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the serving certificate {what} is not usable: {detail}")]
    Cert { what: String, detail: String },
    #[error("reading the serving {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// A rustls server config (ring, HTTP/1.1) for a PEM chain and key.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, ServeError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Cert {
            what: "chain".into(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ServeError::Cert {
            what: "chain".into(),
            detail: "no CERTIFICATE block in the PEM".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ServeError::Cert {
        what: "key".into(),
        detail: e.to_string(),
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ServeError::Cert {
                what: "configuration".into(),
                detail: e.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| ServeError::Cert {
                what: "chain and key".into(),
                detail: e.to_string(),
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`tls_config`] from files (`tls.crt` and `tls.key` of a mounted Secret).
pub fn tls_config_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<ServerConfig>, ServeError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|source| ServeError::Read {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    tls_config(&read("certificate", cert)?, &read("key", key)?)
}

/// Serves the webhook on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    inject: Arc<InjectConfig>,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(tls);
    if let Ok(at) = listener.local_addr() {
        info!(%at, path = MUTATE_PODS_PATH, "sidecar-injection webhook serving");
    }
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, inject, limits) = (acceptor.clone(), Arc::clone(&inject), limits);
        tokio::spawn(async move {
            if let Err(e) = connection(tcp, peer, acceptor, inject, limits).await {
                debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    inject: Arc<InjectConfig>,
    limits: Limits,
) -> Result<(), String> {
    let tls = tokio::time::timeout(limits.read_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let service = hyper::service::service_fn(move |req| {
        let (inject, limits) = (Arc::clone(&inject), limits);
        async move { Ok::<_, Infallible>(handle(req, &inject, &limits, peer).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(|e| e.to_string())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    inject: &InjectConfig,
    limits: &Limits,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::POST, MUTATE_PODS_PATH) => {}
        (_, MUTATE_PODS_PATH) => {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{MUTATE_PODS_PATH} takes POST of an AdmissionReview\n"),
            )
        }
        (_, path) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no {path:?} here: try POST {MUTATE_PODS_PATH} or GET /healthz\n"),
            )
        }
    }
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the {} byte limit\n", limits.max_body),
        )
    };
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return too_large();
    }
    let body = Limited::new(req.into_body(), limits.max_body);
    let bytes = match tokio::time::timeout(limits.read_timeout, body.collect()).await {
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time\n",
            )
        }
        Ok(Err(e)) if e.is::<LengthLimitError>() => return too_large(),
        Ok(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
        Ok(Ok(c)) => c.to_bytes(),
    };
    match webhook::review(&bytes, inject) {
        Ok(review) => {
            if let Some(r) = &review.response {
                debug!(%peer, uid = %r.uid, allowed = r.allowed, patched = r.patch.is_some(), "admission review answered");
            }
            match webhook::encode(&review) {
                Ok(json) => {
                    let mut r = Response::new(Full::new(Bytes::from(json)));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing the AdmissionReview: {e}\n"),
                ),
            }
        }
        Err(e) => {
            warn!(%peer, error = %e, "bad admission request");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}
