//! The mesh CA's API for node agents: `POST /v1/certificates` on the controller's HTTPS
//! port. A node agent forwards what its sidecars send on its socket (`MESH-CERT`): the
//! sidecar's CSR and ServiceAccount token, which the CA checks with TokenReview against the
//! identity asked for. The same JSON is the body here and the line on the agent's socket.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};

/// The path of the certificate endpoint.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";

/// A workload's certificate request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertRequest {
    pub namespace: String,
    pub service_account: String,
    /// The workload's ServiceAccount token (a projected token, audience `fairlead`).
    pub token: String,
    /// PEM CSR of the workload's own key.
    pub csr: String,
}

/// The CA's answer: PEM chain (leaf first) and the trust bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertReply {
    pub chain: String,
    pub bundle: String,
}

impl crate::CertIssuer {
    /// A certificate for the request's CSR, for the identity of its namespace and
    /// ServiceAccount, once its token proves exactly that account ([`crate::CertIssuer::issue`]).
    /// What this API, and any other way to the CA (the sandbox's), answers.
    pub async fn issue_request(&self, r: &CertRequest) -> Result<CertReply, crate::IssueError> {
        let id = crate::SpiffeId::new(
            &self.config().trust_domain,
            &r.namespace,
            &r.service_account,
        );
        let issued = self.issue(&r.token, &r.csr, &id).await?;
        Ok(CertReply {
            chain: issued.chain_pem,
            bundle: issued.bundle_pem,
        })
    }
}

/// Answers one request body: (HTTP status, body).
pub async fn answer(issuer: &crate::CertIssuer, body: &[u8]) -> (u16, String) {
    let req: CertRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                400,
                format!(
                    "the body is not a certificate request {{\"namespace\", \"serviceAccount\", \"token\", \"csr\"}}: {e}\n"
                ),
            )
        }
    };
    match issuer.issue_request(&req).await {
        Ok(reply) => (200, serde_json::to_string(&reply).unwrap_or_default()),
        Err(e @ (crate::IssueError::Unauthenticated(_) | crate::IssueError::Forbidden { .. })) => {
            (403, format!("{e}\n"))
        }
        Err(e) => (400, format!("{e}\n")),
    }
}

/// A client of the CA's API, as a node agent holds one: the controller's URL and the mesh
/// root bundle its serving certificate chains to.
#[derive(Clone)]
pub struct CaClient {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
}

/// The longest answer read.
const MAX_ANSWER: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(15);

impl CaClient {
    /// `url` like `https://fairlead-controller.fairlead-system.svc:9443`; `bundle_pem` the
    /// mesh roots.
    pub fn new(url: &str, bundle_pem: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("the CA URL {url:?} must start with https://"))?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse()
                    .map_err(|_| format!("the CA URL {url:?} has a bad port"))?,
            ),
            None => (rest.to_owned(), 443),
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("the CA bundle: {e}"))?;
            roots.add(cert).map_err(|e| format!("the CA bundle: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the CA bundle holds no certificate".into());
        }
        let tls =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            host,
            port,
            tls: Arc::new(tls),
        })
    }

    /// Asks the CA for a certificate.
    pub async fn issue(&self, request: &CertRequest) -> Result<CertReply, String> {
        tokio::time::timeout(TIMEOUT, self.post(request))
            .await
            .map_err(|_| format!("the mesh CA did not answer within {TIMEOUT:?}"))?
    }

    async fn post(&self, request: &CertRequest) -> Result<CertReply, String> {
        let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("the mesh CA at {}:{}: {e}", self.host, self.port))?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| format!("the CA host {:?}: {e}", self.host))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with the mesh CA at {}: {e}", self.host))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post(CERTIFICATES_PATH)
            .header(http::header::HOST, self.host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the CA's answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the mesh CA answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("the CA's answer does not parse: {e}"))
    }
}
