//! `Sandbox`: the whole local cluster in one process. `up` makes the
//! machines, starts the API server, registers the Nodes, and runs one control
//! loop over the snapshot watch that plays scheduler, kubelets and the
//! EndpointSlice controller; the agents run beside it, one per node.
//! `down` undoes all of it, and `sweep` removes what a crashed run left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_core::Snapshot;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Mutex;

use crate::endpoints::Reconciler;
use crate::kubelet::{CniDirs, Kubelet};
use crate::topology::{NodeSpec, Topology};

pub use fairlead_agent::RoutingMode;

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub name: String,
    pub nodes: usize,
    pub routing: RoutingMode,
    /// Where the sandbox keeps its files (kubeconfig, per-node CNI dirs, IPAM).
    pub state_dir: PathBuf,
    /// The `fairlead-cni` binary the agents install onto each node.
    pub cni_plugin: PathBuf,
    /// The `fairlead-proxy` binary, run as the sidecar of meshed pods (needed only when a
    /// pod asks for the mesh).
    pub proxy: PathBuf,
    /// Lifetime of the mesh certificates the sandbox's CA issues (24 h when `None`; tests
    /// shorten it to see rotations).
    pub mesh_cert_ttl: Option<Duration>,
    /// Service backends chosen by Maglev consistent hashing instead of at random.
    pub maglev: bool,
}

pub struct Sandbox {
    pub config: SandboxConfig,
    pub api: ApiServer,
    pub topology: Topology,
    pub client: kube::Client,
    cluster: fairlead_core::watch::SnapshotWatch,
    kubelets: Arc<Mutex<Vec<Kubelet>>>,
    agents: Vec<crate::agents::AgentHandle>,
    mesh: Arc<crate::mesh::Mesh>,
    control: tokio::task::JoinHandle<()>,
}

/// What `status` reports per pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ips: Vec<String>,
    pub phase: String,
}

impl Sandbox {
    /// The agent's status socket of a node.
    pub fn agent_socket(state_dir: &Path, node: &str) -> PathBuf {
        state_dir
            .join("nodes")
            .join(node)
            .join("run/fairlead/agent.sock")
    }

    pub fn node_dirs(state_dir: &Path, node: &str) -> CniDirs {
        let base = state_dir.join("nodes").join(node);
        CniDirs {
            bin: base.join("opt/cni/bin"),
            conf: base.join("etc/cni/net.d"),
        }
    }

    /// Brings the sandbox up. On failure, everything made so far is removed.
    pub async fn up(config: SandboxConfig) -> anyhow::Result<Sandbox> {
        sweep(&config.name);
        let topology = Topology::plan(&config.name, config.nodes);
        topology.create()?;
        match Self::start(config, topology).await {
            Ok(s) => Ok(s),
            Err((e, topology)) => {
                topology.destroy();
                Err(e)
            }
        }
    }

