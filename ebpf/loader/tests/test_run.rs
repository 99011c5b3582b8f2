//! Tier 2: the ifstats programs on crafted packets with BPF_PROG_TEST_RUN.
//! No topology: the kernel runs each frame as if it came through the
//! loopback device of this process's namespace. Needs root; fails without.

use fairlead_ebpf::{Counter, Direction, IfCounters, IfStats, TC_ACT_OK};
use fairlead_testkit::{packet::Packet, require_root, unique_instance};

/// The kernel's LOOPBACK_IFINDEX: BPF_PROG_TEST_RUN puts `lo` in skb->dev.
const LOOPBACK_IFINDEX: u32 = 1;

#[test]
fn ingress_counts_crafted_ipv4_and_ipv6_frames_and_passes_them() -> anyhow::Result<()> {
    require_root()?;
    let stats = IfStats::load(&unique_instance())?;
    assert_eq!(stats.counters(LOOPBACK_IFINDEX)?, IfCounters::default());

    let v4 = Packet::udp(
        "10.244.0.1:40000".parse()?,
        "10.244.0.2:53".parse()?,
        b"fairlead ipv4 test payload",
    )
    .build();
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

    let v6 = Packet::udp(
        "[fd00:10:244::1]:40000".parse()?,
        "[fd00:10:244::2]:53".parse()?,
        b"fairlead ipv6 test payload, a little longer",
    )
    .build();
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
    let v4 = Packet::udp(
        "10.244.0.2:53".parse()?,
        "10.244.0.1:40000".parse()?,
        &[0xab; 100],
    )
    .build();
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
