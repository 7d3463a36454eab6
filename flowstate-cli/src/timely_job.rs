//! The Nexmark job on timely dataflow (`flowstate run --engine timely`): the same operators,
//! states and digest as [`crate::job`], spread over the workers of one or several processes.
//!
//! - `source`: the Nexmark generator cut into [`SPLITS`] splits (split `s` holds the events
//!   `s, s + SPLITS, …`); each split's offset is operator state, redistributed when the number
//!   of workers changes.
//! - `auctions` (keyed by auction id) and `bidders` (keyed by person id): as in the
//!   single-process job; windows close as the input frontier's watermark passes them.
//!
//! At the end every worker sends the lines of its final state to worker 0, which computes the
//! digest: it equals the single-process job's over the same events, at any number of
//! processes and workers, restored or not.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flowstate::config::{BackendKind, Config};
use flowstate_timely::{
    Checkpointing, Cluster, Job, JobConfig, KeyedContext, KeyedFunction, KeyedOptions, ReadOutcome,
    RestoreFrom, SourceOptions, SplitReader,
};
use nexmark::config::NexmarkConfig;
use nexmark::event::Event;
use nexmark::EventGenerator;
use serde::{Deserialize, Serialize};
use state_api::checkpointing::CheckpointableBackend;
use state_api::{FixedWidthSerializer, KeyedStateBackendExt, Timer};
use state_heap::HeapKeyedStateBackend;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;

use crate::job::{
    AuctionStates, BidderStates, JobBackend, JobError, JobReport, BASE_TIME, OUT_OF_ORDERNESS_MS,
    WINDOW_MS,
};

/// Splits of the Nexmark source: the most workers that all read (more workers are idle at the
/// source; the keyed operators use them all).
pub const SPLITS: u32 = 32;

/// What one process of the job is asked to do.
#[derive(Clone, Debug)]
pub struct TimelyOptions {
    /// Configuration (checkpoint directory and options, S3, max parallelism).
    pub config: Config,
    /// Job id: the directory under the checkpoint root.
    pub job: String,
    /// Events of the whole input.
    pub events: u64,
    /// Where this process sits.
    pub cluster: Cluster,
    /// Where to start from.
    pub restore: crate::job::RestoreFrom,
    /// Crash this process once its sources read this many events and a checkpoint of this
    /// run completed (so that the restart has one to restore): it exits at once with code 3,
    /// like a crash (no final checkpoint; its peers see the connection break).
    pub crash_after: Option<u64>,
    /// How long the sources sleep after each read of a split (zero: not at all; otherwise
    /// they read batches of 64 events); tests use it to make a small input last while they
    /// inject faults.
    pub read_delay: std::time::Duration,
    /// Bytes of padding stored with every person's city (benchmarks: more state; the digest
    /// leaves it out).
    pub state_padding: usize,
}

/// One Nexmark event as the dataflow carries it (only what the job reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NexEvent {
    /// A bid: auction, bidder, price, event time.
    Bid(u64, u64, u64, i64),
    /// A new person: id and city.
    Person(u64, String),
}

/// A line of the final state, for the digest: the line's key and value, and the counts.
type StateLine = (String, String, u64, u64, u64);

fn generator_config() -> NexmarkConfig {
    NexmarkConfig {
        base_time: BASE_TIME,
        ..Default::default()
    }
}

struct NexmarkSplits {
    events: u64,
    config: NexmarkConfig,
    /// Events read by every source of this process (counted when it is to crash).
    read: Option<Arc<AtomicU64>>,
    /// Sleep after each read.
    delay: std::time::Duration,
}

