//! Cursors over memtables and sorted runs, and the merging iterator that resolves them.

use std::collections::VecDeque;
use std::ops::Bound;
use std::sync::Arc;

use crate::error::Result;
use crate::memtable::{Memtable, Op, OpKind};
use crate::run::{BlockPos, RunFile};

/// A forward cursor over one source, positioned on an entry or exhausted.
pub(crate) trait Cursor: Send {
    /// The current entry.
    fn current(&self) -> Option<(OpKind, &[u8], &[u8])>;
    /// Moves to the next entry.
    fn advance(&mut self) -> Result<()>;
}

/// Entries of a shared memtable in `[start, end)`, fetched in batches.
pub(crate) struct MemCursor {
    mem: Arc<Memtable>,
    buf: VecDeque<(Vec<u8>, Op)>,
    end: Option<Vec<u8>>,
    last: Option<Vec<u8>>,
    done: bool,
}

const MEM_BATCH: usize = 64;

impl MemCursor {
    pub(crate) fn new(mem: Arc<Memtable>, start: &[u8], end: Option<&[u8]>) -> MemCursor {
        let mut c = MemCursor {
            mem,
            buf: VecDeque::new(),
            end: end.map(<[u8]>::to_vec),
            last: None,
            done: false,
        };
        c.fill(Bound::Included(start.to_vec()));
        c
    }

    fn fill(&mut self, from: Bound<Vec<u8>>) {
        let end = match &self.end {
            Some(e) => Bound::Excluded(e.clone()),
            None => Bound::Unbounded,
        };
        if let (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e)) = (&from, &end) {
            if s >= e {
                self.done = true;
                return;
            }
        }
        let mut n = 0;
        let from = match &from {
            Bound::Included(s) => Bound::Included(&s[..]),
            Bound::Excluded(s) => Bound::Excluded(&s[..]),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match &end {
            Bound::Excluded(e) => Bound::Excluded(&e[..]),
            _ => Bound::Unbounded,
        };
        for (k, v) in self.mem.range(from, end).take(MEM_BATCH) {
            self.buf.push_back((k.to_vec(), v.clone()));
            n += 1;
        }
        if n < MEM_BATCH {
            self.done = true;
        }
    }
}

impl Cursor for MemCursor {
    fn current(&self) -> Option<(OpKind, &[u8], &[u8])> {
        self.buf.front().map(|(k, v)| (v.kind(), &k[..], v.value()))
    }

    fn advance(&mut self) -> Result<()> {
        if let Some((k, _)) = self.buf.pop_front() {
            self.last = Some(k);
        }
        if self.buf.is_empty() && !self.done {
            if let Some(last) = self.last.take() {
                self.fill(Bound::Excluded(last));
            }
        }
        Ok(())
    }
}

/// Entries of a sorted run (non-overlapping files in key order) in `[start, end)`.
pub(crate) struct RunCursor {
    files: Arc<Vec<Arc<RunFile>>>,
    file: usize,
    block: usize,
    pos: Option<BlockPos>,
    entry: usize,
    end: Option<Vec<u8>>,
    /// The current entry: kind and `[key start, value start, value end)` in the file.
    cur: Option<(OpKind, usize, usize, usize)>,
}

impl RunCursor {
    pub(crate) fn new(
        files: Arc<Vec<Arc<RunFile>>>,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<RunCursor> {
        let file = files.partition_point(|f| f.last_key() < start);
        let mut c = RunCursor {
            files,
            file,
            block: 0,
            pos: None,
            entry: 0,
            end: end.map(<[u8]>::to_vec),
            cur: None,
        };
        if let Some(f) = c.files.get(c.file).cloned() {
            if let Some(b) = f.find_block(start)? {
                let pos = f.block_pos(b)?;
                c.block = b;
                c.pos = Some(pos);
                c.entry = f.block_at(pos).lower_bound(start, &f)?;
                c.settle()?;
            }
        }
        Ok(c)
    }

    /// Moves past exhausted blocks and files and hidden (clipped) entries; checks the end bound;
    /// caches the current entry.
    fn settle(&mut self) -> Result<()> {
        self.cur = None;
        loop {
            let (Some(f), Some(pos)) = (self.files.get(self.file), self.pos) else {
                return Ok(());
            };
            let blk = f.block_at(pos);
            if self.entry >= blk.len() {
                self.entry = 0;
                self.block += 1;
                if self.block >= f.block_count() {
                    self.file += 1;
                    self.block = 0;
                    self.pos = match self.files.get(self.file) {
                        Some(nf) => Some(nf.block_pos(0)?),
                        None => None,
                    };
                } else {
                    self.pos = Some(f.block_pos(self.block)?);
                }
                continue;
            }
            let e = blk.entry(self.entry, f)?;
            if self.end.as_ref().is_some_and(|end| e.key >= &end[..]) {
                self.pos = None;
                return Ok(());
            }
            // Entries outside a restored file's visible range are skipped.
            if !f.visible(e.key) {
                self.entry += 1;
                continue;
            }
            let ks = f.offset_of(e.key);
            let vs = ks + e.key.len();
            self.cur = Some((e.kind, ks, vs, vs + e.value.len()));
            return Ok(());
        }
    }
}

impl Cursor for RunCursor {
    #[inline]
    fn current(&self) -> Option<(OpKind, &[u8], &[u8])> {
        let (kind, ks, vs, ve) = self.cur?;
        let f = self.files.get(self.file)?;
        Some((kind, f.slice(ks, vs), f.slice(vs, ve)))
    }

