//! Small network value types: IP networks, protocols, port references.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// An IP network, `address/prefix-length`, with the host bits cleared so that equal networks
/// compare equal (Kubernetes accepts `10.0.0.1/24` in some fields; LPM maps want `10.0.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a CIDR such as 10.244.0.0/16 or fd00::/64")]
pub struct IpNetParseError(pub String);

impl IpNet {
    /// Builds a network, clearing host bits. `None` if the prefix is too long for the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { addr, prefix_len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.addr)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        match IpNet::new(*ip, self.prefix_len) {
            Some(net) => net.addr == self.addr,
            None => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IpNetParseError(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        // Reject "+8" or "08"-style oddities that u8::from_str would accept or that Go rejects.
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let len: u8 = len.parse().map_err(|_| err())?;
        IpNet::new(addr, len).ok_or_else(err)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }
}

/// L4 protocol of a port; Kubernetes defaults an absent protocol to TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

/// A port given as a number or as the name of a container port (Service targetPort,
/// NetworkPolicy port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// First address of each family, in the order given.
pub(crate) fn first_of_family(ips: &[IpAddr], family: IpFamily) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| IpFamily::of(ip) == family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises_networks() {
        let net: IpNet = "10.244.1.7/24".parse().unwrap();
        assert_eq!(net.to_string(), "10.244.1.0/24");
        assert!(net.contains(&"10.244.1.200".parse().unwrap()));
        assert!(!net.contains(&"10.244.2.1".parse().unwrap()));
        assert!(!net.contains(&"fd00::1".parse().unwrap()));

        let v6: IpNet = "fd00:10:244::/56".parse().unwrap();
        assert_eq!(v6.family(), IpFamily::IPv6);
        assert!(v6.contains(&"fd00:10:244:ff::1".parse().unwrap()));

        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"192.0.2.1".parse().unwrap()));
        let host: IpNet = "192.0.2.1/32".parse().unwrap();
        assert!(host.contains(&"192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_networks() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/+8",
            "x/8",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad} should not parse");
        }
    }
}
