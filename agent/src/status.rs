//! The agent's node-local status socket.
//!
//! A Unix stream socket; a client sends one line and reads one line back:
//!
//! * `STATUS\n`: `READY\n` once the agent has installed the CNI config and applied its node
//!   routes, else `NOTREADY <reason>\n`. The CNI plugin's STATUS verb asks it, so the container
//!   runtime holds pods back until the node can route them.
//! * `DELLINK <name>\n`: the CNI plugin's DEL hands over a veth it has tombstoned; `OK\n` once
//!   the [`LinkReaper`] has queued it (the delete happens later), `ERROR not a fairlead
//!   tombstone\n` for any name that is not `flz` + 12 hex digits, or another `ERROR` (no reaper,
//!   queue full), after which DEL deletes the link itself.
//!
//! * `ATTACH <name>\n`: the CNI plugin's ADD made pod veth `<name>` (host end, `fl` + 11 hex);
//!   `OK\n` once the datapath's eBPF programs are attached to it, so the pod never runs
//!   without Service load balancing; `ERROR <why>\n` otherwise (ADD then fails and rolls back).
//!
//! * `FLOWS [follow]\n`: the recent flow events (NetworkPolicy verdicts) as JSON lines, then
//!   with `follow` new ones until the client closes; `fairlead flows` reads this.
//! * `METRICS\n`: datapath counters (drop reasons included) in Prometheus text format.
//! * `MESH-CERT <json>\n` and `MESH-ROUTES [follow]\n`: the node's sidecars get their
//!   certificates and routing table here ([`crate::mesh`]).
//!
//! Anything else gets `ERROR <what>\n`.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::datapath::Datapath;
use crate::reaper::LinkReaper;

/// The request line (without its newline).
pub const STATUS_REQUEST: &str = "STATUS";
/// `DELLINK <name>`: delete this tombstone in the background.
pub const DELLINK_REQUEST: &str = "DELLINK";
/// `ATTACH <name>`: attach the datapath to this new pod veth.
pub const ATTACH_REQUEST: &str = "ATTACH";
/// `FLOWS [follow]`: recent flow events as JSON lines; with `follow`, then new ones as they
/// come, until the client goes away.
pub const FLOWS_REQUEST: &str = "FLOWS";
/// `METRICS`: the datapath's counters, Prometheus text format.
pub const METRICS_REQUEST: &str = "METRICS";
/// A client that has not sent its line by then is dropped, so a stuck client cannot pile up
/// tasks.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read: a `MESH-CERT` carries a CSR and a token (a few KiB); the other
/// requests are under 100 bytes.
pub(crate) const MAX_REQUEST: u64 = 16 * 1024;
/// `MESH-CERT <json>`: a certificate for a sidecar of this node.
pub const MESH_CERT_REQUEST: &str = "MESH-CERT";
/// `MESH-ROUTES [follow]`: the mesh routing table, then (follow) every change.
pub const MESH_ROUTES_REQUEST: &str = "MESH-ROUTES";

/// Whether the agent is ready to have pods added on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not ready, and why (one line; newlines are replaced when answering).
    NotReady(String),
}

impl Readiness {
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Readiness::NotReady(reason.into())
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }

    /// The answer line, with its newline.
    pub fn answer(&self) -> String {
        match self {
            Readiness::Ready => "READY\n".to_owned(),
            Readiness::NotReady(reason) => {
                format!("NOTREADY {}\n", reason.replace(['\n', '\r'], " "))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "another process is serving {path}; stop the other agent, or give this one its own \
         FAIRLEAD_AGENT_SOCKET", path = .path.display()
    )]
    InUse { path: PathBuf },

    #[error(
        "{path} exists and is not a socket; remove it or choose another FAIRLEAD_AGENT_SOCKET",
        path = .path.display()
    )]
    NotASocket { path: PathBuf },

    #[error("cannot listen on {path}: {source}", path = .path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// A bound status socket; [`StatusServer::serve`] answers on it.
pub struct StatusServer {
    listener: UnixListener,
    path: PathBuf,
    readiness: watch::Receiver<Readiness>,
    reaper: Option<LinkReaper>,
    datapath: Option<Datapath>,
    mesh: Option<crate::mesh::MeshService>,
}

