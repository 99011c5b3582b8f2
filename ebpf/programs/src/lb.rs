//! Service load balancing: the kube-proxy replacement's datapath.
//!
//! Hooks (maps and layouts in `fairlead_ebpf_common::lb`):
//! - `lb_from_pod`, tc ingress of a pod's host-side veth (packets leaving the
//!   pod): reverse translation of replies from a local backend, then Service
//!   translation of packets to a frontend (new flows pick a backend and get
//!   two conntrack entries; later packets follow the forward entry).
//! - `lb_to_pod`, tc egress of the same veth (packets entering the pod):
//!   reverse translation of replies from remote backends.
//! - `lb_from_net`, tc ingress of the node's underlay interface: NodePort,
//!   externalIPs and LoadBalancer IPs from outside (external scope), and the
//!   replies to flows this node SNATed to a backend on another node.
//! - `lb_connect4/6`, `lb_sendmsg4/6`, `lb_recvmsg4/6`: socket-level load
//!   balancing for pods in the cgroup they are attached to. The socket is
//!   connected straight to the backend, so its packets are never translated
//!   again; the tc path serves only what these hooks cannot see.
//!
//! Headers are read and written with `bpf_skb_load_bytes`/`store_bytes` and
//! checksums fixed with the csum helpers: that works on non-linear (GSO)
//! packets and on CHECKSUM_PARTIAL ones, where the TCP checksum field holds
//! only the pseudo-header sum and a hand-computed delta would be wrong.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_sock_addr, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_set_retval,
        bpf_skb_change_tail,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, TcContext},
    EbpfContext,
};
use fairlead_ebpf_common::{
    lb::*,
    policy::{DIR_EGRESS, DIR_INGRESS},
    str_eq,
};

use crate::policy;

const _: () = assert!(str_eq("fl_lb_svc_v1", MAP_SVC));
const _: () = assert!(str_eq("fl_lb_be_v1", MAP_BACKENDS));
const _: () = assert!(str_eq("fl_lb_mag_v1", MAP_MAGLEV));
const _: () = assert!(str_eq("fl_lb_ct_v1", MAP_CT));
const _: () = assert!(str_eq("fl_lb_aff_v1", MAP_AFFINITY));
const _: () = assert!(str_eq("fl_lb_skrev_v1", MAP_SOCK_REV));
const _: () = assert!(str_eq("fl_lb_stats_v1", MAP_STATS));
const _: () = assert!(str_eq("fl_lb_node_v1", MAP_NODE));
const _: () = assert!(str_eq("fl_lb_skfwd_v1", MAP_SOCK_FWD));

#[map(name = "fl_lb_svc_v1")]
static SVC: HashMap<SvcKey, SvcValue> = HashMap::with_max_entries(MAX_SVC_ENTRIES, 0);
#[map(name = "fl_lb_be_v1")]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(MAX_BACKENDS, 0);
#[map(name = "fl_lb_mag_v1")]
static MAGLEV: HashMap<u32, MaglevTable> = HashMap::with_max_entries(MAX_MAGLEV, 0);
#[map(name = "fl_lb_ct_v1")]
static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CT, 0);
#[map(name = "fl_lb_aff_v1")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);
#[map(name = "fl_lb_skrev_v1")]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(MAX_SOCK_REV, 0);
#[map(name = "fl_lb_skfwd_v1")]
static SOCK_FWD: LruHashMap<SockRevKey, SockFwdValue> =
    LruHashMap::with_max_entries(MAX_SOCK_REV, 0);
#[map(name = "fl_lb_skskip_v1")]
static SOCK_SKIP: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_SOCK_SKIP, 0);
#[map(name = "fl_lb_stats_v1")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);
#[map(name = "fl_lb_node_v1")]
pub(crate) static NODE: Array<[u32; 4]> = Array::with_max_entries(2, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
pub(crate) fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; tc and cgroup programs
        // run with migration disabled, so no other writer exists.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no arguments, always safe to call.
    unsafe { bpf_ktime_get_ns() }
}

/// A parsed TCP or UDP packet. Addresses in the maps' 16-byte form.
struct Pkt {
    v4: bool,
    l4_off: usize,
    proto: u8,
    tcp_flags: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

impl Pkt {
    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    /// Offset of the L4 checksum.
    fn csum_off(&self) -> usize {
        self.l4_off + if self.proto == PROTO_TCP { 16 } else { 6 }
    }

