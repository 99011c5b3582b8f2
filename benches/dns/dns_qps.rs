//! Cluster DNS throughput, latency and memory beside Knot DNS, unbound and bind9 (issue 6).
//!
//! `cargo bench -p fairlead-dns --bench dns_qps` (root; needs `dnsperf`, `knotd`, `unbound`,
//! `named` from Debian). Everything runs inside a network namespace created for the run
//! (`fl-dnsbench-<pid>`, only `lo`, servers on 127.0.0.1:53), removed at the end with the
//! temporary directory, also on failure or SIGINT/SIGTERM.
//!
//! Data: 10,000 ClusterIP Services in 50 namespaces, one named TCP port each, so an A, an SRV
//! and a PTR record per Service. Fairlead gets them as core Services in a Snapshot; the peers
//! get zone files (Knot, bind9) or `local-data` (unbound) generated from the same list.
//! Queries: 40% A, 20% SRV, 20% PTR, 20% NXDOMAIN (names inside cluster.local), shuffled.
//!
//! Per server: max qps (`dnsperf -c 4 -T 1 -q 500 -l 10`), then latency at `-Q 5000 -l 10` with
//! `-v` (one line per response, from which p50/p99 are computed), then VmRSS of the server.
//!
//! Flags: `--rounds N` (default 1), `--only a,b` (fairlead,fairlead-pods,knot,unbound,bind9),
//! `--secs S` (dnsperf -l, default 10).
//! Internal modes: `--serve-fairlead <pods>`, `--probe <name>`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead_core::{Pod, Service, Snapshot};
use k8s_openapi::api::core::v1 as corev1;
use serde_json::json;

const SERVICES: usize = 10_000;
const NAMESPACES: usize = 50;
const PODS: usize = 50_000;
const ZONE: &str = "cluster.local";
const QUERIES: usize = 100_000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Svc {
    ns: String,
    name: String,
    ip: [u8; 4],
}

fn services() -> Vec<Svc> {
    (0..SERVICES)
        .map(|i| Svc {
            ns: format!("ns-{:02}", i % NAMESPACES),
            name: format!("svc-{i:05}"),
            // 10.96.1.1 - 10.96.40.250: away from 10.96.0.10 (kube-dns).
            ip: [10, 96, (1 + i / 250) as u8, (1 + i % 250) as u8],
        })
        .collect()
}

fn ptr_name(ip: [u8; 4]) -> String {
    format!("{}.{}.{}.{}.in-addr.arpa", ip[3], ip[2], ip[1], ip[0])
}

/// xorshift, so the query file is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn query_file(svcs: &[Svc]) -> String {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::new();
    for _ in 0..QUERIES {
        let s = &svcs[rng.below(svcs.len())];
        let kind = rng.below(10);
        match kind {
            0..=3 => writeln!(out, "{}.{}.svc.{ZONE} A", s.name, s.ns),
            4..=5 => writeln!(out, "_http._tcp.{}.{}.svc.{ZONE} SRV", s.name, s.ns),
            6..=7 => writeln!(out, "{} PTR", ptr_name(s.ip)),
            _ => writeln!(out, "nosuch-{}.{}.svc.{ZONE} A", rng.below(1_000_000), s.ns),
        }
        .unwrap();
    }
    out
}

const SOA: &str = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5";

fn forward_zone(svcs: &[Svc]) -> String {
    let mut z = format!(
        "$ORIGIN {ZONE}.\n$TTL 5\n@ IN SOA {SOA}\n@ IN NS ns.dns\nns.dns IN A 10.96.0.10\n"
    );
    for s in svcs {
        let [a, b, c, d] = s.ip;
        writeln!(z, "{}.{}.svc IN A {a}.{b}.{c}.{d}", s.name, s.ns).unwrap();
        writeln!(
            z,
            "_http._tcp.{n}.{ns}.svc IN SRV 0 100 80 {n}.{ns}.svc.{ZONE}.",
            n = s.name,
            ns = s.ns
        )
        .unwrap();
    }
    z
}

fn reverse_zone(svcs: &[Svc]) -> String {
    let mut z =
        format!("$ORIGIN 96.10.in-addr.arpa.\n$TTL 5\n@ IN SOA {SOA}\n@ IN NS ns.dns.{ZONE}.\n");
    for s in svcs {
        writeln!(
            z,
            "{}.{} IN PTR {}.{}.svc.{ZONE}.",
            s.ip[3], s.ip[2], s.name, s.ns
        )
        .unwrap();
    }
    z
}

