//! Transparent interception in real network namespaces with real nftables rules: an
//! application in the client "pod" connects to the server pod's address in plain text; its
//! proxy intercepts, originates mTLS; the server pod's proxy intercepts the inbound side,
//! verifies the client and hands an HTTP request with the client's identity to the app on
//! localhost. A client without a proxy is refused by the strict server; a destination
//! outside the mesh is reached in the clear. Needs root.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fairlead_controller::{Ca, SpiffeId};
use fairlead_proxy::admin::Metrics;
use fairlead_proxy::inbound::{self, AppTarget, Authorization};
use fairlead_proxy::outbound::{self, Route};
use fairlead_proxy::rotation::CredentialStore;
use fairlead_proxy::transparent::{nft_ruleset, Dialer, INBOUND_PORT, OUTBOUND_PORT};
use fairlead_proxy::PeerId;
use fairlead_testkit::{require_root, Netns, Veth};

mod support;
use support::identity;

fn nft(ns: &Netns, ruleset: &str) {
    let mut cmd = ns.command("nft").unwrap();
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f failed");
}

/// A tiny HTTP/1.1 app on 0.0.0.0:8080 in `ns` answering with the identity header it got.
fn http_app(ns: &Netns) {
    let listener = ns
        .run_in(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().take(16) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let id = req
                .lines()
                .find_map(|l| l.strip_prefix("x-fairlead-client-id: "))
                .unwrap_or("none")
                .trim()
                .to_owned();
            let body = format!("id={id}");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

fn get(ns: &Netns, to: SocketAddr) -> Result<String, String> {
    ns.run_in(move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: server\r\nx-fairlead-client-id: forged\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read: {e}"))?;
        Ok(out)
    })
    .map_err(|e| e.to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_plaintext_becomes_mtls_with_identity() {
    require_root().unwrap();
    let (client, server, plain) = (
        Netns::new().unwrap(),
        Netns::new().unwrap(),
        Netns::new().unwrap(),
    );
    let to_server = Veth::new(&client, "c0", &server, "s0").unwrap();
    let to_plain = Veth::new(&client, "c1", &plain, "p0").unwrap();
    for (ns, ifname, cidr) in [
        (&client, to_server.ifname(), "10.1.0.1/24"),
        (&server, to_server.peer_ifname(), "10.1.0.2/24"),
        (&client, to_plain.ifname(), "10.2.0.1/24"),
        (&plain, to_plain.peer_ifname(), "10.2.0.2/24"),
    ] {
        ns.add_addr(ifname, cidr).unwrap();
        ns.link_up(ifname).unwrap();
        ns.link_up("lo").unwrap();
    }
    let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
    let server_id = PeerId(SpiffeId::new("cluster.local", "shop", "catalog").uri());

    // The server pod: its app, its inbound proxy, its rules.
    http_app(&server);
    let inbound_listener = server
        .run_in(|| {
            let l = std::net::TcpListener::bind(("0.0.0.0", INBOUND_PORT))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    tokio::spawn(inbound::serve(
        tokio::net::TcpListener::from_std(inbound_listener).unwrap(),
        CredentialStore::new(identity(&ca, "shop", "catalog")).unwrap(),
        AppTarget::OriginalPort,
        Authorization::TrustDomain,
        Arc::new(|_| {}),
        Metrics::new(),
        // The proxy reaches the app from inside the server pod's namespace.
        Dialer::in_netns(std::fs::File::open(server.path()).unwrap()).unwrap(),
    ));
    nft(&server, &nft_ruleset(&[]));

    // The client pod: its outbound proxy and rules; 10.1.0.2 is meshed, the rest is not.
    let outbound_listener = client
        .run_in(|| {
            let l = std::net::TcpListener::bind(("0.0.0.0", OUTBOUND_PORT))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    let expected = server_id.clone();
    let metrics = Metrics::new();
    tokio::spawn(outbound::serve_transparent(
        tokio::net::TcpListener::from_std(outbound_listener).unwrap(),
        CredentialStore::new(identity(&ca, "shop", "cart")).unwrap(),
        Arc::new(move |orig: SocketAddr| {
            if orig.ip().to_string() == "10.1.0.2" {
                Route::Mesh {
                    endpoint: orig,
                    expected: vec![expected.clone()],
                }
            } else {
                Route::Passthrough
            }
        }),
        Arc::clone(&metrics),
        Dialer::in_netns(std::fs::File::open(client.path()).unwrap()).unwrap(),
    ));
    nft(&client, &nft_ruleset(&[]));

    let server_addr: SocketAddr = "10.1.0.2:8080".parse().unwrap();
    let answer = tokio::task::block_in_place(|| get(&client, server_addr)).unwrap();
    assert!(
        answer.ends_with("id=spiffe://cluster.local/ns/shop/sa/cart"),
        "the app sees the verified client, not the forged header: {answer}"
    );
    assert!(
        metrics.get(
            "fairlead_proxy_outbound_connections_total",
            "server=\"spiffe://cluster.local/ns/shop/sa/catalog\",destination=\"10.1.0.2:8080\""
        ) >= 1
    );

    // A destination outside the mesh is reached in the clear (an echo with no proxy).
    let echo = plain
        .run_in(|| std::net::TcpListener::bind("0.0.0.0:9000"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo.accept() {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = s.write_all(&buf[..n]);
        }
    });
    let echoed = tokio::task::block_in_place(|| {
        client
            .run_in(|| {
                let mut s = std::net::TcpStream::connect_timeout(
                    &"10.2.0.2:9000".parse().unwrap(),
                    Duration::from_secs(3),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"outside")?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf)?;
                Ok::<_, std::io::Error>(buf)
            })
            .unwrap()
    })
    .expect("passthrough works");
    assert_eq!(&echoed, b"outside");

    // A client without a proxy (a marked socket skips the client's own interception):
    // the server's inbound proxy wants TLS and refuses the plaintext.
    let refused = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dialer = Dialer::in_netns(std::fs::File::open(client.path())?)?;
        let mut s = dialer.connect(server_addr, true).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: server\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    }
    .await;
    assert!(
        refused.as_ref().map_or(true, |r| !r.contains("id=")),
        "plaintext reached the app: {refused:?}"
    );
}
