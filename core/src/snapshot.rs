//! Immutable views of the cluster and the cheap diff between two of them.
//!
//! Every object sits behind an `Arc`, and the collections are `imbl::OrdMap`s: cloning a
//! snapshot is O(1), successive snapshots share the subtrees that did not change, and an object
//! that did not change keeps the very same `Arc`. So [`Snapshot::diff`] compares pointers and skips
//! shared subtrees; it never compares the contents of an unchanged object.

use std::fmt;
use std::sync::Arc;

use imbl::{ordmap::DiffItem, OrdMap, OrdSet};
use serde::{Serialize, Serializer};

use crate::{EndpointSlice, Kind, Namespace, NetworkPolicy, Node, ObjectKey, Pod, Service, Store};

/// An `Arc` whose equality is identity. The store hands out a new `Arc` only when an object's
/// contents changed, so pointer equality is exactly "unchanged" and costs nothing.
pub(crate) struct Shared<T>(pub(crate) Arc<T>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

pub(crate) type Map<T> = OrdMap<ObjectKey, Shared<T>>;

/// All objects of one kind, keyed by (namespace, name) and iterated in key order.
pub struct Objects<T> {
    pub(crate) map: Map<T>,
}

impl<T> Clone for Objects<T> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
        }
    }
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Self { map: OrdMap::new() }
    }
}

impl<T> Objects<T> {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Looks up a namespaced object; use `""` as the namespace for cluster-scoped kinds.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<T>> {
        self.get_key(&ObjectKey::new(namespace, name))
    }

    pub fn get_key(&self, key: &ObjectKey) -> Option<&Arc<T>> {
        self.map.get(key).map(|s| &s.0)
    }

    pub fn contains_key(&self, key: &ObjectKey) -> bool {
        self.map.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<T>)> {
        self.map.iter().map(|(k, v)| (k, &v.0))
    }

    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.map.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.map.values().map(|v| &v.0)
    }

    /// Objects of one namespace, in name order.
    pub fn in_namespace<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        self.map
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, v)| &v.0)
    }

    /// Keys added, updated (a different `Arc`) and removed from `old` to `self`.
    pub fn diff_from(&self, old: &Objects<T>) -> KindDiff {
        let mut diff = KindDiff::default();
        for item in old.map.diff(&self.map) {
            match item {
                DiffItem::Add(k, _) => diff.added.push(k.clone()),
                DiffItem::Update { new: (k, _), .. } => diff.updated.push(k.clone()),
                DiffItem::Remove(k, _) => diff.removed.push(k.clone()),
            }
        }
        diff
    }
}

impl<T: fmt::Debug> fmt::Debug for Objects<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T: Serialize> Serialize for Objects<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.values().map(|v| v.as_ref()))
    }
}

/// The cluster as of one moment. Cheap to clone; never changes once published.
#[derive(Clone, Default, Serialize)]
pub struct Snapshot {
    /// Increases by one for every snapshot the store produces with a change in it.
    pub generation: u64,
    /// Every kind has completed its first full list. A consumer must not act on a snapshot that
    /// is not ready: a missing object there may only mean "not listed yet".
    pub ready: bool,
    pub(crate) services: Objects<Service>,
    pub(crate) endpoint_slices: Objects<EndpointSlice>,
    pub(crate) pods: Objects<Pod>,
    pub(crate) namespaces: Objects<Namespace>,
    pub(crate) nodes: Objects<Node>,
    pub(crate) network_policies: Objects<NetworkPolicy>,
    #[serde(skip)]
    pub(crate) slices_by_service: OrdMap<ObjectKey, OrdSet<ObjectKey>>,
    #[serde(skip)]
    pub(crate) pods_by_node: OrdMap<String, OrdSet<ObjectKey>>,
}

/// Keys that changed in one kind between two snapshots, each list in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindDiff {
    pub added: Vec<ObjectKey>,
    pub updated: Vec<ObjectKey>,
    pub removed: Vec<ObjectKey>,
}

impl KindDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }

    pub fn len(&self) -> usize {
        self.added.len() + self.updated.len() + self.removed.len()
    }
}

