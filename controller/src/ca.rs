//! The mesh certificate authority: a P-256 root (or an intermediate under a root the user
//! brings), and short-lived leaf certificates whose only name is a SPIFFE ID,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! Leaves are issued for a certificate signing request: the workload (its proxy) keeps its
//! private key, and the CA key never leaves the controller. Whatever names the request asks
//! for are ignored; the leaf carries the SPIFFE ID the caller proved (see
//! [`crate::issuer`]), for client and server authentication both.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

/// Leaves are valid from this long before issue, so a peer whose clock is a little behind
/// does not see a certificate from the future.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0:?} is not a SPIFFE ID of this mesh: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>")]
    BadSpiffeId(String),
    #[error(
        "the trust domain {0:?} is not valid: use lowercase letters, digits, '.', '-' and '_'"
    )]
    BadTrustDomain(String),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("the CA certificate or key is not valid: {0}")]
    BadCa(String),
    #[error("{0:?} is not a DNS name a serving certificate can carry")]
    BadDnsName(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A workload identity in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://td/ns/N/sa/S`; every part must be a valid DNS-1123 label (namespace)
    /// or subdomain (service account), as Kubernetes names are.
    pub fn parse(uri: &str) -> Result<Self, CaError> {
        let bad = || CaError::BadSpiffeId(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if valid_trust_domain(td) && valid_name(ns, 63) && valid_name(sa, 253) =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// A signing CA: its certificate and key.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate as issued.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf, then the CA that signed it.
    pub chain_pem: String,
    pub not_after: OffsetDateTime,
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        if !valid_trust_domain(trust_domain) {
            return Err(CaError::BadTrustDomain(trust_domain.to_owned()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Fairlead mesh");
        dn.push(
            DnType::CommonName,
            format!("Fairlead root CA for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// A CA from its PEM certificate and PKCS#8 key (as stored in the Secret, or a user's
    /// intermediate).
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        if !valid_trust_domain(trust_domain) {
            return Err(CaError::BadTrustDomain(trust_domain.to_owned()));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadCa(format!("key: {e}")))?;
        // Parse once now, so a broken Secret fails at load and not at the first issue.
        Issuer::from_ca_cert_pem(cert_pem, &key)
            .map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PKCS#8 PEM, for the Secret that keeps it.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs `csr_pem` as `id` for `ttl`. The request's proof of possession is checked; its
    /// names and extensions are not used.
    pub fn issue(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<Leaf, CaError> {
        if id.trust_domain != self.trust_domain {
            return Err(CaError::BadSpiffeId(id.uri()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.uri()
                .try_into()
                .map_err(|_| CaError::BadSpiffeId(id.uri()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params, ttl, &csr.public_key)
    }

    /// A TLS serving certificate for `dns_names` (the controller's webhook, when no
    /// certificate is mounted): a fresh P-256 key and a leaf signed by this CA. Unlike
    /// workload leaves it names DNS names, not a SPIFFE ID, and serves only as a server.
    /// Returns the chain (leaf, then CA) and the key, PEM.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Leaf, String), CaError> {
        if dns_names.is_empty() {
            return Err(CaError::BadDnsName(String::new()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_names[0].as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| CaError::BadDnsName(n.clone()))
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        Ok((self.sign(params, ttl, &key)?, key.serialize_pem()))
    }

    /// Signs a leaf for `public_key`: valid from a little before now for `ttl`, a random
    /// serial, and this CA's key identifier, so peers can find the issuer during a rotation.
    fn sign(
        &self,
        mut params: CertificateParams,
        ttl: Duration,
        public_key: &impl PublicKeyData,
    ) -> Result<Leaf, CaError> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| CaError::BadCa(e.to_string()))?;
        let leaf = params.signed_by(public_key, &issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", leaf.pem(), self.cert_pem),
            not_after: params.not_after,
        })
    }
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes)?;
    // Positive and non-zero, as RFC 5280 asks.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn getrandom(buf: &mut [u8]) -> Result<(), CaError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| CaError::BadCa(format!("no randomness for a serial number: {e}")))
}

/// A key and CSR as a workload (its proxy) makes them; for tests and the proxy.
pub fn new_key_and_csr() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = CertificateParams::default();
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn parse_leaf(chain: &str) -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes())
            .map(|p| p.unwrap().contents)
            .collect()
    }

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns/Default/sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://CLUSTER/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/sa/web/ns/default",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leaves_carry_only_the_proven_identity_and_chain_to_the_root() {
        let ca = Ca::generate("cluster.local", Duration::from_secs(86_400 * 365)).unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        let leaf = ca.issue(&csr, &id, Duration::from_secs(86_400)).unwrap();
        let ders = parse_leaf(&leaf.chain_pem);
        assert_eq!(ders.len(), 2, "leaf then CA");
        let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
        let (_, root) = X509Certificate::from_der(&ders[1]).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|g| format!("{g}"))
            .collect();
        assert_eq!(uris, ["URI(spiffe://cluster.local/ns/shop/sa/cart)"]);
        assert!(!cert.is_ca());
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 86_400 + 60, "24 h plus the backdating");
        // Another trust domain's identity is refused.
        let foreign = SpiffeId::new("other.mesh", "shop", "cart");
        assert!(ca.issue(&csr, &foreign, Duration::from_secs(60)).is_err());
        // Garbage is not a CSR.
        assert!(matches!(
            ca.issue(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &id,
                Duration::from_secs(60)
            ),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn a_ca_survives_its_secret() {
        let ca = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let back = Ca::from_pem("cluster.local", ca.cert_pem(), &ca.key_pem()).unwrap();
        let (_k, csr) = new_key_and_csr().unwrap();
        back.issue(
            &csr,
            &SpiffeId::new("cluster.local", "a", "b"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(Ca::from_pem("cluster.local", "garbage", &ca.key_pem()).is_err());
    }
}
