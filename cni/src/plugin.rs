//! The verbs: what ADD, DEL, CHECK, STATUS, GC and VERSION do.

use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use netlink_packet_route::route::RouteScope;
use sha2::{Digest, Sha256};

use crate::{
    agent,
    config::{self, ConfigError, NetConf, Version, GATEWAY_V4, SUPPORTED_VERSIONS},
    env::{CniEnv, Command},
    error::PluginError,
    ipam::{Allocation, Ipam},
    netlink::{format_mac, Netlink, RouteEntry, RouteSpec, VethSpec},
    netns::NetnsFile,
    teardown,
    types::{CniResult, ErrorJson, Interface, IpConfig, Route, VersionInfo},
};

/// The pod's IPv6 gateway; the host end of every veth carries it.
const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the process prints on stdout and exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: u8,
}

/// One invocation: `lookup` reads the environment, `read_stdin` the config
/// (not called for VERSION, which needs none).
pub fn run(
    lookup: impl Fn(&str) -> Option<String>,
    read_stdin: impl FnOnce() -> io::Result<Vec<u8>>,
) -> Outcome {
    let env = match CniEnv::from_lookup(&lookup) {
        Ok(env) => env,
        Err(e) => {
            return failure(
                Version::LATEST,
                &e.into(),
                "the runtime's CNI_* environment",
            )
        }
    };
    if env.command == Command::Version {
        let info = VersionInfo {
            cni_version: Version::LATEST.as_str().to_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        };
        return success(serde_json::to_string(&info).expect("plain struct serializes"));
    }
    let context = describe(&env, &lookup);
    let stdin = match read_stdin() {
        Ok(bytes) => bytes,
        Err(source) => return failure(Version::LATEST, &PluginError::Stdin { source }, &context),
    };
    let (value, version) = match config::decode(&stdin) {
        Ok(decoded) => decoded,
        Err(e) => return failure(Version::LATEST, &e.into(), &context),
    };
    let conf = match NetConf::from_value(value, version) {
        Ok(conf) => conf,
        Err(e) => return failure(version, &e.into(), &context),
    };
    let context = format!("{context} network={}", conf.name);
    let result = match env.command {
        Command::Add => add(&env, &conf).map(|mut result| {
            result.shape_for(version);
            Some(serde_json::to_string(&result).expect("result serializes"))
        }),
        Command::Del => del(&env, &conf).map(|()| None),
        Command::Check => check(&env, &conf).map(|()| None),
        Command::Status => status(&env, &conf).map(|()| None),
        Command::Gc => gc(&env, &conf).map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    match result {
        Ok(stdout) => success(stdout.unwrap_or_default()),
        Err(e) => failure(version, &e, &context),
    }
}

fn success(stdout: String) -> Outcome {
    Outcome {
        stdout,
        exit_code: 0,
    }
}

fn failure(version: Version, error: &PluginError, details: &str) -> Outcome {
    let json = ErrorJson {
        cni_version: version.as_str().to_owned(),
        code: error.code(),
        msg: error.to_string(),
        details: details.to_owned(),
    };
    Outcome {
        stdout: serde_json::to_string(&json).expect("plain struct serializes"),
        exit_code: 1,
    }
}

/// The invocation, for an error's `details`.
fn describe(env: &CniEnv, lookup: &impl Fn(&str) -> Option<String>) -> String {
    let mut parts = vec![format!("CNI_COMMAND={}", env.command)];
    for var in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
        if let Some(value) = lookup(var) {
            parts.push(format!("{var}={value}"));
        }
    }
    parts.join(" ")
}

/// The node-side name of the veth for (container, ifname): `fl` and 11 hex
/// digits of SHA-256, 13 characters (Linux allows 15). Deterministic, so DEL
/// and GC find it without any state.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    Names::new(container_id, ifname).host
}

struct Names {
    host: String,
    host_mac: [u8; 6],
    pod_mac: [u8; 6],
}

