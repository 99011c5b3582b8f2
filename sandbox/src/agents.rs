//! One `fairlead_agent::Agent` per sandbox node, as tasks of the sandbox
//! process, all fed from the process's one snapshot watch.

use std::sync::Arc;

use fairlead_agent::{Agent, AgentConfig};
use fairlead_core::Snapshot;
use tokio::sync::{oneshot, watch};

use crate::cluster::SandboxConfig;
use crate::kubelet::CniDirs;
use crate::topology::{NodeSpec, UNDERLAY_IF};

pub struct AgentHandle {
    node: String,
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
    if let Some(parent) = config.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(Agent::run(config, snapshots, async move {
        let _ = stopped.await;
    }));
    Ok(AgentHandle {
        node: node.name.clone(),
        stop,
        task,
    })
}
