//! The lab and the load shared by the datapath benches: three network
//! namespaces (client ─ router ─ backend) from fairlead-testkit, a backend
//! that answers as every endpoint, and the client's connection-rate and
//! stream loops. Moved out of `lb_scale.rs` unchanged so that
//! `benches/policy/policy_cost.rs` measures on exactly the same topology with
//! exactly the same load (it includes this file and `datapath.rs` with
//! `#[path]`); both benches refer to `crate::datapath::Router`.
//!
//! ```text
//!  client 10.244.0.2 ── 10.244.0.1 [router: forwards, holds the datapath] 10.245.0.1 ── 10.245.0.2 backend
//! ```
//!
//! The client routes the Service CIDR (10.96.0.0/12) and the endpoint range
//! (10.244.128.0/17) to the router; the router routes the endpoint range to
//! the backend, which has a `local` route for the whole range on `lo` and one
//! listener on 0.0.0.0:8080, so it answers as every endpoint, and which
//! routes the client back through the router.

use std::{
    io::{self, Read, Write},
    mem::size_of,
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use fairlead_testkit::{Netns, Veth};

use crate::datapath::Router;

/// What the backend listens on (every endpoint's port).
pub const TARGET_PORT: u16 = 8080;
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const ENDPOINT_CIDR: &str = "10.244.128.0/17";
pub const CLIENT_CIDR: &str = "10.244.0.0/24";
pub const CLIENT_ADDR: &str = "10.244.0.2/24";
pub const ROUTER_CLIENT_ADDR: &str = "10.244.0.1";
pub const ROUTER_BACKEND_ADDR: &str = "10.245.0.1";
pub const BACKEND_ADDR: &str = "10.245.0.2";
/// Endpoint k of the run is `ENDPOINT_BASE + 1 + k`.
pub const ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 128, 0);

/// Upper bound of connections in one rate measurement.
pub const CONNECT_CAP: usize = 200_000;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const WARMUP: usize = 100;
/// The backend's accept queue (the namespace's somaxconn is 4096).
pub const BACKLOG: i32 = 4096;
/// Pause between phases, so one phase's leftovers (conntrack, softirq
/// backlog) do not land in the next one's figures.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Set by SIGINT/SIGTERM: loops stop, and the bench unwinds through its
/// guards (cleanup) instead of dying with namespaces and pins in place.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`STOP`].
/// A duration in seconds from the environment variable `name` (0.2 to 30), or `default`.
pub fn secs_var(name: &str, default: f64) -> Result<Duration> {
    let secs = match std::env::var(name) {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| (0.2..=30.0).contains(s))
            .with_context(|| format!("{name} takes seconds from 0.2 to 30, not {v:?}"))?,
        Err(_) => default,
    };
    Ok(Duration::from_secs_f64(secs))
}

pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Endpoint k: an address in the endpoint range, on [`TARGET_PORT`].
pub fn endpoint(k: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(ENDPOINT_BASE) + 1 + k as u32),
        TARGET_PORT,
    )
}

// ---------------------------------------------------------------------------
// The topology.

/// Fields drop in order: the backend server, the links, then the
/// namespaces (which take everything inside them along).
pub struct Lab {
    pub backend_server: Backend,
    _links: [Veth; 2],
    pub router: Router,
    pub client: Netns,
    pub router_ns: Netns,
    pub backend: Netns,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let client = Netns::new()?;
        let router_ns = Netns::new()?;
        let backend = Netns::new()?;
        let to_client = Veth::new(&client, "eth0", &router_ns, "cl0")?;
        let to_backend = Veth::new(&router_ns, "be0", &backend, "eth0")?;

        client.add_addr("eth0", CLIENT_ADDR)?;
        client.link_up("eth0")?;
        for dst in [SERVICE_CIDR, ENDPOINT_CIDR] {
            client.ip(&["route", "add", dst, "via", ROUTER_CLIENT_ADDR])?;
        }

        router_ns.add_addr("cl0", &format!("{ROUTER_CLIENT_ADDR}/24"))?;
        router_ns.add_addr("be0", &format!("{ROUTER_BACKEND_ADDR}/30"))?;
        router_ns.link_up("cl0")?;
        router_ns.link_up("be0")?;
        router_ns.ip(&["route", "add", ENDPOINT_CIDR, "via", BACKEND_ADDR])?;
        sysctl_in(&router_ns, "net.ipv4.ip_forward", "1")?;

        backend.add_addr("eth0", &format!("{BACKEND_ADDR}/30"))?;
        backend.link_up("eth0")?;
        backend.ip(&["route", "add", "local", ENDPOINT_CIDR, "dev", "lo"])?;
        backend.ip(&["route", "add", CLIENT_CIDR, "via", ROUTER_BACKEND_ADDR])?;

