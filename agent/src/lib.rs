//! `fairlead agent`, the per-node agent (a DaemonSet pod on a real cluster, one task per node
//! namespace in the sandbox): it makes its node able to carry pod traffic.
//!
//! Data flow: API server -> `fairlead_core::watch` -> `watch<Arc<Snapshot>>` -> [`Agent::run`],
//! which, whenever the Nodes change, finds its own Node (its podCIDRs), installs the CNI plugin
//! and its config ([`cni_install`]), and routes to every other node's pod CIDRs
//! ([`routes::NodeNetwork`], native or VXLAN) inside the node's network namespace. Its
//! [`status`] socket tells the CNI plugin's STATUS verb when the node is ready for pods, and
//! takes the veths that the plugin's DEL has tombstoned, which its [`reaper`] deletes in the
//! background (a veth delete waits ~20 ms in the kernel, too long for DEL).
//! Every change is made in the namespace given in [`AgentConfig::netns`], never in the one the
//! agent happens to run in.

pub mod cni_install;
pub mod config;
pub mod datapath;
pub mod flows;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod policy;
pub mod reaper;
pub mod routes;
pub mod services;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fairlead_core::{Node, Snapshot};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

pub use cni_install::{CniInstallError, Conflist};
pub use config::{AgentConfig, ConfigError};
pub use datapath::{Datapath, DatapathError};
pub use netns::{NetnsError, RootNetns};
pub use reaper::{LinkReaper, ReaperError};
pub use routes::{ApplyReport, NodeNetwork, NodeNetworkError, RoutingMode};
pub use services::LbSettings;
pub use status::{Readiness, StatusError, StatusServer};

