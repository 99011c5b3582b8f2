//! ServiceAccount tokens: the server issues signed JWTs through the
//! TokenRequest subresource and checks them through TokenReview, so the mesh
//! CA can verify a pod's identity exactly as it would against a real cluster.
//! Tokens are HS256 with a per-server random key (the real server uses RS256
//! with a key pair; only this server ever verifies these tokens).

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const ISSUER: &str = "https://fairlead.sandbox.local";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub struct TokenSigner {
    key: [u8; 32],
}

/// What a valid token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub namespace: String,
    pub service_account: String,
    pub sa_uid: String,
    pub pod: Option<(String, String)>,
    pub audiences: Vec<String>,
    pub expires: i64,
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self {
            key: rand::random(),
        }
    }
}

impl TokenSigner {
    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("any key length works for HMAC")
    }

    pub fn issue(&self, c: &TokenClaims) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut k8s = json!({
            "namespace": c.namespace,
            "serviceaccount": {"name": c.service_account, "uid": c.sa_uid},
        });
        if let Some((name, uid)) = &c.pod {
            k8s["pod"] = json!({"name": name, "uid": uid});
        }
        let claims = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{}:{}", c.namespace, c.service_account),
            "aud": c.audiences,
            "iat": now,
            "nbf": now,
            "exp": c.expires,
            "kubernetes.io": k8s,
        });
        let head = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = B64.encode(serde_json::to_vec(&claims).expect("json"));
        let mut mac = self.mac();
        mac.update(format!("{head}.{body}").as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{head}.{body}.{sig}")
    }

    /// Checks signature, issuer and expiry. The caller then checks that the
    /// ServiceAccount (and pod) still exist with the same uid.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, String> {
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the token is not a JWT (three dot-separated parts)".into());
        };
        let sig = B64
            .decode(sig)
            .map_err(|_| "the token signature is not base64url")?;
        let mut mac = self.mac();
        mac.update(format!("{head}.{body}").as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| "the token signature is invalid (not issued by this API server)")?;
        let claims: Value = serde_json::from_slice(
            &B64.decode(body)
                .map_err(|_| "the token body is not base64url")?,
        )
        .map_err(|_| "the token body is not JSON")?;
        if claims["iss"] != ISSUER {
            return Err("the token has the wrong issuer".into());
        }
        let exp = claims["exp"].as_i64().unwrap_or(0);
        if exp < chrono::Utc::now().timestamp() {
            return Err("the token has expired".into());
        }
        let k = &claims["kubernetes.io"];
        let s = |p: &str| {
            k.pointer(p)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        Ok(TokenClaims {
            namespace: s("/namespace"),
            service_account: s("/serviceaccount/name"),
            sa_uid: s("/serviceaccount/uid"),
            pod: k.get("pod").map(|_| (s("/pod/name"), s("/pod/uid"))),
            audiences: crate::strings(Some(&claims["aud"])),
            expires: exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_verify() {
        let s = TokenSigner::default();
        let c = TokenClaims {
            namespace: "ns".into(),
            service_account: "sa".into(),
            sa_uid: "u".into(),
            pod: Some(("p".into(), "pu".into())),
            audiences: vec!["fairlead".into()],
            expires: chrono::Utc::now().timestamp() + 60,
        };
        let t = s.issue(&c);
        assert_eq!(s.verify(&t).unwrap(), c);
        // tampering with the body breaks the signature
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        parts[1] = B64.encode(br#"{"iss":"https://fairlead.sandbox.local","exp":99999999999}"#);
        assert!(s
            .verify(&parts.join("."))
            .unwrap_err()
            .contains("signature"));
        // another server's key does not verify
        assert!(TokenSigner::default().verify(&t).is_err());
        let old = TokenClaims { expires: 1, ..c };
        assert!(s.verify(&s.issue(&old)).unwrap_err().contains("expired"));
    }
}
