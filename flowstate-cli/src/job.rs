//! The main job: a stateful stream job over Nexmark events with checkpoints, restore and
//! rescaling — what `flowstate run` runs.
//!
//! Operators (all in one thread, Flink-style barriers between batches give consistent cuts):
//! - `source`: the Nexmark generator; its offset is operator state.
//! - `auctions`, keyed by auction id: bids and the highest price per auction in 10-second
//!   tumbling event-time windows (reducing state, the window as namespace), closed by event-time
//!   timers; closed windows add to a per-auction total (value state).
//! - `bidders`, keyed by person id: a running aggregate of bids and money per person
//!   (aggregating state) and the person's city from Person events (value state).
//!
//! [`JobReport::digest`] summarizes the final state deterministically: a run that crashed and
//! recovered, or that was rescaled or moved to another backend, ends with the same digest as a
//! run that never failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::{
    Barrier, CheckpointCoordinator, CheckpointEvent, CheckpointStorage, CompletedCheckpoint,
    RestoreOptions, SubtaskCommand, SubtaskEndpoint,
};
use nexmark::config::NexmarkConfig;
use nexmark::event::Event;
use nexmark::EventGenerator;
use state_api::{
    assign_to_key_group, operator_index_for_key_group, AggregateFunction,
    AggregatingStateDescriptor, AggregatingStateHandle, FixedWidthSerializer, KeyGroupRange,
    KeyedStateBackend, KeyedStateBackendExt, OperatorListStateDescriptor, OperatorStateStore,
    RedistributionMode, ReducingStateDescriptor, ReducingStateHandle, TimerServiceDescriptor,
    TimerServiceHandle, ValueStateDescriptor, ValueStateHandle,
};
use state_heap::HeapKeyedStateBackend;

use flowstate::config::{BackendKind, Config};

/// Length of the tumbling windows (event time, milliseconds).
pub const WINDOW_MS: i64 = 10_000;
/// Bounded out-of-orderness of the watermark (milliseconds).
pub const OUT_OF_ORDERNESS_MS: i64 = 2_000;
/// Events processed between two looks at the coordinator's barriers.
const BATCH: u64 = 2_000;
/// Fixed base time of the generator, so every run sees the same events.
pub const BASE_TIME: u64 = 1_700_000_000_000;
/// The operators of the job.
pub const OPERATORS: [&str; 3] = ["source", "auctions", "bidders"];

/// An error of the job, as one line.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// Returned by [`run`] when `crash_after` was reached: the process should end at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedCrash {
    /// Events processed by the run before the crash.
    pub events: u64,
    /// Source offset at the crash.
    pub offset: u64,
}

impl std::fmt::Display for SimulatedCrash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simulated crash after {} events (offset {})",
            self.events, self.offset
        )
    }
}

impl std::error::Error for SimulatedCrash {}

/// Where to restore from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreFrom {
    /// Start empty.
    Nothing,
    /// The latest completed checkpoint of the job; an error when there is none.
    Latest,
    /// The latest completed checkpoint of the job, or empty when there is none (recovery of a
    /// run that may have crashed before its first checkpoint).
    LatestIfAny,
    /// A given checkpoint or savepoint: its directory or `_metadata`, as a URL or a path.
    Path(String),
}

/// What `flowstate run` asks of the job.
#[derive(Clone)]
pub struct JobOptions {
    /// Configuration (backend, checkpoint settings, S3).
    pub config: Config,
    /// Job id: the directory under the checkpoint root.
    pub job: String,
    /// Process events until the source offset reaches this.
    pub events: u64,
    /// Parallelism of the keyed operators.
    pub parallelism: u32,
    /// Where to restore from.
    pub restore: RestoreFrom,
    /// Stop hard (no final checkpoint, no cleanup) after this many events of this run.
    pub crash_after: Option<u64>,
    /// Called after every batch with progress.
    pub progress: Option<Arc<dyn Fn(&Progress) + Send + Sync>>,
    /// Set from outside (Ctrl-C) to stop after a final checkpoint.
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for JobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOptions")
            .field("config", &self.config)
            .field("job", &self.job)
            .field("events", &self.events)
            .field("parallelism", &self.parallelism)
            .field("restore", &self.restore)
            .field("crash_after", &self.crash_after)
            .finish_non_exhaustive()
    }
}

