//! Tier 2: the ifstats programs on crafted packets with BPF_PROG_TEST_RUN.
//! No topology: the kernel runs each frame as if it came through the
//! loopback device of this process's namespace. Needs root; fails without.

use fairlead_ebpf::{Counter, Direction, IfCounters, IfStats, TC_ACT_OK};
use fairlead_testkit::{require_root, unique_instance};

/// The kernel's LOOPBACK_IFINDEX: BPF_PROG_TEST_RUN puts `lo` in skb->dev.
const LOOPBACK_IFINDEX: u32 = 1;

#[test]
fn ingress_counts_crafted_ipv4_and_ipv6_frames_and_passes_them() -> anyhow::Result<()> {
    require_root()?;
    let stats = IfStats::load(&unique_instance())?;
    assert_eq!(stats.counters(LOOPBACK_IFINDEX)?, IfCounters::default());

    let v4 = packets::udp4(
        [10, 244, 0, 1],
        [10, 244, 0, 2],
        40000,
        53,
        b"fairlead ipv4 test payload",
    );
    let out = stats.test_run(Direction::Ingress, &v4)?;
    assert_eq!(out.return_value, TC_ACT_OK, "counting must pass the packet");
    assert_eq!(out.data, v4, "counting must not change the packet");
    assert_eq!(
        stats.counters(LOOPBACK_IFINDEX)?,
        IfCounters {
            ingress: Counter {
                packets: 1,
                bytes: v4.len() as u64
            },
            egress: Counter::default(),
        }
    );

    let v6 = packets::udp6(
        [0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1],
        [0xfd00, 0x10, 0x244, 0, 0, 0, 0, 2],
        40000,
        53,
        b"fairlead ipv6 test payload, a little longer",
    );
    let out = stats.test_run(Direction::Ingress, &v6)?;
    assert_eq!(out.return_value, TC_ACT_OK);
    assert_eq!(out.data, v6);
    assert_eq!(
        stats.counters(LOOPBACK_IFINDEX)?,
        IfCounters {
            ingress: Counter {
                packets: 2,
                bytes: (v4.len() + v6.len()) as u64
            },
            egress: Counter::default(),
        }
    );
    // Only the interface the frames came through has an entry.
    assert_eq!(
        stats.all_counters()?.keys().copied().collect::<Vec<_>>(),
        vec![LOOPBACK_IFINDEX]
    );

    let pin_dir = stats.pin_dir().to_owned();
    stats.close()?;
    assert!(!pin_dir.exists(), "close must remove {}", pin_dir.display());
    Ok(())
}

#[test]
fn egress_counts_separately_and_passes() -> anyhow::Result<()> {
    require_root()?;
    let stats = IfStats::load(&unique_instance())?;
    let v4 = packets::udp4([10, 244, 0, 2], [10, 244, 0, 1], 53, 40000, &[0xab; 100]);
    for _ in 0..3 {
        let out = stats.test_run(Direction::Egress, &v4)?;
        assert_eq!(out.return_value, TC_ACT_OK);
        assert_eq!(out.data, v4);
    }
    let counters = stats.counters(LOOPBACK_IFINDEX)?;
    assert_eq!(
        counters.egress,
        Counter {
            packets: 3,
            bytes: 3 * v4.len() as u64
        }
    );
    assert_eq!(counters.ingress, Counter::default());
    Ok(())
}

/// Frames built by hand, with valid checksums, so the programs see what a
/// real NIC would hand them.
mod packets {
    const ETH_P_IPV4: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPPROTO_UDP: u8 = 17;
    const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(14 + payload.len());
        frame.extend_from_slice(&DST_MAC);
        frame.extend_from_slice(&SRC_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// RFC 1071 one's-complement sum, folded.
    fn checksum(chunks: &[&[u8]]) -> u16 {
        let mut sum = 0u32;
        for chunk in chunks {
            for pair in chunk.chunks(2) {
                let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
                sum += u32::from(word);
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn udp(src_port: u16, dst_port: u16, payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let mut udp = Vec::with_capacity(len as usize);
        udp.extend_from_slice(&src_port.to_be_bytes());
        udp.extend_from_slice(&dst_port.to_be_bytes());
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let sum = match checksum(&[pseudo, &udp]) {
            0 => 0xffff, // 0 means "no checksum" in UDP
            sum => sum,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        udp
    }

    pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let udp_len = (8 + payload.len()) as u16;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&udp_len.to_be_bytes());
        let udp = udp(sport, dport, payload, &pseudo);

        let total = (20 + udp.len()) as u16;
        let mut ip = vec![0x45, 0]; // version 4, IHL 5; DSCP 0
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 1, 0x40, 0]); // id 1, don't fragment
        ip.extend_from_slice(&[64, IPPROTO_UDP, 0, 0]); // ttl, proto, checksum
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&udp);
        ethernet(ETH_P_IPV4, &ip)
    }

    pub fn udp6(src: [u16; 8], dst: [u16; 8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let addr = |a: [u16; 8]| a.iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        let (src, dst) = (addr(src), addr(dst));
        let udp_len = (8 + payload.len()) as u32;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&udp_len.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        let udp = udp(sport, dport, payload, &pseudo);

        let mut ip = vec![0x60, 0, 0, 0]; // version 6, no traffic class or flow label
        ip.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[IPPROTO_UDP, 64]); // next header, hop limit
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&udp);
        ethernet(ETH_P_IPV6, &ip)
    }
}
