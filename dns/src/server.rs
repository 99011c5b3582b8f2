//! The server: UDP and TCP listeners answering from the index, forwarding the rest, following
//! the cluster's snapshots; and, when started, the admin HTTP server (metrics, health,
//! readiness).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use fairlead_core::Snapshot;
use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, ShedAction};
use crate::forward::{
    self, Cached, Forwarder, ForwarderConfig, Pending, Prefetch, QuestionOnly, Stale,
};
use crate::index::{Index, IndexConfig, Lookup};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::upstream::{NetworkUpstream, Upstream};
use crate::wire::{self, Rcode, Reject, Sections, TYPE_AXFR, TYPE_IXFR};

/// A TCP connection idle this long is closed (RFC 7766 suggests seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind DNS {transport} on {addr}: {source} (is another DNS server running there, or is the port privileged?)")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve DNS metrics, health and readiness on {addr}: {source} (is another process, e.g. CoreDNS, listening there? set FAIRLEAD_DNS_ADMIN_LISTEN to another address, or to off)")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What to do with one packet.
pub(crate) enum Outcome {
    /// The answer is in the output buffer.
    Reply,
    Forward(Pending),
    /// The index answered with a CNAME out of the cluster zone (ExternalName): the answer in
    /// the output buffer is completed with the target's records from the forwarder.
    Chase(Pending),
    Drop,
}

pub(crate) struct Shared {
    index: RwLock<Index>,
    ready: AtomicBool,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    udp_size: u16,
    shed: ShedAction,
    /// Listener loops (UDP workers and the TCP acceptor) started, and still running.
    listeners: AtomicUsize,
    listeners_live: AtomicUsize,
}

/// Counts a listener loop as live until it ends (returns, panics or is aborted).
struct Listening(Arc<Shared>);

impl Listening {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.listeners.fetch_add(1, Relaxed);
        shared.listeners_live.fetch_add(1, Relaxed);
        Listening(Arc::clone(shared))
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners_live.fetch_sub(1, Relaxed);
    }
}

impl Shared {
    /// With `upstream` `None`, the upstreams of `config` are used (and counted per server).
    pub(crate) fn new(
        config: &Config,
        upstream: Option<Arc<dyn Upstream>>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let index = Index::new(&IndexConfig {
            zone: config.zone.clone(),
            ttl: config.ttl,
            reverse_cidrs: config.reverse_nets()?,
            pods: config.pods,
        })
        .ok_or_else(|| ConfigError::Field {
            field: "zone",
            value: config.zone.clone(),
            reason: "not a DNS name".into(),
        })?;
        let timeout = config.upstream_timeout();
        let mut counted = Vec::new();
        let upstream = upstream.unwrap_or_else(|| {
            let network = NetworkUpstream::new(config.upstreams.clone(), timeout);
            counted.extend(
                network
                    .stats()
                    .iter()
                    .map(|s| (".".to_owned(), Arc::clone(s))),
            );
            Arc::new(network)
        });
        let mut stubs: Vec<(Vec<u8>, Arc<dyn Upstream>)> = Vec::new();
        for stub in config.stub_zones()? {
            let network = NetworkUpstream::new(stub.servers, timeout);
            counted.extend(
                network
                    .stats()
                    .iter()
                    .map(|s| (stub.text.clone(), Arc::clone(s))),
            );
            stubs.push((stub.name, Arc::new(network)));
        }
        let metrics = Arc::new(Metrics::new(counted));
        let inflight = Arc::new(Semaphore::new(config.max_inflight));
        Ok(Shared {
            index: RwLock::new(index),
            ready: AtomicBool::new(false),
            forwarder: Arc::new(Forwarder::new(
                upstream,
                stubs,
                ForwarderConfig {
                    max_entries: config.cache_entries,
                    positive_cap: config.cache_positive_ttl,
                    negative_cap: config.cache_negative_ttl,
                    stale_window: Duration::from_secs(config.serve_stale.into()),
                    udp_size: config.edns_udp_size,
                    prefetch: Prefetch::new(config.prefetch_amount, config.prefetch_percent),
                },
                Arc::clone(&inflight),
                Arc::clone(&metrics),
            )),
            metrics,
            inflight,
            max_inflight: config.max_inflight,
            udp_size: config.edns_udp_size,
            shed: config.shed,
            listeners: AtomicUsize::new(0),
            listeners_live: AtomicUsize::new(0),
        })
    }

