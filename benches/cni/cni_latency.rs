//! CNI ADD and DEL latency: `fairlead-cni` beside the reference plugins
//! (Debian `containernetworking-plugins`: bridge + host-local + loopback),
//! in one run on one machine.
//!
//! ```text
//! cargo bench -p fairlead-cni --bench cni_latency            # the table
//! cargo bench -p fairlead-cni --bench cni_latency -- --pods 50
//! cargo bench -p fairlead-cni --bench cni_latency -- --probe-delete
//! ```
//!
//! Needs root: it makes network namespaces (testkit's `fl-t-<pid>-<n>`, never
//! touching the root namespace) and removes them, and its IPAM directories
//! (`$TMPDIR/fl-bench-<pid>-<n>`), when it ends, also after a failure; a run
//! killed half-way is swept by the next one.
//!
//! Every plugin is driven the way a runtime drives it: the binary is exec'd
//! inside a "node" namespace (setns between fork and exec) with the `CNI_*`
//! environment and the network config on stdin, and every ADD gets a fresh
//! pod namespace. Latency is from spawn to reaped exit, as the runtime sees
//! it. Each peer gets its own node namespace and, untimed, one warm-up
//! ADD/DEL (the bridge exists, IPAM directories exist, as on a live node).
//!
//! Per peer: 100 ADDs one after another, then their 100 DELs one after
//! another; then 100 ADDs started at once (one thread each, released by a
//! barrier) and their 100 DELs at once, reporting the batch's wall time
//! and the per-call latencies. Every call is bounded (`CALL_TIMEOUT`: the
//! plugin is killed and the bench fails).
//!
//! `fairlead-cni` runs twice: as on a real node, with the agent's link
//! reaper (the real `fairlead_agent::reaper::LinkReaper` behind the real
//! status socket, in-process, deleting inside the node namespace) taking
//! the veths DEL hands it; and with nothing listening on `agentSocket`, so
//! every DEL falls back to deleting the veth itself. For the first, the
//! reaper's own drain time after the last DEL is reported too.
//!
//! `--probe-delete` instead measures, in-process over rtnetlink, where a
//! veth delete spends its time and what DEL's tombstone steps cost (see
//! `cni/src/teardown.rs`).

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Barrier, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use fairlead_agent::{reaper::LinkReaper, status::StatusServer, Readiness, RootNetns};
use fairlead_cni::{netlink::Netlink, netns::NetnsFile};
use fairlead_testkit::Netns;
use serde_json::{json, Value};

const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead-cni");
const REFERENCE_DIR: &str = "/usr/lib/cni";
/// Both peers allocate from the same /24, IPv4 only, so they do the same work.
const SUBNET: &str = "10.244.1.0/24";
const NETWORK: &str = "bench";
/// Longest one plugin call may take before the bench kills it and fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between phases, so one phase's leftovers (RCU callbacks) do not
/// land in the next one's figures.
const SETTLE: Duration = Duration::from_millis(300);
/// Longest the agent's reaper may take to drain after a phase's DELs
/// (~20 ms a veth, one after another).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const TMP_PREFIX: &str = "fl-bench-";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn main() {
    if let Err(e) = real_main() {
        eprintln!("cni_latency: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut pods = 100usize;
    let mut probe = false;
    let mut verbose = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pods" => {
                pods = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=250).contains(n))
                    .context("--pods takes a number from 1 to 250 (one /24)")?
            }
            "--probe-delete" => probe = true,
            "--verbose" => verbose = true,
            // `cargo bench` passes `--bench`; filters are not used.
            _ => {}
        }
    }
    fairlead_testkit::require_root()?;
    sweep_stale_dirs();
    print_machine();
    if probe {
        return probe_delete(pods.min(30));
    }
    run_table(pods, verbose)
}

// ---------------------------------------------------------------------------
// The peers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// What a runtime runs with the reference plugins: a conflist of bridge
    /// (which execs host-local) then loopback; DEL in reverse order.
    ReferenceList,
    /// The bridge plugin alone (it still execs host-local).
    ReferenceBridge,
    /// fairlead-cni with its defaults and the agent's reaper on the node:
    /// DEL hands the veth off.
    Fairlead,
    /// fairlead-cni with nobody on `agentSocket`: DEL deletes the veth
    /// itself.
    FairleadNoAgent,
}

