//! Service load balancing at scale: kube-proxy's iptables and nftables rule
//! shapes beside Fairlead's eBPF datapath, in one run (issue 4).
//!
//! ```text
//! cargo bench -p fairlead-ebpf --bench lb_scale                        # 100, 1,000, 10,000 Services
//! LB_BENCH_SCALES=100 cargo bench -p fairlead-ebpf --bench lb_scale    # quick
//! LB_BENCH_PEERS=nftables,fairlead LB_BENCH_SECS=5 cargo bench -p fairlead-ebpf --bench lb_scale
//! ```
//!
//! Environment: `LB_BENCH_SCALES` (Service counts, comma-separated, up to
//! 14,000), `LB_BENCH_PEERS` (`iptables,nftables,fairlead`), `LB_BENCH_SECS`
//! (per connection measurement, default 2), `LB_BENCH_STREAM_SECS` (default
//! 3), `LB_BENCH_DEBUG=1` (TCP error counters of each namespace and the
//! router's conntrack statistics after each datapath).
//!
//! Needs root. For every (scale, datapath) it builds a fresh topology of
//! three network namespaces from fairlead-testkit (`fl-t-<pid>-<n>`; the root
//! namespace is never touched, and a run killed half-way is swept by the
//! next one):
//!
//! ```text
//!  client 10.244.0.2 ── 10.244.0.1 [router: forwards, holds the rules] 10.245.0.1 ── 10.245.0.2 backend
//! ```
//!
//! The client routes the Service CIDR (10.96.0.0/12) and the endpoint range
//! (10.244.128.0/17) to the router; the router routes the endpoint range to
//! the backend, which has a `local` route for the whole range on `lo` and one
//! listener on 0.0.0.0:8080, so it answers as every endpoint, and which
//! routes the client back through the router (replies pass the router for
//! the reverse NAT). The client is inside the cluster CIDR (10.244.0.0/16),
//! so its Service traffic is not masqueraded.
//!
//! Services: N ClusterIP Services (10.96.1.1 upwards), TCP port 80 each, two
//! endpoints each on distinct IPs (10.244.128.1 upwards), targetPort 8080.
//!
//! Per datapath and scale, in this order:
//! * program: `Datapath::program` with all N Services (one full sync);
//! * check: 32 connections each to the first and the last Service must
//!   reach only that Service's endpoints (the backend records the address
//!   each connection arrived at);
//! * connection rate and connect latency: on one thread inside the client
//!   namespace, for `LB_BENCH_SECS` (2 s) or 200,000 connections: socket,
//!   `connect` (timed: SYN to SYN-ACK through the router), `close` with
//!   `SO_LINGER` 0 (an RST, so no TIME_WAIT and no port exhaustion); to an
//!   endpoint IP directly (no Service: what every non-Service packet pays),
//!   to the FIRST Service programmed, to the LAST one; 100 untimed first;
//! * change one: 5 times, replace one endpoint of the middle Service with a
//!   new IP (`Datapath::change_one`, each timed), then check that Service
//!   reaches only its new endpoints;
//! * at the largest scale only: one TCP stream for `LB_BENCH_STREAM_SECS`
//!   (3 s) from the client to an endpoint IP directly and through the last
//!   Service's ClusterIP; throughput counts the bytes written until the
//!   backend has read them all and closed.
//!
//! The datapaths are in `kube_proxy.rs` (what exactly each writes, and how
//! the single-Service change is applied) and `fairlead.rs` (the slot for
//! Fairlead's eBPF); the contract is `datapath.rs`. The topology, the
//! backend and the client's loops are in `harness.rs`, shared with
//! `benches/policy/policy_cost.rs`.

mod datapath;
mod fairlead;
mod harness;
mod kube_proxy;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use datapath::{Datapath, Peer, Svc};
use harness::{
    connect_once, connect_rate, dur, endpoint, install_signal_handlers, root_ip_forward, stopped,
    stream, us, ConnStats, Lab, CONNECT_CAP, SETTLE, TARGET_PORT,
};

const SERVICE_PORT: u16 = 80;
/// Endpoints introduced by `change_one` (still inside ENDPOINT_CIDR).
const SPARE_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 240, 0);
/// Two endpoints per Service must stay below SPARE_BASE.
const MAX_SERVICES: usize = 14_000;
const DEFAULT_SCALES: [usize; 3] = [100, 1_000, 10_000];

