//! The mutable write buffer: an ordered map from engine keys to the newest operation on them.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Arc, Mutex, OnceLock};

use hashbrown::hash_table::Entry;

use crate::run::{key_hash, prefix_hash, PrefixExtractor};

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

/// Bytes stored inline up to 30 bytes (most state keys and small values), on the heap above:
/// a new write-buffer entry usually allocates nothing.
#[derive(Clone)]
pub(crate) enum SmallBytes {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Vec<u8>),
}

const INLINE: usize = 30;

impl SmallBytes {
    #[inline]
    pub(crate) fn new(b: &[u8]) -> SmallBytes {
        if b.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..b.len()].copy_from_slice(b);
            SmallBytes::Inline {
                len: b.len() as u8,
                buf,
            }
        } else {
            SmallBytes::Heap(b.to_vec())
        }
    }

    #[inline]
    fn set(&mut self, b: &[u8]) {
        match self {
            SmallBytes::Heap(v) if b.len() > INLINE => {
                v.clear();
                v.extend_from_slice(b);
            }
            _ => *self = SmallBytes::new(b),
        }
    }

    #[inline]
    fn extend(&mut self, b: &[u8]) {
        match self {
            SmallBytes::Heap(v) => v.extend_from_slice(b),
            SmallBytes::Inline { len, buf } => {
                let n = usize::from(*len);
                if n + b.len() <= INLINE {
                    buf[n..n + b.len()].copy_from_slice(b);
                    *len = (n + b.len()) as u8;
                } else {
                    let mut v = Vec::with_capacity((n + b.len()) * 2);
                    v.extend_from_slice(&buf[..n]);
                    v.extend_from_slice(b);
                    *self = SmallBytes::Heap(v);
                }
            }
        }
    }
}

impl std::ops::Deref for SmallBytes {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, buf } => &buf[..usize::from(*len)],
            SmallBytes::Heap(v) => v,
        }
    }
}

impl std::borrow::Borrow<[u8]> for SmallBytes {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl PartialEq for SmallBytes {
    #[inline]
    fn eq(&self, o: &Self) -> bool {
        **self == **o
    }
}
impl Eq for SmallBytes {}

impl std::hash::Hash for SmallBytes {
    /// Hashes like `[u8]`, so lookups by `&[u8]` find it.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

impl std::fmt::Debug for SmallBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", &**self)
    }
}

/// An operation held by a memtable. The merge operator is byte concatenation (list appends):
/// `Put(a) + Merge(b) = Put(a ++ b)`, `Delete + Merge(b) = Put(b)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put(SmallBytes),
    Merge(SmallBytes),
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

/// Bytes charged per entry on top of the key (held twice) and the value: table slot, entry,
/// tree node share, vectors, enum.
const ENTRY_OVERHEAD: usize = 160;

type Hasher = foldhash::fast::FixedState;

/// A key in the ordered set: its first 16 bytes as a big-endian number decide most comparisons
/// without a `memcmp` call (state keys start `key group | state id | key length | key`).
#[derive(Clone, Debug)]
struct MemKey {
    head: u128,
    bytes: SmallBytes,
}

impl MemKey {
    fn new(b: &[u8]) -> MemKey {
        MemKey {
            head: head_of(b),
            bytes: SmallBytes::new(b),
        }
    }
}

/// The first 16 bytes of `b`, zero-padded, as a big-endian number (orders like the bytes).
#[inline]
pub(crate) fn head_of(b: &[u8]) -> u128 {
    if let Some(h) = b.first_chunk::<16>() {
        return u128::from_be_bytes(*h);
    }
    let mut a = [0u8; 16];
    let n = b.len().min(16);
    a[..n].copy_from_slice(&b[..n]);
    u128::from_be_bytes(a)
}

impl PartialEq for MemKey {
    fn eq(&self, o: &Self) -> bool {
        self.head == o.head && self.bytes == o.bytes
    }
}
impl Eq for MemKey {}
impl PartialOrd for MemKey {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for MemKey {
    /// Lexicographic order of the bytes: zero padding in `head` cannot reorder two keys (a
    /// tie falls through to the full comparison).
    #[inline]
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.head
            .cmp(&o.head)
            .then_with(|| self.bytes.cmp(&o.bytes))
    }
}

