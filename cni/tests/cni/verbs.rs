//! Every verb's behaviour as a runtime sees it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    thread,
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::harness::{group_members, Node, Pod, TempDir, NETWORK};

#[test]
fn version_lists_supported_versions() -> Result<()> {
    let node = Node::new()?;
    let reply = node.invoke(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.1.0"}"#)?;
    let json = reply.ok_json()?;
    assert_eq!(json["cniVersion"], "1.1.0");
    assert_eq!(
        json["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
    Ok(())
}

#[test]
fn add_returns_the_full_result_and_del_is_idempotent() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("c0ffee01")?;
    let result = node.add(&pod)?;

    assert_eq!(result["cniVersion"], "1.1.0");
    let host = pod.host_ifname();
    assert!(host.len() <= 15 && host.starts_with("fl"));
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["interfaces"][0]["mtu"], 1450);
    assert!(result["interfaces"][0].get("sandbox").is_none());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        pod.netns_path().as_str()
    );
    let ips = result["ips"].as_array().context("ips")?;
    assert_eq!(ips.len(), 2);
    assert_eq!(ips[0]["address"], "10.244.1.1/32");
    assert_eq!(ips[0]["gateway"], "169.254.1.1");
    assert_eq!(ips[0]["interface"], 1);
    assert_eq!(ips[1]["address"], "fd00:10:244:1::1/128");
    assert_eq!(ips[1]["gateway"], "fe80::1");
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
    );
    assert_eq!(result["dns"]["nameservers"], json!(["10.96.0.10"]));
    assert_eq!(
        result["dns"]["search"],
        json!(["default.svc.cluster.local"])
    );

    // What the kernel actually has.
    let mut addresses = pod.addresses()?;
    addresses.sort();
    assert_eq!(addresses, vec!["10.244.1.1/32", "fd00:10:244:1::1/128"]);
    let link = pod.ns.ip(&["-d", "link", "show", "eth0"])?;
    let mac = result["interfaces"][1]["mac"].as_str().context("mac")?;
    assert!(
        link.contains("mtu 1450") && link.contains(mac) && link.contains("veth"),
        "{link}"
    );
    let pod_routes = pod.ns.ip(&["route"])? + &pod.ns.ip(&["-6", "route"])?;
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    assert!(pod_routes.contains("169.254.1.1 dev eth0"), "{pod_routes}");
    assert!(
        pod_routes.contains("default via fe80::1 dev eth0"),
        "{pod_routes}"
    );
    let node_routes = node.ns.ip(&["route"])? + &node.ns.ip(&["-6", "route"])?;
    assert!(
        node_routes.contains(&format!("10.244.1.1 dev {host}")),
        "{node_routes}"
    );
    assert!(
        node_routes.contains(&format!("fd00:10:244:1::1 dev {host}")),
        "{node_routes}"
    );
    let host_addrs = node.ns.ip(&["addr", "show", "dev", &host])?;
    assert!(host_addrs.contains("fe80::1/64"), "{host_addrs}");
    let forward = node.ns.exec_ok("cat", &["/proc/sys/net/ipv4/ip_forward"])?;
    assert_eq!(forward.trim(), "1");

    let allocations = node.allocations()?;
    assert_eq!(allocations.len(), 2);
    for owner in allocations.values() {
        assert_eq!(owner, &(NETWORK.into(), "c0ffee01".into(), "eth0".into()));
    }

    node.del(&pod)?;
    node.assert_clean()?;
    assert!(!pod.ns.links()?.iter().any(|l| l == "eth0"));
    node.del(&pod)?;
    node.assert_clean()
}

/// With no agent on the node DEL deletes the veth itself (the hand-off is
/// in `handoff.rs`).
#[test]
fn del_is_done_when_it_returns_and_leaves_no_process_behind() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("sync01")?;
    node.add(&pod)?;
    let reply = node.verb("DEL", &pod, &node.config())?;
    reply.ok()?;
    let left = group_members(reply.pid)?;
    ensure!(left.is_empty(), "DEL left processes behind: {left:?}");
    node.assert_clean()?;
    ensure!(
        !pod.ns.links()?.iter().any(|l| l == "eth0"),
        "the pod kept eth0"
    );
    Ok(())
}

