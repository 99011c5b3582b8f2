//! Per-interface packet and byte counters, counted on tc ingress and egress.
//!
//! Map `fl_ifstats_v1`: LRU per-CPU hash, [`IfStatsKey`] -> [`IfStatsValue`].
//! Per-CPU because `AtomicU64::fetch_add` does not exist on bpfel and each CPU
//! owning its slot needs no atomics at all; userspace sums the CPUs. LRU so
//! that ifindexes of deleted pods age out without the agent cleaning up.

use core::mem::size_of;

/// Map of counters, pinned as `/sys/fs/bpf/fairlead-<instance>/fl_ifstats_v1`.
pub const MAP_IFSTATS: &str = "fl_ifstats_v1";
/// tc ingress entry program (`<area>_<hook>`).
pub const PROG_INGRESS: &str = "ifstats_ingress";
/// tc egress entry program (`<area>_<hook>`).
pub const PROG_EGRESS: &str = "ifstats_egress";
/// Entries in [`MAP_IFSTATS`]: two per interface, so room for 2048 interfaces
/// before LRU eviction starts.
pub const MAP_IFSTATS_MAX_ENTRIES: u32 = 4096;

const _: () = assert!(crate::name_fits(MAP_IFSTATS));
const _: () = assert!(crate::name_fits(PROG_INGRESS));
const _: () = assert!(crate::name_fits(PROG_EGRESS));

/// Which tc hook saw the packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// Key of [`MAP_IFSTATS`]. ifindex is only unique inside one network
/// namespace, so one loaded instance counts one namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfStatsKey {
    pub ifindex: u32,
    /// A [`Direction`] as `u8`; a raw byte (not the enum) because userspace
    /// reads keys back from the kernel and any byte value must be valid.
    pub direction: u8,
    /// Padding, always zero: the kernel hashes all 8 bytes of the key, so
    /// stray padding would split one interface into several entries.
    /// Two scalars rather than `[u8; 3]`: bpf-linker passes LLVM
    /// `--bpf-expand-memcpy-in-order`, which turns every memset it cannot
    /// prove small into a call to a byte-loop `memset` subprogram; zeroing an
    /// array did exactly that, zeroing scalars is two plain stores.
    pub _pad0: u8,
    pub _pad1: u16,
}

const _: () = assert!(size_of::<IfStatsKey>() == 8);

impl IfStatsKey {
    pub const fn new(ifindex: u32, direction: Direction) -> Self {
        Self {
            ifindex,
            direction: direction as u8,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The direction, or `None` for a byte no program writes.
    pub const fn direction(&self) -> Option<Direction> {
        match self.direction {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }
}

/// Value of [`MAP_IFSTATS`] for one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStatsValue {
    pub packets: u64,
    /// `skb->len`: the whole frame including the Ethernet header.
    pub bytes: u64,
}

const _: () = assert!(size_of::<IfStatsValue>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::{IfStatsKey, IfStatsValue};

    // SAFETY: both are `#[repr(C)]`, `Copy`, made only of integers with no
    // implicit padding (checked by the size asserts), so every byte pattern
    // the kernel hands back is a valid value.
    unsafe impl aya::Pod for IfStatsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IfStatsValue {}
}