/// First wait after a failed sync; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long a stopping agent lets the link reaper finish its queue (~60 links a second here).
const REAPER_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Status(#[from] StatusError),

    #[error(transparent)]
    Network(#[from] NodeNetworkError),

    #[error(transparent)]
    Reaper(#[from] ReaperError),

    #[error(transparent)]
    Datapath(#[from] DatapathError),

    #[error(
        "the cluster snapshot source closed; the watcher stopped, so the agent stops too \
         (restart it)"
    )]
    SnapshotsClosed,

    #[error("cannot serve the node's sidecars on {addr} (FAIRLEAD_AGENT_MESH_LISTEN): {source}")]
    MeshListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// One failed attempt to bring the node in line with a snapshot; retried with backoff.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Network(#[from] NodeNetworkError),
    #[error(transparent)]
    Install(#[from] CniInstallError),
    #[error("installing the CNI plugin stopped unexpectedly: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The node agent. See the crate docs.
pub struct Agent {
    config: AgentConfig,
    network: NodeNetwork,
    readiness: watch::Sender<Readiness>,
    /// The config last written, so it is rewritten only when it would change.
    installed: Option<Conflist>,
    /// Service load balancing, when configured.
    datapath: Option<Datapath>,
}

impl Agent {
    /// Runs the agent until `shutdown` completes: serves the status socket, and brings the
    /// node in line with every ready snapshot whose Nodes changed (retrying failures with
    /// backoff). On shutdown, removes the CNI config if the config asks for that.
    ///
    /// Fails at once on what retrying cannot fix (the status socket cannot be bound, the
    /// namespace cannot be opened).
    pub async fn run(
        config: AgentConfig,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        Self::run_with_client(config, snapshots, shutdown, None).await
    }

    /// [`Agent::run`], with an API client for Events (a Service the load balancer skips gets a
    /// Warning Event, as well as a log line).
    pub async fn run_with_client(
        config: AgentConfig,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: impl Future<Output = ()>,
        client: Option<kube::Client>,
    ) -> Result<(), AgentError> {
        Self::run_with_mesh(config, snapshots, shutdown, client, None).await
    }

    /// [`Agent::run_with_client`], also serving the node's mesh sidecars (`MESH-CERT` through
    /// `mesh`'s CA, `MESH-ROUTES` from the snapshots).
    pub async fn run_with_mesh(
        config: AgentConfig,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: impl Future<Output = ()>,
        client: Option<kube::Client>,
        mesh: Option<mesh::MeshSettings>,
    ) -> Result<(), AgentError> {
        let span = info_span!("agent", node = %config.node_name);
        Self::run_inner(config, snapshots, shutdown, client, mesh)
            .instrument(span)
            .await
    }

    async fn run_inner(
        config: AgentConfig,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: impl Future<Output = ()>,
        client: Option<kube::Client>,
        mesh: Option<mesh::MeshSettings>,
    ) -> Result<(), AgentError> {
        let (readiness, readiness_rx) = watch::channel(Readiness::not_ready(
            "waiting for the first cluster snapshot",
        ));
        // Started before the socket answers, so the first DELLINK already finds it. It ends
        // when the server and this handle are gone, after finishing its queue.
        let reaper = {
            let (netns, root) = (config.netns.clone(), config.root_netns);
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || span.in_scope(|| LinkReaper::start(&netns, root)))
                .await
                .expect("starting the link reaper does not panic")?
        };
        // Loaded before the socket answers, so the first ATTACH finds it.
        let datapath = match &config.service_lb {
            Some(settings) => Some(
                Datapath::start(
                    settings.clone(),
                    &config.netns,
                    &config.underlay_ifname,
                    &config.node_name,
                    client,
                )
                .await?,
            ),
            None => None,
        };
        // The sidecars' TCP side, bound before the socket so a failure leaves nothing behind.
        let mesh_listener = match config.mesh_listen {
            Some(addr) if mesh.is_some() || config.mesh_ca.is_some() => Some((
                addr,
                http::bind_in(&config.netns, addr)
                    .map_err(|source| AgentError::MeshListen { addr, source })?,
            )),
            Some(addr) => {
                warn!(%addr, "FAIRLEAD_AGENT_MESH_LISTEN is set, but this agent serves no mesh (FAIRLEAD_AGENT_MESH_CA_URL is not set): not listening");
                None
            }
            None => None,
        };
        let mut server =
            StatusServer::bind(&config.socket, readiness_rx)?.with_reaper(reaper.clone());
        if let Some(dp) = &datapath {
            server = server.with_datapath(dp.clone());
        }
        // From the configuration (the controller's CA) unless the caller brought its own.
        let mesh = mesh.or_else(|| config.mesh_ca.as_ref().map(mesh::MeshSettings::from_config));
        let mut mesh_tcp = None;
        let (stop_mesh_tcp, mesh_tcp_stopped) = oneshot::channel::<()>();
        if let Some(m) = mesh {
            let service = mesh::MeshService {
                issuer: m.issuer,
                snapshots: snapshots.clone(),
                trust_domain: m.trust_domain,
            };
            if let Some((addr, listener)) = mesh_listener {
                info!(%addr, "serving the node's sidecars over TCP too");
                mesh_tcp = Some(tokio::spawn(
                    mesh::serve_tcp(
                        listener,
                        service.clone(),
                        config.node_name.clone(),
                        async move {
                            let _ = mesh_tcp_stopped.await;
                        },
                    )
                    .in_current_span(),
                ));
            }
            server = server.with_mesh(service);
        }
        let metrics = match (&datapath, config.metrics_listen) {
            (Some(dp), Some(addr)) => {
                let (netns, dp) = (config.netns.clone(), dp.clone());
                Some(tokio::spawn(
                    async move {
                        if let Err(e) = http::serve(&netns, addr, dp).await {
                            warn!(%addr, error = %e, "the metrics endpoint could not start");
                        }
                    }
                    .in_current_span(),
                ))
            }
            _ => None,
        };
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            server
                .serve(async move {
                    let _ = server_stopped.await;
                })
                .in_current_span(),
        );

        let result = async {
            let network = NodeNetwork::new(
                &config.netns,
                &config.underlay_ifname,
                config.mode,
                config.root_netns,
            )
            .await?;
            info!(netns = %config.netns.display(), mode = ?config.mode, "agent started");
            let mut agent = Agent {
                config: config.clone(),
                network,
                readiness,
                installed: None,
                datapath,
            };
            agent.event_loop(&mut snapshots, shutdown).await
        }
        .await;

        if config.uninstall_cni_on_shutdown {
            match cni_install::uninstall(&config.cni_conf_dir) {
                Ok(removed) => info!(removed, "CNI config uninstalled on shutdown"),
                Err(e) => warn!(error = %e, "could not uninstall the CNI config"),
            }
        }
        let _ = stop_server.send(());
        let _ = server.await;
        let _ = stop_mesh_tcp.send(());
        if let Some(t) = mesh_tcp {
            let _ = t.await;
        }
        if let Some(m) = metrics {
            m.abort();
        }
        // What is still queued would otherwise wait for the next agent's start-up sweep.
        if !reaper.idle(REAPER_DRAIN).await {
            warn!(
                pending = reaper.pending(),
                "stopping with tombstoned pod veths still queued; the next agent deletes them"
            );
        }
        result
    }

    async fn event_loop(
        &mut self,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let mut shutdown = std::pin::pin!(shutdown);
        // The snapshot last brought in line; a newer one with the same Nodes needs nothing.
        let mut applied: Option<Arc<Snapshot>> = None;
        // The snapshot whose Services are in the maps (None: program all).
        let mut lb_applied: Option<Arc<Snapshot>> = None;
        let mut retry: Option<(Instant, Duration)> = None;
        let mut housekeeping = tokio::time::interval(datapath::HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = Arc::clone(&snapshots.borrow_and_update());
            if let (true, Some(dp)) = (snapshot.ready, &self.datapath) {
                // Services first: a pod that starts once routes exist finds them balanced.
                match dp.sync(lb_applied.clone(), Arc::clone(&snapshot)).await {
                    Ok(_) => lb_applied = Some(Arc::clone(&snapshot)),
                    // The next snapshot's diff from the last good one covers these again.
                    Err(e) => warn!(error = %e, "could not program Services"),
                }
            }
            let nodes_changed = match &applied {
                Some(old) => !Snapshot::diff(old, &snapshot).nodes.is_empty(),
                None => true,
            };
            let retry_due = retry.is_some_and(|(at, _)| Instant::now() >= at);
            if snapshot.ready && (nodes_changed || retry_due) {
                match self.sync(&snapshot).await {
                    Ok(()) => {
                        applied = Some(snapshot);
                        retry = None;
                    }
                    Err(e) => {
                        let wait = match retry {
                            None => FIRST_RETRY,
                            Some((_, last)) => (last * 2).min(MAX_RETRY),
                        };
                        warn!(error = %e, retry_in = ?wait, "could not bring the node in line");
                        self.readiness
                            .send_replace(Readiness::not_ready(e.to_string()));
                        retry = Some((Instant::now() + wait, wait));
                    }
                }
            }
            let retry_at = retry.map(|(at, _)| at);
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Err(AgentError::SnapshotsClosed);
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
                _ = housekeeping.tick(), if self.datapath.is_some() => {
                    if let Some(dp) = &self.datapath {
                        dp.housekeeping().await;
                    }
                }
            }
        }
    }

    /// Brings the node in line with one snapshot.
    async fn sync(&mut self, snapshot: &Snapshot) -> Result<(), SyncError> {
        let name = &self.config.node_name;
        let Some(local) = snapshot.node(name) else {
            // Not an error to retry: the next snapshot with Nodes changed comes by itself.
            self.readiness.send_replace(Readiness::not_ready(format!(
                "node {name} is not in the cluster (yet)"
            )));
            return Ok(());
        };
        if local.pod_cidrs.is_empty() {
            self.readiness.send_replace(Readiness::not_ready(format!(
                "node {name} has no podCIDRs yet"
            )));
            return Ok(());
        }

        let mtu = match self.config.mtu {
            Some(mtu) => mtu,
            None => self.network.pod_mtu().await?,
        };
        let mut conflist =
            Conflist::for_node(local, mtu, &self.config.socket, &self.config.ipam_data_dir)?;
        for plugin in &mut conflist.plugins {
            plugin.attach_datapath = self.datapath.is_some();
        }
        if self.installed.as_ref() != Some(&conflist) {
            let (plugin, bin, conf, list) = (
                self.config.cni_plugin.clone(),
                self.config.cni_bin_dir.clone(),
                self.config.cni_conf_dir.clone(),
                conflist.clone(),
            );
            // File copies and fsyncs block; keep them off the runtime's threads.
            tokio::task::spawn_blocking(move || cni_install::install(&plugin, &bin, &conf, &list))
                .await??;
            info!(
                conf_dir = %self.config.cni_conf_dir.display(),
                mtu,
                "CNI plugin and config installed"
            );
            self.installed = Some(conflist);
        }

        let peers: Vec<Node> = snapshot
            .nodes()
            .values()
            .filter(|n| n.name != *name && !n.pod_cidrs.is_empty() && !n.internal_ips.is_empty())
            .map(|n| Node::clone(n))
            .collect();
        self.network.apply(local, &peers).await?;
        self.readiness.send_replace(Readiness::Ready);
        Ok(())
    }
}
