//! Tier 2: NetworkPolicy verdicts on crafted packets (BPF_PROG_TEST_RUN):
//! isolation, ipBlock with except, ports and protocols, replies to allowed
//! connections, fail-closed for unknown pods, and egress judged on the real
//! backend after Service translation. Needs root; fails without.

use std::net::{IpAddr, SocketAddr};

use fairlead_ebpf::lb::{BackendAddr, Frontend, FrontendKey, Lb, Persistence, Proto, Scope};
use fairlead_ebpf::policy::{compile, port_rule, EndpointPolicy, Prefix, RuleInstance};
use fairlead_ebpf_common::lb::{PROG_FROM_POD, PROG_TO_POD};
use fairlead_testkit::{
    packet::{Packet, TCP_ACK, TCP_SYN},
    require_root, unique_instance,
};

const OK: u32 = 0;
const SHOT: u32 = 2;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn prefix(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').expect("a/len");
    Prefix::new(a.parse().expect("address"), l.parse().expect("length"))
}

fn load() -> anyhow::Result<Lb> {
    require_root()?;
    let mut lb = Lb::load(&unique_instance(), Persistence::RemoveOnDrop)?;
    lb.set_policy_enforcement(true)?;
    Ok(lb)
}

/// The verdict of `program` on one packet.
fn verdict(lb: &Lb, program: &'static str, p: &Packet) -> anyhow::Result<u32> {
    Ok(lb.test_run(program, &p.build())?.return_value)
}

/// Ingress (a packet into the pod) is judged on the veth's egress hook.
fn into_pod(lb: &Lb, from: &str, to: &str, proto: u8) -> anyhow::Result<u32> {
    let p = if proto == TCP {
        Packet::tcp(sa(from), sa(to), TCP_SYN)
    } else {
        Packet::udp(sa(from), sa(to), b"x")
    };
    verdict(lb, PROG_TO_POD, &p)
}

fn out_of_pod(lb: &Lb, from: &str, to: &str, proto: u8) -> anyhow::Result<u32> {
    let p = if proto == TCP {
        Packet::tcp(sa(from), sa(to), TCP_SYN)
    } else {
        Packet::udp(sa(from), sa(to), b"x")
    };
    verdict(lb, PROG_FROM_POD, &p)
}

const POD: &str = "10.244.1.5";

fn pod_ip() -> IpAddr {
    POD.parse().expect("literal")
}

#[test]
fn unknown_pods_fail_closed_and_unselected_pods_are_open() -> anyhow::Result<()> {
    let mut lb = load()?;
    assert_eq!(
        into_pod(&lb, "10.244.2.9:40000", "10.244.1.5:80", TCP)?,
        SHOT
    );
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:40000", "10.244.2.9:80", TCP)?,
        SHOT
    );
    assert_eq!(lb.stat("policy_unknown_endpoint")?, 2);
    lb.set_endpoint_policy(pod_ip(), &EndpointPolicy::open())?;
    assert_eq!(into_pod(&lb, "10.244.2.9:40000", "10.244.1.5:80", TCP)?, OK);
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:40000", "10.244.2.9:80", TCP)?,
        OK
    );
    // Enforcement off: nothing is judged at all.
    lb.set_policy_enforcement(false)?;
    assert_eq!(into_pod(&lb, "10.244.2.9:40000", "10.244.9.9:80", TCP)?, OK);
    Ok(())
}

#[test]
fn ingress_ip_block_with_except_ports_and_protocols() -> anyhow::Result<()> {
    let mut lb = load()?;
    let policy = EndpointPolicy {
        ingress_isolated: true,
        ingress: compile(&[RuleInstance {
            prefix: prefix("10.244.2.0/24"),
            except: vec![prefix("10.244.2.128/25")],
            ports: vec![port_rule(TCP, 80, 80, 1), port_rule(UDP, 5000, 5010, 1)],
        }]),
        ..Default::default()
    };
    lb.set_endpoint_policy(pod_ip(), &policy)?;
    assert_eq!(into_pod(&lb, "10.244.2.5:40000", "10.244.1.5:80", TCP)?, OK);
    assert_eq!(
        into_pod(&lb, "10.244.2.200:40000", "10.244.1.5:80", TCP)?,
        SHOT,
        "except"
    );
    assert_eq!(
        into_pod(&lb, "10.244.2.5:40001", "10.244.1.5:81", TCP)?,
        SHOT,
        "port"
    );
    assert_eq!(
        into_pod(&lb, "10.244.2.5:40002", "10.244.1.5:80", UDP)?,
        SHOT,
        "protocol"
    );
    assert_eq!(
        into_pod(&lb, "10.244.2.5:40003", "10.244.1.5:5007", UDP)?,
        OK,
        "endPort range"
    );
    assert_eq!(
        into_pod(&lb, "10.244.3.5:40000", "10.244.1.5:80", TCP)?,
        SHOT,
        "outside"
    );
    // Egress is not isolated by an ingress-only policy.
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:40000", "10.244.3.5:80", TCP)?,
        OK
    );
    assert!(lb.stat("policy_denied_ingress")? >= 4);
    Ok(())
}

