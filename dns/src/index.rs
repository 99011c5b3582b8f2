//! The record index: every cluster name, with its pre-encoded records, in one hash map keyed by
//! the lowercased wire-form name, and the compact cluster state the records are made from
//! ([`crate::model`]). Updated per changed object: only the Services whose object or
//! EndpointSlices changed are regenerated. Pod names are not stored: they are answered from
//! the query name ([`PodMode`]).

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use fairlead_core::{IpNet, ObjectKey, Snapshot};

use crate::model::{DnsPod, DnsService, DnsSlice, Namespaces, PodMode};
use crate::name;
use crate::records::{self, Rec, Zone};
use crate::table::{Node, Owned, OwnerId, Packed, Table};
use crate::wire::{Rcode, TYPE_ANY, TYPE_CNAME, TYPE_SOA};

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";

const STATIC_OWNER: OwnerId = OwnerId(0);

/// SipHash with fixed keys: stable for the life of the process, collisions negligible at 64
/// bits (for owners, a collision could only matter between two owners of the same name).
fn hash64(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

fn owner_id(key: &SvcKey) -> OwnerId {
    OwnerId(hash64(key) | 1)
}

/// A pod's identity in `verified` mode: a hash of its namespace and name, so the names are not
/// kept.
pub(crate) fn pod_id(key: &ObjectKey) -> u64 {
    hash64(key)
}

/// A Service (or a slice) by interned namespace and name.
type SvcKey = (u32, Box<str>);

/// A Service's key in [`Index::services`]: the namespace id, then the name.
fn packed_key(key: &SvcKey) -> Vec<u8> {
    let mut out = key.0.to_le_bytes().to_vec();
    out.extend_from_slice(key.1.as_bytes());
    out
}

fn unpacked_key(bytes: &[u8]) -> SvcKey {
    let (ns, name) = bytes.split_at(4);
    (
        u32::from_le_bytes([ns[0], ns[1], ns[2], ns[3]]),
        String::from_utf8_lossy(name).into(),
    )
}

/// `verified` pod mode: which (namespace, address) pairs have a pod, and how many; and each
/// pod's namespace and addresses by pod id, to undo them when it changes or goes (about 50
/// bytes per pod in all: 2.5 MiB for 50,000, measured with the footprint example).
#[derive(Default)]
struct Pods {
    /// Pods with a single IPv4 address, the common case: 16 bytes a slot.
    single_v4: HashMap<u64, (u32, Ipv4Addr)>,
    /// Every other pod (dual-stack, IPv6).
    other: HashMap<u64, (u32, Box<[IpAddr]>)>,
    v4: HashMap<(u32, Ipv4Addr), u32>,
    v6: HashMap<(u32, Ipv6Addr), u32>,
    per_namespace: HashMap<u32, u32>,
}

/// Adds one to, or takes one from, a count kept only while above zero.
fn step<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K, up: bool) {
    if up {
        *map.entry(key).or_default() += 1;
    } else if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

impl Pods {
    fn count(&mut self, ns: u32, ips: &[IpAddr], up: bool) {
        step(&mut self.per_namespace, ns, up);
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => step(&mut self.v4, (ns, *v4), up),
                IpAddr::V6(v6) => step(&mut self.v6, (ns, *v6), up),
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some((ns, v4)) = self.single_v4.remove(&id) {
            self.count(ns, &[IpAddr::V4(v4)], false);
        }
        if let Some((ns, ips)) = self.other.remove(&id) {
            self.count(ns, &ips, false);
        }
    }

    fn insert(&mut self, id: u64, ns: u32, ips: Box<[IpAddr]>) {
        self.count(ns, &ips, true);
        match *ips {
            [IpAddr::V4(v4)] => {
                self.single_v4.insert(id, (ns, v4));
            }
            _ => {
                self.other.insert(id, (ns, ips));
            }
        }
    }

    fn ids(&self) -> impl Iterator<Item = &u64> {
        self.single_v4.keys().chain(self.other.keys())
    }

    fn has(&self, ns: u32, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.v4.contains_key(&(ns, v4)),
            IpAddr::V6(v6) => self.v6.contains_key(&(ns, v6)),
        }
    }
}