const DEFAULT_SECS: f64 = 2.0;
const DEFAULT_STREAM_SECS: f64 = 3.0;
const PROBES: usize = 32;
const CHANGES: usize = 5;

/// The peers, in table order. The Fairlead slot is `fairlead::new`.
const PEERS: [Peer; 3] = [
    Peer {
        key: "iptables",
        new: kube_proxy::Iptables::start,
    },
    Peer {
        key: "nftables",
        new: kube_proxy::Nftables::start,
    },
    Peer {
        key: "fairlead",
        new: fairlead::new,
    },
];

fn main() {
    install_signal_handlers();
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("lb_scale: {e:#}");
            std::process::exit(1);
        }
    }
}

struct Config {
    scales: Vec<usize>,
    peers: Vec<&'static Peer>,
    secs: Duration,
    stream_secs: Duration,
}

fn config() -> Result<Config> {
    let scales = match std::env::var("LB_BENCH_SCALES") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_SERVICES).contains(n))
                    .with_context(|| {
                        format!("LB_BENCH_SCALES: {s:?} is not a count from 1 to {MAX_SERVICES}")
                    })
            })
            .collect::<Result<Vec<_>>>()?,
        Err(_) => DEFAULT_SCALES.to_vec(),
    };
    let peers = match std::env::var("LB_BENCH_PEERS") {
        Ok(v) => v
            .split(',')
            .map(|key| {
                PEERS.iter().find(|p| p.key == key.trim()).with_context(|| {
                    format!(
                        "LB_BENCH_PEERS: no peer {key:?} (have {})",
                        PEERS.map(|p| p.key).join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Err(_) => PEERS.iter().collect(),
    };
    Ok(Config {
        scales,
        peers,
        secs: harness::secs_var("LB_BENCH_SECS", DEFAULT_SECS)?,
        stream_secs: harness::secs_var("LB_BENCH_STREAM_SECS", DEFAULT_STREAM_SECS)?,
    })
}

/// Ok(false) when a peer failed (the others still ran).
fn real_main() -> Result<bool> {
    fairlead_testkit::require_root()?;
    kube_proxy::check_names()?;
    let config = config()?;
    let root_forward_before = root_ip_forward();
    let machine = machine();
    println!("{machine}");
    println!(
        "scales {:?}, peers {}, {:.1} s per connection measurement (cap {CONNECT_CAP}), {:.1} s per stream",
        config.scales,
        config.peers.iter().map(|p| p.key).collect::<Vec<_>>().join(", "),
        config.secs.as_secs_f64(),
        config.stream_secs.as_secs_f64(),
    );
    let largest = config.scales.iter().copied().max().unwrap_or(0);
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut described = false;
    for &scale in &config.scales {
        let services = services(scale);
        for peer in &config.peers {
            stopped()?;
            println!("\n== {scale} Services, {} ==", peer.key);
            let outcome = run_one(peer, &services, scale == largest, &config, &mut described);
            if let Err(e) = &outcome {
                println!("  FAILED: {e:#}");
            }
            rows.push(Row {
                scale,
                key: peer.key,
                outcome,
            });
        }
    }
    println!("\n(total {:.0} s)", started.elapsed().as_secs_f64());
    print_results(&rows, &config, largest, &machine);
    let root_forward_after = root_ip_forward();
    if root_forward_before != root_forward_after {
        println!(
            "WARNING: the root namespace's net.ipv4.ip_forward changed during the run \
             ({root_forward_before:?} -> {root_forward_after:?}); this bench never writes it, \
             something else on the machine did"
        );
    }
    Ok(rows.iter().all(|r| r.outcome.is_ok()))
}

// ---------------------------------------------------------------------------
// Services.

fn spare_endpoint(k: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(SPARE_BASE) + 1 + k as u32),
        TARGET_PORT,
    )
}

fn services(n: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            namespace: format!("ns-{:02}", i % 50),
            name: format!("svc-{i:05}"),
            port_name: "http".into(),
            // 10.96.1.1 upwards, 250 per /24: clear of 10.96.0.1
            // (kubernetes) and 10.96.0.10 (DNS).
            cluster_ip: Ipv4Addr::new(10, 96, (1 + i / 250) as u8, (1 + i % 250) as u8),
            port: SERVICE_PORT,
            endpoints: vec![endpoint(2 * i), endpoint(2 * i + 1)],
        })
        .collect()
}

