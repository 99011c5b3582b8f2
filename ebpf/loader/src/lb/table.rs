//! What the agent wants programmed, and the writes that get the maps there.
//!
//! [`ServiceTable`] remembers, per frontend, what the kernel holds (master
//! entry, slot list, Maglev table), so a changed Service costs only the
//! entries that differ: one endpoint replaced is one slot write. Every change
//! is ordered so the datapath never sees a frontend with zero backends that
//! should have some: backends are written before the slots that name them,
//! new slots before the count that exposes them, the count lowered before the
//! slots beyond it are deleted, and a backend deleted only after no slot
//! names it. The kernel side is behind [`LbMaps`], so those orderings are
//! unit-tested against a recording fake.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
};

use fairlead_ebpf_common::lb::{
    from_v6, mapped_v4, Backend as BackendValue, MaglevTable, Scope, SvcKey, SvcValue, BE_F_LOCAL,
    MAGLEV_M, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODE,
};

use crate::{maglev, Error};

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// Where a frontend is reached: its address, port, protocol and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Internal => "internal",
            Scope::External => "external",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{} ({scope})", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{} ({scope})", self.port, self.proto),
        }
    }
}

/// One backend of a frontend (its protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    /// Runs on this node (externalTrafficPolicy Local needs no SNAT to it).
    pub local: bool,
}

/// Everything programmed for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    /// A node address (NodePort) or an external one (externalIPs,
    /// LoadBalancer ingress) rather than a ClusterIP.
    pub node: bool,
    /// externalTrafficPolicy Local on an external-scope frontend.
    pub local_policy: bool,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    pub maglev: bool,
    /// In slot order. Empty: the frontend rejects new connections.
    pub backends: Vec<BackendAddr>,
}

impl Frontend {
    fn flags(&self) -> u16 {
        let mut flags = 0;
        if self.affinity_timeout_s.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        if self.maglev {
            flags |= SVC_F_MAGLEV;
        }
        if self.node {
            flags |= SVC_F_NODE;
        }
        if self.local_policy {
            flags |= SVC_F_LOCAL;
        }
        flags
    }
}

/// The kernel maps, as the table writes them.
pub trait LbMaps {
    fn put_svc(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), Error>;
    fn del_svc(&mut self, key: &SvcKey) -> Result<(), Error>;
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), Error>;
    fn del_backend(&mut self, id: u32) -> Result<(), Error>;
    fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<(), Error>;
    fn del_maglev(&mut self, id: u32) -> Result<(), Error>;
    /// Deletes the conntrack entries of UDP flows from these (frontend id,
    /// backend id) pairs, so the next datagram picks a live backend at once.
    fn flush_udp(&mut self, pairs: &HashSet<(u32, u32)>) -> Result<usize, Error>;
}

/// What one call changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Frontends created or changed.
    pub written: usize,
    pub removed: usize,
    /// Map updates and deletes issued.
    pub map_ops: usize,
    /// UDP conntrack entries deleted because their backend went away.
    pub udp_flows_flushed: usize,
    /// Frontends refused because another owner has them (two Services
    /// claiming one external IP and port).
    pub conflicts: Vec<(FrontendKey, String)>,
}

impl ApplyReport {
    /// Adds another call's report to this one.
    pub fn merge(&mut self, other: ApplyReport) {
        self.written += other.written;
        self.removed += other.removed;
        self.map_ops += other.map_ops;
        self.udp_flows_flushed += other.udp_flows_flushed;
        self.conflicts.extend(other.conflicts);
    }
}

/// What the kernel holds for one frontend.
#[derive(Debug)]
struct Programmed {
    id: u32,
    owner: Option<String>,
    master: Option<SvcValue>,
    /// Backend id per slot (slot `i + 1`).
    slots: Vec<u32>,
    maglev: Option<Vec<u32>>,
    spec: Option<Frontend>,
}

#[derive(Debug)]
struct BackendSlot {
    id: u32,
    refs: usize,
    value: BackendValue,
}

type BackendKey = (IpAddr, u16, Proto);

