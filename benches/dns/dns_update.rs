//! How soon a change made through the API shows in the cluster DNS's answers (issue 6:
//! within 100 ms):
//!
//! ```text
//! cargo bench -p fairlead-dns --bench dns_update [-- --services 10000 --changes 300]
//! ```
//!
//! The production path, in one process: the embedded API server holding `--services`
//! ClusterIP Services in 50 namespaces and 50 headless Services with an EndpointSlice each;
//! `Server::bind_api` (the watchers `fairlead dns` runs) against it over HTTP with kube-rs.
//! Each change is written through the API with kube-rs, as a controller writes, and the
//! clock starts just before the write (so the write's own round trip is counted). A poller
//! then asks over UDP every millisecond until the answer is the new one. Three kinds of
//! change, in turn: a new Service (its A record appears), an EndpointSlice whose endpoint
//! moves (the headless name's A record changes), a Service deleted (NXDOMAIN). Reported: p50,
//! p99 and max per kind and overall, and how long the writes themselves took.
//!
//! No peer runs beside it: CoreDNS (the server this latency is usually asked of) is not
//! packaged by Debian and cannot be fetched here, and the other servers of `dns_qps` do not
//! watch an API server.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_dns::{Config, Server};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::net::UdpSocket;

const NAMESPACES: usize = 50;
const HEADLESS: usize = 50;
/// A change not seen after this long counts as failed (and fails the bench).
const GIVE_UP: Duration = Duration::from_secs(5);

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn service(ns: &str, name: &str, ip: Option<Ipv4Addr>) -> serde_json::Value {
    let ip = ip.map_or("None".to_owned(), |a| a.to_string());
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(ns: &str, svc: &str, ip: Ipv4Addr) -> serde_json::Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn ip(base: [u8; 2], i: usize) -> Ipv4Addr {
    // From x.y.1.1 (10.96.0.1 is the kubernetes Service).
    Ipv4Addr::new(base[0], base[1], (i / 250 + 1) as u8, (i % 250 + 1) as u8)
}

/// What the poller waits for.
#[derive(Clone, Copy)]
enum Want {
    A(Ipv4Addr),
    NxDomain,
}

async fn ask(sock: &UdpSocket, to: SocketAddr, name: &str) -> Option<Message> {
    let mut q = Message::query();
    q.metadata.id = 7;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    sock.send_to(&q.to_vec().unwrap(), to).await.ok()?;
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf[..n]).ok()
}

fn matches(m: &Message, want: Want) -> bool {
    match want {
        Want::NxDomain => m.metadata.response_code == ResponseCode::NXDomain,
        Want::A(addr) => {
            m.metadata.response_code == ResponseCode::NoError
                && m.answers.len() == 1
                && matches!(m.answers[0].data, RData::A(a) if a.0 == addr)
        }
    }
}

