//! `fairlead`: the one command-line entry point. Today it runs the embedded API
//! server and the sandbox; the agent, DNS and controller subcommands join it as
//! their issues land.

mod flows;
mod sandbox;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fairlead",
    version,
    about = "Fairlead: Kubernetes networking and service mesh in one Rust system"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the embedded Kubernetes API server in the foreground.
    Apiserver {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// Write a kubeconfig for this server here.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Create the objects in these manifests (files or directories) at start.
        #[arg(long = "manifests")]
        manifests: Vec<PathBuf>,
    },
    /// The node agent: routes to other nodes' pods, installs the CNI plugin and
    /// its config, answers the plugin's STATUS. Configured by FAIRLEAD_AGENT_*
    /// variables; talks to the API server of KUBECONFIG or the in-cluster one.
    Agent,
    /// Cluster DNS (Kubernetes DNS spec; forwarding and caching for the rest),
    /// with Prometheus metrics, /health and /ready over HTTP on :9153.
    /// Configured by FAIRLEAD_DNS_* variables; talks to the API server of
    /// KUBECONFIG or the in-cluster one.
    Dns,
    /// Flow events (NetworkPolicy verdicts) from the agents: of a sandbox, or of the agent
    /// sockets given.
    Flows(flows::FlowsArgs),
    /// The local sandbox cluster.
    Sandbox {
        #[command(subcommand)]
        cmd: sandbox::SandboxCmd,
    },
}

/// `default` is the level when FAIRLEAD_LOG is unset: servers log at info,
/// one-shot commands only warn.
fn init_logging(default: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("FAIRLEAD_LOG") {
        Ok(v) => EnvFilter::try_new(&v).with_context(|| format!("FAIRLEAD_LOG={v:?} is not a valid filter (EnvFilter syntax, e.g. info,fairlead_apiserver=debug)"))?,
        Err(_) => EnvFilter::new(default),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("FAIRLEAD_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        Ok("plain") | Err(_) => builder.init(),
        Ok(other) => anyhow::bail!("FAIRLEAD_LOG_FORMAT={other:?} is not valid: use json or plain"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message chain only: a backtrace says nothing a user can act on.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet = matches!(&cli.cmd, Cmd::Flows(_))
        || matches!(&cli.cmd, Cmd::Sandbox { cmd } if !matches!(cmd, sandbox::SandboxCmd::Serve { .. }));
    init_logging(if quiet { "warn" } else { "info" })?;
    match cli.cmd {
        Cmd::Apiserver {
            listen,
            kubeconfig,
            manifests,
        } => {
            let server = fairlead_apiserver::ApiServer::start(listen, Default::default())
                .await
                .with_context(|| {
                    format!("cannot listen on {listen}: pick a free address with --listen")
                })?;
            if let Some(path) = kubeconfig {
                std::fs::write(&path, server.kubeconfig())
                    .with_context(|| format!("cannot write kubeconfig {}", path.display()))?;
            }
            for m in &manifests {
                for (obj, result) in server.apply_manifests(m)? {
                    match result {
                        Ok(()) => println!("created {obj}"),
                        Err(e) => println!("rejected {obj}: {e}"),
                    }
                }
            }
            println!("API server at {}", server.url());
            sandbox::wait_for_signal().await?;
            server.shutdown().await;
            Ok(())
        }
        Cmd::Sandbox { cmd } => sandbox::run(cmd).await,
        Cmd::Flows(args) => {
            let state = sandbox::state_dir(args.sandbox());
            flows::run(args, state).await
        }
        Cmd::Dns => {
            let config = fairlead_dns::Config::from_env()?;
            let admin = config.admin_listen;
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the API server: set KUBECONFIG, or run in a pod with a ServiceAccount")?;
            // DNS runs its own watchers (Services, EndpointSlices; Pods only with
            // FAIRLEAD_DNS_PODS=verified) into compact DNS data, not the shared snapshot.
            let mut server = fairlead_dns::Server::bind_api(config, client).await?;
            // Metrics, /health and /ready (FAIRLEAD_DNS_ADMIN_LISTEN, default :9153; off disables).
            if let Some(addr) = admin {
                server.start_admin(addr).await?;
            }
            tracing::info!(udp = %server.udp_addr(), tcp = %server.tcp_addr(), admin = ?server.admin_addr(), "cluster DNS serving");
            sandbox::wait_for_signal().await?;
            drop(server);
            Ok(())
        }
        Cmd::Agent => {
            let config = fairlead_agent::AgentConfig::from_env()?;
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the API server: set KUBECONFIG, or run in a pod with a ServiceAccount")?;
            let cluster = fairlead_core::watch::spawn(client)?;
            let rx = cluster.subscribe();
            // With FAIRLEAD_AGENT_MESH_CA_URL set, the agent also serves its node's sidecars
            // (certificates from the controller's CA, routes from the snapshot).
            fairlead_agent::Agent::run(config, rx, async {
                let _ = sandbox::wait_for_signal().await;
            })
            .await?;
            // The watchers run as long as `cluster` lives, which is until here.
            drop(cluster);
            Ok(())
        }
    }
}
