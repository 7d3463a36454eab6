//! The log-structured merge engine: a memtable with a byte budget, immutable memtables flushed
//! to sorted runs in the background, size-tiered compaction in the background, and a manifest
//! naming the live files. The background work runs on the threads of the engine's
//! [`MmapEnvironment`], shared with every other engine of that environment (finished work comes
//! back on a crossbeam channel and is installed by the engine's own thread).
//!
//! There is no write-ahead log (Flink runs RocksDB without one too): what was not flushed is
//! lost by a crash, and durability comes from [`Db::flush`] / checkpoints.

use std::cmp::Ordering as Cmp;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_channel::{Receiver, Sender};

use crate::environment::{EnvOptions, Lane, MmapEnvironment};
use crate::error::{Error, Result};
use crate::iter::{Cursor, MemCursor, MergeIter, Resolve, RunCursor};
use crate::manifest::{sync_dir, FileEntry, Manifest};
use crate::memtable::{Memtable, Op, OpKind, PrefixEntries};
use crate::run::{prefix_hash, Block, PrefixExtractor, Probe, RunFile, RunWriter};

/// Options of the engine.
#[derive(Clone)]
pub struct EngineOptions {
    /// The memory budget for the engine's own memory: the in-memory block indexes of the
    /// sorted runs (32 bytes per data block of about 4 KiB) and the reservations of running
    /// compactions (their outputs' block indexes, at most the inputs', and a sixteenth of
    /// `target_file_bytes` for the file being written) first; of the rest, the active write
    /// buffer gets a third, one immutable write buffer waiting for its flush another third
    /// (writers wait while it is being flushed and the active one is full), and the rest is
    /// headroom for the allocator, small buffers and the last flushed write buffer while a
    /// thread of its own frees it (a flush waits for the one before it to be freed; a write
    /// buffer never gets less than a twelfth of the budget). Data pages, mapped indexes and bloom filters of sorted runs are
    /// mapped and belong to the OS page cache, outside the budget. Default 256 MiB.
    ///
    /// An engine opened in an [`MmapEnvironment`] ([`Db::open_in`]) ignores this: its budget is
    /// its share of the environment's ([`Db::memory_share`]). [`Db::open`] starts an
    /// environment of its own with this budget.
    pub memory_budget: usize,
    /// Compaction starts when this many sorted runs exist (bounds read amplification). Default 6.
    /// Runs each larger than all newer runs together are left out of such a merge (it would
    /// rewrite most of the data to remove one run), so up to about log2(data / write buffer)
    /// such runs may exist on top of this.
    pub max_sorted_runs: usize,
    /// Compaction output files are cut at key-group boundaries once this large. Default 64 MiB.
    pub target_file_bytes: u64,
    /// Check every data block's checksum when a file is opened (default true).
    pub verify_on_open: bool,
    /// Check a data block's checksum on every read of it (default false: files are verified at
    /// open, and pages then come from the OS page cache).
    pub verify_blocks_on_read: bool,
    /// Scan prefixes of keys, kept in write buffers and bloom filters for
    /// [`Db::scan_prefix`] (default none).
    pub prefix_extractor: Option<PrefixExtractor>,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("memory_budget", &self.memory_budget)
            .field("max_sorted_runs", &self.max_sorted_runs)
            .field("target_file_bytes", &self.target_file_bytes)
            .field("verify_on_open", &self.verify_on_open)
            .field("verify_blocks_on_read", &self.verify_blocks_on_read)
            .field("prefix_extractor", &self.prefix_extractor.is_some())
            .finish()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            memory_budget: 256 << 20,
            max_sorted_runs: 6,
            target_file_bytes: 64 << 20,
            verify_on_open: true,
            verify_blocks_on_read: false,
            prefix_extractor: None,
        }
    }
}

/// The write buffer size of an engine with budget `budget` when its block indexes (and
/// compaction reservations) take `index_bytes`.
fn write_buffer_bytes(budget: usize, index_bytes: usize) -> usize {
    (budget.saturating_sub(index_bytes) / 3)
        .max(budget / 12)
        .max(4096)
}

impl EngineOptions {
    const MAX_IMMUTABLE: usize = 1;

    /// Budget bytes a compaction of `inputs` holds until it is installed: the block indexes
    /// of its outputs (at most those of its inputs: the outputs hold the inputs' entries or
    /// fewer) and the buffers of the output file being written (write buffer, index, one
    /// bloom hash per entry: a sixteenth of [`EngineOptions::target_file_bytes`]).
    fn compaction_reserve(&self, inputs: &[SortedRun]) -> usize {
        let outputs: usize = inputs
            .iter()
            .flat_map(|r| r.iter())
            .map(|f| f.memory_bytes())
            .sum();
        let writer = usize::try_from(self.target_file_bytes / 16).unwrap_or(usize::MAX);
        outputs.saturating_add(writer)
    }
    /// Compactions of one engine queued or running at once: while one merges large old runs,
    /// another keeps the newest (small) runs merged, so their number stays bounded. (How many
    /// run at once over all engines is the environment's pool's limit.)
    const COMPACTION_THREADS: usize = 2;
    /// Writers wait for a compaction once this many sorted runs exist (the background cannot
    /// keep up, and every point read would probe them all).
    fn stall_runs(&self) -> usize {
        3 * self.max_sorted_runs
    }
}

/// What a compaction filter decides for one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterDecision {
    /// Keep the value as it is.
    Keep,
    /// Drop the entry.
    Remove,
    /// Replace the value with the bytes the filter wrote into its output buffer.
    Change,
}

