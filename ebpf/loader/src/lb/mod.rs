//! Service load balancing in the kernel: loads the `lb_*` programs, pins
//! their maps and links under `/sys/fs/bpf/fairlead-<instance>/`, attaches
//! them to pod veths, the node's underlay interface and a pod cgroup, and
//! programs Services through [`ServiceTable`].
//!
//! Everything that keeps traffic flowing lives in bpffs, not in this process:
//! maps are pinned and reused by the next load, links are pinned, so an agent
//! that restarts (or crashes) leaves every established connection and every
//! Service working, and the new agent adopts the maps' contents
//! ([`ServiceTable::adopt`]) and rewrites only what changed meanwhile.

pub mod table;

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use fairlead_ebpf_common::lb::{
    AffinityKey, AffinityValue, Backend as BackendValue, CtKey, CtValue, MaglevTable, SockFwdValue,
    SockRevKey, SockRevValue, SvcKey, SvcValue, MAPS, MAP_AFFINITY, MAP_BACKENDS, MAP_CT,
    MAP_MAGLEV, MAP_NODE, MAP_SOCK_FWD, MAP_SOCK_REV, MAP_SOCK_SKIP, MAP_STATS, MAP_SVC,
    NODE_ADDR_V4, NODE_ADDR_V6, PROG_CONNECT4, PROG_CONNECT6, PROG_FROM_NET, PROG_FROM_POD,
    PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_TO_POD, PROTO_UDP, STAT_COUNT,
};

pub use fairlead_ebpf_common::lb::{Scope, STAT_NAMES};
pub use table::{ApplyReport, BackendAddr, Frontend, FrontendKey, LbMaps, Proto, ServiceTable};

use crate::{
    bpffs::{ensure_bpffs, pin_dir, validate_instance},
    netns::{run_in_netns, NetnsRef, OpenNetns},
    Error, TestRunOutput, OBJECT,
};

const TC_PROGRAMS: [&str; 3] = [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_NET];
const SOCK_PROGRAMS: [&str; 6] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
];
/// `statfs.f_type` of cgroup2.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
const TEST_RUN_HEADROOM: usize = 512;

/// How a loaded instance treats its pins when dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Maps and links stay pinned after the process ends (the agent):
    /// traffic keeps flowing and the next load adopts them.
    Keep,
    /// Dropping the instance removes its pin directory, which detaches every
    /// link and frees the maps (tests, benchmarks).
    RemoveOnDrop,
}

/// One counter of the datapath, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub name: &'static str,
    pub value: u64,
}

/// What one garbage-collection pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: usize,
    pub expired: usize,
}

/// The kernel maps behind [`LbMaps`].
pub struct KernelMaps {
    svc: BpfHashMap<MapData, SvcKey, SvcValue>,
    backends: BpfHashMap<MapData, u32, BackendValue>,
    maglev: BpfHashMap<MapData, u32, MaglevTable>,
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    sock_rev: BpfHashMap<MapData, SockRevKey, SockRevValue>,
    sock_fwd: BpfHashMap<MapData, SockRevKey, SockFwdValue>,
    sock_skip: BpfHashMap<MapData, u64, u8>,
    stats: PerCpuArray<MapData, u64>,
    node: Array<MapData, [u32; 4]>,
}

fn write_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::MapWrite {
        map,
        source: Box::new(source),
    }
}

fn read_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::MapRead {
        map,
        source: Box::new(source),
    }
}

/// Deleting a key that is already gone is success: the goal state holds.
fn deleted(result: Result<(), MapError>, map: &'static str) -> Result<(), Error> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(write_err(map)(e)),
    }
}

impl LbMaps for KernelMaps {
    fn put_svc(&mut self, key: &SvcKey, value: &SvcValue) -> Result<(), Error> {
        self.svc.insert(key, value, 0).map_err(write_err(MAP_SVC))
    }

