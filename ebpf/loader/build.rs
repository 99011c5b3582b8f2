//! Builds `ebpf/programs` for bpfel-unknown-none and leaves the object at
//! `$OUT_DIR/fairlead.bpf.o`, where `src/lib.rs` embeds it.
//!
//! The BPF target needs Debian's rustc (it ships a prebuilt `core` for
//! bpfel-unknown-none) and bpf-linker; rustup's toolchains cannot build it.
//! So the inner build runs `/usr/bin/cargo` with a cleared environment: the
//! outer cargo exports RUSTC, RUSTFLAGS, CARGO_* and a jobserver that all point
//! at rustup's toolchain and would leak into the inner build.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Debian's `libstd-rust-web-dev-bpf` puts the prebuilt `core` here.
const BPF_CORE_DIR: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const OBJECT_NAME: &str = "fairlead.bpf.o";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let programs = manifest_dir.join("../programs");
    let common = manifest_dir.join("../common");

    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        programs.join(".cargo/config.toml"),
        common.join("src"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo::rerun-if-changed={}", path.display());
    }

    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"));
    let linker_dir = check_toolchain(&cargo_home);

    // Debian's cargo and rustc first, so nothing on the inner PATH resolves
    // to a rustup proxy; bpf-linker's folder last.
    let path = format!("/usr/bin:/bin:{}", linker_dir.display());
    let target_dir = out_dir.join("ebpf-target");
    let output = Command::new(DEBIAN_CARGO)
        .current_dir(&programs)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf uses `asm_experimental_arch`; Debian's rustc is a stable
        // build, so this unlocks nightly features for the BPF crates only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target_dir)
        // Linker and rustflags (panic=abort, BTF) come from
        // ebpf/programs/.cargo/config.toml, found because current_dir is
        // there; setting them here too would pass `--btf` twice, which
        // bpf-linker rejects (env and config rustflags are merged).
        .args(["build", "--release", "--target", BPF_TARGET])
        .output()
        .unwrap_or_else(|e| fail(&format!("could not run {DEBIAN_CARGO}: {e}")));
    if !output.status.success() {
        fail(&format!(
            "building ebpf/programs with {DEBIAN_CARGO} failed ({}).\n--- stderr ---\n{}\n--- stdout ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        ));
    }

    let built = target_dir.join(BPF_TARGET).join("release").join("fairlead");
    let dest = out_dir.join(OBJECT_NAME);
    std::fs::copy(&built, &dest).unwrap_or_else(|e| {
        fail(&format!(
            "copying {} to {}: {e}",
            built.display(),
            dest.display()
        ))
    });
}

/// Checks every piece the inner build needs and returns the folder holding
/// bpf-linker, so a missing piece fails here with a fix instead of deep in
/// a rustc error.
fn check_toolchain(cargo_home: &Path) -> PathBuf {
    let mut missing = Vec::new();
    for (path, what) in [
        (DEBIAN_CARGO, "Debian's cargo (package cargo-web)"),
        (DEBIAN_RUSTC, "Debian's rustc (package rustc-web)"),
        (
            BPF_CORE_DIR,
            "the prebuilt core for bpfel-unknown-none (package libstd-rust-web-dev-bpf)",
        ),
    ] {
        if !Path::new(path).exists() {
            missing.push(format!("{what} at {path}"));
        }
    }
    let candidates = [
        cargo_home.join("bin"),
        PathBuf::from("/usr/local/bin"),
        PathBuf::from("/usr/bin"),
    ];
    let linker_dir = candidates
        .iter()
        .find(|dir| dir.join("bpf-linker").is_file())
        .cloned();
    if linker_dir.is_none() {
        missing.push(format!(
            "bpf-linker 0.13.0 (built against LLVM 22) in one of {}",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !missing.is_empty() {
        fail(&format!(
            "the eBPF toolchain is incomplete; missing:\n  - {}\nRun scripts/setup.sh (as root) to install it.",
            missing.join("\n  - ")
        ));
    }
    linker_dir.expect("checked above")
}

fn fail(message: &str) -> ! {
    // A panic in build.rs shows the message verbatim under "build script failed".
    panic!("\n\nfairlead-ebpf build.rs: {message}\n");
}