/// Ids handed out from 1 up, reusing freed ones.
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        })
    }

    fn give(&mut self, id: u32) {
        self.free.push(id);
    }

    /// After adoption: continue above the highest id in use.
    fn reserve_up_to(&mut self, used: &HashSet<u32>) {
        self.next = used.iter().copied().max().unwrap_or(0);
        self.free = (1..self.next).filter(|i| !used.contains(i)).collect();
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct ServiceTable {
    frontends: HashMap<FrontendKey, Programmed>,
    owners: HashMap<String, BTreeSet<FrontendKey>>,
    backends: HashMap<BackendKey, BackendSlot>,
    backend_keys: HashMap<u32, BackendKey>,
    frontend_ids: Ids,
    backend_ids: Ids,
}

/// An address in the maps' 16-byte form.
pub fn map_addr(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => mapped_v4(a.octets()),
        IpAddr::V6(a) => from_v6(a.octets()),
    }
}

/// The address stored in a map's 16-byte form (IPv4-mapped for IPv4).
pub fn unmap_addr(addr: &[u32; 4]) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn svc_key(key: &FrontendKey, slot: u16) -> SvcKey {
    SvcKey {
        addr: map_addr(key.addr),
        port: key.port.to_be(),
        proto: key.proto.number(),
        scope: key.scope as u8,
        slot,
        _pad: 0,
    }
}