/// Progress of a running job.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Source offset (events processed over all runs).
    pub offset: u64,
    /// Entries in keyed state (`None` where the backend does not count them cheaply).
    pub state_entries: Option<usize>,
    /// Last completed checkpoint.
    pub last_checkpoint: Option<u64>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct JobReport {
    /// The checkpoint or savepoint restored, with the source offset it held.
    pub restored: Option<(u64, u64)>,
    /// Source offset at the end.
    pub offset: u64,
    /// Events processed by this run.
    pub processed: u64,
    /// Checkpoints completed during this run.
    pub checkpoints: Vec<u64>,
    /// Windows closed (all runs, from state).
    pub windows_closed: u64,
    /// Bids counted in closed windows (all runs, from state).
    pub bids_in_closed_windows: u64,
    /// Bidders with state.
    pub bidders: u64,
    /// A digest of the final state (same for any run over the same events).
    pub digest: u64,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// True when the run stopped early on request.
    pub stopped: bool,
}

/// Opens the checkpoint storage of a URL (`file:///…`, `s3://…`, `memory://`, or a path).
pub fn open_storage(config: &Config, url: &str, job: &str) -> Result<CheckpointStorage, JobError> {
    let storage = storage_s3::Storage::from_config(&config.storage_config(url))?;
    checkpoint_storage(&storage, job)
}

/// The checkpoint storage of `job` in `storage`.
fn checkpoint_storage(
    storage: &storage_s3::Storage,
    job: &str,
) -> Result<CheckpointStorage, JobError> {
    // The configured transfer options apply to checkpoint uploads and downloads too.
    Ok(CheckpointStorage::from_storage(storage, job)?)
}

/// Sum and count of bid prices per person.
struct Spend;

impl AggregateFunction<u64, (u64, u64), (u64, u64)> for Spend {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, price: u64, (n, sum): (u64, u64)) -> (u64, u64) {
        (n + 1, sum + price)
    }
    fn get_result(&self, acc: &(u64, u64)) -> (u64, u64) {
        *acc
    }
    fn merge(&self, a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
        (a.0 + b.0, a.1 + b.1)
    }
}

/// The states of the `auctions` operator.
pub struct AuctionStates {
    bids: ReducingStateHandle<u64, i64>,
    max_price: ReducingStateHandle<u64, i64>,
    closed: ValueStateHandle<(u64, u64, u64), ()>,
    timers: TimerServiceHandle<i64>,
}

impl AuctionStates {
    /// Registers the states on `b`.
    pub fn register<B: KeyedStateBackend>(b: &mut B) -> state_api::Result<Self> {
        Ok(AuctionStates {
            bids: b
                .register_reducing(ReducingStateDescriptor::new("window-bids", |a, b| a + b)?)?,
            max_price: b
                .register_reducing(ReducingStateDescriptor::new("window-max-price", u64::max)?)?,
            closed: b.register_value(ValueStateDescriptor::new("closed-windows")?)?,
            timers: b.register_timer_service(TimerServiceDescriptor::new("window-timers")?)?,
        })
    }
}

impl AuctionStates {
    /// Bids per window.
    pub fn bids(&self) -> &ReducingStateHandle<u64, i64> {
        &self.bids
    }
    /// Highest price per window.
    pub fn max_price(&self) -> &ReducingStateHandle<u64, i64> {
        &self.max_price
    }
    /// Closed windows, bids in them, highest price in them.
    pub fn closed(&self) -> &ValueStateHandle<(u64, u64, u64), ()> {
        &self.closed
    }
}

/// The states of the `bidders` operator.
pub struct BidderStates {
    spend: AggregatingStateHandle<u64, (u64, u64), ()>,
    city: ValueStateHandle<String, ()>,
}

impl BidderStates {
    /// Registers the states on `b`.
    pub fn register<B: KeyedStateBackend>(b: &mut B) -> state_api::Result<Self> {
        Ok(BidderStates {
            spend: b.register_aggregating(AggregatingStateDescriptor::new("spend", Spend)?)?,
            city: b.register_value(ValueStateDescriptor::new("city")?)?,
        })
    }
}

