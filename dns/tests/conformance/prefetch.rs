//! Prefetch: a popular cached answer asked in the tail of its TTL is refreshed from upstream in
//! the background, so clients keep getting cached answers and never wait for a miss; one
//! refresh per name at a time, each holding an in-flight slot. TTLs of 1-2 s keep these tests
//! to about two seconds each.

use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::time::{sleep, sleep_until, Instant};

use crate::loopback::*;
use crate::support::*;

const WINDOW_MISSED: &str = "the test fell out of its timing window (machine too busy?)";

fn ip(last: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last as u8)
}

#[tokio::test]
async fn popular_names_are_refreshed_before_they_expire() {
    // Each answer carries how many times the upstream was asked that name.
    let upstream = FakeDns::start(|name, nth| match name {
        "pop.example." => Some(Reply::a(ip(nth), 2)),
        "rare.example." => Some(Reply::a(ip(100 + nth), 2)),
        "early.example." => Some(Reply::a(ip(200 + nth), 2)),
        _ => Some(Reply::NxDomain),
    })
    .await;
    // Asked at least 3 times, refreshed in the last 25% of the TTL: from 1.5 s of 2 s.
    let (server, _tx) = server(cluster(), |c| {
        c.upstreams = vec![upstream.addr];
        c.prefetch_amount = 3;
        c.prefetch_percent = 25;
    })
    .await;
    let ask = |name: &'static str| udp(&server, name, RecordType::A);

    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(
            ask("pop.example.").await.answers,
            ["pop.example. 2 IN A 192.0.2.1"]
        );
    }
    ask("rare.example.").await;
    for _ in 0..3 {
        ask("early.example.").await;
    }
    // Popular, but asked before the tail of its TTL: no refresh.
    sleep_until(t0 + Duration::from_millis(1000)).await;
    ask("early.example.").await;
    // In the tail: pop (popular) is refreshed, rare (asked twice in all) is not. Both are
    // answered from the cache at once.
    sleep_until(t0 + Duration::from_millis(1600)).await;
    assert_eq!(
        ask("pop.example.").await.answers,
        ["pop.example. 1 IN A 192.0.2.1"]
    );
    assert_eq!(
        ask("rare.example.").await.answers,
        ["rare.example. 1 IN A 192.0.2.101"]
    );
    while upstream.count("pop.example.") < 2 {
        assert!(
            t0.elapsed() < Duration::from_millis(1950),
            "no refresh of pop.example before it expired; upstream saw {:?}",
            upstream.asked()
        );
        sleep(Duration::from_millis(5)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_millis(1950),
        "{WINDOW_MISSED}"
    );
    assert_eq!(upstream.count("rare.example."), 1);
    assert_eq!(upstream.count("early.example."), 1);

    // Past the first answers' expiry: pop is the refreshed answer, from the cache; the
    // others are asked upstream again.
    sleep_until(t0 + Duration::from_millis(2300)).await;
    let pop = ask("pop.example.").await;
    assert_eq!(pop.rcode, ResponseCode::NoError);
    assert_eq!(pop.answers.len(), 1, "{pop:?}");
    assert!(pop.answers[0].ends_with("IN A 192.0.2.2"), "{pop:?}");
    assert_eq!(
        ask("rare.example.").await.answers,
        ["rare.example. 2 IN A 192.0.2.102"]
    );
    ask("early.example.").await;
    assert_eq!(
        upstream.asked(),
        [
            "pop.example.",
            "rare.example.",
            "early.example.",
            "pop.example.",
            "rare.example.",
            "early.example."
        ]
    );
    let m = server.metrics();
    assert_eq!((m.prefetches, m.prefetch_failures), (1, 0), "{m:?}");
    // Misses: pop once (the first query ever), rare and early twice each.
    assert_eq!((m.cache_hits, m.cache_misses), (8, 5), "{m:?}");
}

