//! Taking a pod's veth apart in DEL: the fast part here, the slow part
//! handed to the node agent.
//!
//! # Why a delete is slow
//!
//! Deleting the host end `fl<hex>` is one RTM_DELLINK (the kernel takes the
//! pod end, the addresses, routes and neighbours with it), but it returns
//! only when the kernel is done, and that is mostly waiting (kernel 6.18,
//! HZ=250, 2 vCPUs; `strace -T`, `perf record -e sched:sched_switch -g` and
//! `cargo bench -p fairlead-cni --bench cni_latency -- --probe-delete`,
//! figures in docs/BENCHMARKS.md):
//!
//! * All of it is inside the one `sendmsg(2)`: rtnetlink handles a request
//!   synchronously in the caller's context and acks after `rtnl_dellink`
//!   returns; no socket option makes it asynchronous.
//! * Phase 1, under RTNL (`unregister_netdevice_many_notify`): both ends are
//!   closed and unlisted, with two `synchronize_rcu_expedited`. About
//!   0.5-0.7 ms.
//! * Phase 2, after RTNL (`netdev_run_todo`): `rcu_barrier()`, at least one
//!   full normal grace period: about 17 ms p50 in-process, 25-50 ms while
//!   other namespaces are torn down. Global kernel state; nothing in the
//!   request changes it.
//!
//! None of the cheaper deletes avoids phase 2 (measured): deleting the pod
//! end instead (same pair, same barrier, and it needs `CNI_NETNS`); setting
//! the link down first (slower: 20 ms p50); moving the host end into the pod
//! namespace for the runtime's namespace teardown to free (that path calls
//! `rcu_barrier()` too, and under RTNL).
//!
//! # What DEL does instead
//!
//! What DEL owes the runtime is that the attachment is gone *as seen from
//! the node and the pod*: no route to the pod's addresses, the addresses
//! free, the names free for the next ADD. None of that needs the device
//! freed. So DEL ([`remove_veth`]):
//!
//! 1. looks up `fl<hex>` (absent: an earlier DEL, or the pod namespace's
//!    own teardown, took it; nothing to do: DEL twice, DEL after the
//!    namespace is gone), and connects to the agent's socket
//!    (`agentSocket`); when nothing listens there it deletes the veth
//!    at once, a single RTM_DELLINK as before, and stops;
//! 2. sets it down, which makes the kernel drop every route through it in
//!    the same request (IPv4 `fib_sync_down_dev`, IPv6 `rt6_sync_down_dev`),
//!    so the pod's /32 and /128 go and a re-allocated address never meets a
//!    stale route; the pair loses its carrier, so the old pod can no longer
//!    send into the node with an address IPAM is about to hand out;
//! 3. renames it to a tombstone, `flz` + 12 hex digits, which frees
//!    `fl<hex>` for the next ADD of the same (container, ifname). `z` is not
//!    a hex digit, so no `fl<hex>` name is ever a tombstone;
//! 4. does the same to the pod end inside the pod namespace, when
//!    `CNI_NETNS` names one that still exists. Renaming only the host end is
//!    not enough: the pod end keeps `CNI_IFNAME` and the pod's routes
//!    (`default via 169.254.1.1 dev eth0`) until the pair is freed, and a
//!    re-ADD into the same namespace (`podman network reload`, a runtime
//!    retrying) would fail with EEXIST on them;
//! 5. sends `DELLINK <tombstone>` on that connection; the agent answers
//!    `OK` once queued and deletes the pair in a thread of its own, in the
//!    node namespace it manages, one after another;
//! 6. (in the plugin) releases the addresses, only now that no route to
//!    them is left.
//!
//! Steps 2-4 cost about 0.15 ms per request (each an expedited grace period
//! under RTNL: `synchronize_net` when a device closes or is renamed), the
//! hand-off about 0.2 ms. Down comes before rename, in a request of its own,
//! on purpose: Linux 6.2 and later rename an up device but log "renamed from
//! ... (while UP)" to the kernel log for it, a line per pod; older kernels
//! refuse it (EBUSY). Down then rename costs the same as one combined
//! request (measured), since each step pays its own `synchronize_net`.
//!
//! If no agent answers `OK` within `agentHandoffTimeoutMs` of the request
//! (none running, hung, overloaded, a name it refuses), or the pod end could
//! not be tombstoned, DEL deletes the pair itself, synchronously, as it
//! always did: DEL never fails, and never leaves a veth, because the agent
//! is down. The connect is non-blocking, so a hung agent with a full
//! backlog costs nothing either.
//!
//! Tombstones are garbage by name from the moment they exist, so anyone may
//! delete one at any time, and each of these does: the agent when asked,
//! when it starts (a previous agent may have died with a queue) and, at most
//! once a minute, when its queue runs empty (a plugin killed between rename
//! and hand-off); GC,
//! synchronously ([`delete_tombstones`]). Two of them racing on one
//! tombstone is harmless: the loser gets ENODEV, which means done.
//!
//! # Why not the forked child
//!
//! The opt-in `backgroundLinkDelete` this replaces forked a child that sat
//! through phase 2 while DEL returned. Removed: the child outlived the
//! plugin, so the runtime (or its subreaper, or init) had to reap it and a
//! runtime that reaps late collected zombies; it needed a `fork` in the
//! plugin; and the kernel was still holding the pair's names when the
//! runtime heard DEL was done. The agent already runs on every node, owns
//! its namespace and outlives every DEL: it can wait out the barrier
//! without anyone reaping anything, and the renames mean nothing visible is
//! left while it does.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{
    agent,
    netlink::{Netlink, NetlinkError},
    netns::{NetnsError, NetnsFile},
};

