//! The checkpoint coordinator of one job whose subtasks live in this process.
//!
//! [`CheckpointCoordinator::builder`] registers every subtask and hands each a
//! [`SubtaskEndpoint`]. The coordinator thread triggers checkpoints (periodically and on
//! request), sends [`Barrier`]s down crossbeam channels, and feeds acknowledgements into the
//! sans-IO [`Protocol`]; it carries out the protocol's actions: writing `_metadata` (then the
//! checkpoint is complete), notifying subtasks, discarding subsumed and aborted checkpoints.
//!
//! A subtask handles a barrier on its own thread: [`SubtaskEndpoint::snapshot_backend`] (any
//! backend of the snapshot contract, `state_api::checkpointing`; or
//! [`SubtaskEndpoint::snapshot`]) takes the short synchronous snapshot and queues the upload
//! on the coordinator's writer threads, which acknowledge when the files are written.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use checkpoint::*;
//! use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
//! use state_heap::HeapKeyedStateBackend;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(object_store::memory::InMemory::new());
//! let storage = CheckpointStorage::new(store, "checkpoints", "job-1")?;
//! let mut builder = CheckpointCoordinator::builder(storage.clone(), CheckpointConfig::default());
//! let mut endpoint = builder.register_subtask("counts", 0, 1, 128)?;
//! let coordinator = builder.start()?;
//!
//! let mut backend = HeapKeyedStateBackend::<String>::builder().build()?;
//! let count = backend.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! backend.set_current_key("ann".to_string())?;
//! backend.value(&count).update(1)?;
//!
//! // Normally a periodic trigger; the subtask polls its endpoint between records.
//! let pending = coordinator.trigger_checkpoint()?;
//! while let Some(command) = endpoint.recv_timeout(Duration::from_secs(10)) {
//!     if let SubtaskCommand::Barrier(barrier) = command {
//!         endpoint.snapshot_heap(&barrier, &mut backend, None)?;
//!         break;
//!     }
//! }
//! let completed = pending.wait(Duration::from_secs(10))?;
//! assert_eq!(completed.metadata.checkpoint_id, 1);
//! assert!(matches!(
//!     endpoint.recv_timeout(Duration::from_secs(10)),
//!     Some(SubtaskCommand::CheckpointComplete { checkpoint_id: 1 })
//! ));
//! coordinator.shutdown()?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use object_store::path::Path;
use state_api::checkpointing::{BackendSnapshot, CheckpointableBackend, SnapshotRequest};
use state_api::{Clock, KeyGroupRange, KeyedStateBackend, OperatorStateStore, SystemClock};

use crate::commit::{CommitLog, LogEntry};
use crate::complete::{
    assemble_operators, commit_checkpoint, commit_savepoint, discard_checkpoint_dir, SubtaskAck,
};
use crate::error::{Error, Result};
use crate::format::{FileLocation, KeyedStateHandle};
use crate::history::{
    AttemptStatus, CheckpointAttempt, HistoryWriter, SubtaskAttempt, SubtaskStatus,
};
use crate::protocol::{Action, CheckpointConfig, CheckpointKind, Protocol, RetentionOnShutdown};
use crate::registry::{shared_files, SharedStateRegistry};
use crate::restore::CompletedCheckpoint;
use crate::storage::{validate_name, CheckpointStorage};
use crate::write::{
    write_subtask_snapshot_tracked, KeyedSnapshot, SnapshotTarget, SubtaskSnapshot,
};

/// A checkpoint barrier as a subtask receives it.
#[derive(Clone, Debug)]
pub struct Barrier {
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// The trigger time (milliseconds, from the coordinator's clock).
    pub timestamp_millis: i64,
    target: SnapshotTarget,
}

/// What the coordinator tells a subtask.
#[derive(Clone, Debug)]
pub enum SubtaskCommand {
    /// Snapshot now (between two records), then continue.
    Barrier(Barrier),
    /// The checkpoint is complete: side effects up to its barrier may be committed.
    CheckpointComplete {
        /// The checkpoint.
        checkpoint_id: u64,
    },
    /// The checkpoint was aborted.
    CheckpointAborted {
        /// The checkpoint.
        checkpoint_id: u64,
    },
}

/// What listeners of [`CheckpointCoordinator::subscribe`] receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointEvent {
    /// A checkpoint or savepoint completed.
    Completed {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Checkpoint or savepoint.
        kind: CheckpointKind,
        /// Its `_metadata` file.
        path: String,
    },
    /// A checkpoint was aborted.
    Aborted {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Why.
        reason: String,
    },
    /// The job failed (too many checkpoint failures, or fenced).
    JobFailed {
        /// Why.
        reason: String,
    },
}

enum Msg {
    Ack {
        checkpoint_id: u64,
        task: usize,
        ack: Box<Acked>,
    },
    Decline {
        checkpoint_id: u64,
        task: usize,
        reason: String,
    },
    Trigger {
        kind: CheckpointKind,
        savepoint_name: Option<String>,
        reply: Sender<Result<(u64, Receiver<Result<CompletedCheckpoint>>)>>,
    },
    Shutdown {
        reply: Sender<Result<()>>,
    },
    /// Stop at once, as a crash would (nothing is aborted or deleted).
    Stop,
}

/// An acknowledged state and the shared files written for it.
struct Acked {
    ack: SubtaskAck,
    uploaded: Vec<String>,
    /// For the history: the synchronous part (subtask's clock), the upload (writer's clock),
    /// bytes referred to and bytes written.
    sync_micros: Option<u64>,
    async_millis: u64,
    bytes: u64,
    delta_bytes: u64,
}

struct WriteJob {
    checkpoint_id: u64,
    task: usize,
    sync_micros: Option<u64>,
    target: SnapshotTarget,
    snapshot: SubtaskSnapshot,
    parallelism: u32,
    max_parallelism: u32,
    incremental: Option<Arc<Mutex<IncrementalState>>>,
    native: Option<Arc<Mutex<NativeKnown>>>,
    to_coordinator: Sender<Msg>,
}

/// What a subtask knows of its backend-native files in `shared/`.
#[derive(Debug, Default)]
struct NativeKnown {
    /// Files referenced by a checkpoint this subtask heard completed, by name.
    confirmed: HashMap<String, crate::format::FileRef>,
    /// Files of checkpoints not yet known complete.
    written: BTreeMap<u64, Vec<crate::format::FileRef>>,
}

/// What a subtask remembers for incremental snapshots.
#[derive(Debug, Default)]
struct IncrementalState {
    /// The handle of the last checkpoint this subtask heard completed.
    base: Option<(u64, KeyedStateHandle)>,
    /// Handles written for checkpoints not yet known complete.
    written: BTreeMap<u64, KeyedStateHandle>,
}

struct TaskInfo {
    operator_id: String,
    subtask: u32,
    parallelism: u32,
    max_parallelism: u32,
    commands: Sender<SubtaskCommand>,
    native: Arc<Mutex<NativeKnown>>,
}

