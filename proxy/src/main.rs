//! `fairlead-proxy`: the sidecar as a process. Credentials and routes come from the node
//! agent (`--agent-socket`, or `--agent-addr` over TCP: a certificate for its own key, proved by the pod's
//! ServiceAccount token and renewed at half its lifetime; the routing table, followed), or
//! from PEM files for a fixed setup. The inbound listener terminates mTLS and hands
//! connections to the application; the outbound listener either originates mTLS to fixed
//! peers (`--outbound-to`) or routes intercepted connections by their original destination.
//! One worker thread by default, as a sidecar should be sized.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use fairlead_controller::new_key_and_csr;
use fairlead_proxy::admin::{self, Metrics, ProxyConfig};
use fairlead_proxy::agent::{AgentAddr, AgentCertSource, AgentClient};
use fairlead_proxy::inbound::{self, AppTarget, Authorization, InboundOptions, Mode};
use fairlead_proxy::outbound::{self, Destination, Endpoint};
use fairlead_proxy::rotation::{self, CertSource, CredentialStore};
use fairlead_proxy::routes::MeshRoutes;
use fairlead_proxy::transparent::{Dialer, ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};
use fairlead_proxy::{MeshTls, PeerId};

#[derive(Debug, Parser)]
#[command(
    name = "fairlead-proxy",
    about = "The Fairlead mesh sidecar: mTLS with SPIFFE identities"
)]
struct Args {
    /// The node agent's socket: certificates and routes come from it.
    #[arg(long, conflicts_with_all = ["cert", "key", "bundle", "agent_addr"])]
    agent_socket: Option<PathBuf>,
    /// The node agent over TCP, at the node's address (`$(HOST_IP):15012`, the downward
    /// API's status.hostIP): as --agent-socket, without a host volume.
    #[arg(long, conflicts_with_all = ["cert", "key", "bundle"], value_parser = agent_addr)]
    agent_addr: Option<std::net::SocketAddr>,
    /// With `--agent-socket`: the pod's namespace (the downward API's metadata.namespace).
    #[arg(long, env = "FAIRLEAD_PROXY_POD_NAMESPACE")]
    namespace: Option<String>,
    /// With `--agent-socket`: the pod's ServiceAccount.
    #[arg(long, env = "FAIRLEAD_PROXY_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// With `--agent-socket`: the ServiceAccount token file (a projected token with the
    /// audience `fairlead`).
    #[arg(
        long,
        env = "FAIRLEAD_PROXY_TOKEN",
        default_value = "/var/run/secrets/fairlead.io/serviceaccount/token"
    )]
    token_file: PathBuf,
    /// The workload's certificate chain (PEM, leaf first; its single URI SAN is the
    /// proxy's SPIFFE ID).
    #[arg(long, requires_all = ["key", "bundle"])]
    cert: Option<PathBuf>,
    /// The workload's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The trust bundle (PEM roots).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Inbound (mTLS) listener; `none` to have none.
    #[arg(long, default_value_t = format!("[::]:{INBOUND_PORT}"))]
    inbound: String,
    /// Where inbound connections go: an address, or `original` (localhost at the port the
    /// client dialed; needs interception).
    #[arg(long, default_value = "original")]
    app: String,
    /// Who may connect inbound: `trust-domain`, or a comma-separated list of SPIFFE IDs.
    #[arg(long, default_value = "trust-domain")]
    allow: String,
    /// `strict` refuses plaintext inbound; `permissive` passes it to the application (for
    /// migrating a workload into the mesh).
    #[arg(long, default_value = "strict")]
    mode: String,
    /// Application ports that speak opaque TCP (server-speaks-first protocols such as MySQL
    /// or SMTP), comma-separated: inbound connections to them skip protocol detection (the
    /// `fairlead.io/opaque-ports` annotation).
    #[arg(long)]
    opaque_ports: Option<String>,
    /// Outbound listener; `none` to have none.
    #[arg(long, default_value_t = format!("[::]:{OUTBOUND_PORT}"))]
    outbound: String,
    /// Send every outbound connection over mTLS to this peer sidecar (instead of routing
    /// intercepted connections by their original destination). Repeatable: each connection
    /// goes to one of them, by power of two choices over connection latency.
    #[arg(long)]
    outbound_to: Vec<SocketAddr>,
    /// The SPIFFE ID the `--outbound-to` peers must present (repeatable; any identity of
    /// the trust domain when absent).
    #[arg(long)]
    outbound_expect: Vec<String>,
    /// Admin listener (/ready, /live, /metrics, /config); `none` to have none.
    #[arg(long, default_value_t = format!("[::]:{ADMIN_PORT}"))]
    admin: String,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Never resume TLS sessions (every handshake a full one).
    #[arg(long)]
    no_tls_resumption: bool,
}