impl Peer {
    const ALL: [Peer; 4] = [
        Peer::ReferenceList,
        Peer::ReferenceBridge,
        Peer::Fairlead,
        Peer::FairleadNoAgent,
    ];

    fn label(self) -> &'static str {
        match self {
            Peer::ReferenceList => "reference: bridge + host-local + loopback",
            Peer::ReferenceBridge => "reference: bridge + host-local",
            Peer::Fairlead => "fairlead-cni (agent hand-off, default)",
            Peer::FairleadNoAgent => "fairlead-cni, no agent (sync fallback)",
        }
    }
}

/// One peer on its own node namespace with its own IPAM directory.
struct Driver {
    peer: Peer,
    node: Netns,
    data: TempDir,
    /// The agent's DEL side on this node (`Peer::Fairlead` only).
    agent: Option<Agent>,
}

/// The agent's DEL side, in-process: the real link reaper inside the node
/// namespace behind the real status socket, as the agent runs it.
struct Agent {
    runtime: Option<tokio::runtime::Runtime>,
    reaper: LinkReaper,
}

impl Agent {
    fn start(node: &Netns, socket: &Path) -> Result<Agent> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let reaper = LinkReaper::start(&node.path(), RootNetns::Refuse)?;
        let (_ready, readiness) = tokio::sync::watch::channel(Readiness::Ready);
        let server = {
            let _inside = runtime.enter();
            StatusServer::bind(socket, readiness)?.with_reaper(reaper.clone())
        };
        runtime.spawn(server.serve(std::future::pending()));
        Ok(Agent {
            runtime: Some(runtime),
            reaper,
        })
    }

    /// Waits until the reaper has deleted everything handed to it; how long
    /// that took.
    fn drain(&self) -> Result<Duration> {
        let start = Instant::now();
        let runtime = self.runtime.as_ref().context("agent stopped")?;
        ensure!(
            runtime.block_on(self.reaper.idle(DRAIN_TIMEOUT)),
            "the reaper still has {} veths queued after {DRAIN_TIMEOUT:?}",
            self.reaper.pending()
        );
        Ok(start.elapsed())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A pod: a fresh network namespace and a container ID.
struct Pod {
    ns: Netns,
    id: String,
}

impl Driver {
    fn new(peer: Peer) -> Result<Driver> {
        let node = Netns::new()?;
        let data = TempDir::new()?;
        let agent = match peer {
            Peer::Fairlead => Some(Agent::start(&node, &data.path().join("agent.sock"))?),
            _ => None,
        };
        Ok(Driver {
            peer,
            node,
            data,
            agent,
        })
    }

    fn fairlead_config(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": NETWORK,
            "type": "fairlead-cni",
            // Nobody listens there for `FairleadNoAgent`.
            "agentSocket": self.data.path().join("agent.sock"),
            "ipam": {"type": "fairlead", "ranges": [SUBNET], "dataDir": self.data.path()},
        })
    }

    /// Waits for the agent's reaper to finish (None without an agent).
    fn drain(&self) -> Result<Option<Duration>> {
        self.agent.as_ref().map(Agent::drain).transpose()
    }

    fn bridge_config(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.data.path(),
            },
        })
    }

    fn loopback_config() -> Value {
        json!({"cniVersion": "1.0.0", "name": NETWORK, "type": "loopback"})
    }

    /// ADD for one pod; returns the latency and the result (the runtime
    /// keeps it and passes it to DEL as `prevResult`).
    fn add(&self, pod: &Pod) -> Result<(Duration, Value)> {
        let start = Instant::now();
        let result = match self.peer {
            Peer::Fairlead | Peer::FairleadNoAgent => {
                self.call(FAIRLEAD, "ADD", pod, &self.fairlead_config())?
            }
            Peer::ReferenceBridge => {
                self.call(&reference("bridge"), "ADD", pod, &self.bridge_config())?
            }
            Peer::ReferenceList => {
                let bridge = self.call(&reference("bridge"), "ADD", pod, &self.bridge_config())?;
                let mut loopback = Self::loopback_config();
                loopback["prevResult"] = bridge;
                self.call(&reference("loopback"), "ADD", pod, &loopback)?
            }
        };
        let elapsed = start.elapsed();
        ensure!(
            result["ips"].as_array().is_some_and(|ips| !ips.is_empty()),
            "{:?}: ADD for {} returned no address: {result}",
            self.peer,
            pod.id
        );
        Ok((elapsed, result))
    }

    fn del(&self, pod: &Pod, prev: &Value) -> Result<Duration> {
        let with_prev = |mut config: Value| {
            config["prevResult"] = prev.clone();
            config
        };
        let start = Instant::now();
        match self.peer {
            Peer::Fairlead | Peer::FairleadNoAgent => {
                self.call(FAIRLEAD, "DEL", pod, &with_prev(self.fairlead_config()))?;
            }
            Peer::ReferenceBridge => {
                self.call(
                    &reference("bridge"),
                    "DEL",
                    pod,
                    &with_prev(self.bridge_config()),
                )?;
            }
            Peer::ReferenceList => {
                self.call(
                    &reference("loopback"),
                    "DEL",
                    pod,
                    &with_prev(Self::loopback_config()),
                )?;
                self.call(
                    &reference("bridge"),
                    "DEL",
                    pod,
                    &with_prev(self.bridge_config()),
                )?;
            }
        }
        Ok(start.elapsed())
    }

    /// One plugin call; the parsed stdout (Null when empty).
    fn call(&self, bin: &str, command: &str, pod: &Pod, config: &Value) -> Result<Value> {
        let netns = pod.ns.path().display().to_string();
        let cni_path = if bin == FAIRLEAD {
            "/opt/cni/bin"
        } else {
            REFERENCE_DIR
        };
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", cni_path),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench",
            ),
        ];
        let (_, output) = exec(&self.node, bin, &env, config.to_string().as_bytes())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "{bin} {command} for {} failed ({}): {stdout} {}",
            pod.id,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| format!("{bin} {command}: {stdout}"))
    }

    /// Allocations left in the IPAM directory (the network's subdirectory
    /// for both IPAMs): files named by an address.
    fn leftover_allocations(&self) -> Result<Vec<String>> {
        let dir = self.data.path().join(NETWORK);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut left = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                left.push(name);
            }
        }
        Ok(left)
    }
}

