//! `fairlead sandbox`: a local cluster on this machine. `up` starts a
//! background sandbox process (the embedded API server, the manifests of DIR,
//! and a snapshot watcher as every Fairlead component runs it) and reports
//! what it did; `status` asks it; `down` stops it and removes its files.
//! Nodes, pods and the data path join as their issues land.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Start the sandbox in the background and apply the manifests in DIR.
    Up {
        /// A manifest file or a directory of them.
        dir: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        shape: Shape,
    },
    /// Run a command inside a pod's network namespace (with its resolv.conf).
    Exec {
        #[arg(long, default_value = "default")]
        name: String,
        /// The pod's namespace.
        #[arg(short = 'n', long = "namespace", default_value = "default")]
        namespace: String,
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show what the running sandbox holds.
    Status {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Stop the sandbox and remove everything it made.
    Down {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// The sandbox process itself (started by `up`).
    #[command(hide = true)]
    Serve {
        dir: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        shape: Shape,
    },
}

/// How many nodes, and how they route to each other.
#[derive(clap::Args, Clone, Debug)]
pub struct Shape {
    /// Number of nodes (network namespaces on the underlay).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=50))]
    nodes: u8,
    /// Pod routing between nodes: vxlan or native.
    #[arg(long, default_value = "vxlan", value_parser = parse_routing)]
    routing: fairlead_sandbox::cluster::RoutingMode,
    /// How Services pick a backend for a new flow: random or maglev (consistent hashing).
    #[arg(long, default_value = "random", value_parser = ["random", "maglev"])]
    lb_algorithm: String,
}

fn parse_routing(s: &str) -> Result<fairlead_sandbox::cluster::RoutingMode, String> {
    match s {
        "vxlan" => Ok(fairlead_sandbox::cluster::RoutingMode::vxlan()),
        "native" => Ok(fairlead_sandbox::cluster::RoutingMode::Native),
        other => Err(format!(
            "{other:?} is not a routing mode: use vxlan or native"
        )),
    }
}

pub fn state_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("FAIRLEAD_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/fairlead"));
    base.join(format!("sandbox-{name}"))
}

pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

fn read_state(name: &str) -> anyhow::Result<Value> {
    let path = state_dir(name).join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no sandbox {name:?} is running ({} not found): start one with `fairlead sandbox up`",
            path.display()
        )
    })?;
    Ok(serde_json::from_str(&text)?)
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// True when `pid` is a sandbox process we started (not a recycled pid).
fn is_our_sandbox(pid: i32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<String> = c
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            args.iter().any(|a| a == "serve") && args.iter().any(|a| a == name)
        })
        .unwrap_or(false)
}

pub async fn run(cmd: SandboxCmd) -> anyhow::Result<()> {
    match cmd {
        SandboxCmd::Up { dir, name, shape } => up(dir, &name, &shape).await,
        SandboxCmd::Serve { dir, name, shape } => serve(dir, &name, shape).await,
        SandboxCmd::Exec {
            name,
            namespace,
            pod,
            command,
        } => exec(&name, &namespace, &pod, &command),
        SandboxCmd::Status { name } => status(&name).await,
        SandboxCmd::Down { name } => down(&name),
    }
}