impl BidderStates {
    /// Bids and money per person.
    pub fn spend(&self) -> &AggregatingStateHandle<u64, (u64, u64), ()> {
        &self.spend
    }
    /// The person's city.
    pub fn city(&self) -> &ValueStateHandle<String, ()> {
        &self.city
    }
}

fn offset_desc() -> state_api::Result<OperatorListStateDescriptor<u64>> {
    OperatorListStateDescriptor::new("source-offset", RedistributionMode::Union)
}

/// A keyed backend the job can run on and checkpoint.
pub trait JobBackend: KeyedStateBackend<Key = u64> + Sized {
    /// What the backends of one run share, made once per run: for the mmap backend one
    /// environment, i.e. one memory budget (`state.mmap.memory-budget`, per process) and one
    /// pool of background threads for every operator and subtask.
    type Shared;
    /// Makes what the backends of one run share.
    fn shared(config: &Config) -> Result<Self::Shared, JobError>;
    /// Creates the backend of one subtask from the parts every backend of the run shares.
    fn create_in(
        config: &Config,
        range: KeyGroupRange,
        shared: &Self::Shared,
    ) -> Result<Self, JobError>;
    /// Creates a backend alone (with shared parts of its own).
    fn create(config: &Config, range: KeyGroupRange) -> Result<Self, JobError> {
        Self::create_in(config, range, &Self::shared(config)?)
    }
    /// Snapshots for a barrier (heap: incremental when configured).
    fn snapshot_for(
        &mut self,
        ep: &mut SubtaskEndpoint,
        barrier: &Barrier,
    ) -> checkpoint::Result<()>;
    /// Entries held (for progress), if the backend knows cheaply.
    fn entries(&self) -> Option<usize> {
        None
    }
    /// Restores subtask `subtask` of `operator` from a completed checkpoint or savepoint.
    fn restore_from(
        &mut self,
        c: &CompletedCheckpoint,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        _config: &Config,
    ) -> Result<(), JobError> {
        if c.has_native_state(operator) {
            return Err(format!(
                "operator '{operator}' of checkpoint {} holds native mmap files, which only the \
                 mmap backend reads: use --backend mmap (a savepoint made with --backend mmap \
                 restores on either backend)",
                c.path
            )
            .into());
        }
        c.restore_keyed(storage, operator, subtask, self)?;
        Ok(())
    }
}

/// Registers `operator`'s states on `b` (with `register`) and restores subtask `subtask` of it
/// from `from`, if given. Canonical state is restored after the registration, so that its
/// records are decoded straight into the registered states (one pass, on the heap backend's
/// restore threads); native files need a fresh backend, so they are restored first.
pub fn restore_registered<B: JobBackend, S>(
    b: &mut B,
    from: Option<(&CompletedCheckpoint, &CheckpointStorage)>,
    operator: &str,
    subtask: u32,
    config: &Config,
    register: impl FnOnce(&mut B) -> state_api::Result<S>,
) -> Result<S, JobError> {
    match from {
        Some((c, storage)) if c.has_native_state(operator) => {
            b.restore_from(c, storage, operator, subtask, config)?;
            Ok(register(b)?)
        }
        Some((c, storage)) => {
            let states = register(b)?;
            b.restore_from(c, storage, operator, subtask, config)?;
            Ok(states)
        }
        None => Ok(register(b)?),
    }
}

impl JobBackend for HeapKeyedStateBackend<u64> {
    type Shared = ();
    fn shared(_config: &Config) -> Result<(), JobError> {
        Ok(())
    }
    fn create_in(config: &Config, range: KeyGroupRange, _shared: &()) -> Result<Self, JobError> {
        Ok(HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(config.max_parallelism)
            .key_group_range(range)
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .build()?)
    }
    fn snapshot_for(
        &mut self,
        ep: &mut SubtaskEndpoint,
        barrier: &Barrier,
    ) -> checkpoint::Result<()> {
        ep.snapshot_heap(barrier, self, None)
    }
    fn entries(&self) -> Option<usize> {
        Some(self.num_entries())
    }
}

