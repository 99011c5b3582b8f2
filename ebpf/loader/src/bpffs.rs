//! bpffs mount and the per-instance pin directory.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use crate::Error;

/// Where bpffs is mounted; all pins live below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Every instance pins under `/sys/fs/bpf/fairlead-<instance>/`.
pub const PIN_DIR_PREFIX: &str = "fairlead-";

/// `statfs.f_type` of bpffs (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of `instance`: `/sys/fs/bpf/fairlead-<instance>`.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(format!("{PIN_DIR_PREFIX}{instance}"))
}

/// Mounts bpffs at [`BPFFS_ROOT`] unless it is already a bpffs mount.
///
/// Pins outlive the process only on bpffs; on the plain sysfs directory a
/// fresh machine has, `BPF_OBJ_PIN` fails, so this runs before every load.
pub fn ensure_bpffs() -> Result<(), Error> {
    let root = Path::new(BPFFS_ROOT);
    let fail = |source| Error::Bpffs {
        path: root.to_path_buf(),
        source,
    };
    if is_bpffs(root).map_err(fail)? {
        return Ok(());
    }
    // Mounting bpffs over bpffs succeeds and hides the pins below, so two
    // loaders (threads or processes) must not both see "not mounted" and
    // both mount. Serialise on a lock of the parent directory: it stays the
    // same sysfs inode whether or not bpffs is mounted below it.
    let parent = root.parent().expect("BPFFS_ROOT has a parent");
    let lock = File::open(parent).map_err(fail)?;
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    if is_bpffs(root).map_err(fail)? {
        return Ok(());
    }
    let target = CString::new(root.as_os_str().as_bytes()).expect("constant path has no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; `data` may be null for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    drop(lock);
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs by libc target"
    )]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Instance names become a path component; keep them boring.
pub(crate) fn validate_instance(instance: &str) -> Result<(), Error> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && !instance.starts_with('.')
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInstance {
            instance: instance.to_owned(),
        })
    }
}
