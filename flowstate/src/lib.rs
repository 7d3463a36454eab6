//! Flowstate: keyed state, checkpoints and savepoints for Rust stream processors.
//!
//! This facade re-exports the crates of the stack by feature, so a job depends on one crate:
//!
//! | feature          | re-export            | what it is                                          |
//! |------------------|----------------------|-----------------------------------------------------|
//! | always           | [`api`]              | `state-api`: key groups, state kinds, TTL, snapshots |
//! | always           | [`storage`], [`config`] | `storage-s3`: local disk and memory stores; configuration |
//! | `heap` (default) | [`heap`], [`job`], [`tools`] | `state-heap`, `checkpoint`, the Nexmark job, the CLI's tools |
//! | `mmap`           | `mmap`               | `state-mmap`: the memory-mapped backend              |
//! | `s3`             | (in [`storage`])     | S3 and S3-compatible stores                          |
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
#[cfg(feature = "heap")]
pub mod job;
#[cfg(feature = "heap")]
pub mod tools;

pub use state_api as api;
pub use storage_s3 as storage;

#[cfg(feature = "heap")]
pub use state_heap as heap;

#[cfg(feature = "mmap")]
pub use state_mmap as mmap;