impl SplitReader for NexmarkSplits {
    type Item = NexEvent;
    fn read(
        &mut self,
        split: u32,
        offset: u64,
        max: usize,
        out: &mut Vec<(NexEvent, i64)>,
    ) -> Result<ReadOutcome, String> {
        let index = |o: u64| u64::from(split) + o * u64::from(SPLITS);
        let mut o = offset;
        let mut generator = EventGenerator::new(self.config.clone())
            .with_offset(index(o))
            .with_step(u64::from(SPLITS));
        while out.len() < max && index(o) < self.events {
            let Some(event) = generator.next() else { break };
            o += 1;
            match event {
                Event::Bid(b) => {
                    let ts = b.date_time as i64;
                    out.push((
                        NexEvent::Bid(b.auction as u64, b.bidder as u64, b.price as u64, ts),
                        ts,
                    ));
                }
                Event::Person(p) => {
                    out.push((NexEvent::Person(p.id as u64, p.city), p.date_time as i64));
                }
                Event::Auction(_) => {}
            }
        }
        if let Some(read) = &self.read {
            read.fetch_add(o - offset, Ordering::SeqCst);
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(ReadOutcome {
            next_offset: o,
            finished: index(o) >= self.events,
        })
    }
}

/// The watermark the single-process job ends with: the last bid's time (the generator's times
/// never decrease) minus the out-of-orderness.
fn final_watermark(events: u64, config: &NexmarkConfig) -> i64 {
    let from = events.saturating_sub(1_000);
    let last_bid = EventGenerator::new(config.clone())
        .with_offset(from)
        .take((events - from) as usize)
        .filter_map(|e| match e {
            Event::Bid(b) => Some(b.date_time as i64),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    last_bid - OUT_OF_ORDERNESS_MS
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Bids and the top price per auction in tumbling event-time windows.
struct Auctions;

impl<B: CheckpointableBackend<Key = u64>> KeyedFunction<B> for Auctions {
    type Input = (u64, u64, i64);
    type Output = StateLine;
    type States = AuctionStates;
    type Namespace = i64;

    fn register(&mut self, b: &mut B) -> state_api::Result<AuctionStates> {
        AuctionStates::register(b)
    }

    fn process(
        &mut self,
        ctx: &mut KeyedContext<'_, B, AuctionStates, i64, StateLine>,
        (_, price, ts): (u64, u64, i64),
    ) -> Result<(), String> {
        let window = ts - ts.rem_euclid(WINDOW_MS);
        let (b, s) = ctx.parts();
        b.reducing_in(s.bids(), &window).add(1).map_err(err)?;
        b.reducing_in(s.max_price(), &window)
            .add(price)
            .map_err(err)?;
        ctx.register_event_time_timer(&window, window + WINDOW_MS - 1)
            .map_err(err)
    }

    fn on_timer(
        &mut self,
        ctx: &mut KeyedContext<'_, B, AuctionStates, i64, StateLine>,
        t: Timer<u64, i64>,
    ) -> Result<(), String> {
        let (b, s) = ctx.parts();
        let n = b
            .reducing_in(s.bids(), &t.namespace)
            .get()
            .map_err(err)?
            .unwrap_or(0);
        let m = b
            .reducing_in(s.max_price(), &t.namespace)
            .get()
            .map_err(err)?
            .unwrap_or(0);
        b.reducing_in(s.bids(), &t.namespace).clear().map_err(err)?;
        b.reducing_in(s.max_price(), &t.namespace)
            .clear()
            .map_err(err)?;
        let (w, total, top) = b.value(s.closed()).get().map_err(err)?.unwrap_or((0, 0, 0));
        b.value(s.closed())
            .update((w + 1, total + n, top.max(m)))
            .map_err(err)
    }

    fn on_end(
        &mut self,
        ctx: &mut KeyedContext<'_, B, AuctionStates, i64, StateLine>,
    ) -> Result<(), String> {
        let (b, s) = ctx.parts();
        let keys: Vec<u64> = b
            .keys(s.closed(), &())
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut lines = Vec::new();
        for key in keys {
            b.set_current_key(key).map_err(err)?;
            if let Some((w, n, m)) = b.value(s.closed()).get().map_err(err)? {
                lines.push((format!("auction {key}"), format!("{w} {n} {m}"), w, n, 0));
            }
        }
        lines.into_iter().for_each(|l| ctx.emit(l));
        Ok(())
    }
}

/// What the bidders operator receives: a bid's price for its bidder, or a person's city.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum BidderInput {
    Spend(u64, u64),
    City(u64, String),
}

impl BidderInput {
    fn key(&self) -> u64 {
        match self {
            BidderInput::Spend(k, _) | BidderInput::City(k, _) => *k,
        }
    }
}

/// Running spend and city per person.
struct Bidders {
    /// Bytes appended to every stored city (`#`s, left out of the digest): more state for
    /// benchmarks.
    padding: usize,
}

impl<B: CheckpointableBackend<Key = u64>> KeyedFunction<B> for Bidders {
    type Input = BidderInput;
    type Output = StateLine;
    type States = BidderStates;
    type Namespace = ();

    fn register(&mut self, b: &mut B) -> state_api::Result<BidderStates> {
        BidderStates::register(b)
    }

    fn process(
        &mut self,
        ctx: &mut KeyedContext<'_, B, BidderStates, (), StateLine>,
        input: BidderInput,
    ) -> Result<(), String> {
        let (b, s) = ctx.parts();
        match input {
            BidderInput::Spend(_, price) => b.aggregating(s.spend()).add(price).map_err(err),
            BidderInput::City(_, mut city) => {
                city.extend(std::iter::repeat_n('#', self.padding));
                b.value(s.city()).update(city).map_err(err)
            }
        }
    }

    fn on_end(
        &mut self,
        ctx: &mut KeyedContext<'_, B, BidderStates, (), StateLine>,
    ) -> Result<(), String> {
        let (b, s) = ctx.parts();
        let mut keys: Vec<u64> = b
            .keys(s.spend(), &())
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        for key in b.keys(s.city(), &()).map_err(err)? {
            keys.push(key.map_err(err)?);
        }
        keys.sort_unstable();
        keys.dedup();
        let mut lines = Vec::new();
        for key in keys {
            b.set_current_key(key).map_err(err)?;
            let spend = b.aggregating(s.spend()).get().map_err(err)?;
            let city = b
                .value(s.city())
                .get()
                .map_err(err)?
                .map(|c| c.trim_end_matches('#').to_string());
            lines.push((
                format!("person {key}"),
                format!("{spend:?} {city:?}"),
                0,
                0,
                u64::from(spend.is_some()),
            ));
        }
        lines.into_iter().for_each(|l| ctx.emit(l));
        Ok(())
    }
}

/// Runs this process's workers of the job on the backend of the configuration; process 0
/// returns the report (the others `None`).
pub fn run(opts: TimelyOptions) -> Result<Option<JobReport>, JobError> {
    match opts.config.backend {
        BackendKind::Heap => run_on::<HeapKeyedStateBackend<u64>>(opts),
        #[cfg(feature = "mmap")]
        BackendKind::Mmap => run_on::<state_mmap::MmapKeyedStateBackend<u64>>(opts),
        #[cfg(not(feature = "mmap"))]
        BackendKind::Mmap => {
            Err("the mmap backend is not compiled in: build with --features mmap".into())
        }
    }
}

/// [`run`] on backend `B`: one `B::Shared` per process (the mmap backend's environment: one
/// memory budget for every backend of the process).
pub fn run_on<B>(opts: TimelyOptions) -> Result<Option<JobReport>, JobError>
where
    B: JobBackend + CheckpointableBackend + 'static,
    B::Shared: Clone + Send + Sync + 'static,
{
    let started = Instant::now();
    let config = &opts.config;
    let storage = config.checkpoint_storage(&opts.job)?;
    let restore = match &opts.restore {
        crate::job::RestoreFrom::Nothing => RestoreFrom::Nothing,
        crate::job::RestoreFrom::Latest => RestoreFrom::Latest,
        crate::job::RestoreFrom::LatestIfAny => RestoreFrom::LatestIfAny,
        crate::job::RestoreFrom::Path(p) => {
            let (storage, c) = crate::tools::open_checkpoint(config, p)?;
            RestoreFrom::Checkpoint {
                storage,
                checkpoint: Box::new(c),
            }
        }
    };
    let mut job_config = JobConfig::new(storage);
    job_config.checkpoint = config.checkpoint_config();
    job_config.max_parallelism = config.max_parallelism;
    job_config.restore = restore;
    let job = Job::open(job_config)?;
    let events = opts.events;
    let gen_config = generator_config();
    let end_watermark = final_watermark(events, &gen_config);
    let lines = Arc::new(Mutex::new(Vec::<StateLine>::new()));
    let (collected, worker_job) = (Arc::clone(&lines), job.clone());
    let shared = B::shared(config)?;
    let backend_config = config.clone();
    let read = opts.crash_after.map(|_| Arc::new(AtomicU64::new(0)));
    let delay = opts.read_delay;
    let state_padding = opts.state_padding;
    if let (Some(at), Some(read)) = (opts.crash_after, read.clone()) {
        crash_later(at, read, job.clone(), storage_of(&job));
    }
    flowstate_timely::cluster::run(&opts.cluster, &job, move |worker| {
        let (lines, job, gen_config) = (
            Arc::clone(&collected),
            worker_job.clone(),
            gen_config.clone(),
        );
        let (shared, config) = (shared.clone(), backend_config.clone());
        let read = read.clone();
        let make =
            move |range, _max| B::create_in(&config, range, &shared).map_err(|e| e.to_string());
        flowstate_timely::cluster::dataflow(worker, move |scope| {
            let mut ck = Checkpointing::new(scope, &job);
            let mut source = SourceOptions::new("source", SPLITS);
            if !delay.is_zero() {
                // Short steps between the sleeps: epochs close and checkpoints go on.
                source.batch = 64;
            }
            source.out_of_orderness = OUT_OF_ORDERNESS_MS;
            source.end_watermark = end_watermark;
            let events = ck.split_source(
                source,
                NexmarkSplits {
                    events,
                    config: gen_config,
                    read,
                    delay,
                },
            )?;
            let bids = events.clone().flat_map(|e| match e {
                NexEvent::Bid(auction, _, price, ts) => Some((auction, price, ts)),
                NexEvent::Person(..) => None,
            });
            let people = events.flat_map(|e| match e {
                NexEvent::Bid(_, bidder, price, _) => Some(BidderInput::Spend(bidder, price)),
                NexEvent::Person(id, city) => Some(BidderInput::City(id, city)),
            });
            let auctions = ck.keyed(
                bids,
                KeyedOptions::new("auctions", FixedWidthSerializer::<u64>::new()),
                |r: &(u64, u64, i64)| r.0,
                make.clone(),
                Auctions,
            )?;
            let bidders = ck.keyed(
                people,
                KeyedOptions::new("bidders", FixedWidthSerializer::<u64>::new()),
                BidderInput::key,
                make,
                Bidders {
                    padding: state_padding,
                },
            )?;
            for out in [auctions, bidders] {
                let lines = Arc::clone(&lines);
                out.sink(
                    Exchange::new(|_: &StateLine| 0),
                    "digest",
                    move |(input, _)| {
                        input.for_each(|_, d| {
                            if let Ok(mut l) = lines.lock() {
                                l.extend(d.drain(..));
                            }
                        });
                    },
                );
            }
            ck.finish();
            Ok(())
        })
    })?;
    if opts.cluster.process != 0 {
        return Ok(None);
    }
    // The events already read by the restored run (the source's split offsets).
    let restored_offset = match job.restored() {
        Some((_, c)) => {
            let desc = state_api::OperatorListStateDescriptor::<(u32, u64, i64, bool)>::new(
                "source-splits",
                state_api::RedistributionMode::EvenSplit,
            )?;
            c.operator_state("source", 0, 1)?
                .list_state(&desc)?
                .get()?
                .iter()
                .map(|s| s.1)
                .sum::<u64>()
        }
        None => 0,
    };
    let mut lines = lines
        .lock()
        .map_err(|_| "digest lines: lock poisoned")?
        .clone();
    lines.sort();
    let text: String = lines.iter().map(|l| format!("{} {}\n", l.0, l.1)).collect();
    Ok(Some(JobReport {
        restored: job.restored_id().map(|id| (id, restored_offset)),
        offset: events,
        processed: events.saturating_sub(restored_offset),
        checkpoints: job.completed(),
        windows_closed: lines.iter().map(|l| l.2).sum(),
        bids_in_closed_windows: lines.iter().map(|l| l.3).sum(),
        bidders: lines.iter().map(|l| l.4).sum(),
        digest: xxhash_rust::xxh3::xxh3_64(text.as_bytes()),
        elapsed: started.elapsed(),
        stopped: false,
    }))
}

fn storage_of(job: &Job) -> checkpoint::CheckpointStorage {
    job.config().storage.clone()
}

/// Ends the process (exit code 3, no cleanup: a crash) once its sources read `at` events and
/// a checkpoint of this run completed.
fn crash_later(at: u64, read: Arc<AtomicU64>, job: Job, storage: checkpoint::CheckpointStorage) {
    let watch = move || loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if read.load(Ordering::SeqCst) < at {
            continue;
        }
        let ours = checkpoint::CompletedCheckpoint::latest(&storage)
            .ok()
            .flatten()
            .is_some_and(|c| job.epoch_of(c.metadata.checkpoint_id).is_some());
        if ours {
            eprintln!(
                "crashing on purpose after reading {} events",
                read.load(Ordering::SeqCst)
            );
            std::process::exit(3);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("crash-after".into())
        .spawn(watch)
    {
        eprintln!("warning: --crash-after: no thread to crash from: {e}");
    }
}

/// A hostfile with `n` free ports on 127.0.0.1, for a one-machine run of `n` processes.
pub fn local_hostfile(dir: &std::path::Path, n: usize) -> Result<PathBuf, JobError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut text = String::new();
    for l in &listeners {
        text.push_str(&format!("127.0.0.1:{}\n", l.local_addr()?.port()));
    }
    let path = dir.join("hosts");
    std::fs::write(&path, text)?;
    Ok(path)
}
