//! The built-in workload every sandbox pod runs: an HTTP server (HTTP/1.1 and HTTP/2 without
//! TLS; a gRPC request, of any method, gets a unary answer), a TCP echo
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
/// The DNS pod's metrics and health port (CoreDNS's).
pub const DNS_ADMIN_PORT: u16 = 9153;

/// Runs `fairlead dns` in pod namespace `ns`: UDP and TCP port 53 bound inside the pod,
/// answering from its own watchers on the sandbox's API server (`client`), the path `fairlead
/// dns` runs on a cluster. Returns once it has listed the cluster (as a readiness probe on
/// `/ready` would hold the pod back). No upstream: the sandbox has no internet, so names
/// outside the cluster zone get SERVFAIL.
pub async fn start_dns(
    ns: &str,
    id: Identity,
    client: kube::Client,
) -> Result<Workload, crate::Error> {
    let fail = |e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    };
    let (udp, tcp, admin) = netns::run_in(ns, || -> std::io::Result<_> {
        Ok((
            std::net::UdpSocket::bind(any(DNS_PORT))?,
            std::net::TcpListener::bind(any(DNS_PORT))?,
            std::net::TcpListener::bind(any(DNS_ADMIN_PORT))?,
        ))
    })?
    .map_err(fail)?;
    let config = fairlead_dns::Config {
        listen: any(DNS_PORT),
        udp_workers: 1,
        ..Default::default()
    };
    let mut server = fairlead_dns::Server::serve_sockets_api(config, client, udp, tcp)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    // /metrics, /health, /ready, as CoreDNS serves them on 9153.
    server
        .start_admin_on(admin)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.is_ready() {
        if std::time::Instant::now() > deadline {
            return Err(fail(std::io::Error::other(
                "the cluster DNS did not list the cluster within 30 s",
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
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

/// Binds the three servers in pod namespace `ns`, plus a TCP or UDP echo on every further
/// port the pod's containers declare (as the Kubernetes network-policy e2e suite's pods
/// serve 80 and 81 over both protocols), and serves them all.
pub fn start(
    ns: &str,
    id: Identity,
    declared: &[(u16, fairlead_core::Protocol)],
) -> Result<Workload, crate::Error> {
    use fairlead_core::Protocol;
    let extra_tcp: Vec<u16> = declared
        .iter()
        .filter(|(p, proto)| *proto == Protocol::Tcp && ![HTTP_PORT, TCP_ECHO_PORT].contains(p))
        .map(|(p, _)| *p)
        .collect();
    let extra_udp: Vec<u16> = declared
        .iter()
        .filter(|(p, proto)| *proto == Protocol::Udp && *p != UDP_ECHO_PORT)
        .map(|(p, _)| *p)
        .collect();
    let (http, tcps, udps) = netns::run_in(ns, || -> std::io::Result<_> {
        let http = std::net::TcpListener::bind(any(HTTP_PORT))?;
        http.set_nonblocking(true)?;
        let mut tcps = Vec::new();
        for port in std::iter::once(TCP_ECHO_PORT).chain(extra_tcp.iter().copied()) {
            let l = std::net::TcpListener::bind(any(port))?;
            l.set_nonblocking(true)?;
            tcps.push(l);
        }
        let mut udps = Vec::new();
        for port in std::iter::once(UDP_ECHO_PORT).chain(extra_udp.iter().copied()) {
            let u = std::net::UdpSocket::bind(any(port))?;
            u.set_nonblocking(true)?;
            udps.push(u);
        }
        Ok((http, tcps, udps))
    })?
    .map_err(|e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    })?;
    let id = Arc::new(id);
    let fail = |e| crate::Error::Workload {
        pod: id.pod.clone(),
        source: e,
    };
    let mut tasks = Vec::new();

    let http = tokio::net::TcpListener::from_std(http).map_err(fail)?;
    let who = id.clone();
    let app = axum::Router::new().fallback(
        move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
              headers: axum::http::HeaderMap,
              uri: axum::http::Uri,
              body: axum::body::Bytes| {
            let who = who.clone();
            async move {
                // The mesh identity of the caller, when a sidecar vouched for it.
                let identity = headers
                    .get("x-fairlead-client-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                let line = format!(
                    "pod={} namespace={} node={} client={} path={} identity={identity}\n",
                    who.pod,
                    who.namespace,
                    who.node,
                    peer.ip().to_canonical(),
                    uri.path()
                );
                let grpc = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                if grpc {
                    grpc_unary(&body, line)
                } else {
                    axum::response::IntoResponse::into_response(line)
                }
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
    for l in tcps {
        let l = tokio::net::TcpListener::from_std(l).map_err(fail)?;
        tasks.push(tokio::spawn(tcp_echo(l, id.pod.clone())));
    }
    for u in udps {
        let u = tokio::net::UdpSocket::from_std(u).map_err(fail)?;
        tasks.push(tokio::spawn(udp_echo(u, id.pod.clone())));
    }
    Ok(Workload { tasks, _dns: None })
}

/// A unary gRPC answer (any method): one length-prefixed message holding `line`, then the
/// `grpc-status` trailer; a request that is not one whole uncompressed message gets status
/// 3 (INVALID_ARGUMENT), as a gRPC server would answer it.
fn grpc_unary(request: &[u8], line: String) -> axum::response::Response {
    use axum::http::{HeaderMap, HeaderValue};
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let whole = request.len() >= 5
        && request[0] == 0
        && u32::from_be_bytes([request[1], request[2], request[3], request[4]]) as usize
            == request.len() - 5;
    let mut frames: Vec<Result<Frame<axum::body::Bytes>, std::convert::Infallible>> = Vec::new();
    let mut trailers = HeaderMap::new();
    if whole {
        let mut message = vec![0u8];
        message.extend_from_slice(&(line.len() as u32).to_be_bytes());
        message.extend_from_slice(line.as_bytes());
        frames.push(Ok(Frame::data(message.into())));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
    } else {
        trailers.insert("grpc-status", HeaderValue::from_static("3"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("expected one uncompressed message"),
        );
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = axum::body::Body::new(StreamBody::new(futures::stream::iter(frames)));
    let mut response = axum::response::Response::new(body);
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Names the pod, then echoes.
async fn tcp_echo(listener: tokio::net::TcpListener, name: String) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let name = name.clone();
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
}

/// Answers each datagram with `<pod>: <datagram>`.
async fn udp_echo(socket: tokio::net::UdpSocket, name: String) {
    let mut buf = [0u8; 2048];
    while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
        let mut reply = format!("{name}: ").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, peer).await;
    }
}
