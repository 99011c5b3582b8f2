//! Cluster DNS throughput, latency and memory beside Knot DNS, unbound, bind9 and hickory-dns
//! (issue 6).
//!
//! `cargo bench -p fairlead-dns --bench dns_qps` (root; needs `dnsperf`, `knotd`, `unbound`,
//! `named` from Debian: `apt-get install dnsperf knot unbound bind9`, and `hickory-dns` from
//! crates.io: `cargo install hickory-dns --locked`; without it the hickory row is skipped with
//! a note). Everything runs inside a network namespace created for the run
//! (`fl-dnsbench-<pid>`, only `lo`, servers on 127.0.0.1:53), removed at the end with the
//! temporary directory, also on failure or SIGINT/SIGTERM.
//!
//! Data: 10,000 ClusterIP Services in 50 namespaces, one named TCP port each, so an A, an SRV
//! and a PTR record per Service. Fairlead learns them as `fairlead dns` does, through its own
//! watchers from an embedded API server in a process of its own (cluster.rs; the 50,000 pods of
//! the `fairlead-pods` row are there too); the peers get zone files (Knot, bind9, hickory-dns: the same two files) or `local-data` (unbound)
//! generated from the same list.
//! Queries: 40% A, 20% SRV, 20% PTR, 20% NXDOMAIN (names inside cluster.local), shuffled.
//!
//! Per server: answers checked first (`--verify`: every 100th query of the file, record by
//! record), max qps (`dnsperf -c 4 -T 1 -q 500 -l 10`, whose rcode mix must match the query
//! file's), then latency at `-Q 5000 -l 10` with `-v` (one line per response, from which
//! p50/p99 are computed, and whose rcode must be NXDOMAIN for exactly the `nosuch-` names),
//! then VmRSS of the server. A server that answers wrongly is marked in the output.
//!
//! Flags: `--rounds N` (default 1), `--only a,b` (fairlead,fairlead-pods,knot,unbound,bind9,
//! hickory), `--secs S` (dnsperf -l, default 10).
//! Internal modes: `--serve-fairlead <pods>`, `--serve-api <pods>`, `--probe <name>`,
//! `--verify <queries file>`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "cluster.rs"]
mod cluster;

use cluster::{services, Svc, NAMESPACES, PODS, SERVICES};

const ZONE: &str = "cluster.local";
const QUERIES: usize = 100_000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
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

/// hickory-dns (the renamed trust-dns server) as an authoritative primary for the same two
/// zone files Knot and bind9 load. `drop_privileges = false`: like the other servers here it
/// runs as root inside the bench namespace. One UDP socket, as Fairlead has; the thread count
/// is given on the command line (`--workers`, one per CPU, as Knot, bind9 and Fairlead's tokio
/// runtime have).
fn hickory_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# hickory-dns config written by benches/dns/dns_qps.rs\n\
         listen_addrs_ipv4 = [\"127.0.0.1\"]\nlisten_port = 53\ndirectory = \"{d}\"\n\
         drop_privileges = false\n\n[udp_socket]\nsockets = 1\n\n\
         [[zones]]\nzone = \"{ZONE}\"\nzone_type = \"Primary\"\n\
         stores = {{ type = \"file\", zone_path = \"{d}/{ZONE}.zone\" }}\n\n\
         [[zones]]\nzone = \"96.10.in-addr.arpa\"\nzone_type = \"Primary\"\n\
         stores = {{ type = \"file\", zone_path = \"{d}/96.10.in-addr.arpa.zone\" }}\n"
    )
}

/// `hickory-dns` on PATH, else where `cargo install` puts it.
fn find_hickory() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("hickory-dns"))
        .find(|p| p.is_file())
}

/// The first line of `prog flag` with a digit in it (a version), or "" if it does not run.
fn version_of(prog: &Path, flag: &str) -> String {
    Command::new(prog)
        .arg(flag)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.chars().any(|c| c.is_ascii_digit()))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Fairlead server (child mode, inside the namespace)

