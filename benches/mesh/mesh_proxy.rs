//! The mTLS sidecar pair against haproxy doing the same job (issue 7), in one run:
//!
//! ```text
//! cargo bench -p fairlead-proxy --bench mesh_proxy     # needs wrk and haproxy (Debian)
//! ```
//!
//! Environment: `MESH_BENCH_ROUNDS` (default 3), `MESH_BENCH_SECS` (each wrk run,
//! default 5), `MESH_BENCH_FIXED_SECS` (the 1,000 requests/s latency run, default 5);
//! `MESH_BENCH_HOLD=<secs>` only sets everything up and holds it (for `perf` and hand-run
//! loads).
//!
//! Everything runs on 127.0.0.1 in the host's loopback (no namespace, no rule, no route is
//! touched): an HTTP/1.1 server (this binary re-executed as a one-thread hyper server),
//! and in front of it three paths:
//!
//! - **direct**: the client talks to the server;
//! - **fairlead**: client → `fairlead-proxy` (outbound, `--outbound-to` the peer) → mTLS →
//!   `fairlead-proxy` (inbound: verifies the client's SPIFFE ID, parses HTTP, adds
//!   `x-fairlead-client-id`) → server; each proxy with one worker thread;
//! - **haproxy**: the same shape with Debian's haproxy, `nbthread 1` each: the client side
//!   in `mode tcp` originating TLS with its client certificate (`verify required` against
//!   the mesh CA), the server side in `mode http` terminating TLS with `verify required`
//!   and setting the same header from the client certificate.
//!
//! Certificates are P-256 leaves from the mesh CA (`fairlead_controller::Ca`) with SPIFFE
//! URI SANs. haproxy 2.6 cannot check a URI SAN, so it checks only the chain; Fairlead also
//! checks the peer's identity on both sides (more work, not less).
//!
//! Loads (wrk, one thread): one keep-alive connection; 32 keep-alive connections; a new
//! connection per request (`Connection: close`, 8 connections) with TLS resumption off on
//! both proxies, so every request pays a full handshake; and a fixed 1,000 requests per
//! second on one keep-alive connection from this binary (open loop: latency counted from
//! the scheduled send time, so a stall is not hidden). Rounds rotate the order of the
//! paths. Reported: requests per second (median over rounds), added p50 and p99 latency
//! against direct at 1,000 requests per second, resident memory of each proxy after the
//! loads (VmRSS, and the peak VmHWM), and CPU of the proxy pair per 1,000 requests in the
//! 32-connection run.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fairlead_controller::{new_key_and_csr, Ca, SpiffeId};

