//! Service (core/v1).

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::convert::{labels, Ctx};
use crate::net::first_of_family;
use crate::{ConvertError, IpFamily, Kind, Labels, Object, ObjectKey, PortRef, Problem, Protocol};

/// Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Kubernetes' upper bound for the session affinity timeout (one day).
const MAX_SESSION_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    pub cluster_ips: ClusterIps,
    /// Families in the order the API server allocated them; the first is the primary.
    pub ip_families: Vec<IpFamily>,
    pub ip_family_policy: IpFamilyPolicy,
    /// Empty means the Service has no selector: its EndpointSlices are managed by someone else.
    pub selector: Labels,
    pub session_affinity: SessionAffinity,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress` entries that carry an IP (hostname-only ones are dropped:
    /// the data plane cannot match them).
    pub load_balancer_ingress: Vec<LoadBalancerIngress>,
    /// Target of an ExternalName Service (a DNS CNAME).
    pub external_name: Option<String>,
    pub publish_not_ready_addresses: bool,
    /// Node port answering health checks for LoadBalancer Services with Local traffic policy.
    pub health_check_node_port: Option<u16>,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Empty for an unnamed port; EndpointSlice ports are matched to it by this name.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Defaults to `port` when absent, as Kubernetes does.
    pub target_port: PortRef,
    pub node_port: Option<u16>,
    pub app_protocol: Option<String>,
}

/// The Service's virtual IPs. Headless (`clusterIP: None`) and not-yet-allocated are different:
/// DNS answers a headless name with pod IPs, and an unallocated Service has no VIP at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub enum ClusterIps {
    /// No cluster IP (ExternalName, or not allocated yet).
    #[default]
    Unassigned,
    Headless,
    /// One IP per family; the first is the primary (`spec.clusterIP`).
    Assigned(Vec<IpAddr>),
}

impl ClusterIps {
    pub fn ips(&self) -> &[IpAddr] {
        match self {
            ClusterIps::Assigned(ips) => ips,
            _ => &[],
        }
    }

    pub fn ipv4(&self) -> Option<IpAddr> {
        first_of_family(self.ips(), IpFamily::IPv4)
    }

    pub fn ipv6(&self) -> Option<IpAddr> {
        first_of_family(self.ips(), IpFamily::IPv6)
    }

    pub fn is_headless(&self) -> bool {
        matches!(self, ClusterIps::Headless)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum IpFamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SessionAffinity {
    None,
    ClientIp { timeout_seconds: u32 },
}

/// External and internal traffic policy; absent means Cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadBalancerIngress {
    pub ip: IpAddr,
    pub ip_mode: IpMode,
}

/// `ipMode` of a load-balancer ingress: with `Proxy` the load balancer rewrites the destination, so
/// nodes must not capture traffic to that IP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum IpMode {
    #[default]
    Vip,
    Proxy,
}

impl Service {
    /// The port with this name (`""` for the unnamed port).
    pub fn port_named(&self, name: &str) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.name == name)
    }
}

impl Object for Service {
    const KIND: Kind = Kind::Service;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

impl TryFrom<&corev1::Service> for Service {
    type Error = ConvertError;

    fn try_from(svc: &corev1::Service) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::Service, &svc.metadata)?;
        let default_spec = corev1::ServiceSpec::default();
        let spec = svc.spec.as_ref().unwrap_or(&default_spec);

        let service_type = match spec.type_.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIP,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(cx.err(
                    "spec.type",
                    other,
                    Problem::UnknownValue("ClusterIP, NodePort, LoadBalancer, ExternalName"),
                ))
            }
        };

        let ports = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let field = |f: &str| format!("spec.ports[{i}].{f}");
                let port = cx.port(field("port"), p.port)?;
                Ok(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: cx.protocol(field("protocol"), p.protocol.as_deref())?,
                    port,
                    // The API server defaults an absent, 0 or "" targetPort to the port.
                    target_port: match &p.target_port {
                        None | Some(IntOrString::Int(0)) => PortRef::Number(port),
                        Some(IntOrString::String(s)) if s.is_empty() => PortRef::Number(port),
                        Some(t) => cx.port_ref(field("targetPort"), t)?,
                    },
                    node_port: cx.optional_port(field("nodePort"), p.node_port)?,
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;

        // clusterIPs is authoritative when set; older objects only carry clusterIP.
        let (ips_field, raw_ips): (&str, Vec<&String>) = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ("spec.clusterIPs", ips.iter().collect()),
            _ => ("spec.clusterIP", spec.cluster_ip.iter().collect()),
        };
        let cluster_ips = match raw_ips.first().map(|s| s.as_str()) {
            None | Some("") => ClusterIps::Unassigned,
            Some("None") => ClusterIps::Headless,
            Some(_) => ClusterIps::Assigned(
                raw_ips
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| cx.ip(format!("{ips_field}[{i}]"), ip))
                    .collect::<Result<_, _>>()?,
            ),
        };

        let ip_families = spec
            .ip_families
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, f)| cx.ip_family(format!("spec.ipFamilies[{i}]"), f))
            .collect::<Result<_, _>>()?;

        let ip_family_policy = match spec.ip_family_policy.as_deref() {
            None | Some("SingleStack") => IpFamilyPolicy::SingleStack,
            Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
            Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
            Some(other) => {
                return Err(cx.err(
                    "spec.ipFamilyPolicy",
                    other,
                    Problem::UnknownValue("SingleStack, PreferDualStack, RequireDualStack"),
                ))
            }
        };

        let session_affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => SessionAffinity::None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                let timeout_seconds = match timeout {
                    None => DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS,
                    Some(t) if (1..=MAX_SESSION_AFFINITY_TIMEOUT_SECONDS).contains(&t) => t as u32,
                    Some(t) => {
                        return Err(cx.err(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            t,
                            Problem::OutOfRange("1..=86400"),
                        ))
                    }
                };
                SessionAffinity::ClientIp { timeout_seconds }
            }
            Some(other) => {
                return Err(cx.err(
                    "spec.sessionAffinity",
                    other,
                    Problem::UnknownValue("None, ClientIP"),
                ))
            }
        };

        let traffic_policy = |field: &str, value: Option<&str>| match value {
            // "Global" is the pre-1.22 spelling of Cluster.
            None | Some("Cluster") | Some("Global") => Ok(TrafficPolicy::Cluster),
            Some("Local") => Ok(TrafficPolicy::Local),
            Some(other) => Err(cx.err(field, other, Problem::UnknownValue("Cluster, Local"))),
        };

        let mut load_balancer_ingress = Vec::new();
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            let field = |f: &str| format!("status.loadBalancer.ingress[{i}].{f}");
            let ip_mode = match ing.ip_mode.as_deref() {
                None | Some("VIP") => IpMode::Vip,
                Some("Proxy") => IpMode::Proxy,
                Some(other) => {
                    return Err(cx.err(field("ipMode"), other, Problem::UnknownValue("VIP, Proxy")))
                }
            };
            load_balancer_ingress.push(LoadBalancerIngress {
                ip: cx.ip(field("ip"), ip)?,
                ip_mode,
            });
        }

        let external_name = spec.external_name.clone().filter(|n| !n.is_empty());
        if service_type == ServiceType::ExternalName && external_name.is_none() {
            return Err(cx.err("spec.externalName", "", Problem::Missing));
        }

        Ok(Service {
            namespace: cx.key.namespace.clone(),
            name: cx.key.name.clone(),
            service_type,
            ports,
            cluster_ips,
            ip_families,
            ip_family_policy,
            selector: labels(&spec.selector),
            session_affinity,
            external_traffic_policy: traffic_policy(
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
            )?,
            internal_traffic_policy: traffic_policy(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            external_ips: cx.ips("spec.externalIPs", spec.external_ips.iter().flatten())?,
            load_balancer_ingress,
            external_name,
            publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
            health_check_node_port: cx
                .optional_port("spec.healthCheckNodePort", spec.health_check_node_port)?,
            labels: labels(&svc.metadata.labels),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(value: serde_json::Value) -> Result<Service, ConvertError> {
        let svc: corev1::Service = serde_json::from_value(value).unwrap();
        Service::try_from(&svc)
    }

    #[test]
    fn converts_a_dual_stack_load_balancer() {
        let svc = convert(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "type": "LoadBalancer",
                "selector": {"app": "web"},
                "clusterIP": "10.96.0.20",
                "clusterIPs": ["10.96.0.20", "fd00:10:96::20"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP", "appProtocol": "http"},
                    {"name": "dns", "port": 53, "targetPort": 5353, "nodePort": 30053, "protocol": "UDP"}
                ],
                "externalIPs": ["192.0.2.10"],
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7"},
                {"hostname": "lb.example.com"},
                {"ip": "198.51.100.8", "ipMode": "Proxy"}
            ]}}
        }))
        .unwrap();

        assert_eq!(svc.key(), ObjectKey::new("shop", "web"));
        assert_eq!(svc.service_type, ServiceType::LoadBalancer);
        assert_eq!(svc.cluster_ips.ipv4(), Some("10.96.0.20".parse().unwrap()));
        assert_eq!(
            svc.cluster_ips.ipv6(),
            Some("fd00:10:96::20".parse().unwrap())
        );
        assert_eq!(svc.ip_families, vec![IpFamily::IPv4, IpFamily::IPv6]);
        assert_eq!(svc.ip_family_policy, IpFamilyPolicy::PreferDualStack);
        assert_eq!(
            svc.ports[0],
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: PortRef::Name("http".into()),
                node_port: Some(30080),
                app_protocol: Some("http".into()),
            }
        );
        assert_eq!(svc.ports[1].protocol, Protocol::Udp);
        assert_eq!(svc.ports[1].target_port, PortRef::Number(5353));
        assert_eq!(svc.port_named("dns").map(|p| p.port), Some(53));
        assert_eq!(
            svc.external_ips,
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(svc.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(svc.internal_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(svc.health_check_node_port, Some(32000));
        assert_eq!(
            svc.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 60
            }
        );
        // The hostname-only ingress is dropped; ipMode is kept.
        assert_eq!(
            svc.load_balancer_ingress,
            vec![
                LoadBalancerIngress {
                    ip: "198.51.100.7".parse().unwrap(),
                    ip_mode: IpMode::Vip
                },
                LoadBalancerIngress {
                    ip: "198.51.100.8".parse().unwrap(),
                    ip_mode: IpMode::Proxy
                },
            ]
        );
        assert_eq!(svc.selector.get("app").map(String::as_str), Some("web"));
        assert_eq!(svc.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn applies_kubernetes_defaults() {
        let svc = convert(json!({
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}, {"name": "b", "port": 8443, "targetPort": 0}],
                     "sessionAffinity": "ClientIP"}
        }))
        .unwrap();
        assert_eq!(svc.service_type, ServiceType::ClusterIP);
        assert_eq!(
            svc.cluster_ips,
            ClusterIps::Assigned(vec!["10.96.0.1".parse().unwrap()])
        );
        let port = &svc.ports[0];
        assert_eq!(port.name, "");
        assert_eq!(port.protocol, Protocol::Tcp);
        assert_eq!(
            port.target_port,
            PortRef::Number(443),
            "targetPort defaults to port"
        );
        assert_eq!(port.node_port, None);
        assert_eq!(svc.ports[1].target_port, PortRef::Number(8443));
        assert_eq!(
            svc.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS
            }
        );
        assert_eq!(DEFAULT_SESSION_AFFINITY_TIMEOUT_SECONDS, 10_800);
        assert_eq!(svc.ip_family_policy, IpFamilyPolicy::SingleStack);
        assert_eq!(svc.external_traffic_policy, TrafficPolicy::Cluster);
        assert!(!svc.publish_not_ready_addresses);
        assert!(svc.selector.is_empty());
    }

    #[test]
    fn distinguishes_headless_from_unassigned() {
        let headless = convert(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
                     "publishNotReadyAddresses": true}
        }))
        .unwrap();
        assert!(headless.cluster_ips.is_headless());
        assert!(headless.cluster_ips.ips().is_empty());
        assert!(headless.publish_not_ready_addresses);

        let pending =
            convert(json!({"metadata": {"name": "new", "namespace": "shop"}, "spec": {}})).unwrap();
        assert_eq!(pending.cluster_ips, ClusterIps::Unassigned);

        let external = convert(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}
        }))
        .unwrap();
        assert_eq!(external.service_type, ServiceType::ExternalName);
        assert_eq!(external.external_name.as_deref(), Some("db.example.com"));
        assert_eq!(external.cluster_ips, ClusterIps::Unassigned);
    }

    #[test]
    fn bad_data_names_object_field_and_value() {
        let err = convert(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIPs": ["10.96.0.20", "10.96.0.300"]}
        }))
        .unwrap_err();
        assert_eq!(err.kind, Kind::Service);
        assert_eq!(err.object, ObjectKey::new("shop", "web"));
        assert_eq!(err.field, "spec.clusterIPs[1]");
        assert_eq!(err.value, "10.96.0.300");
        assert_eq!(err.problem, Problem::InvalidIp);
        let msg = err.to_string();
        assert!(
            msg.contains("shop/web")
                && msg.contains("spec.clusterIPs[1]")
                && msg.contains("10.96.0.300"),
            "{msg}"
        );

        let err = convert(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"port": 80}, {"port": 70000}]}
        }))
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.ports[1].port", "70000")
        );
        assert_eq!(err.problem, Problem::PortOutOfRange);

        let err = convert(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}
        }))
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.ports[0].protocol", "ICMP")
        );

        let err = convert(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}
        }))
        .unwrap_err();
        assert_eq!(
            err.field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );

        let err = convert(json!({"metadata": {"namespace": "shop"}, "spec": {}})).unwrap_err();
        assert_eq!(
            (err.field.as_str(), &err.problem),
            ("metadata.name", &Problem::Missing)
        );
    }
}