#[test]
fn del_succeeds_after_the_namespace_is_gone() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("gone01")?;
    node.add(&pod)?;
    let path = pod.netns_path();
    drop(pod.ns);
    let stdin = node.config().to_string();
    let without: [(&str, &str); 3] = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "gone01"),
        ("CNI_IFNAME", "eth0"),
    ];
    let mut with = without.to_vec();
    with.push(("CNI_NETNS", &path));
    node.invoke(&with, stdin.as_bytes())?.ok()?;
    node.assert_clean()?;
    // Again, and without CNI_NETNS at all (the spec allows it for DEL).
    node.invoke(&with, stdin.as_bytes())?.ok()?;
    node.invoke(&without, stdin.as_bytes())?.ok()?;
    node.assert_clean()
}

#[test]
fn second_add_for_the_same_attachment_fails_and_keeps_the_first() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("twice01")?;
    let first = node.add(&pod)?;
    let reply = node.verb("ADD", &pod, &node.config())?;
    let error = reply.error(100)?;
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("twice01") && msg.contains("eth0"), "{msg}");
    // The first attachment is untouched.
    assert_eq!(node.host_links()?, vec![pod.host_ifname()]);
    assert_eq!(node.allocations()?.len(), 2);
    let mut config = node.config();
    config["prevResult"] = first;
    node.verb("CHECK", &pod, &config)?.ok()?;
    node.del(&pod)?;
    node.assert_clean()
}

#[test]
fn check_passes_then_fails_when_a_route_is_removed() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("check01")?;
    let result = node.add(&pod)?;
    let mut config = node.config();
    config["prevResult"] = result;
    node.verb("CHECK", &pod, &config)?.ok()?;

    pod.ns
        .ip(&["route", "del", "default", "via", "169.254.1.1"])?;
    let error = node.verb("CHECK", &pod, &config)?.error(102)?;
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("route default via 169.254.1.1"), "{msg}");

    // A node-side route going missing is noticed too.
    pod.ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    node.verb("CHECK", &pod, &config)?.ok()?;
    node.ns
        .ip(&["-6", "route", "del", "fd00:10:244:1::1/128"])?;
    let error = node.verb("CHECK", &pod, &config)?.error(102)?;
    assert!(error["msg"]
        .as_str()
        .unwrap_or_default()
        .contains("fd00:10:244:1::1"));

    // CHECK without prevResult is an invalid config.
    node.verb("CHECK", &pod, &node.config())?.error(7)?;
    node.del(&pod)?;
    node.assert_clean()
}

#[test]
fn gc_releases_everything_but_the_valid_attachments() -> Result<()> {
    let node = Node::new()?;
    let pods: Vec<Pod> = (0..3)
        .map(|i| Pod::new(&format!("gc{i}")))
        .collect::<Result<_>>()?;
    for pod in &pods {
        node.add(pod)?;
    }
    // A leftover from a crash: an allocation of a container that no longer exists.
    std::fs::write(
        node.ipam_dir().join("10.244.1.200"),
        "fairlead\nghost\neth0\n",
    )?;

    let mut config = node.config();
    config["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "eth0"}]);
    node.invoke(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        config.to_string().as_bytes(),
    )?
    .ok()?;

    let owners: Vec<String> = node.allocations()?.into_values().map(|o| o.1).collect();
    assert_eq!(owners, vec!["gc1", "gc1"]);
    assert_eq!(node.host_links()?, vec![pods[1].host_ifname()]);
    let has_eth0 = |pod: &Pod| -> Result<bool> { Ok(pod.ns.links()?.iter().any(|l| l == "eth0")) };
    assert!(!has_eth0(&pods[0])? && has_eth0(&pods[1])? && !has_eth0(&pods[2])?);

    // GC without the list is refused rather than releasing everything.
    let reply = node.invoke(
        &[("CNI_COMMAND", "GC")],
        node.config().to_string().as_bytes(),
    )?;
    let error = reply.error(7)?;
    assert!(error["msg"]
        .as_str()
        .unwrap_or_default()
        .contains("cni.dev/valid-attachments"));
    // GC is a 1.1 verb.
    let mut old = config.clone();
    old["cniVersion"] = json!("1.0.0");
    node.invoke(&[("CNI_COMMAND", "GC")], old.to_string().as_bytes())?
        .error(1)?;

    config["cni.dev/valid-attachments"] = json!([]);
    node.invoke(&[("CNI_COMMAND", "GC")], config.to_string().as_bytes())?
        .ok()?;
    node.assert_clean()
}

/// A fake agent: answers one connection with `answer` if the request is
/// `STATUS`.
fn fake_agent(listener: UnixListener, answer: &'static str) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || {
        let (stream, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        ensure!(line == "STATUS\n", "agent got {line:?}");
        (&stream).write_all(answer.as_bytes())?;
        Ok(())
    })
}

