//! A small cluster made of network namespaces, for routing tests:
//!
//! ```text
//!   underlay ns: br0 ─┬─ n1 ══ eth0 (node-1 ns: 172.30.0.11/24, fd00:172:30::11/64) ── pods
//!                     ├─ n2 ══ eth0 (node-2 ns: 172.30.0.12/24, fd00:172:30::12/64) ── pods
//!                     └─ ...
//! ```
//!
//! Pods are made by hand the way Calico wires them (the real CNI plugin is tested in `cni/`):
//! a pod namespace with `eth0` holding a /32 and a /128 from its node's pod CIDR, default
//! routes via 169.254.1.1 and fe80::1, which the node-side veth owns; on the node, a host
//! route to each pod address via that veth.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fairlead_core::Node;
use fairlead_testkit::{Netns, Veth};
use k8s_openapi::api::core::v1 as corev1;
use serde_json::json;

pub struct Pod {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    // Field order is drop order: the veth before the namespace (either works; this is tidy).
    _veth: Veth,
    pub ns: Netns,
}

pub struct TestNode {
    pub name: String,
    /// The core model's Node, as the agent would get it from a snapshot.
    pub node: Node,
    pub pods: Vec<Pod>,
    _uplink: Veth,
    pub ns: Netns,
}

pub struct Cluster {
    pub nodes: Vec<TestNode>,
    pub underlay: Netns,
}

/// Node `i` (1-based): name, pod CIDRs and underlay addresses of the address plan.
pub fn node_object(i: u8) -> Node {
    let node: corev1::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{i}")},
        "spec": {"podCIDRs": [format!("10.244.{i}.0/24"), format!("fd00:10:244:{i}::/64")]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": format!("172.30.0.1{i}")},
            {"type": "InternalIP", "address": format!("fd00:172:30::1{i}")},
            {"type": "Hostname", "address": format!("node-{i}")}
        ]}
    }))
    .expect("a valid Node");
    Node::try_from(&node).expect("a Node the core model accepts")
}

