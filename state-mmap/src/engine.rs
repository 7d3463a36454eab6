//! The log-structured merge engine: a memtable with a byte budget, immutable memtables flushed
//! to sorted runs in the background, size-tiered compaction in the background, and a manifest
//! naming the live files. The background work runs on the threads of the engine's
//! [`MmapEnvironment`], shared with every other engine of that environment (finished work comes
//! back on a crossbeam channel and is installed by the engine's own thread).
//!
//! There is no write-ahead log (Flink runs RocksDB without one too): what was not flushed is
//! lost by a crash, and durability comes from [`Db::flush`] / checkpoints.
//!
//! This file defines [`Db`] (the state every part of the engine shares); its methods live
//! with the part they belong to:
//!
//! - `options`: [`EngineOptions`] and the limits derived from them;
//! - `db`: opening a store, point reads and writes, counters;
//! - `scan`: snapshots, iterators and range scans;
//! - `jobs`: flushes and compactions on the environment's pool, and installing their results;
//! - `compaction`: which runs to merge, the merge, the [`CompactionFilter`];
//! - `files`: run file names, the manifest of live files, ingesting checkpoint files;
//! - `budget`: the engine's share of the memory budget and the write buffer size it leaves;
//! - `service`: the environment's service threads (freeing, manifests, unmapping).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use crossbeam_channel::{Receiver, Sender};

use crate::environment::MmapEnvironment;
use crate::memtable::Memtable;
use crate::run::RunFile;

mod budget;
mod compaction;
mod db;
mod files;
mod jobs;
mod options;
mod scan;
mod service;

pub use compaction::{CompactionFilter, FilterDecision};
pub use files::{run_file_name, IngestFile};
pub use options::EngineOptions;
pub use scan::{DbIter, DbSnapshot};
pub(crate) use service::{manifest_loop, release_loop, Garbage};

use jobs::{Done, WorkerCtx};

/// One sorted run: non-overlapping files in key order.
pub type SortedRun = Arc<Vec<Arc<RunFile>>>;

/// An embedded ordered key-value store of byte strings over memory-mapped sorted runs, with a
/// concatenating merge operator (list appends). Single writer (`&mut self`).
pub struct Db {
    dir: PathBuf,
    db_id: u64,
    opts: EngineOptions,
    mem: Arc<Memtable>,
    imm: Vec<Arc<Memtable>>,
    /// The allocations of the last freed write buffer, for the next one.
    recycler: Arc<crate::memtable::Recycler>,
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
    /// Rotations of the write buffer that waited for background work, and how long in all.
    stalls: (u64, std::time::Duration),
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
        self.env.deregister(self.env_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use std::collections::BTreeMap;
    use std::fs;

    pub(super) fn small() -> EngineOptions {
        EngineOptions {
            memory_budget: 64 << 10,
            max_sorted_runs: 3,
            target_file_bytes: 32 << 10,
            ..EngineOptions::default()
        }
    }

    /// [`small`] options allowing up to `max_sorted_runs` runs before compacting.
    pub(super) fn small_with_runs(max_sorted_runs: usize) -> EngineOptions {
        EngineOptions {
            max_sorted_runs,
            ..small()
        }
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

    pub(super) fn all(db: &Db) -> BTreeMap<Vec<u8>, Vec<u8>> {
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
    use crate::error::Result;
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
