//! Tier 3: the ifstats programs attached with tcx to a real veth inside a
//! test namespace, counting real UDP packets. Needs root; fails without.
//!
//! Topology (both pairs live only in test namespaces, none in the root one):
//!
//! ```text
//!   ns A  fl-ab0 10.244.0.1/24  <-- veth, counted -->  fl-ba0 10.244.0.2/24  ns B
//!   ns A  fl-ab1 10.244.1.1/24  <-- veth, not counted -->  fl-ba1 10.244.1.2/24  ns B
//! ```

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::Path,
    time::Duration,
};

use anyhow::{ensure, Context};
use fairlead_ebpf::{pin_dir, Error, IfCounters, IfStats};
use fairlead_testkit::{require_root, sweep_stale, unique_instance, Netns, Veth};

const PACKETS: usize = 20;
const PAYLOAD: usize = 64;
/// Ethernet + IPv4 + UDP headers around each payload.
const FRAME: u64 = (14 + 20 + 8 + PAYLOAD) as u64;
/// Largest frame on a 1500-MTU veth.
const MAX_FRAME: u64 = 1514;
const ECHO_PORT: u16 = 9000;

#[test]
fn counts_real_udp_on_the_attached_veth_and_nothing_else() -> anyhow::Result<()> {
    require_root()?;
    let a = Netns::new()?;
    let b = Netns::new()?;
    let _counted = Veth::new(&a, "fl-ab0", &b, "fl-ba0")?;
    let _other = Veth::new(&a, "fl-ab1", &b, "fl-ba1")?;
    a.add_addr("fl-ab0", "10.244.0.1/24")?;
    b.add_addr("fl-ba0", "10.244.0.2/24")?;
    a.add_addr("fl-ab1", "10.244.1.1/24")?;
    b.add_addr("fl-ba1", "10.244.1.2/24")?;

    let my_netns = thread_netns()?;
    let mut stats = IfStats::load(&unique_instance())?;
    let map_pin = stats.map_pin_path();
    ensure!(map_pin.exists(), "map not pinned at {}", map_pin.display());

    // Attach while the links are still down: nothing can be counted yet,
    // so a zero now and a count later proves the programs did the counting.
    let attached = stats.attach(&a.path(), "fl-ab0")?;
    assert_eq!(attached.ifindex, a.ifindex("fl-ab0")?);
    assert_eq!(thread_netns()?, my_netns, "attach must not move the caller");
    let programs = IfStats::tcx_programs(&a.path(), "fl-ab0")?;
    assert_eq!(programs.ingress, ["ifstats_ingress"]);
    assert_eq!(programs.egress, ["ifstats_egress"]);
    assert_eq!(
        stats.counters(attached.ifindex)?,
        IfCounters::default(),
        "nothing may be counted before traffic"
    );

    for (ns, ifname) in [
        (&a, "fl-ab0"),
        (&b, "fl-ba0"),
        (&a, "fl-ab1"),
        (&b, "fl-ba1"),
    ] {
        ns.link_up(ifname)?;
    }
    let echoed = udp_echo(
        &a,
        &b,
        Ipv4Addr::new(10, 244, 0, 1),
        Ipv4Addr::new(10, 244, 0, 2),
    )?;
    assert_eq!(
        echoed, PACKETS,
        "every datagram should come back over the counted veth"
    );

    let counted = stats.counters(attached.ifindex)?;
    eprintln!(
        "fl-ab0 (ifindex {}) after {PACKETS} echoes: {counted:?}",
        attached.ifindex
    );
    // At least our datagrams; ARP and IPv6 link-local chatter may add more.
    for (hook, counter) in [("egress", counted.egress), ("ingress", counted.ingress)] {
        ensure!(
            counter.packets >= PACKETS as u64,
            "{hook}: {} packets counted, {PACKETS} sent",
            counter.packets
        );
        ensure!(
            counter.bytes >= PACKETS as u64 * FRAME && counter.bytes <= counter.packets * MAX_FRAME,
            "{hook}: {} bytes for {} packets is implausible ({FRAME} bytes per datagram)",
            counter.bytes,
            counter.packets
        );
    }
    assert!(map_pin.exists(), "pin must stay while the instance lives");

    // Negative check: the same traffic on the veth we did not attach to must
    // not show up at all, under its ifindex or any other.
    let other_ifindex = a.ifindex("fl-ab1")?;
    let echoed = udp_echo(
        &a,
        &b,
        Ipv4Addr::new(10, 244, 1, 1),
        Ipv4Addr::new(10, 244, 1, 2),
    )?;
    assert_eq!(
        echoed, PACKETS,
        "traffic on the other veth must really flow"
    );
    assert_eq!(stats.counters(other_ifindex)?, IfCounters::default());
    assert_eq!(
        stats.all_counters()?.keys().copied().collect::<Vec<_>>(),
        vec![attached.ifindex],
        "only the attached interface may have counters"
    );

    let pin_dir = stats.pin_dir().to_owned();
    drop(stats);
    assert!(!pin_dir.exists(), "drop must remove {}", pin_dir.display());
    let programs = IfStats::tcx_programs(&a.path(), "fl-ab0")?;
    assert!(
        programs.ingress.is_empty() && programs.egress.is_empty(),
        "drop must detach, still attached: {programs:?}"
    );
    Ok(())
}