/// Decides, during compaction, whether values survive (drops TTL-expired state).
pub trait CompactionFilter: Send + Sync {
    /// Judges the resolved value of `key`; for [`FilterDecision::Change`] writes the new value
    /// into `out` (empty on entry).
    fn filter(&self, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> FilterDecision;
}

/// A file handed to [`Db::ingest`].
#[derive(Clone, Debug)]
pub struct IngestFile {
    /// Where the file is now.
    pub path: PathBuf,
    /// Its checkpoint name (kept).
    pub name: String,
    /// Only keys in `[lo, hi)` are visible (`None`: all).
    pub clip: Option<(Vec<u8>, Vec<u8>)>,
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// One sorted run: non-overlapping files in key order.
pub type SortedRun = Arc<Vec<Arc<RunFile>>>;

enum Job {
    Flush {
        mem: Arc<Memtable>,
        number: u64,
    },
    Compact {
        inputs: Vec<SortedRun>,
        /// Budget bytes reserved for the compaction until it is installed.
        reserved: usize,
        bottommost: bool,
        filter: Option<Arc<dyn CompactionFilter>>,
        keep: Option<(Vec<u8>, Vec<u8>)>,
    },
}

enum Done {
    /// A background job panicked (the pool's thread goes on; the engine fails).
    Panicked(String),
    Flushed(Result<Option<Arc<RunFile>>>),
    Compacted {
        inputs: Vec<SortedRun>,
        reserved: usize,
        result: Result<Vec<Arc<RunFile>>>,
    },
}

#[derive(Clone)]
struct WorkerCtx {
    dir: PathBuf,
    db_id: u64,
    next_file: Arc<AtomicU64>,
    opts: EngineOptions,
    boundary: Option<Arc<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>>,
}

/// The file name of sorted run `number`.
pub fn run_file_name(number: u64) -> String {
    format!("{number:012}.run")
}

/// The checkpoint name of file `number` of store `db_id`.
fn shared_name(db_id: u64, number: u64) -> String {
    format!("{db_id:016x}-{number:012}.run")
}

fn parse_run_name(name: &str) -> Option<u64> {
    name.strip_suffix(".run")?.parse().ok()
}

impl WorkerCtx {
    fn open_run(&self, path: &Path, number: u64) -> Result<Arc<RunFile>> {
        Ok(Arc::new(
            RunFile::open(
                path,
                number,
                false, // just written and fsynced by us
                self.opts.verify_blocks_on_read,
            )?
            .with_origin(shared_name(self.db_id, number), None),
        ))
    }

    fn flush(&self, mem: &Memtable, number: u64) -> Result<Option<Arc<RunFile>>> {
        let path = self.dir.join(run_file_name(number));
        let mut w = RunWriter::create(&path, self.opts.prefix_extractor.clone())?;
        // Entries in key order, each loaded into the cache a few entries ahead (its value
        // a few entries after it): the entries and values lie all over the heap.
        const AHEAD: usize = 8;
        let order = mem.positions_in_key_order();
        for (n, &i) in order.iter().enumerate() {
            if let Some(&j) = order.get(n + 2 * AHEAD) {
                mem.prefetch_entry(j, false);
            }
            if let Some(&j) = order.get(n + AHEAD) {
                mem.prefetch_entry(j, true);
            }
            if let Some((k, op)) = mem.entry_at(i) {
                w.add(k, op.kind(), op.value())?;
            }
        }
        match w.finish()? {
            Some(p) => {
                sync_dir(&self.dir)?;
                Ok(Some(self.open_run(&p, number)?))
            }
            None => Ok(None),
        }
    }

