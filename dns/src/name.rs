//! Domain names in wire form (length-prefixed labels, ending with the root label), lowercased.
//! The index is keyed by this form, so a query name is looked up without building a string.

use std::net::IpAddr;

/// Longest name in wire form (RFC 1035 §2.3.4).
pub(crate) const MAX_NAME: usize = 255;
pub(crate) const MAX_LABEL: usize = 63;

/// Encodes a dotted name (`web.shop.svc.cluster.local`, trailing dot optional) as lowercased wire
/// form. `None` when a label is empty or too long, or the whole name is too long.
pub(crate) fn encode(text: &str) -> Option<Vec<u8>> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() + 2);
    if !text.is_empty() {
        for label in text.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// `label` + `.` + `parent`, both in wire form.
pub(crate) fn prepend(label: &str, parent: &[u8]) -> Option<Vec<u8>> {
    if label.is_empty() || label.len() > MAX_LABEL || label.len() + 1 + parent.len() > MAX_NAME {
        return None;
    }
    let mut out = Vec::with_capacity(label.len() + 1 + parent.len());
    out.push(label.len() as u8);
    out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    out.extend_from_slice(parent);
    Some(out)
}

/// The parent of a wire name (`None` for the root).
pub(crate) fn parent(name: &[u8]) -> Option<&[u8]> {
    match name.first() {
        Some(&len) if len > 0 => name.get(1 + len as usize..),
        _ => None,
    }
}

/// Whether `name` is `zone` or below it (both lowercased wire form).
pub(crate) fn is_within(name: &[u8], zone: &[u8]) -> bool {
    let mut cur = Some(name);
    while let Some(n) = cur {
        if n.len() < zone.len() {
            return false;
        }
        if n == zone {
            return true;
        }
        cur = parent(n);
    }
    false
}

/// Dotted text of a wire name, for logs and errors.
pub(crate) fn to_text(name: &[u8]) -> String {
    let mut out = String::new();
    let mut cur = name;
    while let Some((&len, rest)) = cur.split_first() {
        if len == 0 || rest.len() < len as usize {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&rest[..len as usize]));
        out.push('.');
        cur = &rest[len as usize..];
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// The address with its separators turned into dashes: `10-244-1-5`, `fd00-10-244-1--5`, the
/// label Kubernetes DNS uses for pod records and for endpoints without a hostname.
pub(crate) fn dashed(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The address a pod label stands for (the inverse of [`dashed`]): four dash-separated decimal
/// octets, or an IPv6 address with its colons as dashes (CoreDNS's rule for pod names).
pub(crate) fn parse_dashed(label: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(label).ok()?;
    if text.matches('-').count() == 3 && !text.contains("--") {
        text.replace('-', ".")
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(IpAddr::V4)
    } else {
        text.replace('-', ":")
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(IpAddr::V6)
    }
}

/// The labels of `name` above `zone` (which `name` must be within), leftmost first.
pub(crate) fn labels_above<'a>(name: &'a [u8], zone: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut cur = name;
    while cur.len() > zone.len() {
        let len = cur[0] as usize;
        out.push(&cur[1..1 + len]);
        cur = &cur[1 + len..];
    }
    out
}

/// The reverse-lookup name of an address in wire form: `5.1.244.10.in-addr.arpa` or the
/// nibble form under `ip6.arpa`.
pub(crate) fn reverse(ip: &IpAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    match ip {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                let s = octet.to_string();
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            out.extend_from_slice(b"\x07in-addr\x04arpa\x00");
        }
        IpAddr::V6(v6) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for byte in v6.octets().iter().rev() {
                out.extend_from_slice(&[
                    1,
                    HEX[(byte & 0xf) as usize],
                    1,
                    HEX[(byte >> 4) as usize],
                ]);
            }
            out.extend_from_slice(b"\x03ip6\x04arpa\x00");
        }
    }
    out
}

/// The address a full reverse name stands for, if it is one (`None` for partial names such as
/// `10.in-addr.arpa`, which are not addresses).
pub(crate) fn parse_reverse(name: &[u8]) -> Option<IpAddr> {
    let mut labels = Vec::with_capacity(34);
    let mut cur = name;
    while let Some((&len, rest)) = cur.split_first() {
        if len == 0 {
            break;
        }
        labels.push(rest.get(..len as usize)?);
        cur = &rest[len as usize..];
    }
    match labels.as_slice() {
        [d, c, b, a, b"in-addr", b"arpa"] => {
            let octet = |l: &[u8]| -> Option<u8> {
                if l.is_empty() || l.len() > 3 || (l.len() > 1 && l[0] == b'0') {
                    return None;
                }
                std::str::from_utf8(l).ok()?.parse().ok()
            };
            Some(IpAddr::from([octet(a)?, octet(b)?, octet(c)?, octet(d)?]))
        }
        [nibbles @ .., b"ip6", b"arpa"] if nibbles.len() == 32 => {
            let mut value: u128 = 0;
            for l in nibbles.iter().rev() {
                let [c] = l else { return None };
                let digit = (*c as char).to_digit(16)?;
                value = (value << 4) | u128::from(digit);
            }
            Some(IpAddr::from(value.to_be_bytes()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_walks_names() {
        let n = encode("Web.Shop.svc.cluster.local.").unwrap();
        assert_eq!(n, b"\x03web\x04shop\x03svc\x07cluster\x05local\x00");
        assert_eq!(to_text(&n), "web.shop.svc.cluster.local.");
        let zone = encode("cluster.local").unwrap();
        assert!(is_within(&n, &zone));
        assert!(is_within(&zone, &zone));
        assert!(!is_within(&encode("xcluster.local").unwrap(), &zone));
        assert!(!is_within(&encode("local").unwrap(), &zone));
        assert_eq!(encode(""), Some(vec![0]));
        assert_eq!(encode("a..b"), None);
        assert_eq!(encode(&"a".repeat(64)), None);
    }

    #[test]
    fn reverse_names_round_trip() {
        for ip in ["10.96.0.10", "fd00:10:96::a", "::1", "255.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_reverse(&reverse(&ip)), Some(ip));
        }
        assert_eq!(
            to_text(&reverse(&"10.96.0.10".parse().unwrap())),
            "10.0.96.10.in-addr.arpa."
        );
        assert_eq!(parse_reverse(&encode("96.10.in-addr.arpa").unwrap()), None);
        assert_eq!(
            parse_reverse(&encode("01.0.96.10.in-addr.arpa").unwrap()),
            None
        );
        assert_eq!(
            dashed(&"fd00:10:244:1::5".parse().unwrap()),
            "fd00-10-244-1--5"
        );
        for ip in ["10.244.1.5", "fd00:10:244:1::5", "::1", "fd00::"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_dashed(dashed(&ip).as_bytes()), Some(ip));
        }
        for bad in [
            "10-244-01-5",
            "10-244-1",
            "10-244-1-256",
            "web-0",
            "",
            "1-2-3-4-5",
        ] {
            assert_eq!(parse_dashed(bad.as_bytes()), None, "{bad}");
        }
        let zone = encode("pod.cluster.local").unwrap();
        let n = encode("10-1-2-3.shop.pod.cluster.local").unwrap();
        assert_eq!(labels_above(&n, &zone), [&b"10-1-2-3"[..], b"shop"]);
        assert!(labels_above(&zone, &zone).is_empty());
    }
}
