//! Per-interface packet and byte counters on tc ingress and egress.
//!
//! Counting must never change traffic: both programs always return
//! `TC_ACT_OK`, which with tcx means "continue to the next program / the
//! stack", and they read only `__sk_buff` fields, never packet data.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    macros::{classifier, map},
    maps::LruPerCpuHashMap,
    programs::TcContext,
};
use fairlead_ebpf_common::{
    ifstats::{Direction, IfStatsKey, IfStatsValue, MAP_IFSTATS, MAP_IFSTATS_MAX_ENTRIES},
    str_eq,
};

// `#[map(name = ...)]` wants a literal; this keeps it equal to the shared const.
const _: () = assert!(str_eq("fl_ifstats_v1", MAP_IFSTATS));

#[map(name = "fl_ifstats_v1")]
static IFSTATS: LruPerCpuHashMap<IfStatsKey, IfStatsValue> =
    LruPerCpuHashMap::with_max_entries(MAP_IFSTATS_MAX_ENTRIES, 0);

#[classifier]
pub fn ifstats_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_OK
}

#[classifier]
pub fn ifstats_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_OK
}

#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) {
    // SAFETY: the kernel passes a valid `__sk_buff` context; `ifindex` is a
    // plain readable field (skb->dev->ifindex: the device this hook runs on).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = IfStatsKey::new(ifindex, direction);
    // skb->len: the whole frame, Ethernet header included on both hooks.
    let bytes = u64::from(ctx.len());

    if add(&key, bytes) {
        return;
    }
    // First packet on this interface and direction. A per-CPU update from BPF
    // writes only this CPU's slot, so the starting value is this packet.
    // BPF_NOEXIST: if another CPU created the entry since our lookup, the
    // insert fails and we add to our own (zeroed) slot of that entry instead.
    let first = IfStatsValue { packets: 1, bytes };
    if IFSTATS
        .insert(&key, &first, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Only fails if the entry now exists; a miss here loses one packet,
        // which is preferable to a loop the verifier would have to bound.
        add(&key, bytes);
    }
}

/// Adds one packet to this CPU's slot; false when the entry does not exist.
#[inline(always)]
fn add(key: &IfStatsKey, bytes: u64) -> bool {
    match IFSTATS.get_ptr_mut(key) {
        Some(value) => {
            // SAFETY: a non-null pointer from bpf_map_lookup_elem into this
            // CPU's slot of a per-CPU map; no other CPU writes it, and tc
            // programs run with migration disabled, so plain adds are safe.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += bytes;
            }
            true
        }
        None => false,
    }
}
