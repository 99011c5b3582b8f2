//! The proxy's admin port: `/ready` (credentials loaded and not expired), `/live`,
//! `/metrics` (Prometheus: connections by peer identity and direction, TLS handshake
//! failures by reason, certificate expiry and rotations) and `/config` (a JSON dump of what
//! the proxy runs with). Plain HTTP/1.1, one request per connection, bounded in size and
//! time; meant for localhost and the kubelet's probes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tracing::debug;

use crate::rotation::CredentialStore;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The head of a plain HTTP request on a small admin endpoint (this one, the agent's
/// `/metrics`): read until the blank line, at most 8 KiB and 5 s (then `TimedOut`).
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
    Ok(buf)
}

/// Counters the forwarding paths update.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Request statistics by their label set (direction, peer identity, route).
    requests: Mutex<BTreeMap<String, Arc<RequestStats>>>,
}

/// Upper bounds (seconds) of the request latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Request label sets kept at most (a peer or route past it is counted under `other`).
pub const MAX_REQUEST_SERIES: usize = 2048;

/// One label set's requests: by status class, failures without a response, and the time
/// to the response's headers. Lock-free: a connection looks its set up once and every
/// request then costs a few atomic adds.
#[derive(Default)]
pub struct RequestStats {
    /// 1xx to 5xx.
    by_class: [AtomicU64; 5],
    /// No response at all (the application failed or went away).
    failures: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl RequestStats {
    /// A request answered with `status` after `latency`.
    pub fn answered(&self, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        self.observe(latency);
    }

    /// A request that got no response.
    pub fn failed(&self, latency: Duration) {
        self.failures.fetch_add(1, Relaxed);
        self.observe(latency);
    }

    fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(latency.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Requests answered with a status of this class (2 for 2xx).
    pub fn answered_total(&self, class: u16) -> u64 {
        self.by_class[usize::from(class.clamp(1, 5)) - 1].load(Relaxed)
    }

    pub fn failures_total(&self) -> u64 {
        self.failures.load(Relaxed)
    }
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

    /// The request statistics of one (direction, peer, route): looked up once per
    /// connection.
    pub fn requests(&self, direction: &str, peer: &str, route: &str) -> Arc<RequestStats> {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = format!(
            "{},{},{}",
            label("direction", direction),
            label("peer", peer),
            label("route", route)
        );
        if r.len() >= MAX_REQUEST_SERIES && !r.contains_key(&key) {
            key = format!(
                "{},{},{}",
                label("direction", direction),
                label("peer", "other"),
                label("route", "other")
            );
        }
        Arc::clone(r.entry(key).or_default())
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
        drop(c);
        let r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_empty() {
            return;
        }
        let _ = writeln!(out, "# TYPE fairlead_proxy_requests_total counter");
        for (labels, s) in r.iter() {
            for (i, n) in s.by_class.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "fairlead_proxy_requests_total{{{labels},status_class=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        let _ = writeln!(out, "# TYPE fairlead_proxy_request_failures_total counter");
        for (labels, s) in r.iter() {
            let _ = writeln!(
                out,
                "fairlead_proxy_request_failures_total{{{labels}}} {}",
                s.failures.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE fairlead_proxy_request_duration_seconds histogram"
        );
        for (labels, s) in r.iter() {
            let mut cumulative = 0;
            for (b, n) in LATENCY_BUCKETS.iter().zip(&s.buckets) {
                cumulative += n.load(Relaxed);
                let _ = writeln!(
                    out,
                    "fairlead_proxy_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}"
                );
            }
            let count = s.count.load(Relaxed);
            let _ = writeln!(
                out,
                "fairlead_proxy_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "fairlead_proxy_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_nanos.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "fairlead_proxy_request_duration_seconds_count{{{labels}}} {count}"
            );
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
            let Ok(buf) = read_request_head(&mut stream).await else {
                debug!("admin client too slow");
                return;
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_histograms_render_in_prometheus_form() {
        let m = Metrics::new();
        let s = m.requests("inbound", "spiffe://td/ns/a/sa/b", "127.0.0.1:8080");
        s.answered(200, Duration::from_micros(300));
        s.answered(503, Duration::from_millis(20));
        s.failed(Duration::from_secs(2));
        let mut out = String::new();
        m.render(&mut out);
        let l = r#"direction="inbound",peer="spiffe://td/ns/a/sa/b",route="127.0.0.1:8080""#;
        for line in [
            format!("fairlead_proxy_requests_total{{{l},status_class=\"2xx\"}} 1"),
            format!("fairlead_proxy_requests_total{{{l},status_class=\"5xx\"}} 1"),
            format!("fairlead_proxy_request_failures_total{{{l}}} 1"),
            format!("fairlead_proxy_request_duration_seconds_bucket{{{l},le=\"0.00025\"}} 0"),
            format!("fairlead_proxy_request_duration_seconds_bucket{{{l},le=\"0.0005\"}} 1"),
            format!("fairlead_proxy_request_duration_seconds_bucket{{{l},le=\"0.025\"}} 2"),
            format!("fairlead_proxy_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("fairlead_proxy_request_duration_seconds_count{{{l}}} 3"),
        ] {
            assert!(out.contains(&line), "missing {line}\n{out}");
        }
        // The same labels give the same statistics.
        assert_eq!(
            m.requests("inbound", "spiffe://td/ns/a/sa/b", "127.0.0.1:8080")
                .answered_total(5),
            1
        );
    }
}
