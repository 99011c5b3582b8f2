//! NetworkPolicy in the kernel: per-endpoint rule tries (see
//! `fairlead_ebpf_common::policy` for the design), compiled from rule
//! instances and written as diffs.
//!
//! Every change is ordered so that no packet is ever allowed that both the
//! old and the new policy deny: new prefixes are written before changed ones
//! and deleted ones go last, so the longest match for any peer is at every
//! instant a prefix whose value is the old or the new verdict for that peer;
//! isolation is switched on only after the rules are in, and off before they
//! are deleted.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError};
use fairlead_ebpf_common::policy::{
    EndpointValue, PolCtKey, PolCtValue, PortRule, RuleKey, RuleValue, CONF_ENFORCE, DIR_EGRESS,
    DIR_INGRESS, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED, MAP_POL_CONF, MAP_POL_EP,
    MAP_POL_RULES, MAX_RULES_PER_PREFIX, RULE_KEY_FIXED_BITS,
};
pub use fairlead_ebpf_common::policy::{FlowEvent, VERDICT_DROPPED, VERDICT_FORWARDED};

use crate::{lb::table::map_addr, Error};

/// An address prefix (`10.0.0.0/8`, `fd00::/64`, a pod's `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            addr: mask(addr, len.min(max)),
            len: len.min(max),
        }
    }

    /// The whole family (`0.0.0.0/0` or `::/0`) of `addr`.
    pub fn any_of(addr: IpAddr) -> Self {
        Self::new(addr, 0)
    }

    /// One address.
    pub fn host(addr: IpAddr) -> Self {
        Self::new(addr, if addr.is_ipv4() { 32 } else { 128 })
    }

    /// Whether `self` lies within `other` (same family).
    pub fn within(&self, other: &Prefix) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.len >= other.len
            && mask(self.addr, other.len) == other.addr
    }

    /// Bits of the 16-byte map form this prefix fixes.
    fn map_bits(&self) -> u32 {
        if self.addr.is_ipv4() {
            96 + u32::from(self.len)
        } else {
            u32::from(self.len)
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

/// One peer of one rule: a prefix, its `except`s, and the ports it allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInstance {
    pub prefix: Prefix,
    pub except: Vec<Prefix>,
    pub ports: Vec<PortRule>,
}

/// A port rule: `proto` 0 = any, ports in host order, inclusive.
pub fn port_rule(proto: u8, lo: u16, hi: u16, policy: u32) -> PortRule {
    PortRule {
        proto,
        _pad: 0,
        port_lo: lo,
        port_hi: hi,
        _pad1: 0,
        policy,
    }
}

/// The trie contents for one direction: every prefix any instance names
/// (and every except), each with the union of the ports of the instances
/// that contain it and do not except it. Ports are merged (same protocol,
/// overlapping or adjacent ranges) so the value stays small.
pub fn compile(instances: &[RuleInstance]) -> BTreeMap<Prefix, Vec<PortRule>> {
    // Host instances (a pod's /32 or /128, the bulk) contain only their own prefix; they are
    // looked up by prefix. Only wider instances are tested against every prefix, so the work
    // is prefixes x CIDR rules, not prefixes x all rules.
    let host_len = |p: &Prefix| if p.addr.is_ipv4() { 32 } else { 128 };
    let mut hosts: HashMap<Prefix, Vec<PortRule>> = HashMap::new();
    let mut wide: Vec<&RuleInstance> = Vec::new();
    for i in instances {
        if i.prefix.len == host_len(&i.prefix) && i.except.is_empty() {
            hosts
                .entry(i.prefix)
                .or_default()
                .extend(i.ports.iter().copied());
        } else {
            wide.push(i);
        }
    }
    let prefixes: BTreeSet<Prefix> = instances
        .iter()
        .flat_map(|i| std::iter::once(i.prefix).chain(i.except.iter().copied()))
        .collect();
    prefixes
        .into_iter()
        .map(|p| {
            let mut ports: Vec<PortRule> = hosts.get(&p).cloned().unwrap_or_default();
            ports.extend(
                wide.iter()
                    .filter(|i| p.within(&i.prefix) && !i.except.iter().any(|e| p.within(e)))
                    .flat_map(|i| i.ports.iter().copied()),
            );
            (p, merge_ports(ports))
        })
        .collect()
}

fn merge_ports(mut ports: Vec<PortRule>) -> Vec<PortRule> {
    // "Any protocol, any port" swallows everything else.
    if let Some(all) = ports
        .iter()
        .find(|r| r.proto == 0 && r.port_lo == 0 && r.port_hi == u16::MAX)
    {
        return vec![*all];
    }
    ports.sort_by_key(|r| (r.proto, r.port_lo, r.port_hi, r.policy));
    let mut out: Vec<PortRule> = Vec::new();
    for r in ports {
        if let Some(last) = out.last_mut() {
            if last.proto == r.proto && u32::from(r.port_lo) <= u32::from(last.port_hi) + 1 {
                last.port_hi = last.port_hi.max(r.port_hi);
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// What one endpoint (a pod on this node, by one of its addresses) may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub ingress: BTreeMap<Prefix, Vec<PortRule>>,
    pub egress: BTreeMap<Prefix, Vec<PortRule>>,
}

impl EndpointPolicy {
    /// Not selected by any policy: everything allowed.
    pub fn open() -> Self {
        Self::default()
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.ingress_isolated {
            f |= EP_F_INGRESS_ISOLATED;
        }
        if self.egress_isolated {
            f |= EP_F_EGRESS_ISOLATED;
        }
        f
    }
}

/// What one write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyReport {
    pub map_ops: usize,
    /// Prefixes with more port rules than a map value holds: programmed as
    /// deny (fail closed).
    pub overflow: Vec<(IpAddr, u8, Prefix)>,
}

pub(crate) struct PolicyMaps {
    pub ep: BpfHashMap<MapData, [u32; 4], EndpointValue>,
    pub rules: LpmTrie<MapData, RuleKey, RuleValue>,
    pub conf: Array<MapData, u32>,
    pub ct: BpfHashMap<MapData, PolCtKey, PolCtValue>,
    /// What the maps hold, per endpoint address.
    programmed: HashMap<IpAddr, EndpointPolicy>,
    failures: u64,
}

fn err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::MapWrite {
        map,
        source: Box::new(source),
    }
}

fn rule_key(dir: u8, endpoint: IpAddr, p: &Prefix) -> Key<RuleKey> {
    Key::new(
        RULE_KEY_FIXED_BITS + p.map_bits(),
        RuleKey {
            dir,
            _pad0: 0,
            _pad1: 0,
            endpoint: map_addr(endpoint),
            peer: map_addr(p.addr),
        },
    )
}

impl PolicyMaps {
    pub fn new(
        ep: BpfHashMap<MapData, [u32; 4], EndpointValue>,
        rules: LpmTrie<MapData, RuleKey, RuleValue>,
        conf: Array<MapData, u32>,
        ct: BpfHashMap<MapData, PolCtKey, PolCtValue>,
    ) -> Self {
        let mut maps = Self {
            ep,
            rules,
            conf,
            ct,
            programmed: HashMap::new(),
            failures: 0,
        };
        maps.adopt();
        maps
    }

    /// Rebuilds what a previous agent left, so its first sync writes only
    /// differences and removes endpoints that are gone.
    fn adopt(&mut self) {
        let eps: Vec<([u32; 4], EndpointValue)> = self.ep.iter().filter_map(|e| e.ok()).collect();
        for (addr, v) in eps {
            let ip = crate::lb::table::unmap_addr(&addr);
            let e = self.programmed.entry(ip).or_default();
            e.ingress_isolated = v.flags & EP_F_INGRESS_ISOLATED != 0;
            e.egress_isolated = v.flags & EP_F_EGRESS_ISOLATED != 0;
        }
        let entries: Vec<(Key<RuleKey>, RuleValue)> =
            self.rules.iter().filter_map(|e| e.ok()).collect();
        for (k, v) in entries {
            let data = k.data();
            let ip = crate::lb::table::unmap_addr(&data.endpoint);
            let peer = crate::lb::table::unmap_addr(&data.peer);
            let bits = k.prefix_len().saturating_sub(RULE_KEY_FIXED_BITS);
            let len = if peer.is_ipv4() {
                bits.saturating_sub(96)
            } else {
                bits
            };
            let prefix = Prefix::new(peer, len as u8);
            let rules = v.rules[..(v.count as usize).min(MAX_RULES_PER_PREFIX)].to_vec();
            let e = self.programmed.entry(ip).or_default();
            if data.dir == DIR_INGRESS {
                e.ingress.insert(prefix, rules);
            } else {
                e.egress.insert(prefix, rules);
            }
        }
    }

    pub fn set_enforcement(&mut self, on: bool) -> Result<(), Error> {
        self.conf
            .set(CONF_ENFORCE, u32::from(on), 0)
            .map_err(err(MAP_POL_CONF))
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &IpAddr> {
        self.programmed.keys()
    }

    /// Programs one endpoint. If a write fails (a full map), the endpoint is
    /// left isolated both ways (fail closed: only rules already written can
    /// allow anything) and the error returned.
    pub fn set_endpoint(
        &mut self,
        ip: IpAddr,
        want: &EndpointPolicy,
    ) -> Result<PolicyReport, Error> {
        match self.try_set_endpoint(ip, want) {
            Ok(r) => Ok(r),
            Err(e) => {
                let closed = EndpointValue {
                    flags: EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED,
                    _pad: 0,
                };
                let _ = self.ep.insert(map_addr(ip), closed, 0);
                // Unknown state: the next call rewrites everything.
                self.programmed.remove(&ip);
                self.failures += 1;
                Err(e)
            }
        }
    }

    /// Writes that failed so far (each left its endpoint closed).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn try_set_endpoint(
        &mut self,
        ip: IpAddr,
        want: &EndpointPolicy,
    ) -> Result<PolicyReport, Error> {
        let old = self.programmed.get(&ip).cloned();
        let had_entry = old.is_some();
        let old = old.unwrap_or_default();
        if had_entry && old == *want {
            return Ok(PolicyReport::default());
        }
        let mut report = PolicyReport::default();
        // Relaxing isolation goes first; tightening last (see the module docs).
        let flags_off = EndpointValue {
            flags: old.flags() & want.flags(),
            _pad: 0,
        };
        if !had_entry || flags_off.flags != old.flags() {
            self.ep
                .insert(map_addr(ip), flags_off, 0)
                .map_err(err(MAP_POL_EP))?;
            report.map_ops += 1;
        }
        for (dir, old_rules, new_rules) in [
            (DIR_INGRESS, &old.ingress, &want.ingress),
            (DIR_EGRESS, &old.egress, &want.egress),
        ] {
            // Added, then changed, then removed.
            let added = new_rules.iter().filter(|(p, _)| !old_rules.contains_key(p));
            let changed = new_rules
                .iter()
                .filter(|(p, r)| old_rules.get(p).is_some_and(|o| o != *r));
            for (p, rules) in added.chain(changed) {
                let mut value = RuleValue::default();
                if rules.len() > MAX_RULES_PER_PREFIX {
                    report.overflow.push((ip, dir, *p));
                } else {
                    value.count = rules.len() as u32;
                    value.rules[..rules.len()].copy_from_slice(rules);
                }
                self.rules
                    .insert(&rule_key(dir, ip, p), value, 0)
                    .map_err(err(MAP_POL_RULES))?;
                report.map_ops += 1;
            }
            for p in old_rules.keys().filter(|p| !new_rules.contains_key(p)) {
                match self.rules.remove(&rule_key(dir, ip, p)) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(err(MAP_POL_RULES)(e)),
                }
                report.map_ops += 1;
            }
        }
        if want.flags() != flags_off.flags {
            let v = EndpointValue {
                flags: want.flags(),
                _pad: 0,
            };
            self.ep
                .insert(map_addr(ip), v, 0)
                .map_err(err(MAP_POL_EP))?;
            report.map_ops += 1;
        }
        self.programmed.insert(ip, want.clone());
        Ok(report)
    }

    /// Forgets a pod address: its packets are dropped (fail closed) from
    /// here on, and its rules and tracked connections go.
    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error> {
        match self.ep.remove(&map_addr(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(err(MAP_POL_EP)(e)),
        }
        if let Some(old) = self.programmed.remove(&ip) {
            for (dir, rules) in [(DIR_INGRESS, &old.ingress), (DIR_EGRESS, &old.egress)] {
                for p in rules.keys() {
                    let _ = self.rules.remove(&rule_key(dir, ip, p));
                }
            }
        }
        let addr = map_addr(ip);
        let stale: Vec<PolCtKey> = self
            .ct
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, _)| k.endpoint == addr)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.ct.remove(&k);
        }
        Ok(())
    }

    /// Deletes tracked connections whose lifetime has passed.
    pub fn gc(&mut self, now: u64) -> usize {
        let dead: Vec<PolCtKey> = self
            .ct
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for k in &dead {
            let _ = self.ct.remove(k);
        }
        dead.len()
    }
}

