//! NodeNetwork on a real topology: pods on different nodes reach each other over IPv4 and
//! IPv6 in native and VXLAN mode, and the routes follow nodes leaving, rejoining, agent
//! restarts and mode switches.

use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use fairlead_agent::routes::{ApplyReport, NodeNetwork, RoutingMode, VXLAN_IFNAME};
use fairlead_agent::{NetnsError, NodeNetworkError, RootNetns};

use crate::topology::{Cluster, TestNode};

async fn open(node: &TestNode, mode: RoutingMode) -> NodeNetwork {
    NodeNetwork::new(&node.ns.path(), "eth0", mode, RootNetns::Refuse)
        .await
        .unwrap_or_else(|e| panic!("opening {}: {e}", node.name))
}

/// Each node at `members` applies with the others at `members` as peers.
async fn apply(cluster: &Cluster, nets: &mut [NodeNetwork], members: &[usize]) -> Vec<ApplyReport> {
    let peers = cluster.objects(members);
    let mut reports = Vec::new();
    for &i in members {
        let report = nets[i]
            .apply(&cluster.nodes[i].node, &peers)
            .await
            .unwrap_or_else(|e| panic!("apply on {}: {e}", cluster.nodes[i].name));
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        reports.push(report);
    }
    reports
}

fn unchanged(report: &ApplyReport) -> bool {
    report.set == 0 && report.removed == 0 && !report.created_vxlan
}

/// Entries one peer costs a node: two routes, plus in VXLAN two neighbours and an FDB entry.
fn per_peer(mode: RoutingMode) -> usize {
    match mode {
        RoutingMode::Native => 2,
        RoutingMode::Vxlan { .. } => 5,
    }
}

