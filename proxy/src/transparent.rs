//! Transparent interception inside a pod's network namespace: nftables sends inbound TCP to
//! the proxy's inbound port and the pod's outbound TCP to its outbound port; the proxy finds
//! where the connection was going with `SO_ORIGINAL_DST`, and marks its own sockets so its
//! connections are not intercepted again.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use std::sync::Arc;

use tokio::net::{TcpSocket, TcpStream};

/// The ports, the mark and the ruleset, defined once for the plugin, the proxy and the
/// sandbox.
pub use fairlead_netns::mesh::{nft_ruleset, ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK};

/// Where a redirected connection was going (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    // A dual-stack listener sees IPv4 connections as IPv4-mapped IPv6; their original
    // destination is IPv4 conntrack's (SOL_IP works on such a socket).
    let v4 = match stream.local_addr()? {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        // SAFETY: sockaddr_in is plain data; getsockopt fills at most `len` bytes of it.
        unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(addr.sin_port)))
        }
    } else {
        // SAFETY: as above, for sockaddr_in6.
        unsafe {
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Ok(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be(addr.sin6_port),
            ))
        }
    }
}

/// Makes the proxy's own connections, in the right network namespace. A proxy running in
/// its pod (a sidecar) dials where it is; one serving a pod from outside (the sandbox, tests)
/// must create its sockets inside the pod's namespace, or they would leave from the host's.
#[derive(Clone, Default)]
pub struct Dialer {
    netns: Option<Arc<std::fs::File>>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("in_netns", &self.netns.is_some())
            .finish()
    }
}

impl Dialer {
    /// Sockets in the caller's own namespace.
    pub fn here() -> Self {
        Self::default()
    }

    /// Sockets in the namespace open as `netns` (refused if it is the root namespace).
    pub fn in_netns(netns: std::fs::File) -> io::Result<Self> {
        let (dev, ino) = fairlead_netns::fd_id(std::os::fd::AsFd::as_fd(&netns))?;
        if fairlead_netns::is_root(dev, ino)? {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "refusing to dial from the root network namespace",
            ));
        }
        Ok(Self {
            netns: Some(Arc::new(netns)),
        })
    }

    fn socket(&self, v4: bool) -> io::Result<TcpSocket> {
        let Some(netns) = &self.netns else {
            return if v4 {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            };
        };
        let fd = fairlead_netns::run_in(std::os::fd::AsFd::as_fd(&**netns), || {
            let domain = if v4 { libc::AF_INET } else { libc::AF_INET6 };
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe {
                libc::socket(
                    domain,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })??;
        // SAFETY: a fresh, unconnected TCP socket we own.
        let std = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(TcpSocket::from_std_stream(std))
    }

    /// A TCP connection (with `TCP_NODELAY`), marked so the output rule lets it pass when
    /// `marked`.
    pub async fn connect(&self, addr: SocketAddr, marked: bool) -> io::Result<TcpStream> {
        let socket = self.socket(addr.is_ipv4())?;
        if marked {
            let mark = PROXY_MARK;
            // SAFETY: a valid fd and a u32 option value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&mark as *const u32).cast(),
                    std::mem::size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // Without CAP_NET_ADMIN (the injected sidecar runs unprivileged) the mark
                // cannot be set; the interception rules let the proxy's user pass instead
                // (`meta skuid`, fairlead_netns::mesh::PROXY_UID).
                if e.raw_os_error() != Some(libc::EPERM) {
                    return Err(e);
                }
            }
        }
        let stream = socket.connect(addr).await?;
        // A proxy relays requests as they come: no Nagle delay on its own sockets.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