/// The subtask's side of the coordinator: barriers and notifications in, snapshots out.
pub struct SubtaskEndpoint {
    task: usize,
    operator_id: String,
    subtask: u32,
    parallelism: u32,
    max_parallelism: u32,
    commands: Receiver<SubtaskCommand>,
    to_coordinator: Sender<Msg>,
    writes: Sender<WriteJob>,
    /// Write jobs handed to the writer threads and not finished yet (shared with the core).
    in_flight: Arc<AtomicUsize>,
    incremental: bool,
    write_parts: usize,
    inc: Arc<Mutex<IncrementalState>>,
    native: Arc<Mutex<NativeKnown>>,
    /// Notifications received and not yet handed to a backend.
    notes: Vec<Note>,
}

/// A notification for the backend, queued until its next snapshot.
#[derive(Clone, Copy, Debug)]
enum Note {
    Complete(u64),
    Aborted(u64),
}

impl std::fmt::Debug for SubtaskEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubtaskEndpoint")
            .field("operator_id", &self.operator_id)
            .field("subtask", &self.subtask)
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

impl SubtaskEndpoint {
    /// The operator id.
    pub fn operator_id(&self) -> &str {
        &self.operator_id
    }
    /// The subtask index.
    pub fn subtask(&self) -> u32 {
        self.subtask
    }
    /// The operator's parallelism.
    pub fn parallelism(&self) -> u32 {
        self.parallelism
    }
    /// The operator's max parallelism.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }
    /// The key groups this subtask owns.
    pub fn key_group_range(&self) -> Result<KeyGroupRange> {
        KeyGroupRange::for_operator(self.max_parallelism, self.parallelism, self.subtask)
            .map_err(|e| Error::state(&self.operator_id, self.subtask, e))
    }

    /// The next command, if one is waiting. Completion and abort notifications are also used
    /// internally (incremental snapshots build on the last completed checkpoint).
    pub fn try_recv(&mut self) -> Option<SubtaskCommand> {
        let c = self.commands.try_recv().ok()?;
        self.observe(&c);
        Some(c)
    }

    /// The next command, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<SubtaskCommand> {
        let c = self.commands.recv_timeout(timeout).ok()?;
        self.observe(&c);
        Some(c)
    }

    fn observe(&mut self, c: &SubtaskCommand) {
        match *c {
            SubtaskCommand::CheckpointComplete { checkpoint_id } => {
                self.notes.push(Note::Complete(checkpoint_id))
            }
            SubtaskCommand::CheckpointAborted { checkpoint_id } => {
                self.notes.push(Note::Aborted(checkpoint_id))
            }
            SubtaskCommand::Barrier(_) => {}
        }
        if let Ok(mut n) = self.native.lock() {
            match *c {
                SubtaskCommand::CheckpointComplete { checkpoint_id } => {
                    if let Some(files) = n.written.remove(&checkpoint_id) {
                        for f in files {
                            n.confirmed.insert(f.location.name().to_string(), f);
                        }
                    }
                    n.written.retain(|id, _| *id > checkpoint_id);
                }
                SubtaskCommand::CheckpointAborted { checkpoint_id } => {
                    n.written.remove(&checkpoint_id);
                }
                SubtaskCommand::Barrier(_) => {}
            }
        }
        let Ok(mut inc) = self.inc.lock() else { return };
        match *c {
            SubtaskCommand::CheckpointComplete { checkpoint_id } => {
                if let Some(h) = inc.written.remove(&checkpoint_id) {
                    inc.base = Some((checkpoint_id, h));
                }
                inc.written.retain(|id, _| *id > checkpoint_id);
            }
            SubtaskCommand::CheckpointAborted { checkpoint_id } => {
                inc.written.remove(&checkpoint_id);
            }
            SubtaskCommand::Barrier(_) => {}
        }
    }

    /// Hands `backend` the completion and abort notifications this endpoint received since
    /// the last call (in order), so it can release or keep what later snapshots build on.
    /// Every snapshot method calls it first; call it yourself to release files sooner.
    pub fn deliver_notifications<B: CheckpointableBackend>(&mut self, backend: &mut B) {
        for note in std::mem::take(&mut self.notes) {
            match note {
                Note::Complete(id) => backend.notify_checkpoint_complete(id),
                Note::Aborted(id) => backend.notify_checkpoint_aborted(id),
            }
        }
    }

    /// Snapshots `backend` through the snapshot contract (and the operator state), then queues
    /// the upload.
    ///
    /// Savepoints and checkpoints without incremental checkpoints configured ask for canonical
    /// streams (in [`CoordinatorBuilder::write_parts`] parts). With incremental checkpoints
    /// the backend may answer with a delta on the last checkpoint this subtask heard completed
    /// (offered unless a restore of its chain would apply more than half as much delta as
    /// full state or more than [`MAX_DELTA_FILES`] files), with native files (those already
    /// uploaded by a completed checkpoint are only referenced), or with canonical streams,
    /// which go into `shared/` and start a new chain.
    pub fn snapshot_backend<B: CheckpointableBackend>(
        &mut self,
        barrier: &Barrier,
        backend: &mut B,
        operator_state: Option<&OperatorStateStore>,
    ) -> Result<()> {
        self.deliver_notifications(backend);
        let started = Instant::now();
        let parts = self.write_parts.max(1);
        let id = barrier.checkpoint_id;
        let incremental = self.incremental && barrier.kind == CheckpointKind::Checkpoint;
        let base = if incremental {
            match self.inc.lock() {
                Ok(inc) => inc.base.clone().filter(|(_, b)| !chain_too_long(b)),
                Err(_) => {
                    return self.fail(barrier, "the incremental state lock is poisoned".into())
                }
            }
        } else {
            None
        };
        let request = if incremental {
            SnapshotRequest::incremental(id, base.as_ref().map(|(b, _)| *b), parts)
        } else {
            SnapshotRequest::canonical(id, parts)
        };
        let snapshot = match backend.snapshot_for_checkpoint(&request) {
            Ok(s) => s,
            Err(e) => {
                let err = Error::state(&self.operator_id, self.subtask, e);
                return self.fail(barrier, err.to_string());
            }
        };
        let kind = snapshot.kind_name();
        let keyed = match snapshot {
            BackendSnapshot::Canonical(parts) if incremental => KeyedSnapshot::Incremental {
                parts,
                changed: backend.key_group_range().iter().collect(),
                base: None,
            },
            BackendSnapshot::Canonical(parts) => KeyedSnapshot::Full(parts),
            BackendSnapshot::Delta { parts, replaced } => match base {
                Some((_, base)) => KeyedSnapshot::Delta {
                    parts,
                    replaced,
                    base,
                },
                None => {
                    return self.fail(
                        barrier,
                        "the backend answered with a delta where no base was offered".into(),
                    )
                }
            },
            BackendSnapshot::Native(n) => {
                if !incremental {
                    return self.fail(
                        barrier,
                        "the backend answered with native files where canonical streams were \
                         asked for"
                            .into(),
                    );
                }
                if n.backend.is_empty()
                    || n.backend.len() > 32
                    || !n.backend.bytes().all(|b| b.is_ascii_graphic())
                {
                    return self.fail(
                        barrier,
                        format!("invalid native backend id {:?}", n.backend),
                    );
                }
                let known = match self.native.lock() {
                    Ok(mut known) => {
                        let live: BTreeSet<&str> =
                            n.files.iter().map(|f| f.name.as_str()).collect();
                        known
                            .confirmed
                            .retain(|name, _| live.contains(name.as_str()));
                        known.confirmed.clone()
                    }
                    Err(_) => HashMap::new(),
                };
                KeyedSnapshot::Native { snapshot: n, known }
            }
        };
        tracing::debug!(
            checkpoint_id = id,
            operator = %self.operator_id,
            subtask = self.subtask,
            kind,
            sync_micros = started.elapsed().as_micros() as u64,
            "synchronous part of the snapshot taken"
        );
        let sync = Some(started.elapsed().as_micros() as u64);
        self.submit(barrier, Some(keyed), operator_state.cloned(), sync)
    }

    /// The same as [`Self::snapshot_backend`] (the heap backend answers with canonical streams
    /// or deltas); kept under its earlier name.
    pub fn snapshot_heap<B: CheckpointableBackend>(
        &mut self,
        barrier: &Barrier,
        backend: &mut B,
        operator_state: Option<&OperatorStateStore>,
    ) -> Result<()> {
        self.snapshot_backend(barrier, backend, operator_state)
    }

    /// The same as [`Self::snapshot_backend`] (the mmap backend answers with native files for
    /// incremental checkpoints); kept under its earlier name.
    pub fn snapshot_mmap<B: CheckpointableBackend>(
        &mut self,
        barrier: &Barrier,
        backend: &mut B,
        operator_state: Option<&OperatorStateStore>,
    ) -> Result<()> {
        self.snapshot_backend(barrier, backend, operator_state)
    }

    /// Snapshots any keyed backend in full (and the operator state), then queues the upload.
    pub fn snapshot<B: KeyedStateBackend>(
        &mut self,
        barrier: &Barrier,
        backend: Option<&mut B>,
        operator_state: Option<&OperatorStateStore>,
    ) -> Result<()> {
        // A backend outside the contract takes no notifications.
        self.notes.clear();
        let started = Instant::now();
        let keyed = match backend {
            None => None,
            Some(b) => match b.snapshot() {
                Ok(s) => Some(KeyedSnapshot::Full(vec![s])),
                Err(e) => {
                    let err = Error::state(&self.operator_id, self.subtask, e);
                    return self.fail(barrier, err.to_string());
                }
            },
        };
        let sync = Some(started.elapsed().as_micros() as u64);
        self.submit(barrier, keyed, operator_state.cloned(), sync)
    }

    /// Declines the checkpoint of `barrier` (it is aborted).
    pub fn decline(&self, barrier: &Barrier, reason: impl Into<String>) {
        let _ = self.to_coordinator.send(Msg::Decline {
            checkpoint_id: barrier.checkpoint_id,
            task: self.task,
            reason: reason.into(),
        });
    }

    fn fail(&self, barrier: &Barrier, reason: String) -> Result<()> {
        self.decline(barrier, reason.clone());
        Err(Error::CheckpointFailed {
            checkpoint_id: barrier.checkpoint_id,
            reason,
        })
    }

    fn submit(
        &mut self,
        barrier: &Barrier,
        keyed: Option<KeyedSnapshot>,
        operator_state: Option<OperatorStateStore>,
        sync_micros: Option<u64>,
    ) -> Result<()> {
        let incremental = matches!(
            keyed,
            Some(KeyedSnapshot::Incremental { .. } | KeyedSnapshot::Delta { .. })
        )
        .then(|| Arc::clone(&self.inc));
        let native =
            matches!(keyed, Some(KeyedSnapshot::Native { .. })).then(|| Arc::clone(&self.native));
        let job = WriteJob {
            checkpoint_id: barrier.checkpoint_id,
            task: self.task,
            sync_micros,
            target: barrier.target.clone(),
            snapshot: SubtaskSnapshot {
                operator_id: self.operator_id.clone(),
                subtask: self.subtask,
                keyed,
                operator_state,
            },
            parallelism: self.parallelism,
            max_parallelism: self.max_parallelism,
            incremental,
            native,
            to_coordinator: self.to_coordinator.clone(),
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.writes.send(job).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return self.fail(barrier, "the coordinator's writer threads stopped".into());
        }
        Ok(())
    }
}

