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
    },
}

fn state_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("FAIRLEAD_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/fairlead"));
    base.join(format!("sandbox-{name}"))
}

/// Creates every object in `path`; one bad object does not stop the others.
pub fn apply(
    server: &fairlead_apiserver::ApiServer,
    path: &Path,
) -> anyhow::Result<Vec<(String, Result<(), String>)>> {
    let docs = fairlead_apiserver::manifest::load(path)?;
    Ok(docs
        .into_iter()
        .map(|d| {
            let what = format!(
                "{}/{}{}",
                d["kind"].as_str().unwrap_or("?"),
                d.pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default(),
                d.pointer("/metadata/name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
            );
            let r = server.create(d).map(|_| ()).map_err(|e| e.message);
            (what, r)
        })
        .collect())
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
        SandboxCmd::Up { dir, name } => up(dir, &name).await,
        SandboxCmd::Serve { dir, name } => serve(dir, &name).await,
        SandboxCmd::Status { name } => status(&name).await,
        SandboxCmd::Down { name } => down(&name),
    }
}

async fn up(dir: Option<PathBuf>, name: &str) -> anyhow::Result<()> {
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
    cmd.args(["sandbox", "serve", "--name", name]);
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(state) = read_state(name) {
            if state["ready"] == true {
                print_report(&state);
                return Ok(());
            }
        }
        if !alive(pid as i32) || Instant::now() > deadline {
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
    println!(
        "  not yet running here: nodes, pods, CNI, eBPF data path, DNS, proxies (later issues)"
    );
}

async fn serve(dir: Option<PathBuf>, name: &str) -> anyhow::Result<()> {
    let sd = state_dir(name);
    let server =
        fairlead_apiserver::ApiServer::start("127.0.0.1:0".parse()?, Default::default()).await?;
    let kubeconfig = sd.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;
    let mut applied = Vec::new();
    if let Some(d) = &dir {
        for (obj, r) in apply(&server, d)? {
            applied.push(match r {
                Ok(()) => json!({"object": obj}),
                Err(e) => json!({"object": obj, "error": e}),
            });
        }
    }
    // The same watcher path every component uses: kube-rs against the server.
    let config = kube::Config::new(server.url().parse()?);
    let client = kube::Client::try_from(config)?;
    let mut snapshots = fairlead_core::watch::spawn(client)?;
    let snap = tokio::time::timeout(Duration::from_secs(30), snapshots.ready())
        .await
        .context("the snapshot watcher did not finish its first list in 30 s")??;
    let summary = summary(&snap);
    let state = json!({
        "name": name,
        "pid": std::process::id(),
        "url": server.url(),
        "kubeconfig": kubeconfig.display().to_string(),
        "applied": applied,
        "snapshot": summary,
        "ready": true,
    });
    let tmp = sd.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&tmp, sd.join("state.json"))?;
    tracing::info!(url = %server.url(), "sandbox ready");
    wait_for_signal().await?;
    server.shutdown().await;
    Ok(())
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
