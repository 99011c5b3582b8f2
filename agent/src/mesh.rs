//! The mesh's node-local side: the agent serves the sidecars of its node on its socket, so a
//! proxy never talks to the API server itself.
//!
//! * `MESH-CERT <json>`: `{"namespace", "serviceAccount", "token", "csr"}`, a CSR of the
//!   proxy's own key and its ServiceAccount token; the agent hands it to the mesh CA
//!   ([`MeshIssuer`]), which checks the token (TokenReview) against the identity, and
//!   answers `{"chain", "bundle"}` (PEM) or `ERROR <why>`.
//! * `MESH-ROUTES [follow]`: the routing table ([`fairlead_proxy::routes::MeshRoutes`]) as
//!   one JSON line, then with `follow` the whole table again on every change.

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

/// The controller's CA over HTTPS (`POST /v1/certificates`).
pub struct ControllerIssuer(pub fairlead_controller::api::CaClient);

impl MeshIssuer for ControllerIssuer {
    fn issue<'a>(
        &'a self,
        request: &'a CertRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertReply, String>> + Send + 'a>> {
        Box::pin(self.0.issue(request))
    }
}

/// A CA the agent could not set up: every request gets the reason (the node's networking
/// is not held hostage by a mesh misconfiguration).
struct Unavailable(String);

impl MeshIssuer for Unavailable {
    fn issue<'a>(
        &'a self,
        _: &'a CertRequest,
    ) -> Pin<Box<dyn Future<Output = Result<CertReply, String>> + Send + 'a>> {
        let reason = self.0.clone();
        Box::pin(async move { Err(reason) })
    }
}

impl MeshSettings {
    /// From the agent's configuration: the controller's CA at `url`, trusted through the
    /// bundle file. A bundle that cannot be read is logged and answered on every request.
    pub fn from_config(c: &crate::config::MeshCaConfig) -> Self {
        let issuer: Arc<dyn MeshIssuer> = match std::fs::read_to_string(&c.bundle)
            .map_err(|e| format!("reading the mesh CA bundle {}: {e}", c.bundle.display()))
            .and_then(|pem| fairlead_controller::api::CaClient::new(&c.url, &pem))
        {
            Ok(client) => Arc::new(ControllerIssuer(client)),
            Err(e) => {
                tracing::warn!(error = %e, "the mesh CA is not usable; sidecars get no certificates");
                Arc::new(Unavailable(format!(
                    "the agent's mesh CA is not configured right: {e}"
                )))
            }
        };
        Self {
            issuer,
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
