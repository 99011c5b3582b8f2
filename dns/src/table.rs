//! The index's names, one allocation each: the name, the count of records below it and its
//! pre-encoded records packed into one boxed byte string, in a hash set keyed by the name.
//!
//! A name with one A record was four allocations before (key, record vector, record box, and
//! a vector sized for four records) and a 48-byte table slot; it is now one allocation of its
//! bytes plus a little, and a 16-byte slot. Reading is in place; a change unpacks the entry,
//! edits it and packs it again (changes are rare next to lookups).
//!
//! Layout: `[name length: u8][name][below: u32 LE]` then per record
//! `[owner: u64 LE][dup: u8][length: u16 LE][record]`.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// Who contributed a record, so an update removes exactly what that object added before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OwnerId(pub u64);

const RECORD_HEADER: usize = 8 + 1 + 2;

/// Bytes in one allocation whose first byte is the length of the key that follows; hashed and
/// compared by that key, so a set of them is a map from the key to the rest.
pub(crate) struct Packed(Box<[u8]>);

impl Packed {
    /// `key` (at most 255 bytes), then what `rest` writes.
    pub fn new(key: &[u8], rest_len: usize, rest: impl FnOnce(&mut Vec<u8>)) -> Packed {
        let mut out = Vec::with_capacity(1 + key.len() + rest_len);
        out.push(key.len() as u8);
        out.extend_from_slice(key);
        rest(&mut out);
        Packed(out.into_boxed_slice())
    }

    pub fn key(&self) -> &[u8] {
        &self.0[1..1 + usize::from(self.0[0])]
    }

    pub fn rest(&self) -> &[u8] {
        &self.0[1 + usize::from(self.0[0])..]
    }
}

impl Hash for Packed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Packed {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Packed {}

impl Borrow<[u8]> for Packed {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

fn pack(name: &[u8], node: &Node) -> Packed {
    let size = 4 + node
        .records
        .iter()
        .map(|r| RECORD_HEADER + r.rr.len())
        .sum::<usize>();
    Packed::new(name, size, |out| {
        out.extend_from_slice(&node.below.to_le_bytes());
        for r in &node.records {
            out.extend_from_slice(&r.owner.0.to_le_bytes());
            out.push(u8::from(r.dup));
            out.extend_from_slice(&(r.rr.len() as u16).to_le_bytes());
            out.extend_from_slice(&r.rr);
        }
    })
}

/// One record as stored, borrowed from its entry.
#[derive(Clone, Copy)]
pub(crate) struct Stored<'a> {
    pub owner: OwnerId,
    /// The same record is already served from another owner (two headless Services over one
    /// pod give the same PTR); kept for bookkeeping, not answered twice.
    pub dup: bool,
    pub rr: &'a [u8],
}

impl Stored<'_> {
    pub fn rtype(&self) -> u16 {
        u16::from_be_bytes([self.rr[2], self.rr[3]])
    }
}

/// A name's entry, read in place (what follows the name).
#[derive(Clone, Copy)]
pub(crate) struct View<'a>(&'a [u8]);

impl<'a> View<'a> {
    pub fn below(&self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    pub fn records(&self) -> impl Iterator<Item = Stored<'a>> + Clone + use<'a> {
        let mut rest = &self.0[4..];
        std::iter::from_fn(move || {
            let (head, tail) = rest.split_at_checked(RECORD_HEADER)?;
            let len = usize::from(u16::from_le_bytes([head[9], head[10]]));
            let (rr, tail) = tail.split_at(len);
            rest = tail;
            let mut owner = [0u8; 8];
            owner.copy_from_slice(&head[..8]);
            Some(Stored {
                owner: OwnerId(u64::from_le_bytes(owner)),
                dup: head[8] != 0,
                rr,
            })
        })
    }
}

/// A record of an entry being changed.
pub(crate) struct Owned {
    pub owner: OwnerId,
    pub dup: bool,
    pub rr: Box<[u8]>,
}

/// An entry being changed.
#[derive(Default)]
pub(crate) struct Node {
    pub records: Vec<Owned>,
    /// Records at names strictly below this one: a node with none of its own but some below is
    /// an empty non-terminal, answered NODATA rather than NXDOMAIN.
    pub below: u32,
}

#[derive(Default)]
pub(crate) struct Table {
    entries: HashSet<Packed>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, name: &[u8]) -> Option<View<'_>> {
        self.entries.get(name).map(|e| View(e.rest()))
    }

    /// Takes a name's entry out to change it (an empty node if there is none); give it back
    /// with [`Table::put`].
    pub fn take(&mut self, name: &[u8]) -> Node {
        let Some(entry) = self.entries.take(name) else {
            return Node::default();
        };
        let view = View(entry.rest());
        Node {
            below: view.below(),
            records: view
                .records()
                .map(|s| Owned {
                    owner: s.owner,
                    dup: s.dup,
                    rr: s.rr.into(),
                })
                .collect(),
        }
    }

    /// Stores a name's entry; a node with no records and none below is not kept.
    pub fn put(&mut self, name: &[u8], node: Node) {
        if node.records.is_empty() && node.below == 0 {
            return;
        }
        self.entries.insert(pack(name, &node));
    }
}
