//! The webhook's HTTPS server: `POST /mutate-pods` answers AdmissionReviews
//! ([`crate::webhook`]), `GET /healthz` answers `ok` for the Deployment's probes.
//!
//! The API server is the only intended client, but the port is reachable from the pod
//! network, so every connection is bounded: the TLS handshake and the request head must
//! arrive within the read timeout, the body within the same timeout again, and a body over
//! the limit is refused with 413 before it is read (by its Content-Length) or as soon as it
//! passes the limit (chunked).
//!
//! The serving certificate ([`ServingCert`]) comes from PEM files (a cert-manager
//! Certificate's Secret, mounted; a renewed pair is served from the next handshake on) or
//! is issued by the mesh CA ([`crate::CertIssuer::issue_serving`]; the binary renews it
//! halfway through its life).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// The certificate the server presents, replaceable while it serves: from files, a renewed
/// pair (a cert-manager Secret the kubelet updated) is read at the first handshake after
/// either file's modification time changes; an issued one is replaced with [`Self::set`].
/// A pair that does not load leaves the current certificate in service.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<Files>,
}

/// Modification times of the certificate and key files.
type Stamps = (Option<SystemTime>, Option<SystemTime>);

#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    /// Modification times of the pair in service.
    loaded: Mutex<Stamps>,
}

impl ServingCert {
    /// A certificate from a PEM chain (leaf first) and key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, ServeError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(chain_pem, key_pem)?),
            files: None,
        }))
    }

    /// A certificate from files (`tls.crt` and `tls.key` of a mounted Secret), followed as
    /// they change.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Arc<Self>, ServeError> {
        let files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            loaded: Mutex::new((None, None)),
        };
        let (ck, stamps) = files.load()?;
        *files.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(Arc::new(Self {
            current: RwLock::new(ck),
            files: Some(files),
        }))
    }

    /// Replaces the certificate; the next handshake presents the new one.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), ServeError> {
        let ck = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }

    /// The leaf certificate presented now (DER).
    pub fn leaf_der(&self) -> Vec<u8> {
        let ck = self.current.read().unwrap_or_else(|p| p.into_inner());
        ck.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }

    /// A rustls server config (ring, HTTP/1.1) presenting this certificate.
    pub fn tls_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, ServeError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServeError::Cert {
                what: "configuration".into(),
                detail: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn reload_if_changed(&self) {
        let Some(files) = &self.files else { return };
        let mut loaded = files.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if files.stamps() == *loaded {
            return;
        }
        match files.load() {
            Ok((ck, stamps)) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
                *loaded = stamps;
                info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            // Half-written or mismatched: keep serving the valid one, try again next time.
            Err(e) => {
                warn!(error = %e, "the changed serving certificate does not load; keeping the current one")
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

impl Files {
    fn stamps(&self) -> Stamps {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (mtime(&self.cert), mtime(&self.key))
    }

    fn load(&self) -> Result<(Arc<CertifiedKey>, Stamps), ServeError> {
        let stamps = self.stamps();
        let read = |what: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ServeError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let ck = certified_key(&read("certificate", &self.cert)?, &read("key", &self.key)?)?;
        Ok((ck, stamps))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, ServeError> {
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
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(|e| ServeError::Cert {
            what: "chain and key".into(),
            detail: e.to_string(),
        })
}

/// Serves the webhook on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    inject: Arc<InjectConfig>,
    limits: Limits,
) {
    serve_with_ca(listener, tls, inject, limits, None).await
}

/// As [`serve`], also answering node agents' certificate requests
/// (`POST /v1/certificates`, [`crate::api`]) with `issuer`.
pub async fn serve_with_ca(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    inject: Arc<InjectConfig>,
    limits: Limits,
    issuer: Option<Arc<crate::CertIssuer>>,
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
        let (acceptor, inject, limits, issuer) = (
            acceptor.clone(),
            Arc::clone(&inject),
            limits,
            issuer.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = connection(tcp, peer, acceptor, inject, limits, issuer).await {
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
    issuer: Option<Arc<crate::CertIssuer>>,
) -> Result<(), String> {
    let tls = tokio::time::timeout(limits.read_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let service = hyper::service::service_fn(move |req| {
        let (inject, limits, issuer) = (Arc::clone(&inject), limits, issuer.clone());
        async move { Ok::<_, Infallible>(handle(req, &inject, &limits, peer, issuer.as_deref()).await) }
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
    issuer: Option<&crate::CertIssuer>,
) -> Response<Full<Bytes>> {
    let certificates = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::POST, MUTATE_PODS_PATH) => false,
        (&Method::POST, crate::api::CERTIFICATES_PATH) if issuer.is_some() => true,
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
    };
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
    if let (true, Some(issuer)) = (certificates, issuer) {
        let (status, body) = crate::api::answer(issuer, &bytes).await;
        if status != 200 {
            warn!(%peer, %status, reason = %body.trim(), "certificate request refused");
        }
        let mut r = text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        );
        if status == 200 {
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        return r;
    }
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
