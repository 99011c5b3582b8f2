//! Real packets: pods reach each other and the node, over IPv4 and IPv6.

use anyhow::{ensure, Result};

use crate::harness::{Node, Pod, NODE_V4, NODE_V6};

fn ping(from: &fairlead_testkit::Netns, to: &str) -> Result<()> {
    let output = from.exec("ping", &["-c", "2", "-W", "1", to])?;
    ensure!(
        output.status.success(),
        "ping {to} from {} failed: {}{}",
        from.name(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn two_pods_reach_each_other_and_the_node_reaches_both() -> Result<()> {
    let node = Node::new()?;
    let a = Pod::new("ping-a")?;
    let b = Pod::new("ping-b")?;
    let ra = node.add(&a)?;
    let rb = node.add(&b)?;
    let ip = |r: &serde_json::Value, i: usize| -> String {
        let cidr = r["ips"][i]["address"].as_str().unwrap_or_default();
        cidr.split('/').next().unwrap_or_default().to_owned()
    };
    let (a4, a6, b4, b6) = (ip(&ra, 0), ip(&ra, 1), ip(&rb, 0), ip(&rb, 1));
    ensure!(a4 != b4 && a6 != b6, "pods share an address");

    ping(&a.ns, &b4)?;
    ping(&a.ns, &b6)?;
    ping(&b.ns, &a4)?;
    ping(&b.ns, &a6)?;
    ping(&node.ns, &a4)?;
    ping(&node.ns, &a6)?;
    ping(&node.ns, &b4)?;
    ping(&node.ns, &b6)?;
    // And the pods reach the node's own addresses through their gateway.
    ping(&a.ns, NODE_V4)?;
    ping(&a.ns, NODE_V6)?;

    node.del(&a)?;
    // The deleted pod is unreachable, the other one still answers.
    let output = node.ns.exec("ping", &["-c", "1", "-W", "1", &a4])?;
    ensure!(!output.status.success(), "deleted pod still answers");
    ping(&node.ns, &b4)?;
    node.del(&b)?;
    node.assert_clean()
}
