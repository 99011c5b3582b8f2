//! The sandbox end to end: two nodes (network namespaces on an underlay), an
//! agent per node, pods scheduled across both and wired by the real
//! `fairlead-cni` binary, and every pod reaching every other pod's workload
//! over IPv4 and IPv6, with native routing and with VXLAN.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use futures::FutureExt;

mod common;
use common::cni_plugin;

use fairlead_sandbox::cluster::{RoutingMode, Sandbox, SandboxConfig};
use fairlead_sandbox::{kubelet, netns, topology::Topology, workload};

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports:
  - {name: tcp, port: 5000, targetPort: tcp-echo}
  - {name: udp, port: 5001, protocol: UDP}
"#;

fn pod(name: &str, node: Option<&str>) -> String {
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {{app: echo}}}}\nspec:\n{node}  containers: [{{name: echo, image: fairlead/echo, ports: [{{name: tcp-echo, containerPort: 5000}}]}}]\n")
}

/// Connects from inside `from_ns` to the TCP echo at `ip` and returns the
/// pod name it announces.
fn who_answers(from_ns: &str, ip: IpAddr) -> Result<String, String> {
    netns::run_in(from_ns, move || -> Result<String, String> {
        let addr = SocketAddr::new(ip, workload::TCP_ECHO_PORT);
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("read {addr}: {e}"))?;
        Ok(line.trim().to_string())
    })
    .map_err(|e| e.to_string())?
}

async fn pods_reach_each_other(name: &str, routing: RoutingMode) {
    sweep_stale();
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the sandbox test needs root (network namespaces)"
    );
    let state_dir = std::env::temp_dir().join(format!("fairlead-sbtest-{name}"));
    let sandbox = Sandbox::up(SandboxConfig {
        name: name.into(),
        nodes: 2,
        routing,
        state_dir: state_dir.clone(),
        cni_plugin: cni_plugin(),
        proxy: common::proxy_binary(),
        mesh_cert_ttl: None,
        maglev: false,
    })
    .await
    .expect("sandbox up");
    let result = std::panic::AssertUnwindSafe(async {
        let dir = state_dir.join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        // Two pods pinned to nodes, two left to the scheduler.
        let manifest = format!(
            "{PODS}{}{}{}{}",
            pod("a", Some("node-1")),
            pod("b", Some("node-2")),
            pod("c", None),
            pod("d", None)
        );
        std::fs::write(dir.join("app.yaml"), manifest).unwrap();
        for (what, r) in sandbox.apply(&dir).unwrap() {
            r.unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        // The sandbox's own DNS pod (kube-system) runs too; this test is about `app`.
        let pods: Vec<_> = sandbox
            .wait_for_pods(5, Duration::from_secs(60))
            .await
            .expect("pods running")
            .into_iter()
            .filter(|p| p.namespace == "app")
            .collect();
        assert_eq!(pods.len(), 4);
        let nodes: std::collections::BTreeSet<_> =
            pods.iter().filter_map(|p| p.node.clone()).collect();
        assert_eq!(nodes.len(), 2, "pods run on both nodes: {pods:?}");

        let prefix = Topology::prefix(name);
        let mut failures = Vec::new();
        let mut checked = 0;
        for from in &pods {
            let from_ns = kubelet::pod_netns(&prefix, &from.namespace, &from.name);
            for to in &pods {
                if to.name == from.name {
                    continue;
                }
                for ip in &to.ips {
                    let ip: IpAddr = ip.parse().unwrap();
                    checked += 1;
                    match who_answers(&from_ns, ip) {
                        Ok(who) if who == to.name => {}
                        Ok(who) => failures.push(format!(
                            "{} -> {} ({ip}): answered by {who}",
                            from.name, to.name
                        )),
                        Err(e) => {
                            failures.push(format!("{} -> {} ({ip}): {e}", from.name, to.name))
                        }
                    }
                }
            }
        }
        assert_eq!(
            checked,
            4 * 3 * 2,
            "every pod has an IPv4 and an IPv6 address: {pods:?}"
        );
        assert!(failures.is_empty(), "unreachable:\n{}", failures.join("\n"));

        // The EndpointSlice controller published both families with all four pods.
        let snap = sandbox.snapshot();
        let slices: Vec<_> = snap
            .endpoint_slices_of(&fairlead_core::ObjectKey::new("app", "echo"))
            .collect();
        assert_eq!(slices.len(), 2, "{slices:?}");
        for s in &slices {
            assert_eq!(s.endpoints.len(), 4, "{s:?}");
            assert!(s.endpoints.iter().all(|e| e.conditions.ready));
            assert!(
                s.ports.iter().any(|p| p.port == Some(5000)),
                "named targetPort resolved: {:?}",
                s.ports
            );
        }
    })
    .catch_unwind()
    .await;
    let prefix = Topology::prefix(name);
    sandbox.down().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    assert!(
        netns::list(&prefix).is_empty(),
        "sandbox down removes every namespace"
    );
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Removes what a killed run of this test left: sandboxes `tn<pid>`/`tv<pid>`
/// whose process is gone.
fn sweep_stale() {
    for ns in netns::list("fl-t") {
        let Some(rest) = ns
            .strip_prefix("fl-tn")
            .or_else(|| ns.strip_prefix("fl-tv"))
        else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = netns::delete(&ns);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_native() {
    pods_reach_each_other(&format!("tn{}", std::process::id()), RoutingMode::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_vxlan() {
    pods_reach_each_other(&format!("tv{}", std::process::id()), RoutingMode::vxlan()).await;
}
