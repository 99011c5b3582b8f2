//! NetworkPolicy verdicts, called from the pod veth programs in `lb.rs`:
//! egress (packets leaving a pod) after Service translation, so a policy
//! judges the real backend; ingress (packets entering a pod) before reverse
//! translation, so it judges the real peer. Layouts and the design are in
//! `fairlead_ebpf_common::policy`.
//!
//! A connection a verdict allowed gets an entry in `fl_pol_ct_v1` keyed as the
//! endpoint sees it, so its replies (and later packets) pass without rules.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, RingBuf},
};
use fairlead_ebpf_common::{lb::*, policy::*, str_eq};

use crate::lb::{count, lifetime_ns, NODE};

const _: () = assert!(str_eq("fl_pol_ep_v1", MAP_POL_EP));
const _: () = assert!(str_eq("fl_pol_rules_v1", MAP_POL_RULES));
const _: () = assert!(str_eq("fl_pol_ct_v1", MAP_POL_CT));
const _: () = assert!(str_eq("fl_pol_conf_v1", MAP_POL_CONF));
const _: () = assert!(str_eq("fl_flows_v1", MAP_FLOWS));

#[map(name = "fl_flows_v1")]
static FLOWS: RingBuf = RingBuf::with_byte_size(FLOWS_BYTES, 0);

#[map(name = "fl_pol_ep_v1")]
static ENDPOINTS: HashMap<[u32; 4], EndpointValue> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
#[map(name = "fl_pol_rules_v1")]
static RULES: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_RULE_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
#[map(name = "fl_pol_ct_v1")]
static POL_CT: LruHashMap<PolCtKey, PolCtValue> = LruHashMap::with_max_entries(MAX_POL_CT, 0);
#[map(name = "fl_pol_conf_v1")]
static CONF: Array<u32> = Array::with_max_entries(4, 0);

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// The hairpin source addresses: a pod reaching itself through its Service.
#[inline(always)]
fn is_hairpin(a: &[u32; 4]) -> bool {
    let v4 = mapped_v4(HAIRPIN_V4);
    let v6 = from_v6(HAIRPIN_V6);
    (a[0] == v4[0] && a[1] == v4[1] && a[2] == v4[2] && a[3] == v4[3])
        || (a[0] == v6[0] && a[1] == v6[1] && a[2] == v6[2] && a[3] == v6[3])
}

/// One of this node's own addresses (kubelet probes and the node's own
/// traffic are always let in, as every Kubernetes network plugin does).
#[inline(always)]
fn is_node(a: &[u32; 4]) -> bool {
    let mut i = 0;
    while i < 2 {
        if let Some(n) = NODE.get(i) {
            if n[0] == a[0] && n[1] == a[1] && n[2] == a[2] && n[3] == a[3] && n[3] != 0 {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether the rules allow `peer` on (`proto`, `port` in host byte order):
/// the id of the policy whose rule did.
#[inline(always)]
fn rules_allow(dir: u8, endpoint: &[u32; 4], peer: &[u32; 4], proto: u8, port: u16) -> Option<u32> {
    let key = Key::new(
        RULE_KEY_FIXED_BITS + 128,
        RuleKey {
            dir,
            _pad0: 0,
            _pad1: 0,
            endpoint: *endpoint,
            peer: *peer,
        },
    );
    let value = RULES.get(&key)?;
    let n = value.count as usize;
    let mut i = 0;
    while i < MAX_RULES_PER_PREFIX {
        if i >= n {
            break;
        }
        let r = &value.rules[i];
        if (r.proto == 0 || r.proto == proto) && r.port_lo <= port && port <= r.port_hi {
            return Some(r.policy);
        }
        i += 1;
    }
    None
}

/// One connection as the endpoint sees it.
struct Flow<'a> {
    dir: u8,
    endpoint: &'a [u32; 4],
    peer: &'a [u32; 4],
    endpoint_port: u16,
    peer_port: u16,
    proto: u8,
}

/// Reports one verdict to userspace; a full ring buffer costs the event,
/// never the packet.
#[inline(always)]
fn emit(f: &Flow<'_>, verdict: u8, reason: Stat, policy: u32, now: u64) {
    let event = FlowEvent {
        ts_ns: now,
        endpoint: *f.endpoint,
        peer: *f.peer,
        endpoint_port: f.endpoint_port,
        peer_port: f.peer_port,
        proto: f.proto,
        dir: f.dir,
        verdict,
        reason: reason as u8,
        policy,
        _pad: 0,
    };
    // No wake-up per event: a wake-up per new connection cost a quarter of the connection
    // rate (benches/policy/policy_cost.rs); the agent drains the ring on a short timer.
    if FLOWS
        .output::<FlowEvent>(&event, aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(Stat::FlowEventsLost);
    }
}

/// The verdict for one packet of `endpoint` (a pod on this node) with
/// `peer`, `dir` from the endpoint's point of view; ports in network byte
/// order, `dport` the destination port of the packet.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn allowed(
    dir: u8,
    endpoint: &[u32; 4],
    peer: &[u32; 4],
    endpoint_port: u16,
    peer_port: u16,
    proto: u8,
    tcp_flags: u8,
    now: u64,
) -> bool {
    if CONF.get(CONF_ENFORCE).copied().unwrap_or(0) == 0 {
        return true;
    }
    let flow = Flow {
        dir,
        endpoint,
        peer,
        endpoint_port,
        peer_port,
        proto,
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(endpoint) }).copied() else {
        // A pod the agent has not programmed: fail closed.
        count(Stat::PolicyUnknownEndpoint);
        emit(&flow, VERDICT_DROPPED, Stat::PolicyUnknownEndpoint, 0, now);
        return false;
    };
    let key = PolCtKey {
        endpoint: *endpoint,
        peer: *peer,
        endpoint_port,
        peer_port,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    let mut ct_flags = 0u16;
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags |= CT_F_CLOSING;
    }
    if let Some(ct) = POL_CT.get_ptr_mut(&key) {
        // SAFETY: live element pointer.
        unsafe {
            if (*ct).expires_ns > now {
                let expires = now + lifetime_ns(proto, CT_F_SEEN_REPLY | ct_flags);
                if expires > (*ct).expires_ns + CT_REFRESH_NS || ct_flags != 0 {
                    (*ct).expires_ns = expires;
                }
                return true;
            }
        }
    }
    let isolated = if dir == DIR_INGRESS {
        ep.flags & EP_F_INGRESS_ISOLATED != 0
    } else {
        ep.flags & EP_F_EGRESS_ISOLATED != 0
    };
    let decided = if !isolated || (dir == DIR_INGRESS && (is_node(peer) || is_hairpin(peer))) {
        Some(0)
    } else {
        rules_allow(
            dir,
            endpoint,
            peer,
            proto,
            u16::from_be(if dir == DIR_INGRESS {
                endpoint_port
            } else {
                peer_port
            }),
        )
    };
    let Some(policy) = decided else {
        let reason = if dir == DIR_INGRESS {
            Stat::PolicyDeniedIngress
        } else {
            Stat::PolicyDeniedEgress
        };
        count(reason);
        emit(&flow, VERDICT_DROPPED, reason, 0, now);
        return false;
    };
    emit(&flow, VERDICT_FORWARDED, Stat::NewFlow, policy, now);
    let value = PolCtValue {
        expires_ns: now + lifetime_ns(proto, ct_flags),
        dir,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let _ = POL_CT.insert(&key, &value, 0);
    true
}
