//! The `fairlead-proxy` binary under bad input: garbage, half-open connections, a slow TLS
//! client, oversized headers and a slow HTTP client never stop it serving a good client or
//! grow its memory without bound; each is refused or timed out with a log line that says
//! why. Also the permissive mode: plaintext reaches the application without an identity.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fairlead_controller::{new_key_and_csr, Ca, SpiffeId};
use fairlead_proxy::http::{CLIENT_ID_HEADER, HEADER_READ_TIMEOUT};
use fairlead_proxy::inbound::HANDSHAKE_TIMEOUT;
use fairlead_proxy::outbound;
use fairlead_proxy::transparent::Dialer;
use fairlead_proxy::MeshTls;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

struct Files {
    dir: PathBuf,
    ca: Ca,
}

impl Files {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "fairlead-proxy-bad-input-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
        std::fs::write(dir.join("bundle.pem"), ca.cert_pem()).unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "catalog");
        let leaf = ca.issue(&csr, &id, Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join("chain.pem"), leaf.chain_pem).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        Self { dir, ca }
    }

    fn client(&self) -> MeshTls {
        support::identity(&self.ca, "shop", "cart")
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy process (killed by its own pid when dropped), with its stderr in a file.
struct Proxy {
    child: Child,
    inbound: SocketAddr,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(files: &Files, app: SocketAddr, mode: &str) -> Self {
        let inbound = free_port();
        let admin = free_port();
        let log = files.dir.join(format!("proxy-{mode}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_fairlead-proxy"))
            .args(["--cert", &files.path("chain.pem")])
            .args(["--key", &files.path("key.pem")])
            .args(["--bundle", &files.path("bundle.pem")])
            .args(["--inbound", &inbound.to_string()])
            .args(["--app", &app.to_string()])
            .args(["--mode", mode])
            .args(["--outbound", "none"])
            .args(["--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the proxy binary runs");
        let mut p = Proxy {
            child,
            inbound,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(admin).is_err() {
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "the proxy exited: {}",
                p.log()
            );
            assert!(Instant::now() < deadline, "the proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An HTTP/1.1 application answering with the identity header it got ("none" without).
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let id = support::client_id(req.headers());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// One request over mTLS as the client `cart`; the response head and body as text.
async fn good_request(files: &Files, proxy: SocketAddr, extra: &str) -> String {
    let mut tls = outbound::connect(&files.client(), proxy, vec![], &Dialer::here())
        .await
        .expect("mTLS to the proxy");
    let req = format!("GET / HTTP/1.1\r\nHost: catalog\r\n{extra}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn contains_within(p: &Proxy, needle: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if p.log().contains(needle) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_bad_clients_are_refused_or_timed_out_and_good_clients_still_served() {
    let files = Files::new("flood");
    let app = app().await;
    let mut proxy = Proxy::start(&files, app, "strict");
    let addr = proxy.inbound;
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));
    let rss_before = proxy.rss_kib();

    // 300 half-open connections that never say anything, 100 that send half a TLS record,
    // and 100 that send garbage.
    let mut held = Vec::new();
    for i in 0..500 {
        let mut s = TcpStream::connect(addr).unwrap();
        match i % 5 {
            0 => s
                .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                .unwrap(),
            1 => s.write_all(&[0x5a; 600]).unwrap(),
            _ => {}
        }
        held.push(s);
    }
    // A good client is served at once while they hang.
    let t = Instant::now();
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let rss_flood = proxy.rss_kib();
    // Garbage fails the handshake at once, with the reason in the log.
    assert!(
        contains_within(&proxy, "TLS handshake failed", Duration::from_secs(5)),
        "{}",
        proxy.log()
    );
    // The silent and the slow ones are cut off after the handshake timeout.
    assert!(
        contains_within(
            &proxy,
            "no TLS handshake within",
            HANDSHAKE_TIMEOUT + Duration::from_secs(5)
        ),
        "{}",
        proxy.log()
    );
    let closed = held
        .iter_mut()
        .map(|s| {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut rest = Vec::new();
            // Closed by the proxy: EOF (after a TLS alert for some), or a reset.
            match s.read_to_end(&mut rest) {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .filter(|closed| *closed)
        .count();
    assert_eq!(closed, 500, "every bad connection is closed by the proxy");
    drop(held);
    assert!(proxy.running());
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));
    // 500 bad connections cost little memory, and it does not stay.
    let rss_after = proxy.rss_kib();
    assert!(
        rss_flood < rss_before + 16 * 1024,
        "RSS {rss_before} KiB -> {rss_flood} KiB during the flood"
    );
    assert!(
        rss_after <= rss_flood + 1024,
        "RSS kept growing: {rss_flood} -> {rss_after} KiB"
    );
    eprintln!("RSS: {rss_before} KiB before, {rss_flood} during, {rss_after} after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_slow_clients_are_cut_off() {
    let files = Files::new("http");
    let app = app().await;
    let mut proxy = Proxy::start(&files, app, "strict");
    let addr = proxy.inbound;

    // 100 KiB of headers: refused with 431, and the next client is served.
    let big = format!("x-big: {}\r\n", "a".repeat(100 * 1024));
    let resp = good_request(&files, addr, &big).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.200}");
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));

    // A client that sends its headers one byte a second is cut off.
    let mut tls = outbound::connect(&files.client(), addr, vec![], &Dialer::here())
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: catalog\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let closed_after = loop {
        if tls.write_all(b"x").await.is_err() {
            break t.elapsed();
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break t.elapsed(),
            Ok(Ok(_)) => break t.elapsed(), // an error response, then the close
            Err(_) => {}
        }
        assert!(
            t.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(10),
            "a slow client was never cut off"
        );
    };
    assert!(closed_after >= HEADER_READ_TIMEOUT - Duration::from_secs(1));
    assert!(proxy.running());
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_passes_plaintext_without_an_identity() {
    let files = Files::new("permissive");
    let app = app().await;
    let proxy = Proxy::start(&files, app, "permissive");
    let addr = proxy.inbound;
    // mTLS clients still get their identity passed on.
    assert!(good_request(&files, addr, "")
        .await
        .ends_with("spiffe://cluster.local/ns/shop/sa/cart"));
    // A plaintext client reaches the application, and cannot claim an identity.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: catalog\r\n{CLIENT_ID_HEADER}: spiffe://cluster.local/ns/kube-system/sa/admin\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("none"), "{out}");
}