fn listen_addr(flag: &str, value: &str) -> Result<Option<SocketAddr>, String> {
    if value == "none" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e| format!("--{flag} {value:?}: not an address (ip:port) or `none`: {e}"))
}

fn read(path: &PathBuf, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAIRLEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fairlead-proxy: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `--agent-addr`: `IP:PORT`, an IPv6 address with or without brackets.
fn agent_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    fairlead_netns::mesh::parse_host_port(text)
        .ok_or_else(|| format!("{text:?} is not ADDRESS:PORT (e.g. 10.0.0.5:15012)"))
}

/// Where credentials and routes come from.
enum Source {
    Files(MeshTls),
    Agent(Arc<AgentCertSource>),
}

fn source(args: &Args) -> Result<Source, String> {
    let agent = match (&args.agent_socket, args.agent_addr) {
        (Some(socket), _) => Some(AgentAddr::Socket(socket.clone())),
        (None, Some(addr)) => Some(AgentAddr::Tcp(addr)),
        (None, None) => None,
    };
    if let Some(addr) = agent {
        let (Some(namespace), Some(service_account)) =
            (args.namespace.clone(), args.service_account.clone())
        else {
            return Err(
                "--agent-socket and --agent-addr need --namespace and --service-account (or \
                 FAIRLEAD_PROXY_POD_NAMESPACE and FAIRLEAD_PROXY_SERVICE_ACCOUNT)"
                    .into(),
            );
        };
        return Ok(Source::Agent(Arc::new(AgentCertSource {
            client: AgentClient { addr },
            namespace,
            service_account,
            token_file: args.token_file.clone(),
        })));
    }
    let (Some(cert), Some(key), Some(bundle)) = (&args.cert, &args.key, &args.bundle) else {
        return Err(
            "credentials: give --agent-socket or --agent-addr, or --cert, --key and --bundle"
                .into(),
        );
    };
    MeshTls::from_pem(
        &read(cert, "certificate chain")?,
        &read(key, "private key")?,
        &read(bundle, "trust bundle")?,
    )
    .map(Source::Files)
    .map_err(|e| format!("credentials: {e}"))
}

