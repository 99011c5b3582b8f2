//! NetworkPolicy enforcement: map layouts shared by the datapath
//! (`ebpf/programs/src/policy.rs`) and the agent that compiles policies.
//!
//! Design: per-endpoint rule maps, not label identities. For every pod on
//! the node (an endpoint, keyed by its IP) and each direction, the agent
//! compiles the allowed peers into one LPM trie keyed by (direction,
//! endpoint IP, peer prefix): the longest matching prefix's value lists the
//! (protocol, port range) pairs allowed to and from that peer. Every prefix
//! any rule names (ipBlock CIDRs, their excepts, selected pods' /32 and
//! /128) is in the trie, and each prefix's value is the union of the rules
//! whose CIDR contains it and whose excepts do not, so one lookup answers
//! "which ports may this peer use" exactly, ipBlock `except` included.
//! Why not identities (Cilium): identities need a cluster-wide allocator and
//! an IP-to-identity cache; per-endpoint maps need neither, are exact for
//! named ports (resolved per peer pod) and cost entries only for the pods of
//! this node. The cost grows with the peers each local pod's policies select.
//!
//! Addresses use the load balancer's 16-byte form (IPv4-mapped).

use core::mem::size_of;

pub const MAP_POL_EP: &str = "fl_pol_ep_v1";
pub const MAP_POL_RULES: &str = "fl_pol_rules_v1";
pub const MAP_POL_CT: &str = "fl_pol_ct_v1";
pub const MAP_POL_CONF: &str = "fl_pol_conf_v1";
/// Ring buffer of [`FlowEvent`]s: new connections a verdict let through and
/// every packet one dropped.
pub const MAP_FLOWS: &str = "fl_flows_v1";
/// Bytes of [`MAP_FLOWS`] (a power of two and a multiple of the page size).
pub const FLOWS_BYTES: u32 = 1 << 20;

pub const MAPS: [&str; 5] = [
    MAP_POL_EP,
    MAP_POL_RULES,
    MAP_POL_CT,
    MAP_POL_CONF,
    MAP_FLOWS,
];

const _: () = {
    let mut i = 0;
    while i < MAPS.len() {
        assert!(crate::name_fits(MAPS[i]));
        i += 1;
    }
};

pub const MAX_ENDPOINTS: u32 = 16_384;
/// A node of 100 pods under 1,000 policies over 5,000 identities needed 247,634
/// (benches/policy/policy_cost.rs); entries are allocated as used (no prealloc).
pub const MAX_RULE_PREFIXES: u32 = 1_048_576;
pub const MAX_POL_CT: u32 = 262_144;

/// Directions, from the endpoint's point of view.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// [`EndpointValue::flags`]: some policy selects the pod for ingress.
pub const EP_F_INGRESS_ISOLATED: u32 = 1 << 0;
/// Some policy selects the pod for egress.
pub const EP_F_EGRESS_ISOLATED: u32 = 1 << 1;

/// Value of [`MAP_POL_EP`] (key: the endpoint's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<EndpointValue>() == 8);

/// Key of [`MAP_POL_RULES`] after the LPM prefix length: the first
/// `8 + 24 + 128` bits are always compared (direction, padding, endpoint);
/// the prefix length adds the peer prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub dir: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    pub endpoint: [u32; 4],
    pub peer: [u32; 4],
}

const _: () = assert!(size_of::<RuleKey>() == 36);

/// Bits of [`RuleKey`] before the peer address.
pub const RULE_KEY_FIXED_BITS: u32 = 32 + 128;

/// Rules per prefix. A prefix that needs more is programmed as deny-all and
/// reported (fail closed), never truncated into allowing less than it says
/// while claiming success.
pub const MAX_RULES_PER_PREFIX: usize = 8;

/// One allowed (protocol, port range); protocol 0 means any, as does the
/// range 0..=65535.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    pub proto: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port_lo: u16,
    pub port_hi: u16,
    pub _pad1: u16,
    /// Index of the NetworkPolicy that allowed it (for flow events).
    pub policy: u32,
}

const _: () = assert!(size_of::<PortRule>() == 12);

/// Value of [`MAP_POL_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleValue {
    pub count: u32,
    pub rules: [PortRule; MAX_RULES_PER_PREFIX],
}

const _: () = assert!(size_of::<RuleValue>() == 4 + 12 * MAX_RULES_PER_PREFIX);

/// Key of [`MAP_POL_CT`]: a connection as the endpoint sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolCtKey {
    pub endpoint: [u32; 4],
    pub peer: [u32; 4],
    /// Network byte order.
    pub endpoint_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

const _: () = assert!(size_of::<PolCtKey>() == 40);

/// Value of [`MAP_POL_CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolCtValue {
    pub expires_ns: u64,
    /// The direction that opened it ([`DIR_INGRESS`] or [`DIR_EGRESS`]).
    pub dir: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    pub _pad2: u32,
}

const _: () = assert!(size_of::<PolCtValue>() == 16);

/// [`FlowEvent::verdict`]: a new connection allowed.
pub const VERDICT_FORWARDED: u8 = 0;
/// [`FlowEvent::verdict`]: a packet dropped.
pub const VERDICT_DROPPED: u8 = 1;

/// One flow event from the datapath (see [`MAP_FLOWS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// The pod on this node.
    pub endpoint: [u32; 4],
    pub peer: [u32; 4],
    /// Network byte order.
    pub endpoint_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], from the endpoint's side.
    pub dir: u8,
    /// [`VERDICT_FORWARDED`] or [`VERDICT_DROPPED`].
    pub verdict: u8,
    /// For drops: the `lb::Stat` counted (the drop reason).
    pub reason: u8,
    /// The policy id whose rule allowed it (0: the pod is not isolated, or a drop).
    pub policy: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<FlowEvent>() == 56);

/// Index in [`MAP_POL_CONF`]: enforcement on (1) or off (0). Off, every
/// packet passes (no agent programs policy); on, a packet of a pod the agent
/// has not programmed is dropped (fail closed).
pub const CONF_ENFORCE: u32 = 0;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all): `#[repr(C)]`, `Copy`, integers only, no implicit padding
    // (sizes asserted above).
    unsafe impl aya::Pod for EndpointValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolCtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolCtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowEvent {}
}
