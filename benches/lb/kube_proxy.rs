//! The two peers: kube-proxy's iptables mode and nftables mode, as rule
//! shapes written the way kube-proxy writes them, by the tools it execs
//! (`iptables-restore`, `nft -f -`), inside the router namespace.
//!
//! Only what kube-proxy writes for ClusterIP Services with ready endpoints
//! (no NodePorts, external IPs, load balancers, session affinity or
//! topology), with `--cluster-cidr` set to the pod CIDR, so Service traffic
//! from pods is not masqueraded while traffic from elsewhere is marked for
//! it. Chain names are kube-proxy's: `KUBE-SVC-`/`KUBE-SEP-` + 16 base32
//! characters of SHA-256 (iptables), `service-`/`endpoint-` + 8 of them +
//! the readable name (nftables).
//!
//! Services are written in the order given, so in iptables mode the first
//! Service is the first rule of `KUBE-SERVICES` and the last one is its last
//! Service rule: the best and worst case of the linear match. (kube-proxy
//! itself writes them in Go map order, a random position per sync.)

use std::fmt::Write as _;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::datapath::{Datapath, Router, Svc};

pub const IPTABLES: &str = "/usr/sbin/iptables";
pub const IPTABLES_RESTORE: &str = "/usr/sbin/iptables-restore";
pub const NFT: &str = "/usr/sbin/nft";

/// kube-proxy's masquerade mark bit (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// What kube-proxy passes to every restore: wait up to 5 s for the xtables
/// lock (polling every 100 ms), keep other chains and tables (`--noflush`),
/// keep counters.
const RESTORE_ARGS: [&str; 6] = ["-w", "5", "-W", "100000", "--noflush", "--counters"];

// ---------------------------------------------------------------------------
// Chain names.

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first `n` characters of `base32.StdEncoding.EncodeToString(sha256(s))`.
fn hash_b32(s: &str, n: usize) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(n);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &byte in digest.iter() {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 && out.len() < n {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
        if out.len() == n {
            break;
        }
    }
    out
}

/// `KUBE-SVC-<portProtoHash>` (iptables proxier `servicePortPolicyClusterChain`).
fn svc_chain(svc: &Svc) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_b32(&(svc.port_name_string() + "tcp"), 16)
    )
}

/// `KUBE-SEP-<hash>` (iptables proxier `servicePortEndpointChainName`).
fn sep_chain(svc: &Svc, endpoint: &std::net::SocketAddrV4) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_b32(&format!("{}tcp{endpoint}", svc.port_name_string()), 16)
    )
}

/// nftables proxier `servicePortChainNameBase`: `ns/name/tcp/port`.
fn nft_base(svc: &Svc) -> String {
    format!("{}/{}/tcp/{}", svc.namespace, svc.name, svc.port_name)
}

/// nftables proxier `hashAndTruncate`: 8 base32 characters of the name's
/// hash, a dash, the name (never near the length limit here).
fn hash_and_prefix(name: &str) -> String {
    format!("{}-{name}", hash_b32(name, 8))
}

fn nft_service_chain(svc: &Svc) -> String {
    format!("service-{}", hash_and_prefix(&nft_base(svc)))
}

fn nft_endpoint_chain(svc: &Svc, endpoint: &std::net::SocketAddrV4) -> String {
    let ep = format!("{}/{}", endpoint.ip(), endpoint.port());
    format!(
        "endpoint-{}",
        hash_and_prefix(&format!("{}__{ep}", nft_base(svc)))
    )
}

/// `iptables -V` of the binary kube-proxy would run, e.g.
/// `iptables v1.8.9 (nf_tables)`.
pub fn iptables_version() -> String {
    tool_version(IPTABLES, "-V")
}

/// `nft -v`, e.g. `nftables v1.0.6 (Lester Gooch #5)`.
pub fn nft_version() -> String {
    tool_version(NFT, "-v")
}

fn tool_version(program: &str, flag: &str) -> String {
    // Only prints a version; runs in the bench's own namespace.
    std::process::Command::new(program)
        .arg(flag)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| format!("{program}: not found"))
}

// ---------------------------------------------------------------------------
// (a) iptables mode.

