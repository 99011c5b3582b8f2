//! The EndpointSlice controller's job, for the sandbox: from each Service's
//! selector and the pods that match it, the EndpointSlices that should exist
//! (one per address family, `<service>-fl4` / `<service>-fl6`), with ready /
//! serving / terminating conditions, node names and resolved target ports.
//! `desired` is a pure function of the snapshot; `Reconciler` writes only the
//! slices whose content changed, through the API like any controller.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fairlead_core::{PodPhase, PortRef, Protocol, ServiceType, Snapshot};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

pub const MANAGED_BY: &str = "fairlead-sandbox";

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// (namespace, name) -> EndpointSlice manifest.
pub fn desired(snap: &Snapshot) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for svc in snap.services().values() {
        if svc.selector.is_empty() || svc.service_type == ServiceType::ExternalName {
            continue;
        }
        let pods: Vec<_> = snap
            .pods()
            .in_namespace(&svc.namespace)
            .filter(|p| !p.host_network && !p.ips.is_empty())
            .filter(|p| !matches!(p.phase, PodPhase::Succeeded | PodPhase::Failed))
            .filter(|p| svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect();
        for (family, suffix) in [(false, "fl4"), (true, "fl6")] {
            let mut endpoints = Vec::new();
            // Ports are resolved from the first pod that has them all; pods that
            // name ports differently would need slices of their own (not done).
            let mut ports: Option<Vec<Value>> = None;
            for pod in &pods {
                let Some(addr) = pod.ips.iter().find(|ip| ip.is_ipv6() == family) else {
                    continue;
                };
                let resolved: Option<Vec<Value>> = svc
                    .ports
                    .iter()
                    .map(|sp| {
                        let port = match &sp.target_port {
                            PortRef::Number(n) => Some(*n),
                            PortRef::Name(name) => pod.named_port(name, sp.protocol),
                        }?;
                        Some(json!({"name": sp.name, "protocol": proto(sp.protocol), "port": port}))
                    })
                    .collect();
                let Some(resolved) = resolved else { continue };
                if ports.is_none() {
                    ports = Some(resolved);
                }
                let ready = pod.ready && !pod.terminating;
                let mut ep = json!({
                    "addresses": [addr.to_string()],
                    "conditions": {"ready": ready || (svc.publish_not_ready_addresses && !pod.terminating), "serving": pod.ready, "terminating": pod.terminating},
                    "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
                });
                if let Some(node) = &pod.node_name {
                    ep["nodeName"] = json!(node);
                    if let Some(zone) = snap.node(node).and_then(|n| n.zone.clone()) {
                        ep["zone"] = json!(zone);
                    }
                }
                endpoints.push(ep);
            }
            let wants_family = svc
                .cluster_ips
                .ips()
                .iter()
                .any(|ip: &IpAddr| ip.is_ipv6() == family)
                || (svc.cluster_ips.ips().is_empty() && !endpoints.is_empty());
            if !wants_family {
                continue;
            }
            let name = format!("{}-{suffix}", svc.name);
            out.insert(
                (svc.namespace.clone(), name.clone()),
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": svc.namespace, "labels": {
                        "kubernetes.io/service-name": svc.name,
                        "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                    }},
                    "addressType": if family { "IPv6" } else { "IPv4" },
                    "endpoints": endpoints,
                    "ports": ports.unwrap_or_default(),
                }),
            );
        }
    }
    out
}

/// Applies `desired` through the API, remembering what it wrote so that only
/// changed slices are written again.
pub struct Reconciler {
    client: kube::Client,
    applied: BTreeMap<(String, String), Value>,
}

impl Reconciler {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            applied: BTreeMap::new(),
        }
    }

    pub async fn reconcile(&mut self, snap: &Snapshot) -> Result<usize, kube::Error> {
        let want = desired(snap);
        let mut writes = 0;
        for (key, slice) in &want {
            if self.applied.get(key) == Some(slice) {
                continue;
            }
            let api: Api<kube::core::DynamicObject> = self.api(&key.0);
            // Merge patch replaces the arrays whole, which is what a slice update is.
            match api
                .patch(&key.1, &PatchParams::default(), &Patch::Merge(slice))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    api.create(
                        &PostParams::default(),
                        &serde_json::from_value(slice.clone()).expect("manifest"),
                    )
                    .await?;
                }
                Err(e) => return Err(e),
            }
            self.applied.insert(key.clone(), slice.clone());
            writes += 1;
        }
        let gone: Vec<_> = self
            .applied
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            match self
                .api(&key.0)
                .delete(&key.1, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
            self.applied.remove(&key);
            writes += 1;
        }
        Ok(writes)
    }

    fn api(&self, ns: &str) -> Api<kube::core::DynamicObject> {
        let ar = kube::discovery::ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1".into(),
            api_version: "discovery.k8s.io/v1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        };
        Api::namespaced_with(self.client.clone(), ns, &ar)
    }
}
