//! Node routes: how pods on this node reach pods on the others.
//!
//! [`NodeNetwork`] owns, inside one node's network namespace, the routes to every peer's pod
//! CIDRs and, in VXLAN mode, the `fl.vxlan` device with its neighbour and FDB entries. Each
//! [`NodeNetwork::apply`] computes the wanted state from the Node objects ([`plan::desired`]),
//! diffs it against what it installed before ([`plan::plan`]) and changes only that.
//!
//! Why `rtnetlink` (0.24) rather than `netlink-packet-route` by hand: the agent is a Tokio
//! program and rtnetlink is the async request/response layer over exactly those packet types
//! (we still build and read `netlink-packet-route` messages through its re-export), with
//! builders for VXLAN links, routes and neighbours that would otherwise be a few hundred lines
//! of sequence numbers and ACK matching. The socket is opened on a thread inside the node's
//! namespace and stays bound there.
//!
//! Restart: a fresh `NodeNetwork` does not know what an earlier agent installed, so its first
//! apply reads it back from the kernel (routes carry [`ROUTE_PROTOCOL`]; everything on
//! `fl.vxlan` is ours) and diffs against that, removing peers that left while it was down.
//! Every addition uses NLM_F_REPLACE, so re-running never fails on "exists".

pub mod plan;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fairlead_core::{IpFamily, IpNet, Node};
use futures::TryStreamExt;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol},
    AddressFamily,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::netns::{Netns, NetnsError, RootNetns};
use plan::{Dev, Mac, Nexthop, State};

/// Name of the VXLAN device in the node namespace.
pub const VXLAN_IFNAME: &str = "fl.vxlan";
/// VXLAN over an IPv4 underlay costs 50 bytes: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Default VNI of `fl.vxlan`.
pub const DEFAULT_VNI: u32 = 1;
/// Default UDP port: 8472, the Linux kernel's historical VXLAN port, which flannel uses too
/// (IANA's 4789 is often taken by another overlay on the same host).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The `proto` of every route Fairlead installs (`ip route show proto 102`): how a restarted
/// agent finds its routes and knows which ones it may delete. 102 is ASCII `f`; the kernel
/// reserves 0-4 and routing daemons use 8-18, 42 and 186-192.
pub const ROUTE_PROTOCOL: u8 = 102;

const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;
const ENODEV: i32 = libc::ENODEV;

/// How pod traffic crosses between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    /// Plain routes to each peer's pod CIDRs via the peer's underlay address. Needs the nodes
    /// to share an L2 segment (the next hop must be on-link); no encapsulation, full MTU.
    Native,
    /// A VXLAN overlay over the IPv4 underlay: works over any underlay that carries UDP
    /// between nodes; costs [`VXLAN_OVERHEAD`] bytes of MTU. IPv6 pod traffic rides the same
    /// device.
    Vxlan { vni: u32, port: u16 },
}

impl RoutingMode {
    /// VXLAN with the default VNI and port.
    pub const fn vxlan() -> Self {
        RoutingMode::Vxlan {
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
        }
    }

    /// Bytes of the underlay MTU this mode uses for itself.
    pub fn overhead(&self) -> u32 {
        match self {
            RoutingMode::Native => 0,
            RoutingMode::Vxlan { .. } => VXLAN_OVERHEAD,
        }
    }
}

impl FromStr for RoutingMode {
    type Err = String;

    /// `native` or `vxlan` (default VNI and port).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(RoutingMode::Native),
            "vxlan" => Ok(RoutingMode::vxlan()),
            _ => Err("expected `native` or `vxlan`".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeNetworkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),

