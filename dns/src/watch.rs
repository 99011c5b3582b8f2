//! The DNS process's own view of the cluster, for `fairlead dns`: kube-rs watchers on
//! Services and EndpointSlices (and Pods, only in `verified` pod mode), through
//! `fairlead_core::watch::watch_kind`. Each object is converted at once into the compact
//! DNS data of [`crate::model`] and applied to the index; the core objects are dropped there, so
//! the process holds no `Snapshot` (which, with every kind and every field, cost more than the
//! whole memory budget at 10,000 Services and 50,000 pods).
//!
//! Each kind's events are applied in batches under the index's write lock. A relist replaces a
//! kind's contents: what was not listed again is removed at its end. The server is ready once
//! every watched kind has completed its first list.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fairlead_core::{ConvertError, EndpointSlice, Event, Object, ObjectKey, Pod, Service};
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::index::{pod_id, Change, Index};
use crate::model::{DnsPod, DnsService, DnsSlice, PodMode};
use crate::server::Shared;

/// Converted objects waiting between a watcher and the index: small, so a burst holds few core
/// objects at a time.
const QUEUE: usize = 64;
/// Events applied under one write lock at most.
const BATCH: usize = 256;

/// A kind DNS follows: how its objects become index changes.
trait Feed: Object {
    /// What a relist remembers per object to find the ones that are gone.
    type Id: Hash + Eq + Send;
    fn id(key: &ObjectKey) -> Self::Id;
    fn change(key: ObjectKey, obj: Option<&Self>) -> Change;
    /// Changes removing what the index holds of this kind and `seen` does not name.
    fn stale(index: &Index, seen: &HashSet<Self::Id>) -> Vec<Change>;
}

impl Feed for Service {
    type Id = ObjectKey;
    fn id(key: &ObjectKey) -> ObjectKey {
        key.clone()
    }
    fn change(key: ObjectKey, obj: Option<&Self>) -> Change {
        Change::Service(key, obj.map(DnsService::from))
    }
    fn stale(index: &Index, seen: &HashSet<ObjectKey>) -> Vec<Change> {
        let gone = index.stale_services(seen);
        gone.into_iter().map(|k| Change::Service(k, None)).collect()
    }
}

impl Feed for EndpointSlice {
    type Id = ObjectKey;
    fn id(key: &ObjectKey) -> ObjectKey {
        key.clone()
    }
    fn change(key: ObjectKey, obj: Option<&Self>) -> Change {
        Change::Slice(key, obj.and_then(DnsSlice::from_core))
    }
    fn stale(index: &Index, seen: &HashSet<ObjectKey>) -> Vec<Change> {
        let gone = index.stale_slices(seen);
        gone.into_iter().map(|k| Change::Slice(k, None)).collect()
    }
}

impl Feed for Pod {
    type Id = u64;
    fn id(key: &ObjectKey) -> u64 {
        pod_id(key)
    }
    fn change(key: ObjectKey, obj: Option<&Self>) -> Change {
        Change::Pod(pod_id(&key), obj.and_then(DnsPod::from_core))
    }
    fn stale(index: &Index, seen: &HashSet<u64>) -> Vec<Change> {
        let gone = index.stale_pods(seen);
        gone.into_iter().map(|id| Change::Pod(id, None)).collect()
    }
}

/// Starts the watchers and the tasks applying their events to `shared`'s index.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    client: Client,
    config: watcher::Config,
) -> Vec<JoinHandle<()>> {
    let verified = shared.pod_mode() == PodMode::Verified;
    let pending = Arc::new(AtomicUsize::new(if verified { 3 } else { 2 }));
    let mut tasks = Vec::new();
    follow::<corev1::Service, Service>(&mut tasks, shared, &client, &config, &pending);
    follow::<discoveryv1::EndpointSlice, EndpointSlice>(
        &mut tasks, shared, &client, &config, &pending,
    );
    if verified {
        follow::<corev1::Pod, Pod>(&mut tasks, shared, &client, &config, &pending);
    }
    tasks
}

fn follow<K, T>(
    tasks: &mut Vec<JoinHandle<()>>,
    shared: &Arc<Shared>,
    client: &Client,
    config: &watcher::Config,
    pending: &Arc<AtomicUsize>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    T: Feed + for<'a> TryFrom<&'a K, Error = ConvertError>,
{
    let (tx, rx) = mpsc::channel::<Event<T>>(QUEUE);
    tasks.push(tokio::spawn(fairlead_core::watch::watch_kind::<K, T, _>(
        client.clone(),
        config.clone(),
        tx,
    )));
    tasks.push(tokio::spawn(apply(
        Arc::clone(shared),
        rx,
        Arc::clone(pending),
    )));
}

/// Applies one kind's events to the index until its watcher ends.
async fn apply<T: Feed>(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<Event<T>>,
    pending: Arc<AtomicUsize>,
) {
    let mut listing: Option<HashSet<T::Id>> = None;
    let mut listed_once = false;
    let mut batch = Vec::with_capacity(BATCH);
    while events.recv_many(&mut batch, BATCH).await > 0 {
        let (mut first_list_done, mut list_done) = (false, false);
        {
            let mut index = shared.index_mut();
            let mut changes = Vec::new();
            for event in batch.drain(..) {
                match event {
                    Event::Init => listing = Some(HashSet::new()),
                    Event::InitApply(obj) | Event::Apply(obj) => {
                        let key = obj.key();
                        if let Some(seen) = &mut listing {
                            seen.insert(T::id(&key));
                        }
                        changes.push(T::change(key, Some(&obj)));
                    }
                    Event::Delete(key) => changes.push(T::change(key, None)),
                    Event::InitDone => {
                        index.update(std::mem::take(&mut changes));
                        if let Some(seen) = listing.take() {
                            let stale = T::stale(&index, &seen);
                            index.update(stale);
                        }
                        first_list_done |= !std::mem::replace(&mut listed_once, true);
                        list_done = true;
                    }
                }
            }
            if !changes.is_empty() {
                let stats = index.update(changes);
                tracing::debug!(kind = %T::KIND, ?stats, "DNS index updated");
            }
        }
        if first_list_done && pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.mark_ready();
        } else if list_done {
            crate::server::trim_heap();
        }
    }
    tracing::info!(kind = %T::KIND, "{} watcher ended; serving the last state seen", T::KIND);
}