fn unbound_conf(svcs: &[Svc], dir: &Path) -> String {
    let mut c = format!(
        "server:\n  interface: 127.0.0.1\n  port: 53\n  do-ip6: no\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: 2\n  so-reuseport: yes\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  local-zone: \"{ZONE}.\" static\n  local-zone: \"96.10.in-addr.arpa.\" static\n  local-data: \"{ZONE}. 5 IN SOA {SOA}\"\n  local-data: \"96.10.in-addr.arpa. 5 IN SOA {SOA}\"\n",
        d = dir.display()
    );
    for s in svcs {
        let [a, b, cc, d] = s.ip;
        let fq = format!("{}.{}.svc.{ZONE}.", s.name, s.ns);
        writeln!(c, "  local-data: \"{fq} 5 IN A {a}.{b}.{cc}.{d}\"").unwrap();
        writeln!(
            c,
            "  local-data: \"_http._tcp.{fq} 5 IN SRV 0 100 80 {fq}\""
        )
        .unwrap();
        writeln!(c, "  local-data: \"{}. 5 IN PTR {fq}\"", ptr_name(s.ip)).unwrap();
    }
    c.push_str("remote-control:\n  control-enable: no\n");
    c
}

fn knot_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "server:\n  listen: 127.0.0.1@53\n  rundir: \"{d}/knot-run\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         database:\n  storage: \"{d}/knot-db\"\n\
         template:\n  - id: default\n    storage: \"{d}\"\n    file: \"%s.zone\"\n    semantic-checks: off\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n\
         zone:\n  - domain: {ZONE}\n  - domain: 96.10.in-addr.arpa\n"
    )
}

fn named_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "options {{\n  directory \"{d}\";\n  listen-on port 53 {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  pid-file none;\n  session-keyfile \"{d}/session.key\";\n  managed-keys-directory \"{d}\";\n  dnssec-validation no;\n  allow-query {{ any; }};\n  notify no;\n}};\ncontrols {{ }};\n\
         zone \"{ZONE}\" {{ type primary; file \"{d}/{ZONE}.zone\"; }};\n\
         zone \"96.10.in-addr.arpa\" {{ type primary; file \"{d}/96.10.in-addr.arpa.zone\"; }};\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Fairlead server (child mode, inside the namespace)

fn fairlead_snapshot(pods: usize) -> Snapshot {
    let mut b = Snapshot::builder();
    for s in services() {
        let [a, bb, c, d] = s.ip;
        let v = json!({
            "metadata": {"name": s.name, "namespace": s.ns},
            "spec": {"clusterIP": format!("{a}.{bb}.{c}.{d}"), "clusterIPs": [format!("{a}.{bb}.{c}.{d}")],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        });
        let k: corev1::Service = serde_json::from_value(v).unwrap();
        b = b.service(Service::try_from(&k).unwrap());
    }
    for i in 0..pods {
        let v = json!({
            "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{:02}", i % NAMESPACES)},
            "spec": {"containers": [{"name": "app"}], "nodeName": format!("node-{}", i % 100)},
            "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", i / 250, 1 + i % 250),
                       "podIPs": [{"ip": format!("10.244.{}.{}", i / 250, 1 + i % 250)}]}
        });
        let k: corev1::Pod = serde_json::from_value(v).unwrap();
        b = b.pod(Pod::try_from(&k).unwrap());
    }
    b.build()
}

fn serve_fairlead(pods: usize) -> ! {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let snap = fairlead_snapshot(pods);
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(snap));
        let config = fairlead_dns::Config {
            listen: "127.0.0.1:53".parse().unwrap(),
            ..fairlead_dns::Config::default()
        };
        let _server = fairlead_dns::Server::bind(config, rx).await.unwrap();
        eprintln!("fairlead-dns ready");
        std::future::pending::<()>().await;
    });
    unreachable!()
}

/// One A query to 127.0.0.1:53, exit 0 if a response with NOERROR arrives within 200 ms.
fn probe(name: &str) -> ! {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = sock.send_to(&q, "127.0.0.1:53");
    let mut buf = [0u8; 1500];
    match sock.recv(&mut buf) {
        Ok(n) if n >= 12 && buf[0] == 0x12 && buf[3] & 0x0f == 0 && buf[7] > 0 => {
            std::process::exit(0)
        }
        _ => std::process::exit(1),
    }
}