#[cfg(feature = "mmap")]
impl JobBackend for state_mmap::MmapKeyedStateBackend<u64> {
    /// One environment for the whole run: the memory budget is the process's, shared evenly
    /// by every backend, and so are the background threads.
    type Shared = state_mmap::MmapEnvironment;
    fn shared(config: &Config) -> Result<state_mmap::MmapEnvironment, JobError> {
        Ok(state_mmap::MmapEnvironment::new(state_mmap::EnvOptions {
            memory_budget: usize::try_from(config.mmap_memory_budget).unwrap_or(usize::MAX),
            ..state_mmap::EnvOptions::default()
        })?)
    }
    fn create_in(
        config: &Config,
        range: KeyGroupRange,
        env: &state_mmap::MmapEnvironment,
    ) -> Result<Self, JobError> {
        let mut b = state_mmap::MmapKeyedStateBackend::<u64>::builder()
            .max_parallelism(config.max_parallelism)
            .key_group_range(range)
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .environment(env.clone());
        // Every backend gets a fresh folder of its own under `state.mmap.dir` (the stores of
        // one process never share one), deleted when it is dropped; the folders of a run that
        // crashed are swept by the next run's first backend.
        if let Some(dir) = &config.mmap_dir {
            b = b.working_directory_in(dir);
        }
        Ok(b.build()?)
    }
    fn snapshot_for(
        &mut self,
        ep: &mut SubtaskEndpoint,
        barrier: &Barrier,
    ) -> checkpoint::Result<()> {
        // Incremental checkpoints hand in the engine's immutable files (uploaded once, then
        // referenced); full checkpoints and savepoints are canonical streams.
        ep.snapshot_mmap(barrier, self, None)
    }
    fn restore_from(
        &mut self,
        c: &CompletedCheckpoint,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        _config: &Config,
    ) -> Result<(), JobError> {
        if !c.has_native_state(operator) {
            c.restore_keyed(storage, operator, subtask, self)?;
            return Ok(());
        }
        // Native files are downloaded into the backend's own folder (so that they can be
        // hard-linked in, and a crash leaves them where the sweep of that folder finds them),
        // then the download directory goes.
        let download = self.engine().dir().join("restore-download");
        let result = c.restore_mmap(storage, operator, subtask, self, &download);
        let _ = std::fs::remove_dir_all(&download);
        result?;
        Ok(())
    }
}

/// The key bytes the backends hash (fixed-width big-endian u64).
fn owner(key: u64, max_parallelism: u32, parallelism: u32) -> usize {
    let kg = assign_to_key_group(&key.to_be_bytes(), max_parallelism);
    operator_index_for_key_group(max_parallelism, parallelism, kg) as usize
}

