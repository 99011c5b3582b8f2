//! What `lb_scale` measures: a [`Datapath`] that turns Services into
//! forwarding state inside the bench's router namespace.
//!
//! The harness (`lb_scale.rs`) owns the topology, the load and the clock; a
//! datapath only programs. Adding one (the Fairlead slot is `fairlead.rs`)
//! means implementing this trait and a constructor `fn(&Router) ->
//! Result<Option<Box<dyn Datapath>>>`; no measurement code changes.

use std::{
    ffi::OsStr,
    fs::File,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

/// One Service port as the bench programs it. Every Service in the bench is
/// ClusterIP, TCP, one port, with ready endpoints only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    /// The Service port's name (`http`), part of kube-proxy's chain names.
    pub port_name: String,
    /// In 10.96.0.0/12.
    pub cluster_ip: Ipv4Addr,
    /// The Service port (TCP).
    pub port: u16,
    /// Pod IP and targetPort of each ready endpoint (two in this bench, each
    /// a distinct IP in the endpoint range).
    pub endpoints: Vec<SocketAddrV4>,
}

impl Svc {
    /// `namespace/name:port_name`, kube-proxy's ServicePortName string.
    pub fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster_ip, self.port)
    }
}

/// The namespace a datapath programs: the router between the client
/// namespace and the backend namespace. Everything a datapath does must stay
/// inside it.
///
/// ```text
///  client ns                router ns (forwards; holds the rules)          backend ns
///  eth0 10.244.0.2/24 ── client_if 10.244.0.1/24   backend_if 10.245.0.1/30 ── eth0 10.245.0.2/30
///  routes 10.96.0.0/12 and                          route endpoint range           local route endpoint range on lo,
///  the endpoint range via the router                via the backend                one listener on 0.0.0.0:8080
/// ```
///
/// Client packets to a ClusterIP arrive on `client_if` (ingress), leave on
/// `backend_if` towards the endpoint; replies come back in on `backend_if`
/// and leave on `client_if` (egress), where the reverse NAT must happen.
#[derive(Clone, Debug)]
pub struct Router {
    /// `fl-t-<pid>-<n>`, made by fairlead-testkit for this run.
    pub netns_name: String,
    /// `/run/netns/<name>`: what `setns` and the eBPF loader take.
    pub netns_path: PathBuf,
    /// The router's veth towards the client (where tc ingress sees Service
    /// traffic from clients, and tc egress sees the replies going back).
    pub client_if: String,
    pub client_ifindex: u32,
    /// The router's veth towards the backend (endpoints).
    pub backend_if: String,
    pub backend_ifindex: u32,
    /// Pod CIDR: the client lives in it, so Service traffic from it is not
    /// masqueraded (kube-proxy's `--cluster-cidr`).
    pub cluster_cidr: &'static str,
    /// Service CIDR (ClusterIPs).
    pub service_cidr: &'static str,
    /// Where the endpoints live (the backend answers for all of it).
    pub endpoint_cidr: &'static str,
}

/// Longest one tool invocation (a whole-ruleset restore at 10,000 Services
/// included) may take before it is killed and the bench fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(900);