fn reference(plugin: &str) -> String {
    format!("{REFERENCE_DIR}/{plugin}")
}

fn new_pods(n: usize, tag: &str) -> Result<Vec<Pod>> {
    (0..n)
        .map(|i| {
            Ok(Pod {
                ns: Netns::new()?,
                id: format!("bench-{tag}-{i:03}"),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Running a binary the way a runtime does, bounded.

/// Spawns `bin` inside `node` with `env` only and `stdin` on its stdin;
/// returns the time from spawn to reaped exit and what it printed.
fn exec(node: &Netns, bin: &str, env: &[(&str, &str)], stdin: &[u8]) -> Result<(Duration, Output)> {
    let mut command = node.command(bin)?;
    command
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn().with_context(|| format!("spawning {bin}"))?;
    // A pidfd of our own, unreaped child: waiting on it cannot be fooled by
    // pid reuse, and it lets us bound the wait without a thread.
    let pidfd = fairlead_testkit::process::pidfd_open(child.id())
        .with_context(|| format!("pidfd_open for {bin}"))?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that does not read stdin (VERSION, `true`) closes it.
        let _ = pipe.write_all(stdin);
    }
    if !fairlead_testkit::process::wait_exit(&pidfd, CALL_TIMEOUT)? {
        // Still our unreaped child, so the pid is still its own.
        let _ = child.kill();
        let _ = child.wait();
        bail!("{bin} did not finish within {CALL_TIMEOUT:?}; killed it");
    }
    let output = child.wait_with_output()?;
    Ok((start.elapsed(), output))
}

/// Runs `f(i)` for `i in 0..n`, each on its own thread, all released at
/// once; returns the wall time of the whole batch and each call's latency.
///
/// The batch runs from the first worker's release to the last worker's end,
/// both taken by the workers: the main thread, once it wakes, may wait a
/// long time for a CPU behind 100 workers and their children.
fn batch(
    n: usize,
    f: impl Fn(usize) -> Result<Duration> + Sync,
) -> Result<(Duration, Vec<Duration>)> {
    let barrier = Barrier::new(n);
    let results = Mutex::new(Vec::with_capacity(n));
    thread::scope(|s| {
        for i in 0..n {
            let (barrier, results, f) = (&barrier, &results, &f);
            s.spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let outcome = f(i);
                let end = Instant::now();
                results.lock().expect("results").push((start, end, outcome));
            });
        }
    });
    let results = results.into_inner().expect("results");
    let first = results.iter().map(|r| r.0).min().context("empty batch")?;
    let last = results.iter().map(|r| r.1).max().context("empty batch")?;
    let latencies = results
        .into_iter()
        .map(|(_, _, outcome)| outcome)
        .collect::<Result<Vec<_>>>()?;
    Ok((last - first, latencies))
}

// ---------------------------------------------------------------------------
// The table.

#[derive(Default)]
struct Row {
    label: String,
    add: Vec<Duration>,
    del: Vec<Duration>,
    batch_add_wall: Option<Duration>,
    batch_add: Vec<Duration>,
    batch_del_wall: Option<Duration>,
    batch_del: Vec<Duration>,
    /// The agent's reaper: time from the last DEL's return until it had
    /// deleted every veth, after the sequential DELs and after the batch.
    drain: Option<(Duration, Duration)>,
}

fn run_table(n: usize, verbose: bool) -> Result<()> {
    let mut rows = Vec::new();
    rows.push(baseline_row(n, "exec `true` (baseline)", "/bin/true", &[])?);
    rows.push(baseline_row(
        n,
        "exec fairlead-cni VERSION",
        FAIRLEAD,
        &[("CNI_COMMAND", "VERSION")],
    )?);
    for peer in Peer::ALL {
        eprintln!("cni_latency: {} ...", peer.label());
        rows.push(run_peer(peer, n).with_context(|| peer.label())?);
    }
    print_table(n, &rows);
    print_drains(n, &rows);
    print_targets(&rows);
    if verbose {
        print_outliers(&rows);
    }
    Ok(())
}

/// The cost of exec itself from this harness: a binary that does nothing.
fn baseline_row(n: usize, label: &str, bin: &str, env: &[(&str, &str)]) -> Result<Row> {
    let node = Netns::new()?;
    let mut row = Row {
        label: label.to_owned(),
        ..Row::default()
    };
    for _ in 0..n {
        let (elapsed, output) = exec(&node, bin, env, b"{}")?;
        ensure!(output.status.success(), "{bin} failed: {}", output.status);
        row.add.push(elapsed);
    }
    thread::sleep(SETTLE);
    let (wall, latencies) = batch(n, |_| {
        let (elapsed, output) = exec(&node, bin, env, b"{}")?;
        ensure!(output.status.success(), "{bin} failed: {}", output.status);
        Ok(elapsed)
    })?;
    row.batch_add_wall = Some(wall);
    row.batch_add = latencies;
    Ok(row)
}

fn run_peer(peer: Peer, n: usize) -> Result<Row> {
    let driver = Driver::new(peer)?;
    let tag = match peer {
        Peer::ReferenceList => "rl",
        Peer::ReferenceBridge => "rb",
        Peer::Fairlead => "fa",
        Peer::FairleadNoAgent => "fs",
    };
    let warm = new_pods(1, &format!("{tag}w"))?;
    let (_, prev) = driver.add(&warm[0])?;
    driver.del(&warm[0], &prev)?;
    driver.drain()?;

    let sequential = new_pods(n, &format!("{tag}s"))?;
    let concurrent = new_pods(n, &format!("{tag}c"))?;
    let mut row = Row {
        label: peer.label().to_owned(),
        ..Row::default()
    };
    thread::sleep(SETTLE);

    let mut results = Vec::with_capacity(n);
    for pod in &sequential {
        let (elapsed, result) = driver.add(pod)?;
        row.add.push(elapsed);
        results.push(result);
    }
    thread::sleep(SETTLE);
    for (pod, prev) in sequential.iter().zip(&results) {
        row.del.push(driver.del(pod, prev)?);
    }
    let seq_drain = driver.drain()?;
    check_clean(&driver)?;
    thread::sleep(SETTLE);

    let slots: Vec<Mutex<Value>> = (0..n).map(|_| Mutex::new(Value::Null)).collect();
    let (wall, latencies) = batch(n, |i| {
        let (elapsed, result) = driver.add(&concurrent[i])?;
        *slots[i].lock().expect("slot") = result;
        Ok(elapsed)
    })?;
    row.batch_add_wall = Some(wall);
    row.batch_add = latencies;
    thread::sleep(SETTLE);
    let (wall, latencies) = batch(n, |i| {
        let prev = slots[i].lock().expect("slot").clone();
        driver.del(&concurrent[i], &prev)
    })?;
    row.batch_del_wall = Some(wall);
    row.batch_del = latencies;
    let batch_drain = driver.drain()?;
    row.drain = seq_drain.zip(batch_drain);
    check_clean(&driver)?;
    thread::sleep(SETTLE);
    Ok(row)
}

/// After the DELs (and the reaper's drain): no address left allocated, no
/// pod-side interface left on the node (the bridge itself stays, as on a
/// live node), tombstones included.
fn check_clean(driver: &Driver) -> Result<()> {
    let left = driver.leftover_allocations()?;
    ensure!(left.is_empty(), "addresses left allocated: {left:?}");
    let links = driver.node.links()?;
    let veths: Vec<&String> = links
        .iter()
        .filter(|l| l.starts_with("fl") || l.starts_with("veth"))
        .collect();
    ensure!(veths.is_empty(), "interfaces left on the node: {veths:?}");
    Ok(())
}

fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    // Nearest rank: the smallest sample with at least p of them at or below.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

fn print_table(n: usize, rows: &[Row]) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{n} pods. Times in ms. seq = one after another; batch = all {n} started at once \
         (wall time of the batch, and per-call p50/p99).\n"
    );
    let _ = writeln!(
        out,
        "| peer | ADD p50 | ADD p99 | DEL p50 | DEL p99 | batch ADD wall | batch ADD p50/p99 \
         | batch DEL wall | batch DEL p50/p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} / {} |",
            row.label,
            ms(percentile(&row.add, 0.5)),
            ms(percentile(&row.add, 0.99)),
            ms(percentile(&row.del, 0.5)),
            ms(percentile(&row.del, 0.99)),
            ms(row.batch_add_wall),
            ms(percentile(&row.batch_add, 0.5)),
            ms(percentile(&row.batch_add, 0.99)),
            ms(row.batch_del_wall),
            ms(percentile(&row.batch_del, 0.5)),
            ms(percentile(&row.batch_del, 0.99)),
        );
    }
    println!("{out}");
}