/// Runs the job on the backend chosen by the configuration.
pub fn run(opts: JobOptions) -> Result<JobReport, JobError> {
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

struct Subtask<B> {
    backend: B,
}

/// Restores (if asked), runs and checkpoints the job on backend `B`.
pub fn run_on<B: JobBackend>(opts: JobOptions) -> Result<JobReport, JobError> {
    let started = Instant::now();
    let config = &opts.config;
    let p = opts.parallelism;
    state_api::validate_parallelism(config.max_parallelism, p)?;
    let dir = config
        .checkpoints
        .dir
        .clone()
        .ok_or("no checkpoint directory: set state.checkpoints.dir or pass --checkpoint-dir")?;
    // This run takes the job's checkpoint directory over: uploads a killed run left half done
    // (local staging files nothing else ever removes) go now.
    let storage = config.checkpoint_storage(&opts.job)?;
    // The checkpoint to restore and the storage it lives in (a savepoint may live elsewhere).
    let (restore_storage, restored) = match &opts.restore {
        RestoreFrom::Nothing => (storage.clone(), None),
        RestoreFrom::LatestIfAny => (storage.clone(), CompletedCheckpoint::latest(&storage)?),
        RestoreFrom::Latest => match CompletedCheckpoint::latest(&storage)? {
            Some(c) => (storage.clone(), Some(c)),
            None => {
                return Err(format!(
                    "nothing to restore: no completed checkpoint of job '{}' under {}{}",
                    opts.job,
                    crate::tools::shown_dir(&dir),
                    crate::tools::jobs_hint(&storage)?
                )
                .into())
            }
        },
        RestoreFrom::Path(path) => {
            let (s, c) = crate::tools::open_checkpoint(config, path)?;
            (s, Some(c))
        }
    };
    if let Some(c) = &restored {
        c.check_operators(&OPERATORS, RestoreOptions::default())?;
    }

    // Checkpoints outlive a crash either way; `on-shutdown` decides about a clean end.
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config.checkpoint_config());
    let mut source_ep = builder.register_subtask("source", 0, 1, config.max_parallelism)?;
    let mut auction_eps = Vec::new();
    let mut bidder_eps = Vec::new();
    for i in 0..p {
        auction_eps.push(builder.register_subtask("auctions", i, p, config.max_parallelism)?);
        bidder_eps.push(builder.register_subtask("bidders", i, p, config.max_parallelism)?);
    }

    // Restore state.
    let mut source_state = match &restored {
        Some(c) => c.operator_state("source", 0, 1)?,
        None => OperatorStateStore::new(),
    };
    let desc = offset_desc()?;
    let start_offset = source_state
        .list_state(&desc)?
        .get()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut auctions: Vec<Subtask<B>> = Vec::new();
    let mut bidders: Vec<Subtask<B>> = Vec::new();
    let mut auction_states = Vec::new();
    let mut bidder_states = Vec::new();
    // Every backend of the run shares one memory budget and one set of background threads.
    let shared = B::shared(config)?;
    // A progress bar where the run shows one (a terminal, not --quiet).
    let bar = match &restored {
        Some(_) => crate::tools::progress_bar(
            opts.progress.is_some(),
            2 * u64::from(p),
            false,
            "subtasks restored",
        )?,
        None => None,
    };
    for i in 0..p {
        let range = KeyGroupRange::for_operator(config.max_parallelism, p, i)?;
        let mut a = B::create_in(config, range, &shared)?;
        let mut b = B::create_in(config, range, &shared)?;
        let from = restored.as_ref().map(|c| (c, &restore_storage));
        auction_states.push(restore_registered(
            &mut a,
            from,
            "auctions",
            i,
            config,
            AuctionStates::register,
        )?);
        bidder_states.push(restore_registered(
            &mut b,
            from,
            "bidders",
            i,
            config,
            BidderStates::register,
        )?);
        if let (Some(bar), Some(_)) = (&bar, &restored) {
            bar.inc(2);
        }
        auctions.push(Subtask { backend: a });
        bidders.push(Subtask { backend: b });
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report_restored = restored
        .as_ref()
        .map(|c| (c.metadata.checkpoint_id, start_offset));

    let coordinator = builder.start()?;
    let events_rx = coordinator.subscribe();
    let mut generator = EventGenerator::new(NexmarkConfig {
        base_time: BASE_TIME,
        ..Default::default()
    })
    .with_offset(start_offset);
    let mut offset = start_offset;
    let mut max_ts: i64 = 0;
    let mut checkpoints = Vec::new();
    let mut stopped = false;
    let mut crashed = false;

    loop {
        // A batch of events.
        let end = (offset + BATCH).min(opts.events);
        while offset < end {
            let Some(event) = generator.next() else { break };
            offset += 1;
            match event {
                Event::Bid(bid) => {
                    let ts = bid.date_time as i64;
                    max_ts = max_ts.max(ts);
                    let auction = bid.auction as u64;
                    let bidder = bid.bidder as u64;
                    let price = bid.price as u64;
                    let window = ts - ts.rem_euclid(WINDOW_MS);
                    let i = owner(auction, config.max_parallelism, p);
                    let (a, s) = (&mut auctions[i].backend, &auction_states[i]);
                    a.set_current_key(auction)?;
                    a.reducing_in(&s.bids, &window).add(1)?;
                    a.reducing_in(&s.max_price, &window).add(price)?;
                    a.timers(&s.timers)
                        .register_event_time_timer(&window, window + WINDOW_MS - 1)?;
                    let j = owner(bidder, config.max_parallelism, p);
                    let b = &mut bidders[j].backend;
                    b.set_current_key(bidder)?;
                    b.aggregating(&bidder_states[j].spend).add(price)?;
                }
                Event::Person(person) => {
                    let id = person.id as u64;
                    let j = owner(id, config.max_parallelism, p);
                    let b = &mut bidders[j].backend;
                    b.set_current_key(id)?;
                    b.value(&bidder_states[j].city)
                        .update(person.city.clone())?;
                }
                Event::Auction(_) => {}
            }
            if opts.crash_after.is_some_and(|n| offset - start_offset >= n) {
                crashed = true;
                break;
            }
        }
        if crashed {
            // No final checkpoint: the caller ends the process at once (dropping the
            // coordinator on the way out stops it the way a crash would).
            return Err(Box::new(SimulatedCrash {
                events: offset - start_offset,
                offset,
            }));
        }
        // The watermark passes: close due windows.
        let watermark = max_ts - OUT_OF_ORDERNESS_MS;
        for (a, s) in auctions.iter_mut().zip(&auction_states) {
            close_windows(&mut a.backend, s, watermark)?;
        }
        // Barriers: all subtasks snapshot here, between two batches (a consistent cut).
        handle_barriers(
            &mut source_ep,
            &mut auction_eps,
            &mut bidder_eps,
            &mut source_state,
            &desc,
            offset,
            &mut auctions,
            &mut bidders,
        )?;
        while let Ok(ev) = events_rx.try_recv() {
            match ev {
                CheckpointEvent::Completed { checkpoint_id, .. } => checkpoints.push(checkpoint_id),
                // The coordinator gave up (fenced by a newer run, or too many failed
                // checkpoints): no work of this run can be checkpointed any more, so stop now
                // with the coordinator's own error (the next request returns it, typed).
                CheckpointEvent::JobFailed { reason } => {
                    return Err(match coordinator.trigger_checkpoint() {
                        Err(e) => e.into(),
                        Ok(_) => {
                            format!("the checkpoint coordinator failed the job: {reason}").into()
                        }
                    });
                }
                _ => {}
            }
        }
        if let Some(progress) = &opts.progress {
            progress(&Progress {
                offset,
                state_entries: auctions
                    .iter()
                    .chain(&bidders)
                    .map(|s| s.backend.entries())
                    .sum::<Option<usize>>(),
                last_checkpoint: checkpoints.last().copied(),
            });
        }
        if opts.stop.load(Ordering::SeqCst) {
            stopped = true;
            break;
        }
        if offset >= opts.events {
            break;
        }
    }

    // A final checkpoint, so the next run (or a --restore latest) continues from here.
    let pending = coordinator.trigger_checkpoint()?;
    // The coordinator aborts the checkpoint at its timeout and says why; this deadline, a little
    // later, only guards against a coordinator that never answers.
    let deadline = Instant::now() + config.checkpoints.timeout + Duration::from_secs(5);
    let id = pending.id();
    loop {
        handle_barriers(
            &mut source_ep,
            &mut auction_eps,
            &mut bidder_eps,
            &mut source_state,
            &desc,
            offset,
            &mut auctions,
            &mut bidders,
        )?;
        let mut done = false;
        while let Ok(ev) = events_rx.try_recv() {
            match ev {
                CheckpointEvent::Completed { checkpoint_id, .. } => {
                    checkpoints.push(checkpoint_id);
                    done |= checkpoint_id >= id;
                }
                CheckpointEvent::Aborted {
                    checkpoint_id,
                    reason,
                } if checkpoint_id == id => {
                    let saved = match checkpoints.last() {
                        Some(c) => format!("the last saved state is checkpoint {c}'s"),
                        None => "no checkpoint of this run completed".to_string(),
                    };
                    return Err(format!(
                        "the final checkpoint {id} was aborted: {reason} (state.checkpoints.\
                         timeout is {}); {saved}",
                        humantime::format_duration(config.checkpoints.timeout)
                    )
                    .into());
                }
                CheckpointEvent::JobFailed { reason } => {
                    return Err(format!("the final checkpoint {id} failed: {reason}").into());
                }
                _ => {}
            }
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the final checkpoint {id} got no answer within state.checkpoints.timeout ({}) \
                 and 5s more",
                humantime::format_duration(config.checkpoints.timeout)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    // Digest of the final state, after the final watermark of this offset.
    let mut lines = BTreeMap::new();
    let (mut windows_closed, mut bids_closed, mut bidders_n) = (0, 0, 0);
    for (a, s) in auctions.iter_mut().zip(&auction_states) {
        // Collected: the loop sets the current key, which the keys' iterator would borrow.
        let keys: Vec<u64> = a.backend.keys(&s.closed, &())?.collect::<Result<_, _>>()?;
        for key in keys {
            a.backend.set_current_key(key)?;
            if let Some((w, n, m)) = a.backend.value(&s.closed).get()? {
                windows_closed += w;
                bids_closed += n;
                lines.insert(format!("auction {key}"), format!("{w} {n} {m}"));
            }
        }
    }
    for (b, s) in bidders.iter_mut().zip(&bidder_states) {
        let mut keys: Vec<u64> = b.backend.keys(&s.spend, &())?.collect::<Result<_, _>>()?;
        for key in b.backend.keys(&s.city, &())? {
            keys.push(key?);
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            b.backend.set_current_key(key)?;
            let spend = b.backend.aggregating(&s.spend).get()?;
            let city = b.backend.value(&s.city).get()?;
            if spend.is_some() {
                bidders_n += 1;
            }
            lines.insert(format!("person {key}"), format!("{spend:?} {city:?}"));
        }
    }
    let text: String = lines.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    coordinator.shutdown()?;
    Ok(JobReport {
        restored: report_restored,
        offset,
        processed: offset - start_offset,
        checkpoints,
        windows_closed,
        bids_in_closed_windows: bids_closed,
        bidders: bidders_n,
        digest: xxhash_rust::xxh3::xxh3_64(text.as_bytes()),
        elapsed: started.elapsed(),
        stopped,
    })
}

/// Fires the window timers up to `watermark`: each window's bids and top price move into the
/// auction's closed-window totals and the window state is cleared.
fn close_windows<B: JobBackend>(
    b: &mut B,
    s: &AuctionStates,
    watermark: i64,
) -> Result<(), JobError> {
    for t in b.advance_watermark(&s.timers, watermark)? {
        b.set_current_key(t.key)?;
        let n = b.reducing_in(&s.bids, &t.namespace).get()?.unwrap_or(0);
        let m = b
            .reducing_in(&s.max_price, &t.namespace)
            .get()?
            .unwrap_or(0);
        b.reducing_in(&s.bids, &t.namespace).clear()?;
        b.reducing_in(&s.max_price, &t.namespace).clear()?;
        let (w, total, top) = b.value(&s.closed).get()?.unwrap_or((0, 0, 0));
        b.value(&s.closed).update((w + 1, total + n, top.max(m)))?;
    }
    Ok(())
}

/// Takes the snapshots of every subtask when a barrier has arrived.
#[allow(clippy::too_many_arguments)]
fn handle_barriers<B: JobBackend>(
    source_ep: &mut SubtaskEndpoint,
    auction_eps: &mut [SubtaskEndpoint],
    bidder_eps: &mut [SubtaskEndpoint],
    source_state: &mut OperatorStateStore,
    desc: &OperatorListStateDescriptor<u64>,
    offset: u64,
    auctions: &mut [Subtask<B>],
    bidders: &mut [Subtask<B>],
) -> Result<(), JobError> {
    let Some(barrier) = next_barrier(source_ep) else {
        return Ok(());
    };
    source_state.list_state(desc)?.update(&[offset])?;
    source_ep.snapshot::<HeapKeyedStateBackend<u64>>(&barrier, None, Some(source_state))?;
    for (ep, s) in auction_eps.iter_mut().zip(auctions.iter_mut()) {
        let b = wait_barrier(ep, barrier.checkpoint_id)?;
        s.backend.snapshot_for(ep, &b)?;
    }
    for (ep, s) in bidder_eps.iter_mut().zip(bidders.iter_mut()) {
        let b = wait_barrier(ep, barrier.checkpoint_id)?;
        s.backend.snapshot_for(ep, &b)?;
    }
    Ok(())
}

fn next_barrier(ep: &mut SubtaskEndpoint) -> Option<Barrier> {
    while let Some(c) = ep.try_recv() {
        if let SubtaskCommand::Barrier(b) = c {
            return Some(b);
        }
    }
    None
}

fn wait_barrier(ep: &mut SubtaskEndpoint, id: u64) -> Result<Barrier, JobError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(SubtaskCommand::Barrier(b)) = ep.recv_timeout(Duration::from_millis(50)) {
            if b.checkpoint_id == id {
                return Ok(b);
            }
        }
    }
    Err(format!(
        "barrier {id} did not reach {} subtask {}",
        ep.operator_id(),
        ep.subtask()
    )
    .into())
}