/// Most delta files a heap checkpoint's chain may hold before a full snapshot is written again.
pub const MAX_DELTA_FILES: usize = 64;

/// True when a restore of `h` would apply too many deltas: their blocks exceed half of the
/// full snapshot's, or there are more than [`MAX_DELTA_FILES`] delta files (then the next
/// incremental snapshot starts a new chain instead of building on `h`).
pub fn chain_too_long(h: &KeyedStateHandle) -> bool {
    let (mut full, mut delta, mut files) = (0u64, 0u64, 0usize);
    for f in &h.files {
        let used: u64 = f
            .key_groups
            .iter()
            .chain(&f.tombstones)
            .map(|b| b.length)
            .sum();
        if f.header_bytes.get(4..6)
            == Some(&state_api::snapshot::SNAPSHOT_DELTA_VERSION.to_be_bytes()[..])
        {
            delta += used;
            files += 1;
        } else {
            full += used;
        }
    }
    files > MAX_DELTA_FILES || delta > full / 2
}

/// Builds a [`CheckpointCoordinator`].
pub struct CoordinatorBuilder {
    storage: CheckpointStorage,
    config: CheckpointConfig,
    clock: Arc<dyn Clock>,
    write_threads: usize,
    write_parts: usize,
    tasks: Vec<TaskInfo>,
    restored_from: Option<CompletedCheckpoint>,
    to_coordinator: (Sender<Msg>, Receiver<Msg>),
    writes: (Sender<WriteJob>, Receiver<WriteJob>),
    in_flight: Arc<AtomicUsize>,
}