const SERVER: u16 = 18080;
const FL_IN: u16 = 18443;
const FL_OUT: u16 = 18001;
const FL_ADMIN_IN: u16 = 18020;
const FL_ADMIN_OUT: u16 = 18021;
const HA_IN: u16 = 18444;
const HA_OUT: u16 = 18002;
const TRUST_DOMAIN: &str = "bench.fairlead.local";
const ROLE_ENV: &str = "FL_MESH_BENCH_SERVER";
const BODY: &[u8] = b"hello from the mesh bench\n";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Ok(port) = std::env::var(ROLE_ENV) {
        server(port.parse().expect("server port"));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["wrk", "haproxy"] {
        if which(tool).is_none() {
            eprintln!("mesh_proxy: `{tool}` not found; install it: apt-get install wrk haproxy");
            std::process::exit(2);
        }
    }
    let rounds = env_num("MESH_BENCH_ROUNDS", 3) as usize;
    let secs = env_num("MESH_BENCH_SECS", 5);
    let fixed_secs = env_num("MESH_BENCH_FIXED_SECS", 5);

    let dir = TempDir::new();
    let certs = Certs::write(&dir.0);
    let mut procs = Procs::default();
    procs.start(
        "server",
        Command::new(std::env::current_exe().unwrap()).env(ROLE_ENV, SERVER.to_string()),
        SERVER,
    );
    let proxy = PathBuf::from(env!("CARGO_BIN_EXE_fairlead-proxy"));
    let fl_in = procs.start(
        "fairlead inbound",
        Command::new(&proxy).args([
            "--cert",
            &certs.server_chain,
            "--key",
            &certs.server_key,
            "--bundle",
            &certs.bundle,
            "--inbound",
            &format!("127.0.0.1:{FL_IN}"),
            "--app",
            &format!("127.0.0.1:{SERVER}"),
            "--allow",
            &certs.client_id,
            "--outbound",
            "none",
            "--admin",
            &format!("127.0.0.1:{FL_ADMIN_IN}"),
            "--workers",
            "1",
            "--no-tls-resumption",
        ]),
        FL_ADMIN_IN,
    );
    let fl_out = procs.start(
        "fairlead outbound",
        Command::new(&proxy).args([
            "--cert",
            &certs.client_chain,
            "--key",
            &certs.client_key,
            "--bundle",
            &certs.bundle,
            "--inbound",
            "none",
            "--outbound",
            &format!("127.0.0.1:{FL_OUT}"),
            "--outbound-to",
            &format!("127.0.0.1:{FL_IN}"),
            "--outbound-expect",
            &certs.server_id,
            "--admin",
            &format!("127.0.0.1:{FL_ADMIN_OUT}"),
            "--workers",
            "1",
            "--no-tls-resumption",
        ]),
        FL_ADMIN_OUT,
    );
    let ha_cfg = haproxy_config(&dir.0, &certs);
    let ha_in = procs.start(
        "haproxy inbound",
        Command::new("haproxy").args(["-db", "-f", &ha_cfg.0]),
        HA_IN,
    );
    let ha_out = procs.start(
        "haproxy outbound",
        Command::new("haproxy").args(["-db", "-f", &ha_cfg.1]),
        HA_OUT,
    );

    // Every path must answer, and the proxies must pass the identity on.
    for (name, port) in PATHS {
        let head = get_once(port);
        assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head}");
    }
    // MESH_BENCH_HOLD=<secs>: keep everything up that long for a profiler and hand-run
    // loads (ports below), then stop without measuring.
    if let Some(hold) = std::env::var("MESH_BENCH_HOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        for (name, port) in PATHS {
            eprintln!("holding: {name} on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_secs(hold));
        return;
    }
    let versions = format!(
        "{}; {}",
        first_line(Command::new("haproxy").arg("-v")),
        first_line(Command::new("wrk").arg("-v"))
    );

    let mut results: Vec<PathResult> = PATHS.iter().map(|_| PathResult::default()).collect();
    let pairs = [
        (0usize, None),
        (1, Some((fl_out, fl_in))),
        (2, Some((ha_out, ha_in))),
    ];
    for round in 0..rounds {
        for k in 0..PATHS.len() {
            let (i, pids) = pairs[(round + k) % PATHS.len()];
            let (name, port) = PATHS[i];
            eprintln!("round {}/{rounds}: {name}", round + 1);
            let r = &mut results[i];
            r.one.push(wrk(port, 1, secs, false));
            let cpu0 = pids.map(|(a, b)| cpu_ticks(a) + cpu_ticks(b));
            let w32 = wrk(port, 32, secs, false);
            if let Some(c0) = cpu0 {
                let (a, b) = pids.unwrap();
                let ticks = cpu_ticks(a) + cpu_ticks(b) - c0;
                let ms = ticks as f64 * 1000.0 / clk_tck();
                r.cpu_ms_per_1k.push(ms / (w32.requests as f64 / 1000.0));
            }
            r.many.push(w32);
            r.handshake.push(wrk(port, 8, secs, true));
            r.fixed.extend(fixed_rate(port, 1000, fixed_secs));
        }
    }
    let mem: Vec<Option<[(u64, u64); 2]>> = pairs
        .iter()
        .map(|(_, p)| p.map(|(a, b)| [mem_kib(a), mem_kib(b)]))
        .collect();
    let report = report(&results, &mem, rounds, secs, fixed_secs, &versions);
    println!("{report}");
    drop(procs);
}

const PATHS: [(&str, u16); 3] = [
    ("direct", SERVER),
    ("fairlead-proxy pair", FL_OUT),
    ("haproxy pair", HA_OUT),
];