/// Polls every millisecond from `start` until `name` answers `want`.
async fn until(
    sock: &UdpSocket,
    to: SocketAddr,
    name: &str,
    want: Want,
    start: Instant,
) -> Duration {
    loop {
        if let Some(m) = ask(sock, to, name).await {
            if matches(&m, want) {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < GIVE_UP,
            "{name}: not updated after {GIVE_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn summary(label: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |p: f64| d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1];
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    format!(
        "| {label} | {} | {:.1} | {:.1} | {:.1} |",
        d.len(),
        ms(at(0.50)),
        ms(at(0.99)),
        ms(*d.last().unwrap())
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let services = arg("--services", 10_000);
    let changes = arg("--changes", 300);

    let api = ApiServer::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .expect("embedded API server");
    for n in 0..NAMESPACES {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{n}")}}))
            .unwrap();
    }
    for i in 0..services {
        api.create(service(
            &format!("ns-{}", i % NAMESPACES),
            &format!("svc-{i}"),
            Some(ip([10, 96], i)),
        ))
        .unwrap();
    }
    for h in 0..HEADLESS {
        let ns = format!("ns-{}", h % NAMESPACES);
        api.create(service(&ns, &format!("hl-{h}"), None)).unwrap();
        api.create(slice(&ns, &format!("hl-{h}"), ip([10, 244], h)))
            .unwrap();
    }
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let started = Instant::now();
    let server = Server::bind_api(config, client.clone())
        .await
        .expect("DNS binds");
    while !server.is_ready() {
        assert!(started.elapsed() < Duration::from_secs(60), "DNS not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{services} Services + {HEADLESS} headless ready after {:.2} s; {changes} changes",
        started.elapsed().as_secs_f64()
    );
    let to = server.udp_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    let (mut created, mut moved, mut deleted, mut writes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut live: Vec<(String, String)> = Vec::new();
    let post = PostParams::default();
    for i in 0..changes {
        let ns = format!("ns-{}", i % NAMESPACES);
        match i % 3 {
            0 => {
                let name = format!("new-{i}");
                let addr = ip([10, 97], i);
                let svc: corev1::Service =
                    serde_json::from_value(service(&ns, &name, Some(addr))).unwrap();
                let start = Instant::now();
                Api::<corev1::Service>::namespaced(client.clone(), &ns)
                    .create(&post, &svc)
                    .await
                    .unwrap();
                writes.push(start.elapsed());
                created.push(
                    until(
                        &sock,
                        to,
                        &format!("{name}.{ns}.svc.cluster.local"),
                        Want::A(addr),
                        start,
                    )
                    .await,
                );
                live.push((ns, name));
            }
            1 => {
                let h = i % HEADLESS;
                let ns = format!("ns-{}", h % NAMESPACES);
                let svc = format!("hl-{h}");
                let addr = ip([10, 245], i);
                let start = Instant::now();
                Api::<discoveryv1::EndpointSlice>::namespaced(client.clone(), &ns)
                    .patch(
                        &format!("{svc}-1"),
                        &PatchParams::default(),
                        &Patch::Merge(slice(&ns, &svc, addr)),
                    )
                    .await
                    .unwrap();
                writes.push(start.elapsed());
                moved.push(
                    until(
                        &sock,
                        to,
                        &format!("{svc}.{ns}.svc.cluster.local"),
                        Want::A(addr),
                        start,
                    )
                    .await,
                );
            }
            _ => {
                let Some((ns, name)) = live.pop() else {
                    continue;
                };
                let start = Instant::now();
                Api::<corev1::Service>::namespaced(client.clone(), &ns)
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                writes.push(start.elapsed());
                deleted.push(
                    until(
                        &sock,
                        to,
                        &format!("{name}.{ns}.svc.cluster.local"),
                        Want::NxDomain,
                        start,
                    )
                    .await,
                );
            }
        }
        // Changes a few milliseconds apart, not back to back.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all: Vec<Duration> = created
        .iter()
        .chain(&moved)
        .chain(&deleted)
        .copied()
        .collect();
    println!("\n| change | n | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|");
    println!("{}", summary("new Service (A appears)", created));
    println!(
        "{}",
        summary("EndpointSlice endpoint moves (headless A)", moved)
    );
    println!("{}", summary("Service deleted (NXDOMAIN)", deleted));
    println!("{}", summary("all changes", all.clone()));
    println!("{}", summary("(the API write alone)", writes));
    let mut sorted = all;
    sorted.sort();
    let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1];
    println!(
        "\ntarget (issue 6): visible within 100 ms: {} (p99 {:.1} ms, max {:.1} ms)",
        if *sorted.last().unwrap() < Duration::from_millis(100) {
            "met, every change"
        } else if p99 < Duration::from_millis(100) {
            "met at p99, not every change"
        } else {
            "MISSED"
        },
        p99.as_secs_f64() * 1e3,
        sorted.last().unwrap().as_secs_f64() * 1e3
    );
    drop(server);
    drop(api);
}
