//! Service load balancing (the kube-proxy replacement): map layouts shared by
//! the datapath (`ebpf/programs/src/lb/`) and the agent that programs it.
//!
//! One set of maps serves both IP families: every address is 16 bytes, IPv4
//! as the IPv4-mapped IPv6 address `::ffff:a.b.c.d`. That halves the maps,
//! the programs and the userspace compiler, and it makes an IPv6 socket that
//! connects to `::ffff:<ClusterIP>` hit the IPv4 Service for free. The cost is
//! 12 bytes more per IPv4 key, which the hash does not notice.
//!
//! Addresses are stored as `[u32; 4]` in network byte order (the bytes as they
//! are on the wire), ports as `u16` in network byte order, as the packet
//! carries them, so the datapath never converts.
//!
//! Maps (pinned under `/sys/fs/bpf/fairlead-<instance>/` so an agent restart
//! keeps every connection):
//! - [`MAP_SVC`]: frontend (address, port, protocol, scope) and slot ->
//!   [`SvcValue`]. Slot 0 is the Service's master entry (backend count,
//!   flags, id); slots `1..=count` name its backends. Growing writes the new
//!   slots before the count, shrinking lowers the count before deleting
//!   slots, so no reader ever sees a Service without backends mid-update.
//! - [`MAP_BACKENDS`]: backend id -> [`Backend`].
//! - [`MAP_MAGLEV`]: Service id -> Maglev lookup table of backend ids.
//! - [`MAP_CT`]: connection tracking, both directions of every translated
//!   flow ([`CtKey`] -> [`CtValue`]), LRU.
//! - [`MAP_AFFINITY`]: sessionAffinity ClientIP (client, Service) -> backend.
//! - [`MAP_SOCK_REV`]: socket-LB reverse translation for UDP replies.
//! - [`MAP_SOCK_FWD`]: socket-LB UDP stickiness: (socket, frontend) -> the
//!   backend its datagrams go to, deleted with the backend.
//! - [`MAP_STATS`]: per-CPU counters by [`Stat`].
//! - [`MAP_NODE`]: this node's own addresses ([`NODE_ADDR_V4`], [`NODE_ADDR_V6`]), the
//!   source of flows SNATed to a backend on another node (the frontend address itself may
//!   be an externalIP no node owns, to which replies would not come back).

use core::mem::size_of;

pub const MAP_SVC: &str = "fl_lb_svc_v1";
pub const MAP_BACKENDS: &str = "fl_lb_be_v1";
pub const MAP_MAGLEV: &str = "fl_lb_mag_v1";
pub const MAP_CT: &str = "fl_lb_ct_v1";
pub const MAP_AFFINITY: &str = "fl_lb_aff_v1";
pub const MAP_SOCK_REV: &str = "fl_lb_skrev_v1";
pub const MAP_STATS: &str = "fl_lb_stats_v1";
pub const MAP_NODE: &str = "fl_lb_node_v1";
pub const MAP_SOCK_FWD: &str = "fl_lb_skfwd_v1";
/// Network namespaces (by netns cookie) whose sockets socket-LB leaves alone: meshed pods,
/// whose sidecar must see the Service address to choose the endpoint itself. LRU: an
/// evicted entry only moves the choice back to socket-LB, which is still correct.
pub const MAP_SOCK_SKIP: &str = "fl_lb_skskip_v1";
pub const MAX_SOCK_SKIP: u32 = 65_536;

/// Every map, for pinning and teardown.
pub const MAPS: [&str; 10] = [
    MAP_SOCK_SKIP,
    MAP_NODE,
    MAP_SOCK_FWD,
    MAP_SVC,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CT,
    MAP_AFFINITY,
    MAP_SOCK_REV,
    MAP_STATS,
];

/// tc ingress of a pod's host-side veth: traffic leaving the pod.
pub const PROG_FROM_POD: &str = "lb_from_pod";
/// tc egress of a pod's host-side veth: traffic entering the pod.
pub const PROG_TO_POD: &str = "lb_to_pod";
/// tc ingress of the node's underlay interface: NodePort, externalIPs,
/// LoadBalancer ingress IPs, and replies to flows this node SNATed.
pub const PROG_FROM_NET: &str = "lb_from_net";
/// cgroup socket hooks (socket-level load balancing).
pub const PROG_CONNECT4: &str = "lb_connect4";
pub const PROG_CONNECT6: &str = "lb_connect6";
pub const PROG_SENDMSG4: &str = "lb_sendmsg4";
pub const PROG_SENDMSG6: &str = "lb_sendmsg6";
pub const PROG_RECVMSG4: &str = "lb_recvmsg4";
pub const PROG_RECVMSG6: &str = "lb_recvmsg6";