impl Names {
    fn new(container_id: &str, ifname: &str) -> Names {
        // '/' can appear in neither, so the input is unambiguous.
        let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        // Locally administered unicast MACs (second-lowest bit of the first
        // octet set, lowest clear), different for the two ends.
        let mut host_mac = [0x02, 0, 0, 0, 0, 0];
        host_mac[1..].copy_from_slice(&digest[16..21]);
        let mut pod_mac = [0x0a, 0, 0, 0, 0, 0];
        pod_mac[1..].copy_from_slice(&digest[21..26]);
        Names {
            host: format!("fl{}", &hex[..11]),
            host_mac,
            pod_mac,
        }
    }
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<CniResult, PluginError> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    let netns_path = env.require_netns()?;
    let ipam_conf = conf.ipam()?;

    // Everything that can fail without side effects comes first.
    let netns = NetnsFile::open(netns_path)?;
    let mut host = Netlink::new()?;
    let mut pod = netns.netlink()?;
    let ipam = Ipam::new(&conf.name, ipam_conf);
    let allocations = ipam.allocate(container_id, ifname)?;
    let names = Names::new(container_id, ifname);

    let mut created = false;
    let mut intercepting = false;
    let wired = wire(
        &mut host,
        &mut pod,
        &netns,
        conf,
        ifname,
        &names,
        &allocations,
        &mut created,
    )
    .and_then(|result| {
        if let Some(mesh) = &conf.mesh {
            intercept(&netns, mesh)?;
            intercepting = true;
        }
        if conf.attach_datapath {
            // A meshed pod's namespace is named to the agent, which leaves it out of
            // socket-level load balancing (its sidecar balances).
            let mesh_netns = match &conf.mesh {
                Some(_) => Some(fairlead_netns::netns_cookie(netns.as_fd()).map_err(|e| {
                    PluginError::Mesh {
                        netns: netns.path().display().to_string(),
                        reason: format!("reading the namespace's cookie: {e}"),
                    }
                })?),
                None => None,
            };
            attach_datapath(conf, &names.host, &pod_ref(env), &allocations, mesh_netns)?;
        }
        Ok(result)
    });
    let ours = match wired {
        Ok(result) => result,
        Err(error) => {
            // Reverse order: the veth (which takes its addresses, routes
            // and neighbours with it, on both sides), then the addresses.
            let mut notes = Vec::new();
            if intercepting {
                let delete = format!("delete table inet {}\n", fairlead_netns::mesh::TABLE);
                if let Err(e) = fairlead_netns::mesh::load_ruleset(netns.as_fd(), &delete) {
                    notes.push(format!("interception rules left behind: {e}"));
                }
            }
            if created {
                if let Err(e) = host.delete_link(&names.host) {
                    notes.push(format!("interface {} left behind: {e}", names.host));
                }
            }
            if let Err(e) = ipam.release(container_id, ifname) {
                notes.push(format!("addresses left allocated: {e}"));
            }
            if notes.is_empty() {
                return Err(error);
            }
            return Err(PluginError::RollbackIncomplete {
                error: Box::new(error),
                notes: notes.join("; "),
            });
        }
    };
    Ok(match &conf.prev_result {
        Some(prev) => prev.clone().merge(ours),
        None => ours,
    })
}

/// Installs the mesh's interception rules (nftables, [`fairlead_netns::mesh`]) in the pod's
/// namespace: its inbound and outbound TCP go to its sidecar from the first packet.
fn intercept(netns: &NetnsFile, mesh: &crate::config::MeshConf) -> Result<(), PluginError> {
    fairlead_netns::mesh::load_ruleset(
        netns.as_fd(),
        &fairlead_netns::mesh::nft_ruleset(&mesh.skip_inbound),
    )
    .map_err(|e| PluginError::Mesh {
        netns: netns.path().display().to_string(),
        reason: e.to_string(),
    })
}