/// One object's new state (`None`: gone, or makes no records).
pub(crate) enum Change {
    Service(ObjectKey, Option<DnsService>),
    Slice(ObjectKey, Option<DnsSlice>),
    /// By [`pod_id`]; only counted in `verified` mode.
    Pod(u64, Option<DnsPod>),
}

/// What one [`Index::apply`] did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Services (with their EndpointSlices) whose records were regenerated.
    pub services_rebuilt: usize,
    /// Pods added, changed or removed (`verified` pod mode only; otherwise no Pod is held).
    pub pods_rebuilt: usize,
    pub records_removed: usize,
    pub records_added: usize,
}

/// The outcome of a lookup in the cluster zones.
pub(crate) enum Lookup<'a> {
    Answer {
        rcode: Rcode,
        answers: Vec<Cow<'a, [u8]>>,
        authority: Option<&'a [u8]>,
        /// A CNAME pointing out of the cluster zone; the server may chase it upstream.
        chase: Option<Vec<u8>>,
    },
    /// Not a name we are authoritative for: forward it.
    NotOurs,
}

/// Settings of the index.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// The cluster zone, such as `cluster.local`.
    pub zone: String,
    /// TTL of every record, and the SOA minimum (negative-caching TTL).
    pub ttl: u32,
    /// Address ranges whose reverse names this server owns: an unknown address there is
    /// NXDOMAIN here instead of a query leaking upstream.
    pub reverse_cidrs: Vec<IpNet>,
    /// How `a-b-c-d.<ns>.pod.<zone>` is answered.
    pub pods: PodMode,
}

pub struct Index {
    zone: Zone,
    reverse_cidrs: Vec<IpNet>,
    names: Table,
    soa_zone: Vec<u8>,
    soa_in_addr: Vec<u8>,
    soa_ip6: Vec<u8>,
    /// `pod.<zone>`.
    pod_apex: Vec<u8>,
    pod_mode: PodMode,
    namespaces: Namespaces,
    /// Every Service, keyed by namespace id and name, with its encoded [`DnsService`], in one
    /// allocation each (a few dozen bytes for a ClusterIP Service).
    services: HashSet<Packed>,
    /// The EndpointSlices of each Service that has any, by slice name.
    slices: HashMap<SvcKey, Vec<(Box<str>, DnsSlice)>>,
    /// Which Service each slice names, so a slice that moves or goes is taken from it.
    slice_owner: HashMap<SvcKey, Box<str>>,
    pods: Pods,
    generation: u64,
    /// The snapshot applied last, when fed snapshots ([`Index::apply`]).
    applied: Option<Arc<Snapshot>>,
}

impl Index {
    /// An index with only the static records. `None` if the zone is not a valid DNS name.
    pub fn new(config: &IndexConfig) -> Option<Self> {
        let apex = name::encode(&config.zone)?;
        let apex_copy = apex.clone();
        let zone = Zone {
            apex,
            ttl: config.ttl,
        };
        let soa_rr = records::encode_rr(TYPE_SOA, zone.ttl, &zone.soa_rdata());
        let mut index = Index {
            soa_zone: records::with_owner(&zone.apex, &soa_rr),
            soa_in_addr: records::with_owner(IN_ADDR_ARPA, &soa_rr),
            soa_ip6: records::with_owner(IP6_ARPA, &soa_rr),
            zone,
            reverse_cidrs: config.reverse_cidrs.clone(),
            names: Table::default(),
            pod_apex: name::prepend("pod", &apex_copy)?,
            pod_mode: config.pods,
            namespaces: Namespaces::default(),
            services: HashSet::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            pods: Pods::default(),
            generation: 0,
            applied: None,
        };
        let statics = index.zone.static_records();
        index.add(STATIC_OWNER, statics);
        Some(index)
    }

