//! NetworkPolicy (networking.k8s.io/v1), in its full shape.

use k8s_openapi::api::networking::v1 as networkingv1;
use serde::Serialize;

use crate::convert::{labels, Ctx};
use crate::{
    ConvertError, IpNet, Kind, LabelSelector, Labels, Object, ObjectKey, PortRef, Problem, Protocol,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// Pods in the policy's namespace that it isolates; empty selects all of them.
    pub pod_selector: LabelSelector,
    pub policy_types: PolicyTypes,
    /// Allowed inbound traffic. Empty with `policy_types.ingress` set means deny all ingress.
    pub ingress: Vec<NetworkPolicyIngressRule>,
    /// Allowed outbound traffic. Empty with `policy_types.egress` set means deny all egress.
    pub egress: Vec<NetworkPolicyEgressRule>,
    pub labels: Labels,
}

/// Which directions the policy isolates, after Kubernetes' defaulting: when `policyTypes` is
/// absent, Ingress always, and Egress only if the policy has egress rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicyIngressRule {
    /// Empty means from anywhere.
    pub from: Vec<NetworkPolicyPeer>,
    /// Empty means every port.
    pub ports: Vec<NetworkPolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicyEgressRule {
    /// Empty means to anywhere.
    pub to: Vec<NetworkPolicyPeer>,
    /// Empty means every port.
    pub ports: Vec<NetworkPolicyPort>,
}

/// One peer; the variants are the combinations Kubernetes allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NetworkPolicyPeer {
    /// `podSelector` alone: matching pods in the policy's own namespace.
    Pods(LabelSelector),
    /// `namespaceSelector` alone: every pod in matching namespaces.
    Namespaces(LabelSelector),
    /// Both: matching pods in matching namespaces.
    PodsInNamespaces {
        pods: LabelSelector,
        namespaces: LabelSelector,
    },
    IpBlock(IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicyPort {
    pub protocol: Protocol,
    /// `None` means every port of the protocol.
    pub port: Option<PortRef>,
    /// With a numeric `port`, the rule covers `port..=end_port`.
    pub end_port: Option<u16>,
}

impl Object for NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

impl TryFrom<&networkingv1::NetworkPolicy> for NetworkPolicy {
    type Error = ConvertError;

    fn try_from(np: &networkingv1::NetworkPolicy) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::NetworkPolicy, &np.metadata)?;
        let default_spec = networkingv1::NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);

        let pod_selector = match &spec.pod_selector {
            Some(s) => cx.selector("spec.podSelector", s)?,
            None => LabelSelector::everything(),
        };

        let policy_types = match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            Some(types) => {
                let mut pt = PolicyTypes {
                    ingress: false,
                    egress: false,
                };
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => pt.ingress = true,
                        "Egress" => pt.egress = true,
                        other => {
                            return Err(cx.err(
                                format!("spec.policyTypes[{i}]"),
                                other,
                                Problem::UnknownValue("Ingress, Egress"),
                            ))
                        }
                    }
                }
                pt
            }
            None => PolicyTypes {
                ingress: true,
                egress: spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
            },
        };

        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(NetworkPolicyIngressRule {
                    from: peers(&cx, &format!("spec.ingress[{i}].from"), r.from.as_deref())?,
                    ports: ports(&cx, &format!("spec.ingress[{i}].ports"), r.ports.as_deref())?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let egress = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(NetworkPolicyEgressRule {
                    to: peers(&cx, &format!("spec.egress[{i}].to"), r.to.as_deref())?,
                    ports: ports(&cx, &format!("spec.egress[{i}].ports"), r.ports.as_deref())?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;

        Ok(NetworkPolicy {
            namespace: cx.key.namespace.clone(),
            name: cx.key.name.clone(),
            pod_selector,
            policy_types,
            ingress,
            egress,
            labels: labels(&np.metadata.labels),
        })
    }
}

fn peers(
    cx: &Ctx,
    field: &str,
    peers: Option<&[networkingv1::NetworkPolicyPeer]>,
) -> Result<Vec<NetworkPolicyPeer>, ConvertError> {
    let mut out = Vec::new();
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        let field = format!("{field}[{i}]");
        let pods = p
            .pod_selector
            .as_ref()
            .map(|s| cx.selector(&format!("{field}.podSelector"), s))
            .transpose()?;
        let namespaces = p
            .namespace_selector
            .as_ref()
            .map(|s| cx.selector(&format!("{field}.namespaceSelector"), s))
            .transpose()?;
        let peer = match (pods, namespaces, &p.ip_block) {
            (None, None, Some(block)) => {
                let cidr = cx.cidr(format!("{field}.ipBlock.cidr"), &block.cidr)?;
                let except = block
                    .except
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, e)| cx.cidr(format!("{field}.ipBlock.except[{j}]"), e))
                    .collect::<Result<_, _>>()?;
                NetworkPolicyPeer::IpBlock(IpBlock { cidr, except })
            }
            (Some(pods), None, None) => NetworkPolicyPeer::Pods(pods),
            (None, Some(namespaces), None) => NetworkPolicyPeer::Namespaces(namespaces),
            (Some(pods), Some(namespaces), None) => {
                NetworkPolicyPeer::PodsInNamespaces { pods, namespaces }
            }
            (None, None, None) => {
                return Err(cx.err(
                    field,
                    "{}",
                    Problem::Invalid(
                        "a peer needs podSelector, namespaceSelector or ipBlock".into(),
                    ),
                ))
            }
            (_, _, Some(_)) => {
                return Err(cx.err(
                    field,
                    "ipBlock with selectors",
                    Problem::Invalid(
                        "ipBlock cannot be combined with podSelector or namespaceSelector".into(),
                    ),
                ))
            }
        };
        out.push(peer);
    }
    Ok(out)
}