/// The agent's reaper: how long after the last DEL returned it had deleted
/// every veth handed to it.
fn print_drains(n: usize, rows: &[Row]) {
    for row in rows {
        let Some((seq, batch)) = row.drain else {
            continue;
        };
        println!(
            "{}: the agent's reaper finished {:.0} ms after the last of {n} sequential DELs \
             and {:.0} ms after the batch of {n} ({:.1} ms a veth)",
            row.label,
            seq.as_secs_f64() * 1e3,
            batch.as_secs_f64() * 1e3,
            batch.as_secs_f64() * 1e3 / n as f64,
        );
    }
    println!();
}

/// The targets, against the runtime's reference list: ADD and DEL p50 at
/// most a third, p99 at most half, and the batch faster.
fn print_targets(rows: &[Row]) {
    let find = |label: &str| rows.iter().find(|r| r.label == label);
    let Some(reference) = find(Peer::ReferenceList.label()) else {
        return;
    };
    for peer in [Peer::Fairlead, Peer::FairleadNoAgent] {
        let Some(ours) = find(peer.label()) else {
            continue;
        };
        println!("targets for {} against {}:", ours.label, reference.label);
        let check = |what: &str, ours: Option<Duration>, theirs: Option<Duration>, factor: f64| {
            let (Some(ours), Some(theirs)) = (ours, theirs) else {
                return;
            };
            let limit = theirs.mul_f64(factor);
            println!(
                "  {what}: {:.1} ms vs limit {:.1} ms (reference {:.1} ms, ratio {:.2}): {}",
                ours.as_secs_f64() * 1e3,
                limit.as_secs_f64() * 1e3,
                theirs.as_secs_f64() * 1e3,
                ours.as_secs_f64() / theirs.as_secs_f64(),
                if ours <= limit { "met" } else { "MISSED" }
            );
        };
        check(
            "ADD p50 <= 1/3",
            percentile(&ours.add, 0.5),
            percentile(&reference.add, 0.5),
            1.0 / 3.0,
        );
        check(
            "ADD p99 <= 1/2",
            percentile(&ours.add, 0.99),
            percentile(&reference.add, 0.99),
            0.5,
        );
        check(
            "DEL p50 <= 1/3",
            percentile(&ours.del, 0.5),
            percentile(&reference.del, 0.5),
            1.0 / 3.0,
        );
        check(
            "DEL p99 <= 1/2",
            percentile(&ours.del, 0.99),
            percentile(&reference.del, 0.99),
            0.5,
        );
        check(
            "batch ADD wall faster",
            ours.batch_add_wall,
            reference.batch_add_wall,
            1.0,
        );
        check(
            "batch DEL wall faster",
            ours.batch_del_wall,
            reference.batch_del_wall,
            1.0,
        );
    }
}

