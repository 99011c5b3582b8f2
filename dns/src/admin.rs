//! The admin HTTP server of `fairlead dns` (`FAIRLEAD_DNS_ADMIN_LISTEN`, default `0.0.0.0:9153`,
//! CoreDNS's metrics port, so existing scrape configs and probes keep working):
//!
//! * `GET /metrics`: Prometheus text format (0.0.4), every series prefixed `fairlead_dns_`, plus
//!   `process_resident_memory_bytes`. Rendered on each scrape from the lock-free counters; the
//!   answer path never waits for a scrape.
//! * `GET /health`: 200 while every UDP worker and the TCP acceptor run (a liveness probe).
//! * `GET /ready`: 200 once the first complete snapshot of the cluster has been applied, 503
//!   with the reason before (a readiness probe: until then cluster names get SERVFAIL).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::UpstreamSnapshot;
use crate::metrics::{rcode_name, LATENCY_BUCKETS};
use crate::server::Shared;

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "DNS admin HTTP server stopped");
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], render(&shared))
}

async fn health(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let (started, live) = shared.listeners();
    if live == started && started > 0 {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} of {started} DNS listener loops stopped; see the log\n",
                started - live.min(started)
            ),
        )
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    if shared.is_ready() {
        let (generation, _) = shared.index_state();
        (
            StatusCode::OK,
            format!("ready: cluster snapshot generation {generation} applied\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first complete list of the cluster from the API server \
             (cluster names are answered SERVFAIL until then)\n"
                .into(),
        )
    }
}

/// A value of one upstream server's counters.
type PerUpstream = fn(&UpstreamSnapshot) -> u64;