    /// Flags for l4_csum_replace: a zero UDP checksum means "none" over IPv4
    /// and must stay zero.
    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_flow: u32,
    payload_len: u16,
    next: u8,
    hop: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Parses Ethernet + IPv4/IPv6 + TCP/UDP; `None` for anything else (passed
/// untouched): other protocols, IPv6 extension headers, non-first fragments.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Pkt> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v4, l4_off, proto, saddr, daddr) = if ethertype == ETH_P_IP {
        let ip: Ipv4Hdr = ctx.load(ETH_HLEN).ok()?;
        // Fragment offset non-zero: no L4 header in this packet.
        if u16::from_be(ip.frag) & 0x1fff != 0 {
            return None;
        }
        let ihl = (ip.ver_ihl & 0x0f) as usize;
        if ihl < 5 {
            return None;
        }
        (
            true,
            ETH_HLEN + ihl * 4,
            ip.proto,
            v4_addr(ip.saddr),
            v4_addr(ip.daddr),
        )
    } else if ethertype == ETH_P_IPV6 {
        let ip: Ipv6Hdr = ctx.load(ETH_HLEN).ok()?;
        (false, ETH_HLEN + 40, ip.next, ip.saddr, ip.daddr)
    } else {
        return None;
    };
    // SCTP is parsed for NetworkPolicy (its ports sit where UDP's do); no
    // Service frontend is ever SCTP, so the load balancer never touches it.
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4_off).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + 13).ok()?
    } else {
        0
    };
    Some(Pkt {
        v4,
        l4_off,
        proto,
        tcp_flags,
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
    })
}

#[inline(always)]
fn v4_addr(raw: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), raw]
}

#[inline(always)]
fn addr_eq(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Rewrites the source (or destination) address and fixes both checksums.
#[inline(always)]
fn set_addr(ctx: &TcContext, p: &Pkt, dst: bool, old: &[u32; 4], new: &[u32; 4]) -> Result<(), ()> {
    if p.v4 {
        let off = ETH_HLEN + if dst { 16 } else { 12 };
        ctx.store(off, &new[3], 0).map_err(|_| ())?;
        ctx.l3_csum_replace(ETH_HLEN + 10, old[3] as u64, new[3] as u64, 4)
            .map_err(|_| ())?;
        ctx.l4_csum_replace(
            p.csum_off(),
            old[3] as u64,
            new[3] as u64,
            BPF_F_PSEUDO_HDR as u64 | 4 | p.l4_flags(),
        )
        .map_err(|_| ())?;
    } else {
        let off = ETH_HLEN + if dst { 24 } else { 8 };
        ctx.store(off, new, 0).map_err(|_| ())?;
        let mut from = *old;
        let mut to = *new;
        // SAFETY: both buffers are 16-byte stack arrays, the sizes passed.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(
            p.csum_off(),
            0,
            diff as u64,
            BPF_F_PSEUDO_HDR as u64 | p.l4_flags(),
        )
        .map_err(|_| ())?;
    }
    Ok(())
}

/// Rewrites the source (or destination) port and fixes the L4 checksum.
#[inline(always)]
fn set_port(ctx: &TcContext, p: &Pkt, dst: bool, old: u16, new: u16) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.store(p.l4_off + if dst { 2 } else { 0 }, &new, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(p.csum_off(), old as u64, new as u64, 2 | p.l4_flags())
        .map_err(|_| ())
}

/// Lifetime of a flow in its current state.
#[inline(always)]
pub(crate) fn lifetime_ns(proto: u8, flags: u16) -> u64 {
    let s = if proto != PROTO_TCP {
        CT_UDP_S
    } else if flags & CT_F_CLOSING != 0 {
        CT_TCP_CLOSING_S
    } else if flags & CT_F_SEEN_REPLY != 0 {
        CT_TCP_ESTABLISHED_S
    } else {
        CT_TCP_SYN_S
    };
    s * 1_000_000_000
}

/// Marks a packet's effect on its entry: FIN/RST shortens it, and the
/// lifetime is pushed out at most once per [`CT_REFRESH_NS`].
#[inline(always)]
fn touch(ct: *mut CtValue, p: &Pkt, now: u64, extra_flags: u16) {
    // SAFETY: `ct` is a live element pointer from bpf_map_lookup_elem; a
    // concurrent writer can only store another valid lifetime or flag set.
    unsafe {
        let mut flags = (*ct).flags | extra_flags;
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags |= CT_F_CLOSING;
        }
        let expires = now + lifetime_ns(p.proto, flags);
        if flags != (*ct).flags || expires > (*ct).expires_ns + CT_REFRESH_NS {
            (*ct).flags = flags;
            (*ct).expires_ns = expires;
        }
    }
}

/// Where the tc program runs, which decides how translated packets leave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    FromPod,
    ToPod,
    FromNet,
}

#[classifier]
pub fn lb_from_pod(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::FromPod)
}

