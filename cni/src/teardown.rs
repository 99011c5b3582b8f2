//! Deleting a host veth without making DEL wait for the kernel to free it.
//!
//! Kernel behaviour this works around: unregistering a netdev has two phases,
//! both inside the one `sendmsg(2)` of the RTM_DELLINK request. Under RTNL the
//! device (and its veth peer) is unlisted: names freed, addresses, routes and
//! neighbour entries gone. Then, after RTNL is released, `netdev_run_todo`
//! waits in `rcu_barrier()` and for the last references before freeing the
//! memory. That second phase is 15-40 ms on our VMs (RCU grace periods), even
//! for a down veth without addresses, and would be most of DEL's time.
//!
//! So a forked child sends the request and sits through the kernel's wait,
//! while DEL returns as soon as the device is gone from the node namespace.
//! The child holds none of the runtime's pipes (the runtime sees the plugin
//! finish) and exits by itself when the kernel returns: reaped by us if we
//! are still running, otherwise by init or the runtime's subreaper.

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

/// Deletes `name` from this (the node's) namespace. Ok(false) if there was
/// no such interface.
pub fn delete_link(host: &mut Netlink, name: &str) -> Result<bool, TeardownError> {
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
