//! The kubelet's networking part, for one sandbox node: each Pod bound to the
//! node becomes a network namespace wired by the real `fairlead-cni` binary,
//! exec'd inside the node's namespace with the CNI environment and the network
//! config from the node's conflist on stdin, exactly as a container runtime
//! does it; then the built-in workload starts and the Pod's status (IPs,
//! phase, Ready) is written back through the API. Pods that go away are torn
//! down with CNI DEL.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use fairlead_core::Snapshot;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use crate::netns;
use crate::workload::{self, Identity, Workload};

pub const CONFLIST: &str = "10-fairlead.conflist";
pub const POD_IFNAME: &str = "eth0";

/// Where a node's runtime finds its CNI plugin and config.
#[derive(Debug, Clone)]
pub struct CniDirs {
    pub bin: PathBuf,
    pub conf: PathBuf,
}

struct RunningPod {
    netns: String,
    namespace: String,
    name: String,
    _workload: Workload,
    _sidecar: Option<crate::mesh::Sidecar>,
}

pub struct Kubelet {
    pub node: String,
    pub node_netns: String,
    pub node_ip: String,
    pub prefix: String,
    pub cni: CniDirs,
    client: kube::Client,
    running: HashMap<String, RunningPod>,
    /// Pods whose set-up failed, with the error, retried on the next sync.
    pub failures: HashMap<String, String>,
    /// The agent's status socket; the Node is Ready when the agent says so.
    agent_socket: PathBuf,
    node_ready: Option<bool>,
    /// The node's cgroup; each pod gets a child named like its namespace.
    pub cgroup: Option<PathBuf>,
    /// The mesh (CA), for pods that ask for a sidecar.
    pub mesh: Option<std::sync::Arc<crate::mesh::Mesh>>,
    /// Whether pods labelled `k8s-app: kube-dns` run the cluster DNS (watching the API
    /// server through `client`).
    pub dns: bool,
}

/// What a pod's spec asks the kubelet to run.
struct Declared {
    /// The cluster DNS instead of the echo workload.
    dns: bool,
    /// Container ports: each gets an echo server.
    ports: Vec<(u16, fairlead_core::Protocol)>,
    /// The pod, when it asked for a mesh sidecar.
    sidecar: Option<std::sync::Arc<fairlead_core::Pod>>,
    /// The pod's annotations, passed to the CNI plugin as containerd does (the
    /// `io.kubernetes.cri.pod-annotations` capability).
    annotations: std::collections::BTreeMap<String, String>,
}

/// The namespace a sandbox pod lives in.
pub fn pod_netns(prefix: &str, namespace: &str, pod: &str) -> String {
    format!("{prefix}pod-{namespace}-{pod}")
}

#[derive(Debug, thiserror::Error)]
pub enum CniCallError {
    #[error("the node has no CNI config yet ({0} is missing): its agent is not ready")]
    NotReady(String),
    #[error("cannot read the CNI config {path}: {message}")]
    Config { path: String, message: String },
    #[error("cannot run the CNI plugin {path}: {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("CNI {verb} failed (exit {status}): {output}")]
    Failed {
        verb: String,
        status: String,
        output: String,
    },
}

impl Kubelet {
    pub fn new(
        node: &str,
        node_netns: &str,
        node_ip: &str,
        prefix: &str,
        cni: CniDirs,
        agent_socket: PathBuf,
        client: kube::Client,
    ) -> Self {
        Self {
            node: node.to_string(),
            node_netns: node_netns.to_string(),
            node_ip: node_ip.to_string(),
            prefix: prefix.to_string(),
            cni,
            client,
            running: HashMap::new(),
            failures: HashMap::new(),
            agent_socket,
            node_ready: None,
            cgroup: None,
            dns: false,
            mesh: None,
        }
    }

    /// True once the Node is Ready (its agent answered READY).
    pub fn node_ready(&self) -> bool {
        self.node_ready == Some(true)
    }