#[derive(Default)]
struct PathResult {
    one: Vec<Wrk>,
    many: Vec<Wrk>,
    handshake: Vec<Wrk>,
    /// Latencies of the fixed-rate runs, microseconds.
    fixed: Vec<f64>,
    cpu_ms_per_1k: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    requests: u64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn report(
    results: &[PathResult],
    mem: &[Option<[(u64, u64); 2]>],
    rounds: usize,
    secs: u64,
    fixed_secs: u64,
    versions: &str,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## The mTLS sidecar pair against haproxy (`benches/mesh/mesh_proxy.rs`)\n\n```\ncargo bench -p fairlead-proxy --bench mesh_proxy\n```\n\nmachine: {} cores; {versions}. {rounds} rounds, wrk runs of {secs} s, the fixed-rate run {fixed_secs} s per round; medians over rounds (min-max).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(out, "| path | 1 connection: req/s | p50 / p99 µs | 32 connections: req/s | p50 / p99 µs | new connection per request (8 conns): req/s | errors | 1,000 req/s: p50 / p99 µs | added p50 / p99 µs | CPU ms per 1,000 req (pair, 32 conns) | RSS KiB (outbound / inbound; peak) |");
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let direct_p50 = percentile(&results[0].fixed, 0.5);
    let direct_p99 = percentile(&results[0].fixed, 0.99);
    let range = |v: &[Wrk], f: fn(&Wrk) -> f64| {
        let xs: Vec<f64> = v.iter().map(f).collect();
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.0} ({lo:.0}-{hi:.0})", median(xs))
    };
    let lat = |v: &[Wrk]| {
        format!(
            "{:.0} / {:.0}",
            median(v.iter().map(|w| w.p50_us).collect()),
            median(v.iter().map(|w| w.p99_us).collect())
        )
    };
    for (i, (name, _)) in PATHS.iter().enumerate() {
        let r = &results[i];
        let p50 = percentile(&r.fixed, 0.5);
        let p99 = percentile(&r.fixed, 0.99);
        let added = if i == 0 {
            "-".to_owned()
        } else {
            format!("{:.0} / {:.0}", p50 - direct_p50, p99 - direct_p99)
        };
        let cpu = if r.cpu_ms_per_1k.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(r.cpu_ms_per_1k.clone()))
        };
        let rss = match mem[i] {
            Some([(o, oh), (n, nh)]) => format!("{o} / {n} ({oh} / {nh})"),
            None => "-".into(),
        };
        let errors: u64 = r
            .one
            .iter()
            .chain(&r.many)
            .chain(&r.handshake)
            .map(|w| w.errors)
            .sum();
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {errors} | {p50:.0} / {p99:.0} | {added} | {cpu} | {rss} |",
            range(&r.one, |w| w.rps),
            lat(&r.one),
            range(&r.many, |w| w.rps),
            lat(&r.many),
            range(&r.handshake, |w| w.rps),
        );
    }
    let fl = &results[1];
    let ha = &results[2];
    let med = |v: &[Wrk]| median(v.iter().map(|w| w.rps).collect());
    let added_p99 = percentile(&fl.fixed, 0.99) - direct_p99;
    let many_ratio = med(&fl.many) / med(&ha.many);
    let hs_ratio = med(&fl.handshake) / med(&ha.handshake);
    let max_rss = mem[1].map_or(0, |[(o, _), (n, _)]| o.max(n));
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let _ = writeln!(out, "\nTargets (issue 7):\n");
    let _ = writeln!(
        out,
        "- added p99 at 1,000 requests per second under 0.5 ms: {} ({added_p99:.0} µs)",
        verdict(added_p99 < 500.0)
    );
    let _ = writeln!(
        out,
        "- 32 connections at least 1.5 times the haproxy pair: {} ({many_ratio:.2}x)",
        verdict(many_ratio >= 1.5)
    );
    let _ = writeln!(
        out,
        "- a handshake per request at least the haproxy pair's rate: {} ({hs_ratio:.2}x)",
        verdict(hs_ratio >= 1.0)
    );
    let _ = writeln!(
        out,
        "- under 16 MiB resident per proxy: {} (largest {:.1} MiB after the loads)",
        verdict(max_rss < 16 * 1024),
        max_rss as f64 / 1024.0
    );
    out
}

// ---- load generators ----

fn wrk(port: u16, conns: u32, secs: u64, close: bool) -> Wrk {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/"));
    let out = cmd.output().expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Wrk {
    let mut w = Wrk::default();
    for line in text.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => w.rps = v.parse().unwrap_or(0.0),
            (Some("50%"), Some(v)) => w.p50_us = wrk_duration_us(v),
            (Some("99%"), Some(v)) => w.p99_us = wrk_duration_us(v),
            (Some(n), Some("requests")) => w.requests = n.parse().unwrap_or(0),
            _ => {}
        }
        if let Some(rest) = t.strip_prefix("Socket errors:") {
            // connect N, read N, write N, timeout N
            w.errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    w
}

fn wrk_duration_us(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => f64::NAN,
    }
}