/// Writes `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One series without labels, with its header.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The whole exposition.
pub(crate) fn render(shared: &Shared) -> String {
    let m = shared.metrics().snapshot();
    let mut out = String::with_capacity(8192);

    head(
        &mut out,
        "fairlead_dns_queries_total",
        "counter",
        "DNS queries received (UDP and TCP), by query type.",
    );
    for (qtype, n) in &m.queries_by_type {
        let _ = writeln!(out, "fairlead_dns_queries_total{{type=\"{qtype}\"}} {n}");
    }

    head(
        &mut out,
        "fairlead_dns_responses_total",
        "counter",
        "DNS responses sent, by rcode.",
    );
    for rcode in 0..=16u16 {
        let n = m.responses(rcode);
        match rcode_name(rcode) {
            Some(name) => {
                let _ = writeln!(out, "fairlead_dns_responses_total{{rcode=\"{name}\"}} {n}");
            }
            // Unassigned rcodes appear only once used.
            None if n > 0 => {
                let _ = writeln!(out, "fairlead_dns_responses_total{{rcode=\"{rcode}\"}} {n}");
            }
            None => {}
        }
    }

    head(
        &mut out,
        "fairlead_dns_request_duration_seconds",
        "histogram",
        "Time from receiving a query to handing its answer to the socket (forwarded queries included).",
    );
    for (i, (_, cumulative)) in m.latency_buckets.iter().enumerate() {
        let le = LATENCY_BUCKETS.get(i).map_or("+Inf", |(_, le)| le);
        let _ = writeln!(
            out,
            "fairlead_dns_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "fairlead_dns_request_duration_seconds_sum {}",
        m.latency_sum_ns as f64 / 1e9
    );
    let _ = writeln!(
        out,
        "fairlead_dns_request_duration_seconds_count {}",
        m.latency_count
    );

    single(
        &mut out,
        "fairlead_dns_dropped_total",
        "counter",
        "Packets dropped unanswered (shorter than a header, or a response).",
        m.dropped,
    );
    single(
        &mut out,
        "fairlead_dns_truncated_total",
        "counter",
        "UDP answers sent truncated (TC set) because they did not fit.",
        m.truncated,
    );
    single(
        &mut out,
        "fairlead_dns_shed_total",
        "counter",
        "Queries refused or dropped because forwarded queries in flight were at the bound (FAIRLEAD_DNS_MAX_INFLIGHT).",
        m.shed,
    );
    single(
        &mut out,
        "fairlead_dns_tcp_refused_total",
        "counter",
        "TCP connections closed at once because of the connection bound (FAIRLEAD_DNS_MAX_TCP).",
        m.tcp_refused,
    );
    let (inflight, max_inflight) = shared.inflight();
    single(
        &mut out,
        "fairlead_dns_inflight",
        "gauge",
        "Forwarded queries and prefetches waiting for an upstream.",
        inflight as u64,
    );
    single(
        &mut out,
        "fairlead_dns_inflight_limit",
        "gauge",
        "The bound on forwarded queries in flight, past which queries are shed.",
        max_inflight as u64,
    );

    single(
        &mut out,
        "fairlead_dns_cache_hits_total",
        "counter",
        "Forwarded queries answered from the cache.",
        m.cache_hits,
    );
    single(
        &mut out,
        "fairlead_dns_cache_misses_total",
        "counter",
        "Forwarded queries not in the cache (or expired), sent upstream.",
        m.cache_misses,
    );
    single(
        &mut out,
        "fairlead_dns_cache_entries",
        "gauge",
        "Forwarded answers cached (fresh, or kept to be served stale).",
        shared.cached_answers() as u64,
    );
    single(
        &mut out,
        "fairlead_dns_cache_stale_served_total",
        "counter",
        "Expired answers served because every upstream failed (RFC 8767).",
        m.stale_served,
    );
    single(
        &mut out,
        "fairlead_dns_cache_prefetches_total",
        "counter",
        "Background refreshes of popular cached answers near expiry.",
        m.prefetches,
    );
    single(
        &mut out,
        "fairlead_dns_cache_prefetch_failures_total",
        "counter",
        "Background refreshes that no upstream answered usably.",
        m.prefetch_failures,
    );

    single(
        &mut out,
        "fairlead_dns_forward_failures_total",
        "counter",
        "Forwarded queries and prefetches that no upstream answered usably (then served stale, or SERVFAIL).",
        m.upstream_errors,
    );
    let per_upstream: [(&str, &str, &str, PerUpstream); 4] = [
        (
            "fairlead_dns_forward_requests_total",
            "counter",
            "Queries sent to each upstream server (zone . is FAIRLEAD_DNS_UPSTREAMS, others are stub domains).",
            |u| u.requests,
        ),
        (
            "fairlead_dns_forward_timeouts_total",
            "counter",
            "Queries an upstream server did not answer in time (FAIRLEAD_DNS_UPSTREAM_TIMEOUT_MS).",
            |u| u.timeouts,
        ),
        (
            "fairlead_dns_forward_errors_total",
            "counter",
            "Queries to an upstream server that failed other than by timeout (I/O error, unusable answer).",
            |u| u.errors,
        ),
        (
            "fairlead_dns_forward_upstream_up",
            "gauge",
            "1 if the last query to this upstream server succeeded (or none was sent yet), else 0.",
            |u| u64::from(u.up),
        ),
    ];
    for (name, kind, help, value) in per_upstream {
        head(&mut out, name, kind, help);
        for u in &m.upstreams {
            let _ = writeln!(
                out,
                "{name}{{zone=\"{}\",upstream=\"{}\"}} {}",
                u.zone,
                u.addr,
                value(u)
            );
        }
    }

    let (generation, names) = shared.index_state();
    single(
        &mut out,
        "fairlead_dns_ready",
        "gauge",
        "1 once the first complete snapshot of the cluster has been applied.",
        u64::from(shared.is_ready()),
    );
    single(
        &mut out,
        "fairlead_dns_snapshot_generation",
        "gauge",
        "Generation of the cluster snapshot the answers reflect.",
        generation,
    );
    single(
        &mut out,
        "fairlead_dns_index_names",
        "gauge",
        "Names in the cluster record index (empty non-terminals included).",
        names as u64,
    );
    if let Some(rss) = resident_memory_bytes() {
        single(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    out
}

/// VmRSS of this process, from `/proc/self/status` (kB there).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
