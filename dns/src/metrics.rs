//! Counters of the server, lock-free. Prometheus exposition (`admin.rs`) and
//! [`crate::Server::metrics`] read them through [`Metrics::snapshot`].
//!
//! The counters touched by every answer (query type, rcode, latency) are sharded: each thread
//! adds to its own cache-line-aligned block, so two cores answering at full rate do not bounce
//! the same lines between them; a scrape sums the blocks. Rarer counters (forwarding, cache,
//! shedding) are single atomics.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::wire::{
    Rcode, TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_CNAME, TYPE_NS, TYPE_PTR, TYPE_SOA, TYPE_SRV, TYPE_TXT,
};

/// Query types counted on their own; everything else is `other`.
pub const COUNTED_TYPES: [(&str, u16); 9] = [
    ("A", TYPE_A),
    ("AAAA", TYPE_AAAA),
    ("SRV", TYPE_SRV),
    ("PTR", TYPE_PTR),
    ("TXT", TYPE_TXT),
    ("CNAME", TYPE_CNAME),
    ("SOA", TYPE_SOA),
    ("NS", TYPE_NS),
    ("ANY", TYPE_ANY),
];

/// Upper bounds of the request latency histogram, in nanoseconds, with their Prometheus `le`
/// labels. Answers from the index take microseconds, forwarded ones up to the upstream
/// timeout (seconds), so the buckets span both.
pub const LATENCY_BUCKETS: [(u64, &str); 18] = [
    (10_000, "1e-05"),
    (25_000, "2.5e-05"),
    (50_000, "5e-05"),
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
];

/// Rcode slots: 0..=15, and 16 for BADVERS (an extended rcode).
const RCODES: usize = 17;
/// Shards of the hot counters; threads are spread over them round-robin.
const SHARDS: usize = 8;

/// The counters every answer touches, one block per shard. 128-byte alignment keeps two
/// shards off one cache line (and off adjacent-line prefetch pairs).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    queries_by_type: [AtomicU64; COUNTED_TYPES.len() + 1],
    responses_by_rcode: [AtomicU64; RCODES],
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard, assigned on first use.
fn shard_index() -> usize {
    SHARD.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            return i;
        }
        let i = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
        s.set(i);
        i
    })
}

/// Per upstream server: what was sent to it and how it went.
#[derive(Debug)]
pub(crate) struct UpstreamStats {
    pub addr: SocketAddr,
    pub requests: AtomicU64,
    pub timeouts: AtomicU64,
    /// Failures other than timeouts: I/O errors, unusable answers.
    pub errors: AtomicU64,
    /// Whether the last exchange with it succeeded (true until one fails).
    pub up: AtomicBool,
}

impl UpstreamStats {
    pub fn new(addr: SocketAddr) -> Self {
        UpstreamStats {
            addr,
            requests: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            up: AtomicBool::new(true),
        }
    }
}

pub struct Metrics {
    shards: Box<[Shard]>,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) prefetches: AtomicU64,
    pub(crate) prefetch_failures: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) shed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) truncated: AtomicU64,
    pub(crate) tcp_refused: AtomicU64,
    /// (zone the servers forward for, `.` for the default upstreams; the server's counters).
    upstreams: Vec<(String, Arc<UpstreamStats>)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Vec::new())
    }
}

/// Counters of one upstream server at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSnapshot {
    /// The zone forwarded to this server: `.` for `FAIRLEAD_DNS_UPSTREAMS`, else a stub domain
    /// (`example.corp.`).
    pub zone: String,
    pub addr: SocketAddr,
    /// Queries sent to it (a retry over TCP after a truncated answer is the same query).
    pub requests: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// The last exchange with it succeeded (or none was tried yet).
    pub up: bool,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// (type name, count); the last entry is `other`.
    pub queries_by_type: Vec<(&'static str, u64)>,
    /// (rcode, count) for every rcode answered at least once.
    pub responses_by_rcode: Vec<(u16, u64)>,
    /// Answers per latency bucket, cumulative as Prometheus has them: (upper bound in
    /// nanoseconds, answers that took at most that long); the last bound is `u64::MAX` (+Inf).
    pub latency_buckets: Vec<(u64, u64)>,
    /// Answers timed (the +Inf bucket).
    pub latency_count: u64,
    /// Sum of their latencies, nanoseconds.
    pub latency_sum_ns: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub stale_served: u64,
    /// Background refreshes of popular cached answers started.
    pub prefetches: u64,
    /// Background refreshes that no upstream answered usably.
    pub prefetch_failures: u64,
    /// Forwarded queries (and prefetches) no upstream answered usably.
    pub upstream_errors: u64,
    /// Queries refused or dropped because the forwarder was at its in-flight bound.
    pub shed: u64,
    /// Packets dropped unanswered (no header, or a response).
    pub dropped: u64,
    /// UDP answers sent with TC set.
    pub truncated: u64,
    /// TCP connections closed at once because of the connection bound.
    pub tcp_refused: u64,
    /// Every upstream server, default ones first, then the stub domains' in zone order.
    pub upstreams: Vec<UpstreamSnapshot>,
}

