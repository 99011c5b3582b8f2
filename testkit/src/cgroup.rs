//! Cgroup subtrees for tests that start a container runtime: runc (with
//! podman's `cgroupfs` manager) makes the cgroups under the parent it is
//! given, in every mounted hierarchy, and leaves the parents behind. Giving it
//! `--cgroup-parent /fl-t-<pid>-<n>` keeps all of it in one named subtree per
//! hierarchy, which [`CgroupTree`] removes on drop and [`sweep_stale_cgroups`]
//! removes after a killed run.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Once,
    thread,
    time::{Duration, Instant},
};

use crate::netns::{owner_pid, pid_alive, unique_instance, TestkitError};

/// Cgroup trees are `fl-t-<pid>-<n>` (the namespace prefix), directly under
/// each hierarchy's root.
const CGROUP_PREFIX: &str = "fl-t-";

static SWEEP: Once = Once::new();

/// Every mounted cgroup hierarchy (v1 controllers, named v1 hierarchies and
/// the v2 tree), from `/proc/self/mountinfo`.
pub fn cgroup_mounts() -> Result<Vec<PathBuf>, TestkitError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| TestkitError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mountpoint options [optional...] - fstype ...`
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mountpoint = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect())
}

/// A cgroup subtree name, `fl-t-<pid>-<n>`, reserved for one test. Nothing is
/// created up front (the runtime makes the directories it needs); dropping it
/// removes `<hierarchy>/fl-t-<pid>-<n>` and everything below it in every
/// hierarchy.
#[derive(Debug)]
pub struct CgroupTree {
    name: String,
}

impl CgroupTree {
    /// Reserves a name. The first call in a process also sweeps trees left
    /// by dead test processes.
    pub fn new() -> Result<Self, TestkitError> {
        crate::require_root()?;
        let mut sweep_result = Ok(());
        SWEEP.call_once(|| sweep_result = sweep_stale_cgroups().map(drop));
        sweep_result?;
        Ok(Self {
            name: format!("fl-{}", unique_instance()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/fl-t-<pid>-<n>`: what `--cgroup-parent` takes.
    pub fn parent(&self) -> String {
        format!("/{}", self.name)
    }

    /// The directories of this tree that exist now, one per hierarchy.
    pub fn existing(&self) -> Result<Vec<PathBuf>, TestkitError> {
        Ok(cgroup_mounts()?
            .into_iter()
            .map(|m| m.join(&self.name))
            .filter(|p| p.is_dir())
            .collect())
    }

    /// Removes the tree in every hierarchy, waiting up to `patience` for
    /// cgroups that still hold exiting processes (a container monitor that
    /// is shutting down).
    pub fn remove(&self, patience: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + patience;
        for dir in self.existing()? {
            remove_tree(&dir, deadline).map_err(|source| TestkitError::Cgroup {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = self.remove(Duration::from_secs(10)) {
            // The next run's sweep removes it once its processes are gone.
            eprintln!("fairlead-testkit: leaving cgroup {} behind: {e}", self.name);
        }
    }
}

/// Removes `fl-t-<pid>-<n>` trees whose owning process is dead. A tree that
/// still holds processes is left for a later sweep.
pub fn sweep_stale_cgroups() -> Result<Vec<PathBuf>, TestkitError> {
    let mut removed = Vec::new();
    for mount in cgroup_mounts()? {
        let entries = match fs::read_dir(&mount) {
            Ok(entries) => entries,
            Err(_) => continue,
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = owner_pid(&name, CGROUP_PREFIX) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            let path = entry.path();
            match remove_tree(&path, Instant::now()) {
                Ok(()) => removed.push(path),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(source) => return Err(TestkitError::Cgroup { path, source }),
            }
        }
    }
    Ok(removed)
}

/// Depth first: a cgroup directory can be removed (with its control files)
/// once it has no children and no processes.
fn remove_tree(dir: &Path, deadline: Instant) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}