impl std::fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("storage", &self.storage)
            .field("config", &self.config)
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl CoordinatorBuilder {
    /// Uses `clock` for checkpoint timestamps (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Number of threads that upload snapshots (default 2).
    pub fn write_threads(mut self, n: usize) -> Self {
        self.write_threads = n.max(1);
        self
    }

    /// Number of files (written in parallel) a heap snapshot is split into, by key group
    /// (default: the number of cores, at most 4). Call before registering subtasks.
    pub fn write_parts(mut self, n: usize) -> Self {
        self.write_parts = n.max(1);
        self
    }

    /// Tells the coordinator which checkpoint the subtasks were restored from. If it is one of
    /// the job's retained checkpoints, the backend-native files it holds are referenced by the
    /// next native checkpoints instead of being uploaded again.
    pub fn restored_from(mut self, checkpoint: &CompletedCheckpoint) -> Self {
        self.restored_from = Some(checkpoint.clone());
        self
    }

    /// Registers subtask `subtask` of `operator_id` and returns its endpoint.
    pub fn register_subtask(
        &mut self,
        operator_id: &str,
        subtask: u32,
        parallelism: u32,
        max_parallelism: u32,
    ) -> Result<SubtaskEndpoint> {
        validate_name("operator id", operator_id)?;
        KeyGroupRange::for_operator(max_parallelism, parallelism, subtask)
            .map_err(|e| Error::state(operator_id, subtask, e))?;
        if self
            .tasks
            .iter()
            .any(|t| t.operator_id == operator_id && t.subtask == subtask)
        {
            return Err(Error::InvalidConfig {
                reason: format!("subtask {subtask} of '{operator_id}' registered twice"),
            });
        }
        let (tx, rx) = unbounded();
        let task = self.tasks.len();
        let native: Arc<Mutex<NativeKnown>> = Arc::default();
        self.tasks.push(TaskInfo {
            operator_id: operator_id.to_string(),
            subtask,
            parallelism,
            max_parallelism,
            commands: tx,
            native: Arc::clone(&native),
        });
        let inc = Arc::new(Mutex::new(IncrementalState::default()));
        Ok(SubtaskEndpoint {
            task,
            operator_id: operator_id.to_string(),
            subtask,
            parallelism,
            max_parallelism,
            commands: rx,
            to_coordinator: self.to_coordinator.0.clone(),
            writes: self.writes.0.clone(),
            in_flight: Arc::clone(&self.in_flight),
            incremental: self.config.incremental,
            write_parts: self.write_parts,
            inc,
            native,
            notes: Vec::new(),
        })
    }

    /// Claims the job (fencing any older coordinator), cleans up what earlier runs left
    /// unfinished, and starts the coordinator and writer threads.
    pub fn start(self) -> Result<CheckpointCoordinator> {
        self.config.validate()?;
        let mut ops: BTreeMap<&str, (u32, u32, BTreeSet<u32>)> = BTreeMap::new();
        for t in &self.tasks {
            let e = ops.entry(t.operator_id.as_str()).or_insert((
                t.parallelism,
                t.max_parallelism,
                BTreeSet::new(),
            ));
            if e.0 != t.parallelism || e.1 != t.max_parallelism {
                return Err(Error::InvalidConfig {
                    reason: format!("subtasks of '{}' disagree on parallelism", t.operator_id),
                });
            }
            e.2.insert(t.subtask);
        }
        for (op, (p, _, subs)) in &ops {
            if subs.len() != *p as usize {
                return Err(Error::InvalidConfig {
                    reason: format!("{} of {p} subtasks of '{op}' registered", subs.len()),
                });
            }
        }
        let storage = self.storage.clone();
        let log = CommitLog::claim(&storage)?;
        let entries = CommitLog::read(&storage)?;
        let completed_in_log: BTreeSet<u64> =
            entries.iter().filter_map(LogEntry::checkpoint_id).collect();
        let retained = CompletedCheckpoint::retained(&storage, self.config.retained)?;
        let dir_ids = storage.checkpoint_dir_ids()?;
        let next_id = completed_in_log
            .iter()
            .chain(dir_ids.iter())
            .max()
            .map_or(1, |m| m + 1);
        let mut registry = SharedStateRegistry::new();
        for c in &retained {
            registry.register(&c.metadata);
        }
        // Clean up what no retained checkpoint uses: unfinished checkpoint directories, completed
        // checkpoints beyond the retained ones (their shared files go below, so they could not
        // be restored any more), and shared files of earlier runs (an older coordinator is
        // fenced by now).
        let retained_ids: BTreeSet<u64> =
            retained.iter().map(|c| c.metadata.checkpoint_id).collect();
        for id in dir_ids {
            if !completed_in_log.contains(&id) {
                storage.delete_prefix(&storage.checkpoint_dir(id))?;
            } else if !retained_ids.contains(&id) {
                discard_checkpoint_dir(&storage, id)?;
            }
        }
        for o in storage.list(&storage.shared_dir())? {
            if let Some(name) = o.location.filename() {
                if registry.references(name) == 0 {
                    storage.delete(&o.location)?;
                }
            }
        }
        if let Some(oldest) = retained.first() {
            log.prune(oldest.metadata.checkpoint_id)?;
        }
        // Native files of the restored checkpoint are on the store and referenced by a
        // retained checkpoint: the subtasks may reference them instead of uploading them.
        if let Some(r) = &self.restored_from {
            let is_retained = retained.iter().any(|c| c.path == r.path);
            for t in self.tasks.iter().filter(|_| is_retained) {
                let Some(op) = r.metadata.operator(&t.operator_id) else {
                    continue;
                };
                let Ok(range) =
                    KeyGroupRange::for_operator(t.max_parallelism, t.parallelism, t.subtask)
                else {
                    continue;
                };
                if let Ok(mut known) = t.native.lock() {
                    for f in op.native_files_meeting(range) {
                        known
                            .confirmed
                            .insert(f.file.location.name().to_string(), f.file.clone());
                    }
                }
            }
        }
        let protocol = Protocol::new(
            self.config.clone(),
            self.tasks.len(),
            next_id,
            retained.iter().map(|c| c.metadata.checkpoint_id).collect(),
        )?;
        let listeners: Arc<Mutex<Vec<Sender<CheckpointEvent>>>> = Arc::default();
        let mut workers = Vec::new();
        for i in 0..self.write_threads {
            let rx = self.writes.1.clone();
            let st = storage.clone();
            let in_flight = Arc::clone(&self.in_flight);
            let h = std::thread::Builder::new()
                .name(format!("flowstate-checkpoint-writer-{i}"))
                .spawn(move || writer_loop(&st, &rx, &in_flight))
                .map_err(|e| Error::Io {
                    context: "starting a checkpoint writer thread".into(),
                    source: e,
                })?;
            workers.push(h);
        }
        let epoch = log.epoch();
        let history = match HistoryWriter::open(&storage) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(job = %storage.job(), reason = %e, "checkpoint history not kept");
                None
            }
        };
        let core = Core {
            storage: storage.clone(),
            config: self.config,
            protocol,
            log,
            registry,
            tasks: self.tasks,
            completed: retained
                .into_iter()
                .map(|c| (c.metadata.checkpoint_id, c))
                .collect(),
            savepoint_dirs: HashMap::new(),
            timestamps: HashMap::new(),
            waiters: HashMap::new(),
            finished: HashMap::new(),
            listeners: Arc::clone(&listeners),
            failure: None,
            fenced: None,
            clock: self.clock,
            start: Instant::now(),
            in_flight: Arc::clone(&self.in_flight),
            history,
            attempts: HashMap::new(),
        };
        let rx = self.to_coordinator.1;
        let thread = std::thread::Builder::new()
            .name("flowstate-checkpoint-coordinator".into())
            .spawn(move || core.run(&rx))
            .map_err(|e| Error::Io {
                context: "starting the checkpoint coordinator thread".into(),
                source: e,
            })?;
        Ok(CheckpointCoordinator {
            to_coordinator: self.to_coordinator.0,
            thread: Some(thread),
            workers,
            listeners,
            storage,
            epoch,
        })
    }
}