/// The five slowest calls of each series, with their position (sequential
/// series: the pod's number, so a slowdown that grows with the number of
/// pods shows).
fn print_outliers(rows: &[Row]) {
    println!("\nslowest calls (position: ms), and the mean of the first and last ten:");
    for row in rows {
        for (what, samples) in [
            ("ADD", &row.add),
            ("DEL", &row.del),
            ("batch ADD", &row.batch_add),
            ("batch DEL", &row.batch_del),
        ] {
            if samples.is_empty() {
                continue;
            }
            let mut indexed: Vec<(usize, Duration)> = samples.iter().copied().enumerate().collect();
            indexed.sort_by_key(|&(_, d)| std::cmp::Reverse(d));
            let slowest: Vec<String> = indexed
                .iter()
                .take(5)
                .map(|(i, d)| format!("{i}: {:.1}", d.as_secs_f64() * 1e3))
                .collect();
            let mean = |part: &[Duration]| {
                part.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / part.len().max(1) as f64
            };
            let k = samples.len().min(10);
            println!(
                "  {} {what}: {} | first {:.1}, last {:.1}",
                row.label,
                slowest.join(", "),
                mean(&samples[..k]),
                mean(&samples[samples.len() - k..]),
            );
        }
    }
}

fn print_machine() {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let reference = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "containernetworking-plugins"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "unknown".into());
    println!(
        "machine: {cores} cores, kernel {}, containernetworking-plugins {reference}, fairlead-cni {FAIRLEAD}",
        kernel.trim()
    );
}

