//! Helpers shared by the sandbox tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;

use futures::FutureExt;

use fairlead_sandbox::cluster::{RoutingMode, Sandbox, SandboxConfig};
use fairlead_sandbox::{agents, cgroup, netns, topology::Topology};

/// `fairlead-proxy` as cargo built it (`cargo test --workspace` builds it); the sandbox says
/// so clearly if a meshed pod needs it and it is missing.
pub fn proxy_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("fairlead-proxy")
}

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

/// `curl -s --max-time 3 <url>` run as a process of the pod in `pod_ns` (its network
/// namespace and its cgroup, where socket-level load balancing applies), as `sandbox exec`
/// runs commands.
pub fn curl_in_pod(sandbox: &str, pod_ns: &str, url: &str) -> std::process::Output {
    run_in_pod(sandbox, pod_ns, &["curl", "-s", "--max-time", "3", url])
}

/// `argv` run as a process of the pod in `pod_ns` (its network namespace and its cgroup).
pub fn run_in_pod(sandbox: &str, pod_ns: &str, argv: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let cg = cgroup::find_pod(sandbox, pod_ns).expect("pod cgroup");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", pod_ns]).args(argv);
    // SAFETY: the hook only writes one file between fork and exec.
    unsafe { cmd.pre_exec(move || cgroup::join(&cg)) };
    cmd.output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", argv[0]))
}

/// A two-node VXLAN sandbox named `<tag><pid>` for `f`; afterwards (also when `f` panics)
/// it is taken down and checked to have left no namespace, cgroup or eBPF pin.
pub async fn with_sandbox<F>(tag: &str, f: F)
where
    F: for<'a> FnOnce(&'a mut Sandbox, &'a str) -> futures::future::BoxFuture<'a, ()>,
{
    with_sandbox_config(tag, |_| {}, f).await
}

/// [`with_sandbox`], with the configuration changed by `tweak` first.
pub async fn with_sandbox_config<F>(tag: &str, tweak: impl FnOnce(&mut SandboxConfig), f: F)
where
    F: for<'a> FnOnce(&'a mut Sandbox, &'a str) -> futures::future::BoxFuture<'a, ()>,
{
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the sandbox needs root");
    let name = format!("{tag}{}", std::process::id());
    let state_dir = std::env::temp_dir().join(format!("fairlead-lbtest-{name}"));
    let mut config = SandboxConfig {
        name: name.clone(),
        nodes: 2,
        routing: RoutingMode::vxlan(),
        state_dir: state_dir.clone(),
        cni_plugin: cni_plugin(),
        proxy: proxy_binary(),
        mesh_cert_ttl: None,
        maglev: false,
    };
    tweak(&mut config);
    let mut sandbox = Sandbox::up(config).await.expect("sandbox up");
    let result = std::panic::AssertUnwindSafe(f(&mut sandbox, &name))
        .catch_unwind()
        .await;
    sandbox.down().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    let prefix = Topology::prefix(&name);
    assert!(
        netns::list(&prefix).is_empty(),
        "sandbox down removes every namespace"
    );
    assert!(
        cgroup::sandbox_dir(&name).is_none_or(|d| !d.exists()),
        "and its cgroups"
    );
    let pins = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("fairlead-{}", agents::lb_instance_prefix(&name)))
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pins, 0, "and its eBPF pins");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Creates the objects of `text` (a multi-document manifest).
pub async fn apply(sandbox: &Sandbox, file: &str, text: &str) {
    let dir = sandbox.config.state_dir.join("manifests").join(file);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.yaml"), text).unwrap();
    for (what, r) in sandbox.apply(&dir).unwrap() {
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}
