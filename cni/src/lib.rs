//! `fairlead-cni`: Fairlead's CNI 1.1 plugin (ADD, DEL, CHECK, STATUS, GC, VERSION).
//!
//! Where it sits: the container runtime (containerd, CRI-O, the sandbox's
//! kubelet) execs this binary on every node, once per pod network event, with
//! the `CNI_*` environment and the network config on stdin. The Fairlead agent
//! writes that config (`/etc/cni/net.d/10-fairlead.conflist`) from its Node's
//! `podCIDRs`, so the plugin needs no API access; STATUS asks the agent over its
//! node-local Unix socket whether the node is ready.
//!
//! What ADD builds (routed, no bridge, like Calico and Cilium): a veth pair whose
//! host end `fl<11 hex>` stays in the node namespace the plugin was started in
//! and whose peer is created directly inside the pod namespace as `CNI_IFNAME`;
//! pod addresses `/32` and `/128` from the node's PodCIDRs ([`ipam`]); in the pod
//! `default via 169.254.1.1` and `default via fe80::1` with permanent neighbour
//! entries for both gateways pointing at the host end; on the node a host route
//! per pod address through the host end. All of it over synchronous rtnetlink
//! ([`netlink`]), no async runtime and no `ip` subprocesses, so one ADD costs a
//! handful of syscalls.
//!
//! DEL takes the veth out of use in a few fast requests (down, which drops
//! its routes, and renamed to a `flz…` tombstone, both ends) and hands the
//! slow delete (one RCU grace period, ~20 ms) to the agent over its socket
//! ([`agent`]); when the agent does not take it, DEL deletes it itself
//! ([`teardown`]).
//!
//! Every failure is rolled back in reverse order and reported as the spec's
//! error JSON on stdout ([`PluginError`]).

pub mod agent;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod netns;
mod plugin;
pub mod teardown;
pub mod types;

pub use config::{NetConf, Version, SUPPORTED_VERSIONS};
pub use env::{CniEnv, Command};
pub use error::PluginError;
pub use plugin::{host_ifname, run, Outcome};
