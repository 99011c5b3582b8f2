//! Where the DNS server's resident memory goes, on the path `fairlead dns` runs: an embedded API
//! server in a child process holds the benchmark's 10,000 Services (and, with an argument, that
//! many Running pods); this process starts a `Server` that watches it over HTTP and prints its
//! RSS before, once ready, and after a few seconds of settling.
//!
//! `cargo run --release -p fairlead-dns --example footprint -- [PODS] [--pods MODE] [--snapshot]
//! [--services N]`
//!
//! `--services` takes only the first N Services (0: the fixed cost); `--pods` is the pod mode (`insecure`, the default, `verified` or `disabled`); `--snapshot`
//! measures the former path instead (the shared `fairlead_core::watch` snapshot of every kind,
//! applied to the index) for comparison.

#[path = "../../benches/dns/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use fairlead_dns::{Config, PodMode, Server};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{:.1} MiB (anonymous {}, file {})",
        kib as f64 / 1024.0,
        field("RssAnon:"),
        field("RssFile:")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    if let Some(counts) = flag("--serve-api") {
        let (services, pods) = counts.split_once(',').unwrap();
        cluster::serve_api(services.parse().unwrap(), pods.parse().unwrap());
    }
    let services: usize = flag("--services").map_or(cluster::SERVICES, |n| n.parse().unwrap());
    // The first bare number, not a flag's value.
    let pods: usize = args
        .iter()
        .enumerate()
        .skip(1)
        .find(|(i, a)| !args[i - 1].starts_with("--") && a.parse::<usize>().is_ok())
        .map_or(0, |(_, a)| a.parse().unwrap());
    let mode: PodMode = args
        .iter()
        .position(|a| a == "--pods")
        .map(|i| {
            args[i + 1]
                .parse()
                .expect("--pods insecure|verified|disabled")
        })
        .unwrap_or_default();
    let snapshot = args.iter().any(|a| a == "--snapshot");

    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--serve-api", &format!("{services},{pods}")]);
    let t = Instant::now();
    let api = cluster::ApiProcess::start(cmd);
    println!(
        "API server process with {services} Services and {pods} pods ready after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!("start: {}", mib(rss_kib()));
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            pods: mode,
            ..Config::default()
        };
        let t = Instant::now();
        let _cluster;
        let server = if snapshot {
            let watch = fairlead_core::watch::spawn(api.client()).unwrap();
            let server = Server::bind(config, watch.subscribe()).await.unwrap();
            _cluster = Some(watch);
            server
        } else {
            _cluster = None;
            Server::bind_api(config, api.client()).await.unwrap()
        };
        while !server.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let path = if snapshot {
            "core snapshot"
        } else {
            "DNS watch"
        };
        println!(
            "ready ({path}, pods {mode:?}) after {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            mib(rss_kib())
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("3 s later: {}", mib(rss_kib()));
    });
}
