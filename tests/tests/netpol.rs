//! NetworkPolicy end to end, modelled on the upstream Kubernetes network-policy e2e suite
//! (test/e2e/network/netpol): namespaces x, y and z with pods a, b and c each, spread over
//! two sandbox nodes, every pod serving ports 80 and 81 over TCP and UDP; each case applies
//! policies, probes every (client, server, port, protocol) and compares the whole truth
//! table with the expected one, printing both when they differ. As upstream, a pod may
//! always reach itself (that traffic never leaves the pod).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use futures::FutureExt;

use fairlead_sandbox::cluster::Sandbox;
use fairlead_sandbox::{kubelet, netns, topology::Topology};

mod common;
use common::{apply, with_sandbox};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Proto {
    Tcp,
    Udp,
}

type Pod = (&'static str, &'static str);
type Probe = (Pod, Pod, u16, Proto);

fn all_pods() -> Vec<Pod> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| (*ns, *p)))
        .collect()
}

fn manifest() -> String {
    let mut m = String::new();
    for ns in NAMESPACES {
        m += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n");
    }
    for (ns, pod) in all_pods() {
        // a and c on node-1, b on node-2: same-node and cross-node pairs in every case.
        let node = if pod == "b" { "node-2" } else { "node-1" };
        m += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: fairlead/echo\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\n"
        );
    }
    m
}

/// One probe from inside the client pod: TCP connect and read the server's name, or a UDP
/// datagram and its echo, within half a second.
fn probe(prefix: &str, from: Pod, to_ip: IpAddr, to: Pod, port: u16, proto: Proto) -> bool {
    let ns = kubelet::pod_netns(prefix, from.0, from.1);
    let addr = SocketAddr::new(to_ip, port);
    let limit = Duration::from_millis(500);
    netns::run_in(&ns, move || match proto {
        Proto::Tcp => {
            let Ok(s) = TcpStream::connect_timeout(&addr, limit) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(limit));
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.trim() == to.1
        }
        Proto::Udp => {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                return false;
            };
            let _ = s.set_read_timeout(Some(limit));
            let mut buf = [0u8; 128];
            s.connect(addr).is_ok()
                && s.send(b"probe").is_ok()
                && s.recv(&mut buf)
                    .is_ok_and(|n| buf[..n].starts_with(format!("{}: ", to.1).as_bytes()))
        }
    })
    .unwrap_or(false)
}

