//! Tier 2: the load-balancing programs on crafted packets with
//! BPF_PROG_TEST_RUN: translation, reverse translation, conntrack, affinity,
//! Maglev, resets for Services without backends, hairpin, and the agent
//! restart path (pinned maps adopted). Every output frame is parsed with its
//! checksums verified. Needs root; fails without.

use std::{collections::HashSet, net::SocketAddr};

use fairlead_ebpf::lb::{BackendAddr, Frontend, FrontendKey, Lb, Persistence, Proto, Scope};
use fairlead_ebpf_common::lb::{PROG_FROM_POD, PROG_TO_POD};
use fairlead_testkit::{
    packet::{parse_icmp_error, Packet, TCP_ACK, TCP_RST, TCP_SYN},
    require_root, unique_instance,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn frontend(vip: &str, proto: Proto, backends: &[&str]) -> Frontend {
    let vip = sa(vip);
    Frontend {
        key: FrontendKey {
            addr: vip.ip(),
            port: vip.port(),
            proto,
            scope: Scope::Internal,
        },
        node: false,
        local_policy: false,
        affinity_timeout_s: None,
        maglev: false,
        backends: backends
            .iter()
            .map(|b| {
                let b = sa(b);
                BackendAddr {
                    addr: b.ip(),
                    port: b.port(),
                    local: true,
                }
            })
            .collect(),
    }
}

fn run(lb: &Lb, program: &'static str, packet: &Packet) -> anyhow::Result<(u32, Packet)> {
    let out = lb.test_run(program, &packet.build())?;
    let parsed = Packet::parse(&out.data).map_err(|e| anyhow::anyhow!("{program} output: {e}"))?;
    Ok((out.return_value, parsed))
}

fn load() -> anyhow::Result<Lb> {
    require_root()?;
    Ok(Lb::load(&unique_instance(), Persistence::RemoveOnDrop)?)
}

/// A new TCP flow to a ClusterIP goes to a backend; the rest of the flow
/// follows it; replies come back from the Service address.
fn tcp_roundtrip(vip: &str, client: &str, backends: &[&str]) -> anyhow::Result<()> {
    let mut lb = load()?;
    lb.set_service("default/web", vec![frontend(vip, Proto::Tcp, backends)])?;

    let syn = Packet::tcp(sa(client), sa(vip), TCP_SYN);
    let (rc, out) = run(&lb, PROG_FROM_POD, &syn)?;
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out.src, sa(client), "source untouched");
    assert!(
        backends.iter().any(|b| sa(b) == out.dst),
        "translated to {} which is not a backend",
        out.dst
    );
    let backend = out.dst;
    assert_eq!(lb.conntrack()?.len(), 2, "forward and reply entries");

    for _ in 0..5 {
        let ack = Packet::tcp(sa(client), sa(vip), TCP_ACK);
        let (_, out) = run(&lb, PROG_FROM_POD, &ack)?;
        assert_eq!(out.dst, backend, "a flow keeps its backend");
    }

    let reply = Packet::tcp(backend, sa(client), TCP_SYN | TCP_ACK);
    let (rc, out) = run(&lb, PROG_TO_POD, &reply)?;
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out.src, sa(vip), "reply comes from the Service address");
    assert_eq!(out.dst, sa(client));
    assert_eq!(lb.stat("new_flow")?, 1);
    assert_eq!(lb.stat("reply")?, 1);
    Ok(())
}

#[test]
fn clusterip_tcp_ipv4_translates_and_reverses() -> anyhow::Result<()> {
    tcp_roundtrip(
        "10.96.0.20:80",
        "10.244.1.9:40000",
        &["10.244.1.5:8080", "10.244.2.6:8080"],
    )
}

#[test]
fn clusterip_tcp_ipv6_translates_and_reverses() -> anyhow::Result<()> {
    tcp_roundtrip(
        "[fd00:10:96::20]:80",
        "[fd00:10:244:1::9]:40000",
        &["[fd00:10:244:1::5]:8080", "[fd00:10:244:2::6]:8080"],
    )
}