/// `rate` requests per second on one keep-alive connection for `secs`, open loop: each
/// latency is measured from when the request was due.
fn fixed_rate(port: u16, rate: u32, secs: u64) -> Vec<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let interval = Duration::from_secs(1) / rate;
    let n = rate as u64 * secs;
    let start = Instant::now() + Duration::from_millis(10);
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .expect("send");
        read_response(&mut r).expect("response");
        lat.push(due.elapsed().as_secs_f64() * 1e6);
    }
    lat
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns the status line.
fn read_response(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn get_once(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    read_response(&mut r).unwrap_or_else(|e| format!("no response: {e}"))
}

// ---- the server ----

/// One-thread HTTP/1.1 server: 200 with a short body; checks nothing, so the proxies'
/// cost is what differs between paths.
fn server(port: u16) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("server port free");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(BODY),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

// ---- certificates and haproxy ----

struct Certs {
    bundle: String,
    client_chain: String,
    client_key: String,
    client_id: String,
    server_chain: String,
    server_key: String,
    server_id: String,
    /// chain + key in one file, as haproxy's `crt` wants.
    client_pem: String,
    server_pem: String,
}

impl Certs {
    fn write(dir: &Path) -> Self {
        let ca = Ca::generate(TRUST_DOMAIN, Duration::from_secs(86_400)).unwrap();
        let put = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_string_lossy().into_owned()
        };
        let leaf = |sa: &str| {
            let (key, csr) = new_key_and_csr().unwrap();
            let id = SpiffeId::new(TRUST_DOMAIN, "bench", sa);
            let chain = ca
                .issue(&csr, &id, Duration::from_secs(86_400))
                .unwrap()
                .chain_pem;
            (chain, key, id.uri())
        };
        let (cc, ck, cid) = leaf("client");
        let (sc, sk, sid) = leaf("server");
        Certs {
            bundle: put("bundle.pem", ca.cert_pem()),
            client_chain: put("client-chain.pem", &cc),
            client_key: put("client-key.pem", &ck),
            client_pem: put("client.pem", &format!("{cc}{ck}")),
            client_id: cid,
            server_chain: put("server-chain.pem", &sc),
            server_key: put("server-key.pem", &sk),
            server_pem: put("server.pem", &format!("{sc}{sk}")),
            server_id: sid,
        }
    }
}

/// (inbound config, outbound config) paths.
fn haproxy_config(dir: &Path, c: &Certs) -> (String, String) {
    let global = "global\n  nbthread 1\n  maxconn 4000\n  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n\ndefaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n";
    let inbound = format!(
        "{global}frontend mesh_in\n  mode http\n  bind 127.0.0.1:{HA_IN} ssl crt {} ca-file {} verify required no-tls-tickets\n  http-request set-header x-fairlead-client-id %[ssl_c_s_dn]\n  default_backend app\n\nbackend app\n  mode http\n  server app 127.0.0.1:{SERVER}\n",
        c.server_pem, c.bundle
    );
    let outbound = format!(
        "{global}frontend mesh_out\n  mode tcp\n  bind 127.0.0.1:{HA_OUT}\n  default_backend peer\n\nbackend peer\n  mode tcp\n  server peer 127.0.0.1:{HA_IN} ssl crt {} ca-file {} verify required no-ssl-reuse\n",
        c.client_pem, c.bundle
    );
    let pi = dir.join("haproxy-in.cfg");
    let po = dir.join("haproxy-out.cfg");
    std::fs::write(&pi, inbound).unwrap();
    std::fs::write(&po, outbound).unwrap();
    (
        pi.to_string_lossy().into_owned(),
        po.to_string_lossy().into_owned(),
    )
}

// ---- processes ----

/// The processes this bench started; killed by pid (each one's own) when dropped.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    /// Starts `cmd` and waits until something listens on `port` (the admin port for the
    /// proxies, so the probe is not a refused TLS client).
    fn start(&mut self, name: &str, cmd: &mut Command, port: u16) -> u32 {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let pid = child.id();
        self.0.push((name.to_owned(), child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
            if let Some(status) = self.0.last_mut().unwrap().1.try_wait().unwrap() {
                panic!("{name} exited: {status}");
            }
            assert!(Instant::now() < deadline, "{name} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        pid
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// (VmRSS, VmHWM) in KiB.
fn mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn first_line(cmd: &mut Command) -> String {
    let out = cmd.output().map(|o| {
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        s
    });
    out.unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// The bench's files; removed when dropped, also when the bench panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(format!("fairlead-mesh-bench-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
