//! The proxy's side of the node agent's socket: certificates (`MESH-CERT`) and the routing
//! table (`MESH-ROUTES follow`). The proxy never talks to the API server; the agent of its
//! node does, and hands the CA's answer and the cluster's routes on. The agent is reached on
//! its Unix socket (a hostPath mount) or over TCP at the node's address (`status.hostIP`),
//! which needs no host volume.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::rotation::{CertSource, Fetched};
use crate::routes::MeshRoutes;

/// `MESH-CERT <json>` carries the mesh CA API's request; the answer line is its reply.
pub use fairlead_controller::api::{CertReply, CertRequest};

/// Longest line read from the agent (a routing table of a large cluster fits).
const MAX_LINE: u64 = 64 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the node agent listens for its sidecars.
#[derive(Debug, Clone)]
pub enum AgentAddr {
    Socket(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Socket(p) => write!(f, "{}", p.display()),
            AgentAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A byte stream to the agent, either way.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A client of the node agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub addr: AgentAddr,
}

impl AgentClient {
    async fn connect(&self) -> Result<Box<dyn Conn>, String> {
        let conn: std::io::Result<Box<dyn Conn>> = match &self.addr {
            AgentAddr::Socket(p) => UnixStream::connect(p).await.map(|s| Box::new(s) as _),
            // Marked (or, unprivileged, by its user) so the pod's interception lets it pass.
            AgentAddr::Tcp(a) => crate::transparent::Dialer::here()
                .connect(*a, true)
                .await
                .map(|s| Box::new(s) as _),
        };
        conn.map_err(|e| format!("the agent at {}: {e}", self.addr))
    }

    /// A certificate for `request`'s CSR.
    pub async fn certificate(&self, request: &CertRequest) -> Result<CertReply, String> {
        let body = serde_json::to_string(request).map_err(|e| e.to_string())?;
        let attempt = async {
            let mut s = self.connect().await?;
            s.write_all(format!("MESH-CERT {body}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(s.take(MAX_LINE))
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            match line.trim_end().strip_prefix("ERROR ") {
                Some(why) => Err(why.to_owned()),
                None => serde_json::from_str(&line)
                    .map_err(|e| format!("the agent's answer is not a certificate: {e}")),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("the agent did not answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// Keeps `routes` current from the agent's `MESH-ROUTES follow`, reconnecting with
    /// backoff (the last table stays in force meanwhile). Runs until the receivers are gone.
    pub async fn follow_routes(&self, routes: watch::Sender<Arc<MeshRoutes>>) {
        let mut backoff = Duration::from_millis(100);
        while !routes.is_closed() {
            match self.stream_routes(&routes).await {
                Ok(()) => tracing::warn!("the agent closed the routes stream; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "no routes from the agent")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn stream_routes(&self, routes: &watch::Sender<Arc<MeshRoutes>>) -> Result<(), String> {
        let mut s = self.connect().await?;
        s.write_all(b"MESH-ROUTES follow\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(s).lines();
        // The agent is the node's own (a root-owned socket, or the node's address, which a
        // pod's traffic to does not leave the node): its lines are trusted in size.
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            if let Some(why) = line.strip_prefix("ERROR ") {
                return Err(why.to_owned());
            }
            let table: MeshRoutes = serde_json::from_str(&line)
                .map_err(|e| format!("the agent sent a routes line that does not parse: {e}"))?;
            tracing::debug!(
                services = table.services.len(),
                pods = table.pods.len(),
                "routes from the agent"
            );
            routes.send_replace(Arc::new(table));
        }
        Ok(())
    }
}

/// Certificates through the agent: each fetch reads the ServiceAccount token file afresh
/// (the kubelet rotates projected tokens).
pub struct AgentCertSource {
    pub client: AgentClient,
    pub namespace: String,
    pub service_account: String,
    pub token_file: PathBuf,
}

impl CertSource for AgentCertSource {
    fn fetch<'a>(
        &'a self,
        csr_pem: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let token = tokio::fs::read_to_string(&self.token_file)
                .await
                .map_err(|e| {
                    format!(
                        "reading the ServiceAccount token {}: {e}",
                        self.token_file.display()
                    )
                })?;
            let reply = self
                .client
                .certificate(&CertRequest {
                    namespace: self.namespace.clone(),
                    service_account: self.service_account.clone(),
                    token: token.trim().to_owned(),
                    csr: csr_pem.to_owned(),
                })
                .await?;
            Ok(Fetched {
                chain_pem: reply.chain,
                bundle_pem: reply.bundle,
            })
        })
    }
}