#[test]
fn status_reports_whether_the_agent_is_ready() -> Result<()> {
    let node = Node::new()?;
    let dir = TempDir::new("agent")?;
    let socket = dir.path().join("agent.sock");
    let mut config = node.config();
    config["agentSocket"] = json!(socket);
    let status =
        |config: &Value| node.invoke(&[("CNI_COMMAND", "STATUS")], config.to_string().as_bytes());

    let error = status(&config)?.error(50)?;
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(socket.to_str().unwrap_or_default()), "{msg}");

    let agent = fake_agent(UnixListener::bind(&socket)?, "READY\n");
    let reply = status(&config)?;
    agent.join().expect("agent thread")?;
    reply.ok()?;
    assert!(reply.stdout.is_empty());

    std::fs::remove_file(&socket)?;
    let agent = fake_agent(
        UnixListener::bind(&socket)?,
        "NOTREADY node routes not applied\n",
    );
    let error = status(&config)?.error(50)?;
    agent.join().expect("agent thread")?;
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("not ready: node routes not applied"), "{msg}");

    let mut old = config;
    old["cniVersion"] = json!("1.0.0");
    status(&old)?.error(1)?;
    Ok(())
}

#[test]
fn prev_result_is_passed_on_and_results_follow_the_requested_version() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("chain01")?;
    let mut config = node.config();
    config["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "other0", "mac": "02:00:00:00:00:09"}],
        "ips": [{"address": "192.168.50.2/24", "interface": 0}],
        "dns": {"nameservers": ["192.168.50.1"]}
    });
    let result = node.verb("ADD", &pod, &config)?.ok_json()?;
    assert_eq!(result["interfaces"][0]["name"], "other0");
    assert_eq!(result["interfaces"][2]["name"], "eth0");
    assert_eq!(result["ips"][0]["address"], "192.168.50.2/24");
    assert_eq!(result["ips"][1]["interface"], 2);
    assert_eq!(result["dns"]["nameservers"], json!(["10.96.0.10"]));
    node.del(&pod)?;

    for (version, has_ip_version, has_mtu) in [("0.4.0", true, false), ("1.0.0", false, false)] {
        let mut config = node.config();
        config["cniVersion"] = json!(version);
        let result = node.verb("ADD", &pod, &config)?.ok_json()?;
        assert_eq!(result["cniVersion"], version);
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            has_ip_version,
            "{result}"
        );
        assert_eq!(
            result["interfaces"][0].get("mtu").is_some(),
            has_mtu,
            "{result}"
        );
        // CHECK and DEL exist in all three.
        config["prevResult"] = result;
        node.verb("CHECK", &pod, &config)?.ok()?;
        node.verb("DEL", &pod, &config)?.ok()?;
    }

    // A 1.1 conflist that lists versions instead of naming one.
    let mut config = node.config();
    config
        .as_object_mut()
        .context("object")?
        .remove("cniVersion");
    config["cniVersions"] = json!(["0.3.1", "1.0.0"]);
    let result = node.verb("ADD", &pod, &config)?.ok_json()?;
    assert_eq!(result["cniVersion"], "1.0.0");
    node.del(&pod)?;
    node.assert_clean()
}