impl Router {
    /// A [`Command`] for `program` that runs inside the router namespace:
    /// the child `setns`es between fork and exec, so no thread of the bench
    /// ever changes namespace. Refuses if the path is the root namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let file = self.open_checked()?;
        Ok(fairlead_testkit::command_in(file, program)?)
    }

    /// Runs `f` on a short-lived thread that entered the router namespace
    /// (sockets, netlink, tcx attachments made there live there).
    #[allow(
        dead_code,
        reason = "for datapaths that work in the router from inside (the Fairlead slot)"
    )]
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let file = self.open_checked()?;
        fairlead_netns::run_in(file.as_fd(), f)
            .with_context(|| format!("entering {}", self.netns_name))
    }

    /// Runs `program args...` inside the router namespace with `stdin` on its
    /// stdin, bounded by [`TOOL_TIMEOUT`]; fails on a non-zero exit. Returns
    /// the time from spawn to reaped exit and the output.
    pub fn run_tool(
        &self,
        program: &str,
        args: &[&str],
        stdin: &[u8],
    ) -> Result<(Duration, Output)> {
        let mut command = self.command(program)?;
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        let pidfd = fairlead_testkit::process::pidfd_open(child.id())
            .with_context(|| format!("pidfd_open for {program}"))?;
        let mut pipe = child.stdin.take().context("stdin pipe")?;
        // Writer and watchdog on their own threads while this one drains
        // stdout and stderr: a tool that fails early and prints an error per
        // line must not deadlock against our write or its own output.
        let (elapsed, output, timed_out) = std::thread::scope(|s| -> Result<_> {
            let writer = s.spawn(move || pipe.write_all(stdin));
            let watchdog = s.spawn(|| -> Result<bool> {
                if fairlead_testkit::process::wait_exit(&pidfd, TOOL_TIMEOUT)? {
                    return Ok(false);
                }
                // The pidfd names our child even if it has exited since.
                // SAFETY: pidfd_send_signal(2) on a pidfd we own.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                Ok(true)
            });
            let output = child.wait_with_output()?;
            let elapsed = start.elapsed();
            // A broken pipe means the tool stopped reading (it failed, which
            // the exit status says better).
            let _ = writer.join();
            let timed_out = watchdog.join().expect("watchdog")?;
            Ok((elapsed, output, timed_out))
        })?;
        ensure!(
            !timed_out,
            "{program} did not finish within {TOOL_TIMEOUT:?}; killed it"
        );
        ensure!(
            output.status.success(),
            "{program} {} in {} failed ({}): {}",
            args.join(" "),
            self.netns_name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok((elapsed, output))
    }

    fn open_checked(&self) -> Result<File> {
        let file = File::open(&self.netns_path)
            .with_context(|| format!("opening {}", self.netns_path.display()))?;
        let (dev, ino) = fairlead_netns::fd_id(file.as_fd())?;
        ensure!(
            !fairlead_netns::is_root(dev, ino)?,
            "{} is the root network namespace; refusing",
            self.netns_path.display()
        );
        Ok(file)
    }
}

/// A datapath under test: kube-proxy's iptables and nftables rule shapes
/// (`kube_proxy.rs`), Fairlead's eBPF (`fairlead.rs`).
///
/// The harness calls, in order: the constructor (untimed: loading programs,
/// creating base chains, what a proxy does once at start-up), `program` once
/// with every Service (timed), `change_one` a few times (each timed), then
/// `cleanup` (untimed). Each call must return only when the new state is in
/// effect for new connections; the harness checks that it is, by connecting.
/// Everything must happen inside [`Router::netns_path`]; `cleanup` must
/// remove whatever would outlive that namespace (bpffs pins, processes).
pub trait Datapath {
    /// Row label in the table.
    fn name(&self) -> &str;

    /// Programs every Service from scratch (a proxy's first full sync).
    fn program(&mut self, services: &[Svc]) -> Result<()>;

    /// `services[index]` changed from `old` to `new`: one endpoint replaced
    /// by a new IP (same port), ClusterIP and port unchanged. Apply it the
    /// way the datapath applies a single-Service update.
    fn change_one(&mut self, index: usize, old: &Svc, new: &Svc) -> Result<()>;

    /// Removes everything the datapath made. Also called on failure paths.
    fn cleanup(&mut self) -> Result<()>;
}

/// A peer the bench can run: `key` is what `LB_BENCH_PEERS` names; `new`
/// returns `Ok(None)` when the datapath is not available (the table says so).
pub struct Peer {
    pub key: &'static str,
    pub new: Constructor,
}

/// Start-up of a datapath in the router (untimed); `Ok(None)` when it is
/// not available.
pub type Constructor = fn(&Router) -> Result<Option<Box<dyn Datapath>>>;
