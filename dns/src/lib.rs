//! The cluster DNS of Fairlead (`fairlead dns`): service discovery per the Kubernetes
//! DNS-Based Service Discovery specification, schema 1.0.1, for the cluster zone (default
//! `cluster.local`), and forwarding with a cache for every other name. It runs behind the
//! `kube-dns` Service (10.96.0.10).
//!
//! Data flow (`fairlead dns`, [`Server::bind_api`]): API server -> kube-rs watchers on Services
//! and EndpointSlices only (Pods too in `verified` pod mode), through
//! `fairlead_core::watch::watch_kind` -> each object converted at once into compact DNS data
//! (`model`: names, named ports, addresses, endpoint hostnames and readiness; namespaces
//! interned) -> [`Index`] (only the Services whose object or slices changed are regenerated)
//! -> UDP/TCP answers. Pod names `a-b-c-d.<ns>.pod.<zone>` are answered from the query name
//! ([`PodMode`], as CoreDNS's `pods` option), so no Pod is held by default. [`Server::bind`]
//! takes the shared `watch::Receiver<Arc<Snapshot>>` instead (tests, the sandbox). Names
//! outside the cluster zone (and reverse names outside the configured CIDRs) go to an
//! [`Upstream`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = fairlead_dns::Config::from_env()?;
//! let client = kube::Client::try_default().await?;
//! let server = fairlead_dns::Server::bind_api(config, client).await?;
//! println!("serving on {}", server.udp_addr());
//! # Ok(()) }
//! ```
//!
//! # Design: answers are hash lookups over pre-encoded bytes
//!
//! The benchmark target is more queries per second than Knot DNS on 2 cores, with 10,000
//! Services and 50,000 pods in under 20 MiB. So the answer path does no parsing into objects,
//! no name formatting and no record encoding:
//!
//! * The index is one `HashMap` keyed by the **lowercased wire-form name**; its value holds that
//!   name's records as **pre-encoded RRs** (type, class, TTL, rdata) whose owner is the two-byte
//!   compression pointer `C0 0C`, i.e. the question. An answer is: parse header and question into
//!   a stack buffer (lowercasing as it goes), one hash lookup, then copy header, question and
//!   the matching records into a reused buffer. The type is a filter over the few records of
//!   that name, which also decides NXDOMAIN (no name) against NODATA (name, no record of that
//!   type; empty non-terminals are counted) in the same lookup.
//! * Memory per record is its encoded bytes (16 bytes for an A record) plus a small header;
//!   names are stored once.
//! * Updates: each record remembers its owner (a Service with its EndpointSlices). A changed
//!   object has its Service's old records (regenerated from the compact state held, so no
//!   per-owner name list is kept) removed and new ones added. Readers take a read lock; an
//!   update holds the write lock only for a batch of changed objects.
//! * hickory-proto is used where its allocations do not matter: forwarded and cached answers,
//!   and every test decodes our answers with it, an independent check of the hand-written
//!   encoder.

mod admin;
mod config;
mod forward;
mod index;
mod metrics;
mod mmsg;
mod model;
mod name;
mod records;
mod server;
mod table;
mod upstream;
mod watch;
mod wire;

pub use config::{Config, ConfigError, PodMode, ShedAction};
pub use index::{Index, IndexConfig, UpdateStats};
pub use metrics::{Metrics, MetricsSnapshot, UpstreamSnapshot};
pub use records::SCHEMA_VERSION;
pub use server::{Server, ServerError};
pub use upstream::{NetworkUpstream, Upstream, UpstreamError};
pub use wire::Rcode;

/// Answers one query packet from an index alone, as the server's UDP path does (forwarding
/// is not attempted: names outside the cluster zones get REFUSED here). For tests, fuzzing
/// and benchmarks of the answer path.
pub fn answer_from_index(index: &Index, packet: &[u8], udp_size: u16) -> Option<Vec<u8>> {
    use wire::{Reject, Sections};
    let mut out = Vec::new();
    let q = match wire::parse(packet) {
        Ok(q) => q,
        Err(Reject::Drop) => return None,
        Err(Reject::FormErr { id, flags }) => {
            wire::write_formerr(&mut out, id, flags);
            return Some(out);
        }
    };
    let limit = q.udp_limit(udp_size);
    let s = match index.lookup(q.name(), q.qtype) {
        index::Lookup::Answer {
            rcode,
            answers,
            authority,
            ..
        } => {
            wire::write_response(
                &mut out,
                &q,
                &Sections {
                    rcode,
                    authoritative: true,
                    answers: &answers,
                    authority,
                },
                udp_size,
                limit,
            );
            return Some(out);
        }
        index::Lookup::NotOurs => Sections {
            rcode: Rcode::Refused,
            authoritative: false,
            answers: &[],
            authority: None,
        },
    };
    wire::write_response(&mut out, &q, &s, udp_size, limit);
    Some(out)
}
