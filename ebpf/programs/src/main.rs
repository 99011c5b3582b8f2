//! Fairlead's in-kernel programs, one object for all families (Cilium style:
//! one module per concern, one entry program per hook named `<area>_<hook>`).
//! Built by `ebpf/loader/build.rs` for bpfel-unknown-none and embedded in the
//! loader; map and program names come from `fairlead-ebpf-common`.
#![no_std]
#![no_main]

mod ifstats;
mod lb;
mod policy;

// There is no unwinding in BPF and the verifier rejects anything that could
// reach a real panic path; this handler only satisfies `no_std`.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel refuses GPL-only helpers to programs whose license string is not
// GPL-compatible; dual licensing keeps those helpers available to later
// families (events, drop reasons) without relicensing.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
