//! Flow visibility: the datapath's verdict events (ring buffer `fl_flows_v1`) read as they
//! come, named with pods and policies, kept in a bounded log and streamed to followers
//! (`FLOWS [follow]` on the agent socket, which `fairlead flows` reads).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use fairlead_core::Snapshot;
use fairlead_ebpf::policy::{FlowEvent, FlowReader, VERDICT_DROPPED};
use fairlead_ebpf_common::lb::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, STAT_NAMES};
use fairlead_ebpf_common::policy::DIR_INGRESS;
use serde::Serialize;
use tokio::sync::broadcast;

/// Records kept for `FLOWS` without `follow`.
pub const LOG_CAPACITY: usize = 4096;

/// One flow as `fairlead flows` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowRecord {
    /// RFC 3339, when the agent read it.
    pub time: String,
    pub node: String,
    /// `ingress` (into the pod) or `egress` (out of it).
    pub direction: &'static str,
    /// `FORWARDED` (a new connection allowed) or `DROPPED`.
    pub verdict: &'static str,
    /// For drops, why (`policy_denied_ingress`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub protocol: &'static str,
    /// The pod on this node.
    pub pod: Peer,
    pub peer: Peer,
    /// `namespace/name` of the NetworkPolicy that allowed it, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Peer {
    pub address: SocketAddr,
    /// `namespace/name`, when a pod has this address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The log and the live stream.
#[derive(Clone)]
pub struct FlowLog {
    recent: Arc<Mutex<VecDeque<Arc<FlowRecord>>>>,
    live: broadcast::Sender<Arc<FlowRecord>>,
}

impl Default for FlowLog {
    fn default() -> Self {
        Self {
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(LOG_CAPACITY))),
            live: broadcast::channel(1024).0,
        }
    }
}

impl FlowLog {
    pub fn push(&self, record: FlowRecord) {
        let record = Arc::new(record);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == LOG_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(Arc::clone(&record));
        let _ = self.live.send(record);
    }

    pub fn recent(&self) -> Vec<Arc<FlowRecord>> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.live.subscribe()
    }
}

/// Names addresses and policy ids.
pub struct Namer {
    pods: HashMap<IpAddr, String>,
}

impl Namer {
    pub fn new(snapshot: &Snapshot) -> Self {
        let mut pods = HashMap::new();
        for p in snapshot.pods().values() {
            for ip in &p.ips {
                pods.insert(*ip, format!("{}/{}", p.namespace, p.name));
            }
        }
        Self { pods }
    }

    fn peer(&self, addr: &[u32; 4], port: u16) -> Peer {
        let ip = fairlead_ebpf::lb::table::unmap_addr(addr);
        Peer {
            address: SocketAddr::new(ip, u16::from_be(port)),
            name: self.pods.get(&ip).cloned(),
        }
    }

    pub fn record(&self, node: &str, e: &FlowEvent, policy: Option<String>) -> FlowRecord {
        let dropped = e.verdict == VERDICT_DROPPED;
        FlowRecord {
            time: k8s_openapi::jiff::Timestamp::now().to_string(),
            node: node.to_owned(),
            direction: if e.dir == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            verdict: if dropped { "DROPPED" } else { "FORWARDED" },
            reason: dropped
                .then(|| STAT_NAMES.get(e.reason as usize).copied())
                .flatten(),
            protocol: match e.proto {
                PROTO_TCP => "TCP",
                PROTO_UDP => "UDP",
                PROTO_SCTP => "SCTP",
                _ => "other",
            },
            pod: self.peer(&e.endpoint, e.endpoint_port),
            peer: self.peer(&e.peer, e.peer_port),
            policy,
        }
    }
}

/// How often the ring buffer is drained. The datapath writes events without waking the
/// reader (a wake-up per connection cost a quarter of the connection rate); at 25,000 new
/// connections a second, 20 ms is 500 events, far from the ring's 16,384.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Reads events forever; `name` turns each into a record.
pub async fn run(
    mut reader: FlowReader,
    log: FlowLog,
    mut name: impl FnMut(&FlowEvent) -> FlowRecord + Send,
) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut events = Vec::new();
        reader.drain(|e| events.push(e));
        for e in &events {
            log.push(name(e));
        }
    }
}
