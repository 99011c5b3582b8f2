//! What NetworkPolicy costs on the datapath (issue 5): new-connection rate,
//! connect latency and one-stream TCP throughput between two pods with no
//! policy, with one policy, and with 1,000 NetworkPolicies across 5,000 pod
//! identities, all in one run. Target: at most 5% cost against no policy.
//!
//! ```text
//! cargo bench -p fairlead-agent --bench policy_cost                        # root, ~3 min
//! POLICY_BENCH_ROUNDS=2 POLICY_BENCH_DIAG=0 cargo bench -p fairlead-agent --bench policy_cost
//! ```
//!
//! Environment: `POLICY_BENCH_ROUNDS` (rounds of every case, default 5),
//! `POLICY_BENCH_SECS` (per connection measurement, default 2; at most
//! 59,876 connections, one source port each), `POLICY_BENCH_STREAM_SECS`
//! (per stream, default 2), `POLICY_BENCH_DIAG=0` (only the four cases the
//! issue names, without the diagnostic ones below), `POLICY_BENCH_READER`
//! (`wait`, the default, as the agent; `timer`: the reader drains every
//! 10 ms and never waits on the ring, so the kernel wakes nobody).
//!
//! The topology and the load are `lb_scale`'s (`benches/lb/harness.rs`, with
//! `benches/lb/datapath.rs` for the router): client 10.244.0.2 ─ router ─
//! backend, the backend answering as every address of 10.244.128.0/17 on
//! :8080. The datapath is the agent's: `fairlead_ebpf::lb::Lb` with
//! `lb_from_pod`/`lb_to_pod` on the router's client-facing veth, which plays
//! the client pod's host veth (tc ingress: packets leaving the pod, judged by
//! its egress policy; tc egress: packets entering it, its ingress policy),
//! policy enforcement on, and the client pod's `EndpointPolicy` compiled by
//! `fairlead_agent::policy::compile_endpoint` from a `fairlead_core::Snapshot`.
//! The flow events the datapath emits go to a reader thread that waits on
//! the ring buffer and drains it, as the agent's reader task does.
//!
//! Cases, measured in rotating order in every round so drift in the
//! machine's load spreads over all of them:
//!
//! 0. the bare router: no Fairlead program attached (reference);
//! 1. no policy: programs attached, enforcement on, the client's endpoint
//!    programmed open (no policy selects it);
//! 2. one policy: selects the client, allows egress to the server pod on
//!    TCP 8080 and isolates ingress with nothing allowed (replies pass by the
//!    policy conntrack);
//! 3. 1,000 policies over 5,000 pods with distinct label sets in 50
//!    namespaces (shapes in [`policies`]); five of them select the client.
//!    The pods are spread over 50 nodes, and the other 99 pods of the
//!    client's node are programmed too (as the agent programs every pod of
//!    its node), so the rule trie holds a whole node's rules;
//!
//! and diagnostics that split the costs:
//!
//! * 0a. programs attached, enforcement off (the load balancer's
//!   per-packet path alone);
//! * 1a, 2a, 3a. as (1)-(3) with the flow-event reader paused (no wake-ups;
//!   once the ring is full, events are lost and counted); connections only.
//!   (2a) and (3a) are measured against (1a): the policy's own cost.
//!
//! Per case and round: the policy conntrack is emptied, then connections
//! (`connect` timed, close with an RST) from the client to the server pod
//! 10.244.128.1:8080 directly (no Service), each from its own source port
//! (bound in sequence, 1024 upwards), so no 4-tuple repeats and every
//! connection is judged by the rules rather than waved through by a
//! conntrack entry left by an earlier connection on the same port (the
//! kernel reuses ports within seconds at these rates, and a closed flow's
//! entry lives 10 s); the flow events are counted to show one verdict per
//! connection. Then one TCP stream to the same server. Costs are paired with
//! the baseline measured in the same round, median over rounds.

#[allow(dead_code, reason = "shared with lb_scale, which uses the rest")]
#[path = "../lb/datapath.rs"]
mod datapath;
#[allow(dead_code, reason = "shared with lb_scale, which uses the rest")]
#[path = "../lb/harness.rs"]
mod harness;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use fairlead_agent::policy::{compile_endpoint, PolicyIds};
use fairlead_core::{
    ContainerPort, IpBlock, LabelOperator, LabelRequirement, LabelSelector, Labels, Namespace,
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, Pod, PodPhase, PolicyTypes, PortRef, Protocol, Snapshot,
};
use fairlead_ebpf::{
    lb::{table::map_addr, Lb, Persistence},
    policy::{EndpointPolicy, FlowReader, VERDICT_DROPPED, VERDICT_FORWARDED},
};
use fairlead_ebpf_common::policy::{DIR_EGRESS, MAX_RULE_PREFIXES};
use harness::{
    connect_once, connect_rate_with, dur, endpoint, install_signal_handlers, root_ip_forward,
    stopped, stream, us, ConnStats, Lab, SourcePorts, SETTLE, TARGET_PORT, WARMUP,
};

const NAMESPACES: usize = 50;
const PODS_PER_NAMESPACE: usize = 100;
const POLICIES_PER_NAMESPACE: usize = 20;
const APPS_PER_NAMESPACE: usize = 20;
const TIERS: [&str; 5] = ["web", "api", "worker", "db", "cache"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const TEAMS: usize = 10;
/// Pod `i` runs on node `i % NODES`: 100 pods a node, two in each namespace.
const NODES: usize = 50;
/// The client pod's namespace and slot; the server's (a prod namespace, so
/// the web tier's egress rule reaches it).
const CLIENT_NS: usize = 0;
const SERVER_NS: usize = 3;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Source ports of the connection loop (bound one after another), below
/// the client namespace's ephemeral range, which the bench narrows to
/// [`EPHEMERAL`] so that a socket with a kernel-chosen port (the stream's,
/// in TIME_WAIT for a minute after it closes) never holds one of them.
const SOURCE_PORTS: SourcePorts = SourcePorts::Sequential {
    first: 1024,
    last: 60999,
};
const EPHEMERAL: &str = "61000 65535";
/// A connection to a port nobody allowed must not complete within this.
const DENY_WAIT: Duration = Duration::from_millis(300);
const COMPILE_REPEATS: usize = 5;

const DEFAULT_ROUNDS: usize = 5;
const DEFAULT_SECS: f64 = 2.0;
const DEFAULT_STREAM_SECS: f64 = 2.0;

fn server() -> SocketAddrV4 {
    endpoint(0)
}

/// An address the policies of cases 2 and 3 do not allow (the backend would
/// answer it: it is in the endpoint range).
fn not_allowed() -> SocketAddrV4 {
    endpoint(1)
}

fn main() {
    install_signal_handlers();
    if let Err(e) = real_main() {
        eprintln!("policy_cost: {e:#}");
        std::process::exit(1);
    }
}

struct Config {
    cases: Vec<Case>,
    reader: ReaderMode,
    rounds: usize,
    secs: Duration,
    stream_secs: Duration,
}

fn config() -> Result<Config> {
    let rounds = match std::env::var("POLICY_BENCH_ROUNDS") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .with_context(|| format!("POLICY_BENCH_ROUNDS takes 1 to 20, not {v:?}"))?,
        Err(_) => DEFAULT_ROUNDS,
    };
    let diagnostics = match std::env::var("POLICY_BENCH_DIAG") {
        Ok(v) => match v.as_str() {
            "0" => false,
            "1" => true,
            _ => anyhow::bail!("POLICY_BENCH_DIAG takes 0 or 1, not {v:?}"),
        },
        Err(_) => true,
    };
    let reader = match std::env::var("POLICY_BENCH_READER").as_deref() {
        Ok("wait") | Err(_) => ReaderMode::Wait,
        Ok("timer") => ReaderMode::Timer,
        Ok(v) => anyhow::bail!("POLICY_BENCH_READER takes wait or timer, not {v:?}"),
    };
    Ok(Config {
        reader,
        cases: if diagnostics {
            ALL_CASES.to_vec()
        } else {
            CASES.to_vec()
        },
        rounds,
        secs: harness::secs_var("POLICY_BENCH_SECS", DEFAULT_SECS)?,
        stream_secs: harness::secs_var("POLICY_BENCH_STREAM_SECS", DEFAULT_STREAM_SECS)?,
    })
}