#[classifier]
pub fn lb_to_pod(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::ToPod)
}

#[classifier]
pub fn lb_from_net(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::FromNet)
}

/// skb->mark bit of packets this program bounced back into a pod (hairpin,
/// resets, ICMP errors): the veth's egress program must not judge them
/// again (the mark is scrubbed when the packet crosses into the pod).
const MARK_BOUNCED: u32 = 0x0fa1_0000;

#[inline(always)]
fn tc_entry(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_OK as i32;
    };
    let now = now_ns();
    if hook == Hook::ToPod {
        // SAFETY: reading a plain field of the valid context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        // Ingress policy before reverse translation: it judges the real peer.
        if mark & MARK_BOUNCED != MARK_BOUNCED
            && !policy::allowed(
                DIR_INGRESS,
                &p.daddr,
                &p.saddr,
                p.dport,
                p.sport,
                p.proto,
                p.tcp_flags,
                now,
            )
        {
            return TC_ACT_SHOT as i32;
        }
    }
    match handle(ctx, &p, hook, now) {
        Ok(verdict) => verdict,
        // A helper failed mid-rewrite: the packet may be half translated.
        Err(()) => TC_ACT_SHOT as i32,
    }
}

/// Egress policy of the pod behind this veth for a packet to `peer`
/// (after Service translation).
#[inline(always)]
fn egress_ok(p: &Pkt, hook: Hook, peer: &[u32; 4], peer_port: u16, now: u64) -> bool {
    hook != Hook::FromPod
        || policy::allowed(
            DIR_EGRESS,
            &p.saddr,
            peer,
            p.sport,
            peer_port,
            p.proto,
            p.tcp_flags,
            now,
        )
}

#[inline(always)]
fn handle(ctx: &TcContext, p: &Pkt, hook: Hook, now: u64) -> Result<i32, ()> {
    if hook != Hook::ToPod {
        let scope = if hook == Hook::FromNet {
            Scope::External
        } else {
            Scope::Internal
        };
        let skey = SvcKey {
            addr: p.daddr,
            port: p.dport,
            proto: p.proto,
            scope: scope as u8,
            slot: 0,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once; entries are replaced, not
        // written in place, by userspace.
        if let Some(svc) = unsafe { SVC.get(&skey) } {
            let svc = *svc;
            let fkey = p.key(CT_FORWARD);
            if let Some(ct) = CT.get_ptr_mut(&fkey) {
                // SAFETY: live element pointer; fields copied.
                if unsafe { (*ct).expires_ns } > now {
                    touch(ct, p, now, 0);
                    // SAFETY: as above.
                    let value = unsafe { *ct };
                    if !egress_ok(p, hook, &value.peer_addr, value.peer_port, now) {
                        return Ok(TC_ACT_SHOT as i32);
                    }
                    count(Stat::Forward);
                    return forward(ctx, p, &value, hook);
                }
            }
            return new_flow(ctx, p, &skey, &svc, hook, now);
        }
        if !egress_ok(p, hook, &p.daddr, p.dport, now) {
            return Ok(TC_ACT_SHOT as i32);
        }
        if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            forget_stale_reply(p);
        }
    }
    let rkey = p.key(CT_REPLY);
    if let Some(ct) = CT.get_ptr_mut(&rkey) {
        // SAFETY: live element pointer; fields copied.
        let value = unsafe { *ct };
        if value.expires_ns > now {
            if value.flags & CT_F_SEEN_REPLY == 0 {
                established(&value, p, now);
            }
            touch(ct, p, now, CT_F_SEEN_REPLY);
            count(Stat::Reply);
            return reply(ctx, p, &value, hook);
        }
    }
    Ok(TC_ACT_OK as i32)
}

