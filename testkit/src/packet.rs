//! Ethernet frames built and checked by hand for BPF_PROG_TEST_RUN tests:
//! IPv4 or IPv6 with TCP or UDP, valid checksums on the way in, and every
//! checksum verified on the way out, so a program that rewrites addresses
//! and forgets a checksum fails the test.

use std::net::{IpAddr, SocketAddr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP or UDP packet in an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// TCP only.
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            proto: PROTO_TCP,
            flags,
            seq: 1000,
            ack: 0,
            payload: Vec::new(),
        }
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Self {
        Self {
            proto: PROTO_UDP,
            flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// The frame, with correct IP and L4 checksums.
    pub fn build(&self) -> Vec<u8> {
        let (src, dst) = (self.src.ip(), self.dst.ip());
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src.port().to_be_bytes());
        l4.extend_from_slice(&self.dst.port().to_be_bytes());
        let csum_at = if self.proto == PROTO_TCP {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.extend_from_slice(&[5 << 4, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
            16
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        let sum = match checksum(&[&pseudo(src, dst, self.proto, l4.len()), &l4]) {
            0 if self.proto == PROTO_UDP => 0xffff,
            s => s,
        };
        l4[csum_at..csum_at + 2].copy_from_slice(&sum.to_be_bytes());

        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0, 1, 0x40, 0, 64, self.proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let sum = checksum(&[&ip]);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[self.proto, 64]);
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
            }
            _ => panic!("source and destination must be one family"),
        }
        frame.extend_from_slice(&l4);
        frame
    }

    /// Parses a frame and checks its IPv4 header checksum and its TCP/UDP
    /// checksum; the error says which is wrong.
    pub fn parse(frame: &[u8]) -> Result<Self, String> {
        if frame.len() < 14 {
            return Err(format!(
                "frame of {} bytes has no Ethernet header",
                frame.len()
            ));
        }
        let mut dst_mac = [0; 6];
        let mut src_mac = [0; 6];
        dst_mac.copy_from_slice(&frame[0..6]);
        src_mac.copy_from_slice(&frame[6..12]);
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let ip = &frame[14..];
        let (src, dst, proto, l4) = match ethertype {
            ETH_P_IPV4 => {
                if ip.len() < 20 {
                    return Err("short IPv4 header".into());
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if checksum(&[&ip[..ihl]]) != 0 {
                    return Err("bad IPv4 header checksum".into());
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                if total > ip.len() {
                    return Err(format!("IPv4 total length {total} > {} bytes", ip.len()));
                }
                let s: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
                let d: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
                (IpAddr::from(s), IpAddr::from(d), ip[9], &ip[ihl..total])
            }
            ETH_P_IPV6 => {
                if ip.len() < 40 {
                    return Err("short IPv6 header".into());
                }
                let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
                let s: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
                let d: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
                (IpAddr::from(s), IpAddr::from(d), ip[6], &ip[40..40 + len])
            }
            other => return Err(format!("ethertype {other:#06x} is not IP")),
        };
        if checksum(&[&pseudo(src, dst, proto, l4.len()), l4]) != 0 {
            return Err(format!("bad L4 checksum (protocol {proto})"));
        }
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        let (flags, seq, ack, data) = if proto == PROTO_TCP {
            let off = usize::from(l4[12] >> 4) * 4;
            (
                l4[13],
                u32::from_be_bytes(l4[4..8].try_into().expect("4 bytes")),
                u32::from_be_bytes(l4[8..12].try_into().expect("4 bytes")),
                &l4[off..],
            )
        } else {
            (0, 0, 0, &l4[8..])
        };
        Ok(Self {
            src_mac,
            dst_mac,
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
            proto,
            flags,
            seq,
            ack,
            payload: data.to_vec(),
        })
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => {}
    }
    p
}

/// RFC 1071 one's-complement sum, folded and inverted.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP or ICMPv6 error, as [`parse_icmp_error`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub kind: u8,
    pub code: u8,
    /// The quoted packet (its IP header and what follows).
    pub quoted: Vec<u8>,
}

/// Parses an ICMP (IPv4) or ICMPv6 error frame, checking the IPv4 header
/// checksum and the ICMP checksum (with the pseudo header for ICMPv6).
pub fn parse_icmp_error(frame: &[u8]) -> Result<IcmpError, String> {
    if frame.len() < 14 + 40 {
        return Err(format!("frame of {} bytes is too short", frame.len()));
    }
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let ip = &frame[14..];
    let (src, dst, icmp) = match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IPV4 => {
            if checksum(&[&ip[..20]]) != 0 {
                return Err("bad IPv4 header checksum".into());
            }
            if ip[9] != 1 {
                return Err(format!("IPv4 protocol {} is not ICMP", ip[9]));
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let icmp = &ip[20..total.min(ip.len())];
            if checksum(&[icmp]) != 0 {
                return Err("bad ICMP checksum".into());
            }
            let s: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
            let d: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
            (IpAddr::from(s), IpAddr::from(d), icmp)
        }
        ETH_P_IPV6 => {
            if ip[6] != 58 {
                return Err(format!("IPv6 next header {} is not ICMPv6", ip[6]));
            }
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let d: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            let (src, dst) = (IpAddr::from(s), IpAddr::from(d));
            let icmp = &ip[40..(40 + len).min(ip.len())];
            if checksum(&[&pseudo(src, dst, 58, icmp.len()), icmp]) != 0 {
                return Err("bad ICMPv6 checksum".into());
            }
            (src, dst, icmp)
        }
        other => return Err(format!("ethertype {other:#06x} is not IP")),
    };
    Ok(IcmpError {
        src_mac,
        dst_mac,
        src,
        dst,
        kind: icmp[0],
        code: icmp[1],
        quoted: icmp[8..].to_vec(),
    })
}
