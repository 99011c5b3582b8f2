//! The store: applies watcher events to per-kind maps and produces snapshots. Pure (no IO), so
//! the relist and readiness rules are tested without an API server.

use std::sync::Arc;

use imbl::ordmap::DiffItem;

use crate::snapshot::{update_indexes, Map, Shared};
use crate::{
    EndpointSlice, Kind, Namespace, NetworkPolicy, Node, Object, ObjectKey, Objects, Pod, Service,
    Snapshot,
};

/// A watcher event for one kind, already converted to model types. Mirrors
/// `kube::runtime::watcher::Event`, except that a deletion carries only the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<T> {
    /// A (re)list starts; the objects that follow replace the kind's contents at `InitDone`.
    Init,
    InitApply(T),
    /// The list is complete: objects not listed since `Init` are gone.
    InitDone,
    Apply(T),
    Delete(ObjectKey),
}

/// An [`Event`] of any kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    Pod(Event<Pod>),
    Namespace(Event<Namespace>),
    Node(Event<Node>),
    NetworkPolicy(Event<NetworkPolicy>),
}

macro_rules! cluster_event_from {
    ($($kind:ident),*) => {$(
        impl From<Event<$kind>> for ClusterEvent {
            fn from(e: Event<$kind>) -> Self {
                ClusterEvent::$kind(e)
            }
        }
    )*};
}
cluster_event_from!(Service, EndpointSlice, Pod, Namespace, Node, NetworkPolicy);

impl ClusterEvent {
    pub fn kind(&self) -> Kind {
        match self {
            ClusterEvent::Service(_) => Kind::Service,
            ClusterEvent::EndpointSlice(_) => Kind::EndpointSlice,
            ClusterEvent::Pod(_) => Kind::Pod,
            ClusterEvent::Namespace(_) => Kind::Namespace,
            ClusterEvent::Node(_) => Kind::Node,
            ClusterEvent::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }
}

/// One kind's live objects, plus the buffer of a list in progress.
struct KindState<T> {
    live: Map<T>,
    /// `Some` between `Init` and `InitDone`. The live map keeps serving the old contents until
    /// the list is complete, so a relist never publishes a half-listed kind.
    relist: Option<Map<T>>,
    synced: bool,
}

impl<T> Default for KindState<T> {
    fn default() -> Self {
        Self {
            live: Map::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: Object> KindState<T> {
    /// Applies one event; true if the live contents or the synced flag changed.
    fn apply(&mut self, event: Event<T>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(Map::new());
                false
            }
            Event::InitApply(obj) => {
                let key = obj.key();
                let shared = self.share(&key, obj);
                match &mut self.relist {
                    Some(buf) => {
                        buf.insert(key, shared);
                        false
                    }
                    // kube-runtime always sends Init first; without it, treat as a plain apply.
                    None => self.upsert(key, shared),
                }
            }
            Event::InitDone => {
                let changed = match self.relist.take() {
                    Some(listed) => self.replace(listed),
                    None => false,
                };
                let first_sync = !self.synced;
                self.synced = true;
                changed || first_sync
            }
            Event::Apply(obj) => {
                let key = obj.key();
                let shared = self.share(&key, obj);
                if let Some(buf) = &mut self.relist {
                    buf.insert(key.clone(), shared.clone());
                }
                self.upsert(key, shared)
            }
            Event::Delete(key) => {
                if let Some(buf) = &mut self.relist {
                    buf.remove(&key);
                }
                self.live.remove(&key).is_some()
            }
        }
    }

    /// Reuses the live `Arc` when the object is unchanged, so snapshots stay pointer-equal for
    /// it. This deep compare happens once per event here, never in `Snapshot::diff`; it also
    /// hides updates to fields the model does not keep (e.g. a Pod's container statuses).
    fn share(&self, key: &ObjectKey, obj: T) -> Shared<T> {
        match self.live.get(key) {
            Some(old) if *old.0 == obj => old.clone(),
            _ => Shared(Arc::new(obj)),
        }
    }

    fn upsert(&mut self, key: ObjectKey, obj: Shared<T>) -> bool {
        if self.live.get(&key) == Some(&obj) {
            return false;
        }
        self.live.insert(key, obj);
        true
    }

    /// Makes the live map equal to a completed list by applying only the differences, so the
    /// unchanged parts of the tree stay shared with earlier snapshots.
    fn replace(&mut self, listed: Map<T>) -> bool {
        let changes: Vec<(ObjectKey, Option<Shared<T>>)> = self
            .live
            .diff(&listed)
            .map(|item| match item {
                DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => {
                    (k.clone(), Some(v.clone()))
                }
                DiffItem::Remove(k, _) => (k.clone(), None),
            })
            .collect();
        for (key, value) in &changes {
            match value {
                Some(v) => self.live.insert(key.clone(), v.clone()),
                None => self.live.remove(key),
            };
        }
        !changes.is_empty()
    }
}

/// Applies events of every kind and produces [`Snapshot`]s that share unchanged objects.
pub struct Store {
    services: KindState<Service>,
    endpoint_slices: KindState<EndpointSlice>,
    pods: KindState<Pod>,
    namespaces: KindState<Namespace>,
    nodes: KindState<Node>,
    network_policies: KindState<NetworkPolicy>,
    last: Arc<Snapshot>,
    dirty: bool,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            services: KindState::default(),
            endpoint_slices: KindState::default(),
            pods: KindState::default(),
            namespaces: KindState::default(),
            nodes: KindState::default(),
            network_policies: KindState::default(),
            last: Arc::new(Snapshot::empty()),
            dirty: false,
        }
    }