    #[error(
        "NodeNetwork must be created inside a Tokio runtime (it runs a netlink connection task)"
    )]
    NoRuntime,

    #[error(
        "cannot open a netlink socket in {netns}: {source}; the agent needs CAP_NET_ADMIN",
        netns = .netns.display()
    )]
    Socket { netns: PathBuf, source: io::Error },

    #[error(
        "no underlay interface {ifname:?} in {netns}; set FAIRLEAD_AGENT_UNDERLAY_IFNAME to the \
         interface that carries the node's InternalIP", netns = .netns.display()
    )]
    NoUnderlay { ifname: String, netns: PathBuf },

    #[error(
        "node {node} has no IPv4 InternalIP; VXLAN mode uses it as the tunnel's local address. \
         Give the Node an IPv4 InternalIP, or use FAIRLEAD_AGENT_ROUTING_MODE=native"
    )]
    NoLocalIpv4 { node: String },

    #[error(
        "underlay {ifname} in {netns} has MTU {mtu}, too small for VXLAN ({VXLAN_OVERHEAD} bytes \
         of overhead); raise the underlay MTU or use native routing", netns = .netns.display()
    )]
    UnderlayMtu {
        ifname: String,
        netns: PathBuf,
        mtu: u32,
    },

    #[error(
        "cannot set {key}=1 in {netns}: {source}; forwarding is needed for pod traffic to \
         cross the node (is /proc mounted and writable?)", netns = .netns.display()
    )]
    Sysctl {
        key: &'static str,
        netns: PathBuf,
        source: io::Error,
    },

    #[error(
        "{action} in {netns} failed: {source}; check that nothing else manages Fairlead's \
         routes and {VXLAN_IFNAME}, then let the agent retry", netns = .netns.display()
    )]
    Netlink {
        action: String,
        netns: PathBuf,
        source: rtnetlink::Error,
    },
}

/// What one [`NodeNetwork::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Routes, neighbour and FDB entries added or replaced.
    pub set: usize,
    /// Routes, neighbour and FDB entries removed.
    pub removed: usize,
    /// Peers (or families of peers) left out, and why.
    pub skipped: Vec<plan::Skipped>,
    /// The VXLAN device was (re)created.
    pub created_vxlan: bool,
}

/// Routes to peers' pod CIDRs inside one node's network namespace. See the module docs.
pub struct NodeNetwork {
    netns: Netns,
    underlay_ifname: String,
    mode: RoutingMode,
    handle: Handle,
    connection: JoinHandle<()>,
    /// What this instance knows to be installed; `None` until the first apply reads the kernel.
    installed: Option<State>,
    forwarding_enabled: bool,
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        // Installed state stays in the kernel on purpose: pods keep working across an agent
        // restart. Only the socket's task ends.
        self.connection.abort();
    }
}

/// The underlay interface as read from the kernel.
#[derive(Debug, Clone, Copy)]
struct Underlay {
    index: u32,
    mtu: u32,
}

impl NodeNetwork {
    /// Opens a netlink socket inside the namespace at `netns` (refusing the root namespace
    /// unless `root` allows it). Changes nothing yet.
    pub async fn new(
        netns: &Path,
        underlay_ifname: &str,
        mode: RoutingMode,
        root: RootNetns,
    ) -> Result<Self, NodeNetworkError> {
        let netns = Netns::open(netns, root)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| NodeNetworkError::NoRuntime)?;
        // The socket is created on a thread inside the namespace and stays bound to it; the
        // runtime context is entered there so the socket registers with this runtime's reactor.
        let (connection, handle, _) = netns
            .run_in(|| {
                let _guard = runtime.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|source| NodeNetworkError::Socket {
                netns: netns.path().to_owned(),
                source,
            })?;
        let connection = tokio::spawn(connection);
        Ok(Self {
            netns,
            underlay_ifname: underlay_ifname.to_owned(),
            mode,
            handle,
            connection,
            installed: None,
            forwarding_enabled: false,
        })
    }

    pub fn mode(&self) -> RoutingMode {
        self.mode
    }

    pub fn netns(&self) -> &Path {
        self.netns.path()
    }

    /// The MTU pods should use: the underlay's minus this mode's overhead.
    pub async fn pod_mtu(&self) -> Result<u32, NodeNetworkError> {
        let underlay = self.underlay().await?;
        self.inner_mtu(underlay)
    }

    fn inner_mtu(&self, underlay: Underlay) -> Result<u32, NodeNetworkError> {
        let overhead = self.mode.overhead();
        // 1280 is IPv6's minimum link MTU: below it the overlay cannot carry IPv6 pods.
        if underlay.mtu < overhead + 1280 {
            return Err(NodeNetworkError::UnderlayMtu {
                ifname: self.underlay_ifname.clone(),
                netns: self.netns.path().to_owned(),
                mtu: underlay.mtu,
            });
        }
        Ok(underlay.mtu - overhead)
    }

