//! The per-interface counters family: load, pin, attach with tcx inside a
//! namespace, read, test-run, and tear down on drop.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{MapData, MapError, PerCpuHashMap},
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
};
use fairlead_ebpf_common::ifstats::{
    Direction, IfStatsKey, IfStatsValue, MAP_IFSTATS, PROG_EGRESS, PROG_INGRESS,
};

use crate::{
    bpffs::{ensure_bpffs, pin_dir, validate_instance},
    netns::{run_in_netns, NetnsRef, NsId, OpenNetns},
    Error, OBJECT,
};

/// Output room beyond the input packet for BPF_PROG_TEST_RUN: counting never
/// grows a packet, but later programs (encap, NAT) will, and a too-small
/// buffer makes the kernel fail the run with ENOSPC.
const TEST_RUN_HEADROOM: usize = 512;

/// Packets and bytes seen by one hook, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Whole frames, Ethernet header included.
    pub bytes: u64,
}

/// Both directions of one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub ingress: Counter,
    pub egress: Counter,
}

impl IfCounters {
    pub fn get(&self, direction: Direction) -> Counter {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }

    fn get_mut(&mut self, direction: Direction) -> &mut Counter {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// An interface the counters are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub ifname: String,
    /// Index inside `netns`; the key the counters are stored under.
    pub ifindex: u32,
    /// The namespace as the caller named it (a path, or `fd N`).
    pub netns: String,
}

/// Names of the programs attached with tcx to one interface, in run order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcxPrograms {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return code (a tc verdict, e.g. [`crate::TC_ACT_OK`]).
    pub return_value: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    pub duration: Duration,
}

