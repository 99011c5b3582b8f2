//! The link reaper: deletes, in the background, the veths that the CNI plugin's DEL has taken
//! out of use.
//!
//! Deleting a veth costs one RCU barrier in the kernel (~20 ms, see `cni/src/teardown.rs`), too
//! slow for DEL, which the runtime waits on. So DEL sets the pair down, renames both ends to a
//! tombstone (`flz` + 12 hex digits) and sends `DELLINK <name>` on the status socket
//! ([`crate::status`]); the server queues the name here ([`LinkReaper::submit`]) and answers
//! `OK` at once, and the reaper deletes the link. Only tombstone names are accepted: the socket
//! must not become a way to delete any interface of the node.
//!
//! One OS thread with a netlink socket opened inside the node namespace, not a task on the
//! agent's runtime: rtnetlink is asynchronous only on our side. The kernel handles RTM_DELLINK
//! inside the `sendmsg(2)` of the connection's task and that call sleeps in `rcu_barrier()` for
//! the whole ~20 ms, which on the agent's runtime would stall a worker thread, and everything
//! queued on it, for every pod. Deletes run one after another: each still costs its ~20 ms of
//! kernel time (sleeping, not CPU), so the reaper drains about 60 links a second and a burst of
//! DELs waits in the queue. Nothing visible waits with it: the tombstones have no routes and no
//! names anyone uses.
//!
//! Tombstones are garbage by name, so the reaper also deletes the ones nobody asked about: when
//! it starts (an earlier agent died with a queue) and, at most once a minute, when its queue runs
//! empty (a DEL died between renaming and asking).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::Handle;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use crate::netns::{Netns, NetnsError, RootNetns};

/// Every tombstone's name: this, then 12 lowercase hex digits (the CNI plugin's
/// `fairlead_cni::teardown::TOMBSTONE_PREFIX`; a cni test checks that they agree).
pub const TOMBSTONE_PREFIX: &str = "flz";
const TOMBSTONE_HEX: usize = 12;
/// More queued than this and [`LinkReaper::submit`] refuses, so DEL deletes the link itself:
/// at ~60 deletes a second the queue is then more than a minute long.
pub const MAX_QUEUE: usize = 4096;
/// Least time between two sweeps for unrequested tombstones when the queue runs empty.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

const ENODEV: i32 = libc::ENODEV;