    /// Makes the namespace route to `peers` (all other Nodes; `local` is skipped if present)
    /// and removes what is left from peers that are gone. Idempotent.
    pub async fn apply(
        &mut self,
        local: &Node,
        peers: &[Node],
    ) -> Result<ApplyReport, NodeNetworkError> {
        let underlay = self.underlay().await?;
        if !self.forwarding_enabled {
            self.enable_forwarding()?;
            self.forwarding_enabled = true;
        }
        let mut report = ApplyReport::default();

        let vxlan = match self.mode {
            RoutingMode::Native => {
                if let Some(link) = self.link_by_name(VXLAN_IFNAME).await? {
                    // Left by an agent that ran in VXLAN mode; its routes go with it.
                    info!(netns = %self.netns.path().display(), "native mode: removing {VXLAN_IFNAME}");
                    self.del_link(link.header.index).await?;
                    if let Some(installed) = &mut self.installed {
                        installed.forget_vxlan();
                    }
                }
                None
            }
            RoutingMode::Vxlan { vni, port } => {
                let Some(IpAddr::V4(local_ip)) = local
                    .internal_ips
                    .iter()
                    .copied()
                    .find(|ip| IpFamily::of(ip) == IpFamily::IPv4)
                else {
                    return Err(NodeNetworkError::NoLocalIpv4 {
                        node: local.name.clone(),
                    });
                };
                let mtu = self.inner_mtu(underlay)?;
                let (index, created) = self
                    .ensure_vxlan(vni, port, local_ip, underlay.index, mtu)
                    .await?;
                if created {
                    report.created_vxlan = true;
                    if let Some(installed) = &mut self.installed {
                        installed.forget_vxlan();
                    }
                }
                self.ensure_vtep_addresses(index, &local.pod_cidrs).await?;
                Some(index)
            }
        };

        if self.installed.is_none() {
            let found = self.read_installed(underlay.index, vxlan).await?;
            debug!(
                routes = found.routes.len(),
                neighbours = found.neighbours.len(),
                fdb = found.fdb.len(),
                "read what an earlier agent installed"
            );
            self.installed = Some(found);
        }

        let desired = plan::desired(&self.mode, local, peers);
        for skipped in &desired.skipped {
            warn!(peer = %skipped.node, "not routing to a peer: {}", skipped.reason);
        }
        report.skipped = desired.skipped.clone();
        let steps = plan::plan(
            self.installed.as_ref().unwrap_or(&State::default()),
            &desired.state,
        );
        if steps.is_empty() {
            return Ok(report);
        }
        let owner = |cidr: &IpNet| match desired.route_owner.get(cidr) {
            Some(node) => format!("pod CIDR of node {node}"),
            None => "pod CIDR of a node that left".to_owned(),
        };
        let dev_index = |dev: Dev| match dev {
            Dev::Underlay => underlay.index,
            Dev::Vxlan => vxlan.unwrap_or(0),
            Dev::Other(index) => index,
        };
        let vx = vxlan.unwrap_or(0);

        // Each step updates `installed` as it succeeds, so after a failure the next apply
        // redoes only what is still missing.
        for (cidr, nexthop) in steps.remove_routes {
            let action = format!(
                "removing route {} ({})",
                describe(&cidr, &nexthop),
                owner(&cidr)
            );
            let message = route_message(&cidr, &nexthop, dev_index(nexthop.dev));
            ignore_missing(self.handle.route().del(message).execute().await)
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().routes.remove(&cidr);
            report.removed += 1;
        }
        for (ip, mac) in steps.remove_neighbours {
            let action = format!("removing neighbour {ip} lladdr {mac} dev {VXLAN_IFNAME}");
            let message = neighbour_message(vx, ip, mac);
            ignore_missing(self.handle.neighbours().del(message).execute().await)
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().neighbours.remove(&ip);
            report.removed += 1;
        }
        for (mac, dst) in steps.remove_fdb {
            let action = format!("removing fdb entry {mac} dst {dst} dev {VXLAN_IFNAME}");
            let message = fdb_message(vx, mac, dst);
            ignore_missing(self.handle.neighbours().del(message).execute().await)
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().fdb.remove(&mac);
            report.removed += 1;
        }
        for (mac, dst) in steps.set_fdb {
            let action = format!("adding fdb entry {mac} dst {dst} dev {VXLAN_IFNAME}");
            self.handle
                .neighbours()
                .add_bridge(vx, &mac.0)
                .destination(IpAddr::V4(dst))
                // NTF_SELF: the entry belongs to the VXLAN device's own FDB, not a bridge's.
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().fdb.insert(mac, dst);
            report.set += 1;
        }
        for (ip, mac) in steps.set_neighbours {
            let action = format!("adding neighbour {ip} lladdr {mac} dev {VXLAN_IFNAME}");
            self.handle
                .neighbours()
                .add(vx, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().neighbours.insert(ip, mac);
            report.set += 1;
        }
        for (cidr, nexthop) in steps.set_routes {
            let previous = self.state().routes.get(&cidr).copied();
            if let Some(previous) = previous.filter(|p| p.dev != nexthop.dev) {
                // Kernel quirk: an IPv6 `onlink` gateway is checked against the routes already
                // in the table (ip6_route_check_nh_onlink), and the route being replaced (same
                // prefix, other device) covers the gateway, so NLM_F_REPLACE fails with EINVAL
                // "Nexthop has invalid gateway or device mismatch". Moving a route to another
                // device (a mode switch) is therefore delete-then-add, a brief gap.
                let action = format!(
                    "removing route {} to move it to another device",
                    describe(&cidr, &previous)
                );
                let message = route_message(&cidr, &previous, dev_index(previous.dev));
                ignore_missing(self.handle.route().del(message).execute().await)
                    .map_err(|e| self.netlink_error(action, e))?;
                self.state().routes.remove(&cidr);
            }
            // Kernel quirk: an IPv4 `onlink` gateway is rejected with EINVAL "Nexthop has
            // invalid gateway" while the namespace's `lo` is down (a fresh `ip netns add` has it
            // down); whoever makes node namespaces must bring `lo` up.
            let action = format!(
                "adding route {} ({})",
                describe(&cidr, &nexthop),
                owner(&cidr)
            );
            let message = route_message(&cidr, &nexthop, dev_index(nexthop.dev));
            self.handle
                .route()
                .add(message)
                .replace()
                .execute()
                .await
                .map_err(|e| self.netlink_error(action, e))?;
            self.state().routes.insert(cidr, nexthop);
            report.set += 1;
        }
        info!(
            set = report.set,
            removed = report.removed,
            peers = peers.len(),
            "node routes applied"
        );
        Ok(report)
    }

    /// Removes everything this mode installs: Fairlead's routes and the VXLAN device. For
    /// tests, and for an operator tearing a node down; an agent restart does not call it.
    pub async fn remove_all(&mut self) -> Result<(), NodeNetworkError> {
        if let Some(link) = self.link_by_name(VXLAN_IFNAME).await? {
            self.del_link(link.header.index).await?;
        }
        let routes = self.dump_routes().await?;
        for message in routes {
            let action = "removing a Fairlead route".to_owned();
            ignore_missing(self.handle.route().del(message).execute().await)
                .map_err(|e| self.netlink_error(action, e))?;
        }
        self.installed = Some(State::default());
        Ok(())
    }

    fn state(&mut self) -> &mut State {
        self.installed.get_or_insert_with(State::default)
    }

    fn netlink_error(&self, action: String, source: rtnetlink::Error) -> NodeNetworkError {
        NodeNetworkError::Netlink {
            action,
            netns: self.netns.path().to_owned(),
            source,
        }
    }

    fn enable_forwarding(&self) -> Result<(), NodeNetworkError> {
        // /proc/sys/net resolves to the namespace of the thread that opens it, so these writes
        // land in the node namespace. IPv6 forwarding also turns off accepting router
        // advertisements on its interfaces (unless accept_ra=2), which a node that routes pods
        // does not want anyway.
        const KEYS: [(&str, &str); 2] = [
            ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
            (
                "net.ipv6.conf.all.forwarding",
                "/proc/sys/net/ipv6/conf/all/forwarding",
            ),
        ];
        for (key, path) in KEYS {
            self.netns
                .run_in(|| std::fs::write(path, "1"))?
                .map_err(|source| NodeNetworkError::Sysctl {
                    key,
                    netns: self.netns.path().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    async fn underlay(&self) -> Result<Underlay, NodeNetworkError> {
        let link = self
            .link_by_name(&self.underlay_ifname)
            .await?
            .ok_or_else(|| NodeNetworkError::NoUnderlay {
                ifname: self.underlay_ifname.clone(),
                netns: self.netns.path().to_owned(),
            })?;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .unwrap_or(1500);
        Ok(Underlay {
            index: link.header.index,
            mtu,
        })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NodeNetworkError> {
        let result = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match result {
            Ok(link) => Ok(link),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => Ok(None),
            Err(e) => Err(self.netlink_error(format!("looking up interface {name}"), e)),
        }
    }

    async fn del_link(&self, index: u32) -> Result<(), NodeNetworkError> {
        ignore_missing(self.handle.link().del(index).execute().await)
            .map_err(|e| self.netlink_error(format!("deleting {VXLAN_IFNAME}"), e))
    }

    /// Makes sure `fl.vxlan` exists with these settings and is up. An existing device with
    /// other settings (VNI, port, local address, underlay, MAC) is recreated: the kernel
    /// cannot change VNI or port in place. Returns its index and whether it was created.
    async fn ensure_vxlan(
        &self,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        underlay_index: u32,
        mtu: u32,
    ) -> Result<(u32, bool), NodeNetworkError> {
        let mac = plan::vtep_mac(local);
        let mut created = false;
        let existing = self.link_by_name(VXLAN_IFNAME).await?;
        let link = match existing {
            Some(link) if vxlan_matches(&link, vni, port, local, underlay_index, mac) => link,
            other => {
                if let Some(stale) = other {
                    info!("recreating {VXLAN_IFNAME}: its settings differ from the wanted ones");
                    self.del_link(stale.header.index).await?;
                }
                let message = LinkVxlan::new(VXLAN_IFNAME, vni)
                    .dev(underlay_index)
                    .local(local)
                    .port(port)
                    // No learning: every remote MAC is programmed from the Node objects, so a
                    // spoofed or stray packet cannot teach the device a wrong endpoint.
                    .learning(false)
                    .mtu(mtu)
                    .address(mac.0.to_vec())
                    .build();
                let action = format!(
                    "creating {VXLAN_IFNAME} (vni {vni}, dstport {port}, local {local}, mtu {mtu})"
                );
                self.handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .map_err(|e| self.netlink_error(action, e))?;
                created = true;
                self.link_by_name(VXLAN_IFNAME).await?.ok_or_else(|| {
                    self.netlink_error(
                        format!("finding {VXLAN_IFNAME} after creating it"),
                        rtnetlink::Error::RequestFailed,
                    )
                })?
            }
        };
        let index = link.header.index;
        let current_mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        if current_mtu != Some(mtu) || !link.header.flags.contains(LinkFlags::Up) {
            let action = format!("setting {VXLAN_IFNAME} up with mtu {mtu}");
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(|e| self.netlink_error(action, e))?;
        }
        Ok((index, created))
    }

    /// Puts this node's VTEP addresses (first address of each pod CIDR, as /32 and /128) on
    /// `fl.vxlan`, and takes off any other global address (a pod CIDR that changed).
    async fn ensure_vtep_addresses(
        &self,
        index: u32,
        pod_cidrs: &[IpNet],
    ) -> Result<(), NodeNetworkError> {
        let wanted: Vec<IpAddr> = pod_cidrs.iter().map(plan::vtep_addr).collect();
        let existing: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.netlink_error(format!("listing addresses of {VXLAN_IFNAME}"), e))?;
        let mut present = Vec::new();
        for message in existing {
            let Some(ip) = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if message.header.index != index || link_local {
                continue;
            }
            let prefix_ok = message.header.prefix_len == if ip.is_ipv4() { 32 } else { 128 };
            if wanted.contains(&ip) && prefix_ok {
                present.push(ip);
                continue;
            }
            ignore_missing(self.handle.address().del(message).execute().await).map_err(|e| {
                self.netlink_error(
                    format!("removing stale address {ip} from {VXLAN_IFNAME}"),
                    e,
                )
            })?;
        }
        for ip in wanted.into_iter().filter(|ip| !present.contains(ip)) {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            let mut request = self.handle.address().add(index, ip, prefix).replace();
            // No duplicate address detection: the address is unique by construction, and DAD
            // would leave it "tentative" (unusable as a source) for a second or more.
            let message = request.message_mut();
            message.header.flags = AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            request.execute().await.map_err(|e| {
                self.netlink_error(
                    format!("adding VTEP address {ip}/{prefix} to {VXLAN_IFNAME}"),
                    e,
                )
            })?;
        }
        Ok(())
    }

    async fn dump_routes(&self) -> Result<Vec<RouteMessage>, NodeNetworkError> {
        let mut ours = Vec::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.netlink_error("listing routes".to_owned(), e))?;
            ours.extend(routes.into_iter().filter(|r| {
                r.header.table == RouteHeader::RT_TABLE_MAIN
                    && r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
            }));
        }
        Ok(ours)
    }

    /// Reads back what an earlier agent installed: Fairlead's routes, and the permanent
    /// neighbour and FDB entries of `fl.vxlan`.
    async fn read_installed(
        &self,
        underlay_index: u32,
        vxlan: Option<u32>,
    ) -> Result<State, NodeNetworkError> {
        let mut state = State::default();
        for route in self.dump_routes().await? {
            let Some((cidr, nexthop)) = parse_route(&route, underlay_index, vxlan) else {
                continue;
            };
            state.routes.insert(cidr, nexthop);
        }
        let Some(vx) = vxlan else {
            return Ok(state);
        };
        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            let entries: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.netlink_error(format!("listing {family:?} neighbours"), e))?;
            for entry in entries {
                if entry.header.ifindex != vx || entry.header.state != NeighbourState::Permanent {
                    continue;
                }
                let mac = entry.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(&l[..]).ok(),
                    _ => None,
                });
                let dst = entry.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        Some(IpAddr::V6(*v6))
                    }
                    // netlink-packet-route parses NDA_DST by the message's family, so in an
                    // AF_BRIDGE (FDB) dump the VXLAN remote comes as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                        match raw.len() {
                            4 => <[u8; 4]>::try_from(&raw[..]).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(&raw[..]).ok().map(IpAddr::from),
                            _ => None,
                        }
                    }
                    _ => None,
                });
                match (family, mac, dst) {
                    (AddressFamily::Bridge, Some(mac), Some(IpAddr::V4(dst))) => {
                        state.fdb.insert(Mac(mac), dst);
                    }
                    (AddressFamily::Inet | AddressFamily::Inet6, Some(mac), Some(ip)) => {
                        state.neighbours.insert(ip, Mac(mac));
                    }
                    _ => {}
                }
            }
        }
        Ok(state)
    }
}

