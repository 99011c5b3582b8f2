//! Tier 5, a real container runtime: Debian's podman 4.3 with its CNI backend
//! starts two containers on a "node" (a network namespace this test made) and
//! `fairlead-cni` wires them, exec'd by podman exactly as on a real host. The
//! containers get addresses from the node's PodCIDRs, reach each other over
//! IPv4 and IPv6 (ping, and HTTP with busybox httpd and nc), and the
//! plugin's DEL removes the host veths and releases the addresses both when a
//! container exits by itself (podman's cleanup via conmon) and on `podman rm
//! -f`.
//!
//! Nothing of podman's touches the host: podman runs inside the node network
//! namespace (`nsenter --net`) and inside a private mount namespace with tmpfs
//! over /run and /var/lib (its netns bind mounts, runc state and libcni's
//! result cache live there), with storage, config, CNI config and IPAM data in
//! a temp dir and cgroups under a `fl-t-<pid>-<n>` parent removed afterwards.
//! The only network is ours: podman's default `87-podman-bridge.conflist`
//! (bridge, portmap, firewall) is never read, and no ports are published.
//!
//! Podman quirks found on this machine (Debian 12, podman 4.3.1, runc 1.1.5):
//! * its libcni cannot parse a CNI 1.1.0 result ("unsupported CNI result
//!   version"): the conflist says `cniVersion` 1.0.0;
//! * as root it raises RLIMIT_NOFILE above this host's hard limit and runc
//!   fails with "error setting rlimit type 7": pass `--ulimit nofile/nproc`;
//! * crun is not installed here (and was seen rejecting this host's cgroup
//!   layout), so `--runtime runc`; with `cgroupfs` podman creates
//!   `libpod_parent/{conmon,libpod-<id>}` in every hierarchy (cgroup v1 here)
//!   and never removes the parent, hence `--cgroup-parent`;
//! * libcni caches results in /var/lib/cni and runc keeps state in /run/runc,
//!   which `--root`/`--runroot` do not move, and the container netns is bind
//!   mounted in /run/netns: hence the private /run and /var/lib;
//! * conmon's exit command (`podman container cleanup`) inherits
//!   CONTAINERS_CONF, so a container that exits by itself, even after this
//!   test was killed, still gets its DEL from our plugin directory;
//! * Debian's busybox-static `wget` segfaults here (also outside containers),
//!   so the HTTP client is `nc`.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use fairlead_testkit::{require_root, CgroupTree, Netns, PrivateMounts};

const NETWORK: &str = "fairlead";
/// The node's PodCIDRs.
const RANGE_V4: (&str, u8) = ("10.244.7.0", 24);
const RANGE_V6: (&str, u8) = ("fd00:10:244:7::", 64);
const HTTP_PORT: u16 = 8080;
const PAGE: &str = "served by fairlead-podman-server\n";
/// Containers end by themselves after this, so a killed test leaves nothing
/// running for long.
const CONTAINER_LIFETIME_S: u32 = 120;
/// Bound on every podman call.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(30);
const SETUP_HINT: &str = "run scripts/setup.sh (it installs podman, runc, conmon and \
                          busybox-static from Debian)";

