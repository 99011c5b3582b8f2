//! The status socket, as the CNI plugin's STATUS verb talks to it.

use std::time::Duration;

use fairlead_agent::status::{query, Readiness, StatusError, StatusServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};

use crate::topology::TempDir;

#[tokio::test]
async fn answers_status_and_follows_readiness() {
    let dir = TempDir::new("status");
    let path = dir.0.join("run/agent.sock");
    let (tx, rx) = watch::channel(Readiness::not_ready("node node-1 has no podCIDRs yet"));
    let server = StatusServer::bind(&path, rx.clone()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));

    // A client that connects and says nothing does not hold others up.
    let _silent = UnixStream::connect(&path).await.unwrap();

    assert_eq!(
        query(&path).await.unwrap(),
        "NOTREADY node node-1 has no podCIDRs yet"
    );
    tx.send_replace(Readiness::Ready);
    assert_eq!(query(&path).await.unwrap(), "READY");
    tx.send_replace(Readiness::not_ready("applying routes failed:\nsomething"));
    assert_eq!(
        query(&path).await.unwrap(),
        "NOTREADY applying routes failed: something",
        "one line, always"
    );

    let mut raw = UnixStream::connect(&path).await.unwrap();
    raw.write_all(b"HELLO\n").await.unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("ERROR unknown request \"HELLO\""),
        "{answer}"
    );
    assert!(answer.ends_with('\n'));

    // A second agent on the same path is refused while the first one lives.
    let err = StatusServer::bind(&path, rx.clone()).err().expect("in use");
    assert!(matches!(err, StatusError::InUse { .. }), "{err}");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server stops")
        .unwrap();
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn replaces_a_stale_socket_but_not_a_file() {
    let dir = TempDir::new("status-stale");
    let path = dir.0.join("agent.sock");
    // What a killed agent leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (_tx, rx) = watch::channel(Readiness::Ready);
    let server = StatusServer::bind(&path, rx.clone()).expect("stale socket replaced");
    let task = tokio::spawn(server.serve(std::future::pending()));
    assert_eq!(query(&path).await.unwrap(), "READY");
    task.abort();

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let err = StatusServer::bind(&file, rx)
        .err()
        .expect("a regular file is kept");
    assert!(matches!(err, StatusError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}
