//! Checkpoints and savepoints for Flowstate: the coordinator, the on-store format, restore and
//! rescaling.
//!
//! - [`coordinator`]: [`CheckpointCoordinator`] for one job whose subtasks live in this process:
//!   periodic and manual triggers, barriers over crossbeam channels, synchronous snapshots on the
//!   subtask threads and uploads on writer threads, `_metadata` written last, completion
//!   notifications, retention, cleanup, savepoints.
//! - [`protocol`]: the coordinator's decisions (trigger, ack, decline, timeout, subsumption,
//!   tolerable failures) as plain code with Flink's options and defaults ([`CheckpointConfig`]).
//! - [`storage`]: the layout under a checkpoint root on any `Arc<dyn ObjectStore>`
//!   (`<job>/chk-<n>/_metadata`, `<job>/chk-<n>/…`, `<job>/shared/…`, `savepoints/savepoint-<id>/`).
//! - [`format`](mod@format): the `_metadata` file (magic, version, ids, per operator and
//!   subtask: state handles with per-key-group offsets, serializer snapshots, operator state;
//!   CRC32C over everything; every length bounded on read). Byte layout in
//!   `docs/checkpoint-format.md`.
//! - [`write`](mod@write): the asynchronous part of a snapshot: full, incremental or delta
//!   canonical streams (split by key group into parts written in parallel; a heap delta holds
//!   the changed entries and tombstones on top of a chain), or a backend's native files
//!   (the mmap backend's immutable files, uploaded once and referenced afterwards).
//! - [`history`]: every checkpoint attempt (completed, aborted, declined, with the reason),
//!   its sizes and per-subtask durations, kept next to the job's checkpoints (the last 1,000).
//! - [`registry`]: reference counts of the incremental files in `shared/`.
//! - [`commit`]: the commit log that fences stale coordinators with create-only puts.
//! - [`inspect`]: what a checkpoint holds per subtask, every file verified (size, CRC32C,
//!   block checksums) and entries counted from the verified data.
//! - [`processor`]: the State Processor: list, read (typed), bootstrap and transform the
//!   state of any job's checkpoint or savepoint offline, driven by its metadata and serializer
//!   snapshots.
//! - [`restore`]: restore the latest checkpoint or a given checkpoint/savepoint path at the same
//!   or another parallelism, reading only the owned key groups by range reads (or, for a
//!   backend's native checkpoints, streaming to disk only the files its format says hold owned
//!   key groups);
//!   operator state redistributed (even split, union, broadcast); every damage a named error.
//!
//! The crate knows backends only through the snapshot contract of `state-api`
//! (`state_api::checkpointing::CheckpointableBackend`: canonical streams, deltas on earlier
//! checkpoints, or immutable native files with the backend's manifest); it depends on no
//! backend crate. See `docs/snapshot-contract.md`.
//!
//! The crate talks to storage only through `object_store`; `storage-s3` builds stores from URLs.
//!
//! # Sync and async callers
//!
//! The API is synchronous: subtasks snapshot on their own threads and the coordinator runs its
//! own threads. Storage I/O runs on a small tokio runtime owned by [`CheckpointStorage`] (two
//! worker threads), and the blocking calls wait for it without ever starting a runtime
//! ([`storage_s3::block_on_io`]), so every call works from a plain thread *and* from inside an
//! async runtime, `#[tokio::main]` included, of either flavor. Dropping the last clone of a
//! storage, or a coordinator, inside async code is safe too: the runtime shuts down in the
//! background.
//!
//! Inside async code a blocking call blocks the calling thread until it is done, like any
//! blocking call (on a current-thread runtime nothing else runs meanwhile). The calls that wait
//! on storage or on other threads therefore have async variants that run on a blocking thread
//! of the storage's runtime and never block the caller:
//! [`CheckpointCoordinator::trigger_checkpoint_async`], [`PendingCheckpoint::wait_async`],
//! [`CompletedCheckpoint::latest_async`], [`CompletedCheckpoint::load_async`],
//! [`CompletedCheckpoint::restore_keyed_async`], [`CheckpointCoordinator::shutdown_async`],
//! and for any other call [`CheckpointStorage::run_blocking`]. Their futures are `Send +
//! 'static` and can be awaited on any executor. Building the storage and the coordinator and a
//! subtask's synchronous snapshot ([`SubtaskEndpoint::snapshot_heap`]; the upload runs on the
//! coordinator's writer threads) are short and may be called directly; a subtask that runs as a
//! task polls its endpoint with [`SubtaskEndpoint::try_recv`].
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use checkpoint::*;
//! use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
//! use state_heap::HeapKeyedStateBackend;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! // Inside `#[tokio::main]` (here a current-thread runtime):
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
//! // The subtask: a task of the same runtime.
//! let subtask = tokio::spawn(async move {
//!     loop {
//!         match endpoint.try_recv() {
//!             Some(SubtaskCommand::Barrier(barrier)) => {
//!                 endpoint.snapshot_heap(&barrier, &mut backend, None)?;
//!             }
//!             Some(SubtaskCommand::CheckpointComplete { .. }) => return Ok::<_, Error>(()),
//!             Some(_) => {}
//!             None => tokio::time::sleep(Duration::from_millis(1)).await,
//!         }
//!     }
//! });
//!
//! let pending = coordinator.trigger_checkpoint_async().await?;
//! let completed = pending.wait_async(Duration::from_secs(10)).await?;
//! subtask.await??;
//!
//! let latest = CompletedCheckpoint::latest_async(&storage).await?.expect("one checkpoint");
//! assert_eq!(latest.metadata.checkpoint_id, completed.metadata.checkpoint_id);
//! let backend = HeapKeyedStateBackend::<String>::builder().build()?;
//! let mut restored = latest.restore_keyed_async(&storage, "counts", 0, backend).await?;
//! let count = restored.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! restored.set_current_key("ann".to_string())?;
//! assert_eq!(restored.value(&count).get()?, Some(1));
//! coordinator.shutdown_async().await?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Example
//!
//! Checkpoint two subtasks of a keyed operator to an in-memory store and restore at
//! parallelism 1:
//!
//! ```
//! use std::sync::Arc;
//! use checkpoint::*;
//! use state_api::{KeyGroupRange, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
//! use state_api::{assign_to_key_group, PostcardSerializer, StateSerializer};
//! use state_heap::HeapKeyedStateBackend;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(object_store::memory::InMemory::new());
//! let storage = CheckpointStorage::new(store, "checkpoints", "job-1")?;
//! let mut log = CommitLog::claim(&storage)?;
//! let target = SnapshotTarget {
//!     dir: storage.checkpoint_dir(1),
//!     shared_dir: storage.shared_dir(),
//!     checkpoint_id: 1,
//!     epoch: log.epoch(),
//! };
//! let mut acks = Vec::new();
//! for i in 0..2 {
//!     let range = KeyGroupRange::for_operator(128, 2, i)?;
//!     let mut b = HeapKeyedStateBackend::<u64>::builder().key_group_range(range).build()?;
//!     let sum = b.register_value(ValueStateDescriptor::<u64>::new("sum")?)?;
//!     for key in (0..100u64).filter(|k| range.contains(key_group_of(*k))) {
//!         b.set_current_key(key)?;
//!         b.value(&sum).update(key * 10)?;
//!     }
//!     let snapshot = SubtaskSnapshot {
//!         operator_id: "sums".into(),
//!         subtask: i,
//!         keyed: Some(KeyedSnapshot::Full(vec![b.snapshot()?])),
//!         operator_state: None,
//!     };
//!     let state = write_subtask_snapshot(&storage, &target, snapshot)?;
//!     acks.push(SubtaskAck { operator_id: "sums".into(), parallelism: 2, max_parallelism: 128, state });
//! }
//! commit_checkpoint(&storage, &mut log, 1, 0, None, assemble_operators(acks)?)?;
//!
//! let latest = CompletedCheckpoint::latest(&storage)?.expect("one checkpoint");
//! let mut restored = HeapKeyedStateBackend::<u64>::builder().build()?;
//! latest.restore_keyed(&storage, "sums", 0, &mut restored)?;
//! let sum = restored.register_value(ValueStateDescriptor::<u64>::new("sum")?)?;
//! restored.set_current_key(7)?;
//! assert_eq!(restored.value(&sum).get()?, Some(70));
//! # Ok(()) }
//! # fn key_group_of(k: u64) -> u32 {
//! #     let mut b = Vec::new();
//! #     PostcardSerializer::<u64>::new().serialize(&k, &mut b).unwrap();
//! #     assign_to_key_group(&b, 128)
//! # }
//! ```

