//! Deleting a pod's host veth in DEL, and where the kernel spends its time.
//!
//! DEL deletes the host end `fl<hex>` from the node namespace with a single
//! RTM_DELLINK and returns when the kernel acknowledges it
//! ([`delete_link`]). The kernel takes the pod end, its addresses, the routes
//! and the neighbour entries of both with it. This is the default: nothing
//! is left running when DEL returns and everything DEL undoes is undone.
//!
//! Where the time goes (kernel 6.18, HZ=250, 2 vCPUs; measured with
//! `strace -T`, `perf record -e sched:sched_switch -g` on the plugin, and
//! `cargo bench -p fairlead-cni --bench cni_latency -- --probe-delete`,
//! whose figures are in docs/BENCHMARKS.md):
//!
//! * All of it is inside the one `sendmsg(2)`; the `recvmsg` of the ACK
//!   takes microseconds. rtnetlink handles the request synchronously in the
//!   caller's context and sends the ACK only after `rtnl_dellink` returns,
//!   so there is nothing "after the ACK" to skip, and no socket option makes
//!   the request asynchronous.
//! * Phase 1, under RTNL (`unregister_netdevice_many_notify`): both veth
//!   ends are closed and unlisted, with two `synchronize_rcu_expedited`
//!   calls. About 0.5-0.7 ms; after it the names, addresses, routes and
//!   neighbours are gone, which is everything DEL promises.
//! * Phase 2, after RTNL is released (`rtnl_dellink` -> `netdev_run_todo`):
//!   `rcu_barrier()`, which waits until every RCU callback queued on every
//!   CPU before it has run, including those phase 1 just queued, so at least
//!   one full normal (not expedited) grace period. About 17 ms p50 here
//!   in-process (a bare `synchronize_rcu()` is about 8 ms), 25-50 ms when
//!   other namespaces are being torn down: the bulk of a DEL, and global
//!   kernel state that nothing in the request changes. The device's refcount
//!   is already down to one then, so `netdev_wait_allrefs_any` does not add
//!   its own barriers and sleeps.
//!
//! Cheaper ways tried, none of which avoids phase 2:
//! * deleting only one end: that is already what we do; the peer goes in
//!   the same unregistration, so a second request would only get ENODEV;
//! * deleting the pod end from inside the pod namespace instead of the host
//!   end: the same unregistration of the pair and the same barrier (17 ms
//!   p50 either way), plus a `setns` and a socket, and it needs
//!   `CNI_NETNS`, which DEL may lack;
//! * setting the link down first: the down costs 0.2-0.7 ms (an expedited
//!   grace period under RTNL) and the delete after it still pays the
//!   barrier, measured slower (20 ms p50): it hurts;
//! * moving the host end into the pod namespace so that the runtime's
//!   namespace teardown frees it later (asynchronously, in a kworker):
//!   `__dev_change_net_namespace` calls `rcu_barrier()` too, and under RTNL,
//!   so it is as slow and blocks every other netlink writer meanwhile;
//! * looking the link up before deleting it: one round trip for nothing,
//!   ENODEV already says "gone".
//!
//! Concurrent DELs share grace periods (the barrier runs outside RTNL), so
//! 100 DELs at once take about 0.2-0.25 s in all, not 100 barriers.
//!
//! The opt-in alternative, `"backgroundLinkDelete": true` in the network
//! config ([`delete_link_in_background`]): a forked child sends the request
//! and sits through phase 2 while DEL returns as soon as phase 1 has
//! unlisted the interface (a few ms instead of one grace period). The cost:
//! the child outlives the plugin, so the runtime's process (or its
//! subreaper, or init) must reap it; under a runtime that reaps late it
//! shows up as a zombie, and the kernel is still freeing the device when
//! the runtime hears that DEL is done.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use crate::netlink::{Netlink, NetlinkError};