impl Cluster {
    /// `nodes` nodes with `pods_per_node` pods each. Fails (never skips) without root.
    pub fn new(nodes: u8, pods_per_node: u8) -> Result<Self> {
        let underlay = Netns::new().context("this test needs root to make network namespaces")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        // No multicast snooping: with no querier on this bridge it could drop the multicast
        // that IPv6 neighbour discovery relies on.
        underlay.ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        underlay.link_up("br0")?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            underlay,
        };
        for i in 1..=nodes {
            cluster.add_node(i, pods_per_node)?;
        }
        Ok(cluster)
    }

    fn add_node(&mut self, i: u8, pods: u8) -> Result<()> {
        let ns = Netns::new()?;
        let port = format!("n{i}");
        let uplink = Veth::new(&ns, "eth0", &self.underlay, &port)?;
        self.underlay.ip(&["link", "set", &port, "master", "br0"])?;
        self.underlay.link_up(&port)?;
        ns.add_addr("eth0", &format!("172.30.0.1{i}/24"))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:172:30::1{i}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.link_up("eth0")?;
        let mut node = TestNode {
            name: format!("node-{i}"),
            node: node_object(i),
            pods: Vec::new(),
            _uplink: uplink,
            ns,
        };
        for p in 0..pods {
            node.add_pod(i, p)?;
        }
        self.nodes.push(node);
        Ok(())
    }

    /// The Node objects of the nodes at these (0-based) positions.
    pub fn objects(&self, which: &[usize]) -> Vec<Node> {
        which.iter().map(|&i| self.nodes[i].node.clone()).collect()
    }

    /// Every pod of the nodes at `members` pings every pod on the *other* member nodes, over
    /// IPv4 and IPv6, all in parallel. Returns the failures as readable lines.
    pub fn mesh_failures(&self, members: &[usize]) -> Vec<String> {
        let mut pairs = Vec::new();
        for &a in members {
            for &b in members.iter().filter(|&&b| b != a) {
                for from in &self.nodes[a].pods {
                    for to in &self.nodes[b].pods {
                        pairs.push((from, IpAddr::V4(to.ipv4), &to.name));
                        pairs.push((from, IpAddr::V6(to.ipv6), &to.name));
                    }
                }
            }
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|(from, ip, to)| {
                    scope.spawn(move || match from.ping(*ip) {
                        Ok(true) => None,
                        Ok(false) => Some(format!("{} cannot reach {to} at {ip}", from.name)),
                        Err(e) => Some(format!("{} -> {ip}: {e:#}", from.name)),
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("ping thread"))
                .collect()
        })
    }

    /// Panics with every failed pair unless the member nodes' pods all reach each other.
    pub fn assert_mesh(&self, members: &[usize], when: &str) {
        let started = Instant::now();
        let failures = self.mesh_failures(members);
        assert!(
            failures.is_empty(),
            "{when}: {} of the pod pairs failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
        eprintln!(
            "{when}: pod mesh of nodes {members:?} ok in {:?}",
            started.elapsed()
        );
    }
}

impl TestNode {
    fn add_pod(&mut self, i: u8, p: u8) -> Result<()> {
        let ns = Netns::new()?;
        let host_side = format!("pod{p}");
        let veth = Veth::new(&self.ns, &host_side, &ns, "eth0")?;
        let ipv4 = Ipv4Addr::new(10, 244, i, 10 + p);
        let ipv6 = Ipv6Addr::new(
            0xfd00,
            0x10,
            0x244,
            u16::from(i),
            0,
            0,
            0,
            0x10 + u16::from(p),
        );

        // Node side: the pods' gateway addresses, and a host route to each pod address.
        self.ns.add_addr(&host_side, "169.254.1.1/32")?;
        self.ns
            .ip(&["addr", "add", "fe80::1/64", "dev", &host_side, "nodad"])?;
        self.ns.link_up(&host_side)?;
        self.ns
            .ip(&["route", "add", &format!("{ipv4}/32"), "dev", &host_side])?;
        self.ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{ipv6}/128"),
            "dev",
            &host_side,
        ])?;

        // Pod side.
        ns.add_addr("eth0", &format!("{ipv4}/32"))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ipv6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.link_up("eth0")?;
        ns.ip(&[
            "route",
            "add",
            "169.254.1.1/32",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        ns.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;

        self.pods.push(Pod {
            name: format!("{}/pod{p}", self.name),
            ipv4,
            ipv6,
            _veth: veth,
            ns,
        });
        Ok(())
    }

    /// `ip -n NODE ARGS...` output.
    pub fn ip(&self, args: &[&str]) -> String {
        self.ns.ip(args).expect("ip")
    }

    /// Fairlead's routes (`proto 102`) of both families.
    pub fn fairlead_routes(&self) -> String {
        self.ip(&["-4", "route", "show", "proto", "102"])
            + &self.ip(&["-6", "route", "show", "proto", "102"])
    }

    pub fn vxlan_neighbours(&self) -> String {
        self.ip(&["neigh", "show", "dev", "fl.vxlan"])
            + &self.ip(&["-6", "neigh", "show", "dev", "fl.vxlan"])
    }

    pub fn vxlan_fdb(&self) -> String {
        let out = std::process::Command::new("bridge")
            .args(["-n", self.ns.name(), "fdb", "show", "dev", "fl.vxlan"])
            .output()
            .expect("bridge(8) from iproute2");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, key: &str) -> String {
        self.ns
            .exec_ok("sysctl", &["-n", key])
            .expect("sysctl")
            .trim()
            .to_owned()
    }

    /// Sets the MTU of this node's pod interfaces (both ends), as the CNI plugin would.
    pub fn set_pod_mtu(&self, mtu: u32) -> Result<()> {
        for (p, pod) in self.pods.iter().enumerate() {
            let mtu = mtu.to_string();
            self.ns
                .ip(&["link", "set", &format!("pod{p}"), "mtu", &mtu])?;
            pod.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        Ok(())
    }
}

impl Pod {
    /// `ping -c 2 -W 1`, bounded to 3 s in all; true if a reply came back.
    pub fn ping(&self, ip: IpAddr) -> Result<bool> {
        self.ping_with(ip, &[])
    }

    /// Like [`Pod::ping`], with extra arguments (`-s SIZE -M do`).
    pub fn ping_with(&self, ip: IpAddr, extra: &[&str]) -> Result<bool> {
        let ip = ip.to_string();
        let mut args = vec!["-c", "2", "-i", "0.2", "-W", "1", "-w", "3", "-q"];
        args.extend_from_slice(extra);
        args.push(&ip);
        Ok(self.ns.exec("ping", &args)?.status.success())
    }

    /// One probe, 1 s: for asserting that something is *not* reachable.
    pub fn reaches_once(&self, ip: IpAddr) -> Result<bool> {
        let ip = ip.to_string();
        Ok(self
            .ns
            .exec("ping", &["-c", "1", "-W", "1", "-w", "1", "-q", &ip])?
            .status
            .success())
    }
}

/// Waits (bounded) until `f` holds; for state that a background task changes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "fairlead-agent-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
