//! Background work of one engine: flushes and compactions queued on the environment's pool,
//! and the installation of their results by the engine's own thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::environment::Lane;
use crate::error::{Error, Result};
use crate::memtable::{Memtable, OpKind};
use crate::run::{RunFile, RunWriter};

use super::files::shared_name;
use super::service::{pin_files, retire, wait_for, Garbage};
use super::{run_file_name, CompactionFilter, Db, EngineOptions, SortedRun};

pub(super) enum Job {
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

pub(super) enum Done {
    /// A background job panicked (the pool's thread goes on; the engine fails).
    Panicked(String),
    /// The files of the flushed buffer's sorted run (none when everything in it was dropped).
    Flushed(Result<Vec<Arc<RunFile>>>),
    Compacted {
        inputs: Vec<SortedRun>,
        reserved: usize,
        result: Result<Vec<Arc<RunFile>>>,
    },
}

#[derive(Clone)]
pub(super) struct WorkerCtx {
    pub(super) dir: PathBuf,
    pub(super) db_id: u64,
    pub(super) next_file: Arc<AtomicU64>,
    pub(super) opts: EngineOptions,
    pub(super) boundary: Option<Arc<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>>,
}

impl WorkerCtx {
    pub(super) fn open_run(&self, path: &Path, number: u64) -> Result<Arc<RunFile>> {
        Ok(Arc::new(
            RunFile::open(
                path,
                number,
                false, // just written by us
                self.opts.verify_blocks_on_read,
            )?
            .with_origin(shared_name(self.db_id, number), None),
        ))
    }

    /// Opens a compaction's output without loading its block index and bloom filter: the
    /// compaction's inputs hold as much memory until the output replaces them, and the output
    /// is only read once installed. [`Garbage::Pin`] loads them after the inputs are freed.
    pub(super) fn open_output(&self, path: &Path, number: u64) -> Result<Arc<RunFile>> {
        Ok(Arc::new(
            RunFile::open_unpinned(path, number, self.opts.verify_blocks_on_read)?
                .with_origin(shared_name(self.db_id, number), None),
        ))
    }

    fn flush(&self, mem: &Memtable, number: u64) -> Result<Vec<Arc<RunFile>>> {
        let mut out = RunOutput::flush(self, number);
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
                out.add(k, op.kind(), op.value())?;
            }
        }
        out.finish()
    }
}

/// The files one flush or compaction writes: one sorted run, cut into files of about
/// [`EngineOptions::target_file_bytes`] — at a boundary the owner accepts when it set one
/// ([`Db::set_file_boundary`]: the backends' key groups, so that a file rarely straddles the
/// boundary of a subtask's range after a rescale, and a restore downloads little beyond the
/// key groups it owns).
pub(super) struct RunOutput<'a> {
    ctx: &'a WorkerCtx,
    /// The file being written and its number.
    writer: Option<(RunWriter, u64)>,
    /// The number the first file takes (a flush's, allocated when it was queued).
    first: Option<u64>,
    prev_key: Vec<u8>,
    files: Vec<Arc<RunFile>>,
    /// Open the files with their index and filter loaded (a flush's); a compaction's are
    /// opened without them ([`WorkerCtx::open_output`]).
    pinned: bool,
}

impl<'a> RunOutput<'a> {
    /// A flush's output in `ctx`'s directory, its first file numbered `first`: files open
    /// with their index and filter loaded.
    pub(super) fn flush(ctx: &'a WorkerCtx, first: u64) -> Self {
        RunOutput {
            ctx,
            writer: None,
            first: Some(first),
            prev_key: Vec::new(),
            files: Vec::new(),
            pinned: true,
        }
    }

    /// A compaction's output in `ctx`'s directory: files open without their index and filter
    /// until the compaction is installed.
    pub(super) fn compaction(ctx: &'a WorkerCtx) -> Self {
        RunOutput {
            pinned: false,
            first: None,
            ..Self::flush(ctx, 0)
        }
    }

    /// Appends an entry (keys in increasing order), starting a new file first if the current
    /// one is large enough and the owner accepts a boundary between the previous key and
    /// this one.
    pub(super) fn add(&mut self, key: &[u8], kind: OpKind, value: &[u8]) -> Result<()> {
        if let Some((w, _)) = &self.writer {
            let cut = w.size() >= self.ctx.opts.target_file_bytes
                && self
                    .ctx
                    .boundary
                    .as_ref()
                    .is_none_or(|b| b(&self.prev_key, key));
            if cut {
                self.finish_file()?;
            }
        }
        let w = match &mut self.writer {
            Some((w, _)) => w,
            None => {
                let n = match self.first.take() {
                    Some(n) => n,
                    None => self.ctx.next_file.fetch_add(1, Ordering::SeqCst),
                };
                let w = RunWriter::create(
                    &self.ctx.dir.join(run_file_name(n)),
                    self.ctx.opts.prefix_extractor.clone(),
                )?;
                &mut self.writer.insert((w, n)).0
            }
        };
        w.add(key, kind, value)?;
        self.prev_key.clear();
        self.prev_key.extend_from_slice(key);
        Ok(())
    }

