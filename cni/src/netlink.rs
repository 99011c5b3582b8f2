//! A small synchronous rtnetlink client: exactly the requests the plugin makes.
//!
//! Why `netlink-packet-route` over a plain `netlink-sys` socket, and not the
//! `rtnetlink` crate: the message types and attribute encodings come from a
//! maintained crate (no hand-rolled TLVs), while the request/ack loop stays a
//! blocking `send`/`recv` on one socket. `rtnetlink` would bring a tokio
//! runtime for a process that lives a few milliseconds and does ~15 requests.
//!
//! A netlink socket stays bound to the network namespace it was created in,
//! so a [`Netlink`] made inside the pod namespace (see [`crate::netns`]) keeps
//! talking to the pod after the thread has returned to the node namespace.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, RawFd},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `NLM_F_ACK_TLVS` on an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human-readable reason.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Length of the echoed request header in a capped ack.
const NLMSG_HDRLEN: usize = 16;
/// Longest wait for one kernel answer.
const RECV_TIMEOUT_SECS: libc::time_t = 10;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {source}")]
    Socket { source: io::Error },

    #[error("netlink: {op}: {source}{}", ext.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: String,
        source: io::Error,
        /// The kernel's extended-ack message, e.g. "Nexthop device is not up".
        ext: Option<String>,
    },

    #[error("netlink: {op}: cannot decode the kernel's answer: {reason}")]
    Decode { op: String, reason: String },
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            NetlinkError::Socket { source } => source.raw_os_error(),
            NetlinkError::Decode { .. } => None,
        }
    }
}

/// What [`Netlink::link`] reports about an interface.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub up: bool,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub kind: Option<String>,
    /// The other end of a veth (`IFLA_LINK`): its index in its own
    /// namespace, which may not be this one.
    pub peer_index: Option<u32>,
}

/// A route as the kernel reports it (main table only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// None: a default route.
    pub dst: Option<IpAddr>,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
}

/// Both ends of a veth pair to create in one request.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub peer_name: &'a str,
    pub peer_mac: [u8; 6],
    /// The peer is created directly in this namespace: it never exists in
    /// the node namespace under a temporary name.
    pub peer_netns: RawFd,
}