/// Every probe, in parallel (one thread per client/server pair).
fn probe_all(prefix: &str, ips: &BTreeMap<Pod, IpAddr>) -> BTreeMap<Probe, bool> {
    let pods = all_pods();
    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .flat_map(|from| pods.iter().map(move |to| (*from, *to)))
            .map(|(from, to)| {
                let ip = ips[&to];
                s.spawn(move || {
                    let mut out = Vec::new();
                    for port in PORTS {
                        for proto in [Proto::Tcp, Proto::Udp] {
                            let ok = probe(prefix, from, ip, to, port, proto);
                            out.push(((from, to, port, proto), ok));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread"))
            .collect()
    })
}

/// The upstream suite's truth table print: one grid per port and protocol.
fn table(result: &BTreeMap<Probe, bool>, expected: &BTreeMap<Probe, bool>) -> String {
    let pods = all_pods();
    let name = |p: Pod| format!("{}/{}", p.0, p.1);
    let mut out = String::new();
    for port in PORTS {
        for proto in [Proto::Tcp, Proto::Udp] {
            out += &format!("\n{port}/{proto:?} (rows: client, columns: server; . allowed, X denied, ! wrong)\n      ");
            for to in &pods {
                out += &format!("{:>5}", name(*to));
            }
            out.push('\n');
            for from in &pods {
                out += &format!("{:>5} ", name(*from));
                for to in &pods {
                    let k = (*from, *to, port, proto);
                    let cell = match (result[&k], expected[&k]) {
                        (true, true) => ".",
                        (false, false) => "X",
                        _ => "!",
                    };
                    out += &format!("{cell:>5}");
                }
                out.push('\n');
            }
        }
    }
    out
}

/// The expectation of one case: `allow(from, to, port, proto)`; self always allowed.
fn expect(allow: impl Fn(Pod, Pod, u16, Proto) -> bool) -> BTreeMap<Probe, bool> {
    let pods = all_pods();
    let mut m = BTreeMap::new();
    for from in &pods {
        for to in &pods {
            for port in PORTS {
                for proto in [Proto::Tcp, Proto::Udp] {
                    m.insert(
                        (*from, *to, port, proto),
                        from == to || allow(*from, *to, port, proto),
                    );
                }
            }
        }
    }
    m
}

/// Probes until the table matches (policies take effect asynchronously), at most 10 s.
fn check(case: &str, prefix: &str, ips: &BTreeMap<Pod, IpAddr>, want: &BTreeMap<Probe, bool>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe_all(prefix, ips);
        if &got == want {
            return;
        }
        if Instant::now() > deadline {
            let wrong = got.iter().filter(|(k, v)| want[*k] != **v).count();
            panic!(
                "case {case:?}: {wrong} probes differ from the expected truth table:{}",
                table(&got, want)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every line the agents of both nodes answer to `request` on their sockets.
async fn agent_lines(sandbox: &Sandbox, request: &str) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut out = Vec::new();
    for node in ["node-1", "node-2"] {
        let path = Sandbox::agent_socket(&sandbox.config.state_dir, node);
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = tokio::io::BufReader::new(s).lines();
        while let Some(l) = lines.next_line().await.unwrap() {
            out.push(l);
        }
    }
    out
}

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

async fn delete_policies(sandbox: &Sandbox, ns: &str) {
    let api: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(sandbox.client.clone(), ns);
    for p in api.list(&Default::default()).await.unwrap().items {
        let name = p.metadata.name.unwrap_or_default();
        api.delete(&name, &Default::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_truth_tables() {
    with_sandbox("np", |sandbox, name| {
        async move { cases(sandbox, name).await }.boxed()
    })
    .await;
}

async fn cases(sandbox: &Sandbox, name: &str) {
    apply(sandbox, "pods", &manifest()).await;
    sandbox
        .wait_for_pods(10, Duration::from_secs(60))
        .await
        .expect("pods running");
    let snap = sandbox.snapshot();
    let ips: BTreeMap<Pod, IpAddr> = all_pods()
        .into_iter()
        .map(|(ns, pod)| {
            let p = snap.pod(ns, pod).expect("pod");
            (
                (ns, pod),
                *p.ips.iter().find(|ip| ip.is_ipv4()).expect("IPv4"),
            )
        })
        .collect();
    let prefix = Topology::prefix(name);
    let p = prefix.as_str();
    let x_a: Pod = ("x", "a");

    check(
        "no policy: all allowed",
        p,
        &ips,
        &expect(|_, _, _, _| true),
    );

    apply(
        sandbox,
        "deny-all-x",
        &policy(
            "deny-all",
            "x",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    )
    .await;
    check(
        "deny all ingress in x",
        p,
        &ips,
        &expect(|_, to, _, _| to.0 != "x"),
    );
    // The drops are visible: as flow events naming both pods and the reason, and as a
    // counter per reason.
    let flows = agent_lines(sandbox, "FLOWS").await;
    let dropped = flows.iter().any(|l| {
        let f: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        f["verdict"] == "DROPPED"
            && f["reason"] == "policy_denied_ingress"
            && f["direction"] == "ingress"
            && f["pod"]["name"] == "x/a"
            && f["peer"]["name"] == "y/b"
    });
    assert!(
        dropped,
        "no drop event y/b -> x/a among {} flows",
        flows.len()
    );
    let forwarded_by_policy = flows
        .iter()
        .any(|l| l.contains("\"verdict\":\"FORWARDED\""));
    assert!(forwarded_by_policy, "allowed connections are reported too");
    let metrics = agent_lines(sandbox, "METRICS").await;
    let denied: u64 = metrics
        .iter()
        .filter(|l| l.contains("event=\"policy_denied_ingress\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(denied > 0, "policy_denied_ingress counted: {metrics:?}");
    delete_policies(sandbox, "x").await;

    apply(
        sandbox,
        "from-ns-y",
        &policy(
            "from-y",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
    )
    .await;
    check(
        "allow x/a from namespace y",
        p,
        &ips,
        &expect(|from, to, _, _| to != x_a || from.0 == "y"),
    );
    delete_policies(sandbox, "x").await;

    apply(
        sandbox,
        "from-y-b",
        &policy(
            "from-y-b",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n",
        ),
    )
    .await;
    check(
        "allow x/a from pod b in namespace y",
        p,
        &ips,
        &expect(|from, to, _, _| to != x_a || from == ("y", "b")),
    );
    delete_policies(sandbox, "x").await;

    apply(
        sandbox,
        "named-port",
        &policy(
            "named-81",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: serve-81-tcp, protocol: TCP}\n",
        ),
    )
    .await;
    check(
        "allow x/a only on named port serve-81-tcp",
        p,
        &ips,
        &expect(|_, to, port, proto| to != x_a || (port == 81 && proto == Proto::Tcp)),
    );
    delete_policies(sandbox, "x").await;

    apply(
        sandbox,
        "end-port",
        &policy(
            "range",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: z}}\n    ports:\n    - {port: 80, endPort: 81, protocol: UDP}\n",
        ),
    )
    .await;
    check(
        "allow x/a from namespace z on UDP 80-81 (endPort)",
        p,
        &ips,
        &expect(|from, to, _, proto| to != x_a || (from.0 == "z" && proto == Proto::Udp)),
    );
    delete_policies(sandbox, "x").await;

    let y_b = ips[&("y", "b")];
    apply(
        sandbox,
        "egress-except",
        &policy(
            "egress-except",
            "x",
            &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.244.0.0/16, except: [{y_b}/32]}}\n"),
        ),
    )
    .await;
    check(
        "x/a egress to the pod CIDR except y/b",
        p,
        &ips,
        &expect(|from, to, _, _| from != x_a || to != ("y", "b")),
    );
    delete_policies(sandbox, "x").await;

    apply(
        sandbox,
        "combined",
        &format!(
            "{}{}",
            policy(
                "from-x-b",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n",
            ),
            policy(
                "from-z",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: z}}\n",
            )
        ),
    )
    .await;
    check(
        "two policies on x/a: their union",
        p,
        &ips,
        &expect(|from, to, _, _| to != x_a || from == ("x", "b") || from.0 == "z"),
    );
    let api: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(sandbox.client.clone(), "x");
    api.delete("from-z", &Default::default()).await.unwrap();
    check(
        "one of the two deleted",
        p,
        &ips,
        &expect(|from, to, _, _| to != x_a || from == ("x", "b")),
    );
    delete_policies(sandbox, "x").await;
    check(
        "all deleted: all allowed again",
        p,
        &ips,
        &expect(|_, _, _, _| true),
    );
}
