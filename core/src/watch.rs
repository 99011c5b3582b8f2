//! The one path from the API server into the model: a kube-rs watcher per kind, converting each
//! object once, feeding a single [`Store`], publishing `watch::Receiver<Arc<Snapshot>>`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = kube::Client::try_default().await?;
//! let mut cluster = fairlead_core::watch::spawn(client)?;
//! let snapshot = cluster.ready().await?; // every kind listed once
//! let mut applied = snapshot;
//! loop {
//!     let next = cluster.changed().await?;
//!     let diff = fairlead_core::Snapshot::diff(&applied, &next);
//!     // ... apply `diff` ...
//!     applied = next;
//! }
//! # }
//! ```

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use k8s_openapi::api::networking::v1 as networkingv1;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::store::{ClusterEvent, Event};
use crate::{
    ConvertError, EndpointSlice, Namespace, NetworkPolicy, Node, Object, ObjectKey, Pod, Service,
    Snapshot, Store,
};

/// Events taken from the queue before one snapshot is published, so that a long burst still
/// publishes now and then instead of starving consumers.
const MAX_BATCH: usize = 4096;
/// Room for bursts (initial list pages) between the watchers and the store.
const QUEUE: usize = 1024;
/// How often to say which kinds are still listing while the snapshot is not ready.
const NOT_READY_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("fairlead_core::watch::spawn must be called from inside a Tokio runtime")]
    NoRuntime,
    #[error("the cluster watcher has stopped (its tasks ended or were aborted); start a new one with watch::spawn")]
    Stopped,
}

/// Handle to the running watchers and their published snapshots. The watchers run until the last
/// clone of this handle is dropped; receivers from [`SnapshotWatch::subscribe`] do not keep them
/// alive on their own.
#[derive(Clone)]
pub struct SnapshotWatch {
    rx: watch::Receiver<Arc<Snapshot>>,
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl SnapshotWatch {
    /// Waits until every kind has completed its first full list and returns that snapshot.
    /// Returns at once if that already happened.
    pub async fn ready(&mut self) -> Result<Arc<Snapshot>, WatchError> {
        let snap = self
            .rx
            .wait_for(|s| s.ready)
            .await
            .map_err(|_| WatchError::Stopped)?;
        Ok(Arc::clone(&snap))
    }

    /// Waits for a snapshot newer than the last one this handle returned. Snapshots published
    /// in between are skipped: diff against what you applied, not against the previous one.
    pub async fn changed(&mut self) -> Result<Arc<Snapshot>, WatchError> {
        self.rx.changed().await.map_err(|_| WatchError::Stopped)?;
        Ok(Arc::clone(&self.rx.borrow_and_update()))
    }

    /// The latest published snapshot (not ready until the first full list of every kind).
    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.rx.borrow())
    }

    /// A receiver for components that take a `watch::Receiver<Arc<Snapshot>>`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

/// Starts one watcher per kind (Service, EndpointSlice, Pod, Namespace, Node, NetworkPolicy,
/// all namespaces) and the task that publishes snapshots. Call it once per process: every
/// consumer in the process should share the returned handle.
///
/// Needs list and watch permission on those six resources. Wait with
/// [`SnapshotWatch::ready`]; watch errors are logged and retried with backoff, so a missing
/// permission shows as warnings and a snapshot that never becomes ready.
pub fn spawn(client: Client) -> Result<SnapshotWatch, WatchError> {
    spawn_with(client, watcher::Config::default())
}

/// [`spawn`] with a watcher configuration, applied to every kind (e.g. a shorter `timeout` in
/// tests). A label or field selector here would filter every kind alike.
pub fn spawn_with(client: Client, config: watcher::Config) -> Result<SnapshotWatch, WatchError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| WatchError::NoRuntime)?;
    let (events_tx, events_rx) = mpsc::channel(QUEUE);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::empty()));

    let tasks = vec![
        rt.spawn(watch_kind::<corev1::Service, Service, ClusterEvent>(
            client.clone(),
            config.clone(),
            events_tx.clone(),
        )),
        rt.spawn(watch_kind::<
            discoveryv1::EndpointSlice,
            EndpointSlice,
            ClusterEvent,
        >(client.clone(), config.clone(), events_tx.clone())),
        rt.spawn(watch_kind::<corev1::Pod, Pod, ClusterEvent>(
            client.clone(),
            config.clone(),
            events_tx.clone(),
        )),
        rt.spawn(watch_kind::<corev1::Namespace, Namespace, ClusterEvent>(
            client.clone(),
            config.clone(),
            events_tx.clone(),
        )),
        rt.spawn(watch_kind::<corev1::Node, Node, ClusterEvent>(
            client.clone(),
            config.clone(),
            events_tx.clone(),
        )),
        rt.spawn(watch_kind::<
            networkingv1::NetworkPolicy,
            NetworkPolicy,
            ClusterEvent,
        >(client, config, events_tx)),
        rt.spawn(publish(events_rx, snap_tx)),
    ];
    Ok(SnapshotWatch {
        rx: snap_rx,
        _tasks: Arc::new(Tasks(tasks)),
    })
}