    /// Applies one event. Returns true if the next snapshot will differ from the last one.
    pub fn apply(&mut self, event: impl Into<ClusterEvent>) -> bool {
        let changed = match event.into() {
            ClusterEvent::Service(e) => self.services.apply(e),
            ClusterEvent::EndpointSlice(e) => self.endpoint_slices.apply(e),
            ClusterEvent::Pod(e) => self.pods.apply(e),
            ClusterEvent::Namespace(e) => self.namespaces.apply(e),
            ClusterEvent::Node(e) => self.nodes.apply(e),
            ClusterEvent::NetworkPolicy(e) => self.network_policies.apply(e),
        };
        self.dirty |= changed;
        changed
    }

    /// Replaces one kind's contents with a complete list (`Init`, `InitApply`..., `InitDone`).
    pub fn list<T>(&mut self, objects: impl IntoIterator<Item = T>)
    where
        Event<T>: Into<ClusterEvent>,
    {
        self.apply(Event::<T>::Init);
        for obj in objects {
            self.apply(Event::InitApply(obj));
        }
        self.apply(Event::<T>::InitDone);
    }

    /// True once every kind has completed its first full list.
    pub fn is_ready(&self) -> bool {
        self.pending_kinds().is_empty()
    }

    /// Kinds that have not completed their first full list yet.
    pub fn pending_kinds(&self) -> Vec<Kind> {
        let synced = [
            (Kind::Service, self.services.synced),
            (Kind::EndpointSlice, self.endpoint_slices.synced),
            (Kind::Pod, self.pods.synced),
            (Kind::Namespace, self.namespaces.synced),
            (Kind::Node, self.nodes.synced),
            (Kind::NetworkPolicy, self.network_policies.synced),
        ];
        synced
            .into_iter()
            .filter(|(_, s)| !s)
            .map(|(k, _)| k)
            .collect()
    }