fn writer_loop(storage: &CheckpointStorage, rx: &Receiver<WriteJob>, in_flight: &AtomicUsize) {
    while let Ok(job) = rx.recv() {
        let operator_id = job.snapshot.operator_id.clone();
        let subtask = job.snapshot.subtask;
        let started = Instant::now();
        let msg = match write_subtask_snapshot_tracked(storage, &job.target, job.snapshot) {
            Ok((state, uploaded)) => {
                let (bytes, new_bytes) = state_bytes(&state, &uploaded);
                tracing::info!(
                    checkpoint_id = job.checkpoint_id,
                    operator = %operator_id,
                    subtask,
                    bytes,
                    delta_bytes = new_bytes,
                    files_uploaded = uploaded.len(),
                    async_millis = started.elapsed().as_millis() as u64,
                    "subtask state written"
                );
                if let (Some(native), Some(h)) = (&job.native, &state.native) {
                    if let Ok(mut n) = native.lock() {
                        n.written.insert(
                            job.checkpoint_id,
                            h.files.iter().map(|f| f.file.clone()).collect(),
                        );
                    }
                }
                if let (Some(inc), Some(k)) = (&job.incremental, &state.keyed) {
                    if let Ok(mut inc) = inc.lock() {
                        inc.written.insert(job.checkpoint_id, k.clone());
                    }
                }
                Msg::Ack {
                    checkpoint_id: job.checkpoint_id,
                    task: job.task,
                    ack: Box::new(Acked {
                        ack: SubtaskAck {
                            operator_id,
                            parallelism: job.parallelism,
                            max_parallelism: job.max_parallelism,
                            state,
                        },
                        uploaded,
                        sync_micros: job.sync_micros,
                        async_millis: started.elapsed().as_millis() as u64,
                        bytes,
                        delta_bytes: new_bytes,
                    }),
                }
            }
            Err(e) => {
                tracing::warn!(
                    checkpoint_id = job.checkpoint_id,
                    operator = %operator_id,
                    subtask,
                    async_millis = started.elapsed().as_millis() as u64,
                    reason = %e,
                    "writing subtask state failed"
                );
                Msg::Decline {
                    checkpoint_id: job.checkpoint_id,
                    task: job.task,
                    reason: e.to_string(),
                }
            }
        };
        let _ = job.to_coordinator.send(msg);
        // After the result is queued: a core that sees zero finds every result in its queue.
        in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bytes of all files a subtask's state refers to, and of those written for this checkpoint
/// (exclusive files and the shared files uploaded now: the delta of an incremental one).
fn state_bytes(state: &crate::format::SubtaskState, uploaded: &[String]) -> (u64, u64) {
    let keyed = state
        .keyed
        .iter()
        .flat_map(|k| k.files.iter().map(|f| &f.file));
    let native = state
        .native
        .iter()
        .flat_map(|n| n.files.iter().map(|f| &f.file));
    let (mut all, mut new) = (0, 0);
    for f in keyed.chain(native) {
        all += f.size;
        let fresh = match &f.location {
            FileLocation::Exclusive(_) => true,
            FileLocation::Shared(name) => uploaded.iter().any(|u| u == name),
        };
        if fresh {
            new += f.size;
        }
    }
    (all, new)
}

/// Waits for a triggered checkpoint or savepoint.
#[derive(Debug)]
pub struct PendingCheckpoint {
    id: u64,
    done: Receiver<Result<CompletedCheckpoint>>,
    /// Whose I/O runtime [`PendingCheckpoint::wait_async`] waits on.
    storage: CheckpointStorage,
}

impl PendingCheckpoint {
    /// The checkpoint id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits until the checkpoint completes or fails, at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<CompletedCheckpoint> {
        match self.done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::CheckpointFailed {
                checkpoint_id: self.id,
                reason: format!("not complete after {timeout:?}"),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Stopped {
                reason: "the coordinator stopped".into(),
            }),
        }
    }

    /// [`PendingCheckpoint::wait`] for async callers: waits on a blocking thread of the
    /// storage's I/O runtime ([`CheckpointStorage::run_blocking`]), never blocking the caller's
    /// thread, so subtasks that run as tasks of the same (even current-thread) runtime go on
    /// and answer the barrier.
    pub fn wait_async(
        self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<CompletedCheckpoint>> + Send + 'static {
        let storage = self.storage.clone();
        storage.run_blocking(move |_| self.wait(timeout))
    }
}

/// The checkpoint coordinator of one job. See the [module docs](self).
pub struct CheckpointCoordinator {
    to_coordinator: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    listeners: Arc<Mutex<Vec<Sender<CheckpointEvent>>>>,
    storage: CheckpointStorage,
    epoch: u64,
}

impl std::fmt::Debug for CheckpointCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointCoordinator")
            .field("storage", &self.storage)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl CheckpointCoordinator {
    /// A builder for the job stored in `storage`.
    pub fn builder(storage: CheckpointStorage, config: CheckpointConfig) -> CoordinatorBuilder {
        let (wtx, wrx) = unbounded();
        CoordinatorBuilder {
            storage,
            config,
            clock: Arc::new(SystemClock),
            write_threads: 2,
            write_parts: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            tasks: Vec::new(),
            restored_from: None,
            to_coordinator: unbounded(),
            writes: (wtx, wrx),
            in_flight: Arc::default(),
        }
    }

    /// This coordinator's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The storage.
    pub fn storage(&self) -> &CheckpointStorage {
        &self.storage
    }

    /// Events from now on (completions, aborts, job failure).
    pub fn subscribe(&self) -> Receiver<CheckpointEvent> {
        let (tx, rx) = unbounded();
        if let Ok(mut l) = self.listeners.lock() {
            l.push(tx);
        }
        rx
    }

    fn trigger(&self, kind: CheckpointKind, name: Option<String>) -> Result<PendingCheckpoint> {
        trigger(&self.to_coordinator, &self.storage, kind, name)
    }

    /// Triggers a checkpoint now.
    pub fn trigger_checkpoint(&self) -> Result<PendingCheckpoint> {
        self.trigger(CheckpointKind::Checkpoint, None)
    }

    /// [`CheckpointCoordinator::trigger_checkpoint`] for async callers: waits for the
    /// coordinator thread's answer on a blocking thread of the storage's I/O runtime
    /// ([`CheckpointStorage::run_blocking`]), never blocking the caller's thread.
    pub fn trigger_checkpoint_async(
        &self,
    ) -> impl std::future::Future<Output = Result<PendingCheckpoint>> + Send + 'static {
        let to_coordinator = self.to_coordinator.clone();
        self.storage.run_blocking(move |storage| {
            trigger(&to_coordinator, storage, CheckpointKind::Checkpoint, None)
        })
    }

    /// Triggers a savepoint into `savepoints/savepoint-<name>/` (default name:
    /// `<job>-<checkpoint id>`).
    pub fn trigger_savepoint(&self, name: Option<&str>) -> Result<PendingCheckpoint> {
        if let Some(n) = name {
            validate_name("savepoint name", n)?;
        }
        self.trigger(CheckpointKind::Savepoint, name.map(str::to_string))
    }

    /// Aborts pending checkpoints, applies the retention policy (deletes every checkpoint of
    /// this run unless `RetentionOnShutdown::Retain`) and stops the threads.
    pub fn shutdown(mut self) -> Result<()> {
        let (tx, rx) = bounded(1);
        let res = match self.to_coordinator.send(Msg::Shutdown { reply: tx }) {
            Ok(()) => rx.recv().unwrap_or(Ok(())),
            Err(_) => Ok(()),
        };
        self.stop_threads();
        res
    }

    /// [`CheckpointCoordinator::shutdown`] for async callers: the coordinator moves to a
    /// blocking thread of the storage's I/O runtime ([`CheckpointStorage::run_blocking`]) for
    /// the retention deletes and the joins, never blocking the caller's thread.
    pub fn shutdown_async(self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let storage = self.storage.clone();
        storage.run_blocking(move |_| self.shutdown())
    }

    fn stop_threads(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Writers stop when every endpoint is gone; they are detached rather than joined.
        self.workers.clear();
    }
}

