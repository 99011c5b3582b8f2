//! Server-side printing: `kubectl get` asks for a `meta.k8s.io/v1` Table
//! (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), and prints the
//! columns the server chooses. These are the columns kubectl users know for
//! each kind (`-o wide` shows the priority-1 ones); other kinds get Name and Age.

use serde_json::{json, Value};

/// True when the client accepts a Table (kubectl get does; kube-rs never asks).
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let p: Vec<&str> = part.split(';').map(str::trim).collect();
        p.contains(&"as=Table") && p.contains(&"g=meta.k8s.io") && p.contains(&"v=v1")
    })
}

struct Column {
    name: &'static str,
    ty: &'static str,
    priority: u8,
}

const fn col(name: &'static str, ty: &'static str, priority: u8) -> Column {
    Column { name, ty, priority }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(|x| x.as_str()).unwrap_or("")
}

fn or_none(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

/// "5s", "3m", "2h", "4d", as kubectl shows ages.
fn age(obj: &Value, now: i64) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(s(obj, "/metadata/creationTimestamp")) else {
        return "<unknown>".into();
    };
    let secs = (now - t.timestamp()).max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Whether `status.conditions` has `type` with status True.
fn condition(o: &Value, ty: &str) -> bool {
    o.pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|c| c.iter().any(|c| c["type"] == ty && c["status"] == "True"))
}

fn join(v: Option<&Value>, f: impl Fn(&Value) -> String) -> String {
    v.and_then(|x| x.as_array())
        .map(|a| a.iter().map(f).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "Pod" => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "integer", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ],
        "Service" => vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ],
        "EndpointSlice" => vec![
            col("Name", "string", 0),
            col("AddressType", "string", 0),
            col("Ports", "string", 0),
            col("Endpoints", "string", 0),
            col("Age", "string", 0),
        ],
        "Node" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Age", "string", 0),
            col("Internal-IP", "string", 1),
            col("Pod-CIDRs", "string", 1),
        ],
        "Namespace" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Age", "string", 0),
        ],
        _ => vec![col("Name", "string", 0), col("Age", "string", 0)],
    }
}

fn cells(kind: &str, o: &Value, now: i64) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(age(o, now));
    match kind {
        "Pod" => {
            let ready = condition(o, "Ready");
            let n = o
                .pointer("/spec/containers")
                .and_then(|c| c.as_array())
                .map_or(0, |c| c.len());
            let phase = s(o, "/status/phase");
            vec![
                name,
                json!(format!("{}/{n}", if ready { n } else { 0 })),
                json!(if phase.is_empty() { "Pending" } else { phase }),
                json!(0),
                age,
                json!(or_none(s(o, "/status/podIP").into())),
                json!(or_none(s(o, "/spec/nodeName").into())),
            ]
        }
        "Service" => {
            let ports = join(o.pointer("/spec/ports"), |p| {
                let np = p
                    .get("nodePort")
                    .map(|n| format!(":{n}"))
                    .unwrap_or_default();
                format!(
                    "{}{np}/{}",
                    p["port"],
                    p["protocol"].as_str().unwrap_or("TCP")
                )
            });
            let ext: Vec<String> = crate::strings(o.pointer("/spec/externalIPs"))
                .into_iter()
                .chain(
                    o.pointer("/status/loadBalancer/ingress")
                        .and_then(|i| i.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i["ip"].as_str().map(String::from)),
                )
                .collect();
            let selector = o
                .pointer("/spec/selector")
                .and_then(|x| x.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let cluster_ip = if s(o, "/spec/type") == "ExternalName" {
                "<none>".to_string()
            } else {
                or_none(s(o, "/spec/clusterIP").into())
            };
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(cluster_ip),
                json!(or_none(ext.join(","))),
                json!(or_none(ports)),
                age,
                json!(or_none(selector)),
            ]
        }
        "EndpointSlice" => {
            let ports = join(o.get("ports"), |p| p["port"].to_string());
            let eps: Vec<String> = o
                .get("endpoints")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
                .flat_map(|e| crate::strings(e.get("addresses")))
                .collect();
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(or_none(ports)),
                json!(or_none(shown)),
                age,
            ]
        }
        "Node" => {
            let ready = condition(o, "Ready");
            let ips = join(o.pointer("/status/addresses"), |a| {
                if a["type"] == "InternalIP" {
                    a["address"].as_str().unwrap_or("").to_string()
                } else {
                    String::new()
                }
            });
            let ips = ips
                .split(',')
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            vec![
                name,
                json!(if ready { "Ready" } else { "NotReady" }),
                age,
                json!(or_none(ips)),
                json!(or_none(
                    crate::strings(o.pointer("/spec/podCIDRs")).join(",")
                )),
            ]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), age],
        _ => vec![name, age],
    }
}

/// A Table of `items` (one object for a get, all of them for a list).
pub fn table(
    kind: &str,
    items: &[&Value],
    resource_version: Option<String>,
    cont: Option<String>,
) -> Value {
    let now = chrono::Utc::now().timestamp();
    let defs: Vec<Value> = columns(kind)
        .iter()
        .map(|c| json!({"name": c.name, "type": c.ty, "format": if c.name == "Name" { "name" } else { "" }, "description": "", "priority": c.priority}))
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({
                "cells": cells(kind, o, now),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(json!({}))},
            })
        })
        .collect();
    let mut meta = json!({});
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = json!(rv);
    }
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header() {
        assert!(wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(
            "application/json;as=Table;v=v1beta1;g=meta.k8s.io"
        ));
    }

    #[test]
    fn service_row() {
        let svc = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.5", "selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]}});
        let t = table("Service", &[&svc], Some("7".into()), None);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "web",
                "NodePort",
                "10.96.0.5",
                "<none>",
                "80:30001/TCP",
                t["rows"][0]["cells"][5],
                "app=web"
            ])
        );
        assert!(t["rows"][0]["cells"][5].as_str().unwrap().ends_with('d'));
        assert_eq!(t["columnDefinitions"][6]["priority"], 1);
    }
}
