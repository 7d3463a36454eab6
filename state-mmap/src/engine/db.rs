//! Opening a [`Db`], point reads and writes, and its counters.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use crate::environment::{EnvOptions, MmapEnvironment};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::memtable::{Memtable, Op, OpKind, Recycler};
use crate::run::{Block, Probe, RunFile};

use super::budget::write_buffer_bytes;
use super::files::parse_run_name;
use super::jobs::WorkerCtx;
use super::{run_file_name, CompactionFilter, Db, EngineOptions};

pub(super) fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// The merge operands one [`Db::get`] met, newest first: the first few without allocating.
#[derive(Default)]
pub(super) struct Operands<'a> {
    few: [&'a [u8]; 6],
    n: usize,
    more: Vec<&'a [u8]>,
}

impl<'a> Operands<'a> {
    #[inline]
    fn push(&mut self, op: &'a [u8]) {
        match self.few.get_mut(self.n) {
            Some(slot) => *slot = op,
            None => self.more.push(op),
        }
        self.n += 1;
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Appends the operands to `out`, oldest first (the order they were written in).
    #[inline]
    fn append_oldest_first(&self, out: &mut Vec<u8>) {
        for op in self.more.iter().rev() {
            out.extend_from_slice(op);
        }
        for op in self.few[..self.n.min(self.few.len())].iter().rev() {
            out.extend_from_slice(op);
        }
    }
}

impl Db {
    /// Opens (or creates) the store in `dir`: reads the manifest, maps its files, deletes files
    /// the manifest does not name (left by a crash during a flush or compaction). The engine
    /// gets an environment of its own with [`EngineOptions::memory_budget`] and the default
    /// threads (see [`Db::open_in`] to share one).
    pub fn open(dir: impl AsRef<Path>, opts: EngineOptions) -> Result<Db> {
        let env = MmapEnvironment::new(EnvOptions {
            memory_budget: opts.memory_budget,
            ..EnvOptions::default()
        })?;
        Db::open_in(dir, opts, &env)
    }