/// Every tombstone's name starts with this, then 12 lowercase hex digits.
/// The agent (`fairlead_agent::reaper`) deletes only names of this shape;
/// a cni test checks that both sides agree.
pub const TOMBSTONE_PREFIX: &str = "flz";
const TOMBSTONE_HEX: usize = 12;
/// Renames that may meet an existing tombstone's name (48 bits of a hash
/// over the attachment, the process and the time: more than one try is for
/// pathological cases only).
const NAME_TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Whether `name` is a tombstone: `flz` and 12 lowercase hex digits.
pub fn is_tombstone(name: &str) -> bool {
    name.strip_prefix(TOMBSTONE_PREFIX).is_some_and(|hex| {
        hex.len() == TOMBSTONE_HEX && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Where DEL may hand a tombstone off.
#[derive(Debug, Clone, Copy)]
pub struct HandOff<'a> {
    /// The agent's socket (`agentSocket`).
    pub socket: &'a Path,
    /// From sending the request to the agent's `OK`, at most this
    /// (`agentHandoffTimeoutMs`).
    pub timeout: Duration,
}

/// The pod end of the veth, when DEL knows where it is.
#[derive(Debug, Clone, Copy)]
pub struct PodEnd<'a> {
    /// `CNI_NETNS`.
    pub netns: &'a Path,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
}

/// What [`remove_veth`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// There was no such interface.
    Absent,
    /// Tombstoned and queued with the agent, which deletes it.
    HandedOff { tombstone: String },
    /// Deleted before returning; `fallback` says why the agent did not take
    /// it (None: no hand-off was configured).
    Deleted { fallback: Option<String> },
}

/// Takes the veth whose host end is `name` out of use (see the module docs)
/// and, with `agent`, leaves deleting it to the agent. `seed` (the
/// container and interface) goes into the tombstone's name.
pub fn remove_veth(
    host: &mut Netlink,
    name: &str,
    seed: &str,
    pod: Option<PodEnd>,
    agent: Option<HandOff>,
) -> Result<Removed, TeardownError> {
    let Some(link) = host.link(name)? else {
        return Ok(Removed::Absent);
    };
    // Connecting first tells, for the cost of a connect(2), whether an agent
    // is there at all; without one the renames would be wasted work, and
    // DEL is a single RTM_DELLINK as it always was.
    let (agent, connection) = match agent.map(|a| (a, agent::Connection::open(a.socket))) {
        None => return delete_now(host, name, None),
        Some((a, Err(e))) => {
            return delete_now(
                host,
                name,
                Some(format!("the agent at {}: {e}", a.socket.display())),
            )
        }
        Some((a, Ok(connection))) => (a, connection),
    };
    let tombstone = match bury(host, link.index, |attempt| tombstone_name(seed, attempt)) {
        Ok(Some(tombstone)) => tombstone,
        // Deleted by someone else meanwhile.
        Ok(None) => return Ok(Removed::Absent),
        // Still called `name` (the rename is what failed): delete it now
        // rather than fail a DEL that can still do its job.
        Err(e) => return delete_now(host, name, Some(format!("cannot tombstone it: {e}"))),
    };
    let pod_end = match pod {
        Some(pod) => bury_pod_end(pod, link.index, link.peer_index, &tombstone),
        None => Ok(()),
    };
    match pod_end.and_then(|()| hand_off(agent, connection, &tombstone)) {
        Ok(()) => Ok(Removed::HandedOff { tombstone }),
        Err(why) => {
            delete_link(host, &tombstone)?;
            Ok(Removed::Deleted {
                fallback: Some(why),
            })
        }
    }
}