    fn compact(
        &self,
        inputs: &[SortedRun],
        bottommost: bool,
        filter: Option<&Arc<dyn CompactionFilter>>,
        keep: Option<&(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<Arc<RunFile>>> {
        let (start, end) = match keep {
            Some((s, e)) => (s.clone(), Some(e.clone())),
            None => (Vec::new(), None),
        };
        let mut sources: Vec<Box<dyn Cursor>> = Vec::new();
        for r in inputs {
            sources.push(Box::new(RunCursor::new(
                Arc::clone(r),
                &start,
                end.as_deref(),
            )?));
        }
        let resolve = if bottommost {
            Resolve::Bottommost
        } else {
            Resolve::Partial
        };
        let mut it = MergeIter::new(sources, resolve);
        let mut out = Vec::new();
        let mut writer: Option<(RunWriter, u64)> = None;
        let mut prev_key: Vec<u8> = Vec::new();
        let mut changed = Vec::new();
        while let Some((kind, key, value)) = it.next()? {
            let mut kind = kind;
            let mut value = value;
            if kind == OpKind::Put {
                if let Some(f) = filter {
                    changed.clear();
                    match f.filter(key, value, &mut changed) {
                        FilterDecision::Keep => {}
                        FilterDecision::Remove if bottommost => continue,
                        FilterDecision::Remove => {
                            kind = OpKind::Delete;
                            value = &[];
                        }
                        FilterDecision::Change => value = &changed,
                    }
                }
            }
            // Cut the output at a boundary the owner accepts (key groups) once it is large.
            if let Some((w, _)) = &writer {
                let cut = w.size() >= self.opts.target_file_bytes
                    && self.boundary.as_ref().is_none_or(|b| b(&prev_key, key));
                if cut {
                    if let Some((w, n)) = writer.take() {
                        if let Some(p) = w.finish()? {
                            out.push(self.open_run(&p, n)?);
                        }
                    }
                }
            }
            if writer.is_none() {
                let n = self.next_file.fetch_add(1, Ordering::SeqCst);
                writer = Some((
                    RunWriter::create(
                        &self.dir.join(run_file_name(n)),
                        self.opts.prefix_extractor.clone(),
                    )?,
                    n,
                ));
            }
            if let Some((w, _)) = writer.as_mut() {
                w.add(key, kind, value)?;
            }
            prev_key.clear();
            prev_key.extend_from_slice(key);
        }
        if let Some((w, n)) = writer.take() {
            if let Some(p) = w.finish()? {
                out.push(self.open_run(&p, n)?);
            }
        }
        sync_dir(&self.dir)?;
        Ok(out)
    }
}

/// The number of leading bytes `a` and `b` share: every key between them has those bytes.
fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The resolved entries of two sources, `entries` holding the newer source's entries (source
/// 0) and then the older one's (source 1), each in key order and within `[start, end)`, passed
/// to `f` in key order until it returns false. Keys are compared after the bytes that `start`
/// and `end` share (every key between them shares them): a map's entries differ only in their
/// last few bytes.
fn merge_two<E: From<Error>>(
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

/// Which of the newest runs to merge, given the sizes of the runs no compaction is merging
/// (newest first): `Some(k)` merges runs `0..k`. Once there are `max_runs / 2` runs or more,
/// the newest runs while each next (older) run is at most twice the ones taken so far
/// together: runs of similar sizes (55, 93 and 113 MB after a bulk load) do not stay apart
/// for every point read to probe, at the price of more rewrites (a merge grows a run by half
/// or more, so a byte is rewritten up to about log1.5(data / write buffer) times; with the
/// factor one it was log2); with
/// `max_runs` of them, all but the oldest runs that are each larger than all newer runs
/// together: merging those would rewrite most of the data (at 50M keys, a 6 GB bottom run
/// every few flushes) to remove one run; they join a merge once the newer runs have grown.
fn pick_compaction(sizes: &[u64], max_runs: usize) -> Option<usize> {
    let n = sizes.len();
    if n < (max_runs / 2).max(2) {
        return None;
    }
    let mut take = 1;
    let mut sum = sizes[0];
    while take < n && sizes[take] <= 2 * sum {
        sum += sizes[take];
        take += 1;
    }
    if take >= 2 {
        return Some(take);
    }
    if n < max_runs {
        return None;
    }
    let mut all = n;
    while all > 2 && sizes[all - 1] > sizes[..all - 1].iter().sum::<u64>() {
        all -= 1;
    }
    Some(all)
}

/// What the engine hands to the release threads of its environment (write buffers to one,
/// replaced runs to another, manifests to a third).
pub(crate) enum Garbage {
    /// A flushed write buffer: millions of small allocations, freed off the writer's path.
    Mem(Arc<Memtable>),
    /// The runs a compaction replaced (and its inputs): the last reference to a file unmaps
    /// and deletes it, which takes milliseconds for a large file (page tables, page cache)
    /// that the writer, or a reader installing the compaction, would otherwise wait for.
    Runs(Vec<SortedRun>, Vec<SortedRun>),
    /// The runs a compaction replaced and its inputs, to the manifest thread: retired after
    /// the manifests sent before (marked obsolete unless the engine's manifest failed).
    Retire(Vec<SortedRun>, Vec<SortedRun>, Arc<OnceLock<String>>),
    /// A manifest to make durable in a directory (to the manifest thread); a failure is set
    /// in the engine's flag.
    Manifest(Box<Manifest>, PathBuf, Arc<OnceLock<String>>),
    /// Answered once everything sent before it is freed.
    Barrier(Sender<()>),
}

/// Frees what it is sent. After freeing a write buffer it hands free heap memory back to the
/// OS once nothing else is queued (see [`crate::mapped::release_free_memory`]): otherwise the
/// allocator keeps the holes of its millions of small allocations, and the process's resident
/// memory exceeds the budget. Not after freeing replaced runs: a trim walks the whole heap
/// under the allocator's lock and the pages it returns fault back in on reuse, which took
/// list gets (an allocation each) from 0.96M/s to 0.65M/s while compactions of earlier writes
/// were installed; a run's block index is one large allocation, reused by the next index.
pub(crate) fn release_loop(garbage: Receiver<Garbage>) {
    let free = |g: Garbage| match g {
        Garbage::Mem(mem) => {
            drop(mem);
            true
        }
        Garbage::Runs(old, inputs) | Garbage::Retire(old, inputs, _) => {
            drop((old, inputs));
            false
        }
        Garbage::Barrier(done) => {
            let _ = done.send(());
            false
        }
        // Only the manifest thread is sent manifests.
        Garbage::Manifest(..) => false,
    };
    while let Ok(g) = garbage.recv() {
        let mut trim = free(g);
        while let Ok(g) = garbage.try_recv() {
            trim |= free(g);
        }
        if trim {
            crate::mapped::release_free_memory();
        }
    }
}

/// Writes the manifests it is sent (of every engine of an environment), in order, off the
/// threads that install flushes and compactions (a read or write that installs one no longer waits for two fsyncs: 157 ms were
/// seen while compactions were writing). The runs a compaction replaced come after the
/// manifest that drops them: their files are marked obsolete (deleted once unmapped) only
/// once that manifest is durable, then go to the unmap thread. After a failed write nothing is
/// marked obsolete any more (the manifest on disk still names those files) and that engine
/// reports the failure.
pub(crate) fn manifest_loop(queue: Receiver<Garbage>, unmap: Sender<Garbage>) {
    while let Ok(g) = queue.recv() {
        match g {
            Garbage::Manifest(m, dir, failed) => {
                if failed.get().is_none() {
                    if let Err(e) = m.store(&dir) {
                        let _ = failed.set(e.to_string());
                    }
                }
            }
            Garbage::Retire(old, inputs, failed) => {
                retire(old, inputs, failed.get().is_none(), Some(&unmap));
            }
            Garbage::Runs(old, inputs) => drop((old, inputs)),
            Garbage::Barrier(done) => {
                let _ = done.send(());
            }
            Garbage::Mem(mem) => drop(mem),
        }
    }
}

/// Retires the runs a compaction replaced (and its inputs): their files are marked obsolete
/// (deleted once unmapped) when `obsolete`, then handed to the unmap thread, or dropped here
/// without one.
fn retire(
    old: Vec<SortedRun>,
    inputs: Vec<SortedRun>,
    obsolete: bool,
    unmap: Option<&Sender<Garbage>>,
) {
    if obsolete {
        for f in old.iter().flat_map(|r| r.iter()) {
            f.mark_obsolete();
        }
    }
    match unmap {
        Some(u) => drop(u.send(Garbage::Runs(old, inputs))),
        None => drop((old, inputs)),
    }
}

/// Waits until the thread behind `queue` has handled everything sent to it before (returns at
/// once if that thread is gone).
fn wait_for(queue: &Sender<Garbage>) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if queue.send(Garbage::Barrier(tx)).is_ok() {
        let _ = rx.recv();
    }
}

/// Runs a flush or compaction on a thread of the environment's pool.
fn run_job(ctx: &WorkerCtx, job: Job) -> Done {
    match job {
        Job::Flush { mem, number } => Done::Flushed(ctx.flush(&mem, number)),
        Job::Compact {
            inputs,
            reserved,
            bottommost,
            filter,
            keep,
        } => {
            let result = ctx.compact(&inputs, bottommost, filter.as_ref(), keep.as_ref());
            Done::Compacted {
                inputs,
                reserved,
                result,
            }
        }
    }
}

/// The merge operands one [`Db::get`] met, newest first: the first few without allocating.
#[derive(Default)]
struct Operands<'a> {
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

/// An embedded ordered key-value store of byte strings over memory-mapped sorted runs, with a
/// concatenating merge operator (list appends). Single writer (`&mut self`).
pub struct Db {
    dir: PathBuf,
    db_id: u64,
    opts: EngineOptions,
    mem: Arc<Memtable>,
    imm: Vec<Arc<Memtable>>,
    runs: Vec<SortedRun>,
    next_file: Arc<AtomicU64>,
    user_meta: Vec<u8>,
    /// The environment whose budget share and threads the engine uses.
    env: MmapEnvironment,
    /// This engine's key in the environment's pool.
    env_key: u64,
    /// The environment's generation the budget share was taken at.
    env_generation: u64,
    /// The budget share in use (of the environment's budget).
    share: usize,
    /// What a background job of this engine needs (directory, options, file boundary).
    ctx: Arc<WorkerCtx>,
    /// Finished background jobs, sent by the pool's threads.
    done: Receiver<Done>,
    done_tx: Sender<Done>,
    /// Flushed write buffers to free: a rendezvous channel, so a writer that flushes faster
    /// than buffers are freed waits instead of holding more buffers than the budget allows.
    release: Option<Sender<Garbage>>,
    /// Runs replaced by compactions, to unmap and delete: a thread of their own, since
    /// unmapping and deleting a large file can take most of a second, and write buffers must
    /// not wait behind that to be freed.
    unmap: Option<Sender<Garbage>>,
    /// Manifests to write, and replaced runs after them (see [`manifest_loop`]).
    manifest: Option<Sender<Garbage>>,
    /// Set by the manifest thread when a manifest could not be written.
    manifest_failed: Arc<OnceLock<String>>,
    /// The inputs of the running compactions.
    busy: Vec<SortedRun>,
    /// Compactions running.
    compacting: usize,
    /// Budget bytes the running compactions hold (their outputs' block indexes and writers).
    reserved: usize,
    filter: Option<Arc<dyn CompactionFilter>>,
    keep: Option<(Vec<u8>, Vec<u8>)>,
    failed: Option<String>,
    flushes: u64,
    compactions: u64,
    /// Bytes of the sorted-run files written by flushes and by compactions (installed ones).
    flushed_bytes: u64,
    compacted_bytes: u64,
    /// The write buffer size: the budget's share left by the runs' block indexes.
    buffer_bytes: usize,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("dir", &self.dir)
            .field("memtable_bytes", &self.mem.bytes())
            .field("immutable", &self.imm.len())
            .field("sorted_runs", &self.runs.len())
            .finish()
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
        let env_generation = env.generation();
        let share = env.memory_share();
        let buffer = write_buffer_bytes(share, index_bytes);
        let (release, unmap, manifest_tx) = env.service_channels();
        let ctx = Arc::new(WorkerCtx {
            dir: dir.clone(),
            db_id,
            next_file: Arc::clone(&next_file),
            opts: opts.clone(),
            boundary: None,
        });
        Ok(Db {
            dir,
            db_id,
            opts,
            mem: Arc::new(Memtable::new(prefix, buffer)),
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

    fn check(&self) -> Result<()> {
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
    /// what the [`EngineOptions::prefix_extractor`] returns for those keys: write buffers and
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

    /// Moves the write buffer to the immutable list and schedules its flush.
    fn rotate(&mut self) -> Result<()> {
        self.check()?;
        self.poll()?;
        if self.mem.is_empty() {
            return Ok(());
        }
        while self.imm.len() >= EngineOptions::MAX_IMMUTABLE
            || (self.runs.len() >= self.opts.stall_runs() && self.compacting > 0)
        {
            self.wait_one()?;
        }
        let fresh = Memtable::new(self.opts.prefix_extractor.clone(), self.buffer_bytes);
        let mem = std::mem::replace(&mut self.mem, Arc::new(fresh));
        self.imm.insert(0, Arc::clone(&mem));
        let number = self.next_file.fetch_add(1, Ordering::SeqCst);
        self.send(Job::Flush { mem, number })
    }

    /// Queues a flush or compaction on the environment's pool; its result comes back on
    /// `done` (a panic included, as [`Done::Panicked`]).
    fn send(&mut self, job: Job) -> Result<()> {
        let lane = match job {
            Job::Compact { .. } => Lane::Compaction,
            Job::Flush { .. } => Lane::Flush,
        };
        let (ctx, done) = (Arc::clone(&self.ctx), self.done_tx.clone());
        let task = Box::new(move || {
            let d = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(&ctx, job)))
                .unwrap_or_else(|p| {
                    let why = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Done::Panicked(format!("a background job panicked: {why}"))
                });
            let _ = done.send(d);
        });
        if !self.env.submit(self.env_key, lane, task) {
            self.failed = Some("the environment's worker pool is closed".into());
            return self.check();
        }
        Ok(())
    }

    /// Installs finished flushes and compactions without waiting (a compaction's output
    /// replaces its inputs only then, so readers that never write call this now and then).
    pub fn install_finished(&mut self) -> Result<()> {
        self.check()?;
        self.poll()
    }

    /// Installs finished background work without waiting.
    fn poll(&mut self) -> Result<()> {
        while let Ok(d) = self.done.try_recv() {
            self.install(d)?;
        }
        Ok(())
    }

    /// Waits for one finished background job and installs it. After a failure nothing may be
    /// coming (a failed flush leaves its buffer in `imm`): every waiting loop stops with the
    /// failure instead of waiting forever.
    fn wait_one(&mut self) -> Result<()> {
        self.check()?;
        match self.done.recv() {
            Ok(d) => self.install(d),
            Err(_) => {
                self.failed = Some("the worker thread stopped".into());
                self.check()
            }
        }
    }

    fn install(&mut self, d: Done) -> Result<()> {
        let r = self.install_inner(d);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn install_inner(&mut self, d: Done) -> Result<()> {
        match d {
            Done::Panicked(reason) => Err(Error::Worker { reason }),
            Done::Flushed(result) => {
                let file = result?;
                if let Some(mem) = self.imm.pop() {
                    // Freeing millions of small allocations takes a while: a thread of its own
                    // does it at once (not after the next flush, which would hold the memory);
                    // should it still be freeing the previous buffer, this waits for it.
                    if let Some(r) = &self.release {
                        let _ = r.send(Garbage::Mem(mem));
                    }
                }
                if let Some(f) = file {
                    self.flushed_bytes += f.size();
                    self.runs.insert(0, Arc::new(vec![f]));
                }
                self.flushes += 1;
                self.store_manifest()?;
                self.maybe_compact()
            }
            Done::Compacted {
                inputs,
                reserved,
                result,
            } => {
                self.compacting = self.compacting.saturating_sub(1);
                self.reserved = self.reserved.saturating_sub(reserved);
                self.busy
                    .retain(|b| !inputs.iter().any(|i| Arc::ptr_eq(i, b)));
                let files = result?;
                self.compactions += 1;
                self.compacted_bytes += files.iter().map(|f| f.size()).sum::<u64>();
                // The inputs are still contiguous: flushes only add newer runs in front.
                let at = inputs
                    .first()
                    .and_then(|first| self.runs.iter().position(|r| Arc::ptr_eq(r, first)))
                    .filter(|&at| {
                        inputs.iter().enumerate().all(|(i, input)| {
                            self.runs.get(at + i).is_some_and(|r| Arc::ptr_eq(r, input))
                        })
                    })
                    .ok_or_else(|| Error::Worker {
                        reason: "compaction inputs are no longer live".into(),
                    })?;
                let output: Vec<SortedRun> = if files.is_empty() {
                    Vec::new()
                } else {
                    vec![Arc::new(files)]
                };
                let old: Vec<SortedRun> = self.runs.splice(at..at + inputs.len(), output).collect();
                self.store_manifest()?;
                // The inputs' files are marked obsolete once the manifest that drops them is
                // durable, then unmapped and deleted, and their block indexes freed, on the
                // unmap thread (unless a snapshot still reads them).
                match &self.manifest {
                    Some(m) => drop(m.send(Garbage::Retire(
                        old,
                        inputs,
                        Arc::clone(&self.manifest_failed),
                    ))),
                    None => retire(old, inputs, true, self.unmap.as_ref()),
                }
                self.maybe_compact()
            }
        }
    }

    /// Size-tiered compaction of the runs newer than those a running compaction merges (see
    /// [`pick_compaction`]).
    /// Up to [`EngineOptions::COMPACTION_THREADS`] compactions are queued or run at once.
    fn maybe_compact(&mut self) -> Result<()> {
        if self.compacting >= EngineOptions::COMPACTION_THREADS {
            return Ok(());
        }
        let n = self
            .runs
            .iter()
            .position(|r| self.busy.iter().any(|b| Arc::ptr_eq(r, b)))
            .unwrap_or(self.runs.len());
        let size = |r: &SortedRun| r.iter().map(|f| f.size()).sum::<u64>();
        let sizes: Vec<u64> = self.runs[..n].iter().map(size).collect();
        match pick_compaction(&sizes, self.opts.max_sorted_runs) {
            Some(take) => self.start_compaction(0..take),
            None => Ok(()),
        }
    }

    fn start_compaction(&mut self, runs: std::ops::Range<usize>) -> Result<()> {
        self.compacting += 1;
        let inputs = self.runs[runs.clone()].to_vec();
        self.busy.extend(inputs.iter().cloned());
        let reserved = self.opts.compaction_reserve(&inputs);
        self.reserved += reserved;
        // The write buffer shrinks now (it rotates sooner), not only after the next flush.
        self.update_buffer_bytes();
        let job = Job::Compact {
            inputs,
            reserved,
            bottommost: runs.end == self.runs.len(),
            filter: self.filter.clone(),
            keep: self.keep.clone(),
        };
        self.send(job)
    }

    /// Gives the write buffers what the block indexes of the live runs and the reservations of
    /// running compactions leave of the engine's budget share (taken anew from the
    /// environment).
    fn update_buffer_bytes(&mut self) {
        self.env_generation = self.env.generation();
        self.share = self.env.memory_share();
        self.buffer_bytes = write_buffer_bytes(self.share, self.charged_bytes());
    }

    /// The engine's share of its environment's memory budget, as last taken (at its last
    /// write, flush or compaction): the budget divided by the engines open in it.
    pub fn memory_share(&self) -> usize {
        self.share
    }

    /// The memory the engine charges to its budget share now: the block indexes of its live
    /// runs, the reservations of its running compactions, its write buffer and the write
    /// buffers waiting for their flush (accounted as described in `docs/mmap-format.md`).
    /// Memory the environment's threads are still freeing, and mapped pages, are not charged.
    pub fn memory_charged(&self) -> usize {
        self.charged_bytes() + self.mem.bytes() + self.imm.iter().map(|m| m.bytes()).sum::<usize>()
    }

    /// The environment the engine runs in.
    pub fn environment(&self) -> &MmapEnvironment {
        &self.env
    }

    /// Budget bytes not available to write buffers: the in-memory block indexes of the live
    /// runs plus what running compactions reserved.
    fn charged_bytes(&self) -> usize {
        let index: usize = self
            .runs
            .iter()
            .flat_map(|r| r.iter())
            .map(|f| f.memory_bytes())
            .sum();
        index + self.reserved
    }

    /// Writes the manifest of the current runs: queued for the manifest thread (in order with
    /// the replaced runs it frees), or written now without that thread. Durable only after
    /// [`Db::sync_manifest`].
    fn store_manifest(&mut self) -> Result<()> {
        self.update_buffer_bytes();
        let m = Manifest {
            db_id: self.db_id,
            next_file: self.next_file.load(Ordering::SeqCst),
            runs: self
                .runs
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|f| FileEntry {
                            number: f.number(),
                            name: f.name().to_string(),
                            clip: f.clip().cloned(),
                        })
                        .collect()
                })
                .collect(),
            user_meta: self.user_meta.clone(),
        };
        match &self.manifest {
            Some(q) => match q.send(Garbage::Manifest(
                Box::new(m),
                self.dir.clone(),
                Arc::clone(&self.manifest_failed),
            )) {
                Ok(()) => Ok(()),
                // The thread is gone: write it here.
                Err(e) => match e.into_inner() {
                    Garbage::Manifest(m, ..) => m.store(&self.dir),
                    _ => Ok(()),
                },
            },
            None => m.store(&self.dir),
        }
    }

    /// Waits until every manifest queued so far is durable (or its write failed).
    fn sync_manifest(&mut self) -> Result<()> {
        if let Some(q) = &self.manifest {
            wait_for(q);
        }
        self.check()
    }

    /// Flushes the write buffer and waits until every flush is installed and the manifest that
    /// names the new files is durable. Everything written before the call survives a crash.
    pub fn flush(&mut self) -> Result<()> {
        self.rotate()?;
        while !self.imm.is_empty() {
            self.wait_one()?;
        }
        // The owner's metadata may have changed without a flush.
        self.store_manifest()?;
        self.sync_manifest()
    }

    /// Waits for background work (flushes and a running compaction).
    pub fn drain(&mut self) -> Result<()> {
        while !self.imm.is_empty() || self.compacting > 0 {
            self.wait_one()?;
        }
        // Files replaced by compactions are deleted (after the manifest thread has written the
        // manifest that drops them), and write buffers freed, by threads of their own: wait
        // for them too, the manifest thread first (it hands runs on to the unmap thread).
        for r in [&self.manifest, &self.release, &self.unmap]
            .into_iter()
            .flatten()
        {
            wait_for(r);
        }
        Ok(())
    }

    /// Flushes, then compacts every sorted run into one (applying the filter and keep range).
    pub fn compact(&mut self) -> Result<()> {
        self.flush()?;
        self.drain()?;
        if !self.runs.is_empty() {
            self.start_compaction(0..self.runs.len())?;
            self.drain()?;
        }
        Ok(())
    }

    /// The live sorted runs, newest first (flush first to include recent writes).
    pub fn sorted_runs(&self) -> Vec<SortedRun> {
        self.runs.clone()
    }

    /// Adds sorted runs (newest run first) as the *oldest* data: each file is hard-linked (or
    /// copied) into the directory under a new number, verified and mapped; it keeps its
    /// checkpoint name, and only keys in its clip range are visible.
    pub fn ingest(&mut self, runs: Vec<Vec<IngestFile>>) -> Result<()> {
        self.drain()?;
        for r in runs {
            let mut files = Vec::new();
            for src in r {
                let n = self.next_file.fetch_add(1, Ordering::SeqCst);
                let dst = self.dir.join(run_file_name(n));
                if fs::hard_link(&src.path, &dst).is_err() {
                    fs::copy(&src.path, &dst)
                        .map_err(|e| Error::io("copying a sorted run in", &src.path, e))?;
                }
                files.push(Arc::new(
                    RunFile::open(
                        &dst,
                        n,
                        self.opts.verify_on_open,
                        self.opts.verify_blocks_on_read,
                    )?
                    .with_origin(src.name, src.clip),
                ));
            }
            files.sort_by(|a, b| a.first_key().cmp(b.first_key()));
            if files
                .windows(2)
                .any(|w| w[0].last_key() >= w[1].first_key())
            {
                return Err(Error::Config {
                    reason: "files of one sorted run overlap".into(),
                });
            }
            if !files.is_empty() {
                self.runs.push(Arc::new(files));
            }
        }
        sync_dir(&self.dir)?;
        self.store_manifest()?;
        self.sync_manifest()?;
        self.maybe_compact()
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
}

impl Drop for Db {
    fn drop(&mut self) {
        // Finish installing what the workers completed, so no finished file is orphaned
        // needlessly; unflushed writes are dropped (no write-ahead log).
        let _ = self.drain();
        // The service channels go before the environment handle: should this be the last
        // handle, the environment joins its threads, which end once every sender is gone.
        self.release = None;
        self.unmap = None;
        self.manifest = None;
        // Its share goes to the other engines.
        self.env.deregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn small() -> EngineOptions {
        EngineOptions {
            memory_budget: 64 << 10,
            max_sorted_runs: 3,
            target_file_bytes: 32 << 10,
            ..EngineOptions::default()
        }
    }

    /// [`small`] options allowing up to `max_sorted_runs` runs before compacting.
    fn small_with_runs(max_sorted_runs: usize) -> EngineOptions {
        EngineOptions {
            max_sorted_runs,
            ..small()
        }
    }

    /// Size-tiered picks: the newest runs while each older one is at most twice those taken;
    /// with `max_runs` runs, all but the oldest runs larger than everything newer together.
    #[test]
    fn compaction_picks_leave_out_runs_larger_than_all_newer_ones() {
        assert_eq!(pick_compaction(&[10, 10], 6), None);
        assert_eq!(pick_compaction(&[10, 10, 10], 6), Some(3));
        assert_eq!(pick_compaction(&[10, 10, 30, 5000], 6), Some(3));
        // Runs of similar sizes (a bulk load's) merge, each older one a bit larger.
        assert_eq!(pick_compaction(&[55, 93, 113], 6), Some(3));
        assert_eq!(pick_compaction(&[10, 21, 40, 5000], 6), None);
        assert_eq!(pick_compaction(&[10, 20, 25, 80, 200, 5000], 6), Some(5));
        // The bottom run joins once the newer runs are half as large together.
        assert_eq!(pick_compaction(&[10, 20, 40, 80, 160, 600], 6), Some(6));
        assert_eq!(pick_compaction(&[10, 20, 40, 80, 160, 700], 6), Some(5));
        // Below `max_runs` runs that grow too fast stay; at `max_runs`, all but the oldest
        // runs larger than all newer ones together, and at least two, are merged.
        assert_eq!(pick_compaction(&[10, 30, 100, 300, 1000], 6), None);
        assert_eq!(pick_compaction(&[10, 30, 100, 300, 1000, 5000], 6), Some(2));
        assert_eq!(pick_compaction(&[10, 25, 30, 300, 1000, 5000], 6), Some(3));
    }

    /// A running compaction is charged to the budget: from its start until it is installed the
    /// write buffer gets what the live block indexes *and* the compaction's reservation (its
    /// outputs' block indexes, at most the inputs', plus its writer) leave; afterwards the
    /// reservation is released and only the live runs' indexes are charged.
    #[test]
    fn a_running_compaction_is_charged_to_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EngineOptions {
            memory_budget: 4 << 20,
            max_sorted_runs: 64,
            target_file_bytes: 256 << 10,
            ..EngineOptions::default()
        };
        let mut db = Db::open(dir.path(), opts.clone()).unwrap();
        for round in 0u32..3 {
            for i in 0u32..20_000 {
                db.put(&(i * 3 + round).to_be_bytes(), &[round as u8; 40])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        db.drain().unwrap();
        assert_eq!(db.compacting, 0);
        assert_eq!(db.reserved, 0);
        let index = db.charged_bytes();
        assert!(index > 0);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, index)
        );
        let n = db.runs.len();
        assert!(n >= 2, "{n} runs");
        // Nothing is installed before the next poll: the reservation is observable.
        db.start_compaction(0..n).unwrap();
        let inputs: usize = db
            .runs
            .iter()
            .flat_map(|r| r.iter())
            .map(|f| f.memory_bytes())
            .sum();
        assert_eq!(db.reserved, inputs + (256 << 10) / 16);
        assert_eq!(db.charged_bytes(), index + db.reserved);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, index + db.reserved)
        );
        assert!(db.buffer_bytes < write_buffer_bytes(opts.memory_budget, index));
        db.drain().unwrap();
        assert_eq!(db.reserved, 0);
        assert_eq!(db.runs.len(), 1);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, db.charged_bytes())
        );
        // The merge was cut into output files of about the target size.
        assert!(db.runs[0].len() > 1, "{} files", db.runs[0].len());
    }