/// The first certificate from the agent, retried with backoff until it comes (the proxy is
/// not ready before).
async fn first_certificate(source: &AgentCertSource) -> MeshTls {
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        let attempt = async {
            let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
            let fetched = source.fetch(&csr).await?;
            MeshTls::from_pem(&fetched.chain_pem, &key, &fetched.bundle_pem)
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(tls) => return tls,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "no certificate yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let source = source(&args)?;
    let inbound_at = listen_addr("inbound", &args.inbound)?;
    let outbound_at = listen_addr("outbound", &args.outbound)?;
    let admin_at = listen_addr("admin", &args.admin)?;
    let app = match args.app.as_str() {
        "original" => AppTarget::OriginalPort,
        a => AppTarget::Fixed(
            a.parse()
                .map_err(|e| format!("--app {a:?}: not an address or `original`: {e}"))?,
        ),
    };
    let authz = match args.allow.as_str() {
        "trust-domain" => Authorization::TrustDomain,
        list => Authorization::Only(
            list.split(',')
                .map(|id| spiffe_arg("allow", id))
                .collect::<Result<_, _>>()?,
        ),
    };
    let mode: Mode = args.mode.parse()?;
    let opaque_ports = match &args.opaque_ports {
        Some(list) => fairlead_netns::mesh::parse_ports(list)
            .map_err(|e| format!("--opaque-ports {list:?}: {e}"))?,
        None => Vec::new(),
    };
    let expected: Vec<PeerId> = args
        .outbound_expect
        .iter()
        .map(|id| spiffe_arg("outbound-expect", id))
        .collect::<Result<_, _>>()?;
    let agent = match &source {
        Source::Agent(a) => Some(Arc::clone(a)),
        Source::Files(_) => None,
    };
    let destination = if !args.outbound_to.is_empty() {
        Some(Destination::Fixed(
            args.outbound_to
                .iter()
                .map(|addr| Endpoint {
                    addr: *addr,
                    expected: Some(expected.clone()),
                })
                .collect(),
        ))
    } else if outbound_at.is_some() && agent.is_none() {
        return Err(
            "--outbound needs --outbound-to, or --agent-socket/--agent-addr for the routes of \
             intercepted connections (use --outbound none to run inbound only)"
                .into(),
        );
    } else {
        None
    };
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    // One worker: everything on this thread (no hand-off between the accepting thread and
    // a worker, no work stealing). More: a multi-threaded runtime.
    let runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("starting the runtime: {e}"))?;
    let resumption = !args.no_tls_resumption;
    runtime.block_on(async move {
        let tls = match source {
            Source::Files(tls) => tls,
            Source::Agent(a) => first_certificate(&a).await,
        };
        let creds = CredentialStore::with_resumption(tls, resumption)
            .map_err(|e| format!("credentials: {e}"))?;
        let mut tasks = tokio::task::JoinSet::new();
        // From the agent: renewals, and the routes of intercepted connections.
        let destination = match (&agent, destination) {
            (_, Some(d)) => Some(d),
            (Some(a), None) if outbound_at.is_some() => {
                let (tx, rx) = tokio::sync::watch::channel(Arc::new(MeshRoutes::default()));
                let client = a.client.clone();
                tasks.spawn(async move {
                    client.follow_routes(tx).await;
                    Ok(())
                });
                Some(Destination::Transparent(Arc::new(move |orig| {
                    rx.borrow().route(orig)
                })))
            }
            _ => None,
        };
        if let Some(a) = &agent {
            let (creds, source) = (Arc::clone(&creds), Arc::clone(a) as Arc<dyn CertSource>);
            tasks.spawn(async move {
                rotation::renew(
                    creds,
                    source,
                    || new_key_and_csr().map_err(|e| e.to_string()),
                    rotation::Backoff::default(),
                )
                .await;
                Ok(())
            });
        }
        let metrics = Metrics::new();
        let dialer = Dialer::here();
        let bind = |at: SocketAddr| async move {
            tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| format!("listening on {at}: {e}"))
        };
        if let Some(at) = inbound_at {
            let l = bind(at).await?;
            tasks.spawn(inbound::serve_with(
                l,
                Arc::clone(&creds),
                app,
                authz,
                InboundOptions {
                    mode,
                    opaque_ports: opaque_ports.clone(),
                },
                Arc::new(|_: &PeerId| {}),
                Arc::clone(&metrics),
                dialer.clone(),
            ));
        }
        if let (Some(at), Some(destination)) = (outbound_at, destination) {
            let l = bind(at).await?;
            tasks.spawn(outbound::serve(
                l,
                Arc::clone(&creds),
                destination,
                Arc::clone(&metrics),
                dialer.clone(),
            ));
        }
        if let Some(at) = admin_at {
            let l = bind(at).await?;
            let config = ProxyConfig {
                inbound: inbound_at,
                outbound: outbound_at,
                application: match app {
                    AppTarget::Fixed(a) => Some(a),
                    AppTarget::OriginalPort => None,
                },
                mode: mode.to_string(),
            };
            let (creds, metrics) = (Arc::clone(&creds), Arc::clone(&metrics));
            tasks.spawn(async move {
                admin::serve(l, creds, metrics, config).await;
                Ok(())
            });
        }
        tracing::info!(identity = %creds.tls().id(), "fairlead-proxy serving");
        match tasks.join_next().await {
            Some(Ok(Err(e))) => Err(format!("a listener failed: {e}")),
            Some(Err(e)) => Err(format!("a listener task ended: {e}")),
            _ => Ok(()),
        }
    })
}

fn spiffe_arg(flag: &str, id: &str) -> Result<PeerId, String> {
    let p = PeerId(id.to_owned());
    if !id.starts_with("spiffe://") || p.trust_domain().is_none_or(str::is_empty) {
        return Err(format!(
            "--{flag} {id:?}: not a SPIFFE ID (spiffe://<trust-domain>/...)"
        ));
    }
    Ok(p)
}