    async fn start(
        config: SandboxConfig,
        topology: Topology,
    ) -> Result<Sandbox, (anyhow::Error, Topology)> {
        macro_rules! tryf {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err((anyhow::Error::from(e), topology)),
                }
            };
        }
        let api = tryf!(
            ApiServer::start(
                "127.0.0.1:0".parse().expect("literal"),
                ServerConfig {
                    bookmark_interval: Duration::from_secs(2),
                    ..Default::default()
                }
            )
            .await
        );
        for n in &topology.nodes {
            tryf!(api.create(n.manifest()));
        }
        // Cluster DNS, as a cluster has it: the kube-dns Service at 10.96.0.10 (where every
        // pod's resolv.conf points) in front of a DNS pod the kubelet runs `fairlead dns` in.
        for obj in dns_objects(&topology) {
            tryf!(api.create(obj));
        }
        let client = tryf!(kube::Client::try_from(kube::Config::new(tryf!(api
            .url()
            .parse::<http::Uri>(
        )))));
        let mut cluster = tryf!(fairlead_core::watch::spawn(client.clone()));
        tryf!(cluster.ready().await);

        let mesh = tryf!(
            crate::mesh::Mesh::start(
                client.clone(),
                cluster.subscribe(),
                config.proxy.clone(),
                config.state_dir.join("mesh"),
                config.mesh_cert_ttl,
            )
            .await
        );
        let mut agents = Vec::new();
        for n in &topology.nodes {
            let dirs = Self::node_dirs(&config.state_dir, &n.name);
            agents.push(tryf!(crate::agents::start(
                n,
                &config,
                &dirs,
                cluster.subscribe(),
                client.clone(),
                mesh.agent_settings(),
            )));
        }
        let kubelets: Vec<Kubelet> = topology
            .nodes
            .iter()
            .map(|n| {
                let mut k = Kubelet::new(
                    &n.name,
                    &n.netns,
                    &n.underlay_v4.to_string(),
                    &topology.prefix,
                    Self::node_dirs(&config.state_dir, &n.name),
                    Self::agent_socket(&config.state_dir, &n.name),
                    client.clone(),
                );
                k.cgroup = crate::cgroup::node_dir(&config.name, &n.name);
                k.dns = true;
                k.mesh = Some(mesh.clone());
                k
            })
            .collect();
        let kubelets = Arc::new(Mutex::new(kubelets));
        let control = tokio::spawn(control_loop(
            client.clone(),
            cluster.subscribe(),
            kubelets.clone(),
            topology.nodes.clone(),
        ));
        Ok(Sandbox {
            config,
            api,
            topology,
            client,
            cluster,
            kubelets,
            agents,
            mesh,
            control,
        })
    }

    /// Creates the objects of a manifest file or directory; one bad object is
    /// reported and the others still go in.
    pub fn apply(&self, path: &Path) -> anyhow::Result<Vec<fairlead_apiserver::Applied>> {
        Ok(self.api.apply_manifests(path)?)
    }

    /// The sandbox's mesh (its CA and sidecars).
    pub fn mesh(&self) -> &Arc<crate::mesh::Mesh> {
        &self.mesh
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cluster.current()
    }

    /// Waits (bounded) until at least `expect` pods exist and every pod is
    /// Running and Ready with its IPs, or says which are not and why.
    pub async fn wait_for_pods(
        &self,
        expect: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<PodReport>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.cluster.subscribe();
        loop {
            let snap = rx.borrow_and_update().clone();
            let pending: Vec<String> = snap
                .pods()
                .values()
                .filter(|p| p.ips.is_empty() || !p.ready)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            if pending.is_empty() && snap.pods().len() >= expect {
                return Ok(pod_reports(&snap));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let mut why = Vec::new();
                for k in self.kubelets.lock().await.iter() {
                    why.extend(k.failures.values().cloned());
                }
                anyhow::bail!(
                    "pods not running after {timeout:?} ({} of {expect} seen): {}; last errors: {}",
                    snap.pods().len(),
                    pending.join(", "),
                    if why.is_empty() {
                        "none".into()
                    } else {
                        why.join("; ")
                    }
                );
            }
        }
    }

    /// Stops a node's agent and starts a new one, as a DaemonSet rollout does. Traffic keeps
    /// flowing meanwhile: the datapath is pinned and the new agent adopts it.
    pub async fn restart_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .ok_or_else(|| anyhow::anyhow!("no agent for node {node}"))?;
        let old = self.agents.remove(i);
        old.stop().await;
        let spec = self
            .topology
            .nodes
            .iter()
            .find(|n| n.name == node)
            .expect("agents exist only for nodes");
        let dirs = Self::node_dirs(&self.config.state_dir, node);
        let handle = crate::agents::start(
            spec,
            &self.config,
            &dirs,
            self.cluster.subscribe(),
            self.client.clone(),
            self.mesh.agent_settings(),
        )?;
        self.agents.insert(i, handle);
        Ok(())
    }

    /// Stops everything and removes every namespace and file it made.
    pub async fn down(self) {
        self.control.abort();
        let _ = self.control.await;
        for k in self.kubelets.lock().await.iter_mut() {
            k.shutdown();
        }
        for a in self.agents {
            a.stop().await;
        }
        self.api.shutdown().await;
        self.topology.destroy();
        crate::agents::remove_lb_pins(&self.config.name);
        crate::cgroup::remove(&self.config.name);
        let _ = std::fs::remove_dir_all(self.config.state_dir.join("nodes"));
    }
}

/// The kube-dns Service and its one pod (on the first node).
fn dns_objects(topology: &Topology) -> Vec<serde_json::Value> {
    let (key, value) = crate::workload::DNS_LABEL;
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {key: value}},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": {key: value},
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "fairlead-dns", "namespace": "kube-system", "labels": {key: value}},
            "spec": {
                "nodeName": topology.nodes[0].name,
                "containers": [{"name": "dns", "image": "fairlead/dns",
                    "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                              {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}]}],
            },
        }),
    ]
}

/// Where pods' resolv.conf sends queries.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";

pub fn pod_reports(snap: &Snapshot) -> Vec<PodReport> {
    snap.pods()
        .values()
        .map(|p| PodReport {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: p.node_name.clone(),
            ips: p.ips.iter().map(|i| i.to_string()).collect(),
            phase: format!("{:?}", p.phase),
        })
        .collect()
}

/// Removes what a crashed sandbox of this name left: its namespaces (the
/// prefix names them all), its agents' eBPF pins and its cgroups.
pub fn sweep(name: &str) {
    crate::topology::destroy_prefix(&Topology::prefix(name));
    crate::agents::remove_lb_pins(name);
    crate::cgroup::remove(name);
}

/// Scheduler, kubelets and EndpointSlice controller, driven by snapshots.
/// Set-up failures (a node whose agent is not ready yet) are retried on a
/// short timer as well as on the next change.
async fn control_loop(
    client: kube::Client,
    mut rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    kubelets: Arc<Mutex<Vec<Kubelet>>>,
    nodes: Vec<NodeSpec>,
) {
    let mut endpoints = Reconciler::new(client.clone());
    let mut next_node = 0usize;
    loop {
        let snap = rx.borrow_and_update().clone();
        // Scheduler: bind pods that name no node, round-robin.
        for p in snap.pods().values().filter(|p| p.node_name.is_none()) {
            let node = &nodes[next_node % nodes.len()].name;
            next_node += 1;
            let pods: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(client.clone(), &p.namespace);
            if let Err(e) = pods
                .patch(
                    &p.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"nodeName": node}})),
                )
                .await
            {
                tracing::warn!(pod = %format!("{}/{}", p.namespace, p.name), error = %e, "cannot bind pod");
            }
        }
        let mut retry = false;
        for k in kubelets.lock().await.iter_mut() {
            k.sync(&snap).await;
            retry |= !k.failures.is_empty() || !k.node_ready();
        }
        if let Err(e) = endpoints.reconcile(&snap).await {
            tracing::warn!(error = %e, "EndpointSlice update failed; will retry");
            retry = true;
        }
        if retry {
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        } else if rx.changed().await.is_err() {
            return;
        }
    }
}