impl Drop for CheckpointCoordinator {
    /// Stops the coordinator like a crash would: pending checkpoints are abandoned and nothing
    /// is deleted. Use [`CheckpointCoordinator::shutdown`] for an orderly stop.
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.to_coordinator.send(Msg::Stop);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Asks the coordinator thread behind `to_coordinator` to trigger a checkpoint or savepoint
/// and waits for its id.
fn trigger(
    to_coordinator: &Sender<Msg>,
    storage: &CheckpointStorage,
    kind: CheckpointKind,
    name: Option<String>,
) -> Result<PendingCheckpoint> {
    let (tx, rx) = bounded(1);
    to_coordinator
        .send(Msg::Trigger {
            kind,
            savepoint_name: name,
            reply: tx,
        })
        .map_err(|_| stopped())?;
    let (id, done) = rx.recv().map_err(|_| stopped())??;
    Ok(PendingCheckpoint {
        id,
        done,
        storage: storage.clone(),
    })
}

fn stopped() -> Error {
    Error::Stopped {
        reason: "the coordinator thread has stopped".into(),
    }
}

struct Core {
    storage: CheckpointStorage,
    config: CheckpointConfig,
    protocol: Protocol<Acked>,
    log: CommitLog,
    registry: SharedStateRegistry,
    tasks: Vec<TaskInfo>,
    completed: BTreeMap<u64, CompletedCheckpoint>,
    savepoint_dirs: HashMap<u64, Path>,
    timestamps: HashMap<u64, i64>,
    waiters: HashMap<u64, Sender<Result<CompletedCheckpoint>>>,
    finished: HashMap<u64, CompletedCheckpoint>,
    listeners: Arc<Mutex<Vec<Sender<CheckpointEvent>>>>,
    failure: Option<String>,
    fenced: Option<(u64, u64)>,
    clock: Arc<dyn Clock>,
    start: Instant,
    /// Write jobs the writer threads have not finished (see [`SubtaskEndpoint`]).
    in_flight: Arc<AtomicUsize>,
    /// The history of attempts (`None` if it could not be opened: attempts are then only
    /// logged).
    history: Option<HistoryWriter>,
    /// Attempts in flight, by checkpoint id: when they started (the core's clock) and what
    /// each subtask answered so far.
    attempts: HashMap<u64, (Duration, CheckpointAttempt)>,
}

impl Core {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            let wait = self
                .protocol
                .next_wakeup()
                .map(|at| at.saturating_sub(self.now()))
                .unwrap_or(Duration::from_secs(3600));
            let mut actions = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(Msg::Ack {
                    checkpoint_id,
                    task,
                    ack,
                }) => {
                    self.note_answer(checkpoint_id, task, Ok(&ack));
                    actions.extend(self.protocol.ack(checkpoint_id, task, *ack))
                }
                Ok(Msg::Decline {
                    checkpoint_id,
                    task,
                    reason,
                }) => {
                    if let Some(t) = self.tasks.get(task) {
                        tracing::warn!(
                            checkpoint_id,
                            operator = %t.operator_id,
                            subtask = t.subtask,
                            reason = %reason,
                            "checkpoint declined"
                        );
                    }
                    self.note_answer(checkpoint_id, task, Err(&reason));
                    actions.extend(self.protocol.decline(checkpoint_id, task, reason))
                }
                Ok(Msg::Trigger {
                    kind,
                    savepoint_name,
                    reply,
                }) => {
                    if let Some(name) = &savepoint_name {
                        match self.storage.savepoint_dir(name) {
                            Ok(dir) => {
                                let meta = dir.join(crate::storage::METADATA_FILE);
                                if self.storage.size(&meta).is_ok() {
                                    let _ = reply.send(Err(Error::InvalidConfig {
                                        reason: format!("savepoint '{meta}' already exists"),
                                    }));
                                    continue;
                                }
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                        }
                    }
                    let now = self.now();
                    match self.protocol.trigger(now, kind) {
                        Ok((id, a)) => {
                            if let Some(name) = savepoint_name {
                                self.set_savepoint_dir(id, &name);
                            }
                            let (dtx, drx) = bounded(1);
                            self.waiters.insert(id, dtx);
                            let _ = reply.send(Ok((id, drx)));
                            actions.extend(a);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(self.stopped_error().unwrap_or(e)));
                        }
                    }
                }
                Ok(Msg::Stop) => return,
                Ok(Msg::Shutdown { reply }) => {
                    let r = self.shutdown(rx);
                    let _ = reply.send(r);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = self.now();
            actions.extend(self.protocol.tick(now));
            self.execute(actions);
        }
    }

    fn stopped_error(&self) -> Option<Error> {
        if let Some((epoch, newer)) = self.fenced {
            return Some(Error::Fenced {
                job: self.storage.job().to_string(),
                epoch,
                newer_epoch: newer,
                checkpoint_id: 0,
            });
        }
        self.failure
            .as_ref()
            .map(|r| Error::Stopped { reason: r.clone() })
    }

    fn set_savepoint_dir(&mut self, id: u64, name: &str) {
        if let Ok(dir) = self.storage.savepoint_dir(name) {
            self.savepoint_dirs.insert(id, dir);
        }
    }

    fn emit(&self, e: CheckpointEvent) {
        if let Ok(mut l) = self.listeners.lock() {
            l.retain(|tx| tx.send(e.clone()).is_ok());
        }
    }

    /// Notes a subtask's answer to an attempt in flight (for the history).
    fn note_answer(
        &mut self,
        checkpoint_id: u64,
        task: usize,
        answer: std::result::Result<&Acked, &String>,
    ) {
        let Some((_, a)) = self.attempts.get_mut(&checkpoint_id) else {
            return;
        };
        let Some(s) = a.subtasks.get_mut(task) else {
            return;
        };
        match answer {
            Ok(acked) => {
                s.status = SubtaskStatus::Acknowledged;
                s.sync_micros = acked.sync_micros;
                s.async_millis = Some(acked.async_millis);
                s.bytes = acked.bytes;
                s.delta_bytes = acked.delta_bytes;
            }
            Err(reason) => {
                s.status = SubtaskStatus::Declined;
                s.reason = Some(reason.clone());
            }
        }
    }