        let router = Router {
            netns_name: router_ns.name().to_owned(),
            netns_path: router_ns.path(),
            client_if: "cl0".into(),
            client_ifindex: router_ns.ifindex("cl0")?,
            backend_if: "be0".into(),
            backend_ifindex: router_ns.ifindex("be0")?,
            cluster_cidr: CLUSTER_CIDR,
            service_cidr: SERVICE_CIDR,
            endpoint_cidr: ENDPOINT_CIDR,
        };
        let backend_server = Backend::start(&backend)?;
        let lab = Lab {
            backend_server,
            _links: [to_client, to_backend],
            router,
            client,
            router_ns,
            backend,
        };
        // Before any datapath: the plain routed path works.
        lab.client
            .run_in(|| connect_once(endpoint(0), false))?
            .context("connecting from the client to an endpoint IP, before any datapath")?;
        Ok(lab)
    }

    pub fn describe(&self) -> String {
        let r = &self.router;
        format!(
            "lab: client {} ─ router {} ({}#{} / {}#{}, ip_forward=1) ─ backend {}; pods {}, \
             Services {}, endpoints {} (local on the backend, :{TARGET_PORT})",
            self.client.name(),
            r.netns_name,
            r.client_if,
            r.client_ifindex,
            r.backend_if,
            r.backend_ifindex,
            self.backend.name(),
            r.cluster_cidr,
            r.service_cidr,
            r.endpoint_cidr,
        )
    }
}

/// Sets a sysctl inside `ns` (the child `setns`es before exec) and reads it
/// back from there.
pub fn sysctl_in(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let run = |args: &[&str]| -> Result<String> {
        let out = ns.command("sysctl")?.args(args).output()?;
        ensure!(
            out.status.success(),
            "sysctl {} in {}: {}",
            args.join(" "),
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    run(&["-qw", &format!("{key}={value}")])?;
    let now = run(&["-n", key])?;
    // Multi-value keys (ip_local_port_range) read back tab-separated.
    ensure!(
        now.split_whitespace().eq(value.split_whitespace()),
        "{key} in {} is {now:?} after setting {value}",
        ns.name()
    );
    Ok(())
}

/// The root namespace's ip_forward, read (never written) to show the run
/// left it alone.
pub fn root_ip_forward() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .ok()
        .map(|s| s.trim().to_owned())
}
// ---------------------------------------------------------------------------
// The backend: one listener answering as every endpoint.

#[derive(Default)]
struct Recorder {
    on: AtomicBool,
    seen: Mutex<Vec<Ipv4Addr>>,
}

pub struct Backend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    recorder: Arc<Recorder>,
}

