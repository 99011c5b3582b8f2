//! Protocol detection and HTTP on the inbound path. After the mTLS handshake the proxy looks
//! at the first bytes, waiting a bounded time: the HTTP/2 connection preface (HTTP/2 and
//! gRPC, or ALPN `h2`) or an HTTP/1 request line are served as HTTP, with the client's
//! verified identity added to every request as [`CLIENT_ID_HEADER`] (any value the client
//! sent is replaced, so it cannot be forged); anything else, and a client that says nothing
//! within the wait (a server-speaks-first protocol), is forwarded as opaque TCP.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;

/// The header that carries the client's SPIFFE ID to the application.
pub const CLIENT_ID_HEADER: &str = "x-fairlead-client-id";
/// How long a client may take to send a request's headers (slow clients are cut off).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most header bytes a request may carry (HTTP/1.1: answered 431; HTTP/2: refused).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long detection waits for the client's first bytes.
pub const DETECT_WAIT: Duration = Duration::from_millis(300);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// Reads the first bytes (at most 24, within `wait`) and names the protocol; the bytes read
/// are returned to be replayed.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    alpn_h2: bool,
    wait: Duration,
) -> io::Result<(Protocol, Vec<u8>)> {
    if alpn_h2 {
        return Ok((Protocol::Http2, Vec::new()));
    }
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let known = classify(&buf);
        if known != Undecided::More {
            return Ok((known.protocol(), buf));
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
            // Silent client: the server speaks first.
            Err(_) => return Ok((Protocol::Opaque, buf)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undecided {
    More,
    Is(Protocol),
}

impl Undecided {
    fn protocol(self) -> Protocol {
        match self {
            Undecided::Is(p) => p,
            Undecided::More => Protocol::Opaque,
        }
    }
}

fn classify(buf: &[u8]) -> Undecided {
    if buf.is_empty() {
        return Undecided::More;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Undecided::Is(Protocol::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Undecided::Is(Protocol::Http1);
    }
    let could_be = H2_PREFACE.starts_with(buf)
        || METHODS
            .iter()
            .any(|m| m.starts_with(&buf[..buf.len().min(m.len())]) && buf.len() < m.len());
    if could_be {
        Undecided::More
    } else {
        Undecided::Is(Protocol::Opaque)
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP on `downstream`, forwarding every request to `app` over one connection of
/// the same HTTP version, with the client identity header set to `client_id` (removed
/// when there is none: a plaintext client in permissive mode cannot claim one).
pub async fn serve<S>(
    downstream: S,
    protocol: Protocol,
    app: SocketAddr,
    client_id: Option<String>,
    dialer: &crate::transparent::Dialer,
    stats: Arc<crate::admin::RequestStats>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upstream = dialer
        .connect(app, false)
        .await
        .map_err(|e| format!("the application at {app} is not reachable: {e}"))?;
    let id = Arc::new(
        client_id
            .map(|c| hyper::header::HeaderValue::from_str(&c))
            .transpose()
            .map_err(|e| format!("client identity is not a header value: {e}"))?,
    );
    match protocol {
        Protocol::Http2 => {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await
                    .map_err(|e| format!("HTTP/2 to the application: {e}"))?;
            tokio::spawn(conn);
            let svc = service_fn(move |req: Request<Incoming>| {
                let (mut sender, id, stats) = (sender.clone(), Arc::clone(&id), Arc::clone(&stats));
                async move { timed(&stats, sender.send_request(with_identity(req, &id))).await }
            });
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(TokioIo::new(downstream), svc)
                .await
                .map_err(|e| format!("HTTP/2 from the client: {e}"))
        }
        _ => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(|e| format!("HTTP/1.1 to the application: {e}"))?;
            tokio::spawn(conn);
            let sender = Arc::new(Mutex::new(sender));
            let svc = service_fn(move |req: Request<Incoming>| {
                let (sender, id, stats) =
                    (Arc::clone(&sender), Arc::clone(&id), Arc::clone(&stats));
                async move {
                    timed(&stats, async {
                        let mut sender = sender.lock().await;
                        sender.ready().await?;
                        sender.send_request(with_identity(req, &id)).await
                    })
                    .await
                }
            });
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                // Over TLS one flat write beats a vectored one (hyper's advice).
                .writev(false)
                .serve_connection(TokioIo::new(downstream), svc)
                .await
                .map_err(|e| format!("HTTP/1.1 from the client: {e}"))
        }
    }
}

/// Runs one request, recording its status (or failure) and the time to its response's
/// headers.
async fn timed<B>(
    stats: &crate::admin::RequestStats,
    request: impl std::future::Future<Output = hyper::Result<hyper::Response<B>>>,
) -> hyper::Result<hyper::Response<B>> {
    let start = std::time::Instant::now();
    let result = request.await;
    match &result {
        Ok(resp) => stats.answered(resp.status().as_u16(), start.elapsed()),
        Err(_) => stats.failed(start.elapsed()),
    }
    result
}

fn with_identity(
    mut req: Request<Incoming>,
    id: &Option<hyper::header::HeaderValue>,
) -> Request<Incoming> {
    match id {
        Some(id) => req.headers_mut().insert(CLIENT_ID_HEADER, id.clone()),
        None => req.headers_mut().remove(CLIENT_ID_HEADER),
    };
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detection() {
        for (input, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Protocol::Http1),
            (b"POST /x HTTP/1.1\r\n", Protocol::Http1),
            (H2_PREFACE, Protocol::Http2),
            (b"\x16\x03\x01\x00", Protocol::Opaque),
            (b"hello mesh", Protocol::Opaque),
            (b"GETX", Protocol::Opaque),
        ] {
            let mut r: &[u8] = input;
            let (p, read) = detect(&mut r, false, Duration::from_millis(50))
                .await
                .unwrap();
            assert_eq!(p, want, "{:?}", String::from_utf8_lossy(input));
            assert!(input.starts_with(&read));
        }
        // A silent client: opaque after the wait (a server-speaks-first protocol).
        let (mut a, _b) = tokio::io::duplex(64);
        let (p, read) = detect(&mut a, false, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!((p, read.len()), (Protocol::Opaque, 0));
    }
}
