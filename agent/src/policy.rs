//! NetworkPolicy: from the snapshot to each local pod's rule tries.
//!
//! [`compile_endpoint`] follows `networking.k8s.io/v1` exactly: a pod is
//! isolated for a direction when any policy in its namespace selects it with
//! that policy type; it then accepts only what the union of those policies'
//! rules allows. A rule's peers are pods (podSelector in the policy's
//! namespace), namespaces (every pod in them), both (pods matching in the
//! matching namespaces) or an ipBlock with excepts; no peers means any peer,
//! no ports means every port. Named ports resolve against the pod that
//! serves them: the local pod for ingress, each peer pod for egress (a named
//! port towards an ipBlock has no pod to resolve against and allows
//! nothing). The result goes to the datapath as rule instances, which
//! `fairlead_ebpf::policy::compile` turns into longest-prefix entries.

use std::collections::HashMap;
use std::net::IpAddr;

use fairlead_core::{
    LabelSelector, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, ObjectKey, Pod, PortRef,
    Protocol, Snapshot,
};
use fairlead_ebpf::policy::{compile, port_rule, EndpointPolicy, Prefix, RuleInstance};
use fairlead_ebpf_common::lb::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use fairlead_ebpf_common::policy::PortRule;

/// Numbers the datapath reports policies by (flow events name them back).
#[derive(Debug, Default)]
pub struct PolicyIds {
    ids: HashMap<ObjectKey, u32>,
    names: Vec<ObjectKey>,
}

impl PolicyIds {
    pub fn id(&mut self, key: &ObjectKey) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        self.names.push(key.clone());
        let id = self.names.len() as u32;
        self.ids.insert(key.clone(), id);
        id
    }

    /// The policy behind an id (1-based; 0 is "no policy").
    pub fn name(&self, id: u32) -> Option<&ObjectKey> {
        self.names.get((id as usize).checked_sub(1)?)
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => PROTO_SCTP,
    }
}

/// The port rules of one rule's `ports` as served by `server` (the pod that
/// listens: named ports resolve against its container ports; `None` when
/// there is no such pod).
fn resolve_ports(ports: &[NetworkPolicyPort], server: Option<&Pod>, policy: u32) -> Vec<PortRule> {
    if ports.is_empty() {
        return vec![port_rule(0, 0, u16::MAX, policy)];
    }
    let mut out = Vec::new();
    for p in ports {
        let proto = proto_number(p.protocol);
        match &p.port {
            None => out.push(port_rule(proto, 0, u16::MAX, policy)),
            Some(PortRef::Number(n)) => {
                let hi = p.end_port.filter(|e| *e >= *n).unwrap_or(*n);
                out.push(port_rule(proto, *n, hi, policy));
            }
            Some(PortRef::Name(name)) => {
                if let Some(pod) = server {
                    for cp in pod
                        .ports
                        .iter()
                        .filter(|cp| cp.name.as_deref() == Some(name) && cp.protocol == p.protocol)
                    {
                        out.push(port_rule(proto, cp.port, cp.port, policy));
                    }
                }
            }
        }
    }
    out
}

/// Pods a peer selects, from the policy's namespace's point of view.
fn peer_pods<'s>(
    snap: &'s Snapshot,
    policy_ns: &str,
    pods: Option<&'s LabelSelector>,
    namespaces: Option<&'s LabelSelector>,
) -> impl Iterator<Item = &'s std::sync::Arc<Pod>> + 's {
    let policy_ns = policy_ns.to_owned();
    snap.pods().values().filter(move |p| {
        let ns_ok = match namespaces {
            None => p.namespace == policy_ns,
            Some(sel) => snap
                .namespace(&p.namespace)
                .is_some_and(|ns| sel.matches(&ns.labels)),
        };
        ns_ok && pods.is_none_or(|sel| sel.matches(&p.labels)) && !p.host_network && !p.terminating
    })
}

