//! The mesh CA's API for node agents over real TLS: `POST /v1/certificates` with a
//! workload's CSR and ServiceAccount token gets a SPIFFE certificate for exactly that
//! account; another account's token, a token for another audience and a garbage body are
//! refused with the reason, and the server keeps serving.

use std::sync::Arc;
use std::time::Duration;

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_controller::api::{CaClient, CertRequest};
use fairlead_controller::server::{self, Limits, ServingCert};
use fairlead_controller::webhook::InjectConfig;
use fairlead_controller::{new_key_and_csr, CertIssuer, IssuerConfig};

#[tokio::test]
async fn agents_get_certificates_for_the_accounts_their_tokens_prove() -> anyhow::Result<()> {
    let api = ApiServer::start("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    for obj in [
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "cart", "namespace": "shop"}}),
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admin", "namespace": "shop"}}),
    ] {
        api.create(obj)?;
    }
    let issuer = Arc::new(CertIssuer::load_or_create(client, IssuerConfig::default()).await?);
    let (leaf, key) = issuer.issue_serving(&["localhost".to_owned()], Duration::from_secs(3600))?;
    let tls = ServingCert::from_pem(&leaf.chain_pem, &key)?.tls_config()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(server::serve_with_ca(
        listener,
        tls,
        Arc::new(InjectConfig::default()),
        Limits::default(),
        Some(Arc::clone(&issuer)),
    ));
    let ca = CaClient::new(&format!("https://localhost:{port}"), &issuer.bundle())
        .map_err(anyhow::Error::msg)?;
    let request = |sa: &str, token: String| {
        let (_, csr) = new_key_and_csr().unwrap();
        CertRequest {
            namespace: "shop".into(),
            service_account: sa.into(),
            token,
            csr,
        }
    };

    let token = api.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))?;
    let reply = ca
        .issue(&request("cart", token.clone()))
        .await
        .map_err(anyhow::Error::msg)?;
    let tls = fairlead_proxy_identity(&reply.chain);
    assert_eq!(tls, "spiffe://cluster.local/ns/shop/sa/cart");
    assert!(reply.bundle.contains("BEGIN CERTIFICATE"));

    // Someone else's identity with cart's token.
    let err = ca.issue(&request("admin", token)).await.unwrap_err();
    assert!(
        err.contains("403") && err.contains("may not take the identity"),
        "{err}"
    );
    // A token minted for another audience.
    let other = api.issue_token("shop", "cart", &["vault"], Duration::from_secs(600))?;
    let err = ca.issue(&request("cart", other)).await.unwrap_err();
    assert!(err.contains("403") && err.contains("audiences"), "{err}");
    // Garbage CSR with a good token.
    let token = api.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))?;
    let mut bad = request("cart", token);
    bad.csr = "not a csr".into();
    let err = ca.issue(&bad).await.unwrap_err();
    assert!(err.contains("400"), "{err}");
    // A wrong CA bundle: the client refuses the server.
    let stranger = fairlead_controller::Ca::generate("other.local", Duration::from_secs(3600))?;
    let wrong = CaClient::new(&format!("https://localhost:{port}"), stranger.cert_pem())
        .map_err(anyhow::Error::msg)?;
    let token = api.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))?;
    let err = wrong.issue(&request("cart", token)).await.unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    // And the server still serves.
    let token = api.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(600))?;
    assert!(ca.issue(&request("cart", token)).await.is_ok());
    task.abort();
    Ok(())
}

/// The URI SAN of the chain's leaf.
fn fairlead_proxy_identity(chain: &str) -> String {
    let pem = x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap()
}