fn vxlan_matches(
    link: &LinkMessage,
    vni: u32,
    port: u16,
    local: Ipv4Addr,
    underlay_index: u32,
    mac: Mac,
) -> bool {
    let mut kind_ok = false;
    let mut data = None;
    let mut address = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => kind_ok = true,
                        LinkInfo::Data(InfoData::Vxlan(d)) => data = Some(d),
                        _ => {}
                    }
                }
            }
            LinkAttribute::Address(a) => address = Some(a.as_slice()),
            _ => {}
        }
    }
    let Some(data) = data else { return false };
    let has = |wanted: InfoVxlan| data.contains(&wanted);
    kind_ok
        && address == Some(&mac.0[..])
        && has(InfoVxlan::Id(vni))
        && has(InfoVxlan::Port(port))
        && has(InfoVxlan::Local(local))
        && has(InfoVxlan::Link(underlay_index))
        && has(InfoVxlan::Learning(false))
}

fn parse_route(
    route: &RouteMessage,
    underlay: u32,
    vxlan: Option<u32>,
) -> Option<(IpNet, Nexthop)> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    let cidr = IpNet::new(dst?, route.header.destination_prefix_length)?;
    let oif = oif.unwrap_or(0);
    let dev = if oif == underlay {
        Dev::Underlay
    } else if Some(oif) == vxlan {
        Dev::Vxlan
    } else {
        Dev::Other(oif)
    };
    Some((
        cidr,
        Nexthop {
            // A route without a gateway is not one Fairlead makes; the unspecified address
            // makes it differ from every wanted route, so it is replaced or removed.
            gateway: gateway.unwrap_or(match cidr.family() {
                IpFamily::IPv4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpFamily::IPv6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            }),
            dev,
            onlink: route.header.flags.contains(RouteFlags::Onlink),
        },
    ))
}