impl MetricsSnapshot {
    pub fn queries(&self, qtype: &str) -> u64 {
        self.queries_by_type
            .iter()
            .find(|(t, _)| *t == qtype)
            .map_or(0, |(_, n)| *n)
    }

    pub fn responses(&self, rcode: u16) -> u64 {
        self.responses_by_rcode
            .iter()
            .find(|(r, _)| *r == rcode)
            .map_or(0, |(_, n)| *n)
    }

    /// The counters of upstream `addr` serving `zone` (`.` for the default upstreams).
    pub fn upstream(&self, zone: &str, addr: SocketAddr) -> Option<&UpstreamSnapshot> {
        self.upstreams
            .iter()
            .find(|u| u.zone == zone && u.addr == addr)
    }
}

impl Metrics {
    /// Counters for a server whose forwarder uses these upstream servers.
    pub(crate) fn new(upstreams: Vec<(String, Arc<UpstreamStats>)>) -> Self {
        Metrics {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            prefetch_failures: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            upstreams,
        }
    }

    #[inline]
    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    pub(crate) fn query(&self, qtype: u16) {
        let i = COUNTED_TYPES
            .iter()
            .position(|(_, t)| *t == qtype)
            .unwrap_or(COUNTED_TYPES.len());
        self.shard().queries_by_type[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn response(&self, rcode: Rcode) {
        self.response_code(rcode as u16);
    }

    pub(crate) fn response_code(&self, rcode: u16) {
        self.shard().responses_by_rcode[usize::from(rcode.min(16))].fetch_add(1, Relaxed);
    }

    /// Records how long one answer took, from receiving the query to handing the answer to
    /// the socket.
    #[inline]
    pub(crate) fn latency(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|(bound, _)| ns <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let shard = self.shard();
        shard.latency[bucket].fetch_add(1, Relaxed);
        shard.latency_sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let sum = |f: &dyn Fn(&Shard) -> &AtomicU64| -> u64 {
            self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
        };
        let mut queries_by_type: Vec<_> = COUNTED_TYPES
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (*name, sum(&|s| &s.queries_by_type[i])))
            .collect();
        queries_by_type.push(("other", sum(&|s| &s.queries_by_type[COUNTED_TYPES.len()])));
        let responses_by_rcode = (0..RCODES)
            .map(|i| (i as u16, sum(&|s| &s.responses_by_rcode[i])))
            .filter(|(_, n)| *n > 0)
            .collect();
        let mut latency_buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        let mut cumulative = 0;
        for i in 0..=LATENCY_BUCKETS.len() {
            cumulative += sum(&|s| &s.latency[i]);
            let bound = LATENCY_BUCKETS.get(i).map_or(u64::MAX, |(b, _)| *b);
            latency_buckets.push((bound, cumulative));
        }
        MetricsSnapshot {
            queries_by_type,
            responses_by_rcode,
            latency_buckets,
            latency_count: cumulative,
            latency_sum_ns: sum(&|s| &s.latency_sum_ns),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            prefetches: self.prefetches.load(Relaxed),
            prefetch_failures: self.prefetch_failures.load(Relaxed),
            upstream_errors: self.upstream_errors.load(Relaxed),
            shed: self.shed.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            tcp_refused: self.tcp_refused.load(Relaxed),
            upstreams: self
                .upstreams
                .iter()
                .map(|(zone, u)| UpstreamSnapshot {
                    zone: zone.clone(),
                    addr: u.addr,
                    requests: u.requests.load(Relaxed),
                    timeouts: u.timeouts.load(Relaxed),
                    errors: u.errors.load(Relaxed),
                    up: u.up.load(Relaxed),
                })
                .collect(),
        }
    }
}

/// Prometheus name of an rcode (`NOERROR`, ..., `BADVERS`), or its number.
pub(crate) fn rcode_name(rcode: u16) -> Option<&'static str> {
    Some(match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_right_bucket_and_sums_across_threads() {
        let m = Arc::new(Metrics::default());
        m.latency(Duration::from_micros(10)); // on the bound: le="1e-05"
        m.latency(Duration::from_micros(11));
        let other = Arc::clone(&m);
        std::thread::spawn(move || {
            other.latency(Duration::from_millis(3));
            other.latency(Duration::from_secs(9)); // past the last bound: +Inf only
            other.query(TYPE_AAAA);
            other.response(Rcode::NxDomain);
        })
        .join()
        .unwrap();
        m.query(TYPE_AAAA);
        m.query(65280);
        let s = m.snapshot();
        let at = |bound: u64| {
            s.latency_buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .unwrap()
                .1
        };
        assert_eq!(at(10_000), 1);
        assert_eq!(at(25_000), 2);
        assert_eq!(at(2_500_000), 2);
        assert_eq!(at(5_000_000), 3);
        assert_eq!(at(5_000_000_000), 3);
        assert_eq!(at(u64::MAX), 4);
        assert_eq!(s.latency_count, 4);
        assert_eq!(
            s.latency_sum_ns,
            10_000 + 11_000 + 3_000_000 + 9_000_000_000
        );
        assert_eq!((s.queries("AAAA"), s.queries("other")), (2, 1));
        assert_eq!(s.responses_by_rcode, vec![(3, 1)]);
    }
}
