//! Pod addresses from the node's PodCIDRs, one file per allocated address.
//!
//! Layout, under `<dataDir>/<network name>/` (the same shape as the reference
//! host-local plugin, which operators know how to read):
//! - `<ip>`: one per allocated address, containing `network\ncontainer\nifname\n`;
//!   written to `.tmp-<ip>` and renamed, so a crash leaves either nothing or a
//!   whole file, never a half-written one that could duplicate an address;
//! - `last_reserved_ip.<range index>`: where the round-robin search resumes, so
//!   an address freed by DEL is not handed to the very next ADD (a hint: if it
//!   is garbage the search starts at the range's beginning);
//! - `lock`: every change happens under an exclusive `flock` on it, because the
//!   runtime runs many plugin processes at once.
//!
//! Files are not fsync'ed: the worst a power loss can do is drop a recent
//! allocation file, and after a reboot every pod is re-added and the runtime's
//! GC releases what is not valid anyway. An unreadable file keeps its address
//! out of use (never duplicate) until GC releases it.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use crate::config::IpamConf;

const LOCK_FILE: &str = "lock";
const LAST_PREFIX: &str = "last_reserved_ip.";
const TMP_PREFIX: &str = ".tmp-";

/// An IPv4 or IPv6 subnet with its host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.244.1.0/24` or `fd00:10:244:1::/64`; the reason on failure is
    /// meant for a config error message.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or("missing /prefix (write it like 10.244.1.0/24)")?;
        let addr = IpAddr::from_str(addr).map_err(|_| format!("{addr:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(format!("/{prefix} is longer than {bits} bits"));
        }
        // Room for pods: a v4 range needs network, broadcast and a host.
        let max = if addr.is_ipv4() { 30 } else { 126 };
        if prefix > max {
            return Err(format!(
                "/{prefix} leaves no room for pods; use /{max} or shorter"
            ));
        }
        let cidr = Cidr { addr, prefix };
        let network = cidr.ip_at(to_u128(addr) & !cidr.host_mask());
        if network != addr {
            return Err(format!(
                "host bits are set; did you mean {network}/{prefix}?"
            ));
        }
        Ok(cidr)
    }

    fn bits(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    fn host_mask(&self) -> u128 {
        let host_bits = u32::from(self.bits() - self.prefix);
        1u128.checked_shl(host_bits).map_or(u128::MAX, |v| v - 1)
    }

    fn ip_at(&self, v: u128) -> IpAddr {
        if self.addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::from(v as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(v))
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && to_u128(ip) & !self.host_mask() == to_u128(self.addr)
    }

    /// The first and last address handed to pods. Skipped: the network
    /// address (IPv6's subnet-router anycast), IPv4's broadcast, and for IPv6
    /// subnets of /120 or wider the top 128 addresses, reserved as subnet
    /// anycast by RFC 2526. No gateway address is reserved: pods route via
    /// the link-local 169.254.1.1 / fe80::1 answered by the host veth.
    fn usable(&self) -> (u128, u128) {
        let network = to_u128(self.addr);
        let top = network | self.host_mask();
        let last = if self.addr.is_ipv4() || self.prefix > 120 {
            top - 1
        } else {
            top - 128
        };
        (network + 1, last)
    }

    /// The host prefix pods get: /32 or /128.
    pub fn host_prefix(&self) -> u8 {
        self.bits()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Who an allocation belongs to: IPAM's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    fn encode(&self) -> String {
        format!("{}\n{}\n{}\n", self.network, self.container_id, self.ifname)
    }

    fn decode(text: &str) -> Option<Owner> {
        let mut lines = text.lines();
        let owner = Owner {
            network: lines.next()?.to_owned(),
            container_id: lines.next()?.to_owned(),
            ifname: lines.next()?.to_owned(),
        };
        (!owner.network.is_empty() && !owner.container_id.is_empty() && !owner.ifname.is_empty())
            .then_some(owner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "could not take the IPAM lock {path} within {timeout:?}: other plugin invocations hold \
         it; try again later"
    )]
    LockTimeout { path: PathBuf, timeout: Duration },

    #[error("IPAM storage: cannot {action} {path}: {source}", path = .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "container {container_id} already has interface {ifname} on network {network} \
         (addresses {ips}); DEL it before adding it again"
    )]
    AlreadyAllocated {
        network: String,
        container_id: String,
        ifname: String,
        ips: String,
    },

    #[error(
        "no free address left in {range} ({allocated} allocated on this node); delete unused \
         pods or give the node a larger PodCIDR"
    )]
    Exhausted { range: Cidr, allocated: usize },
}

