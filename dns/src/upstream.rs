//! Upstream DNS servers, behind a trait so tests can put a fake one in.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};

use crate::metrics::UpstreamStats;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream DNS server is configured; set FAIRLEAD_DNS_UPSTREAMS (ip:port,...)")]
    NoUpstreams,
    #[error("upstream {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {server} over {transport}: {source}")]
    Io {
        server: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {server} sent an unusable answer: {reason}")]
    Malformed {
        server: SocketAddr,
        reason: &'static str,
    },
}

/// Sends one query (wire form, with its id) and returns the matching response (wire form).
pub trait Upstream: Send + Sync + 'static {
    fn exchange<'a>(&'a self, query: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, UpstreamError>>;
}

/// Real upstreams over the network: UDP first, TCP when the answer comes back truncated; each
/// server in order until one answers. Each server's requests, timeouts and errors are counted
/// (the server's `/metrics` shows them per upstream).
pub struct NetworkUpstream {
    servers: Vec<Arc<UpstreamStats>>,
    timeout: Duration,
}

impl NetworkUpstream {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            servers: servers
                .into_iter()
                .map(|s| Arc::new(UpstreamStats::new(s)))
                .collect(),
            timeout,
        }
    }

    /// The counters of each server, in the order they are tried.
    pub(crate) fn stats(&self) -> &[Arc<UpstreamStats>] {
        &self.servers
    }

    async fn udp(&self, server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let io = |source| UpstreamError::Io {
            server,
            transport: "UDP",
            source,
        };
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        // A fresh socket per query: a random source port on top of the random id.
        let sock = UdpSocket::bind(local).await.map_err(io)?;
        sock.connect(server).await.map_err(io)?;
        sock.send(query).await.map_err(io)?;
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; 65535];
        // Ignore stray datagrams whose id does not match, until the deadline.
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => {
                    return Err(UpstreamError::Timeout {
                        server,
                        timeout: self.timeout,
                    })
                }
                Ok(r) => r.map_err(io)?,
            };
            if n >= 12 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(&self, server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let io = |source| UpstreamError::Io {
            server,
            transport: "TCP",
            source,
        };
        let exchange = async {
            let mut s = TcpStream::connect(server).await.map_err(io)?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(query);
            s.write_all(&framed).await.map_err(io)?;
            let len = s.read_u16().await.map_err(io)?;
            let mut buf = vec![0u8; usize::from(len)];
            s.read_exact(&mut buf).await.map_err(io)?;
            if buf.len() < 12 || buf[..2] != query[..2] {
                return Err(UpstreamError::Malformed {
                    server,
                    reason: "id does not match the query",
                });
            }
            Ok(buf)
        };
        timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout {
                server,
                timeout: self.timeout,
            }))
    }

    async fn one(&self, server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let answer = self.udp(server, query).await?;
        // TC: the answer did not fit; ask again over TCP (RFC 7766).
        if answer[2] & 0x02 != 0 {
            return self.tcp(server, query).await;
        }
        Ok(answer)
    }
}

impl Upstream for NetworkUpstream {
    fn exchange<'a>(&'a self, query: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, UpstreamError>> {
        Box::pin(async move {
            let mut last = UpstreamError::NoUpstreams;
            for stats in &self.servers {
                let server = stats.addr;
                stats.requests.fetch_add(1, Relaxed);
                match self.one(server, query).await {
                    Ok(answer) => {
                        stats.up.store(true, Relaxed);
                        return Ok(answer);
                    }
                    Err(e) => {
                        let counter = match e {
                            UpstreamError::Timeout { .. } => &stats.timeouts,
                            _ => &stats.errors,
                        };
                        counter.fetch_add(1, Relaxed);
                        stats.up.store(false, Relaxed);
                        tracing::debug!(%server, error = %e, "upstream failed; trying the next");
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }
}
