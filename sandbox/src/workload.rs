//! The built-in workload every sandbox pod runs: an HTTP server, a TCP echo
//! and a UDP echo, each answering with the pod's name, so a test can tell
//! which backend it reached. Sockets are bound inside the pod's namespace on a
//! short-lived thread and then served from the sandbox's runtime.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns;

pub const HTTP_PORT: u16 = 8080;
pub const TCP_ECHO_PORT: u16 = 5000;
pub const UDP_ECHO_PORT: u16 = 5001;

/// Who the workload says it is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub namespace: String,
    pub pod: String,
    pub node: String,
}

/// Running workload; dropping it stops the servers and closes the sockets.
pub struct Workload {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dns: Option<fairlead_dns::Server>,
}

/// Pods with this label (`k8s-app: kube-dns`, as CoreDNS's) run the cluster DNS instead of
/// the echo servers.
pub const DNS_LABEL: (&str, &str) = ("k8s-app", "kube-dns");
pub const DNS_PORT: u16 = 53;

/// Runs `fairlead dns` in pod namespace `ns`: UDP and TCP port 53 bound inside the pod,
/// answering from the sandbox's snapshots. No upstream: the sandbox has no internet, so
/// names outside the cluster zone get SERVFAIL.
pub fn start_dns(
    ns: &str,
    id: Identity,
    snapshots: tokio::sync::watch::Receiver<Arc<fairlead_core::Snapshot>>,
) -> Result<Workload, crate::Error> {
    let fail = |e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    };
    let (udp, tcp) = netns::run_in(ns, || -> std::io::Result<_> {
        Ok((
            std::net::UdpSocket::bind(any(DNS_PORT))?,
            std::net::TcpListener::bind(any(DNS_PORT))?,
        ))
    })?
    .map_err(fail)?;
    let config = fairlead_dns::Config {
        listen: any(DNS_PORT),
        udp_workers: 1,
        ..Default::default()
    };
    let server = fairlead_dns::Server::serve_sockets(config, snapshots, udp, tcp)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    Ok(Workload {
        tasks: Vec::new(),
        _dns: Some(server),
    })
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn any(port: u16) -> SocketAddr {
    // [::] with IPV6_V6ONLY off (the default in a new namespace) serves both families.
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

/// Binds the three servers in pod namespace `ns` and serves them.
pub fn start(ns: &str, id: Identity) -> Result<Workload, crate::Error> {
    let (http, tcp, udp) = netns::run_in(ns, || -> std::io::Result<_> {
        let http = std::net::TcpListener::bind(any(HTTP_PORT))?;
        let tcp = std::net::TcpListener::bind(any(TCP_ECHO_PORT))?;
        let udp = std::net::UdpSocket::bind(any(UDP_ECHO_PORT))?;
        for s in [&http, &tcp] {
            s.set_nonblocking(true)?;
        }
        udp.set_nonblocking(true)?;
        Ok((http, tcp, udp))
    })?
    .map_err(|e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    })?;
    let id = Arc::new(id);
    let mut tasks = Vec::new();

    let http = tokio::net::TcpListener::from_std(http).map_err(|e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    })?;
    let who = id.clone();
    let app = axum::Router::new().fallback(
        move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
              uri: axum::http::Uri| {
            let who = who.clone();
            async move {
                format!(
                    "pod={} namespace={} node={} client={} path={}\n",
                    who.pod,
                    who.namespace,
                    who.node,
                    peer.ip().to_canonical(),
                    uri.path()
                )
            }
        },
    );
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(
            http,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    }));

    let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    })?;
    let who = id.clone();
    tasks.push(tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let name = who.pod.clone();
            tokio::spawn(async move {
                if conn
                    .write_all(format!("{name}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }));

    let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    })?;
    let who = id.clone();
    tasks.push(tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let mut reply = format!("{}: ", who.pod).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, peer).await;
        }
    }));
    Ok(Workload { tasks, _dns: None })
}