// ---------------------------------------------------------------------------
// The cluster: 50 namespaces, 5,000 pods, 1,000 NetworkPolicies.

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::from_labels(kv.iter().map(|(k, v)| (*k, *v)))
}

fn sel_in(key: &str, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![LabelRequirement {
            key: key.into(),
            operator: LabelOperator::In(values.iter().map(|v| v.to_string()).collect()),
        }],
    }
}

fn node_name(k: usize) -> String {
    format!("node-{k:02}")
}

fn ns_name(n: usize) -> String {
    format!("ns-{n:02}")
}

fn team(n: usize) -> String {
    format!("team-{}", n % TEAMS)
}

fn env_of(n: usize) -> &'static str {
    ENVS[n % ENVS.len()]
}

/// The role label of a namespace: one runs cluster DNS, one monitoring.
fn role(n: usize) -> &'static str {
    match n {
        49 => "system",
        48 => "monitoring",
        _ => "apps",
    }
}

fn namespace(n: usize) -> Namespace {
    let name = ns_name(n);
    Namespace {
        labels: labels(&[
            ("kubernetes.io/metadata.name", &name),
            ("team", &team(n)),
            ("env", env_of(n)),
            ("role", role(n)),
        ]),
        name,
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        container: "main".into(),
        name: Some(name.into()),
        port,
        protocol: Protocol::Tcp,
    }
}

/// Pod `j` of namespace `n`: app `j % 20` (five replicas each), its tier,
/// a unique instance label (so 5,000 distinct label sets), an address in
/// 10.244.1.1-10.244.20.250 (clear of the bench's client /24 and endpoint
/// range). Slot (0, 0) is the client and (3, 0) the server, at the bench's
/// real addresses.
fn pod(n: usize, j: usize) -> Pod {
    let i = n * PODS_PER_NAMESPACE + j;
    let a = j % APPS_PER_NAMESPACE;
    let tier = TIERS[a % TIERS.len()];
    let mut app = format!("app-{a:02}");
    let mut ip = IpAddr::V4(Ipv4Addr::new(
        10,
        244,
        (1 + i / 250) as u8,
        (1 + i % 250) as u8,
    ));
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if role(n) == "system" && a == 0 {
        extra.push(("k8s-app", "kube-dns"));
    }
    if role(n) == "monitoring" && a == 0 {
        app = "prometheus".into();
    }
    if n == CLIENT_NS && j == 0 {
        app = "bench-client".into();
        ip = IpAddr::V4(CLIENT_IP);
        extra.push(("role", "bench-client"));
    }
    if n == SERVER_NS && j == 0 {
        app = "bench-server".into();
        ip = IpAddr::V4(*server().ip());
    }
    let tier = if n == SERVER_NS && j == 0 {
        "api"
    } else {
        tier
    };
    let hash = format!(
        "{:010x}",
        (n * 7919 + a * 104_729) as u64 * 2_654_435_761 % (1 << 40)
    );
    let name = format!("{app}-{hash}-{j:02}");
    let mut l = labels(&[
        ("app", &app),
        ("tier", tier),
        ("pod-template-hash", &hash),
        ("instance", &name),
    ]);
    for (k, v) in extra {
        l.insert(k.into(), v.into());
    }
    let mut ports = vec![port("http", TARGET_PORT), port("metrics", 9090)];
    match tier {
        "db" => ports.push(port("db", 5432)),
        "cache" => ports.push(port("redis", 6379)),
        _ => {}
    }
    Pod {
        namespace: ns_name(n),
        name,
        uid: format!("uid-{i:05}"),
        ips: vec![ip],
        labels: l,
        annotations: Labels::new(),
        node_name: Some(node_name(i % NODES)),
        service_account: "default".into(),
        phase: PodPhase::Running,
        host_network: false,
        ports,
        ready: true,
        terminating: false,
    }
}

fn tcp(p: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(p)),
        end_port: None,
    }
}

fn tcp_range(lo: u16, hi: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        end_port: Some(hi),
        ..tcp(lo)
    }
}

fn named(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn udp(p: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Protocol::Udp,
        ..tcp(p)
    }
}

fn from(peers: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule { from: peers, ports }
}

fn to(peers: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule { to: peers, ports }
}

fn in_ns(pods: LabelSelector, namespaces: LabelSelector) -> NetworkPolicyPeer {
    NetworkPolicyPeer::PodsInNamespaces { pods, namespaces }
}

fn block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer::IpBlock(IpBlock {
        cidr: cidr.parse().expect("constant CIDR"),
        except: except
            .iter()
            .map(|e| e.parse().expect("constant CIDR"))
            .collect(),
    })
}

fn internet() -> NetworkPolicyPeer {
    block(
        "0.0.0.0/0",
        &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
    )
}

fn netpol(
    n: usize,
    name: &str,
    pod_selector: LabelSelector,
    ingress: Option<Vec<NetworkPolicyIngressRule>>,
    egress: Option<Vec<NetworkPolicyEgressRule>>,
) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns_name(n),
        name: name.into(),
        pod_selector,
        policy_types: PolicyTypes {
            ingress: ingress.is_some(),
            egress: egress.is_some(),
        },
        ingress: ingress.unwrap_or_default(),
        egress: egress.unwrap_or_default(),
        labels: Labels::new(),
    }
}

