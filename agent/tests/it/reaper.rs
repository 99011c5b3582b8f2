//! The link reaper behind `DELLINK`: it deletes tombstoned veths in a node namespace, only
//! those, including ones that were there before it started.

use std::time::Duration;

use fairlead_agent::reaper::{LinkReaper, ReaperError, SubmitError};
use fairlead_agent::status::{request, Readiness, StatusServer};
use fairlead_agent::{NetnsError, RootNetns};
use fairlead_testkit::Netns;
use tokio::sync::watch;

use crate::topology::{wait_until, TempDir};

const LEFTOVER: &str = "flz00000000000a";
const QUEUED: &str = "flz0123456789ab";

/// A veth pair `name` <-> `peer` inside `ns`.
fn veth(ns: &Netns, name: &str, peer: &str) {
    ns.ip(&["link", "add", name, "type", "veth", "peer", "name", peer])
        .unwrap();
}

fn has(ns: &Netns, name: &str) -> bool {
    ns.links().unwrap().iter().any(|l| l == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dellink_deletes_tombstones_and_nothing_else() {
    let node = Netns::new().expect("node namespace");
    // A tombstone from before the agent started, and interfaces that are not ours to delete,
    // one of which looks almost like a tombstone.
    veth(&node, LEFTOVER, "leftover-peer");
    veth(&node, "keep0", "keep0-peer");
    veth(&node, "flz0123456789a", "keep1-peer");
    veth(&node, QUEUED, "queued-peer");

    let path = node.path();
    let reaper = tokio::task::spawn_blocking(move || LinkReaper::start(&path, RootNetns::Refuse))
        .await
        .unwrap()
        .expect("reaper starts");
    let dir = TempDir::new("reaper");
    let socket = dir.0.join("agent.sock");
    let (_ready, readiness) = watch::channel(Readiness::Ready);
    let server = StatusServer::bind(&socket, readiness)
        .unwrap()
        .with_reaper(reaper.clone());
    let task = tokio::spawn(server.serve(std::future::pending()));

    // The start-up sweep takes the leftover, by itself.
    tokio::task::block_in_place(|| {
        wait_until(
            "the leftover tombstone is gone",
            Duration::from_secs(5),
            || !has(&node, LEFTOVER),
        )
    });

    // Only tombstone names are accepted; the rest is refused without touching anything.
    for refused in [
        "DELLINK keep0",
        "DELLINK flz0123456789a",
        "DELLINK fl0123456789a",
        "DELLINK",
        "DELLINK ../../flz0123456789ab",
    ] {
        assert_eq!(
            request(&socket, refused).await.unwrap(),
            "ERROR not a fairlead tombstone",
            "{refused}"
        );
    }
    // STATUS still answers as before.
    assert_eq!(request(&socket, "STATUS").await.unwrap(), "READY");

    assert_eq!(
        request(&socket, &format!("DELLINK {QUEUED}"))
            .await
            .unwrap(),
        "OK"
    );
    assert!(reaper.idle(Duration::from_secs(5)).await, "queue drained");
    assert!(!has(&node, QUEUED), "the queued tombstone is deleted");
    assert!(!has(&node, "queued-peer"), "with its peer");
    // Asking again for one that is gone is fine: it is what the asker wants.
    assert_eq!(
        request(&socket, &format!("DELLINK {QUEUED}"))
            .await
            .unwrap(),
        "OK"
    );
    assert!(reaper.idle(Duration::from_secs(5)).await);
    for kept in ["keep0", "keep0-peer", "flz0123456789a", "keep1-peer", "lo"] {
        assert!(has(&node, kept), "{kept} was deleted");
    }
    assert_eq!(reaper.submit("eth0"), Err(SubmitError::NotATombstone));
    task.abort();
}

#[tokio::test]
async fn dellink_without_a_reaper_tells_the_plugin_to_do_it_itself() {
    let dir = TempDir::new("no-reaper");
    let socket = dir.0.join("agent.sock");
    let (_ready, readiness) = watch::channel(Readiness::Ready);
    let server = StatusServer::bind(&socket, readiness).unwrap();
    let task = tokio::spawn(server.serve(std::future::pending()));
    let answer = request(&socket, &format!("DELLINK {QUEUED}"))
        .await
        .unwrap();
    assert!(answer.starts_with("ERROR "), "{answer}");
    task.abort();
}

#[test]
fn the_reaper_refuses_the_root_namespace() {
    // Refused on open, before any socket exists, so this cannot change anything.
    let err = LinkReaper::start("/proc/self/ns/net".as_ref(), RootNetns::Refuse)
        .err()
        .expect("the root namespace must be refused");
    assert!(
        matches!(err, ReaperError::Netns(NetnsError::Root { .. })),
        "{err}"
    );
}