async fn up(dir: Option<PathBuf>, name: &str, shape: &Shape) -> anyhow::Result<()> {
    let sd = state_dir(name);
    if let Ok(state) = read_state(name) {
        let pid = state["pid"].as_i64().unwrap_or(0) as i32;
        if alive(pid) && is_our_sandbox(pid, name) {
            bail!("sandbox {name:?} is already running (pid {pid}); stop it with `fairlead sandbox down --name {name}`");
        }
    }
    // A stale state dir from a crashed sandbox is swept before starting.
    let _ = std::fs::remove_dir_all(&sd);
    std::fs::create_dir_all(&sd).with_context(|| format!("cannot create {}", sd.display()))?;
    let log = std::fs::File::create(sd.join("sandbox.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    let routing = if shape.routing == fairlead_sandbox::cluster::RoutingMode::Native {
        "native"
    } else {
        "vxlan"
    };
    cmd.args([
        "sandbox",
        "serve",
        "--name",
        name,
        "--nodes",
        &shape.nodes.to_string(),
        "--routing",
        routing,
        "--lb-algorithm",
        &shape.lb_algorithm,
    ]);
    if let Some(d) = &dir {
        cmd.arg(
            std::fs::canonicalize(d)
                .with_context(|| format!("manifest directory {} not found", d.display()))?,
        );
    }
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the sandbox process")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        if let Ok(state) = read_state(name) {
            if state["ready"] == true {
                print_report(&state);
                return Ok(());
            }
        }
        if !alive(pid as i32) || Instant::now() > deadline {
            if alive(pid as i32) {
                // SAFETY: kill(2) on the child this command started; SIGTERM makes it clean up.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            let log = std::fs::read_to_string(sd.join("sandbox.log")).unwrap_or_default();
            bail!(
                "the sandbox did not become ready; its log ({}):\n{log}",
                sd.join("sandbox.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_report(state: &Value) {
    println!(
        "sandbox {} is up (pid {})",
        state["name"].as_str().unwrap_or(""),
        state["pid"]
    );
    println!("  API server:  {}", state["url"].as_str().unwrap_or(""));
    println!(
        "  kubeconfig:  {}   (export KUBECONFIG=... to use kubectl)",
        state["kubeconfig"].as_str().unwrap_or("")
    );
    for a in state["applied"].as_array().into_iter().flatten() {
        match a["error"].as_str() {
            None => println!("  created      {}", a["object"].as_str().unwrap_or("")),
            Some(e) => println!("  REJECTED     {}: {e}", a["object"].as_str().unwrap_or("")),
        }
    }
    if let Some(s) = state.get("snapshot") {
        println!("  snapshot (what every Fairlead component sees through its watchers):");
        for (k, v) in s.as_object().into_iter().flatten() {
            println!("    {k:<16} {v}");
        }
    }
    for n in state["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node         {} ({}, netns {}), pod CIDRs {}",
            n["name"].as_str().unwrap_or(""),
            n["ip"].as_str().unwrap_or(""),
            n["netns"].as_str().unwrap_or(""),
            n["podCIDRs"]
        );
    }
    println!("  routing      {}", state["routing"].as_str().unwrap_or(""));
    if let Some(e) = state["pods"].get("error") {
        println!("  PODS NOT READY: {}", e.as_str().unwrap_or(""));
    }
    let pods = state["pods"].get("pods").unwrap_or(&state["pods"]);
    for p in pods.as_array().into_iter().flatten() {
        println!(
            "  pod          {}/{} on {} {} {}",
            p["namespace"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["node"].as_str().unwrap_or("-"),
            p["phase"].as_str().unwrap_or(""),
            p["ips"]
        );
    }
    println!("  running: Service load balancing in eBPF on every node, cluster DNS at 10.96.0.10");
    println!("  also: NetworkPolicy in eBPF, and a fairlead-proxy sidecar (mTLS) for pods annotated fairlead.io/inject: \"true\"");
}

/// The `fairlead-proxy` binary: next to this executable, or FAIRLEAD_PROXY. Only pods that
/// ask for the mesh need it; the sandbox says so if it is missing then.
fn proxy_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FAIRLEAD_PROXY") {
        return Ok(PathBuf::from(p));
    }
    Ok(std::env::current_exe()?.with_file_name("fairlead-proxy"))
}

/// The `fairlead-cni` binary: next to this executable (cargo puts both in
/// target/<profile>/), or FAIRLEAD_CNI_PLUGIN.
fn cni_plugin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FAIRLEAD_CNI_PLUGIN") {
        return Ok(PathBuf::from(p));
    }
    let p = std::env::current_exe()?.with_file_name("fairlead-cni");
    if !p.is_file() {
        bail!("the CNI plugin {} is missing: build it with `cargo build -p fairlead-cni` (./dev demo does), or set FAIRLEAD_CNI_PLUGIN", p.display());
    }
    Ok(p)
}

async fn serve(dir: Option<PathBuf>, name: &str, shape: Shape) -> anyhow::Result<()> {
    let sd = state_dir(name);
    let config = fairlead_sandbox::cluster::SandboxConfig {
        name: name.to_string(),
        nodes: shape.nodes as usize,
        routing: shape.routing,
        state_dir: sd.clone(),
        cni_plugin: cni_plugin()?,
        proxy: proxy_binary()?,
        mesh_cert_ttl: None,
        maglev: shape.lb_algorithm == "maglev",
    };
    let sandbox = fairlead_sandbox::cluster::Sandbox::up(config).await?;
    let result = serve_until_signal(&sandbox, dir, name, &shape).await;
    sandbox.down().await;
    result
}

