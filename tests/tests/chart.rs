//! The Helm chart (`charts/fairlead`) renders, with `charts/render` (Go's text/template and
//! sprig, as Helm renders; Helm itself is not installable here), into objects the API
//! types accept field for field: each rendered document is read into its k8s-openapi type
//! and written back, and anything the type dropped (a misspelled or misplaced field) fails
//! the test with its path. Required values missing fail the render with their message.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `helm template`'s output for the chart in `fairlead-system` with `overrides` (YAML).
fn render(overrides: &str) -> Result<String, String> {
    static RENDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RENDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fairlead-chart-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let values = dir.join("values.yaml");
    std::fs::write(&values, overrides).unwrap();
    let out = Command::new("go")
        .current_dir(repo())
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOCACHE", dir.join("gocache"))
        .env("GOFLAGS", "")
        .args([
            "run",
            "./charts/render",
            "charts/fairlead",
            "fairlead-system",
        ])
        .arg(&values)
        .output()
        .expect("go runs (scripts/setup.sh installs golang-go and the sprig and yaml packages)");
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Where `typed` (the round trip) lacks what `raw` has: the paths the type did not know.
fn dropped(raw: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (k, v) in r {
                match t.get(k) {
                    Some(tv) => dropped(v, tv, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(r), Value::Array(t)) => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                dropped(rv, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    Ok(serde_json::to_value(typed).unwrap())
}

/// Checks every document; returns the kinds/names seen.
fn check(rendered: &str) -> Vec<String> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, core::v1 as core, rbac::v1 as rbac,
    };
    let mut seen = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(rendered) {
        let doc: Value = serde::Deserialize::deserialize(doc).expect("rendered YAML parses");
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or("?").to_owned();
        let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_owned();
        let typed = match kind.as_str() {
            "ServiceAccount" => round_trip::<core::ServiceAccount>(&doc),
            "Service" => round_trip::<core::Service>(&doc),
            "ConfigMap" => round_trip::<core::ConfigMap>(&doc),
            "Deployment" => round_trip::<apps::Deployment>(&doc),
            "DaemonSet" => round_trip::<apps::DaemonSet>(&doc),
            "ClusterRole" => round_trip::<rbac::ClusterRole>(&doc),
            "ClusterRoleBinding" => round_trip::<rbac::ClusterRoleBinding>(&doc),
            "Role" => round_trip::<rbac::Role>(&doc),
            "RoleBinding" => round_trip::<rbac::RoleBinding>(&doc),
            "MutatingWebhookConfiguration" => round_trip::<adm::MutatingWebhookConfiguration>(&doc),
            other => panic!("{other} {name}: a kind this test does not know; add it"),
        }
        .unwrap_or_else(|e| panic!("{kind} {name}: {e}\n{doc:#}"));
        let mut unknown = Vec::new();
        dropped(&doc, &typed, "", &mut unknown);
        assert!(
            unknown.is_empty(),
            "{kind} {name}: fields the API does not have: {unknown:?}"
        );
        seen.push(format!("{kind}/{name}"));
    }
    seen
}

const REQUIRED: &str =
    "agent:\n  apiServer:\n    host: 192.0.2.10\ndns:\n  upstreams: 192.0.2.53\n";

#[test]
fn chart_renders_valid_objects() {
    let rendered = render(REQUIRED).unwrap_or_else(|e| panic!("render failed: {e}"));
    let seen = check(&rendered);
    for want in [
        "DaemonSet/fairlead-agent",
        "ClusterRole/fairlead-agent",
        "Deployment/fairlead-controller",
        "MutatingWebhookConfiguration/fairlead-sidecar-injector",
        "Deployment/fairlead-dns",
        "Service/kube-dns",
    ] {
        assert!(
            seen.iter().any(|s| s == want),
            "{want} not rendered: {seen:?}"
        );
    }
    // The agent reaches the API server directly (it is what serves ClusterIPs) and gets
    // the mesh CA's bundle; DNS gets its upstreams.
    for want in [
        "value: \"192.0.2.10\"",
        "name: fairlead-ca-bundle",
        "value: \"192.0.2.53\"",
        "value: /proc/1/ns/net",
        "value: \"$(HOST_IP):15012\"",
    ] {
        assert!(rendered.contains(want), "{want} missing:\n{rendered}");
    }

    // Switches: no DNS, no mesh; the cert-manager path of the webhook.
    let off = render(
        "agent:\n  apiServer:\n    host: 192.0.2.10\nmesh:\n  enabled: false\ndns:\n  enabled: false\nwebhook:\n  certManager:\n    enabled: true\n    issuerRef:\n      name: ca-issuer\n",
    )
    .unwrap_or_else(|e| panic!("render failed: {e}"));
    // cert-manager's Certificate is not a core type: check the rest.
    let (core_docs, cert): (Vec<&str>, Vec<&str>) = off
        .split("\n---\n")
        .partition(|d| !d.contains("kind: Certificate\n"));
    assert_eq!(cert.len(), 1, "one cert-manager Certificate:\n{off}");
    let seen = check(&core_docs.join("\n---\n"));
    assert!(!seen.iter().any(|s| s.contains("dns")), "{seen:?}");
    assert!(!off.contains("FAIRLEAD_AGENT_MESH_CA_URL"), "{off}");
    assert!(off.contains("cert-manager.io/inject-ca-from"), "{off}");
}

#[test]
fn chart_names_missing_required_values() {
    let err = render("").expect_err("renders without the API server address");
    assert!(err.contains("agent.apiServer.host"), "{err}");
    let err = render("agent:\n  apiServer:\n    host: 192.0.2.10\n")
        .expect_err("renders without upstreams");
    assert!(err.contains("dns.upstreams"), "{err}");
}