    /// Flushed write buffers are freed while the thread that unmaps and deletes replaced files
    /// is busy (a large file takes most of a second): they used to queue behind it, and a 50M
    /// key run held nine write buffers at once, 700 MiB against a 256 MiB budget.
    #[test]
    fn write_buffers_are_freed_while_replaced_files_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        // Stall the unmap thread: it answers this barrier only when `stalled` is read.
        let (stall_tx, stalled) = crossbeam_channel::bounded(0);
        db.unmap
            .as_ref()
            .unwrap()
            .send(Garbage::Barrier(stall_tx))
            .unwrap();
        let mut buffers = Vec::new();
        for round in 0u32..4 {
            for i in 0u32..2_000 {
                db.put(&(i * 4 + round).to_be_bytes(), &[round as u8; 40])
                    .unwrap();
            }
            buffers.push(Arc::downgrade(&db.mem));
            db.flush().unwrap();
        }
        // Everything sent to the buffer thread so far is freed once it answers a barrier.
        let (tx, rx) = crossbeam_channel::bounded(1);
        db.release
            .as_ref()
            .unwrap()
            .send(Garbage::Barrier(tx))
            .unwrap();
        rx.recv().unwrap();
        for (i, b) in buffers.iter().enumerate() {
            assert!(b.upgrade().is_none(), "write buffer {i} is still held");
        }
        // Only now does the unmap thread go on.
        stalled.recv().unwrap();
        db.drain().unwrap();
    }

    /// A flush that fails (its directory is gone) fails the engine: later writes, flushes and
    /// drains report it, and dropping the engine returns instead of waiting for the failed
    /// buffer to be installed.
    #[test]
    fn a_failed_flush_is_reported_and_drop_returns() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("db");
        let mut db = Db::open(&dir, small()).unwrap();
        db.put(b"a", b"1").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let err = db.flush().unwrap_err();
        assert!(
            !err.to_string().is_empty(),
            "the error says what failed: {err}"
        );
        for _ in 0..2 {
            assert!(db.drain().is_err(), "the failure sticks");
            assert!(db.flush().is_err(), "the failure sticks");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(db);
            let _ = tx.send(());
        });
        // A hang guard, not a timing measurement: dropping takes milliseconds.
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("dropping a failed engine returns");
    }

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

    /// A manifest the manifest thread cannot write is reported by the next flush and every
    /// write after it; nothing the last durable manifest names is deleted, so reopening
    /// finds everything flushed before.
    #[test]
    fn a_failed_manifest_write_is_reported_and_loses_nothing_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        {
            let mut db = Db::open(dir.path(), small()).unwrap();
            for i in 0u32..3000 {
                db.put(&i.to_be_bytes(), &[1; 30]).unwrap();
                model.insert(i.to_be_bytes().to_vec(), vec![1u8; 30]);
            }
            db.flush().unwrap();
            db.drain().unwrap();
            assert!(
                db.stats().1 > 0,
                "compactions replaced files: {:?}",
                db.stats()
            );
            // A directory where the manifest's temporary file goes: its creation fails.
            fs::create_dir(dir.path().join("MANIFEST.tmp")).unwrap();
            let mut failed = None;
            for i in 0u32..3000 {
                if let Err(e) = db.put(&i.to_be_bytes(), &[2; 30]) {
                    failed = Some(e.to_string());
                    break;
                }
            }
            let err = match failed {
                Some(e) => e,
                None => db.flush().unwrap_err().to_string(),
            };
            assert!(err.contains("manifest"), "{err}");
            // Every later write fails too.
            assert!(db.put(b"x", b"y").is_err());
        }
        fs::remove_dir(dir.path().join("MANIFEST.tmp")).unwrap();
        let db = Db::open(dir.path(), small()).unwrap();
        assert_eq!(all(&db), model);
    }

    fn all(db: &Db) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut it = db.iter(&[], None).unwrap();
        let mut out = BTreeMap::new();
        while let Some((k, v)) = it.next().unwrap() {
            out.insert(k.to_vec(), v.to_vec());
        }
        out
    }

    #[test]
    fn puts_merges_deletes_across_flushes_compaction_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
        {
            let mut db = Db::open(dir.path(), small()).unwrap();
            for i in 0u32..20_000 {
                let k = (i % 3000).to_be_bytes().to_vec();
                match i % 5 {
                    0 | 1 => {
                        db.put(&k, &i.to_be_bytes()).unwrap();
                        model.insert(k, i.to_be_bytes().to_vec());
                    }
                    2 | 3 => {
                        db.merge(&k, &[i as u8]).unwrap();
                        model.entry(k).or_default().push(i as u8);
                    }
                    _ => {
                        db.delete(&k).unwrap();
                        model.remove(&k);
                    }
                }
                // Writers wait for compactions rather than let sorted runs pile up.
                assert!(db.stats().2 <= db.opts.stall_runs() + 1, "{:?}", db.stats());
                if i % 997 == 0 {
                    let k = (i % 3000).to_be_bytes();
                    let mut out = Vec::new();
                    let found = db.get(&k, &mut out).unwrap();
                    assert_eq!(found.then_some(out), model.get(&k[..]).cloned());
                }
            }
            let (flushes, _, _, _) = db.stats();
            assert!(flushes > 3, "the small budget forces flushes");
            assert_eq!(all(&db), model);
            db.flush().unwrap();
            assert_eq!(all(&db), model);
            let (flushed, compacted) = db.bytes_written();
            db.compact().unwrap();
            assert_eq!(db.stats().2, 1);
            assert_eq!(all(&db), model);
            // The full merge wrote the one run left; flushes wrote at least its live data.
            let run: u64 = db.sorted_runs()[0].iter().map(|f| f.size()).sum();
            assert!(flushed >= run, "{flushed} bytes flushed, {run} in the run");
            assert!(db.bytes_written().1 >= compacted + run);
        }
        let db = Db::open(dir.path(), small()).unwrap();
        assert_eq!(all(&db), model);
        for (k, v) in &model {
            let mut out = Vec::new();
            assert!(db.get(k, &mut out).unwrap());
            assert_eq!(&out, v);
        }
        let mut out = Vec::new();
        assert!(!db.get(b"absent", &mut out).unwrap());
        // Inverted or empty ranges are empty, never a panic.
        let mut n = 0;
        db.scan(&[9, 9], &[1], |_, _| -> Result<bool> {
            n += 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(n, 0);
        assert!(db
            .iter(&[9, 9], Some(&[1]))
            .unwrap()
            .next()
            .unwrap()
            .is_none());
        assert!(db.iter(&[1], Some(&[1])).unwrap().next().unwrap().is_none());
        // Only live files remain in the directory.
        let runs: usize = db.sorted_runs().iter().map(|r| r.len()).sum();
        let on_disk = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".run")
            })
            .count();
        assert_eq!(runs, on_disk);
    }

    #[test]
    fn unflushed_writes_are_lost_flushed_ones_survive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut db = Db::open(dir.path(), EngineOptions::default()).unwrap();
            db.put(b"a", b"1").unwrap();
            db.flush().unwrap();
            db.put(b"b", b"2").unwrap();
        }
        let db = Db::open(dir.path(), EngineOptions::default()).unwrap();
        let mut out = Vec::new();
        assert!(db.get(b"a", &mut out).unwrap());
        assert!(!db.get(b"b", &mut Vec::new()).unwrap());
    }

    #[test]
    fn flipped_bytes_in_a_run_are_reported_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut db = Db::open(dir.path(), EngineOptions::default()).unwrap();
            for i in 0u32..2000 {
                db.put(&i.to_be_bytes(), &[7u8; 20]).unwrap();
            }
            db.flush().unwrap();
        }
        let run = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "run"))
            .unwrap();
        let good = fs::read(&run).unwrap();
        let step = (good.len() / 300).max(1);
        for i in (0..good.len()).step_by(step) {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            fs::write(&run, &bad).unwrap();
            let err = Db::open(dir.path(), EngineOptions::default()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&run.file_name().unwrap().to_string_lossy().to_string()),
                "byte {i}: {msg}"
            );
        }
        // Truncation too.
        fs::write(&run, &good[..good.len() - 10]).unwrap();
        assert!(Db::open(dir.path(), EngineOptions::default()).is_err());
        fs::write(&run, &good).unwrap();
        assert!(Db::open(dir.path(), EngineOptions::default()).is_ok());
    }

    #[test]
    fn snapshot_is_isolated_and_outlives_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        for i in 0u32..3000 {
            db.put(&i.to_be_bytes(), b"old").unwrap();
        }
        let snap = db.snapshot_detached().unwrap();
        for i in 0u32..3000 {
            db.put(&i.to_be_bytes(), b"new").unwrap();
        }
        db.compact().unwrap();
        let t = std::thread::spawn(move || {
            let mut it = snap.iter(&[], None).unwrap();
            let mut n = 0;
            while let Some((_, v)) = it.next().unwrap() {
                assert_eq!(v, b"old");
                n += 1;
            }
            n
        });
        assert_eq!(t.join().unwrap(), 3000);
    }

    #[test]
    fn filter_and_keep_range_apply_in_compaction() {
        struct DropOdd;
        impl CompactionFilter for DropOdd {
            fn filter(&self, _: &[u8], v: &[u8], _: &mut Vec<u8>) -> FilterDecision {
                if v[0] % 2 == 1 {
                    FilterDecision::Remove
                } else {
                    FilterDecision::Keep
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), small()).unwrap();
        for i in 0u8..200 {
            db.put(&[i], &[i]).unwrap();
        }
        db.set_compaction_filter(Some(Arc::new(DropOdd)));
        db.set_keep_range(Some((vec![10], vec![100])));
        db.compact().unwrap();
        let got: Vec<u8> = all(&db).keys().map(|k| k[0]).collect();
        let want: Vec<u8> = (10u8..100).filter(|i| i % 2 == 0).collect();
        assert_eq!(got, want);
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, u8),
        Merge(u8, u8),
        Delete(u8),
        Flush,
        Compact,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..24, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            6 => (0u8..24, any::<u8>()).prop_map(|(k, v)| Op::Merge(k, v)),
            3 => (0u8..24).prop_map(Op::Delete),
            2 => Just(Op::Flush),
            1 => Just(Op::Compact),
            1 => Just(Op::Reopen),
        ]
    }

    /// Applies `op` to the engine and the model at `key` (the op's own key is not used; a put
    /// writes `len` copies of its byte); `Reopen` flushes, drops and calls `reopen`.
    fn apply(
        mut db: Db,
        model: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        key: &[u8],
        op: &Op,
        len: usize,
        reopen: impl FnOnce() -> Db,
    ) -> Db {
        match *op {
            Op::Put(_, v) => {
                db.put(key, &vec![v; len]).unwrap();
                model.insert(key.to_vec(), vec![v; len]);
            }
            Op::Merge(_, v) => {
                db.merge(key, &[v]).unwrap();
                model.entry(key.to_vec()).or_default().push(v);
            }
            Op::Delete(_) => {
                db.delete(key).unwrap();
                model.remove(key);
            }
            Op::Flush => db.flush().unwrap(),
            Op::Compact => db.compact().unwrap(),
            Op::Reopen => {
                db.flush().unwrap();
                drop(db);
                return reopen();
            }
        }
        db
    }

    fn opts() -> EngineOptions {
        EngineOptions {
            // Tiny buffers: background flushes and tiered (partial) compactions all the time.
            memory_budget: 2048,
            max_sorted_runs: 4,
            ..EngineOptions::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn engine_matches_a_btreemap(ops in prop::collection::vec(op(), 1..200)) {
            let dir = tempfile::tempdir().unwrap();
            let mut db = Db::open(dir.path(), opts()).unwrap();
            let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
            for op in ops {
                let key = match op {
                    Op::Put(k, _) | Op::Merge(k, _) | Op::Delete(k) => k,
                    _ => 0,
                };
                db = apply(db, &mut model, &[key], &op, 40, || {
                    Db::open(dir.path(), opts()).unwrap()
                });
                for k in 0u8..24 {
                    // Both lookups: one run searched at a time, and blocks located ahead.
                    let mut out = Vec::new();
                    let found = db.get(&[k], &mut out).unwrap();
                    prop_assert_eq!(found.then_some(out), model.get(&vec![k]).cloned());
                    let mut out = Vec::new();
                    let found = db.get_merged(&[k], &mut out).unwrap();
                    prop_assert_eq!(found.then_some(out), model.get(&vec![k]).cloned());
                }
                let mut got = BTreeMap::new();
                db.scan(&[], &[0xff], |k, v| -> Result<bool> {
                    got.insert(k.to_vec(), v.to_vec());
                    Ok(true)
                })
                .unwrap();
                prop_assert_eq!(&got, &model);
            }
            let mut it = db.iter(&[], None).unwrap();
            let mut got = BTreeMap::new();
            while let Some((k, v)) = it.next().unwrap() {
                got.insert(k.to_vec(), v.to_vec());
            }
            prop_assert_eq!(&got, &model);
        }

        /// `scan_prefix` returns exactly the keys with the prefix, resolved, whether the
        /// prefix's entries are in the write buffer (few: its chain; more than
        /// `CHAIN_SCAN_MAX`: the ordered set), in sorted runs or in both.
        #[test]
        fn scan_prefix_matches_a_btreemap(
            ops in prop::collection::vec((0u8..4, 0u8..40, op()), 1..300)
        ) {
            let dir = tempfile::tempdir().unwrap();
            // Keys `[prefix, suffix]`: the first byte is the scan prefix.
            let opts = || EngineOptions {
                memory_budget: 64 << 10,
                max_sorted_runs: 4,
                prefix_extractor: Some(Arc::new(|k: &[u8]| (!k.is_empty()).then_some(1))),
                ..EngineOptions::default()
            };
            let mut db = Db::open(dir.path(), opts()).unwrap();
            let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
            for (p, suffix, op) in ops {
                db = apply(db, &mut model, &[p, suffix], &op, 3, || {
                    Db::open(dir.path(), opts()).unwrap()
                });
                for q in 0u8..5 {
                    let mut got = Vec::new();
                    db.scan_prefix(&[q], |k, v| -> Result<bool> {
                        got.push((k.to_vec(), v.to_vec()));
                        Ok(true)
                    })
                    .unwrap();
                    let want: Vec<(Vec<u8>, Vec<u8>)> = model
                        .range(vec![q]..vec![q + 1])
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }
}
