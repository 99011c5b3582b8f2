//! Namespace and Node (core/v1).

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as corev1;
use serde::Serialize;

use crate::convert::{labels, Ctx};
use crate::{ConvertError, IpNet, Kind, Labels, Object, ObjectKey};

/// Well-known label carrying a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Its deprecated predecessor, still set by some installers.
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Object for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn key(&self) -> ObjectKey {
        ObjectKey::cluster(&self.name)
    }
}

impl TryFrom<&corev1::Namespace> for Namespace {
    type Error = ConvertError;

    fn try_from(ns: &corev1::Namespace) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::Namespace, &ns.metadata)?;
        Ok(Namespace {
            name: cx.key.name,
            labels: labels(&ns.metadata.labels),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// `spec.podCIDRs` (falling back to `spec.podCIDR`), one per family.
    pub pod_cidrs: Vec<IpNet>,
    pub internal_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// From the `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl Object for Node {
    const KIND: Kind = Kind::Node;
    fn key(&self) -> ObjectKey {
        ObjectKey::cluster(&self.name)
    }
}

impl TryFrom<&corev1::Node> for Node {
    type Error = ConvertError;

    fn try_from(node: &corev1::Node) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::Node, &node.metadata)?;
        let spec = node.spec.as_ref();

        let pod_cidrs = match spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .filter(|c| !c.is_empty())
        {
            Some(cidrs) => cidrs
                .iter()
                .enumerate()
                .map(|(i, c)| cx.cidr(format!("spec.podCIDRs[{i}]"), c))
                .collect::<Result<_, _>>()?,
            None => match spec
                .and_then(|s| s.pod_cidr.as_ref())
                .filter(|c| !c.is_empty())
            {
                Some(c) => vec![cx.cidr("spec.podCIDR", c)?],
                None => Vec::new(),
            },
        };

        let mut internal_ips = Vec::new();
        let mut external_ips = Vec::new();
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, a) in addresses.into_iter().flatten().enumerate() {
            let list = match a.type_.as_str() {
                "InternalIP" => &mut internal_ips,
                "ExternalIP" => &mut external_ips,
                // Hostname, InternalDNS, ExternalDNS: names, not addresses to program.
                _ => continue,
            };
            list.push(cx.ip(format!("status.addresses[{i}].address"), &a.address)?);
        }

        let labels = labels(&node.metadata.labels);
        let zone = labels
            .get(ZONE_LABEL)
            .or_else(|| labels.get(LEGACY_ZONE_LABEL))
            .cloned();
        Ok(Node {
            name: cx.key.name,
            labels,
            pod_cidrs,
            internal_ips,
            external_ips,
            zone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_a_node() {
        let node: corev1::Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1", "kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "172.30.0.11"},
                {"type": "InternalIP", "address": "fd00:172:30::11"},
                {"type": "ExternalIP", "address": "203.0.113.11"},
                {"type": "Hostname", "address": "node-a"}
            ]}
        }))
        .unwrap();
        let node = Node::try_from(&node).unwrap();
        assert_eq!(node.key(), ObjectKey::cluster("node-a"));
        assert_eq!(node.zone.as_deref(), Some("zone-1"));
        assert_eq!(
            node.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            node.internal_ips,
            vec![
                "172.30.0.11".parse::<IpAddr>().unwrap(),
                "fd00:172:30::11".parse().unwrap()
            ]
        );
        assert_eq!(
            node.external_ips,
            vec!["203.0.113.11".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_pod_cidr_is_an_error() {
        let node: corev1::Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"}, "spec": {"podCIDR": "10.244.1.0"}
        }))
        .unwrap();
        let err = Node::try_from(&node).unwrap_err();
        assert_eq!(
            (err.kind, err.field.as_str(), err.value.as_str()),
            (Kind::Node, "spec.podCIDR", "10.244.1.0")
        );
        assert_eq!(err.object, ObjectKey::cluster("node-a"));
        assert_eq!(err.problem, crate::Problem::InvalidCidr);
    }

    #[test]
    fn converts_a_namespace() {
        let ns: corev1::Namespace = serde_json::from_value(json!({
            "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"}}
        }))
        .unwrap();
        let ns = Namespace::try_from(&ns).unwrap();
        assert_eq!(ns.key(), ObjectKey::cluster("shop"));
        assert_eq!(ns.labels.get("team").map(String::as_str), Some("a"));
    }
}
