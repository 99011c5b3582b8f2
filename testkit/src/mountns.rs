//! A private mount namespace for a process tree a test starts (a container
//! runtime and everything it spawns): fresh tmpfs over the host directories
//! the runtime would write to (`/run`, `/var/lib`), so its state files,
//! namespace bind mounts and shm mounts exist only in there. They vanish with
//! the namespace, also when the test is killed: a `sleep` of bounded length
//! holds it, and the kernel frees it once the holder and the runtime's own
//! processes are gone.
//!
//! Enter it with `nsenter --mount=<ns_path>`, which (unlike `ip netns exec`)
//! keeps every other mount, `/sys/fs/cgroup` included.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::netns::TestkitError;

/// Holds a private mount namespace; dropping it ends the holder.
#[derive(Debug)]
pub struct PrivateMounts {
    holder: Child,
}

impl PrivateMounts {
    /// A namespace whose mounts are private copies of the caller's, with an
    /// empty tmpfs over each of `tmpfs_over` (absolute, existing directories).
    /// The holder exits by itself after `lifetime`, so a killed test leaves
    /// nothing for long.
    pub fn new(tmpfs_over: &[&Path], lifetime: Duration) -> Result<Self, TestkitError> {
        crate::require_root()?;
        let paths = || {
            tmpfs_over
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let targets = tmpfs_over
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TestkitError::PrivateMounts {
                paths: paths(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;

        let mut command = Command::new("sleep");
        command
            .arg(lifetime.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook runs in the forked child before exec and calls only
        // prctl(2), unshare(2) and mount(2) (async-signal-safe syscalls) on
        // C strings prepared before the fork. The mounts happen in the new
        // namespace only: MS_PRIVATE is set on the copy of `/` first, so
        // nothing propagates back to the caller's namespace.
        unsafe {
            command.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                };
                // Ends the holder with the test thread that started it.
                check(libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                ))?;
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for target in &targets {
                    check(libc::mount(
                        c"fl-test".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c"mode=755".as_ptr().cast(),
                    ))?;
                }
                Ok(())
            });
        }
        // spawn returns once the hook has run and exec succeeded, so the
        // namespace is ready.
        let holder = command
            .spawn()
            .map_err(|source| TestkitError::PrivateMounts {
                paths: paths(),
                source,
            })?;
        Ok(Self { holder })
    }

    /// `/proc/<holder>/ns/mnt`: what `nsenter --mount=` and `setns` take.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.id()))
    }

    /// `path` as seen inside the namespace, readable from outside
    /// (`/proc/<holder>/root/...`).
    pub fn inside(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        Path::new(&format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    /// Mount points inside the namespace (`/proc/<holder>/mountinfo`).
    pub fn mounts(&self) -> Result<Vec<PathBuf>, TestkitError> {
        let path = PathBuf::from(format!("/proc/{}/mountinfo", self.holder.id()));
        let text = fs::read_to_string(&path).map_err(|source| TestkitError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_whitespace().nth(4))
            .map(PathBuf::from)
            .collect())
    }
}

impl Drop for PrivateMounts {
    fn drop(&mut self) {
        // Our own child: kill and reap it. Processes the runtime left inside
        // keep the namespace until they exit.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
