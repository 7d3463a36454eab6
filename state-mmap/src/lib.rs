//! Off-heap keyed state for Flowstate: an embedded log-structured merge store over
//! memory-mapped files (the role Flink gives its RocksDB backend).
//!
//! [`MmapKeyedStateBackend`] implements `state_api::KeyedStateBackend` with the semantics of the
//! heap backend (it passes the same conformance suite). Underneath, the [`engine`] keeps recent
//! writes in a bounded write buffer, flushes it to immutable sorted runs ([`run`]) on a
//! background thread, reads them through `mmap`, and compacts them on another thread
//! (dropping tombstones and TTL-expired state). List appends are blind merges.
//!
//! ```
//! use state_api::{KeyedStateBackend, KeyedStateBackendExt, KeyedStateSnapshot, ValueStateDescriptor};
//! use state_mmap::MmapKeyedStateBackend;
//!
//! # fn main() -> state_api::Result<()> {
//! let mut backend = MmapKeyedStateBackend::<String>::builder().build()?; // temporary directory
//! let count = backend.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! for user in ["ann", "bob", "ann"] {
//!     backend.set_current_key(user.to_string())?;
//!     let n = backend.value(&count).get()?.unwrap_or(0);
//!     backend.value(&count).update(n + 1)?;
//! }
//! // A canonical snapshot restores into any backend (heap or mmap).
//! let mut bytes = Vec::new();
//! backend.snapshot()?.write_to(&mut bytes)?;
//! let mut restored = MmapKeyedStateBackend::<String>::builder().build()?;
//! restored.restore(vec![("chk-1".to_string(), &bytes[..])])?;
//! let count = restored.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! restored.set_current_key("ann".to_string())?;
//! assert_eq!(restored.value(&count).get()?, Some(2));
//! # Ok(()) }
//! ```
//!
//! # Checkpoints
//!
//! - Canonical snapshots ([`KeyedStateBackend::snapshot`](state_api::KeyedStateBackend::snapshot)):
//!   the backend-independent stream of `state-api`, for savepoints; the view is taken in
//!   microseconds (the write buffer becomes immutable, files are shared by reference) and
//!   written on any thread.
//! - Native incremental checkpoints ([`MmapKeyedStateBackend::checkpoint`]): a flush, then the
//!   set of immutable files with unique names and key-group ranges; a checkpoint layer uploads
//!   only names it has not uploaded before. [`MmapKeyedStateBackend::restore_native`] opens the
//!   files of one or several checkpoints at any parallelism, clipping files to the owned key
//!   groups instead of rewriting them.
//!
//! # Memory
//!
//! One number, [`MmapBackendBuilder::memory_budget`] (default 256 MiB), bounds the engine's own
//! memory: the in-memory block index and bloom filter of every sorted run (32 bytes per data
//! block of about 4 KiB and 10 bits per key), what running compactions reserve (their outputs' block indexes and the buffers of
//! the file being written, charged from the start of the compaction), the write buffer and
//! write buffers waiting for their flush (they get what the indexes and reservations leave).
//! A flushed write buffer's allocations are kept for the engine's next buffer (at most one
//! buffer's, in the budget's headroom), so new writes do not fault in new pages; what is not
//! kept is handed back to the OS (glibc `malloc_trim`).
//!
//! Backends built from one [`MmapEnvironment`] ([`MmapBackendBuilder::environment`]) share its
//! budget (each gets what its state charges plus an even part of the rest) and its background threads (a small pool for flushes and
//! compactions and three service threads): make one per process, so that many operators and
//! subtasks together stay within one budget. A backend built without one starts its own.
//!
//! Data blocks (and the on-disk index, read only when keys share their first 16 bytes) are
//! read through read-only memory maps and live in the OS page cache, outside the budget. Under
//! a container memory limit (a memory cgroup) the limit covers the process's anonymous memory
//! *and* the page cache it brings in: the budget is anonymous memory, the rest of the limit
//! caches data blocks, and the kernel evicts those within the limit as lookups fault new ones
//! in. Each data block lies within one 4 KiB page of its file, and the mappings are advised
//! random, so a lookup whose block is not cached costs one page fault and one device read of
//! one page. Give a container at least the budget plus a few hundred MiB. The split, and the
//! byte layout of every file, are in `docs/mmap-format.md`.
//!
//! # Safety
//!
//! The only `unsafe` code (module `mapped`) maps files read-only, issues CPU prefetch hints
//! and calls glibc's `malloc_trim`; files are immutable once published and never truncated
//! by this crate (see `docs/mmap-format.md` on truncation).
//!
//! The crate has no cargo features.
#![warn(missing_docs)]

mod backend;
mod codec;
pub mod engine;
pub mod environment;
pub mod error;
mod iter;
mod keys;
mod manifest;
mod mapped;
mod memtable;
pub mod run;
mod tempdir;
mod typed;

pub use backend::native::{
    CheckpointFile, FileRef, MmapNativeFormat, NativeCheckpoint, NativeCheckpointMeta,
    NativeRestore, MMAP_BACKEND_ID,
};
pub use backend::{MmapBackendBuilder, MmapKeyedStateBackend, MmapSnapshot};
pub use environment::{EnvOptions, MmapEnvironment};
pub use error::{Error, Result};
