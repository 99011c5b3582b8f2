//! One `fairlead_agent::Agent` per sandbox node, as tasks of the sandbox
//! process, all fed from the process's one snapshot watch.

use std::sync::Arc;

use fairlead_agent::{Agent, AgentConfig, LbSettings};
use fairlead_core::Snapshot;
use tokio::sync::{oneshot, watch};

use crate::cluster::SandboxConfig;
use crate::kubelet::CniDirs;
use crate::topology::{NodeSpec, UNDERLAY_IF};

/// The load balancer's pin instance of a sandbox node: `/sys/fs/bpf/fairlead-sbx-<sandbox>-<node>`.
pub fn lb_instance(sandbox: &str, node: &str) -> String {
    format!("{}{node}", lb_instance_prefix(sandbox))
}

/// Prefix of every pin instance of one sandbox.
pub fn lb_instance_prefix(sandbox: &str) -> String {
    format!("sbx-{sandbox}-")
}

/// Removes every pinned map and link of this sandbox's agents (all nodes).
pub fn remove_lb_pins(sandbox: &str) {
    let prefix = format!(
        "{}{}",
        fairlead_ebpf::PIN_DIR_PREFIX,
        lb_instance_prefix(sandbox)
    );
    let Ok(entries) = std::fs::read_dir(fairlead_ebpf::BPFFS_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(err) = fairlead_ebpf::lb::remove_pins(&e.path()) {
                tracing::warn!(error = %err, "cannot remove the sandbox's eBPF pins");
            }
        }
    }
}

pub struct AgentHandle {
    pub node: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), fairlead_agent::AgentError>>,
}

impl AgentHandle {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(node = %self.node, error = %e, "agent stopped with an error")
            }
            Err(e) => tracing::warn!(node = %self.node, error = %e, "agent task failed"),
        }
    }
}

pub fn start(
    node: &NodeSpec,
    cfg: &SandboxConfig,
    dirs: &CniDirs,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    client: kube::Client,
    mesh: fairlead_agent::mesh::MeshSettings,
) -> std::io::Result<AgentHandle> {
    let base = cfg.state_dir.join("nodes").join(&node.name);
    std::fs::create_dir_all(&dirs.bin)?;
    std::fs::create_dir_all(&dirs.conf)?;
    let mut config = AgentConfig::new(node.name.clone(), crate::netns::path(&node.netns));
    config.underlay_ifname = UNDERLAY_IF.to_string();
    config.mode = cfg.routing;
    config.cni_plugin = cfg.cni_plugin.clone();
    config.cni_bin_dir = dirs.bin.clone();
    config.cni_conf_dir = dirs.conf.clone();
    config.ipam_data_dir = base.join("var/lib/fairlead/ipam");
    config.socket = crate::cluster::Sandbox::agent_socket(&cfg.state_dir, &node.name);
    config.uninstall_cni_on_shutdown = true;
    let mut lb = LbSettings::new(lb_instance(&cfg.name, &node.name));
    lb.maglev = cfg.maglev;
    // Kept across agent restarts (as on a real node); `down` removes them.
    lb.keep_pins = true;
    lb.pod_cgroup = Some(crate::cgroup::create_node(&cfg.name, &node.name)?);
    config.service_lb = Some(lb);
    // Prometheus at the node's address, as a DaemonSet's hostNetwork pod serves it.
    config.metrics_listen = Some(std::net::SocketAddr::new(
        node.underlay_v4.into(),
        fairlead_agent::http::METRICS_PORT,
    ));
    // The sidecars reach the agent over TCP at the node's address, as injected ones do.
    config.mesh_listen = Some(std::net::SocketAddr::new(
        node.underlay_v4.into(),
        fairlead_netns::mesh::AGENT_MESH_PORT,
    ));
    if let Some(parent) = config.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(Agent::run_with_mesh(
        config,
        snapshots,
        async move {
            let _ = stopped.await;
        },
        Some(client),
        Some(mesh),
    ));
    Ok(AgentHandle {
        node: node.name.clone(),
        stop,
        task,
    })
}