#[tokio::test]
async fn one_refresh_per_name_at_a_time_holding_an_in_flight_slot() {
    // Refreshes of slow.example take 700 ms to answer.
    let upstream = FakeDns::start(|name, nth| match name {
        "slow.example." if nth == 1 => Some(Reply::a(ip(1), 2)),
        "slow.example." => Some(Reply::A {
            ip: ip(nth),
            ttl: 2,
            delay: Duration::from_millis(700),
        }),
        _ => Some(Reply::a(Ipv4Addr::new(198, 51, 100, 1), 60)),
    })
    .await;
    // One forwarded query in flight at most; refresh from 1.0 s of 2 s.
    let (server, _tx) = server(cluster(), |c| {
        c.upstreams = vec![upstream.addr];
        c.upstream_timeout_ms = 2000;
        c.max_inflight = 1;
        c.prefetch_amount = 2;
        c.prefetch_percent = 50;
    })
    .await;
    let ask = |name: &'static str| udp(&server, name, RecordType::A);

    let t0 = Instant::now();
    ask("slow.example.").await;
    ask("slow.example.").await;
    sleep_until(t0 + Duration::from_millis(1100)).await;
    // Every query in the tail is answered from the cache; only the first starts a refresh.
    for _ in 0..5 {
        assert_eq!(
            ask("slow.example.").await.answers,
            ["slow.example. 1 IN A 192.0.2.1"]
        );
    }
    while upstream.count("slow.example.") < 2 {
        assert!(
            t0.elapsed() < Duration::from_millis(1700),
            "{WINDOW_MISSED}"
        );
        sleep(Duration::from_millis(5)).await;
    }
    // The refresh holds the only in-flight slot: a query to forward is shed.
    assert_eq!(ask("other.example.").await.rcode, ResponseCode::Refused);
    assert!(
        t0.elapsed() < Duration::from_millis(1750),
        "{WINDOW_MISSED}"
    );
    // The refreshed answer replaces the old one before it expires.
    loop {
        let a = ask("slow.example.").await;
        assert_eq!(a.rcode, ResponseCode::NoError, "{a:?}");
        if a.answers[0].ends_with("192.0.2.2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(2000),
            "refresh not applied before expiry: {a:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // The slot is free again.
    assert_eq!(
        ask("other.example.").await.answers,
        ["other.example. 60 IN A 198.51.100.1"]
    );
    assert_eq!(upstream.count("slow.example."), 2, "{:?}", upstream.asked());
    let m = server.metrics();
    // Misses: slow.example once, other.example twice (shed, then fetched).
    assert_eq!((m.prefetches, m.shed, m.cache_misses), (1, 1, 3), "{m:?}");
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_cached_answer() {
    // The upstream answers once (TTL 1 s), then never again.
    let upstream = FakeDns::start(|_, nth| (nth == 1).then(|| Reply::a(ip(1), 1))).await;
    let (server, _tx) = server(cluster(), |c| {
        c.upstreams = vec![upstream.addr];
        c.upstream_timeout_ms = 150;
        c.prefetch_amount = 1;
        c.prefetch_percent = 50;
    })
    .await;
    let t0 = Instant::now();
    let a = udp(&server, "flaky.example.", RecordType::A).await;
    assert_eq!(a.answers, ["flaky.example. 1 IN A 192.0.2.1"]);
    sleep_until(t0 + Duration::from_millis(550)).await;
    // Due: refreshed in the background (the upstream stays silent); answered from the cache.
    let a = udp(&server, "flaky.example.", RecordType::A).await;
    assert_eq!(a.answers, ["flaky.example. 1 IN A 192.0.2.1"]);
    while server.metrics().prefetch_failures < 1 {
        assert!(t0.elapsed() < Duration::from_millis(950), "{WINDOW_MISSED}");
        sleep(Duration::from_millis(10)).await;
    }
    // Still cached after the failure, and then served stale past expiry: never a SERVFAIL.
    let a = udp(&server, "flaky.example.", RecordType::A).await;
    assert_eq!(a.answers, ["flaky.example. 1 IN A 192.0.2.1"]);
    sleep_until(t0 + Duration::from_millis(1200)).await;
    let a = udp(&server, "flaky.example.", RecordType::A).await;
    assert_eq!(a.answers, ["flaky.example. 30 IN A 192.0.2.1"]);
    let m = server.metrics();
    assert_eq!(m.prefetches, m.prefetch_failures, "{m:?}");
    assert!((1..=2).contains(&m.prefetches), "{m:?}");
    assert_eq!(m.stale_served, 1, "{m:?}");
}