impl ServiceTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Frontends programmed.
    pub fn len(&self) -> usize {
        self.frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    /// The frontend programmed at `key`, if any.
    pub fn get(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.frontends.get(key).and_then(|p| p.spec.as_ref())
    }

    /// The id the datapath knows `key` by (conntrack `svc`, affinity).
    pub fn id(&self, key: &FrontendKey) -> Option<u32> {
        self.frontends.get(key).map(|p| p.id)
    }

    /// Takes over what a previous agent left in pinned maps, unowned, so the
    /// first sync rewrites only what changed while the agent was away, and
    /// [`ServiceTable::prune_unowned`] then removes what no Service claimed.
    pub fn adopt(&mut self, entries: &[(SvcKey, SvcValue)], backends: &[(u32, BackendValue)]) {
        for (id, value) in backends {
            let Some(proto) = Proto::from_number(value.proto) else {
                continue;
            };
            let key = (unmap_addr(&value.addr), u16::from_be(value.port), proto);
            self.backend_keys.insert(*id, key);
            self.backends.insert(
                key,
                BackendSlot {
                    id: *id,
                    refs: 0,
                    value: *value,
                },
            );
        }
        // Per frontend: its master entry and its (slot, backend id) entries.
        type Found = (Option<SvcValue>, Vec<(u16, u32)>);
        let mut by_frontend: HashMap<FrontendKey, Found> = HashMap::new();
        for (k, v) in entries {
            let (Some(proto), Some(scope)) = (Proto::from_number(k.proto), scope_of(k.scope))
            else {
                continue;
            };
            let key = FrontendKey {
                addr: unmap_addr(&k.addr),
                port: u16::from_be(k.port),
                proto,
                scope,
            };
            let entry = by_frontend.entry(key).or_default();
            if k.slot == 0 {
                entry.0 = Some(*v);
            } else {
                entry.1.push((k.slot, v.backend));
            }
        }
        for (key, (master, mut slots)) in by_frontend {
            let Some(master) = master else { continue };
            slots.sort_unstable();
            // Slots beyond the count are leftovers of a shrink cut short.
            let slots: Vec<u32> = slots
                .into_iter()
                .filter(|(s, _)| *s <= master.count)
                .map(|(_, b)| b)
                .collect();
            let mut refs: HashSet<u32> = slots.iter().copied().collect();
            refs.retain(|id| self.backend_keys.contains_key(id));
            for id in &refs {
                let bkey = self.backend_keys[id];
                if let Some(slot) = self.backends.get_mut(&bkey) {
                    slot.refs += 1;
                }
            }
            self.frontends.insert(
                key,
                Programmed {
                    id: master.id,
                    owner: None,
                    master: Some(master),
                    slots,
                    // Unknown until rewritten: a Maglev frontend gets its
                    // table recomputed (same input, same table) on first set.
                    maglev: None,
                    spec: None,
                },
            );
        }
        let used: HashSet<u32> = self.frontends.values().map(|p| p.id).collect();
        self.frontend_ids.reserve_up_to(&used);
        let used: HashSet<u32> = self.backend_keys.keys().copied().collect();
        self.backend_ids.reserve_up_to(&used);
    }

    /// Makes `owner`'s frontends exactly `frontends`: writes what differs,
    /// removes the owner's frontends not listed.
    pub fn set(
        &mut self,
        maps: &mut dyn LbMaps,
        owner: &str,
        frontends: Vec<Frontend>,
    ) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();
        let mut flush = HashSet::new();
        let wanted: BTreeSet<FrontendKey> = frontends.iter().map(|f| f.key).collect();
        let old = self.owners.get(owner).cloned().unwrap_or_default();
        // Removals first: a frontend moving between owners frees its key.
        for key in old.difference(&wanted) {
            self.remove_frontend(maps, key, &mut report, &mut flush)?;
        }
        let mut owned = BTreeSet::new();
        let mut result = Ok(());
        for frontend in frontends {
            let key = frontend.key;
            if let Some(p) = self.frontends.get(&key) {
                if let Some(other) = p.owner.as_deref().filter(|o| *o != owner) {
                    report.conflicts.push((key, other.to_owned()));
                    continue;
                }
            }
            owned.insert(key);
            if let Err(e) = self.write_frontend(maps, owner, frontend, &mut report, &mut flush) {
                result = Err(e);
                break;
            }
        }
        if owned.is_empty() {
            self.owners.remove(owner);
        } else {
            self.owners.insert(owner.to_owned(), owned);
        }
        report.udp_flows_flushed += flush_udp(maps, &flush)?;
        result.map(|()| report)
    }

    /// Removes everything `owner` has.
    pub fn remove(&mut self, maps: &mut dyn LbMaps, owner: &str) -> Result<ApplyReport, Error> {
        self.set(maps, owner, Vec::new())
    }

    /// Removes adopted frontends no owner claimed since [`ServiceTable::adopt`].
    pub fn prune_unowned(&mut self, maps: &mut dyn LbMaps) -> Result<ApplyReport, Error> {
        let mut report = ApplyReport::default();
        let mut flush = HashSet::new();
        let unowned: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(_, p)| p.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in unowned {
            self.remove_frontend(maps, &key, &mut report, &mut flush)?;
        }
        // Backends only the removed frontends used.
        let orphans: Vec<BackendKey> = self
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            self.drop_backend(maps, key, &mut report)?;
        }
        report.udp_flows_flushed += flush_udp(maps, &flush)?;
        Ok(report)
    }

    fn backend_id(
        &mut self,
        maps: &mut dyn LbMaps,
        proto: Proto,
        b: &BackendAddr,
        report: &mut ApplyReport,
    ) -> Result<u32, Error> {
        let key = (b.addr, b.port, proto);
        let value = BackendValue {
            addr: map_addr(b.addr),
            port: b.port.to_be(),
            proto: proto.number(),
            flags: if b.local { BE_F_LOCAL } else { 0 },
        };
        if let Some(slot) = self.backends.get_mut(&key) {
            if slot.value != value {
                maps.put_backend(slot.id, &value)?;
                report.map_ops += 1;
                slot.value = value;
            }
            return Ok(slot.id);
        }
        let id = self.backend_ids.take();
        if let Err(e) = maps.put_backend(id, &value) {
            self.backend_ids.give(id);
            return Err(e);
        }
        report.map_ops += 1;
        self.backends
            .insert(key, BackendSlot { id, refs: 0, value });
        self.backend_keys.insert(id, key);
        Ok(id)
    }

    fn drop_backend(
        &mut self,
        maps: &mut dyn LbMaps,
        key: BackendKey,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        if let Some(slot) = self.backends.get(&key) {
            maps.del_backend(slot.id)?;
            report.map_ops += 1;
            self.backend_keys.remove(&slot.id);
            self.backend_ids.give(slot.id);
            self.backends.remove(&key);
        }
        Ok(())
    }

    /// Drops one reference per id; deletes backends nobody names any more.
    fn release(
        &mut self,
        maps: &mut dyn LbMaps,
        ids: impl IntoIterator<Item = u32>,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        for id in ids {
            let Some(key) = self.backend_keys.get(&id).copied() else {
                continue;
            };
            let slot = self
                .backends
                .get_mut(&key)
                .expect("backend_keys mirrors backends");
            slot.refs = slot.refs.saturating_sub(1);
            if slot.refs == 0 {
                self.drop_backend(maps, key, report)?;
            }
        }
        Ok(())
    }

    fn write_frontend(
        &mut self,
        maps: &mut dyn LbMaps,
        owner: &str,
        frontend: Frontend,
        report: &mut ApplyReport,
        flush: &mut HashSet<(u32, u32)>,
    ) -> Result<(), Error> {
        let key = frontend.key;
        if let Some(p) = self.frontends.get_mut(&key) {
            p.owner = Some(owner.to_owned());
            if p.spec.as_ref() == Some(&frontend) {
                return Ok(());
            }
        }
        report.written += 1;

        // Backends first: every id a slot or table will name exists.
        let mut ids = Vec::with_capacity(frontend.backends.len());
        for b in &frontend.backends {
            ids.push(self.backend_id(maps, key.proto, b, report)?);
        }
        let new_set: HashSet<u32> = ids.iter().copied().collect();

        let fid = match self.frontends.get(&key) {
            Some(p) => p.id,
            None => {
                let id = self.frontend_ids.take();
                self.frontends.insert(
                    key,
                    Programmed {
                        id,
                        owner: Some(owner.to_owned()),
                        master: None,
                        slots: Vec::new(),
                        maglev: None,
                        spec: None,
                    },
                );
                id
            }
        };
        // References are taken before anything can fail below, so a failed
        // write never lets a still-named backend be deleted.
        let old_set: HashSet<u32> = self.frontends[&key].slots.iter().copied().collect();
        for id in new_set.difference(&old_set) {
            let bkey = self.backend_keys[id];
            self.backends.get_mut(&bkey).expect("just ensured").refs += 1;
        }
        let p = self.frontends.get_mut(&key).expect("inserted above");
        // From here the kernel may differ from `spec`; it is set again only
        // when every write went through.
        p.spec = None;

        if frontend.maglev && !ids.is_empty() {
            let names: Vec<String> = frontend
                .backends
                .iter()
                .map(|b| format!("{}/{}", b.addr, b.port))
                .collect();
            let table: Vec<u32> = maglev::table(&names, MAGLEV_M)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            if p.maglev.as_ref() != Some(&table) {
                let array: MaglevTable =
                    table.clone().try_into().expect("table has MAGLEV_M slots");
                maps.put_maglev(fid, &array)?;
                report.map_ops += 1;
                p.maglev = Some(table);
            }
        }
        for (i, &id) in ids.iter().enumerate() {
            if p.slots.get(i) != Some(&id) {
                let value = SvcValue {
                    backend: id,
                    ..SvcValue::default()
                };
                maps.put_svc(&svc_key(&key, i as u16 + 1), &value)?;
                report.map_ops += 1;
                if i < p.slots.len() {
                    p.slots[i] = id;
                } else {
                    p.slots.push(id);
                }
            }
        }
        let master = SvcValue {
            backend: 0,
            count: ids.len() as u16,
            flags: frontend.flags(),
            id: fid,
            affinity_timeout_s: frontend.affinity_timeout_s.unwrap_or(0),
        };
        if p.master != Some(master) {
            maps.put_svc(&svc_key(&key, 0), &master)?;
            report.map_ops += 1;
            p.master = Some(master);
        }
        while p.slots.len() > ids.len() {
            maps.del_svc(&svc_key(&key, p.slots.len() as u16))?;
            report.map_ops += 1;
            p.slots.pop();
        }
        if (!frontend.maglev || ids.is_empty()) && p.maglev.is_some() {
            maps.del_maglev(fid)?;
            report.map_ops += 1;
            p.maglev = None;
        }
        let gone: Vec<u32> = old_set.difference(&new_set).copied().collect();
        if key.proto == Proto::Udp {
            flush.extend(gone.iter().map(|b| (fid, *b)));
        }
        p.spec = Some(frontend);
        self.release(maps, gone, report)
    }

    fn remove_frontend(
        &mut self,
        maps: &mut dyn LbMaps,
        key: &FrontendKey,
        report: &mut ApplyReport,
        flush: &mut HashSet<(u32, u32)>,
    ) -> Result<(), Error> {
        let Some(p) = self.frontends.get_mut(key) else {
            return Ok(());
        };
        let ids: HashSet<u32> = p.slots.iter().copied().collect();
        // The master first: new flows stop matching before slots vanish.
        if p.master.is_some() {
            maps.del_svc(&svc_key(key, 0))?;
            report.map_ops += 1;
            p.master = None;
        }
        while !p.slots.is_empty() {
            maps.del_svc(&svc_key(key, p.slots.len() as u16))?;
            report.map_ops += 1;
            p.slots.pop();
        }
        if p.maglev.is_some() || p.spec.as_ref().is_some_and(|s| s.maglev) {
            maps.del_maglev(p.id)?;
            report.map_ops += 1;
            p.maglev = None;
        }
        let p = self.frontends.remove(key).expect("present above");
        if key.proto == Proto::Udp {
            flush.extend(ids.iter().map(|b| (p.id, *b)));
        }
        self.frontend_ids.give(p.id);
        report.removed += 1;
        self.release(maps, ids, report)
    }
}

