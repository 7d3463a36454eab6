//! One environment per process: the memory budget and the background threads that every engine
//! ([`Db`](crate::engine::Db)) opened in it shares, as fjall's `Database` shares one write-buffer
//! budget and one worker pool among its keyspaces.
//!
//! An environment holds
//! - the **memory budget**, divided by demand among the engines open in it: each engine's share
//!   is what it charges for its block indexes, bloom filters and compaction reservations (which
//!   grow with its state) plus an even part of what no engine charges, and that even part is
//!   its write buffers' (the split of
//!   [`EngineOptions::memory_budget`](crate::engine::EngineOptions) within the share). An
//!   engine opening or closing, or what one charges changing (at its flushes and
//!   compactions), changes every engine's share; each engine takes its new share at its next
//!   write (a shrunk share makes its write buffer rotate sooner);
//! - a **worker pool** of [`EnvOptions::threads`] threads (named `mmap<id>-work`) that runs the
//!   flushes and compactions of all engines: flushes first (each engine has at most one queued
//!   at a time, served in order of arrival), then compactions, at most `threads - 1` at once
//!   (at least one) so that a thread is left for flushes while long merges run, each taken
//!   from an engine with no compaction running when there is one (a busy engine does not
//!   starve the others);
//! - three service threads: one frees flushed write buffers (`mmap<id>-free`, one at a time,
//!   handing freed memory back to the OS), one unmaps and deletes the files compactions
//!   replaced (`mmap<id>-unmap`), one writes manifests in order (`mmap<id>-mfst`).
//!
//! A handle is cheap to clone (an `Arc` inside). The threads stop when the last handle and the
//! last engine opened in it are gone. A backend built without an environment gets one of its
//! own (its budget, the default threads): it behaves as if it were alone in the process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use crate::engine::{manifest_loop, release_loop, Garbage};
use crate::error::{Error, Result};

/// Options of an [`MmapEnvironment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvOptions {
    /// The memory budget shared by every engine of the environment (each gets what its state
    /// charges plus an even part of the rest; see the module docs). Default 256 MiB.
    pub memory_budget: usize,
    /// Threads running flushes and compactions for every engine (at least 1). With `n`
    /// threads at most `n - 1` compactions (at least one) run at once; the others wait in
    /// the queue. Default 3: one engine alone then runs as it did with threads of its own
    /// (two compactions and a flush at once). The environment has three more threads (freeing
    /// write buffers, unmapping replaced files, writing manifests).
    pub threads: usize,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            memory_budget: 256 << 20,
            threads: 3,
        }
    }
}

/// One process's memory budget and background threads, shared by every backend built from it
/// (see the [module docs](self)). Clone it to hand it to several builders.
///
/// ```
/// use state_mmap::environment::{EnvOptions, MmapEnvironment};
/// use state_mmap::MmapKeyedStateBackend;
///
/// # fn main() -> state_api::Result<()> {
/// let env = MmapEnvironment::new(EnvOptions { memory_budget: 64 << 20, threads: 2 })?;
/// let a = MmapKeyedStateBackend::<u64>::builder().environment(env.clone()).build()?;
/// let b = MmapKeyedStateBackend::<u64>::builder().environment(env.clone()).build()?;
/// assert_eq!(env.live_engines(), 2);
/// assert_eq!(env.memory_share(), 32 << 20);
/// # drop((a, b)); Ok(()) }
/// ```
#[derive(Clone)]
pub struct MmapEnvironment {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MmapEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapEnvironment")
            .field("id", &self.inner.id)
            .field("memory_budget", &self.inner.options.memory_budget)
            .field("threads", &self.inner.options.threads)
            .field("live_engines", &self.live_engines())
            .finish()
    }
}

/// The lanes of the worker pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// A flush (taken before any compaction).
    Flush,
    /// A compaction (at most `threads - 1` at once).
    Compaction,
}

type Task = Box<dyn FnOnce() + Send>;

/// The queued work of the pool.
struct Queues {
    flushes: VecDeque<Task>,
    /// Compactions with the key of their engine.
    compactions: VecDeque<(u64, Task)>,
    /// Engines of the compactions running now (one entry per compaction).
    running: Vec<u64>,
    closed: bool,
}