/// One allocated address and the range it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub range: Cidr,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    /// None: unreadable; the address stays in use until GC.
    owner: Option<Owner>,
}

/// The allocator of one network on this node.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    network: String,
    ranges: Vec<Cidr>,
    lock_timeout: Duration,
}

/// Held while the allocator changes anything; closing the file releases the
/// flock, also when the process dies.
struct LockGuard {
    _file: fs::File,
}

impl Ipam {
    pub fn new(network: &str, conf: &IpamConf) -> Ipam {
        Ipam {
            dir: conf.data_dir.join(network),
            network: network.to_owned(),
            ranges: conf.ranges.clone(),
            lock_timeout: conf.lock_timeout,
        }
    }

    /// `<dataDir>/<network>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn owner(&self, container_id: &str, ifname: &str) -> Owner {
        Owner {
            network: self.network.clone(),
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        }
    }

    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IpamError + 'a {
        move |source| IpamError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// Waits up to the configured timeout for the exclusive lock. Polls with a
    /// short, growing sleep rather than blocking, so the wait is bounded
    /// without signals (a lock is held for well under a millisecond).
    fn lock(&self) -> Result<LockGuard, IpamError> {
        fs::create_dir_all(&self.dir).map_err(Self::io("create directory", &self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Self::io("open lock file", &path))?;
        let deadline = Instant::now() + self.lock_timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            // SAFETY: flock on a file descriptor we own; no memory involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(LockGuard { _file: file });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => return Err(Self::io("lock", &path)(err)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(IpamError::LockTimeout {
                    path,
                    timeout: self.lock_timeout,
                });
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Every allocation file. Under the lock, a temp file can only be left
    /// over from a process that died mid-write: it is removed.
    fn scan(&self, locked: bool) -> Result<Vec<Entry>, IpamError> {
        let dir = match fs::read_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("list", &self.dir)(e)),
        };
        let mut entries = Vec::new();
        for item in dir {
            let item = item.map_err(Self::io("list", &self.dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if locked && name.starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(item.path());
                continue;
            }
            let Ok(ip) = IpAddr::from_str(name) else {
                continue;
            };
            let owner = match fs::read_to_string(item.path()) {
                Ok(text) => Owner::decode(&text),
                // Released by someone else between readdir and read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => None,
            };
            entries.push(Entry { ip, owner });
        }
        Ok(entries)
    }

    fn write_atomic(&self, name: &str, content: &[u8]) -> Result<(), IpamError> {
        let tmp = self.dir.join(format!("{TMP_PREFIX}{name}"));
        let path = self.dir.join(name);
        fs::write(&tmp, content).map_err(Self::io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Self::io("rename into place", &path)(e)
        })
    }

    fn remove(&self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Self::io("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// One address per range for (network, container, ifname). Fails, and
    /// changes nothing, if that attachment already has addresses.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Vec<Allocation>, IpamError> {
        let owner = self.owner(container_id, ifname);
        let _lock = self.lock()?;
        let entries = self.scan(true)?;
        let mine: Vec<String> = entries
            .iter()
            .filter(|e| e.owner.as_ref() == Some(&owner))
            .map(|e| e.ip.to_string())
            .collect();
        if !mine.is_empty() {
            return Err(IpamError::AlreadyAllocated {
                network: owner.network,
                container_id: owner.container_id,
                ifname: owner.ifname,
                ips: mine.join(", "),
            });
        }
        let used: BTreeSet<IpAddr> = entries.iter().map(|e| e.ip).collect();
        let content = owner.encode();
        let mut done: Vec<Allocation> = Vec::with_capacity(self.ranges.len());
        let result = (|| {
            for (index, range) in self.ranges.iter().enumerate() {
                let last_path = format!("{LAST_PREFIX}{index}");
                let last = fs::read_to_string(self.dir.join(&last_path))
                    .ok()
                    .and_then(|s| IpAddr::from_str(s.trim()).ok());
                let ip = pick(range, &used, last).ok_or_else(|| IpamError::Exhausted {
                    range: *range,
                    allocated: used.iter().filter(|ip| range.contains(**ip)).count(),
                })?;
                self.write_atomic(&ip.to_string(), content.as_bytes())?;
                done.push(Allocation { ip, range: *range });
                // Only a hint: losing it just restarts the search.
                let _ = fs::write(self.dir.join(last_path), ip.to_string());
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                for allocation in &done {
                    let _ = self.remove(allocation.ip);
                }
                Err(e)
            }
        }
    }

    /// Releases every address of (network, container, ifname); releasing
    /// nothing is not an error (DEL is idempotent).
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let owner = self.owner(container_id, ifname);
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for entry in self.scan(true)? {
            if entry.owner.as_ref() == Some(&owner) {
                self.remove(entry.ip)?;
                released.push(entry.ip);
            }
        }
        Ok(released)
    }

    /// Releases every allocation of this network whose (container, ifname)
    /// is not in `valid`, and unreadable ones. Returns the released owners
    /// (unreadable files have none).
    pub fn gc(&self, valid: &BTreeSet<(String, String)>) -> Result<Vec<Owner>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut released: Vec<Owner> = Vec::new();
        for entry in self.scan(true)? {
            let keep = entry.owner.as_ref().is_some_and(|o| {
                o.network == self.network
                    && valid.contains(&(o.container_id.clone(), o.ifname.clone()))
            });
            if keep {
                continue;
            }
            self.remove(entry.ip)?;
            if let Some(owner) = entry.owner {
                if !released.contains(&owner) {
                    released.push(owner);
                }
            }
        }
        Ok(released)
    }

    /// The addresses held by (container, ifname). Lock-free: files appear and
    /// vanish atomically.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let owner = self.owner(container_id, ifname);
        Ok(self
            .scan(false)?
            .into_iter()
            .filter(|e| e.owner.as_ref() == Some(&owner))
            .map(|e| e.ip)
            .collect())
    }
}