const _: () = {
    let mut i = 0;
    while i < MAPS.len() {
        assert!(crate::name_fits(MAPS[i]));
        i += 1;
    }
    assert!(crate::name_fits(PROG_FROM_POD));
    assert!(crate::name_fits(PROG_TO_POD));
    assert!(crate::name_fits(PROG_FROM_NET));
    assert!(crate::name_fits(PROG_CONNECT4));
    assert!(crate::name_fits(PROG_RECVMSG6));
};

pub const MAX_SVC_ENTRIES: u32 = 262_144;
pub const MAX_BACKENDS: u32 = 131_072;
pub const MAX_MAGLEV: u32 = 16_384;
pub const MAX_CT: u32 = 262_144;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_SOCK_REV: u32 = 65_536;

/// Size of each Service's Maglev table: a prime, and at least 100 times the
/// backends a Service is expected to have, so that removing one backend moves
/// about 1/N of the flows (Maglev paper, section 3.4). 1021 * 4 bytes is 4 KiB
/// per Service; Cilium's default of 16381 would be 64 KiB.
pub const MAGLEV_M: usize = 1021;

/// Source address a pod sees on a connection it made to itself through its
/// own Service (hairpin): without it the pod would see its own address as the
/// source and answer over loopback, bypassing the reverse translation.
pub const HAIRPIN_V4: [u8; 4] = [169, 254, 42, 1];
/// IPv6 hairpin source (a unique-local address no cluster range uses).
pub const HAIRPIN_V6: [u8; 16] = [
    0xfd, 0x00, 0x0f, 0xa1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42, 0x01,
];

/// Index of the node's IPv4 address in [`MAP_NODE`] (all zero: unknown).
pub const NODE_ADDR_V4: u32 = 0;
/// Index of the node's IPv6 address in [`MAP_NODE`].
pub const NODE_ADDR_V6: u32 = 1;

/// Ports a NodePort flow to another node's backend is SNATed to (outside
/// Linux's default ephemeral range 32768-60999, so never a local socket's).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_COUNT: u16 = 4_500;

/// Conntrack lifetimes (seconds), after Cilium's defaults.
pub const CT_TCP_SYN_S: u64 = 60;
pub const CT_TCP_ESTABLISHED_S: u64 = 21_600;
pub const CT_TCP_CLOSING_S: u64 = 10;
pub const CT_UDP_S: u64 = 60;
/// A CT entry's lifetime is written back at most this often per flow, so a
/// busy flow does not write its entry on every packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Which traffic a frontend entry is for: the same Service address can have
/// different backends inside and outside the cluster (traffic policies).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// From pods on this node (tc on pod veths, socket-LB): ClusterIP uses
    /// internalTrafficPolicy; NodePort/external frontends use all endpoints.
    Internal = 0,
    /// From outside the node (tc on the underlay): externalTrafficPolicy.
    External = 1,
}

/// Key of [`MAP_SVC`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// A [`Scope`] as `u8`.
    pub scope: u8,
    /// 0: master entry; 1..=count: backend slots.
    pub slot: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<SvcKey>() == 24);

/// Service flags in the master entry.
pub const SVC_F_AFFINITY: u16 = 1 << 0;
pub const SVC_F_MAGLEV: u16 = 1 << 1;
/// Frontend is a node address (NodePort) or an external one (externalIPs,
/// LoadBalancer ingress): replies leave through the node, not a pod's veth.
pub const SVC_F_NODE: u16 = 1 << 2;
/// externalTrafficPolicy Local (external scope): no SNAT, client source kept.
pub const SVC_F_LOCAL: u16 = 1 << 3;

/// Value of [`MAP_SVC`]. Master entry: `count`, `flags`, `id`,
/// `affinity_timeout_s`. Slot entry: `backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcValue {
    pub backend: u32,
    pub count: u16,
    pub flags: u16,
    /// Service id: the key of its Maglev table and affinity entries.
    pub id: u32,
    pub affinity_timeout_s: u32,
}

const _: () = assert!(size_of::<SvcValue>() == 16);

/// Backend flags.
/// The backend runs on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;

/// Value of [`MAP_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

const _: () = assert!(size_of::<Backend>() == 20);

/// Value of [`MAP_MAGLEV`]: backend ids.
pub type MaglevTable = [u32; MAGLEV_M];

/// Direction of a conntrack entry.
/// Key as the first packet looked before translation (client -> frontend).
pub const CT_FORWARD: u8 = 0;
/// Key as replies look before reverse translation (backend -> client, or
/// backend -> SNAT address).
pub const CT_REPLY: u8 = 1;

/// Key of [`MAP_CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}

const _: () = assert!(size_of::<CtKey>() == 40);