/// The 20 policies of namespace `n`, in the shapes clusters use: deny-all,
/// DNS egress, monitoring scrapes, same-namespace traffic, one policy per
/// tier (namespace, pod, combined and ipBlock peers, named ports, endPort),
/// and per-app ingress from a neighbouring app and from another team's
/// namespaces.
fn policies(n: usize) -> Vec<NetworkPolicy> {
    let env = env_of(n);
    let own_team = team(n);
    let mut out = vec![
        netpol(
            n,
            "default-deny",
            LabelSelector::everything(),
            Some(vec![]),
            Some(vec![]),
        ),
        netpol(
            n,
            "allow-dns",
            LabelSelector::everything(),
            None,
            Some(vec![to(
                vec![in_ns(
                    sel(&[("k8s-app", "kube-dns")]),
                    sel(&[("role", "system")]),
                )],
                vec![udp(53), tcp(53)],
            )]),
        ),
        netpol(
            n,
            "allow-monitoring",
            LabelSelector::everything(),
            Some(vec![from(
                vec![in_ns(
                    sel(&[("app", "prometheus")]),
                    sel(&[("role", "monitoring")]),
                )],
                vec![named("metrics")],
            )]),
            None,
        ),
        netpol(
            n,
            "allow-same-namespace",
            LabelSelector::everything(),
            Some(vec![from(
                vec![NetworkPolicyPeer::Pods(LabelSelector::everything())],
                vec![],
            )]),
            None,
        ),
    ];
    for tier in TIERS {
        let (ingress, egress) = match tier {
            "web" => (
                vec![
                    from(
                        vec![NetworkPolicyPeer::Namespaces(sel(&[("env", env)]))],
                        vec![tcp(TARGET_PORT)],
                    ),
                    from(
                        vec![block("172.16.0.0/12", &["172.16.5.0/24"])],
                        vec![tcp(TARGET_PORT), tcp(8443)],
                    ),
                ],
                vec![
                    to(
                        vec![in_ns(sel(&[("tier", "api")]), sel(&[("env", env)]))],
                        vec![named("http")],
                    ),
                    to(
                        vec![NetworkPolicyPeer::Namespaces(sel(&[("team", &own_team)]))],
                        vec![tcp(TARGET_PORT), tcp(9090)],
                    ),
                    to(vec![internet()], vec![tcp(443)]),
                ],
            ),
            "api" => (
                vec![from(
                    vec![in_ns(sel(&[("tier", "web")]), sel(&[("env", env)]))],
                    vec![named("http")],
                )],
                vec![
                    to(
                        vec![NetworkPolicyPeer::Pods(sel_in("tier", &["db", "cache"]))],
                        vec![named("db"), named("redis")],
                    ),
                    to(
                        vec![in_ns(sel(&[("tier", "api")]), sel(&[("team", &own_team)]))],
                        vec![named("http")],
                    ),
                ],
            ),
            "worker" => (
                vec![from(
                    vec![NetworkPolicyPeer::Pods(sel(&[("tier", "api")]))],
                    vec![tcp_range(8080, 8090)],
                )],
                vec![
                    to(
                        vec![NetworkPolicyPeer::Pods(sel(&[("tier", "db")]))],
                        vec![named("db")],
                    ),
                    to(vec![internet()], vec![tcp(443)]),
                ],
            ),
            "db" => (
                vec![from(
                    vec![NetworkPolicyPeer::Pods(sel_in("tier", &["api", "worker"]))],
                    vec![named("db")],
                )],
                vec![],
            ),
            _ => (
                vec![from(
                    vec![NetworkPolicyPeer::Pods(sel_in("tier", &["api", "web"]))],
                    vec![named("redis")],
                )],
                vec![],
            ),
        };
        out.push(netpol(
            n,
            &format!("tier-{tier}"),
            sel(&[("tier", tier)]),
            Some(ingress),
            Some(egress),
        ));
    }
    let mut a = 0;
    while out.len() < POLICIES_PER_NAMESPACE {
        let app = format!("app-{a:02}");
        let upstream = format!("app-{:02}", (a + 1) % APPS_PER_NAMESPACE);
        out.push(netpol(
            n,
            &format!("app-{a:02}-ingress"),
            sel(&[("app", &app)]),
            Some(vec![
                from(
                    vec![NetworkPolicyPeer::Pods(sel(&[("app", &upstream)]))],
                    vec![named("http")],
                ),
                from(
                    vec![in_ns(
                        sel(&[("app", &app)]),
                        sel(&[("team", &team(n + a + 1))]),
                    )],
                    vec![tcp(TARGET_PORT)],
                ),
            ]),
            None,
        ));
        a += 1;
    }
    out
}

/// The one policy of case 2: the client may reach the server on 8080, and
/// nothing may reach the client.
fn bench_policy() -> NetworkPolicy {
    netpol(
        CLIENT_NS,
        "bench-client",
        sel(&[("role", "bench-client")]),
        Some(vec![]),
        Some(vec![to(
            vec![in_ns(
                sel(&[("app", "bench-server")]),
                sel(&[("kubernetes.io/metadata.name", &ns_name(SERVER_NS))]),
            )],
            vec![tcp(TARGET_PORT)],
        )]),
    )
}

struct Cluster {
    one: Snapshot,
    many: Snapshot,
    client: Pod,
    /// The other pods on the client's node.
    neighbours: Vec<Pod>,
    pods: usize,
    identities: usize,
    policies: usize,
    selecting_client: usize,
    build: Duration,
}

fn cluster() -> Cluster {
    let start = Instant::now();
    let namespaces: Vec<Namespace> = (0..NAMESPACES).map(namespace).collect();
    let pods: Vec<Pod> = (0..NAMESPACES)
        .flat_map(|n| (0..PODS_PER_NAMESPACE).map(move |j| pod(n, j)))
        .collect();
    let policies: Vec<NetworkPolicy> = (0..NAMESPACES).flat_map(policies).collect();
    let client = pods[CLIENT_NS * PODS_PER_NAMESPACE].clone();
    let neighbours: Vec<Pod> = pods
        .iter()
        .filter(|p| p.node_name == client.node_name && p.name != client.name)
        .cloned()
        .collect();
    let identities = pods
        .iter()
        .map(|p| (p.namespace.clone(), p.labels.clone()))
        .collect::<BTreeSet<_>>()
        .len();
    let selecting_client = policies
        .iter()
        .filter(|p| p.namespace == client.namespace && p.pod_selector.matches(&client.labels))
        .count();
    let base = || {
        let mut b = Snapshot::builder();
        for ns in &namespaces {
            b = b.namespace(ns.clone());
        }
        for p in &pods {
            b = b.pod(p.clone());
        }
        b
    };
    let one = base().network_policy(bench_policy()).build();
    let mut b = base();
    for p in &policies {
        b = b.network_policy(p.clone());
    }
    let many = b.build();
    Cluster {
        one,
        many,
        client,
        neighbours,
        pods: pods.len(),
        identities,
        policies: policies.len(),
        selecting_client,
        build: start.elapsed(),
    }
}

