//! The cluster of the DNS benchmark and of `dns/examples/footprint.rs`: 10,000 ClusterIP
//! Services in 50 namespaces (one named TCP port each) and, optionally, Running pods; served by
//! the embedded API server in a process of its own, so that the DNS process measured beside it
//! holds only what `fairlead dns` holds (it reaches the objects over HTTP through its watchers,
//! as in a cluster).

#![allow(dead_code)] // each includer uses part of it

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

pub const SERVICES: usize = 10_000;
pub const NAMESPACES: usize = 50;
pub const PODS: usize = 50_000;

pub struct Svc {
    pub ns: String,
    pub name: String,
    pub ip: [u8; 4],
}

pub fn services() -> Vec<Svc> {
    (0..SERVICES)
        .map(|i| Svc {
            ns: format!("ns-{:02}", i % NAMESPACES),
            name: format!("svc-{i:05}"),
            // 10.96.1.1 - 10.96.40.250: away from 10.96.0.10 (kube-dns).
            ip: [10, 96, (1 + i / 250) as u8, (1 + i % 250) as u8],
        })
        .collect()
}

/// The namespaces, the first `services` Services and `pods` Running pods (10.244.0.0/16, no
/// Service selects them), as manifests.
pub fn objects(services: usize, pods: usize) -> impl Iterator<Item = Value> {
    let namespaces = (0..NAMESPACES).map(|n| {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{n:02}")}})
    });
    let services = self::services().into_iter().take(services).map(|s| {
        let [a, b, c, d] = s.ip;
        let ip = format!("{a}.{b}.{c}.{d}");
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    });
    let pods = (0..pods).map(|i| {
        let ip = format!("10.244.{}.{}", i / 250, 1 + i % 250);
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{:02}", i % NAMESPACES)},
            "spec": {"containers": [{"name": "app", "image": "app"}], "nodeName": format!("node-{}", i % 100)},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    });
    namespaces.chain(services).chain(pods)
}

/// Child mode: an embedded API server on 127.0.0.1 (any port) holding [`objects`]; prints its
/// URL on stdout, then serves until stdin closes (its parent is gone) and exits.
pub fn serve_api(services: usize, pods: usize) -> ! {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let server = fairlead_apiserver::ApiServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Default::default(),
        )
        .await
        .unwrap();
        for obj in objects(services, pods) {
            server.create(obj).unwrap();
        }
        println!("{}", server.url());
        tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await
        .unwrap();
    });
    std::process::exit(0)
}

/// An API server child process ([`serve_api`]); it exits when this is dropped (its stdin
/// closes), and is waited for.
pub struct ApiProcess {
    child: Child,
    pub url: String,
}

impl ApiProcess {
    /// Runs `cmd` (this executable with the flag that calls [`serve_api`]) and waits for the
    /// URL.
    pub fn start(mut cmd: Command) -> ApiProcess {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the API server process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("http://"), "API server process: {line:?}");
        ApiProcess {
            child,
            url: line.trim().to_owned(),
        }
    }

    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(kube::Config::new(self.url.parse().unwrap())).unwrap()
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