/// What changed between two snapshots, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub services: KindDiff,
    pub endpoint_slices: KindDiff,
    pub pods: KindDiff,
    pub namespaces: KindDiff,
    pub nodes: KindDiff,
    pub network_policies: KindDiff,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.kinds().iter().all(|(_, d)| d.is_empty())
    }

    /// The per-kind diffs, for consumers that treat kinds uniformly (logging, metrics).
    pub fn kinds(&self) -> [(Kind, &KindDiff); 6] {
        [
            (Kind::Service, &self.services),
            (Kind::EndpointSlice, &self.endpoint_slices),
            (Kind::Pod, &self.pods),
            (Kind::Namespace, &self.namespaces),
            (Kind::Node, &self.nodes),
            (Kind::NetworkPolicy, &self.network_policies),
        ]
    }
}

impl Snapshot {
    /// An empty snapshot that is not ready, the value published before the first full list.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a ready snapshot from objects, for consumers' tests.
    pub fn builder() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// What changed from `old` to `new`. Cost is proportional to what changed (plus the depth
    /// of the trees), not to the size of the cluster, when `new` was derived from `old`.
    pub fn diff(old: &Snapshot, new: &Snapshot) -> Diff {
        Diff {
            services: new.services.diff_from(&old.services),
            endpoint_slices: new.endpoint_slices.diff_from(&old.endpoint_slices),
            pods: new.pods.diff_from(&old.pods),
            namespaces: new.namespaces.diff_from(&old.namespaces),
            nodes: new.nodes.diff_from(&old.nodes),
            network_policies: new.network_policies.diff_from(&old.network_policies),
        }
    }

    pub fn services(&self) -> &Objects<Service> {
        &self.services
    }

    pub fn endpoint_slices(&self) -> &Objects<EndpointSlice> {
        &self.endpoint_slices
    }

    pub fn pods(&self) -> &Objects<Pod> {
        &self.pods
    }

    pub fn namespaces(&self) -> &Objects<Namespace> {
        &self.namespaces
    }

    pub fn nodes(&self) -> &Objects<Node> {
        &self.nodes
    }

    pub fn network_policies(&self) -> &Objects<NetworkPolicy> {
        &self.network_policies
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services.get(namespace, name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pods.get(namespace, name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get("", name)
    }

    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get("", name)
    }

    /// EndpointSlices labelled with this Service (`kubernetes.io/service-name`), in name order.
    /// Works whether or not the Service itself exists.
    pub fn endpoint_slices_of(
        &self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoint_slices.get_key(k))
    }

    /// Pods scheduled on this node, in (namespace, name) order.
    pub fn pods_on_node(&self, node: &str) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get_key(k))
    }
}

impl fmt::Debug for Snapshot {
    // Counts only: a full dump of a real cluster would drown a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("ready", &self.ready)
            .field("services", &self.services.len())
            .field("endpoint_slices", &self.endpoint_slices.len())
            .field("pods", &self.pods.len())
            .field("namespaces", &self.namespaces.len())
            .field("nodes", &self.nodes.len())
            .field("network_policies", &self.network_policies.len())
            .finish()
    }
}

/// Builds a ready [`Snapshot`] from objects, as if each kind had been listed once.
#[derive(Default)]
pub struct SnapshotBuilder {
    services: Vec<Service>,
    endpoint_slices: Vec<EndpointSlice>,
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
    nodes: Vec<Node>,
    network_policies: Vec<NetworkPolicy>,
}

impl SnapshotBuilder {
    pub fn service(mut self, obj: Service) -> Self {
        self.services.push(obj);
        self
    }

    pub fn endpoint_slice(mut self, obj: EndpointSlice) -> Self {
        self.endpoint_slices.push(obj);
        self
    }

    pub fn pod(mut self, obj: Pod) -> Self {
        self.pods.push(obj);
        self
    }

    pub fn namespace(mut self, obj: Namespace) -> Self {
        self.namespaces.push(obj);
        self
    }

    pub fn node(mut self, obj: Node) -> Self {
        self.nodes.push(obj);
        self
    }

    pub fn network_policy(mut self, obj: NetworkPolicy) -> Self {
        self.network_policies.push(obj);
        self
    }