/// PROBES connections to `svc` must land on its endpoints only.
fn check_service(lab: &Lab, svc: &Svc, what: &str) -> Result<()> {
    lab.backend_server.record();
    let vip = svc.vip();
    let results = lab.client.run_in(move || {
        (0..PROBES)
            .map(|_| connect_once(vip, false))
            .collect::<Vec<_>>()
    })?;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    let seen = lab.backend_server.recorded(PROBES - failed.len());
    ensure!(
        failed.is_empty(),
        "{what}: {} of {PROBES} connections to {vip} failed (first: {})",
        failed.len(),
        failed[0]
    );
    let endpoints: BTreeSet<Ipv4Addr> = svc.endpoints.iter().map(|e| *e.ip()).collect();
    let wrong: BTreeSet<Ipv4Addr> = seen
        .iter()
        .filter(|ip| !endpoints.contains(ip))
        .copied()
        .collect();
    ensure!(
        wrong.is_empty(),
        "{what}: connections to {vip} reached {wrong:?}, not its endpoints {endpoints:?}"
    );
    ensure!(
        seen.len() == PROBES,
        "{what}: {PROBES} connections to {vip} succeeded but the backend saw {}",
        seen.len()
    );
    let hit: BTreeSet<Ipv4Addr> = seen.into_iter().collect();
    if hit.len() < endpoints.len() {
        println!(
            "  note: {what}: {PROBES} connections to {vip} all went to {hit:?} of {endpoints:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One datapath at one scale.

struct Measured {
    label: String,
    program: Duration,
    changes: Vec<Duration>,
    direct: ConnStats,
    first: ConnStats,
    last: ConnStats,
    /// (pod direct, via ClusterIP) Gbit/s, at the largest scale.
    stream: Option<(f64, f64)>,
}

enum Outcome {
    Measured(Box<Measured>),
    /// The peer's constructor returned None (the Fairlead slot).
    Missing,
}

struct Row {
    scale: usize,
    key: &'static str,
    outcome: Result<Outcome>,
}

/// Calls `cleanup` on every path out, failure included.
struct Programmed(Box<dyn Datapath>, bool);

impl Programmed {
    fn cleanup(&mut self) -> Result<()> {
        self.1 = true;
        self.0.cleanup()
    }
}

impl Drop for Programmed {
    fn drop(&mut self) {
        if !self.1 {
            if let Err(e) = self.0.cleanup() {
                eprintln!("lb_scale: cleanup of {}: {e:#}", self.0.name());
            }
        }
    }
}

fn run_one(
    peer: &Peer,
    services: &[Svc],
    largest: bool,
    config: &Config,
    described: &mut bool,
) -> Result<Outcome> {
    let n = services.len();
    let lab = Lab::new().context("building the namespaces")?;
    if !*described {
        println!("  {}", lab.describe());
        *described = true;
    }
    let Some(dp) = (peer.new)(&lab.router).with_context(|| format!("starting {}", peer.key))?
    else {
        println!("  slot empty: benches/lb/fairlead.rs returns None (not built yet)");
        return Ok(Outcome::Missing);
    };
    // Declared after `lab`, so dropped (cleaned up) before the namespaces go.
    let mut dp = Programmed(dp, false);
    let label = dp.0.name().to_owned();
    println!("  {label}: programming {n} Services ...");

    let start = Instant::now();
    dp.0.program(services).context("program")?;
    let program = start.elapsed();
    println!("  program: {}", dur(program));
    stopped()?;

    let (first, last) = (&services[0], &services[n - 1]);
    check_service(&lab, first, "first Service")?;
    check_service(&lab, last, "last Service")?;
    // A whole-ruleset commit leaves work behind (freeing the old objects
    // after RCU grace periods); give it longer than the other pauses.
    thread::sleep(SETTLE * 4);

    let measure = |what: &str, addr: SocketAddrV4| -> Result<ConnStats> {
        let s = connect_rate(&lab, addr, config.secs)?;
        println!(
            "  connect to {what} ({addr}): {:.0}/s, p50 {} µs, p99 {} µs{}",
            s.rate(),
            us(s.percentile(0.5)),
            us(s.percentile(0.99)),
            if s.errors > 0 {
                format!(
                    ", {} FAILED (first: {})",
                    s.errors,
                    s.first_error.as_deref().unwrap_or("-")
                )
            } else {
                String::new()
            }
        );
        thread::sleep(SETTLE);
        Ok(s)
    };
    let direct = measure("a pod IP directly", last.endpoints[0])?;
    let first_stats = measure("the first Service", first.vip())?;
    let last_stats = measure("the last Service", last.vip())?;

    let index = n / 2;
    let mut current = services[index].clone();
    let mut changes = Vec::with_capacity(CHANGES);
    for k in 0..CHANGES {
        stopped()?;
        let mut new = current.clone();
        new.endpoints[k % 2] = spare_endpoint(k);
        let start = Instant::now();
        dp.0.change_one(index, &current, &new)
            .with_context(|| format!("change {k} of Service {index}"))?;
        changes.push(start.elapsed());
        current = new;
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  change one Service ({CHANGES}x): {}",
        changes
            .iter()
            .map(|d| dur(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    check_service(&lab, &current, "changed Service")?;

    let stream = if largest {
        thread::sleep(SETTLE);
        let direct = stream(&lab, last.endpoints[1], config.stream_secs)?;
        thread::sleep(SETTLE);
        let via = stream(&lab, last.vip(), config.stream_secs)?;
        println!("  one TCP stream: pod direct {direct:.2} Gbit/s, via ClusterIP {via:.2} Gbit/s");
        Some((direct, via))
    } else {
        None
    };

    if std::env::var_os("LB_BENCH_DEBUG").is_some() {
        debug_counters(&lab)?;
    }
    dp.cleanup().context("cleanup")?;
    drop(dp);
    drop(lab);
    Ok(Outcome::Measured(Box::new(Measured {
        label,
        program,
        changes,
        direct,
        first: first_stats,
        last: last_stats,
        stream,
    })))
}

/// `LB_BENCH_DEBUG=1`: the non-zero TCP error counters of each namespace
/// (`nstat`; a backend ListenOverflow is a harness problem, not the
/// datapath's) and the router's conntrack statistics.
fn debug_counters(lab: &Lab) -> Result<()> {
    let interesting = ["Listen", "Drop", "Timeout", "Retrans", "Syn", "Fail", "Err"];
    for (name, ns) in [
        ("client", &lab.client),
        ("router", &lab.router_ns),
        ("backend", &lab.backend),
    ] {
        let out = ns.command("nstat")?.arg("-asz").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let counters: Vec<String> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (key, value) = (fields.next()?, fields.next()?);
                (value != "0" && interesting.iter().any(|i| key.contains(i)))
                    .then(|| format!("{key}={value}"))
            })
            .collect();
        println!("  debug {name}: {}", counters.join(" "));
    }
    // Both kube-proxy shapes live in nf_tables (iptables-nft included).
    let ruleset = lab
        .router_ns
        .command("nft")?
        .args(["list", "ruleset"])
        .output()?;
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    println!(
        "  debug router nf_tables: {} tables, {} chains, {} lines",
        ruleset.lines().filter(|l| l.starts_with("table ")).count(),
        ruleset
            .lines()
            .filter(|l| l.trim_start().starts_with("chain "))
            .count(),
        ruleset.lines().count()
    );
    // /proc/thread-self: the entering thread's namespace, not the process's.
    let conntrack = lab.router_ns.run_in(|| {
        std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").unwrap_or_default()
    })?;
    let mut lines = conntrack
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    if let Some(header) = lines.next() {
        // One line per CPU, hex counters; `entries` is global.
        let mut sums = vec![0u64; header.len()];
        for cpu in lines {
            for (k, v) in cpu.iter().enumerate().take(header.len()) {
                let v = u64::from_str_radix(v, 16).unwrap_or(0);
                sums[k] = if k == 0 { v } else { sums[k] + v };
            }
        }
        let shown: Vec<String> = header
            .iter()
            .zip(&sums)
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  debug router conntrack: {}", shown.join(" "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Output.

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn peer_label(row: &Row) -> String {
    match &row.outcome {
        Ok(Outcome::Measured(m)) => m.label.clone(),
        _ => match row.key {
            "iptables" => "kube-proxy iptables".into(),
            "nftables" => "kube-proxy nftables".into(),
            "fairlead" => "Fairlead eBPF".into(),
            other => other.into(),
        },
    }
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "machine: {cores} cores, kernel {}; {} ({}); {} ({})",
        kernel.trim(),
        kube_proxy::iptables_version(),
        kube_proxy::IPTABLES_RESTORE,
        kube_proxy::nft_version(),
        kube_proxy::NFT,
    )
}

fn print_results(rows: &[Row], config: &Config, largest: usize, machine: &str) {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| Services | datapath | program | change one (p50 / max) | pod direct: conn/s | p50 / p99 µs | first Service: conn/s | p50 / p99 µs | last Service: conn/s | p50 / p99 µs |"
    );
    let _ = writeln!(table, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut streams = String::new();
    for row in rows {
        let label = peer_label(row);
        match &row.outcome {
            Ok(Outcome::Measured(m)) => {
                let max = m.changes.iter().max().copied().unwrap_or_default();
                let [dr, dl] = m.direct.cells();
                let [fr, fl] = m.first.cells();
                let [lr, ll] = m.last.cells();
                let _ = writeln!(
                    table,
                    "| {} | {label} | {} | {} / {} | {dr} | {dl} | {fr} | {fl} | {lr} | {ll} |",
                    row.scale,
                    dur(m.program),
                    dur(median(&m.changes)),
                    dur(max),
                );
                if let Some((direct, via)) = m.stream {
                    let _ = writeln!(
                        streams,
                        "| {label} | {} | {direct:.2} | {via:.2} |",
                        row.scale
                    );
                }
            }
            Ok(Outcome::Missing) => {
                let _ = writeln!(
                    table,
                    "| {} | {label} | slot empty (`benches/lb/fairlead.rs`) | | | | | | | |",
                    row.scale
                );
            }
            Err(e) => {
                let msg = format!("{e:#}").replace('|', "\\|").replace('\n', " ");
                let _ = writeln!(
                    table,
                    "| {} | {label} | FAILED: {msg} | | | | | | | |",
                    row.scale
                );
            }
        }
    }
    println!("\n{table}");
    if !streams.is_empty() {
        println!(
            "| datapath | Services | pod direct Gbit/s | via ClusterIP Gbit/s |\n|---|---:|---:|---:|\n{streams}"
        );
    }

    // The block for docs/BENCHMARKS.md.
    let scales = config
        .scales
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    println!("----- 8< ----- docs/BENCHMARKS.md ----- 8< -----");
    println!(
        "## Service load balancing at scale (`benches/lb/lb_scale.rs`)\n\n\
         ```\n\
         LB_BENCH_SCALES={scales} cargo bench -p fairlead-ebpf --bench lb_scale   # root\n\
         ```\n\n\
         {machine}.\n\n\
         Three network namespaces per datapath and scale: client ─ router ─ backend; the \
         router forwards and holds the datapath; the backend answers as every endpoint (a \
         `local` route for 10.244.128.0/17, one listener on :8080). N ClusterIP Services, TCP \
         port 80, two endpoints each on distinct IPs. kube-proxy's rules are written with its \
         own chain names and tools: iptables mode as one `iptables-restore --noflush` full sync \
         and, for a change, a partial sync of the changed chains plus all of `KUBE-SERVICES`; \
         nftables mode as one `nft -f` transaction, and for a change one transaction touching \
         that Service's chains and map element (see `benches/lb/kube_proxy.rs`). \"change one\" \
         replaces one endpoint of one Service ({CHANGES} times). Connections: one thread in the \
         client namespace, connect (timed) then close with an RST, {:.1} s each (cap \
         {CONNECT_CAP}); \"first\"/\"last\" are the first and last Service programmed (the first \
         and last rule of `KUBE-SERVICES`); \"pod direct\" connects to an endpoint IP, no \
         Service. Throughput: one TCP stream for {:.1} s at {largest} Services.\n",
        config.secs.as_secs_f64(),
        config.stream_secs.as_secs_f64(),
    );
    println!("{table}");
    if !streams.is_empty() {
        println!(
            "| datapath | Services | pod direct Gbit/s | via ClusterIP Gbit/s |\n|---|---:|---:|---:|\n{streams}"
        );
    }
    println!("----- 8< -----");
}
