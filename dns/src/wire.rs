//! The hot path's wire handling: a strict, allocation-free parser for one query (header,
//! question, EDNS0 OPT) and a response writer that copies pre-encoded records.
//!
//! hickory-proto parses and builds everything else (forwarded and cached messages, and every
//! test's view of our answers), so the two implementations check each other in the tests.

use crate::name::MAX_NAME;

pub(crate) const HEADER_LEN: usize = 12;
/// Largest UDP answer without EDNS0 (RFC 1035 §4.2.1).
pub(crate) const CLASSIC_UDP: usize = 512;

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_NS: u16 = 2;
pub(crate) const TYPE_CNAME: u16 = 5;
pub(crate) const TYPE_SOA: u16 = 6;
pub(crate) const TYPE_PTR: u16 = 12;
pub(crate) const TYPE_TXT: u16 = 16;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_SRV: u16 = 33;
pub(crate) const TYPE_OPT: u16 = 41;
pub(crate) const TYPE_IXFR: u16 = 251;
pub(crate) const TYPE_AXFR: u16 = 252;
pub(crate) const TYPE_ANY: u16 = 255;
pub(crate) const CLASS_IN: u16 = 1;

/// Response codes we send (the low four bits; BADVERS goes through the OPT record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
    /// EDNS version not supported (16, RFC 6891).
    BadVers = 16,
}

/// EDNS0 as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// One parsed query. Borrows the packet; the lowercased name is copied into a fixed buffer.
pub(crate) struct Query<'a> {
    pub id: u16,
    /// Header flags as sent (opcode and RD are echoed; CD too).
    pub flags: u16,
    /// Question exactly as sent (name in the client's case, type, class), echoed in the answer.
    pub question: &'a [u8],
    name: [u8; MAX_NAME],
    name_len: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

impl Query<'_> {
    /// The question name, lowercased, in wire form.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    /// Largest answer the client takes over UDP.
    pub fn udp_limit(&self, ours: u16) -> usize {
        match self.edns {
            Some(e) => usize::from(
                e.udp_size
                    .clamp(CLASSIC_UDP as u16, ours.max(CLASSIC_UDP as u16)),
            ),
            None => CLASSIC_UDP,
        }
    }
}

/// Why a packet is not a query we answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// No usable header, or a response: send nothing (answering could start a loop).
    Drop,
    /// Answer FORMERR with this id and flags and no question.
    FormErr { id: u16, flags: u16 },
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Skips a possibly compressed name; returns the offset after it.
fn skip_name(p: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *p.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => at += 1 + len as usize,
            0xc0 => {
                p.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
    None
}

/// Parses a query strictly enough to answer it: one question, an uncompressed name, at most one
/// OPT record in the additional section.
pub(crate) fn parse(p: &[u8]) -> Result<Query<'_>, Reject> {
    if p.len() < HEADER_LEN {
        return Err(Reject::Drop);
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let flags = u16::from_be_bytes([p[2], p[3]]);
    if flags & 0x8000 != 0 {
        return Err(Reject::Drop);
    }
    let formerr = Reject::FormErr { id, flags };
    let qd = u16::from_be_bytes([p[4], p[5]]);
    let an = u16::from_be_bytes([p[6], p[7]]);
    let ns = u16::from_be_bytes([p[8], p[9]]);
    let ar = u16::from_be_bytes([p[10], p[11]]);
    if qd != 1 {
        return Err(formerr);
    }

    let mut name = [0u8; MAX_NAME];
    let mut name_len = 0;
    let mut at = HEADER_LEN;
    loop {
        let len = *p.get(at).ok_or(formerr)? as usize;
        // Compression pointers and extended label types have no place in a question.
        if len & 0xc0 != 0 {
            return Err(formerr);
        }
        if name_len + 1 + len > MAX_NAME {
            return Err(formerr);
        }
        let label = p.get(at + 1..at + 1 + len).ok_or(formerr)?;
        name[name_len] = len as u8;
        for (dst, src) in name[name_len + 1..name_len + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        name_len += 1 + len;
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let qtype = be16(p, at).ok_or(formerr)?;
    let qclass = be16(p, at + 2).ok_or(formerr)?;
    let question = &p[HEADER_LEN..at + 4];
    at += 4;

    // Skip answer and authority records (a plain query has none), then look for OPT.
    for _ in 0..(u32::from(an) + u32::from(ns)) {
        at = skip_record(p, at).ok_or(formerr)?.0;
    }
    let mut edns = None;
    for _ in 0..ar {
        let start = at;
        let (next, rtype) = skip_record(p, at).ok_or(formerr)?;
        if rtype == TYPE_OPT {
            // One OPT, owned by the root (RFC 6891 §6.1.1).
            if edns.is_some() || p[start] != 0 {
                return Err(formerr);
            }
            edns = Some(Edns {
                udp_size: be16(p, start + 3).ok_or(formerr)?,
                version: p[start + 6],
                dnssec_ok: p[start + 7] & 0x80 != 0,
            });
        }
        at = next;
    }
    Ok(Query {
        id,
        flags,
        question,
        name,
        name_len,
        qtype,
        qclass,
        edns,
    })
}

/// Skips one resource record; returns the next offset and the record's type.
fn skip_record(p: &[u8], at: usize) -> Option<(usize, u16)> {
    let at = skip_name(p, at)?;
    let rtype = be16(p, at)?;
    let rdlen = be16(p, at + 8)? as usize;
    let end = at + 10 + rdlen;
    (end <= p.len()).then_some((end, rtype))
}

/// Header flags of a response to `query_flags`: QR, the query's opcode, RD and CD, RA set (we
/// forward), AA as given, and the low four bits of the rcode.
pub(crate) fn response_flags(query_flags: u16, authoritative: bool, rcode: Rcode) -> u16 {
    let mut f = 0x8000 | (query_flags & 0x7800) | (query_flags & 0x0100) | 0x0080;
    f |= query_flags & 0x0010; // CD
    if authoritative {
        f |= 0x0400;
    }
    f | (rcode as u16 & 0xf)
}

/// Writes a header into `out` (cleared first).
pub(crate) fn write_header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

/// Appends our OPT record: our UDP size, the extended rcode, version 0, DO copied.
pub(crate) fn write_opt(out: &mut Vec<u8>, udp_size: u16, rcode: Rcode, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&udp_size.to_be_bytes());
    out.push(((rcode as u16) >> 4) as u8);
    out.push(0);
    out.push(if dnssec_ok { 0x80 } else { 0 });
    out.extend_from_slice(&[0, 0, 0]);
}

/// A FORMERR answer: header only.
pub(crate) fn write_formerr(out: &mut Vec<u8>, id: u16, flags: u16) {
    write_header(
        out,
        id,
        response_flags(flags, false, Rcode::FormErr),
        [0; 4],
    );
}

/// Sections of an answer taken from the index.
pub(crate) struct Sections<'a> {
    pub rcode: Rcode,
    pub authoritative: bool,
    /// Pre-encoded answer records (borrowed from the index, or owned when
    /// rewritten for a CNAME target), as `Index::lookup` returns them.
    pub answers: &'a [std::borrow::Cow<'a, [u8]>],
    /// Pre-encoded authority records (the SOA of a negative answer).
    pub authority: Option<&'a [u8]>,
}

