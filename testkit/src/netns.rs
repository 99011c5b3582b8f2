//! Network namespaces and veth pairs for tests, driven through `ip(8)`.
//!
//! Links are always created *inside* a test namespace (`ip -n NS link add
//! ... peer ... netns OTHER`), never in the root namespace and moved, so a
//! failure half-way cannot leave an interface on the host.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

/// Every test namespace is `fl-t-<pid>-<n>`; the pid lets a later run tell
/// whether its owner is still alive.
pub const NETNS_PREFIX: &str = "fl-t-";
/// Test loader instances are `t-<pid>-<n>`, pinned at
/// `/sys/fs/bpf/fairlead-t-<pid>-<n>`.
pub const PIN_INSTANCE_PREFIX: &str = "t-";

const NETNS_DIR: &str = "/run/netns";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const PIN_DIR_PREFIX: &str = "fairlead-";

static NEXT: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "this test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF) to make network \
         namespaces and load eBPF; run it as root (e.g. `sudo -E cargo test`)"
    )]
    NotRoot,

    #[error("could not run `{command}`: {source}; is iproute2 installed?")]
    Spawn { command: String, source: io::Error },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("cannot enter network namespace {netns}: {source}")]
    Enter { netns: String, source: io::Error },

    #[error("no interface {ifname} in network namespace {netns}: {source}")]
    NoInterface {
        ifname: String,
        netns: String,
        source: io::Error,
    },

    #[error("sweeping stale test state in {path}: {source}", path = .path.display())]
    Sweep { path: PathBuf, source: io::Error },

    #[error(
        "cannot start a process holding a private mount namespace with tmpfs over {paths}: \
         {source}"
    )]
    PrivateMounts { paths: String, source: io::Error },

    #[error("reading {path}: {source}", path = .path.display())]
    Read { path: PathBuf, source: io::Error },

    #[error(
        "removing cgroup {path}: {source} (processes still in it are left from a container \
         runtime the test started; they exit on their own and a later run sweeps it)",
        path = .path.display()
    )]
    Cgroup { path: PathBuf, source: io::Error },
}

/// Fails (rather than skips) when not root: a test that needs namespaces
/// must never pass by doing nothing.
pub fn require_root() -> Result<(), TestkitError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(TestkitError::NotRoot)
    }
}