// ---------------------------------------------------------------------------
// --probe-delete: where a veth delete's time goes, without process start-up.

#[derive(Debug, Clone, Copy)]
enum Variant {
    /// RTM_DELLINK of the host end, from the node namespace (what the
    /// agent's reaper does, and DEL when no agent takes the veth).
    Host,
    /// RTM_DELLINK of the pod end, from inside the pod namespace.
    Pod,
    /// RTM_SETLINK down, then RTM_DELLINK, of the host end.
    DownThenHost,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Host => "delete the host end (the agent; DEL without one)",
            Variant::Pod => "delete the pod end, from inside the pod",
            Variant::DownThenHost => "set the host end down, then delete it",
        }
    }
}

fn probe_delete(n: usize) -> Result<()> {
    let driver = Driver::new(Peer::FairleadNoAgent)?;
    println!(
        "\nveth delete, {n} pods per variant, in-process rtnetlink (no exec). Times in ms.\n\
         `unlisted` = when another socket stops seeing the host end (the phase under RTNL);\n\
         `call` = the whole request until its ACK (includes the rcu_barrier after RTNL).\n"
    );
    println!("| variant | down p50 | unlisted p50 | unlisted p99 | call p50 | call p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    // For scale: one normal RCU grace period, which is what
    // membarrier(MEMBARRIER_CMD_GLOBAL) waits for (synchronize_rcu()).
    let mut grace = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: membarrier(2) with MEMBARRIER_CMD_GLOBAL (1) and no flags
        // only waits; it changes no state.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, 1, 0, 0) };
        ensure!(rc == 0, "membarrier: {}", std::io::Error::last_os_error());
        grace.push(t.elapsed());
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "| synchronize_rcu() alone (membarrier GLOBAL), for scale | - | - | - | {} | {} |",
        ms(percentile(&grace, 0.5)),
        ms(percentile(&grace, 0.99)),
    );
    for variant in [Variant::Host, Variant::Pod, Variant::DownThenHost] {
        let pods = new_pods(n, &format!("p{}", variant as u8))?;
        let (mut down, mut unlisted, mut call) = (Vec::new(), Vec::new(), Vec::new());
        for pod in &pods {
            let (_, prev) = driver.add(pod)?;
            let host_name = prev["interfaces"][0]["name"]
                .as_str()
                .context("host interface in the ADD result")?
                .to_owned();
            let mut host = driver.node.run_in(Netlink::new)??;
            let mut watcher = driver.node.run_in(Netlink::new)??;
            let mut inside = NetnsFile::open(&pod.ns.path())?.netlink()?;
            thread::sleep(Duration::from_millis(50));

            let started = AtomicBool::new(false);
            let (d, u, c) = thread::scope(|s| -> Result<_> {
                let watch = s.spawn(|| -> Result<Instant> {
                    let deadline = Instant::now() + CALL_TIMEOUT;
                    while !started.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    while watcher.link(&host_name)?.is_some() {
                        ensure!(Instant::now() < deadline, "{host_name} never went away");
                    }
                    Ok(Instant::now())
                });
                let mut down = None;
                if let Variant::DownThenHost = variant {
                    let t = Instant::now();
                    host.set_down(&host_name)?;
                    down = Some(t.elapsed());
                }
                let t0 = Instant::now();
                started.store(true, Ordering::Release);
                match variant {
                    Variant::Host | Variant::DownThenHost => host.delete_link(&host_name)?,
                    Variant::Pod => inside.delete_link("eth0")?,
                };
                let call = t0.elapsed();
                let gone = watch.join().expect("watcher")?;
                Ok((down, gone.saturating_duration_since(t0), call))
            })?;
            down.extend(d);
            unlisted.push(u);
            call.push(c);
            // The pod's address; the link is gone already.
            driver.del(pod, &prev)?;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            variant.label(),
            ms(percentile(&down, 0.5)),
            ms(percentile(&unlisted, 0.5)),
            ms(percentile(&unlisted, 0.99)),
            ms(percentile(&call, 0.5)),
            ms(percentile(&call, 0.99)),
        );
        thread::sleep(SETTLE);
    }
    drop(driver);
    probe_tombstone(&Driver::new(Peer::Fairlead)?, n)
}