/// A write buffer with byte accounting: the entries in insertion order, a hash table of their
/// positions for point reads and writes (4 bytes a slot: its power-of-two size wastes little),
/// and, once a range scan asked for it, an ordered set of the keys (then touched whenever a key
/// is new; flushes sort the entries instead).
/// With a prefix extractor, the entries of each scan prefix are also chained together, so a
/// prefix scan (one map) finds its few entries without a search of the ordered set.
pub(crate) struct Memtable {
    map: hashbrown::HashTable<u32>,
    entries: Vec<(SmallBytes, Op)>,
    /// Built by the first range scan (a flush sorts the entries instead), then kept up to date:
    /// a buffer nobody scans never pays for an ordered insert per new key.
    order: OnceLock<BTreeSet<MemKey>>,
    bytes: usize,
    prefix: Option<PrefixExtractor>,
    /// Per scan-prefix hash: the newest entry with a prefix of that hash and how many there are.
    prefixes: hashbrown::HashMap<u64, Chain, Hasher>,
    /// Per entry (with a prefix extractor): the previous entry with the same prefix hash, or
    /// [`NO_ENTRY`].
    chain: Vec<u32>,
    /// Where this buffer's allocations go when it is dropped (for the engine's next buffer).
    recycler: Option<Arc<Recycler>>,
    /// Empty heap byte vectors of a freed buffer, taken by new keys and values over 30 bytes.
    spare: Vec<Vec<u8>>,
}

/// The allocations of a flushed write buffer, kept for the engine's next one: its entry vector,
/// its hash table and the heap vectors of its keys and values (emptied). A new buffer that
/// takes them writes into memory the process already has instead of memory the allocator asks
/// the OS for: each new page costs a page fault and, inside a container's memory limit, the
/// reclaim of a page of the page cache on the writer's thread (about half the writer's time
/// in a 512 MiB cgroup). At most one freed buffer is kept, in the budget's headroom third: the
/// process holds about one buffer more than when each was handed back to the OS at once (see
/// `mapped::release_free_memory`), but reuses the same allocations instead of leaving holes.
#[derive(Default)]
pub(crate) struct Recycler {
    spare: Mutex<Option<Spare>>,
}

/// What [`Recycler`] keeps of a freed write buffer.
#[derive(Default)]
struct Spare {
    entries: Vec<(SmallBytes, Op)>,
    map: hashbrown::HashTable<u32>,
    values: Vec<Vec<u8>>,
}

/// Heap vectors larger than this (a long list's merged value) are freed, not kept.
const SPARE_MAX_CAPACITY: usize = 4096;

