//! The whole agent on two node namespaces, fed snapshots as the watcher would feed it: it
//! reports NOTREADY until its Node has podCIDRs, then installs the CNI plugin and config,
//! routes, and reports READY; routes follow Nodes leaving and coming back; shutdown removes
//! the config when asked to.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fairlead_agent::cni_install::{Conflist, CONFLIST_NAME, PLUGIN_NAME};
use fairlead_agent::status::query;
use fairlead_agent::{Agent, AgentConfig, RoutingMode};
use fairlead_core::{Node, Snapshot};
use tokio::sync::{oneshot, watch};

use crate::topology::{wait_until, Cluster, TempDir};

fn snapshot(nodes: &[Node]) -> Arc<Snapshot> {
    let mut builder = Snapshot::builder();
    for node in nodes {
        builder = builder.node(node.clone());
    }
    Arc::new(builder.build())
}

async fn wait_for_answer(socket: &Path, want: impl Fn(&str) -> bool, what: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(answer) = query(socket).await {
            if want(&answer) {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last answer: {answer}"
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_install_route_and_report_ready() {
    let cluster = Cluster::new(2, 1).expect("topology");
    let dir = TempDir::new("agent");
    let plugin = dir.0.join("fairlead-cni-build");
    std::fs::write(&plugin, b"#!/bin/sh\nexit 0\n").unwrap();

    let nodes = cluster.objects(&[0, 1]);
    let mut without_cidrs = nodes[0].clone();
    without_cidrs.pod_cidrs.clear();
    // The first snapshot: node-1 has no podCIDRs yet.
    let (snapshots, rx) = watch::channel(snapshot(&[without_cidrs, nodes[1].clone()]));

    let mut agents = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let root = dir.0.join(&node.name);
        let mut config = AgentConfig::new(node.name.clone(), node.ns.path());
        config.mode = RoutingMode::vxlan();
        config.cni_plugin = plugin.clone();
        config.cni_bin_dir = root.join("opt/cni/bin");
        config.cni_conf_dir = root.join("etc/cni/net.d");
        config.ipam_data_dir = root.join("var/lib/fairlead/ipam");
        config.socket = root.join("run/fairlead/agent.sock");
        config.uninstall_cni_on_shutdown = i == 0;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(Agent::run(config.clone(), rx.clone(), async move {
            let _ = stopped.await;
        }));
        agents.push((config, stop, task));
    }

    let (c1, c2) = (&agents[0].0, &agents[1].0);
    let answer = wait_for_answer(&c1.socket, |a| a.contains("podCIDRs"), "node-1 NOTREADY").await;
    assert_eq!(answer, "NOTREADY node node-1 has no podCIDRs yet");
    assert!(
        !c1.cni_conf_dir.join(CONFLIST_NAME).exists(),
        "no config without podCIDRs"
    );
    wait_for_answer(&c2.socket, |a| a == "READY", "node-2 READY").await;

    // node-1 gets its podCIDRs.
    snapshots.send_replace(snapshot(&nodes));
    wait_for_answer(&c1.socket, |a| a == "READY", "node-1 READY").await;
    for (config, node) in [(c1, &nodes[0]), (c2, &nodes[1])] {
        let written: Conflist = serde_json::from_str(
            &std::fs::read_to_string(config.cni_conf_dir.join(CONFLIST_NAME)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            written,
            Conflist::for_node(node, 1450, &config.socket, &config.ipam_data_dir).unwrap()
        );
        assert_eq!(
            std::fs::read(config.cni_bin_dir.join(PLUGIN_NAME)).unwrap(),
            b"#!/bin/sh\nexit 0\n"
        );
    }
    tokio::task::block_in_place(|| cluster.assert_mesh(&[0, 1], "agents running"));

    // node-2 leaves the cluster: node-1 drops its routes; node-2's agent reports why it waits.
    snapshots.send_replace(snapshot(&nodes[..1]));
    tokio::task::block_in_place(|| {
        wait_until(
            "node-1 drops its routes to node-2",
            Duration::from_secs(10),
            || !cluster.nodes[0].fairlead_routes().contains("10.244.2.0/24"),
        )
    });
    wait_for_answer(
        &c2.socket,
        |a| a.contains("not in the cluster"),
        "node-2 NOTREADY",
    )
    .await;

    // And comes back.
    snapshots.send_replace(snapshot(&nodes));
    wait_for_answer(&c2.socket, |a| a == "READY", "node-2 READY again").await;
    tokio::task::block_in_place(|| {
        wait_until(
            "node-1 routes to node-2 again",
            Duration::from_secs(10),
            || cluster.nodes[0].fairlead_routes().contains("10.244.2.0/24"),
        )
    });
    tokio::task::block_in_place(|| cluster.assert_mesh(&[0, 1], "node-2 back"));

    // Shutdown: node-1 was told to uninstall its config, node-2 keeps its config.
    for (config, stop, task) in agents {
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the agent stops")
            .unwrap()
            .expect("the agent ends without error");
        assert_eq!(
            config.cni_conf_dir.join(CONFLIST_NAME).exists(),
            !config.uninstall_cni_on_shutdown
        );
        assert!(config.cni_bin_dir.join(PLUGIN_NAME).exists());
        assert!(!config.socket.exists(), "socket removed on shutdown");
    }
}