struct Pool {
    queues: Mutex<Queues>,
    ready: Condvar,
    max_compactions: usize,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next task for a worker: a flush, else a compaction if fewer than the limit run
    /// (preferably of an engine with none running); `None` once closed and empty.
    fn next(&self) -> Option<(Option<u64>, Task)> {
        let mut q = self.lock();
        loop {
            if let Some(t) = q.flushes.pop_front() {
                return Some((None, t));
            }
            if q.running.len() < self.max_compactions {
                let i = q
                    .compactions
                    .iter()
                    .position(|(db, _)| !q.running.contains(db))
                    .unwrap_or(0);
                if let Some((db, t)) = q.compactions.remove(i) {
                    q.running.push(db);
                    return Some((Some(db), t));
                }
            }
            if q.closed && q.compactions.is_empty() {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn finished(&self, compaction_of: Option<u64>) {
        if let Some(db) = compaction_of {
            let mut q = self.lock();
            if let Some(i) = q.running.iter().position(|&d| d == db) {
                q.running.swap_remove(i);
            }
            drop(q);
            // A compaction slot is free: any waiting worker may take one.
            self.ready.notify_all();
        }
    }

    fn run(&self) {
        while let Some((compaction_of, task)) = self.next() {
            // A task reports its own failures (and panics) to its engine.
            task();
            self.finished(compaction_of);
        }
    }
}

struct Inner {
    id: u64,
    options: EnvOptions,
    /// Engines open in the environment.
    live: AtomicUsize,
    /// Changes whenever the shares change: an engine opens or closes, or what one charges
    /// for its block indexes, bloom filters and running compactions changes.
    generation: AtomicU64,
    /// What each engine (by key) charges to the budget for its block indexes, bloom filters
    /// and running compactions, as it last reported, and their sum.
    charged: Mutex<(HashMap<u64, usize>, usize)>,
    next_engine: AtomicU64,
    pool: Arc<Pool>,
    release: Option<Sender<Garbage>>,
    unmap: Option<Sender<Garbage>>,
    manifest: Option<Sender<Garbage>>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pool.lock().closed = true;
        self.pool.ready.notify_all();
        // Closing the channels ends the service threads (the manifest thread holds a sender
        // of the unmap thread's channel and drops it when it ends).
        self.manifest = None;
        self.unmap = None;
        self.release = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Numbers environments for their thread names.
static NEXT_ENV: AtomicU64 = AtomicU64::new(1);
/// The process default (see [`MmapEnvironment::default_for_process`]).
static PROCESS_DEFAULT: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

impl MmapEnvironment {
    /// Starts an environment: its worker pool and service threads.
    pub fn new(options: EnvOptions) -> Result<MmapEnvironment> {
        if options.threads == 0 {
            return Err(Error::Config {
                reason: "an mmap environment needs at least one worker thread".into(),
            });
        }
        let id = NEXT_ENV.fetch_add(1, Ordering::Relaxed);
        let pool = Arc::new(Pool {
            queues: Mutex::new(Queues {
                flushes: VecDeque::new(),
                compactions: VecDeque::new(),
                running: Vec::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            max_compactions: options.threads.saturating_sub(1).max(1),
        });
        let mut inner = Inner {
            id,
            options: options.clone(),
            live: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            charged: Mutex::new((HashMap::new(), 0)),
            next_engine: AtomicU64::new(1),
            pool: Arc::clone(&pool),
            release: None,
            unmap: None,
            manifest: None,
            threads: Vec::new(),
        };
        let spawn = |role: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("mmap{id}-{role}"))
                .spawn(f)
                .map_err(|e| Error::Worker {
                    reason: format!("could not start the {role} thread of the environment: {e}"),
                })
        };
        // On an error, dropping `inner` stops the threads started so far.
        for _ in 0..options.threads {
            let pool = Arc::clone(&pool);
            inner
                .threads
                .push(spawn("work", Box::new(move || pool.run()))?);
        }
        // Flushed write buffers: a rendezvous channel, so an engine that flushes faster than
        // buffers are freed waits instead of holding more buffers than its share allows.
        let (release_tx, release_rx) = crossbeam_channel::bounded::<Garbage>(0);
        inner.release = Some(release_tx);
        inner
            .threads
            .push(spawn("free", Box::new(move || release_loop(release_rx)))?);
        let (unmap_tx, unmap_rx) = crossbeam_channel::unbounded::<Garbage>();
        inner.unmap = Some(unmap_tx.clone());
        inner
            .threads
            .push(spawn("unmap", Box::new(move || release_loop(unmap_rx)))?);
        let (manifest_tx, manifest_rx) = crossbeam_channel::unbounded::<Garbage>();
        inner.manifest = Some(manifest_tx);
        inner.threads.push(spawn(
            "mfst",
            Box::new(move || manifest_loop(manifest_rx, unmap_tx)),
        )?);
        Ok(MmapEnvironment {
            inner: Arc::new(inner),
        })
    }

    /// The environment of this process with the default options ([`EnvOptions::default`]):
    /// the same one for every call while an engine or a handle of it lives, a new one after
    /// the last is gone.
    pub fn default_for_process() -> Result<MmapEnvironment> {
        let mut slot = PROCESS_DEFAULT
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(inner) = slot.upgrade() {
            return Ok(MmapEnvironment { inner });
        }
        let env = MmapEnvironment::new(EnvOptions::default())?;
        *slot = Arc::downgrade(&env.inner);
        Ok(env)
    }

    /// The options it was started with.
    pub fn options(&self) -> &EnvOptions {
        &self.inner.options
    }

    /// The prefix of its threads' names, `mmap<id>-` (Linux shows the first 15 bytes of a
    /// name, e.g. in `/proc/self/task/*/comm`).
    pub fn thread_name_prefix(&self) -> String {
        format!("mmap{}-", self.inner.id)
    }

    /// Threads the environment runs: [`EnvOptions::threads`] workers and three service
    /// threads, however many engines are open.
    pub fn thread_count(&self) -> usize {
        self.inner.threads.len()
    }

    /// Engines open in the environment now.
    pub fn live_engines(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// What each engine gets of the budget for its write buffers now: the budget less what
    /// all engines charge for their block indexes, bloom filters and running compactions,
    /// divided by the live engines (the whole budget while none is open). An engine's share
    /// ([`Db::memory_share`](crate::engine::Db::memory_share)) is this plus what it charges
    /// itself: engines with more state get more of the budget, write buffers the same.
    pub fn memory_share(&self) -> usize {
        self.inner
            .options
            .memory_budget
            .saturating_sub(self.charged_total())
            / self.live_engines().max(1)
    }

    /// The budget divided by the engines open in it (the whole budget while none is open):
    /// the floor of every engine's write buffer is a twelfth of this.
    pub(crate) fn budget_per_engine(&self) -> usize {
        self.inner.options.memory_budget / self.live_engines().max(1)
    }

    /// What all engines charge for block indexes, bloom filters and running compactions, as
    /// they last reported.
    pub fn charged_total(&self) -> usize {
        self.lock_charged().1
    }

    fn lock_charged(&self) -> std::sync::MutexGuard<'_, (HashMap<u64, usize>, usize)> {
        self.inner
            .charged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an engine; returns its key in the pool (for fair compaction picks) and for
    /// [`MmapEnvironment::set_charged`].
    pub(crate) fn register(&self) -> u64 {
        self.inner.live.fetch_add(1, Ordering::SeqCst);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.next_engine.fetch_add(1, Ordering::Relaxed)
    }

    /// Records what engine `engine` charges for its block indexes, bloom filters and running
    /// compactions; a change moves the generation, so every engine takes its share anew.
    pub(crate) fn set_charged(&self, engine: u64, bytes: usize) {
        let mut c = self.lock_charged();
        let old = c.0.insert(engine, bytes).unwrap_or(0);
        if old != bytes {
            c.1 = c.1 - old + bytes;
            self.inner.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An engine closed: what it charged and its share go to the others.
    pub(crate) fn deregister(&self, engine: u64) {
        {
            let mut c = self.lock_charged();
            if let Some(old) = c.0.remove(&engine) {
                c.1 -= old;
            }
        }
        self.inner.live.fetch_sub(1, Ordering::SeqCst);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes whenever the shares change.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Queues `task` of engine `engine` on `lane`; false once the pool is closed.
    pub(crate) fn submit(&self, engine: u64, lane: Lane, task: Task) -> bool {
        let mut q = self.inner.pool.lock();
        if q.closed {
            return false;
        }
        match lane {
            Lane::Flush => q.flushes.push_back(task),
            Lane::Compaction => q.compactions.push_back((engine, task)),
        }
        drop(q);
        self.inner.pool.ready.notify_one();
        true
    }

    /// The channels of the service threads: (free write buffers, unmap replaced runs, write
    /// manifests).
    pub(crate) fn service_channels(
        &self,
    ) -> (
        Option<Sender<Garbage>>,
        Option<Sender<Garbage>>,
        Option<Sender<Garbage>>,
    ) {
        (
            self.inner.release.clone(),
            self.inner.unmap.clone(),
            self.inner.manifest.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Db, EngineOptions};
    use std::collections::BTreeMap;

    fn opts() -> EngineOptions {
        EngineOptions {
            max_sorted_runs: 3,
            target_file_bytes: 32 << 10,
            ..EngineOptions::default()
        }
    }

    fn all(db: &Db) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut it = db.iter(&[], None).unwrap();
        let mut out = BTreeMap::new();
        while let Some((k, v)) = it.next().unwrap() {
            out.insert(k.to_vec(), v.to_vec());
        }
        out
    }

    /// Engines of one environment share its budget: each takes its charge plus an even part, what
    /// they charge together (block indexes, compaction reservations, write buffers) never
    /// exceeds the budget while they write, an engine opening shrinks the others' shares and
    /// one closing gives its share back; flushes and compactions of all of them run on the
    /// shared pool and every engine reads back exactly what it wrote, also after reopening.
    /// Every engine takes its share anew (twice: the first pass reports what each charges);
    /// then the shares add up to the budget, each is what the engine charges plus the same
    /// even part, and the write buffers are the same size.
    fn shares_add_up(env: &MmapEnvironment, dbs: &mut [Db]) {
        for _ in 0..2 {
            dbs.iter_mut().for_each(Db::update_buffer_bytes);
        }
        let budget = env.options().memory_budget;
        assert!(env.charged_total() < budget);
        let even = env.memory_share();
        assert_eq!(even, (budget - env.charged_total()) / dbs.len());
        let sum: usize = dbs.iter().map(Db::memory_share).sum();
        assert!(
            sum <= budget && sum + dbs.len() > budget,
            "shares {sum}, budget {budget}"
        );
        for db in dbs.iter() {
            assert_eq!(db.write_buffer_limit(), dbs[0].write_buffer_limit());
            assert!(db.memory_share() >= even);
        }
    }

    /// The budget goes where the state is: an engine whose runs hold more keys charges more
    /// for their block indexes and bloom filters and gets a larger share; the part for write
    /// buffers is the same for all, and together they stay within the budget.
    #[test]
    fn an_engine_with_more_state_gets_more_of_the_budget() {
        const BUDGET: usize = 8 << 20;
        let env = MmapEnvironment::new(EnvOptions {
            memory_budget: BUDGET,
            threads: 1,
        })
        .unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut dbs: Vec<Db> = (0..2)
            .map(|i| Db::open_in(root.path().join(format!("db{i}")), opts(), &env).unwrap())
            .collect();
        for i in 0u32..200_000 {
            dbs[0].put(&i.to_be_bytes(), &[1; 20]).unwrap();
            if i % 100 == 0 {
                dbs[1].put(&i.to_be_bytes(), &[2; 20]).unwrap();
            }
        }
        for db in &mut dbs {
            db.flush().unwrap();
            db.drain().unwrap();
        }
        shares_add_up(&env, &mut dbs);
        let charged: Vec<usize> = dbs.iter().map(Db::memory_charged).collect();
        assert!(charged[0] > 10 * charged[1], "{charged:?}");
        assert!(dbs[0].memory_share() > dbs[1].memory_share());
        assert_eq!(
            dbs[0].memory_share() - dbs[1].memory_share(),
            charged[0] - charged[1],
            "the difference is what the larger state charges"
        );
    }

    #[test]
    fn engines_share_the_budget_and_never_exceed_it_together() {
        const BUDGET: usize = 3 << 20;
        let env = MmapEnvironment::new(EnvOptions {
            memory_budget: BUDGET,
            threads: 2,
        })
        .unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = |i: usize| root.path().join(format!("db{i}"));
        let mut dbs: Vec<Db> = (0..3)
            .map(|i| Db::open_in(dir(i), opts(), &env).unwrap())
            .collect();
        let mut models = vec![BTreeMap::new(); 4];
        assert_eq!(env.live_engines(), 3);
        assert_eq!(env.memory_share(), BUDGET / 3);
        let mut peak = 0;
        let mut write = |dbs: &mut [Db], models: &mut [BTreeMap<Vec<u8>, Vec<u8>>], round: u32| {
            for i in 0u32..6_000 {
                for (n, db) in dbs.iter_mut().enumerate() {
                    let key = (i.wrapping_mul(2_654_435_761) ^ round).to_be_bytes();
                    let value = [n as u8 ^ round as u8; 100];
                    db.put(&key, &value).unwrap();
                    models[n].insert(key.to_vec(), value.to_vec());
                }
                let charged: usize = dbs.iter().map(Db::memory_charged).sum();
                assert!(
                    charged <= BUDGET,
                    "{charged} bytes charged, budget {BUDGET}"
                );
                peak = peak.max(charged);
            }
        };
        write(&mut dbs, &mut models, 0);
        // Each took its share at its first write (the first opened alone, with all of it).
        shares_add_up(&env, &mut dbs);
        // A fourth engine: every engine's share shrinks at its next write.
        dbs.push(Db::open_in(dir(3), opts(), &env).unwrap());
        write(&mut dbs, &mut models, 1);
        shares_add_up(&env, &mut dbs);
        assert!(dbs.iter().all(|d| d.memory_share() < BUDGET / 3));
        // The budget was used, not just respected: write buffers of about a third of a share.
        assert!(peak > BUDGET / 4, "peak {peak}");
        for db in &mut dbs {
            db.flush().unwrap();
            db.drain().unwrap();
            let (flushes, compactions, _, _) = db.stats();
            assert!(flushes > 3 && compactions > 0, "{:?}", db.stats());
        }
        for (n, db) in dbs.iter().enumerate() {
            assert_eq!(all(db), models[n], "engine {n}");
        }
        // One engine closes: the others get its share back.
        let closing = dbs.last().map(|d| d.memory_share()).unwrap_or(0);
        let before_close: Vec<usize> = dbs.iter().map(Db::memory_share).collect();
        drop(dbs.pop());
        assert_eq!(env.live_engines(), 3);
        assert_eq!(
            env.memory_share(),
            (BUDGET - env.charged_total()) / 3,
            "what the closed engine charged is free again"
        );
        let before = dbs[0].memory_charged();
        dbs[0].put(b"after", b"close").unwrap();
        assert!(dbs[0].memory_share() > before_close[0]);
        assert!(dbs[0].memory_share() < before_close[0] + closing);
        assert!(dbs[0].memory_charged() > before);
        drop(dbs);
        assert_eq!(env.live_engines(), 0);
        // Reopened in a fresh environment of its own, every engine has its data.
        for (n, model) in models.iter().enumerate() {
            // (Engine 0's last write was never flushed: no write-ahead log.)
            let db = Db::open(dir(n), opts()).unwrap();
            assert_eq!(&all(&db), model, "engine {n} reopened");
        }
    }

    /// Flushes go before compactions and are taken while every compaction slot is busy; a
    /// free slot takes the queued compaction of an engine with none running before those of
    /// an engine that already runs one (a busy engine does not hold the others back).
    #[test]
    fn flushes_first_then_compactions_of_engines_with_none_running() {
        // Three threads: two compaction slots and a thread left for flushes.
        let env = MmapEnvironment::new(EnvOptions {
            memory_budget: 1 << 20,
            threads: 3,
        })
        .unwrap();
        let pool = &env.inner.pool;
        let (order_tx, order) = crossbeam_channel::unbounded::<&str>();
        // Engine 1 fills both slots with compactions that wait for a word.
        let mut blockers = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = crossbeam_channel::bounded::<()>(0);
            assert!(env.submit(
                1,
                Lane::Compaction,
                Box::new(move || {
                    let _ = rx.recv();
                })
            ));
            blockers.push(tx);
        }
        while pool.lock().running.len() < 2 {
            std::thread::yield_now();
        }
        // Queued in this order: another of engine 1, then one of engine 2.
        for (engine, name) in [(1, "engine 1"), (2, "engine 2")] {
            let tx = order_tx.clone();
            assert!(env.submit(
                engine,
                Lane::Compaction,
                Box::new(move || {
                    let _ = tx.send(name);
                })
            ));
        }
        let tx = order_tx.clone();
        assert!(env.submit(
            3,
            Lane::Flush,
            Box::new(move || {
                let _ = tx.send("flush");
            })
        ));
        assert_eq!(
            order.recv().unwrap(),
            "flush",
            "a flush waits for no compaction"
        );
        assert!(order.try_recv().is_err(), "no compaction slot was free");
        // One slot frees up while engine 1 still runs one: engine 2's goes first.
        blockers[0].send(()).unwrap();
        assert_eq!(order.recv().unwrap(), "engine 2");
        assert_eq!(order.recv().unwrap(), "engine 1");
        blockers[1].send(()).unwrap();
        drop(env);
    }

    /// The process default is one environment while a handle lives, a fresh one after.
    #[test]
    fn the_process_default_is_shared_while_it_lives() {
        let a = MmapEnvironment::default_for_process().unwrap();
        let b = MmapEnvironment::default_for_process().unwrap();
        assert_eq!(a.thread_name_prefix(), b.thread_name_prefix());
        assert_eq!(a.options(), &EnvOptions::default());
        let first = a.thread_name_prefix();
        drop((a, b));
        let c = MmapEnvironment::default_for_process().unwrap();
        assert_ne!(c.thread_name_prefix(), first);
    }
}