struct AttachedLinks {
    info: Attachment,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// One loaded instance of the ifstats programs and its pinned map.
///
/// This is the guard: dropping it detaches every tcx link it made and
/// removes `/sys/fs/bpf/fairlead-<instance>/`. Use [`IfStats::close`] to see
/// teardown errors instead of having them logged.
pub struct IfStats {
    instance: String,
    pin_dir: PathBuf,
    ebpf: Ebpf,
    /// The one namespace this instance counts in (set by the first attach).
    netns: Option<(NsId, String)>,
    attachments: Vec<AttachedLinks>,
    closed: bool,
}

impl std::fmt::Debug for IfStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IfStats")
            .field("instance", &self.instance)
            .field("pin_dir", &self.pin_dir)
            .field("attachments", &self.attachments().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Removes a freshly created pin directory if loading fails half-way.
struct RemoveDirOnError(Option<PathBuf>);

impl Drop for RemoveDirOnError {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl IfStats {
    /// Loads both programs into the kernel (verifier included) and pins the
    /// counter map at `/sys/fs/bpf/fairlead-<instance>/fl_ifstats_v1`.
    /// Nothing is attached yet. Fails if the pin directory already exists,
    /// so two loaders never share (and later delete) each other's pins.
    pub fn load(instance: &str) -> Result<Self, Error> {
        validate_instance(instance)?;
        ensure_bpffs()?;
        let pin_dir = pin_dir(instance);
        match fs::create_dir(&pin_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::PinDirExists {
                    instance: instance.to_owned(),
                    path: pin_dir,
                })
            }
            Err(source) => {
                return Err(Error::PinDir {
                    path: pin_dir,
                    source,
                })
            }
        }
        let mut remove_on_error = RemoveDirOnError(Some(pin_dir.clone()));

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(MAP_IFSTATS, pin_dir.join(MAP_IFSTATS))
            .load(OBJECT)
            .map_err(|source| Error::Load {
                map: MAP_IFSTATS,
                source: Box::new(source),
            })?;
        if ebpf.map(MAP_IFSTATS).is_none() {
            return Err(Error::MapMissing { map: MAP_IFSTATS });
        }
        for program in [PROG_INGRESS, PROG_EGRESS] {
            classifier_mut(&mut ebpf, program)?
                .load()
                .map_err(|source| Error::Verify {
                    program,
                    source: Box::new(source),
                })?;
        }

        remove_on_error.0 = None;
        Ok(Self {
            instance: instance.to_owned(),
            pin_dir,
            ebpf,
            netns: None,
            attachments: Vec::new(),
            closed: false,
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `/sys/fs/bpf/fairlead-<instance>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where the counter map is pinned.
    pub fn map_pin_path(&self) -> PathBuf {
        self.pin_dir.join(MAP_IFSTATS)
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.iter().map(|a| &a.info)
    }

    /// Attaches `ifstats_ingress` and `ifstats_egress` with tcx to `ifname`
    /// inside `netns`, after any programs already there, and returns the
    /// interface's index (the key its counters are read under).
    ///
    /// The attach runs on a short-lived thread that entered `netns`; the
    /// caller's namespace never changes. Refuses the root namespace, and a
    /// second namespace per instance (ifindexes would collide).
    pub fn attach<'a>(
        &mut self,
        netns: impl Into<NetnsRef<'a>>,
        ifname: &str,
    ) -> Result<Attachment, Error> {
        let ns = OpenNetns::open(netns.into())?;
        // Checked before anything touches the interface: a bug elsewhere that
        // passes the host namespace must not reach the host's links.
        if ns.is_root()? {
            return Err(Error::RootNetns {
                netns: ns.label.clone(),
                ifname: ifname.to_owned(),
            });
        }
        if let Some((first_id, first)) = &self.netns {
            if *first_id != ns.id {
                return Err(Error::NetnsMismatch {
                    instance: self.instance.clone(),
                    first: first.clone(),
                    netns: ns.label.clone(),
                });
            }
        }
        if self.attachments.iter().any(|a| a.info.ifname == ifname) {
            return Err(Error::AlreadyAttached {
                instance: self.instance.clone(),
                ifname: ifname.to_owned(),
                netns: ns.label.clone(),
            });
        }

        let label = ns.label.as_str();
        let ebpf = &mut self.ebpf;
        let (ifindex, ingress, egress) = run_in_netns(ns.fd(), || {
            let ifindex = if_nametoindex(ifname).map_err(|source| Error::NoInterface {
                ifname: ifname.to_owned(),
                netns: label.to_owned(),
                source,
            })?;
            let ingress = tcx_attach(ebpf, PROG_INGRESS, ifname, label)?;
            let egress = match tcx_attach(ebpf, PROG_EGRESS, ifname, label) {
                Ok(id) => id,
                Err(e) => {
                    // Leave nothing half-attached.
                    if let Ok(program) = classifier_mut(ebpf, PROG_INGRESS) {
                        let _ = program.detach(ingress);
                    }
                    return Err(e);
                }
            };
            Ok::<_, Error>((ifindex, ingress, egress))
        })
        .map_err(|source| Error::NetnsEnter {
            netns: ns.label.clone(),
            source,
        })??;

        let info = Attachment {
            ifname: ifname.to_owned(),
            ifindex,
            netns: ns.label.clone(),
        };
        self.netns.get_or_insert((ns.id, ns.label));
        self.attachments.push(AttachedLinks {
            info: info.clone(),
            ingress,
            egress,
        });
        Ok(info)
    }

    /// Counters of one interface (by its index in this instance's
    /// namespace), summed over CPUs. Zero for an interface never seen.
    pub fn counters(&self, ifindex: u32) -> Result<IfCounters, Error> {
        let map = self.map()?;
        let mut counters = IfCounters::default();
        for direction in [Direction::Ingress, Direction::Egress] {
            match map.get(&IfStatsKey::new(ifindex, direction), 0) {
                Ok(values) => *counters.get_mut(direction) = sum(values.iter()),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Error::MapRead {
                        map: MAP_IFSTATS,
                        source: Box::new(source),
                    })
                }
            }
        }
        Ok(counters)
    }

    /// Every interface with counters in the map, by ifindex.
    pub fn all_counters(&self) -> Result<BTreeMap<u32, IfCounters>, Error> {
        let map = self.map()?;
        let mut all = BTreeMap::<u32, IfCounters>::new();
        for entry in map.iter() {
            let (key, values) = entry.map_err(|source| Error::MapRead {
                map: MAP_IFSTATS,
                source: Box::new(source),
            })?;
            // Keys with a direction byte no program writes cannot occur; skip
            // rather than fail a metrics scrape over one.
            if let Some(direction) = key.direction() {
                *all.entry(key.ifindex).or_default().get_mut(direction) = sum(values.iter());
            }
        }
        Ok(all)
    }

    /// Runs the program of `direction` once on `packet` (a full Ethernet
    /// frame) with BPF_PROG_TEST_RUN. Nothing needs to be attached: the
    /// kernel runs it as if the frame came through the loopback device of the
    /// caller's namespace, so it is counted under that device's ifindex (1).
    pub fn test_run(&self, direction: Direction, packet: &[u8]) -> Result<TestRunOutput, Error> {
        test_run_classifier(
            &self.ebpf,
            program_name(direction),
            packet,
            TEST_RUN_HEADROOM,
        )
    }

    /// Lists the tcx programs on `ifname` inside `netns` (read-only; any
    /// namespace). Shows whether an instance is really attached, or gone.
    pub fn tcx_programs<'a>(
        netns: impl Into<NetnsRef<'a>>,
        ifname: &str,
    ) -> Result<TcxPrograms, Error> {
        let ns = OpenNetns::open(netns.into())?;
        let label = ns.label.as_str();
        run_in_netns(ns.fd(), || {
            let mut found = TcxPrograms::default();
            for (attach_type, names) in [
                (TcAttachType::Ingress, &mut found.ingress),
                (TcAttachType::Egress, &mut found.egress),
            ] {
                let (_revision, programs) = SchedClassifier::query_tcx(ifname, attach_type)
                    .map_err(|source| Error::Query {
                        ifname: ifname.to_owned(),
                        netns: label.to_owned(),
                        source: Box::new(source),
                    })?;
                names.extend(
                    programs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
                );
            }
            Ok(found)
        })
        .map_err(|source| Error::NetnsEnter {
            netns: ns.label.clone(),
            source,
        })?
    }

    /// Detaches everything and removes the pin directory, reporting the
    /// first failure (all steps are tried regardless).
    pub fn close(mut self) -> Result<(), Error> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        self.closed = true;
        let mut first_error = None;
        let Self {
            ebpf, attachments, ..
        } = self;
        for links in attachments.drain(..) {
            for (program, id) in [(PROG_INGRESS, links.ingress), (PROG_EGRESS, links.egress)] {
                // Closing a tcx link detaches it in whatever namespace the
                // interface lives, so no setns is needed here. If the
                // namespace is already gone the kernel has detached it.
                let result = classifier_mut(ebpf, program).and_then(|p| {
                    p.detach(id).map_err(|source| Error::Detach {
                        program,
                        ifname: links.info.ifname.clone(),
                        netns: links.info.netns.clone(),
                        source: Box::new(source),
                    })
                });
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
        }
        match fs::remove_dir_all(&self.pin_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                first_error.get_or_insert(Error::Unpin {
                    path: self.pin_dir.clone(),
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn map(&self) -> Result<PerCpuHashMap<&MapData, IfStatsKey, IfStatsValue>, Error> {
        let map = self
            .ebpf
            .map(MAP_IFSTATS)
            .ok_or(Error::MapMissing { map: MAP_IFSTATS })?;
        PerCpuHashMap::try_from(map).map_err(|source| Error::MapRead {
            map: MAP_IFSTATS,
            source: Box::new(source),
        })
    }
}

impl Drop for IfStats {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Err(error) = self.teardown() {
            tracing::warn!(instance = %self.instance, %error, "ifstats teardown incomplete");
        }
    }
}

/// BPF_PROG_TEST_RUN of one classifier on a full Ethernet frame, with
/// `headroom` bytes of output room for programs that grow the packet.
pub(crate) fn test_run_classifier(
    ebpf: &Ebpf,
    program: &'static str,
    packet: &[u8],
    headroom: usize,
) -> Result<TestRunOutput, Error> {
    let classifier: &SchedClassifier = ebpf
        .program(program)
        .ok_or(Error::ProgramMissing { program })?
        .try_into()
        .map_err(|source| Error::ProgramType {
            program,
            source: Box::new(source),
        })?;
    let mut out = vec![0u8; packet.len() + headroom];
    let result = classifier
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(|source| Error::TestRun {
            program,
            source: Box::new(source),
        })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        return_value: result.return_value,
        data: out,
        duration: result.duration,
    })
}

fn program_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => PROG_INGRESS,
        Direction::Egress => PROG_EGRESS,
    }
}

fn classifier_mut<'e>(
    ebpf: &'e mut Ebpf,
    program: &'static str,
) -> Result<&'e mut SchedClassifier, Error> {
    ebpf.program_mut(program)
        .ok_or(Error::ProgramMissing { program })?
        .try_into()
        .map_err(|source| Error::ProgramType {
            program,
            source: Box::new(source),
        })
}

/// Must run on a thread inside the target namespace: aya resolves `ifname`
/// and the kernel resolves the ifindex in the calling thread's namespace.
fn tcx_attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    ifname: &str,
    netns: &str,
) -> Result<SchedClassifierLinkId, Error> {
    let attach_type = if program == PROG_INGRESS {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    // tcx explicitly, never the netlink/clsact fallback `attach()` picks on
    // old kernels: a tcx link goes away with its fd, a clsact filter would
    // outlive a crashed loader.
    classifier_mut(ebpf, program)?
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| Error::Attach {
            program,
            ifname: ifname.to_owned(),
            netns: netns.to_owned(),
            source: Box::new(source),
        })
}

fn if_nametoindex(ifname: &str) -> io::Result<u32> {
    let c_name =
        CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c_name is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn sum<'v>(values: impl Iterator<Item = &'v IfStatsValue>) -> Counter {
    values.fold(Counter::default(), |acc, v| Counter {
        packets: acc.packets.saturating_add(v.packets),
        bytes: acc.bytes.saturating_add(v.bytes),
    })
}