impl Backend {
    /// A listener on 0.0.0.0:8080 inside `ns`, served by a one-thread tokio
    /// runtime: every connection is read until EOF (or reset) and closed.
    pub fn start(ns: &Netns) -> Result<Backend> {
        let listener = ns.run_in(|| listen(TARGET_PORT, BACKLOG))??;
        listener.set_nonblocking(true)?;
        let recorder = Arc::new(Recorder::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let rec = recorder.clone();
        let thread = thread::Builder::new()
            .name("lb-backend".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("{}: backend listener: {e}", env!("CARGO_CRATE_NAME"));
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = serve(listener, rec) => {}
                    }
                });
            })?;
        Ok(Backend {
            stop: Some(stop),
            thread: Some(thread),
            recorder,
        })
    }

    /// Starts recording the local address of each accepted connection.
    pub fn record(&self) {
        self.recorder.seen.lock().expect("recorder").clear();
        self.recorder.on.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` connections were recorded (or 2 s passed), stops
    /// recording and returns what was seen.
    pub fn recorded(&self, n: usize) -> Vec<Ipv4Addr> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.recorder.seen.lock().expect("recorder").len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.recorder.on.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.recorder.seen.lock().expect("recorder"))
    }
}

/// A listening socket on 0.0.0.0:`port` with a deep accept queue: the
/// backend thread may lose the CPU for a while on two cores, and an
/// overflowing queue drops SYNs, which the client would see as a 1 s stall
/// (std's `TcpListener::bind` asks for a backlog of 128).
pub fn listen(port: u16, backlog: i32) -> io::Result<std::net::TcpListener> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt(&fd, libc::SO_REUSEADDR, &1i32)?;
    let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our socket.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

pub fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

async fn serve(listener: tokio::net::TcpListener, recorder: Arc<Recorder>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if recorder.on.load(Ordering::Relaxed) {
                    if let Ok(SocketAddr::V4(local)) = stream.local_addr() {
                        recorder.seen.lock().expect("recorder").push(*local.ip());
                    }
                }
                tokio::spawn(sink(stream));
            }
            // EMFILE and friends: back off briefly, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn sink(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
// ---------------------------------------------------------------------------
// The client: raw sockets on a thread inside the client namespace.

/// One connection: socket, connect (timed), close. With `abort`, SO_LINGER 0
/// makes the close an RST (no TIME_WAIT). Connect is bounded by
/// SO_SNDTIMEO (a blocking connect gives up with EINPROGRESS).
pub fn connect_once(addr: SocketAddrV4, abort: bool) -> io::Result<Duration> {
    connect_from(addr, abort, None)
}

/// [`connect_once`] from the source port `source_port` (bound before the
/// clock starts) when given, else from one the kernel picks.
pub fn connect_from(
    addr: SocketAddrV4,
    abort: bool,
    source_port: Option<u16>,
) -> io::Result<Duration> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if abort {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&fd, libc::SO_LINGER, &linger)?;
    }
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    setsockopt(&fd, libc::SO_SNDTIMEO, &timeout)?;
    if let Some(port) = source_port {
        let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        // SAFETY: a valid sockaddr_in of the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&local as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let sa = sockaddr(addr);
    let start = Instant::now();
    // SAFETY: a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let elapsed = start.elapsed();
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(elapsed)
}

pub fn setsockopt<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Clone)]
pub struct ConnStats {
    /// Sorted connect latencies of the successful connections.
    pub latencies: Vec<Duration>,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// [`SourcePorts::Sequential`]: ports skipped because another socket
    /// held them (not connections, not errors).
    #[allow(dead_code, reason = "policy_cost reads it, lb_scale does not")]
    pub skipped_ports: usize,
}

impl ConnStats {
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank =
            ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1]
    }

    pub fn cells(&self) -> [String; 2] {
        let failed = if self.errors > 0 {
            format!(" ({} failed)", self.errors)
        } else {
            String::new()
        };
        [
            format!("{:.0}{failed}", self.rate()),
            format!(
                "{} / {}",
                us(self.percentile(0.5)),
                us(self.percentile(0.99))
            ),
        ]
    }
}

/// Where the source port of each connection of a rate measurement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePorts {
    /// The kernel picks one per `connect` (what `lb_scale` measures). It
    /// reuses ports within seconds, so a 4-tuple repeats within one
    /// measurement at these rates.
    Kernel,
    /// Bound one after another from `first` to `last`, warm-up included: no
    /// 4-tuple repeats within one measurement (it ends when they run out),
    /// so every connection is new to any conntrack on the path.
    #[allow(dead_code, reason = "policy_cost uses it, lb_scale does not")]
    Sequential { first: u16, last: u16 },
}

/// Sequential connects from the client to `addr` for `secs` (or
/// CONNECT_CAP), after WARMUP untimed ones.
pub fn connect_rate(lab: &Lab, addr: SocketAddrV4, secs: Duration) -> Result<ConnStats> {
    connect_rate_with(lab, addr, secs, SourcePorts::Kernel)
}

/// [`connect_rate`] with the source ports chosen by `ports`.
pub fn connect_rate_with(
    lab: &Lab,
    addr: SocketAddrV4,
    secs: Duration,
    ports: SourcePorts,
) -> Result<ConnStats> {
    let (cap, sequence) = match ports {
        SourcePorts::Kernel => (CONNECT_CAP, None),
        SourcePorts::Sequential { first, last } => {
            let available = usize::from(last.saturating_sub(first)) + 1;
            ensure!(
                available > WARMUP,
                "{available} source ports are not enough for {WARMUP} warm-up connections"
            );
            (CONNECT_CAP.min(available - WARMUP), Some(first..=last))
        }
    };
    let stats = lab.client.run_in(move || {
        let mut sequence = sequence;
        let mut skipped_ports = 0;
        // One connection; None once the sequence of source ports is used up.
        // A port another socket holds (one in TIME_WAIT) is skipped.
        let mut attempt = || -> Option<io::Result<Duration>> {
            let Some(ports) = sequence.as_mut() else {
                return Some(connect_from(addr, true, None));
            };
            loop {
                match connect_from(addr, true, Some(ports.next()?)) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => skipped_ports += 1,
                    result => return Some(result),
                }
            }
        };
        for _ in 0..WARMUP {
            if attempt().is_none() {
                break;
            }
        }
        let mut latencies = Vec::with_capacity(cap.min(65_536));
        let (mut errors, mut first_error) = (0, None);
        let start = Instant::now();
        while start.elapsed() < secs
            && latencies.len() + errors < cap
            && !STOP.load(Ordering::Relaxed)
        {
            match attempt() {
                None => break,
                Some(Ok(d)) => latencies.push(d),
                Some(Err(e)) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        ConnStats {
            latencies,
            errors,
            first_error,
            elapsed,
            skipped_ports,
        }
    })?;
    stopped()?;
    ensure!(
        !stats.latencies.is_empty(),
        "no connection to {addr} succeeded ({} failed: {})",
        stats.errors,
        stats.first_error.as_deref().unwrap_or("-")
    );
    Ok(stats)
}

/// One TCP stream from the client to `addr` for `secs`: bytes written until
/// the backend has read them all and closed, in Gbit/s.
pub fn stream(lab: &Lab, addr: SocketAddrV4, secs: Duration) -> Result<f64> {
    let gbits = lab.client.run_in(move || -> Result<f64> {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let buf = vec![0x5au8; 256 * 1024];
        let mut bytes = 0u64;
        let start = Instant::now();
        while start.elapsed() < secs && !STOP.load(Ordering::Relaxed) {
            s.write_all(&buf)
                .with_context(|| format!("writing to {addr}"))?;
            bytes += buf.len() as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut end = [0u8; 64];
        while s
            .read(&mut end)
            .with_context(|| format!("waiting for {addr} to close"))?
            != 0
        {}
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    })??;
    stopped()?;
    Ok(gbits)
}

// ---------------------------------------------------------------------------
// Output.

pub fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

pub fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}
