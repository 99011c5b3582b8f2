//! DEL's hand-off of the veth to the agent (`cni/src/teardown.rs`): what DEL
//! promises holds when it returns, the agent's reaper deletes the rest, and
//! DEL manages alone when the agent is missing, silent or refusing.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::harness::{group_members, Node, Pod};

/// How long the reaper may take for one pod (one delete is ~20 ms).
const REAPED: Duration = Duration::from_secs(2);

/// The node has no route to any of `ips` (the ADD result's addresses).
fn assert_no_routes_to(node: &Node, result: &Value) -> Result<()> {
    let routes = node.ns.ip(&["route"])? + &node.ns.ip(&["-6", "route"])?;
    for ip in result["ips"].as_array().context("ips")? {
        let address = ip["address"].as_str().context("address")?;
        let bare = address.split('/').next().unwrap_or_default();
        ensure!(
            !routes.contains(&format!("{bare} dev")),
            "a route to {bare} is left: {routes}"
        );
    }
    Ok(())
}

/// What DEL promises at the moment it returns, whoever deletes the veth.
fn assert_del_done(node: &Node, pod: &Pod, result: &Value) -> Result<()> {
    assert_no_routes_to(node, result)?;
    let links = node.host_links()?;
    ensure!(
        !links.contains(&pod.host_ifname()),
        "{} is still taken: {links:?}",
        pod.host_ifname()
    );
    let allocations = node.allocations()?;
    ensure!(allocations.is_empty(), "still allocated: {allocations:?}");
    let pod_links = pod.ns.links()?;
    ensure!(
        !pod_links.iter().any(|l| l == "eth0"),
        "the pod kept eth0: {pod_links:?}"
    );
    Ok(())
}

#[test]
fn del_hands_the_veth_to_the_agent_which_deletes_it() -> Result<()> {
    let node = Node::new()?;
    let agent = node.start_agent()?;
    let pod = Pod::new("handoff01")?;
    let result = node.add(&pod)?;

    let reply = node.verb("DEL", &pod, &node.config())?;
    reply.ok()?;
    assert_del_done(&node, &pod, &result)?;
    ensure!(
        reply.stderr.is_empty(),
        "the agent took it, so DEL did not: {}",
        reply.stderr
    );
    let left = group_members(reply.pid)?;
    ensure!(left.is_empty(), "DEL left processes behind: {left:?}");

    // The agent's reaper deletes the pair, both ends.
    node.wait_reaped(REAPED)?;
    node.assert_clean()?;
    agent.wait_idle(REAPED)?;
    let pod_links = pod.ns.links()?;
    ensure!(pod_links == ["lo"], "pod namespace still has {pod_links:?}");

    // Idempotent: again, and after the pod's namespace is gone.
    node.del(&pod)?;
    node.add(&pod)?;
    let path = pod.netns_path();
    let Pod { ns, id } = pod;
    drop(ns);
    let stdin = node.config().to_string();
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", path.as_str()),
    ];
    node.invoke(&env, stdin.as_bytes())?.ok()?;
    node.invoke(&env[..3], stdin.as_bytes())?.ok()?;
    node.wait_reaped(REAPED)?;
    node.assert_clean()
}

#[test]
fn a_re_add_right_after_del_works_with_the_agent() -> Result<()> {
    let node = Node::new()?;
    let _agent = node.start_agent()?;
    let pod = Pod::new("readd01")?;
    for _ in 0..3 {
        let first = node.add(&pod)?;
        node.del(&pod)?;
        // At once: the reaper has most likely not deleted the old pair yet.
        let second = node.add(&pod)?;
        let mut config = node.config();
        config["prevResult"] = second;
        node.verb("CHECK", &pod, &config)?.ok()?;
        ensure!(first["interfaces"][0]["name"] == config["prevResult"]["interfaces"][0]["name"]);
        node.del(&pod)?;
    }
    node.wait_reaped(REAPED)?;
    node.assert_clean()
}

/// A stand-in agent on the node's socket that answers every request with
/// `answer` (None: accepts and never answers) and records the requests.
struct FakeAgent {
    requests: Arc<Mutex<Vec<String>>>,
    _thread: thread::JoinHandle<()>,
}