async fn serve_until_signal(
    sandbox: &fairlead_sandbox::cluster::Sandbox,
    dir: Option<PathBuf>,
    name: &str,
    shape: &Shape,
) -> anyhow::Result<()> {
    let sd = state_dir(name);
    let kubeconfig = sd.join("kubeconfig");
    std::fs::write(&kubeconfig, sandbox.api.kubeconfig())?;
    let mut applied = Vec::new();
    let mut pods_created = 0;
    if let Some(d) = &dir {
        for (obj, r) in sandbox.apply(d)? {
            if r.is_ok() && obj.starts_with("Pod/") {
                pods_created += 1;
            }
            applied.push(match r {
                Ok(()) => json!({"object": obj}),
                Err(e) => json!({"object": obj, "error": e}),
            });
        }
    }
    let pods = match sandbox
        .wait_for_pods(pods_created, Duration::from_secs(60))
        .await
    {
        Ok(p) => json!(p),
        Err(e) => {
            json!({"error": e.to_string(), "pods": fairlead_sandbox::cluster::pod_reports(&sandbox.snapshot())})
        }
    };
    let state = json!({
        "name": name,
        "pid": std::process::id(),
        "url": sandbox.api.url(),
        "kubeconfig": kubeconfig.display().to_string(),
        "nodes": sandbox.topology.nodes.iter().map(|n| json!({"name": n.name, "netns": n.netns, "ip": n.underlay_v4.to_string(), "podCIDRs": [n.pod_cidr_v4, n.pod_cidr_v6]})).collect::<Vec<_>>(),
        "routing": if shape.routing == fairlead_sandbox::cluster::RoutingMode::Native { "native" } else { "vxlan" },
        "applied": applied,
        "pods": pods,
        "snapshot": summary(&sandbox.snapshot()),
        "ready": true,
    });
    let tmp = sd.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&tmp, sd.join("state.json"))?;
    tracing::info!(url = %sandbox.api.url(), "sandbox ready");
    wait_for_signal().await
}

fn exec(name: &str, namespace: &str, pod: &str, command: &[String]) -> anyhow::Result<()> {
    let ns = fairlead_sandbox::kubelet::pod_netns(
        &fairlead_sandbox::topology::Topology::prefix(name),
        namespace,
        pod,
    );
    if !fairlead_sandbox::netns::path(&ns).exists() {
        bail!("pod {namespace}/{pod} is not running in sandbox {name:?} (no network namespace {ns}); see `fairlead sandbox status --name {name}`");
    }
    // The command joins its node's cgroup, where socket-level load balancing is attached, as
    // a container's processes would be in their pod's.
    let cgroup = fairlead_sandbox::cgroup::find_pod(name, &ns);
    // `ip netns exec` also bind-mounts /etc/netns/<ns>/resolv.conf, the pod's DNS config.
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns]).args(command);
    if let Some(dir) = cgroup {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only writes a file, which is async-signal-safe enough for a child
        // between fork and exec (no locks are held by this single-threaded caller).
        unsafe {
            cmd.pre_exec(move || fairlead_sandbox::cgroup::join(&dir));
        }
    }
    let status = cmd.status().context("cannot run `ip netns exec`")?;
    std::process::exit(status.code().unwrap_or(1));
}

async fn status(name: &str) -> anyhow::Result<()> {
    let state = read_state(name)?;
    let pid = state["pid"].as_i64().unwrap_or(0) as i32;
    if !alive(pid) {
        bail!("sandbox {name:?} is not running (pid {pid} has exited); run `fairlead sandbox down --name {name}` to clean up");
    }
    let config = kube::Config::new(state["url"].as_str().unwrap_or("").parse()?);
    let client = kube::Client::try_from(config)?;
    let mut snapshots = fairlead_core::watch::spawn(client)?;
    let snap = tokio::time::timeout(Duration::from_secs(10), snapshots.ready())
        .await
        .context("the sandbox API server did not answer in 10 s")??;
    println!(
        "sandbox {name} (pid {pid}) at {}",
        state["url"].as_str().unwrap_or("")
    );
    for (k, v) in summary(&snap).as_object().into_iter().flatten() {
        println!("  {k:<16} {v}");
    }
    for p in fairlead_sandbox::cluster::pod_reports(&snap) {
        println!(
            "  pod {}/{} on {} {} {:?}",
            p.namespace,
            p.name,
            p.node.as_deref().unwrap_or("-"),
            p.phase,
            p.ips
        );
    }
    Ok(())
}

fn down(name: &str) -> anyhow::Result<()> {
    let sd = state_dir(name);
    if let Ok(state) = read_state(name) {
        let pid = state["pid"].as_i64().unwrap_or(0) as i32;
        if alive(pid) && is_our_sandbox(pid, name) {
            // SAFETY: kill(2) on a pid we verified is our own sandbox process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                // SAFETY: as above; it ignored SIGTERM for 10 s.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    // Whatever a crashed sandbox left (namespaces are named by the sandbox).
    fairlead_sandbox::cluster::sweep(name);
    if sd.exists() {
        std::fs::remove_dir_all(&sd).with_context(|| format!("cannot remove {}", sd.display()))?;
        println!("sandbox {name} is down; removed {}", sd.display());
    } else {
        println!("sandbox {name} was not running");
    }
    Ok(())
}

/// Object counts per kind, as the snapshot watcher sees them.
fn summary(s: &fairlead_core::Snapshot) -> Value {
    json!({
        "namespaces": s.namespaces().len(),
        "nodes": s.nodes().len(),
        "services": s.services().len(),
        "endpointslices": s.endpoint_slices().len(),
        "pods": s.pods().len(),
        "networkpolicies": s.network_policies().len(),
        "generation": s.generation,
    })
}
