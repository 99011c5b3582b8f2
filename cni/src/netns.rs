//! Entering a pod's network namespace, briefly, on the calling thread.
//!
//! Only one thing happens inside: a netlink socket is created, which stays
//! bound to the pod namespace. The thread returns to the node namespace
//! straight away, so everything else (IPAM files, sysctls, the host end of
//! the veth) is always done from the node namespace.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use crate::netlink::{Netlink, NetlinkError};

const OWN_NETNS: &str = "/proc/thread-self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("container network namespace {path} does not exist: {source}", path = .path.display())]
    NotFound { path: PathBuf, source: io::Error },

    #[error("cannot open network namespace {path}: {source}", path = .path.display())]
    Open { path: PathBuf, source: io::Error },

    #[error(
        "cannot enter network namespace {path}: {source}; is it a network namespace \
         (/proc/PID/ns/net or a bind mount of one)?",
        path = .path.display()
    )]
    Enter { path: PathBuf, source: io::Error },

    #[error("in network namespace {path}: {source}", path = .path.display())]
    Netlink { path: PathBuf, source: NetlinkError },
}

/// An open network namespace (the fd keeps it alive while we work).
#[derive(Debug)]
pub struct NetnsFile {
    file: File,
    path: PathBuf,
}

impl NetnsFile {
    pub fn open(path: &Path) -> Result<NetnsFile, NetnsError> {
        match File::open(path) {
            Ok(file) => Ok(NetnsFile {
                file,
                path: path.to_owned(),
            }),
            Err(source) if source.kind() == io::ErrorKind::NotFound => Err(NetnsError::NotFound {
                path: path.to_owned(),
                source,
            }),
            Err(source) => Err(NetnsError::Open {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A netlink socket inside this namespace; the calling thread is back
    /// in its own namespace when this returns.
    pub fn netlink(&self) -> Result<Netlink, NetnsError> {
        let own = File::open(OWN_NETNS).map_err(|source| NetnsError::Open {
            path: OWN_NETNS.into(),
            source,
        })?;
        setns(self.fd()).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let socket = Netlink::new();
        if let Err(e) = setns(own.as_raw_fd()) {
            // Going on in the pod's namespace would put node-side changes
            // into the pod; nothing can be trusted after this.
            eprintln!("fairlead-cni: cannot return to the node network namespace: {e}; aborting");
            std::process::abort();
        }
        socket.map_err(|source| NetnsError::Netlink {
            path: self.path.clone(),
            source,
        })
    }
}

fn setns(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns on a namespace fd we hold open; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
