//! The mesh's node-local side: the agent serves the sidecars of its node on its socket, so a
//! proxy never talks to the API server itself.
//!
//! * `MESH-CERT <json>`: `{"namespace", "serviceAccount", "token", "csr"}`, a CSR of the
//!   proxy's own key and its ServiceAccount token; the agent hands it to the mesh CA
//!   ([`MeshIssuer`]), which checks the token (TokenReview) against the identity, and
//!   answers `{"chain", "bundle"}` (PEM) or `ERROR <why>`.
//! * `MESH-ROUTES [follow]`: the routing table ([`fairlead_proxy::routes::MeshRoutes`]) as
//!   one JSON line, then with `follow` the whole table again on every change.
//!
//! Both are served on the agent's status socket (a hostPath mount, which Pod Security's
//! `baseline` and `restricted` levels refuse) and, with `FAIRLEAD_AGENT_MESH_LISTEN`, over
//! TCP on the node's address ([`serve_tcp`]): the injected sidecar dials its node's
//! `status.hostIP`, so a meshed pod needs no host volume. The TCP side answers only these two
//! requests and only this node's pods (by source address, in the node's pod CIDRs); a certificate still needs the
//! pod's own ServiceAccount token, checked by the CA.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fairlead_core::{PortRef, Snapshot};
use fairlead_proxy::routes::{spiffe_uri, MeshEndpoint, MeshRoutes};
use tokio::sync::watch;

pub use fairlead_proxy::agent::{CertReply, CertRequest};

/// The mesh CA as the agent reaches it (the controller on a real cluster; in-process in the
/// sandbox).
pub trait MeshIssuer: Send + Sync {
    fn issue<'a>(
        &'a self,
        request: &'a CertRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertReply, String>> + Send + 'a>>;
}

/// The controller's CA over HTTPS (`POST /v1/certificates`), trusted through the bundle
/// file (the ConfigMap `fairlead-ca-bundle` the controller publishes, mounted into the agent).
/// The file is read again on every request, so a root rotation (kubelet rewrites the mounted
/// ConfigMap, and the controller's serving certificate moves to the new root) and a bundle
/// that appears after the agent started are followed without a restart; a request while the
/// file is missing or unusable gets the reason.
pub struct ControllerIssuer {
    url: String,
    bundle: std::path::PathBuf,
    /// The client built from the bundle last read, with that bundle.
    client: std::sync::Mutex<Option<(String, fairlead_controller::api::CaClient)>>,
}

impl ControllerIssuer {
    pub fn new(url: &str, bundle: &std::path::Path) -> Self {
        Self {
            url: url.to_owned(),
            bundle: bundle.to_owned(),
            client: std::sync::Mutex::new(None),
        }
    }

    /// The client for the bundle as the file holds it now.
    fn client(&self) -> Result<fairlead_controller::api::CaClient, String> {
        let pem = std::fs::read_to_string(&self.bundle).map_err(|e| {
            format!(
                "the agent's mesh CA is not configured right: reading the bundle {}: {e}",
                self.bundle.display()
            )
        })?;
        let mut cached = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, client)) = cached.as_ref() {
            if *seen == pem {
                return Ok(client.clone());
            }
        }
        let client = fairlead_controller::api::CaClient::new(&self.url, &pem)
            .map_err(|e| format!("the agent's mesh CA is not configured right: {e}"))?;
        if cached.is_some() {
            tracing::info!(bundle = %self.bundle.display(), "mesh CA bundle changed; using the new one");
        }
        *cached = Some((pem, client.clone()));
        Ok(client)
    }
}

impl MeshIssuer for ControllerIssuer {
    fn issue<'a>(
        &'a self,
        request: &'a CertRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertReply, String>> + Send + 'a>> {
        Box::pin(async move { self.client()?.issue(request).await })
    }
}

impl MeshSettings {
    /// From the agent's configuration: the controller's CA at `url`, trusted through the
    /// bundle file ([`ControllerIssuer`]). A bundle that cannot be used now is logged, and
    /// looked at again on each request.
    pub fn from_config(c: &crate::config::MeshCaConfig) -> Self {
        let issuer = ControllerIssuer::new(&c.url, &c.bundle);
        if let Err(e) = issuer.client() {
            tracing::warn!(error = %e, "the mesh CA is not usable yet; sidecars get no certificates until it is");
        }
        Self {
            issuer: Arc::new(issuer),
            trust_domain: c.trust_domain.clone(),
        }
    }
}

/// What the agent needs to serve its node's sidecars.
#[derive(Clone)]
pub struct MeshSettings {
    pub issuer: Arc<dyn MeshIssuer>,
    pub trust_domain: String,
}

/// The mesh side of the agent's socket.
#[derive(Clone)]
pub struct MeshService {
    pub issuer: Arc<dyn MeshIssuer>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub trust_domain: String,
}