#[test]
fn replies_to_allowed_connections_pass_both_ways() -> anyhow::Result<()> {
    let mut lb = load()?;
    // Isolated both ways; egress may reach a DNS server, nothing may come in.
    let policy = EndpointPolicy {
        ingress_isolated: true,
        egress_isolated: true,
        egress: compile(&[RuleInstance {
            prefix: prefix("10.244.2.9/32"),
            except: vec![],
            ports: vec![port_rule(UDP, 53, 53, 1)],
        }]),
        ..Default::default()
    };
    lb.set_endpoint_policy(pod_ip(), &policy)?;
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:5353", "10.244.2.9:53", UDP)?,
        OK
    );
    assert_eq!(
        into_pod(&lb, "10.244.2.9:53", "10.244.1.5:5353", UDP)?,
        OK,
        "the answer"
    );
    assert_eq!(
        into_pod(&lb, "10.244.2.9:53", "10.244.1.5:5354", UDP)?,
        SHOT,
        "unasked"
    );
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:5355", "10.244.2.9:54", UDP)?,
        SHOT
    );
    // The other way round: a connection the ingress rules allowed may answer.
    let mut policy = policy;
    policy.ingress = compile(&[RuleInstance {
        prefix: Prefix::any_of(pod_ip()),
        except: vec![],
        ports: vec![port_rule(TCP, 8080, 8080, 2)],
    }]);
    lb.set_endpoint_policy(pod_ip(), &policy)?;
    assert_eq!(
        into_pod(&lb, "10.244.3.3:41000", "10.244.1.5:8080", TCP)?,
        OK
    );
    let reply = Packet::tcp(
        sa("10.244.1.5:8080"),
        sa("10.244.3.3:41000"),
        TCP_SYN | TCP_ACK,
    );
    assert_eq!(verdict(&lb, PROG_FROM_POD, &reply)?, OK, "the reply leaves");
    Ok(())
}

#[test]
fn egress_through_a_service_is_judged_on_the_backend() -> anyhow::Result<()> {
    let mut lb = load()?;
    lb.set_service(
        "default/web",
        vec![Frontend {
            key: FrontendKey {
                addr: "10.96.0.20".parse()?,
                port: 80,
                proto: Proto::Tcp,
                scope: Scope::Internal,
            },
            node: false,
            local_policy: false,
            affinity_timeout_s: None,
            maglev: false,
            backends: vec![BackendAddr {
                addr: "10.244.2.7".parse()?,
                port: 8080,
                local: false,
            }],
        }],
    )?;
    let allow = |p: &str, port: u16| EndpointPolicy {
        egress_isolated: true,
        egress: compile(&[RuleInstance {
            prefix: prefix(p),
            except: vec![],
            ports: vec![port_rule(TCP, port, port, 1)],
        }]),
        ..Default::default()
    };
    // A rule naming the ClusterIP does not let the pod reach the backend.
    lb.set_endpoint_policy(pod_ip(), &allow("10.96.0.20/32", 80))?;
    assert_eq!(
        out_of_pod(&lb, "10.244.1.5:40000", "10.96.0.20:80", TCP)?,
        SHOT
    );
    // A rule naming the backend's address and port does.
    lb.set_endpoint_policy(pod_ip(), &allow("10.244.2.7/32", 8080))?;
    let p = Packet::tcp(sa("10.244.1.5:40001"), sa("10.96.0.20:80"), TCP_SYN);
    let out = lb.test_run(PROG_FROM_POD, &p.build())?;
    assert_eq!(out.return_value, OK);
    assert_eq!(
        Packet::parse(&out.data).map_err(anyhow::Error::msg)?.dst,
        sa("10.244.2.7:8080")
    );
    Ok(())
}

