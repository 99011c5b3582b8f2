//! `fairlead-controller`: the mesh control plane as a process. Today it loads the mesh CA
//! from its Secret (creating it on first start) and serves the sidecar-injection webhook
//! over HTTPS, with a serving certificate from files (cert-manager) or issued at start by
//! the mesh CA (then, with `--webhook-config`, it writes the CA bundle into the
//! MutatingWebhookConfiguration's `caBundle`).
//!
//! An issued serving certificate is renewed halfway through its life; a certificate from
//! files is served anew once the files change.
//!
//! It also serves the CA's API to node agents (`POST /v1/certificates`), publishes the
//! trust bundle (ConfigMap `fairlead-ca-bundle`), and follows the CA Secret every
//! `--ca-sync-secs` ([`fairlead_controller::trust`]), so a root rotation staged with
//! `fairlead-controller rotate-root` reaches the bundle, `caBundle` and its own serving
//! certificate. Replicas need no leader: the Secret is the only state, and every write
//! names the resourceVersion it was based on.
//!
//! Not yet: CRD status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fairlead_controller::server::{self, Limits, ServingCert};
use fairlead_controller::trust::{Serving, TrustSync};
use fairlead_controller::webhook::InjectConfig;
use fairlead_controller::{CertIssuer, IssuerConfig};

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
        global = true,
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// The namespace and name of the Secret holding the mesh CA.
    #[arg(
        long,
        env = "FAIRLEAD_CONTROLLER_CA_NAMESPACE",
        global = true,
        default_value = "fairlead-system"
    )]
    ca_namespace: String,
    #[arg(
        long,
        env = "FAIRLEAD_CONTROLLER_CA_SECRET",
        global = true,
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
    /// How often the CA Secret is read again (rotations, other replicas) and the bundle,
    /// caBundle and serving certificate brought in step, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    ca_sync_secs: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Stage a new mesh root in the CA Secret and exit; the running controllers pick it up.
    /// It joins the trust bundle at once, starts signing after --propagate, and the old root
    /// stays trusted for --overlap after that. Durations: 90s, 30m, 13h, 2d.
    RotateRoot {
        /// Until the new root signs: at least half the workload certificates' life (they
        /// renew, and learn the bundle, at half-life; 24 h certificates: 12 h).
        #[arg(long, default_value = "13h", value_parser = parse_duration)]
        propagate: Duration,
        /// How long the old root stays trusted after the switch: at least the workload
        /// certificates' life, so the leaves it signed expire first.
        #[arg(long, default_value = "25h", value_parser = parse_duration)]
        overlap: Duration,
    },
}

/// `90s`, `30m`, `13h`, `2d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, like 90s, 30m, 13h or 2d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n * secs))
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
    if let Some(Command::RotateRoot { propagate, overlap }) = args.command {
        let at = issuer
            .rotate(propagate, overlap)
            .await
            .map_err(|e| format!("staging the new root: {e}"))?;
        println!(
            "new mesh root staged in {}/{}: trusted now, signing from {at}; the old root trusted until {}",
            args.ca_namespace,
            args.ca_secret,
            at + overlap
        );
        return Ok(());
    }
    let (tls, serving) = match (&args.tls_cert, &args.tls_key) {
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
            (
                ServingCert::from_files(cert, key).map_err(|e| e.to_string())?,
                None,
            )
        }
        _ => {
            let ttl = Duration::from_secs(args.serving_ttl_days * 24 * 3600);
            let (leaf, key) = issuer
                .issue_serving(&args.dns_name, ttl)
                .map_err(|e| format!("issuing the serving certificate: {e}"))?;
            let cert = ServingCert::from_pem(&leaf.chain_pem, &key).map_err(|e| e.to_string())?;
            let serving = Serving {
                cert: Arc::clone(&cert),
                names: args.dns_name.clone(),
                ttl,
            };
            (cert, Some(serving))
        }
    };
    // The roots, for the node agents (their client of this CA) and anyone who verifies mesh
    // certificates (not secret, unlike the CA's Secret), and the webhook's caBundle: once
    // now (a failure stops the start), then every --ca-sync-secs, following rotations.
    let mut sync = TrustSync::new(
        Arc::clone(&issuer),
        client.clone(),
        &args.ca_namespace,
        serving.as_ref().and(args.webhook_config.clone()),
        serving,
    );
    // Replicas starting together race on the same objects; a write that lost (409) is
    // simply done again from what the winner wrote.
    for attempt in 1.. {
        match sync.tick().await {
            Ok(()) => break,
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, "bringing the trust bundle in step; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    tokio::spawn(sync.run(Duration::from_secs(args.ca_sync_secs)));
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
