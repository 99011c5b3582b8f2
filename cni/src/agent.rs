//! The plugin's side of the agent's node-local Unix socket: one request
//! line out, one answer line back, the whole exchange bounded in time.
//!
//! Three requests (the agent's `fairlead_agent::status` documents the server):
//! `STATUS` (answered `READY` or `NOTREADY <reason>`) for the STATUS verb,
//! `DELLINK <tombstone>` (answered `OK` once queued) for DEL's hand-off
//! of a tombstoned veth ([`crate::teardown`]), and `ATTACH <veth>`
//! (answered `OK` once the eBPF programs are on it) for ADD.
//!
//! The socket is connected non-blocking: a blocking connect to a Unix
//! socket whose listener has stopped accepting (a hung agent with a full
//! backlog) waits forever, and DEL must never wait on the agent for longer
//! than its bound.

use std::{
    io::{self, Read, Write},
    mem,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, net::UnixStream},
    },
    path::Path,
    time::{Duration, Instant},
};

/// `STATUS`: is the node ready for pods?
pub const STATUS: &str = "STATUS";
/// `DELLINK <name>`: delete this tombstone in the background.
pub const DELLINK: &str = "DELLINK";
/// `ATTACH <name>`: attach the datapath programs to this new host veth.
pub const ATTACH: &str = "ATTACH";
/// Longest answer line read.
const MAX_ANSWER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),

    #[error("cannot ask: {0}")]
    Send(#[source] io::Error),

    #[error("no answer within {0:?}")]
    Timeout(Duration),

    #[error("no answer: {0}")]
    Receive(#[source] io::Error),

    #[error("it closed the connection without answering")]
    Closed,
}

/// Sends `request` (one line, without its newline) to the agent at
/// `socket` and returns its answer line without the newline; connecting,
/// sending and receiving all together take at most `timeout`.
pub fn ask(socket: &Path, request: &str, timeout: Duration) -> Result<String, AgentError> {
    Connection::open(socket)?.ask(request, timeout)
}

/// A connection to the agent, for one request.
///
/// Opening it first and asking later is how DEL learns, for the cost of a
/// `connect(2)`, that no agent is there before it does any work that only
/// pays off with one.
pub struct Connection(UnixStream);

impl Connection {
    /// Connects without waiting: fails at once when nothing listens, and
    /// when the agent's backlog is full (EAGAIN).
    pub fn open(socket: &Path) -> Result<Connection, AgentError> {
        connect(socket).map(Connection).map_err(AgentError::Connect)
    }

    /// Sends `request` (one line, without its newline) and returns the
    /// answer line without the newline, within `timeout`.
    pub fn ask(self, request: &str, timeout: Duration) -> Result<String, AgentError> {
        let deadline = Instant::now() + timeout;
        let stream = self.0;
        // A few dozen bytes into an empty socket buffer: a non-blocking
        // write takes them all or fails, it does not wait.
        (&stream)
            .write_all(format!("{request}\n").as_bytes())
            .map_err(AgentError::Send)?;
        stream.set_nonblocking(false).map_err(AgentError::Receive)?;
        let mut answer = Vec::new();
        let mut buf = [0u8; MAX_ANSWER];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(AgentError::Receive)?;
            match (&stream).read(&mut buf) {
                Ok(0) if answer.is_empty() => return Err(AgentError::Closed),
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.contains(&b'\n') || answer.len() >= MAX_ANSWER {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(AgentError::Timeout(timeout))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(AgentError::Receive(e)),
            }
        }
        let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
        Ok(String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .to_owned())
    }
}

/// A non-blocking connect: with the listener's backlog full it fails with
/// EAGAIN at once instead of waiting.
fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    // One byte stays zero: the path's terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a Unix socket path must have 1 to {} bytes",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: connect(2) on our socket with a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::BufRead, os::unix::net::UnixListener, thread};

    fn temp_socket(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("fl-cni-agent-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s")
    }

    #[test]
    fn asks_and_reads_one_line() {
        let path = temp_socket("ok");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            io::BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(b"OK\nignored").unwrap();
            line
        });
        let answer = ask(&path, "DELLINK flz0123456789ab", Duration::from_secs(5)).unwrap();
        assert_eq!(answer, "OK");
        assert_eq!(server.join().unwrap(), "DELLINK flz0123456789ab\n");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_silent_agent_costs_at_most_the_timeout() {
        let path = temp_socket("silent");
        // Listening but never accepting: connect succeeds (the backlog
        // takes it) and nobody answers.
        let _listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let err = ask(&path, STATUS, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );

        let missing = path.with_file_name("missing");
        assert!(matches!(
            ask(&missing, STATUS, Duration::from_millis(50)),
            Err(AgentError::Connect(_))
        ));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
