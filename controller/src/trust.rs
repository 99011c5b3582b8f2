//! Keeping what trusts the mesh CA in step with its Secret, on every controller replica:
//! the bundle ConfigMap the node agents read, the webhook configuration's `caBundle`, and
//! the controller's own serving certificate (issued again at half its life, and at once
//! when another root starts signing). A staged rotation is promoted here at its switch time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use crate::server::ServingCert;
use crate::CertIssuer;

/// A serving certificate the mesh CA issued, to keep fresh.
pub struct Serving {
    pub cert: Arc<ServingCert>,
    pub names: Vec<String>,
    pub ttl: Duration,
}

/// See the module docs. [`TrustSync::tick`] is one pass; [`TrustSync::run`] repeats it.
pub struct TrustSync {
    issuer: Arc<CertIssuer>,
    client: kube::Client,
    namespace: String,
    webhook_config: Option<String>,
    serving: Option<Serving>,
    /// The bundle last written everywhere it goes.
    published: Option<String>,
    /// The root the serving certificate chains to, and when it is due again.
    serving_root: String,
    serving_due: Instant,
}

impl TrustSync {
    /// `serving`: a certificate just issued by `issuer` (None: it comes from files, and
    /// cert-manager keeps it and `caBundle`). `webhook_config`: the configuration whose
    /// `caBundle` is the mesh bundle.
    pub fn new(
        issuer: Arc<CertIssuer>,
        client: kube::Client,
        namespace: &str,
        webhook_config: Option<String>,
        serving: Option<Serving>,
    ) -> Self {
        let due = Instant::now() + serving.as_ref().map_or(Duration::ZERO, |s| s.ttl / 2);
        Self {
            serving_root: issuer.signing_root(),
            issuer,
            client,
            namespace: namespace.to_owned(),
            webhook_config,
            serving,
            published: None,
            serving_due: due,
        }
    }

    /// Follows the Secret, promotes a due rotation, publishes a changed bundle (ConfigMap,
    /// then `caBundle`), then issues the serving certificate again if its root changed or it
    /// is due: in that order, so the API server trusts the new root before it is served.
    pub async fn tick(&mut self) -> Result<(), String> {
        self.issuer
            .reload()
            .await
            .map_err(|e| format!("reading the mesh CA Secret: {e}"))?;
        self.issuer
            .promote_if_due()
            .await
            .map_err(|e| format!("promoting the staged root: {e}"))?;
        let bundle = self.issuer.bundle();
        if self.published.as_deref() != Some(bundle.as_str()) {
            publish_bundle(&self.client, &self.namespace, &bundle).await?;
            if let Some(name) = &self.webhook_config {
                set_ca_bundle(&self.client, name, &bundle).await?;
            }
            self.published = Some(bundle);
        }
        if let Some(s) = &self.serving {
            let root = self.issuer.signing_root();
            if root != self.serving_root || Instant::now() >= self.serving_due {
                let (leaf, key) = self
                    .issuer
                    .issue_serving(&s.names, s.ttl)
                    .map_err(|e| format!("issuing the serving certificate: {e}"))?;
                s.cert
                    .set(&leaf.chain_pem, &key)
                    .map_err(|e| format!("serving the new certificate: {e}"))?;
                tracing::info!(
                    new_root = root != self.serving_root,
                    "serving certificate issued again"
                );
                self.serving_root = root;
                self.serving_due = Instant::now() + s.ttl / 2;
            }
        }
        Ok(())
    }

    /// [`TrustSync::tick`] every `every`, logging failures (the current state keeps being
    /// served meanwhile).
    pub async fn run(mut self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "keeping the trust bundle in step failed; retrying");
            }
        }
    }
}

/// The ConfigMap the mesh's trust bundle is published in (`ca.crt`).
pub const BUNDLE_CONFIGMAP: &str = "fairlead-ca-bundle";

/// Creates or updates the ConfigMap [`BUNDLE_CONFIGMAP`] in `namespace` with `bundle`.
pub async fn publish_bundle(
    client: &kube::Client,
    namespace: &str,
    bundle: &str,
) -> Result<(), String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(BUNDLE_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some([("ca.crt".to_owned(), bundle.to_owned())].into()),
        ..Default::default()
    };
    let result = match api.get_opt(BUNDLE_CONFIGMAP).await {
        Ok(Some(old)) => {
            cm.metadata.resource_version = old.metadata.resource_version;
            api.replace(BUNDLE_CONFIGMAP, &PostParams::default(), &cm)
                .await
        }
        Ok(None) => api.create(&PostParams::default(), &cm).await,
        Err(e) => Err(e),
    };
    result.map_err(|e| {
        format!("publishing the trust bundle in {namespace}/{BUNDLE_CONFIGMAP}: {e}")
    })?;
    tracing::info!(configmap = %format!("{namespace}/{BUNDLE_CONFIGMAP}"), "trust bundle published");
    Ok(())
}

/// Writes `bundle` as every webhook's `caBundle` in the MutatingWebhookConfiguration `name`.
pub async fn set_ca_bundle(client: &kube::Client, name: &str, bundle: &str) -> Result<(), String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    // Helm creates webhook configurations after Deployments, so it may not exist yet.
    let mut attempts = 0;
    let mut config = loop {
        match api.get_opt(name).await {
            Ok(Some(c)) => break c,
            Ok(None) if attempts < 30 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(None) => {
                return Err(format!(
                    "the MutatingWebhookConfiguration {name} (--webhook-config) does not exist"
                ))
            }
            Err(e) => {
                return Err(format!(
                    "reading the MutatingWebhookConfiguration {name} (--webhook-config): {e}"
                ))
            }
        }
    };
    for hook in config.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(bundle.as_bytes().to_vec()));
    }
    api.replace(name, &PostParams::default(), &config)
        .await
        .map_err(|e| {
            format!("writing caBundle into the MutatingWebhookConfiguration {name}: {e}")
        })?;
    tracing::info!(webhook_config = name, "caBundle set to the mesh CA bundle");
    Ok(())
}
