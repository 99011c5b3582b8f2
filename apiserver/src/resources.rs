//! The resource registry: which group/version/resource triples the server
//! serves, whether they are namespaced, their subresources, and the discovery
//! documents (`/api`, `/apis`, `/apis/<g>/<v>`) that kubectl and kube-rs read.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::schema::Schema;

/// How objects of a resource are checked on the way in.
#[derive(Debug, Clone)]
pub enum Validation {
    /// A built-in kind: decoded into its k8s-openapi type, which names the bad
    /// field on a type error and tells which fields it does not know.
    Builtin(BuiltinKind),
    /// A custom resource: checked against its CRD's openAPIV3Schema.
    Schema(Arc<Schema>),
    /// Not stored (TokenReview): handled by its own endpoint.
    Virtual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinKind {
    Namespace,
    Service,
    Endpoints,
    EndpointSlice,
    Pod,
    Node,
    NetworkPolicy,
    ServiceAccount,
    Secret,
    ConfigMap,
    Event,
    Lease,
    /// Stored and served (the mesh controller writes its caBundle); never called.
    MutatingWebhookConfiguration,
    CustomResourceDefinition,
}

#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub validation: Validation,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    // One row of the built-in table; a struct literal per row would triple its length.
    #[allow(clippy::too_many_arguments)]
    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        status: bool,
        short: &[&str],
        b: BuiltinKind,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            short_names: short.iter().map(|s| s.to_string()).collect(),
            namespaced,
            status_subresource: status,
            validation: Validation::Builtin(b),
        }
    }

    fn verbs(&self) -> Value {
        match self.validation {
            Validation::Virtual => json!(["create"]),
            _ => json!([
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch"
            ]),
        }
    }
}

/// Group and version of a resource; the store and the router key on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupVersion {
    pub group: String,
    pub version: String,
}