    /// Generation of what the index reflects: the snapshot's, when fed snapshots; otherwise
    /// the number of updates applied.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of names held (including empty non-terminals).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.len() == 0
    }

    /// Brings the index to `snap`, regenerating only the Services (with their EndpointSlices)
    /// and, in `verified` pod mode, the Pods that differ from the snapshot applied before.
    pub fn apply(&mut self, snap: Arc<Snapshot>) -> UpdateStats {
        let old = self
            .applied
            .replace(Arc::clone(&snap))
            .unwrap_or_else(|| Arc::new(Snapshot::empty()));
        let diff = Snapshot::diff(&old, &snap);
        let all = |d: &fairlead_core::KindDiff| -> Vec<ObjectKey> {
            d.added
                .iter()
                .chain(&d.updated)
                .chain(&d.removed)
                .cloned()
                .collect()
        };
        let mut changes = Vec::new();
        for key in all(&diff.services) {
            let svc = snap
                .services()
                .get_key(&key)
                .map(|s| DnsService::from(&**s));
            changes.push(Change::Service(key, svc));
        }
        for key in all(&diff.endpoint_slices) {
            let slice = snap
                .endpoint_slices()
                .get_key(&key)
                .and_then(|s| DnsSlice::from_core(s));
            changes.push(Change::Slice(key, slice));
        }
        if self.pod_mode == PodMode::Verified {
            for key in all(&diff.pods) {
                let pod = snap.pods().get_key(&key).and_then(|p| DnsPod::from_core(p));
                changes.push(Change::Pod(pod_id(&key), pod));
            }
        }
        let stats = self.update(changes);
        self.generation = snap.generation;
        stats
    }

    /// The pod mode this index answers with.
    pub(crate) fn pod_mode(&self) -> PodMode {
        self.pod_mode
    }

    fn svc_key(&mut self, ns: &str, name: &str) -> SvcKey {
        (self.namespaces.intern(ns), name.into())
    }

    fn records_of(&self, key: &SvcKey) -> Vec<Rec> {
        let Some(svc) = self.services.get(packed_key(key).as_slice()) else {
            return Vec::new();
        };
        let slices = self.slices.get(key).into_iter().flatten();
        self.zone.service_records(
            self.namespaces.name(key.0),
            &key.1,
            &DnsService::decode(svc.rest()),
            slices.map(|(_, s)| s),
        )
    }

    /// Applies changed objects; each affected Service's records are regenerated once.
    pub(crate) fn update(&mut self, changes: impl IntoIterator<Item = Change>) -> UpdateStats {
        let mut stats = UpdateStats::default();
        // The records each touched Service had before, taken at its first change.
        let mut before: HashMap<SvcKey, Vec<Rec>> = HashMap::new();
        let mut touch = |index: &Index, key: &SvcKey| {
            if !before.contains_key(key) {
                before.insert(key.clone(), index.records_of(key));
            }
        };
        for change in changes {
            match change {
                Change::Service(key, svc) => {
                    let k = self.svc_key(&key.namespace, &key.name);
                    touch(self, &k);
                    let packed = packed_key(&k);
                    // A name too long for a DNS label has no records: nothing to keep.
                    match svc.filter(|_| packed.len() <= 4 + name::MAX_LABEL) {
                        Some(svc) => {
                            let mut rest = Vec::new();
                            svc.encode(&mut rest);
                            let entry = Packed::new(&packed, rest.len(), |out| {
                                out.extend_from_slice(&rest)
                            });
                            self.services.replace(entry);
                        }
                        None => {
                            self.services.remove(packed.as_slice());
                        }
                    }
                }
                Change::Slice(key, slice) => {
                    let sk = self.svc_key(&key.namespace, &key.name);
                    if let Some(owner) = self.slice_owner.remove(&sk) {
                        let k = (sk.0, owner);
                        touch(self, &k);
                        if let Some(list) = self.slices.get_mut(&k) {
                            list.retain(|(n, _)| *n != sk.1);
                            if list.is_empty() {
                                self.slices.remove(&k);
                            }
                        }
                    }
                    if let Some(slice) = slice {
                        let k = (sk.0, slice.service.clone());
                        touch(self, &k);
                        self.slice_owner.insert(sk.clone(), slice.service.clone());
                        self.slices.entry(k).or_default().push((sk.1, slice));
                    }
                }
                Change::Pod(id, pod) => {
                    if self.pod_mode != PodMode::Verified {
                        continue;
                    }
                    self.pods.remove(id);
                    if let Some(pod) = pod {
                        let ns = self.namespaces.intern(&pod.namespace);
                        self.pods.insert(id, ns, pod.ips);
                    }
                    stats.pods_rebuilt += 1;
                }
            }
        }
        for (key, old) in before {
            let id = owner_id(&key);
            stats.records_removed += self.remove(id, old);
            let new = self.records_of(&key);
            stats.records_added += self.add(id, new);
            stats.services_rebuilt += 1;
        }
        self.generation += 1;
        stats
    }

    /// Services held whose key is not in `seen` (after a relist: they are gone).
    pub(crate) fn stale_services(&self, seen: &HashSet<ObjectKey>) -> Vec<ObjectKey> {
        self.services
            .iter()
            .map(|p| unpacked_key(p.key()))
            .map(|(ns, name)| ObjectKey::new(self.namespaces.name(ns), &*name))
            .filter(|k| !seen.contains(k))
            .collect()
    }

    /// EndpointSlices held whose key is not in `seen`.
    pub(crate) fn stale_slices(&self, seen: &HashSet<ObjectKey>) -> Vec<ObjectKey> {
        self.slice_owner
            .keys()
            .map(|k| ObjectKey::new(self.namespaces.name(k.0), &*k.1))
            .filter(|k| !seen.contains(k))
            .collect()
    }

    /// Pods held whose id is not in `seen`.
    pub(crate) fn stale_pods(&self, seen: &HashSet<u64>) -> Vec<u64> {
        self.pods
            .ids()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect()
    }

    /// The authority root a name's empty non-terminals are counted up to.
    fn root_of(&self, n: &[u8]) -> Option<&'static [u8]> {
        if name::is_within(n, IN_ADDR_ARPA) {
            Some(IN_ADDR_ARPA)
        } else if name::is_within(n, IP6_ARPA) {
            Some(IP6_ARPA)
        } else {
            None
        }
    }

    fn ancestors<'n>(&self, n: &'n [u8]) -> impl Iterator<Item = &'n [u8]> + use<'n, '_> {
        let root: &[u8] = self.root_of(n).unwrap_or(&self.zone.apex);
        let root_len = root.len();
        std::iter::successors(name::parent(n), |p| name::parent(p))
            .take_while(move |p| p.len() >= root_len)
    }

    /// Changes the `below` count of every ancestor of `name` by one.
    fn count_below(&mut self, name: &[u8], up: bool) {
        let ancestors: Vec<&[u8]> = self.ancestors(name).collect();
        for a in ancestors {
            let mut node: Node = self.names.take(a);
            node.below = if up {
                node.below + 1
            } else {
                node.below.saturating_sub(1)
            };
            self.names.put(a, node);
        }
    }

    fn add(&mut self, owner: OwnerId, recs: Vec<Rec>) -> usize {
        let count = recs.len();
        for r in recs {
            self.count_below(&r.name, true);
            let mut node = self.names.take(&r.name);
            // The type is part of the encoded record, so equal bytes are the same record.
            let dup = node.records.iter().any(|s| !s.dup && *s.rr == *r.rr);
            node.records.push(Owned {
                owner,
                dup,
                rr: r.rr.into_boxed_slice(),
            });
            self.names.put(&r.name, node);
        }
        count
    }

    fn remove(&mut self, owner: OwnerId, recs: Vec<Rec>) -> usize {
        let mut removed = 0;
        for r in recs {
            let held = self.names.get(&r.name).is_some_and(|v| {
                v.records()
                    .any(|s| s.owner == owner && s.rr == r.rr.as_slice())
            });
            if !held {
                continue;
            }
            let mut node = self.names.take(&r.name);
            if let Some(pos) = node
                .records
                .iter()
                .position(|s| s.owner == owner && *s.rr == *r.rr)
            {
                let gone = node.records.swap_remove(pos);
                if !gone.dup {
                    if let Some(twin) = node.records.iter_mut().find(|s| s.dup && s.rr == gone.rr) {
                        twin.dup = false;
                    }
                }
            }
            self.names.put(&r.name, node);
            removed += 1;
            self.count_below(&r.name, false);
        }
        removed
    }

    fn soa_for(&self, n: &[u8]) -> &[u8] {
        match self.root_of(n) {
            Some(IN_ADDR_ARPA) => &self.soa_in_addr,
            Some(_) => &self.soa_ip6,
            None => &self.soa_zone,
        }
    }

    /// Whether this server answers for `qname` (lowercased wire form) at all.
    pub(crate) fn is_authoritative(&self, qname: &[u8]) -> bool {
        if name::is_within(qname, &self.zone.apex) {
            return true;
        }
        if self.root_of(qname).is_some() {
            if let Some(ip) = name::parse_reverse(qname) {
                return self.reverse_cidrs.iter().any(|net| net.contains(&ip));
            }
        }
        false
    }

    /// Answers `qname` (lowercased wire form) and `qtype` from the index.
    pub(crate) fn lookup(&self, qname: &[u8], qtype: u16) -> Lookup<'_> {
        if qname.ends_with(&self.pod_apex) && name::is_within(qname, &self.pod_apex) {
            return self.pod_lookup(qname, qtype);
        }
        let Some(node) = self.names.get(qname) else {
            if self.is_authoritative(qname) {
                return Lookup::Answer {
                    rcode: Rcode::NxDomain,
                    answers: Vec::new(),
                    authority: Some(self.soa_for(qname)),
                    chase: None,
                };
            }
            return Lookup::NotOurs;
        };
        let live = node.records().filter(|s| !s.dup);
        let mut answers: Vec<Cow<'_, [u8]>> = live
            .clone()
            .filter(|s| s.rtype() == qtype || qtype == TYPE_ANY)
            .map(|s| Cow::Borrowed(s.rr))
            .collect();
        let mut chase = None;
        let mut rcode = Rcode::NoError;
        if answers.is_empty() {
            if let Some(cname) = live.clone().find(|s| s.rtype() == TYPE_CNAME) {
                // RFC 1034 §4.3.2: answer the CNAME, then what its target has, if it is ours.
                answers.push(Cow::Borrowed(cname.rr));
                let target = records::rdata(cname.rr);
                match self.names.get(target) {
                    Some(t) => answers.extend(
                        t.records()
                            .filter(|s| !s.dup && s.rtype() == qtype)
                            .map(|s| Cow::Owned(records::with_owner(target, s.rr))),
                    ),
                    None if self.is_authoritative(target) => rcode = Rcode::NxDomain,
                    None => chase = Some(target.to_vec()),
                }
            }
        }
        let authority =
            (answers.is_empty() || rcode == Rcode::NxDomain).then(|| self.soa_for(qname));
        Lookup::Answer {
            rcode,
            answers,
            authority,
            chase,
        }
    }

    /// A name under `pod.<zone>`: `<a-b-c-d>.<ns>.pod.<zone>` (or the IPv6 address with
    /// dashes), as CoreDNS's `pods` option answers it.
    fn pod_lookup(&self, qname: &[u8], qtype: u16) -> Lookup<'_> {
        let labels = name::labels_above(qname, &self.pod_apex);
        let exists = match (self.pod_mode, labels.as_slice()) {
            (PodMode::Disabled, _) => None,
            (PodMode::Insecure, [] | [_]) => Some(None),
            (PodMode::Verified, []) => (!self.pods.per_namespace.is_empty()).then_some(None),
            (PodMode::Verified, [ns]) => self
                .pod_namespace(ns)
                .filter(|id| self.pods.per_namespace.contains_key(id))
                .map(|_| None),
            (mode, [leaf, ns]) => name::parse_dashed(leaf)
                .filter(|ip| {
                    mode == PodMode::Insecure
                        || self
                            .pod_namespace(ns)
                            .is_some_and(|id| self.pods.has(id, *ip))
                })
                .map(Some),
            _ => None,
        };
        let Some(ip) = exists else {
            return Lookup::Answer {
                rcode: Rcode::NxDomain,
                answers: Vec::new(),
                authority: Some(&self.soa_zone),
                chase: None,
            };
        };
        let answers: Vec<Cow<'_, [u8]>> = ip
            .map(|ip| records::address(&ip))
            .filter(|(t, _)| *t == qtype || qtype == TYPE_ANY)
            .map(|(t, rd)| Cow::Owned(records::encode_rr(t, self.zone.ttl, &rd)))
            .into_iter()
            .collect();
        let authority = answers.is_empty().then_some(self.soa_zone.as_slice());
        Lookup::Answer {
            rcode: Rcode::NoError,
            answers,
            authority,
            chase: None,
        }
    }

    fn pod_namespace(&self, label: &[u8]) -> Option<u32> {
        self.namespaces.get(std::str::from_utf8(label).ok()?)
    }
}