fn ports(
    cx: &Ctx,
    field: &str,
    ports: Option<&[networkingv1::NetworkPolicyPort]>,
) -> Result<Vec<NetworkPolicyPort>, ConvertError> {
    let mut out = Vec::new();
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        let f = |name: &str| format!("{field}[{i}].{name}");
        let port = p
            .port
            .as_ref()
            .map(|v| cx.port_ref(f("port"), v))
            .transpose()?;
        let end_port = match (p.end_port, &port) {
            (None, _) => None,
            (Some(end), Some(PortRef::Number(start))) => {
                let end = cx.port(f("endPort"), end)?;
                if end < *start {
                    return Err(cx.err(
                        f("endPort"),
                        end,
                        Problem::Invalid(format!("must not be below port {start}")),
                    ));
                }
                Some(end)
            }
            (Some(end), _) => {
                return Err(cx.err(
                    f("endPort"),
                    end,
                    Problem::Invalid("needs a numeric port".into()),
                ))
            }
        };
        out.push(NetworkPolicyPort {
            protocol: cx.protocol(f("protocol"), p.protocol.as_deref())?,
            port,
            end_port,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(value: serde_json::Value) -> Result<NetworkPolicy, ConvertError> {
        let np: networkingv1::NetworkPolicy = serde_json::from_value(value).unwrap();
        NetworkPolicy::try_from(&np)
    }

    #[test]
    fn converts_the_full_shape() {
        let np = convert(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "db-access", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {"app": "web"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
                        {"namespaceSelector": {"matchLabels": {"env": "prod"}},
                         "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["backup"]}]}},
                        {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}}
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": 5432},
                        {"port": "metrics"},
                        {"protocol": "UDP", "port": 30000, "endPort": 32767}
                    ]
                }],
                "egress": [{"to": [{"ipBlock": {"cidr": "fd00:10:96::/112"}}]}, {}]
            }
        }))
        .unwrap();
        assert_eq!(np.key(), ObjectKey::new("shop", "db-access"));
        assert_eq!(np.pod_selector, LabelSelector::from_labels([("app", "db")]));
        assert_eq!(
            np.policy_types,
            PolicyTypes {
                ingress: true,
                egress: true
            }
        );
        let rule = &np.ingress[0];
        assert_eq!(
            rule.from[0],
            NetworkPolicyPeer::Pods(LabelSelector::from_labels([("app", "web")]))
        );
        assert_eq!(
            rule.from[1],
            NetworkPolicyPeer::Namespaces(LabelSelector::from_labels([("team", "ops")]))
        );
        match &rule.from[2] {
            NetworkPolicyPeer::PodsInNamespaces { pods, namespaces } => {
                assert_eq!(namespaces, &LabelSelector::from_labels([("env", "prod")]));
                assert_eq!(pods.match_expressions.len(), 1);
            }
            other => panic!("expected pods in namespaces, got {other:?}"),
        }
        assert_eq!(
            rule.from[3],
            NetworkPolicyPeer::IpBlock(IpBlock {
                cidr: "172.17.0.0/16".parse().unwrap(),
                except: vec!["172.17.1.0/24".parse().unwrap()],
            })
        );
        assert_eq!(
            rule.ports,
            vec![
                NetworkPolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(5432)),
                    end_port: None
                },
                NetworkPolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Name("metrics".into())),
                    end_port: None
                },
                NetworkPolicyPort {
                    protocol: Protocol::Udp,
                    port: Some(PortRef::Number(30000)),
                    end_port: Some(32767)
                },
            ]
        );
        assert_eq!(np.egress.len(), 2);
        assert!(
            np.egress[1].to.is_empty() && np.egress[1].ports.is_empty(),
            "empty rule allows everything"
        );
    }

    #[test]
    fn policy_types_default_like_kubernetes() {
        // No policyTypes, no egress: ingress only (an ingress deny-all when there are no rules).
        let deny_all = convert(
            json!({"metadata": {"name": "deny", "namespace": "ns"}, "spec": {"podSelector": {}}}),
        )
        .unwrap();
        assert_eq!(
            deny_all.policy_types,
            PolicyTypes {
                ingress: true,
                egress: false
            }
        );
        assert!(deny_all.pod_selector.is_empty());
        assert!(deny_all.ingress.is_empty());

        // Egress rules present: egress too, and ingress always.
        let with_egress = convert(json!({"metadata": {"name": "e", "namespace": "ns"},
            "spec": {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]}}))
        .unwrap();
        assert_eq!(
            with_egress.policy_types,
            PolicyTypes {
                ingress: true,
                egress: true
            }
        );

        // An empty egress list does not count as egress rules.
        let empty_egress = convert(json!({"metadata": {"name": "e", "namespace": "ns"},
            "spec": {"podSelector": {}, "egress": []}}))
        .unwrap();
        assert_eq!(
            empty_egress.policy_types,
            PolicyTypes {
                ingress: true,
                egress: false
            }
        );

        // Explicit types win.
        let egress_only = convert(json!({"metadata": {"name": "e", "namespace": "ns"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}))
        .unwrap();
        assert_eq!(
            egress_only.policy_types,
            PolicyTypes {
                ingress: false,
                egress: true
            }
        );
    }

    #[test]
    fn bad_data_names_the_field() {
        let err = convert(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/33"]}}]}]}}))
        .unwrap_err();
        assert_eq!(err.kind, Kind::NetworkPolicy);
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.ingress[0].from[0].ipBlock.except[0]", "10.1.0.0/33")
        );

        let err = convert(
            json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"podSelector": {},
            "egress": [{"ports": [{"port": 90, "endPort": 80}]}]}}),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.egress[0].ports[0].endPort");

        let err = convert(
            json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"podSelector": {},
            "egress": [{"ports": [{"protocol": "ICMP"}]}]}}),
        )
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.egress[0].ports[0].protocol", "ICMP")
        );

        let err = convert(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}}))
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.podSelector.matchExpressions[0].operator", "Equals")
        );

        let err = convert(
            json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"podSelector": {},
            "ingress": [{"from": [{}]}]}}),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].from[0]");
    }
}
