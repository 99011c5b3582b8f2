//! The mesh CA against the embedded API server (real TokenRequest and TokenReview through
//! kube-rs): a workload gets exactly its own SPIFFE identity, nobody else's; bad tokens are
//! refused; the CA survives a restart through its Secret; a root rotation keeps the old root
//! trusted for the overlap; a staged rotation (as `fairlead-controller rotate-root` stages
//! it) reaches the bundle ConfigMap, the webhook's caBundle and the serving certificate in
//! the right order on a running controller.

use std::sync::Arc;
use std::time::Duration;

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_controller::server::ServingCert;
use fairlead_controller::trust::{Serving, TrustSync};
use fairlead_controller::{new_key_and_csr, CertIssuer, IssueError, IssuerConfig, SpiffeId};
use serde_json::json;
use x509_parser::prelude::*;

async fn start() -> anyhow::Result<(ApiServer, kube::Client)> {
    let server = ApiServer::start("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "cart", "namespace": "shop"}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admin", "namespace": "shop"}}),
    ] {
        server.create(obj)?;
    }
    Ok((server, client))
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.expect("PEM").contents)
        .collect()
}

/// Whether the chain's leaf is signed by one of the bundle's roots.
fn verifies(chain: &str, bundle: &str) -> bool {
    let chain = ders(chain);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf");
    ders(bundle).iter().any(|root| {
        let (_, root) = X509Certificate::from_der(root).expect("root");
        leaf.verify_signature(Some(root.public_key())).is_ok()
    })
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}