#[allow(clippy::too_many_arguments)]
/// `<namespace>/<name>` of the pod from the runtime's `K8S_POD_NAMESPACE` and
/// `K8S_POD_NAME` (`-` when the runtime passes none, as podman does).
fn pod_ref(env: &CniEnv) -> String {
    let arg = |k: &str| {
        env.args
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    match (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => format!("{ns}/{name}"),
        _ => "-".to_owned(),
    }
}

/// Asks the agent to put its eBPF programs on the new host veth, and to
/// program the pod's NetworkPolicy for its addresses, before the pod gets
/// its result (and so before it can send or receive a packet):
/// `ATTACH <veth> <namespace>/<pod> <ip>[,<ip>]`.
fn attach_datapath(
    conf: &NetConf,
    host_ifname: &str,
    pod: &str,
    allocations: &[Allocation],
    mesh_netns: Option<u64>,
) -> Result<(), PluginError> {
    let fail = |reason: String| PluginError::Datapath {
        socket: conf.agent_socket.clone(),
        ifname: host_ifname.to_owned(),
        reason,
    };
    let ips: Vec<String> = allocations.iter().map(|a| a.ip.to_string()).collect();
    let line = agent::ask(
        &conf.agent_socket,
        &format!(
            "{} {host_ifname} {pod} {}{}",
            agent::ATTACH,
            ips.join(","),
            mesh_netns.map_or(String::new(), |c| format!(" mesh-netns={c}"))
        ),
        AGENT_TIMEOUT,
    )
    .map_err(|e| fail(e.to_string()))?;
    match line.as_str() {
        "OK" => Ok(()),
        other => Err(fail(
            other.strip_prefix("ERROR ").unwrap_or(other).to_owned(),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn wire(
    host: &mut Netlink,
    pod: &mut Netlink,
    netns: &NetnsFile,
    conf: &NetConf,
    ifname: &str,
    names: &Names,
    allocations: &[Allocation],
    created: &mut bool,
) -> Result<CniResult, PluginError> {
    let spec = VethSpec {
        name: &names.host,
        mac: names.host_mac,
        mtu: conf.mtu,
        peer_name: ifname,
        peer_mac: names.pod_mac,
        peer_netns: netns.fd(),
    };
    match host.create_veth(&spec) {
        Ok(()) => *created = true,
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            // Nothing was created: tell which end is in the way.
            let place = match host.link(&names.host) {
                Ok(Some(_)) => "in the node namespace".to_owned(),
                _ => format!("in the container namespace {}", netns.path().display()),
            };
            let name = if place.starts_with("in the node") {
                names.host.clone()
            } else {
                ifname.to_owned()
            };
            return Err(PluginError::AlreadyExists { name, place });
        }
        Err(e) => return Err(e.into()),
    }
    let missing = |name: &str, place: &str| PluginError::Vanished {
        name: name.to_owned(),
        place: place.to_owned(),
    };
    let host_link = host
        .link(&names.host)?
        .ok_or_else(|| missing(&names.host, "the node namespace"))?;
    let pod_link = pod
        .link(ifname)?
        .ok_or_else(|| missing(ifname, "the container namespace"))?;
    if !pod_link.up {
        pod.set_up(ifname)?;
    }
    pod.set_up("lo")?;

    let has_v4 = allocations.iter().any(|a| a.ip.is_ipv4());
    let has_v6 = allocations.iter().any(|a| a.ip.is_ipv6());
    if has_v4 {
        // Fallback for the static neighbour below (e.g. after `ip neigh
        // flush` in the pod): the host end answers ARP for the gateway, at
        // once rather than after the default random proxy delay.
        sysctl_set(&format!("net/ipv4/conf/{}/proxy_arp", names.host), "1")?;
        sysctl_set(&format!("net/ipv4/neigh/{}/proxy_delay", names.host), "0")?;
    }

    for a in allocations {
        pod.add_address(pod_link.index, a.ip, a.range.host_prefix(), a.ip.is_ipv6())?;
    }
    // One attachment of this network per pod: a second interface of the
    // same network in one pod would collide on these default routes (EEXIST,
    // rolled back).
    let gw4 = IpAddr::V4(GATEWAY_V4);
    let gw6 = IpAddr::V6(GATEWAY_V6);
    if has_v4 {
        pod.add_route(RouteSpec {
            dst: gw4,
            prefix: 32,
            gateway: None,
            oif: pod_link.index,
            scope: RouteScope::Link,
        })?;
        pod.add_neighbour(pod_link.index, gw4, names.host_mac)?;
        pod.add_route(RouteSpec {
            dst: IpAddr::V4(0.into()),
            prefix: 0,
            gateway: Some(gw4),
            oif: pod_link.index,
            scope: RouteScope::Universe,
        })?;
    }
    if has_v6 {
        // nodad: with DAD the gateway would be tentative, and unanswered,
        // for about a second after ADD.
        host.add_address(host_link.index, gw6, 64, true)?;
        pod.add_neighbour(pod_link.index, gw6, names.host_mac)?;
        pod.add_route(RouteSpec {
            dst: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix: 0,
            gateway: Some(gw6),
            oif: pod_link.index,
            scope: RouteScope::Universe,
        })?;
    }
    for a in allocations {
        host.add_route(RouteSpec {
            dst: a.ip,
            prefix: a.range.host_prefix(),
            gateway: None,
            oif: host_link.index,
            scope: if a.ip.is_ipv4() {
                RouteScope::Link
            } else {
                RouteScope::Universe
            },
        })?;
    }
    if conf.enable_forwarding {
        if has_v4 {
            sysctl_ensure("net/ipv4/ip_forward", "1")?;
        }
        if has_v6 {
            sysctl_ensure("net/ipv6/conf/all/forwarding", "1")?;
        }
    }

    let mtu = Some(conf.mtu);
    Ok(CniResult {
        cni_version: String::new(),
        interfaces: vec![
            Interface {
                name: names.host.clone(),
                mac: format_mac(&names.host_mac),
                mtu,
                ..Default::default()
            },
            Interface {
                name: ifname.to_owned(),
                mac: format_mac(&names.pod_mac),
                mtu,
                sandbox: Some(netns.path().display().to_string()),
                ..Default::default()
            },
        ],
        ips: allocations
            .iter()
            .map(|a| IpConfig {
                version: None,
                address: format!("{}/{}", a.ip, a.range.host_prefix()),
                gateway: Some(if a.ip.is_ipv4() { gw4 } else { gw6 }.to_string()),
                interface: Some(1),
            })
            .collect(),
        routes: [(has_v4, "0.0.0.0/0", gw4), (has_v6, "::/0", gw6)]
            .into_iter()
            .filter(|(has, _, _)| *has)
            .map(|(_, dst, gw)| Route {
                dst: dst.to_owned(),
                gw: Some(gw.to_string()),
                ..Default::default()
            })
            .collect(),
        dns: conf.dns.clone(),
        extra: Default::default(),
    })
}

/// Idempotent: a missing veth, namespace or allocation is not an error.
fn del(env: &CniEnv, conf: &NetConf) -> Result<(), PluginError> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    let ipam_conf = conf.ipam()?;
    // The veth is taken out of use (routes, names) and handed to the agent
    // to delete, or deleted here if the agent does not take it; see
    // `teardown`. The addresses are released only after that, so a
    // concurrent ADD cannot get one while its old route lives.
    let mut host = Netlink::new()?;
    let name = host_ifname(container_id, ifname);
    let pod = env.netns().map(|netns| teardown::PodEnd { netns, ifname });
    let agent = conf.agent_handoff_timeout.map(|timeout| teardown::HandOff {
        socket: &conf.agent_socket,
        timeout,
    });
    let seed = format!("{container_id}/{ifname}");
    if let teardown::Removed::Deleted {
        fallback: Some(why),
    } = teardown::remove_veth(&mut host, &name, &seed, pod, agent)?
    {
        // Not an error: the veth is gone all the same, only slower. The
        // runtime logs a plugin's stderr.
        eprintln!("fairlead-cni: DEL deleted the veth {name} itself: {why}");
    }
    Ipam::new(&conf.name, ipam_conf).release(container_id, ifname)?;
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), PluginError> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    let netns_path = env.require_netns()?;
    let ipam_conf = conf.ipam()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| ConfigError::Invalid {
            field: "prevResult".into(),
            reason: "missing; CHECK needs the result of the ADD it checks".into(),
        })?;
    let fail = |what: String| Err(PluginError::Check(what));
    let sandbox = netns_path.display().to_string();
    let Some(index) = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref() == Some(sandbox.as_str()))
    else {
        return fail(format!(
            "prevResult has no interface {ifname} in sandbox {sandbox}"
        ));
    };
    let expected_mac = prev.interfaces[index].mac.to_lowercase();
    let mut ips = Vec::new();
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(index)) {
        match parse_address(&ip.address) {
            Some(parsed) => ips.push(parsed),
            None => {
                return Err(ConfigError::Invalid {
                    field: "prevResult.ips".into(),
                    reason: format!("{:?} is not an address/prefix", ip.address),
                }
                .into())
            }
        }
    }

    let netns = NetnsFile::open(netns_path)?;
    let mut host = Netlink::new()?;
    let mut pod = netns.netlink()?;
    let names = Names::new(container_id, ifname);

    let Some(host_link) = host.link(&names.host)? else {
        return fail(format!("host interface {} is missing", names.host));
    };
    if host_link.kind.as_deref() != Some("veth") || !host_link.up || host_link.mtu != conf.mtu {
        return fail(format!(
            "host interface {} is {:?}, up={}, mtu {}; expected an up veth with mtu {}",
            names.host, host_link.kind, host_link.up, host_link.mtu, conf.mtu
        ));
    }
    let Some(pod_link) = pod.link(ifname)? else {
        return fail(format!("interface {ifname} is missing from {sandbox}"));
    };
    let mac = format_mac(&pod_link.mac);
    if !pod_link.up || pod_link.mtu != conf.mtu || (!expected_mac.is_empty() && mac != expected_mac)
    {
        return fail(format!(
            "interface {ifname} in {sandbox} is up={}, mtu {}, mac {mac}; expected up, mtu {}, \
             mac {expected_mac}",
            pod_link.up, pod_link.mtu, conf.mtu
        ));
    }

    let addresses = pod.addresses(pod_link.index)?;
    for (ip, prefix) in &ips {
        if !addresses.contains(&(*ip, *prefix)) {
            return fail(format!(
                "address {ip}/{prefix} is missing from {ifname} in {sandbox}"
            ));
        }
    }

    let gw4 = IpAddr::V4(GATEWAY_V4);
    let gw6 = IpAddr::V6(GATEWAY_V6);
    let has_v4 = ips.iter().any(|(ip, _)| ip.is_ipv4());
    let has_v6 = ips.iter().any(|(ip, _)| ip.is_ipv6());
    let mut pod_routes = Vec::new();
    if has_v4 {
        pod_routes.extend(pod.routes(false)?);
    }
    if has_v6 {
        pod_routes.extend(pod.routes(true)?);
    }
    let mut want: Vec<(Option<IpAddr>, u8, Option<IpAddr>)> = Vec::new();
    if has_v4 {
        want.push((Some(gw4), 32, None));
    }
    // The routes of the ADD result that go through our gateways.
    for route in &prev.routes {
        let gw = route.gw.as_deref().and_then(|g| g.parse::<IpAddr>().ok());
        if gw != Some(gw4) && gw != Some(gw6) {
            continue;
        }
        let Some((dst, prefix)) = parse_address(&route.dst) else {
            return fail(format!("prevResult route {:?} is not a subnet", route.dst));
        };
        want.push(((prefix > 0).then_some(dst), prefix, gw));
    }
    for (dst, prefix, gw) in want {
        let found = pod_routes.iter().any(|r: &RouteEntry| {
            r.dst.filter(|_| r.prefix > 0) == dst
                && r.prefix == prefix
                && r.gateway == gw
                && r.oif == Some(pod_link.index)
        });
        if !found {
            let dst = dst.map_or("default".to_owned(), |d| format!("{d}/{prefix}"));
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return fail(format!(
                "route {dst}{via} dev {ifname} is missing in {sandbox}"
            ));
        }
    }

    let mut host_routes = Vec::new();
    if has_v4 {
        host_routes.extend(host.routes(false)?);
    }
    if has_v6 {
        host_routes.extend(host.routes(true)?);
    }
    for (ip, prefix) in &ips {
        let found = host_routes
            .iter()
            .any(|r| r.dst == Some(*ip) && r.prefix == *prefix && r.oif == Some(host_link.index));
        if !found {
            return fail(format!(
                "node route {ip}/{prefix} dev {} is missing",
                names.host
            ));
        }
    }

    let held: BTreeSet<IpAddr> = Ipam::new(&conf.name, ipam_conf)
        .lookup(container_id, ifname)?
        .into_iter()
        .collect();
    let expected: BTreeSet<IpAddr> = ips.iter().map(|(ip, _)| *ip).collect();
    if held != expected {
        return fail(format!(
            "IPAM holds {held:?} for {container_id}/{ifname}, prevResult says {expected:?}"
        ));
    }
    Ok(())
}

