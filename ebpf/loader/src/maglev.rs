//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): a
//! lookup table of `M` slots (a prime) filled so that each backend owns about
//! `M/N` slots, and removing one backend moves only the slots it owned.
//!
//! Each backend walks its own permutation of the slots, `offset + j * skip
//! (mod M)`, with `offset` and `skip` from two hashes of its name; backends
//! take turns claiming their next free slot. The hash is FNV-1a, fixed here
//! rather than std's (whose output may change between Rust releases), so an
//! upgraded agent computes the same table and existing flows keep their
//! backend.

/// Fills a table of `m` slots (a prime) with indexes into `names`. Empty
/// when `names` is.
pub fn table(names: &[impl AsRef<[u8]>], m: usize) -> Vec<u32> {
    let n = names.len();
    if n == 0 {
        return Vec::new();
    }
    let m64 = m as u64;
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(name.as_ref(), 0xcbf2_9ce4_8422_2325) % m64;
            let skip = fnv1a(name.as_ref(), 0x8422_2325_cbf2_9ce4) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut slots = vec![u32::MAX; m];
    let mut filled = 0;
    'outer: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            // Each backend's permutation visits every slot once, so this finds
            // a free one within `m` steps.
            let mut c = (offset + next[i] * skip) % m64;
            while slots[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            slots[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    slots
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = 1021;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 250, i % 250))
            .collect()
    }

    #[test]
    fn every_slot_filled_and_balanced() {
        for n in [1, 2, 3, 10, 100] {
            let t = table(&names(n), M);
            assert_eq!(t.len(), M);
            let mut per = vec![0usize; n];
            for &b in &t {
                per[b as usize] += 1;
            }
            let (min, max) = (*per.iter().min().unwrap(), *per.iter().max().unwrap());
            // The paper's round-robin fill keeps the spread to one slot.
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
        }
    }

    #[test]
    fn removing_one_backend_moves_only_its_slots_and_few_others() {
        let all = names(10);
        let before = table(&all, M);
        let mut fewer = all.clone();
        let removed = fewer.remove(3);
        let after = table(&fewer, M);
        let mut moved_other = 0;
        for (slot, (&b, &a)) in before.iter().zip(&after).enumerate() {
            let was = &all[b as usize];
            let now = &fewer[a as usize];
            if *was != removed && was != now {
                moved_other += 1;
            }
            let _ = slot;
        }
        // Disruption of the survivors stays small (paper: a few percent).
        assert!(
            moved_other < M / 10,
            "{moved_other} slots of survivors moved"
        );
    }

    #[test]
    fn empty_and_stable() {
        assert!(table(&Vec::<String>::new(), M).is_empty());
        assert_eq!(table(&names(5), M), table(&names(5), M));
    }
}