#[tokio::test]
async fn workloads_get_their_own_identity_and_nobody_elses() -> anyhow::Result<()> {
    let (server, client) = start().await?;
    let ca = CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?;
    let token = server.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(3600))?;
    let (_key, csr) = new_key_and_csr()?;

    let issued = ca.issue(&token, &csr, &id("shop", "cart")).await?;
    assert!(verifies(&issued.chain_pem, &issued.bundle_pem));
    let leaf = ders(&issued.chain_pem);
    let (_, cert) = X509Certificate::from_der(&leaf[0])?;
    let san = cert
        .subject_alternative_name()?
        .expect("a SAN")
        .value
        .general_names
        .iter()
        .map(|g| format!("{g}"))
        .collect::<Vec<_>>();
    assert_eq!(san, ["URI(spiffe://cluster.local/ns/shop/sa/cart)"]);

    // The cart's token cannot buy the admin's identity.
    let err = ca
        .issue(&token, &csr, &id("shop", "admin"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IssueError::Forbidden { proved, .. } if proved == "spiffe://cluster.local/ns/shop/sa/cart"),
        "{err}"
    );
    // A forged or garbage token is refused by the API server's review.
    let err = ca
        .issue("not-a-token", &csr, &id("shop", "cart"))
        .await
        .unwrap_err();
    assert!(matches!(err, IssueError::Unauthenticated(_)), "{err}");
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let err = ca
        .issue(&forged, &csr, &id("shop", "cart"))
        .await
        .unwrap_err();
    assert!(matches!(err, IssueError::Unauthenticated(_)), "{err}");
    // A valid token minted for another audience proves nothing to the mesh CA.
    let other = server.issue_token("shop", "cart", &["vault"], Duration::from_secs(3600))?;
    let err = ca
        .issue(&other, &csr, &id("shop", "cart"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IssueError::Unauthenticated(m) if m.contains("audiences")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn the_ca_survives_a_restart_and_rotates_with_overlap() -> anyhow::Result<()> {
    let (server, client) = start().await?;
    let first = CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?;
    let bundle = first.bundle();
    let again = CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?;
    assert_eq!(again.bundle(), bundle, "the same root from its Secret");

    let token = server.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(3600))?;
    let (_key, csr) = new_key_and_csr()?;
    let before = again.issue(&token, &csr, &id("shop", "cart")).await?;

    // No propagation time: the new root signs at once.
    again
        .rotate(Duration::ZERO, Duration::from_secs(3600))
        .await?;
    let after = again.issue(&token, &csr, &id("shop", "cart")).await?;
    assert_eq!(
        ders(&after.bundle_pem).len(),
        2,
        "both roots during the overlap"
    );
    assert!(
        verifies(&before.chain_pem, &after.bundle_pem),
        "old leaves still trusted"
    );
    assert!(verifies(&after.chain_pem, &after.bundle_pem));
    assert!(
        !verifies(&after.chain_pem, &bundle),
        "new leaves chain to the new root"
    );

    // A restarted controller sees the rotation, overlap included.
    let third = CertIssuer::load_or_create(client, IssuerConfig::default()).await?;
    assert_eq!(third.bundle(), again.bundle());
    Ok(())
}

/// Whether `leaf` (DER) is signed by one of the bundle's roots.
fn signed_by(leaf: &[u8], bundle: &str) -> bool {
    let (_, leaf) = X509Certificate::from_der(leaf).expect("leaf");
    ders(bundle).iter().any(|root| {
        let (_, root) = X509Certificate::from_der(root).expect("root");
        leaf.verify_signature(Some(root.public_key())).is_ok()
    })
}

#[tokio::test]
async fn a_staged_rotation_reaches_bundle_cabundle_and_serving_cert_in_order() -> anyhow::Result<()>
{
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::ConfigMap;
    let (server, client) = start().await?;
    server.create(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "fairlead-sidecar-injector"},
        "webhooks": [{"name": "inject.fairlead.io", "admissionReviewVersions": ["v1"],
                      "sideEffects": "None",
                      "clientConfig": {"service": {"name": "fairlead-controller", "namespace": "fairlead-system"}}}]
    }))?;
    let issuer =
        Arc::new(CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?);
    let ttl = Duration::from_secs(3600);
    let (leaf, key) = issuer.issue_serving(&["localhost".to_owned()], ttl)?;
    let cert = ServingCert::from_pem(&leaf.chain_pem, &key)?;
    let mut sync = TrustSync::new(
        Arc::clone(&issuer),
        client.clone(),
        "fairlead-system",
        Some("fairlead-sidecar-injector".into()),
        Some(Serving {
            cert: Arc::clone(&cert),
            names: vec!["localhost".into()],
            ttl,
        }),
    );
    let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "fairlead-system");
    let hooks: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
    let published = || async {
        let cm = configmaps.get("fairlead-ca-bundle").await.unwrap();
        let bundle = cm.data.unwrap()["ca.crt"].clone();
        let hook = hooks.get("fairlead-sidecar-injector").await.unwrap();
        let ca_bundle = hook.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap();
        (bundle, String::from_utf8(ca_bundle.0).unwrap())
    };
    sync.tick().await.map_err(anyhow::Error::msg)?;
    let old_root = issuer.signing_root();
    assert_eq!(published().await, (old_root.clone(), old_root.clone()));

    // A label someone put on the CA's Secret survives the rotation's writes.
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), "fairlead-system");
    secrets
        .patch(
            "fairlead-ca",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"team": "platform"}}})),
        )
        .await?;
    // Another process stages a rotation, as `fairlead-controller rotate-root` does: the next
    // root signs in 2 s, the old one is trusted 2 s past that.
    let admin = CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?;
    admin
        .rotate(Duration::from_secs(2), Duration::from_secs(2))
        .await?;
    let refused = admin
        .rotate(Duration::from_secs(2), Duration::from_secs(2))
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already staged")),
        "{refused:?}"
    );
    sync.tick().await.map_err(anyhow::Error::msg)?;
    let (bundle, ca_bundle) = published().await;
    assert_eq!(
        ders(&bundle).len(),
        2,
        "the next root is trusted before it signs"
    );
    assert_eq!(bundle, ca_bundle);
    assert_eq!(issuer.signing_root(), old_root, "the old root still signs");
    let token = server.issue_token("shop", "cart", &["fairlead"], Duration::from_secs(3600))?;
    let (_key, csr) = new_key_and_csr()?;
    let before = issuer.issue(&token, &csr, &id("shop", "cart")).await?;
    assert!(verifies(&before.chain_pem, &old_root));
    assert_eq!(
        ders(&before.bundle_pem).len(),
        2,
        "workloads learn the next root now"
    );

    // At the switch the next root signs; the serving certificate moves to it (the API
    // server already trusts it through caBundle).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    sync.tick().await.map_err(anyhow::Error::msg)?;
    let new_root = issuer.signing_root();
    assert_ne!(new_root, old_root, "promoted");
    assert!(
        signed_by(&cert.leaf_der(), &new_root),
        "serving certificate issued again"
    );
    let after = issuer.issue(&token, &csr, &id("shop", "cart")).await?;
    assert!(verifies(&after.chain_pem, &new_root));
    let (bundle, _) = published().await;
    assert!(
        verifies(&before.chain_pem, &bundle),
        "old leaves still trusted"
    );
    assert!(admin.reload().await?, "the other replica follows");
    assert_eq!(admin.signing_root(), new_root);

    // After the overlap only the new root is trusted, everywhere.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    sync.tick().await.map_err(anyhow::Error::msg)?;
    assert_eq!(published().await, (new_root.clone(), new_root));
    let labels = secrets
        .get("fairlead-ca")
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("platform"));
    Ok(())
}