fn parse_address(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = text.split_once('/')?;
    Some((ip.parse().ok()?, prefix.parse().ok()?))
}

fn require_1_1(command: Command, conf: &NetConf) -> Result<(), PluginError> {
    if conf.version < Version::V1_1_0 {
        return Err(PluginError::VerbNotInVersion {
            command,
            version: conf.version.as_str(),
        });
    }
    Ok(())
}

/// Ready when the agent answers `READY` to `STATUS` on its socket.
fn status(env: &CniEnv, conf: &NetConf) -> Result<(), PluginError> {
    require_1_1(env.command, conf)?;
    let unavailable = |reason: String| PluginError::AgentUnavailable {
        socket: conf.agent_socket.clone(),
        reason,
    };
    let line = agent::ask(&conf.agent_socket, agent::STATUS, AGENT_TIMEOUT)
        .map_err(|e| unavailable(e.to_string()))?;
    // The agent answers `READY` or `NOTREADY <reason>`.
    match line.as_str() {
        "READY" => Ok(()),
        other => match other.strip_prefix("NOTREADY") {
            Some(reason) => Err(unavailable(format!("it is not ready: {}", reason.trim()))),
            None => Err(unavailable(format!("it answered {other:?}"))),
        },
    }
}

/// Releases every allocation of this network not listed in
/// `cni.dev/valid-attachments`, deletes the host veths of what it released
/// and every tombstone left on the node (see [`teardown`]).
fn gc(env: &CniEnv, conf: &NetConf) -> Result<(), PluginError> {
    require_1_1(env.command, conf)?;
    let ipam_conf = conf.ipam()?;
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| ConfigError::Invalid {
            field: "cni.dev/valid-attachments".into(),
            reason: "missing; GC needs the attachments to keep (an empty list releases all)".into(),
        })?;
    let valid: BTreeSet<(String, String)> = valid
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let released = Ipam::new(&conf.name, ipam_conf).gc(&valid)?;
    let mut host = Netlink::new()?;
    for owner in released {
        host.delete_link(&host_ifname(&owner.container_id, &owner.ifname))?;
    }
    // Tombstones no agent took (it was down, or a DEL died before asking).
    teardown::delete_tombstones(&mut host)?;
    Ok(())
}

/// Writes a sysctl of the namespace this process runs in (the node's).
fn sysctl_set(path: &str, value: &str) -> Result<(), PluginError> {
    let full = format!("/proc/sys/{path}");
    fs::write(&full, value).map_err(|source| PluginError::Sysctl {
        path: path.replace('/', "."),
        source,
    })
}

/// Like [`sysctl_set`], but only writes when the value differs: writing
/// `forwarding` walks every interface of the namespace.
fn sysctl_ensure(path: &str, value: &str) -> Result<(), PluginError> {
    match fs::read_to_string(format!("/proc/sys/{path}")) {
        Ok(current) if current.trim() == value => Ok(()),
        _ => sysctl_set(path, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("fl"));
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        let names = Names::new("abc", "eth0");
        assert_eq!(names.host_mac[0] & 0x03, 0x02);
        assert_eq!(names.pod_mac[0] & 0x03, 0x02);
    }

    #[test]
    fn version_needs_no_stdin_and_lists_versions() {
        let out = run(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_owned()),
            || panic!("VERSION must not read stdin"),
        );
        assert_eq!(out.exit_code, 0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