/// Deletes `name` now; `fallback` says why the agent does not.
fn delete_now(
    host: &mut Netlink,
    name: &str,
    fallback: Option<String>,
) -> Result<Removed, TeardownError> {
    Ok(if delete_link(host, name)? {
        Removed::Deleted { fallback }
    } else {
        Removed::Absent
    })
}

/// Deletes `name` from this (the node's) namespace and returns when the
/// kernel has finished (both phases). Ok(false) if there was no such
/// interface.
pub fn delete_link(host: &mut Netlink, name: &str) -> Result<bool, TeardownError> {
    Ok(host.delete_link(name)?)
}

/// Deletes every tombstone in this (the node's) namespace, synchronously;
/// returns how many it deleted (GC).
pub fn delete_tombstones(host: &mut Netlink) -> Result<usize, TeardownError> {
    let mut deleted = 0;
    for name in host.link_names()? {
        if is_tombstone(&name) && host.delete_link(&name)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Sets interface `index` down, then renames it to `name(attempt)`.
/// Ok(None) if the interface vanished meanwhile.
fn bury(
    netlink: &mut Netlink,
    index: u32,
    name: impl Fn(u32) -> String,
) -> Result<Option<String>, NetlinkError> {
    let gone = |e: &NetlinkError| e.errno() == Some(libc::ENODEV);
    match netlink.set_down_index(index) {
        Err(e) if gone(&e) => return Ok(None),
        other => other?,
    }
    let mut attempt = 0;
    loop {
        let tombstone = name(attempt);
        match netlink.rename_link(index, &tombstone, false) {
            Ok(()) => return Ok(Some(tombstone)),
            Err(e) if gone(&e) => return Ok(None),
            Err(e) if e.errno() == Some(libc::EEXIST) && attempt + 1 < NAME_TRIES => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Steps 2-3 for the pod end, inside the pod namespace. Nothing to do when
/// the namespace is gone (the pair went with it) or holds no end of this
/// pair; Err(why) when the end is there but could not be tombstoned.
fn bury_pod_end(
    pod: PodEnd,
    host_index: u32,
    peer_index: Option<u32>,
    tombstone: &str,
) -> Result<(), String> {
    let netns = match NetnsFile::open(pod.netns) {
        Ok(netns) => netns,
        Err(NetnsError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let describe = |e: NetlinkError| format!("in {}: {e}", pod.netns.display());
    let mut inside = netns.netlink().map_err(|e| e.to_string())?;
    let Some(link) = inside.link(pod.ifname).map_err(describe)? else {
        return Ok(());
    };
    // `CNI_IFNAME` in that namespace may be something else: touch it only if
    // it is the other end of this very pair.
    if peer_index != Some(link.index) || link.peer_index != Some(host_index) {
        return Ok(());
    }
    bury(&mut inside, link.index, |_| tombstone.to_owned())
        .map(drop)
        .map_err(describe)
}

/// Asks the agent to delete `tombstone`; Err(why) unless it answered `OK`.
fn hand_off(agent: HandOff, connection: agent::Connection, tombstone: &str) -> Result<(), String> {
    let socket = agent.socket.display();
    match connection.ask(&format!("{} {tombstone}", agent::DELLINK), agent.timeout) {
        Ok(answer) if answer == "OK" => Ok(()),
        Ok(answer) => Err(format!("the agent at {socket} answered {answer:?}")),
        Err(e) => Err(format!("the agent at {socket}: {e}")),
    }
}

/// `flz` + 12 hex digits of SHA-256 over the seed, this process, the time
/// and the attempt: unique without a random source, and different for
/// every DEL of the same attachment.
fn tombstone_name(seed: &str, attempt: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::digest(format!("{seed}/{}/{nanos}/{attempt}", std::process::id()));
    let hex: String = digest[..TOMBSTONE_HEX / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{TOMBSTONE_PREFIX}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstone_names_fit_and_are_recognised() {
        let a = tombstone_name("abc/eth0", 0);
        assert_eq!(a.len(), 15, "IFNAMSIZ allows 15");
        assert!(is_tombstone(&a), "{a}");
        assert_ne!(a, tombstone_name("abc/eth0", 1));
        // Never a pod's host end, the VXLAN device, or a short/long look-alike.
        assert!(!is_tombstone(&crate::host_ifname("abc", "eth0")));
        for name in [
            "fl.vxlan",
            "flz",
            "flz0123456789a",
            "flz0123456789abc",
            "flz0123456789AB",
        ] {
            assert!(!is_tombstone(name), "{name}");
        }
        assert!(is_tombstone("flz0123456789ab"));
    }
}
