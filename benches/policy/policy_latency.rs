//! How long a NetworkPolicy change takes to reach the wire: from the API write (create or
//! delete of a deny-all ingress policy) to the first probe whose verdict is the new one.
//!
//! A two-node sandbox; a client pod on node-1 probes a server pod on node-2 with a new UDP
//! flow every ~1 ms (a fresh socket each time, so every probe is judged by the policy, not
//! waved through as an established flow); a change counts as applied at the first of three
//! consecutive probes with the new verdict. 20 changes each way.
//!
//! `cargo bench -p fairlead-sandbox --bench policy_latency` (root; builds on the debug
//! `fairlead-cni`: run `cargo build -p fairlead-cni` first).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fairlead_sandbox::cluster::{RoutingMode, Sandbox, SandboxConfig};
use fairlead_sandbox::{kubelet, netns, topology::Topology};

const CHANGES: usize = 40;
const PROBE_TIMEOUT: Duration = Duration::from_millis(2);

fn cni_plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .expect("running from target/")
        .to_owned();
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("fairlead-cni");
        if p.is_file() {
            return p;
        }
    }
    panic!("fairlead-cni is not built: run `cargo build -p fairlead-cni` first");
}

/// One probe: a fresh UDP socket, one datagram, an echo within the timeout.
fn probe(sock_ns: &str, server: SocketAddr) -> bool {
    netns::run_in(sock_ns, move || {
        let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let mut buf = [0u8; 64];
        s.connect(server).is_ok() && s.send(b"p").is_ok() && s.recv(&mut buf).is_ok()
    })
    .unwrap_or(false)
}

/// Time from `start` to the first of three consecutive probes answering `want`; None after
/// 5 s.
fn until(ns: &str, server: SocketAddr, want: bool, start: Instant) -> Option<Duration> {
    let mut run: Option<Duration> = None;
    let mut streak = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let at = start.elapsed();
        if probe(ns, server) == want {
            run.get_or_insert(at);
            streak += 1;
            if streak == 3 {
                return run;
            }
        } else {
            run = None;
            streak = 0;
        }
    }
    None
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (the sandbox makes namespaces)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let name = format!("pl{}", std::process::id());
    let state_dir = std::env::temp_dir().join(format!("fairlead-plbench-{name}"));
    let sandbox = Sandbox::up(SandboxConfig {
        name: name.clone(),
        nodes: 2,
        routing: RoutingMode::vxlan(),
        state_dir: state_dir.clone(),
        cni_plugin: cni_plugin(),
        // No meshed pod here: the proxy is never started.
        proxy: cni_plugin().with_file_name("fairlead-proxy"),
        mesh_cert_ttl: None,
        maglev: false,
    })
    .await
    .expect("sandbox up");
    let result = measure(&sandbox, &name).await;
    sandbox.down().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    let (apply, remove) = result.expect("measurement");
    let mut all: Vec<Duration> = apply.iter().chain(&remove).copied().collect();
    all.sort();
    let show = |label: &str, v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        println!(
            "{label:<28} n={:<3} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
            v.len(),
            percentile(&v, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.99).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    };
    println!("\nNetworkPolicy change -> verdict on the wire (API write to the first of three probes with the new verdict):");
    show("deny-all created (-> drop)", &apply);
    show("deny-all deleted (-> allow)", &remove);
    show("all changes", &all);
}

async fn measure(sandbox: &Sandbox, name: &str) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let dir = sandbox.config.state_dir.join("manifests/pods");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("pods.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench}\nspec:\n  nodeName: node-1\n  containers: [{name: c, image: fairlead/echo}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\nspec:\n  nodeName: node-2\n  containers: [{name: c, image: fairlead/echo}]\n",
    )?;
    for (what, r) in sandbox.apply(&dir)? {
        r.map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    sandbox.wait_for_pods(3, Duration::from_secs(60)).await?;
    let snap = sandbox.snapshot();
    let server_ip = *snap
        .pod("bench", "server")
        .and_then(|p| p.ips.iter().find(|i| i.is_ipv4()))
        .ok_or_else(|| anyhow::anyhow!("server has no IPv4"))?;
    let server = SocketAddr::new(server_ip, fairlead_sandbox::workload::UDP_ECHO_PORT);
    let ns = kubelet::pod_netns(&Topology::prefix(name), "bench", "client");
    anyhow::ensure!(
        until(&ns, server, true, Instant::now()).is_some(),
        "the server never answered"
    );

    let api: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(sandbox.client.clone(), "bench");
    let deny: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "deny", "namespace": "bench"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
        }))?;
    let (mut apply, mut remove) = (Vec::new(), Vec::new());
    for i in 0..CHANGES {
        let creating = i % 2 == 0;
        let start = Instant::now();
        if creating {
            api.create(&Default::default(), &deny).await?;
        } else {
            api.delete("deny", &Default::default()).await?;
        }
        let (ns, server) = (ns.clone(), server);
        let took = tokio::task::spawn_blocking(move || until(&ns, server, !creating, start))
            .await?
            .ok_or_else(|| anyhow::anyhow!("change {i} not seen on the wire within 5 s"))?;
        if creating {
            apply.push(took);
        } else {
            remove.push(took);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((apply, remove))
}