/// A SYN that is not for a Service opens a new connection on its 4-tuple. If a closed
/// Service flow left a reply entry for exactly this tuple (the client reused its source
/// port, now talking to the backend directly), that entry would rewrite the new
/// connection's replies to come from the Service: it is stale, so it goes.
#[inline(always)]
fn forget_stale_reply(p: &Pkt) {
    let stale = CtKey {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    if CT.remove(&stale).is_ok() {
        count(Stat::StaleReplyDropped);
    }
}

/// First reply of a flow: the forward entry learns that the flow is
/// established, so an idle connection keeps its backend for the long
/// lifetime rather than the SYN one.
#[inline(always)]
fn established(reply: &CtValue, p: &Pkt, now: u64) {
    let snat = reply.flags & CT_F_SNAT != 0;
    let fkey = CtKey {
        saddr: if snat { reply.client_addr } else { p.daddr },
        daddr: reply.peer_addr,
        sport: if snat { reply.client_port } else { p.dport },
        dport: reply.peer_port,
        proto: p.proto,
        dir: CT_FORWARD,
        _pad: 0,
    };
    if let Some(ct) = CT.get_ptr_mut(&fkey) {
        // SAFETY: live element pointer.
        unsafe {
            (*ct).flags |= CT_F_SEEN_REPLY;
            (*ct).expires_ns = now + lifetime_ns(p.proto, (*ct).flags);
        }
    }
}

/// Translates a packet of a known flow towards its backend.
#[inline(always)]
fn forward(ctx: &TcContext, p: &Pkt, ct: &CtValue, hook: Hook) -> Result<i32, ()> {
    set_addr(ctx, p, true, &p.daddr, &ct.peer_addr)?;
    set_port(ctx, p, true, p.dport, ct.peer_port)?;
    if ct.flags & CT_F_SNAT != 0 {
        set_addr(ctx, p, false, &p.saddr, &ct.client_addr)?;
        set_port(ctx, p, false, p.sport, ct.client_port)?;
    }
    if ct.flags & CT_F_HAIRPIN != 0 {
        return bounce(ctx);
    }
    if ct.flags & CT_F_SNAT != 0 && hook == Hook::FromNet {
        // The new source is this node's address: the stack would drop it as
        // a martian, so route it here.
        return fib_redirect(ctx, p.v4, &ct.client_addr, &ct.peer_addr);
    }
    Ok(TC_ACT_OK as i32)
}

/// Reverse-translates a reply: the source becomes the frontend again.
#[inline(always)]
fn reply(ctx: &TcContext, p: &Pkt, ct: &CtValue, hook: Hook) -> Result<i32, ()> {
    set_addr(ctx, p, false, &p.saddr, &ct.peer_addr)?;
    set_port(ctx, p, false, p.sport, ct.peer_port)?;
    let dst = if ct.flags & CT_F_SNAT != 0 {
        set_addr(ctx, p, true, &p.daddr, &ct.client_addr)?;
        set_port(ctx, p, true, p.dport, ct.client_port)?;
        ct.client_addr
    } else {
        p.daddr
    };
    if ct.flags & CT_F_HAIRPIN != 0 {
        return bounce(ctx);
    }
    if ct.flags & CT_F_NODE != 0 && hook != Hook::ToPod {
        return fib_redirect(ctx, p.v4, &ct.peer_addr, &dst);
    }
    Ok(TC_ACT_OK as i32)
}

/// Sends the packet back out of the interface it came in on (hairpin, and
/// resets), with the Ethernet addresses swapped.
#[inline(always)]
fn bounce(ctx: &TcContext) -> Result<i32, ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        swapped[i] = macs[i + 6];
        swapped[i + 6] = macs[i];
        i += 1;
    }
    ctx.store(0, &swapped, 0).map_err(|_| ())?;
    // SAFETY: reading plain fields of the valid context.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    ctx.set_mark(mark | MARK_BOUNCED);
    // SAFETY: plain helper call; flags 0 means egress of `ifindex`.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Routes the packet from here (FIB lookup in the node's namespace) and