fn flush_udp(maps: &mut dyn LbMaps, pairs: &HashSet<(u32, u32)>) -> Result<usize, Error> {
    if pairs.is_empty() {
        return Ok(0);
    }
    maps.flush_udp(pairs)
}

fn scope_of(raw: u8) -> Option<Scope> {
    match raw {
        0 => Some(Scope::Internal),
        1 => Some(Scope::External),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The maps in memory, checking after every single write what the datapath could observe
    /// at that instant: every master's slots exist and name existing backends, a Maglev
    /// frontend's table names existing backends, and a frontend that had backends before the
    /// call and has backends after it never shows zero in between.
    #[derive(Default)]
    struct Recorder {
        svc: BTreeMap<SvcKey, SvcValue>,
        backends: BTreeMap<u32, BackendValue>,
        maglev: BTreeMap<u32, Vec<u32>>,
        /// Masters that must not reach count 0 during the current call.
        keep_nonzero: HashSet<SvcKey>,
        ops: usize,
    }

    impl Recorder {
        fn check(&self) {
            for (k, v) in self.svc.iter().filter(|(k, _)| k.slot == 0) {
                if self.keep_nonzero.contains(k) {
                    assert!(v.count > 0, "{k:?} showed zero backends mid-update");
                }
                for slot in 1..=v.count {
                    let s = self
                        .svc
                        .get(&SvcKey { slot, ..*k })
                        .unwrap_or_else(|| panic!("{k:?}: slot {slot} of {} missing", v.count));
                    assert!(
                        self.backends.contains_key(&s.backend),
                        "{k:?}: slot {slot} names missing backend {}",
                        s.backend
                    );
                }
                if v.flags & SVC_F_MAGLEV != 0 && v.count > 0 {
                    let t = self
                        .maglev
                        .get(&v.id)
                        .expect("maglev table before the count");
                    assert!(t.iter().all(|b| self.backends.contains_key(b)));
                }
            }
        }

        fn op(&mut self) -> Result<(), Error> {
            self.ops += 1;
            self.check();
            Ok(())
        }
    }

    impl LbMaps for Recorder {
        fn put_svc(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), Error> {
            self.svc.insert(*key, *value);
            self.op()
        }
        fn del_svc(&mut self, key: &SvcKey) -> Result<(), Error> {
            self.svc.remove(key);
            self.op()
        }
        fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), Error> {
            self.backends.insert(id, *backend);
            self.op()
        }
        fn del_backend(&mut self, id: u32) -> Result<(), Error> {
            self.backends.remove(&id);
            self.op()
        }
        fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<(), Error> {
            self.maglev.insert(id, table.to_vec());
            self.op()
        }
        fn del_maglev(&mut self, id: u32) -> Result<(), Error> {
            self.maglev.remove(&id);
            self.op()
        }
        fn flush_udp(&mut self, _pairs: &HashSet<(u32, u32)>) -> Result<usize, Error> {
            Ok(0)
        }
    }

    fn key(i: u8) -> FrontendKey {
        FrontendKey {
            addr: IpAddr::from([10, 96, 0, i]),
            port: 80,
            proto: Proto::Tcp,
            scope: Scope::Internal,
        }
    }

    fn fe(i: u8, backends: &[u8], maglev: bool) -> Frontend {
        Frontend {
            key: key(i),
            node: false,
            local_policy: false,
            affinity_timeout_s: None,
            maglev,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: IpAddr::from([10, 244, 0, *b]),
                    port: 8080,
                    local: false,
                })
                .collect(),
        }
    }

    /// Sets `owner` to `want`, telling the recorder which masters must stay non-zero.
    fn set(t: &mut ServiceTable, m: &mut Recorder, owner: &str, want: Vec<Frontend>) {
        m.keep_nonzero = want
            .iter()
            .filter(|f| !f.backends.is_empty())
            .filter(|f| t.get(&f.key).is_some_and(|old| !old.backends.is_empty()))
            .map(|f| svc_key(&f.key, 0))
            .collect();
        t.set(m, owner, want).unwrap();
        m.keep_nonzero.clear();
        m.check();
    }

    /// What the kernel should hold for `fes`, as (frontend, backend addresses per slot).
    fn dump(m: &Recorder) -> BTreeMap<(SvcKey, u16), String> {
        m.svc
            .iter()
            .map(|(k, v)| {
                let what = if k.slot == 0 {
                    format!("count {} flags {}", v.count, v.flags)
                } else {
                    format!("{:?}", m.backends[&v.backend].addr)
                };
                ((SvcKey { slot: 0, ..*k }, k.slot), what)
            })
            .collect()
    }

    #[test]
    fn grow_shrink_replace_and_remove_never_expose_a_gap() {
        let (mut t, mut m) = (ServiceTable::new(), Recorder::default());
        set(&mut t, &mut m, "a", vec![fe(1, &[1, 2], false)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[1, 2, 3, 4], false)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[4], false)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[5, 6], false)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[5, 6], true)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[6, 7, 8], true)]);
        set(&mut t, &mut m, "a", vec![fe(1, &[6], false)]);
        assert!(m.maglev.is_empty(), "the table goes with the flag");
        set(&mut t, &mut m, "a", vec![fe(1, &[], false)]);
        assert_eq!(m.svc.len(), 1, "no backends: the master stays, count 0");
        assert!(m.backends.is_empty(), "unreferenced backends are deleted");
        t.remove(&mut m, "a").unwrap();
        assert!(m.svc.is_empty() && m.backends.is_empty());
    }

    #[test]
    fn shared_backends_live_while_any_frontend_names_them() {
        let (mut t, mut m) = (ServiceTable::new(), Recorder::default());
        set(&mut t, &mut m, "a", vec![fe(1, &[1, 2], false)]);
        set(&mut t, &mut m, "b", vec![fe(2, &[2, 3], false)]);
        assert_eq!(m.backends.len(), 3);
        t.remove(&mut m, "a").unwrap();
        m.check();
        assert_eq!(m.backends.len(), 2, "backend 2 still serves b");
        // Another owner may not take b's frontend.
        let r = t.set(&mut m, "c", vec![fe(2, &[9], false)]).unwrap();
        assert_eq!(r.conflicts.len(), 1);
        assert_eq!(t.get(&key(2)).unwrap().backends.len(), 2);
    }

    #[test]
    fn random_updates_keep_every_invariant_and_end_where_a_fresh_table_would() {
        let (mut t, mut m) = (ServiceTable::new(), Recorder::default());
        let mut want: BTreeMap<u8, Frontend> = BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..400 {
            let i = next(12) as u8 + 1;
            if next(8) == 0 {
                want.remove(&i);
                t.remove(&mut m, &format!("svc{i}")).unwrap();
                m.check();
                continue;
            }
            let n = next(5) as usize;
            let mut backends: Vec<u8> = (0..n).map(|_| next(16) as u8 + 1).collect();
            backends.sort_unstable();
            backends.dedup();
            let f = fe(i, &backends, next(3) == 0);
            want.insert(i, f.clone());
            set(&mut t, &mut m, &format!("svc{i}"), vec![f]);
        }
        let (mut fresh_t, mut fresh_m) = (ServiceTable::new(), Recorder::default());
        for (i, f) in &want {
            set(
                &mut fresh_t,
                &mut fresh_m,
                &format!("svc{i}"),
                vec![f.clone()],
            );
        }
        assert_eq!(dump(&m), dump(&fresh_m));
        assert_eq!(
            m.backends.len(),
            fresh_m.backends.len(),
            "no leaked backend"
        );
        assert_eq!(
            m.maglev.len(),
            fresh_m.maglev.len(),
            "no leaked Maglev table"
        );
    }

    #[test]
    fn one_changed_endpoint_costs_three_writes() {
        let (mut t, mut m) = (ServiceTable::new(), Recorder::default());
        set(&mut t, &mut m, "a", vec![fe(1, &[1, 2], false)]);
        let before = m.ops;
        set(&mut t, &mut m, "a", vec![fe(1, &[1, 3], false)]);
        assert_eq!(
            m.ops - before,
            3,
            "new backend, its slot, the old backend's delete"
        );
    }
}
