//! Counters of the server, lock-free. Prometheus exposition reads [`Metrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

#[derive(Default)]
pub struct Metrics {
    queries_by_type: [AtomicU64; COUNTED_TYPES.len() + 1],
    /// Index = rcode (0..=15), and 16 for BADVERS.
    responses_by_rcode: [AtomicU64; 17],
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) shed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) truncated: AtomicU64,
    pub(crate) tcp_refused: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// (type name, count); the last entry is `other`.
    pub queries_by_type: Vec<(&'static str, u64)>,
    /// (rcode, count) for every rcode answered at least once.
    pub responses_by_rcode: Vec<(u16, u64)>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub stale_served: u64,
    pub upstream_errors: u64,
    /// Queries refused or dropped because the forwarder was at its in-flight bound.
    pub shed: u64,
    /// Packets dropped unanswered (no header, or a response).
    pub dropped: u64,
    /// UDP answers sent with TC set.
    pub truncated: u64,
    /// TCP connections closed at once because of the connection bound.
    pub tcp_refused: u64,
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
}

impl Metrics {
    pub(crate) fn query(&self, qtype: u16) {
        let i = COUNTED_TYPES
            .iter()
            .position(|(_, t)| *t == qtype)
            .unwrap_or(COUNTED_TYPES.len());
        self.queries_by_type[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn response(&self, rcode: Rcode) {
        self.response_code(rcode as u16);
    }

    pub(crate) fn response_code(&self, rcode: u16) {
        self.responses_by_rcode[usize::from(rcode.min(16))].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut queries_by_type: Vec<_> = COUNTED_TYPES
            .iter()
            .zip(&self.queries_by_type)
            .map(|((name, _), n)| (*name, n.load(Relaxed)))
            .collect();
        queries_by_type.push((
            "other",
            self.queries_by_type[COUNTED_TYPES.len()].load(Relaxed),
        ));
        MetricsSnapshot {
            queries_by_type,
            responses_by_rcode: self
                .responses_by_rcode
                .iter()
                .enumerate()
                .map(|(i, n)| (i as u16, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            upstream_errors: self.upstream_errors.load(Relaxed),
            shed: self.shed.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            tcp_refused: self.tcp_refused.load(Relaxed),
        }
    }
}
