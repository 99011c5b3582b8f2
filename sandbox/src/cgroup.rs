//! The sandbox's cgroup v2 subtree, `<cgroup2>/fairlead-<sandbox>/<node>/`: each node's agent
//! attaches socket-level load balancing there (never to a hierarchy's root), and processes run
//! "in a pod" (`fairlead sandbox exec`, tests) join their node's cgroup so their `connect()`
//! to a Service goes straight to a backend. `down` and `sweep` remove the subtree.

use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on
/// a hybrid one), from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// `<cgroup2>/fairlead-<sandbox>`.
pub fn sandbox_dir(sandbox: &str) -> Option<PathBuf> {
    cgroup2_root().map(|r| r.join(format!("fairlead-{sandbox}")))
}

/// `<cgroup2>/fairlead-<sandbox>/<node>`.
pub fn node_dir(sandbox: &str, node: &str) -> Option<PathBuf> {
    sandbox_dir(sandbox).map(|d| d.join(node))
}

/// Creates the node's cgroup (and the sandbox's).
pub fn create_node(sandbox: &str, node: &str) -> io::Result<PathBuf> {
    let dir = node_dir(sandbox, node).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 hierarchy is mounted; socket-level load balancing needs one",
        )
    })?;
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The cgroup of a pod (named like its network namespace) under whichever node runs it.
pub fn find_pod(sandbox: &str, pod_netns: &str) -> Option<PathBuf> {
    std::fs::read_dir(sandbox_dir(sandbox)?)
        .ok()?
        .flatten()
        .map(|node| node.path().join(pod_netns))
        .find(|p| p.is_dir())
}

/// Moves the calling process into `dir` (for a child between fork and exec).
pub fn join(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), "0")
}

/// Removes an empty cgroup directory; a missing one is fine.
pub fn remove_dir(dir: &Path) {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup"),
    }
}

/// Removes the sandbox's subtree, deepest first. A cgroup that still has processes stays
/// (rmdir fails with EBUSY) and is reported.
pub fn remove(sandbox: &str) {
    let Some(dir) = sandbox_dir(sandbox) else {
        return;
    };
    let subdirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    for node in subdirs(&dir) {
        for pod in subdirs(&node) {
            remove_dir(&pod);
        }
        remove_dir(&node);
    }
    remove_dir(&dir);
}