/// sends it to the next hop's interface, resolving its neighbour.
#[inline(always)]
fn fib_redirect(ctx: &TcContext, v4: bool, src: &[u32; 4], dst: &[u32; 4]) -> Result<i32, ()> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = if v4 { AF_INET } else { AF_INET6 };
    // SAFETY: reading a plain field of the valid context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if v4 {
        params.__bindgen_anon_3.ipv4_src = src[3];
        params.__bindgen_anon_4.ipv4_dst = dst[3];
    } else {
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: `params` is a valid, correctly sized struct on our stack.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(Stat::FibFailed);
        return Ok(TC_ACT_SHOT as i32);
    }
    // SAFETY: a null `params` makes the helper do its own neighbour lookup.
    Ok(unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// A cheap, well-mixed 32-bit hash (murmur3's finaliser over a fold).
#[inline(always)]
fn mix(mut h: u32, v: u32) -> u32 {
    h ^= v
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn flow_hash(p: &Pkt) -> u32 {
    let mut h = mix(0x5bd1_e995, p.saddr[0] ^ p.saddr[1] ^ p.saddr[2]);
    h = mix(h, p.saddr[3]);
    h = mix(h, p.daddr[3]);
    h = mix(h, ((p.sport as u32) << 16) | p.dport as u32);
    finish(mix(h, p.proto as u32))
}

/// Picks a backend id for a new flow: the client's affinity entry if it is
/// still valid, else Maglev or a random slot.
#[inline(always)]
fn select(skey: &SvcKey, svc: &SvcValue, client: &[u32; 4], hash: u32, now: u64) -> Option<u32> {
    let aff_key = AffinityKey {
        client: *client,
        svc: svc.id,
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        if let Some(a) = AFFINITY.get_ptr_mut(&aff_key) {
            // SAFETY: live element pointer.
            let (last, backend) = unsafe { ((*a).last_ns, (*a).backend) };
            let timeout = svc.affinity_timeout_s as u64 * 1_000_000_000;
            // SAFETY: lookup only.
            if now < last + timeout && unsafe { BACKENDS.get(&backend) }.is_some() {
                // SAFETY: live element pointer.
                unsafe { (*a).last_ns = now };
                return Some(backend);
            }
        }
    }
    let backend = if svc.flags & SVC_F_MAGLEV != 0 {
        // SAFETY: the table is read by one element.
        let table = unsafe { MAGLEV.get(&svc.id) }?;
        // LLVM turns `% MAGLEV_M` into a multiply-and-shift whose result the
        // verifier cannot bound ("R0 unbounded memory access"). A volatile
        // re-read hides the arithmetic, so the explicit check below survives
        // optimisation and gives the verifier its bound.
        let idx = (hash % MAGLEV_M as u32) as usize;
        // SAFETY: reading a local variable.
        let idx = unsafe { core::ptr::read_volatile(&idx) };
        if idx >= MAGLEV_M {
            return None;
        }
        table[idx]
    } else {
        let count = svc.count as u32;
        if count == 0 {
            return None;
        }
        // SAFETY: no arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        let slot = (r % count) as u16 + 1;
        let key = SvcKey { slot, ..*skey };
        // SAFETY: copied out at once.
        unsafe { SVC.get(&key) }?.backend
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        let value = AffinityValue {
            last_ns: now,
            backend,
            _pad: 0,
        };
        let _ = AFFINITY.insert(&aff_key, &value, 0);
    }
    Some(backend)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    p: &Pkt,
    skey: &SvcKey,
    svc: &SvcValue,
    hook: Hook,
    now: u64,
) -> Result<i32, ()> {
    if svc.count == 0 {
        if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            count(Stat::NoBackendReset);
            return reset(ctx, p);
        }
        if p.proto == PROTO_UDP {
            count(Stat::NoBackendUnreachable);
            return unreachable(ctx, p);
        }
        count(Stat::NoBackendDrop);
        return Ok(TC_ACT_SHOT as i32);
    }
    let hash = flow_hash(p);
    let Some(id) = select(skey, svc, &p.saddr, hash, now) else {
        count(Stat::BackendMissing);
        return Ok(TC_ACT_SHOT as i32);
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { BACKENDS.get(&id) }).copied() else {
        count(Stat::BackendMissing);
        return Ok(TC_ACT_SHOT as i32);
    };

    if !egress_ok(p, hook, &be.addr, be.port, now) {
        return Ok(TC_ACT_SHOT as i32);
    }
    let hairpin = hook == Hook::FromPod && addr_eq(&be.addr, &p.saddr);
    // From outside to a backend on another node (externalTrafficPolicy
    // Cluster): the reply must come back here to be translated, so the
    // source becomes this node's address (the frontend the client hit).
    let snat = hook == Hook::FromNet && be.flags & BE_F_LOCAL == 0;
    let mut flags = 0u16;
    let (mut client_addr, mut client_port) = (p.saddr, p.sport);
    if hairpin {
        flags |= CT_F_SNAT | CT_F_HAIRPIN;
        client_addr = if p.v4 {
            mapped_v4(HAIRPIN_V4)
        } else {
            from_v6(HAIRPIN_V6)
        };
        count(Stat::Hairpin);
    } else if snat {
        flags |= CT_F_SNAT;
        // This node's own address, where the backend's replies come back to. The
        // frontend address is one only for NodePorts; an externalIP or LoadBalancer IP
        // is routed to us but owned by no node.
        let index = if p.v4 { NODE_ADDR_V4 } else { NODE_ADDR_V6 };
        client_addr = match NODE.get(index) {
            Some(a) if a[0] | a[1] | a[2] | a[3] != 0 => *a,
            _ => p.daddr,
        };
    }
    if svc.flags & SVC_F_NODE != 0 {
        flags |= CT_F_NODE;
    }

    let mut value = CtValue {
        expires_ns: now + lifetime_ns(p.proto, 0),
        peer_addr: p.daddr,
        client_addr: p.saddr,
        backend: id,
        svc: svc.id,
        peer_port: p.dport,
        client_port: p.sport,
        flags,
        _pad: 0,
    };
    let mut rkey = CtKey {
        saddr: be.addr,
        daddr: client_addr,
        sport: be.port,
        dport: client_port,
        proto: p.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    if snat {
        // Claim a free port for the reply tuple: the client's own first,
        // then a few hashed ones from the SNAT range.
        let mut claimed = false;
        let mut i = 0u32;
        while i < 4 {
            if i > 0 {
                let off = (hash.wrapping_add(i.wrapping_mul(7919))) % SNAT_PORT_COUNT as u32;
                client_port = (SNAT_PORT_MIN + off as u16).to_be();
            }
            rkey.dport = client_port;
            if CT.insert(&rkey, &value, BPF_NOEXIST as u64).is_ok() {
                claimed = true;
                break;
            }
            i += 1;
        }
        if !claimed {
            count(Stat::SnatExhausted);
            return Ok(TC_ACT_SHOT as i32);
        }
    } else if CT.insert(&rkey, &value, 0).is_err() {
        count(Stat::CtFull);
        return Ok(TC_ACT_SHOT as i32);
    }

    value.peer_addr = be.addr;
    value.peer_port = be.port;
    value.client_addr = client_addr;
    value.client_port = client_port;
    if CT.insert(&p.key(CT_FORWARD), &value, 0).is_err() {
        let _ = CT.remove(&rkey);
        count(Stat::CtFull);
        return Ok(TC_ACT_SHOT as i32);
    }
    count(Stat::NewFlow);
    forward(ctx, p, &value, hook)
}

/// One's-complement sum of 16-bit words (network order as stored).
#[inline(always)]
fn csum_add<const N: usize>(sum: u32, words: &[u32; N]) -> u32 {
    let mut s = sum;
    let mut i = 0;
    while i < N {
        s += words[i] & 0xffff;
        s += words[i] >> 16;
        i += 1;
    }
    s
}

#[inline(always)]
fn csum_fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    off_flags: u16,
    window: u16,
    csum: u16,
    urg: u16,
}

/// Answers a SYN to a Service without backends with a RST, sent back out of
/// the interface it came in on, so the client fails at once instead of
/// retrying SYNs for two minutes.
#[inline(always)]
fn reset(ctx: &TcContext, p: &Pkt) -> Result<i32, ()> {
    let seq: u32 = ctx.load(p.l4_off + 4).map_err(|_| ())?;
    let l3_len = if p.v4 { 20 } else { 40 };
    if p.l4_off != ETH_HLEN + l3_len {
        // IPv4 options: not worth rebuilding, drop the SYN instead.
        return Ok(TC_ACT_SHOT as i32);
    }
    let new_len = (ETH_HLEN + l3_len + 20) as u32;
    // SAFETY: the context pointer is valid; the helper trims the packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, new_len, 0) } != 0 {
        return Err(());
    }
    let mut tcp = TcpHdr {
        sport: p.dport,
        dport: p.sport,
        seq: 0,
        ack: (u32::from_be(seq).wrapping_add(1)).to_be(),
        // Data offset 5 words; RST|ACK.
        off_flags: ((5u16 << 12) | (TCP_RST | TCP_ACK) as u16).to_be(),
        window: 0,
        csum: 0,
        urg: 0,
    };
    // Pseudo header: addresses, protocol and TCP length (20).
    let mut sum = if p.v4 {
        let a = [p.saddr[3], p.daddr[3], 0, 0];
        csum_add(0, &a)
    } else {
        csum_add(csum_add(0, &p.saddr), &p.daddr)
    };
    sum += (PROTO_TCP as u16).to_be() as u32 + 20u16.to_be() as u32;
    // SAFETY: TcpHdr is 20 bytes of plain integers; viewed as five u32s.
    let words: [u32; 5] = unsafe { core::mem::transmute(tcp) };
    sum = csum_add(sum, &[words[0], words[1], words[2], words[3]]);
    sum = csum_add(sum, &[words[4], 0, 0, 0]);
    tcp.csum = csum_fold(sum);

    if p.v4 {
        let mut ip = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0,
            tot_len: 40u16.to_be(),
            id: 0,
            frag: 0x4000u16.to_be(),
            ttl: 64,
            proto: PROTO_TCP,
            csum: 0,
            saddr: p.daddr[3],
            daddr: p.saddr[3],
        };
        // SAFETY: Ipv4Hdr is 20 bytes of plain integers.
        let w: [u32; 5] = unsafe { core::mem::transmute(ip) };
        let s = csum_add(csum_add(0, &[w[0], w[1], w[2], w[3]]), &[w[4], 0, 0, 0]);
        ip.csum = csum_fold(s);
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
    } else {
        let ip = Ipv6Hdr {
            ver_flow: 0x6000_0000u32.to_be(),
            payload_len: 20u16.to_be(),
            next: PROTO_TCP,
            hop: 64,
            saddr: p.daddr,
            daddr: p.saddr,
        };
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
    }
    ctx.store(ETH_HLEN + l3_len, &tcp, 0).map_err(|_| ())?;
    bounce(ctx)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

