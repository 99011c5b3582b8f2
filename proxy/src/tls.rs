//! Mutual TLS between sidecars with SPIFFE identities.
//!
//! Every proxy holds one identity (its workload's certificate chain and key, issued by the
//! mesh CA) and the trust bundle (every root trusted now: two during a root rotation).
//! Servers require a client certificate chaining to the bundle; clients check the server's
//! chain against the bundle and that its SPIFFE ID is one the destination may have. SPIFFE
//! certificates carry no DNS name, so the server check is webpki's path validation plus an
//! identity check, not a hostname match.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate chain is not valid PEM: {0}")]
    Chain(String),
    #[error("the private key is not valid PEM (PKCS#8, SEC1 or PKCS#1): {0}")]
    Key(String),
    #[error("the trust bundle holds no usable root: {0}")]
    Bundle(String),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// A workload identity as SPIFFE ID parts (`spiffe://td/ns/N/sa/S`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerId(pub String);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PeerId {
    pub fn trust_domain(&self) -> Option<&str> {
        self.0.strip_prefix("spiffe://")?.split('/').next()
    }
}

/// The single URI SAN of a certificate, if it is a SPIFFE ID.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<PeerId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() || !first.starts_with("spiffe://") {
        return None; // an SVID has exactly one URI SAN
    }
    Some(PeerId(first.to_owned()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One workload's credentials and trust.
#[derive(Clone)]
pub struct MeshTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    id: PeerId,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// From the PEM the CA hands out: chain (leaf first), the workload's key, the bundle.
    pub fn from_pem(chain: &str, key: &str, bundle: &str) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Chain(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Chain("no certificate".into()))?;
        let id = spiffe_id(leaf)
            .ok_or_else(|| TlsError::Chain("the leaf has no single spiffe:// URI SAN".into()))?;
        let trust_domain = id
            .trust_domain()
            .ok_or_else(|| TlsError::Chain(format!("{id} has no trust domain")))?
            .to_owned();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            let root = root.map_err(|e| TlsError::Bundle(e.to_string()))?;
            roots
                .add(root)
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Bundle("no certificate in it".into()));
        }
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            trust_domain,
            id,
        })
    }

    pub fn id(&self) -> &PeerId {
        &self.id
    }

    /// The leaf's validity window.
    pub fn validity(&self) -> Result<(std::time::SystemTime, std::time::SystemTime), TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(self.chain[0].as_ref())
            .map_err(|e| TlsError::Chain(e.to_string()))?;
        let at = |t: i64| {
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64)
        };
        Ok((
            at(cert.validity().not_before.timestamp()),
            at(cert.validity().not_after.timestamp()),
        ))
    }

    /// For the inbound side: a client certificate from the bundle is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
                .build()
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// For the outbound side: the server must present one of `expected` (any identity of
    /// this trust domain when empty).
    pub fn client_config(&self, expected: Vec<PeerId>) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.roots.iter().map(|r| r.to_owned()).collect(),
            expected,
            trust_domain: self.trust_domain.clone(),
            provider: provider(),
        });
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// Whether `peer` (a verified client) belongs to this mesh's trust domain.
    pub fn same_trust_domain(&self, peer: &PeerId) -> bool {
        peer.trust_domain() == Some(self.trust_domain.as_str())
    }
}

/// Path validation against the bundle, then the SPIFFE identity check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    expected: Vec<PeerId>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate not trusted: {e}")))?;
        let id = spiffe_id(end_entity).ok_or_else(|| {
            rustls::Error::General("the peer certificate has no SPIFFE ID".into())
        })?;
        let allowed = if self.expected.is_empty() {
            id.trust_domain() == Some(self.trust_domain.as_str())
        } else {
            self.expected.contains(&id)
        };
        if !allowed {
            return Err(rustls::Error::General(format!(
                "peer identity {id} is not one this destination may have"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
