//! Fakes and clients on 127.0.0.1 for the tests of the running server: a scriptable upstream
//! DNS server that records what it is asked, a UDP/TCP DNS client and a minimal HTTP client.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fairlead_core::Snapshot;
use fairlead_dns::{Config, Server};
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::support::{decode, query_bytes, Answer};

/// Bound on every wait for an answer.
pub const WAIT: Duration = Duration::from_secs(3);

/// What the fake upstream answers to one query.
pub enum Reply {
    /// One A record, sent after `delay`.
    A {
        ip: Ipv4Addr,
        ttl: u32,
        delay: Duration,
    },
    /// NXDOMAIN with an SOA (negative TTL 60).
    NxDomain,
}

impl Reply {
    pub fn a(ip: Ipv4Addr, ttl: u32) -> Self {
        Reply::A {
            ip,
            ttl,
            delay: Duration::ZERO,
        }
    }
}

type Script = dyn Fn(&str, usize) -> Option<Reply> + Send + Sync;

/// A fake upstream DNS server on 127.0.0.1 (UDP). Every query is recorded (lowercased name,
/// with the trailing dot); the script gets the name and how many times it has been asked,
/// this time included, and returns the reply, or `None` to stay silent.
pub struct FakeDns {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDns {
    pub async fn start(
        script: impl Fn(&str, usize) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        let script: Arc<Script> = Arc::new(script);
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, peer)) = sock.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let name = query.queries[0].name().to_ascii().to_ascii_lowercase();
                let nth = {
                    let mut log = log.lock().unwrap();
                    log.push(name.clone());
                    log.iter().filter(|n| **n == name).count()
                };
                let Some(reply) = script(&name, nth) else {
                    continue;
                };
                let sock = Arc::clone(&sock);
                tokio::spawn(async move {
                    if let Reply::A { delay, .. } = reply {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = sock.send_to(&answer(&query, &reply), peer).await;
                });
            }
        });
        FakeDns { addr, asked, task }
    }

    /// Answers every name with one A record.
    pub async fn fixed(ip: Ipv4Addr, ttl: u32) -> Self {
        Self::start(move |_, _| Some(Reply::a(ip, ttl))).await
    }

    /// Receives and records, never answers.
    pub async fn silent() -> Self {
        Self::start(|_, _| None).await
    }

    /// Every name asked, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// The names asked, sorted.
    pub fn asked_sorted(&self) -> Vec<String> {
        let mut v = self.asked();
        v.sort();
        v
    }

    pub fn count(&self, name: &str) -> usize {
        self.asked().iter().filter(|n| *n == name).count()
    }
}

fn answer(query: &Message, reply: &Reply) -> Vec<u8> {
    let question = query.queries[0].clone();
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.message_type = MessageType::Response;
    m.add_query(question.clone());
    match reply {
        Reply::A { ip, ttl, .. } if question.query_type() == RecordType::A => {
            m.add_answer(Record::from_rdata(
                question.name().clone(),
                *ttl,
                RData::A(A(*ip)),
            ));
        }
        // NODATA for other types.
        Reply::A { .. } => {}
        Reply::NxDomain => {
            crate::support::nxdomain_from(&mut m, "example.");
        }
    }
    m.to_vec().unwrap()
}

/// A server on 127.0.0.1 with a random port, `udp_workers` 2, 300 ms upstream timeout, and
/// whatever `tweak` changes.
pub async fn server(
    snapshot: Snapshot,
    tweak: impl FnOnce(&mut Config),
) -> (Server, watch::Sender<Arc<Snapshot>>) {
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream_timeout_ms: 300,
        udp_workers: 2,
        ..Config::default()
    };
    tweak(&mut config);
    (Server::bind(config, rx).await.unwrap(), tx)
}

/// Sends one packet over UDP and waits (bounded) for the answer.
pub async fn udp_raw(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = timeout(WAIT, sock.recv(&mut buf)).await.ok()?.unwrap();
    buf.truncate(n);
    Some(buf)
}

/// Asks over UDP (EDNS 1232) and decodes the answer.
pub async fn udp(server: &Server, name: &str, t: RecordType) -> Answer {
    decode(
        &udp_raw(server.udp_addr(), &query_bytes(name, t, Some(1232)))
            .await
            .unwrap_or_else(|| panic!("no answer to {name} {t} within {WAIT:?}")),
    )
}

/// Asks over TCP and decodes the answer.
pub async fn tcp(server: &Server, name: &str, t: RecordType) -> Answer {
    let packet = query_bytes(name, t, None);
    let mut s = TcpStream::connect(server.tcp_addr()).await.unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    s.write_all(&framed).await.unwrap();
    let len = timeout(WAIT, s.read_u16()).await.unwrap().unwrap();
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    decode(&buf)
}

/// An HTTP response: status, headers (lowercased names), body.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// `GET path` over HTTP/1.0 (so the server closes the connection after the body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Http {
    let mut s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("the admin server accepts");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("a whole response in time")
        .unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Http {
        status,
        headers,
        body: body.to_owned(),
    }
}
