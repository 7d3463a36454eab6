//! The front door for the common case: one process, a few keyed operators with N subtasks each,
//! periodic (and manual) checkpoints to the configured URL, restore of the latest on start.
//!
//! ```
//! use flowstate::api::{KeyedStateBackend, ValueStateDescriptor};
//! use flowstate::config::ConfigLoader;
//! use flowstate::pipeline::Pipeline;
//!
//! # fn main() -> Result<(), flowstate::pipeline::Error> {
//! # let dir = std::env::temp_dir().join(format!("flowstate-doc-{}", std::process::id()));
//! let config = ConfigLoader::new()
//!     .set("state.checkpoints.dir", format!("file://{}", dir.display()))?
//!     .load()?;
//! let mut pipeline = Pipeline::heap::<u64>(&config, "clicks")?.operator("counts", 2).start()?;
//! for mut subtask in pipeline.take_subtasks("counts") {
//!     let _count = subtask.backend().register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//!     // Process the records routed to this subtask, calling subtask.poll() between them.
//!     std::thread::spawn(move || subtask.serve_until_stopped());
//! }
//! let checkpoint = pipeline.checkpoint()?; // or wait for state.checkpoints.interval
//! pipeline.stop()?;
//! # let _ = checkpoint; let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! Each [`Subtask`] owns its backend and its operator state and answers checkpoint barriers when
//! its owner calls [`Subtask::poll`] between records (a consistent cut: nothing is half
//! processed). [`PipelineBuilder::start`] restores the latest completed checkpoint of the job, at any
//! parallelism (each subtask reads only its key groups). The backend is anything that implements
//! the snapshot contract ([`crate::api::checkpointing::CheckpointableBackend`]): the heap
//! backend ([`Pipeline::heap`]), the mmap backend, or one of your own ([`Pipeline::with_backend`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use checkpoint::{
    CheckpointConfig, CheckpointCoordinator, CheckpointStorage, CompletedCheckpoint,
    CoordinatorBuilder, RetentionOnShutdown, SubtaskCommand, SubtaskEndpoint,
};
use state_api::checkpointing::CheckpointableBackend;
use state_api::{KeyGroupRange, KeyedStateBackend, OperatorStateStore};

use crate::config::{Config, Retention};

/// What can go wrong in a [`Pipeline`].
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Makes the backend of one subtask for its key groups.
type Factory<B> = Box<dyn Fn(KeyGroupRange) -> Result<B, Error>>;

impl Config {
    /// The checkpoint coordinator's settings from `state.checkpoints.*`.
    pub fn checkpoint_config(&self) -> CheckpointConfig {
        let cp = &self.checkpoints;
        CheckpointConfig {
            interval: Some(cp.interval),
            timeout: cp.timeout,
            min_pause: cp.min_pause,
            max_concurrent: cp.max_concurrent as usize,
            tolerable_failures: cp.tolerable_failures,
            retained: cp.retained as usize,
            retention_on_shutdown: match cp.on_shutdown {
                Retention::Delete => RetentionOnShutdown::Delete,
                Retention::Retain => RetentionOnShutdown::Retain,
            },
            incremental: cp.incremental,
        }
    }

    /// The checkpoint storage of `job` under `state.checkpoints.dir` (with the `s3.*` settings).
    pub fn checkpoint_storage(&self, job: &str) -> Result<CheckpointStorage, Error> {
        let url = self
            .checkpoints
            .dir
            .as_deref()
            .ok_or("no checkpoint directory: set state.checkpoints.dir")?;
        let storage = storage_s3::Storage::from_config(&self.storage_config(url))?;
        // Uploads a killed run of this job left half done go now (local directories only).
        storage.remove_staging_files(&storage.child(&[job])?)?;
        Ok(CheckpointStorage::from_storage(&storage, job)?)
    }
}

/// Builds a [`Pipeline`]: its operators, their parallelism, the backend.
pub struct PipelineBuilder<B> {
    config: Config,
    job: String,
    operators: Vec<(String, u32)>,
    factory: Factory<B>,
}

