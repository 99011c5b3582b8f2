//! What a meshed pod's network namespace holds: the interception ruleset the CNI plugin
//! installs for pods that carry the mesh annotation, and the ports and socket mark the
//! sidecar (`fairlead-proxy`) uses. Shared by the plugin, the proxy and the sandbox so the
//! three agree on one definition.

use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::process::{Command, Stdio};

/// The annotation that asks for a sidecar (and for interception).
pub const INJECT_ANNOTATION: &str = "fairlead.io/inject";
/// Inbound ports that bypass the sidecar, comma-separated (for server-speaks-first
/// protocols the user keeps in the clear, like Linkerd's `skip-inbound-ports`).
pub const SKIP_INBOUND_PORTS_ANNOTATION: &str = "fairlead.io/skip-inbound-ports";
/// `strict` (default) or `permissive` (plaintext clients reach the app without an
/// identity), on a pod, or as a label on its namespace.
pub const MODE_ANNOTATION: &str = "fairlead.io/mode";
/// Application ports that speak opaque TCP (server-speaks-first), comma-separated: the
/// sidecar skips protocol detection on them.
pub const OPAQUE_PORTS_ANNOTATION: &str = "fairlead.io/opaque-ports";
/// The sidecar's inbound (mTLS) listener: intercepted inbound TCP goes here.
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's outbound listener: intercepted outbound TCP goes here.
pub const OUTBOUND_PORT: u16 = 15001;
/// The sidecar's admin port (probes, metrics); never intercepted.
pub const ADMIN_PORT: u16 = 15020;
/// The node agent's TCP port for its sidecars (`MESH-CERT`, `MESH-ROUTES`), on the node's
/// address.
pub const AGENT_MESH_PORT: u16 = 15012;
/// `SO_MARK` of the proxy's own sockets, which the output rule lets pass (when the proxy
/// may set it: that takes `CAP_NET_ADMIN`).
pub const PROXY_MARK: u32 = 0x0fa1_1539;
/// The user the injected proxy runs as; the output rule lets its sockets pass too, which is
/// how an unprivileged proxy's own connections escape interception.
pub const PROXY_UID: u32 = 15000;
/// The nftables table the ruleset creates.
pub const TABLE: &str = "fairlead_mesh";

/// `ADDRESS:PORT` as a node's address and a port are joined in a manifest
/// (`$(HOST_IP):15012`): `10.0.0.5:15012`, `[fd00::5]:15012`, and also an IPv6 address
/// without brackets (`fd00::5:15012`, the port after the last colon), which is what the
/// kubelet makes of an IPv6 `status.hostIP`.
pub fn parse_host_port(text: &str) -> Option<std::net::SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    let (ip, port) = text.rsplit_once(':')?;
    Some(std::net::SocketAddr::new(
        ip.parse().ok()?,
        port.parse().ok()?,
    ))
}

/// Whether a pod's annotations ask for the mesh.
pub fn wants_mesh<'a>(mut annotation: impl FnMut(&str) -> Option<&'a str>) -> bool {
    annotation(INJECT_ANNOTATION) == Some("true")
}

/// The ports of a `fairlead.io/skip-inbound-ports` value (`"3306, 5432"`); an error names
/// the item that is not a port.
pub fn parse_ports(value: &str) -> Result<Vec<u16>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{p:?} is not a port (1-65535)")),
        })
        .collect()
}

/// The nftables ruleset for a pod namespace (one transaction for `nft -f -`). Loopback is
/// never intercepted; inbound ports in `skip_inbound` (the sidecar's own, and those the
/// user keeps in the clear) pass untouched; the proxy's marked sockets pass on the way out.
pub fn nft_ruleset(skip_inbound: &[u16]) -> String {
    let mut skip: Vec<u16> = vec![INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT];
    skip.extend_from_slice(skip_inbound);
    skip.sort_unstable();
    skip.dedup();
    let skip: Vec<String> = skip.iter().map(u16::to_string).collect();
    format!(
        "table inet {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"lo\" return\n\
         \t\ttcp dport {{ {skip} }} return\n\
         \t\tmeta l4proto tcp redirect to :{INBOUND_PORT}\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta mark {PROXY_MARK:#x} return\n\
         \t\tmeta skuid {PROXY_UID} return\n\
         \t\toifname \"lo\" return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tip6 daddr ::1 return\n\
         \t\tmeta l4proto tcp redirect to :{OUTBOUND_PORT}\n\
         \t}}\n\
         }}\n",
        skip = skip.join(", ")
    )
}

/// Loads `ruleset` with `nft -f -` inside the namespace `netns` (refused for the root
/// namespace). The error carries nft's own message.
pub fn load_ruleset(netns: BorrowedFd<'_>, ruleset: &str) -> io::Result<()> {
    let (dev, ino) = crate::fd_id(netns)?;
    if crate::is_root(dev, ino)? {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "refusing to load an nftables ruleset in the root network namespace",
        ));
    }
    let nft = find_nft().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "nft (nftables) is not installed on this node: not in PATH nor in /usr/sbin, /sbin, \
             /usr/local/sbin",
        )
    })?;
    // A child forked from a thread inherits that thread's network namespace.
    crate::run_in(netns, || {
        let mut child = Command::new(&nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("running nft: {e}")))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "nft -f failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    })?
}

/// `nft` from PATH, or from the usual sbin directories (a CNI plugin may run with no PATH).
fn find_nft() -> Option<std::path::PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_takes_both_families_and_bare_ipv6() {
        let p = |t| parse_host_port(t).map(|a| a.to_string());
        assert_eq!(p("10.0.0.5:15012").as_deref(), Some("10.0.0.5:15012"));
        assert_eq!(p("[fd00::5]:15012").as_deref(), Some("[fd00::5]:15012"));
        assert_eq!(p("fd00::5:15012").as_deref(), Some("[fd00::5]:15012"));
        for bad in [
            "",
            "10.0.0.5",
            "10.0.0.5:",
            "host:15012",
            "10.0.0.5:70000",
            ":15012",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_ruleset_skips_the_proxy_and_loopback() {
        let r = nft_ruleset(&[3306]);
        assert!(
            r.contains("tcp dport { 3306, 15001, 15006, 15020 } return"),
            "{r}"
        );
        assert!(r.contains("redirect to :15006"));
        assert!(r.contains("meta mark 0xfa11539 return"));
        assert!(r.contains("meta skuid 15000 return"));
        assert!(r.contains("redirect to :15001"));
    }

    #[test]
    fn skip_ports_parse_or_say_which_item_is_wrong() {
        assert_eq!(parse_ports("3306, 5432,"), Ok(vec![3306, 5432]));
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert_eq!(
            parse_ports("3306,mysql"),
            Err("\"mysql\" is not a port (1-65535)".into())
        );
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
    }

    #[test]
    fn the_root_namespace_is_refused() {
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        // This test process runs in the host's namespace on CI; elsewhere skip.
        let (dev, ino) = crate::fd_id(std::os::fd::AsFd::as_fd(&f)).unwrap();
        if crate::is_root(dev, ino).unwrap_or(false) {
            let e = load_ruleset(std::os::fd::AsFd::as_fd(&f), "").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
    }
}