    /// Ends an attempt (completed, or failed with `reason`) and writes it to the history. A
    /// history that cannot be written is a warning, never a failed checkpoint.
    fn end_attempt(&mut self, checkpoint_id: u64, result: std::result::Result<(), &str>) {
        let Some((started, mut a)) = self.attempts.remove(&checkpoint_id) else {
            return;
        };
        a.duration_millis = self.now().saturating_sub(started).as_millis() as u64;
        a.bytes = a.subtasks.iter().map(|s| s.bytes).sum();
        a.delta_bytes = a.subtasks.iter().map(|s| s.delta_bytes).sum();
        match result {
            Ok(()) => a.status = AttemptStatus::Completed,
            Err(reason) => {
                a.status = if a
                    .subtasks
                    .iter()
                    .any(|s| s.status == SubtaskStatus::Declined)
                {
                    AttemptStatus::Declined
                } else {
                    AttemptStatus::Aborted
                };
                a.reason = Some(reason.to_string());
            }
        }
        if let Some(h) = &mut self.history {
            if let Err(e) = h.record(&a) {
                tracing::warn!(checkpoint_id, reason = %e, "checkpoint history not written");
            }
        }
    }

    fn notify_tasks(&self, c: SubtaskCommand) {
        for t in &self.tasks {
            let _ = t.commands.send(c.clone());
        }
    }