impl Recycler {
    fn take(&self) -> Option<Spare> {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn is_full(&self) -> bool {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    fn give(&self, spare: Spare) {
        let mut slot = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(spare);
        }
    }
}

impl Clone for Memtable {
    /// A copy for a writer while a scan reads the original: it has no spare vectors and no
    /// recycler (the original, dropped when the scan ends, hands its allocations on).
    fn clone(&self) -> Self {
        Memtable {
            map: self.map.clone(),
            entries: self.entries.clone(),
            order: self.order.clone(),
            bytes: self.bytes,
            prefix: self.prefix.clone(),
            prefixes: self.prefixes.clone(),
            chain: self.chain.clone(),
            recycler: None,
            spare: Vec::new(),
        }
    }
}

impl Drop for Memtable {
    /// Hands the buffer's allocations to its recycler (when it has one and that holds none).
    fn drop(&mut self) {
        let Some(r) = self.recycler.take() else {
            return;
        };
        if r.is_full() {
            return;
        }
        // Only as many vectors as this buffer used: the next one is about as large (spare
        // vectors it did not take are freed, so a shrinking budget share frees memory too).
        let mut values = Vec::with_capacity(self.entries.len());
        let mut keep = |b: SmallBytes| {
            if let SmallBytes::Heap(mut v) = b {
                if v.capacity() <= SPARE_MAX_CAPACITY {
                    v.clear();
                    values.push(v);
                }
            }
        };
        for (k, op) in self.entries.drain(..) {
            keep(k);
            if let Op::Put(v) | Op::Merge(v) = op {
                keep(v);
            }
        }
        self.map.clear();
        r.give(Spare {
            entries: std::mem::take(&mut self.entries),
            map: std::mem::take(&mut self.map),
            values,
        });
    }
}

/// The entries of one scan-prefix hash: the newest one's position and their number.
#[derive(Clone, Copy, Debug)]
struct Chain {
    newest: u32,
    len: u32,
}

/// The end of a prefix chain.
const NO_ENTRY: u32 = u32::MAX;

/// Prefix scans of up to this many buffered entries with the prefix's hash use the prefix
/// chain (and sort what they find); longer chains search the ordered set.
pub(crate) const CHAIN_SCAN_MAX: usize = 16;

/// What [`Memtable::prefix_entries`] found.
pub(crate) enum PrefixEntries {
    /// The positions of the entries with the prefix, in key order (`len` of them).
    Few {
        at: [u32; CHAIN_SCAN_MAX],
        len: usize,
    },
    /// Too many entries share the prefix hash: use [`Memtable::range`].
    Many,
}

impl std::fmt::Debug for Memtable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtable")
            .field("entries", &self.entries.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Memtable {
    /// A buffer expected to hold about `bytes` bytes (its hash table is sized up front, so it
    /// never rehashes while it fills).
    #[cfg(test)]
    pub(crate) fn new(prefix: Option<PrefixExtractor>, bytes: usize) -> Self {
        Memtable::with_spare(prefix, bytes, None, Spare::default())
    }

    /// [`Memtable::new`] in the allocations of the last buffer `recycler` was given (if any);
    /// this buffer's go to it when it is dropped.
    pub(crate) fn recycled(
        prefix: Option<PrefixExtractor>,
        bytes: usize,
        recycler: &Arc<Recycler>,
    ) -> Self {
        let spare = recycler.take().unwrap_or_default();
        Memtable::with_spare(prefix, bytes, Some(Arc::clone(recycler)), spare)
    }

    fn with_spare(
        prefix: Option<PrefixExtractor>,
        bytes: usize,
        recycler: Option<Arc<Recycler>>,
        spare: Spare,
    ) -> Self {
        let n = bytes / 256;
        let Spare {
            mut entries,
            mut map,
            values,
        } = spare;
        // A much larger buffer's vector and table (the budget share shrank) are not kept.
        if entries.capacity() > 2 * n {
            entries = Vec::new();
        }
        if map.capacity() > 2 * n {
            map = hashbrown::HashTable::new();
        }
        entries.reserve(n);
        // Empty: the hasher is never called.
        map.reserve(n, |_| 0);
        Memtable {
            map,
            entries,
            order: OnceLock::new(),
            bytes: 0,
            prefix,
            prefixes: hashbrown::HashMap::default(),
            chain: Vec::new(),
            recycler,
            spare: values,
        }
    }

    /// `b` as stored bytes: inline up to 30 bytes, else in a spare heap vector if one is left
    /// and not more than twice as large as needed (a larger one is freed: the budget charges a
    /// value's length, not the capacity a longer value of the last buffer left).
    #[inline]
    fn stored(&mut self, b: &[u8]) -> SmallBytes {
        if b.len() > INLINE {
            if let Some(mut v) = self.spare.pop() {
                if v.capacity() <= 2 * b.len().max(64) {
                    v.extend_from_slice(b);
                    return SmallBytes::Heap(v);
                }
            }
        }
        SmallBytes::new(b)
    }

    /// The entries whose keys start with `prefix`, a whole scan prefix (what the extractor
    /// returns for every key that starts with it) hashed to `h` by [`prefix_hash`]: one hash
    /// lookup and a walk of the prefix's chain instead of a search of the ordered set.
    /// [`PrefixEntries::Many`] without an extractor or when many entries share the hash.
    #[inline]
    pub(crate) fn prefix_entries(&self, prefix: &[u8], h: u64) -> PrefixEntries {
        let mut at = [0u32; CHAIN_SCAN_MAX];
        let mut len = 0;
        if self.prefix.is_none() {
            return PrefixEntries::Many;
        }
        let Some(c) = self.prefixes.get(&h) else {
            return PrefixEntries::Few { at, len };
        };
        if c.len as usize > CHAIN_SCAN_MAX {
            return PrefixEntries::Many;
        }
        let mut i = c.newest;
        while let Some(e) = self.entries.get(i as usize) {
            if e.0.starts_with(prefix) && len < CHAIN_SCAN_MAX {
                // Insertion sort by key, descending (reversed below): a chain is short, and
                // walked newest first it usually comes in descending order (a map's entries
                // are mostly written in key order), which then costs one compare an entry.
                let mut j = len;
                while j > 0
                    && self
                        .entries
                        .get(at[j - 1] as usize)
                        .is_some_and(|p| *p.0 < *e.0)
                {
                    at[j] = at[j - 1];
                    j -= 1;
                }
                at[j] = i;
                len += 1;
            }
            i = self.chain.get(i as usize).copied().unwrap_or(NO_ENTRY);
        }
        at[..len].reverse();
        PrefixEntries::Few { at, len }
    }

    /// The key and operation of the entry at a position from [`Memtable::prefix_entries`].
    #[inline]
    pub(crate) fn entry_at(&self, i: u32) -> Option<(&[u8], &Op)> {
        self.entries.get(i as usize).map(|e| (&e.0[..], &e.1))
    }

    /// The positions of all entries in key order, for a flush: a sort of the entries' key heads
    /// (read in one pass over the entries) instead of a walk of the ordered set with a hash
    /// lookup per key, whose cache misses made most of a flush's time. Holds 32 bytes per entry
    /// while it sorts (a tenth of what the entries are charged).
    pub(crate) fn positions_in_key_order(&self) -> Vec<u32> {
        let mut order: Vec<(u128, u32)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (head_of(&e.0), i as u32))
            .collect();
        let key = |i: u32| self.entries.get(i as usize).map(|e| &e.0[..]);
        order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| key(a.1).cmp(&key(b.1))));
        order.into_iter().map(|(_, i)| i).collect()
    }

    /// Starts loading the entry at position `i` into the CPU cache; with `value`, also the
    /// bytes of its value (reads the entry: call it for an entry prefetched a while ago).
    #[inline]
    pub(crate) fn prefetch_entry(&self, i: u32, value: bool) {
        if let Some(e) = self.entries.get(i as usize) {
            if value {
                crate::mapped::prefetch(e.1.value(), 4);
            } else {
                crate::mapped::prefetch_ref(e);
            }
        }
    }

    /// The ordered set of the keys, built from the entries on first use.
    fn ordered(&self) -> &BTreeSet<MemKey> {
        self.order
            .get_or_init(|| self.entries.iter().map(|e| MemKey::new(&e.0)).collect())
    }

    /// Approximate bytes used.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The operation buffered for `key`, whose [`key_hash`] is `hash` (a read computes it once
    /// for the bloom filters of the sorted runs and the write buffers' tables alike).
    #[inline]
    pub(crate) fn get(&self, key: &[u8], hash: u64) -> Option<&Op> {
        // An empty buffer keeps the table sized for a full one: a probe would still miss the
        // cache on a random control group.
        if self.entries.is_empty() {
            return None;
        }
        debug_assert_eq!(hash, key_hash(key));
        let i = *self.map.find(hash, |&i| {
            self.entries.get(i as usize).is_some_and(|e| *e.0 == *key)
        })?;
        self.entries.get(i as usize).map(|e| &e.1)
    }

    /// The position of `key`'s entry, or `None` after reserving the next position for it in
    /// the hash table (the caller pushes the entry). One probe.
    #[inline]
    fn find_or_reserve(&mut self, key: &[u8]) -> Option<usize> {
        let entries = &self.entries;
        let found = self.map.entry(
            key_hash(key),
            |&i| entries.get(i as usize).is_some_and(|e| *e.0 == *key),
            |&i| entries.get(i as usize).map_or(0, |e| key_hash(&e.0)),
        );
        match found {
            Entry::Occupied(o) => Some(*o.get() as usize),
            Entry::Vacant(v) => {
                // Positions fit: every entry is charged over 160 bytes of the budget.
                v.insert(entries.len() as u32);
                None
            }
        }
    }

    fn op_mut(&mut self, i: usize) -> Option<&mut Op> {
        self.entries.get_mut(i).map(|e| &mut e.1)
    }

    /// Entries with keys in the range, in key order. One descent of the ordered set (to the
    /// start; the end is checked on the way, not searched for: a short range such as one map
    /// costs one search, not two).
    pub(crate) fn range<'a>(
        &'a self,
        from: Bound<&[u8]>,
        to: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a Op)> + 'a {
        let start = match from {
            Bound::Included(k) => Bound::Included(MemKey::new(k)),
            Bound::Excluded(k) => Bound::Excluded(MemKey::new(k)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let to = to.map(|b| (head_of(b), b));
        self.ordered()
            .range((start, Bound::Unbounded))
            .take_while(move |k| {
                let below = |h: u128, b: &[u8]| k.head.cmp(&h).then_with(|| k.bytes[..].cmp(b));
                match to {
                    Bound::Included((h, b)) => below(h, b).is_le(),
                    Bound::Excluded((h, b)) => below(h, b).is_lt(),
                    Bound::Unbounded => true,
                }
            })
            .filter_map(move |k| {
                self.get(&k.bytes[..], key_hash(&k.bytes[..]))
                    .map(|op| (&k.bytes[..], op))
            })
    }

    /// Books a key the hash table did not hold (already inserted there, its entry pushed): its
    /// prefix chain, its bytes and its place in the ordered set.
    fn note_new(&mut self, key: &[u8], value_len: usize) {
        if let Some(p) = &self.prefix {
            let mut prev = NO_ENTRY;
            if let Some(len) = p(key) {
                let newest = self.entries.len().saturating_sub(1) as u32;
                let c = self
                    .prefixes
                    .entry(prefix_hash(&key[..len.min(key.len())]))
                    .or_insert(Chain {
                        newest: NO_ENTRY,
                        len: 0,
                    });
                prev = c.newest;
                *c = Chain {
                    newest,
                    len: c.len.saturating_add(1),
                };
            }
            self.chain.push(prev);
        }
        self.bytes += 2 * key.len() + value_len + ENTRY_OVERHEAD;
        if let Some(order) = self.order.get_mut() {
            order.insert(MemKey::new(key));
        }
    }

    /// Stores `op` for `key` with one probe of the hash table.
    fn set(&mut self, key: &[u8], op: Op) {
        let add = op.value().len();
        match self.find_or_reserve(key) {
            Some(i) => {
                if let Some(old) = self.op_mut(i) {
                    let sub = old.value().len();
                    *old = op;
                    self.bytes = self.bytes.saturating_sub(sub) + add;
                }
            }
            None => {
                let k = self.stored(key);
                self.entries.push((k, op));
                self.note_new(key, add);
            }
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        match self.find_or_reserve(key) {
            Some(i) => {
                if let Some(old) = self.op_mut(i) {
                    let sub = old.value().len();
                    match old {
                        // Reuse the allocation for the common overwrite.
                        Op::Put(v) => v.set(value),
                        _ => *old = Op::Put(SmallBytes::new(value)),
                    }
                    self.bytes = self.bytes.saturating_sub(sub) + value.len();
                }
            }
            None => {
                let entry = (self.stored(key), Op::Put(self.stored(value)));
                self.entries.push(entry);
                self.note_new(key, value.len());
            }
        }
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.set(key, Op::Delete);
    }

    /// Appends `operand` to the key's value (the merge operator).
    pub(crate) fn merge(&mut self, key: &[u8], operand: &[u8]) {
        let Some(i) = self.find_or_reserve(key) else {
            let entry = (self.stored(key), Op::Merge(self.stored(operand)));
            self.entries.push(entry);
            self.note_new(key, operand.len());
            return;
        };
        match self.op_mut(i) {
            Some(Op::Put(v)) | Some(Op::Merge(v)) => v.extend(operand),
            Some(op @ Op::Delete) => *op = Op::Put(SmallBytes::new(operand)),
            None => return,
        }
        self.bytes += operand.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flush order (a sort of the entries) is the ordered set's order, also for keys that
    /// differ only after their first 16 bytes or are prefixes of each other.
    #[test]
    fn positions_in_key_order_match_the_ordered_set() {
        let mut m = Memtable::new(None, 1 << 20);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut k = vec![7u8; (seed % 20) as usize];
            k.push((seed >> 8) as u8 % 4);
            match (seed >> 16) % 3 {
                0 => m.put(&k, b"v"),
                1 => m.merge(&k, b"m"),
                _ => m.delete(&k),
            }
        }
        let sorted: Vec<&[u8]> = m
            .positions_in_key_order()
            .into_iter()
            .filter_map(|i| m.entry_at(i).map(|(k, _)| k))
            .collect();
        let walked: Vec<&[u8]> = m
            .range(Bound::Unbounded, Bound::Unbounded)
            .map(|(k, _)| k)
            .collect();
        assert!(walked.len() > 40, "{}", walked.len());
        assert_eq!(sorted, walked);
    }

    /// A buffer made by `recycled` takes the allocations the last dropped one left (its entry
    /// vector and the heap vectors of its values, not one longer than `SPARE_MAX_CAPACITY`),
    /// holds exactly what is written to it, and hands its own on when dropped (only as many
    /// vectors as it used); a copy does not, and a much smaller buffer does not keep a large
    /// entry vector.
    #[test]
    fn a_recycled_buffer_reuses_the_last_ones_allocations_and_holds_only_its_own_writes() {
        let r = Arc::new(Recycler::default());
        let key = |i: u32| i.to_be_bytes();
        let mut a = Memtable::recycled(None, 1 << 18, &r);
        for i in 0u32..1000 {
            a.put(&key(i), &[i as u8; 100]);
        }
        a.merge(b"list", &[1; SPARE_MAX_CAPACITY + 1]);
        let capacity = a.entries.capacity();
        drop(a);
        let mut b = Memtable::recycled(None, 1 << 18, &r);
        assert!(r.spare.lock().unwrap().is_none());
        assert_eq!(b.spare.len(), 1000);
        assert!(b.entries.is_empty() && b.entries.capacity() >= capacity);
        assert_eq!(b.bytes(), 0);
        for i in 0u32..500 {
            b.put(&key(i), &[7; 40]);
        }
        b.merge(&key(3), b"+");
        assert_eq!(b.spare.len(), 500);
        for i in 0u32..1000 {
            let want = match i {
                3 => Some(Op::Put(SmallBytes::new(&[&[7u8; 40][..], b"+"].concat()))),
                0..500 => Some(Op::Put(SmallBytes::new(&[7; 40]))),
                _ => None,
            };
            assert_eq!(b.get(&key(i), key_hash(&key(i))).cloned(), want, "key {i}");
        }
        assert!(b.get(b"list", key_hash(b"list")).is_none());
        drop(b.clone());
        assert!(r.spare.lock().unwrap().is_none(), "a copy has no recycler");
        drop(b);
        assert_eq!(
            r.spare.lock().unwrap().as_ref().map(|s| s.values.len()),
            Some(500)
        );
        let c = Memtable::recycled(None, 1 << 10, &r);
        assert_eq!(c.spare.len(), 500);
        assert!(c.entries.capacity() < capacity);
    }

    /// A spare vector much larger than a new value is freed, not used for it: the memory a
    /// buffer holds stays within twice what it is charged for its values.
    #[test]
    fn a_large_spare_vector_is_not_used_for_a_small_value() {
        let r = Arc::new(Recycler::default());
        let mut a = Memtable::recycled(None, 1 << 16, &r);
        a.put(b"k", &[1; 1000]);
        drop(a);
        let mut b = Memtable::recycled(None, 1 << 16, &r);
        assert_eq!(b.spare.len(), 1);
        b.put(b"k", &[2; 40]);
        assert!(b.spare.is_empty());
        match b.entry_at(0) {
            Some((_, Op::Put(SmallBytes::Heap(v)))) => {
                assert_eq!(&v[..], &[2; 40]);
                assert!(v.capacity() < 1000, "{}", v.capacity());
            }
            other => panic!("{other:?}"),
        }
    }

    /// The ordered set is built by the first range scan and kept up to date by later writes.
    #[test]
    fn keys_written_after_the_first_scan_are_scanned() {
        let mut m = Memtable::new(None, 1 << 20);
        for i in (0u32..100).step_by(2) {
            m.put(&i.to_be_bytes(), b"a");
        }
        assert_eq!(m.range(Bound::Unbounded, Bound::Unbounded).count(), 50);
        for i in (1u32..100).step_by(2) {
            m.merge(&i.to_be_bytes(), b"b");
        }
        m.delete(&200u32.to_be_bytes());
        let keys: Vec<Vec<u8>> = m
            .range(Bound::Unbounded, Bound::Unbounded)
            .map(|(k, _)| k.to_vec())
            .collect();
        let want: Vec<Vec<u8>> = (0u32..100)
            .chain([200])
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        assert_eq!(keys, want);
        let copy = m.clone();
        assert_eq!(copy.range(Bound::Unbounded, Bound::Unbounded).count(), 101);
    }

    /// `range` returns the keys within its bounds in order, whatever the bounds' kinds, for
    /// keys that differ only after their first 16 bytes, and nothing for an inverted range.
    #[test]
    fn range_bounds() {
        let mut m = Memtable::new(None, 1 << 20);
        let key = |i: u8| -> Vec<u8> {
            let mut k = vec![7u8; 16];
            if i.is_multiple_of(2) {
                k.push(i);
            } else {
                k.truncate(usize::from(i) % 16);
            }
            k
        };
        let mut all: Vec<Vec<u8>> = (0..40).map(key).collect();
        all.sort();
        all.dedup();
        for k in &all {
            m.put(k, b"v");
        }
        let bounds = |i: usize| {
            let k = &all[i][..];
            [Bound::Included(k), Bound::Excluded(k), Bound::Unbounded]
        };
        for a in 0..all.len() {
            for b in 0..all.len() {
                for from in bounds(a) {
                    for to in bounds(b) {
                        let got: Vec<&[u8]> = m.range(from, to).map(|(k, _)| k).collect();
                        let want: Vec<&[u8]> = all
                            .iter()
                            .map(|k| &k[..])
                            .filter(|k| {
                                let after = match from {
                                    Bound::Included(a) => *k >= a,
                                    Bound::Excluded(a) => *k > a,
                                    Bound::Unbounded => true,
                                };
                                let before = match to {
                                    Bound::Included(b) => *k <= b,
                                    Bound::Excluded(b) => *k < b,
                                    Bound::Unbounded => true,
                                };
                                after && before
                            })
                            .collect();
                        assert_eq!(got, want, "{from:?} {to:?}");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, failure_persistence: None, ..Default::default() })]
        /// `prefix_entries` finds exactly the entries whose keys start with the prefix, in key
        /// order, or says `Many` only when more than `CHAIN_SCAN_MAX` keys share the prefix
        /// hash. Keys are `[prefix byte, rest...]`; the rest may be empty or long (heap keys).
        #[test]
        fn prefix_entries_match_a_model(
            ops in proptest::collection::vec(
                (0u8..6, proptest::collection::vec(0u8..4, 0..40), 0u8..3), 1..200),
        ) {
            let extractor: PrefixExtractor =
                std::sync::Arc::new(|k: &[u8]| (!k.is_empty()).then_some(1));
            let mut m = Memtable::new(Some(extractor), 1 << 16);
            let mut model = std::collections::BTreeMap::<Vec<u8>, Op>::new();
            for (p, rest, kind) in ops {
                let mut k = vec![p];
                k.extend_from_slice(&rest);
                match kind {
                    0 => {
                        m.put(&k, &rest);
                        model.insert(k, Op::Put(SmallBytes::new(&rest)));
                    }
                    1 => {
                        m.merge(&k, b"m");
                        let op = match model.remove(&k) {
                            Some(Op::Put(mut v)) => { v.extend(b"m"); Op::Put(v) }
                            Some(Op::Merge(mut v)) => { v.extend(b"m"); Op::Merge(v) }
                            Some(Op::Delete) => Op::Put(SmallBytes::new(b"m")),
                            None => Op::Merge(SmallBytes::new(b"m")),
                        };
                        model.insert(k, op);
                    }
                    _ => {
                        m.delete(&k);
                        model.insert(k, Op::Delete);
                    }
                }
                for q in 0u8..7 {
                    let want: Vec<(Vec<u8>, Op)> = model
                        .range(vec![q]..vec![q + 1])
                        .map(|(k, op)| (k.clone(), op.clone()))
                        .collect();
                    match m.prefix_entries(&[q], prefix_hash(&[q])) {
                        PrefixEntries::Few { at, len } => {
                            let got: Vec<(Vec<u8>, Op)> = at[..len]
                                .iter()
                                .map(|&i| m.entry_at(i).map(|(k, op)| (k.to_vec(), op.clone())).unwrap())
                                .collect();
                            proptest::prop_assert_eq!(got, want);
                        }
                        PrefixEntries::Many => proptest::prop_assert!(want.len() > CHAIN_SCAN_MAX),
                    }
                }
            }
        }
    }
}