    fn del_svc(&mut self, key: &SvcKey) -> Result<(), Error> {
        deleted(self.svc.remove(key), MAP_SVC)
    }

    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), Error> {
        self.backends
            .insert(id, backend, 0)
            .map_err(write_err(MAP_BACKENDS))
    }

    fn del_backend(&mut self, id: u32) -> Result<(), Error> {
        deleted(self.backends.remove(&id), MAP_BACKENDS)
    }

    fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<(), Error> {
        self.maglev
            .insert(id, table, 0)
            .map_err(write_err(MAP_MAGLEV))
    }

    fn del_maglev(&mut self, id: u32) -> Result<(), Error> {
        deleted(self.maglev.remove(&id), MAP_MAGLEV)
    }

    fn flush_udp(&mut self, pairs: &HashSet<(u32, u32)>) -> Result<usize, Error> {
        let (doomed, _) =
            self.ct_keys_where(|k, v| k.proto == PROTO_UDP && pairs.contains(&(v.svc, v.backend)))?;
        for key in &doomed {
            deleted(self.ct.remove(key), MAP_CT)?;
        }
        // Unconnected UDP sockets stuck to a departed backend pick again.
        let stuck: Vec<SockRevKey> = self
            .sock_fwd
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, v)| pairs.contains(&(v.svc, v.backend)))
            .map(|(k, _)| k)
            .collect();
        for key in &stuck {
            deleted(self.sock_fwd.remove(key), MAP_SOCK_FWD)?;
        }
        Ok(doomed.len() + stuck.len())
    }
}

impl KernelMaps {
    /// Keys of the entries `keep` selects, and how many entries were seen.
    fn ct_keys_where(
        &self,
        keep: impl Fn(&CtKey, &CtValue) -> bool,
    ) -> Result<(Vec<CtKey>, usize), Error> {
        let mut keys = Vec::new();
        let mut seen = 0;
        for entry in self.ct.iter() {
            match entry {
                Ok((k, v)) => {
                    seen += 1;
                    if keep(&k, &v) {
                        keys.push(k);
                    }
                }
                // An entry deleted (LRU eviction, datapath) mid-walk.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(read_err(MAP_CT)(e)),
            }
        }
        Ok((keys, seen))
    }
}

/// One loaded instance of the load-balancing programs. See the module docs.
pub struct Lb {
    instance: String,
    pin_dir: PathBuf,
    ebpf: Ebpf,
    maps: KernelMaps,
    policy: crate::policy::PolicyMaps,
    flows: Option<crate::policy::FlowReader>,
    table: ServiceTable,
    persistence: Persistence,
    closed: bool,
}

impl std::fmt::Debug for Lb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lb")
            .field("instance", &self.instance)
            .field("frontends", &self.table.len())
            .finish_non_exhaustive()
    }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    pin: &Path,
) -> Result<BpfHashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::MapMissing { map: name })?;
    BpfHashMap::try_from(map).map_err(|e| Error::PinnedMapMismatch {
        path: pin.join(name),
        detail: e.to_string(),
    })
}

impl Lb {
    /// Loads the programs and maps, reusing maps a previous instance pinned
    /// (their contents are adopted), and verifies every program. Nothing is
    /// attached yet.
    pub fn load(instance: &str, persistence: Persistence) -> Result<Self, Error> {
        Self::load_sized(instance, persistence, &[])
    }