/// The next free address after `last` (round-robin), or None when the range
/// is full. Looks at most `used + 1` candidates: that many consecutive
/// addresses cannot all be taken.
fn pick(range: &Cidr, used: &BTreeSet<IpAddr>, last: Option<IpAddr>) -> Option<IpAddr> {
    let (first, last_usable) = range.usable();
    let capacity = last_usable - first + 1;
    // BTreeSet, not HashSet: a std hasher would cost a getrandom(2) per run.
    let taken = used
        .iter()
        .filter(|ip| range.contains(**ip) && (first..=last_usable).contains(&to_u128(**ip)))
        .count() as u128;
    if taken >= capacity {
        return None;
    }
    let start = match last {
        Some(ip) if range.contains(ip) && (first..last_usable).contains(&to_u128(ip)) => {
            to_u128(ip) + 1
        }
        _ => first,
    };
    (0..capacity.min(taken + 1))
        .map(|k| first + (start - first + k) % capacity)
        .map(|v| range.ip_at(v))
        .find(|ip| !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    static NEXT: AtomicU32 = AtomicU32::new(0);

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "fl-cni-ipam-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ipam(dir: &TempDir, ranges: &[&str]) -> Ipam {
        Ipam::new(
            "net",
            &IpamConf {
                ranges: ranges.iter().map(|r| Cidr::parse(r).unwrap()).collect(),
                data_dir: dir.0.clone(),
                lock_timeout: Duration::from_secs(5),
            },
        )
    }

    #[test]
    fn cidr_parse_and_usable() {
        let c = Cidr::parse("10.244.1.0/24").unwrap();
        assert!(c.contains("10.244.1.255".parse().unwrap()));
        assert!(!c.contains("10.244.2.0".parse().unwrap()));
        let (first, last) = c.usable();
        assert_eq!(c.ip_at(first).to_string(), "10.244.1.1");
        assert_eq!(c.ip_at(last).to_string(), "10.244.1.254");
        let c6 = Cidr::parse("fd00:10:244:1::/64").unwrap();
        let (first, last) = c6.usable();
        assert_eq!(c6.ip_at(first).to_string(), "fd00:10:244:1::1");
        assert_eq!(
            c6.ip_at(last).to_string(),
            "fd00:10:244:1:ffff:ffff:ffff:ff7f"
        );
        assert!(Cidr::parse("10.244.1.0/31").is_err());
        assert!(Cidr::parse("10.244.1.1/24")
            .unwrap_err()
            .contains("10.244.1.0/24"));
        assert!(Cidr::parse("10.244.1.0").is_err());
        assert!(Cidr::parse("0.0.0.0/0").is_ok());
        assert!(Cidr::parse("::/0").is_ok());
    }

    #[test]
    fn allocates_both_families_round_robin_and_rejects_duplicates() {
        let dir = TempDir::new();
        let ipam = ipam(&dir, &["10.0.0.0/29", "fd00::/120"]);
        let a = ipam.allocate("c1", "eth0").unwrap();
        assert_eq!(a[0].ip.to_string(), "10.0.0.1");
        assert_eq!(a[1].ip.to_string(), "fd00::1");
        assert!(matches!(
            ipam.allocate("c1", "eth0"),
            Err(IpamError::AlreadyAllocated { .. })
        ));
        let b = ipam.allocate("c2", "eth0").unwrap();
        assert_eq!(b[0].ip.to_string(), "10.0.0.2");
        assert_eq!(ipam.release("c1", "eth0").unwrap().len(), 2);
        // Freed .1 is not reused right away.
        let c = ipam.allocate("c3", "eth0").unwrap();
        assert_eq!(c[0].ip.to_string(), "10.0.0.3");
        assert_eq!(ipam.lookup("c3", "eth0").unwrap().len(), 2);
        assert!(ipam.release("c1", "eth0").unwrap().is_empty());
    }

    #[test]
    fn exhaustion_rolls_back_and_wraps() {
        let dir = TempDir::new();
        // /30: two usable v4 addresses, plenty of v6.
        let ipam = ipam(&dir, &["10.0.0.0/30", "fd00::/120"]);
        ipam.allocate("a", "eth0").unwrap();
        ipam.allocate("b", "eth0").unwrap();
        assert!(matches!(
            ipam.allocate("c", "eth0"),
            Err(IpamError::Exhausted { .. })
        ));
        assert!(ipam.lookup("c", "eth0").unwrap().is_empty());
        ipam.release("a", "eth0").unwrap();
        // Wraps around to the freed .1.
        assert_eq!(
            ipam.allocate("c", "eth0").unwrap()[0].ip.to_string(),
            "10.0.0.1"
        );
    }

    #[test]
    fn gc_keeps_only_valid_and_drops_garbage() {
        let dir = TempDir::new();
        let ipam = ipam(&dir, &["10.0.0.0/24"]);
        for id in ["a", "b", "c"] {
            ipam.allocate(id, "eth0").unwrap();
        }
        fs::write(ipam.dir().join("10.0.0.200"), "garbage").unwrap();
        fs::write(ipam.dir().join(".tmp-10.0.0.201"), "half").unwrap();
        let valid = BTreeSet::from([("b".to_owned(), "eth0".to_owned())]);
        let released = ipam.gc(&valid).unwrap();
        assert_eq!(released.len(), 2);
        let left: Vec<_> = fs::read_dir(ipam.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("10."))
            .collect();
        assert_eq!(left, vec!["10.0.0.2"]);
        assert!(!ipam.dir().join(".tmp-10.0.0.201").exists());
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let dir = TempDir::new();
        let ipam = ipam(&dir, &["10.0.0.0/24", "fd00::/64"]);
        let ips: Vec<IpAddr> = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let ipam = ipam.clone();
                    s.spawn(move || {
                        (0..20)
                            .flat_map(|i| ipam.allocate(&format!("c{t}-{i}"), "eth0").unwrap())
                            .map(|a| a.ip)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: BTreeSet<_> = ips.iter().collect();
        assert_eq!(ips.len(), 320);
        assert_eq!(distinct.len(), 320);
    }
}
