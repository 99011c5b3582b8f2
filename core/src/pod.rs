//! Pod (core/v1): only what networking needs.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as corev1;
use serde::Serialize;

use crate::convert::{labels, Ctx};
use crate::net::first_of_family;
use crate::{ConvertError, IpFamily, Kind, Labels, Object, ObjectKey, Problem, Protocol};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `status.podIPs` (falling back to `status.podIP`); the first is the primary.
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    pub annotations: Labels,
    pub node_name: Option<String>,
    /// Defaults to `default`, as the ServiceAccount admission plugin does.
    pub service_account: String,
    pub phase: PodPhase,
    pub host_network: bool,
    /// Ports of the containers and of restartable init containers (sidecars), used to resolve
    /// named ports in NetworkPolicy.
    pub ports: Vec<ContainerPort>,
    /// The Pod's `Ready` condition is True.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum PodPhase {
    /// Also used when the Pod has no status yet.
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerPort {
    pub container: String,
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

impl Pod {
    pub fn ipv4(&self) -> Option<IpAddr> {
        first_of_family(&self.ips, IpFamily::IPv4)
    }

    pub fn ipv6(&self) -> Option<IpAddr> {
        first_of_family(&self.ips, IpFamily::IPv6)
    }

    /// Resolves a named container port, as NetworkPolicy and Service targetPort do.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

impl Object for Pod {
    const KIND: Kind = Kind::Pod;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

impl TryFrom<&corev1::Pod> for Pod {
    type Error = ConvertError;

    fn try_from(pod: &corev1::Pod) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::Pod, &pod.metadata)?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();

        let ips = match status
            .and_then(|s| s.pod_ips.as_ref())
            .filter(|ips| !ips.is_empty())
        {
            Some(ips) => cx.ips("status.podIPs", ips.iter().map(|p| &p.ip))?,
            None => match status
                .and_then(|s| s.pod_ip.as_ref())
                .filter(|ip| !ip.is_empty())
            {
                Some(ip) => vec![cx.ip("status.podIP", ip)?],
                None => Vec::new(),
            },
        };

        let phase = match status.and_then(|s| s.phase.as_deref()) {
            None | Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some("Unknown") => PodPhase::Unknown,
            Some(other) => {
                return Err(cx.err(
                    "status.phase",
                    other,
                    Problem::UnknownValue("Pending, Running, Succeeded, Failed, Unknown"),
                ))
            }
        };

        let mut ports = Vec::new();
        let containers = spec
            .map(|s| {
                s.containers
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ("containers", i, c))
            })
            .into_iter()
            .flatten();
        let sidecars = spec
            .and_then(|s| s.init_containers.as_ref())
            .map(|cs| {
                cs.iter()
                    .enumerate()
                    .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
                    .map(|(i, c)| ("initContainers", i, c))
            })
            .into_iter()
            .flatten();
        for (list, i, c) in containers.chain(sidecars) {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let field = |f: &str| format!("spec.{list}[{i}].ports[{j}].{f}");
                ports.push(ContainerPort {
                    container: c.name.clone(),
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port: cx.port(field("containerPort"), p.container_port)?,
                    protocol: cx.protocol(field("protocol"), p.protocol.as_deref())?,
                });
            }
        }

        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");

        Ok(Pod {
            namespace: cx.key.namespace.clone(),
            name: cx.key.name.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ips,
            labels: labels(&pod.metadata.labels),
            annotations: labels(&pod.metadata.annotations),
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            phase,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(value: serde_json::Value) -> Result<Pod, ConvertError> {
        let pod: corev1::Pod = serde_json::from_value(value).unwrap();
        Pod::try_from(&pod)
    }

    #[test]
    fn converts_a_running_dual_stack_pod() {
        let pod = convert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "1f7c-uid",
                         "labels": {"app": "web"}, "annotations": {"fairlead.io/inject": "true"}},
            "spec": {
                "nodeName": "node-a",
                "serviceAccountName": "web-sa",
                "containers": [
                    {"name": "app", "image": "web:1", "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                        {"name": "dns", "containerPort": 5353, "protocol": "UDP"}
                    ]}
                ],
                "initContainers": [
                    {"name": "setup", "image": "setup:1", "ports": [{"name": "once", "containerPort": 7000}]},
                    {"name": "proxy", "image": "fairlead-proxy:1", "restartPolicy": "Always",
                     "ports": [{"name": "proxy-admin", "containerPort": 4191}]}
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.5",
                "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}],
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"}
                ]
            }
        }))
        .unwrap();
        assert_eq!(pod.key(), ObjectKey::new("shop", "web-0"));
        assert_eq!(pod.uid, "1f7c-uid");
        assert_eq!(pod.ipv4(), Some("10.244.1.5".parse().unwrap()));
        assert_eq!(pod.ipv6(), Some("fd00:10:244:1::5".parse().unwrap()));
        assert_eq!(pod.node_name.as_deref(), Some("node-a"));
        assert_eq!(pod.service_account, "web-sa");
        assert_eq!(pod.phase, PodPhase::Running);
        assert!(pod.ready);
        assert!(!pod.host_network && !pod.terminating);
        assert_eq!(
            pod.annotations
                .get("fairlead.io/inject")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(pod.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(pod.named_port("dns", Protocol::Udp), Some(5353));
        assert_eq!(
            pod.named_port("dns", Protocol::Tcp),
            None,
            "named ports match on protocol too"
        );
        // Sidecar (restartable init container) ports count; one-shot init containers' do not.
        assert_eq!(pod.named_port("proxy-admin", Protocol::Tcp), Some(4191));
        assert_eq!(pod.named_port("once", Protocol::Tcp), None);
    }

    #[test]
    fn a_new_pod_has_defaults() {
        let pod = convert(json!({
            "metadata": {"name": "p", "namespace": "ns", "deletionTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c"}], "hostNetwork": true}
        }))
        .unwrap();
        assert_eq!(pod.phase, PodPhase::Pending);
        assert!(pod.ips.is_empty());
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.node_name, None);
        assert!(!pod.ready);
        assert!(pod.host_network);
        assert!(pod.terminating);
    }

    #[test]
    fn falls_back_to_pod_ip() {
        let pod = convert(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": []},
            "status": {"podIP": "10.244.0.9"}
        }))
        .unwrap();
        assert_eq!(pod.ips, vec!["10.244.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_data_names_the_field() {
        let err = convert(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": []},
            "status": {"podIPs": [{"ip": "10.244.0.9"}, {"ip": "fd00::zz"}]}
        }))
        .unwrap_err();
        assert_eq!(
            (err.kind, err.field.as_str(), err.value.as_str()),
            (Kind::Pod, "status.podIPs[1]", "fd00::zz")
        );

        let err = convert(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "a"}, {"name": "b", "ports": [{"containerPort": -1}]}]}
        }))
        .unwrap_err();
        assert_eq!(err.field, "spec.containers[1].ports[0].containerPort");
    }
}