    /// [`Lb::load`] with some maps sized differently from their `MAX_*` constants (tests that
    /// must fill a map; operators who need a bigger one). Applies only to maps created by
    /// this load, not to pinned maps it adopts.
    pub fn load_sized(
        instance: &str,
        persistence: Persistence,
        max_entries: &[(&'static str, u32)],
    ) -> Result<Self, Error> {
        validate_instance(instance)?;
        ensure_bpffs()?;
        let pin_dir = pin_dir(instance);
        for dir in [pin_dir.clone(), pin_dir.join("links")] {
            fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
        }
        let mut loader = EbpfLoader::new();
        for (map, size) in max_entries {
            loader.map_max_entries(map, *size);
        }
        let paths: Vec<(&'static str, PathBuf)> = MAPS
            .iter()
            .chain(crate::policy::POLICY_MAPS.iter())
            .map(|m| (*m, pin_dir.join(m)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| Error::Load {
            map: MAP_SVC,
            source: Box::new(source),
        })?;
        for program in TC_PROGRAMS {
            let p: &mut SchedClassifier = program_mut(&mut ebpf, program)?;
            p.load().map_err(|source| Error::Verify {
                program,
                source: Box::new(source),
            })?;
        }
        for program in SOCK_PROGRAMS {
            let p: &mut CgroupSockAddr = program_mut(&mut ebpf, program)?;
            p.load().map_err(|source| Error::Verify {
                program,
                source: Box::new(source),
            })?;
        }
        let stats = ebpf
            .take_map(MAP_STATS)
            .ok_or(Error::MapMissing { map: MAP_STATS })?;
        let node = ebpf
            .take_map(MAP_NODE)
            .ok_or(Error::MapMissing { map: MAP_NODE })?;
        let maps = KernelMaps {
            svc: take_hash(&mut ebpf, MAP_SVC, &pin_dir)?,
            backends: take_hash(&mut ebpf, MAP_BACKENDS, &pin_dir)?,
            maglev: take_hash(&mut ebpf, MAP_MAGLEV, &pin_dir)?,
            ct: take_hash(&mut ebpf, MAP_CT, &pin_dir)?,
            affinity: take_hash(&mut ebpf, MAP_AFFINITY, &pin_dir)?,
            sock_rev: take_hash(&mut ebpf, MAP_SOCK_REV, &pin_dir)?,
            sock_fwd: take_hash(&mut ebpf, MAP_SOCK_FWD, &pin_dir)?,
            sock_skip: take_hash(&mut ebpf, MAP_SOCK_SKIP, &pin_dir)?,
            stats: PerCpuArray::try_from(stats).map_err(|e| Error::PinnedMapMismatch {
                path: pin_dir.join(MAP_STATS),
                detail: e.to_string(),
            })?,
            node: Array::try_from(node).map_err(|e| Error::PinnedMapMismatch {
                path: pin_dir.join(MAP_NODE),
                detail: e.to_string(),
            })?,
        };
        let policy = {
            use fairlead_ebpf_common::policy::{
                MAP_POL_CONF, MAP_POL_CT, MAP_POL_EP, MAP_POL_RULES,
            };
            let mismatch = |name: &'static str| {
                let path = pin_dir.join(name);
                move |e: MapError| Error::PinnedMapMismatch {
                    path,
                    detail: e.to_string(),
                }
            };
            let rules = ebpf
                .take_map(MAP_POL_RULES)
                .ok_or(Error::MapMissing { map: MAP_POL_RULES })?;
            let conf = ebpf
                .take_map(MAP_POL_CONF)
                .ok_or(Error::MapMissing { map: MAP_POL_CONF })?;
            crate::policy::PolicyMaps::new(
                take_hash(&mut ebpf, MAP_POL_EP, &pin_dir)?,
                LpmTrie::try_from(rules).map_err(mismatch(MAP_POL_RULES))?,
                Array::try_from(conf).map_err(mismatch(MAP_POL_CONF))?,
                take_hash(&mut ebpf, MAP_POL_CT, &pin_dir)?,
            )
        };
        let flows = {
            use fairlead_ebpf_common::policy::MAP_FLOWS;
            let ring = ebpf
                .take_map(MAP_FLOWS)
                .ok_or(Error::MapMissing { map: MAP_FLOWS })?;
            crate::policy::FlowReader::new(aya::maps::RingBuf::try_from(ring).map_err(|e| {
                Error::PinnedMapMismatch {
                    path: pin_dir.join(MAP_FLOWS),
                    detail: e.to_string(),
                }
            })?)
        };
        let mut lb = Self {
            instance: instance.to_owned(),
            pin_dir,
            ebpf,
            maps,
            policy,
            flows: Some(flows),
            table: ServiceTable::new(),
            persistence,
            closed: false,
        };
        lb.adopt()?;
        Ok(lb)
    }

    fn adopt(&mut self) -> Result<(), Error> {
        let entries: Vec<(SvcKey, SvcValue)> =
            self.maps.svc.iter().filter_map(|e| e.ok()).collect();
        let backends: Vec<(u32, BackendValue)> =
            self.maps.backends.iter().filter_map(|e| e.ok()).collect();
        if !entries.is_empty() {
            tracing::info!(
                instance = %self.instance,
                entries = entries.len(),
                backends = backends.len(),
                "adopting the load-balancing maps a previous agent pinned"
            );
        }
        self.table.adopt(&entries, &backends);
        Ok(())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// Makes `owner`'s frontends exactly `frontends` (see [`ServiceTable::set`]).
    pub fn set_service(
        &mut self,
        owner: &str,
        frontends: Vec<Frontend>,
    ) -> Result<ApplyReport, Error> {
        self.table.set(&mut self.maps, owner, frontends)
    }

    pub fn remove_service(&mut self, owner: &str) -> Result<ApplyReport, Error> {
        self.table.remove(&mut self.maps, owner)
    }

    /// This node's own addresses (one per family): the source of flows from outside that
    /// are SNATed to a backend on another node.
    pub fn set_node_addresses(&mut self, addrs: &[std::net::IpAddr]) -> Result<(), Error> {
        for (index, v4) in [(NODE_ADDR_V4, true), (NODE_ADDR_V6, false)] {
            let value = addrs
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .map_or([0; 4], |a| table::map_addr(*a));
            self.maps
                .node
                .set(index, value, 0)
                .map_err(write_err(MAP_NODE))?;
        }
        Ok(())
    }

    /// Socket-level load balancing leaves the sockets of this network namespace (by its
    /// netns cookie) alone: a meshed pod, whose sidecar balances over the Service's endpoints
    /// itself. Its packets to a Service address are still translated on the pod's veth if the
    /// sidecar passes them through.
    pub fn skip_socket_lb(&mut self, netns_cookie: u64) -> Result<(), Error> {
        self.maps
            .sock_skip
            .insert(netns_cookie, 1, 0)
            .map_err(write_err(MAP_SOCK_SKIP))
    }

    /// NetworkPolicy enforcement on or off for this node (off: every packet
    /// passes; on: a pod must have been programmed with
    /// [`Lb::set_endpoint_policy`], or its packets are dropped).
    pub fn set_policy_enforcement(&mut self, on: bool) -> Result<(), Error> {
        self.policy.set_enforcement(on)
    }

    /// Programs what the pod at `ip` may receive and send (written as a
    /// diff; see `crate::policy` for the ordering).
    pub fn set_endpoint_policy(
        &mut self,
        ip: std::net::IpAddr,
        policy: &crate::policy::EndpointPolicy,
    ) -> Result<crate::policy::PolicyReport, Error> {
        self.policy.set_endpoint(ip, policy)
    }

    /// Forgets a pod address (its packets fail closed from then on).
    pub fn remove_endpoint_policy(&mut self, ip: std::net::IpAddr) -> Result<(), Error> {
        self.policy.remove_endpoint(ip)
    }

    /// The flow-event reader (once; the agent's reader task owns it).
    pub fn take_flow_reader(&mut self) -> Option<crate::policy::FlowReader> {
        self.flows.take()
    }

    /// Policy writes that failed (a full map); each left its pod closed.
    pub fn policy_failures(&self) -> u64 {
        self.policy.failures()
    }

    /// Pod addresses with programmed policy.
    pub fn policy_endpoints(&self) -> Vec<std::net::IpAddr> {
        self.policy.endpoints().copied().collect()
    }

    /// After the first full sync: removes adopted frontends nobody claimed.
    pub fn prune_unowned(&mut self) -> Result<ApplyReport, Error> {
        self.table.prune_unowned(&mut self.maps)
    }

    /// Attaches `lb_from_pod` (ingress) and `lb_to_pod` (egress) with tcx to
    /// a pod's host-side veth `ifname` inside the node namespace `netns`.
    pub fn attach_pod<'a>(
        &mut self,
        netns: impl Into<NetnsRef<'a>>,
        ifname: &str,
    ) -> Result<(), Error> {
        self.attach_tc(
            netns.into(),
            ifname,
            &[
                (PROG_FROM_POD, TcAttachType::Ingress),
                (PROG_TO_POD, TcAttachType::Egress),
            ],
        )
    }

    /// Attaches `lb_from_net` with tcx to the node's underlay `ifname`.
    pub fn attach_net<'a>(
        &mut self,
        netns: impl Into<NetnsRef<'a>>,
        ifname: &str,
    ) -> Result<(), Error> {
        self.attach_tc(
            netns.into(),
            ifname,
            &[(PROG_FROM_NET, TcAttachType::Ingress)],
        )
    }

    fn link_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join("links").join(name)
    }

    fn attach_tc(
        &mut self,
        netns: NetnsRef<'_>,
        ifname: &str,
        programs: &[(&'static str, TcAttachType)],
    ) -> Result<(), Error> {
        let ns = OpenNetns::open(netns)?;
        if ns.is_root()? {
            return Err(Error::RootNetns {
                netns: ns.label.clone(),
                ifname: ifname.to_owned(),
            });
        }
        let label = ns.label.clone();
        let pins: Vec<PathBuf> = programs
            .iter()
            .map(|(_, t)| self.link_pin(&tc_pin_name(ifname, *t)))
            .collect();
        let ebpf = &mut self.ebpf;
        let links = run_in_netns(ns.fd(), || {
            let mut links = Vec::new();
            for (program, attach_type) in programs {
                let p: &mut SchedClassifier = program_mut(ebpf, program)?;
                let attach_err = |source| Error::Attach {
                    program,
                    ifname: ifname.to_owned(),
                    netns: label.clone(),
                    source: Box::new(source),
                };
                let id = p
                    .attach_with_options(
                        ifname,
                        *attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?;
                let link = p.take_link(id).map_err(attach_err)?;
                let fd = FdLink::try_from(link).map_err(|e| Error::Pin {
                    what: format!("{program} link on {ifname}"),
                    path: PathBuf::new(),
                    source: Box::new(e),
                })?;
                links.push(fd);
            }
            Ok::<_, Error>(links)
        })
        .map_err(|source| Error::NetnsEnter {
            netns: ns.label.clone(),
            source,
        })??;
        for (link, pin) in links.into_iter().zip(pins) {
            replace_pin(link, &pin)?;
        }
        Ok(())
    }

    /// Removes the pinned links of a pod veth (they detach; a veth that is
    /// already gone took its links with it and only the pins remain).
    pub fn detach_pod(&mut self, ifname: &str) -> Result<(), Error> {
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let pin = self.link_pin(&tc_pin_name(ifname, t));
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Unpin { path: pin, source }),
            }
        }
        Ok(())
    }

    /// Interfaces with pinned tc links, by name.
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| {
                n.strip_prefix("tcx-")
                    .and_then(|r| r.rsplit_once('-'))
                    .map(|(ifname, _)| ifname.to_owned())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Attaches the socket-LB programs to a cgroup v2 directory that the
    /// caller created (never a hierarchy's root).
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), Error> {
        check_cgroup(path)?;
        let dir = fs::File::open(path).map_err(|e| Error::Cgroup {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let ino = fs::metadata(path).map(|m| m.ino()).unwrap_or(0);
        for program in SOCK_PROGRAMS {
            let p: &mut CgroupSockAddr = program_mut(&mut self.ebpf, program)?;
            let attach_err = |source| Error::CgroupAttach {
                program,
                path: path.to_owned(),
                source: Box::new(source),
            };
            // `Single` is flags 0: aya attaches with BPF_LINK_CREATE here, and the kernel
            // refuses any flag on a cgroup link (EINVAL); links always coexist with other
            // programs on the cgroup, as BPF_F_ALLOW_MULTI would.
            let id = p
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = p.take_link(id).map_err(attach_err)?;
            let fd = FdLink::try_from(link).map_err(|e| Error::Pin {
                what: format!("{program} link on cgroup {}", path.display()),
                path: PathBuf::new(),
                source: Box::new(e),
            })?;
            replace_pin(fd, &self.link_pin(&format!("cg-{ino}-{program}")))?;
        }
        Ok(())
    }

    /// Deletes conntrack entries whose lifetime has passed (the LRU map also
    /// evicts under pressure; this keeps it from filling with dead flows).
    pub fn gc(&mut self) -> Result<GcReport, Error> {
        self.gc_at(monotonic_ns())
    }

    /// [`Lb::gc`] as if the clock read `now` (CLOCK_MONOTONIC ns).
    pub fn gc_at(&mut self, now: u64) -> Result<GcReport, Error> {
        let policy_expired = self.policy.gc(now);
        let (doomed, scanned) = self.maps.ct_keys_where(|_, v| v.expires_ns <= now)?;
        for key in &doomed {
            deleted(self.maps.ct.remove(key), MAP_CT)?;
        }
        Ok(GcReport {
            scanned,
            expired: doomed.len() + policy_expired,
        })
    }

    /// Every conntrack entry (tests, `fairlead` debugging).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        let mut all = Vec::new();
        for entry in self.maps.ct.iter() {
            match entry {
                Ok(kv) => all.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(read_err(MAP_CT)(e)),
            }
        }
        Ok(all)
    }

    /// Every sessionAffinity entry (tests, debugging).
    pub fn affinity(&self) -> Vec<(AffinityKey, AffinityValue)> {
        self.maps.affinity.iter().filter_map(|e| e.ok()).collect()
    }

    /// Socket-LB reverse entries (UDP sockets translated by sendmsg/connect).
    pub fn sock_rev(&self) -> Vec<(SockRevKey, SockRevValue)> {
        self.maps.sock_rev.iter().filter_map(|e| e.ok()).collect()
    }

    /// Datapath counters, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<Stat>, Error> {
        (0..STAT_COUNT)
            .map(|i| {
                let values = self.maps.stats.get(&i, 0).map_err(read_err(MAP_STATS))?;
                Ok(Stat {
                    name: STAT_NAMES[i as usize],
                    value: values.iter().sum(),
                })
            })
            .collect()
    }

    /// One counter by name (0 if unknown).
    pub fn stat(&self, name: &str) -> Result<u64, Error> {
        Ok(self
            .stats()?
            .into_iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.value))
    }

