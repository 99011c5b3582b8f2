//! Every error code: the spec's JSON shape on stdout, a non-zero exit, and
//! nothing left behind.

use std::{fs::File, os::fd::AsRawFd};

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use fairlead_testkit::{Netns, Veth};

use crate::harness::{Node, Pod};

fn msg(error: &Value) -> &str {
    error["msg"].as_str().unwrap_or_default()
}

/// ADD with `config`, expecting `code`; the node, the pod and IPAM stay clean.
fn add_fails(node: &Node, pod: &Pod, config: &Value, code: u64) -> Result<Value> {
    let error = node.verb("ADD", pod, config)?.error(code)?;
    node.assert_clean()?;
    let pod_links = pod.ns.links()?;
    ensure!(pod_links == vec!["lo".to_owned()], "pod has {pod_links:?}");
    Ok(error)
}

#[test]
fn incompatible_version_is_code_1() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e1")?;
    let mut config = node.config();
    config["cniVersion"] = json!("0.3.1");
    let error = add_fails(&node, &pod, &config, 1)?;
    assert!(
        msg(&error).contains("0.3.1") && msg(&error).contains("1.1.0"),
        "{error}"
    );
    Ok(())
}

#[test]
fn unsupported_ipam_type_is_code_2() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e2")?;
    let mut config = node.config();
    config["ipam"]["type"] = json!("host-local");
    // Unknown top-level fields are ignored, as the spec asks.
    config["somethingNew"] = json!({"x": 1});
    let error = add_fails(&node, &pod, &config, 2)?;
    assert!(msg(&error).contains("ipam.type"), "{error}");
    Ok(())
}

#[test]
fn unknown_container_namespace_is_code_3() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e3")?;
    let reply = node.invoke(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e3"),
            ("CNI_NETNS", "/run/netns/fl-does-not-exist"),
            ("CNI_IFNAME", "eth0"),
        ],
        node.config().to_string().as_bytes(),
    )?;
    let error = reply.error(3)?;
    assert!(
        msg(&error).contains("/run/netns/fl-does-not-exist"),
        "{error}"
    );
    node.assert_clean()?;
    drop(pod);
    Ok(())
}

#[test]
fn bad_environment_is_code_4_and_names_the_variable() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e4")?;
    let stdin = node.config().to_string();
    let reply = node.invoke(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e4"),
            ("CNI_IFNAME", "eth0"),
        ],
        stdin.as_bytes(),
    )?;
    let error = reply.error(4)?;
    assert!(msg(&error).contains("CNI_NETNS"), "{error}");
    node.assert_clean()?;

    let netns = pod.netns_path();
    for (var, value) in [
        ("CNI_IFNAME", "much-too-long-ifname"),
        ("CNI_CONTAINERID", "bad id\n"),
        ("CNI_ARGS", "novalue"),
        ("CNI_COMMAND", "FROB"),
    ] {
        let mut env = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e4"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        env.retain(|(k, _)| *k != var);
        env.push((var, value));
        let error = node.invoke(&env, stdin.as_bytes())?.error(4)?;
        assert!(msg(&error).contains(var), "{error}");
    }
    // A path that is not a network namespace.
    let error = node
        .invoke(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "e4"),
                ("CNI_NETNS", "/proc/self/status"),
                ("CNI_IFNAME", "eth0"),
            ],
            stdin.as_bytes(),
        )?
        .error(4)?;
    assert!(msg(&error).contains("/proc/self/status"), "{error}");
    node.assert_clean()
}

#[test]
fn malformed_json_is_code_6() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e6")?;
    let netns = pod.netns_path();
    let reply = node.invoke(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e6"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
        ],
        br#"{"cniVersion": "1.1.0", "name": "#,
    )?;
    let error = reply.error(6)?;
    assert_eq!(error["cniVersion"], "1.1.0");
    node.assert_clean()
}

#[test]
fn invalid_config_is_code_7_and_names_the_field() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e7")?;
    let mut config = node.config();
    config["ipam"]["ranges"][0] = json!("10.244.1.0/33");
    let error = add_fails(&node, &pod, &config, 7)?;
    assert!(msg(&error).contains("ipam.ranges[0]"), "{error}");

    let mut config = node.config();
    config["mtu"] = json!("jumbo");
    let error = add_fails(&node, &pod, &config, 7)?;
    assert!(msg(&error).contains("mtu"), "{error}");

    let mut config = node.config();
    config.as_object_mut().expect("object").remove("ipam");
    let error = add_fails(&node, &pod, &config, 7)?;
    assert!(msg(&error).contains("ipam"), "{error}");
    Ok(())
}

#[test]
fn lock_contention_times_out_with_code_11() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("e11")?;
    std::fs::create_dir_all(node.ipam_dir())?;
    let lock = File::create(node.ipam_dir().join("lock"))?;
    // SAFETY: flock on a file we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut config = node.config();
    config["ipam"]["lockTimeoutMs"] = json!(200);
    let error = add_fails(&node, &pod, &config, 11)?;
    assert!(msg(&error).contains("try again"), "{error}");
    // DEL waits on the same lock: also 11, so the runtime retries it.
    node.verb("DEL", &pod, &config)?.error(11)?;
    drop(lock);
    node.add(&pod)?;
    node.del(&pod)?;
    node.assert_clean()
}

#[test]
fn a_failure_half_way_through_add_is_rolled_back() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("half01")?;
    // IPv6 disabled on new interfaces in the pod: the veth, the IPv4 address
    // and its routes go in before adding the IPv6 address fails.
    pod.ns
        .exec_ok("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
    let error = add_fails(&node, &pod, &node.config(), 5)?;
    assert!(msg(&error).contains("fd00:10:244:1::1"), "{error}");
    Ok(())
}

#[test]
fn an_exhausted_range_is_code_101_and_leaves_nothing() -> Result<()> {
    let node = Node::new()?;
    let mut config = node.config();
    config["ipam"]["ranges"] = json!(["10.244.9.0/30"]);
    let pods: Vec<Pod> = (0..3)
        .map(|i| Pod::new(&format!("x{i}")))
        .collect::<Result<_>>()?;
    for pod in &pods[..2] {
        node.verb("ADD", pod, &config)?.ok_json()?;
    }
    let error = node.verb("ADD", &pods[2], &config)?.error(101)?;
    assert!(msg(&error).contains("10.244.9.0/30"), "{error}");
    assert_eq!(node.allocations()?.len(), 2);
    assert_eq!(node.host_links()?.len(), 2);
    for pod in &pods[..2] {
        node.verb("DEL", pod, &config)?.ok()?;
    }
    node.assert_clean()
}

#[test]
fn an_interface_in_the_way_is_code_100_and_left_alone() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("busy01")?;
    // Something else already made the pod's eth0.
    let elsewhere = Netns::new()?;
    let _other = Veth::new(&pod.ns, "eth0", &elsewhere, "peer0")?;
    let error = node.verb("ADD", &pod, &node.config())?.error(100)?;
    assert!(
        msg(&error).contains("eth0") && msg(&error).contains(&pod.netns_path()),
        "{error}"
    );
    node.assert_clean()?;
    // The other interface is untouched, and DEL of ours does not touch it.
    node.del(&pod)?;
    ensure!(
        pod.ns.links()?.contains(&"eth0".to_owned()),
        "eth0 was removed"
    );
    Ok(())
}
