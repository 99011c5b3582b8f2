//! The network namespace the agent works in, taken as a parameter.
//!
//! On a real node that is the host's namespace; in the sandbox and in tests it is a node
//! namespace they made. Work that must happen *inside* it (opening the netlink socket, writing
//! `/proc/sys/net/...`) runs on a short-lived thread that calls `setns(CLONE_NEWNET)` and then
//! ends, so no thread of the caller ever changes namespace and there is no "switch back" that
//! could fail. A netlink socket stays bound to the namespace it was created in, so everything
//! after that goes through the socket from any thread.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// Whether the root (initial) network namespace may be used. Tests and the sandbox never want
/// it (a mistake there changes the machine's own networking); a real node's agent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootNetns {
    /// Refuse the root namespace (the default).
    #[default]
    Refuse,
    /// Allow it: the agent runs on a real node and programs the host.
    Allow,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "cannot open network namespace {netns}: {source}; pass a namespace that exists \
         (`ip netns add NAME` makes /var/run/netns/NAME, or use /proc/PID/ns/net)", netns = .netns.display()
    )]
    Open { netns: PathBuf, source: io::Error },

    #[error(
        "{netns} is not a network namespace: pass /var/run/netns/NAME or /proc/PID/ns/net",
        netns = .netns.display()
    )]
    NotNetns { netns: PathBuf },

    #[error(
        "refusing to program the root network namespace ({netns}): set \
         FAIRLEAD_AGENT_ALLOW_ROOT_NETNS=true only on a real node, where the agent owns the \
         host's routes", netns = .netns.display()
    )]
    Root { netns: PathBuf },

    #[error(
        "cannot tell whether {netns} is the root network namespace (neither /proc/1/ns/net nor \
         /proc/2/ns/net is readable: {source}); run with access to /proc", netns = .netns.display()
    )]
    RootUnknown { netns: PathBuf, source: io::Error },

    #[error("cannot enter network namespace {netns}: {source}", netns = .netns.display())]
    Enter { netns: PathBuf, source: io::Error },
}

/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// An opened and checked network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens `path`, checks that it is a network namespace and, unless `root` allows it, that
    /// it is not the root one.
    pub fn open(path: &Path, root: RootNetns) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            netns: path.to_owned(),
            source,
        })?;
        let fd = OwnedFd::from(file);
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                netns: path.to_owned(),
            });
        }
        let ns = Self {
            fd,
            path: path.to_owned(),
        };
        if root == RootNetns::Refuse && ns.is_root()? {
            return Err(NetnsError::Root {
                netns: path.to_owned(),
            });
        }
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn is_root(&self) -> Result<bool, NetnsError> {
        let open_err = |source| NetnsError::Open {
            netns: self.path.clone(),
            source,
        };
        let (dev, ino) = fairlead_netns::fd_id(self.fd.as_fd()).map_err(open_err)?;
        fairlead_netns::is_root(dev, ino).map_err(|source| NetnsError::RootUnknown {
            netns: self.path.clone(),
            source,
        })
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result; the
    /// calling thread never changes namespace. A panic in `f` is passed on.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
        fairlead_netns::run_in(self.fd.as_fd(), f).map_err(|source| NetnsError::Enter {
            netns: self.path.clone(),
            source,
        })
    }
}