impl FakeAgent {
    fn start(node: &Node, answer: Option<&'static str>) -> Result<FakeAgent> {
        let listener = UnixListener::bind(node.agent_socket())?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        // Ends with the test process; it only ever touches its socket.
        let thread = thread::spawn(move || {
            let mut silent = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                seen.lock()
                    .expect("requests")
                    .push(line.trim_end().to_owned());
                match answer {
                    Some(answer) => {
                        let _ = (&stream).write_all(answer.as_bytes());
                    }
                    None => silent.push(stream),
                }
            }
        });
        Ok(FakeAgent {
            requests,
            _thread: thread,
        })
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

#[test]
fn tombstones_nobody_deletes_block_nothing_and_gc_removes_them() -> Result<()> {
    let node = Node::new()?;
    // Says OK and deletes nothing: the worst a slow reaper can do.
    let agent = FakeAgent::start(&node, Some("OK\n"))?;
    let pod = Pod::new("slow01")?;
    let first = node.add(&pod)?;
    node.del(&pod)?;
    assert_del_done(&node, &pod, &first)?;

    let requests = agent.requests();
    ensure!(requests.len() == 1, "{requests:?}");
    let tombstone = requests[0]
        .strip_prefix("DELLINK ")
        .context("a DELLINK request")?
        .to_owned();
    // Both sides agree on what a tombstone is.
    ensure!(fairlead_cni::teardown::TOMBSTONE_PREFIX == fairlead_agent::reaper::TOMBSTONE_PREFIX);
    ensure!(
        fairlead_agent::reaper::is_tombstone(&tombstone),
        "{tombstone}"
    );
    ensure!(node.tombstones()? == std::slice::from_ref(&tombstone));
    // Down, so the old pod can send nothing into the node; the pod end is
    // a tombstone too.
    let link = node.ns.ip(&["-o", "link", "show", &tombstone])?;
    ensure!(!link.contains(",UP"), "{link}");
    ensure!(pod.ns.links()?.contains(&tombstone));

    // DEL again (the host end is already a tombstone): nothing to do.
    node.del(&pod)?;
    ensure!(agent.requests().len() == 1, "nothing more to hand off");

    // The same attachment again, while the old pair still exists.
    let second = node.add(&pod)?;
    let mut config = node.config();
    config["prevResult"] = second.clone();
    node.verb("CHECK", &pod, &config)?.ok()?;
    node.del(&pod)?;
    assert_del_done(&node, &pod, &second)?;
    ensure!(node.tombstones()?.len() == 2);

    // GC deletes every stray tombstone (pod ends with them).
    let mut gc = node.config();
    gc["cni.dev/valid-attachments"] = json!([]);
    node.invoke(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())?
        .ok()?;
    node.assert_clean()?;
    ensure!(pod.ns.links()? == ["lo"], "{:?}", pod.ns.links()?);
    Ok(())
}

#[test]
fn without_a_willing_agent_del_deletes_the_veth_itself() -> Result<()> {
    let node = Node::new()?;
    let pod = Pod::new("alone01")?;

    // Nobody listening.
    let result = node.add(&pod)?;
    let reply = node.verb("DEL", &pod, &node.config())?;
    reply.ok()?;
    ensure!(reply.stderr.contains("cannot connect"), "{}", reply.stderr);
    assert_del_done(&node, &pod, &result)?;
    node.assert_clean()?;
    ensure!(pod.ns.links()? == ["lo"]);

    // An agent that refuses.
    {
        let _agent = FakeAgent::start(&node, Some("ERROR not a fairlead tombstone\n"))?;
        node.add(&pod)?;
        let reply = node.verb("DEL", &pod, &node.config())?;
        reply.ok()?;
        ensure!(
            reply.stderr.contains("not a fairlead tombstone"),
            "{}",
            reply.stderr
        );
        node.assert_clean()?;
    }
    std::fs::remove_file(node.agent_socket())?;

    // One that never answers: DEL waits its bound, not longer.
    let _agent = FakeAgent::start(&node, None)?;
    let mut config = node.config();
    config["agentHandoffTimeoutMs"] = json!(50);
    node.verb("ADD", &pod, &config)?.ok_json()?;
    let start = Instant::now();
    let reply = node.verb("DEL", &pod, &config)?;
    let took = start.elapsed();
    reply.ok()?;
    ensure!(reply.stderr.contains("no answer"), "{}", reply.stderr);
    ensure!(took < Duration::from_secs(1), "DEL took {took:?}");
    node.assert_clean()?;

    // Hand-off turned off: never asks.
    config["agentHandoffTimeoutMs"] = json!(0);
    node.verb("ADD", &pod, &config)?.ok_json()?;
    let reply = node.verb("DEL", &pod, &config)?;
    reply.ok()?;
    ensure!(reply.stderr.is_empty(), "{}", reply.stderr);
    node.assert_clean()
}