    /// The kubelet's node heartbeat, reduced to readiness: the Node's Ready
    /// condition follows the agent's status socket.
    async fn sync_node(&mut self) {
        let answer = fairlead_agent::status::query(&self.agent_socket)
            .await
            .unwrap_or_else(|e| format!("NOTREADY agent not answering: {e}"));
        let ready = answer.trim() == "READY";
        if self.node_ready == Some(ready) {
            return;
        }
        let now = chrono_now();
        let (status, reason, message) = if ready {
            (
                "True",
                "FairleadAgentReady",
                "the agent routes pods and has installed the CNI config".to_string(),
            )
        } else {
            ("False", "FairleadAgentNotReady", answer.trim().to_string())
        };
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": reason, "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
        match nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.node_ready = Some(ready),
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "cannot update the Node's Ready condition")
            }
        }
    }

    /// The network config for the first plugin of the conflist, as libcni
    /// builds it: the plugin's object plus the list's name and cniVersion.
    fn net_conf(&self) -> Result<(Value, String), CniCallError> {
        let path = self.cni.conf.join(CONFLIST);
        let shown = path.display().to_string();
        if !path.exists() {
            return Err(CniCallError::NotReady(shown));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CniCallError::Config {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let list: Value = serde_json::from_str(&text).map_err(|e| CniCallError::Config {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let mut conf = list["plugins"]
            .get(0)
            .cloned()
            .ok_or_else(|| CniCallError::Config {
                path: shown.clone(),
                message: "no plugins".into(),
            })?;
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        let plugin = conf["type"].as_str().unwrap_or("fairlead-cni").to_string();
        Ok((conf, plugin))
    }

    /// Runs the plugin for `verb` inside the node's namespace.
    fn cni(
        &self,
        verb: &str,
        container_id: &str,
        pod_ns_path: &str,
        namespace: &str,
        pod: &str,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<Value, CniCallError> {
        let (mut conf, plugin) = self.net_conf()?;
        // What containerd's CRI plugin does for a plugin that declares the capability.
        if conf["capabilities"]["io.kubernetes.cri.pod-annotations"] == json!(true) {
            conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotations});
        }
        let bin = self.cni.bin.join(&plugin);
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns::path(&self.node_netns).display()))
            .arg("--")
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", pod_ns_path)
            .env("CNI_IFNAME", POD_IFNAME)
            .env("CNI_PATH", &self.cni.bin)
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CniCallError::Spawn { path: bin.display().to_string(), source })?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.to_string().as_bytes())
            .map_err(|source| CniCallError::Spawn {
                path: bin.display().to_string(),
                source,
            })?;
        let out = child
            .wait_with_output()
            .map_err(|source| CniCallError::Spawn {
                path: bin.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(CniCallError::Failed {
                verb: verb.to_string(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_string(),
            });
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    /// Brings the node's pods in line with the snapshot.
    /// The node agent's TCP address for sidecars (the node's address, as `status.hostIP`).
    fn agent_mesh_addr(&self) -> Result<std::net::SocketAddr, crate::Error> {
        let ip: std::net::IpAddr = self.node_ip.parse().map_err(|_| crate::Error::Workload {
            pod: String::new(),
            source: std::io::Error::other(format!("node address {:?}", self.node_ip)),
        })?;
        Ok(std::net::SocketAddr::new(
            ip,
            fairlead_netns::mesh::AGENT_MESH_PORT,
        ))
    }

    pub async fn sync(&mut self, snap: &Snapshot) {
        self.sync_node().await;
        let wanted: HashMap<String, (String, String, Declared)> = snap
            .pods()
            .values()
            .filter(|p| {
                p.node_name.as_deref() == Some(self.node.as_str())
                    && !p.terminating
                    && !p.host_network
            })
            .map(|p| {
                let dns = p.labels.get(workload::DNS_LABEL.0).map(String::as_str)
                    == Some(workload::DNS_LABEL.1);
                let ports = p.ports.iter().map(|c| (c.port, c.protocol)).collect();
                (
                    p.uid.clone(),
                    (
                        p.namespace.clone(),
                        p.name.clone(),
                        Declared {
                            dns,
                            ports,
                            sidecar: crate::mesh::injected(p).then(|| std::sync::Arc::clone(p)),
                            annotations: p.annotations.clone().into_iter().collect(),
                        },
                    ),
                )
            })
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(p) = self.running.remove(&uid) {
                self.teardown(&uid, p);
            }
        }
        self.failures.retain(|uid, _| wanted.contains_key(uid));
        for (uid, (namespace, name, declared)) in wanted {
            if self.running.contains_key(&uid) {
                continue;
            }
            match self.setup(&uid, &namespace, &name, &declared).await {
                Ok(p) => {
                    self.failures.remove(&uid);
                    self.running.insert(uid, p);
                }
                Err(e) => {
                    tracing::warn!(node = %self.node, pod = %format!("{namespace}/{name}"), error = %e, "pod set-up failed; will retry");
                    self.failures.insert(uid, e.to_string());
                }
            }
        }
    }

    async fn setup(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        declared: &Declared,
    ) -> Result<RunningPod, crate::Error> {
        let ns = pod_netns(&self.prefix, namespace, name);
        netns::create(&ns)?;
        // The pod's resolv.conf, used by `ip netns exec` (and so `sandbox exec`).
        let etc = PathBuf::from(format!("/etc/netns/{ns}"));
        let _ = std::fs::create_dir_all(&etc);
        let _ = std::fs::write(etc.join("resolv.conf"), format!("nameserver {}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n", crate::cluster::DNS_SERVICE_IP));
        if let Some(cg) = &self.cgroup {
            let _ = std::fs::create_dir_all(cg.join(&ns));
        }
        let ns_path = netns::path(&ns).display().to_string();
        let result = match self.cni("ADD", uid, &ns_path, namespace, name, &declared.annotations) {
            Ok(r) => r,
            Err(e) => {
                let _ = netns::delete(&ns);
                let _ = std::fs::remove_dir_all(&etc);
                return Err(e.into());
            }
        };
        let ips: Vec<String> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next().map(String::from))
            .collect();
        let id = Identity {
            namespace: namespace.into(),
            pod: name.into(),
            node: self.node.clone(),
        };
        // The sidecar first, as a native sidecar starts before the app: the CNI plugin has
        // already pointed the pod's TCP at it.
        let sidecar = match (&self.mesh, &declared.sidecar) {
            (Some(mesh), Some(pod)) => Some(
                mesh.start_sidecar(&ns, pod, self.agent_mesh_addr()?)
                    .await
                    .map_err(|e| crate::Error::Workload {
                        pod: name.into(),
                        source: std::io::Error::other(format!("sidecar: {e:#}")),
                    })?,
            ),
            _ => None,
        };
        let workload = match (self.dns, declared.dns) {
            (true, true) => workload::start_dns(&ns, id, self.client.clone()).await?,
            _ => workload::start(&ns, id, &declared.ports)?,
        };
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), namespace);
        let now = chrono_now();
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.node_ip,
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        tracing::info!(node = %self.node, pod = %format!("{namespace}/{name}"), ips = ?ips, "pod running");
        Ok(RunningPod {
            netns: ns,
            namespace: namespace.into(),
            name: name.into(),
            _workload: workload,
            _sidecar: sidecar,
        })
    }

    fn teardown(&self, uid: &str, p: RunningPod) {
        let ns_path = netns::path(&p.netns).display().to_string();
        drop(p._workload);
        if let Err(e) = self.cni(
            "DEL",
            uid,
            &ns_path,
            &p.namespace,
            &p.name,
            &Default::default(),
        ) {
            tracing::warn!(node = %self.node, pod = %format!("{}/{}", p.namespace, p.name), error = %e, "CNI DEL failed");
        }
        let _ = netns::delete(&p.netns);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", p.netns));
        if let Some(cg) = &self.cgroup {
            crate::cgroup::remove_dir(&cg.join(&p.netns));
        }
    }

    /// Tears down every pod (sandbox down).
    pub fn shutdown(&mut self) {
        for (uid, p) in std::mem::take(&mut self.running) {
            self.teardown(&uid, p);
        }
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