#![warn(missing_docs)]

pub mod commit;
pub mod complete;
pub mod coordinator;
pub mod error;
pub mod format;
pub mod history;
pub mod inspect;
pub mod processor;
pub mod protocol;
pub mod registry;
pub mod restore;
pub mod storage;
pub mod write;

pub use commit::{CommitLog, LogEntry};
pub use complete::{
    assemble_operators, commit_checkpoint, commit_savepoint, discard_checkpoint_dir, SubtaskAck,
};
pub use coordinator::{
    chain_too_long, Barrier, CheckpointCoordinator, CheckpointEvent, CoordinatorBuilder,
    PendingCheckpoint, SubtaskCommand, SubtaskEndpoint, MAX_DELTA_FILES,
};
pub use error::{Error, Result};
pub use format::{
    CheckpointMetadata, FileLocation, FileRef, KeyedStateFile, KeyedStateHandle, NativeFile,
    NativeKeyedHandle, OperatorSnapshot, SnapshotKind, SubtaskState,
};
pub use history::{read_history, AttemptStatus, CheckpointAttempt, SubtaskAttempt, SubtaskStatus};
pub use inspect::{FileSummary, KeyedFormat, OperatorSummary, SubtaskSummary};
pub use processor::{SavepointReader, SavepointWriter};
pub use protocol::{
    AbortReason, Action, CheckpointConfig, CheckpointKind, Protocol, RetentionOnShutdown,
};
pub use registry::SharedStateRegistry;
pub use restore::{CompletedCheckpoint, KeyGroupReader, RestoreOptions};
pub use storage::{validate_name, CheckpointStorage};
pub use write::{
    split_key_groups, write_subtask_snapshot, KeyedSnapshot, SnapshotTarget, SubtaskSnapshot,
};