/// A job of keyed operators in this process whose state is checkpointed as the configuration
/// says, restored from the latest checkpoint when it starts.
pub struct Pipeline<B> {
    coordinator: Option<CheckpointCoordinator>,
    timeout: Duration,
    subtasks: BTreeMap<String, Vec<Subtask<B>>>,
    restored: Option<u64>,
    stop: Arc<AtomicBool>,
}

/// One subtask of a keyed operator: its backend, its operator state and its checkpoint endpoint.
pub struct Subtask<B> {
    backend: B,
    operator_state: OperatorStateStore,
    endpoint: SubtaskEndpoint,
    stop: Arc<AtomicBool>,
}

#[cfg(feature = "heap")]
impl Pipeline<()> {
    /// A pipeline whose subtasks use the heap backend with keys of type `K`.
    pub fn heap<K: state_api::StateKey + serde::Serialize + serde::de::DeserializeOwned>(
        config: &Config,
        job: &str,
    ) -> Result<PipelineBuilder<state_heap::HeapKeyedStateBackend<K>>, Error> {
        let max_parallelism = config.max_parallelism;
        Pipeline::with_backend(config, job, move |range| {
            Ok(state_heap::HeapKeyedStateBackend::<K>::builder()
                .max_parallelism(max_parallelism)
                .key_group_range(range)
                .build()?)
        })
    }
}

impl<B> Pipeline<B> {
    /// A pipeline whose subtasks get their backend from `factory` (given the key groups the
    /// subtask owns; build it with the configuration's max parallelism).
    pub fn with_backend(
        config: &Config,
        job: &str,
        factory: impl Fn(KeyGroupRange) -> Result<B, Error> + 'static,
    ) -> Result<PipelineBuilder<B>, Error> {
        state_api::validate_max_parallelism(config.max_parallelism)?;
        Ok(PipelineBuilder {
            config: config.clone(),
            job: job.to_string(),
            operators: Vec::new(),
            factory: Box::new(factory),
        })
    }
}

impl<B: KeyedStateBackend + CheckpointableBackend> PipelineBuilder<B> {
    /// Adds a keyed operator with `parallelism` subtasks.
    pub fn operator(mut self, id: &str, parallelism: u32) -> Self {
        self.operators.push((id.to_string(), parallelism));
        self
    }

    /// Restores the latest completed checkpoint of the job (if there is one) into new
    /// subtasks and starts the checkpoint coordinator.
    pub fn start(self) -> Result<Pipeline<B>, Error> {
        let config = &self.config;
        let storage = config.checkpoint_storage(&self.job)?;
        let latest = CompletedCheckpoint::latest(&storage)?;
        let mut builder: CoordinatorBuilder =
            CheckpointCoordinator::builder(storage.clone(), config.checkpoint_config());
        if let Some(c) = &latest {
            builder = builder.restored_from(c);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut subtasks = BTreeMap::new();
        for (op, p) in &self.operators {
            state_api::validate_parallelism(config.max_parallelism, *p)?;
            let mut list = Vec::new();
            for i in 0..*p {
                let endpoint = builder.register_subtask(op, i, *p, config.max_parallelism)?;
                let range = KeyGroupRange::for_operator(config.max_parallelism, *p, i)?;
                let mut backend = (self.factory)(range)?;
                let mut operator_state = OperatorStateStore::new();
                if let Some(c) = &latest {
                    // Native files (if the backend writes them) come through a directory of
                    // this restore's own, removed once the backend took them.
                    let download = std::env::temp_dir()
                        .join(format!("flowstate-restore-{}-{op}-{i}", std::process::id()));
                    let restored = c.restore_backend(&storage, op, i, &mut backend, &download);
                    let _ = std::fs::remove_dir_all(&download);
                    restored?;
                    operator_state = c.operator_state(op, i, *p)?;
                }
                list.push(Subtask {
                    backend,
                    operator_state,
                    endpoint,
                    stop: Arc::clone(&stop),
                });
            }
            subtasks.insert(op.clone(), list);
        }
        Ok(Pipeline {
            coordinator: Some(builder.start()?),
            timeout: config.checkpoints.timeout,
            subtasks,
            restored: latest.map(|c| c.metadata.checkpoint_id),
            stop,
        })
    }
}

impl<B: KeyedStateBackend + CheckpointableBackend> Pipeline<B> {
    /// The checkpoint this pipeline was restored from, if any.
    pub fn restored_checkpoint(&self) -> Option<u64> {
        self.restored
    }

