//! The proxy's admin port: `/ready` (credentials loaded and not expired), `/live`,
//! `/metrics` (Prometheus: connections by peer identity and direction, TLS handshake
//! failures by reason, certificate expiry and rotations) and `/config` (a JSON dump of what
//! the proxy runs with). Plain HTTP/1.1, one request per connection, bounded in size and
//! time; meant for localhost and the kubelet's probes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tracing::debug;

use crate::rotation::CredentialStore;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters the forwarding paths update.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one to `name{label}`.
    pub fn inc(&self, name: &'static str, label: impl Into<String>) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((name, label.into())).or_default() += 1;
    }

    pub fn get(&self, name: &'static str, label: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(name, label.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String) {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = "";
        for ((name, label), value) in c.iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} counter");
                last = name;
            }
            let _ = writeln!(out, "{name}{{{label}}} {value}");
        }
    }
}

/// The most connections one listener serves at once; past it new ones are closed at once,
/// counted and logged, so a flood cannot grow the proxy's memory without bound.
pub const MAX_CONNECTIONS: usize = 10_000;

/// A slot for one more connection on a listener, or `None` (counted and logged) when the
/// listener is at [`MAX_CONNECTIONS`].
pub fn admit(
    slots: &Arc<tokio::sync::Semaphore>,
    metrics: &Metrics,
    listener: &'static str,
    peer: SocketAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match Arc::clone(slots).try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => {
            metrics.inc(
                "fairlead_proxy_connections_over_limit_total",
                label("listener", listener),
            );
            tracing::warn!(%peer, listener, limit = MAX_CONNECTIONS, "connection refused: the listener is at its connection limit");
            None
        }
    }
}

/// The slots of one listener.
pub fn connection_slots() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS))
}

/// `key="value"` label text, escaped.
pub fn label(key: &str, value: &str) -> String {
    format!(
        "{key}=\"{}\"",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    creds: Arc<CredentialStore>,
    metrics: Arc<Metrics>,
    config: ProxyConfig,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (creds, metrics, config) = (Arc::clone(&creds), Arc::clone(&metrics), config.clone());
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(256);
            let read = async {
                let mut chunk = [0u8; 512];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(REQUEST_TIMEOUT, read).await.is_err() {
                debug!("admin client too slow");
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = answer(path, &creds, &metrics, &config);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn answer(
    path: &str,
    creds: &CredentialStore,
    metrics: &Metrics,
    config: &ProxyConfig,
) -> (&'static str, String) {
    let (_, not_after) = creds.validity_window();
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    match path {
        "/live" => ("200 OK", "live\n".into()),
        "/ready" if left > Duration::ZERO => (
            "200 OK",
            format!("ready: {} for {}s more\n", creds.tls().id(), left.as_secs()),
        ),
        "/ready" => (
            "503 Service Unavailable",
            "not ready: the certificate has expired and no renewal succeeded\n".into(),
        ),
        "/metrics" => {
            let mut out = String::new();
            metrics.render(&mut out);
            let _ = writeln!(
                out,
                "# TYPE fairlead_proxy_certificate_expiry_seconds gauge\nfairlead_proxy_certificate_expiry_seconds{{{}}} {}",
                label("identity", &creds.tls().id().0),
                left.as_secs()
            );
            let _ = writeln!(
                out,
                "# TYPE fairlead_proxy_certificate_generation gauge\nfairlead_proxy_certificate_generation {}",
                creds.generation()
            );
            ("200 OK", out)
        }
        "/config" => ("200 OK", config.render(creds)),
        _ => (
            "404 Not Found",
            "try /ready, /live, /metrics or /config\n".into(),
        ),
    }
}

/// What `/config` shows besides the identity (a handful of fields, rendered by hand).
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    pub application: Option<SocketAddr>,
    pub mode: String,
}

impl ProxyConfig {
    pub fn render(&self, creds: &CredentialStore) -> String {
        let opt = |a: &Option<SocketAddr>| a.map_or("null".to_owned(), |a| format!("\"{a}\""));
        format!(
                "{{\"identity\":\"{}\",\"inbound\":{},\"outbound\":{},\"application\":{},\"mode\":\"{}\",\"certificate_generation\":{}}}\n",
                creds.tls().id(),
                opt(&self.inbound),
                opt(&self.outbound),
                opt(&self.application),
                self.mode,
                creds.generation()
            )
    }
}
