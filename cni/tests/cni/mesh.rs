//! Pods that ask for the mesh: the runtime passes their annotations (the
//! `io.kubernetes.cri.pod-annotations` capability) and ADD installs the
//! interception rules in the pod's namespace before the pod can run; a bad
//! annotation fails ADD with the field named and leaves nothing behind.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::harness::{Node, Pod};

fn with_annotations(node: &Node, annotations: Value) -> Value {
    let mut conf = node.config();
    conf["capabilities"] = json!({"io.kubernetes.cri.pod-annotations": true});
    conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
    conf
}

fn ruleset(pod: &Pod) -> Result<String> {
    let out = pod
        .ns
        .command("nft")?
        .args(["list", "ruleset"])
        .output()
        .context("nft runs")?;
    ensure!(out.status.success(), "nft list ruleset failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_meshed_pod_gets_its_interception_rules_at_add() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("5eed0001")?;
    let conf = with_annotations(
        &node,
        json!({"fairlead.io/inject": "true", "fairlead.io/skip-inbound-ports": "3306, 5432"}),
    );
    node.verb("ADD", &pod, &conf)?.ok_json()?;
    let rules = ruleset(&pod)?;
    ensure!(rules.contains("table inet fairlead_mesh"), "{rules}");
    ensure!(rules.contains("redirect to :15006"), "{rules}");
    ensure!(rules.contains("redirect to :15001"), "{rules}");
    ensure!(rules.contains("3306") && rules.contains("5432"), "{rules}");
    node.verb("DEL", &pod, &conf)?.ok()?;
    Ok(())
}

#[test]
fn pods_outside_the_mesh_get_no_rules() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("5eed0002")?;
    let conf = with_annotations(&node, json!({"fairlead.io/inject": "false", "team": "a"}));
    node.verb("ADD", &pod, &conf)?.ok_json()?;
    ensure!(!ruleset(&pod)?.contains("fairlead_mesh"));
    node.verb("DEL", &pod, &conf)?.ok()?;
    Ok(())
}

#[test]
fn a_bad_skip_ports_annotation_fails_add_and_leaves_nothing() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("5eed0003")?;
    let conf = with_annotations(
        &node,
        json!({"fairlead.io/inject": "true", "fairlead.io/skip-inbound-ports": "3306,mysql"}),
    );
    let err = node.verb("ADD", &pod, &conf)?.error(7)?;
    let msg = err["msg"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("fairlead.io/skip-inbound-ports") && msg.contains("\"mysql\" is not a port"),
        "{err}"
    );
    ensure!(!ruleset(&pod)?.contains("fairlead_mesh"));
    node.assert_clean()?;
    Ok(())
}
