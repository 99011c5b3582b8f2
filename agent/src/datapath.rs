//! The agent's eBPF datapath: Service load balancing programs loaded for this node, attached
//! to the underlay interface, to every pod veth (on the CNI plugin's `ATTACH`, before the pod
//! starts) and to the pods' cgroup (socket-level balancing), and kept in line with snapshots.
//!
//! The maps and links are pinned (`/sys/fs/bpf/fairlead-<instance>/`), so a restarted agent
//! finds traffic still flowing and adopts what it left; it re-attaches to the veths it finds.
//! Map writes and attaches are syscalls, so they run on blocking threads behind one mutex.

use std::collections::HashSet;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::IpAddr;

use fairlead_core::{ObjectKey, Snapshot};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use tracing::{debug, info, warn};

use crate::services::{touched, LbSettings, ServiceLb, Skip, SyncReport};

/// How often expired conntrack entries and pins of deleted veths are cleaned up.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the Service load-balancing programs failed: {0}")]
    Load(#[source] fairlead_ebpf::Error),
    #[error("attaching to the underlay interface {ifname} failed: {source}")]
    Underlay {
        ifname: String,
        #[source]
        source: fairlead_ebpf::Error,
    },
    #[error("attaching socket-level load balancing to {path} failed: {source}", path = .path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: fairlead_ebpf::Error,
    },
    #[error("programming Services failed: {0}")]
    Sync(#[source] fairlead_ebpf::Error),
    #[error("the datapath task stopped unexpectedly: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Shared handle to the loaded programs.
#[derive(Clone)]
pub struct Datapath {
    lb: Arc<Mutex<ServiceLb>>,
    /// The latest snapshot seen, for programming a pod's policy at ATTACH.
    latest: Arc<Mutex<Arc<Snapshot>>>,
    /// Flow events, named.
    flows: crate::flows::FlowLog,
    namer: Arc<Mutex<crate::flows::Namer>>,
    netns: PathBuf,
    node: String,
    events: Option<kube::Client>,
}

impl Datapath {
    /// Loads (or adopts) the programs and attaches them to the underlay, the pod cgroup and
    /// every pod veth already in `netns`.
    pub async fn start(
        settings: LbSettings,
        netns: &Path,
        underlay: &str,
        node: &str,
        events: Option<kube::Client>,
    ) -> Result<Self, DatapathError> {
        let (netns_path, underlay) = (netns.to_owned(), underlay.to_owned());
        let mut lb = tokio::task::spawn_blocking(move || -> Result<ServiceLb, DatapathError> {
            let policy = settings.network_policy;
            let mut lb = ServiceLb::load(settings).map_err(DatapathError::Load)?;
            lb.lb
                .set_policy_enforcement(policy)
                .map_err(DatapathError::Load)?;
            lb.lb
                .attach_net(&netns_path, &underlay)
                .map_err(|source| DatapathError::Underlay {
                    ifname: underlay.clone(),
                    source,
                })?;
            if let Some(cgroup) = lb.settings().pod_cgroup.clone() {
                lb.lb
                    .attach_cgroup(&cgroup)
                    .map_err(|source| DatapathError::Cgroup {
                        path: cgroup.clone(),
                        source,
                    })?;
            }
            let veths = pod_veths(&netns_path).unwrap_or_default();
            for veth in &veths {
                if let Err(e) = lb.lb.attach_pod(&netns_path, veth) {
                    warn!(veth, error = %e, "could not re-attach to an existing pod veth");
                }
            }
            info!(
                instance = %lb.settings().instance,
                pod_veths = veths.len(),
                adopted = lb.lb.table().len(),
                "Service load balancing loaded"
            );
            Ok(lb)
        })
        .await??;
        let reader = lb.lb.take_flow_reader();
        let lb = Arc::new(Mutex::new(lb));
        let flows = crate::flows::FlowLog::default();
        let namer = Arc::new(Mutex::new(crate::flows::Namer::new(&Snapshot::empty())));
        if let Some(reader) = reader {
            let (lb, namer, node) = (Arc::clone(&lb), Arc::clone(&namer), node.to_owned());
            tokio::spawn(crate::flows::run(reader, flows.clone(), move |e| {
                let policy = (e.policy != 0)
                    .then(|| {
                        let lb = lb.lock().unwrap_or_else(|p| p.into_inner());
                        lb.policy_ids.name(e.policy).map(|k| k.to_string())
                    })
                    .flatten();
                let namer = namer.lock().unwrap_or_else(|p| p.into_inner());
                namer.record(&node, e, policy)
            }));
        }
        Ok(Self {
            flows,
            namer,
            lb,
            latest: Arc::new(Mutex::new(Arc::new(Snapshot::empty()))),
            netns: netns.to_owned(),
            node: node.to_owned(),
            events,
        })
    }

    /// The CNI plugin's `ATTACH <veth> [<namespace>/<pod> <ip>[,<ip>] [mesh-netns=<cookie>]]`:
    /// programs the pod's NetworkPolicy for its addresses, then attaches the pod programs to
    /// its host veth, so the pod never sends or receives a packet without both. A meshed pod
    /// (`mesh-netns`, its network namespace's cookie) is left out of socket-level load
    /// balancing, so its sidecar sees Service addresses and balances itself. Blocking.
    pub fn attach_pod(&self, args: &str) -> Result<(), String> {
        let mut words = args.split_whitespace();
        let ifname = words.next().unwrap_or("");
        if !is_pod_veth(ifname) {
            return Err(format!(
                "{ifname:?} is not a Fairlead pod veth (fl + 11 hex digits)"
            ));
        }
        let pod = words.next().and_then(|p| p.split_once('/'));
        let ips: Vec<IpAddr> = match words.next() {
            Some(list) => list
                .split(',')
                .map(|ip| {
                    ip.parse()
                        .map_err(|_| format!("{ip:?} is not an IP address"))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let mesh_netns = match words.next() {
            Some(w) => Some(
                w.strip_prefix("mesh-netns=")
                    .and_then(|c| c.parse::<u64>().ok())
                    .ok_or_else(|| format!("{w:?} is not mesh-netns=<netns cookie>"))?,
            ),
            None => None,
        };
        let snapshot = Arc::clone(&self.latest.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lb = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cookie) = mesh_netns {
            lb.lb
                .skip_socket_lb(cookie)
                .map_err(|e| format!("leaving the meshed pod out of socket-LB: {e}"))?;
        }
        if let Some((namespace, name)) = pod {
            lb.attach_endpoint(&snapshot, ObjectKey::new(namespace, name), &ips)
                .map_err(|e| format!("programming the pod's NetworkPolicy: {e}"))?;
        }
        lb.lb
            .attach_pod(&self.netns, ifname)
            .map_err(|e| e.to_string())
    }

    /// Programs what changed between `old` and `new` (everything without `old`).
    pub async fn sync(
        &self,
        old: Option<Arc<Snapshot>>,
        new: Arc<Snapshot>,
    ) -> Result<SyncReport, DatapathError> {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&new);
        let policy_changed = match &old {
            Some(old) => {
                let d = Snapshot::diff(old, &new);
                !(d.pods.is_empty() && d.network_policies.is_empty() && d.namespaces.is_empty())
            }
            None => true,
        };
        if policy_changed {
            *self.namer.lock().unwrap_or_else(|p| p.into_inner()) = crate::flows::Namer::new(&new);
            let (lb, node, snap) = (Arc::clone(&self.lb), self.node.clone(), Arc::clone(&new));
            let ops = tokio::task::spawn_blocking(move || {
                let mut lb = lb.lock().unwrap_or_else(|p| p.into_inner());
                lb.sync_policy(&snap, &node)
            })
            .await?
            .map_err(DatapathError::Sync)?;
            debug!(map_ops = ops, "NetworkPolicy programmed");
        }
        let keys = match &old {
            // The node's own addresses feed NodePort frontends: resync all when it changes.
            Some(old) if old.node(&self.node) == new.node(&self.node) => {
                let keys = touched(old, &new);
                if keys.is_empty() {
                    return Ok(SyncReport::default());
                }
                Some(keys)
            }
            _ => None,
        };
        let (lb, node) = (Arc::clone(&self.lb), self.node.clone());
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            let mut lb = lb.lock().unwrap_or_else(|p| p.into_inner());
            lb.sync(&new, &node, keys.as_ref())
        })
        .await?
        .map_err(DatapathError::Sync)?;
        debug!(
            services = report.services,
            map_ops = report.apply.map_ops,
            elapsed = ?started.elapsed(),
            "Services programmed"
        );
        if !report.skips.is_empty() {
            if let Some(client) = &self.events {
                post_events(client, &self.node, &report.skips).await;
            }
        }
        Ok(report)
    }

    /// Expires conntrack entries and drops the pinned links of veths that are gone.
    pub async fn housekeeping(&self) {
        let (lb, netns) = (Arc::clone(&self.lb), self.netns.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut lb = lb.lock().unwrap_or_else(|p| p.into_inner());
            let gc = lb.lb.gc();
            let present = pod_veths(&netns).ok();
            let mut unpinned = 0;
            if let Some(present) = present {
                for ifname in lb.lb.attached_interfaces() {
                    if is_pod_veth(&ifname)
                        && !present.contains(&ifname)
                        && lb.lb.detach_pod(&ifname).is_ok()
                    {
                        unpinned += 1;
                    }
                }
            }
            (gc, unpinned)
        })
        .await;
        match result {
            Ok((Ok(gc), unpinned)) => {
                debug!(
                    scanned = gc.scanned,
                    expired = gc.expired,
                    unpinned,
                    "datapath housekeeping"
                )
            }
            Ok((Err(e), _)) => warn!(error = %e, "conntrack garbage collection failed"),
            Err(e) => warn!(error = %e, "datapath housekeeping stopped"),
        }
    }

    /// The flow log (recent events and the live stream).
    pub fn flows(&self) -> &crate::flows::FlowLog {
        &self.flows
    }

    /// The datapath's counters in Prometheus text format. Blocking (map reads).
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let lb = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        out += "# HELP fairlead_datapath_events_total Packets and flows by what the eBPF datapath did with them (drop reasons included).\n";
        out += "# TYPE fairlead_datapath_events_total counter\n";
        match lb.lb.stats() {
            Ok(stats) => {
                for s in stats {
                    let _ = writeln!(
                        out,
                        "fairlead_datapath_events_total{{node=\"{}\",event=\"{}\"}} {}",
                        self.node, s.name, s.value
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(out, "# stats unavailable: {e}");
            }
        }
        let mut gauge = |name: &str, help: &str, value: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {value}", self.node);
        };
        gauge(
            "fairlead_policy_endpoints",
            "Pod addresses with NetworkPolicy programmed.",
            lb.lb.policy_endpoints().len(),
        );
        gauge(
            "fairlead_policy_write_failures",
            "NetworkPolicy writes that failed (a full map); each left its pod denied (fail closed).",
            lb.lb.policy_failures() as usize,
        );
        gauge(
            "fairlead_service_frontends",
            "Service frontends programmed.",
            lb.lb.table().len(),
        );
        out
    }

    /// Runs `f` on the loaded programs (tests, diagnostics). Blocking.
    pub fn with<R>(&self, f: impl FnOnce(&mut ServiceLb) -> R) -> R {
        let mut lb = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut lb)
    }
}

