//! The admin HTTP server: `/metrics` counts exactly what was asked, `/ready` follows the first
//! complete snapshot, `/health` answers while the server serves, and all of it stops with the
//! server.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead_core::Snapshot;
use fairlead_dns::Server;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::net::{TcpStream, UdpSocket};

use crate::loopback::*;
use crate::support::*;

/// The exposition as `series -> value`, where a series is written as exposed
/// (`name{label="v",...}`). Checks the format on the way: every sample's metric has `# HELP`
/// and `# TYPE` lines before it, and every value is a number.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut typed = Vec::new();
    let mut helped = Vec::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.push(name.to_owned());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let metric = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                metric
                    .strip_suffix(s)
                    .filter(|f| typed.iter().any(|t| t == f))
            })
            .unwrap_or(metric);
        assert!(
            typed.iter().any(|t| t == family) && helped.iter().any(|h| h == family),
            "{metric} has no HELP/TYPE before it"
        );
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert!(
            out.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    out
}

async fn scrape(server: &Server) -> BTreeMap<String, f64> {
    let r = http_get(server.admin_addr().unwrap(), "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse(&r.body)
}

/// Scrapes until `done` holds (the latency of an answer is recorded just after it is sent, so
/// a client can be a moment ahead of the histogram), at most a few seconds.
async fn scrape_until(
    server: &Server,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(server).await;
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_exactly_what_was_asked() {
    // The first upstream never answers (a timeout each time), the second does.
    let dead = FakeDns::silent().await;
    let good = FakeDns::fixed(Ipv4Addr::new(192, 0, 2, 7), 300).await;
    let (mut server, _tx) = server(cluster(), |c| {
        c.upstreams = vec![dead.addr, good.addr];
        c.upstream_timeout_ms = 200;
    })
    .await;
    let admin = server
        .start_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(server.admin_addr(), Some(admin));

    let web = "web.shop.svc.cluster.local.";
    for _ in 0..3 {
        assert_eq!(udp(&server, web, RecordType::A).await.answers.len(), 1);
    }
    assert_eq!(udp(&server, web, RecordType::AAAA).await.answers.len(), 1);
    assert_eq!(
        udp(
            &server,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV
        )
        .await
        .answers
        .len(),
        1
    );
    assert_eq!(
        udp(&server, "nope.shop.svc.cluster.local.", RecordType::A)
            .await
            .rcode,
        ResponseCode::NXDomain
    );
    assert_eq!(tcp(&server, web, RecordType::A).await.answers.len(), 1);
    // Forwarded: a miss (the dead upstream times out, the good one answers), then a hit.
    for _ in 0..2 {
        let a = udp(&server, "example.org.", RecordType::A).await;
        assert_eq!(a.answers, vec!["example.org. 300 IN A 192.0.2.7"], "{a:?}");
    }
    // Too short for a header: dropped, not answered.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0, 1, 2], server.udp_addr()).await.unwrap();

    let m = scrape_until(&server, |m| {
        m.get("fairlead_dns_request_duration_seconds_count") == Some(&9.0)
            && m.get("fairlead_dns_dropped_total") == Some(&1.0)
    })
    .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(m.get(series), Some(&value), "{series} in {m:#?}");
    };
    expect("fairlead_dns_queries_total{type=\"A\"}", 7.0);
    expect("fairlead_dns_queries_total{type=\"AAAA\"}", 1.0);
    expect("fairlead_dns_queries_total{type=\"SRV\"}", 1.0);
    expect("fairlead_dns_queries_total{type=\"PTR\"}", 0.0);
    expect("fairlead_dns_queries_total{type=\"other\"}", 0.0);
    expect("fairlead_dns_responses_total{rcode=\"NOERROR\"}", 8.0);
    expect("fairlead_dns_responses_total{rcode=\"NXDOMAIN\"}", 1.0);
    expect("fairlead_dns_responses_total{rcode=\"SERVFAIL\"}", 0.0);
    expect("fairlead_dns_responses_total{rcode=\"REFUSED\"}", 0.0);
    expect("fairlead_dns_dropped_total", 1.0);
    expect("fairlead_dns_shed_total", 0.0);
    expect("fairlead_dns_cache_hits_total", 1.0);
    expect("fairlead_dns_cache_misses_total", 1.0);
    expect("fairlead_dns_cache_entries", 1.0);
    expect("fairlead_dns_cache_prefetches_total", 0.0);
    expect("fairlead_dns_forward_failures_total", 0.0);
    let up = |metric: &str, addr| format!("{metric}{{zone=\".\",upstream=\"{addr}\"}}");
    expect(&up("fairlead_dns_forward_requests_total", dead.addr), 1.0);
    expect(&up("fairlead_dns_forward_timeouts_total", dead.addr), 1.0);
    expect(&up("fairlead_dns_forward_errors_total", dead.addr), 0.0);
    expect(&up("fairlead_dns_forward_upstream_up", dead.addr), 0.0);
    expect(&up("fairlead_dns_forward_requests_total", good.addr), 1.0);
    expect(&up("fairlead_dns_forward_timeouts_total", good.addr), 0.0);
    expect(&up("fairlead_dns_forward_upstream_up", good.addr), 1.0);
    expect("fairlead_dns_inflight", 0.0);
    expect("fairlead_dns_inflight_limit", 1024.0);
    expect("fairlead_dns_ready", 1.0);
    expect(
        "fairlead_dns_snapshot_generation",
        server.applied_generation() as f64,
    );
    assert!(m["fairlead_dns_index_names"] > 10.0, "{m:#?}");
    assert!(m["process_resident_memory_bytes"] > 1e6, "{m:#?}");

    // The histogram: cumulative, +Inf equals the count, and the forwarded miss (over 200 ms
    // waiting for the dead upstream) is above the 0.1 s bucket while the rest are below.
    let bucket =
        |le: &str| m[&format!("fairlead_dns_request_duration_seconds_bucket{{le=\"{le}\"}}")];
    let les: Vec<&str> = m
        .keys()
        .filter_map(|k| k.strip_prefix("fairlead_dns_request_duration_seconds_bucket{le=\""))
        .map(|k| k.trim_end_matches("\"}"))
        .collect();
    assert_eq!(les.len(), 19, "{les:?}");
    let mut bounds: Vec<(f64, f64)> = les
        .iter()
        .map(|le| (le.parse::<f64>().unwrap_or(f64::INFINITY), bucket(le)))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(bounds.windows(2).all(|w| w[0].1 <= w[1].1), "{bounds:?}");
    assert_eq!(bucket("+Inf"), 9.0);
    assert_eq!(bucket("0.1"), 8.0);
    assert!(
        m["fairlead_dns_request_duration_seconds_sum"] >= 0.2,
        "{m:#?}"
    );
    assert_eq!(bounds[0].0, 1e-5);

    // The same counters through the library.
    let s = server.metrics();
    assert_eq!((s.queries("A"), s.responses(0), s.latency_count), (7, 8, 9));
    let dead_stats = s.upstream(".", dead.addr).unwrap();
    assert_eq!(
        (dead_stats.requests, dead_stats.timeouts, dead_stats.up),
        (1, 1, false)
    );
    assert_eq!(good.asked(), vec!["example.org."]);
}

#[tokio::test]
async fn ready_only_after_the_first_complete_snapshot_and_gone_with_the_server() {
    // Not ready: the API server has not listed the cluster yet.
    let (mut server, tx) = server(Snapshot::empty(), |_| {}).await;
    let admin = server
        .start_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = http_get(admin, "/ready").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .contains("waiting for the first complete list of the cluster"),
        "{r:?}"
    );
    assert!(!server.is_ready());
    let h = http_get(admin, "/health").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let m = scrape(&server).await;
    assert_eq!(m["fairlead_dns_ready"], 0.0);
    // Meanwhile cluster names are SERVFAIL, as /ready warned.
    assert_eq!(
        udp(&server, "web.shop.svc.cluster.local.", RecordType::A)
            .await
            .rcode,
        ResponseCode::ServFail
    );

    let mut snap = cluster();
    snap.generation = 42;
    tx.send(Arc::new(snap)).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut r = http_get(admin, "/ready").await;
    while r.status != 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        r = http_get(admin, "/ready").await;
    }
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "ready: cluster snapshot generation 42 applied\n")
    );
    assert!(server.is_ready());
    let m = scrape(&server).await;
    assert_eq!(m["fairlead_dns_ready"], 1.0);
    assert_eq!(m["fairlead_dns_snapshot_generation"], 42.0);
    assert_records(
        udp(&server, "web.shop.svc.cluster.local.", RecordType::A).await,
        vec!["web.shop.svc.cluster.local. 5 IN A 10.96.0.20"],
    );
    // A snapshot that is not ready again (a relist) does not take readiness back.
    tx.send(Arc::new(Snapshot::empty())).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http_get(admin, "/ready").await.status, 200);

    assert_eq!(http_get(admin, "/nope").await.status, 404);
    assert_eq!(http_get(admin, "/health").await.status, 200);

    // The admin server stops with the DNS server.
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "admin port still open after the server was dropped"
    );
}

#[tokio::test]
async fn admin_bind_errors_say_what_to_do() {
    let (mut first, _tx1) = server(cluster(), |_| {}).await;
    let taken = first
        .start_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (mut second, _tx2) = server(cluster(), |_| {}).await;
    let err = second.start_admin(taken).await.unwrap_err().to_string();
    assert!(
        err.contains(&taken.to_string()) && err.contains("FAIRLEAD_DNS_ADMIN_LISTEN"),
        "{err}"
    );
    assert_eq!(second.admin_addr(), None);
}
