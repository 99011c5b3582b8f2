//! EndpointSlice (discovery.k8s.io/v1).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1 as discoveryv1;
use serde::Serialize;

use crate::convert::{labels, Ctx};
use crate::{ConvertError, IpFamily, Kind, Labels, Object, ObjectKey, Problem, Protocol};

/// Label that names the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// Name of the owning Service in the same namespace (label `kubernetes.io/service-name`).
    pub service: Option<String>,
    pub address_type: AddressType,
    /// For FQDN slices this is empty: like kube-proxy, Fairlead does not route to FQDN endpoints
    /// (the type is deprecated), so their addresses are not modelled.
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub conditions: EndpointConditions,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hostname: Option<String>,
    /// Name of the Pod behind this endpoint, when `targetRef` is a Pod.
    pub target_pod: Option<String>,
    /// `hints.forZones`: zones whose clients should prefer this endpoint.
    pub hints_for_zones: Vec<String>,
    /// `hints.forNodes`: nodes whose clients should prefer this endpoint.
    pub hints_for_nodes: Vec<String>,
}

/// Endpoint conditions with Kubernetes' defaults applied: absent `ready` is true (unknown state
/// counts as ready), absent `serving` follows `ready`, absent `terminating` is false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointConditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for EndpointConditions {
    fn default() -> Self {
        Self {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    /// Matches the Service port of the same name; empty for the unnamed port.
    pub name: String,
    pub protocol: Protocol,
    /// `None` means all ports (Kubernetes: "ports are not restricted").
    pub port: Option<u16>,
    pub app_protocol: Option<String>,
}

impl EndpointSlice {
    /// Key of the owning Service, if the slice names one.
    pub fn service_key(&self) -> Option<ObjectKey> {
        self.service
            .as_ref()
            .map(|s| ObjectKey::new(&self.namespace, s))
    }
}

impl Object for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

impl TryFrom<&discoveryv1::EndpointSlice> for EndpointSlice {
    type Error = ConvertError;

    fn try_from(slice: &discoveryv1::EndpointSlice) -> Result<Self, ConvertError> {
        let cx = Ctx::new(Kind::EndpointSlice, &slice.metadata)?;
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            "FQDN" => AddressType::Fqdn,
            other => {
                return Err(cx.err(
                    "addressType",
                    other,
                    Problem::UnknownValue("IPv4, IPv6, FQDN"),
                ))
            }
        };
        let family = match address_type {
            AddressType::IPv4 => Some(IpFamily::IPv4),
            AddressType::IPv6 => Some(IpFamily::IPv6),
            AddressType::Fqdn => None,
        };

        let mut endpoints = Vec::new();
        if let Some(family) = family {
            for (i, ep) in slice.endpoints.iter().enumerate() {
                let field = |f: &str| format!("endpoints[{i}].{f}");
                let mut addresses = Vec::with_capacity(ep.addresses.len());
                for (j, a) in ep.addresses.iter().enumerate() {
                    let ip = cx.ip(field(&format!("addresses[{j}]")), a)?;
                    // A v6 address in a v4 slice would be programmed into the wrong map.
                    if IpFamily::of(&ip) != family {
                        return Err(cx.err(
                            field(&format!("addresses[{j}]")),
                            a,
                            Problem::Invalid(format!(
                                "does not match addressType {}",
                                slice.address_type
                            )),
                        ));
                    }
                    addresses.push(ip);
                }
                let c = ep.conditions.clone().unwrap_or_default();
                let ready = c.ready.unwrap_or(true);
                let hints = ep.hints.as_ref();
                endpoints.push(Endpoint {
                    addresses,
                    conditions: EndpointConditions {
                        ready,
                        serving: c.serving.unwrap_or(ready),
                        terminating: c.terminating.unwrap_or(false),
                    },
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    hostname: ep.hostname.clone(),
                    target_pod: ep
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
                        .and_then(|r| r.name.clone()),
                    hints_for_zones: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|z| z.name.clone()).collect())
                        .unwrap_or_default(),
                    hints_for_nodes: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .map(|n| n.iter().map(|n| n.name.clone()).collect())
                        .unwrap_or_default(),
                });
            }
        }

        let ports = slice
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let field = |f: &str| format!("ports[{i}].{f}");
                Ok(EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: cx.protocol(field("protocol"), p.protocol.as_deref())?,
                    port: p.port.map(|n| cx.port(field("port"), n)).transpose()?,
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect::<Result<_, ConvertError>>()?;

        let labels = labels(&slice.metadata.labels);
        Ok(EndpointSlice {
            namespace: cx.key.namespace.clone(),
            name: cx.key.name.clone(),
            service: labels
                .get(SERVICE_NAME_LABEL)
                .filter(|s| !s.is_empty())
                .cloned(),
            address_type,
            endpoints,
            ports,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(value: serde_json::Value) -> Result<EndpointSlice, ConvertError> {
        let slice: discoveryv1::EndpointSlice = serde_json::from_value(value).unwrap();
        EndpointSlice::try_from(&slice)
    }

    #[test]
    fn converts_a_slice_from_the_endpointslice_controller() {
        let slice = convert(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"],
                 "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-a", "zone": "zone-1", "hostname": "web-0",
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "u1"},
                 "hints": {"forZones": [{"name": "zone-1"}], "forNodes": [{"name": "node-a"}]}},
                {"addresses": ["10.244.2.9"],
                 "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "node-b"}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
        }))
        .unwrap();
        assert_eq!(slice.service.as_deref(), Some("web"));
        assert_eq!(slice.service_key(), Some(ObjectKey::new("shop", "web")));
        assert_eq!(slice.address_type, AddressType::IPv4);
        let a = &slice.endpoints[0];
        assert_eq!(a.addresses, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            a.conditions,
            EndpointConditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(a.node_name.as_deref(), Some("node-a"));
        assert_eq!(a.zone.as_deref(), Some("zone-1"));
        assert_eq!(a.hostname.as_deref(), Some("web-0"));
        assert_eq!(a.target_pod.as_deref(), Some("web-0"));
        assert_eq!(a.hints_for_zones, vec!["zone-1".to_owned()]);
        assert_eq!(a.hints_for_nodes, vec!["node-a".to_owned()]);
        let b = &slice.endpoints[1];
        assert_eq!(
            b.conditions,
            EndpointConditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(
            slice.ports,
            vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: Some(8080),
                app_protocol: Some("http".into())
            }]
        );
    }

    #[test]
    fn endpoint_conditions_default_like_kubernetes() {
        let slice = convert(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv6",
            "endpoints": [
                {"addresses": ["fd00:10:244::5"]},
                {"addresses": ["fd00:10:244::6"], "conditions": {}},
                {"addresses": ["fd00:10:244::7"], "conditions": {"ready": false}},
                {"addresses": ["fd00:10:244::8"], "conditions": {"terminating": true, "serving": false}}
            ],
            "ports": [{}]
        }))
        .unwrap();
        let conds: Vec<_> = slice.endpoints.iter().map(|e| e.conditions).collect();
        // Absent ready counts as ready; absent serving follows ready; absent terminating is false.
        assert_eq!(
            conds[0],
            EndpointConditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(
            conds[1],
            EndpointConditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(
            conds[2],
            EndpointConditions {
                ready: false,
                serving: false,
                terminating: false
            }
        );
        assert_eq!(
            conds[3],
            EndpointConditions {
                ready: true,
                serving: false,
                terminating: true
            }
        );
        assert_eq!(slice.service, None);
        // A port with nothing set: unnamed, TCP, all ports.
        assert_eq!(
            slice.ports,
            vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: None,
                app_protocol: None
            }]
        );
    }

    #[test]
    fn bad_addresses_are_errors() {
        let err = convert(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2", "not-an-ip"]}]
        }))
        .unwrap_err();
        assert_eq!(err.kind, Kind::EndpointSlice);
        assert_eq!(err.object, ObjectKey::new("ns", "s"));
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("endpoints[1].addresses[1]", "not-an-ip")
        );

        let err = convert(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["fd00::1"]}]
        }))
        .unwrap_err();
        assert_eq!(err.field, "endpoints[0].addresses[0]");

        let err = convert(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv4", "endpoints": [], "ports": [{"port": 0}]
        }))
        .unwrap_err();
        assert_eq!(err.field, "ports[0].port");
    }

    #[test]
    fn fqdn_slices_keep_ports_but_no_addresses() {
        let slice = convert(json!({
            "metadata": {"name": "s", "namespace": "ns", "labels": {"kubernetes.io/service-name": "x"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
            "ports": [{"port": 5432}]
        }))
        .unwrap();
        assert_eq!(slice.address_type, AddressType::Fqdn);
        assert!(slice.endpoints.is_empty());
        assert_eq!(slice.ports[0].port, Some(5432));
    }
}