/// The rule instances of one direction of one policy for the pod's
/// address `ip` (only peers of the same family count).
fn instances(
    snap: &Snapshot,
    policy: &NetworkPolicy,
    id: u32,
    local: &Pod,
    ip: IpAddr,
    ingress: bool,
) -> Vec<RuleInstance> {
    let rules: Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> = if ingress {
        policy
            .ingress
            .iter()
            .map(|r| (r.from.as_slice(), r.ports.as_slice()))
            .collect()
    } else {
        policy
            .egress
            .iter()
            .map(|r| (r.to.as_slice(), r.ports.as_slice()))
            .collect()
    };
    let mut out = Vec::new();
    for (peers, ports) in rules {
        if peers.is_empty() {
            // Any peer; named ports resolve against the local pod for ingress
            // and have no pod to resolve against for egress.
            let server = ingress.then_some(local);
            out.push(RuleInstance {
                prefix: Prefix::any_of(ip),
                except: Vec::new(),
                ports: resolve_ports(ports, server, id),
            });
            continue;
        }
        for peer in peers {
            let (pods, namespaces) = match peer {
                NetworkPolicyPeer::IpBlock(block) => {
                    let cidr = Prefix::new(block.cidr.addr(), block.cidr.prefix_len());
                    if cidr.addr.is_ipv4() != ip.is_ipv4() {
                        continue;
                    }
                    out.push(RuleInstance {
                        prefix: cidr,
                        except: block
                            .except
                            .iter()
                            .map(|e| Prefix::new(e.addr(), e.prefix_len()))
                            .filter(|e| e.within(&cidr))
                            .collect(),
                        ports: resolve_ports(ports, ingress.then_some(local), id),
                    });
                    continue;
                }
                NetworkPolicyPeer::Pods(sel) => (Some(sel), None),
                NetworkPolicyPeer::Namespaces(sel) => (None, Some(sel)),
                NetworkPolicyPeer::PodsInNamespaces { pods, namespaces } => {
                    (Some(pods), Some(namespaces))
                }
            };
            for p in peer_pods(snap, &policy.namespace, pods, namespaces) {
                let server: &Pod = if ingress { local } else { p };
                for peer_ip in p.ips.iter().filter(|a| a.is_ipv4() == ip.is_ipv4()) {
                    out.push(RuleInstance {
                        prefix: Prefix::host(*peer_ip),
                        except: Vec::new(),
                        ports: resolve_ports(ports, Some(server), id),
                    });
                }
            }
        }
    }
    out
}