/// kube-proxy in iptables mode (1.28+, `MinimizeIPTablesRestore`).
///
/// * Start-up (the constructor, untimed): the `KUBE-*` chains and the jumps
///   from the built-in chains that kube-proxy ensures with `iptables -N` /
///   `-C` / `-I` before its first restore (its `iptablesJumpChains`), here
///   in one `iptables-restore --noflush`.
/// * `program` (timed): one full sync, a single `iptables-restore -w 5 -W
///   100000 --noflush --counters` of the `filter` table (kube-proxy's
///   `KUBE-FORWARD` rules; the other filter chains are empty with every
///   Service having endpoints) and the whole `nat` table: `KUBE-SERVICES`
///   with one `-d VIP/32 -p tcp --dport P -j KUBE-SVC-…` rule per Service
///   and the NodePorts rule last, `KUBE-SVC-…` doing the off-cluster
///   masquerade mark, then `-m statistic --mode random --probability
///   0.5000000000` to the first `KUBE-SEP-…` and unconditionally to the
///   second, each `KUBE-SEP-…` with the hairpin `KUBE-MARK-MASQ` rule and
///   `-j DNAT --to-destination ip:port`; `KUBE-POSTROUTING` and
///   `KUBE-MARK-MASQ`.
/// * `change_one` (timed): one partial sync as kube-proxy 1.28+ writes it
///   when one Service's endpoints changed: the same restore command with the
///   whole `filter` part (kube-proxy writes it every sync), the fixed `nat`
///   chains, ALL of `KUBE-SERVICES` (rewritten on every sync, so this costs
///   O(Services)), the changed Service's `KUBE-SVC-…` chain, the new
///   endpoint's `KUBE-SEP-…` chain, and the removed endpoint's chain
///   declared and deleted (`:KUBE-SEP-old` then `-X KUBE-SEP-old`). The
///   unchanged endpoint's chain is not written. Not included: the
///   `iptables -C` checks of the jump rules kube-proxy runs on full syncs
///   only, and the 1.29+ `nfacct` counter on the INVALID drop rule.
pub struct Iptables {
    router: Router,
    label: String,
    services: Vec<Svc>,
}

