//! `fairlead-controller`: the mesh control plane as a process. Today it loads the mesh CA
//! from its Secret (creating it on first start) and serves the sidecar-injection webhook
//! over HTTPS, with a serving certificate from files (cert-manager) or issued at start by
//! the mesh CA (then, with `--webhook-config`, it writes the CA bundle into the
//! MutatingWebhookConfiguration's `caBundle`).
//!
//! An issued serving certificate is renewed halfway through its life; a certificate from
//! files is served anew once the files change.
//!
//! Not yet: the endpoint through which proxies (via their node agent) get certificates,
//! following a root rotation into caBundle (the binary never rotates the root), CRD status,
//! leader election.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fairlead_controller::server::{self, Limits, ServingCert};
use fairlead_controller::webhook::InjectConfig;
use fairlead_controller::{CertIssuer, IssuerConfig};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

#[derive(Debug, Parser)]
#[command(
    name = "fairlead-controller",
    about = "The Fairlead mesh control plane: the mesh CA and the sidecar-injection webhook"
)]
struct Args {
    /// Where the webhook listens (HTTPS).
    #[arg(long, env = "FAIRLEAD_CONTROLLER_LISTEN", default_value = "[::]:9443")]
    listen: SocketAddr,
    /// The serving certificate chain (PEM), e.g. a cert-manager Secret's tls.crt. Without
    /// it the mesh CA issues one at start for the --dns-name names.
    #[arg(long, env = "FAIRLEAD_CONTROLLER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The serving key (PEM), e.g. tls.key.
    #[arg(long, env = "FAIRLEAD_CONTROLLER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// DNS names of an issued serving certificate (repeatable): the webhook Service's.
    #[arg(long, default_values_t = ["fairlead-controller.fairlead-system.svc".to_owned()])]
    dns_name: Vec<String>,
    /// Lifetime of an issued serving certificate, in days.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..))]
    serving_ttl_days: u64,
    /// A MutatingWebhookConfiguration whose webhooks get the mesh CA bundle as caBundle
    /// (only with an issued serving certificate).
    #[arg(long, env = "FAIRLEAD_CONTROLLER_WEBHOOK_CONFIG")]
    webhook_config: Option<String>,
    /// The mesh's trust domain.
    #[arg(
        long,
        env = "FAIRLEAD_CONTROLLER_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// The namespace and name of the Secret holding the mesh CA.
    #[arg(
        long,
        env = "FAIRLEAD_CONTROLLER_CA_NAMESPACE",
        default_value = "fairlead-system"
    )]
    ca_namespace: String,
    #[arg(
        long,
        env = "FAIRLEAD_CONTROLLER_CA_SECRET",
        default_value = "fairlead-ca"
    )]
    ca_secret: String,
    /// The proxy image injected into pods.
    #[arg(long, env = "FAIRLEAD_CONTROLLER_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// The injected proxy's imagePullPolicy.
    #[arg(long, env = "FAIRLEAD_CONTROLLER_PROXY_PULL_POLICY")]
    proxy_pull_policy: Option<String>,
    /// Largest admission request body, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Read timeout (TLS handshake and request head, then body), seconds.
    #[arg(long, default_value_t = 10)]
    read_timeout_secs: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAIRLEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fairlead-controller: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes API server (in-cluster config or KUBECONFIG): {e}"))?;
    let issuer = Arc::new(
        CertIssuer::load_or_create(
            client.clone(),
            IssuerConfig {
                trust_domain: args.trust_domain.clone(),
                namespace: args.ca_namespace.clone(),
                secret: args.ca_secret.clone(),
                ..IssuerConfig::default()
            },
        )
        .await
        .map_err(|e| format!("the mesh CA: {e}"))?,
    );
    // The roots, for the node agents (their client of this CA) and anyone who verifies mesh
    // certificates: not secret, unlike the CA's Secret.
    publish_bundle(&client, &args.ca_namespace, &issuer.bundle()).await?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            if args.webhook_config.is_some() {
                return Err(
                    "--webhook-config writes the mesh CA as caBundle, which is only \
                            right for a certificate the mesh CA issued: drop it, or drop \
                            --tls-cert/--tls-key (cert-manager's CA injector sets caBundle \
                            for its certificates)"
                        .into(),
                );
            }
            ServingCert::from_files(cert, key).map_err(|e| e.to_string())?
        }
        _ => {
            let ttl = Duration::from_secs(args.serving_ttl_days * 24 * 3600);
            let (leaf, key) = issuer
                .issue_serving(&args.dns_name, ttl)
                .map_err(|e| format!("issuing the serving certificate: {e}"))?;
            if let Some(name) = &args.webhook_config {
                set_ca_bundle(&client, name, &issuer.bundle()).await?;
            }
            let cert = ServingCert::from_pem(&leaf.chain_pem, &key).map_err(|e| e.to_string())?;
            tokio::spawn(renew(
                Arc::clone(&issuer),
                Arc::clone(&cert),
                args.dns_name.clone(),
                ttl,
            ));
            cert
        }
    };
    let tls = tls.tls_config().map_err(|e| e.to_string())?;
    let mut inject = InjectConfig::default();
    if let Some(image) = args.proxy_image {
        inject.image = image;
    }
    inject.image_pull_policy = args.proxy_pull_policy;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    server::serve_with_ca(
        listener,
        tls,
        Arc::new(inject),
        Limits {
            max_body: args.max_body,
            read_timeout: Duration::from_secs(args.read_timeout_secs),
        },
        Some(issuer),
    )
    .await;
    Ok(())
}

/// Re-issues the serving certificate halfway through its life (every minute after a
/// failure, while the current one is still served).
async fn renew(issuer: Arc<CertIssuer>, cert: Arc<ServingCert>, names: Vec<String>, ttl: Duration) {
    let mut wait = ttl / 2;
    loop {
        tokio::time::sleep(wait).await;
        let renewed = issuer
            .issue_serving(&names, ttl)
            .map_err(|e| e.to_string())
            .and_then(|(leaf, key)| cert.set(&leaf.chain_pem, &key).map_err(|e| e.to_string()));
        wait = match renewed {
            Ok(()) => {
                tracing::info!("serving certificate renewed");
                ttl / 2
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the serving certificate failed; retrying in a minute");
                Duration::from_secs(60)
            }
        };
    }
}

/// The ConfigMap the mesh's trust bundle is published in (`ca.crt`).
pub const BUNDLE_CONFIGMAP: &str = "fairlead-ca-bundle";

/// Creates or updates the ConfigMap [`BUNDLE_CONFIGMAP`] in `namespace` with `bundle`.
async fn publish_bundle(
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
async fn set_ca_bundle(client: &kube::Client, name: &str, bundle: &str) -> Result<(), String> {
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
