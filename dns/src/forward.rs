//! Forwarding with a cache: names outside the cluster zones go to the upstreams (or to a stub
//! domain's servers: the longest configured zone the name is in); answers are kept for their
//! TTL (capped), negative answers for the SOA minimum (capped), and kept past expiry to be
//! served stale when every upstream fails (RFC 8767). Popular answers are refreshed in the
//! background shortly before they expire (prefetch, as CoreDNS's cache plugin does).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::upstream::Upstream;
use crate::wire::{self, Edns as ClientEdns, Rcode, CLASS_IN};

/// TTL of an answer served stale (RFC 8767 §4 suggests 30 s).
const STALE_TTL: u32 = 30;
/// Negative-caching TTL when an upstream's negative answer carries no SOA.
const NEGATIVE_WITHOUT_SOA: u32 = 30;

/// A query the index does not answer, owned so it can wait for the upstream.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub id: u16,
    pub flags: u16,
    /// The question as the client sent it.
    pub question: Vec<u8>,
    /// Lowercased wire-form name.
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<ClientEdns>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
}

struct Entry {
    msg: Arc<Message>,
    stored: Instant,
    ttl: u32,
    /// Queries answered from this entry, counting the one that filled it (prefetch's "asked
    /// at least N times").
    hits: u32,
    /// A background refresh of this entry is in flight (at most one per name).
    refreshing: bool,
}

/// When popular answers are refreshed ahead of expiry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefetch {
    /// Queries an entry must have answered (including the one that filled it).
    pub amount: u32,
    /// The tail of the TTL, in percent (1..=100), in which a query triggers the refresh.
    pub percent: u8,
}

impl Prefetch {
    /// `None` when either setting is 0.
    pub fn new(amount: u32, percent: u8) -> Option<Self> {
        (amount > 0 && percent > 0).then_some(Prefetch {
            amount,
            percent: percent.min(100),
        })
    }

    /// Whether an entry asked `hits` times, `age` into a TTL of `ttl` seconds, is due.
    fn due(&self, hits: u32, age: Duration, ttl: u32) -> bool {
        let ttl_ms = u64::from(ttl) * 1000;
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        hits >= self.amount && age_ms.saturating_mul(100) >= ttl_ms * u64::from(100 - self.percent)
    }
}

/// What the cache has for a query.
pub(crate) enum Cached {
    /// A fresh answer, rendered for this client, and its rcode.
    Hit(Vec<u8>, u16),
    /// Nothing fresh: ask upstream ([`Forwarder::fetch`]) with what may be served stale.
    Miss(Stale),
}

/// An expired answer kept for serve-stale, if the cache had one.
pub(crate) struct Stale(Option<Arc<Message>>);

pub(crate) struct Forwarder {
    upstream: Arc<dyn Upstream>,
    /// Stub domains: lowercased wire-form zone -> its servers.
    stubs: HashMap<Box<[u8]>, Arc<dyn Upstream>>,
    cache: Mutex<HashMap<Key, Entry>>,
    max_entries: usize,
    positive_cap: u32,
    negative_cap: u32,
    stale_window: Duration,
    udp_size: u16,
    prefetch: Option<Prefetch>,
    /// The server's bound on forwarded queries in flight; prefetches take a slot too.
    inflight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

pub(crate) struct ForwarderConfig {
    pub max_entries: usize,
    pub positive_cap: u32,
    pub negative_cap: u32,
    pub stale_window: Duration,
    pub udp_size: u16,
    pub prefetch: Option<Prefetch>,
}

impl Forwarder {
    /// `upstream` serves every name outside the `stubs` zones (lowercased wire form).
    pub fn new(
        upstream: Arc<dyn Upstream>,
        stubs: Vec<(Vec<u8>, Arc<dyn Upstream>)>,
        c: ForwarderConfig,
        inflight: Arc<Semaphore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Forwarder {
            upstream,
            stubs: stubs
                .into_iter()
                .map(|(zone, u)| (zone.into_boxed_slice(), u))
                .collect(),
            cache: Mutex::new(HashMap::new()),
            max_entries: c.max_entries,
            positive_cap: c.positive_cap,
            negative_cap: c.negative_cap,
            stale_window: c.stale_window,
            udp_size: c.udp_size,
            prefetch: c.prefetch,
            inflight,
            metrics,
        }
    }