#[test]
fn refuses_root_namespace_and_other_misuse() -> anyhow::Result<()> {
    require_root()?;
    let mut stats = IfStats::load(&unique_instance())?;

    // The root namespace, by path and by fd. The interface name does not
    // exist there either, so even a broken check could not touch the host.
    // PID 1's namespace link can be unreadable even to root (ptrace access
    // check); kthreadd, PID 2, always lives in the root namespace too.
    let root_path = ["/proc/1/ns/net", "/proc/2/ns/net"]
        .into_iter()
        .find(|p| fs::File::open(p).is_ok())
        .context("neither /proc/1/ns/net nor /proc/2/ns/net can be opened")?;
    let err = stats.attach(Path::new(root_path), "fl-none0").unwrap_err();
    assert!(matches!(err, Error::RootNetns { .. }), "{err}");
    let root = fs::File::open(root_path)?;
    let err = stats.attach(root.as_fd(), "fl-none0").unwrap_err();
    assert!(matches!(err, Error::RootNetns { .. }), "{err}");

    let err = stats
        .attach(Path::new("/proc/self/ns/mnt"), "lo")
        .unwrap_err();
    assert!(matches!(err, Error::NotNetns { .. }), "{err}");
    let err = stats
        .attach(Path::new("/run/netns/fl-does-not-exist"), "lo")
        .unwrap_err();
    assert!(matches!(err, Error::NetnsOpen { .. }), "{err}");

    let a = Netns::new()?;
    let b = Netns::new()?;
    let err = stats.attach(&a.path(), "fl-none0").unwrap_err();
    assert!(matches!(err, Error::NoInterface { .. }), "{err}");
    stats.attach(&a.path(), "lo")?;
    let err = stats.attach(&a.path(), "lo").unwrap_err();
    assert!(matches!(err, Error::AlreadyAttached { .. }), "{err}");
    // ifindexes repeat across namespaces (lo is 1 everywhere).
    let err = stats.attach(&b.path(), "lo").unwrap_err();
    assert!(matches!(err, Error::NetnsMismatch { .. }), "{err}");
    assert_eq!(stats.attachments().count(), 1);

    // A second loader must not take over (and later delete) live pins.
    let err = IfStats::load(stats.instance()).unwrap_err();
    assert!(matches!(err, Error::PinDirExists { .. }), "{err}");
    assert!(
        stats.map_pin_path().exists(),
        "a refused load must leave the pins alone"
    );
    let err = IfStats::load("../escape").unwrap_err();
    assert!(matches!(err, Error::InvalidInstance { .. }), "{err}");

    stats.close()?;
    Ok(())
}

#[test]
fn sweep_removes_state_of_dead_test_processes() -> anyhow::Result<()> {
    require_root()?;
    fairlead_ebpf::ensure_bpffs()?;
    // A pid that just exited stands in for a test run that was killed.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;

    let stale_ns = format!("fl-t-{dead}-0");
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &stale_ns])
        .status()?;
    ensure!(status.success(), "ip netns add {stale_ns} failed");
    let stale_pins = pin_dir(&format!("t-{dead}-0"));
    fs::create_dir(&stale_pins).with_context(|| format!("mkdir {}", stale_pins.display()))?;
    // Our own live state must survive the sweep.
    let live = Netns::new()?;

    let report = sweep_stale()?;
    assert!(report.namespaces.contains(&stale_ns), "{report:?}");
    assert!(report.pin_dirs.contains(&stale_pins), "{report:?}");
    assert!(!Path::new("/run/netns").join(&stale_ns).exists());
    assert!(!stale_pins.exists());
    assert!(live.path().exists());
    Ok(())
}

/// Sends PACKETS datagrams from `client_ip` in `client` to an echo socket on
/// `server_ip` in `server`, one at a time, and returns how many came back.
/// Sockets are opened on threads inside each namespace and keep working
/// after those threads end; the loops are bounded by count and timeouts.
fn udp_echo(
    client: &Netns,
    server: &Netns,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
) -> anyhow::Result<usize> {
    let server_addr = SocketAddr::from((server_ip, ECHO_PORT));
    let echo = server.run_in(|| UdpSocket::bind(server_addr))??;
    let sender = client.run_in(|| UdpSocket::bind((client_ip, 0)))??;
    for socket in [&echo, &sender] {
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = [0u8; 2048];
            for _ in 0..PACKETS {
                let Ok((len, from)) = echo.recv_from(&mut buf) else {
                    break;
                };
                let _ = echo.send_to(&buf[..len], from);
            }
        });
        let payload = [0x5a_u8; PAYLOAD];
        let mut buf = [0u8; 2048];
        let mut echoed = 0;
        for _ in 0..PACKETS {
            sender.send_to(&payload, server_addr)?;
            if matches!(sender.recv(&mut buf), Ok(PAYLOAD)) {
                echoed += 1;
            }
        }
        Ok(echoed)
    })
}

/// Inode of this thread's network namespace.
fn thread_netns() -> std::io::Result<u64> {
    Ok(fs::metadata("/proc/thread-self/ns/net")?.ino())
}