impl Iptables {
    pub fn start(router: &Router) -> Result<Option<Box<dyn Datapath>>> {
        let mut setup = String::from("*filter\n");
        for chain in [
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-SERVICES",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
        ] {
            writeln!(setup, ":{chain} - [0:0]")?;
        }
        // kube-proxy's iptablesJumpChains, prepended (-I) as it does.
        let new = "-m conntrack --ctstate NEW ";
        for (chain, from, comment, extra) in [
            (
                "KUBE-EXTERNAL-SERVICES",
                "INPUT",
                "kubernetes externally-visible service portals",
                new,
            ),
            (
                "KUBE-EXTERNAL-SERVICES",
                "FORWARD",
                "kubernetes externally-visible service portals",
                new,
            ),
            (
                "KUBE-NODEPORTS",
                "INPUT",
                "kubernetes health check service ports",
                "",
            ),
            (
                "KUBE-SERVICES",
                "FORWARD",
                "kubernetes service portals",
                new,
            ),
            ("KUBE-SERVICES", "OUTPUT", "kubernetes service portals", new),
            ("KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ""),
            (
                "KUBE-PROXY-FIREWALL",
                "INPUT",
                "kubernetes load balancer firewall",
                new,
            ),
            (
                "KUBE-PROXY-FIREWALL",
                "OUTPUT",
                "kubernetes load balancer firewall",
                new,
            ),
            (
                "KUBE-PROXY-FIREWALL",
                "FORWARD",
                "kubernetes load balancer firewall",
                new,
            ),
        ] {
            writeln!(
                setup,
                "-I {from} {extra}-m comment --comment \"{comment}\" -j {chain}"
            )?;
        }
        setup.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
        for (chain, from, comment) in [
            ("KUBE-SERVICES", "OUTPUT", "kubernetes service portals"),
            ("KUBE-SERVICES", "PREROUTING", "kubernetes service portals"),
            (
                "KUBE-POSTROUTING",
                "POSTROUTING",
                "kubernetes postrouting rules",
            ),
        ] {
            writeln!(
                setup,
                "-I {from} -m comment --comment \"{comment}\" -j {chain}"
            )?;
        }
        setup.push_str("COMMIT\n");
        router
            .run_tool(IPTABLES_RESTORE, &RESTORE_ARGS, setup.as_bytes())
            .context("kube-proxy start-up chains")?;
        let version = iptables_version();
        let backend = version
            .rsplit_once('(')
            .map(|(_, b)| b.trim_end_matches(')'))
            .unwrap_or("unknown backend");
        Ok(Some(Box::new(Iptables {
            router: router.clone(),
            label: format!("kube-proxy iptables ({backend})"),
            services: Vec::new(),
        })))
    }

    /// The `filter` part of every sync.
    fn filter_table(out: &mut String) {
        out.push_str(
            "*filter\n\
             :KUBE-NODEPORTS - [0:0]\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-EXTERNAL-SERVICES - [0:0]\n\
             :KUBE-FORWARD - [0:0]\n\
             :KUBE-PROXY-FIREWALL - [0:0]\n\
             -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        );
        let _ = writeln!(
            out,
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             COMMIT"
        );
    }

    /// The `nat` chains declared (flushed) and filled on every sync.
    fn nat_fixed_chains(out: &mut String) {
        out.push_str(
            "*nat\n\
             :KUBE-NODEPORTS - [0:0]\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-MARK-MASQ - [0:0]\n\
             :KUBE-POSTROUTING - [0:0]\n",
        );
    }

    fn nat_fixed_rules(out: &mut String) {
        let _ = writeln!(
            out,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
        );
    }

    /// All of `KUBE-SERVICES`: one rule per Service, NodePorts last.
    fn services_chain(&self, out: &mut String) {
        for svc in &self.services {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
                svc.port_name_string(),
                svc.cluster_ip,
                svc.port,
                svc_chain(svc)
            );
        }
        out.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
    }

    /// The rules of one Service's `KUBE-SVC-…` chain.
    fn svc_rules(&self, svc: &Svc, out: &mut String) {
        let spn = svc.port_name_string();
        let chain = svc_chain(svc);
        let _ = writeln!(
            out,
            "-A {chain} -m comment --comment \"{spn} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {} -j KUBE-MARK-MASQ",
            svc.cluster_ip, svc.port, self.router.cluster_cidr
        );
        let n = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let sep = sep_chain(svc, ep);
            if i + 1 < n {
                // kube-proxy: 1/(n-i), "%0.10f".
                let p = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    out,
                    "-A {chain} -m comment --comment \"{spn} -> {ep}\" -m statistic --mode random --probability {p:.10} -j {sep}"
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {chain} -m comment --comment \"{spn} -> {ep}\" -j {sep}"
                );
            }
        }
    }

    /// The rules of one endpoint's `KUBE-SEP-…` chain.
    fn sep_rules(svc: &Svc, ep: &std::net::SocketAddrV4, out: &mut String) {
        let spn = svc.port_name_string();
        let sep = sep_chain(svc, ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {spn} -s {}/32 -j KUBE-MARK-MASQ\n\
             -A {sep} -m comment --comment {spn} -m tcp -p tcp -j DNAT --to-destination {ep}",
            ep.ip()
        );
    }

    fn restore(&self, text: &str) -> Result<()> {
        self.router
            .run_tool(IPTABLES_RESTORE, &RESTORE_ARGS, text.as_bytes())
            .map(drop)
    }
}

impl Datapath for Iptables {
    fn name(&self) -> &str {
        &self.label
    }

    fn program(&mut self, services: &[Svc]) -> Result<()> {
        self.services = services.to_vec();
        let mut out = String::with_capacity(services.len() * 1200 + 4096);
        Self::filter_table(&mut out);
        Self::nat_fixed_chains(&mut out);
        for svc in services {
            let _ = writeln!(out, ":{} - [0:0]", svc_chain(svc));
            for ep in &svc.endpoints {
                let _ = writeln!(out, ":{} - [0:0]", sep_chain(svc, ep));
            }
        }
        Self::nat_fixed_rules(&mut out);
        self.services_chain(&mut out);
        for svc in services {
            self.svc_rules(svc, &mut out);
            for ep in &svc.endpoints {
                Self::sep_rules(svc, ep, &mut out);
            }
        }
        out.push_str("COMMIT\n");
        self.restore(&out)
    }

