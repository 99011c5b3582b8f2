//! Where the DNS server's resident memory goes: RSS after each stage of
//! building 10,000 Services (and, with an argument, that many pods) and
//! applying them to the index. `cargo run --release -p fairlead-dns --example
//! footprint [PODS]`.

use std::sync::Arc;

use fairlead_core::{Pod, Service, Snapshot};
use fairlead_dns::{Index, IndexConfig};
use k8s_openapi::api::core::v1 as corev1;
use serde_json::json;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    println!("start: {} KiB", rss_kib());
    let mut b = Snapshot::builder();
    for i in 0..10_000u32 {
        let v = json!({
            "metadata": {"name": format!("svc-{i:05}"), "namespace": format!("ns-{:02}", i % 50)},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, 1 + i % 250),
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        });
        let k: corev1::Service = serde_json::from_value(v).unwrap();
        b = b.service(Service::try_from(&k).unwrap());
    }
    for i in 0..pods {
        let v = json!({
            "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{:02}", i % 50)},
            "spec": {"containers": [{"name": "app"}], "nodeName": format!("node-{}", i % 100)},
            "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", i / 250, 1 + i % 250),
                       "podIPs": [{"ip": format!("10.244.{}.{}", i / 250, 1 + i % 250)}]}
        });
        let k: corev1::Pod = serde_json::from_value(v).unwrap();
        b = b.pod(Pod::try_from(&k).unwrap());
    }
    let snap = Arc::new(b.build());
    println!("snapshot built: {} KiB", rss_kib());
    // SAFETY: plain glibc call.
    unsafe { libc::malloc_trim(0) };
    println!("after malloc_trim: {} KiB", rss_kib());
    let mut index = Index::new(&IndexConfig {
        zone: "cluster.local".into(),
        ttl: 5,
        reverse_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ],
    })
    .unwrap();
    let stats = index.apply(Arc::clone(&snap));
    println!(
        "index applied ({} names, {stats:?}): {} KiB",
        index.len(),
        rss_kib()
    );
    // SAFETY: plain glibc call.
    unsafe { libc::malloc_trim(0) };
    println!("after malloc_trim: {} KiB", rss_kib());
}