    /// The subtasks of `operator`, in subtask order, to move to the threads (or tasks) that run
    /// them; empty when taken before or unknown.
    pub fn take_subtasks(&mut self, operator: &str) -> Vec<Subtask<B>> {
        self.subtasks.remove(operator).unwrap_or_default()
    }

    fn coordinator(&self) -> Result<&CheckpointCoordinator, Error> {
        self.coordinator
            .as_ref()
            .ok_or_else(|| "the pipeline has stopped".into())
    }

    /// Takes a checkpoint now and waits until it is complete (at most the checkpoint timeout);
    /// returns its id. Every subtask must be polled meanwhile (on other threads).
    pub fn checkpoint(&self) -> Result<u64, Error> {
        let coordinator = self.coordinator()?;
        let pending = coordinator.trigger_checkpoint()?;
        // The coordinator aborts it at the timeout; a little more only guards against a
        // coordinator that never answers.
        let done = pending.wait(self.timeout + Duration::from_secs(5))?;
        Ok(done.metadata.checkpoint_id)
    }

    /// [`Pipeline::checkpoint`] for async callers: never blocks the caller's thread (the waits
    /// run on the checkpoint I/O runtime's blocking threads), so subtasks that are tasks of the
    /// same runtime, even a current-thread one, go on and answer the barrier.
    pub async fn checkpoint_async(&self) -> Result<u64, Error> {
        let pending = self.coordinator()?.trigger_checkpoint_async().await?;
        let done = pending
            .wait_async(self.timeout + Duration::from_secs(5))
            .await?;
        Ok(done.metadata.checkpoint_id)
    }

    /// Tells every subtask's [`Subtask::serve_until_stopped`] to return and stops the
    /// coordinator (the retention policy of `state.checkpoints.on-shutdown` applies).
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.coordinator.take() {
            c.shutdown()?;
        }
        Ok(())
    }
}

impl<B: KeyedStateBackend + CheckpointableBackend> Subtask<B> {
    /// The subtask's index in its operator.
    pub fn index(&self) -> u32 {
        self.endpoint.subtask()
    }

    /// The subtask's keyed state backend.
    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The subtask's operator state (checkpointed with its keyed state).
    pub fn operator_state(&mut self) -> &mut OperatorStateStore {
        &mut self.operator_state
    }

    /// Answers the checkpoint barriers that arrived since the last call (snapshots the backend
    /// and the operator state); call it between records. Returns how many it answered.
    pub fn poll(&mut self) -> Result<usize, Error> {
        let mut answered = 0;
        while let Some(command) = self.endpoint.try_recv() {
            if let SubtaskCommand::Barrier(barrier) = command {
                self.endpoint.snapshot_backend(
                    &barrier,
                    &mut self.backend,
                    Some(&self.operator_state),
                )?;
                answered += 1;
            }
        }
        self.endpoint.deliver_notifications(&mut self.backend);
        Ok(answered)
    }

    /// True once [`Pipeline::stop`] was called: a subtask's loop ends then.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Polls until the pipeline stops: for a subtask that has no records of its own to process
    /// (all its work done) but must still take part in checkpoints.
    pub fn serve_until_stopped(mut self) -> Result<Self, Error> {
        while !self.stop.load(Ordering::SeqCst) {
            self.poll()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self)
    }
}