    /// Runs one tc program once on `packet` with BPF_PROG_TEST_RUN, in the
    /// caller's network namespace.
    pub fn test_run(&self, program: &'static str, packet: &[u8]) -> Result<TestRunOutput, Error> {
        crate::ifstats::test_run_classifier(&self.ebpf, program, packet, TEST_RUN_HEADROOM)
    }

    /// Removes the pin directory: every link detaches and the maps are freed
    /// once the last user is gone. For tests and `sandbox down`; the agent
    /// never does this on its own.
    pub fn destroy(mut self) -> Result<(), Error> {
        self.closed = true;
        remove_pins(&self.pin_dir)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if self.closed || self.persistence == Persistence::Keep {
            return;
        }
        if let Err(error) = remove_pins(&self.pin_dir) {
            tracing::warn!(instance = %self.instance, %error, "lb teardown incomplete");
        }
    }
}

/// Datapath counters of a running instance, read from its pinned map (another process owns
/// the programs: the agent). For tests and diagnostics.
pub fn pinned_stats(instance: &str) -> Result<Vec<Stat>, Error> {
    validate_instance(instance)?;
    let path = pin_dir(instance).join(MAP_STATS);
    let data = MapData::from_pin(&path).map_err(read_err(MAP_STATS))?;
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(read_err(MAP_STATS))?;
    (0..STAT_COUNT)
        .map(|i| {
            let values = map.get(&i, 0).map_err(read_err(MAP_STATS))?;
            Ok(Stat {
                name: STAT_NAMES[i as usize],
                value: values.iter().sum(),
            })
        })
        .collect()
}

