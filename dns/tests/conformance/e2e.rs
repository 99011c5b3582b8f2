//! The server over real UDP and TCP sockets on 127.0.0.1, forwarding to a fake upstream that
//! also listens on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use fairlead_core::{ClusterIps, Snapshot};
use fairlead_dns::{Config, Server};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::timeout;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(3);

/// A fake upstream on loopback: `example.com` A (TTL 300), `short.example.com` A (TTL 1),
/// `big.example.com` 100 A records (truncated over UDP), anything else NXDOMAIN with an SOA.
struct FakeUpstream {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fake_answer(query: &[u8], udp: bool) -> Vec<u8> {
    let q = Message::from_vec(query).unwrap();
    let question = q.queries[0].clone();
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    let name = question.name().to_ascii().to_ascii_lowercase();
    let a = |ttl, ip: Ipv4Addr| Record::from_rdata(question.name().clone(), ttl, RData::A(A(ip)));
    match name.as_str() {
        "example.com." => {
            m.add_answer(a(300, Ipv4Addr::new(192, 0, 2, 1)));
        }
        "short.example.com." => {
            m.add_answer(a(1, Ipv4Addr::new(192, 0, 2, 2)));
        }
        "big.example.com." if udp => m.metadata.truncation = true,
        "big.example.com." => {
            for i in 0..100 {
                m.add_answer(a(300, Ipv4Addr::new(192, 0, 2, i)));
            }
        }
        _ => {
            crate::support::nxdomain_from(&mut m, "example.com.");
        }
    }
    m.metadata.message_type = MessageType::Response;
    m.to_vec().unwrap()
}

impl FakeUpstream {
    async fn start() -> Self {
        // UDP and TCP on one port: the port the kernel picks for UDP may be taken for TCP
        // (by any other process's connection), so try again with another.
        let mut attempts = 0;
        let (udp, addr, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (Arc::new(udp), addr, tcp),
                Err(_) if attempts < 100 => attempts += 1,
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        };
        let down = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let (d, n) = (Arc::clone(&down), Arc::clone(&queries));
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
                n.fetch_add(1, SeqCst);
                if !d.load(SeqCst) {
                    let _ = udp.send_to(&fake_answer(&buf[..len], true), peer).await;
                }
            }
        });
        let (d, n) = (Arc::clone(&down), Arc::clone(&queries));
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                n.fetch_add(1, SeqCst);
                if d.load(SeqCst) {
                    continue;
                }
                let Ok(len) = s.read_u16().await else {
                    continue;
                };
                let mut buf = vec![0u8; len as usize];
                if s.read_exact(&mut buf).await.is_err() {
                    continue;
                }
                let answer = fake_answer(&buf, false);
                let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&answer);
                let _ = s.write_all(&framed).await;
            }
        });
        FakeUpstream {
            addr,
            down,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }
}

struct Cluster {
    server: Server,
    upstream: FakeUpstream,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Cluster {
    let upstream = FakeUpstream::start().await;
    let (snapshots, rx) = watch::channel(Arc::new(cluster()));
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstreams: vec![upstream.addr],
        upstream_timeout_ms: 300,
        udp_workers: 2,
        ..Config::default()
    };
    tweak(&mut config);
    let server = Server::bind(config, rx).await.unwrap();
    Cluster {
        server,
        upstream,
        snapshots,
    }
}

async fn udp_ask(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = timeout(WAIT, sock.recv(&mut buf)).await.ok()?.unwrap();
    buf.truncate(n);
    Some(buf)
}

async fn tcp_ask(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).await.unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed).await.unwrap();
    let len = timeout(WAIT, s.read_u16()).await.unwrap().unwrap();
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

async fn udp(c: &Cluster, name: &str, t: RecordType) -> Answer {
    decode(
        &udp_ask(c.server.udp_addr(), &query_bytes(name, t, Some(1232)))
            .await
            .expect("an answer"),
    )
}