/// Runs one kind's watcher (all namespaces) for as long as `tx` has a receiver: each object
/// converted to the model type `T` at once, as an [`Event<T>`] (or anything it converts into,
/// such as a [`ClusterEvent`]). For a consumer that keeps its own compact state instead of
/// [`Snapshot`]s (the cluster DNS); [`spawn`] runs one per kind.
pub async fn watch_kind<K, T, E>(client: Client, config: watcher::Config, tx: mpsc::Sender<E>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Object + for<'a> TryFrom<&'a K, Error = ConvertError>,
    Event<T>: Into<E>,
{
    let kind = T::KIND;
    let stream = watcher(Api::<K>::all(client), config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(err) => {
                // The watcher restarts by itself (relisting after 410 Gone); backoff spaces it out.
                warn!(%kind, error = %err, "watching {kind} failed; retrying with backoff");
                continue;
            }
        };
        match &event {
            watcher::Event::Init => debug!(%kind, "listing {kind}"),
            watcher::Event::InitDone => debug!(%kind, "listed {kind}"),
            _ => {}
        }
        if let Some(event) = convert_event::<K, T>(event) {
            if tx.send(event.into()).await.is_err() {
                return; // the publisher is gone
            }
        }
    }
}

/// Converts a kube-runtime event to a model event, at the edge.
///
/// An object that fails conversion is logged and left out: skipped during a list, and removed on
/// a live update, because keeping its last good version would keep programming state the user
/// has since changed. Deletions need only the key, so they never fail.
pub(crate) fn convert_event<K, T>(event: watcher::Event<K>) -> Option<Event<T>>
where
    K: Resource,
    T: Object + for<'a> TryFrom<&'a K, Error = ConvertError>,
{
    match event {
        watcher::Event::Init => Some(Event::Init),
        watcher::Event::InitDone => Some(Event::InitDone),
        watcher::Event::InitApply(obj) => match T::try_from(&obj) {
            Ok(t) => Some(Event::InitApply(t)),
            Err(err) => {
                log_conversion_error(&err);
                None
            }
        },
        watcher::Event::Apply(obj) => match T::try_from(&obj) {
            Ok(t) => Some(Event::Apply(t)),
            Err(err) => {
                log_conversion_error(&err);
                key_of(&obj).map(Event::Delete)
            }
        },
        watcher::Event::Delete(obj) => key_of(&obj).map(Event::Delete),
    }
}

fn key_of<K: Resource>(obj: &K) -> Option<ObjectKey> {
    let meta = obj.meta();
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    Some(ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        name,
    ))
}

fn log_conversion_error(err: &ConvertError) {
    warn!(
        kind = %err.kind,
        object = %err.object,
        field = %err.field,
        value = %err.value,
        "{err}"
    );
}