/// Whether `name` is a tombstone: `flz` and 12 lowercase hex digits.
pub fn is_tombstone(name: &str) -> bool {
    name.strip_prefix(TOMBSTONE_PREFIX).is_some_and(|hex| {
        hex.len() == TOMBSTONE_HEX && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error(transparent)]
    Netns(#[from] NetnsError),

    #[error("cannot open a netlink socket in {netns}: {source}", netns = .netns.display())]
    Socket { netns: PathBuf, source: io::Error },

    #[error("cannot start the link reaper's thread: {0}")]
    Thread(#[source] io::Error),
}

/// Why [`LinkReaper::submit`] did not queue a name (the text is what the socket answers after
/// `ERROR `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("not a fairlead tombstone")]
    NotATombstone,

    #[error("link reaper busy: {0} links queued; delete it yourself")]
    Full(usize),

    #[error("link reaper stopped")]
    Stopped,
}

/// A handle on the reaper thread; clones share it. The thread finishes the queue and ends when
/// the last handle is dropped.
#[derive(Clone)]
pub struct LinkReaper {
    queue: mpsc::UnboundedSender<String>,
    /// Names queued and not yet done.
    pending: Arc<watch::Sender<usize>>,
    netns: Arc<PathBuf>,
}

impl LinkReaper {
    /// Starts a reaper for the network namespace at `netns` (refusing the root namespace unless
    /// `root` allows it): opens its netlink socket there, then, in the background, deletes the
    /// tombstones already present and whatever is submitted. Blocks for the few milliseconds
    /// that opening takes; from async code, call it through `spawn_blocking`.
    pub fn start(netns: &Path, root: RootNetns) -> Result<Self, ReaperError> {
        let netns = Netns::open(netns, root)?;
        let path = Arc::new(netns.path().to_owned());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(ReaperError::Thread)?;
        // The socket is created on a thread inside the namespace and stays bound to it; it
        // registers with the reaper's own runtime.
        let handle = runtime.handle().clone();
        let (connection, netlink, _) = netns
            .run_in(|| {
                let _guard = handle.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|source| ReaperError::Socket {
                netns: netns.path().to_owned(),
                source,
            })?;
        let (queue, names) = mpsc::unbounded_channel();
        let pending = Arc::new(watch::channel(0).0);
        let worker = Worker {
            netlink,
            netns: Arc::clone(&path),
            pending: Arc::clone(&pending),
        };
        let span = tracing::info_span!("link_reaper", netns = %path.display());
        std::thread::Builder::new()
            .name("fl-link-reaper".into())
            .spawn(move || {
                runtime.block_on(
                    async move {
                        tokio::spawn(connection);
                        worker.run(names).await;
                    }
                    .instrument(span),
                );
            })
            .map_err(ReaperError::Thread)?;
        Ok(Self {
            queue,
            pending,
            netns: path,
        })
    }

    /// The namespace it deletes in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Queues tombstone `name` for deletion; returns at once.
    pub fn submit(&self, name: &str) -> Result<(), SubmitError> {
        if !is_tombstone(name) {
            return Err(SubmitError::NotATombstone);
        }
        let mut full = None;
        self.pending.send_modify(|n| {
            if *n >= MAX_QUEUE {
                full = Some(*n);
            } else {
                *n += 1;
            }
        });
        if let Some(n) = full {
            return Err(SubmitError::Full(n));
        }
        self.queue.send(name.to_owned()).map_err(|_| {
            self.pending.send_modify(|n| *n -= 1);
            SubmitError::Stopped
        })
    }

    /// Links queued and not yet deleted (including the one being deleted).
    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until nothing is pending, at most `timeout`; whether it got there.
    pub async fn idle(&self, timeout: Duration) -> bool {
        let mut pending = self.pending.subscribe();
        tokio::time::timeout(timeout, pending.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The reaper thread's side.
struct Worker {
    netlink: Handle,
    netns: Arc<PathBuf>,
    pending: Arc<watch::Sender<usize>>,
}

impl Worker {
    async fn run(self, mut names: mpsc::UnboundedReceiver<String>) {
        self.sweep("left by an earlier agent").await;
        let mut last_sweep = Instant::now();
        while let Some(name) = names.recv().await {
            self.delete(&name).await;
            self.pending.send_modify(|n| *n = n.saturating_sub(1));
            if names.is_empty() && last_sweep.elapsed() >= SWEEP_EVERY {
                self.sweep("nobody asked to delete").await;
                last_sweep = Instant::now();
            }
        }
        debug!("link reaper stopped");
    }

    async fn delete(&self, name: &str) -> bool {
        let started = Instant::now();
        // By name, the only thing a tombstone is known by (index 0: the kernel selects by
        // IFLA_IFNAME). Deleting one end deletes the pair.
        let mut request = self.netlink.link().del(0);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match request.execute().await {
            Ok(()) => {
                debug!(link = name, took = ?started.elapsed(), "tombstone deleted");
                true
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => {
                // Someone else (GC, a DEL that gave up waiting) was faster: done all the same.
                debug!(link = name, "tombstone already gone");
                false
            }
            Err(e) => {
                warn!(
                    link = name,
                    netns = %self.netns.display(),
                    error = %e,
                    "could not delete a tombstoned pod veth; the next sweep (agent start, or \
                     CNI GC) tries again"
                );
                false
            }
        }
    }

    /// Deletes every tombstone in the namespace.
    async fn sweep(&self, why: &str) {
        let mut names = Vec::new();
        let mut links = self.netlink.link().get().execute();
        loop {
            match links.try_next().await {
                Ok(Some(link)) => {
                    names.extend(link.attributes.into_iter().filter_map(|a| match a {
                        LinkAttribute::IfName(name) if is_tombstone(&name) => Some(name),
                        _ => None,
                    }))
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "could not list interfaces to sweep tombstones");
                    return;
                }
            }
        }
        let mut deleted = 0;
        for name in &names {
            deleted += usize::from(self.delete(name).await);
        }
        if deleted > 0 {
            info!(deleted, "deleted tombstoned pod veths {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tombstone_names_are_tombstones() {
        assert!(is_tombstone("flz0123456789ab"));
        for name in [
            "",
            "flz",
            "fl0123456789a",
            "fl.vxlan",
            "flz0123456789a",
            "flz0123456789abc",
            "flz0123456789AB",
            "flz01234567 9ab",
            "eth0",
            "xflz0123456789a",
        ] {
            assert!(!is_tombstone(name), "{name:?}");
        }
    }
}