/// Conntrack flags.
/// A reply was seen (TCP: the handshake went both ways).
pub const CT_F_SEEN_REPLY: u16 = 1 << 0;
/// FIN or RST seen: the short closing lifetime applies.
pub const CT_F_CLOSING: u16 = 1 << 1;
/// The client side is rewritten too (hairpin or NodePort SNAT).
pub const CT_F_SNAT: u16 = 1 << 2;
/// Replies of this flow leave with a node address as source: they must be
/// redirected past the stack's martian-source check (FIB lookup + redirect).
pub const CT_F_NODE: u16 = 1 << 3;
/// Hairpin: the pod is its own backend; replies go back out its veth.
pub const CT_F_HAIRPIN: u16 = 1 << 4;

/// Value of [`MAP_CT`].
///
/// Forward entries rewrite the destination to `peer` (the backend) and, with
/// [`CT_F_SNAT`], the source to `client`. Reply entries rewrite the source to
/// `peer` (the frontend) and, with [`CT_F_SNAT`], the destination to
/// `client` (the real client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) after which the entry is dead.
    pub expires_ns: u64,
    pub peer_addr: [u32; 4],
    pub client_addr: [u32; 4],
    pub backend: u32,
    /// Service id.
    pub svc: u32,
    pub peer_port: u16,
    pub client_port: u16,
    pub flags: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<CtValue>() == 56);

/// Key of [`MAP_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub svc: u32,
}

const _: () = assert!(size_of::<AffinityKey>() == 20);

/// Value of [`MAP_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_ns: u64,
    pub backend: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Key of [`MAP_SOCK_REV`]: a UDP socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

const _: () = assert!(size_of::<SockRevKey>() == 32);

/// Value of [`MAP_SOCK_REV`]: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad0: u16,
}

const _: () = assert!(size_of::<SockRevValue>() == 20);

/// Value of [`MAP_SOCK_FWD`] (keyed by [`SockRevKey`] with the frontend's
/// address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwdValue {
    pub backend: u32,
    /// Frontend id, so a recycled frontend never inherits a mapping.
    pub svc: u32,
}

const _: () = assert!(size_of::<SockFwdValue>() == 8);

/// Counters in [`MAP_STATS`] (a per-CPU array indexed by these).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// New flow translated to a backend on the tc path.
    NewFlow = 0,
    /// Packet of a known flow translated (forward).
    Forward = 1,
    /// Reply reverse-translated.
    Reply = 2,
    /// TCP SYN to a Service with no backends, answered with a reset.
    NoBackendReset = 3,
    /// Other packet to a Service with no backends (not a SYN, not UDP), dropped.
    NoBackendDrop = 4,
    /// Socket-LB connect/sendmsg translated.
    SockTranslated = 5,
    /// Socket-LB connect to a Service with no backends, refused.
    SockRefused = 6,
    /// Conntrack insert failed (map full); the packet was dropped.
    CtFull = 7,
    /// No free SNAT port for a NodePort flow; dropped.
    SnatExhausted = 8,
    /// A slot or backend id pointed nowhere (mid-update race); dropped.
    BackendMissing = 9,
    /// Hairpin flow (a pod to itself through its Service).
    Hairpin = 10,
    /// FIB lookup for a node-sourced reply failed; dropped.
    FibFailed = 11,
    /// A new direct connection reused the 4-tuple of a closed Service flow; the old
    /// flow's reply entry was removed.
    StaleReplyDropped = 12,
    /// UDP datagram to a Service with no backends, answered ICMP port unreachable.
    NoBackendUnreachable = 13,
    /// NetworkPolicy: a packet into a pod denied.
    PolicyDeniedIngress = 14,
    /// NetworkPolicy: a packet out of a pod denied.
    PolicyDeniedEgress = 15,
    /// NetworkPolicy enforced, but the pod is not programmed yet: dropped.
    PolicyUnknownEndpoint = 16,
    /// A flow event did not fit in the ring buffer (userspace too slow).
    FlowEventsLost = 17,
}

pub const STAT_COUNT: u32 = 18;

pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "new_flow",
    "forward",
    "reply",
    "no_backend_reset",
    "no_backend_drop",
    "sock_translated",
    "sock_refused",
    "ct_full",
    "snat_exhausted",
    "backend_missing",
    "hairpin",
    "fib_failed",
    "stale_reply_dropped",
    "no_backend_unreachable",
    "policy_denied_ingress",
    "policy_denied_egress",
    "policy_unknown_endpoint",
    "flow_events_lost",
];

/// `addr` of an IPv4 address (network-order bytes) as stored in the maps.
pub const fn mapped_v4(octets: [u8; 4]) -> [u32; 4] {
    [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(octets),
    ]
}

/// `addr` of an IPv6 address (network-order bytes) as stored in the maps.
pub const fn from_v6(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// True for an IPv4-mapped address.
pub const fn is_v4(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all below): `#[repr(C)]`, `Copy`, integers only, no implicit
    // padding (sizes asserted above), so any bytes the kernel returns are a
    // valid value.
    unsafe impl aya::Pod for SvcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SvcValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockFwdValue {}
}
