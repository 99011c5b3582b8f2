//! A batch of UDP answers sent with one `sendmmsg` (one `send_to` when there is only one).

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::net::UdpSocket;

pub(crate) struct Batch {
    answers: Vec<Vec<u8>>,
    peers: Vec<SocketAddr>,
    len: usize,
}

impl Batch {
    pub(crate) fn new(capacity: usize) -> Self {
        Batch {
            answers: (0..capacity).map(|_| Vec::with_capacity(512)).collect(),
            peers: Vec::with_capacity(capacity),
            len: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Takes `answer` (the caller's buffer gets an empty one of the batch's back).
    pub(crate) fn push(&mut self, answer: &mut Vec<u8>, peer: SocketAddr) {
        if self.len == self.answers.len() {
            return;
        }
        std::mem::swap(&mut self.answers[self.len], answer);
        answer.clear();
        self.peers.push(peer);
        self.len += 1;
    }

    /// Sends every answer; returns how many went out (the batch is empty afterwards).
    pub(crate) async fn send(&mut self, socket: &UdpSocket) -> usize {
        let n = self.len;
        let sent = match n {
            0 => 0,
            1 => usize::from(
                socket
                    .send_to(&self.answers[0], self.peers[0])
                    .await
                    .is_ok(),
            ),
            _ => {
                let taken = self.sendmmsg(socket.as_raw_fd());
                // What the socket buffer did not take now goes one by one, waiting for room.
                let mut rest = 0;
                for i in taken..n {
                    if socket
                        .send_to(&self.answers[i], self.peers[i])
                        .await
                        .is_ok()
                    {
                        rest += 1;
                    }
                }
                taken + rest
            }
        };
        self.len = 0;
        self.peers.clear();
        sent
    }

    fn sendmmsg(&mut self, fd: std::os::fd::RawFd) -> usize {
        let n = self.len;
        let mut names: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            self.peers.iter().map(|p| sockaddr(*p)).collect();
        let mut iovs: Vec<libc::iovec> = self.answers[..n]
            .iter_mut()
            .map(|a| libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..n)
            .map(|i| {
                // SAFETY: plain C struct; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
                m.msg_hdr.msg_name = (&mut names[i].0 as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen = names[i].1;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `n` headers pointing at live buffers and addresses owned above.
        let sent =
            unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
        if sent < 0 {
            0
        } else {
            sent as usize
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain C struct; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch to peers of both families arrives whole, each answer at its own peer.
    #[tokio::test]
    async fn batch_reaches_each_peer() {
        let v4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let v6 = UdpSocket::bind("[::1]:0").await.unwrap();
        let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
        let mut batch = Batch::new(4);
        for i in 0..4u8 {
            batch.push(
                &mut vec![i; 10 + usize::from(i)],
                peer4.local_addr().unwrap(),
            );
        }
        // Full: a fifth is not taken.
        batch.push(&mut vec![9], peer4.local_addr().unwrap());
        assert_eq!(batch.len(), 4);
        assert_eq!(batch.send(&v4).await, 4);
        assert_eq!(batch.len(), 0);
        let mut buf = [0u8; 64];
        for i in 0..4u8 {
            let (n, from) = peer4.recv_from(&mut buf).await.unwrap();
            assert_eq!(from, v4.local_addr().unwrap());
            assert_eq!(&buf[..n], &vec![i; 10 + usize::from(i)][..]);
        }
        for i in 0..2u8 {
            batch.push(&mut vec![i + 100; 3], peer6.local_addr().unwrap());
        }
        assert_eq!(batch.send(&v6).await, 2);
        for i in 0..2u8 {
            let (n, _) = peer6.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i + 100; 3]);
        }
    }

    /// An answer that cannot be sent (an IPv6 peer from an IPv4 socket) is skipped; the rest go.
    #[tokio::test]
    async fn bad_peer_does_not_stop_the_batch() {
        let v4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = Batch::new(3);
        batch.push(&mut vec![1], peer.local_addr().unwrap());
        batch.push(&mut vec![2], "[::1]:53".parse().unwrap());
        batch.push(&mut vec![3], peer.local_addr().unwrap());
        assert_eq!(batch.send(&v4).await, 2);
        let mut buf = [0u8; 8];
        for want in [1u8, 3] {
            let (n, _) = peer.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[want]);
        }
    }
}