#[test]
fn udp_translates_and_stale_flows_are_flushed_when_the_backend_goes() -> anyhow::Result<()> {
    let mut lb = load()?;
    let (vip, client) = ("10.96.0.10:53", "10.244.1.9:5353");
    lb.set_service(
        "kube-system/kube-dns",
        vec![frontend(vip, Proto::Udp, &["10.244.1.5:53"])],
    )?;
    let q = Packet::udp(sa(client), sa(vip), b"query");
    let (rc, out) = run(&lb, PROG_FROM_POD, &q)?;
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out.dst, sa("10.244.1.5:53"));
    assert_eq!(out.payload, b"query");
    let (_, back) = run(
        &lb,
        PROG_TO_POD,
        &Packet::udp(sa("10.244.1.5:53"), sa(client), b"answer"),
    )?;
    assert_eq!(back.src, sa(vip));

    // The backend is replaced: the flow's entries go at once (kube-proxy's
    // stale-UDP-conntrack bug would keep sending to the dead pod).
    let report = lb.set_service(
        "kube-system/kube-dns",
        vec![frontend(vip, Proto::Udp, &["10.244.2.7:53"])],
    )?;
    assert_eq!(report.udp_flows_flushed, 2);
    let (_, out) = run(&lb, PROG_FROM_POD, &q)?;
    assert_eq!(
        out.dst,
        sa("10.244.2.7:53"),
        "next datagram goes to the live backend"
    );
    Ok(())
}

#[test]
fn service_without_backends_resets_syn_and_answers_udp_unreachable() -> anyhow::Result<()> {
    let mut lb = load()?;
    lb.set_service(
        "default/empty",
        vec![
            frontend("10.96.0.30:80", Proto::Tcp, &[]),
            frontend("[fd00:10:96::30]:80", Proto::Tcp, &[]),
            frontend("10.96.0.30:53", Proto::Udp, &[]),
            frontend("[fd00:10:96::30]:53", Proto::Udp, &[]),
        ],
    )?;
    for (client, vip) in [
        ("10.244.1.9:40000", "10.96.0.30:80"),
        ("[fd00:10:244:1::9]:40000", "[fd00:10:96::30]:80"),
    ] {
        let mut syn = Packet::tcp(sa(client), sa(vip), TCP_SYN);
        syn.seq = 0x1234_5678;
        let (rc, rst) = run(&lb, PROG_FROM_POD, &syn)?;
        assert_eq!(rc, TC_ACT_REDIRECT, "the reset goes back out to the pod");
        assert_eq!(rst.flags, TCP_RST | TCP_ACK);
        assert_eq!(rst.src, sa(vip));
        assert_eq!(rst.dst, sa(client));
        assert_eq!(rst.ack, 0x1234_5679);
        assert_eq!(rst.dst_mac, syn.src_mac, "addressed to the pod");
        assert_eq!(rst.src_mac, syn.dst_mac);
    }
    // UDP: ICMP port unreachable quoting the datagram, back to the pod.
    for (client, vip, kind, code) in [
        ("10.244.1.9:5000", "10.96.0.30:53", 3, 3),
        ("[fd00:10:244:1::9]:5000", "[fd00:10:96::30]:53", 1, 4),
    ] {
        let q = Packet::udp(
            sa(client),
            sa(vip),
            b"a query that is longer than eight bytes",
        );
        let frame = q.build();
        let out = lb.test_run(PROG_FROM_POD, &frame)?;
        assert_eq!(out.return_value, TC_ACT_REDIRECT);
        let icmp = parse_icmp_error(&out.data).map_err(anyhow::Error::msg)?;
        assert_eq!((icmp.kind, icmp.code), (kind, code), "port unreachable");
        assert_eq!((icmp.src, icmp.dst), (sa(vip).ip(), sa(client).ip()));
        assert_eq!(icmp.dst_mac, q.src_mac, "addressed to the pod");
        let quoted_len = if sa(client).is_ipv4() { 28 } else { 48 };
        assert_eq!(
            icmp.quoted,
            frame[14..14 + quoted_len],
            "the datagram's headers quoted"
        );
    }
    assert_eq!(lb.stat("no_backend_reset")?, 2);
    // A stray segment of no connection (not a SYN): dropped silently.
    let (rc, _) = run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(sa("10.244.1.9:40001"), sa("10.96.0.30:80"), TCP_ACK),
    )?;
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(lb.stat("no_backend_drop")?, 1);
    assert_eq!(lb.stat("no_backend_unreachable")?, 2);
    assert!(lb.conntrack()?.is_empty(), "rejections leave no state");
    Ok(())
}

