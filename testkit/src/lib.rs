//! Test harness for Fairlead: throwaway network namespaces joined by veth
//! pairs, so tests run real packets through real eBPF programs without ever
//! touching the root network namespace.
//!
//! Everything made here is removed by Drop guards (also when a test panics),
//! and [`sweep_stale`] removes what a killed test run left behind: namespaces
//! named `fl-t-<pid>-<n>` and pin directories `/sys/fs/bpf/fairlead-t-<pid>-<n>`
//! whose pid is gone. Later: the embedded API server and a test CA.
//!
//! For tests that start a real container runtime: [`PrivateMounts`] keeps
//! the runtime's state files and mounts in a private mount namespace, and
//! [`CgroupTree`] gives it a cgroup parent that is removed afterwards
//! (`fl-t-<pid>-<n>` in every hierarchy, swept like the namespaces).

mod cgroup;
mod mountns;
mod netns;
pub mod packet;
pub mod process;

pub use cgroup::{cgroup_mounts, sweep_stale_cgroups, CgroupTree};
pub use mountns::PrivateMounts;

pub use netns::{
    command_in, require_root, sweep_stale, unique_instance, Netns, SweepReport, TestkitError, Veth,
    NETNS_PREFIX, PIN_INSTANCE_PREFIX,
};
