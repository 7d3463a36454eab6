//! Range reads: snapshots of the store, merged iteration over them and the scans the backend
//! runs (whole ranges, prefixes, two-source merges).

use std::cmp::Ordering as Cmp;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::iter::{Cursor, MemCursor, MergeIter, Resolve, RunCursor};
use crate::memtable::{Memtable, OpKind, PrefixEntries};
use crate::run::{prefix_hash, Probe};

use super::{Db, SortedRun};

/// The number of leading bytes `a` and `b` share: every key between them has those bytes.
pub(super) fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The resolved entries of two sources, `entries` holding the newer source's entries (source
/// 0) and then the older one's (source 1), each in key order and within `[start, end)`, passed
/// to `f` in key order until it returns false. Keys are compared after the bytes that `start`
/// and `end` share (every key between them shares them): a map's entries differ only in their
/// last few bytes.
pub(super) fn merge_two<E: From<Error>>(
    entries: &[(u32, OpKind, &[u8], &[u8])],
    start: &[u8],
    end: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
) -> Result<(), E> {
    let common = shared_len(start, end);
    let split = entries.partition_point(|e| e.0 == 0);
    let (newer, older) = entries.split_at(split);
    let (mut i, mut j) = (0, 0);
    let mut value = Vec::new();
    loop {
        let (n, o) = (newer.get(i), older.get(j));
        let order = match (n, o) {
            (None, None) => return Ok(()),
            (Some(_), None) => Cmp::Less,
            (None, Some(_)) => Cmp::Greater,
            (Some(n), Some(o)) => n.2.get(common..).cmp(&o.2.get(common..)),
        };
        let go_on = match (order, n, o) {
            (Cmp::Less, Some(&(_, kind, k, v)), _) => {
                i += 1;
                kind == OpKind::Delete || f(k, v)?
            }
            (Cmp::Greater, _, Some(&(_, kind, k, v))) => {
                j += 1;
                kind == OpKind::Delete || f(k, v)?
            }
            (Cmp::Equal, Some(&(_, nk, k, nv)), Some(&(_, ok, _, ov))) => {
                i += 1;
                j += 1;
                match (nk, ok) {
                    (OpKind::Delete, _) => true,
                    (OpKind::Put, _) | (OpKind::Merge, OpKind::Delete) => f(k, nv)?,
                    // Operands over a value or over older operands: oldest first.
                    (OpKind::Merge, _) => {
                        value.clear();
                        value.extend_from_slice(ov);
                        value.extend_from_slice(nv);
                        f(k, &value)?
                    }
                }
            }
            _ => return Ok(()),
        };
        if !go_on {
            return Ok(());
        }
    }
}

/// A consistent, owned view of the store; iterate it on any thread.
#[derive(Clone)]
pub struct DbSnapshot {
    mems: Vec<Arc<Memtable>>,
    runs: Vec<SortedRun>,
}

impl DbSnapshot {
    /// Resolved entries with keys in `[start, end)` (`end = None`: to the end).
    pub fn iter(&self, start: &[u8], end: Option<&[u8]>) -> Result<DbIter> {
        let mut sources: Vec<Box<dyn Cursor>> = Vec::new();
        for m in &self.mems {
            sources.push(Box::new(MemCursor::new(Arc::clone(m), start, end)));
        }
        for r in &self.runs {
            sources.push(Box::new(RunCursor::new(Arc::clone(r), start, end)?));
        }
        Ok(DbIter(MergeIter::new(sources, Resolve::Read)))
    }
}

/// An iterator over resolved `(key, value)` pairs in key order.
pub struct DbIter(MergeIter);

impl DbIter {
    /// The next pair.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(&[u8], &[u8])>> {
        Ok(self.0.next()?.map(|(_, k, v)| (k, v)))
    }
}

impl Db {
    /// A consistent view of everything written so far.
    pub fn snapshot(&self) -> DbSnapshot {
        let mut mems = Vec::with_capacity(1 + self.imm.len());
        if !self.mem.is_empty() {
            mems.push(Arc::clone(&self.mem));
        }
        mems.extend(self.imm.iter().cloned());
        DbSnapshot {
            mems,
            runs: self.runs.clone(),
        }
    }

