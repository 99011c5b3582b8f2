//! The agent's HTTP endpoint for Prometheus: `GET /metrics` (the datapath's counters, drop
//! reasons included, as `METRICS` on the socket) and `GET /healthz`. Bound inside the node's
//! network namespace (`FAIRLEAD_AGENT_METRICS_LISTEN`, e.g. `0.0.0.0:9962`, Cilium's agent
//! port), so a scraper reaches it at the node's address. Plain HTTP/1.1, one request per
//! connection, requests bounded in size and time.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::datapath::Datapath;

/// The agent's metrics port (Cilium's agent uses the same).
pub const METRICS_PORT: u16 = 9962;

/// Binds `addr` inside `netns` and serves until the task is dropped.
pub async fn serve(netns: &Path, addr: SocketAddr, datapath: Datapath) -> std::io::Result<()> {
    let listener = bind_in(netns, addr)?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dp = datapath.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, dp).await {
                debug!(error = %e, "metrics client went away");
            }
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, dp: Datapath) -> std::io::Result<()> {
    let buf = fairlead_proxy::admin::read_request_head(&mut stream).await?;
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => {
            let text = tokio::task::spawn_blocking(move || dp.metrics())
                .await
                .unwrap_or_else(|e| format!("# metrics failed: {e}\n"));
            ("200 OK", text)
        }
        ("GET", "/healthz") => ("200 OK", "ok\n".to_owned()),
        ("GET", _) => ("404 Not Found", "try /metrics or /healthz\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A TCP listener on `addr` inside network namespace `netns` (the node's), served from the
/// current runtime.
pub(crate) fn bind_in(netns: &Path, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let file = std::fs::File::open(netns)?;
    let listener = fairlead_netns::run_in(std::os::fd::AsFd::as_fd(&file), || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    })??;
    tokio::net::TcpListener::from_std(listener)
}
