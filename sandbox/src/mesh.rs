//! The mesh in the sandbox: pods annotated `fairlead.io/inject: "true"` get the real
//! `fairlead-proxy` binary as a sidecar, started by the kubelet inside the pod's namespace
//! before the app, as a runtime starts a native sidecar that the injection webhook added.
//!
//! Everything runs the production path except where the CA sits:
//! - interception: the CNI plugin installs the nftables rules at ADD (the kubelet passes the
//!   pod's annotations as containerd does);
//! - certificates: the proxy makes its own key and sends a CSR with its ServiceAccount token
//!   (from TokenRequest, written where a projected token volume would put it) to its node
//!   agent's socket (`MESH-CERT`); the agent hands it to the mesh CA, a
//!   `fairlead-controller` `CertIssuer` whose root is the Secret `fairlead-system/fairlead-ca`
//!   and which checks the token with TokenReview. On a real cluster the agent reaches the
//!   controller's CA over the network; here the CA lives in the sandbox process;
//! - routes: the proxy follows its agent's `MESH-ROUTES`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead_agent::mesh::{CertReply, CertRequest, MeshIssuer, MeshSettings};
use fairlead_controller::{CertIssuer, IssuerConfig, SpiffeId};
use fairlead_core::{Pod, Snapshot};
use fairlead_proxy::inbound::MODE_ANNOTATION;
use fairlead_proxy::transparent::ADMIN_PORT;
use fairlead_proxy::PeerId;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::netns;

/// The annotation that asks for a sidecar (the injection webhook's, on a real cluster).
pub use fairlead_netns::mesh::INJECT_ANNOTATION;

/// How long a projected token the sandbox writes is valid: longer than a certificate's
/// half-life, so every renewal finds a valid one.
const TOKEN_SECONDS: i64 = 48 * 3600;
/// How long a sidecar may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether a pod asked for a sidecar.
pub fn injected(pod: &Pod) -> bool {
    pod.annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("true")
}

/// The mesh's control plane in the sandbox: the CA, and where sidecars keep their files.
pub struct Mesh {
    issuer: Arc<CertIssuer>,
    client: kube::Client,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The `fairlead-proxy` binary.
    proxy: PathBuf,
    /// Per-pod token files and proxy logs.
    dir: PathBuf,
}

/// A running sidecar process; dropping it kills it (by its pid).
pub struct Sidecar {
    child: Child,
    pub identity: PeerId,
    /// Its stderr.
    pub log: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sandbox's CA as the agents reach it.
struct SandboxCa(Arc<CertIssuer>);

impl MeshIssuer for SandboxCa {
    fn issue<'a>(
        &'a self,
        r: &'a CertRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertReply, String>> + Send + 'a>> {
        Box::pin(async move { self.0.issue_request(r).await.map_err(|e| e.to_string()) })
    }
}

impl Mesh {
    pub async fn start(
        client: kube::Client,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        proxy: PathBuf,
        dir: PathBuf,
        cert_ttl: Option<Duration>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut config = IssuerConfig::default();
        if let Some(ttl) = cert_ttl {
            config.ttl = ttl;
        }
        let issuer = CertIssuer::load_or_create(client.clone(), config).await?;
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(Self {
            issuer: Arc::new(issuer),
            client,
            snapshots,
            proxy,
            dir,
        }))
    }

    /// What each node agent serves its sidecars with.
    pub fn agent_settings(&self) -> MeshSettings {
        MeshSettings {
            issuer: Arc::new(SandboxCa(Arc::clone(&self.issuer))),
            trust_domain: self.issuer.config().trust_domain.clone(),
        }
    }

