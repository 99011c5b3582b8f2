//! A node namespace, pod namespaces, and the real plugin binary exec'd inside
//! the node namespace with the CNI environment and config on stdin, exactly as
//! a runtime on that node would.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use fairlead_agent::{reaper::LinkReaper, status::StatusServer, Readiness, RootNetns};
use fairlead_testkit::{Netns, Veth};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_fairlead-cni");
pub const NETWORK: &str = "fairlead";
pub const RANGE_V4: &str = "10.244.1.0/24";
pub const RANGE_V6: &str = "fd00:10:244:1::/64";
/// The node's own (underlay) addresses.
pub const NODE_V4: &str = "172.30.0.2";
pub const NODE_V6: &str = "fd00:172:30::2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "fl-cni-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What one plugin invocation printed and how it exited.
#[derive(Debug)]
pub struct Reply {
    /// The plugin's pid, which is also the id of the process group it ran in.
    pub pid: u32,
    pub exit: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    /// The success JSON (ADD, VERSION); fails on a non-zero exit.
    pub fn ok_json(&self) -> Result<Value> {
        self.ok()?;
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout: {}", self.stdout))
    }

    /// Success with whatever output (DEL, CHECK, STATUS, GC print nothing).
    pub fn ok(&self) -> Result<()> {
        ensure!(
            self.exit == Some(0),
            "plugin failed ({:?}): stdout {} stderr {}",
            self.exit,
            self.stdout,
            self.stderr
        );
        Ok(())
    }

    /// Asserts the spec's error shape with `code` and returns it.
    pub fn error(&self, code: u64) -> Result<Value> {
        ensure!(
            self.exit.is_some_and(|e| e != 0),
            "expected a failure with code {code}, got exit {:?}: {}",
            self.exit,
            self.stdout
        );
        let json: Value = serde_json::from_str(&self.stdout)
            .with_context(|| format!("error output is not JSON: {:?}", self.stdout))?;
        let object = json.as_object().context("error output is not an object")?;
        ensure!(
            object["cniVersion"].is_string()
                && object["msg"].is_string()
                && object["details"].is_string(),
            "bad error shape: {json}"
        );
        ensure!(json["code"] == code, "expected code {code}: {json}");
        Ok(json)
    }
}

/// A pod: its own network namespace and a container ID.
pub struct Pod {
    pub ns: Netns,
    pub id: String,
}

impl Pod {
    pub fn new(id: &str) -> Result<Pod> {
        Ok(Pod {
            ns: Netns::new()?,
            id: id.to_owned(),
        })
    }

    pub fn netns_path(&self) -> String {
        self.ns.path().display().to_string()
    }

    pub fn host_ifname(&self) -> String {
        fairlead_cni::host_ifname(&self.id, "eth0")
    }

    /// Addresses on the pod's eth0, `ip/prefix`.
    pub fn addresses(&self) -> Result<Vec<String>> {
        Ok(self
            .ns
            .ip(&["-o", "addr", "show", "dev", "eth0", "scope", "global"])?
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect())
    }
}

/// The "node": a namespace playing the host, with an underlay link to an
/// uplink namespace so it has addresses of its own like a real node.
pub struct Node {
    pub ns: Netns,
    pub data_dir: TempDir,
    /// Holds the agent socket's path; nothing listens there unless a test
    /// starts an [`Agent`].
    pub agent_dir: TempDir,
    _underlay: Veth,
    _uplink: Netns,
}

