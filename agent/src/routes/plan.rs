//! Pure logic of node routing: what the kernel should hold for a set of peers, and the steps
//! from what it holds to that. No IO, so it is tested without namespaces.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use fairlead_core::{IpFamily, IpNet, Node};

use super::RoutingMode;

/// A link-layer (Ethernet) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The MAC of a node's VXLAN device, derived from its underlay IPv4 address, so every peer can
/// compute it from the Node object alone (no annotation to publish, nothing to ask).
///
/// `02:fa` + the four octets: `02` sets the locally-administered bit and clears the multicast
/// bit; `fa` keeps these out of the ranges other overlays derive the same way (e.g. flannel's
/// random MACs, Docker's `02:42`). Unique as long as underlay addresses are.
pub fn vtep_mac(underlay: Ipv4Addr) -> Mac {
    let [a, b, c, d] = underlay.octets();
    Mac([0x02, 0xfa, a, b, c, d])
}

/// The VTEP address of a node in one family: the first (network) address of its pod CIDR in
/// that family. IPAM never hands it to a pod, every peer can compute it, and it lets the node's
/// own traffic to remote pods leave with a pod-range source (as flannel does with `.0`).
pub fn vtep_addr(pod_cidr: &IpNet) -> IpAddr {
    pod_cidr.addr()
}

/// The device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    /// The node's underlay interface (native routing).
    Underlay,
    /// The VXLAN device `fl.vxlan`.
    Vxlan,
    /// Some other interface, found in the kernel (after a restart, or someone's edit).
    Other(u32),
}

/// Where a route to a peer's pod CIDR goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nexthop {
    pub gateway: IpAddr,
    pub dev: Dev,
    /// `onlink`: the gateway is not in any connected subnet (VTEP addresses are not), so the
    /// kernel must not look for it in one.
    pub onlink: bool,
}

/// What Fairlead keeps in one node namespace for its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Pod CIDR of a peer -> its next hop; routes in the main table with Fairlead's protocol.
    pub routes: BTreeMap<IpNet, Nexthop>,
    /// VTEP address -> VTEP MAC: permanent neighbour entries on `fl.vxlan`.
    pub neighbours: BTreeMap<IpAddr, Mac>,
    /// VTEP MAC -> peer underlay IPv4: permanent FDB entries on `fl.vxlan`.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
}

impl State {
    /// Forgets everything on `fl.vxlan`: the kernel dropped it with the device.
    pub fn forget_vxlan(&mut self) {
        self.routes.retain(|_, nh| nh.dev != Dev::Vxlan);
        self.neighbours.clear();
        self.fdb.clear();
    }
}

/// A peer (or one of its families) left out, and why; logged, never fatal, so that one odd Node
/// cannot cut the others off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub node: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.reason)
    }
}

/// The state wanted for `peers`, which peer each entry serves (for error messages), and what
/// was skipped.
#[derive(Debug, Default)]
pub struct Desired {
    pub state: State,
    pub route_owner: BTreeMap<IpNet, String>,
    pub skipped: Vec<Skipped>,
}