/// A route to add to the main table.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub scope: RouteScope,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
    rx: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's current network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let socket_err = |source| NetlinkError::Socket { source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_err)?;
        socket.bind_auto().map_err(socket_err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(socket_err)?;
        // Best effort: older kernels without them still work, with terser errors.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        // A kernel that never answers must not hang the runtime's call: recv
        // fails with EAGAIN instead.
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on our socket with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Netlink {
            socket,
            seq: 0,
            rx: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects replies until the ack (`NLM_F_ACK`),
    /// `NLMSG_DONE` (dumps) or the single reply (plain gets).
    fn exchange(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let kernel = |source: io::Error| NetlinkError::Kernel {
            op: op(),
            source,
            ext: None,
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        let mut tx = vec![0; message.buffer_len()];
        message.serialize(&mut tx);
        self.socket.send(&tx, 0).map_err(kernel)?;

        let wants_ack = flags & NLM_F_ACK != 0;
        let mut replies = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.rx[..], 0).map_err(kernel)?;
            if n > self.rx.len() {
                return Err(NetlinkError::Decode {
                    op: op(),
                    reason: format!("a {n}-byte reply does not fit the receive buffer"),
                });
            }
            let mut offset = 0;
            while offset + NLMSG_HDRLEN <= n {
                let bytes = &self.rx[offset..n];
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        NetlinkError::Decode {
                            op: op(),
                            reason: e.to_string(),
                        }
                    })?;
                let len = reply.header.length as usize;
                if len < NLMSG_HDRLEN {
                    return Err(NetlinkError::Decode {
                        op: op(),
                        reason: format!("message length {len}"),
                    });
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != seq {
                    continue;
                }
                let multipart = reply.header.flags & NLM_F_MULTIPART != 0;
                let error_flags = reply.header.flags;
                match reply.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(code) => {
                            return Err(NetlinkError::Kernel {
                                op: op(),
                                source: io::Error::from_raw_os_error(-code.get()),
                                ext: ext_ack_message(error_flags, &e.header),
                            })
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(inner) => {
                        replies.push(inner);
                        if !multipart && !wants_ack {
                            return Ok(replies);
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::Decode {
                            op: op(),
                            reason: "overrun".into(),
                        })
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<(), NetlinkError> {
        self.exchange(payload, NLM_F_ACK | flags, op).map(drop)
    }

    /// Creates a veth pair, the peer inside `spec.peer_netns`. The node end
    /// comes up with it; the peer starts down.
    pub fn create_veth(&mut self, spec: &VethSpec) -> Result<(), NetlinkError> {
        // Kernel quirk: asking for IFF_UP on the peer fails the whole request
        // with ENOTCONN (veth_open runs before the two ends are linked), so the
        // caller brings the peer up afterwards. The primary is configured after
        // linking, so IFF_UP on it works and saves a round trip.
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(spec.peer_name.to_owned()),
            LinkAttribute::Mtu(spec.mtu),
            LinkAttribute::Address(spec.peer_mac.to_vec()),
            LinkAttribute::NetNsFd(spec.peer_netns),
        ];
        let mut link = LinkMessage::default();
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        link.attributes = vec![
            LinkAttribute::IfName(spec.name.to_owned()),
            LinkAttribute::Mtu(spec.mtu),
            LinkAttribute::Address(spec.mac.to_vec()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.ack(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("create veth {} with peer {}", spec.name, spec.peer_name),
        )
    }

    /// The interface called `name`, or None.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut request = LinkMessage::default();
        request.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        let replies = match self.exchange(RouteNetlinkMessage::GetLink(request), 0, &|| {
            format!("get link {name}")
        }) {
            Ok(replies) => replies,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(replies.into_iter().find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => Some(link_from(link)),
            _ => None,
        }))
    }

    /// Sets `IFF_UP` on the interface called `name`.
    pub fn set_up(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        link.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        self.ack(RouteNetlinkMessage::SetLink(link), 0, &|| {
            format!("set {name} up")
        })
    }

    /// Clears `IFF_UP` on the interface called `name`.
    pub fn set_down(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.change_mask = LinkFlags::Up;
        link.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        self.ack(RouteNetlinkMessage::SetLink(link), 0, &|| {
            format!("set {name} down")
        })
    }

    /// Renames interface `index` to `new_name` and, with `down`, clears
    /// `IFF_UP` in the same request. The kernel renames first, then changes
    /// the flags, so an up interface is renamed while up: Linux 6.2 and
    /// later allow that but log "renamed from ... (while UP)" for it, older
    /// kernels refuse it (EBUSY). [`crate::teardown`] sets the link down in
    /// a request of its own first.
    pub fn rename_link(
        &mut self,
        index: u32,
        new_name: &str,
        down: bool,
    ) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        // A rename needs the interface selected by index: without one the
        // kernel takes IFLA_IFNAME as the selector instead.
        link.header.index = index;
        if down {
            link.header.change_mask = LinkFlags::Up;
        }
        link.attributes = vec![LinkAttribute::IfName(new_name.to_owned())];
        self.ack(RouteNetlinkMessage::SetLink(link), 0, &|| {
            let down = if down { " and set it down" } else { "" };
            format!("rename interface {index} to {new_name}{down}")
        })
    }

    /// Clears `IFF_UP` on interface `index`.
    pub fn set_down_index(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(link), 0, &|| {
            format!("set interface {index} down")
        })
    }

    /// Names of every interface in this namespace.
    pub fn link_names(&mut self) -> Result<Vec<String>, NetlinkError> {
        let replies = self.exchange(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            &|| "list interfaces".to_owned(),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => {
                    link.attributes.into_iter().find_map(|attr| match attr {
                        LinkAttribute::IfName(name) => Some(name),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Deletes the interface called `name`; Ok(false) if there was none.
    /// Deleting one end of a veth pair deletes both, with their addresses,
    /// routes and neighbour entries.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        match self.ack(RouteNetlinkMessage::DelLink(link), 0, &|| {
            format!("delete link {name}")
        }) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds `ip/prefix` to interface `index`. `nodad` skips IPv6 duplicate
    /// address detection, without which the address stays unusable for ~1 s.
    pub fn add_address(
        &mut self,
        index: u32,
        ip: IpAddr,
        prefix: u8,
        nodad: bool,
    ) -> Result<(), NetlinkError> {
        let mut message = AddressMessage::default();
        message.header.family = family(ip);
        message.header.prefix_len = prefix;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv4() {
            message.attributes.push(AddressAttribute::Local(ip));
        }
        if nodad {
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.ack(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("add address {ip}/{prefix} to interface {index}"),
        )
    }

    /// Addresses on interface `index`, as (ip, prefix).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let replies = self.exchange(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            &|| "list addresses".to_owned(),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let prefix = a.header.prefix_len;
                    a.attributes.into_iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some((ip, prefix)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    pub fn add_route(&mut self, route: RouteSpec) -> Result<(), NetlinkError> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(route.dst);
        message.header.destination_prefix_length = route.prefix;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Static;
        message.header.scope = route.scope;
        message.header.kind = RouteType::Unicast;
        if route.prefix > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(route.dst.into()));
        }
        if let Some(gw) = route.gateway {
            message.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        message.attributes.push(RouteAttribute::Oif(route.oif));
        self.ack(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| {
                let via = route
                    .gateway
                    .map(|g| format!(" via {g}"))
                    .unwrap_or_default();
                format!(
                    "add route {}/{}{via} dev {}",
                    route.dst, route.prefix, route.oif
                )
            },
        )
    }

    /// Routes of the main table for one family.
    pub fn routes(&mut self, ipv6: bool) -> Result<Vec<RouteEntry>, NetlinkError> {
        let mut request = RouteMessage::default();
        request.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let replies = self.exchange(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP, &|| {
            "list routes".to_owned()
        })?;
        let mut routes = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewRoute(r) = reply else {
                continue;
            };
            let mut table = u32::from(r.header.table);
            let mut entry = RouteEntry {
                dst: None,
                prefix: r.header.destination_prefix_length,
                gateway: None,
                oif: None,
                scope: r.header.scope,
            };
            for attr in r.attributes {
                match attr {
                    RouteAttribute::Destination(a) => entry.dst = route_ip(a),
                    RouteAttribute::Gateway(a) => entry.gateway = route_ip(a),
                    RouteAttribute::Oif(i) => entry.oif = Some(i),
                    RouteAttribute::Table(t) => table = t,
                    _ => {}
                }
            }
            if table == u32::from(RouteHeader::RT_TABLE_MAIN) {
                routes.push(entry);
            }
        }
        Ok(routes)
    }

    /// A permanent neighbour entry: `ip` is at `mac` on interface `index`.
    pub fn add_neighbour(
        &mut self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = family(ip);
        message.header.ifindex = index;
        message.header.state = NeighbourState::Permanent;
        message.attributes = vec![
            NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }),
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        ];
        // REPLACE: the kernel may already have learnt an entry for it.
        self.ack(
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("add neighbour {ip} on interface {index}"),
        )
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_ip(address: RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

fn link_from(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        up: message.header.flags.contains(LinkFlags::Up),
        mtu: 0,
        mac: Vec::new(),
        kind: None,
        peer_index: None,
    };
    for attr in message.attributes {
        match attr {
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Link(index) => link.peer_index = Some(index),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    link
}

/// The kernel's extended-ack message, if any: with `NETLINK_CAP_ACK` the
/// error echoes only the request's 16-byte header, and the TLVs follow it.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < NLMSG_HDRLEN {
        return None;
    }
    let mut rest = &payload[NLMSG_HDRLEN..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        let step = ((len + 3) & !3).min(rest.len());
        rest = &rest[step..];
    }
    None
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