/// Answers a UDP datagram to a Service without backends with ICMP port
/// unreachable (ICMPv6 for IPv6), quoting the datagram's IP header and first
/// 8 bytes as RFC 792/4443 ask, sent back out of the interface it came in on:
/// a connected socket's next `recv` fails with ECONNREFUSED at once instead of
/// waiting for its timeout (what kube-proxy's REJECT rule does).
#[inline(always)]
fn unreachable(ctx: &TcContext, p: &Pkt) -> Result<i32, ()> {
    let l3_len = if p.v4 { 20 } else { 40 };
    if p.l4_off != ETH_HLEN + l3_len {
        // IPv4 options: drop rather than quote a header of odd length.
        return Ok(TC_ACT_SHOT as i32);
    }
    if p.v4 {
        // Original IPv4 header and UDP header: 28 bytes.
        let quote: [u32; 7] = ctx.load(ETH_HLEN).map_err(|_| ())?;
        let new_len = (ETH_HLEN + 20 + 8 + 28) as u32;
        // SAFETY: the context pointer is valid; the helper resizes the packet.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, new_len, 0) } != 0 {
            return Err(());
        }
        let mut icmp = IcmpHdr {
            kind: 3, // destination unreachable
            code: 3, // port unreachable
            csum: 0,
            unused: 0,
        };
        // SAFETY: IcmpHdr is 8 bytes of plain integers.
        let w: [u32; 2] = unsafe { core::mem::transmute(icmp) };
        icmp.csum = csum_fold(csum_add(csum_add(0, &w), &quote));
        let mut ip = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0xc0,
            tot_len: ((20 + 8 + 28) as u16).to_be(),
            id: 0,
            frag: 0,
            ttl: 64,
            proto: 1,
            csum: 0,
            saddr: p.daddr[3],
            daddr: p.saddr[3],
        };
        // SAFETY: Ipv4Hdr is 20 bytes of plain integers.
        let w: [u32; 5] = unsafe { core::mem::transmute(ip) };
        ip.csum = csum_fold(csum_add(0, &w));
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN + 20, &icmp, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN + 28, &quote, 0).map_err(|_| ())?;
    } else {
        // Original IPv6 header and UDP header: 48 bytes.
        let quote: [u32; 12] = ctx.load(ETH_HLEN).map_err(|_| ())?;
        let new_len = (ETH_HLEN + 40 + 8 + 48) as u32;
        // SAFETY: as above.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, new_len, 0) } != 0 {
            return Err(());
        }
        let mut icmp = IcmpHdr {
            kind: 1, // destination unreachable
            code: 4, // port unreachable
            csum: 0,
            unused: 0,
        };
        // Pseudo header: addresses, upper-layer length (56) and next header (58).
        let mut sum = csum_add(csum_add(0, &p.saddr), &p.daddr);
        sum += 56u16.to_be() as u32 + 58u16.to_be() as u32;
        // SAFETY: IcmpHdr is 8 bytes of plain integers.
        let w: [u32; 2] = unsafe { core::mem::transmute(icmp) };
        icmp.csum = csum_fold(csum_add(csum_add(sum, &w), &quote));
        let ip = Ipv6Hdr {
            ver_flow: 0x6000_0000u32.to_be(),
            payload_len: 56u16.to_be(),
            next: 58,
            hop: 64,
            saddr: p.daddr,
            daddr: p.saddr,
        };
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN + 40, &icmp, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN + 48, &quote, 0).map_err(|_| ())?;
    }
    bounce(ctx)
}