/// Removes a load-balancing pin directory (links and maps). Missing is fine.
pub fn remove_pins(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Unpin {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn tc_pin_name(ifname: &str, t: TcAttachType) -> String {
    let dir = match t {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    };
    format!("tcx-{ifname}-{dir}")
}

/// Pins `link` at `path`, replacing (and so detaching) a link a previous
/// instance pinned there. The new link is attached before the old one goes,
/// so the interface is never without the program.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Unpin {
                path: path.to_owned(),
                source,
            })
        }
    }
    let pinned: PinnedLink = link.pin(path).map_err(|e| Error::Pin {
        what: "link".to_owned(),
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    drop(pinned);
    Ok(())
}

fn check_cgroup(path: &Path) -> Result<(), Error> {
    let fail = |reason: String| Error::Cgroup {
        path: path.to_owned(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    // The root of a cgroup2 hierarchy is inode 1.
    if meta.ino() == 1 {
        return Err(fail("it is the root of the cgroup2 hierarchy".into()));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| fail(e.to_string()))?;
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and `st` a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(fail(io::Error::last_os_error().to_string()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs by libc target"
    )]
    if st.f_type as i64 != CGROUP2_MAGIC {
        return Err(fail("not on a cgroup2 filesystem".into()));
    }
    Ok(())
}

fn program_mut<'e, T>(ebpf: &'e mut Ebpf, program: &'static str) -> Result<&'e mut T, Error>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(Error::ProgramMissing { program })?
        .try_into()
        .map_err(|source| Error::ProgramType {
            program,
            source: Box::new(source),
        })
}

/// CLOCK_MONOTONIC in nanoseconds: `bpf_ktime_get_ns`'s clock.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data and the out-pointer is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