    /// The servers for a name: those of the longest stub zone it is in, else the upstreams.
    fn upstream_for(&self, name: &[u8]) -> &Arc<dyn Upstream> {
        if !self.stubs.is_empty() {
            // Walk from the name up towards the root: the first zone found is the longest.
            let mut cur = Some(name);
            while let Some(n) = cur {
                if let Some(u) = self.stubs.get(n) {
                    return u;
                }
                cur = crate::name::parent(n);
            }
        }
        &self.upstream
    }

    /// The full answer to `p` (before any UDP truncation), and its rcode: from the cache, or
    /// from upstream.
    pub async fn resolve(self: &Arc<Self>, p: &Pending) -> (Vec<u8>, u16) {
        match self.from_cache(p) {
            Cached::Hit(answer, rcode) => (answer, rcode),
            Cached::Miss(stale) => self.fetch(p, stale).await,
        }
    }

    /// The answer to `p` if the cache has a fresh one (which may start a prefetch). No
    /// waiting, so it needs no in-flight slot.
    pub fn from_cache(self: &Arc<Self>, p: &Pending) -> Cached {
        let key = Key {
            name: p.name.clone().into_boxed_slice(),
            qtype: p.qtype,
            qclass: p.qclass,
        };
        let now = Instant::now();
        let (msg, age, refresh) = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(e) = cache.get_mut(&key) else {
                drop(cache);
                self.metrics.cache_misses.fetch_add(1, Relaxed);
                return Cached::Miss(Stale(None));
            };
            let age = now.saturating_duration_since(e.stored);
            if age >= Duration::from_secs(e.ttl.into()) {
                let stale = Arc::clone(&e.msg);
                drop(cache);
                self.metrics.cache_misses.fetch_add(1, Relaxed);
                return Cached::Miss(Stale(Some(stale)));
            }
            e.hits = e.hits.saturating_add(1);
            let refresh =
                !e.refreshing && self.prefetch.is_some_and(|pf| pf.due(e.hits, age, e.ttl));
            e.refreshing |= refresh;
            (Arc::clone(&e.msg), age.as_secs() as u32, refresh)
        };
        self.metrics.cache_hits.fetch_add(1, Relaxed);
        if refresh {
            self.start_prefetch(key, p.flags & 0x0010 != 0);
        }
        let (answer, rcode) = self.render(&msg, p, |ttl| ttl.saturating_sub(age));
        Cached::Hit(answer, rcode)
    }

    /// Asks upstream after a cache miss; when every upstream fails, serves `stale` (what the
    /// cache had past expiry) if there is one, else SERVFAIL.
    pub async fn fetch(&self, p: &Pending, stale: Stale) -> (Vec<u8>, u16) {
        match self.ask_upstream(&p.name, p.qtype, p.qclass, p.flags).await {
            Ok(msg) => {
                let msg = Arc::new(msg);
                if let Some(ttl) = self.cache_ttl(&msg) {
                    let key = Key {
                        name: p.name.clone().into_boxed_slice(),
                        qtype: p.qtype,
                        qclass: p.qclass,
                    };
                    self.insert(key, Arc::clone(&msg), ttl, 1);
                }
                self.render(&msg, p, |ttl| ttl)
            }
            Err(e) => {
                self.metrics.upstream_errors.fetch_add(1, Relaxed);
                if let Stale(Some(msg)) = stale {
                    tracing::debug!(error = %e, "upstreams failed; serving a stale answer");
                    self.metrics.stale_served.fetch_add(1, Relaxed);
                    return self.render(&msg, p, |_| STALE_TTL);
                }
                tracing::debug!(name = %crate::name::to_text(&p.name), error = %e, "upstreams failed; answering SERVFAIL");
                let mut out = Vec::new();
                let q = p.question_only();
                write_error(&mut out, &q, Rcode::ServFail, self.udp_size);
                (out, Rcode::ServFail as u16)
            }
        }
    }