fn ten_backends() -> Vec<String> {
    (1..=10).map(|i| format!("10.244.3.{i}:8080")).collect()
}

fn backends_hit(lb: &Lb, client_ip: &str, flows: u16) -> anyhow::Result<HashSet<SocketAddr>> {
    let mut hit = HashSet::new();
    for port in 0..flows {
        let client = SocketAddr::new(client_ip.parse()?, 30000 + port);
        let (_, out) = run(
            lb,
            PROG_FROM_POD,
            &Packet::tcp(client, sa("10.96.0.40:80"), TCP_SYN),
        )?;
        hit.insert(out.dst);
    }
    Ok(hit)
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() -> anyhow::Result<()> {
    let mut lb = load()?;
    let names = ten_backends();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fe = frontend("10.96.0.40:80", Proto::Tcp, &refs);
    lb.set_service("default/spread", vec![fe.clone()])?;
    assert!(
        backends_hit(&lb, "10.244.1.9", 30)?.len() > 1,
        "without affinity, flows spread"
    );

    fe.affinity_timeout_s = Some(10_800);
    lb.set_service("default/spread", vec![fe])?;
    let first = backends_hit(&lb, "10.244.1.10", 30)?;
    assert_eq!(first.len(), 1, "with affinity one client sees one backend");
    assert_eq!(lb.affinity().len(), 1);
    // Another client may land elsewhere, and keeps its own backend too.
    assert_eq!(backends_hit(&lb, "10.244.1.11", 30)?.len(), 1);
    Ok(())
}

#[test]
fn maglev_is_consistent_and_spreads() -> anyhow::Result<()> {
    let mut lb = load()?;
    let names = ten_backends();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fe = frontend("10.96.0.40:80", Proto::Tcp, &refs);
    fe.maglev = true;
    lb.set_service("default/maglev", vec![fe])?;
    let spread = backends_hit(&lb, "10.244.1.9", 40)?;
    assert!(
        spread.len() >= 5,
        "40 flows over 10 backends hit {}",
        spread.len()
    );

    // A fresh agent (new maps) computes the same table: the same tuple
    // lands on the same backend without any shared state.
    let tuple = Packet::tcp(sa("10.244.1.77:41000"), sa("10.96.0.40:80"), TCP_SYN);
    let (_, a) = run(&lb, PROG_FROM_POD, &tuple)?;
    drop(lb);
    let mut other = load()?;
    let mut fe = frontend("10.96.0.40:80", Proto::Tcp, &refs);
    fe.maglev = true;
    other.set_service("default/maglev", vec![fe])?;
    let (_, b) = run(&other, PROG_FROM_POD, &tuple)?;
    assert_eq!(a.dst, b.dst);
    Ok(())
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() -> anyhow::Result<()> {
    let mut lb = load()?;
    let (vip, pod) = ("10.96.0.50:80", "10.244.1.5");
    lb.set_service(
        "default/self",
        vec![frontend(vip, Proto::Tcp, &["10.244.1.5:8080"])],
    )?;
    let syn = Packet::tcp(sa("10.244.1.5:40000"), sa(vip), TCP_SYN);
    let (rc, out) = run(&lb, PROG_FROM_POD, &syn)?;
    assert_eq!(rc, TC_ACT_REDIRECT, "sent straight back into the pod");
    assert_eq!(out.dst, sa("10.244.1.5:8080"));
    assert_eq!(
        out.src,
        sa("169.254.42.1:40000"),
        "source is the hairpin address"
    );
    assert_eq!(out.dst_mac, syn.src_mac);

    let reply = Packet::tcp(
        sa("10.244.1.5:8080"),
        sa("169.254.42.1:40000"),
        TCP_SYN | TCP_ACK,
    );
    let (rc, back) = run(&lb, PROG_FROM_POD, &reply)?;
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(back.src, sa(vip));
    assert_eq!(back.dst, SocketAddr::new(pod.parse()?, 40000));
    assert_eq!(lb.stat("hairpin")?, 1);
    Ok(())
}

#[test]
fn other_traffic_passes_untouched() -> anyhow::Result<()> {
    let mut lb = load()?;
    lb.set_service(
        "default/web",
        vec![frontend("10.96.0.20:80", Proto::Tcp, &["10.244.1.5:8080"])],
    )?;
    for packet in [
        // Right address, wrong port; right port, wrong protocol; pod to pod.
        Packet::tcp(sa("10.244.1.9:40000"), sa("10.96.0.20:81"), TCP_SYN),
        Packet::udp(sa("10.244.1.9:40000"), sa("10.96.0.20:80"), b"x"),
        Packet::tcp(sa("10.244.1.9:40000"), sa("10.244.2.2:80"), TCP_SYN),
    ] {
        let frame = packet.build();
        for program in [PROG_FROM_POD, PROG_TO_POD] {
            let out = lb.test_run(program, &frame)?;
            assert_eq!(out.return_value, TC_ACT_OK);
            assert_eq!(
                out.data, frame,
                "{program} changed a packet it does not own"
            );
        }
    }
    // Not IP at all (ARP), and a runt frame.
    let mut arp = vec![0xff; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(lb.test_run(PROG_FROM_POD, &arp)?.return_value, TC_ACT_OK);
    assert_eq!(
        lb.test_run(PROG_FROM_POD, &[0u8; 14])?.return_value,
        TC_ACT_OK
    );
    assert!(lb.conntrack()?.is_empty());
    Ok(())
}

#[test]
fn changing_one_service_touches_only_its_entries() -> anyhow::Result<()> {
    let mut lb = load()?;
    for i in 0..50u16 {
        let vip = format!("10.96.1.{i}:80");
        let b1 = format!("10.244.4.{i}:8080");
        let b2 = format!("10.244.5.{i}:8080");
        lb.set_service(
            &format!("ns/svc{i}"),
            vec![frontend(&vip, Proto::Tcp, &[&b1, &b2])],
        )?;
    }
    // Same desired state: nothing to write.
    let same = lb.set_service(
        "ns/svc7",
        vec![frontend(
            "10.96.1.7:80",
            Proto::Tcp,
            &["10.244.4.7:8080", "10.244.5.7:8080"],
        )],
    )?;
    assert_eq!(same.map_ops, 0);
    // One endpoint replaced: one backend written, one slot, one backend deleted.
    let one = lb.set_service(
        "ns/svc7",
        vec![frontend(
            "10.96.1.7:80",
            Proto::Tcp,
            &["10.244.4.7:8080", "10.244.6.7:8080"],
        )],
    )?;
    assert_eq!(one.map_ops, 3, "{one:?}");
    let gone = lb.remove_service("ns/svc7")?;
    assert_eq!(gone.removed, 1);
    assert_eq!(lb.table().len(), 49);
    Ok(())
}

#[test]
fn restart_adopts_pinned_maps_and_prunes_what_nobody_claims() -> anyhow::Result<()> {
    require_root()?;
    let instance = unique_instance();
    let mut lb = Lb::load(&instance, Persistence::Keep)?;
    let web = frontend(
        "10.96.0.20:80",
        Proto::Tcp,
        &["10.244.1.5:8080", "10.244.2.6:8080"],
    );
    let old = frontend("10.96.0.21:80", Proto::Tcp, &["10.244.1.7:8080"]);
    lb.set_service("default/web", vec![web.clone()])?;
    lb.set_service("default/old", vec![old])?;
    let (_, first) = run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(sa("10.244.1.9:40000"), sa("10.96.0.20:80"), TCP_SYN),
    )?;
    drop(lb); // the agent stops; pins stay

    let mut lb = Lb::load(&instance, Persistence::RemoveOnDrop)?;
    assert_eq!(lb.table().len(), 2, "both frontends adopted");
    // The established flow still has its entries and its backend.
    let (_, again) = run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(sa("10.244.1.9:40000"), sa("10.96.0.20:80"), TCP_ACK),
    )?;
    assert_eq!(again.dst, first.dst);
    let report = lb.set_service("default/web", vec![web])?;
    assert_eq!(
        report.map_ops, 0,
        "an unchanged Service costs no writes after a restart"
    );
    let pruned = lb.prune_unowned()?;
    assert_eq!(pruned.removed, 1);
    assert_eq!(lb.table().len(), 1);
    let instance_dir = lb.pin_dir().to_owned();
    lb.destroy()?;
    assert!(!instance_dir.exists());
    Ok(())
}

#[test]
fn gc_removes_expired_flows_and_keeps_established_ones() -> anyhow::Result<()> {
    let mut lb = load()?;
    lb.set_service(
        "default/web",
        vec![frontend("10.96.0.20:80", Proto::Tcp, &["10.244.1.5:8080"])],
    )?;
    // One flow only opened (SYN), one established (reply seen).
    run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(sa("10.244.1.9:40000"), sa("10.96.0.20:80"), TCP_SYN),
    )?;
    run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(sa("10.244.1.9:40001"), sa("10.96.0.20:80"), TCP_SYN),
    )?;
    run(
        &lb,
        PROG_TO_POD,
        &Packet::tcp(
            sa("10.244.1.5:8080"),
            sa("10.244.1.9:40001"),
            TCP_SYN | TCP_ACK,
        ),
    )?;
    assert_eq!(lb.conntrack()?.len(), 4);
    let in_two_minutes = fairlead_ebpf::lb::monotonic_ns() + 120 * 1_000_000_000;
    let report = lb.gc_at(in_two_minutes)?;
    assert_eq!(report.scanned, 4);
    assert_eq!(report.expired, 2, "the half-open flow's two entries");
    assert_eq!(lb.conntrack()?.len(), 2);
    Ok(())
}