    /// [`Db::open`] in `env`: the engine's budget is its share of the environment's, and its
    /// flushes, compactions and releases run on the environment's threads.
    pub fn open_in(
        dir: impl AsRef<Path>,
        opts: EngineOptions,
        env: &MmapEnvironment,
    ) -> Result<Db> {
        let dir = dir.as_ref().to_path_buf();
        if opts.max_sorted_runs < 2 {
            return Err(Error::Config {
                reason: "max_sorted_runs must be at least 2".into(),
            });
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating the directory", &dir, e))?;
        let manifest = Manifest::load(&dir)?.unwrap_or_default();
        let live: HashSet<u64> = manifest.runs.iter().flatten().map(|f| f.number).collect();
        let mut max_seen = 0u64;
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io("listing the directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing the directory", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(n) = parse_run_name(&name) {
                max_seen = max_seen.max(n + 1);
                if !live.contains(&n) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let mut runs = Vec::new();
        for r in &manifest.runs {
            let mut files = Vec::new();
            for f in r {
                let path = dir.join(run_file_name(f.number));
                files.push(Arc::new(
                    RunFile::open(
                        &path,
                        f.number,
                        opts.verify_on_open,
                        opts.verify_blocks_on_read,
                    )?
                    .with_origin(f.name.clone(), f.clip.clone()),
                ));
            }
            runs.push(Arc::new(files));
        }
        let next_file = Arc::new(AtomicU64::new(manifest.next_file.max(max_seen).max(1)));
        let db_id = match manifest.db_id {
            0 => random_id(),
            id => id,
        };
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let prefix = opts.prefix_extractor.clone();
        let index_bytes = runs
            .iter()
            .flat_map(|r| r.iter())
            .map(|f| f.memory_bytes())
            .sum();
        let env_key = env.register();
        env.set_charged(env_key, index_bytes);
        let env_generation = env.generation();
        let share = index_bytes + env.memory_share();
        let buffer = write_buffer_bytes(share, index_bytes, env.budget_per_engine());
        let (release, unmap, manifest_tx) = env.service_channels();
        let ctx = Arc::new(WorkerCtx {
            dir: dir.clone(),
            db_id,
            next_file: Arc::clone(&next_file),
            opts: opts.clone(),
            boundary: None,
        });
        let recycler = Arc::new(Recycler::default());
        Ok(Db {
            dir,
            db_id,
            opts,
            mem: Arc::new(Memtable::recycled(prefix, buffer, &recycler)),
            recycler,
            imm: Vec::new(),
            runs,
            next_file,
            user_meta: manifest.user_meta,
            env: env.clone(),
            env_key,
            env_generation,
            share,
            ctx,
            done: done_rx,
            done_tx,
            release,
            unmap,
            manifest: manifest_tx,
            manifest_failed: Arc::new(OnceLock::new()),
            busy: Vec::new(),
            compacting: 0,
            reserved: 0,
            filter: None,
            keep: None,
            failed: None,
            flushes: 0,
            compactions: 0,
            flushed_bytes: 0,
            compacted_bytes: 0,
            stalls: (0, std::time::Duration::ZERO),
            buffer_bytes: buffer,
        })
    }

    /// Sets a function that says whether an output file may be cut between two keys (the
    /// backend cuts only between key groups); waits for the running background work first.
    pub fn set_file_boundary(
        &mut self,
        boundary: Arc<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>,
    ) -> Result<()> {
        self.drain()?;
        let mut ctx = WorkerCtx::clone(&self.ctx);
        ctx.boundary = Some(boundary);
        self.ctx = Arc::new(ctx);
        self.check()
    }

    /// Sets the compaction filter (e.g. TTL cleanup).
    pub fn set_compaction_filter(&mut self, filter: Option<Arc<dyn CompactionFilter>>) {
        self.filter = filter;
    }

    /// Compaction drops keys outside `[start, end)` (state of key groups this owner gave up).
    pub fn set_keep_range(&mut self, range: Option<(Vec<u8>, Vec<u8>)>) {
        self.keep = range;
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The owner's metadata stored in the manifest.
    pub fn user_meta(&self) -> &[u8] {
        &self.user_meta
    }

    /// Sets the owner's metadata (written with the next manifest update).
    pub fn set_user_meta(&mut self, meta: Vec<u8>) {
        self.user_meta = meta;
    }

    pub(super) fn check(&self) -> Result<()> {
        match (&self.failed, self.manifest_failed.get()) {
            (Some(r), _) => Err(Error::Worker { reason: r.clone() }),
            (None, Some(r)) => Err(Error::Worker {
                reason: format!("writing the manifest: {r}"),
            }),
            (None, None) => Ok(()),
        }
    }

    /// The resolved value of `key`, appended to `out`; false when absent. For keys usually
    /// written whole ([`Db::put`]): of the sorted runs whose filters pass, one is searched at
    /// a time, newest first (an older version of the key is not looked for once a newer one
    /// is found).
    // Not inlined into callers: inlined, its closures were left out of line (5% more
    // instructions per list get).
    #[inline(never)]
    pub fn get(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.get_located(key, out, 1)
    }

    /// [`Db::get`] for keys usually written as merge operands ([`Db::merge`]): the blocks of up
    /// to four runs whose filters pass are located before any is searched, so their memory
    /// loads overlap (an appended list is in two runs or more).
    #[inline(never)]
    pub fn get_merged(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.get_located(key, out, 4)
    }

    /// [`Db::get`], locating the blocks of up to `ahead` (at most 4) candidate runs at once.
    #[inline(always)]
    fn get_located(&self, key: &[u8], out: &mut Vec<u8>, ahead: usize) -> Result<bool> {
        // Merge operands seen so far, newest first.
        let mut ops = Operands::default();
        let finish = |base: Option<&[u8]>, ops: &Operands, out: &mut Vec<u8>| {
            if let Some(b) = base {
                out.extend_from_slice(b);
            }
            ops.append_oldest_first(out);
        };
        let hash = crate::run::key_hash(key);
        let probe = Probe::new(key);
        // Start loading every run's bloom-filter line (a miss each, in a mapped page) before
        // the write buffers are searched (misses of their own), so the two overlap. With one
        // run (everything compacted), its block is located now too (the block index is in
        // memory; the block's lines start loading): a key found there no longer waits for its
        // filter line and its block one after the other. Not with more runs: a key's newest
        // version is often in a newer run, and the early work was for nothing (value gets
        // after updates 15% slower when the oldest of several runs was located early).
        let mut files = [0u32; 64];
        // The filter lines of the first runs (the rest are looked up again).
        let mut lines: [Option<&[u8; 64]>; 16] = [None; 16];
        let oldest = if self.runs.len() == 1 { 0 } else { usize::MAX };
        let mut early: Option<Block<'_>> = None;
        for (i, r) in self.runs.iter().enumerate().take(64) {
            let fi = r.partition_point(|f| f.before(&probe));
            files[i] = fi as u32;
            if let Some(f) = r.get(fi) {
                let line = f.prefetch_filter(hash);
                if let Some(l) = lines.get_mut(i) {
                    *l = line;
                }
                if i == oldest {
                    early = f.locate(&probe)?;
                }
            }
        }
        for m in std::iter::once(&self.mem).chain(self.imm.iter()) {
            match m.get(key, hash) {
                Some(Op::Put(v)) => {
                    finish(Some(&v[..]), &ops, out);
                    return Ok(true);
                }
                Some(Op::Delete) => {
                    finish(None, &ops, out);
                    return Ok(!ops.is_empty());
                }
                Some(Op::Merge(v)) => ops.push(&v[..]),
                None => {}
            }
        }
        // First every run's bloom filter, in a loop of independent loads so their cache misses
        // overlap (a probe is one cache line of a mapped page, usually a miss); then only the
        // runs that may hold the key are searched, newest first.
        let mut maybe = 0u64;
        for (i, r) in self.runs.iter().enumerate().take(64) {
            let fi = files[i] as usize;
            // `fi` is the first file whose last key is not below the key.
            if let Some(f) = r.get(fi) {
                let passes = match lines.get(i) {
                    Some(&line) => f.may_contain_at(line, &probe, hash),
                    None => f.may_contain_located(&probe, hash),
                };
                if passes {
                    maybe |= 1 << i;
                }
            }
        }
        // The blocks of the first `ahead` runs that may hold the key, located before any is
        // searched: their fingerprints load together (a list with appended elements is in
        // two runs or more). Runs after those are located when they are searched.
        let mut blocks: [Option<Block<'_>>; 4] = [None; 4];
        let located = ahead.min(blocks.len());
        let mut left = maybe;
        for b in blocks.iter_mut().take(located) {
            if left == 0 {
                break;
            }
            let i = left.trailing_zeros() as usize;
            left &= left - 1;
            if i == oldest {
                *b = early;
            } else if let Some(f) = self.runs.get(i).and_then(|r| r.get(files[i] as usize)) {
                *b = f.locate(&probe)?;
            }
        }
        // With blocks in two runs or more, each block's likely entry starts loading before any
        // is read (each is a miss after its fingerprints: otherwise one after the other).
        if blocks.get(1).is_some_and(Option::is_some) {
            for b in blocks.iter().flatten() {
                b.prefetch_match(hash);
            }
        }
        let mut nth = 0usize;
        for (i, r) in self.runs.iter().enumerate() {
            let f = if i < 64 {
                if maybe & (1 << i) == 0 {
                    continue;
                }
                nth += 1;
                r.get(files[i] as usize)
            } else {
                r.get(r.partition_point(|f| f.before(&probe)))
            };
            let Some(f) = f else { continue };
            let found = match blocks
                .get(nth.wrapping_sub(1))
                .filter(|_| i < 64 && nth <= located)
            {
                Some(Some(b)) => b.find(probe.key, hash, f)?,
                Some(None) => None,
                None if i == oldest => match early {
                    Some(b) => b.find(probe.key, hash, f)?,
                    None => None,
                },
                None => f.get_unfiltered(&probe, hash)?,
            };
            if let Some(e) = found {
                match e.kind {
                    OpKind::Put => {
                        finish(Some(e.value), &ops, out);
                        return Ok(true);
                    }
                    OpKind::Delete => {
                        finish(None, &ops, out);
                        return Ok(!ops.is_empty());
                    }
                    OpKind::Merge => ops.push(e.value),
                }
            }
        }
        finish(None, &ops, out);
        Ok(!ops.is_empty())
    }

    /// Starts reading, in the background, the data block that a [`Db::get`] of `key` is
    /// most likely to need from the sorted runs: the block of the newest run whose filter
    /// passes (the key's newest version, unless the filter was wrong), unless a write buffer
    /// holds the key. Waits for nothing and reads nothing itself: a batch of gets calls this
    /// for every key first, so the device reads their blocks together (at queue depth above
    /// one, where a disk does several times the random reads per second it does one read at
    /// a time), then gets each. Costs a system call per key whose block it asks for, even
    /// when that block is cached; for stores whose data does not fit the page cache.
    pub fn prefetch(&self, key: &[u8]) {
        let hash = crate::run::key_hash(key);
        if std::iter::once(&self.mem)
            .chain(self.imm.iter())
            .any(|m| m.get(key, hash).is_some())
        {
            return;
        }
        let probe = Probe::new(key);
        for r in &self.runs {
            let fi = r.partition_point(|f| f.before(&probe));
            if let Some(f) = r.get(fi) {
                if f.may_contain_located(&probe, hash) {
                    f.will_need_block(&probe);
                    return;
                }
            }
        }
    }

    /// Sets `key` to `value`. Like every write, refused once a background flush, compaction or
    /// manifest write has failed (the engine must be reopened).
    #[inline]
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.check()?;
        Arc::make_mut(&mut self.mem).put(key, value);
        self.after_write()
    }

    /// Appends `operand` to the value of `key` (no read).
    #[inline]
    pub fn merge(&mut self, key: &[u8], operand: &[u8]) -> Result<()> {
        self.check()?;
        Arc::make_mut(&mut self.mem).merge(key, operand);
        self.after_write()
    }

    /// Deletes `key` (writes a tombstone).
    #[inline]
    pub fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.check()?;
        Arc::make_mut(&mut self.mem).delete(key);
        self.after_write()
    }

    #[inline]
    fn after_write(&mut self) -> Result<()> {
        // An engine opened or closed in the environment: the budget share changed.
        if self.env.generation() != self.env_generation {
            self.update_buffer_bytes();
        }
        if self.mem.bytes() >= self.buffer_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Counters: (flushes installed, compactions installed, sorted runs, write buffer bytes).
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        (
            self.flushes,
            self.compactions,
            self.runs.len(),
            self.mem.bytes(),
        )
    }

    /// Bytes of sorted-run files written so far: (by flushes, by compactions), counting
    /// installed ones. Their sum over the flushed bytes is the write amplification.
    pub fn bytes_written(&self) -> (u64, u64) {
        (self.flushed_bytes, self.compacted_bytes)
    }

    /// How often a full write buffer waited for background work before it could be replaced
    /// (the previous buffer's flush still running, or too many sorted runs while a compaction
    /// runs), and how long those waits took in all: the writes' stalls.
    pub fn write_stalls(&self) -> (u64, std::time::Duration) {
        self.stalls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::small_with_runs;

    /// A get meets more merge operands (one per sorted run and write buffer) than it keeps
    /// without allocating, over a base and over none: all are concatenated oldest first.
    #[test]
    fn get_concatenates_many_operands_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small_with_runs(64)).unwrap();
        db.put(b"based", b"base-").unwrap();
        db.flush().unwrap();
        let mut want = b"base-".to_vec();
        let mut bare = Vec::new();
        for i in 0..12u8 {
            db.merge(b"based", &[b'a' + i]).unwrap();
            db.merge(b"bare", &[b'a' + i]).unwrap();
            want.push(b'a' + i);
            bare.push(b'a' + i);
            if i < 11 {
                db.flush().unwrap();
            }
            db.drain().unwrap();
            for (key, want) in [(&b"based"[..], &want), (&b"bare"[..], &bare)] {
                let mut out = b"x".to_vec();
                assert!(db.get(key, &mut out).unwrap());
                assert_eq!(&out[1..], &want[..], "after {i} merges");
            }
        }
        assert!(db.stats().2 >= 10, "{:?}", db.stats());
        let mut out = Vec::new();
        assert!(!db.get(b"absent", &mut out).unwrap());
        assert!(out.is_empty());
    }
}