    /// Refreshes a popular entry in the background, holding an in-flight slot; with none
    /// free, the refresh is skipped (a later query may try again).
    fn start_prefetch(self: &Arc<Self>, key: Key, cd: bool) {
        let Ok(permit) = Arc::clone(&self.inflight).try_acquire_owned() else {
            self.refresh_done(&key);
            return;
        };
        self.metrics.prefetches.fetch_add(1, Relaxed);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let flags = if cd { 0x0010 } else { 0 };
            match this
                .ask_upstream(&key.name, key.qtype, key.qclass, flags)
                .await
            {
                Ok(msg) => match this.cache_ttl(&msg) {
                    // A fresh entry: its count of queries starts again.
                    Some(ttl) => this.insert(key, Arc::new(msg), ttl, 0),
                    // The upstream now says not to cache it: stop answering from the cache.
                    None => {
                        this.cache
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&key);
                    }
                },
                Err(e) => {
                    this.metrics.upstream_errors.fetch_add(1, Relaxed);
                    this.metrics.prefetch_failures.fetch_add(1, Relaxed);
                    tracing::debug!(name = %crate::name::to_text(&key.name), error = %e, "prefetch failed; the cached answer stays until it expires");
                    this.refresh_done(&key);
                }
            }
            drop(permit);
        });
    }

    fn refresh_done(&self, key: &Key) {
        if let Some(e) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(key)
        {
            e.refreshing = false;
        }
    }

    /// Asks the servers for `name` (lowercased wire form); `flags` are the client's (CD is
    /// passed on).
    async fn ask_upstream(
        &self,
        name: &[u8],
        qtype: u16,
        qclass: u16,
        flags: u16,
    ) -> Result<Message, String> {
        let id: u16 = rand::random();
        let mut q = Vec::with_capacity(12 + name.len() + 4 + 11);
        // RD set, CD copied; EDNS0 so large answers come over UDP when they can.
        wire::write_header(&mut q, id, 0x0100 | (flags & 0x0010), [1, 0, 0, 1]);
        q.extend_from_slice(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&qclass.to_be_bytes());
        wire::write_opt(&mut q, self.udp_size, Rcode::NoError, false);
        let raw = self
            .upstream_for(name)
            .exchange(&q)
            .await
            .map_err(|e| e.to_string())?;
        let msg = Message::from_vec(&raw).map_err(|e| format!("undecodable answer: {e}"))?;
        let same_question = msg.queries.len() == 1 && {
            let mq = &msg.queries[0];
            u16::from(mq.query_type()) == qtype
                && crate::name::encode(&mq.name().to_ascii()).as_deref() == Some(name)
        };
        if msg.metadata.id != id
            || msg.metadata.message_type != MessageType::Response
            || !same_question
        {
            return Err("answer does not match the question".into());
        }
        match msg.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(msg),
            other => Err(format!("upstream answered {other}")),
        }
    }

    /// How long to keep an upstream answer, or `None` to not keep it.
    fn cache_ttl(&self, msg: &Message) -> Option<u32> {
        let ttl = if msg.metadata.response_code == ResponseCode::NoError && !msg.answers.is_empty()
        {
            msg.answers
                .iter()
                .map(|r| r.ttl)
                .min()?
                .min(self.positive_cap)
        } else {
            let soa = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            });
            soa.unwrap_or(NEGATIVE_WITHOUT_SOA).min(self.negative_cap)
        };
        (ttl > 0).then_some(ttl)
    }

    /// Caches an answer; `hits` is how many queries it has answered already.
    fn insert(&self, key: Key, msg: Arc<Message>, ttl: u32, hits: u32) {
        if self.max_entries == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.max_entries && !cache.contains_key(&key) {
            // Drop what is past even serve-stale, then, if still full, an eighth at random:
            // amortised O(1) per insert and a hard bound on memory.
            let now = Instant::now();
            let window = self.stale_window;
            cache.retain(|_, e| {
                now.saturating_duration_since(e.stored) < Duration::from_secs(e.ttl.into()) + window
            });
            if cache.len() >= self.max_entries {
                let evict: Vec<Key> = cache
                    .keys()
                    .take((self.max_entries / 8).max(1))
                    .cloned()
                    .collect();
                for k in evict {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Entry {
                msg,
                stored: Instant::now(),
                ttl,
                hits,
                refreshing: false,
            },
        );
    }

    /// Number of cached answers.
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Re-encodes a cached or fresh upstream answer for this client: its id, flags and EDNS,
    /// TTLs adjusted, and its question bytes exactly as sent.
    fn render(&self, msg: &Message, p: &Pending, ttl: impl Fn(u32) -> u32) -> (Vec<u8>, u16) {
        let mut m = msg.clone();
        m.metadata.id = p.id;
        m.metadata.authoritative = false;
        m.metadata.truncation = false;
        m.metadata.recursion_desired = p.flags & 0x0100 != 0;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = p.flags & 0x0010 != 0;
        for r in m
            .answers
            .iter_mut()
            .chain(&mut m.authorities)
            .chain(&mut m.additionals)
        {
            r.ttl = ttl(r.ttl);
        }
        m.edns = p.edns.map(|e| {
            let mut ours = Edns::new();
            ours.set_max_payload(self.udp_size);
            ours.set_dnssec_ok(e.dnssec_ok);
            ours
        });
        let rcode = u16::from(m.metadata.response_code);
        match m.to_vec() {
            Ok(mut out) => {
                // Same length (only the case may differ), so compression offsets still hold.
                if out.len() >= 12 + p.question.len() {
                    out[12..12 + p.question.len()].copy_from_slice(&p.question);
                }
                (out, rcode)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-encode an upstream answer; answering SERVFAIL");
                let mut out = Vec::new();
                write_error(&mut out, &p.question_only(), Rcode::ServFail, self.udp_size);
                (out, Rcode::ServFail as u16)
            }
        }
    }
}

/// The parts of a pending query needed to write a records-less answer.
pub(crate) struct QuestionOnly<'a> {
    pub id: u16,
    pub flags: u16,
    pub question: &'a [u8],
    pub edns: Option<ClientEdns>,
}