    fn change_one(&mut self, index: usize, old: &Svc, new: &Svc) -> Result<()> {
        self.services[index] = new.clone();
        let added: Vec<_> = new
            .endpoints
            .iter()
            .filter(|ep| !old.endpoints.contains(ep))
            .collect();
        let removed: Vec<_> = old
            .endpoints
            .iter()
            .filter(|ep| !new.endpoints.contains(ep))
            .collect();
        let mut out = String::with_capacity(self.services.len() * 200 + 4096);
        Self::filter_table(&mut out);
        Self::nat_fixed_chains(&mut out);
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(new));
        for ep in &added {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(new, ep));
        }
        for ep in &removed {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(old, ep));
        }
        Self::nat_fixed_rules(&mut out);
        self.services_chain(&mut out);
        self.svc_rules(new, &mut out);
        for ep in &added {
            Self::sep_rules(new, ep, &mut out);
        }
        for ep in &removed {
            let _ = writeln!(out, "-X {}", sep_chain(old, ep));
        }
        out.push_str("COMMIT\n");
        self.restore(&out)
    }

    fn cleanup(&mut self) -> Result<()> {
        // Without --noflush a restore flushes each named table and deletes
        // its user chains; the namespace goes right after anyway.
        self.router
            .run_tool(IPTABLES_RESTORE, &[], b"*filter\nCOMMIT\n*nat\nCOMMIT\n")
            .map(drop)
    }
}

// ---------------------------------------------------------------------------
// (b) nftables mode.

/// kube-proxy in nftables mode (1.31+ shape), table `ip kube-proxy`.
///
/// * `program` (timed): one `nft -f -` transaction with the table, its base
///   chains (`nat-prerouting`/`nat-output` hooks jumping to `services`,
///   `nat-postrouting` to `masquerading`, `filter-forward` with the
///   `ct state new` jumps to `service-endpoints-check` and
///   `cluster-ips-check`), the maps and sets (`service-ips` keyed on
///   `ipv4_addr . inet_proto . inet_service` with `goto service-…`
///   verdicts, `service-nodeports`, `no-endpoint-services`, `cluster-ips`),
///   `services` doing `ip daddr . meta l4proto . th dport vmap @service-ips`
///   (and the NodePort `fib daddr type local` lookup), and per Service its
///   chain (off-cluster masquerade mark, then `numgen random mod 2 vmap { 0 :
///   goto endpoint-a, 1 : goto endpoint-b }`), its endpoint chains (hairpin
///   mark, `dnat to ip:port`), and its `service-ips` and `cluster-ips`
///   elements, one `add element` line each as knftables writes them.
/// * `change_one` (timed): one transaction touching only that Service: add
///   and fill the new endpoint chain, flush and rewrite the Service chain,
///   re-add its `service-ips` element, flush and delete the removed
///   endpoint chain. (kube-proxy flushes a stale chain at once and deletes
///   it on a later sync; here both are in the same transaction. Early
///   nftables-mode releases flushed and refilled the maps on every sync;
///   this measures the shape where only the changed Service is written.)
pub struct Nftables {
    router: Router,
    services: Vec<Svc>,
}

const TABLE: &str = "ip kube-proxy";

impl Nftables {
    pub fn start(router: &Router) -> Result<Option<Box<dyn Datapath>>> {
        // Nothing at start-up: the first sync creates the table in the same
        // transaction as everything else, as kube-proxy's does.
        Ok(Some(Box::new(Nftables {
            router: router.clone(),
            services: Vec::new(),
        })))
    }