#[test]
fn socket_lb_attaches_to_a_cgroup_it_is_given_and_refuses_a_root() -> anyhow::Result<()> {
    let mut lb = load()?;
    let root = fairlead_testkit::cgroup_mounts()?
        .into_iter()
        .find(|m| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&format!(" {} ", m.display())) && l.contains(" - cgroup2 "))
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount"))?;
    let err = lb.attach_cgroup(&root).unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
    let dir = root.join(format!("fl-{}", unique_instance()));
    std::fs::create_dir(&dir)?;
    let result = lb.attach_cgroup(&dir);
    let links = lb.pin_dir().join("links");
    let pinned = std::fs::read_dir(&links)?.count();
    drop(lb);
    let removed = std::fs::remove_dir(&dir);
    let err_chain = result.as_ref().err().map(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(x) = src {
            s += &format!(": {x}");
            src = x.source();
        }
        s
    });
    assert!(result.is_ok(), "{err_chain:?}");
    assert_eq!(pinned, 6, "six socket hooks pinned");
    removed?;
    Ok(())
}

#[test]
fn a_direct_connection_reusing_a_closed_service_flows_tuple_is_not_translated() -> anyhow::Result<()>
{
    let mut lb = load()?;
    lb.set_service(
        "default/web",
        vec![frontend("10.96.0.20:80", Proto::Tcp, &["10.244.1.5:8080"])],
    )?;
    let (client, vip, backend) = (
        sa("10.244.1.9:40000"),
        sa("10.96.0.20:80"),
        sa("10.244.1.5:8080"),
    );
    run(&lb, PROG_FROM_POD, &Packet::tcp(client, vip, TCP_SYN))?;
    run(
        &lb,
        PROG_FROM_POD,
        &Packet::tcp(client, vip, TCP_RST | TCP_ACK),
    )?;
    // Same source port, now straight to the backend.
    let (rc, out) = run(&lb, PROG_FROM_POD, &Packet::tcp(client, backend, TCP_SYN))?;
    assert_eq!((rc, out.dst), (TC_ACT_OK, backend));
    let (_, reply) = run(
        &lb,
        PROG_TO_POD,
        &Packet::tcp(backend, client, TCP_SYN | TCP_ACK),
    )?;
    assert_eq!(
        reply.src, backend,
        "the direct connection's reply is left alone"
    );
    assert_eq!(lb.stat("stale_reply_dropped")?, 1);
    Ok(())
}
