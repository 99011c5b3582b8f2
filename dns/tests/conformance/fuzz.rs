//! A bounded property test standing in for a cargo-fuzz target (which needs nightly here):
//! 100,000 random and mutated packets through the query path; nothing may panic, every answer
//! must decode, and its id must be the query's.

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

use crate::support::*;

/// xorshift64*: deterministic, so a failure reproduces from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mutated_packets_never_panic() {
    let index = index_of(cluster());
    let seeds: Vec<Vec<u8>> = [
        ("web.shop.svc.cluster.local.", RecordType::A, Some(1232)),
        ("_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV, None),
        ("20.0.96.10.in-addr.arpa.", RecordType::PTR, Some(512)),
        ("alias.shop.svc.cluster.local.", RecordType::A, Some(4096)),
        ("nope.cluster.local.", RecordType::AAAA, None),
    ]
    .into_iter()
    .map(|(n, t, e)| query_bytes(n, t, e))
    .collect();
    let mut rng = Rng(0x5eed_f00d_dead_beef);
    let mut answered = 0;
    for i in 0..100_000 {
        let packet: Vec<u8> = if i % 4 == 0 {
            (0..rng.below(300)).map(|_| rng.next() as u8).collect()
        } else {
            let mut p = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(4) {
                    0 if !p.is_empty() => {
                        let at = rng.below(p.len());
                        p[at] = rng.next() as u8;
                    }
                    1 => p.truncate(rng.below(p.len() + 1)),
                    2 => p.push(rng.next() as u8),
                    _ if p.len() > 12 => {
                        // Flip header counts: the most interesting bytes for a parser.
                        let at = 4 + rng.below(8);
                        p[at] = rng.next() as u8;
                    }
                    _ => {}
                }
            }
            p
        };
        if let Some(answer) = fairlead_dns::answer_from_index(&index, &packet, 1232) {
            let m = Message::from_vec(&answer)
                .unwrap_or_else(|e| panic!("answer to {packet:02x?} does not decode: {e}"));
            assert_eq!(m.metadata.id, u16::from_be_bytes([packet[0], packet[1]]));
            answered += 1;
        }
    }
    assert!(answered > 50_000, "only {answered} packets were answered");
}