// ---------------------------------------------------------------------------
// Socket-level load balancing.

/// Marks an [`AffinityKey::client`] as a network namespace cookie rather than
/// an address (ff00::/8 is multicast, never a source).
const NETNS_CLIENT: u32 = u32::from_ne_bytes([0xff, 0xfe, 0xfa, 0x1e]);

#[derive(Clone, Copy, PartialEq, Eq)]
enum SockHook {
    Connect,
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, true, SockHook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, false, SockHook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, true, SockHook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_translate(&ctx, false, SockHook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx, false)
}

#[inline(always)]
fn user_addr(sa: *mut bpf_sock_addr, v4: bool) -> [u32; 4] {
    // SAFETY: `sa` is the kernel's valid context; these fields allow 4-byte
    // reads for the attach types these programs are loaded for.
    unsafe {
        if v4 {
            v4_addr((*sa).user_ip4)
        } else {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        }
    }
}

#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, v4: bool, addr: &[u32; 4], port: u16) {
    // SAFETY: as in `user_addr`; these fields allow 4-byte writes.
    unsafe {
        if v4 {
            (*sa).user_ip4 = addr[3];
        } else {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        }
        (*sa).user_port = port as u32;
    }
}

/// Returns 1 (allow) after pointing the socket at a backend, or 0 with
/// ECONNREFUSED when the Service has no backends.
///
/// TCP is translated at `connect()`, once per connection. UDP is translated
/// only per datagram at `sendmsg()` on an unconnected socket, sticking to one
/// backend per (socket, frontend) while that backend stays in the Service: a
/// connected UDP socket would keep the backend it was connected to after the
/// backend is gone (the stale-conntrack black hole in another form), so
/// `connect()` on UDP is left to the tc path, whose conntrack entries are
/// flushed when a backend leaves.
#[inline(always)]
fn sock_translate(ctx: &SockAddrContext, v4: bool, hook: SockHook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: plain reads of the valid context.
    let (proto, port) = unsafe { ((*sa).protocol as u8, (*sa).user_port as u16) };
    let wanted = match hook {
        SockHook::Connect => proto == PROTO_TCP,
        SockHook::Sendmsg => proto == PROTO_UDP,
    };
    if !wanted {
        return 1;
    }
    // A meshed pod: its sidecar balances (it must see the Service address).
    // SAFETY: helper call on the valid context; the lookup result is only tested.
    if unsafe { SOCK_SKIP.get(&bpf_get_netns_cookie(ctx.as_ptr())) }.is_some() {
        return 1;
    }
    let addr = user_addr(sa, v4);
    // A v4 frontend cannot be reached from a v6 socket's plain v6 address and
    // vice versa; `::ffff:a.b.c.d` on a v6 socket finds the v4 entry.
    let skey = SvcKey {
        addr,
        port,
        proto,
        scope: Scope::Internal as u8,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SVC.get(&skey) }).copied() else {
        return 1;
    };
    if svc.count == 0 {
        count(Stat::SockRefused);
        // SAFETY: plain helper call on a cgroup program.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return 0;
    }
    // SAFETY: helper calls on the valid context.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let fwd_key = SockRevKey {
        cookie,
        addr,
        port,
        _pad0: 0,
        _pad1: 0,
    };
    let now = now_ns();
    // UDP: the backend this socket used for this frontend, while it serves.
    let sticky = if hook == SockHook::Sendmsg {
        // SAFETY: copied out at once.
        unsafe { SOCK_FWD.get(&fwd_key) }
            .copied()
            .filter(|f| f.svc == svc.id)
            .map(|f| f.backend)
    } else {
        None
    };
    let id = match sticky {
        Some(id) => id,
        None => {
            let client = [NETNS_CLIENT, 0, netns as u32, (netns >> 32) as u32];
            let hash = finish(mix(mix(cookie as u32, (cookie >> 32) as u32), addr[3]));
            let Some(id) = select(&skey, &svc, &client, hash, now) else {
                count(Stat::BackendMissing);
                return 1;
            };
            id
        }
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { BACKENDS.get(&id) }).copied() else {
        count(Stat::BackendMissing);
        let _ = SOCK_FWD.remove(&fwd_key);
        return 1;
    };
    // A v4 socket cannot take a v6 backend (userspace never mixes families
    // within a frontend; this guards the write).
    if v4 && !is_v4(&be.addr) {
        return 1;
    }
    set_user_addr(sa, v4, &be.addr, be.port);
    if hook == SockHook::Sendmsg {
        if sticky.is_none() {
            let fwd = SockFwdValue {
                backend: id,
                svc: svc.id,
            };
            let _ = SOCK_FWD.insert(&fwd_key, &fwd, 0);
        }
        let key = SockRevKey {
            cookie,
            addr: be.addr,
            port: be.port,
            _pad0: 0,
            _pad1: 0,
        };
        let value = SockRevValue {
            addr,
            port,
            _pad0: 0,
        };
        let _ = SOCK_REV.insert(&key, &value, 0);
    }
    count(Stat::SockTranslated);
    1
}

/// recvmsg on a UDP socket: a datagram from a backend shows the frontend the
/// application sent to as its source.
#[inline(always)]
fn sock_reverse(ctx: &SockAddrContext, v4: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: plain read of the valid context.
    let port = unsafe { (*sa).user_port } as u16;
    let key = SockRevKey {
        // SAFETY: helper call on the valid context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: user_addr(sa, v4),
        port,
        _pad0: 0,
        _pad1: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REV.get(&key) }.copied() {
        set_user_addr(sa, v4, &rev.addr, rev.port);
    }
    1
}
