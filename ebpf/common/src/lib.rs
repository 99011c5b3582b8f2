//! Types and names shared by Fairlead's eBPF programs (`ebpf/programs`, kernel side)
//! and its loader (`ebpf/loader`, userspace).
//!
//! Both sides compile this one crate, so a map's key and value layout and the
//! spelling of every map and program name cannot drift apart. Everything here
//! is `#[repr(C)]` with explicit padding and a size assert: the kernel compares
//! byte sizes, and padding bytes in a hash-map key take part in the hash.
//! The `user` feature adds `aya::Pod` impls for userspace.
#![no_std]

pub mod ifstats;
pub mod lb;
pub mod policy;

/// BPF object names (maps, programs) are cut at 15 bytes by the kernel
/// (`BPF_OBJ_NAME_LEN` is 16 with the NUL). A longer name would load but
/// show up truncated in `bpftool`, so every name is checked at compile time.
pub const BPF_OBJ_NAME_MAX: usize = 15;

/// Compile-time check used by the name consts below.
pub const fn name_fits(name: &str) -> bool {
    !name.is_empty() && name.len() <= BPF_OBJ_NAME_MAX
}

/// `const` string equality, so the programs can check that a literal they
/// must spell out (attribute arguments) equals the shared const.
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
