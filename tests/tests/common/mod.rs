//! Helpers shared by the sandbox tests.

use std::path::PathBuf;

/// `fairlead-cni` as cargo built it, next to this test's deps folder.
pub fn cni_plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("fairlead-cni");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build -p fairlead-cni` (cargo test --workspace does)",
        p.display()
    );
    p
}