/// The client's endpoint policy from `snap`, compiled COMPILE_REPEATS times
/// (the median time is reported).
fn compile(snap: &Snapshot, client: &Pod) -> (EndpointPolicy, Duration) {
    let mut times = Vec::new();
    let mut ep = EndpointPolicy::open();
    for _ in 0..COMPILE_REPEATS {
        let start = Instant::now();
        ep = compile_endpoint(
            snap,
            client,
            IpAddr::V4(CLIENT_IP),
            &mut PolicyIds::default(),
        );
        times.push(start.elapsed());
    }
    (ep, median(&times))
}

/// The other pods of the client's node, compiled as the agent compiles its
/// node's pods (one `PolicyIds` for all).
struct Node {
    pods: Vec<(IpAddr, EndpointPolicy)>,
    compile: Duration,
    slowest: Duration,
    prefixes: usize,
    most: usize,
}

fn compile_node(c: &Cluster) -> Node {
    let mut ids = PolicyIds::default();
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    let pods: Vec<(IpAddr, EndpointPolicy)> = c
        .neighbours
        .iter()
        .map(|p| {
            let t = Instant::now();
            let ep = compile_endpoint(&c.many, p, p.ips[0], &mut ids);
            slowest = slowest.max(t.elapsed());
            (p.ips[0], ep)
        })
        .collect();
    let compile = start.elapsed();
    let sizes = pods.iter().map(|(_, ep)| {
        let (i, e) = prefixes(ep);
        i + e
    });
    Node {
        prefixes: sizes.clone().sum(),
        most: sizes.max().unwrap_or(0),
        pods,
        compile,
        slowest,
    }
}

fn prefixes(ep: &EndpointPolicy) -> (usize, usize) {
    (ep.ingress.len(), ep.egress.len())
}

// ---------------------------------------------------------------------------
// Flow events: drained on a thread as the agent's reader does, counted.

/// How the reader thread waits for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReaderMode {
    /// Blocks in poll(2) on the ring buffer, woken by the kernel when an
    /// event arrives after the reader caught up: the agent's way (an
    /// `AsyncFd` on the ring in a tokio task).
    Wait,
    /// Sleeps [`TIMER_READ`] between drains and never waits on the ring, so
    /// the kernel wakes nobody (`POLICY_BENCH_READER=timer`; the ring holds
    /// 16,384 events, so 10 ms leaves room for 1.6 million a second).
    Timer,
}

const TIMER_READ: Duration = Duration::from_millis(10);

impl ReaderMode {
    fn describe(self) -> &'static str {
        match self {
            ReaderMode::Wait => {
                "the flow-event reader waits on the ring buffer (as the agent's does)"
            }
            ReaderMode::Timer => {
                "the flow-event reader drains every 10 ms and never waits on the ring \
                 (POLICY_BENCH_READER=timer)"
            }
        }
    }
}

#[derive(Default)]
struct FlowCounts {
    /// New connections from the client to the server allowed (one verdict
    /// each): what the connection loop should produce, one per connection.
    bench: AtomicU64,
    /// Of those, the ones a policy's rule allowed (the event names it).
    ruled: AtomicU64,
    dropped: AtomicU64,
    other: AtomicU64,
}

struct FlowThread {
    counts: Arc<FlowCounts>,
    stop: Arc<AtomicBool>,
    /// While set, the thread does not read (the ring fills, then events are
    /// lost and counted as such): no wake-ups.
    paused: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FlowThread {
    fn start(mut reader: FlowReader, mode: ReaderMode) -> Result<FlowThread> {
        let counts = Arc::new(FlowCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (c, s, p) = (counts.clone(), stop.clone(), paused.clone());
        let client = map_addr(IpAddr::V4(CLIENT_IP));
        let server = map_addr(IpAddr::V4(*server().ip()));
        let thread = thread::Builder::new()
            .name("flow-reader".into())
            .spawn(move || {
                let mut count = |e: fairlead_ebpf::policy::FlowEvent| {
                    let counter = if e.verdict == VERDICT_DROPPED {
                        &c.dropped
                    } else if e.verdict == VERDICT_FORWARDED
                        && e.dir == DIR_EGRESS
                        && e.endpoint == client
                        && e.peer == server
                        && u16::from_be(e.peer_port) == TARGET_PORT
                    {
                        if e.policy != 0 {
                            c.ruled.fetch_add(1, Ordering::Relaxed);
                        }
                        &c.bench
                    } else {
                        &c.other
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                };
                while !s.load(Ordering::Relaxed) {
                    if p.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    match mode {
                        ReaderMode::Wait => {
                            let mut pfd = libc::pollfd {
                                fd: reader.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one valid pollfd, bounded wait.
                            unsafe { libc::poll(&mut pfd, 1, 20) };
                        }
                        ReaderMode::Timer => thread::sleep(TIMER_READ),
                    }
                    reader.drain(&mut count);
                }
                reader.drain(&mut count);
            })?;
        Ok(FlowThread {
            counts,
            stop,
            paused,
            thread: Some(thread),
        })
    }

    fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    fn bench(&self) -> u64 {
        self.counts.bench.load(Ordering::Relaxed)
    }

    fn ruled(&self) -> u64 {
        self.counts.ruled.load(Ordering::Relaxed)
    }

    fn all(&self) -> u64 {
        let c = &self.counts;
        c.bench.load(Ordering::Relaxed)
            + c.dropped.load(Ordering::Relaxed)
            + c.other.load(Ordering::Relaxed)
    }
}

impl Drop for FlowThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The datapath under test.

/// One state of the datapath the load runs against. The cases the issue
/// names are `Bare`, `Open`, `One` and `Many`; the rest are diagnostics
/// that split the costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    /// (0) No program attached.
    Bare,
    /// (0a) Programs attached, enforcement off: the load balancer's
    /// per-packet path alone.
    LbOnly,
    /// (1) Enforcement on, the client's endpoint open.
    Open,
    /// (2) One policy.
    One,
    /// (3) 1,000 policies.
    Many,
    /// (1a)-(3a) As (1)-(3) with the flow-event reader paused: no wake-ups;
    /// the ring fills, then events are lost (and counted). The connection
    /// loop only (the stream has one new connection: nothing to read).
    OpenUnread,
    OneUnread,
    ManyUnread,
}

const CASES: [Case; 4] = [Case::Bare, Case::Open, Case::One, Case::Many];
const ALL_CASES: [Case; 8] = [
    Case::Bare,
    Case::LbOnly,
    Case::Open,
    Case::One,
    Case::Many,
    Case::OpenUnread,
    Case::OneUnread,
    Case::ManyUnread,
];

/// What the client's endpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Open,
    One,
    Many,
}

impl Case {
    fn label(self, policies: usize, pods: usize) -> String {
        match self {
            Case::Bare => "(0) bare router, no Fairlead program".into(),
            Case::LbOnly => "(0a) programs attached, enforcement off".into(),
            Case::Open => "(1) no policy (enforcement on, client open)".into(),
            Case::One => "(2) one policy (egress to the server:8080, ingress closed)".into(),
            Case::Many => format!(
                "(3) {} policies, {} pod identities",
                thousands(policies),
                thousands(pods)
            ),
            Case::OpenUnread => "(1a) as (1), flow events not read".into(),
            Case::OneUnread => "(2a) as (2), flow events not read".into(),
            Case::ManyUnread => "(3a) as (3), flow events not read".into(),
        }
    }

    fn short(self) -> &'static str {
        match self {
            Case::Bare => "(0)",
            Case::LbOnly => "(0a)",
            Case::Open => "(1)",
            Case::One => "(2)",
            Case::Many => "(3)",
            Case::OpenUnread => "(1a)",
            Case::OneUnread => "(2a)",
            Case::ManyUnread => "(3a)",
        }
    }

    /// The flow-event reader is paused.
    fn unread(self) -> bool {
        matches!(self, Case::OpenUnread | Case::OneUnread | Case::ManyUnread)
    }

    fn endpoint(self) -> Endpoint {
        match self {
            Case::One | Case::OneUnread => Endpoint::One,
            Case::Many | Case::ManyUnread => Endpoint::Many,
            _ => Endpoint::Open,
        }
    }

    /// What its cost is measured against: (1) for the issue's cases and
    /// (0)/(0a)/(1a); (1a) for (2a) and (3a), the policy's own cost without
    /// the reader's wake-ups.
    fn baseline(self) -> Option<Case> {
        match self {
            Case::Open => None,
            Case::OneUnread | Case::ManyUnread => Some(Case::OpenUnread),
            _ => Some(Case::Open),
        }
    }
}

/// The loaded programs, attached or not, and what the client's endpoint
/// holds. Dropping it removes the pins (links detach, maps go).
struct Datapath {
    lb: Option<Lb>,
    attached: bool,
    /// The neighbours hold their policies (else they are open).
    node_programmed: bool,
    client_if: String,
    netns: std::path::PathBuf,
}

impl Datapath {
    fn lb(&mut self) -> Result<&mut Lb> {
        self.lb.as_mut().context("already destroyed")
    }

