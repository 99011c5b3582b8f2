//! Admission for objects on their way into the store: decoding checks for
//! built-in kinds (through their k8s-openapi types), metadata checks, and the
//! per-kind validation and defaulting the real API server does (Service
//! clusterIP and nodePort allocation among them).

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::resources::{BuiltinKind, ResourceType, Validation};

/// How the client asked unknown fields to be treated (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> ApiResult<Self> {
        match s {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation {other:?} is not supported: use Ignore, Warn or Strict"
            ))),
        }
    }
}

/// Decodes a built-in kind through its typed form. A type error names the
/// JSON path; fields the type does not know are returned so the caller can
/// reject (Strict) or warn (Warn) and prune them, as the real server does.
fn roundtrip<T: DeserializeOwned + Serialize>(
    kind: &str,
    v: &Value,
) -> ApiResult<(Value, Vec<String>)> {
    let typed: T = serde_path_to_error::deserialize(v).map_err(|e| {
        ApiError::bad_request(format!(
            "error decoding {kind}: field {}: {}",
            e.path(),
            e.inner()
        ))
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut unknown = Vec::new();
    find_dropped(v, &back, "", &mut unknown);
    Ok((back, unknown))
}

/// Paths present (and non-null) in `orig` but missing from `back`.
fn find_dropped(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None if !va.is_null() => out.push(p),
                    Some(vb) => find_dropped(va, vb, &p, out),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                find_dropped(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && (s.is_empty()
            || (s.as_bytes()[0].is_ascii_alphanumeric()
                && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()))
}

/// Checks the name and labels; `label_name` is true for kinds whose names
/// must be DNS-1123 labels (Namespace, Service), not subdomains.
pub fn check_metadata(rt: &ResourceType, obj: &Value, causes: &mut Vec<Cause>) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let label_name = matches!(rt.kind.as_str(), "Namespace" | "Service");
    let ok = if label_name {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        causes.push(Cause::new(
            "metadata.name",
            "FieldValueInvalid",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-'{}, and must start and end with an alphanumeric character",
                if label_name { "label" } else { "subdomain" },
                if label_name { "" } else { " or '.'" }
            ),
        ));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(|v| v.as_object()) {
        for (k, v) in labels {
            let val = v.as_str().unwrap_or("");
            let (prefix, key) = k.rsplit_once('/').unwrap_or(("", k));
            if key.is_empty()
                || !is_label_value(key)
                || (!prefix.is_empty() && !is_dns_subdomain(prefix))
            {
                causes.push(Cause::new("metadata.labels", "FieldValueInvalid", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")));
            }
            if !v.is_string() || !is_label_value(val) {
                causes.push(Cause::new(format!("metadata.labels.{k}"), "FieldValueInvalid", format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', at most 63 characters")));
            }
        }
    }
}

/// Result of decoding: the pruned object plus the unknown-field paths.
#[derive(Debug)]
pub struct Decoded {
    pub obj: Value,
    pub unknown: Vec<String>,
}

/// Decodes a built-in object through its typed form.
pub fn decode_builtin(kind: BuiltinKind, obj: &Value) -> ApiResult<Decoded> {
    use k8s_openapi::api::{
        coordination::v1 as coord, core::v1 as core, discovery::v1 as disc, networking::v1 as net,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    let name = format!("{kind:?}");
    let (obj, unknown) = match kind {
        BuiltinKind::Namespace => roundtrip::<core::Namespace>(&name, obj)?,
        BuiltinKind::Service => roundtrip::<core::Service>(&name, obj)?,
        BuiltinKind::Endpoints => roundtrip::<core::Endpoints>(&name, obj)?,
        BuiltinKind::Pod => roundtrip::<core::Pod>(&name, obj)?,
        BuiltinKind::Node => roundtrip::<core::Node>(&name, obj)?,
        BuiltinKind::ServiceAccount => roundtrip::<core::ServiceAccount>(&name, obj)?,
        BuiltinKind::Secret => roundtrip::<core::Secret>(&name, obj)?,
        BuiltinKind::ConfigMap => roundtrip::<core::ConfigMap>(&name, obj)?,
        BuiltinKind::Event => roundtrip::<core::Event>(&name, obj)?,
        BuiltinKind::EndpointSlice => roundtrip::<disc::EndpointSlice>(&name, obj)?,
        BuiltinKind::NetworkPolicy => roundtrip::<net::NetworkPolicy>(&name, obj)?,
        BuiltinKind::Lease => roundtrip::<coord::Lease>(&name, obj)?,
        BuiltinKind::MutatingWebhookConfiguration => roundtrip::<
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        >(&name, obj)?,
        BuiltinKind::CustomResourceDefinition => {
            roundtrip::<ext::CustomResourceDefinition>(&name, obj)?
        }
    };
    Ok(Decoded { obj, unknown })
}

/// Decodes and prunes an object of any kind; for custom resources the CRD
/// schema is applied here too.
pub fn decode(rt: &ResourceType, obj: &Value, fv: FieldValidation) -> ApiResult<Decoded> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let decoded = match &rt.validation {
        Validation::Builtin(k) => decode_builtin(*k, obj)?,
        Validation::Schema(schema) => {
            let mut v = obj.clone();
            let mut causes = Vec::new();
            let mut unknown = Vec::new();
            // metadata goes through ObjectMeta so it is checked like any other kind's.
            let meta = v.get("metadata").cloned().unwrap_or(json!({}));
            let (meta, meta_unknown) = roundtrip::<
                k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            >("metadata", &meta)?;
            unknown.extend(meta_unknown.into_iter().map(|p| format!(".metadata{p}")));
            let map = v.as_object_mut().expect("checked object");
            let mut rest = Value::Object(
                map.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            schema.validate(&mut rest, "", &mut causes, &mut unknown);
            if !causes.is_empty() {
                for c in &mut causes {
                    c.field = c.field.trim_start_matches('.').to_string();
                }
                return Err(ApiError::invalid(&rt.kind, &rt.group, name, causes));
            }
            let mut out = rest.as_object().cloned().unwrap_or_default();
            out.insert("apiVersion".into(), map["apiVersion"].clone());
            out.insert("kind".into(), map["kind"].clone());
            out.insert("metadata".into(), meta);
            Decoded {
                obj: Value::Object(out),
                unknown,
            }
        }
        Validation::Virtual => {
            return Err(ApiError::method_not_allowed(format!(
                "{} objects are not stored; only create is supported",
                rt.kind
            )))
        }
    };
    if fv == FieldValidation::Strict && !decoded.unknown.is_empty() {
        let causes = decoded
            .unknown
            .iter()
            .map(|p| {
                Cause::new(
                    p.trim_start_matches('.'),
                    "FieldValueInvalid",
                    format!("unknown field {:?}", p.trim_start_matches('.')),
                )
            })
            .collect();
        return Err(ApiError::invalid(&rt.kind, &rt.group, name, causes));
    }
    Ok(decoded)
}

/// The service CIDRs and the addresses and node ports handed out from them.
#[derive(Debug, Clone)]
pub struct ServiceAllocator {
    pub v4: (u32, u8),
    pub v6: (u128, u8),
    pub ips: BTreeSet<IpAddr>,
    pub node_ports: BTreeSet<u16>,
    next_v4: u32,
    next_v6: u128,
    next_port: u16,
}

pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

impl ServiceAllocator {
    pub fn new(v4: (std::net::Ipv4Addr, u8), v6: (std::net::Ipv6Addr, u8)) -> Self {
        Self {
            v4: (u32::from(v4.0), v4.1),
            v6: (u128::from(v6.0), v6.1),
            ips: BTreeSet::new(),
            node_ports: BTreeSet::new(),
            next_v4: 1,
            next_v6: 1,
            next_port: *NODE_PORT_RANGE.start(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - self.v4.1 as u32).unwrap_or(0);
                u32::from(a) & mask == self.v4.0 & mask
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - self.v6.1 as u32).unwrap_or(0);
                u128::from(a) & mask == self.v6.0 & mask
            }
        }
    }

    fn cidr_text(&self, v6: bool) -> String {
        if v6 {
            format!("{}/{}", std::net::Ipv6Addr::from(self.v6.0), self.v6.1)
        } else {
            format!("{}/{}", std::net::Ipv4Addr::from(self.v4.0), self.v4.1)
        }
    }

    /// Next free address, round-robin from the last one handed out, skipping
    /// the network address and .10 (reserved for cluster DNS by convention).
    fn allocate(&mut self, v6: bool) -> Option<IpAddr> {
        let size: u128 = if v6 {
            1u128 << (128 - self.v6.1 as u32).min(64)
        } else {
            1u128 << (32 - self.v4.1 as u32)
        };
        for _ in 0..size {
            let ip = if v6 {
                let off = self.next_v6;
                self.next_v6 = if off + 1 >= size { 1 } else { off + 1 };
                IpAddr::V6(std::net::Ipv6Addr::from(self.v6.0 + off))
            } else {
                let off = self.next_v4;
                self.next_v4 = if (off as u128) + 2 >= size {
                    1
                } else {
                    off + 1
                };
                IpAddr::V4(std::net::Ipv4Addr::from(self.v4.0 + off))
            };
            let dns_reserved = match ip {
                IpAddr::V4(a) => u32::from(a) - self.v4.0 == 10,
                IpAddr::V6(a) => u128::from(a) - self.v6.0 == 10,
            };
            if !dns_reserved && !self.ips.contains(&ip) {
                self.ips.insert(ip);
                return Some(ip);
            }
        }
        None
    }

    fn allocate_port(&mut self) -> Option<u16> {
        for _ in NODE_PORT_RANGE {
            let p = self.next_port;
            self.next_port = if p >= *NODE_PORT_RANGE.end() {
                *NODE_PORT_RANGE.start()
            } else {
                p + 1
            };
            if self.node_ports.insert(p) {
                return Some(p);
            }
        }
        None
    }

    /// Records what an existing Service holds (on update or when rebuilding).
    pub fn release(&mut self, svc: &Value) {
        for ip in cluster_ips(svc) {
            self.ips.remove(&ip);
        }
        for p in node_ports(svc) {
            self.node_ports.remove(&p);
        }
    }
}

fn cluster_ips(svc: &Value) -> Vec<IpAddr> {
    svc.pointer("/spec/clusterIPs")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn node_ports(svc: &Value) -> Vec<u16> {
    svc.pointer("/spec/ports")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("nodePort")?.as_u64().map(|n| n as u16))
                .collect()
        })
        .unwrap_or_default()
}

fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Defaults and validates a Service, allocating clusterIPs and nodePorts on
/// create. `old` is the stored Service on update, whose allocations are
/// immutable and carried over.
pub fn admit_service(
    svc: &mut Value,
    old: Option<&Value>,
    alloc: &mut ServiceAllocator,
) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let spec = svc
        .as_object_mut()
        .expect("object")
        .entry("spec")
        .or_insert_with(|| json!({}));
    if !spec.is_object() {
        return Err(vec![Cause::new(
            "spec",
            "FieldValueInvalid",
            "must be an object",
        )]);
    }
    let ty = spec
        .get("type")
        .and_then(|v| v.as_str())
        .unwrap_or("ClusterIP")
        .to_string();
    if !matches!(
        ty.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        causes.push(Cause::new("spec.type", "FieldValueNotSupported", format!("Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"")));
    }
    spec["type"] = json!(ty);
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    match spec["sessionAffinity"].as_str() {
        Some("None") => {}
        Some("ClientIP") => {
            let t = spec
                .pointer("/sessionAffinityConfig/clientIP/timeoutSeconds")
                .and_then(|v| v.as_i64())
                .unwrap_or(10800);
            if !(1..=86400).contains(&t) {
                causes.push(Cause::new(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    "FieldValueInvalid",
                    format!("Invalid value: {t}: must be greater than 0 and less than 86400"),
                ));
            }
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        other => causes.push(Cause::new(
            "spec.sessionAffinity",
            "FieldValueNotSupported",
            format!("Unsupported value: {other:?}: supported values: \"ClientIP\", \"None\""),
        )),
    }
    if ty == "ExternalName" {
        let en = spec
            .get("externalName")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if en.is_empty() || !is_dns_subdomain(en.trim_end_matches('.')) {
            causes.push(Cause::new("spec.externalName", "FieldValueRequired", format!("Invalid value: {en:?}: an ExternalName Service needs a DNS-1123 subdomain name")));
        }
    }
    if ty != "ExternalName" && spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    if matches!(ty.as_str(), "NodePort" | "LoadBalancer")
        && spec.get("externalTrafficPolicy").is_none()
    {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    for (field, allowed) in [
        ("internalTrafficPolicy", ["Cluster", "Local"]),
        ("externalTrafficPolicy", ["Cluster", "Local"]),
    ] {
        if let Some(v) = spec.get(field) {
            if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
                causes.push(Cause::new(
                    format!("spec.{field}"),
                    "FieldValueNotSupported",
                    format!("Unsupported value: {v}: supported values: \"Cluster\", \"Local\""),
                ));
            }
        }
    }
    for (i, ip) in spec
        .get("externalIPs")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()).is_none() {
            causes.push(Cause::new(
                format!("spec.externalIPs[{i}]"),
                "FieldValueInvalid",
                format!("Invalid value: {ip}: must be a valid IP address"),
            ));
        }
    }
    // Ports.
    let headless = spec.get("clusterIP").and_then(|v| v.as_str()) == Some("None");
    let mut seen = BTreeSet::new();
    let ports = spec.get_mut("ports").and_then(|p| p.as_array_mut());
    let n_ports = ports.as_ref().map(|p| p.len()).unwrap_or(0);
    if n_ports == 0 && !headless && ty != "ExternalName" {
        causes.push(Cause::new(
            "spec.ports",
            "FieldValueRequired",
            "Required value: a Service needs at least one port (or clusterIP: None)",
        ));
    }
    let wants_node_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
    let mut requested_node_ports = Vec::new();
    if let Some(ports) = ports {
        for (i, p) in ports.iter_mut().enumerate() {
            let f = |s: &str| format!("spec.ports[{i}].{s}");
            if p.get("protocol").is_none() {
                p["protocol"] = json!("TCP");
            }
            let proto = p["protocol"].as_str().unwrap_or("").to_string();
            if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                causes.push(Cause::new(
                    f("protocol"),
                    "FieldValueNotSupported",
                    format!(
                        "Unsupported value: {:?}: supported values: \"SCTP\", \"TCP\", \"UDP\"",
                        proto
                    ),
                ));
            }
            let port = p.get("port").and_then(|v| v.as_i64()).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                causes.push(Cause::new(
                    f("port"),
                    "FieldValueInvalid",
                    format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
                ));
            }
            if !seen.insert((port, proto.clone())) {
                causes.push(Cause::new(
                    f("port"),
                    "FieldValueDuplicate",
                    format!("Duplicate value: {port}/{proto}"),
                ));
            }
            if n_ports > 1 {
                let name = p.get("name").and_then(|v| v.as_str()).unwrap_or("");
                if name.is_empty() {
                    causes.push(Cause::new(
                        f("name"),
                        "FieldValueRequired",
                        "Required value: ports need names when a Service has more than one",
                    ));
                }
            }
            match p.get("targetPort") {
                None => p["targetPort"] = json!(port),
                Some(Value::Number(n)) => {
                    let t = n.as_i64().unwrap_or(0);
                    if !(1..=65535).contains(&t) {
                        causes.push(Cause::new(
                            f("targetPort"),
                            "FieldValueInvalid",
                            format!("Invalid value: {t}: must be between 1 and 65535, inclusive"),
                        ));
                    }
                }
                Some(Value::String(s)) => {
                    if !valid_port_name(s) {
                        causes.push(Cause::new(f("targetPort"), "FieldValueInvalid", format!("Invalid value: {s:?}: must be a port number or an IANA_SVC_NAME (at most 15 characters, a-z, 0-9 and '-')")));
                    }
                }
                Some(other) => causes.push(Cause::new(
                    f("targetPort"),
                    "FieldValueInvalid",
                    format!("Invalid value: {other}: must be a port number or name"),
                )),
            }
            if let Some(np) = p.get("nodePort") {
                let n = np.as_i64().unwrap_or(0);
                if !wants_node_ports {
                    causes.push(Cause::new(
                        f("nodePort"),
                        "FieldValueForbidden",
                        format!("Forbidden: may not be used when `type` is '{ty}'"),
                    ));
                } else if !NODE_PORT_RANGE.contains(&(n as u16)) || n > 65535 {
                    causes.push(Cause::new(f("nodePort"), "FieldValueInvalid", format!("Invalid value: {n}: provided port is not in the valid range. The range of valid ports is 30000-32767")));
                } else {
                    requested_node_ports.push((i, n as u16));
                }
            }
        }
    }
    if !causes.is_empty() {
        return Err(causes);
    }

    // Cluster IPs: immutable on update, allocated or checked on create.
    let fam_policy = spec
        .get("ipFamilyPolicy")
        .and_then(|v| v.as_str())
        .unwrap_or("SingleStack")
        .to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    if let Some(old) = old {
        let old_cip = old.pointer("/spec/clusterIP").cloned();
        let new_cip = spec.get("clusterIP").cloned();
        if new_cip.is_some() && new_cip != old_cip {
            return Err(vec![Cause::new(
                "spec.clusterIP",
                "FieldValueInvalid",
                format!(
                    "Invalid value: {}: field is immutable",
                    new_cip.unwrap_or_default()
                ),
            )]);
        }
        spec["clusterIP"] = old_cip.unwrap_or(Value::Null);
        spec["clusterIPs"] = old
            .pointer("/spec/clusterIPs")
            .cloned()
            .unwrap_or(Value::Null);
        spec["ipFamilies"] = old
            .pointer("/spec/ipFamilies")
            .cloned()
            .unwrap_or(Value::Null);
        spec["ipFamilyPolicy"] = old
            .pointer("/spec/ipFamilyPolicy")
            .cloned()
            .unwrap_or(Value::Null);
    } else if headless {
        spec["clusterIPs"] = json!(["None"]);
        spec["ipFamilies"] = spec.get("ipFamilies").cloned().unwrap_or(json!(["IPv4"]));
        spec["ipFamilyPolicy"] = json!(fam_policy);
    } else {
        let mut requested: Vec<IpAddr> = Vec::new();
        let explicit = spec
            .get("clusterIPs")
            .and_then(|v| v.as_array())
            .cloned()
            .or_else(|| spec.get("clusterIP").map(|c| vec![c.clone()]))
            .unwrap_or_default();
        for (i, ip) in explicit.iter().enumerate() {
            let Some(parsed) = ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                return Err(vec![Cause::new(
                    format!("spec.clusterIPs[{i}]"),
                    "FieldValueInvalid",
                    format!("Invalid value: {ip}: must be a valid IP address or None"),
                )]);
            };
            if !alloc.contains(parsed) {
                return Err(vec![Cause::new(format!("spec.clusterIPs[{i}]"), "FieldValueInvalid", format!("Invalid value: {parsed}: failed to allocate IP {parsed}: the provided IP ({parsed}) is not in the valid range. The range of valid IPs is {}", alloc.cidr_text(parsed.is_ipv6())))]);
            }
            if alloc.ips.contains(&parsed) {
                return Err(vec![Cause::new(format!("spec.clusterIPs[{i}]"), "FieldValueInvalid", format!("Invalid value: {parsed}: failed to allocate IP {parsed}: provided IP is already allocated"))]);
            }
            requested.push(parsed);
        }
        let families: Vec<String> = Some(crate::strings(spec.get("ipFamilies")))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| {
                let first = if requested.first().is_some_and(|ip| ip.is_ipv6()) {
                    "IPv6"
                } else {
                    "IPv4"
                };
                let mut f = vec![first.to_string()];
                if fam_policy != "SingleStack" {
                    f.push(if first == "IPv4" { "IPv6" } else { "IPv4" }.to_string());
                }
                f
            });
        if !matches!(
            fam_policy.as_str(),
            "SingleStack" | "PreferDualStack" | "RequireDualStack"
        ) {
            return Err(vec![Cause::new("spec.ipFamilyPolicy", "FieldValueNotSupported", format!("Unsupported value: {fam_policy:?}: supported values: \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\""))]);
        }
        let mut ips = Vec::new();
        for (i, fam) in families.iter().enumerate() {
            let v6 = match fam.as_str() {
                "IPv4" => false,
                "IPv6" => true,
                other => {
                    return Err(vec![Cause::new(
                        format!("spec.ipFamilies[{i}]"),
                        "FieldValueNotSupported",
                        format!(
                            "Unsupported value: {other:?}: supported values: \"IPv4\", \"IPv6\""
                        ),
                    )])
                }
            };
            let ip = match requested.get(i) {
                Some(ip) if ip.is_ipv6() != v6 => {
                    return Err(vec![Cause::new(format!("spec.clusterIPs[{i}]"), "FieldValueInvalid", format!("Invalid value: {ip}: expected an {fam} address to match ipFamilies[{i}]"))]);
                }
                Some(ip) => {
                    alloc.ips.insert(*ip);
                    *ip
                }
                None => match alloc.allocate(v6) {
                    Some(ip) => ip,
                    None => {
                        for ip in &ips {
                            alloc.ips.remove(ip);
                        }
                        return Err(vec![Cause::new(
                            "spec.clusterIPs",
                            "FieldValueInvalid",
                            format!(
                                "failed to allocate a service IP: the range {} is full",
                                alloc.cidr_text(v6)
                            ),
                        )]);
                    }
                },
            };
            ips.push(ip);
        }
        spec["clusterIP"] = json!(ips[0].to_string());
        spec["clusterIPs"] = json!(ips.iter().map(|i| i.to_string()).collect::<Vec<_>>());
        spec["ipFamilies"] = json!(families);
        spec["ipFamilyPolicy"] = json!(fam_policy);
    }

    // Node ports: keep what the old object had, honour requests, allocate the rest.
    if wants_node_ports {
        let ports = spec["ports"].as_array_mut().expect("validated");
        for (i, p) in ports.iter_mut().enumerate() {
            if let Some(&(_, n)) = requested_node_ports.iter().find(|(j, _)| *j == i) {
                if !alloc.node_ports.insert(n) {
                    return Err(vec![Cause::new(
                        format!("spec.ports[{i}].nodePort"),
                        "FieldValueInvalid",
                        format!("Invalid value: {n}: provided port is already allocated"),
                    )]);
                }
            } else {
                match alloc.allocate_port() {
                    Some(n) => p["nodePort"] = json!(n),
                    None => {
                        return Err(vec![Cause::new(
                            format!("spec.ports[{i}].nodePort"),
                            "FieldValueInvalid",
                            "failed to allocate a node port: the range 30000-32767 is full",
                        )])
                    }
                }
            }
        }
    }
    Ok(())
}