impl Node {
    pub fn new() -> Result<Node> {
        let ns = Netns::new()?;
        let uplink = Netns::new()?;
        let underlay = Veth::new(&ns, "underlay0", &uplink, "underlay0")?;
        ns.add_addr("underlay0", &format!("{NODE_V4}/24"))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{NODE_V6}/64"),
            "dev",
            "underlay0",
            "nodad",
        ])?;
        ns.link_up("underlay0")?;
        uplink.link_up("underlay0")?;
        Ok(Node {
            ns,
            data_dir: TempDir::new("ipam")?,
            agent_dir: TempDir::new("agent")?,
            _underlay: underlay,
            _uplink: uplink,
        })
    }

    /// The config the agent would write for this node.
    pub fn config(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": NETWORK,
            "type": "fairlead-cni",
            "mtu": 1450,
            "agentSocket": self.agent_socket(),
            "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
            "ipam": {
                "type": "fairlead",
                "ranges": [RANGE_V4, RANGE_V6],
                "dataDir": self.data_dir.path(),
            }
        })
    }

    /// Where the plugin looks for the agent (`agentSocket`).
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_dir.path().join("agent.sock")
    }

    /// Starts the agent's DEL side on [`Node::agent_socket`], as on a real
    /// node: a link reaper in this namespace behind the status socket.
    pub fn start_agent(&self) -> Result<Agent> {
        Agent::start(self)
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.path().join(NETWORK)
    }

    /// Runs the plugin inside the node namespace, in a process group of its
    /// own (so [`group_members`] can find anything it left running).
    pub fn invoke(&self, env: &[(&str, &str)], stdin: &[u8]) -> Result<Reply> {
        use std::os::unix::process::CommandExt;
        let mut command = self.ns.command(BIN)?;
        command
            .process_group(0)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("spawning fairlead-cni")?;
        let pid = child.id();
        let mut pipe = child.stdin.take().context("stdin")?;
        // VERSION does not read stdin: a closed pipe is fine.
        let _ = pipe.write_all(stdin);
        drop(pipe);
        let output = child.wait_with_output()?;
        Ok(Reply {
            pid,
            exit: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// One verb for one pod's eth0.
    pub fn verb(&self, command: &str, pod: &Pod, config: &Value) -> Result<Reply> {
        let netns = pod.netns_path();
        self.invoke(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &pod.id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
                ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
            ],
            config.to_string().as_bytes(),
        )
    }

    pub fn add(&self, pod: &Pod) -> Result<Value> {
        self.verb("ADD", pod, &self.config())?.ok_json()
    }

    pub fn del(&self, pod: &Pod) -> Result<()> {
        self.verb("DEL", pod, &self.config())?.ok()
    }

    /// Host-side veths the plugin made (`fl...`), tombstones (`flz...`)
    /// included.
    pub fn host_links(&self) -> Result<Vec<String>> {
        Ok(self
            .ns
            .links()?
            .into_iter()
            .filter(|l| l.starts_with("fl"))
            .collect())
    }

    /// Allocation files: ip -> (network, container, ifname).
    pub fn allocations(&self) -> Result<BTreeMap<IpAddr, (String, String, String)>> {
        let mut out = BTreeMap::new();
        let dir = match fs::read_dir(self.ipam_dir()) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in dir {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                bail!("temp file {name} left in the IPAM directory");
            }
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let text = fs::read_to_string(entry.path())?;
            let lines: Vec<&str> = text.lines().collect();
            ensure!(lines.len() == 3, "allocation {name} has {text:?}");
            out.insert(ip, (lines[0].into(), lines[1].into(), lines[2].into()));
        }
        Ok(out)
    }

    /// Tombstones (`flz...`) in the node namespace.
    pub fn tombstones(&self) -> Result<Vec<String>> {
        Ok(self
            .host_links()?
            .into_iter()
            .filter(|l| fairlead_cni::teardown::is_tombstone(l))
            .collect())
    }

    /// Waits (at most `timeout`) until no tombstone is left: the agent's
    /// reaper deletes them after DEL has returned.
    pub fn wait_reaped(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.tombstones()?;
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "tombstones still there after {timeout:?}: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// No host veth and no allocation: what every failed ADD must leave.
    pub fn assert_clean(&self) -> Result<()> {
        let links = self.host_links()?;
        ensure!(links.is_empty(), "host veths left behind: {links:?}");
        let allocations = self.allocations()?;
        ensure!(
            allocations.is_empty(),
            "allocations left behind: {allocations:?}"
        );
        Ok(())
    }
}

/// The agent's DEL side in-process: the real [`LinkReaper`] (inside the
/// node namespace) behind the real status socket. Stopped on drop.
pub struct Agent {
    runtime: Option<tokio::runtime::Runtime>,
    pub reaper: LinkReaper,
}

impl Agent {
    fn start(node: &Node) -> Result<Agent> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let reaper = LinkReaper::start(&node.ns.path(), RootNetns::Refuse)?;
        let (_ready, readiness) = tokio::sync::watch::channel(Readiness::Ready);
        let server = {
            let _inside = runtime.enter();
            StatusServer::bind(&node.agent_socket(), readiness)?.with_reaper(reaper.clone())
        };
        runtime.spawn(server.serve(std::future::pending()));
        Ok(Agent {
            runtime: Some(runtime),
            reaper,
        })
    }
}

impl Agent {
    /// Waits (at most `timeout`) until the reaper has nothing queued and no
    /// delete running. The tombstone leaves the listing ~20 ms before its
    /// delete returns (the kernel's RCU barrier), so this comes after
    /// [`Node::wait_reaped`].
    pub fn wait_idle(&self, timeout: Duration) -> Result<()> {
        let runtime = self.runtime.as_ref().context("agent stopped")?;
        ensure!(
            runtime.block_on(self.reaper.idle(timeout)),
            "the reaper still has {} links pending after {timeout:?}",
            self.reaper.pending()
        );
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Processes of process group `pgid` that still exist, as (pid, state
/// letter from /proc/PID/stat; `Z` is a zombie waiting to be reaped).
pub fn group_members(pgid: u32) -> Result<Vec<(u32, char)>> {
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Gone between readdir and read: not a member any more.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|f| f.parse::<u32>().ok()) == Some(pgid) {
            let state = fields[0].chars().next().unwrap_or('?');
            members.push((pid, state));
        }
    }
    Ok(members)
}