/// Everything the pod `local` may receive and send at its address `ip`.
pub fn compile_endpoint(
    snap: &Snapshot,
    local: &Pod,
    ip: IpAddr,
    ids: &mut PolicyIds,
) -> EndpointPolicy {
    let mut ep = EndpointPolicy::open();
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for policy in snap
        .network_policies()
        .in_namespace(&local.namespace)
        .filter(|p| p.pod_selector.matches(&local.labels))
    {
        let id = ids.id(&ObjectKey::new(&policy.namespace, &policy.name));
        if policy.policy_types.ingress {
            ep.ingress_isolated = true;
            ingress.extend(instances(snap, policy, id, local, ip, true));
        }
        if policy.policy_types.egress {
            ep.egress_isolated = true;
            egress.extend(instances(snap, policy, id, local, ip, false));
        }
    }
    ep.ingress = compile(&ingress);
    ep.egress = compile(&egress);
    ep
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairlead_core::{
        ContainerPort, IpBlock, Labels, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        PolicyTypes,
    };

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            ips: vec![ip.parse().unwrap()],
            labels: labels(l),
            annotations: Labels::new(),
            node_name: Some("node-1".into()),
            service_account: "default".into(),
            phase: fairlead_core::PodPhase::Running,
            host_network: false,
            ports: vec![ContainerPort {
                container: "c".into(),
                name: Some("serve-80".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            ready: true,
            terminating: false,
        }
    }

    fn selector(l: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(l),
            ..LabelSelector::everything()
        }
    }

    fn ns(name: &str) -> fairlead_core::Namespace {
        fairlead_core::Namespace {
            name: name.into(),
            labels: labels(&[("ns", name)]),
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        sel: LabelSelector,
        ingress: Vec<NetworkPolicyIngressRule>,
        egress: Option<Vec<NetworkPolicyEgressRule>>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector: sel,
            policy_types: PolicyTypes {
                ingress: true,
                egress: egress.is_some(),
            },
            ingress,
            egress: egress.unwrap_or_default(),
            labels: Labels::new(),
        }
    }

    fn snapshot(policies: Vec<NetworkPolicy>) -> (Snapshot, Pod) {
        let a = pod("x", "a", "10.244.1.1", &[("pod", "a")]);
        let mut b = Snapshot::builder()
            .namespace(ns("x"))
            .namespace(ns("y"))
            .pod(a.clone())
            .pod(pod("x", "b", "10.244.1.2", &[("pod", "b")]))
            .pod(pod("y", "a", "10.244.2.1", &[("pod", "a")]))
            .pod(pod("y", "b", "10.244.2.2", &[("pod", "b")]));
        for p in policies {
            b = b.network_policy(p);
        }
        (b.build(), a)
    }

    fn allowed(ep: &EndpointPolicy, ingress: bool, peer: &str, proto: u8, port: u16) -> bool {
        let (isolated, rules) = if ingress {
            (ep.ingress_isolated, &ep.ingress)
        } else {
            (ep.egress_isolated, &ep.egress)
        };
        if !isolated {
            return true;
        }
        let peer: IpAddr = peer.parse().unwrap();
        let best = rules
            .iter()
            .filter(|(p, _)| Prefix::host(peer).within(p))
            .max_by_key(|(p, _)| p.len);
        best.is_some_and(|(_, r)| {
            r.iter().any(|r| {
                (r.proto == 0 || r.proto == proto) && r.port_lo <= port && port <= r.port_hi
            })
        })
    }

    #[test]
    fn unselected_pods_are_open_and_deny_all_isolates() {
        let (snap, a) = snapshot(vec![]);
        let ep = compile_endpoint(&snap, &a, a.ips[0], &mut PolicyIds::default());
        assert!(allowed(&ep, true, "10.244.2.2", PROTO_TCP, 80));
        let deny = policy("x", "deny", LabelSelector::everything(), vec![], None);
        let (snap, a) = snapshot(vec![deny]);
        let ep = compile_endpoint(&snap, &a, a.ips[0], &mut PolicyIds::default());
        assert!(ep.ingress_isolated && !ep.egress_isolated);
        assert!(!allowed(&ep, true, "10.244.1.2", PROTO_TCP, 80));
        assert!(
            allowed(&ep, false, "10.244.2.2", PROTO_TCP, 80),
            "egress not isolated"
        );
    }

    #[test]
    fn namespace_pod_and_combined_peers_with_named_ports() {
        let rule = |from| NetworkPolicyIngressRule {
            from,
            ports: vec![NetworkPolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Name("serve-80".into())),
                end_port: None,
            }],
        };
        let p = policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            vec![
                rule(vec![NetworkPolicyPeer::Namespaces(selector(&[(
                    "ns", "y",
                )]))]),
                rule(vec![NetworkPolicyPeer::Pods(selector(&[("pod", "b")]))]),
            ],
            None,
        );
        let (snap, a) = snapshot(vec![p]);
        let ep = compile_endpoint(&snap, &a, a.ips[0], &mut PolicyIds::default());
        assert!(
            allowed(&ep, true, "10.244.2.1", PROTO_TCP, 80),
            "y/a via namespace"
        );
        assert!(
            allowed(&ep, true, "10.244.2.2", PROTO_TCP, 80),
            "y/b via namespace"
        );
        assert!(
            allowed(&ep, true, "10.244.1.2", PROTO_TCP, 80),
            "x/b via pod selector"
        );
        assert!(
            !allowed(&ep, true, "10.244.1.2", PROTO_TCP, 81),
            "named port is 80 only"
        );
        assert!(!allowed(&ep, true, "10.244.1.2", PROTO_UDP, 80));

        let both = policy(
            "x",
            "both",
            selector(&[("pod", "a")]),
            vec![rule(vec![NetworkPolicyPeer::PodsInNamespaces {
                pods: selector(&[("pod", "b")]),
                namespaces: selector(&[("ns", "y")]),
            }])],
            None,
        );
        let (snap, a) = snapshot(vec![both]);
        let ep = compile_endpoint(&snap, &a, a.ips[0], &mut PolicyIds::default());
        assert!(allowed(&ep, true, "10.244.2.2", PROTO_TCP, 80), "y/b");
        assert!(
            !allowed(&ep, true, "10.244.2.1", PROTO_TCP, 80),
            "y/a: wrong pod"
        );
        assert!(
            !allowed(&ep, true, "10.244.1.2", PROTO_TCP, 80),
            "x/b: wrong namespace"
        );
    }

    #[test]
    fn egress_ip_block_with_except_and_end_port() {
        let p = policy(
            "x",
            "out",
            selector(&[("pod", "a")]),
            vec![],
            Some(vec![NetworkPolicyEgressRule {
                to: vec![NetworkPolicyPeer::IpBlock(IpBlock {
                    cidr: "10.244.0.0/16".parse().unwrap(),
                    except: vec!["10.244.2.0/24".parse().unwrap()],
                })],
                ports: vec![NetworkPolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(80)),
                    end_port: Some(81),
                }],
            }]),
        );
        let (snap, a) = snapshot(vec![p]);
        let ep = compile_endpoint(&snap, &a, a.ips[0], &mut PolicyIds::default());
        assert!(ep.egress_isolated && ep.ingress_isolated);
        assert!(allowed(&ep, false, "10.244.1.2", PROTO_TCP, 81));
        assert!(!allowed(&ep, false, "10.244.1.2", PROTO_TCP, 82));
        assert!(!allowed(&ep, false, "10.244.2.2", PROTO_TCP, 80), "except");
        assert!(!allowed(&ep, false, "10.245.0.1", PROTO_TCP, 80), "outside");
    }
}