/// `fl` + 11 lowercase hex digits: the host end of a pod veth made by `fairlead-cni`.
pub fn is_pod_veth(name: &str) -> bool {
    name.len() == 13
        && name.starts_with("fl")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Pod veths present in `netns`, by name.
fn pod_veths(netns: &Path) -> std::io::Result<HashSet<String>> {
    let file = std::fs::File::open(netns)?;
    fairlead_netns::run_in(std::os::fd::AsFd::as_fd(&file), || {
        let mut names = HashSet::new();
        // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
        unsafe {
            let list = libc::if_nameindex();
            if list.is_null() {
                return Err(std::io::Error::last_os_error());
            }
            let mut p = list;
            while (*p).if_index != 0 {
                let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
                if is_pod_veth(&name) {
                    names.insert(name);
                }
                p = p.add(1);
            }
            libc::if_freenameindex(list);
        }
        Ok(names)
    })?
}

/// One Warning Event per skipped Service reason, as kube-proxy users expect to see with
/// `kubectl describe service`.
async fn post_events(client: &kube::Client, node: &str, skips: &[Skip]) {
    let now = chrono_now();
    for skip in skips {
        let api: kube::Api<Event> = kube::Api::namespaced(client.clone(), &skip.service.namespace);
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", skip.service.name)),
                namespace: Some(skip.service.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                name: Some(skip.service.name.clone()),
                namespace: Some(skip.service.namespace.clone()),
                ..Default::default()
            },
            reason: Some("LoadBalancingSkipped".into()),
            message: Some(skip.reason.clone()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("fairlead-agent".into()),
                host: Some(node.to_owned()),
            }),
            reporting_component: Some("fairlead-agent".into()),
            reporting_instance: Some(node.to_owned()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            ..Default::default()
        };
        if let Err(e) = api.create(&Default::default(), &event).await {
            warn!(service = %skip.service, error = %e, "could not post the skip Event");
        }
    }
}

fn chrono_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