/// Computes the wanted state. `local` is this node: its own pod CIDRs are never routed away,
/// and it is ignored if it appears among `peers`.
pub fn desired(mode: &RoutingMode, local: &Node, peers: &[Node]) -> Desired {
    let mut out = Desired::default();
    let mut skip = |node: &Node, reason: String| {
        out.skipped.push(Skipped {
            node: node.name.clone(),
            reason,
        })
    };
    let mut routes: BTreeMap<IpNet, (Nexthop, String)> = BTreeMap::new();
    let mut neighbours = BTreeMap::new();
    let mut fdb: BTreeMap<Mac, (Ipv4Addr, String)> = BTreeMap::new();

    for peer in peers.iter().filter(|p| p.name != local.name) {
        if peer.pod_cidrs.is_empty() {
            skip(peer, "no podCIDRs yet".into());
            continue;
        }
        let vxlan_mac = match mode {
            RoutingMode::Native => None,
            RoutingMode::Vxlan { .. } => {
                let Some(IpAddr::V4(underlay)) = first_of(&peer.internal_ips, IpFamily::IPv4)
                else {
                    skip(
                        peer,
                        "no IPv4 InternalIP, which the VXLAN underlay needs".into(),
                    );
                    continue;
                };
                let mac = vtep_mac(underlay);
                if let Some((_, other)) = fdb.get(&mac) {
                    skip(
                        peer,
                        format!("has the same InternalIP {underlay} as node {other}"),
                    );
                    continue;
                }
                fdb.insert(mac, (underlay, peer.name.clone()));
                Some(mac)
            }
        };
        for cidr in &peer.pod_cidrs {
            if let Some(own) = local.pod_cidrs.iter().find(|own| overlaps(own, cidr)) {
                skip(
                    peer,
                    format!("pod CIDR {cidr} overlaps this node's own {own}; not routing it"),
                );
                continue;
            }
            if let Some((other_cidr, (_, other))) =
                routes.iter().find(|(other, _)| overlaps(other, cidr))
            {
                skip(
                    peer,
                    format!("pod CIDR {cidr} overlaps {other_cidr} of node {other}"),
                );
                continue;
            }
            let nexthop = match vxlan_mac {
                None => {
                    let Some(gateway) = first_of(&peer.internal_ips, cidr.family()) else {
                        skip(
                            peer,
                            format!(
                                "no {:?} InternalIP to route pod CIDR {cidr} to natively",
                                cidr.family()
                            ),
                        );
                        continue;
                    };
                    Nexthop {
                        gateway,
                        dev: Dev::Underlay,
                        onlink: false,
                    }
                }
                Some(mac) => {
                    let vtep = vtep_addr(cidr);
                    neighbours.insert(vtep, mac);
                    Nexthop {
                        gateway: vtep,
                        dev: Dev::Vxlan,
                        onlink: true,
                    }
                }
            };
            routes.insert(*cidr, (nexthop, peer.name.clone()));
        }
    }

    for (cidr, (nexthop, owner)) in routes {
        out.state.routes.insert(cidr, nexthop);
        out.route_owner.insert(cidr, owner);
    }
    out.state.neighbours = neighbours;
    out.state.fdb = fdb.into_iter().map(|(mac, (ip, _))| (mac, ip)).collect();
    out
}

fn first_of(ips: &[IpAddr], family: IpFamily) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| IpFamily::of(ip) == family)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.family() == b.family() && (a.contains(&b.addr()) || b.contains(&a.addr()))
}

/// The steps from one state to another. Removals run first, then additions in dependency order
/// (FDB, neighbours, routes), so a route never points at a VTEP the kernel cannot reach yet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove_routes: Vec<(IpNet, Nexthop)>,
    pub remove_neighbours: Vec<(IpAddr, Mac)>,
    pub remove_fdb: Vec<(Mac, Ipv4Addr)>,
    /// Added or replaced: additions use NLM_F_REPLACE, so a changed entry is one step.
    pub set_fdb: Vec<(Mac, Ipv4Addr)>,
    pub set_neighbours: Vec<(IpAddr, Mac)>,
    pub set_routes: Vec<(IpNet, Nexthop)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.remove_routes.len()
            + self.remove_neighbours.len()
            + self.remove_fdb.len()
            + self.set_fdb.len()
            + self.set_neighbours.len()
            + self.set_routes.len()
    }
}

