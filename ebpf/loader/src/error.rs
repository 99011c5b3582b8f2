//! The loader's errors: each names the map, program, interface or namespace
//! involved and says what to do about it. aya's errors are boxed: a
//! `ProgramError` carries the verifier log and would make every `Result` here
//! hundreds of bytes wide.

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError, EbpfError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "instance name {instance:?} cannot be used in a pin path: use 1-64 characters \
         from [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidInstance { instance: String },

    #[error(
        "bpffs is not mounted at {path} and mounting it failed: {source}; \
         run `mount -t bpf bpf {path}` as root",
        path = .path.display()
    )]
    Bpffs { path: PathBuf, source: io::Error },

    #[error(
        "pin directory {path} already exists: another loader with instance {instance:?} is \
         running, or a crashed one left it behind; remove it (`rm -r {path}`) or use \
         another instance name",
        path = .path.display()
    )]
    PinDirExists { instance: String, path: PathBuf },

    #[error("cannot create pin directory {path}: {source}; loading needs root", path = .path.display())]
    PinDir { path: PathBuf, source: io::Error },

    #[error(
        "loading the eBPF object (map {map}) failed: {source}; this needs root \
         (CAP_BPF, CAP_NET_ADMIN) and a kernel with BTF"
    )]
    Load {
        map: &'static str,
        #[source]
        source: Box<EbpfError>,
    },

    #[error(
        "program {program} is not in the embedded eBPF object: ebpf/programs and \
         fairlead-ebpf-common disagree on its name; make them match and rebuild"
    )]
    ProgramMissing { program: &'static str },

    #[error("map {map} is not in the embedded eBPF object: ebpf/programs and fairlead-ebpf-common disagree on its name; make them match and rebuild")]
    MapMissing { map: &'static str },

    #[error("program {program} is not a tc classifier in the eBPF object: {source}; its entry function needs #[classifier]")]
    ProgramType {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    /// Carries the verifier log in `source`'s message.
    #[error("the kernel rejected program {program}: {source}")]
    Verify {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error(
        "cannot open network namespace {netns}: {source}; pass a namespace that exists \
         (`ip netns add NAME` makes /var/run/netns/NAME)"
    )]
    NetnsOpen { netns: String, source: io::Error },

    #[error("{netns} is not a network namespace: pass /var/run/netns/NAME, /proc/PID/ns/net or an fd of one")]
    NotNetns { netns: String },

    #[error(
        "refusing to attach to {ifname} in the root network namespace ({netns}): Fairlead \
         attaches only in namespaces a sandbox or test created; pass one of those"
    )]
    RootNetns { netns: String, ifname: String },

    #[error(
        "cannot tell whether {netns} is the root network namespace (neither /proc/1/ns/net \
         nor /proc/2/ns/net is readable: {source}); refusing to attach. Run with access to /proc"
    )]
    RootNetnsUnknown { netns: String, source: io::Error },

    #[error(
        "instance {instance:?} already counts network namespace {first}, not {netns}: \
         interface indexes are only unique within one namespace, so load another \
         instance for {netns}"
    )]
    NetnsMismatch {
        instance: String,
        first: String,
        netns: String,
    },

    #[error("cannot enter network namespace {netns}: {source}; setns needs CAP_SYS_ADMIN")]
    NetnsEnter { netns: String, source: io::Error },

    #[error("no interface {ifname} in network namespace {netns}: {source}; list them with `ip -n NAME link`")]
    NoInterface {
        ifname: String,
        netns: String,
        source: io::Error,
    },

    #[error("{ifname} in {netns} is already counted by instance {instance:?}")]
    AlreadyAttached {
        instance: String,
        ifname: String,
        netns: String,
    },

    #[error(
        "attaching {program} with tcx to {ifname} in {netns} failed: {source}; tcx needs \
         Linux 6.6+ and CAP_NET_ADMIN"
    )]
    Attach {
        program: &'static str,
        ifname: String,
        netns: String,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("querying tcx programs on {ifname} in {netns} failed: {source}")]
    Query {
        ifname: String,
        netns: String,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("detaching {program} from {ifname} in {netns} failed: {source}")]
    Detach {
        program: &'static str,
        ifname: String,
        netns: String,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("reading map {map} failed: {source}")]
    MapRead {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error("removing pin directory {path} failed: {source}; remove it by hand (`rm -r {path}`)", path = .path.display())]
    Unpin { path: PathBuf, source: io::Error },

    #[error(
        "BPF_PROG_TEST_RUN of {program} failed: {source}; it needs root and a packet of at \
         least 14 bytes (an Ethernet header)"
    )]
    TestRun {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("writing map {map} failed: {source}; if the map is full, raise its size (the MAX_* constant next to {map} in fairlead-ebpf-common, then rebuild and restart the agent)")]
    MapWrite {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error("pinning {what} at {path} failed: {source}", path = .path.display())]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "{path} is not a cgroup v2 directory Fairlead may attach to: {reason}; socket-level \
         load balancing attaches only to a cgroup subtree the sandbox or a test created, \
         never to a hierarchy's root",
        path = .path.display()
    )]
    Cgroup { path: PathBuf, reason: String },

    #[error("attaching {program} to cgroup {path} failed: {source}", path = .path.display())]
    CgroupAttach {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },

    #[error(
        "pinned map {path} has a different layout than this build expects ({detail}); an \
         incompatible Fairlead left it: remove the pin directory and restart",
        path = .path.display()
    )]
    PinnedMapMismatch { path: PathBuf, detail: String },
}