impl StatusServer {
    /// Binds `path` (creating its directory). A socket file left by an agent that died is
    /// replaced; a live one is an error. Must run inside a Tokio runtime.
    pub fn bind(path: &Path, readiness: watch::Receiver<Readiness>) -> Result<Self, StatusError> {
        let bind_error = |source| StatusError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_error)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(StatusError::InUse {
                            path: path.to_owned(),
                        })
                    }
                    // Nobody listens: a leftover of an agent that did not shut down cleanly.
                    Err(_) => std::fs::remove_file(path).map_err(bind_error)?,
                }
            }
            Ok(_) => {
                return Err(StatusError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(bind_error(source)),
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            readiness,
            reaper: None,
            datapath: None,
            mesh: None,
        })
    }

    /// Serves `DELLINK` by queuing on `reaper`; without one, `DELLINK` is answered with an
    /// `ERROR` and the plugin deletes the link itself.
    pub fn with_reaper(mut self, reaper: LinkReaper) -> Self {
        self.reaper = Some(reaper);
        self
    }

    /// Serves `ATTACH` with `datapath`; without one, `ATTACH` is answered with an `ERROR`.
    pub fn with_datapath(mut self, datapath: Datapath) -> Self {
        self.datapath = Some(datapath);
        self
    }

    /// Serves the node's sidecars (`MESH-CERT`, `MESH-ROUTES`); without it they get an
    /// `ERROR`.
    pub fn with_mesh(mut self, mesh: crate::mesh::MeshService) -> Self {
        self.mesh = Some(mesh);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers until `shutdown` completes, then removes the socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let readiness = self.readiness.clone();
                        let reaper = self.reaper.clone();
                        let datapath = self.datapath.clone();
                        let mesh = self.mesh.clone();
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, readiness, reaper.as_ref(), datapath, mesh.as_ref()).await {
                                debug!(error = %e, "status client went away");
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE and the like: wait a little instead of spinning.
                        warn!(error = %e, "accepting on the status socket failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(
    stream: UnixStream,
    readiness: watch::Receiver<Readiness>,
    reaper: Option<&LinkReaper>,
    datapath: Option<Datapath>,
    mesh: Option<&crate::mesh::MeshService>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request line"))??;
    let line = line.trim_end_matches(['\n', '\r']);
    let argument = |verb: &str| {
        line.strip_prefix(verb)
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            .map(str::trim_start)
            .map(str::to_owned)
    };
    if let Some(mode) = argument(FLOWS_REQUEST) {
        return match datapath {
            Some(dp) => stream_flows(&mut write, &dp, mode == "follow").await,
            None => {
                write
                    .write_all(b"ERROR this agent runs no eBPF datapath\n")
                    .await?;
                write.shutdown().await
            }
        };
    }
    if argument(MESH_CERT_REQUEST).is_some() || argument(MESH_ROUTES_REQUEST).is_some() {
        match mesh {
            Some(m) => {
                if let Some(result) = m.answer(line, &mut write).await {
                    result?
                }
            }
            None => {
                write
                    .write_all(b"ERROR this agent serves no mesh\n")
                    .await?
            }
        }
        return write.shutdown().await;
    }
    if line == METRICS_REQUEST {
        let text = match datapath {
            Some(dp) => tokio::task::spawn_blocking(move || dp.metrics())
                .await
                .unwrap_or_else(|e| format!("# metrics failed: {e}\n")),
            None => "# this agent runs no eBPF datapath\n".to_owned(),
        };
        write.write_all(text.as_bytes()).await?;
        return write.shutdown().await;
    }
    let reply = if line == STATUS_REQUEST {
        readiness.borrow().answer()
    } else if let Some(name) = argument(DELLINK_REQUEST) {
        match reaper.map(|r| r.submit(&name)) {
            Some(Ok(())) => "OK\n".to_owned(),
            Some(Err(e)) => format!("ERROR {e}\n"),
            None => "ERROR this agent does not delete links; delete it yourself\n".to_owned(),
        }
    } else if let Some(name) = argument(ATTACH_REQUEST) {
        match datapath {
            Some(dp) => match tokio::task::spawn_blocking(move || dp.attach_pod(&name)).await {
                Ok(Ok(())) => "OK\n".to_owned(),
                Ok(Err(e)) => format!("ERROR {e}\n"),
                Err(e) => format!("ERROR attach task failed: {e}\n"),
            },
            None => "ERROR this agent runs no eBPF datapath\n".to_owned(),
        }
    } else {
        format!(
            "ERROR unknown request {line:?}; send {STATUS_REQUEST}, {DELLINK_REQUEST} <name> or \
             {ATTACH_REQUEST} <name>\n"
        )
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

async fn stream_flows(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    dp: &Datapath,
    follow: bool,
) -> io::Result<()> {
    // Subscribe first, so nothing falls between the backlog and the live stream.
    let mut live = dp.flows().subscribe();
    for record in dp.flows().recent() {
        write_record(write, &record).await?;
    }
    if follow {
        loop {
            match live.recv().await {
                Ok(record) => write_record(write, &record).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = format!("{{\"lost\":{n}}}\n");
                    write.write_all(note.as_bytes()).await?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    write.shutdown().await
}

async fn write_record(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    record: &crate::flows::FlowRecord,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(record).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await
}

/// Asks the agent at `path` for its status and returns the answer line without its newline
/// (the client side, for tests and the CLI; the CNI plugin has its own).
pub async fn query(path: &Path) -> io::Result<String> {
    request(path, STATUS_REQUEST).await
}

/// Sends one request line (without its newline) to the agent at `path` and returns the answer
/// line without its newline.
pub async fn request(path: &Path, line: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path).await?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.take(MAX_REQUEST).read_to_string(&mut answer).await?;
    Ok(answer.trim_end_matches('\n').to_owned())
}