pub fn plan(installed: &State, desired: &State) -> Plan {
    fn removed<K: Ord + Copy, V: Copy>(from: &BTreeMap<K, V>, to: &BTreeMap<K, V>) -> Vec<(K, V)> {
        from.iter()
            .filter(|(k, _)| !to.contains_key(k))
            .map(|(k, v)| (*k, *v))
            .collect()
    }
    fn set<K: Ord + Copy, V: Copy + PartialEq>(
        from: &BTreeMap<K, V>,
        to: &BTreeMap<K, V>,
    ) -> Vec<(K, V)> {
        to.iter()
            .filter(|(k, v)| from.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect()
    }
    Plan {
        remove_routes: removed(&installed.routes, &desired.routes),
        remove_neighbours: removed(&installed.neighbours, &desired.neighbours),
        remove_fdb: removed(&installed.fdb, &desired.fdb),
        set_fdb: set(&installed.fdb, &desired.fdb),
        set_neighbours: set(&installed.neighbours, &desired.neighbours),
        set_routes: set(&installed.routes, &desired.routes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairlead_core::Labels;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> Node {
        Node {
            name: name.into(),
            labels: Labels::default(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
            external_ips: Vec::new(),
            zone: None,
        }
    }

    fn n(i: u8) -> Node {
        node(
            &format!("node-{i}"),
            &[
                &format!("10.244.{i}.0/24"),
                &format!("fd00:10:244:{i}::/64"),
            ],
            &[&format!("172.30.0.1{i}"), &format!("fd00:172:30::1{i}")],
        )
    }

    const VXLAN: RoutingMode = RoutingMode::Vxlan { vni: 1, port: 8472 };

    #[test]
    fn mac_is_derived_from_the_underlay_address() {
        let mac = vtep_mac("172.30.0.12".parse().unwrap());
        assert_eq!(mac.to_string(), "02:fa:ac:1e:00:0c");
        // Unicast, locally administered.
        assert_eq!(mac.0[0] & 0b11, 0b10);
    }

    #[test]
    fn native_routes_each_family_via_the_peer_underlay_address() {
        let d = desired(&RoutingMode::Native, &n(1), &[n(1), n(2), n(3)]);
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        assert_eq!(d.state.routes.len(), 4);
        let v6 = d.state.routes[&"fd00:10:244:2::/64".parse().unwrap()];
        assert_eq!(v6.gateway, "fd00:172:30::12".parse::<IpAddr>().unwrap());
        assert_eq!(v6.dev, Dev::Underlay);
        assert!(d.state.neighbours.is_empty() && d.state.fdb.is_empty());
        assert_eq!(
            d.route_owner[&"10.244.3.0/24".parse().unwrap()],
            "node-3".to_string()
        );
    }

    #[test]
    fn vxlan_routes_via_vtep_addresses_with_neighbours_and_fdb() {
        let d = desired(&VXLAN, &n(1), &[n(2)]);
        let v4 = d.state.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            v4,
            Nexthop {
                gateway: "10.244.2.0".parse().unwrap(),
                dev: Dev::Vxlan,
                onlink: true
            }
        );
        let mac = vtep_mac("172.30.0.12".parse().unwrap());
        assert_eq!(d.state.neighbours.len(), 2);
        assert_eq!(d.state.neighbours[&"fd00:10:244:2::".parse().unwrap()], mac);
        assert_eq!(
            d.state.fdb.into_iter().collect::<Vec<_>>(),
            vec![(mac, "172.30.0.12".parse().unwrap())]
        );
    }

    #[test]
    fn odd_peers_are_skipped_not_fatal() {
        let no_cidrs = node("bare", &[], &["172.30.0.20"]);
        let v6_only = node("v6", &["10.244.7.0/24"], &["fd00:172:30::17"]);
        let overlapping = node("thief", &["10.244.1.128/25"], &["172.30.0.30"]);
        let twin = node("twin", &["10.244.9.0/24"], &["172.30.0.12"]);
        let peers = [n(2), no_cidrs, v6_only, overlapping, twin];

        let d = desired(&VXLAN, &n(1), &peers);
        let skipped: Vec<_> = d.skipped.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(skipped, ["bare", "v6", "thief", "twin"]);
        assert_eq!(d.state.routes.len(), 2, "only node-2's routes");

        let d = desired(&RoutingMode::Native, &n(1), &peers);
        // Native: the v6-only node has no IPv4 underlay for its IPv4 CIDR; the twin is fine.
        let skipped: Vec<_> = d.skipped.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(skipped, ["bare", "v6", "thief"]);
        assert_eq!(d.state.routes.len(), 3);
    }

    #[test]
    fn plan_diffs_joins_leaves_and_changes() {
        let before = desired(&VXLAN, &n(1), &[n(2), n(3)]).state;
        assert!(plan(&before, &before).is_empty());

        let after = desired(&VXLAN, &n(1), &[n(2)]).state;
        let p = plan(&before, &after);
        assert_eq!(p.remove_routes.len(), 2);
        assert_eq!(p.remove_neighbours.len(), 2);
        assert_eq!(p.remove_fdb.len(), 1);
        assert_eq!(p.len(), 5);

        let p = plan(&after, &before);
        assert_eq!((p.set_routes.len(), p.set_fdb.len()), (2, 1));

        // A peer whose underlay address changed: its FDB entry is replaced in place.
        let mut moved = n(2);
        moved.internal_ips[0] = "172.30.0.99".parse().unwrap();
        let p = plan(&after, &desired(&VXLAN, &n(1), &[moved]).state);
        assert_eq!(p.remove_fdb.len(), 1, "old MAC goes");
        assert_eq!(p.set_fdb.len(), 1);
        assert_eq!(p.set_neighbours.len(), 2, "VTEPs now map to the new MAC");
        assert!(p.set_routes.is_empty(), "routes via VTEP addresses stay");

        // Switching modes replaces every route.
        let native = desired(&RoutingMode::Native, &n(1), &[n(2)]).state;
        let p = plan(&after, &native);
        assert_eq!(p.set_routes.len(), 2);
        assert_eq!((p.remove_neighbours.len(), p.remove_fdb.len()), (2, 1));
    }
}