    fn attach(&mut self) -> Result<()> {
        if !self.attached {
            let (netns, ifname) = (self.netns.clone(), self.client_if.clone());
            self.lb()?
                .attach_pod(&netns, &ifname)
                .with_context(|| format!("attaching to {ifname} in the router"))?;
            self.attached = true;
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<()> {
        if self.attached {
            let ifname = self.client_if.clone();
            self.lb()?.detach_pod(&ifname)?;
            self.attached = false;
        }
        Ok(())
    }

    /// Programs the client's endpoint; the time and map operations.
    fn program(&mut self, ep: &EndpointPolicy) -> Result<(Duration, usize)> {
        self.program_at(IpAddr::V4(CLIENT_IP), ep)
    }

    fn program_at(&mut self, ip: IpAddr, ep: &EndpointPolicy) -> Result<(Duration, usize)> {
        let start = Instant::now();
        let report = self
            .lb()?
            .set_endpoint_policy(ip, ep)
            .with_context(|| format!("programming the endpoint policy of {ip}"))?;
        let took = start.elapsed();
        ensure!(
            report.overflow.is_empty(),
            "{} prefixes overflowed their map value (programmed as deny)",
            report.overflow.len()
        );
        Ok((took, report.map_ops))
    }

    /// Empties both conntrack maps (load balancing and policy).
    fn flush_conntrack(&mut self) -> Result<()> {
        self.lb()?.gc_at(u64::MAX)?;
        Ok(())
    }

    fn stat(&mut self, name: &str) -> Result<u64> {
        Ok(self.lb()?.stat(name)?)
    }

    fn destroy(&mut self) -> Result<()> {
        if let Some(lb) = self.lb.take() {
            lb.destroy()?;
        }
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            eprintln!("policy_cost: removing the programs: {e:#}");
        }
    }
}

struct Policies {
    one: EndpointPolicy,
    many: EndpointPolicy,
    /// The client's node's other pods under the 1,000 policies: programmed
    /// in the cases with the 1,000 policies, open in the others.
    node: Node,
}

/// Timed programming done by [`apply`]: (time, map writes).
#[derive(Clone, Copy, Default)]
struct Applied {
    /// The client's endpoint, from open.
    client: Option<(Duration, usize)>,
    /// The rest of the node (every neighbour, from open).
    node: Option<(Duration, usize)>,
}

/// Puts the datapath in `case`'s state; for the policy cases the programming
/// (from an open endpoint) is timed, and so is programming the rest of the
/// node when (3) starts.
fn apply(dp: &mut Datapath, flows: &FlowThread, case: Case, p: &Policies) -> Result<Applied> {
    if flows.paused.load(Ordering::Relaxed) && !case.unread() {
        flows.pause(false);
        thread::sleep(Duration::from_millis(100));
    }
    let mut applied = Applied::default();
    if case == Case::Bare {
        dp.detach()?;
        return Ok(applied);
    }
    dp.attach()?;
    dp.lb()?.set_policy_enforcement(case != Case::LbOnly)?;
    let many = case.endpoint() == Endpoint::Many;
    if many != dp.node_programmed {
        let open = EndpointPolicy::open();
        let start = Instant::now();
        let mut ops = 0;
        for (ip, ep) in &p.node.pods {
            ops += dp.program_at(*ip, if many { ep } else { &open })?.1;
        }
        if many {
            applied.node = Some((start.elapsed(), ops));
        }
        dp.node_programmed = many;
    }
    dp.program(&EndpointPolicy::open())?;
    if case.unread() {
        flows.pause(true);
    }
    applied.client = match case.endpoint() {
        Endpoint::One => Some(dp.program(&p.one)?),
        Endpoint::Many => Some(dp.program(&p.many)?),
        Endpoint::Open => None,
    };
    Ok(applied)
}

/// Checks, once per case, that the case is what it claims: no program sees
/// the bare router's packets; the open endpoint passes anything; the policy
/// cases let the server in and drop what they do not allow.
fn check(lab: &Lab, dp: &mut Datapath, flows: &FlowThread, case: Case) -> Result<()> {
    const PROBES: usize = 20;
    let (events, ruled) = (flows.all(), flows.ruled());
    let denied = dp.stat("policy_denied_egress")?;
    let ok = lab.client.run_in(|| {
        (0..PROBES)
            .map(|_| connect_once(server(), true))
            .filter(|r| r.is_ok())
            .count()
    })?;
    ensure!(
        ok == PROBES,
        "{case:?}: {} of {PROBES} connections to the server failed",
        PROBES - ok
    );
    let other = lab
        .client
        .run_in(|| TcpStream::connect_timeout(&not_allowed().into(), DENY_WAIT).map(|_| ()))?;
    thread::sleep(Duration::from_millis(100));
    let (events, ruled, denied) = (
        flows.all() - events,
        flows.ruled() - ruled,
        dp.stat("policy_denied_egress")? - denied,
    );
    match case {
        Case::Bare => ensure!(
            events == 0,
            "bare router: {events} flow events, so a program is still attached"
        ),
        Case::LbOnly => {
            ensure!(
                other.is_ok(),
                "enforcement off: {} refused: {other:?}",
                not_allowed()
            );
            ensure!(events == 0, "enforcement off: {events} flow events");
        }
        Case::OpenUnread => ensure!(
            other.is_ok(),
            "open endpoint: {} refused: {other:?}",
            not_allowed()
        ),
        Case::Open => {
            ensure!(
                other.is_ok(),
                "open endpoint: {} refused: {other:?}",
                not_allowed()
            );
            ensure!(
                events as usize >= PROBES && ruled == 0,
                "open endpoint: {events} flow events for {PROBES} connections, {ruled} naming a policy"
            );
        }
        Case::One | Case::Many => {
            ensure!(
                ruled as usize == PROBES,
                "{case:?}: {ruled} of {PROBES} connections allowed by a policy's rule"
            );
            ensure!(
                other.is_err() && denied >= 1,
                "{case:?}: a connection to {} was not dropped by policy ({other:?}, {denied} drops)",
                not_allowed()
            );
        }
        Case::OneUnread | Case::ManyUnread => {
            ensure!(
                other.is_err() && denied >= 1,
                "{case:?}: a connection to {} was not dropped by policy ({other:?}, {denied} drops)",
                not_allowed()
            );
        }
    }
    Ok(())
}

struct Sample {
    conn: ConnStats,
    /// Verdicts counted for the connections (events drained + events lost).
    verdicts: u64,
    /// One stream (not measured for the reader-paused cases).
    gbits: Option<f64>,
    applied: Applied,
}

fn measure(
    lab: &Lab,
    dp: &mut Datapath,
    flows: &FlowThread,
    case: Case,
    applied: Applied,
    config: &Config,
) -> Result<Sample> {
    if dp.attached {
        dp.flush_conntrack()?;
    }
    thread::sleep(SETTLE);
    let (events, lost) = (flows.bench(), dp.stat("flow_events_lost")?);
    let conn = connect_rate_with(lab, server(), config.secs, SOURCE_PORTS)?;
    if case.unread() {
        flows.pause(false);
    }
    thread::sleep(SETTLE);
    let verdicts = flows.bench() - events + (dp.stat("flow_events_lost")? - lost);
    let gbits = if case.unread() {
        None
    } else {
        let g = stream(lab, server(), config.stream_secs)?;
        thread::sleep(SETTLE);
        Some(g)
    };
    let attempts = WARMUP + conn.latencies.len() + conn.errors;
    println!(
        "  {} {case:?}: {:.0} conn/s, p50 {} µs, p99 {} µs{}, {:.2} verdicts/conn{}{}",
        case.short(),
        conn.rate(),
        us(conn.percentile(0.5)),
        us(conn.percentile(0.99)),
        if conn.errors > 0 {
            format!(
                ", {} FAILED (first: {})",
                conn.errors,
                conn.first_error.as_deref().unwrap_or("-")
            )
        } else {
            String::new()
        } + &if conn.skipped_ports > 0 {
            format!(", {} source ports skipped (held)", conn.skipped_ports)
        } else {
            String::new()
        },
        verdicts as f64 / attempts as f64,
        gbits.map_or(String::new(), |g| format!("; stream {g:.2} Gbit/s")),
        applied.client.map_or(String::new(), |(d, ops)| format!(
            "; client programmed in {} ({ops} map writes)",
            dur(d)
        )) + &applied.node.map_or(String::new(), |(d, ops)| format!(
            ", the rest of the node in {} ({ops})",
            dur(d)
        )),
    );
    Ok(Sample {
        conn,
        verdicts,
        gbits,
        applied,
    })
}

// ---------------------------------------------------------------------------
// The run.

fn real_main() -> Result<()> {
    fairlead_testkit::require_root()?;
    let config = config()?;
    let root_forward_before = root_ip_forward();
    let machine = machine();
    println!("{machine}");
    println!("load at start: {}", loadavg());
    println!("{}", config.reader.describe());
    println!(
        "{} rounds; per case and round: connections for {:.1} s (at most {}, one source port each), one stream for {:.1} s",
        config.rounds,
        config.secs.as_secs_f64(),
        thousands(source_port_count() - WARMUP),
        config.stream_secs.as_secs_f64(),
    );
    let started = Instant::now();

    let cluster = cluster();
    let (one, compile_one) = compile(&cluster.one, &cluster.client);
    let (many, compile_many) = compile(&cluster.many, &cluster.client);
    println!(
        "cluster: {} namespaces, {} pods ({} distinct label sets), {} policies ({} select the client); built in {}",
        NAMESPACES,
        cluster.pods,
        cluster.identities,
        cluster.policies,
        cluster.selecting_client,
        dur(cluster.build)
    );
    for (what, ep, t) in [
        ("one policy", &one, compile_one),
        ("1,000 policies", &many, compile_many),
    ] {
        let (i, e) = prefixes(ep);
        println!(
            "  compile_endpoint, {what}: {} (median of {COMPILE_REPEATS}); ingress {i} prefixes{}, egress {e} prefixes{}",
            dur(t),
            if ep.ingress_isolated { " (isolated)" } else { "" },
            if ep.egress_isolated { " (isolated)" } else { "" },
        );
    }
    let node = compile_node(&cluster);
    let (i, e) = prefixes(&many);
    println!(
        "  the rest of the client's node ({} pods) under the 1,000 policies: compile_endpoint {} in all (slowest pod {}), {} prefixes (most for one pod {}); with the client's {}, {} of the rule map's {}",
        node.pods.len(),
        dur(node.compile),
        dur(node.slowest),
        thousands(node.prefixes),
        thousands(node.most),
        thousands(i + e),
        thousands(node.prefixes + i + e),
        thousands(MAX_RULE_PREFIXES as usize),
    );
    let policies = Policies { one, many, node };

    let lab = Lab::new().context("building the namespaces")?;
    harness::sysctl_in(&lab.client, "net.ipv4.ip_local_port_range", EPHEMERAL)?;
    println!("{}; client ephemeral ports {EPHEMERAL}", lab.describe());
    let mut lb = Lb::load(
        &fairlead_testkit::unique_instance(),
        Persistence::RemoveOnDrop,
    )
    .context("loading the load-balancing and policy programs")?;
    let reader = lb
        .take_flow_reader()
        .context("the flow reader was already taken")?;
    let mut dp = Datapath {
        lb: Some(lb),
        attached: false,
        node_programmed: false,
        client_if: lab.router.client_if.clone(),
        netns: lab.router.netns_path.clone(),
    };
    // Declared after `dp`: stops before the programs go.
    let flows = FlowThread::start(reader, config.reader)?;
    dp.lb()?.set_policy_enforcement(true)?;
    dp.program(&EndpointPolicy::open())?;

    for &case in &config.cases {
        stopped()?;
        apply(&mut dp, &flows, case, &policies)?;
        check(&lab, &mut dp, &flows, case).with_context(|| format!("checking {case:?}"))?;
    }
    println!(
        "checks passed: no program sees the bare router's packets (nor, with enforcement off, \
         emits events); the open endpoint passes everything; in the policy cases a rule allows \
         each connection to the server and {} is dropped",
        not_allowed()
    );

    let mut samples: BTreeMap<Case, Vec<Sample>> = BTreeMap::new();
    for round in 0..config.rounds {
        let mut order = config.cases.clone();
        let n = order.len();
        order.rotate_left(round % n);
        println!(
            "\n== round {} of {}: {:?} (load {}) ==",
            round + 1,
            config.rounds,
            order,
            loadavg()
        );
        for case in order {
            stopped()?;
            let applied = apply(&mut dp, &flows, case, &policies)?;
            let s = measure(&lab, &mut dp, &flows, case, applied, &config)
                .with_context(|| format!("round {}, {case:?}", round + 1))?;
            samples.entry(case).or_default().push(s);
        }
    }
    drop(flows);
    dp.destroy().context("removing the programs")?;
    drop(dp);
    drop(lab);
    println!(
        "\n(total {:.0} s; load at end: {})",
        started.elapsed().as_secs_f64(),
        loadavg()
    );

    let info = RunInfo {
        machine,
        cluster: &cluster,
        policies: &policies,
        compile_one,
        compile_many,
    };
    print_results(&samples, &info, &config);
    let root_forward_after = root_ip_forward();
    if root_forward_before != root_forward_after {
        println!(
            "WARNING: the root namespace's net.ipv4.ip_forward changed during the run \
             ({root_forward_before:?} -> {root_forward_after:?}); this bench never writes it, \
             something else on the machine did"
        );
    }
    Ok(())
}

fn source_port_count() -> usize {
    match SOURCE_PORTS {
        SourcePorts::Sequential { first, last } => usize::from(last - first) + 1,
        SourcePorts::Kernel => 0,
    }
}

// ---------------------------------------------------------------------------
// Output.

struct RunInfo<'a> {
    machine: String,
    cluster: &'a Cluster,
    policies: &'a Policies,
    compile_one: Duration,
    compile_many: Duration,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:+.1}%")
    }
}

