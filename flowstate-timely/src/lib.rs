//! Keyed stateful operators with Flowstate state and checkpoints on [timely dataflow], across
//! processes, with an object store (S3) as the only shared service.
//!
//! - Times are [`Time`] = `Product<epoch, watermark>`: sources stamp records with their
//!   current epoch and event-time watermark; a checkpoint is the end of an epoch.
//! - [`Checkpointing::split_source`]: a replayable source of numbered splits; the offset of
//!   each split is operator state (even-split redistribution), so a restored job resumes every
//!   split exactly and a job restored at another worker count spreads the splits over its
//!   workers. Every checkpoint interval each source closes its epoch.
//! - [`Checkpointing::keyed`]: records are exchanged to the worker owning their key group
//!   (worker `i` of `n` owns `KeyGroupRange::for_operator(max, n, i)`); the user's
//!   [`KeyedFunction`] sees a Flowstate backend (heap, mmap, or any
//!   `CheckpointableBackend`) with the current key set; event-time timers fire as the input
//!   frontier's watermark passes them, processing-time timers by the wall clock. When the
//!   input frontier passes epoch `e`, the operator takes the synchronous part of its snapshot
//!   on the worker and writes it on an upload thread (`checkpoint::write`).
//! - The state handles travel as records to worker 0, whose committer writes `_metadata`
//!   through the fenced commit log (`checkpoint::commit_checkpoint`) and sends the completion
//!   back around a loop to every worker (backends are notified).
//! - On start, worker 0 claims the job's commit log (fencing every earlier run), picks the
//!   latest checkpoint (or the given one) and tells every worker, so that all processes
//!   restore the same one, at whatever worker count the job has now: each worker reads only
//!   the key groups it owns.
//! - [`cluster::run`] runs the workers of one process; processes find each other through
//!   timely's hostfile ([`Cluster::from_hostfile`]). A peer process that dies stops the others.
//!
//! [timely dataflow]: https://docs.rs/timely
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use flowstate_timely::*;
//! use state_api::{FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt};
//! use state_api::{ReducingStateDescriptor, ReducingStateHandle};
//! use state_heap::HeapKeyedStateBackend;
//! use timely::dataflow::operators::Inspect;
//!
//! /// Reads split `s` as the numbers `s, s + 2, s + 4, …` below 100, at event time = number.
//! struct Numbers;
//! impl SplitReader for Numbers {
//!     type Item = u64;
//!     fn read(&mut self, split: u32, offset: u64, max: usize, out: &mut Vec<(u64, i64)>)
//!         -> Result<ReadOutcome, String> {
//!         let mut o = offset;
//!         while (out.len() < max) && (u64::from(split) + 2 * o < 100) {
//!             let n = u64::from(split) + 2 * o;
//!             out.push((n, n as i64));
//!             o += 1;
//!         }
//!         Ok(ReadOutcome { next_offset: o, finished: u64::from(split) + 2 * o >= 100 })
//!     }
//! }
//!
//! /// Sums the numbers per key `n % 10`, emitting each sum at the end.
//! struct Sums;
//! impl KeyedFunction<HeapKeyedStateBackend<u64>> for Sums {
//!     type Input = u64;
//!     type Output = (u64, u64);
//!     type States = ReducingStateHandle<u64, ()>;
//!     type Namespace = ();
//!     fn register(&mut self, b: &mut HeapKeyedStateBackend<u64>) -> state_api::Result<Self::States> {
//!         b.register_reducing(ReducingStateDescriptor::new("sum", |a, b| a + b)?)
//!     }
//!     fn process(&mut self, ctx: &mut KeyedContext<'_, HeapKeyedStateBackend<u64>, Self::States, (), (u64, u64)>, n: u64)
//!         -> Result<(), String> {
//!         let (b, sum) = ctx.parts();
//!         b.reducing(sum).add(n).map_err(|e| e.to_string())
//!     }
//!     fn on_end(&mut self, ctx: &mut KeyedContext<'_, HeapKeyedStateBackend<u64>, Self::States, (), (u64, u64)>)
//!         -> Result<(), String> {
//!         let (b, sum) = ctx.parts();
//!         let keys: Vec<u64> = b.keys(sum, &()).map_err(|e| e.to_string())?.collect::<Result<_, _>>().map_err(|e| e.to_string())?;
//!         let mut out = Vec::new();
//!         for k in keys {
//!             b.set_current_key(k).map_err(|e| e.to_string())?;
//!             out.push((k, b.reducing(sum).get().map_err(|e| e.to_string())?.unwrap_or(0)));
//!         }
//!         out.into_iter().for_each(|r| ctx.emit(r));
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(object_store::memory::InMemory::new());
//! let storage = checkpoint::CheckpointStorage::new(store, "checkpoints", "sums")?;
//! let job = Job::open(JobConfig::new(storage))?;
//! let sums = Arc::new(Mutex::new(Vec::new()));
//! let (seen, worker_job) = (Arc::clone(&sums), job.clone());
//! // Two workers in this process; `Cluster::from_hostfile` spreads them over processes.
//! cluster::run(&Cluster::single(2), &job, move |worker| {
//!     let (seen, job) = (Arc::clone(&seen), worker_job.clone());
//!     cluster::dataflow(worker, move |scope| {
//!         let mut ck = Checkpointing::new(scope, &job);
//!         let numbers = ck.split_source(SourceOptions::new("numbers", 2), Numbers)?;
//!         let heap = |range, max| {
//!             HeapKeyedStateBackend::<u64>::builder()
//!                 .max_parallelism(max)
//!                 .key_group_range(range)
//!                 .key_serializer(FixedWidthSerializer::<u64>::new())
//!                 .build()
//!                 .map_err(|e| e.to_string())
//!         };
//!         let options = KeyedOptions::new("sums", FixedWidthSerializer::<u64>::new());
//!         ck.keyed(numbers, options, |n: &u64| n % 10, heap, Sums)?
//!             .inspect(move |s| seen.lock().expect("not poisoned").push(*s));
//!         ck.finish();
//!         Ok(())
//!     })
//! })?;
//! let mut sums = sums.lock().expect("not poisoned").clone();
//! sums.sort();
//! assert_eq!(sums.len(), 10);
//! assert_eq!(sums[3], (3, (0..100).filter(|n| n % 10 == 3).sum()));
//! assert!(job.final_checkpoint().is_some());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod ack;
pub mod backends;
pub mod cluster;
mod committer;
pub mod error;
pub mod job;
pub mod keyed;
pub mod source;

pub use ack::{AckMessage, Completion};
pub use cluster::Cluster;
pub use committer::Checkpointing;
pub use error::{Error, Result};
pub use job::{Job, JobConfig, RestoreFrom};
pub use keyed::{KeyedContext, KeyedFunction, KeyedOptions};
pub use source::{ReadOutcome, SourceOptions, SplitReader};

/// The time of every dataflow of a job: `(epoch, event-time watermark)`, ordered as a product
/// (both components). An epoch ends at a checkpoint; the watermark is the least event time
/// still to come.
pub type Time = timely::order::Product<u64, i64>;