/// Kind-specific semantic checks beyond what decoding catches.
pub fn validate_kind(kind: BuiltinKind, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match kind {
        BuiltinKind::Pod => {
            let containers = obj.pointer("/spec/containers").and_then(|v| v.as_array());
            if containers.is_none_or(|c| c.is_empty()) {
                causes.push(Cause::new(
                    "spec.containers",
                    "FieldValueRequired",
                    "Required value: a Pod needs at least one container",
                ));
            }
            for (i, c) in containers.into_iter().flatten().enumerate() {
                if c.get("name")
                    .and_then(|v| v.as_str())
                    .is_none_or(|n| !is_dns_label(n))
                {
                    causes.push(Cause::new(
                        format!("spec.containers[{i}].name"),
                        "FieldValueRequired",
                        "Required value: a DNS-1123 label",
                    ));
                }
                if c.get("image")
                    .and_then(|v| v.as_str())
                    .is_none_or(str::is_empty)
                {
                    causes.push(Cause::new(
                        format!("spec.containers[{i}].image"),
                        "FieldValueRequired",
                        "Required value",
                    ));
                }
            }
        }
        BuiltinKind::EndpointSlice => {
            let at = obj
                .get("addressType")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if !matches!(at, "IPv4" | "IPv6" | "FQDN") {
                causes.push(Cause::new(
                    "addressType",
                    "FieldValueNotSupported",
                    format!(
                        "Unsupported value: {at:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
                    ),
                ));
            }
            for (i, ep) in obj
                .get("endpoints")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                let addrs = ep
                    .get("addresses")
                    .and_then(|v| v.as_array())
                    .cloned()
                    .unwrap_or_default();
                if addrs.is_empty() || addrs.len() > 100 {
                    causes.push(Cause::new(
                        format!("endpoints[{i}].addresses"),
                        "FieldValueRequired",
                        "Required value: between 1 and 100 addresses",
                    ));
                }
                for (j, a) in addrs.iter().enumerate() {
                    let s = a.as_str().unwrap_or("");
                    let ok = match at {
                        "IPv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
                        "IPv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
                        _ => is_dns_subdomain(s),
                    };
                    if !ok {
                        causes.push(Cause::new(
                            format!("endpoints[{i}].addresses[{j}]"),
                            "FieldValueInvalid",
                            format!("Invalid value: {s:?}: must be a valid {at} address"),
                        ));
                    }
                }
            }
            for (i, p) in obj
                .get("ports")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(n) = p.get("port").and_then(|v| v.as_i64()) {
                    if !(0..=65535).contains(&n) {
                        causes.push(Cause::new(
                            format!("ports[{i}].port"),
                            "FieldValueInvalid",
                            format!("Invalid value: {n}: must be between 0 and 65535, inclusive"),
                        ));
                    }
                }
            }
        }
        BuiltinKind::NetworkPolicy => {
            if obj.pointer("/spec/podSelector").is_none() {
                causes.push(Cause::new(
                    "spec.podSelector",
                    "FieldValueRequired",
                    "Required value",
                ));
            }
            for (i, t) in obj
                .pointer("/spec/policyTypes")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
                    causes.push(Cause::new(
                        format!("spec.policyTypes[{i}]"),
                        "FieldValueNotSupported",
                        format!(
                            "Unsupported value: {t}: supported values: \"Egress\", \"Ingress\""
                        ),
                    ));
                }
            }
            for dir in ["ingress", "egress"] {
                let peer_key = if dir == "ingress" { "from" } else { "to" };
                for (i, rule) in obj
                    .pointer(&format!("/spec/{dir}"))
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    for (j, peer) in rule
                        .get(peer_key)
                        .and_then(|v| v.as_array())
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if let Some(block) = peer.get("ipBlock") {
                            let cidr = block.get("cidr").and_then(|v| v.as_str()).unwrap_or("");
                            if parse_cidr(cidr).is_none() {
                                causes.push(Cause::new(format!("spec.{dir}[{i}].{peer_key}[{j}].ipBlock.cidr"), "FieldValueInvalid", format!("Invalid value: {cidr:?}: must be a valid CIDR (e.g. 10.0.0.0/8)")));
                            }
                        }
                    }
                    for (j, p) in rule
                        .get("ports")
                        .and_then(|v| v.as_array())
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if let Some(proto) = p.get("protocol") {
                            if !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP")) {
                                causes.push(Cause::new(format!("spec.{dir}[{i}].ports[{j}].protocol"), "FieldValueNotSupported", format!("Unsupported value: {proto}: supported values: \"SCTP\", \"TCP\", \"UDP\"")));
                            }
                        }
                        if let (Some(port), Some(end)) = (
                            p.get("port").and_then(|v| v.as_i64()),
                            p.get("endPort").and_then(|v| v.as_i64()),
                        ) {
                            if end < port {
                                causes.push(Cause::new(format!("spec.{dir}[{i}].ports[{j}].endPort"), "FieldValueInvalid", format!("Invalid value: {end}: must be greater than or equal to `port`")));
                            }
                        }
                    }
                }
            }
        }
        BuiltinKind::Node => {
            for (i, c) in obj
                .pointer("/spec/podCIDRs")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                if c.as_str().and_then(parse_cidr).is_none() {
                    causes.push(Cause::new(
                        format!("spec.podCIDRs[{i}]"),
                        "FieldValueInvalid",
                        format!("Invalid value: {c}: must be a valid CIDR"),
                    ));
                }
            }
        }
        _ => {}
    }
    causes
}

pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc() -> ServiceAllocator {
        ServiceAllocator::new(
            ("10.96.0.0".parse().unwrap(), 12),
            ("fd00:10:96::".parse().unwrap(), 112),
        )
    }

    #[test]
    fn service_defaults_and_allocation() {
        let mut a = alloc();
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        admit_service(&mut svc, None, &mut a).unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
        let mut dual = json!({"spec": {"type": "NodePort", "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 53, "protocol": "UDP"}]}});
        admit_service(&mut dual, None, &mut a).unwrap();
        assert_eq!(
            dual["spec"]["clusterIPs"],
            json!(["10.96.0.2", "fd00:10:96::1"])
        );
        assert_eq!(dual["spec"]["ports"][0]["nodePort"], 30000);
    }

    #[test]
    fn dns_address_is_reserved_and_taken_ips_refused() {
        let mut a = alloc();
        for _ in 0..12 {
            let mut s = json!({"spec": {"ports": [{"port": 1}]}});
            admit_service(&mut s, None, &mut a).unwrap();
            assert_ne!(s["spec"]["clusterIP"], "10.96.0.10");
        }
        let mut s = json!({"spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}});
        admit_service(&mut s, None, &mut a).unwrap();
        let mut again = json!({"spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}});
        let e = admit_service(&mut again, None, &mut a).unwrap_err();
        assert!(e[0].message.contains("already allocated"));
        let mut outside = json!({"spec": {"clusterIP": "192.168.1.1", "ports": [{"port": 53}]}});
        let e = admit_service(&mut outside, None, &mut a).unwrap_err();
        assert!(e[0].message.contains("not in the valid range"), "{e:?}");
    }

    #[test]
    fn bad_ports_are_named() {
        let mut a = alloc();
        let mut s = json!({"spec": {"ports": [{"name": "a", "port": 0}, {"name": "b", "port": 80, "protocol": "ICMP", "targetPort": "Bad_Name"}]}});
        let e = admit_service(&mut s, None, &mut a).unwrap_err();
        let fields: Vec<_> = e.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].port",
                "spec.ports[1].protocol",
                "spec.ports[1].targetPort"
            ]
        );
        assert!(a.ips.is_empty(), "a rejected Service allocates nothing");
    }

    #[test]
    fn unknown_builtin_fields_are_found() {
        let d = decode_builtin(BuiltinKind::Service, &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"portz": [], "ports": [{"port": 1, "bogus": 1}]}})).unwrap();
        assert_eq!(
            d.unknown,
            vec![
                ".spec.ports[0].bogus".to_string(),
                ".spec.portz".to_string()
            ]
        );
        let e = decode_builtin(BuiltinKind::Service, &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": "http"}]}})).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("spec.ports[0].port"), "{}", e.message);
    }
}