// ---------------------------------------------------------------------------------------------
// Orchestration (root namespace process; everything it starts runs in the bench namespace)

struct Env {
    netns: String,
    dir: PathBuf,
    self_exe: PathBuf,
    secs: u32,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        eprintln!(
            "cleaned up: netns {} and {}",
            self.netns,
            self.dir.display()
        );
    }
}

/// A server process in the namespace; stopped (SIGTERM, then SIGKILL) by its own pid on drop.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("{}: killed after 5 s", self.name);
        }
    }
}

impl Env {
    fn in_ns(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, prog]);
        c
    }

    fn start(&self, name: &'static str) -> Daemon {
        let d = &self.dir;
        let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
        let mut cmd = match name {
            "fairlead" | "fairlead-pods" => {
                let mut c = self.in_ns(self.self_exe.to_str().unwrap());
                let pods = if name == "fairlead" { 0 } else { PODS };
                c.args(["--serve-fairlead", &pods.to_string()]);
                c
            }
            "knot" => {
                let mut c = self.in_ns("knotd");
                c.args(["-c", d.join("knot.conf").to_str().unwrap()]);
                c
            }
            "unbound" => {
                let mut c = self.in_ns("unbound");
                c.args(["-d", "-c", d.join("unbound.conf").to_str().unwrap()]);
                c
            }
            "bind9" => {
                let mut c = self.in_ns("named");
                c.args(["-g", "-4", "-c", d.join("named.conf").to_str().unwrap()]);
                c
            }
            _ => unreachable!(),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, name };
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = daemon.child.try_wait() {
                panic!(
                    "{name} exited ({st}) before answering; log:\n{}",
                    std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default()
                );
            }
            let ok = self
                .in_ns(self.self_exe.to_str().unwrap())
                .args(["--probe", &format!("svc-00001.ns-01.svc.{ZONE}")])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) || STOP.load(Ordering::SeqCst) {
                panic!("{name} did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{name}: answering after {:.1} s", t.elapsed().as_secs_f64());
        daemon
    }

    fn dnsperf(&self, extra: &[&str], verbose: bool) -> String {
        let secs = self.secs.to_string();
        let qf = self.dir.join("queries.txt");
        let mut c = self.in_ns("dnsperf");
        c.args([
            "-s",
            "127.0.0.1",
            "-p",
            "53",
            "-d",
            qf.to_str().unwrap(),
            "-l",
            &secs,
        ]);
        c.args(extra);
        if verbose {
            c.arg("-v");
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).unwrap();
            s
        });
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if STOP.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("interrupted");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        out.push_str(&reader.join().unwrap());
        out
    }
}

