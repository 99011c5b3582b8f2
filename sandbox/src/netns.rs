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

/// Runs `f` on a new thread that has entered namespace `ns`; the calling
/// thread's namespace never changes. Sockets `f` creates stay in `ns`.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    use std::os::fd::AsFd;
    let p = path(ns);
    let shown = p.display().to_string();
    let file = std::fs::File::open(&p).map_err(|source| NetnsError::Enter {
        path: shown.clone(),
        source,
    })?;
    fairlead_netns::run_in(file.as_fd(), f).map_err(|source| NetnsError::Enter {
        path: shown,
        source,
    })
}