/// The meshed pods (annotated `fairlead.io/inject: "true"`, with their ServiceAccount's
/// identity) and every Service frontend with its ready endpoints.
pub fn routes_from_snapshot(snap: &Snapshot, trust_domain: &str) -> MeshRoutes {
    let mut routes = MeshRoutes::default();
    for p in snap.pods().values() {
        if fairlead_netns::mesh::wants_mesh(|k| p.annotations.get(k).map(String::as_str)) {
            let id = spiffe_uri(trust_domain, &p.namespace, &p.service_account);
            for ip in &p.ips {
                routes.pods.insert(*ip, id.clone());
            }
        }
    }
    for svc in snap.services().values() {
        let key = fairlead_core::ObjectKey::new(&svc.namespace, &svc.name);
        for vip in svc.cluster_ips.ips() {
            for port in &svc.ports {
                let mut endpoints = Vec::new();
                for slice in snap.endpoint_slices_of(&key) {
                    let Some(sp) = slice.ports.iter().find(|p| p.name == port.name) else {
                        continue;
                    };
                    let target = sp.port.unwrap_or(match port.target_port {
                        PortRef::Number(n) => n,
                        PortRef::Name(_) => port.port,
                    });
                    for ep in slice.endpoints.iter().filter(|e| e.conditions.ready) {
                        for ip in ep.addresses.iter().filter(|a| a.is_ipv4() == vip.is_ipv4()) {
                            endpoints.push(MeshEndpoint {
                                addr: std::net::SocketAddr::new(*ip, target),
                                identity: routes.pods.get(ip).cloned(),
                            });
                        }
                    }
                }
                routes
                    .services
                    .insert(std::net::SocketAddr::new(*vip, port.port), endpoints);
            }
        }
    }
    routes
}

impl MeshService {
    /// Answers `line` if it is a mesh request (`MESH-CERT <json>`, `MESH-ROUTES [follow]`),
    /// writing to `write`; `None` when it is something else.
    pub async fn answer(
        &self,
        line: &str,
        write: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Option<std::io::Result<()>> {
        use tokio::io::AsyncWriteExt;
        let argument = |verb: &str| {
            line.strip_prefix(verb)
                .filter(|rest| rest.is_empty() || rest.starts_with(' '))
                .map(str::trim_start)
        };
        if let Some(json) = argument(crate::status::MESH_CERT_REQUEST) {
            let reply = self.certificate(json).await;
            return Some(write.write_all(reply.as_bytes()).await);
        }
        let mode = argument(crate::status::MESH_ROUTES_REQUEST)?;
        Some(self.stream_routes(write, mode == "follow").await)
    }

    /// `MESH-CERT`'s answer line (with its newline).
    pub async fn certificate(&self, json: &str) -> String {
        let request: CertRequest = match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => {
                return format!(
                    "ERROR the certificate request is not {{\"namespace\", \"serviceAccount\", \"token\", \"csr\"}}: {e}\n"
                )
            }
        };
        match self.issuer.issue(&request).await {
            Ok(reply) => {
                let mut line = serde_json::to_string(&reply).unwrap_or_default();
                line.push('\n');
                line
            }
            Err(e) => format!(
                "ERROR the mesh CA refused {}/{}: {}\n",
                request.namespace,
                request.service_account,
                e.replace('\n', " ")
            ),
        }
    }

    /// The current table, and with `follow` each new one, to `write` until it fails.
    pub async fn stream_routes(
        &self,
        write: &mut (impl tokio::io::AsyncWrite + Unpin),
        follow: bool,
    ) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut snapshots = self.snapshots.clone();
        let mut last = None;
        loop {
            let table = routes_from_snapshot(&snapshots.borrow_and_update(), &self.trust_domain);
            if last.as_ref() != Some(&table) {
                let mut line = serde_json::to_vec(&table).unwrap_or_default();
                line.push(b'\n');
                write.write_all(&line).await?;
                last = Some(table);
            }
            if !follow || snapshots.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Connections the TCP side serves at once: a routes stream per sidecar (a node runs at most
/// a few hundred pods) and short certificate requests.
pub const MAX_TCP_CLIENTS: usize = 2048;

/// Serves `MESH-CERT` and `MESH-ROUTES` over TCP (see the module docs) until `shutdown`:
/// one request line per connection, from an address that is a pod of node `node` in the
/// current snapshot; anything else gets an `ERROR` line saying why.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    mesh: MeshService,
    node: String,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let node = Arc::new(node);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // A bound on connections (each sidecar holds one routes stream), so a
                    // pod that opens thousands costs refusals, not the agent's memory.
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(%peer, limit = MAX_TCP_CLIENTS, "too many mesh connections; refused");
                        drop(stream);
                        continue;
                    };
                    let (mesh, node) = (mesh.clone(), Arc::clone(&node));
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) = answer_tcp(stream, peer, &mesh, &node).await {
                            tracing::debug!(%peer, error = %e, "mesh client went away");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a mesh connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Whether `ip` is a pod address of `node`: inside one of its pod CIDRs. Not the pods in the
/// snapshot: a sidecar asks before its pod's status (and so its address) has reached the
/// agent, since it starts before the application.
fn is_local_pod(snap: &Snapshot, node: &str, ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    snap.node(node)
        .is_some_and(|n| n.pod_cidrs.iter().any(|c| c.contains(&ip)))
}

async fn answer_tcp(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    mesh: &MeshService,
    node: &str,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    if !is_local_pod(&mesh.snapshots.borrow(), node, peer.ip()) {
        tracing::warn!(%peer, "mesh request from an address that is no pod of this node; refused");
        write
            .write_all(format!("ERROR {} is not a pod of node {node}\n", peer.ip()).as_bytes())
            .await?;
        return write.shutdown().await;
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(crate::status::MAX_REQUEST));
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reader.read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line"))??;
    let line = line.trim_end_matches(['\n', '\r']);
    match mesh.answer(line, &mut write).await {
        Some(result) => result?,
        None => {
            write
                .write_all(b"ERROR only MESH-CERT and MESH-ROUTES are served here\n")
                .await?
        }
    }
    write.shutdown().await
}