/// What DEL's tombstone steps cost (`cni/src/teardown.rs`), one request at a
/// time, in-process, and what is left for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Rename the host end, leaving it up (logs "renamed ... while UP").
    RenameUp,
    /// Set the host end down, nothing else.
    Down,
    /// Rename the host end and set it down, in one request.
    RenameDown,
    /// Set the host end down, then rename it: two requests (what DEL does).
    DownThenRename,
    /// Then the same for the pod end, entering the pod namespace and
    /// looking the end up first (what DEL does).
    PodEnd,
    /// Then `DELLINK <tombstone>` to the agent until its `OK`.
    HandOff,
    /// Then the delete of the down, renamed pair: the agent's cost per pod.
    Reap,
}

impl Step {
    const ALL: [Step; 7] = [
        Step::RenameUp,
        Step::Down,
        Step::RenameDown,
        Step::DownThenRename,
        Step::PodEnd,
        Step::HandOff,
        Step::Reap,
    ];

    fn label(self) -> &'static str {
        match self {
            Step::RenameUp => "rename the host end (left up)",
            Step::Down => "set the host end down",
            Step::RenameDown => "rename + down the host end, one request",
            Step::DownThenRename => "down, then rename the host end (DEL)",
            Step::PodEnd => "enter the pod, look up, down, rename its end (DEL)",
            Step::HandOff => "DELLINK to the agent until OK (DEL)",
            Step::Reap => "delete the tombstoned pair (the agent, per pod)",
        }
    }
}