#[test]
fn tightening_a_policy_never_opens_what_both_deny() -> anyhow::Result<()> {
    let mut lb = load()?;
    // Old: allow 10.244.0.0/16 on 80. New: allow only 10.244.2.0/24 on 80.
    // A peer in 10.244.3.0/24 is allowed by the old, denied by the new; a peer
    // outside 10.244.0.0/16 is denied by both and must stay denied after every
    // single write.
    let old = EndpointPolicy {
        ingress_isolated: true,
        ingress: compile(&[RuleInstance {
            prefix: prefix("10.244.0.0/16"),
            except: vec![],
            ports: vec![port_rule(TCP, 80, 80, 1)],
        }]),
        ..Default::default()
    };
    let new = EndpointPolicy {
        ingress_isolated: true,
        ingress: compile(&[RuleInstance {
            prefix: prefix("10.244.2.0/24"),
            except: vec![],
            ports: vec![port_rule(TCP, 80, 80, 2)],
        }]),
        ..Default::default()
    };
    lb.set_endpoint_policy(pod_ip(), &old)?;
    assert_eq!(into_pod(&lb, "10.244.3.3:40000", "10.244.1.5:80", TCP)?, OK);
    let report = lb.set_endpoint_policy(pod_ip(), &new)?;
    assert_eq!(report.map_ops, 2, "one prefix added, one removed");
    assert_eq!(
        into_pod(&lb, "10.244.3.3:40001", "10.244.1.5:80", TCP)?,
        SHOT
    );
    assert_eq!(into_pod(&lb, "10.244.2.3:40000", "10.244.1.5:80", TCP)?, OK);
    assert_eq!(
        into_pod(&lb, "10.245.0.1:40000", "10.244.1.5:80", TCP)?,
        SHOT
    );
    lb.remove_endpoint_policy(pod_ip())?;
    assert_eq!(
        into_pod(&lb, "10.244.2.3:40002", "10.244.1.5:80", TCP)?,
        SHOT,
        "forgotten"
    );
    Ok(())
}

#[test]
fn verdicts_become_flow_events() -> anyhow::Result<()> {
    let mut lb = load()?;
    let mut reader = lb.take_flow_reader().expect("one reader");
    let policy = EndpointPolicy {
        ingress_isolated: true,
        ingress: compile(&[RuleInstance {
            prefix: prefix("10.244.2.0/24"),
            except: vec![],
            ports: vec![port_rule(TCP, 80, 80, 7)],
        }]),
        ..Default::default()
    };
    lb.set_endpoint_policy(pod_ip(), &policy)?;
    into_pod(&lb, "10.244.2.5:40000", "10.244.1.5:80", TCP)?;
    into_pod(&lb, "10.244.3.5:40000", "10.244.1.5:80", TCP)?;
    let mut events = Vec::new();
    reader.drain(|e| events.push(e));
    assert_eq!(events.len(), 2, "{events:?}");
    let allowed = &events[0];
    assert_eq!(allowed.verdict, fairlead_ebpf::policy::VERDICT_FORWARDED);
    assert_eq!(allowed.policy, 7, "the deciding policy");
    assert_eq!(u16::from_be(allowed.endpoint_port), 80);
    let dropped = &events[1];
    assert_eq!(dropped.verdict, fairlead_ebpf::policy::VERDICT_DROPPED);
    assert_eq!(
        fairlead_ebpf::lb::STAT_NAMES[dropped.reason as usize],
        "policy_denied_ingress"
    );
    Ok(())
}

#[test]
fn a_full_rule_map_fails_closed() -> anyhow::Result<()> {
    require_root()?;
    // A small rule map, so filling it is quick (the real one holds a million prefixes).
    let limit = 4096;
    let mut lb = Lb::load_sized(
        &unique_instance(),
        Persistence::RemoveOnDrop,
        &[(fairlead_ebpf_common::policy::MAP_POL_RULES, limit)],
    )?;
    lb.set_policy_enforcement(true)?;
    lb.set_endpoint_policy(pod_ip(), &EndpointPolicy::open())?;
    assert_eq!(into_pod(&lb, "10.200.0.1:40000", "10.244.1.5:80", TCP)?, OK);
    // More peer prefixes than the rule map holds, each allowing port 80.
    let ingress = (0..limit + 16)
        .map(|i| {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            (Prefix::host(ip), vec![port_rule(TCP, 80, 80, 1)])
        })
        .collect();
    let huge = EndpointPolicy {
        ingress_isolated: true,
        ingress,
        ..Default::default()
    };
    let err = lb.set_endpoint_policy(pod_ip(), &huge).unwrap_err();
    assert!(err.to_string().contains("fl_pol_rules_v1"), "{err}");
    assert!(
        err.to_string().contains("MAX_"),
        "says how to raise it: {err}"
    );
    assert_eq!(lb.policy_failures(), 1);
    // The pod is closed: a peer the (unwritten) rules never allowed is denied, not let in.
    assert_eq!(
        into_pod(&lb, "10.200.0.1:40001", "10.244.1.5:80", TCP)?,
        SHOT
    );
    Ok(())
}