#[derive(Default, Clone)]
struct Row {
    name: &'static str,
    qps: f64,
    lost: u64,
    rcodes: String,
    avg_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    q5k: f64,
    rss_kib: u64,
    samples: usize,
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key).map(|r| r.trim()))
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn measure(env: &Env, name: &'static str) -> Row {
    let daemon = env.start(name);
    let mut row = Row {
        name,
        ..Row::default()
    };
    // Untimed warm-up (2 s at a low rate).
    let _ = {
        let mut c = env.in_ns("dnsperf");
        c.args([
            "-s",
            "127.0.0.1",
            "-d",
            env.dir.join("queries.txt").to_str().unwrap(),
        ]);
        c.args(["-l", "2", "-Q", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    let out = env.dnsperf(&["-c", "4", "-T", "1", "-q", "500"], false);
    row.qps = field(&out, "Queries per second:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    row.lost = field(&out, "Queries lost:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    row.rcodes = format!(
        "{}; avg packet size {}",
        field(&out, "Response codes:").unwrap_or(""),
        field(&out, "Average packet size:").unwrap_or("")
    );

    let out = env.dnsperf(&["-c", "1", "-T", "1", "-q", "100", "-Q", "5000"], true);
    row.q5k = field(&out, "Queries per second:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // "> NOERROR name TYPE 0.000123" per response.
    let mut lat: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if !lat.is_empty() {
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1e3;
        row.p50_ms = pct(0.50);
        row.p99_ms = pct(0.99);
        row.max_ms = lat[lat.len() - 1] * 1e3;
        row.avg_ms = lat.iter().sum::<f64>() / lat.len() as f64 * 1e3;
        row.samples = lat.len();
    }
    row.rss_kib = rss_kib(daemon.child.id());
    drop(daemon);
    eprintln!(
        "{name}: {:.0} qps (lost {}), 5k: p50 {:.3} p99 {:.3} max {:.3} ms, RSS {:.1} MiB; {}",
        row.qps,
        row.lost,
        row.p50_ms,
        row.p99_ms,
        row.max_ms,
        row.rss_kib as f64 / 1024.0,
        row.rcodes
    );
    row
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(p) = arg("--serve-fairlead") {
        serve_fairlead(p.parse().unwrap());
    }
    if let Some(n) = arg("--probe") {
        probe(&n);
    }
    let rounds: usize = arg("--rounds").map_or(1, |v| v.parse().unwrap());
    let secs: u32 = arg("--secs").map_or(10, |v| v.parse().unwrap());
    let only = arg("--only").unwrap_or_else(|| "fairlead,knot,unbound,bind9,fairlead-pods".into());
    let peers: Vec<&'static str> = ["fairlead", "knot", "unbound", "bind9", "fairlead-pods"]
        .into_iter()
        .filter(|p| only.split(',').any(|o| o == *p))
        .collect();

    if unsafe { libc::geteuid() } != 0 {
        eprintln!("dns_qps needs root (network namespace); skipping");
        return;
    }
    for tool in ["dnsperf", "knotd", "unbound", "named"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool} >/dev/null")])
            .status()
            .unwrap()
            .success()
        {
            eprintln!("missing {tool}: apt-get install dnsperf knot unbound bind9");
            return;
        }
    }
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    let pid = std::process::id();
    let netns = format!("fl-dnsbench-{pid}");
    let dir = std::env::temp_dir().join(format!("fl-dnsbench-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip netns add {netns} failed");
    let env = Env {
        netns,
        dir,
        self_exe: std::env::current_exe().unwrap(),
        secs,
    };
    assert!(env
        .in_ns("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success());

    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&env, rounds, &peers)));
    drop(env);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(env: &Env, rounds: usize, peers: &[&'static str]) {
    let d = &env.dir;
    let svcs = services();
    std::fs::write(d.join("queries.txt"), query_file(&svcs)).unwrap();
    std::fs::write(d.join(format!("{ZONE}.zone")), forward_zone(&svcs)).unwrap();
    std::fs::write(d.join("96.10.in-addr.arpa.zone"), reverse_zone(&svcs)).unwrap();
    std::fs::write(d.join("unbound.conf"), unbound_conf(&svcs, d)).unwrap();
    std::fs::write(d.join("knot.conf"), knot_conf(d)).unwrap();
    std::fs::write(d.join("named.conf"), named_conf(d)).unwrap();
    for sub in ["knot-run", "knot-db"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }

    let mut all: Vec<Vec<Row>> = Vec::new();
    for r in 0..rounds {
        eprintln!("round {}/{rounds}", r + 1);
        all.push(peers.iter().map(|p| measure(env, p)).collect());
    }

    let mut stdout = std::io::stdout().lock();
    for (r, rows) in all.iter().enumerate() {
        writeln!(
            stdout,
            "\nround {} ({} Services, {} namespaces, dnsperf -l {})",
            r + 1,
            SERVICES,
            NAMESPACES,
            env.secs
        )
        .unwrap();
        writeln!(stdout, "| server | max qps | lost | 5k qps: achieved | avg ms | p50 ms | p99 ms | max ms | RSS MiB |").unwrap();
        writeln!(stdout, "|---|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
        for x in rows {
            writeln!(
                stdout,
                "| {} | {:.0} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.2} | {:.1} |",
                x.name,
                x.qps,
                x.lost,
                x.q5k,
                x.avg_ms,
                x.p50_ms,
                x.p99_ms,
                x.max_ms,
                x.rss_kib as f64 / 1024.0
            )
            .unwrap();
        }
        for x in rows {
            writeln!(
                stdout,
                "  {}: {}; latency samples {}",
                x.name, x.rcodes, x.samples
            )
            .unwrap();
        }
        if let (Some(f), Some(k)) = (
            rows.iter().find(|x| x.name == "fairlead"),
            rows.iter().find(|x| x.name == "knot"),
        ) {
            writeln!(stdout, "  fairlead/knot qps ratio: {:.2}", f.qps / k.qps).unwrap();
        }
    }
}
