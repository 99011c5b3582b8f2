//! Service load balancing end to end in the sandbox: two nodes, backends on both, clients on
//! both, every request a real packet through the agents' eBPF programs (tc for in-process
//! clients, which run as threads of this test inside a pod namespace, and socket-level
//! balancing for a `curl` process placed in a pod's cgroup). NodePort and externalIPs are
//! reached from a client namespace on the underlay, outside every node.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

mod common;
use common::{apply, with_sandbox};

use fairlead_core::ObjectKey;
use fairlead_sandbox::cluster::Sandbox;
use fairlead_sandbox::{agents, cgroup, kubelet, netns, topology::Topology};

const SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: lb}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: lb}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 5000, targetPort: 5000}
  - {name: dns, port: 53, targetPort: 5001, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: lb}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: lb}
spec:
  selector: {app: nothing}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: lb}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: np-local, namespace: lb}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: ext-a, namespace: lb}
spec:
  selector: {app: web}
  externalIPs: [192.0.2.50]
  ports: [{port: 80, targetPort: 8080}]
"#;

/// A second Service claiming ext-a's external address and port: refused by the load balancer
/// with an Event, without disturbing ext-a.
const CONFLICT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ext-b, namespace: lb}
spec:
  selector: {app: nothing}
  externalIPs: [192.0.2.50]
  ports: [{port: 80, targetPort: 8080}]
"#;

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: lb, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: fairlead/echo}}]\n"
    )
}

/// One HTTP/1.0 GET from inside `ns`; the workload's answer line (`pod=... client=...`).
fn http_get(ns: &str, addr: SocketAddr) -> Result<String, String> {
    netns::run_in(ns, move || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET /lb HTTP/1.0\r\n\r\n")
            .map_err(|e| format!("send {addr}: {e}"))?;
        let mut body = String::new();
        s.read_to_string(&mut body)
            .map_err(|e| format!("read {addr}: {e}"))?;
        body.lines()
            .find(|l| l.starts_with("pod="))
            .map(str::to_owned)
            .ok_or_else(|| format!("no answer line from {addr}: {body:?}"))
    })
    .map_err(|e| e.to_string())?
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

fn backends_seen(ns: &str, addr: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>, String> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let line = http_get(ns, addr)?;
        *seen.entry(field(&line, "pod").to_owned()).or_default() += 1;
    }
    Ok(seen)
}

/// A TCP echo connection kept open: the workload names itself first, then echoes.
struct Persistent {
    stream: TcpStream,
    backend: String,
}

impl Persistent {
    fn open(ns: &str, addr: SocketAddr) -> Persistent {
        netns::run_in(ns, move || {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            Persistent {
                stream,
                backend: line.trim().to_owned(),
            }
        })
        .unwrap()
    }

    fn roundtrip(&mut self, msg: &str) -> Result<(), String> {
        self.stream
            .write_all(msg.as_bytes())
            .map_err(|e| format!("echo via {}: send: {e}", self.backend))?;
        let mut buf = vec![0u8; msg.len()];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| format!("echo via {}: read: {e}", self.backend))?;
        (buf == msg.as_bytes())
            .then_some(())
            .ok_or_else(|| format!("echo via {} came back wrong", self.backend))
    }
}

fn vip(sandbox: &Sandbox, name: &str, v4: bool) -> IpAddr {
    let snap = sandbox.snapshot();
    let svc = snap.service("lb", name).expect("service exists");
    let ip = if v4 {
        svc.cluster_ips.ipv4()
    } else {
        svc.cluster_ips.ipv6()
    };
    ip.unwrap_or_else(|| {
        panic!(
            "{name} has no {} clusterIP",
            if v4 { "IPv4" } else { "IPv6" }
        )
    })
}