    /// True if events since the last [`Store::snapshot`] changed anything.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The current state. Returns the previous snapshot itself (same `Arc`, same generation) when
    /// nothing changed, so publishing it again is a no-op for consumers that compare generations.
    pub fn snapshot(&mut self) -> Arc<Snapshot> {
        if !self.dirty {
            return Arc::clone(&self.last);
        }
        let mut next = Snapshot {
            generation: self.last.generation + 1,
            ready: self.is_ready(),
            services: Objects {
                map: self.services.live.clone(),
            },
            endpoint_slices: Objects {
                map: self.endpoint_slices.live.clone(),
            },
            pods: Objects {
                map: self.pods.live.clone(),
            },
            namespaces: Objects {
                map: self.namespaces.live.clone(),
            },
            nodes: Objects {
                map: self.nodes.live.clone(),
            },
            network_policies: Objects {
                map: self.network_policies.live.clone(),
            },
            slices_by_service: Default::default(),
            pods_by_node: Default::default(),
        };
        update_indexes(&self.last, &mut next);
        self.last = Arc::new(next);
        self.dirty = false;
        Arc::clone(&self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{namespace, pod, ready_store, service, slice};
    use crate::Diff;

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    #[test]
    fn ready_only_after_every_kind_listed_once() {
        let mut store = Store::new();
        assert!(!store.is_ready());
        store.list(vec![service("a", "web", 80)]);
        store.list(Vec::<EndpointSlice>::new());
        store.list(Vec::<Pod>::new());
        store.list(Vec::<Namespace>::new());
        store.list(Vec::<Node>::new());
        assert_eq!(store.pending_kinds(), vec![Kind::NetworkPolicy]);
        let snap = store.snapshot();
        assert!(!snap.ready);
        assert_eq!(snap.services().len(), 1);

        store.apply(Event::<NetworkPolicy>::Init);
        assert!(
            !store.is_ready(),
            "a list in progress is not a completed list"
        );
        store.apply(Event::<NetworkPolicy>::InitDone);
        assert!(store.is_ready());
        assert!(store.snapshot().ready);
    }

    #[test]
    fn diff_reports_added_updated_removed_and_not_unchanged() {
        let mut store = ready_store();
        store.apply(Event::Apply(service("a", "web", 80)));
        store.apply(Event::Apply(service("a", "db", 5432)));
        store.apply(Event::Apply(service("b", "cache", 6379)));
        let s1 = store.snapshot();

        store.apply(Event::Apply(service("a", "web", 8080))); // updated
        store.apply(Event::Apply(service("a", "db", 5432))); // same contents: not an update
        store.apply(Event::<Service>::Delete(key("b", "cache")));
        store.apply(Event::Apply(service("b", "queue", 5672)));
        store.apply(Event::Apply(namespace("a")));
        let s2 = store.snapshot();

        let diff = Snapshot::diff(&s1, &s2);
        assert_eq!(diff.services.added, vec![key("b", "queue")]);
        assert_eq!(diff.services.updated, vec![key("a", "web")]);
        assert_eq!(diff.services.removed, vec![key("b", "cache")]);
        assert_eq!(diff.namespaces.added, vec![ObjectKey::cluster("a")]);
        assert!(diff.pods.is_empty() && diff.endpoint_slices.is_empty());
        // The unchanged object is the very same allocation in both snapshots.
        assert!(Arc::ptr_eq(
            s1.service("a", "db").unwrap(),
            s2.service("a", "db").unwrap()
        ));
        assert_eq!(s2.generation, s1.generation + 1);

        assert!(Snapshot::diff(&s2, &s2).is_empty());
        let back = Snapshot::diff(&s2, &s1);
        assert_eq!(back.services.added, vec![key("b", "cache")]);
        assert_eq!(back.services.removed, vec![key("b", "queue")]);
    }

    #[test]
    fn unchanged_apply_keeps_the_snapshot() {
        let mut store = ready_store();
        store.apply(Event::Apply(pod("a", "p", "n1", "10.244.1.2")));
        let s1 = store.snapshot();
        assert!(!store.apply(Event::Apply(pod("a", "p", "n1", "10.244.1.2"))));
        assert!(!store.apply(Event::<Pod>::Delete(key("a", "missing"))));
        let s2 = store.snapshot();
        assert!(Arc::ptr_eq(&s1, &s2), "no change, no new snapshot");
    }

    #[test]
    fn relist_replaces_the_kind_and_shares_unchanged_objects() {
        let mut store = ready_store();
        store.list(vec![
            service("a", "kept", 80),
            service("a", "changed", 80),
            service("a", "gone", 80),
        ]);
        store.list(vec![pod("a", "p", "n1", "10.244.1.2")]);
        let before = store.snapshot();

        // A 410 Gone makes the watcher list again. Until InitDone the old contents stay visible.
        store.apply(Event::<Service>::Init);
        store.apply(Event::InitApply(service("a", "kept", 80)));
        store.apply(Event::InitApply(service("a", "changed", 81)));
        store.apply(Event::InitApply(service("a", "new", 80)));
        let during = store.snapshot();
        assert!(
            Arc::ptr_eq(&before, &during),
            "a half-done list is not published"
        );

        store.apply(Event::<Service>::InitDone);
        let after = store.snapshot();
        let diff = Snapshot::diff(&before, &after);
        assert_eq!(
            diff,
            Diff {
                services: crate::KindDiff {
                    added: vec![key("a", "new")],
                    updated: vec![key("a", "changed")],
                    removed: vec![key("a", "gone")],
                },
                ..Diff::default()
            }
        );
        assert!(Arc::ptr_eq(
            before.service("a", "kept").unwrap(),
            after.service("a", "kept").unwrap()
        ));
        // Other kinds are untouched by a Service relist.
        assert_eq!(after.pods().len(), 1);
        assert!(after.ready);
    }

    #[test]
    fn relist_restarted_midway_keeps_only_the_last_list() {
        let mut store = ready_store();
        store.list(vec![service("a", "old", 80)]);
        store.apply(Event::<Service>::Init);
        store.apply(Event::InitApply(service("a", "x", 80)));
        // The list failed halfway and started over.
        store.apply(Event::<Service>::Init);
        store.apply(Event::InitApply(service("a", "y", 80)));
        store.apply(Event::<Service>::InitDone);
        let snap = store.snapshot();
        let keys: Vec<_> = snap.services().keys().cloned().collect();
        assert_eq!(keys, vec![key("a", "y")]);
    }

    #[test]
    fn relist_to_empty_removes_everything() {
        let mut store = ready_store();
        store.list(vec![service("a", "s1", 80), service("b", "s2", 80)]);
        let before = store.snapshot();
        store.list(Vec::<Service>::new());
        let after = store.snapshot();
        assert!(after.services().is_empty());
        assert_eq!(Snapshot::diff(&before, &after).services.removed.len(), 2);
    }

    #[test]
    fn indexes_follow_changes() {
        let mut store = ready_store();
        store.apply(Event::Apply(slice("a", "web-1", "web", &["10.244.1.2"])));
        store.apply(Event::Apply(slice("a", "web-2", "web", &["10.244.2.2"])));
        store.apply(Event::Apply(slice("b", "web-1", "web", &["10.244.3.2"])));
        store.apply(Event::Apply(pod("a", "p1", "n1", "10.244.1.2")));
        store.apply(Event::Apply(pod("a", "p2", "n2", "10.244.2.2")));
        store.apply(Event::Apply(pod("b", "p3", "n1", "10.244.1.3")));
        let s = store.snapshot();
        let names = |it: &mut dyn Iterator<Item = ObjectKey>| it.collect::<Vec<_>>();
        assert_eq!(
            names(&mut s.endpoint_slices_of(&key("a", "web")).map(|e| e.key())),
            vec![key("a", "web-1"), key("a", "web-2")]
        );
        assert_eq!(
            names(&mut s.pods_on_node("n1").map(|p| p.key())),
            vec![key("a", "p1"), key("b", "p3")]
        );

        // A slice moves to another Service, one is deleted; a pod moves node, one is deleted.
        store.apply(Event::Apply(slice("a", "web-2", "api", &["10.244.2.2"])));
        store.apply(Event::<EndpointSlice>::Delete(key("a", "web-1")));
        store.apply(Event::Apply(pod("a", "p2", "n1", "10.244.2.2")));
        store.apply(Event::<Pod>::Delete(key("b", "p3")));
        let s = store.snapshot();
        assert_eq!(s.endpoint_slices_of(&key("a", "web")).count(), 0);
        assert_eq!(
            names(&mut s.endpoint_slices_of(&key("a", "api")).map(|e| e.key())),
            vec![key("a", "web-2")]
        );
        assert_eq!(
            names(&mut s.pods_on_node("n1").map(|p| p.key())),
            vec![key("a", "p1"), key("a", "p2")]
        );
        assert_eq!(s.pods_on_node("n2").count(), 0);
        assert_eq!(s.endpoint_slices().in_namespace("a").count(), 1);
        assert_eq!(s.endpoint_slices().in_namespace("b").count(), 1);
        assert_eq!(s.endpoint_slices().in_namespace("c").count(), 0);
    }

    #[test]
    fn builder_makes_a_ready_snapshot() {
        let snap = Snapshot::builder()
            .service(service("a", "web", 80))
            .endpoint_slice(slice("a", "web-1", "web", &["10.244.1.2"]))
            .pod(pod("a", "p", "n1", "10.244.1.2"))
            .namespace(namespace("a"))
            .build();
        assert!(snap.ready);
        assert_eq!(snap.generation, 1);
        assert!(snap.namespace("a").is_some());
        assert_eq!(snap.endpoint_slices_of(&key("a", "web")).count(), 1);
        assert_eq!(snap.pods_on_node("n1").count(), 1);
    }
}