fn pct_range(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{} ({} to {})", pct(median_f(v)), pct(lo), pct(hi))
}

/// Pooled connect latencies of every round (sorted).
fn pooled(samples: &[Sample]) -> ConnStats {
    let mut latencies: Vec<Duration> = samples
        .iter()
        .flat_map(|s| s.conn.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    ConnStats {
        latencies,
        errors: samples.iter().map(|s| s.conn.errors).sum(),
        first_error: samples.iter().find_map(|s| s.conn.first_error.clone()),
        elapsed: samples.iter().map(|s| s.conn.elapsed).sum(),
        skipped_ports: samples.iter().map(|s| s.conn.skipped_ports).sum(),
    }
}

/// Per round, the cost of `case` against its baseline in the same round,
/// in percent, positive when worse: `sign` -1 for figures where more is
/// better (rates), +1 where less is (latencies). Empty without a baseline.
fn paired(
    samples: &BTreeMap<Case, Vec<Sample>>,
    case: Case,
    sign: f64,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    let Some(base) = case.baseline().and_then(|b| samples.get(&b)) else {
        return Vec::new();
    };
    let Some(this) = samples.get(&case) else {
        return Vec::new();
    };
    base.iter()
        .zip(this)
        .filter_map(|(b, t)| Some(sign * (f(t)? / f(b)? - 1.0) * 100.0))
        .collect()
}

/// Paired costs of one case: (conn/s, p50, stream), each per round.
struct Costs {
    rate: Vec<f64>,
    p50: Vec<f64>,
    stream: Vec<f64>,
}

fn costs(samples: &BTreeMap<Case, Vec<Sample>>, case: Case) -> Costs {
    Costs {
        rate: paired(samples, case, -1.0, |s| Some(s.conn.rate())),
        p50: paired(samples, case, 1.0, |s| {
            Some(s.conn.percentile(0.5).as_secs_f64())
        }),
        stream: paired(samples, case, -1.0, |s| s.gbits),
    }
}

fn print_results(samples: &BTreeMap<Case, Vec<Sample>>, info: &RunInfo<'_>, config: &Config) {
    let c = info.cluster;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| case | rule prefixes | conn/s (median, min-max) | connect p50 / p99 µs | verdicts per conn | stream Gbit/s (median, min-max) | against | conn/s cost | p50 cost | stream cost |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    for (&case, runs) in samples {
        let rates: Vec<f64> = runs.iter().map(|s| s.conn.rate()).collect();
        let gbits: Vec<f64> = runs.iter().filter_map(|s| s.gbits).collect();
        let all = pooled(runs);
        let attempts: usize = runs
            .iter()
            .map(|s| WARMUP + s.conn.latencies.len() + s.conn.errors)
            .sum();
        let verdicts: u64 = runs.iter().map(|s| s.verdicts).sum();
        let prefixes = match (case, case.endpoint()) {
            (Case::Bare | Case::LbOnly, _) => "-".to_owned(),
            (_, Endpoint::Open) => "0".to_owned(),
            (_, Endpoint::One) => {
                let (i, e) = prefixes(&info.policies.one);
                thousands(i + e)
            }
            (_, Endpoint::Many) => {
                let (i, e) = prefixes(&info.policies.many);
                let node: usize = info
                    .policies
                    .node
                    .pods
                    .iter()
                    .map(|(_, ep)| {
                        let (i, e) = prefixes(ep);
                        i + e
                    })
                    .sum();
                format!("{} (node: {})", thousands(i + e), thousands(i + e + node))
            }
        };
        let (rlo, rhi) = min_max(&rates);
        let failed = if all.errors > 0 {
            format!(" ({} failed)", all.errors)
        } else {
            String::new()
        };
        let stream = if gbits.is_empty() {
            "-".to_owned()
        } else {
            let (glo, ghi) = min_max(&gbits);
            format!("{:.2} ({glo:.2}-{ghi:.2})", median_f(&gbits))
        };
        let cost = costs(samples, case);
        let cell = |v: &[f64]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                pct_range(v)
            }
        };
        let _ = writeln!(
            table,
            "| {} | {prefixes} | {:.0} ({rlo:.0}-{rhi:.0}){failed} | {} / {} | {:.2} | {stream} | {} | {} | {} | {} |",
            case.label(c.policies, c.identities),
            median_f(&rates),
            us(all.percentile(0.5)),
            us(all.percentile(0.99)),
            verdicts as f64 / attempts as f64,
            case.baseline().map_or("-", Case::short),
            cell(&cost.rate),
            cell(&cost.p50),
            cell(&cost.stream),
        );
    }

    let mut setup = String::new();
    let _ = writeln!(
        setup,
        "| policy set | selecting the client | ingress prefixes | egress prefixes | compile_endpoint | program (open → this; median / max) | map writes |"
    );
    let _ = writeln!(setup, "|---|---:|---:|---:|---:|---:|---:|");
    for (case, ep, compile, selecting) in [
        (Case::One, &info.policies.one, info.compile_one, 1),
        (
            Case::Many,
            &info.policies.many,
            info.compile_many,
            c.selecting_client,
        ),
    ] {
        let programs: Vec<(Duration, usize)> = samples
            .iter()
            .filter(|(k, _)| k.endpoint() == case.endpoint())
            .flat_map(|(_, v)| v.iter().filter_map(|s| s.applied.client))
            .collect();
        let times: Vec<Duration> = programs.iter().map(|p| p.0).collect();
        let max = times.iter().max().copied().unwrap_or_default();
        let (i, e) = prefixes(ep);
        let _ = writeln!(
            setup,
            "| {} | {selecting} | {} | {} | {} | {} / {} | {} |",
            case.label(c.policies, c.identities),
            thousands(i),
            thousands(e),
            dur(compile),
            dur(median(&times)),
            dur(max),
            programs.first().map_or(0, |p| p.1),
        );
    }

    {
        let node = &info.policies.node;
        let programs: Vec<(Duration, usize)> = samples
            .values()
            .flat_map(|v| v.iter().filter_map(|s| s.applied.node))
            .collect();
        let times: Vec<Duration> = programs.iter().map(|p| p.0).collect();
        let (i, e) = node.pods.iter().fold((0, 0), |(i, e), (_, ep)| {
            let (pi, pe) = prefixes(ep);
            (i + pi, e + pe)
        });
        let _ = writeln!(
            setup,
            "| the other {} pods of the client's node under (3) | - | {} | {} | {} in all (slowest pod {}) | {} / {} | {} |",
            node.pods.len(),
            thousands(i),
            thousands(e),
            dur(node.compile),
            dur(node.slowest),
            dur(median(&times)),
            dur(times.iter().max().copied().unwrap_or_default()),
            programs.first().map_or(0, |p| p.1),
        );
        let (ci, ce) = prefixes(&info.policies.many);
        let _ = writeln!(
            setup,
            "\nIn (3) the rule map holds {} prefixes for the node's {} pods, of the {} it has room for.",
            thousands(i + e + ci + ce),
            node.pods.len() + 1,
            thousands(MAX_RULE_PREFIXES as usize),
        );
    }

    let mut targets = String::new();
    for case in [Case::One, Case::Many, Case::OneUnread, Case::ManyUnread] {
        if !samples.contains_key(&case) {
            continue;
        }
        let cost = costs(samples, case);
        let (r, l) = (median_f(&cost.rate), median_f(&cost.p50));
        let g = if cost.stream.is_empty() {
            f64::NAN
        } else {
            median_f(&cost.stream)
        };
        let worst = [r, l, g]
            .into_iter()
            .filter(|x| !x.is_nan())
            .fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            targets,
            "- {} against {}: **{}** (median paired cost: conn/s {}, connect p50 {}, stream {})",
            case.label(c.policies, c.identities),
            case.baseline().map_or("-", Case::short),
            if worst <= 5.0 { "met" } else { "missed" },
            pct(r),
            pct(l),
            pct(g),
        );
    }

    println!("\n{table}\n{setup}\nTarget, at most 5% cost against no policy:\n{targets}");

    println!("----- 8< ----- docs/BENCHMARKS.md ----- 8< -----");
    println!(
        "## NetworkPolicy cost on the datapath (`benches/policy/policy_cost.rs`)\n\n\
         ```\n\
         cargo bench -p fairlead-agent --bench policy_cost   # root\n\
         ```\n\n\
         {}; {}.\n\n\
         `lb_scale`'s lab (`benches/lb/harness.rs`): client 10.244.0.2 ─ router ─ backend, the \
         router's client-facing veth playing the client pod's host veth with the agent's \
         programs on it (`lb_from_pod` judges the pod's egress, `lb_to_pod` its ingress), \
         enforcement on. The client connects to the server pod 10.244.128.1:8080 directly (no \
         Service). Cases: (0) no Fairlead program attached; (1) the client's endpoint programmed \
         open; (2) one NetworkPolicy selecting the client: egress to the server on 8080, ingress \
         isolated with nothing allowed (replies pass by the policy conntrack); (3) {} \
         NetworkPolicies over {} pods with distinct label sets in {NAMESPACES} namespaces \
         (per namespace: deny-all, DNS egress, monitoring scrapes by named port, same-namespace \
         ingress, one policy per tier with namespace, pod, combined and ipBlock-with-except peers, \
         named ports and an endPort range, per-app ingress from a neighbour and from another \
         team's namespaces); {} of them select the client, and the other {} pods of the client's \
         node (100 pods a node) are programmed too, so the rule trie holds the whole node's \
         rules. Diagnostics: (0a) programs attached, \
         enforcement off; (1a)-(3a) as (1)-(3) with the flow-event reader paused (no wake-ups). \
         Endpoint policies compiled by the agent's `compile_endpoint` from a \
         `fairlead_core::Snapshot` and programmed with `Lb::set_endpoint_policy`. Per case and \
         round ({} rounds, the order rotating): the policy conntrack emptied, then connections \
         for {:.1} s, each from its own source port (bound in sequence, so no 4-tuple repeats \
         and every connection is judged by the rules, as \"verdicts per conn\" shows: flow \
         events drained by a reader thread as the agent drains them, plus any lost), connect \
         timed, closed with an RST; then one TCP stream for {:.1} s. Latency percentiles pool \
         all rounds; costs are paired with the baseline in the same round, median (min to max) \
         over rounds; positive is worse.\n",
        info.machine,
        config.reader.describe(),
        thousands(c.policies),
        thousands(c.identities),
        c.selecting_client,
        c.neighbours.len(),
        config.rounds,
        config.secs.as_secs_f64(),
        config.stream_secs.as_secs_f64(),
    );
    println!("{table}\n{setup}\nTarget, at most 5% cost against no policy:\n{targets}");
    println!("----- 8< -----");
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cores} cores, kernel {}", kernel.trim())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