impl Pending {
    /// What a records-less answer to this query needs.
    pub(crate) fn question_only(&self) -> QuestionOnly<'_> {
        QuestionOnly {
            id: self.id,
            flags: self.flags,
            question: &self.question,
            edns: self.edns,
        }
    }
}

/// An answer with the question, no records, this rcode, and OPT if the client sent one.
pub(crate) fn write_error(out: &mut Vec<u8>, q: &QuestionOnly<'_>, rcode: Rcode, udp_size: u16) {
    wire::write_header(
        out,
        q.id,
        wire::response_flags(q.flags, false, rcode),
        [1, 0, 0, u16::from(q.edns.is_some())],
    );
    out.extend_from_slice(q.question);
    if let Some(e) = q.edns {
        wire::write_opt(out, udp_size, rcode, e.dnssec_ok);
    }
}

/// Cuts an over-long UDP answer down to header, question and OPT, with TC set.
pub(crate) fn truncate(full: &[u8], q: &QuestionOnly<'_>, udp_size: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + q.question.len() + 11);
    let flags = u16::from_be_bytes([full[2], full[3]]) | 0x0200;
    wire::write_header(
        &mut out,
        q.id,
        flags,
        [1, 0, 0, u16::from(q.edns.is_some())],
    );
    out.extend_from_slice(q.question);
    if let Some(e) = q.edns {
        wire::write_opt(&mut out, udp_size, Rcode::NoError, e.dnssec_ok);
    }
    out
}

/// Whether a forwarded query's class is one we forward at all.
pub(crate) fn forwardable_class(qclass: u16) -> bool {
    qclass == CLASS_IN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_due_for_popular_answers_in_the_tail_of_their_ttl() {
        // The defaults: asked twice, last 10% of the TTL.
        let pf = Prefetch::new(2, 10).unwrap();
        let ms = Duration::from_millis;
        assert!(pf.due(2, ms(27_000), 30));
        assert!(pf.due(9, ms(29_999), 30));
        assert!(!pf.due(2, ms(26_999), 30), "before the last 10%");
        assert!(!pf.due(1, ms(29_000), 30), "asked once: not popular");
        assert!(pf.due(2, ms(900), 1));
        assert!(!pf.due(2, ms(899), 1));
        assert!(Prefetch::new(0, 10).is_none() && Prefetch::new(2, 0).is_none());
        // 100%: any popular answer, at any age.
        assert!(Prefetch::new(1, 100).unwrap().due(1, ms(0), 30));
    }
}
