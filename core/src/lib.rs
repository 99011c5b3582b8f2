//! The cluster model of Fairlead: plain Rust types, with no IO, for the Kubernetes objects that the
//! data plane acts on (Services, EndpointSlices, Pods, Namespaces, Nodes, NetworkPolicies).
//!
//! Data flow: API server -> [`watch`] (one kube-rs watcher per kind, converting each object once)
//! -> [`Store`] -> immutable [`Snapshot`] published as `watch::Receiver<Arc<Snapshot>>` -> each
//! consumer (agent eBPF maps, DNS records, controller) computes [`Snapshot::diff`] against what it
//! last applied and applies only that. Kubernetes types stop at the watcher; everything downstream
//! works on the types in this crate.

mod convert;
mod error;
mod labels;
mod net;
mod object;
#[cfg(test)]
mod testutil;

pub mod endpoint_slice;
pub mod node;
pub mod pod;
pub mod policy;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod watch;

pub use endpoint_slice::{AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
pub use error::{ConvertError, ConvertErrorDetails, Problem};
pub use labels::{LabelOperator, LabelRequirement, LabelSelector, Labels, SelectorError};
pub use net::{IpFamily, IpNet, IpNetParseError, PortRef, Protocol};
pub use node::{Namespace, Node};
pub use object::{Kind, Object, ObjectKey};
pub use pod::{ContainerPort, Pod, PodPhase};
pub use policy::{
    IpBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, PolicyTypes,
};
pub use service::{
    ClusterIps, IpFamilyPolicy, IpMode, LoadBalancerIngress, Service, ServicePort, ServiceType,
    SessionAffinity, TrafficPolicy, DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS,
};
pub use snapshot::{Diff, KindDiff, Objects, Snapshot, SnapshotBuilder};
pub use store::{ClusterEvent, Event, Store};
pub use watch::{spawn, spawn_with, SnapshotWatch, WatchError};