/// Writes a whole answer to `query` into `out`. Over `limit` bytes, the records are left out and
/// TC is set, so the client retries over TCP (RFC 2181 §9).
pub(crate) fn write_response(
    out: &mut Vec<u8>,
    query: &Query<'_>,
    s: &Sections<'_>,
    our_udp_size: u16,
    limit: usize,
) -> bool {
    let opt_len = if query.edns.is_some() { 11 } else { 0 };
    let body: usize =
        s.answers.iter().map(|a| a.len()).sum::<usize>() + s.authority.map_or(0, <[u8]>::len);
    let truncated = HEADER_LEN + query.question.len() + body + opt_len > limit;
    let mut flags = response_flags(query.flags, s.authoritative, s.rcode);
    let (an, ns) = if truncated {
        flags |= 0x0200;
        (0, 0)
    } else {
        (s.answers.len() as u16, u16::from(s.authority.is_some()))
    };
    write_header(
        out,
        query.id,
        flags,
        [1, an, ns, u16::from(query.edns.is_some())],
    );
    out.extend_from_slice(query.question);
    if !truncated {
        for a in s.answers {
            out.extend_from_slice(a);
        }
        if let Some(auth) = s.authority {
            out.extend_from_slice(auth);
        }
    }
    if let Some(e) = query.edns {
        write_opt(out, our_udp_size, s.rcode, e.dnssec_ok);
    }
    truncated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], qtype: u16, extra: &[u8], ar: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0];
        p.extend_from_slice(&ar.to_be_bytes());
        p.extend_from_slice(name);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p.extend_from_slice(extra);
        p
    }

    #[test]
    fn parses_a_query_with_edns() {
        let mut opt = vec![0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0];
        let p = query(b"\x03WeB\x05Local\x00", TYPE_A, &opt, 1);
        let q = parse(&p).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name(), b"\x03web\x05local\x00");
        assert_eq!(&q.question[..4], b"\x03WeB");
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 1232,
                version: 0,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(4096), 1232);
        assert_eq!(q.udp_limit(1000), 1000);
        // Two OPT records are a format error.
        opt.extend_from_slice(&opt.clone());
        let p = query(b"\x00", TYPE_A, &opt, 2);
        assert!(matches!(parse(&p), Err(Reject::FormErr { .. })));
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(parse(&[0; 11]).err(), Some(Reject::Drop));
        let mut response = query(b"\x00", TYPE_A, &[], 0);
        response[2] |= 0x80;
        assert_eq!(parse(&response).err(), Some(Reject::Drop));
        let truncated = query(b"\x03web\x00", TYPE_A, &[], 0);
        assert!(matches!(
            parse(&truncated[..truncated.len() - 1]),
            Err(Reject::FormErr { id: 0x1234, .. })
        ));
        let pointer = query(b"\xc0\x0c", TYPE_A, &[], 0);
        assert!(matches!(parse(&pointer), Err(Reject::FormErr { .. })));
        let mut two = query(b"\x00", TYPE_A, &[], 0);
        two[5] = 2;
        assert!(matches!(parse(&two), Err(Reject::FormErr { .. })));
        let missing_opt = query(b"\x00", TYPE_A, &[], 1);
        assert!(matches!(parse(&missing_opt), Err(Reject::FormErr { .. })));
    }
}