    /// A consistent view for a long-lived reader (another thread): moves the write buffer to
    /// the immutable list first, so later writes do not copy it.
    pub fn snapshot_detached(&mut self) -> Result<DbSnapshot> {
        self.rotate()?;
        Ok(self.snapshot())
    }

    /// Calls `f` with every resolved `(key, value)` in `[start, end)` in key order until it
    /// returns false. Borrows the sources directly: the fast path for short scans (one map).
    pub fn scan<E: From<Error>>(
        &self,
        start: &[u8],
        end: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        self.scan_filtered(start, end, None, f)
    }

    /// Like [`Db::scan`] over every key that starts with `prefix`, where `prefix` is exactly
    /// what the [`EngineOptions::prefix_extractor`](super::EngineOptions::prefix_extractor) returns for those keys: write buffers and
    /// files whose filters prove the prefix absent are skipped.
    pub fn scan_prefix<E: From<Error>>(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        // The end of the range: `codec::successor` of the prefix, on the stack when short (a
        // scan is a few entries, an allocation a noticeable part).
        let Some(i) = crate::codec::successor_at(prefix) else {
            // Only 0xff bytes (or none): no key bounds the range from above, every key from
            // the prefix on starts with it. State keys never get here (they start with a key
            // group below 0x8000).
            let mut it = self.iter(prefix, None)?;
            while let Some((k, v)) = it.next()? {
                if !k.starts_with(prefix) || !f(k, v)? {
                    break;
                }
            }
            return Ok(());
        };
        let mut small = [0u8; 64];
        let large: Vec<u8>;
        let end: &[u8] = if i < small.len() {
            small[..i].copy_from_slice(&prefix[..i]);
            small[i] = prefix[i] + 1;
            &small[..=i]
        } else {
            large = [&prefix[..i], &[prefix[i] + 1]].concat();
            &large
        };
        let h = self
            .opts
            .prefix_extractor
            .as_ref()
            .map(|_| prefix_hash(prefix));
        self.scan_filtered(prefix, end, h, f)
    }