fn route_message(cidr: &IpNet, nexthop: &Nexthop, oif: u32) -> RouteMessage {
    let mut message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(cidr.addr(), cidr.prefix_len())
        .and_then(|b| b.gateway(nexthop.gateway))
        // Both come from an IpNet and a same-family gateway (plan::desired), so the builder's
        // family checks cannot fail; fall back to a message the kernel will reject loudly.
        .unwrap_or_default()
        .output_interface(oif)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if nexthop.onlink {
        message = message.onlink();
    }
    message.build()
}

fn neighbour_message(index: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    message
}

fn fdb_message(index: u32, mac: Mac, dst: Ipv4Addr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.header.flags = NeighbourFlags::Own;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    message
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    message
}

/// Deleting something that is already gone is success: the goal is its absence.
fn ignore_missing(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.raw_code().abs(), ENOENT | ESRCH | ENODEV) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn describe(cidr: &IpNet, nexthop: &Nexthop) -> String {
    let dev = match nexthop.dev {
        Dev::Underlay => "underlay".to_owned(),
        Dev::Vxlan => VXLAN_IFNAME.to_owned(),
        Dev::Other(index) => format!("ifindex {index}"),
    };
    let onlink = if nexthop.onlink { " onlink" } else { "" };
    format!("{cidr} via {} dev {dev}{onlink}", nexthop.gateway)
}