/// How long DEL waits for the kernel to unlist the device. Phase one takes
/// about a millisecond; only RTNL contention makes it longer.
const TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_micros(200);

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),

    #[error(
        "interface {name} is still in the node namespace {timeout:?} after deleting it; try again"
    )]
    Timeout { name: String, timeout: Duration },
}

/// Deletes `name` from this (the node's) namespace and returns when the
/// kernel has finished (both phases). Ok(false) if there was no such
/// interface.
pub fn delete_link(host: &mut Netlink, name: &str) -> Result<bool, TeardownError> {
    Ok(host.delete_link(name)?)
}

/// Deletes `name` from this (the node's) namespace, returning once it is
/// unlisted (phase 1) and leaving phase 2 to a forked child that exits by
/// itself. Ok(false) if there was no such interface.
pub fn delete_link_in_background(host: &mut Netlink, name: &str) -> Result<bool, TeardownError> {
    if host.link(name)?.is_none() {
        return Ok(false);
    }
    let Ok((read, write)) = pipe() else {
        return Ok(host.delete_link(name)?);
    };
    // SAFETY: the plugin is single-threaded (it starts no threads), so the
    // child may allocate and make syscalls; it never returns from `child`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Ok(host.delete_link(name)?);
    }
    if pid == 0 {
        drop(read);
        child(name, write);
    }
    drop(write);

    let deadline = Instant::now() + TIMEOUT;
    let result = loop {
        if host.link(name)?.is_none() {
            break Ok(true);
        }
        match read_status(read.as_raw_fd()) {
            Status::Pending => {}
            Status::Done(0) | Status::Done(libc::ENODEV) => break Ok(true),
            Status::Done(errno) => {
                break Err(NetlinkError::Kernel {
                    op: format!("delete link {name}"),
                    source: io::Error::from_raw_os_error(errno),
                    ext: None,
                }
                .into())
            }
            // The child died without answering: do it ourselves.
            Status::Gone => break host.delete_link(name).map_err(Into::into),
        }
        if Instant::now() >= deadline {
            break Err(TeardownError::Timeout {
                name: name.to_owned(),
                timeout: TIMEOUT,
            });
        }
        wait_readable(read.as_raw_fd(), POLL);
    };
    // Reap the child if it is already done; otherwise it is reparented.
    // SAFETY: waitpid on our own child with a null status pointer.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    result
}

/// The forked child: let go of stdio, delete, report the errno, exit.
fn child(name: &str, write: OwnedFd) -> ! {
    // SAFETY: plain fd syscalls; /dev/null is opened before dup2 and closed after.
    unsafe {
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if devnull >= 0 {
            for fd in 0..=2 {
                libc::dup2(devnull, fd);
            }
            libc::close(devnull);
        }
    }
    let errno = match Netlink::new().and_then(|mut netlink| netlink.delete_link(name)) {
        Ok(_) => 0,
        Err(e) => e.errno().unwrap_or(libc::EIO),
    };
    let bytes = errno.to_ne_bytes();
    // SAFETY: writes 4 bytes from a live buffer to our pipe, then exits
    // without running the parent's destructors or flushing its buffers.
    unsafe {
        libc::write(write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
        libc::_exit(0)
    }
}

enum Status {
    Pending,
    Done(i32),
    Gone,
}

fn read_status(fd: RawFd) -> Status {
    let mut bytes = [0u8; 4];
    // SAFETY: reads at most 4 bytes into a live buffer from our pipe.
    let n = unsafe { libc::read(fd, bytes.as_mut_ptr().cast(), bytes.len()) };
    match n {
        4 => Status::Done(i32::from_ne_bytes(bytes)),
        0 => Status::Gone,
        _ if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => Status::Pending,
        _ => Status::Gone,
    }
}

/// Sleeps up to `timeout`, waking early when the child answers or exits.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: one valid pollfd and a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut pollfd, 1, &timeout, std::ptr::null()) };
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