    /// The identity the mesh gives `pod`.
    pub fn identity_of(&self, pod: &Pod) -> SpiffeId {
        SpiffeId::new(
            &self.issuer.config().trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
    }

    /// Starts `pod`'s sidecar in `pod_netns`, talking to its node's agent over TCP at
    /// `agent` (the node's address, as an injected sidecar does), and waits until it is
    /// ready (it has its certificate and listens).
    pub async fn start_sidecar(
        self: &Arc<Self>,
        pod_netns: &str,
        pod: &Pod,
        agent: std::net::SocketAddr,
    ) -> anyhow::Result<Sidecar> {
        anyhow::ensure!(
            self.proxy.is_file(),
            "the proxy binary {} is missing: build it with `cargo build -p fairlead-proxy` \
             (./dev demo and cargo test --workspace do)",
            self.proxy.display()
        );
        let id = self.identity_of(pod);
        let dir = self.dir.join(pod_netns);
        std::fs::create_dir_all(&dir)?;
        let token_file = dir.join("token");
        std::fs::write(
            &token_file,
            self.token(&pod.namespace, &pod.service_account).await?,
        )?;
        let log = dir.join("proxy.log");
        // Strict unless the pod (annotation) or its namespace (label) asks for permissive;
        // the proxy refuses a value it does not know.
        let mode = pod
            .annotations
            .get(MODE_ANNOTATION)
            .cloned()
            .or_else(|| {
                self.snapshots
                    .borrow()
                    .namespace(&pod.namespace)
                    .and_then(|n| n.labels.get(MODE_ANNOTATION).cloned())
            })
            .unwrap_or_else(|| "strict".into());
        let netns_file = std::fs::File::open(netns::path(pod_netns))?;
        let mut cmd = Command::new(&self.proxy);
        cmd.args(["--agent-addr", &agent.to_string()])
            .args(["--namespace", &pod.namespace])
            .args(["--service-account", &pod.service_account])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--mode", &mode])
            .args(
                pod.annotations
                    .get(fairlead_netns::mesh::OPAQUE_PORTS_ANNOTATION)
                    .map(|p| vec!["--opaque-ports".to_owned(), p.clone()])
                    .unwrap_or_default(),
            )
            .env("FAIRLEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = netns_file.as_raw_fd();
            // SAFETY: between fork and exec only async-signal-safe calls: setns(2) into the
            // pod's namespace, and prctl(2) so the proxy dies with the sandbox process.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.proxy.display()))?;
        drop(netns_file);
        let mut sidecar = Sidecar {
            child,
            identity: PeerId(id.uri()),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready(pod_netns).await {
                return Ok(sidecar);
            }
            if let Some(status) = sidecar.child.try_wait()? {
                anyhow::bail!(
                    "the sidecar of {}/{} exited ({status}): {}",
                    pod.namespace,
                    pod.name,
                    tail(&sidecar.log)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the sidecar of {}/{} was not ready within {READY_TIMEOUT:?}: {}",
                    pod.namespace,
                    pod.name,
                    tail(&sidecar.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A certificate for `namespace/service_account`'s key (`csr_pem`), as its sidecar gets
    /// one: a TokenRequest token, checked by the CA. (Tests make good and bad clients with
    /// it.)
    pub async fn issue_for(
        &self,
        namespace: &str,
        service_account: &str,
        csr_pem: &str,
    ) -> anyhow::Result<CertReply> {
        let request = CertRequest {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            token: self.token(namespace, service_account).await?,
            csr: csr_pem.to_owned(),
        };
        Ok(self.issuer.issue_request(&request).await?)
    }

    /// The mesh CA.
    pub fn issuer(&self) -> &Arc<CertIssuer> {
        &self.issuer
    }

    async fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), namespace);
        let request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                audiences: vec![self.issuer.config().audience.clone()],
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let resp = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?;
        resp.status.map(|s| s.token).ok_or_else(|| {
            anyhow::anyhow!("TokenRequest for {namespace}/{service_account} returned no token")
        })
    }
}

/// Whether the sidecar in `pod_netns` answers `/ready` with 200.
async fn ready(pod_netns: &str) -> bool {
    let ns = pod_netns.to_owned();
    tokio::task::spawn_blocking(move || {
        netns::run_in(&ns, || {
            use std::io::{Read, Write};
            let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut out = String::new();
            s.write_all(b"GET /ready HTTP/1.1\r\n\r\n").is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.starts_with("HTTP/1.1 200")
        })
        .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