/// The DNS server as `fairlead dns` runs it: its own watchers on an API server (a child
/// process holding the Services and `pods` pods, see cluster.rs), configured by the
/// environment (`FAIRLEAD_DNS_PODS=verified` to watch the pods too), listening on 127.0.0.1:53.
fn serve_fairlead(pods: usize) -> ! {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--serve-api", &pods.to_string()]);
    let api = cluster::ApiProcess::start(cmd);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let config = fairlead_dns::Config {
            listen: "127.0.0.1:53".parse().unwrap(),
            ..fairlead_dns::Config::from_env().unwrap()
        };
        let server = fairlead_dns::Server::bind_api(config, api.client())
            .await
            .unwrap();
        while !server.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

/// Sends every 100th query of the query file to 127.0.0.1:53 and checks each answer record by
/// record against the Service list: A -> the Service's address, SRV -> port 80 at the Service's
/// name, PTR -> the Service's name, `nosuch-` names -> NXDOMAIN with no answer. Prints
/// "verify: <checked> checked, <wrong> wrong" and up to five wrong answers, exits 0.
fn verify(queries: &Path) -> ! {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    let svcs = services();
    let mut fq: HashMap<String, &Svc> = HashMap::new();
    let mut ptr: HashMap<String, &Svc> = HashMap::new();
    for s in &svcs {
        fq.insert(format!("{}.{}.svc.{ZONE}", s.name, s.ns), s);
        ptr.insert(ptr_name(s.ip), s);
    }
    let norm = |n: &Name| n.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let text = std::fs::read_to_string(queries).unwrap();
    let (mut checked, mut wrong) = (0usize, Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(i, _)| i % 100 == 0) {
        let mut it = line.split_whitespace();
        let (qname, qtype) = (it.next().unwrap(), it.next().unwrap());
        let rtype = match qtype {
            "A" => RecordType::A,
            "SRV" => RecordType::SRV,
            "PTR" => RecordType::PTR,
            t => panic!("query type {t} not in the mix"),
        };
        let mut q = Message::query();
        q.metadata.id = i as u16;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(qname).unwrap(), rtype));
        let wire = q.to_vec().unwrap();
        let mut buf = [0u8; 4096];
        let mut resp = None;
        for _ in 0..3 {
            let _ = sock.send_to(&wire, "127.0.0.1:53");
            match sock.recv(&mut buf) {
                Ok(n) => match Message::from_vec(&buf[..n]) {
                    Ok(m) if m.metadata.id == i as u16 => {
                        resp = Some(m);
                        break;
                    }
                    _ => continue,
                },
                Err(_) => continue,
            }
        }
        checked += 1;
        let Some(m) = resp else {
            wrong.push(format!("{line}: no answer"));
            continue;
        };
        let rcode = m.metadata.response_code;
        let answers: Vec<(String, &RData)> =
            m.answers.iter().map(|r| (norm(&r.name), &r.data)).collect();
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        let ok = match rtype {
            RecordType::A => {
                fq.get(&q)
                    .map_or(rcode == ResponseCode::NXDomain && answers.is_empty(), |s| {
                        rcode == ResponseCode::NoError
                            && answers.iter().any(|(n, d)| {
                                *n == q && matches!(d, RData::A(a) if a.0.octets() == s.ip)
                            })
                    })
            }
            RecordType::SRV => {
                let target = q.strip_prefix("_http._tcp.").unwrap_or("");
                fq.contains_key(target)
                    && rcode == ResponseCode::NoError
                    && answers.iter().any(|(n, d)| {
                        *n == q
                            && matches!(d, RData::SRV(srv)
                                if srv.port == 80 && norm(&srv.target) == target)
                    })
            }
            _ => ptr.get(&q).is_some_and(|s| {
                let target = format!("{}.{}.svc.{ZONE}", s.name, s.ns);
                rcode == ResponseCode::NoError
                    && answers
                        .iter()
                        .any(|(n, d)| *n == q && matches!(d, RData::PTR(p) if norm(&p.0) == target))
            }),
        };
        if !ok {
            wrong.push(format!(
                "{line}: {rcode:?} answers {:?}",
                m.answers.iter().map(|r| r.to_string()).collect::<Vec<_>>()
            ));
        }
    }
    println!("verify: {checked} checked, {} wrong", wrong.len());
    for w in wrong.iter().take(5) {
        println!("  {w}");
    }
    std::process::exit(0)
}

// ---------------------------------------------------------------------------------------------
// Orchestration (root namespace process; everything it starts runs in the bench namespace)

struct Env {
    netns: String,
    dir: PathBuf,
    self_exe: PathBuf,
    secs: u32,
    hickory: Option<PathBuf>,
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

