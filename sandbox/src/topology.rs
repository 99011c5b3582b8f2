//! The sandbox's machines: one network namespace per node, joined by an
//! underlay (a bridge in a namespace of its own, 172.30.0.0/24 and
//! fd00:172:30::/64), with no link to the host's namespace. Everything is
//! named `fl-<sandbox>-...` so it can all be found and removed again.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{json, Value};

use crate::netns::{self, ip_in};

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// Namespace name (`fl-<sandbox>-<node>`).
    pub netns: String,
    pub underlay_v4: Ipv4Addr,
    pub underlay_v6: Ipv6Addr,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    pub zone: String,
}

impl NodeSpec {
    /// The Node object the sandbox registers for this machine.
    pub fn manifest(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": {
                "kubernetes.io/hostname": self.name,
                "topology.kubernetes.io/zone": self.zone,
            }},
            "spec": {"podCIDR": self.pod_cidr_v4, "podCIDRs": [self.pod_cidr_v4, self.pod_cidr_v6]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": self.underlay_v4.to_string()},
                {"type": "InternalIP", "address": self.underlay_v6.to_string()},
                {"type": "Hostname", "address": self.name},
            ]},
        })
    }
}

pub struct Topology {
    pub prefix: String,
    pub underlay: String,
    pub nodes: Vec<NodeSpec>,
}

/// The interface every node has on the underlay.
pub const UNDERLAY_IF: &str = "eth0";

impl Topology {
    pub fn prefix(sandbox: &str) -> String {
        format!("fl-{sandbox}-")
    }

    /// Plans `n` nodes (node-1 .. node-n) without creating anything.
    pub fn plan(sandbox: &str, n: usize) -> Topology {
        let prefix = Self::prefix(sandbox);
        let nodes = (1..=n)
            .map(|i| NodeSpec {
                name: format!("node-{i}"),
                netns: format!("{prefix}node-{i}"),
                underlay_v4: Ipv4Addr::new(172, 30, 0, 10 + i as u8),
                underlay_v6: format!("fd00:172:30::{}", 10 + i).parse().expect("literal"),
                pod_cidr_v4: format!("10.244.{i}.0/24"),
                pod_cidr_v6: format!("fd00:10:244:{i}::/64"),
                zone: format!("zone-{}", if i % 2 == 1 { "a" } else { "b" }),
            })
            .collect();
        Topology {
            underlay: format!("{prefix}underlay"),
            prefix,
            nodes,
        }
    }

    /// Creates the namespaces and links. On error, whatever was made is removed.
    pub fn create(&self) -> Result<(), crate::Error> {
        let r = self.try_create();
        if r.is_err() {
            self.destroy();
        }
        r
    }

    fn try_create(&self) -> Result<(), crate::Error> {
        netns::create(&self.underlay)?;
        ip_in(&self.underlay, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&self.underlay, &["link", "set", "br0", "up"])?;
        for (i, n) in self.nodes.iter().enumerate() {
            netns::create(&n.netns)?;
            let port = format!("u{}", i + 1);
            ip_in(
                &self.underlay,
                &[
                    "link",
                    "add",
                    &port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    UNDERLAY_IF,
                    "netns",
                    &n.netns,
                ],
            )?;
            ip_in(
                &self.underlay,
                &["link", "set", &port, "master", "br0", "up"],
            )?;
            ip_in(
                &n.netns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", n.underlay_v4),
                    "dev",
                    UNDERLAY_IF,
                ],
            )?;
            ip_in(
                &n.netns,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", n.underlay_v6),
                    "dev",
                    UNDERLAY_IF,
                    "nodad",
                ],
            )?;
            ip_in(&n.netns, &["link", "set", UNDERLAY_IF, "up"])?;
        }
        Ok(())
    }

    /// Removes every namespace of this sandbox (pods' too), even ones this
    /// process did not create (a crashed run's).
    pub fn destroy(&self) {
        destroy_prefix(&self.prefix);
    }
}

/// Deletes every namespace named `<prefix>*` and its /etc/netns directory.
pub fn destroy_prefix(prefix: &str) {
    for ns in netns::list(prefix) {
        if let Err(e) = netns::delete(&ns) {
            tracing::warn!(netns = %ns, error = %e, "cannot delete namespace");
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
    }
}