async fn joins_leaves_restarts(mode: RoutingMode) {
    let cluster = Cluster::new(3, 2).expect("topology");
    let node3_pod = IpAddr::V4(cluster.nodes[2].pods[0].ipv4);
    assert!(
        !cluster.nodes[0].pods[0].reaches_once(node3_pod).unwrap(),
        "pods must not reach other nodes before any routes exist"
    );

    let mut nets = Vec::new();
    for node in &cluster.nodes {
        nets.push(open(node, mode).await);
    }
    let started = Instant::now();
    let reports = apply(&cluster, &mut nets, &[0, 1, 2]).await;
    eprintln!(
        "{mode:?}: first apply on 3 nodes took {:?}",
        started.elapsed()
    );
    assert!(
        reports.iter().all(|r| r.set == 2 * per_peer(mode)),
        "{reports:?}"
    );
    for node in &cluster.nodes {
        assert_eq!(node.sysctl("net.ipv4.ip_forward"), "1", "{}", node.name);
        assert_eq!(
            node.sysctl("net.ipv6.conf.all.forwarding"),
            "1",
            "{}",
            node.name
        );
    }
    cluster.assert_mesh(&[0, 1, 2], "all three nodes");

    // Idempotent: nothing to do the second time.
    let reports = apply(&cluster, &mut nets, &[0, 1, 2]).await;
    assert!(reports.iter().all(unchanged), "{reports:?}");

    // node-3 leaves: the others drop everything that pointed at it.
    let reports = apply(&cluster, &mut nets, &[0, 1]).await;
    assert!(
        reports
            .iter()
            .all(|r| r.removed == per_peer(mode) && r.set == 0),
        "{reports:?}"
    );
    for node in &cluster.nodes[..2] {
        let routes = node.fairlead_routes();
        assert!(
            !routes.contains("10.244.3.0/24") && !routes.contains("fd00:10:244:3::/64"),
            "{} still routes to node-3:\n{routes}",
            node.name
        );
        assert!(
            routes.contains("10.244.") && routes.contains("fd00:10:244:"),
            "{routes}"
        );
        if let RoutingMode::Vxlan { .. } = mode {
            let neighbours = node.vxlan_neighbours();
            assert!(!neighbours.contains("10.244.3.0"), "{neighbours}");
            assert!(!neighbours.contains("fd00:10:244:3::"), "{neighbours}");
            let fdb = node.vxlan_fdb();
            assert!(!fdb.contains("02:fa:ac:1e:00:0d"), "{fdb}");
            assert!(
                fdb.contains("02:fa:ac:1e:00:0") && fdb.contains("dst 172.30.0.1"),
                "{fdb}"
            );
        }
    }
    cluster.assert_mesh(&[0, 1], "after node-3 left");
    assert!(
        !cluster.nodes[0].pods[0].reaches_once(node3_pod).unwrap(),
        "node-1's pods still reach node-3 after it left"
    );

    // node-1's agent restarts while node-3 rejoins: the new instance reads back what the old
    // one installed and adds exactly node-3's entries.
    drop(nets.remove(0));
    nets.insert(0, open(&cluster.nodes[0], mode).await);
    let reports = apply(&cluster, &mut nets, &[0, 1, 2]).await;
    assert_eq!(
        reports[0].set,
        per_peer(mode),
        "restarted node-1: {:?}",
        reports[0]
    );
    assert_eq!(reports[0].removed, 0, "restarted node-1: {:?}", reports[0]);
    assert!(
        !reports[0].created_vxlan,
        "a matching {VXLAN_IFNAME} is kept"
    );
    cluster.assert_mesh(&[0, 1, 2], "after node-3 rejoined");

    // Another restart with nothing changed: nothing is touched at all.
    for (i, node) in cluster.nodes.iter().enumerate() {
        nets[i] = open(node, mode).await;
    }
    let reports = apply(&cluster, &mut nets, &[0, 1, 2]).await;
    assert!(
        reports.iter().all(unchanged),
        "after a restart: {reports:?}"
    );
    cluster.assert_mesh(&[0, 1, 2], "after every agent restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_routing_follows_joins_leaves_and_restarts() {
    joins_leaves_restarts(RoutingMode::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_routing_follows_joins_leaves_and_restarts() {
    joins_leaves_restarts(RoutingMode::vxlan()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_device_and_mtu_are_as_designed() {
    let cluster = Cluster::new(2, 1).expect("topology");
    let mode = RoutingMode::Vxlan { vni: 7, port: 4789 };
    let mut nets = vec![
        open(&cluster.nodes[0], mode).await,
        open(&cluster.nodes[1], mode).await,
    ];
    apply(&cluster, &mut nets, &[0, 1]).await;

    let link = cluster.nodes[0].ip(&["-d", "link", "show", VXLAN_IFNAME]);
    for expected in [
        "mtu 1450",
        "link/ether 02:fa:ac:1e:00:0b",
        "vxlan id 7",
        "local 172.30.0.11",
        "dev eth0",
        "dstport 4789",
        "nolearning",
    ] {
        assert!(
            link.contains(expected),
            "{expected:?} missing from:\n{link}"
        );
    }
    let addrs = cluster.nodes[0].ip(&["addr", "show", "dev", VXLAN_IFNAME]);
    assert!(
        addrs.contains("10.244.1.0/32") && addrs.contains("fd00:10:244:1::/128"),
        "{addrs}"
    );
    let routes = cluster.nodes[0].fairlead_routes();
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 dev fl.vxlan")
            && routes.contains("fd00:10:244:2::/64 via fd00:10:244:2:: dev fl.vxlan"),
        "{routes}"
    );

    // Pods get the MTU the network reports; a full-size packet with DF crosses the overlay
    // (an MTU too large would need fragmenting, which DF forbids, and the ping would fail).
    let mtu = nets[0].pod_mtu().await.unwrap();
    assert_eq!(mtu, 1450);
    for node in &cluster.nodes {
        node.set_pod_mtu(mtu).unwrap();
    }
    let (from, to) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
    let v4_payload = (mtu - 28).to_string(); // IPv4 20 + ICMP 8
    let v6_payload = (mtu - 48).to_string(); // IPv6 40 + ICMPv6 8
    assert!(from
        .ping_with(IpAddr::V4(to.ipv4), &["-s", &v4_payload, "-M", "do"])
        .unwrap());
    assert!(from
        .ping_with(IpAddr::V6(to.ipv6), &["-s", &v6_payload, "-M", "do"])
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_modes_replaces_routes_and_removes_the_device() {
    let cluster = Cluster::new(2, 1).expect("topology");
    for (mode, device_expected) in [
        (RoutingMode::Native, false),
        (RoutingMode::vxlan(), true),
        (RoutingMode::Native, false),
    ] {
        // A fresh NodeNetwork each time, as after an agent restart with a new config.
        let mut nets = vec![
            open(&cluster.nodes[0], mode).await,
            open(&cluster.nodes[1], mode).await,
        ];
        apply(&cluster, &mut nets, &[0, 1]).await;
        for node in &cluster.nodes {
            let device = node.ns.ip(&["link", "show", VXLAN_IFNAME]).is_ok();
            assert_eq!(device, device_expected, "{mode:?} on {}", node.name);
            let routes = node.fairlead_routes();
            assert_eq!(routes.lines().count(), 2, "{mode:?}: {routes}");
            assert_eq!(
                routes.contains("fl.vxlan"),
                device_expected,
                "{mode:?}: {routes}"
            );
        }
        cluster.assert_mesh(&[0, 1], &format!("{mode:?}"));
    }
}

#[tokio::test]
async fn refuses_the_root_namespace() {
    // The test process runs in the root namespace (as CI does); refusing happens on open,
    // before any socket exists, so this cannot change anything.
    let err = NodeNetwork::new(
        Path::new("/proc/self/ns/net"),
        "eth0",
        RoutingMode::Native,
        RootNetns::Refuse,
    )
    .await
    .err()
    .expect("the root namespace must be refused");
    assert!(
        matches!(err, NodeNetworkError::Netns(NetnsError::Root { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("FAIRLEAD_AGENT_ALLOW_ROOT_NETNS"),
        "{err}"
    );
}