pub(crate) const POLICY_MAPS: [&str; 5] = fairlead_ebpf_common::policy::MAPS;

/// The datapath's flow events (`fl_flows_v1`), read by one consumer (the
/// agent). Poll [`FlowReader::as_raw_fd`] for readability, then [`FlowReader::drain`].
pub struct FlowReader {
    ring: aya::maps::RingBuf<MapData>,
}

impl FlowReader {
    pub(crate) fn new(ring: aya::maps::RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Hands every event waiting to `f`; the number handed.
    pub fn drain(&mut self, mut f: impl FnMut(FlowEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent (plain integers, any bit
                // pattern valid); read unaligned from the ring's memory.
                let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
                f(event);
                n += 1;
            }
        }
        n
    }
}

impl std::os::fd::AsRawFd for FlowReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').unwrap();
        Prefix::new(a.parse().unwrap(), l.parse().unwrap())
    }

    #[test]
    fn except_carves_out_and_more_specific_rules_add_back() {
        let inst = vec![
            RuleInstance {
                prefix: p("10.0.0.0/8"),
                except: vec![p("10.1.0.0/16")],
                ports: vec![port_rule(6, 80, 80, 1)],
            },
            RuleInstance {
                prefix: p("10.1.0.5/32"),
                except: vec![],
                ports: vec![port_rule(6, 81, 81, 2)],
            },
            RuleInstance {
                prefix: p("0.0.0.0/0"),
                except: vec![],
                ports: vec![port_rule(17, 53, 53, 3)],
            },
        ];
        let c = compile(&inst);
        let ports =
            |s: &str| -> Vec<(u8, u16)> { c[&p(s)].iter().map(|r| (r.proto, r.port_lo)).collect() };
        assert_eq!(ports("10.0.0.0/8"), [(6, 80), (17, 53)]);
        assert_eq!(ports("10.1.0.0/16"), [(17, 53)], "the except loses port 80");
        assert_eq!(
            ports("10.1.0.5/32"),
            [(6, 81), (17, 53)],
            "inside the except: only its own"
        );
        assert_eq!(ports("0.0.0.0/0"), [(17, 53)]);
    }

    #[test]
    fn ports_merge_and_any_swallows() {
        let merged = merge_ports(vec![
            port_rule(6, 80, 80, 1),
            port_rule(6, 81, 90, 1),
            port_rule(6, 85, 100, 2),
            port_rule(17, 53, 53, 1),
        ]);
        assert_eq!(
            merged
                .iter()
                .map(|r| (r.proto, r.port_lo, r.port_hi))
                .collect::<Vec<_>>(),
            [(6, 80, 100), (17, 53, 53)]
        );
        let any = merge_ports(vec![port_rule(6, 80, 80, 1), port_rule(0, 0, u16::MAX, 2)]);
        assert_eq!(any.len(), 1);
    }
}
