//! Network namespaces as parameters.
//!
//! Work inside a namespace runs on a short-lived thread that calls
//! `setns(CLONE_NEWNET)` and then ends: the namespace is a per-thread
//! attribute, so the caller's thread and the rest of the process never change
//! namespace, and there is no "switch back" step that could fail and leave a
//! thread in the wrong place. File descriptors (programs, tcx links) are
//! process-wide and stay valid after the thread ends.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::Error;

/// A network namespace handed to the loader: a path such as
/// `/var/run/netns/NAME` or `/proc/PID/ns/net`, or an open fd of one.
#[derive(Clone, Copy, Debug)]
pub enum NetnsRef<'a> {
    Path(&'a Path),
    Fd(BorrowedFd<'a>),
}

impl<'a> From<&'a Path> for NetnsRef<'a> {
    fn from(path: &'a Path) -> Self {
        Self::Path(path)
    }
}

impl<'a> From<&'a PathBuf> for NetnsRef<'a> {
    fn from(path: &'a PathBuf) -> Self {
        Self::Path(path)
    }
}

impl<'a> From<BorrowedFd<'a>> for NetnsRef<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        Self::Fd(fd)
    }
}

/// Identity of a namespace: device and inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NsId {
    dev: u64,
    ino: u64,
}

/// An opened, checked network namespace.
pub(crate) struct OpenNetns {
    fd: OwnedFd,
    pub(crate) label: String,
    pub(crate) id: NsId,
}

/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

impl OpenNetns {
    pub(crate) fn open(netns: NetnsRef<'_>) -> Result<Self, Error> {
        let (fd, label) = match netns {
            NetnsRef::Path(path) => {
                let file = File::open(path).map_err(|source| Error::NetnsOpen {
                    netns: path.display().to_string(),
                    source,
                })?;
                (OwnedFd::from(file), path.display().to_string())
            }
            NetnsRef::Fd(fd) => {
                let label = format!("fd {}", fd.as_raw_fd());
                let owned = fd.try_clone_to_owned().map_err(|source| Error::NetnsOpen {
                    netns: label.clone(),
                    source,
                })?;
                (owned, label)
            }
        };
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype != libc::CLONE_NEWNET {
            return Err(Error::NotNetns { netns: label });
        }
        let id = ns_id(fd.as_fd()).map_err(|source| Error::NetnsOpen {
            netns: label.clone(),
            source,
        })?;
        Ok(Self { fd, label, id })
    }

    /// Whether this is the root (initial) network namespace.
    ///
    /// Three witnesses, any match means root: the fixed inode number Linux
    /// gives the initial namespace (uapi `NET_NS_INIT_INO`; older kernels
    /// number it dynamically), and the namespaces of PID 1 and of PID 2
    /// (kthreadd; kernel threads always live in the initial namespace).
    /// PID 1's may be unreadable even to root (it is on this sandbox:
    /// EACCES from the ptrace access check), hence several. If no witness
    /// can be read at all we cannot tell, and refuse.
    pub(crate) fn is_root(&self) -> Result<bool, Error> {
        fairlead_netns::is_root(self.id.dev, self.id.ino).map_err(|source| {
            Error::RootNetnsUnknown {
                netns: self.label.clone(),
                source,
            }
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ns_id(fd: BorrowedFd<'_>) -> io::Result<NsId> {
    let (dev, ino) = fairlead_netns::fd_id(fd)?;
    Ok(NsId { dev, ino })
}

/// Runs `f` on a new thread that has entered the namespace `ns`, and
/// returns its result. A panic in `f` is passed on to the caller.
pub(crate) use fairlead_netns::run_in as run_in_netns;