/// All resources the server serves, built-ins first, then CRD-defined ones.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// (group, version, plural) -> type
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn builtin() -> Self {
        use BuiltinKind as B;
        let mut r = Registry::default();
        let list = [
            ResourceType::builtin(
                "",
                "v1",
                "Namespace",
                "namespaces",
                false,
                true,
                &["ns"],
                B::Namespace,
            ),
            ResourceType::builtin(
                "",
                "v1",
                "Service",
                "services",
                true,
                true,
                &["svc"],
                B::Service,
            ),
            ResourceType::builtin(
                "",
                "v1",
                "Endpoints",
                "endpoints",
                true,
                false,
                &["ep"],
                B::Endpoints,
            ),
            ResourceType::builtin("", "v1", "Pod", "pods", true, true, &["po"], B::Pod),
            ResourceType::builtin("", "v1", "Node", "nodes", false, true, &["no"], B::Node),
            ResourceType::builtin(
                "",
                "v1",
                "ServiceAccount",
                "serviceaccounts",
                true,
                false,
                &["sa"],
                B::ServiceAccount,
            ),
            ResourceType::builtin("", "v1", "Secret", "secrets", true, false, &[], B::Secret),
            ResourceType::builtin(
                "",
                "v1",
                "ConfigMap",
                "configmaps",
                true,
                false,
                &["cm"],
                B::ConfigMap,
            ),
            ResourceType::builtin("", "v1", "Event", "events", true, false, &["ev"], B::Event),
            ResourceType::builtin(
                "discovery.k8s.io",
                "v1",
                "EndpointSlice",
                "endpointslices",
                true,
                false,
                &[],
                B::EndpointSlice,
            ),
            ResourceType::builtin(
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
                true,
                false,
                &["netpol"],
                B::NetworkPolicy,
            ),
            ResourceType::builtin(
                "coordination.k8s.io",
                "v1",
                "Lease",
                "leases",
                true,
                false,
                &[],
                B::Lease,
            ),
            ResourceType::builtin(
                "admissionregistration.k8s.io",
                "v1",
                "MutatingWebhookConfiguration",
                "mutatingwebhookconfigurations",
                false,
                false,
                &[],
                B::MutatingWebhookConfiguration,
            ),
            ResourceType::builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
                true,
                &["crd", "crds"],
                B::CustomResourceDefinition,
            ),
        ];
        for t in list {
            r.insert(t);
        }
        r.insert(ResourceType {
            group: "authentication.k8s.io".into(),
            version: "v1".into(),
            kind: "TokenReview".into(),
            plural: "tokenreviews".into(),
            singular: "tokenreview".into(),
            short_names: vec![],
            namespaced: false,
            status_subresource: false,
            validation: Validation::Virtual,
        });
        r
    }

    pub fn insert(&mut self, t: ResourceType) {
        self.types.insert(
            (t.group.clone(), t.version.clone(), t.plural.clone()),
            Arc::new(t),
        );
    }

    pub fn remove_group_plural(&mut self, group: &str, plural: &str) {
        self.types
            .retain(|(g, _, p), _| !(g == group && p == plural));
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.types
            .keys()
            .any(|(g, v, _)| g == group && v == version)
    }

    fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, v, _) in self.types.keys() {
            if g.is_empty() {
                continue;
            }
            let vs = groups.entry(g.clone()).or_default();
            if !vs.contains(v) {
                vs.push(v.clone());
            }
        }
        groups
    }

    /// `GET /api`
    pub fn api_versions(&self) -> Value {
        json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
    }

    fn group_doc(name: &str, versions: &[String]) -> Value {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
    }

    /// `GET /apis`
    pub fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(g, vs)| Self::group_doc(g, vs))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/<group>`
    pub fn api_group(&self, group: &str) -> Option<Value> {
        let groups = self.groups();
        let vs = groups.get(group)?;
        let mut doc = Self::group_doc(group, vs);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        Some(doc)
    }

    /// `GET /api/v1` or `GET /apis/<group>/<version>`
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        if !self.has_group_version(group, version) {
            return None;
        }
        let mut resources = Vec::new();
        for ((g, v, _), t) in &self.types {
            if g != group || v != version {
                continue;
            }
            resources.push(json!({
                "name": t.plural,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": t.verbs(),
                "shortNames": t.short_names,
            }));
            if t.status_subresource {
                resources.push(json!({
                    "name": format!("{}/status", t.plural),
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            if t.kind == "ServiceAccount" {
                resources.push(json!({
                    "name": "serviceaccounts/token",
                    "singularName": "",
                    "namespaced": true,
                    "group": "authentication.k8s.io",
                    "version": "v1",
                    "kind": "TokenRequest",
                    "verbs": ["create"],
                }));
            }
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }))
    }
}

impl Registry {
    /// `GET /openapi/v3`: one entry per group-version, as client-go's
    /// openapi3 root expects.
    pub fn openapi_root(&self) -> Value {
        let mut paths = serde_json::Map::new();
        for (g, v, _) in self.types.keys() {
            let p = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
            );
        }
        json!({"paths": paths})
    }

    /// `GET /openapi/v3/<api/v1|apis/g/v>`: the operations of a group-version.
    /// Only what clients read from it is filled in: the PATCH operation of each
    /// kind with its `x-kubernetes-group-version-kind` and the `fieldValidation`
    /// parameter, which is how kubectl learns that the server validates fields
    /// itself. Schemas are not published (kubectl then relies on the server).
    pub fn openapi_group_version(&self, group: &str, version: &str) -> Option<Value> {
        if !self.has_group_version(group, version) {
            return None;
        }
        let mut paths = serde_json::Map::new();
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        for ((g, v, _), t) in &self.types {
            if g != group || v != version || matches!(t.validation, Validation::Virtual) {
                continue;
            }
            let path = if t.namespaced {
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
            } else {
                format!("{prefix}/{}/{{name}}", t.plural)
            };
            let op = json!({
                "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": {"200": {"description": "OK"}},
            });
            paths.insert(path, json!({"patch": op.clone(), "put": op}));
        }
        Some(json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.35.0"},
            "paths": paths,
            "components": {"schemas": {}},
        }))
    }
}