    /// Whether the first ready snapshot has been applied.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// Generation of the snapshot the answers reflect, and the names the index holds.
    pub(crate) fn index_state(&self) -> (u64, usize) {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        (index.generation(), index.len())
    }

    pub(crate) fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn pod_mode(&self) -> crate::PodMode {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .pod_mode()
    }

    /// The first complete list of every watched kind is in the index: answer from it, and
    /// give the memory the list's transient objects used back to the system.
    pub(crate) fn mark_ready(&self) {
        let (generation, names) = self.index_state();
        self.ready.store(true, Relaxed);
        trim_heap();
        tracing::info!(generation, names, "cluster DNS index ready");
    }

    /// (listener loops started, still running).
    pub(crate) fn listeners(&self) -> (usize, usize) {
        (
            self.listeners.load(Relaxed),
            self.listeners_live.load(Relaxed),
        )
    }

    /// (forwarded queries and prefetches in flight, the bound).
    pub(crate) fn inflight(&self) -> (usize, usize) {
        let free = self.inflight.available_permits();
        (self.max_inflight.saturating_sub(free), self.max_inflight)
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn cached_answers(&self) -> usize {
        self.forwarder.cached()
    }

    /// Applies a snapshot to the index (ignored until the snapshot is ready).
    pub(crate) fn apply(&self, snap: Arc<Snapshot>) {
        if !snap.ready {
            return;
        }
        let generation = snap.generation;
        let stats = self.index_mut().apply(snap);
        self.ready.store(true, Relaxed);
        tracing::debug!(generation, ?stats, "DNS index updated");
    }

    /// Answers one packet from the index into `out`, or says it must be forwarded or dropped.
    /// `udp` is whether the answer goes back over UDP (and so may need truncating).
    pub(crate) fn handle(&self, packet: &[u8], out: &mut Vec<u8>, udp: bool) -> Outcome {
        let q = match wire::parse(packet) {
            Ok(q) => q,
            Err(Reject::Drop) => {
                self.metrics.dropped.fetch_add(1, Relaxed);
                return Outcome::Drop;
            }
            Err(Reject::FormErr { id, flags }) => {
                wire::write_formerr(out, id, flags);
                self.metrics.response(Rcode::FormErr);
                return Outcome::Reply;
            }
        };
        self.metrics.query(q.qtype);
        let limit = if udp {
            q.udp_limit(self.udp_size)
        } else {
            usize::from(u16::MAX)
        };
        let error = |rcode: Rcode, out: &mut Vec<u8>| {
            let s = Sections {
                rcode,
                authoritative: false,
                answers: &[],
                authority: None,
            };
            wire::write_response(out, &q, &s, self.udp_size, limit);
            self.metrics.response(rcode);
            Outcome::Reply
        };
        if q.opcode() != 0 {
            return error(Rcode::NotImp, out);
        }
        if q.edns.is_some_and(|e| e.version > 0) {
            return error(Rcode::BadVers, out);
        }
        if !forward::forwardable_class(q.qclass) || matches!(q.qtype, TYPE_AXFR | TYPE_IXFR) {
            return error(Rcode::Refused, out);
        }
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        match index.lookup(q.name(), q.qtype) {
            Lookup::Answer { .. } if !self.ready.load(Relaxed) => {
                // Not listed yet: a missing name may only be unlisted. Let the client retry.
                error(Rcode::ServFail, out)
            }
            Lookup::Answer {
                rcode,
                answers,
                authority,
                chase,
            } => {
                let s = Sections {
                    rcode,
                    authoritative: true,
                    answers: &answers,
                    authority,
                };
                if wire::write_response(out, &q, &s, self.udp_size, limit) {
                    self.metrics.truncated.fetch_add(1, Relaxed);
                }
                match chase {
                    Some(target) if q.qtype != wire::TYPE_CNAME => {
                        let mut question = target.clone();
                        question.extend_from_slice(&q.qtype.to_be_bytes());
                        question.extend_from_slice(&q.qclass.to_be_bytes());
                        Outcome::Chase(Pending {
                            id: q.id,
                            flags: q.flags,
                            question,
                            name: target,
                            qtype: q.qtype,
                            qclass: q.qclass,
                            edns: q.edns,
                        })
                    }
                    _ => {
                        self.metrics.response(rcode);
                        Outcome::Reply
                    }
                }
            }
            Lookup::NotOurs => Outcome::Forward(Pending {
                id: q.id,
                flags: q.flags,
                question: q.question.to_vec(),
                name: q.name().to_vec(),
                qtype: q.qtype,
                qclass: q.qclass,
                edns: q.edns,
            }),
        }
    }

    /// The largest answer the client takes: its EDNS size (bounded by ours) or
    /// 512 bytes over UDP, anything over TCP.
    fn size_limit(&self, p: &Pending, udp: bool) -> usize {
        match p.edns {
            Some(e) if udp => usize::from(e.udp_size.clamp(512, self.udp_size.max(512))),
            None if udp => wire::CLASSIC_UDP,
            _ => usize::from(u16::MAX),
        }
    }

    /// A forwarded answer for the client: rcode counted, truncated for UDP when it does not
    /// fit.
    fn finish(&self, p: &Pending, full: Vec<u8>, rcode: u16, udp: bool) -> Vec<u8> {
        self.metrics.response_code(rcode);
        let limit = self.size_limit(p, udp);
        if full.len() > limit {
            self.metrics.truncated.fetch_add(1, Relaxed);
            return forward::truncate(&full, &p.question_only(), self.udp_size);
        }
        full
    }

    /// The answer to a forwarded query from the cache, when it has a fresh one. Takes no
    /// in-flight slot: only queries that wait for an upstream count against the bound.
    pub(crate) fn forward_cached(&self, p: &Pending, udp: bool) -> Result<Vec<u8>, Stale> {
        match self.forwarder.from_cache(p) {
            Cached::Hit(full, rcode) => Ok(self.finish(p, full, rcode, udp)),
            Cached::Miss(stale) => Err(stale),
        }
    }

    /// The answer to a forwarded query the cache did not have, from upstream (the caller
    /// holds an in-flight slot).
    pub(crate) async fn forward(&self, p: &Pending, stale: Stale, udp: bool) -> Vec<u8> {
        let (full, rcode) = self.forwarder.fetch(p, stale).await;
        self.finish(p, full, rcode, udp)
    }

    /// Completes a CNAME answer (`partial`, written for TCP size) with what the forwarder has
    /// for its target (`p`); the result is truncated for UDP when it does not fit.
    pub(crate) async fn chase(&self, partial: &[u8], p: &Pending, udp: bool) -> Vec<u8> {
        let (upstream, _) = self.forwarder.resolve(p).await;
        let (Ok(mut m), Ok(up)) = (Message::from_vec(partial), Message::from_vec(&upstream)) else {
            self.metrics.response(Rcode::NoError);
            return partial.to_vec();
        };
        m.answers.extend(up.answers);
        if up.metadata.response_code == ResponseCode::NXDomain {
            m.metadata.response_code = ResponseCode::NXDomain;
            m.authorities = up.authorities;
        }
        self.metrics
            .response_code(u16::from(m.metadata.response_code));
        let full = match m.to_vec() {
            Ok(mut v) => {
                // The client's question, as sent (same length, so offsets hold).
                let qlen = partial.len().min(v.len());
                let end = 12 + question_len(partial).min(qlen.saturating_sub(12));
                v[12..end].copy_from_slice(&partial[12..end]);
                v
            }
            Err(_) => return partial.to_vec(),
        };
        let limit = self.size_limit(p, udp);
        if full.len() > limit {
            self.metrics.truncated.fetch_add(1, Relaxed);
            let q = QuestionOnly {
                id: p.id,
                flags: p.flags,
                question: &partial[12..12 + question_len(partial)],
                edns: p.edns,
            };
            return forward::truncate(&full, &q, self.udp_size);
        }
        full
    }

    /// What to answer when the forwarder is full: REFUSED, or nothing.
    fn shed(&self, p: &Pending, out: &mut Vec<u8>) -> bool {
        self.metrics.shed.fetch_add(1, Relaxed);
        match self.shed {
            ShedAction::Drop => false,
            ShedAction::Refuse => {
                forward::write_error(out, &p.question_only(), Rcode::Refused, self.udp_size);
                self.metrics.response(Rcode::Refused);
                true
            }
        }
    }
}

/// Length of the (uncompressed) question of a message we wrote.
fn question_len(msg: &[u8]) -> usize {
    let mut at = 12;
    while let Some(&len) = msg.get(at) {
        at += 1 + len as usize;
        if len == 0 {
            break;
        }
    }
    (at + 4).min(msg.len()).saturating_sub(12)
}

/// Returns freed heap memory to the system (glibc keeps it otherwise: a list passes every
/// object through the allocator once, and that high-water mark would stay resident).
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations of 64 KiB and more (API list pages and their decoded objects' buffers) get their
/// own mappings, returned to the system when freed. glibc otherwise raises this threshold after
/// such a block is freed, and later pages come from the heap, where the small long-lived
/// allocations made while reading them pin the pages (about 1.5 MiB resident at 10,000
/// Services, measured with the footprint example).
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets a glibc tunable; it allocates nothing and may be called any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Where the server learns the cluster from.
enum Source {
    /// Snapshots from the shared `fairlead_core` watch (tests, the sandbox, embedders).
    Snapshots(watch::Receiver<Arc<Snapshot>>),
    /// Its own watchers on the API server ([`crate::watch`]), as `fairlead dns` runs.
    Api(kube::Client, kube::runtime::watcher::Config),
}

/// A running DNS server. Dropping it stops every task it started (the admin server too).
pub struct Server {
    shared: Arc<Shared>,
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Server {
    /// Binds UDP and TCP on `config.listen`, forwards to `config.upstreams`, and follows
    /// `snapshots` (answers for the cluster zone are SERVFAIL until the first ready snapshot).
    ///
    /// The admin HTTP server (`config.admin_listen`) is not started here, so that tests and
    /// embedders binding many servers do not contend for its port: call
    /// [`Server::start_admin`], as `fairlead dns` does.
    pub async fn bind(
        config: Config,
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Result<Server, ServerError> {
        let (udp, tcp) = bind_pair(config.listen).await?;
        Self::serve(config, Source::Snapshots(snapshots), None, udp, tcp)
    }

    /// Binds as [`Server::bind`], and learns the cluster from its own watchers on the API
    /// server behind `client`: Services and EndpointSlices, and Pods only in `verified` pod
    /// mode, each converted at once to compact DNS data (no `fairlead_core::Snapshot` is
    /// kept). Ready once each has been listed. This is what `fairlead dns` runs.
    pub async fn bind_api(config: Config, client: kube::Client) -> Result<Server, ServerError> {
        Self::bind_api_with(config, client, Default::default()).await
    }

    /// [`Server::bind_api`] with a watcher configuration (e.g. shorter timeouts in tests).
    pub async fn bind_api_with(
        config: Config,
        client: kube::Client,
        watcher: kube::runtime::watcher::Config,
    ) -> Result<Server, ServerError> {
        fix_mmap_threshold();
        let (udp, tcp) = bind_pair(config.listen).await?;
        Self::serve(config, Source::Api(client, watcher), None, udp, tcp)
    }

    /// As [`Server::bind`], with the given upstream for names outside the cluster zone and
    /// the stub domains (tests put a fake one here; stub domains still use their servers).
    /// Its servers have no per-upstream series in the metrics.
    pub async fn bind_with_upstream(
        config: Config,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Server, ServerError> {
        let (udp, tcp) = bind_pair(config.listen).await?;
        Self::serve(
            config,
            Source::Snapshots(snapshots),
            Some(upstream),
            udp,
            tcp,
        )
    }

    /// Serves on sockets the caller bound (e.g. inside another network namespace, as the
    /// sandbox does for its DNS pod). Must run inside a Tokio runtime.
    pub fn serve_sockets(
        config: Config,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<Server, ServerError> {
        let (udp, tcp) = adopt(&config, udp, tcp)?;
        Self::serve(config, Source::Snapshots(snapshots), None, udp, tcp)
    }

    /// Serves on sockets the caller bound, learning the cluster from its own watchers on the
    /// API server behind `client`, as [`Server::bind_api`] (the path `fairlead dns` runs; the
    /// sandbox's DNS pod uses it). Must run inside a Tokio runtime. Unlike `bind_api` it
    /// leaves the process's allocator settings alone (the caller may be hosting more).
    pub fn serve_sockets_api(
        config: Config,
        client: kube::Client,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<Server, ServerError> {
        let (udp, tcp) = adopt(&config, udp, tcp)?;
        Self::serve(
            config,
            Source::Api(client, Default::default()),
            None,
            udp,
            tcp,
        )
    }

    fn serve(
        config: Config,
        source: Source,
        upstream: Option<Arc<dyn Upstream>>,
        udp: UdpSocket,
        tcp: TcpListener,
    ) -> Result<Server, ServerError> {
        let shared = Arc::new(Shared::new(&config, upstream)?);
        let udp_addr = udp.local_addr().map_err(|source| ServerError::Bind {
            transport: "UDP",
            addr: config.listen,
            source,
        })?;
        let tcp_addr = tcp.local_addr().map_err(|source| ServerError::Bind {
            transport: "TCP",
            addr: config.listen,
            source,
        })?;
        let mut tasks = match source {
            Source::Snapshots(mut snapshots) => {
                shared.apply(snapshots.borrow_and_update().clone());
                let follower = Arc::clone(&shared);
                vec![tokio::spawn(async move {
                    while snapshots.changed().await.is_ok() {
                        let snap = snapshots.borrow_and_update().clone();
                        follower.apply(snap);
                    }
                    tracing::info!(
                        "snapshot source closed; serving the last applied cluster state"
                    );
                })]
            }
            Source::Api(client, watcher) => crate::watch::spawn(&shared, client, watcher),
        };
        let udp = Arc::new(udp);
        let workers = match config.udp_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        for _ in 0..workers {
            let live = Listening::new(&shared);
            tasks.push(tokio::spawn(udp_loop(
                Arc::clone(&shared),
                Arc::clone(&udp),
                Arc::clone(&turn),
                live,
            )));
        }
        let live = Listening::new(&shared);
        tasks.push(tokio::spawn(tcp_loop(
            Arc::clone(&shared),
            tcp,
            Arc::new(Semaphore::new(config.max_tcp_connections)),
            live,
        )));
        tracing::info!(%udp_addr, %tcp_addr, zone = %config.zone, "DNS server listening");
        Ok(Server {
            shared,
            udp_addr,
            tcp_addr,
            admin_addr: None,
            tasks,
        })
    }

    /// Starts the admin HTTP server on `addr` (`config.admin_listen`; CoreDNS's metrics port
    /// is 9153): `GET /metrics` (Prometheus text format), `/health` (200 while every UDP and
    /// TCP listener runs) and `/ready` (200 once the first complete snapshot of the cluster
    /// is applied, 503 with the reason before). It stops when the server is dropped. Returns
    /// the bound address (useful with port 0).
    pub async fn start_admin(&mut self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::AdminBind { addr, source })?;
        self.serve_admin(listener, addr)
    }

    /// As [`Server::start_admin`], on a listener the caller bound (e.g. inside a pod's network
    /// namespace). Must run inside a Tokio runtime.
    pub fn start_admin_on(
        &mut self,
        listener: std::net::TcpListener,
    ) -> Result<SocketAddr, ServerError> {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let wrap = |source| ServerError::AdminBind { addr, source };
        listener.set_nonblocking(true).map_err(wrap)?;
        let listener = TcpListener::from_std(listener).map_err(wrap)?;
        self.serve_admin(listener, addr)
    }

    fn serve_admin(
        &mut self,
        listener: TcpListener,
        addr: SocketAddr,
    ) -> Result<SocketAddr, ServerError> {
        let bound = listener
            .local_addr()
            .map_err(|source| ServerError::AdminBind { addr, source })?;
        self.tasks.push(tokio::spawn(crate::admin::serve(
            Arc::clone(&self.shared),
            listener,
        )));
        self.admin_addr = Some(bound);
        tracing::info!(admin = %bound, "DNS metrics, health and readiness over HTTP");
        Ok(bound)
    }

    /// Where the admin HTTP server listens, once started.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Whether the first complete snapshot of the cluster has been applied (what `/ready`
    /// reports).
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// Generation of the snapshot the answers reflect.
    pub fn applied_generation(&self) -> u64 {
        self.shared.index_state().0
    }

    /// Forwarded answers currently cached.
    pub fn cached_answers(&self) -> usize {
        self.shared.cached_answers()
    }
}

/// Sockets the caller bound, made non-blocking and handed to the runtime.
fn adopt(
    config: &Config,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
) -> Result<(UdpSocket, TcpListener), ServerError> {
    let wrap = |transport, source| ServerError::Bind {
        transport,
        addr: config.listen,
        source,
    };
    udp.set_nonblocking(true).map_err(|e| wrap("UDP", e))?;
    tcp.set_nonblocking(true).map_err(|e| wrap("TCP", e))?;
    Ok((
        UdpSocket::from_std(udp).map_err(|e| wrap("UDP", e))?,
        TcpListener::from_std(tcp).map_err(|e| wrap("TCP", e))?,
    ))
}

/// UDP and TCP on one port. With port 0 the kernel picks the UDP port; TCP may find it taken,
/// so a few attempts are made.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), ServerError> {
    let mut last = None;
    for _ in 0..if addr.port() == 0 { 8 } else { 1 } {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                transport: "UDP",
                addr,
                source,
            })?;
        let port_addr = udp.local_addr().map_err(|source| ServerError::Bind {
            transport: "UDP",
            addr,
            source,
        })?;
        match TcpListener::bind(port_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) => {
                last = Some(ServerError::Bind {
                    transport: "TCP",
                    addr: port_addr,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ServerError::Bind {
        transport: "TCP",
        addr,
        source: std::io::Error::other("no attempt made"),
    }))
}

/// A chase shed at the in-flight bound still gives its CNAME answer, as far as it goes.
fn chase_shed(shared: &Shared) {
    shared.metrics.shed.fetch_add(1, Relaxed);
    shared.metrics.response(Rcode::NoError);
}

/// Answers taken together before one send: under load the loop drains what the socket holds
/// (up to this many) and sends the answers with one `sendmmsg`. On loopback each send also
/// runs the client's receive and wakes it; a batch wakes it once.
const UDP_BATCH: usize = 32;

/// One receive loop. The loops share the socket and take turns to wait on it (`turn`), so
/// that only one is woken per datagram (tokio wakes every task waiting on a socket, and all
/// but one would find nothing): the one whose turn it is drains and answers a batch, and
/// hands the turn on before it sends, so one loop receives while another sends.
async fn udp_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    turn: Arc<tokio::sync::Mutex<()>>,
    _live: Listening,
) {
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    let mut batch = crate::mmsg::Batch::new(UDP_BATCH);
    loop {
        let my_turn = turn.lock().await;
        let mut next = match socket.recv_from(&mut buf).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        // Latency is from here to the answer handed to the socket (every answer is timed;
        // dropped packets are not).
        let start = Instant::now();
        // At most a batch of datagrams per turn, counted as received (not answered), so a
        // flood, even of queries that are dropped, never keeps the loop from yielding.
        let mut taken = 0;
        while let Some((n, peer)) = next.take() {
            taken += 1;
            udp_query(
                &shared,
                &socket,
                &buf[..n],
                peer,
                start,
                &mut out,
                &mut batch,
            );
            if taken < UDP_BATCH {
                next = socket.try_recv_from(&mut buf).ok();
            }
        }
        drop(my_turn);
        let sent = batch.send(&socket).await;
        for _ in 0..sent {
            shared.metrics.latency(start.elapsed());
        }
    }
}

/// One UDP query: an answer at hand goes into `batch`; one that needs an upstream is
/// answered from a task.
fn udp_query(
    shared: &Arc<Shared>,
    socket: &Arc<UdpSocket>,
    query: &[u8],
    peer: SocketAddr,
    start: Instant,
    out: &mut Vec<u8>,
    batch: &mut crate::mmsg::Batch,
) {
    match shared.handle(query, out, true) {
        Outcome::Reply => batch.push(out, peer),
        Outcome::Drop => {}
        Outcome::Forward(p) => match shared.forward_cached(&p, true) {
            Ok(mut answer) => batch.push(&mut answer, peer),
            Err(stale) => match Arc::clone(&shared.inflight).try_acquire_owned() {
                Ok(permit) => {
                    let shared = Arc::clone(shared);
                    let socket = Arc::clone(socket);
                    tokio::spawn(async move {
                        let answer = shared.forward(&p, stale, true).await;
                        let _ = socket.send_to(&answer, peer).await;
                        shared.metrics.latency(start.elapsed());
                        drop(permit);
                    });
                }
                Err(_) => {
                    if shared.shed(&p, out) {
                        batch.push(out, peer);
                    }
                }
            },
        },
        Outcome::Chase(p) => match Arc::clone(&shared.inflight).try_acquire_owned() {
            Ok(permit) => {
                let shared = Arc::clone(shared);
                let socket = Arc::clone(socket);
                let partial = out.clone();
                tokio::spawn(async move {
                    let answer = shared.chase(&partial, &p, true).await;
                    let _ = socket.send_to(&answer, peer).await;
                    shared.metrics.latency(start.elapsed());
                    drop(permit);
                });
            }
            Err(_) => {
                // Shed; the CNAME answer is still worth giving.
                chase_shed(shared);
                batch.push(out, peer);
            }
        },
    }
}

async fn tcp_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    conns: Arc<Semaphore>,
    _live: Listening,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&conns).try_acquire_owned() else {
            shared.metrics.tcp_refused.fetch_add(1, Relaxed);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = tcp_conn(&shared, stream).await;
            drop(permit);
        });
    }
}

async fn tcp_conn(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(4096);
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return Ok(()),
        };
        buf.resize(len, 0);
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let start = Instant::now();
        let answer: &[u8] = match shared.handle(&buf, &mut out, false) {
            Outcome::Reply => &out,
            Outcome::Drop => continue,
            Outcome::Chase(p) => match Arc::clone(&shared.inflight).try_acquire_owned() {
                Ok(_permit) => {
                    out = shared.chase(&out, &p, false).await;
                    &out
                }
                Err(_) => {
                    chase_shed(shared);
                    &out
                }
            },
            Outcome::Forward(p) => match shared.forward_cached(&p, false) {
                Ok(answer) => {
                    out = answer;
                    &out
                }
                Err(stale) => match Arc::clone(&shared.inflight).try_acquire_owned() {
                    Ok(_permit) => {
                        out = shared.forward(&p, stale, false).await;
                        &out
                    }
                    Err(_) => {
                        if !shared.shed(&p, &mut out) {
                            continue;
                        }
                        &out
                    }
                },
            },
        };
        let mut framed = Vec::with_capacity(2 + answer.len());
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(answer);
        stream.write_all(&framed).await?;
        shared.metrics.latency(start.elapsed());
    }
}
