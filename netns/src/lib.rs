//! Network-namespace primitives every Fairlead component shares: telling
//! whether a namespace is the host's own (root) one, which nothing here may
//! change, and running code inside a namespace on a short-lived thread so the
//! caller's namespace never changes. The agent, the eBPF loader and the
//! sandbox build their own handles on these two.

pub mod mesh;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

/// Inode of the initial network namespace on kernels that number it
/// statically (uapi `NET_NS_INIT_INO`); older kernels number it dynamically,
/// hence the witnesses.
pub const NET_NS_INIT_INO: u64 = 0xEFFF_FFF9;

/// Processes that always live in the root network namespace (init,
/// kthreadd). PID 1's may be unreadable even to root inside some sandboxes
/// (EACCES from the ptrace access check, as on the project's machines),
/// hence two.
pub const ROOT_NETNS_WITNESSES: [&str; 2] = ["/proc/1/ns/net", "/proc/2/ns/net"];

/// (device, inode) of a namespace file descriptor.
pub fn fd_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// Whether the namespace with this (device, inode) is the root one. Any
/// witness matching means root. If no witness can be read at all we cannot
/// tell, and the error says why: callers refuse rather than guess.
pub fn is_root(dev: u64, ino: u64) -> io::Result<bool> {
    if ino == NET_NS_INIT_INO {
        return Ok(true);
    }
    let mut readable = false;
    let mut last_error = None;
    for witness in ROOT_NETNS_WITNESSES {
        match std::fs::metadata(witness) {
            Ok(meta) if (meta.dev(), meta.ino()) == (dev, ino) => return Ok(true),
            Ok(_) => readable = true,
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) if !readable => Err(e),
        _ => Ok(false),
    }
}

/// The cookie of the network namespace `fd` refers to (`SO_NETNS_COOKIE` of a socket made
/// there): how eBPF programs (`bpf_get_netns_cookie`) name a namespace.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    run_in(fd, || {
        // SAFETY: a plain socket(2); closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SO_NETNS_COOKIE (Linux 5.14).
        const SO_NETNS_COOKIE: libc::c_int = 71;
        // SAFETY: a valid socket and an out-buffer of the option's size.
        let rc = unsafe {
            libc::getsockopt(
                s,
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        let err = io::Error::last_os_error();
        // SAFETY: closing the socket made above.
        unsafe { libc::close(s) };
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    })?
}

/// Runs `f` on a new thread that has entered the namespace `fd` refers to and
/// returns its result; the calling thread never changes namespace. Sockets
/// `f` creates stay bound to that namespace. A panic in `f` is passed on.
pub fn run_in<R: Send>(fd: BorrowedFd<'_>, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns with a valid namespace fd; it changes only this
                // thread, which ends when `f` returns.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn own_namespace_is_compared_not_assumed() {
        // The test process's namespace: root or not depends on where tests
        // run, but the answer must agree with the witnesses.
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        let (dev, ino) = fd_id(f.as_fd()).unwrap();
        let me = is_root(dev, ino).unwrap();
        let pid2 = std::fs::metadata("/proc/2/ns/net").unwrap();
        assert_eq!(
            me,
            ino == NET_NS_INIT_INO || (pid2.dev(), pid2.ino()) == (dev, ino)
        );
        assert!(!is_root(dev, ino ^ 1).unwrap() || ino ^ 1 == NET_NS_INIT_INO);
    }

    #[test]
    fn run_in_returns_and_propagates() {
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert_eq!(run_in(f.as_fd(), || 41 + 1).unwrap(), 42);
    }
}
