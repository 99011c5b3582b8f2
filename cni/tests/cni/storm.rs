//! Many concurrent invocations, as a busy node's runtime makes them, with
//! the agent's reaper deleting the veths DEL hands it: no leaked or
//! duplicated address, no stray interface once the reaper has drained.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::harness::{Node, Pod, NETWORK};

const PODS: usize = 100;
const PARALLEL: usize = 16;
/// Mixed DEL/ADD operations after the initial 100 ADDs.
const MIXED_OPS: usize = 128;
/// Bound on the whole storm, so a hang fails instead of running forever.
const DEADLINE: Duration = Duration::from_secs(240);
/// Bound on the reaper's drain after a round of DELs (~20 ms per veth).
const DRAIN: Duration = Duration::from_secs(30);

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Add(usize),
    Del(usize),
}

/// Runs `ops` on `PARALLEL` threads; each op is one plugin process.
fn run_parallel(
    node: &Node,
    pods: &[Pod],
    ops: &[Op],
    start: Instant,
) -> Result<Vec<(Op, Result<()>)>> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&op) = ops.get(i) else { break };
                let outcome = if start.elapsed() > DEADLINE {
                    Err(anyhow::anyhow!("storm deadline passed"))
                } else {
                    match op {
                        Op::Add(p) => node.add(&pods[p]).map(drop),
                        Op::Del(p) => node.del(&pods[p]),
                    }
                };
                results.lock().expect("results").push((op, outcome));
            });
        }
    });
    Ok(results.into_inner().expect("results"))
}

#[test]
fn a_storm_of_concurrent_adds_and_dels_leaks_and_duplicates_nothing() -> Result<()> {
    let start = Instant::now();
    let node = Node::new()?;
    let agent = node.start_agent()?;
    let pods: Vec<Pod> = (0..PODS)
        .map(|i| Pod::new(&format!("storm{i:03}")))
        .collect::<Result<_>>()?;
    let mut live: BTreeSet<usize> = BTreeSet::new();

    let adds: Vec<Op> = (0..PODS).map(Op::Add).collect();
    for (op, outcome) in run_parallel(&node, &pods, &adds, start)? {
        outcome.with_context(|| format!("{op:?}"))?;
        if let Op::Add(p) = op {
            live.insert(p);
        }
    }

    // Mixed rounds: each round touches PARALLEL distinct pods at once (a
    // runtime never runs two verbs for one container concurrently).
    let mut rng = Rng(0x5eed_f1ea_d000_0001);
    let mut done = 0;
    while done < MIXED_OPS {
        let mut round: Vec<usize> = Vec::new();
        while round.len() < PARALLEL {
            let p = (rng.next() % PODS as u64) as usize;
            if !round.contains(&p) {
                round.push(p);
            }
        }
        let ops: Vec<Op> = round
            .iter()
            .map(|&p| {
                if live.contains(&p) {
                    Op::Del(p)
                } else {
                    Op::Add(p)
                }
            })
            .collect();
        for (op, outcome) in run_parallel(&node, &pods, &ops, start)? {
            outcome.with_context(|| format!("{op:?}"))?;
            match op {
                Op::Add(p) => live.insert(p),
                Op::Del(p) => live.remove(&p),
            };
        }
        done += ops.len();
    }
    ensure!(PODS + done >= 200, "only {} operations", PODS + done);

    // Allocation files are exactly two per live pod, all distinct.
    let allocations = node.allocations()?;
    let mut per_pod: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (ip, (network, container, ifname)) in &allocations {
        ensure!(
            network == NETWORK && ifname == "eth0",
            "odd allocation {ip}: {network} {ifname}"
        );
        per_pod.entry(container.clone()).or_default().push(*ip);
    }
    let expected: BTreeSet<String> = live.iter().map(|&p| pods[p].id.clone()).collect();
    let holders: BTreeSet<String> = per_pod.keys().cloned().collect();
    ensure!(
        holders == expected,
        "allocations {holders:?} != live pods {expected:?}"
    );
    for (container, ips) in &per_pod {
        ensure!(
            ips.len() == 2 && ips.iter().filter(|ip| ip.is_ipv4()).count() == 1,
            "{container} holds {ips:?}"
        );
    }

    // The kernel agrees: each live pod has its allocated addresses, no two
    // pods share one, and the node has exactly the live pods' host veths.
    let mut seen: HashSet<String> = HashSet::new();
    for &p in &live {
        let pod = &pods[p];
        let mut addresses = pod.addresses()?;
        addresses.sort();
        let mut allocated: Vec<String> = per_pod[&pod.id]
            .iter()
            .map(|ip| format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }))
            .collect();
        allocated.sort();
        ensure!(
            addresses == allocated,
            "{}: has {addresses:?}, allocated {allocated:?}",
            pod.id
        );
        for a in addresses {
            ensure!(seen.insert(a.clone()), "address {a} on two pods");
        }
    }
    for (p, pod) in pods.iter().enumerate() {
        if !live.contains(&p) {
            ensure!(
                !pod.ns.links()?.iter().any(|l| l == "eth0"),
                "{} kept eth0",
                pod.id
            );
        }
    }
    node.wait_reaped(DRAIN)?;
    let links: BTreeSet<String> = node.host_links()?.into_iter().collect();
    let wanted: BTreeSet<String> = live.iter().map(|&p| pods[p].host_ifname()).collect();
    ensure!(
        links == wanted,
        "host veths {links:?} != live pods' {wanted:?}"
    );

    // Tear down through the plugin too, and end clean.
    let dels: Vec<Op> = live.iter().map(|&p| Op::Del(p)).collect();
    for (op, outcome) in run_parallel(&node, &pods, &dels, start)? {
        outcome.with_context(|| format!("{op:?}"))?;
    }
    node.wait_reaped(DRAIN)?;
    agent.wait_idle(DRAIN)?;
    node.assert_clean()
}