/// Applies events to the store and publishes a snapshot after each batch, once ready.
async fn publish(mut events: mpsc::Receiver<ClusterEvent>, out: watch::Sender<Arc<Snapshot>>) {
    let mut store = Store::new();
    loop {
        let first = if store.is_ready() {
            events.recv().await
        } else {
            match tokio::time::timeout(NOT_READY_LOG_INTERVAL, events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    info!(pending = ?store.pending_kinds(), "cluster snapshot not ready: waiting for the first list of these kinds");
                    continue;
                }
            }
        };
        let Some(first) = first else { return };
        store.apply(first);
        // Coalesce: fold in whatever is already queued so a burst publishes one snapshot.
        let mut taken = 1;
        while taken < MAX_BATCH {
            match events.try_recv() {
                Ok(event) => {
                    store.apply(event);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        if !store.is_ready() || !store.is_dirty() {
            continue;
        }
        let snap = store.snapshot();
        if !out.borrow().ready {
            info!(
                generation = snap.generation,
                services = snap.services().len(),
                endpoint_slices = snap.endpoint_slices().len(),
                pods = snap.pods().len(),
                namespaces = snap.namespaces().len(),
                nodes = snap.nodes().len(),
                network_policies = snap.network_policies().len(),
                "cluster snapshot ready"
            );
        } else {
            debug!(generation = snap.generation, "publishing cluster snapshot");
        }
        out.send_replace(snap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{pod, service};
    use serde_json::json;

    fn k8s_service(name: &str, cluster_ip: &str) -> corev1::Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn converts_events_at_the_edge() {
        let ok =
            convert_event::<_, Service>(watcher::Event::Apply(k8s_service("web", "10.96.0.5")));
        assert!(matches!(ok, Some(Event::Apply(s)) if s.name == "web"));
        let ok =
            convert_event::<_, Service>(watcher::Event::InitApply(k8s_service("web", "10.96.0.5")));
        assert!(matches!(ok, Some(Event::InitApply(_))));
        let init = convert_event::<corev1::Service, Service>(watcher::Event::Init);
        assert_eq!(init, Some(Event::Init));
        let done = convert_event::<corev1::Service, Service>(watcher::Event::InitDone);
        assert_eq!(done, Some(Event::InitDone));

        // A bad object in a list is skipped; the rest of the list is unaffected.
        let bad = convert_event::<_, Service>(watcher::Event::InitApply(k8s_service(
            "web",
            "10.96.0.999",
        )));
        assert_eq!(bad, None);
        // A live update to something unusable drops the object rather than keep a stale version.
        let bad =
            convert_event::<_, Service>(watcher::Event::Apply(k8s_service("web", "10.96.0.999")));
        assert_eq!(bad, Some(Event::Delete(ObjectKey::new("shop", "web"))));
        // Deletion needs only the key, even for an object that would not convert.
        let del =
            convert_event::<_, Service>(watcher::Event::Delete(k8s_service("web", "10.96.0.999")));
        assert_eq!(del, Some(Event::Delete(ObjectKey::new("shop", "web"))));
    }

    /// A completed first list of every kind except Pods.
    fn list_all_but_pods() -> Vec<ClusterEvent> {
        vec![
            Event::<Service>::Init.into(),
            Event::InitApply(service("shop", "web", 80)).into(),
            Event::<Service>::InitDone.into(),
            Event::<EndpointSlice>::Init.into(),
            Event::<EndpointSlice>::InitDone.into(),
            Event::<Namespace>::Init.into(),
            Event::<Namespace>::InitDone.into(),
            Event::<Node>::Init.into(),
            Event::<Node>::InitDone.into(),
            Event::<NetworkPolicy>::Init.into(),
            Event::<NetworkPolicy>::InitDone.into(),
        ]
    }

    #[tokio::test]
    async fn publishes_only_when_ready_then_each_batch() {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (snap_tx, mut snap_rx) = watch::channel(Arc::new(Snapshot::empty()));
        let publisher = tokio::spawn(publish(rx, snap_tx));

        for e in list_all_but_pods() {
            tx.send(e).await.unwrap();
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!snap_rx.borrow().ready, "Pods have not been listed yet");
        assert_eq!(
            snap_rx.borrow().generation,
            0,
            "nothing is published before ready"
        );

        tx.send(Event::<Pod>::Init.into()).await.unwrap();
        tx.send(Event::InitApply(pod("shop", "p", "n1", "10.244.1.2")).into())
            .await
            .unwrap();
        tx.send(Event::<Pod>::InitDone.into()).await.unwrap();
        let first = Arc::clone(&*snap_rx.wait_for(|s| s.ready).await.unwrap());
        assert_eq!(first.generation, 1);
        assert_eq!(first.services().len(), 1);
        assert_eq!(first.pods().len(), 1);

        // A relist that finds the Pod gone removes it.
        tx.send(Event::<Pod>::Init.into()).await.unwrap();
        tx.send(Event::<Pod>::InitDone.into()).await.unwrap();
        snap_rx.changed().await.unwrap();
        let second = Arc::clone(&*snap_rx.borrow_and_update());
        assert_eq!(
            Snapshot::diff(&first, &second).pods.removed,
            vec![ObjectKey::new("shop", "p")]
        );

        drop(tx);
        publisher.await.unwrap();
    }

    #[tokio::test]
    async fn coalesces_a_burst_into_one_snapshot() {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (snap_tx, mut snap_rx) = watch::channel(Arc::new(Snapshot::empty()));
        // Everything is queued before the publisher runs: one batch, one snapshot.
        for e in list_all_but_pods() {
            tx.send(e).await.unwrap();
        }
        tx.send(Event::<Pod>::Init.into()).await.unwrap();
        tx.send(Event::<Pod>::InitDone.into()).await.unwrap();
        for i in 0..100 {
            tx.send(Event::Apply(pod("shop", &format!("p{i}"), "n1", "10.244.1.2")).into())
                .await
                .unwrap();
        }
        let publisher = tokio::spawn(publish(rx, snap_tx));
        let snap = Arc::clone(&*snap_rx.wait_for(|s| s.ready).await.unwrap());
        assert_eq!(snap.generation, 1);
        assert_eq!(snap.pods().len(), 100);
        drop(tx);
        publisher.await.unwrap();
    }

    #[tokio::test]
    async fn handle_reports_a_stopped_watcher() {
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::empty()));
        let mut handle = SnapshotWatch {
            rx: snap_rx,
            _tasks: Arc::new(Tasks(Vec::new())),
        };
        drop(snap_tx);
        assert!(matches!(handle.ready().await, Err(WatchError::Stopped)));
        assert!(!handle.current().ready);
    }

    #[test]
    fn spawn_outside_a_runtime_is_an_error() {
        // Building a Client needs no runtime; spawning the watchers does.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
            Client::try_from(config).unwrap()
        });
        assert!(matches!(spawn(client), Err(WatchError::NoRuntime)));
    }
}