    fn scan_filtered<E: From<Error>>(
        &self,
        start: &[u8],
        end: &[u8],
        prefix: Option<u64>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        use std::ops::Bound;
        // The entries of every source in one vector (one allocation), newest source first,
        // each with the number of its source.
        // 24 of 40 bytes: below the size the allocator serves from its per-thread cache.
        let mut entries: Vec<(u32, OpKind, &[u8], &[u8])> = Vec::with_capacity(24);
        let mut src = 0u32;
        let probe = Probe::new(start);
        // With a prefix: start loading every run's prefix-filter line (a miss each) first; the
        // runs' first blocks start loading once those are checked, and only then are the write
        // buffers searched (misses of their own, overlapping with the blocks').
        let mut files = [0u32; 64];
        for (i, r) in self.runs.iter().enumerate().take(64) {
            let fi = r.partition_point(|f| f.before(&probe));
            files[i] = fi as u32;
            if let (Some(h), Some(f)) = (prefix, r.get(fi)) {
                f.prefetch_filter(h);
            }
        }
        let end_probe = Probe::new(end);
        let mut skip = 0u64;
        if let Some(h) = prefix {
            for (i, r) in self.runs.iter().enumerate().take(64) {
                let fi = files[i] as usize;
                // Skipped when the range lies in that file (the next one starts at or after
                // its end) and the file cannot hold the prefix.
                let absent = r
                    .get(fi)
                    .is_none_or(|f| !f.starts_before(&end_probe) || !f.may_contain_prefix(h));
                if absent && r.get(fi + 1).is_none_or(|f| !f.starts_before(&end_probe)) {
                    skip |= 1 << i;
                }
            }
        }
        // The first block of every run left: start loading what its search reads, so the
        // searches of several runs overlap.
        let mut first_blocks = [u32::MAX; 64];
        for (i, r) in self.runs.iter().enumerate().take(64) {
            if skip & (1 << i) != 0 {
                continue;
            }
            let Some(file) = r.get(files[i] as usize) else {
                continue;
            };
            if file.starts_before(&end_probe) && prefix.is_none_or(|h| file.may_contain_prefix(h)) {
                if let Some(bi) = file.find_block(start)? {
                    file.block(bi)?.prefetch_search();
                    first_blocks[i] = bi as u32;
                }
            }
        }
        for m in std::iter::once(&self.mem).chain(self.imm.iter()) {
            let before = entries.len();
            // A prefix's few entries come from its chain (`start` is the prefix); a search of
            // the ordered set otherwise. After the runs' first blocks started loading: the
            // buffers' misses overlap with theirs.
            match prefix.map(|h| m.prefix_entries(start, h)) {
                Some(PrefixEntries::Few { at, len }) => entries.extend(
                    at[..len]
                        .iter()
                        .filter_map(|&i| m.entry_at(i))
                        .map(|(k, op)| (src, op.kind(), k, op.value())),
                ),
                _ => entries.extend(
                    m.range(Bound::Included(start), Bound::Excluded(end))
                        .map(|(k, op)| (src, op.kind(), k, op.value())),
                ),
            }
            if entries.len() > before {
                src += 1;
            }
        }
        for (ri, r) in self.runs.iter().enumerate() {
            if ri < 64 && skip & (1 << ri) != 0 {
                continue;
            }
            let before = entries.len();
            let mut fi = if ri < 64 {
                files[ri] as usize
            } else {
                r.partition_point(|f| f.before(&probe))
            };
            'files: while let Some(file) = r.get(fi) {
                if !file.starts_before(&end_probe) {
                    break;
                }
                if prefix.is_some_and(|h| !file.may_contain_prefix(h)) {
                    fi += 1;
                    continue;
                }
                let known = (ri < 64 && fi == files[ri] as usize)
                    .then(|| first_blocks[ri])
                    .filter(|b| *b != u32::MAX);
                let found = match known {
                    Some(b) => Some(b as usize),
                    None => file.find_block(start)?,
                };
                let Some(mut bi) = found else {
                    fi += 1;
                    continue;
                };
                let mut blk = file.block(bi)?;
                let mut ei = blk.lower_bound(start, file)?;
                // A prefix (one map) is usually a few entries: load their lines together.
                if prefix.is_some() {
                    blk.prefetch_from(ei, 8);
                }
                loop {
                    if ei >= blk.len() {
                        bi += 1;
                        if bi >= file.block_count() {
                            break;
                        }
                        blk = file.block(bi)?;
                        ei = 0;
                    }
                    let e = blk.entry(ei, file)?;
                    if !end_probe.after_key(e.key) {
                        break 'files;
                    }
                    if file.visible(e.key) {
                        entries.push((src, e.kind, e.key, e.value));
                    }
                    ei += 1;
                }
                fi += 1;
            }
            if entries.len() > before {
                src += 1;
            }
        }
        if src <= 1 {
            // The common case: one source, nothing to merge.
            for &(_, kind, k, v) in &entries {
                if kind != OpKind::Delete && !f(k, v)? {
                    return Ok(());
                }
            }
            return Ok(());
        }
        if src == 2 {
            // Two sources (a map with a newer entry over its older ones): a two-way merge.
            return merge_two(&entries, start, end, f);
        }
        // Per source: its next entry and its end in `entries`.
        let mut pos: Vec<(usize, usize)> = Vec::with_capacity(src as usize);
        for (i, e) in entries.iter().enumerate() {
            match pos.last_mut() {
                Some(last) if entries[last.0].0 == e.0 => last.1 = i + 1,
                _ => pos.push((i, i + 1)),
            }
        }
        // Keys are compared after the bytes the bounds share (see `merge_two`).
        let common = shared_len(start, end);
        let mut value = Vec::new();
        loop {
            let mut min: Option<&[u8]> = None;
            for &(p, e) in &pos {
                if p < e {
                    let k = entries[p].2;
                    if min.is_none_or(|m| k.get(common..) < m.get(common..)) {
                        min = Some(k);
                    }
                }
            }
            let Some(key) = min else { return Ok(()) };
            let mut ops: Vec<&[u8]> = Vec::new();
            let mut base: Option<Option<&[u8]>> = None;
            for (p, e) in pos.iter_mut() {
                if *p < *e {
                    let (_, kind, k, v) = entries[*p];
                    if k.get(common..) == key.get(common..) {
                        *p += 1;
                        if base.is_none() {
                            match kind {
                                OpKind::Put => base = Some(Some(v)),
                                OpKind::Delete => base = Some(None),
                                OpKind::Merge => ops.push(v),
                            }
                        }
                    }
                }
            }
            let go_on = match (base, ops.is_empty()) {
                (Some(None), true) => true,
                // A value as it is: no copy.
                (Some(Some(b)), true) => f(key, b)?,
                _ => {
                    value.clear();
                    if let Some(Some(b)) = base {
                        value.extend_from_slice(b);
                    }
                    for op in ops.iter().rev() {
                        value.extend_from_slice(op);
                    }
                    f(key, &value)?
                }
            };
            if !go_on {
                return Ok(());
            }
        }
    }

    /// Resolved entries in `[start, end)`. Drop the iterator before the next write, or that
    /// write copies the write buffer.
    pub fn iter(&self, start: &[u8], end: Option<&[u8]>) -> Result<DbIter> {
        self.snapshot().iter(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{small, small_with_runs};
    use std::collections::BTreeMap;

    /// With more sources than a get's 64-run bit mask (70 sorted runs and a write buffer), a
    /// scan and a get still merge every source's operands in order.
    #[test]
    fn scans_merge_more_than_64_sources() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small_with_runs(200)).unwrap();
        let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
        for i in 0..71u8 {
            for k in [&b"k1"[..], b"k2"] {
                db.merge(k, &[i]).unwrap();
                model.entry(k.to_vec()).or_default().push(i);
            }
            db.put(&[b'u', i], &[i]).unwrap();
            model.insert(vec![b'u', i], vec![i]);
            if i < 70 {
                db.flush().unwrap();
            }
        }
        db.drain().unwrap();
        assert!(db.stats().2 >= 70, "{:?}", db.stats());
        let mut got = BTreeMap::new();
        db.scan(b"", b"\xff", |k, v| -> Result<bool> {
            got.insert(k.to_vec(), v.to_vec());
            Ok(true)
        })
        .unwrap();
        assert_eq!(got, model);
        for (k, v) in &model {
            let mut out = Vec::new();
            assert!(db.get(k, &mut out).unwrap());
            assert_eq!(&out, v);
            let mut out = Vec::new();
            assert!(db.get_merged(k, &mut out).unwrap());
            assert_eq!(&out, v);
        }
    }

    /// A scan of exactly two sources (a sorted run under the write buffer) resolves every pair
    /// of operations on a key, keys in one source only, and keys that differ after the bytes
    /// the scan's bounds share only in their length; it stops when asked to.
    #[test]
    fn scans_of_two_sources_resolve_every_pair_of_operations() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
        // 0: nothing, 1: put, 2: merge, 3: delete.
        let apply =
            |db: &mut Db, model: &mut BTreeMap<Vec<u8>, Vec<u8>>, key: &[u8], op, v| match op {
                1 => {
                    db.put(key, &[v]).unwrap();
                    model.insert(key.to_vec(), vec![v]);
                }
                2 => {
                    db.merge(key, &[v]).unwrap();
                    model.entry(key.to_vec()).or_default().push(v);
                }
                3 => {
                    db.delete(key).unwrap();
                    model.remove(key);
                }
                _ => {}
            };
        // A short key and a longer one that starts with it, per pair of operations.
        let keys = |older: u8, newer: u8| {
            let short = vec![b'p', b'q', older * 4 + newer];
            [[&short[..], &[0]].concat(), short]
        };
        for older in 0..4u8 {
            for newer in 0..4u8 {
                for k in keys(older, newer) {
                    apply(&mut db, &mut model, &k, older, 10 + older);
                }
            }
        }
        db.flush().unwrap();
        for older in 0..4u8 {
            for newer in 0..4u8 {
                for k in keys(older, newer) {
                    apply(&mut db, &mut model, &k, newer, 20 + newer);
                }
            }
        }
        db.put(b"pr", b"outside").unwrap();
        assert_eq!(db.stats().2, 1, "one sorted run under the write buffer");
        let want: Vec<(Vec<u8>, Vec<u8>)> = model
            .range(b"pq".to_vec()..b"pr".to_vec())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(want.len() > 12, "{want:?}");
        let mut got = Vec::new();
        db.scan_prefix(b"pq", |k, v| -> Result<bool> {
            got.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(got, want);
        let mut got = Vec::new();
        db.scan(b"pq", b"pr", |k, v| -> Result<bool> {
            got.push((k.to_vec(), v.to_vec()));
            Ok(got.len() < 5)
        })
        .unwrap();
        assert_eq!(got, want[..5]);
    }

    /// A prefix scan ends right after the prefix's keys whether the prefix ends in 0xff bytes
    /// (its end is then shorter than the prefix) and whether it is short (the end is built on
    /// the stack) or long (on the heap), with keys in the write buffer and in sorted runs.
    #[test]
    fn prefix_scans_end_after_the_prefix_at_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        let mut long = vec![7u8; 98];
        long.extend([0xff, 0xff]);
        let prefixes = [vec![1u8, 0xff, 0xff], vec![1u8, 0xfe], long.clone()];
        let mut keys = Vec::new();
        for p in &prefixes {
            // The prefix's neighbours: the keys just past it and the last key before it.
            let mut next = p.clone();
            while next.last() == Some(&0xff) {
                next.pop();
            }
            if let Some(l) = next.last_mut() {
                *l += 1;
            }
            let mut before = p.clone();
            if let Some(l) = before.last_mut() {
                *l -= 1;
            }
            for tail in [&[][..], &[0][..], &[0xff][..], &[0xff, 0xff, 3][..]] {
                for base in [p, &next, &before] {
                    let mut k = base.clone();
                    k.extend_from_slice(tail);
                    keys.push(k);
                }
            }
        }
        for (i, k) in keys.iter().enumerate() {
            db.put(k, &[i as u8]).unwrap();
            if i % 5 == 0 {
                db.flush().unwrap();
            }
        }
        for p in &prefixes {
            let mut got = Vec::new();
            db.scan_prefix(p, |k, _| -> Result<bool> {
                got.push(k.to_vec());
                Ok(true)
            })
            .unwrap();
            let mut want: Vec<Vec<u8>> =
                keys.iter().filter(|k| k.starts_with(p)).cloned().collect();
            want.sort();
            want.dedup();
            assert_eq!(got, want, "prefix {p:?}");
            assert!(!got.is_empty());
        }
    }

    /// A prefix of 0xff bytes has no key above all keys that start with it: its scan reaches
    /// every such key however long (it used to end at `prefix + 0xff`).
    #[test]
    fn prefix_scans_of_0xff_bytes_reach_every_longer_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        let keys: [&[u8]; 6] = [
            b"\xfe\xff",
            b"\xff",
            b"\xff\x00",
            b"\xff\xff",
            b"\xff\xff\x01",
            b"\xff\xff\xff\xff",
        ];
        for (i, k) in keys.iter().enumerate() {
            db.put(k, &[i as u8]).unwrap();
            if i == 2 {
                db.flush().unwrap();
            }
        }
        for (prefix, want) in [
            (&b"\xff"[..], 5),
            (&b"\xff\xff"[..], 3),
            (&b"\xff\xff\xff"[..], 1),
        ] {
            let mut got = Vec::new();
            db.scan_prefix(prefix, |k, _| -> Result<bool> {
                got.push(k.to_vec());
                Ok(true)
            })
            .unwrap();
            assert_eq!(got.len(), want, "prefix {prefix:?}: {got:?}");
            assert!(got.iter().all(|k| k.starts_with(prefix)));
            assert!(got.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