    pub fn build(self) -> Snapshot {
        let mut store = Store::new();
        store.list(self.services);
        store.list(self.endpoint_slices);
        store.list(self.pods);
        store.list(self.namespaces);
        store.list(self.nodes);
        store.list(self.network_policies);
        Snapshot::clone(&store.snapshot())
    }
}

/// Keeps the by-service and by-node indexes in step with the objects, from the diff of the
/// previous snapshot's objects: work proportional to what changed.
pub(crate) fn update_indexes(prev: &Snapshot, next: &mut Snapshot) {
    fn remove<K: Ord + Clone>(idx: &mut OrdMap<K, OrdSet<ObjectKey>>, k: &K, v: &ObjectKey) {
        if let Some(set) = idx.get_mut(k) {
            set.remove(v);
            if set.is_empty() {
                idx.remove(k);
            }
        }
    }
    fn add<K: Ord + Clone>(idx: &mut OrdMap<K, OrdSet<ObjectKey>>, k: K, v: ObjectKey) {
        idx.entry(k).or_default().insert(v);
    }

    let mut by_service = prev.slices_by_service.clone();
    for item in prev.endpoint_slices.map.diff(&next.endpoint_slices.map) {
        let (old, new) = match item {
            DiffItem::Add(k, v) => (None, Some((k, v))),
            DiffItem::Update { old, new } => (Some(old), Some(new)),
            DiffItem::Remove(k, v) => (Some((k, v)), None),
        };
        if let Some((k, Shared(s))) = old {
            if let Some(svc) = s.service_key() {
                remove(&mut by_service, &svc, k);
            }
        }
        if let Some((k, Shared(s))) = new {
            if let Some(svc) = s.service_key() {
                add(&mut by_service, svc, k.clone());
            }
        }
    }

    let mut by_node = prev.pods_by_node.clone();
    for item in prev.pods.map.diff(&next.pods.map) {
        let (old, new) = match item {
            DiffItem::Add(k, v) => (None, Some((k, v))),
            DiffItem::Update { old, new } => (Some(old), Some(new)),
            DiffItem::Remove(k, v) => (Some((k, v)), None),
        };
        if let Some((k, Shared(p))) = old {
            if let Some(node) = &p.node_name {
                remove(&mut by_node, node, k);
            }
        }
        if let Some((k, Shared(p))) = new {
            if let Some(node) = &p.node_name {
                add(&mut by_node, node.clone(), k.clone());
            }
        }
    }

    next.slices_by_service = by_service;
    next.pods_by_node = by_node;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object whose comparison fails the test: proves the diff never compares contents.
    struct NoCompare(u32);

    impl PartialEq for NoCompare {
        fn eq(&self, _: &Self) -> bool {
            panic!("Snapshot::diff compared the contents of an object")
        }
    }

    #[test]
    fn diff_compares_pointers_only() {
        let mut map = Map::new();
        for i in 0..10_000u32 {
            map.insert(
                ObjectKey::new("ns", format!("o{i:05}")),
                Shared(Arc::new(NoCompare(i))),
            );
        }
        let old = Objects { map };
        let mut new = old.clone();
        let key = ObjectKey::new("ns", "o04242");
        // Same contents, new allocation: counts as updated, without looking inside.
        new.map
            .insert(key.clone(), Shared(Arc::new(NoCompare(4242))));
        new.map.remove(&ObjectKey::new("ns", "o00007"));
        let diff = new.diff_from(&old);
        assert_eq!(diff.updated, vec![key]);
        assert_eq!(diff.removed, vec![ObjectKey::new("ns", "o00007")]);
        assert!(diff.added.is_empty());
        assert_eq!(new.get("ns", "o09999").map(|o| o.0), Some(9999));
    }

    #[test]
    fn snapshot_serializes_for_debugging() {
        let snap = Snapshot::builder()
            .namespace(crate::testutil::namespace("shop"))
            .build();
        let json = serde_json::to_value(&snap).unwrap();
        assert_eq!(json["ready"], true);
        assert_eq!(json["namespaces"][0]["name"], "shop");
        assert!(format!("{snap:?}").contains("namespaces: 1"));
    }
}