/// `fairlead-cni` as cargo built it, next to this test's deps folder.
fn cni_plugin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no parent folder")?
        .join("fairlead-cni");
    ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p fairlead-cni` (cargo test --workspace does)",
        path.display()
    );
    Ok(path)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The tools this test drives; a missing one fails the test (never skips).
fn require_tools() -> Result<()> {
    let missing: Vec<&str> = ["podman", "runc", "conmon", "nsenter", "timeout", "sleep"]
        .into_iter()
        .filter(|tool| which(tool).is_none())
        .collect();
    ensure!(
        missing.is_empty(),
        "{} not found: {SETUP_HINT}",
        missing.join(", ")
    );
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file() && is_static(busybox)?,
        "{} is missing or not statically linked (the containers' root filesystem is that one \
         file): {SETUP_HINT}",
        busybox.display()
    );
    Ok(())
}

/// An ELF executable without a PT_INTERP program header needs no loader or
/// libraries, so it runs alone in a root filesystem.
fn is_static(path: &Path) -> Result<bool> {
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    // 64-bit little-endian ELF only (what Debian ships on this machine).
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} has a truncated ELF header", path.display());
    };
    const PT_INTERP: u32 = 3;
    Ok((0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            != Some(PT_INTERP)
    }))
}

fn in_pod_cidr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let base: std::net::Ipv4Addr = RANGE_V4.0.parse().expect("constant");
            u32::from(ip) >> (32 - RANGE_V4.1) == u32::from(base) >> (32 - RANGE_V4.1)
        }
        IpAddr::V6(ip) => {
            let base: std::net::Ipv6Addr = RANGE_V6.0.parse().expect("constant");
            u128::from(ip) >> (128 - RANGE_V6.1) == u128::from(base) >> (128 - RANGE_V6.1)
        }
    }
}

/// `/tmp/fl-podman-<pid>`: storage, configs, rootfs and IPAM data.
const TEMP_PREFIX: &str = "fl-podman-";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let tmp = std::env::temp_dir();
        // Sweep what killed runs left: their pid is dead (or is ours now) and
        // their cgroups are gone, which the testkit's sweep does once the
        // containers they left have ended (at most CONTAINER_LIFETIME_S).
        // Until then podman's cleanup in those containers' monitors still
        // needs the directory.
        let cgroup_mounts = fairlead_testkit::cgroup_mounts()?;
        for entry in fs::read_dir(&tmp)?.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(Ok(pid)) = name.strip_prefix(TEMP_PREFIX).map(str::parse::<u32>) else {
                continue;
            };
            let owner_gone =
                pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists();
            let running = cgroup_mounts.iter().any(|mount| {
                fs::read_dir(mount).is_ok_and(|mut dir| {
                    dir.any(|e| {
                        e.is_ok_and(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("fl-t-{pid}-"))
                        })
                    })
                })
            });
            if owner_gone && !running {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let path = tmp.join(format!("{TEMP_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("podman test: leaving {} behind: {e}", self.0.display());
        }
    }
}

/// Podman confined to one node namespace, a private mount namespace, a temp
/// dir and a cgroup subtree. Dropping it removes every container, then the
/// mount namespace holder, the cgroups and the temp dir, in that order (the
/// field order).
struct Podman<'a> {
    node: &'a Netns,
    mounts: PrivateMounts,
    cgroup: CgroupTree,
    dir: TempDir,
}

impl<'a> Podman<'a> {
    fn new(node: &'a Netns, plugin: &Path) -> Result<Self> {
        // First: its sweep decides which stale temp dirs may go.
        let cgroup = CgroupTree::new()?;
        let dir = TempDir::new()?;
        let base = dir.0.clone();
        for sub in ["root", "runroot", "tmp", "cni-bin", "net.d", "ipam"] {
            fs::create_dir_all(base.join(sub))?;
        }
        fs::copy(plugin, base.join("cni-bin/fairlead-cni"))
            .with_context(|| format!("copying {}", plugin.display()))?;

        // The whole conflist podman sees: our plugin alone, no portmap or
        // firewall, so nothing asks for iptables rules.
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{
                "type": "fairlead-cni",
                "mtu": 1450,
                // Without an agent listening, DEL falls back to a synchronous delete; STATUS and the DEL hand-off are the only calls to the agent; podman 4.3 never calls it.
                "agentSocket": base.join("agent.sock"),
                "ipam": {
                    "type": "fairlead",
                    "ranges": [
                        format!("{}/{}", RANGE_V4.0, RANGE_V4.1),
                        format!("{}/{}", RANGE_V6.0, RANGE_V6.1),
                    ],
                    "dataDir": base.join("ipam"),
                },
            }],
        });
        fs::write(
            base.join("net.d/10-fairlead.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        // CONTAINERS_CONF replaces the system containers.conf.
        fs::write(
            base.join("containers.conf"),
            format!(
                "[network]\n\
                 network_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{bin}\"]\n\
                 network_config_dir = \"{netd}\"\n\
                 default_network = \"{NETWORK}\"\n\
                 [engine]\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"none\"\n\
                 runtime = \"runc\"\n",
                bin = base.join("cni-bin").display(),
                netd = base.join("net.d").display(),
            ),
        )?;
        // vfs: no overlay mounts. No registries: nothing is ever pulled.
        fs::write(
            base.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                base.join("runroot").display(),
                base.join("root").display()
            ),
        )?;
        fs::write(
            base.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )?;

        // The containers' root filesystem: static busybox and its applets,
        // no image, so no pull and no signature policy.
        let rootfs = base.join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        fs::create_dir_all(rootfs.join("www"))?;
        fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
        for applet in ["sh", "ip", "ping", "nc", "httpd", "sleep", "cat"] {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        fs::write(rootfs.join("www/index.html"), PAGE)?;

        // Sized to outlive the containers, so a killed test frees it soon.
        let mounts = PrivateMounts::new(
            &[Path::new("/run"), Path::new("/var/lib")],
            Duration::from_secs(u64::from(CONTAINER_LIFETIME_S) + 60),
        )?;
        Ok(Self {
            node,
            mounts,
            cgroup,
            dir,
        })
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.0.join(sub)
    }

    /// `timeout nsenter --mount --net podman --root ... ARGS`.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("timeout");
        command
            .arg("--kill-after=5")
            .arg(PODMAN_TIMEOUT.as_secs().to_string())
            // Not `ip netns exec`: it remounts /sys, hiding the cgroup
            // hierarchies runc needs.
            .arg("nsenter")
            .arg(format!("--mount={}", self.mounts.ns_path().display()))
            .arg(format!("--net={}", self.node.path().display()))
            .arg("--")
            .arg("podman")
            .arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("runroot"))
            .arg("--tmpdir")
            .arg(self.path("tmp"))
            .args(args)
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("TMPDIR", self.path("tmp"))
            .stdin(Stdio::null());
        command
    }

    fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("running podman {}: {SETUP_HINT}", args.join(" ")))
    }

    /// Runs podman and returns its stdout; fails with its stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        let output = self.output(args)?;
        if output.status.code() == Some(124) {
            bail!(
                "podman {} timed out after {PODMAN_TIMEOUT:?}",
                args.join(" ")
            );
        }
        ensure!(
            output.status.success(),
            "podman {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Starts a detached container on our network; returns its ID.
    fn start(&self, name: &str, command: &[&str]) -> Result<String> {
        let rootfs = self.path("rootfs");
        let parent = self.cgroup.parent();
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            NETWORK,
            "--runtime",
            "runc",
            "--cgroup-parent",
            &parent,
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "--rootfs",
        ];
        let rootfs = rootfs.to_str().context("temp dir path is not UTF-8")?;
        args.push(rootfs);
        args.extend_from_slice(command);
        self.run(&args)
    }

    fn exec(&self, name: &str, command: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(command);
        self.run(&args)
    }

    /// Global addresses on the container's eth0, as the container sees them.
    fn addresses(&self, name: &str) -> Result<BTreeSet<IpAddr>> {
        let out = self.exec(
            name,
            &["ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
        )?;
        out.lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .map(|cidr| {
                let ip = cidr.split('/').next().unwrap_or(cidr);
                ip.parse()
                    .with_context(|| format!("{name}: bad address {cidr:?} in {out}"))
            })
            .collect()
    }

    /// The addresses podman took from the plugin's ADD result.
    fn inspected(&self, name: &str) -> Result<BTreeSet<IpAddr>> {
        let out = self.run(&[
            "inspect",
            "--format",
            "{{range $net, $s := .NetworkSettings.Networks}}{{$net}} {{$s.IPAddress}} \
             {{$s.GlobalIPv6Address}}{{end}}",
            name,
        ])?;
        let mut fields = out.split_whitespace();
        ensure!(
            fields.next() == Some(NETWORK),
            "{name} is attached to other networks than {NETWORK}: {out:?}"
        );
        fields
            .map(|ip| {
                ip.parse()
                    .with_context(|| format!("{name}: inspect says {out:?}"))
            })
            .collect()
    }

    /// IPAM allocation files: address -> container ID.
    fn allocations(&self) -> Result<Vec<(IpAddr, String)>> {
        let dir = self.path("ipam").join(NETWORK);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<IpAddr>() else {
                continue;
            };
            // network, container ID, ifname
            let text = fs::read_to_string(entry.path())?;
            let container = text.lines().nth(1).unwrap_or_default().to_owned();
            out.push((ip, container));
        }
        out.sort();
        Ok(out)
    }

    /// Host ends of the plugin's veths in the node namespace.
    fn host_veths(&self) -> Result<Vec<String>> {
        Ok(self
            .node
            .links()?
            .into_iter()
            .filter(|l| l.starts_with("fl"))
            .collect())
    }

    /// What podman and runc could leave in the private /run and /var/lib,
    /// and mounts under the temp dir (shm): empty once every container is
    /// removed.
    fn leftovers(&self) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for dir in ["/run/netns", "/var/lib/cni/results", "/run/runc"] {
            if let Ok(entries) = fs::read_dir(self.mounts.inside(Path::new(dir))) {
                for entry in entries.filter_map(|e| e.ok()) {
                    left.push(format!("{dir}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        left.extend(
            self.mounts
                .mounts()?
                .into_iter()
                .filter(|m| m.starts_with(&self.dir.0))
                .map(|m| format!("mount {}", m.display())),
        );
        Ok(left)
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        match self.run(&["rm", "--force", "--all", "--time", "0"]) {
            Ok(_) => {}
            Err(e) => eprintln!("podman test: cleanup: {e:#}"),
        }
    }
}

/// ping from `name` to `ip`, a few tries (the first packet waits for
/// neighbour resolution on the node).
fn ping(podman: &Podman, name: &str, ip: IpAddr) -> Result<()> {
    let target = ip.to_string();
    let mut last = None;
    for _ in 0..3 {
        match podman.exec(name, &["ping", "-c", "1", "-W", "2", &target]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .expect("tried")
        .context(format!("{name} cannot ping {ip}")))
}

/// An HTTP/1.0 GET with busybox nc; returns the body.
fn http_get(podman: &Podman, name: &str, ip: IpAddr) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {HTTP_PORT}");
    let response = podman
        .exec(name, &["sh", "-c", &script])
        .with_context(|| format!("{name}: HTTP to {ip} port {HTTP_PORT}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{name}: not an HTTP response from {ip}: {response:?}"))?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{name}: {ip} answered {head:?}"
    );
    Ok(body.to_owned())
}

#[test]
fn podman_runs_containers_on_fairlead_cni() -> Result<()> {
    let started = Instant::now();
    require_root()?;
    require_tools()?;
    let plugin = cni_plugin()?;
    let node = Netns::new()?;
    let podman = Podman::new(&node, &plugin)?;

    // Our conflist is the only network podman knows.
    let networks = podman.run(&["network", "ls", "--format", "{{.Name}}"])?;
    ensure!(
        networks.lines().collect::<Vec<_>>() == [NETWORK],
        "podman sees networks {networks:?}, expected only {NETWORK}"
    );

    let lifetime = CONTAINER_LIFETIME_S.to_string();
    // httpd daemonises; the shell then becomes a bounded sleep as PID 1, and
    // when that ends the kernel takes httpd with it.
    let serve = format!("httpd -p {HTTP_PORT} -h /www && exec sleep {lifetime}");
    let server_id = podman.start("fl-server", &["sh", "-c", &serve])?;
    let client_id = podman.start("fl-client", &["sleep", &lifetime])?;

    let mut ips = Vec::new();
    for (name, id) in [("fl-server", &server_id), ("fl-client", &client_id)] {
        let seen = podman.addresses(name)?;
        ensure!(
            seen.len() == 2 && seen.iter().all(|ip| in_pod_cidr(*ip)),
            "{name}: eth0 has {seen:?}, expected one address of each of {RANGE_V4:?} and \
             {RANGE_V6:?}"
        );
        ensure!(
            seen.iter().any(IpAddr::is_ipv4) && seen.iter().any(IpAddr::is_ipv6),
            "{name}: eth0 has {seen:?}, expected IPv4 and IPv6"
        );
        let inspected = podman.inspected(name)?;
        ensure!(
            inspected == seen,
            "{name}: podman recorded {inspected:?} from the plugin's result, eth0 has {seen:?}"
        );
        // The plugin allocated them for the container ID podman passed.
        let owned: BTreeSet<IpAddr> = podman
            .allocations()?
            .into_iter()
            .filter(|(_, owner)| owner == id)
            .map(|(ip, _)| ip)
            .collect();
        ensure!(
            owned == seen,
            "{name}: IPAM holds {owned:?} for container {id}, eth0 has {seen:?}"
        );
        ips.push(seen);
    }
    let server_ips = ips[0].clone();
    let client_ips = ips[1].clone();
    ensure!(
        server_ips.is_disjoint(&client_ips),
        "both containers got {server_ips:?} / {client_ips:?}"
    );
    let veths = podman.host_veths()?;
    ensure!(
        veths.len() == 2,
        "expected one host veth per container in the node, found {veths:?}"
    );

    for &ip in &server_ips {
        ping(&podman, "fl-client", ip)?;
        let body = http_get(&podman, "fl-client", ip)?;
        ensure!(
            body.trim() == PAGE.trim(),
            "fl-client got {body:?} from {ip}"
        );
    }
    for &ip in &client_ips {
        ping(&podman, "fl-server", ip)?;
    }

    // A container that exits by itself: conmon's exit command (`podman
    // container cleanup`) runs DEL, no `rm` needed.
    let once_id = podman.start("fl-once", &["sleep", "2"])?;
    let held_by_once = || -> Result<Vec<IpAddr>> {
        Ok(podman
            .allocations()?
            .into_iter()
            .filter(|(_, owner)| *owner == once_id)
            .map(|(ip, _)| ip)
            .collect())
    };
    let held = held_by_once()?;
    ensure!(held.len() == 2, "fl-once started with addresses {held:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let held = held_by_once()?;
        if held.is_empty() && podman.host_veths()?.len() == 2 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "fl-once exited but its addresses {held:?} or its host veth are still there"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // DEL: podman tears the network down before removing each container.
    podman.run(&[
        "rm",
        "--force",
        "--time",
        "0",
        "fl-client",
        "fl-server",
        "fl-once",
    ])?;
    let veths = podman.host_veths()?;
    ensure!(veths.is_empty(), "host veths left after rm: {veths:?}");
    let allocations = podman.allocations()?;
    ensure!(
        allocations.is_empty(),
        "addresses still allocated after rm: {allocations:?}"
    );
    let containers = podman.run(&["ps", "--all", "--quiet"])?;
    ensure!(containers.is_empty(), "containers left: {containers}");
    let left = podman.leftovers()?;
    ensure!(left.is_empty(), "podman left behind: {left:?}");

    eprintln!("podman test: took {:?}", started.elapsed());
    Ok(())
}
