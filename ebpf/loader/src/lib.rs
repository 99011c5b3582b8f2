//! Userspace side of Fairlead's eBPF: loads the programs built from
//! `ebpf/programs` (embedded at build time), pins their maps under
//! `/sys/fs/bpf/fairlead-<instance>/`, attaches them with tcx to interfaces
//! inside a network namespace the caller names, and reads the maps back.
//!
//! The agent programs maps through this crate; tests drive the same code on
//! crafted packets (BPF_PROG_TEST_RUN) and on veths in test namespaces. The
//! namespace is always a parameter: nothing here acts on the process's own
//! namespace, and the root namespace is refused outright.

mod bpffs;
mod error;
mod ifstats;
pub mod lb;
pub mod maglev;
mod netns;
pub mod policy;

pub use bpffs::{ensure_bpffs, pin_dir, BPFFS_ROOT, PIN_DIR_PREFIX};
pub use error::Error;
pub use fairlead_ebpf_common::ifstats::Direction;
pub use ifstats::{Attachment, Counter, IfCounters, IfStats, TcxPrograms, TestRunOutput};
pub use netns::NetnsRef;

/// tc verdict "continue as usual" (`TC_ACT_OK`), what every counting program
/// returns.
pub const TC_ACT_OK: u32 = 0;

/// The object built from `ebpf/programs` by build.rs. Aligned because aya
/// parses ELF headers in place.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fairlead.bpf.o"));

// The agent keeps an instance in an async task; keep it movable across threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<IfStats>();
    assert_send::<lb::Lb>();
};