    fn execute(&mut self, actions: Vec<Action<Acked>>) {
        let mut queue: std::collections::VecDeque<_> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::SendBarrier {
                    checkpoint_id,
                    kind,
                } => self.send_barrier(checkpoint_id, kind),
                Action::Finalize {
                    checkpoint_id,
                    kind,
                    states,
                } => {
                    let result = self.finalize(checkpoint_id, kind, states);
                    let now = self.now();
                    let r = match result {
                        Ok(c) => {
                            self.finished.insert(checkpoint_id, c);
                            Ok(())
                        }
                        Err(e) => {
                            if let Error::Fenced {
                                epoch, newer_epoch, ..
                            } = e
                            {
                                self.fenced = Some((epoch, newer_epoch));
                            }
                            let fatal = e.is_fenced();
                            Err((e.to_string(), fatal))
                        }
                    };
                    queue.extend(self.protocol.finalized(now, checkpoint_id, r));
                }
                Action::Completed {
                    checkpoint_id,
                    kind,
                    subsumed,
                } => self.completed(checkpoint_id, kind, subsumed),
                Action::Aborted {
                    checkpoint_id,
                    reason,
                    states,
                } => {
                    self.timestamps.remove(&checkpoint_id);
                    tracing::warn!(checkpoint_id, reason = %reason, "checkpoint aborted");
                    self.notify_tasks(SubtaskCommand::CheckpointAborted { checkpoint_id });
                    self.discard(checkpoint_id, &states);
                    let reason = reason.to_string();
                    if let Some(w) = self.waiters.remove(&checkpoint_id) {
                        let err = match self.fenced {
                            Some((epoch, newer_epoch)) => Error::Fenced {
                                job: self.storage.job().to_string(),
                                epoch,
                                newer_epoch,
                                checkpoint_id,
                            },
                            None => Error::CheckpointFailed {
                                checkpoint_id,
                                reason: reason.clone(),
                            },
                        };
                        let _ = w.send(Err(err));
                    }
                    self.end_attempt(checkpoint_id, Err(&reason));
                    self.emit(CheckpointEvent::Aborted {
                        checkpoint_id,
                        reason,
                    });
                }
                Action::DiscardLate {
                    checkpoint_id,
                    state,
                } => {
                    let known = self.completed.contains_key(&checkpoint_id)
                        || self.protocol.pending().contains(&checkpoint_id)
                        || self.finished.contains_key(&checkpoint_id);
                    if !known {
                        self.discard(checkpoint_id, std::slice::from_ref(&state));
                    }
                }
                Action::FailJob { reason } => {
                    self.failure = Some(reason.clone());
                    for (id, w) in self.waiters.drain() {
                        let _ = w.send(Err(Error::CheckpointFailed {
                            checkpoint_id: id,
                            reason: reason.clone(),
                        }));
                    }
                    self.emit(CheckpointEvent::JobFailed { reason });
                }
            }
        }
        self.delete_parked();
    }

    fn send_barrier(&mut self, checkpoint_id: u64, kind: CheckpointKind) {
        let timestamp_millis = self.clock.now_millis();
        tracing::info!(
            checkpoint_id,
            kind = ?kind,
            job = %self.storage.job(),
            subtasks = self.tasks.len(),
            "checkpoint triggered"
        );
        self.timestamps.insert(checkpoint_id, timestamp_millis);
        let attempt = CheckpointAttempt {
            checkpoint_id,
            epoch: self.log.epoch(),
            kind,
            status: AttemptStatus::Aborted,
            reason: None,
            trigger_timestamp_millis: timestamp_millis,
            duration_millis: 0,
            bytes: 0,
            delta_bytes: 0,
            subtasks: self
                .tasks
                .iter()
                .map(|t| SubtaskAttempt {
                    operator_id: t.operator_id.clone(),
                    subtask: t.subtask,
                    status: SubtaskStatus::NoAnswer,
                    sync_micros: None,
                    async_millis: None,
                    bytes: 0,
                    delta_bytes: 0,
                    reason: None,
                })
                .collect(),
        };
        self.attempts.insert(checkpoint_id, (self.now(), attempt));
        let dir = match kind {
            CheckpointKind::Checkpoint => self.storage.checkpoint_dir(checkpoint_id),
            CheckpointKind::Savepoint => {
                if !self.savepoint_dirs.contains_key(&checkpoint_id) {
                    let name = format!("{}-{checkpoint_id}", self.storage.job());
                    self.set_savepoint_dir(checkpoint_id, &name);
                }
                match self.savepoint_dirs.get(&checkpoint_id) {
                    Some(d) => d.clone(),
                    None => self.storage.checkpoint_dir(checkpoint_id),
                }
            }
        };
        let barrier = Barrier {
            checkpoint_id,
            kind,
            timestamp_millis,
            target: SnapshotTarget {
                dir,
                shared_dir: self.storage.shared_dir(),
                checkpoint_id,
                epoch: self.log.epoch(),
            },
        };
        let mut gone = Vec::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.commands
                .send(SubtaskCommand::Barrier(barrier.clone()))
                .is_err()
            {
                gone.push(i);
            }
        }
        let mut actions = Vec::new();
        for i in gone {
            let reason = "the subtask is gone (its endpoint was dropped)".to_string();
            self.note_answer(checkpoint_id, i, Err(&reason));
            actions.extend(self.protocol.decline(checkpoint_id, i, reason));
        }
        self.execute(actions);
    }

    fn finalize(
        &mut self,
        checkpoint_id: u64,
        kind: CheckpointKind,
        states: Vec<Acked>,
    ) -> Result<CompletedCheckpoint> {
        let ts = self.timestamps.remove(&checkpoint_id).unwrap_or(0);
        // Trigger and completion read the same clock (the coordinator's): a duration, never a
        // difference between two machines' clocks.
        let duration = u64::try_from(self.clock.now_millis().saturating_sub(ts)).ok();
        let uploaded: BTreeSet<String> = states
            .iter()
            .flat_map(|a| a.uploaded.iter().cloned())
            .collect();
        let operators = assemble_operators(states.into_iter().map(|a| a.ack).collect())?;
        match kind {
            CheckpointKind::Checkpoint => {
                // Every shared file must be alive: written for this checkpoint, or known.
                for op in &operators {
                    for st in &op.subtasks {
                        let canonical = st
                            .keyed
                            .iter()
                            .flat_map(|k| k.files.iter().map(|f| &f.file));
                        let native = st
                            .native
                            .iter()
                            .flat_map(|k| k.files.iter().map(|f| &f.file));
                        for f in canonical.chain(native) {
                            if let FileLocation::Shared(n) = &f.location {
                                if !uploaded.contains(n) && !self.registry.is_known(n) {
                                    return Err(Error::MissingFile {
                                        file: n.clone(),
                                        referenced_by: format!(
                                            "checkpoint {checkpoint_id} (no longer retained)"
                                        ),
                                    });
                                }
                            }
                        }
                    }
                }
                let c = commit_checkpoint(
                    &self.storage,
                    &mut self.log,
                    checkpoint_id,
                    ts,
                    duration,
                    operators,
                )?;
                self.registry.register(&c.metadata);
                self.completed.insert(checkpoint_id, c.clone());
                Ok(c)
            }
            CheckpointKind::Savepoint => {
                let dir = self
                    .savepoint_dirs
                    .get(&checkpoint_id)
                    .cloned()
                    .ok_or_else(|| Error::InvalidConfig {
                        reason: format!("no directory for savepoint {checkpoint_id}"),
                    })?;
                commit_savepoint(
                    &self.storage,
                    &dir,
                    checkpoint_id,
                    ts,
                    duration,
                    self.log.epoch(),
                    operators,
                )
            }
        }
    }

    fn completed(&mut self, checkpoint_id: u64, kind: CheckpointKind, subsumed: Vec<u64>) {
        self.savepoint_dirs.remove(&checkpoint_id);
        let done = self.finished.remove(&checkpoint_id);
        // Notify first: barriers sent after this point build on this checkpoint.
        self.notify_tasks(SubtaskCommand::CheckpointComplete { checkpoint_id });
        let next_id = self.protocol.next_id();
        let subsumed_count = subsumed.len();
        for old in subsumed {
            if let Some(c) = self.completed.remove(&old) {
                self.registry.unregister(&c.metadata, next_id);
            }
            let _ = discard_checkpoint_dir(&self.storage, old);
        }
        if kind == CheckpointKind::Checkpoint {
            if let Some(oldest) = self.completed.keys().next() {
                let _ = self.log.prune(*oldest);
            }
        }
        if let Some(c) = done {
            let bytes: u64 = c.metadata.files().map(|f| f.size).sum();
            tracing::info!(
                checkpoint_id,
                kind = ?kind,
                path = %c.location(),
                bytes,
                subsumed = subsumed_count,
                millis = c.metadata.duration_millis.unwrap_or_default(),
                "checkpoint completed"
            );
            self.end_attempt(checkpoint_id, Ok(()));
            self.emit(CheckpointEvent::Completed {
                checkpoint_id,
                kind,
                path: c.location(),
            });
            if let Some(w) = self.waiters.remove(&checkpoint_id) {
                let _ = w.send(Ok(c));
            }
        }
    }

    fn discard(&mut self, checkpoint_id: u64, states: &[Acked]) {
        match self.savepoint_dirs.remove(&checkpoint_id) {
            Some(dir) => self.discard_own_files(&dir, checkpoint_id),
            None => {
                if !self.completed.contains_key(&checkpoint_id) {
                    let dir = self.storage.checkpoint_dir(checkpoint_id);
                    self.discard_own_files(&dir, checkpoint_id);
                }
            }
        }
        let next_id = self.protocol.next_id();
        let mut shared = Vec::new();
        for a in states {
            let st = &a.ack.state;
            for f in st.keyed.iter().flat_map(|k| k.files.iter()) {
                if let FileLocation::Shared(n) = &f.file.location {
                    shared.push((n.clone(), next_id));
                }
            }
            for f in st.native.iter().flat_map(|k| k.files.iter()) {
                if let FileLocation::Shared(n) = &f.file.location {
                    shared.push((n.clone(), u64::MAX));
                }
            }
        }
        self.registry.park_unreferenced(shared);
    }

    /// Deletes the files this coordinator wrote for checkpoint `checkpoint_id` into `dir` (a
    /// newer coordinator may use the same id after fencing this one, and a savepoint directory
    /// may hold an earlier savepoint: their files are left alone).
    fn discard_own_files(&self, dir: &Path, checkpoint_id: u64) {
        let mark = format!("-e{}-c{checkpoint_id}-p", self.log.epoch());
        let Ok(objects) = self.storage.list(dir) else {
            return;
        };
        for o in objects {
            let Some(name) = o.location.filename() else {
                continue;
            };
            let ours = if name == crate::storage::METADATA_FILE {
                CompletedCheckpoint::load(&self.storage, &o.location)
                    .map(|c| {
                        c.metadata.epoch == self.log.epoch()
                            && c.metadata.checkpoint_id == checkpoint_id
                    })
                    .unwrap_or(false)
            } else {
                name.contains(&mark)
            };
            if ours {
                let _ = self.storage.delete(&o.location);
            }
        }
    }

    fn delete_parked(&mut self) {
        let lowest = self.protocol.pending().into_iter().min();
        for f in self.registry.take_deletable(lowest) {
            let _ = self
                .storage
                .delete(&self.storage.shared_dir().join(f.as_str()));
        }
    }

    /// Waits (at most the checkpoint timeout) for the writes already handed to the writer
    /// threads, handling their results: the files of checkpoints aborted by the shutdown are
    /// deleted when their writes end, instead of appearing after the abort deleted the
    /// directory (or being left as half-written staging files when the process exits).
    fn drain_writes(&mut self, rx: &Receiver<Msg>) {
        let deadline = Instant::now() + self.config.timeout;
        loop {
            let busy = self.in_flight.load(Ordering::Acquire) > 0;
            let msg = if busy {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => return,
                }
            };
            let actions = match msg {
                Msg::Ack {
                    checkpoint_id,
                    task,
                    ack,
                } => self.protocol.ack(checkpoint_id, task, *ack),
                Msg::Decline {
                    checkpoint_id,
                    task,
                    reason,
                } => self.protocol.decline(checkpoint_id, task, reason),
                Msg::Trigger { reply, .. } => {
                    let _ = reply.send(Err(stopped()));
                    Vec::new()
                }
                Msg::Shutdown { reply } => {
                    let _ = reply.send(Ok(()));
                    Vec::new()
                }
                Msg::Stop => Vec::new(),
            };
            self.execute(actions);
        }
    }

    fn shutdown(&mut self, rx: &Receiver<Msg>) -> Result<()> {
        let actions = self.protocol.shutdown();
        self.execute(actions);
        self.drain_writes(rx);
        if self.config.retention_on_shutdown == RetentionOnShutdown::Delete && self.fenced.is_none()
        {
            let ids: Vec<u64> = self.completed.keys().copied().collect();
            for id in ids {
                if let Some(c) = self.completed.remove(&id) {
                    for f in shared_files(&c.metadata) {
                        let _ = self
                            .storage
                            .delete(&self.storage.shared_dir().join(f.as_str()));
                    }
                }
                discard_checkpoint_dir(&self.storage, id)?;
            }
        }
        Ok(())
    }
}
