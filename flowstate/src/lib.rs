//! Flowstate: keyed state, checkpoints and savepoints for Rust stream processors.
//!
//! This facade re-exports the crates of the stack by feature, so a job depends on one crate:
//!
//! | feature          | re-export                    | what it is                                    |
//! |------------------|------------------------------|-----------------------------------------------|
//! | always           | [`api`]                      | `state-api`: key groups, state kinds, TTL, snapshots, the snapshot contract |
//! | always           | [`storage`], [`config`]      | `storage-s3`: local disk and memory stores; configuration |
//! | `heap` (default) | [`heap`], [`checkpoint`], [`processor`] | `state-heap`, the checkpoint layer and its State Processor (read, bootstrap, transform savepoints offline) |
//! | `mmap`           | `mmap`, [`checkpoint`]       | `state-mmap` and the checkpoint layer (with or without `heap`) |
//! | `s3`, `gcp`, `azure` | (in [`storage`])         | S3-compatible, Google Cloud and Azure stores   |
//! | `timely`         | `timely`                     | `flowstate-timely`: keyed operators and checkpoints on timely dataflow, across processes |
//!
//! The default build has the heap backend, checkpoints and local storage, and nothing else: no
//! HTTP stack, no command-line parser. The `flowstate` command-line tool and its Nexmark job are
//! the `flowstate-cli` crate.
//!
//! ```
//! use flowstate::api::{KeyedStateBackend, KeyedStateBackendExt, ReducingStateDescriptor};
//! use flowstate::heap::HeapKeyedStateBackend;
//!
//! # fn main() -> flowstate::api::Result<()> {
//! let mut backend = HeapKeyedStateBackend::<u64>::builder().build()?;
//! let clicks = backend.register_reducing(ReducingStateDescriptor::<u64>::new("clicks", |a, b| a + b)?)?;
//! backend.set_current_key(42)?;
//! backend.reducing(&clicks).add(1)?;
//! backend.reducing(&clicks).add(1)?;
//! assert_eq!(backend.reducing(&clicks).get()?, Some(2));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod config;
#[cfg(any(feature = "heap", feature = "mmap"))]
pub mod pipeline;

pub use state_api as api;
pub use storage_s3 as storage;

#[cfg(feature = "heap")]
pub use state_heap as heap;

#[cfg(any(feature = "heap", feature = "mmap"))]
pub use checkpoint;

/// The State Processor: list, read, bootstrap and transform the state of any job's checkpoint
/// or savepoint offline (`checkpoint::processor`).
#[cfg(any(feature = "heap", feature = "mmap"))]
pub use checkpoint::processor;

#[cfg(feature = "mmap")]
pub use state_mmap as mmap;

/// Keyed stateful operators, split sources and epoch-aligned checkpoints on timely dataflow,
/// across processes (the `flowstate-timely` crate).
#[cfg(feature = "timely")]
pub use flowstate_timely as timely;