    fn finish_file(&mut self) -> Result<()> {
        if let Some((w, n)) = self.writer.take() {
            // Not fsynced here: installing the files queues their fsync on the manifest thread
            // (see `Db::sync_runs_before_manifest`), off the path of a writer waiting for this
            // flush.
            if let Some(p) = w.finish()? {
                let file = if self.pinned {
                    self.ctx.open_run(&p, n)?
                } else {
                    self.ctx.open_output(&p, n)?
                };
                self.files.push(file);
            }
        }
        Ok(())
    }

    /// Finishes the last file; returns the files in key order. They are complete but not yet
    /// durable: installing them queues their fsync (and the directory's) before the manifest
    /// that names them.
    pub(super) fn finish(mut self) -> Result<Vec<Arc<RunFile>>> {
        self.finish_file()?;
        Ok(self.files)
    }
}

/// Runs a flush or compaction on a thread of the environment's pool.
pub(super) fn run_job(ctx: &WorkerCtx, job: Job) -> Done {
    let started = std::time::Instant::now();
    match job {
        Job::Flush { mem, number } => {
            let result = ctx.flush(&mem, number);
            match &result {
                Ok(files) if !files.is_empty() => tracing::debug!(
                    dir = %ctx.dir.display(),
                    run = number,
                    files = files.len(),
                    bytes = files.iter().map(|f| f.size()).sum::<u64>(),
                    millis = started.elapsed().as_millis() as u64,
                    "state-mmap flushed a write buffer"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    dir = %ctx.dir.display(),
                    error = %e,
                    "state-mmap flush failed"
                ),
            }
            Done::Flushed(result)
        }
        Job::Compact {
            inputs,
            reserved,
            bottommost,
            filter,
            keep,
        } => {
            let result = ctx.compact(&inputs, bottommost, filter.as_ref(), keep.as_ref());
            let in_bytes: u64 = inputs.iter().flat_map(|r| r.iter()).map(|f| f.size()).sum();
            match &result {
                Ok(files) => tracing::debug!(
                    dir = %ctx.dir.display(),
                    runs = inputs.len(),
                    in_bytes,
                    out_bytes = files.iter().map(|f| f.size()).sum::<u64>(),
                    bottommost,
                    millis = started.elapsed().as_millis() as u64,
                    "state-mmap compacted runs"
                ),
                Err(e) => tracing::warn!(
                    dir = %ctx.dir.display(),
                    runs = inputs.len(),
                    error = %e,
                    "state-mmap compaction failed"
                ),
            }
            Done::Compacted {
                inputs,
                reserved,
                result,
            }
        }
    }
}

impl Db {
    /// Moves the write buffer to the immutable list and schedules its flush.
    pub(super) fn rotate(&mut self) -> Result<()> {
        self.check()?;
        self.poll()?;
        if self.mem.is_empty() {
            return Ok(());
        }
        let stall = |db: &Db| {
            db.imm.len() >= EngineOptions::MAX_IMMUTABLE
                || (db.runs.len() >= db.opts.stall_runs() && db.compacting > 0)
        };
        if stall(self) {
            let t = std::time::Instant::now();
            while stall(self) {
                self.wait_one()?;
            }
            self.stalls.0 += 1;
            self.stalls.1 += t.elapsed();
        }
        let fresh = Memtable::recycled(
            self.opts.prefix_extractor.clone(),
            self.buffer_bytes,
            &self.recycler,
        );
        let mem = std::mem::replace(&mut self.mem, Arc::new(fresh));
        self.imm.insert(0, Arc::clone(&mem));
        let number = self.next_file.fetch_add(1, Ordering::SeqCst);
        self.send(Job::Flush { mem, number })
    }

    /// Queues a flush or compaction on the environment's pool; its result comes back on
    /// `done` (a panic included, as [`Done::Panicked`]).
    pub(super) fn send(&mut self, job: Job) -> Result<()> {
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
                let files = result?;
                if let Some(mem) = self.imm.pop() {
                    // Freeing millions of small allocations takes a while: a thread of its own
                    // does it at once (not after the next flush, which would hold the memory);
                    // should it still be freeing the previous buffer, this waits for it.
                    if let Some(r) = &self.release {
                        let _ = r.send(Garbage::Mem(mem));
                    }
                }
                self.sync_runs_before_manifest(&files)?;
                if !files.is_empty() {
                    self.flushed_bytes += files.iter().map(|f| f.size()).sum::<u64>();
                    self.runs.insert(0, Arc::new(files));
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
                self.sync_runs_before_manifest(&files)?;
                let pin = files.clone();
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
                // The outputs' block indexes and bloom filters are loaded after that, on the
                // unmap thread, once it has freed the inputs': the two never take memory at
                // once (until then lookups read the outputs' mapped index and filter).
                match &self.manifest {
                    Some(m) => {
                        drop(m.send(Garbage::Retire(
                            old,
                            inputs,
                            Arc::clone(&self.manifest_failed),
                        )));
                        drop(m.send(Garbage::Pin(pin)));
                    }
                    None => {
                        retire(old, inputs, true, self.unmap.as_ref());
                        match &self.unmap {
                            Some(u) => drop(u.send(Garbage::Pin(pin))),
                            None => pin_files(pin),
                        }
                    }
                }
                self.maybe_compact()
            }
        }
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
}