    /// Starts `name` and waits until it answers; Err (the daemon stopped again) if it exits
    /// first or does not answer within 60 s.
    fn start(&self, name: &'static str) -> Result<Daemon, String> {
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
            "hickory" => {
                let exe = self.hickory.as_ref().expect("hickory-dns checked before");
                let mut c = self.in_ns(exe.to_str().unwrap());
                // -q: warnings only (at INFO it logs two lines per query), as the others log.
                let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
                c.args(["-q", "--workers", &workers.to_string(), "-c"]);
                c.arg(d.join("hickory.toml"));
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
                return Err(format!(
                    "{name} exited ({st}) before answering; log:\n{}",
                    std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default()
                ));
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
            if STOP.load(Ordering::SeqCst) {
                panic!("interrupted");
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("{name} did not answer within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{name}: answering after {:.1} s", t.elapsed().as_secs_f64());
        Ok(daemon)
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
    /// What the three answer checks found; `wrong` if any of them failed.
    checks: Vec<String>,
    wrong: bool,
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

/// The share of NXDOMAIN names (`nosuch-`) in the query file.
fn expected_nx_share(queries: &str) -> f64 {
    let total = queries.lines().count().max(1);
    let nx = queries.lines().filter(|l| l.starts_with("nosuch-")).count();
    nx as f64 / total as f64
}

/// Checks dnsperf's "Response codes: NOERROR 1374585 (80.00%), NXDOMAIN 343627 (20.00%)"
/// against the query file's mix: only NOERROR and NXDOMAIN, NXDOMAIN within 0.5 points.
fn check_rcode_mix(rcodes: &str, nx_expected: f64) -> Result<String, String> {
    let (mut total, mut nx, mut other) = (0u64, 0u64, Vec::new());
    for part in rcodes.split(',') {
        let mut it = part.split_whitespace();
        let (Some(code), Some(n)) = (it.next(), it.next().and_then(|n| n.parse::<u64>().ok()))
        else {
            continue;
        };
        total += n;
        match code {
            "NOERROR" => {}
            "NXDOMAIN" => nx += n,
            _ => other.push(part.trim().to_string()),
        }
    }
    if total == 0 {
        return Err("max-qps run: no response codes".into());
    }
    let share = nx as f64 / total as f64;
    let msg = format!(
        "max-qps rcodes: NXDOMAIN {:.2}% (query file {:.2}%)",
        share * 100.0,
        nx_expected * 100.0
    );
    if !other.is_empty() {
        Err(format!("{msg}, unexpected {}", other.join(", ")))
    } else if (share - nx_expected).abs() > 0.005 {
        Err(format!("{msg}: off by more than 0.5 points"))
    } else {
        Ok(msg)
    }
}

fn measure(env: &Env, name: &'static str) -> Result<Row, String> {
    let daemon = env.start(name)?;
    let mut row = Row {
        name,
        ..Row::default()
    };
    let qf = env.dir.join("queries.txt");
    let queries = std::fs::read_to_string(&qf).unwrap();
    let check = |row: &mut Row, r: Result<String, String>| match r {
        Ok(m) => row.checks.push(m),
        Err(m) => {
            eprintln!("{name}: WRONG ANSWERS: {m}");
            row.checks.push(format!("WRONG: {m}"));
            row.wrong = true;
        }
    };

    // 1. Record by record, on a sample of the query file (before any load).
    let out = env
        .in_ns(env.self_exe.to_str().unwrap())
        .arg("--verify")
        .arg(&qf)
        .stderr(Stdio::inherit())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let summary = out
        .lines()
        .next()
        .unwrap_or("verify: did not run")
        .to_string();
    let bad = !summary.ends_with(" 0 wrong");
    check(
        &mut row,
        if bad {
            Err(out.trim_end().replace('\n', "; "))
        } else {
            Ok(summary.replace("verify: ", "sampled answers: "))
        },
    );

    // Untimed warm-up (2 s at a low rate).
    let _ = {
        let mut c = env.in_ns("dnsperf");
        c.args(["-s", "127.0.0.1", "-d", qf.to_str().unwrap()]);
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
    let rcodes = field(&out, "Response codes:").unwrap_or("");
    row.rcodes = format!(
        "{rcodes}; avg packet size {}",
        field(&out, "Average packet size:").unwrap_or("")
    );
    // 2. The rcode mix of the max-qps run.
    check(
        &mut row,
        check_rcode_mix(rcodes, expected_nx_share(&queries)),
    );

    let out = env.dnsperf(&["-c", "1", "-T", "1", "-q", "100", "-Q", "5000"], true);
    row.q5k = field(&out, "Queries per second:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // "> NOERROR name TYPE 0.000123" per response.
    let mut lat = Vec::new();
    let (mut rc_wrong, mut first_wrong) = (0usize, None);
    for l in out.lines().filter(|l| l.starts_with("> ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        // 3. Every response's rcode: NXDOMAIN for exactly the `nosuch-` names.
        let want = if f[2].starts_with("nosuch-") {
            "NXDOMAIN"
        } else {
            "NOERROR"
        };
        if f[1] != want {
            rc_wrong += 1;
            first_wrong.get_or_insert_with(|| l.to_string());
        }
        if let Ok(v) = f[f.len() - 1].parse::<f64>() {
            lat.push(v);
        }
    }
    let n = lat.len();
    check(
        &mut row,
        match first_wrong {
            None if n > 0 => Ok(format!("5k-run rcodes: {n}/{n} as expected")),
            None => Err("5k run: no responses".into()),
            Some(l) => Err(format!("5k-run rcodes: {rc_wrong}/{n} wrong, first: {l}")),
        },
    );
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
    Ok(row)
}

const ALL_PEERS: [&str; 6] = [
    "fairlead",
    "knot",
    "unbound",
    "bind9",
    "hickory",
    "fairlead-pods",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(p) = arg("--serve-api") {
        cluster::serve_api(SERVICES, p.parse().unwrap());
    }
    if let Some(p) = arg("--serve-fairlead") {
        serve_fairlead(p.parse().unwrap());
    }
    if let Some(n) = arg("--probe") {
        probe(&n);
    }
    if let Some(q) = arg("--verify") {
        verify(Path::new(&q));
    }
    let rounds: usize = arg("--rounds").map_or(1, |v| v.parse().unwrap());
    let secs: u32 = arg("--secs").map_or(10, |v| v.parse().unwrap());
    let only = arg("--only").unwrap_or_else(|| ALL_PEERS.join(","));
    for o in only.split(',') {
        assert!(
            ALL_PEERS.contains(&o),
            "--only: unknown server {o} (known: {})",
            ALL_PEERS.join(",")
        );
    }
    let mut peers: Vec<&'static str> = ALL_PEERS
        .into_iter()
        .filter(|p| only.split(',').any(|o| o == *p))
        .collect();

    if unsafe { libc::geteuid() } != 0 {
        eprintln!("dns_qps needs root (network namespace); skipping");
        return;
    }
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool} >/dev/null")])
            .status()
            .unwrap()
            .success()
    };
    for (peer, tool) in [
        ("", "dnsperf"),
        ("knot", "knotd"),
        ("unbound", "unbound"),
        ("bind9", "named"),
    ] {
        if (peer.is_empty() || peers.contains(&peer)) && !have(tool) {
            eprintln!("missing {tool}: apt-get install dnsperf knot unbound bind9");
            return;
        }
    }
    let mut notes = Vec::new();
    let hickory = find_hickory();
    if peers.contains(&"hickory") && hickory.is_none() {
        let note = "hickory: skipped, `hickory-dns` not found on PATH or in ~/.cargo/bin \
                    (install: cargo install hickory-dns --locked)";
        eprintln!("{note}");
        notes.push(note.to_string());
        peers.retain(|p| *p != "hickory");
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

    sweep_stale_runs();
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
        hickory,
    };
    assert!(env
        .in_ns("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success());

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&env, rounds, &peers, notes)
    }));
    drop(env);
    match result {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("dns_qps: some server answered wrongly (see WRONG above)");
            std::process::exit(2);
        }
        Err(_) => std::process::exit(1),
    }
}

/// Versions of the servers in `peers`, for the report.
fn versions(env: &Env, peers: &[&'static str]) -> Vec<String> {
    let mut v = Vec::new();
    for p in peers {
        let line = match *p {
            "knot" => version_of(Path::new("knotd"), "-V"),
            "unbound" => version_of(Path::new("unbound"), "-V"),
            "bind9" => version_of(Path::new("named"), "-v"),
            "hickory" => match &env.hickory {
                Some(h) => format!("{} ({})", version_of(h, "--version"), h.display()),
                None => continue,
            },
            _ => continue,
        };
        v.push(format!("{p}: {line}"));
    }
    v.push(format!(
        "dnsperf: {}",
        version_of(Path::new("dnsperf"), "-V")
    ));
    v
}

/// Runs the rounds and prints the tables; false if a server answered wrongly.
fn run(env: &Env, rounds: usize, peers: &[&'static str], mut notes: Vec<String>) -> bool {
    let d = &env.dir;
    let svcs = services();
    std::fs::write(d.join("queries.txt"), query_file(&svcs)).unwrap();
    std::fs::write(d.join(format!("{ZONE}.zone")), forward_zone(&svcs)).unwrap();
    std::fs::write(d.join("96.10.in-addr.arpa.zone"), reverse_zone(&svcs)).unwrap();
    std::fs::write(d.join("unbound.conf"), unbound_conf(&svcs, d)).unwrap();
    std::fs::write(d.join("knot.conf"), knot_conf(d)).unwrap();
    std::fs::write(d.join("named.conf"), named_conf(d)).unwrap();
    std::fs::write(d.join("hickory.toml"), hickory_conf(d)).unwrap();
    for sub in ["knot-run", "knot-db"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }

    let mut all: Vec<Vec<Row>> = Vec::new();
    for r in 0..rounds {
        eprintln!("round {}/{rounds}", r + 1);
        let mut rows = Vec::new();
        for p in peers {
            match measure(env, p) {
                Ok(row) => rows.push(row),
                // hickory-dns is a third-party build that may not load this config: a note,
                // not the end of the run. Any other server failing to start is a failure.
                Err(e) if *p == "hickory" => {
                    let note = format!(
                        "hickory: skipped in round {}: {}",
                        r + 1,
                        e.lines().take(12).collect::<Vec<_>>().join(" | ")
                    );
                    eprintln!("{note}");
                    notes.push(note);
                }
                Err(e) => panic!("{e}"),
            }
        }
        all.push(rows);
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
                "| {}{} | {:.0} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.2} | {:.1} |",
                x.name,
                if x.wrong { " (WRONG ANSWERS)" } else { "" },
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
                "  {}: {}; latency samples {}\n    checks: {}",
                x.name,
                x.rcodes,
                x.samples,
                x.checks.join("; ")
            )
            .unwrap();
        }
        if let (Some(f), Some(k)) = (
            rows.iter().find(|x| x.name == "fairlead"),
            rows.iter().find(|x| x.name == "knot"),
        ) {
            writeln!(stdout, "  fairlead/knot qps ratio: {:.2}", f.qps / k.qps).unwrap();
        }
        for x in rows.iter().filter(|x| x.q5k < 4_900.0) {
            writeln!(
                stdout,
                "  {}: did not sustain 5,000 qps (achieved {:.0}): its latency figures are \
                 under overload",
                x.name, x.q5k
            )
            .unwrap();
        }
    }
    writeln!(stdout, "\nversions:").unwrap();
    for v in versions(env, peers) {
        writeln!(stdout, "  {v}").unwrap();
    }
    if peers.contains(&"hickory") {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        writeln!(
            stdout,
            "  hickory config: -q --workers {workers}, [udp_socket] sockets = 1, the same zone \
             files as knot and bind9"
        )
        .unwrap();
    }
    for n in &notes {
        writeln!(stdout, "note: {n}").unwrap();
    }
    !all.iter().flatten().any(|x| x.wrong)
}

/// Removes what an earlier run killed outright (SIGKILL, a machine restart) left behind:
/// `fl-dnsbench-<pid>` namespaces and directories whose pid no longer runs, with no process
/// inside. Never anything of a run that is still alive.
fn sweep_stale_runs() {
    let alive = |pid: &str| std::path::Path::new("/proc").join(pid).exists();
    let out = Command::new("ip").args(["netns", "list"]).output();
    let names = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("fl-dnsbench-") else {
            continue;
        };
        let busy = Command::new("ip")
            .args(["netns", "pids", name])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(true);
        if !alive(pid) && !busy {
            eprintln!("removing {name}, left by a run that was killed");
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(name));
        }
    }
}
