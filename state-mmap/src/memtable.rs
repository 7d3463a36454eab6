//! The mutable write buffer: an ordered map from engine keys to the newest operation on them.

use std::collections::BTreeMap;

/// The kind of an operation stored for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpKind {
    /// A full value.
    Put = 0,
    /// Merge operands (appended bytes) with no known base in this source.
    Merge = 1,
    /// A tombstone.
    Delete = 2,
}

impl OpKind {
    pub(crate) fn from_u8(b: u8) -> Option<OpKind> {
        Some(match b {
            0 => OpKind::Put,
            1 => OpKind::Merge,
            2 => OpKind::Delete,
            _ => return None,
        })
    }
}

/// An operation held by a memtable. The merge operator is byte concatenation (list appends):
/// `Put(a) + Merge(b) = Put(a ++ b)`, `Delete + Merge(b) = Put(b)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put(Vec<u8>),
    Merge(Vec<u8>),
    Delete,
}

impl Op {
    pub(crate) fn kind(&self) -> OpKind {
        match self {
            Op::Put(_) => OpKind::Put,
            Op::Merge(_) => OpKind::Merge,
            Op::Delete => OpKind::Delete,
        }
    }
    pub(crate) fn value(&self) -> &[u8] {
        match self {
            Op::Put(v) | Op::Merge(v) => v,
            Op::Delete => &[],
        }
    }
}

/// Bytes charged per entry on top of key and value (tree node share, vectors, enum).
const ENTRY_OVERHEAD: usize = 64;

/// An ordered write buffer with byte accounting.
#[derive(Clone, Debug, Default)]
pub(crate) struct Memtable {
    map: BTreeMap<Vec<u8>, Op>,
    bytes: usize,
}

impl Memtable {
    pub(crate) fn new() -> Self {
        Memtable::default()
    }

    /// Approximate bytes used.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    #[inline]
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Op> {
        self.map.get(key)
    }

    pub(crate) fn map(&self) -> &BTreeMap<Vec<u8>, Op> {
        &self.map
    }

    fn set(&mut self, key: &[u8], op: Op) {
        let add = op.value().len();
        match self.map.get_mut(key) {
            Some(old) => {
                self.bytes = self.bytes.saturating_sub(old.value().len()) + add;
                *old = op;
            }
            None => {
                self.bytes += key.len() + add + ENTRY_OVERHEAD;
                self.map.insert(key.to_vec(), op);
            }
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        if let Some(Op::Put(v)) = self.map.get_mut(key) {
            // Reuse the allocation for the common overwrite.
            self.bytes = self.bytes.saturating_sub(v.len()) + value.len();
            v.clear();
            v.extend_from_slice(value);
            return;
        }
        self.set(key, Op::Put(value.to_vec()));
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.set(key, Op::Delete);
    }

    /// Appends `operand` to the key's value (the merge operator).
    pub(crate) fn merge(&mut self, key: &[u8], operand: &[u8]) {
        match self.map.get_mut(key) {
            Some(Op::Put(v)) | Some(Op::Merge(v)) => {
                v.extend_from_slice(operand);
                self.bytes += operand.len();
            }
            Some(op @ Op::Delete) => {
                *op = Op::Put(operand.to_vec());
                self.bytes += operand.len();
            }
            None => self.set(key, Op::Merge(operand.to_vec())),
        }
    }
}