    fn base(&self, out: &mut String) {
        let _ = write!(
            out,
            "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n\
             add chain {TABLE} mark-for-masquerade\n\
             add rule {TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
             add chain {TABLE} masquerading\n\
             add rule {TABLE} masquerading mark and {MASQ_MARK} == 0 return\n\
             add rule {TABLE} masquerading mark set mark xor {MASQ_MARK}\n\
             add rule {TABLE} masquerading masquerade fully-random\n\
             add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
             add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
             add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
             add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
             add chain {TABLE} service-endpoints-check\n\
             add rule {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
             add chain {TABLE} cluster-ips-check\n\
             add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
             add chain {TABLE} services\n\
             add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add rule {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
             add chain {TABLE} filter-forward {{ type filter hook forward priority -110 ; }}\n\
             add rule {TABLE} filter-forward ct state new jump service-endpoints-check\n\
             add rule {TABLE} filter-forward ct state new jump cluster-ips-check\n\
             add chain {TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
             add rule {TABLE} nat-prerouting jump services\n\
             add chain {TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
             add rule {TABLE} nat-output jump services\n\
             add chain {TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
             add rule {TABLE} nat-postrouting jump masquerading\n"
        );
    }

    /// Add (and flush) one endpoint chain and fill it.
    fn endpoint(svc: &Svc, ep: &std::net::SocketAddrV4, out: &mut String) {
        let chain = nft_endpoint_chain(svc, ep);
        let _ = writeln!(
            out,
            "add chain {TABLE} {chain}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade\n\
             add rule {TABLE} {chain} meta l4proto tcp dnat to {ep}",
            ep.ip()
        );
    }

    /// Add (and flush) the Service chain and fill it.
    fn service(&self, svc: &Svc, out: &mut String) {
        let chain = nft_service_chain(svc);
        let _ = writeln!(
            out,
            "add chain {TABLE} {chain}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} ip daddr {} tcp dport {} ip saddr != {} jump mark-for-masquerade",
            svc.cluster_ip, svc.port, self.router.cluster_cidr
        );
        let arms: Vec<String> = svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(svc, ep)))
            .collect();
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            arms.join(" , ")
        );
    }

    fn service_element(svc: &Svc, out: &mut String) {
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {} . tcp . {} : goto {} }}",
            svc.cluster_ip,
            svc.port,
            nft_service_chain(svc)
        );
    }

    fn apply(&self, text: &str) -> Result<()> {
        self.router
            .run_tool(NFT, &["-f", "-"], text.as_bytes())
            .map(drop)
    }
}

impl Datapath for Nftables {
    fn name(&self) -> &str {
        "kube-proxy nftables"
    }

    fn program(&mut self, services: &[Svc]) -> Result<()> {
        self.services = services.to_vec();
        let mut out = String::with_capacity(services.len() * 1400 + 4096);
        self.base(&mut out);
        for svc in services {
            for ep in &svc.endpoints {
                Self::endpoint(svc, ep, &mut out);
            }
            self.service(svc, &mut out);
            Self::service_element(svc, &mut out);
            let _ = writeln!(
                out,
                "add element {TABLE} cluster-ips {{ {} }}",
                svc.cluster_ip
            );
        }
        self.apply(&out)
    }

    fn change_one(&mut self, index: usize, old: &Svc, new: &Svc) -> Result<()> {
        self.services[index] = new.clone();
        let mut out = String::with_capacity(4096);
        for ep in new
            .endpoints
            .iter()
            .filter(|ep| !old.endpoints.contains(ep))
        {
            Self::endpoint(new, ep, &mut out);
        }
        self.service(new, &mut out);
        Self::service_element(new, &mut out);
        for ep in old
            .endpoints
            .iter()
            .filter(|ep| !new.endpoints.contains(ep))
        {
            let chain = nft_endpoint_chain(old, ep);
            let _ = writeln!(
                out,
                "flush chain {TABLE} {chain}\ndelete chain {TABLE} {chain}"
            );
        }
        self.apply(&out)
    }

    fn cleanup(&mut self) -> Result<()> {
        self.router
            .run_tool(
                NFT,
                &["-f", "-"],
                format!("delete table {TABLE}\n").as_bytes(),
            )
            .map(drop)
    }
}

/// Checks the chain names against kube-proxy's own test fixtures
/// (`ns1/svc1:p80`, endpoint `10.180.0.1:80`), so a name drift fails the
/// bench at start rather than quietly changing what is measured.
pub fn check_names() -> Result<()> {
    let ep = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 180, 0, 1), 80);
    let svc = Svc {
        namespace: "ns1".into(),
        name: "svc1".into(),
        port_name: "p80".into(),
        cluster_ip: std::net::Ipv4Addr::new(172, 30, 0, 41),
        port: 80,
        endpoints: vec![ep],
    };
    let got = [
        svc_chain(&svc),
        sep_chain(&svc, &ep),
        nft_service_chain(&svc),
        nft_endpoint_chain(&svc, &ep),
    ];
    let want = [
        "KUBE-SVC-XPGD46QRK7WJZT7O",
        "KUBE-SEP-SXIVWICOYRO3J4NJ",
        "service-ULMVA6XW-ns1/svc1/tcp/p80",
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
    ];
    anyhow::ensure!(
        got == want,
        "chain names {got:?}, kube-proxy's are {want:?}"
    );
    Ok(())
}
