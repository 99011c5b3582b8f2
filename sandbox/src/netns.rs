//! Named network namespaces for the sandbox (`/var/run/netns/<name>`, so
//! `ip netns exec`, nsenter and CNI_NETNS all find them), created and removed
//! with iproute2, and a way to run a closure inside one on its own thread.
//!
//! Every name starts with `fl-<sandbox>-`, so `sandbox down` and the stale
//! sweep can find all of a sandbox's namespaces without any other record.

use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` ({0}); install iproute2 (scripts/setup.sh does)")]
    Spawn(std::io::Error),
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: String,
        source: std::io::Error,
    },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(String),
}

pub const NETNS_DIR: &str = "/var/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `ip ARGS`, returning stdout, or an error carrying the command and stderr.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, NetnsError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates a namespace with loopback up. An existing one of the same name is
/// a leftover of a crashed sandbox and is replaced.
pub fn create(name: &str) -> Result<(), NetnsError> {
    if path(name).exists() {
        let _ = ip(&["netns", "del", name]);
    }
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

pub fn delete(name: &str) -> Result<(), NetnsError> {
    if path(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// All namespaces whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets a sysctl inside a namespace (never the root one) by writing /proc/sys
/// from a thread that entered it.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    run_in(ns, move || std::fs::write(&file, value))?.map_err(|source| NetnsError::Enter {
        path: format!("{ns} (sysctl {key})"),
        source,
    })
}

/// Runs `f` on a new thread that has entered namespace `ns`; the calling
/// thread's namespace never changes. Sockets `f` creates stay in `ns`.
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let p = path(ns);
    let shown = p.display().to_string();
    let file = std::fs::File::open(&p).map_err(|source| NetnsError::Enter {
        path: shown.clone(),
        source,
    })?;
    let handle = std::thread::spawn(move || -> Result<T, std::io::Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a valid namespace fd, affecting only this
        // short-lived thread, which exits when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| NetnsError::Panicked(shown.clone()))?
        .map_err(|source| NetnsError::Enter {
            path: shown,
            source,
        })
}