fn probe_tombstone(driver: &Driver, n: usize) -> Result<()> {
    let agent = driver
        .agent
        .as_ref()
        .context("the probe's driver runs an agent")?;
    let socket = driver.data.path().join("agent.sock");
    println!("\nDEL's tombstone steps, {n} pods per row, in-process rtnetlink. Times in ms.\n");
    println!("| step | call p50 | call p99 |");
    println!("|---|---:|---:|");
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); Step::ALL.len()];
    // The first three rows each on fresh pods; the last four are the steps
    // of one DEL after another, on the same pods.
    for step in [
        Step::RenameUp,
        Step::Down,
        Step::RenameDown,
        Step::DownThenRename,
    ] {
        let pods = new_pods(n, &format!("t{}", step as u8))?;
        for (i, pod) in pods.iter().enumerate() {
            let (_, prev) = driver.add(pod)?;
            let host_name = prev["interfaces"][0]["name"]
                .as_str()
                .context("host interface in the ADD result")?
                .to_owned();
            let mut host = driver.node.run_in(Netlink::new)??;
            let link = host.link(&host_name)?.context("host end")?;
            let tomb = format!("flz{:06x}{:06x}", step as u8, i);
            thread::sleep(Duration::from_millis(20));
            let mut time = |step: Step, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
                let t = Instant::now();
                f()?;
                times[step as usize].push(t.elapsed());
                Ok(())
            };
            match step {
                Step::RenameUp => {
                    time(
                        step,
                        &mut || Ok(host.rename_link(link.index, &tomb, false)?),
                    )?
                }
                Step::Down => time(step, &mut || Ok(host.set_down_index(link.index)?))?,
                Step::RenameDown => {
                    time(step, &mut || Ok(host.rename_link(link.index, &tomb, true)?))?
                }
                _ => {
                    time(Step::DownThenRename, &mut || {
                        host.set_down_index(link.index)?;
                        Ok(host.rename_link(link.index, &tomb, false)?)
                    })?;
                    time(Step::PodEnd, &mut || {
                        let mut inside = NetnsFile::open(&pod.ns.path())?.netlink()?;
                        let peer = inside.link("eth0")?.context("pod end")?;
                        ensure!(Some(peer.index) == link.peer_index, "not our pod end");
                        inside.set_down_index(peer.index)?;
                        Ok(inside.rename_link(peer.index, &tomb, false)?)
                    })?;
                    if i % 2 == 0 {
                        // Half of them through the agent (its reaper then
                        // deletes them), half deleted here, timed.
                        time(Step::HandOff, &mut || {
                            let answer = fairlead_cni::agent::ask(
                                &socket,
                                &format!("DELLINK {tomb}"),
                                Duration::from_secs(1),
                            )?;
                            ensure!(answer == "OK", "the agent answered {answer:?}");
                            Ok(())
                        })?;
                        agent.drain()?;
                    } else {
                        time(Step::Reap, &mut || {
                            ensure!(host.delete_link(&tomb)?, "{tomb} was not there");
                            Ok(())
                        })?;
                    }
                }
            }
            if matches!(step, Step::Down) {
                host.delete_link(&host_name)?;
            } else if step != Step::DownThenRename {
                host.delete_link(&tomb)?;
            }
            driver.del(pod, &prev)?;
        }
        thread::sleep(SETTLE);
    }
    for step in Step::ALL {
        println!(
            "| {} | {} | {} |",
            step.label(),
            ms(percentile(&times[step as usize], 0.5)),
            ms(percentile(&times[step as usize], 0.99)),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// IPAM directories: removed on drop, and swept when their owner is dead.

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes `fl-bench-<pid>-<n>` directories of runs that are no longer alive.
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, n)) = name
            .strip_prefix(TMP_PREFIX)
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if n.parse::<u32>().is_err() || pid.parse::<u32>().is_err() {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
