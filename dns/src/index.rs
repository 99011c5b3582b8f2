//! The record index: every cluster name, with its pre-encoded records, in one hash map keyed by
//! the lowercased wire-form name. Updated from `Snapshot::diff`: only the owners (Services with
//! their EndpointSlices, Pods) that changed are regenerated.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use fairlead_core::{IpNet, ObjectKey, Snapshot};

use crate::name;
use crate::records::{self, Rec, Zone};
use crate::wire::{Rcode, TYPE_ANY, TYPE_CNAME, TYPE_SOA};

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";

/// Who contributed a record, so an update removes exactly what that object added before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct OwnerId(u64);

const STATIC_OWNER: OwnerId = OwnerId(0);

fn owner_id(kind: u8, key: &ObjectKey) -> OwnerId {
    // SipHash with fixed keys: stable for the life of the process, collisions negligible at
    // 64 bits (a collision could only matter between two owners of the same name).
    let mut h = DefaultHasher::new();
    kind.hash(&mut h);
    key.hash(&mut h);
    OwnerId(h.finish() | 1)
}

struct Stored {
    owner: OwnerId,
    rtype: u16,
    /// The same record is already served from another owner (two headless Services over one
    /// pod give the same PTR); kept for bookkeeping, not answered twice.
    dup: bool,
    rr: Box<[u8]>,
}

#[derive(Default)]
struct Node {
    records: Vec<Stored>,
    /// Records at names strictly below this one: a node with none of its own but some below is
    /// an empty non-terminal, answered NODATA rather than NXDOMAIN.
    below: u32,
}

/// What one [`Index::apply`] did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Services (with their EndpointSlices) whose records were regenerated.
    pub services_rebuilt: usize,
    /// Pods whose records were regenerated.
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
}

pub struct Index {
    zone: Zone,
    reverse_cidrs: Vec<IpNet>,
    names: HashMap<Box<[u8]>, Node>,
    soa_zone: Vec<u8>,
    soa_in_addr: Vec<u8>,
    soa_ip6: Vec<u8>,
    applied: Arc<Snapshot>,
}

impl Index {
    /// An index with only the static records. `None` if the zone is not a valid DNS name.
    pub fn new(config: &IndexConfig) -> Option<Self> {
        let apex = name::encode(&config.zone)?;
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
            names: HashMap::new(),
            applied: Arc::new(Snapshot::empty()),
        };
        let statics = index.zone.static_records();
        index.add(STATIC_OWNER, statics);
        Some(index)
    }

    /// The snapshot the index reflects.
    pub fn applied(&self) -> &Arc<Snapshot> {
        &self.applied
    }

    /// Number of names held (including empty non-terminals).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Brings the index to `snap`, regenerating only the Services (with their EndpointSlices)
    /// and Pods that differ from the snapshot applied before.
    pub fn apply(&mut self, snap: Arc<Snapshot>) -> UpdateStats {
        let old = std::mem::replace(&mut self.applied, Arc::clone(&snap));
        let diff = Snapshot::diff(&old, &snap);
        let mut services: BTreeSet<ObjectKey> = BTreeSet::new();
        let d = &diff.services;
        services.extend(d.added.iter().chain(&d.updated).chain(&d.removed).cloned());
        let slices = &diff.endpoint_slices;
        for key in slices
            .added
            .iter()
            .chain(&slices.updated)
            .chain(&slices.removed)
        {
            for s in [&old, &snap] {
                if let Some(svc) = s
                    .endpoint_slices()
                    .get_key(key)
                    .and_then(|s| s.service_key())
                {
                    services.insert(svc);
                }
            }
        }
        let mut stats = UpdateStats::default();
        for key in &services {
            let id = owner_id(b's', key);
            if let Some(svc) = old.services().get_key(key) {
                stats.records_removed += self.remove(id, self.zone.service_records(&old, svc));
            }
            if let Some(svc) = snap.services().get_key(key) {
                stats.records_added += self.add(id, self.zone.service_records(&snap, svc));
            }
            stats.services_rebuilt += 1;
        }
        let pods = &diff.pods;
        for key in pods.added.iter().chain(&pods.updated).chain(&pods.removed) {
            let id = owner_id(b'p', key);
            if let Some(pod) = old.pods().get_key(key) {
                stats.records_removed += self.remove(id, self.zone.pod_records(pod));
            }
            if let Some(pod) = snap.pods().get_key(key) {
                stats.records_added += self.add(id, self.zone.pod_records(pod));
            }
            stats.pods_rebuilt += 1;
        }
        stats
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

    fn add(&mut self, owner: OwnerId, recs: Vec<Rec>) -> usize {
        let count = recs.len();
        for r in recs {
            let ancestors: Vec<Box<[u8]>> = self.ancestors(&r.name).map(Box::from).collect();
            for a in ancestors {
                self.names.entry(a).or_default().below += 1;
            }
            let node = self.names.entry(r.name.into_boxed_slice()).or_default();
            let dup = node
                .records
                .iter()
                .any(|s| !s.dup && s.rtype == r.rtype && *s.rr == *r.rr);
            node.records.push(Stored {
                owner,
                rtype: r.rtype,
                dup,
                rr: r.rr.into_boxed_slice(),
            });
        }
        count
    }

    fn remove(&mut self, owner: OwnerId, recs: Vec<Rec>) -> usize {
        let mut removed = 0;
        for r in recs {
            let Some(node) = self.names.get_mut(r.name.as_slice()) else {
                continue;
            };
            let Some(pos) = node
                .records
                .iter()
                .position(|s| s.owner == owner && s.rtype == r.rtype && *s.rr == *r.rr)
            else {
                continue;
            };
            let gone = node.records.swap_remove(pos);
            if !gone.dup {
                if let Some(twin) = node
                    .records
                    .iter_mut()
                    .find(|s| s.dup && s.rtype == gone.rtype && s.rr == gone.rr)
                {
                    twin.dup = false;
                }
            }
            removed += 1;
            if node.records.is_empty() && node.below == 0 {
                self.names.remove(r.name.as_slice());
            }
            let ancestors: Vec<Box<[u8]>> = self.ancestors(&r.name).map(Box::from).collect();
            for a in ancestors {
                if let Some(n) = self.names.get_mut(&a) {
                    n.below = n.below.saturating_sub(1);
                    if n.below == 0 && n.records.is_empty() {
                        self.names.remove(&a);
                    }
                }
            }
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
        let live = node.records.iter().filter(|s| !s.dup);
        let mut answers: Vec<Cow<'_, [u8]>> = live
            .clone()
            .filter(|s| s.rtype == qtype || qtype == TYPE_ANY)
            .map(|s| Cow::Borrowed(&*s.rr))
            .collect();
        let mut chase = None;
        let mut rcode = Rcode::NoError;
        if answers.is_empty() {
            if let Some(cname) = live.clone().find(|s| s.rtype == TYPE_CNAME) {
                // RFC 1034 §4.3.2: answer the CNAME, then what its target has, if it is ours.
                answers.push(Cow::Borrowed(&*cname.rr));
                let target = records::rdata(&cname.rr);
                match self.names.get(target) {
                    Some(t) => answers.extend(
                        t.records
                            .iter()
                            .filter(|s| !s.dup && s.rtype == qtype)
                            .map(|s| Cow::Owned(records::with_owner(target, &s.rr))),
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
}