/// A namespace on the underlay bridge standing for a client outside the cluster.
fn external_client(prefix: &str) -> String {
    let ns = format!("{prefix}ext");
    let underlay = format!("{prefix}underlay");
    netns::create(&ns).unwrap();
    let ip = |ns: &str, args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {ns} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(
        &underlay,
        &[
            "link", "add", "uext", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    );
    ip(&underlay, &["link", "set", "uext", "master", "br0", "up"]);
    ip(&ns, &["addr", "add", "172.30.0.200/24", "dev", "eth0"]);
    ip(&ns, &["link", "set", "eth0", "up"]);
    ip(&ns, &["link", "set", "lo", "up"]);
    // externalIPs are routed to a node, as an upstream router would.
    ip(
        &ns,
        &["route", "add", "192.0.2.50/32", "via", "172.30.0.11"],
    );
    ns
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn base_manifest() -> String {
    let mut m = SERVICES.to_owned();
    for (name, node) in [
        ("web-1", "node-1"),
        ("web-2", "node-1"),
        ("web-3", "node-2"),
        ("web-4", "node-2"),
    ] {
        m += &pod(name, "web", node);
    }
    m += &pod("client-1", "client", "node-1");
    m += &pod("client-2", "client", "node-2");
    m
}

/// Waits until Service `web` has `n` endpoints (both families counted).
async fn wait_for_endpoints(sandbox: &Sandbox, n: usize) {
    let web = ObjectKey::new("lb", "web");
    wait_for(
        &format!("web to have {n} endpoints"),
        Duration::from_secs(20),
        || {
            let snap = sandbox.snapshot();
            let have: usize = snap
                .endpoint_slices_of(&web)
                .map(|s| s.endpoints.len())
                .sum();
            (have == n).then_some(())
        },
    )
    .await;
}

/// A UDP socket connected to `vip` inside `ns` whose datagrams reach `backend` (new sockets
/// until one does; the tc path picks per flow).
fn udp_socket_on(ns: &str, vip: SocketAddr, backend: &str) -> UdpSocket {
    for _ in 0..200 {
        let s = netns::run_in(ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(vip).unwrap();
            s
        })
        .unwrap();
        if udp_ask(&s).is_some_and(|a| a.starts_with(backend)) {
            return s;
        }
    }
    panic!("no UDP flow to {vip} reached {backend}");
}

/// One datagram out and its answer (`<pod>: <payload>`), a few tries.
fn udp_ask(s: &UdpSocket) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for _ in 0..10 {
        s.send(b"q").ok()?;
        let mut buf = [0u8; 256];
        if let Ok(n) = s.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

/// A python3 process in a pod's cgroup (so socket-level balancing applies) with one
/// unconnected UDP socket stuck to web-4, then asking every 50 ms and printing who answered
/// and from where. Bounded: it exits after 20 s; dropping the watcher kills it.
struct UdpWatcher {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

const UDP_WATCHER: &str = r#"
import socket, sys, time
vip = (sys.argv[1], int(sys.argv[2]))
for _ in range(400):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.sendto(b"q", vip)
    try:
        data, src = s.recvfrom(256)
    except socket.timeout:
        s.close(); continue
    if data.startswith(b"web-4"):
        break
    s.close()
print("stuck", data.split(b":")[0].decode(), src[0], src[1], flush=True)
end = time.time() + 20
while time.time() < end:
    try:
        s.sendto(b"q", vip)
        data, src = s.recvfrom(256)
        print(data.split(b":")[0].decode(), src[0], src[1], flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    time.sleep(0.05)
"#;

impl UdpWatcher {
    fn start(ns: &str, cg: &std::path::Path, vip: SocketAddr) -> UdpWatcher {
        use std::os::unix::process::CommandExt;
        let cg = cg.to_owned();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "python3", "-c", UDP_WATCHER])
            .arg(vip.ip().to_string())
            .arg(vip.port().to_string())
            .stdout(std::process::Stdio::piped());
        // SAFETY: the hook only writes one file between fork and exec.
        unsafe { cmd.pre_exec(move || cgroup::join(&cg)) };
        let mut child = cmd.spawn().expect("python3 runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        let want = format!("stuck web-4 {} {}", vip.ip(), vip.port());
        assert_eq!(
            first, want,
            "the socket reached web-4, answered from the Service address"
        );
        UdpWatcher { child, lines }
    }

    /// Reads answers until one comes from another backend (and from the Service address);
    /// at most a second of timeouts and web-4 answers after the backend left.
    fn expect_moved_off(&mut self, gone: &str) {
        let mut misses = Vec::new();
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            let who = line.split_whitespace().next().unwrap_or("");
            if who != gone && who != "timeout" {
                return;
            }
            misses.push(line);
            assert!(misses.len() < 20, "the socket stayed on {gone}: {misses:?}");
        }
        panic!("the UDP watcher ended before reaching another backend: {misses:?}");
    }
}

impl Drop for UdpWatcher {
    fn drop(&mut self) {
        // Our own child, not yet reaped: its pid is still its own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies the Services and pods and waits for them; the sandbox's namespace prefix.
async fn start(sandbox: &Sandbox, name: &str) -> String {
    apply(sandbox, "base", &base_manifest()).await;
    sandbox
        .wait_for_pods(7, Duration::from_secs(60))
        .await
        .expect("pods running");
    Topology::prefix(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterip_nodeport_affinity_hairpin_and_rejects() {
    with_sandbox("lb", |sandbox, name| {
        async move {
            let prefix = start(sandbox, name).await;
            let pod_ns = |p: &str| kubelet::pod_netns(&prefix, "lb", p);
            // Endpoints published and programmed.
            wait_for_endpoints(sandbox, 8).await;

            // ClusterIP, both families, from clients on both nodes: every request answered,
            // load spread over backends on both nodes.
            let mut all = BTreeSet::new();
            for client in ["client-1", "client-2"] {
                for v4 in [true, false] {
                    let addr = SocketAddr::new(vip(sandbox, "web", v4), 80);
                    let seen = wait_for("the ClusterIP to answer", Duration::from_secs(10), || {
                        backends_seen(&pod_ns(client), addr, 1).ok()
                    })
                    .await;
                    all.extend(seen.into_keys());
                    let seen = backends_seen(&pod_ns(client), addr, 24)
                        .unwrap_or_else(|e| panic!("{client} -> {addr}: {e}"));
                    assert!(seen.len() >= 2, "{client} -> {addr} hit only {seen:?}");
                    all.extend(seen.into_keys());
                }
            }
            assert_eq!(all.len(), 4, "all four backends served: {all:?}");

            // UDP: the answer comes back from the Service address (reverse NAT).
            let udp_vip = SocketAddr::new(vip(sandbox, "web", true), 53);
            let answer = netns::run_in(&pod_ns("client-1"), move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(udp_vip).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send(b"hello").unwrap();
                let mut buf = [0u8; 256];
                let (n, from) = s.recv_from(&mut buf).expect("UDP answer from the Service");
                (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
            })
            .unwrap();
            assert!(
                answer.0.starts_with("web-") && answer.0.ends_with(": hello"),
                "{answer:?}"
            );
            assert_eq!(answer.1, udp_vip);

            // sessionAffinity ClientIP: one client, one backend.
            let sticky = SocketAddr::new(vip(sandbox, "sticky", true), 80);
            let seen = backends_seen(&pod_ns("client-2"), sticky, 20).unwrap();
            assert_eq!(seen.len(), 1, "affinity holds: {seen:?}");

            // No endpoints: refused at once, not a two-minute SYN timeout.
            let empty = SocketAddr::new(vip(sandbox, "empty", true), 80);
            let started = Instant::now();
            let err = http_get(&pod_ns("client-1"), empty).unwrap_err();
            assert!(err.contains("refused"), "{err}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "took {:?}",
                started.elapsed()
            );
            // And over UDP: ICMP port unreachable, so a connected socket fails at once.
            let empty_dns = SocketAddr::new(vip(sandbox, "empty", true), 53);
            let refused = netns::run_in(&pod_ns("client-1"), move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(empty_dns).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.send(b"q").unwrap();
                let started = Instant::now();
                let err = s.recv(&mut [0u8; 64]).unwrap_err();
                (err.kind(), started.elapsed())
            })
            .unwrap();
            assert_eq!(
                refused.0,
                std::io::ErrorKind::ConnectionRefused,
                "{refused:?}"
            );
            assert!(refused.1 < Duration::from_millis(500), "{refused:?}");

            // Hairpin: a backend reaching its own Service, sometimes itself.
            let addr = SocketAddr::new(vip(sandbox, "web", true), 80);
            let seen = backends_seen(&pod_ns("web-1"), addr, 30).unwrap();
            assert!(
                seen.contains_key("web-1"),
                "web-1 never reached itself: {seen:?}"
            );

            // Socket-level balancing: a process in client-1's cgroup. Its connect() goes
            // straight to a backend; the same for a Service without backends (refused).
            let instance = agents::lb_instance(name, "node-1");
            let before = fairlead_ebpf::lb::pinned_stats(&instance).unwrap();
            let count = |stats: &[fairlead_ebpf::lb::Stat], n: &str| {
                stats.iter().find(|s| s.name == n).map_or(0, |s| s.value)
            };
            let curl = |url: String| common::curl_in_pod(name, &pod_ns("client-1"), &url);
            let out = curl(format!("http://{}/", vip(sandbox, "web", true)));
            assert!(
                String::from_utf8_lossy(&out.stdout).starts_with("pod=web-"),
                "{out:?}"
            );
            let out = curl(format!("http://[{}]/", vip(sandbox, "web", false)));
            assert!(
                String::from_utf8_lossy(&out.stdout).starts_with("pod=web-"),
                "{out:?}"
            );
            let refused = curl(format!("http://{}/", vip(sandbox, "empty", true)));
            assert_eq!(
                refused.status.code(),
                Some(7),
                "curl: connection refused: {refused:?}"
            );
            let after = fairlead_ebpf::lb::pinned_stats(&instance).unwrap();
            assert!(count(&after, "sock_translated") >= count(&before, "sock_translated") + 2);
            assert!(count(&after, "sock_refused") > count(&before, "sock_refused"));

            // Transparent discovery: curl in a pod resolves Service names through the
            // pod's resolv.conf (search path, ndots 5) and the cluster DNS behind the
            // kube-dns ClusterIP, itself load-balanced by the datapath.
            for url in [
                "http://web/",
                "http://web.lb/",
                "http://web.lb.svc.cluster.local./",
            ] {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &pod_ns("client-2"),
                        "curl",
                        "-s",
                        "--max-time",
                        "5",
                        url,
                    ])
                    .output()
                    .unwrap();
                assert!(
                    String::from_utf8_lossy(&out.stdout).starts_with("pod=web-"),
                    "curl {url} from client-2: {out:?}"
                );
            }

            // NodePort from outside: any backend via either node; with
            // externalTrafficPolicy Local only that node's backends, and the client's own
            // address is what the backend sees.
            let ext = external_client(&prefix);
            for node_ip in ["172.30.0.11", "172.30.0.12"] {
                let addr: SocketAddr = format!("{node_ip}:30080").parse().unwrap();
                let seen = wait_for("NodePort to answer", Duration::from_secs(10), || {
                    backends_seen(&ext, addr, 16).ok()
                })
                .await;
                assert!(seen.len() >= 2, "NodePort via {node_ip}: {seen:?}");
            }
            let local: SocketAddr = "172.30.0.11:30081".parse().unwrap();
            for _ in 0..10 {
                let line = http_get(&ext, local).unwrap();
                assert!(["web-1", "web-2"].contains(&field(&line, "pod")), "{line}");
                assert_eq!(
                    field(&line, "client"),
                    "172.30.0.200",
                    "source preserved: {line}"
                );
            }

            // The agent's Prometheus endpoint at the node's address.
            let metrics = netns::run_in(&ext, || {
                let mut s = TcpStream::connect("172.30.0.11:9962")?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node-1\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                std::io::Result::Ok(body)
            })
            .unwrap()
            .expect("metrics answered");
            assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
            assert!(
                metrics
                    .contains("fairlead_datapath_events_total{node=\"node-1\",event=\"new_flow\"}"),
                "{metrics}"
            );

            // externalIPs, and a second Service claiming the same one: skipped with an
            // Event, the first keeps working.
            let ext_ip: SocketAddr = "192.0.2.50:80".parse().unwrap();
            wait_for("the external IP to answer", Duration::from_secs(10), || {
                http_get(&ext, ext_ip).ok()
            })
            .await;
            apply(sandbox, "conflict", CONFLICT).await;
            let events: kube::Api<k8s_openapi::api::core::v1::Event> =
                kube::Api::namespaced(sandbox.client.clone(), "lb");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let list = events.list(&Default::default()).await.unwrap();
                let found = list.items.iter().any(|e| {
                    e.reason.as_deref() == Some("LoadBalancingSkipped")
                        && e.involved_object.name.as_deref() == Some("ext-b")
                        && e.message.as_deref().unwrap_or("").contains("192.0.2.50")
                });
                if found {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no Event for ext-b: {:?}",
                    list.items
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // 16 requests: with half the backends on the other node, the SNAT path is taken.
            for _ in 0..16 {
                http_get(&ext, ext_ip).expect("ext-a still served");
            }
        }
        .boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_and_agent_restart_lose_no_connection() {
    with_sandbox("lr", |sandbox, name| {
        async move {
            let prefix = start(sandbox, name).await;
            let client = kubelet::pod_netns(&prefix, "lb", "client-1");
            let http = SocketAddr::new(vip(sandbox, "web", true), 80);
            let echo = SocketAddr::new(vip(sandbox, "web", true), 5000);
            wait_for("the ClusterIP to answer", Duration::from_secs(20), || {
                backends_seen(&client, http, 8)
                    .ok()
                    .filter(|s| s.len() == 4)
            })
            .await;

            // Long-lived connections, kept to backends that stay (web-4 goes away below).
            let mut conns: Vec<Persistent> = Vec::new();
            while conns.len() < 4 {
                let c = Persistent::open(&client, echo);
                if c.backend != "web-4" {
                    conns.push(c);
                }
            }
            // New requests all along, from another thread.
            let stop = Arc::new(AtomicBool::new(false));
            let ok = Arc::new(AtomicUsize::new(0));
            let failures = Arc::new(std::sync::Mutex::new(Vec::<(Duration, String)>::new()));
            let t0 = Instant::now();
            let load = {
                let (stop, ok, failures, client) =
                    (stop.clone(), ok.clone(), failures.clone(), client.clone());
                std::thread::spawn(move || {
                    // Bounded: at most 60 s of requests.
                    let end = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let started = t0.elapsed();
                        match http_get(&client, http) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push((started, e)),
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            };
            let check_conns = |conns: &mut Vec<Persistent>, round: &str| {
                for c in conns.iter_mut() {
                    c.roundtrip(&format!("{round}\n"))
                        .unwrap_or_else(|e| panic!("{round}: existing connection broke: {e}"));
                }
            };

            // UDP "flows" to web-4 that must not outlive it (kube-proxy's stale-conntrack
            // bug black-holes DNS exactly so): a connected socket of this test (tc path,
            // conntrack) and an unconnected one in a process in the pod's cgroup
            // (socket-LB, sticky per socket).
            let dns = SocketAddr::new(vip(sandbox, "web", true), 53);
            let connected = udp_socket_on(&client, dns, "web-4");
            let cg = cgroup::find_pod(name, &client).expect("pod cgroup");
            let mut watcher = UdpWatcher::start(&client, &cg, dns);

            // Scale down: web-4 leaves; once its endpoint is gone no request goes there.
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(sandbox.client.clone(), "lb");
            pods.delete("web-4", &Default::default()).await.unwrap();
            wait_for_endpoints(sandbox, 6).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let answer = udp_ask(&connected).expect("the connected UDP socket gets an answer");
            assert!(!answer.starts_with("web-4"), "{answer}");
            watcher.expect_moved_off("web-4");
            // Requests that raced web-4's teardown may fail (the pod was gone before its
            // endpoint update reached the maps; a SYN to it times out seconds later); a
            // request started from here on may not.
            let t_settled = t0.elapsed();
            check_conns(&mut conns, "after scale-down");
            let seen = backends_seen(&client, http, 20).unwrap();
            assert!(
                !seen.contains_key("web-4"),
                "a deleted backend still gets flows: {seen:?}"
            );

            // Scale up: web-5 joins and gets traffic.
            let t_scale_up = t0.elapsed();
            apply(sandbox, "up", &pod("web-5", "web", "node-2")).await;
            sandbox
                .wait_for_pods(7, Duration::from_secs(30))
                .await
                .unwrap();
            wait_for("web-5 to get traffic", Duration::from_secs(20), || {
                backends_seen(&client, http, 8)
                    .ok()
                    .filter(|s| s.contains_key("web-5"))
            })
            .await;
            check_conns(&mut conns, "after scale-up");

            // The agent of the client's node restarts mid-traffic: requests run before,
            // during and after it.
            let before_restart = ok.load(Ordering::Relaxed);
            let t_restart = t0.elapsed();
            sandbox.restart_agent("node-1").await.unwrap();
            let after_restart = ok.load(Ordering::Relaxed);
            wait_for(
                "requests after the restart",
                Duration::from_secs(10),
                || (ok.load(Ordering::Relaxed) >= after_restart + 20).then_some(()),
            )
            .await;
            check_conns(&mut conns, "after the agent restart");
            stop.store(true, Ordering::Relaxed);
            load.join().unwrap();
            let failures = failures.lock().unwrap().clone();
            assert!(before_restart > 0, "the load ran before the restart");
            let late: Vec<&(Duration, String)> =
                failures.iter().filter(|(t, _)| *t >= t_settled).collect();
            assert!(
                late.is_empty(),
                "requests started after scale-down settled at {t_settled:?} failed (scale-up at {t_scale_up:?}, agent restart at {t_restart:?}): {late:?}"
            );
        }
        .boxed()
    })
    .await;
}