/// A fresh loader instance name, `t-<pid>-<n>`, that [`sweep_stale`]
/// recognises.
pub fn unique_instance() -> String {
    format!(
        "{PIN_INSTANCE_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// What [`sweep_stale`] removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub pin_dirs: Vec<PathBuf>,
}

/// Removes test namespaces and test pin directories whose owning process is
/// dead. Safe to run while other test processes are alive: their pids are.
pub fn sweep_stale() -> Result<SweepReport, TestkitError> {
    let mut report = SweepReport::default();
    for name in list_dir(Path::new(NETNS_DIR))? {
        if let Some(pid) = owner_pid(&name, NETNS_PREFIX) {
            if !pid_alive(pid) {
                run(Command::new("ip").args(["netns", "del", &name]))?;
                report.namespaces.push(name);
            }
        }
    }
    let pin_prefix = format!("{PIN_DIR_PREFIX}{PIN_INSTANCE_PREFIX}");
    for name in list_dir(Path::new(BPFFS_ROOT))? {
        if let Some(pid) = owner_pid(&name, &pin_prefix) {
            if !pid_alive(pid) {
                let path = Path::new(BPFFS_ROOT).join(&name);
                fs::remove_dir_all(&path).map_err(|source| TestkitError::Sweep {
                    path: path.clone(),
                    source,
                })?;
                report.pin_dirs.push(path);
            }
        }
    }
    Ok(report)
}

fn list_dir(dir: &Path) -> Result<Vec<String>, TestkitError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(TestkitError::Sweep {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// `<prefix><pid>-<n>` -> pid.
pub(crate) fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    let (pid, n) = name.strip_prefix(prefix)?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A network namespace named `fl-t-<pid>-<n>`, with `lo` up. Dropping it
/// deletes the namespace, and with it every interface inside.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace. The first call in a process also sweeps state
    /// left by dead test processes.
    pub fn new() -> Result<Self, TestkitError> {
        require_root()?;
        let mut sweep_result = Ok(());
        SWEEP.call_once(|| sweep_result = sweep_stale().map(drop));
        sweep_result?;

        let name = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on Drop removes it, also if bringing lo up fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what the eBPF loader and `setns` take.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> ARGS...` and returns its stdout; fails on a
    /// non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<String, TestkitError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Adds an address (`10.244.0.1/24`, `fd00:10:244::1/64`) to `ifname`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<(), TestkitError> {
        self.ip(&["addr", "add", cidr, "dev", ifname]).map(drop)
    }

    pub fn link_up(&self, ifname: &str) -> Result<(), TestkitError> {
        self.ip(&["link", "set", ifname, "up"]).map(drop)
    }

    /// Runs `program ARGS...` inside the namespace (`ip netns exec`) and
    /// returns its output whatever the exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, TestkitError> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        command.output().map_err(|source| TestkitError::Spawn {
            command: describe(&command),
            source,
        })
    }

    /// Like [`Netns::exec`], but fails on a non-zero exit; returns stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String, TestkitError> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        run(&mut command)
    }

    /// Runs `f` on a thread that entered this namespace (sockets it opens
    /// live here). The caller's thread never changes namespace.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, TestkitError> {
        let enter_error = |source| TestkitError::Enter {
            netns: self.name.clone(),
            source,
        };
        let file = File::open(self.path()).map_err(enter_error)?;
        fairlead_netns::run_in(std::os::fd::AsFd::as_fd(&file), f).map_err(enter_error)
    }

    /// A [`Command`] for `program` that runs inside this namespace, as a
    /// process started on that node would (a CNI runtime exec'ing its plugin):
    /// the child enters the namespace between fork and exec, so neither the
    /// caller nor any other thread changes namespace, and unlike
    /// [`Netns::exec`] no `ip` process or mount namespace is involved. Set
    /// env, stdin and args on it as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, TestkitError> {
        command_in(
            File::open(self.path()).map_err(|source| TestkitError::Enter {
                netns: self.name.clone(),
                source,
            })?,
            program,
        )
        .map_err(|source| TestkitError::Enter {
            netns: self.name.clone(),
            source,
        })
    }

    /// Names of the links in this namespace (`ip -o link show`, without the
    /// `@peer` suffix).
    pub fn links(&self) -> Result<Vec<String>, TestkitError> {
        Ok(self
            .ip(&["-o", "link", "show"])?
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect())
    }

    /// Index of `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32, TestkitError> {
        let c_name = CString::new(ifname).map_err(|e| TestkitError::NoInterface {
            ifname: ifname.to_owned(),
            netns: self.name.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        self.run_in(|| {
            // SAFETY: c_name is a valid NUL-terminated string.
            match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
                0 => Err(io::Error::last_os_error()),
                index => Ok(index),
            }
        })?
        .map_err(|source| TestkitError::NoInterface {
            ifname: ifname.to_owned(),
            netns: self.name.clone(),
            source,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            // Drop cannot fail; the next run's sweep removes it (our pid is
            // dead by then).
            eprintln!(
                "fairlead-testkit: leaving namespace {} behind: {e}",
                self.name
            );
        }
    }
}

/// A veth pair between two test namespaces. Dropping it deletes the pair
/// (deleting either end deletes both); deleting a namespace does too.
#[derive(Debug)]
pub struct Veth {
    netns: String,
    ifname: String,
    peer_netns: String,
    peer_ifname: String,
}

impl Veth {
    /// Creates `ifname` in `a` paired with `peer_ifname` in `b`. Both ends
    /// start down and without addresses.
    pub fn new(
        a: &Netns,
        ifname: &str,
        b: &Netns,
        peer_ifname: &str,
    ) -> Result<Self, TestkitError> {
        a.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            peer_ifname,
            "netns",
            b.name(),
        ])?;
        Ok(Self {
            netns: a.name.clone(),
            ifname: ifname.to_owned(),
            peer_netns: b.name.clone(),
            peer_ifname: peer_ifname.to_owned(),
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn peer_ifname(&self) -> &str {
        &self.peer_ifname
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn peer_netns(&self) -> &str {
        &self.peer_netns
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Ignore errors: if the namespace went first, the pair is already gone.
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", &self.ifname])
            .output();
    }
}

fn run(command: &mut Command) -> Result<String, TestkitError> {
    let output = command.output().map_err(|source| TestkitError::Spawn {
        command: describe(command),
        source,
    })?;
    if !output.status.success() {
        return Err(TestkitError::Command {
            command: describe(command),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A [`Command`] for `program` whose child enters the network namespace open as `netns`
/// between fork and exec. Refuses the root namespace.
pub fn command_in(netns: File, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
    use std::os::unix::process::CommandExt;
    let (dev, ino) = fairlead_netns::fd_id(std::os::fd::AsFd::as_fd(&netns))?;
    if fairlead_netns::is_root(dev, ino)? {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "refusing to run a command in the root network namespace",
        ));
    }
    let mut command = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec and only
    // calls setns(2), which is async-signal-safe; `netns` (O_CLOEXEC) is
    // owned by the closure, so the fd is open for as long as the Command.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("fl-t-123-4", "fl-t-"), Some(123));
        assert_eq!(owner_pid("fairlead-t-77-0", "fairlead-t-"), Some(77));
        assert_eq!(owner_pid("fl-t-123", "fl-t-"), None);
        assert_eq!(owner_pid("fl-t-abc-1", "fl-t-"), None);
        assert_eq!(owner_pid("fl-node-1", "fl-t-"), None);
        assert_eq!(owner_pid("fairlead-agent", "fairlead-t-"), None);
    }
}