#[tokio::test]
async fn cluster_names_over_udp_and_tcp_and_updates_show_up() {
    let c = start(|_| {}).await;
    let want = vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"];
    assert_records(
        udp(&c, "web.shop.svc.cluster.local.", RecordType::A).await,
        want.clone(),
    );
    let q = query_bytes("Web.Shop.Svc.Cluster.Local", RecordType::A, None);
    let a = decode(&tcp_ask(c.server.tcp_addr(), &q).await);
    assert_eq!(
        a.answers,
        vec!["Web.Shop.Svc.Cluster.Local. 5 IN A 10.96.0.20"]
    );

    // A new snapshot with web moved: the answer follows (bounded wait).
    let mut snap = cluster();
    let mut web = (**snap.service("shop", "web").unwrap()).clone();
    web.cluster_ips = ClusterIps::Assigned(vec!["10.96.0.99".parse().unwrap()]);
    let mut builder = Snapshot::builder().service(web);
    for s in snap.services().values().filter(|s| s.name != "web") {
        builder = builder.service((**s).clone());
    }
    snap = builder.build();
    c.snapshots.send(Arc::new(snap)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = udp(&c, "web.shop.svc.cluster.local.", RecordType::A)
            .await
            .answers;
        if seen == ["web.shop.svc.cluster.local. 5 IN A 10.96.0.99"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, ["web.shop.svc.cluster.local. 5 IN A 10.96.0.99"]);
    let m = c.server.metrics();
    assert!(m.queries("A") >= 3 && m.responses(0) >= 3, "{m:?}");
}

#[tokio::test]
async fn forwards_and_caches_positive_and_negative_answers() {
    let c = start(|_| {}).await;
    let a = udp(&c, "example.com.", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert!(!a.aa);
    assert_eq!(a.answers, vec!["example.com. 300 IN A 192.0.2.1"]);
    let asked = c.upstream.queries.load(SeqCst);
    let again = udp(&c, "EXAMPLE.com.", RecordType::A).await;
    assert_eq!(again.answers.len(), 1);
    assert!(again.answers[0].starts_with("EXAMPLE.com. "), "{again:?}");
    assert_eq!(
        c.upstream.queries.load(SeqCst),
        asked,
        "served from the cache"
    );

    let nx = udp(&c, "missing.example.com.", RecordType::A).await;
    assert_eq!(nx.rcode, ResponseCode::NXDomain);
    assert_eq!(nx.authority.len(), 1);
    let asked = c.upstream.queries.load(SeqCst);
    assert_eq!(
        udp(&c, "missing.example.com.", RecordType::A).await.rcode,
        ResponseCode::NXDomain
    );
    assert_eq!(
        c.upstream.queries.load(SeqCst),
        asked,
        "negative answer cached"
    );
    let m = c.server.metrics();
    assert_eq!((m.cache_hits, m.cache_misses), (2, 2), "{m:?}");
    assert_eq!(c.server.cached_answers(), 2);
}

#[tokio::test]
async fn truncated_upstream_answers_are_retried_over_tcp_and_truncated_for_small_clients() {
    let c = start(|_| {}).await;
    // 100 A records do not fit 1232 bytes: TC over UDP, in full over TCP.
    let udp_answer = udp(&c, "big.example.com.", RecordType::A).await;
    assert!(
        udp_answer.tc && udp_answer.answers.is_empty(),
        "{udp_answer:?}"
    );
    let q = query_bytes("big.example.com.", RecordType::A, Some(1232));
    let full = decode(&tcp_ask(c.server.tcp_addr(), &q).await);
    assert_eq!((full.tc, full.answers.len()), (false, 100));
    assert!(c.server.metrics().truncated >= 1);
}

#[tokio::test]
async fn serves_stale_when_upstreams_fail() {
    let c = start(|_| {}).await;
    assert_eq!(
        udp(&c, "short.example.com.", RecordType::A).await.answers,
        vec!["short.example.com. 1 IN A 192.0.2.2"]
    );
    c.upstream.down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = udp(&c, "short.example.com.", RecordType::A).await;
    assert_eq!(stale.rcode, ResponseCode::NoError);
    assert_eq!(stale.answers, vec!["short.example.com. 30 IN A 192.0.2.2"]);
    // Nothing cached: SERVFAIL.
    assert_eq!(
        udp(&c, "other.example.com.", RecordType::A).await.rcode,
        ResponseCode::ServFail
    );
    let m = c.server.metrics();
    assert_eq!(m.stale_served, 1);
    assert!(m.upstream_errors >= 2, "{m:?}");
}

#[tokio::test]
async fn sheds_load_past_the_in_flight_bound() {
    let c = start(|c| c.max_inflight = 1).await;
    c.upstream.down.store(true, SeqCst);
    // The first query holds the only slot while the upstream times out; the rest are refused.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..5 {
        let q = query_bytes(&format!("n{i}.example.com."), RecordType::A, None);
        sock.send_to(&q, c.server.udp_addr()).await.unwrap();
    }
    let mut refused = 0;
    let mut buf = vec![0u8; 4096];
    for _ in 0..5 {
        let Ok(Ok(n)) = timeout(WAIT, sock.recv(&mut buf)).await else {
            break;
        };
        let m = Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.response_code == ResponseCode::Refused {
            refused += 1;
        }
    }
    assert_eq!(refused, 4);
    assert_eq!(c.server.metrics().shed, 4);
}

#[tokio::test]
async fn malformed_packets_over_udp() {
    let c = start(|_| {}).await;
    let good = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    let formerr = decode(
        &udp_ask(c.server.udp_addr(), &good[..good.len() - 3])
            .await
            .unwrap(),
    );
    assert_eq!(formerr.rcode, ResponseCode::FormErr);
    // Too short for a header: no answer, counted.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&good[..5], c.server.udp_addr()).await.unwrap();
    let mut buf = [0u8; 512];
    assert!(timeout(Duration::from_millis(200), sock.recv(&mut buf))
        .await
        .is_err());
    assert_eq!(c.server.metrics().dropped, 1);
    // Unknown type in the zone: NODATA.
    assert_nodata(
        udp(
            &c,
            "web.shop.svc.cluster.local.",
            RecordType::Unknown(65280),
        )
        .await,
        SOA,
    );
}

#[tokio::test]
async fn external_name_is_chased_through_the_forwarder() {
    let c = start(|_| {}).await;
    let a = udp(&c, "ext.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert_eq!(
        a.answers,
        vec![
            "ext.shop.svc.cluster.local. 5 IN CNAME example.com.",
            "example.com. 300 IN A 192.0.2.1",
        ]
    );
    let q = query_bytes("ext.shop.svc.cluster.local.", RecordType::A, None);
    let over_tcp = decode(&tcp_ask(c.server.tcp_addr(), &q).await);
    assert_eq!(over_tcp.answers.len(), 2);
}