    fn advance(&mut self) -> Result<()> {
        if self.cur.is_some() {
            self.entry += 1;
            self.settle()?;
        }
        Ok(())
    }
}

/// How the merging iterator resolves what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolve {
    /// Reads: tombstones hide keys, merge operands without a base are the value.
    Read,
    /// Compaction of the oldest data (nothing older exists): like `Read`.
    Bottommost,
    /// Compaction above older data: tombstones and unresolved merges are kept.
    Partial,
}

/// Merges cursors (newest first) into one resolved, ordered stream.
pub(crate) struct MergeIter {
    sources: Vec<Box<dyn Cursor>>,
    resolve: Resolve,
    key: Vec<u8>,
    value: Vec<u8>,
    kind: OpKind,
    ops: Vec<Vec<u8>>,
}

impl MergeIter {
    pub(crate) fn new(sources: Vec<Box<dyn Cursor>>, resolve: Resolve) -> MergeIter {
        MergeIter {
            sources,
            resolve,
            key: Vec::new(),
            value: Vec::new(),
            kind: OpKind::Put,
            ops: Vec::new(),
        }
    }

    /// The next resolved entry: `(kind, key, value)`; kinds other than `Put` only with
    /// [`Resolve::Partial`].
    #[allow(clippy::should_implement_trait)]
    pub(crate) fn next(&mut self) -> Result<Option<(OpKind, &[u8], &[u8])>> {
        loop {
            let mut min: Option<usize> = None;
            for (i, s) in self.sources.iter().enumerate() {
                if let Some((_, k, _)) = s.current() {
                    match min {
                        Some(m) => {
                            if let Some((_, mk, _)) = self.sources[m].current() {
                                if k < mk {
                                    min = Some(i);
                                }
                            }
                        }
                        None => min = Some(i),
                    }
                }
            }
            let Some(m) = min else { return Ok(None) };
            self.key.clear();
            if let Some((_, k, _)) = self.sources[m].current() {
                self.key.extend_from_slice(k);
            }
            self.ops.clear();
            let mut base: Option<OpKind> = None;
            self.value.clear();
            for i in m..self.sources.len() {
                let s = &mut self.sources[i];
                let Some((kind, k, v)) = s.current() else {
                    continue;
                };
                if k != &self.key[..] {
                    continue;
                }
                if base.is_none() {
                    match kind {
                        OpKind::Put => {
                            base = Some(OpKind::Put);
                            self.value.extend_from_slice(v);
                        }
                        OpKind::Delete => base = Some(OpKind::Delete),
                        OpKind::Merge => self.ops.push(v.to_vec()),
                    }
                }
                s.advance()?;
            }
            for op in self.ops.iter().rev() {
                self.value.extend_from_slice(op);
            }
            self.kind = match base {
                Some(OpKind::Put) => OpKind::Put,
                Some(OpKind::Delete) if self.ops.is_empty() => OpKind::Delete,
                Some(_) => OpKind::Put,
                None => OpKind::Merge,
            };
            if self.resolve != Resolve::Partial {
                match self.kind {
                    OpKind::Delete => continue,
                    OpKind::Merge => self.kind = OpKind::Put,
                    OpKind::Put => {}
                }
            }
            return Ok(Some((self.kind, &self.key, &self.value)));
        }
    }
}
