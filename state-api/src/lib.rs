//! The state API of Flowstate: the types and traits every backend and the checkpoint layer speak.
//!
//! - [`key_group`]: keys are hashed from their serialized bytes into key groups; each parallel
//!   subtask owns a contiguous [`KeyGroupRange`] (Flink's semantics and default max parallelism).
//! - [`descriptor`]: the five keyed-state kinds (value, list, map, reducing, aggregating), each
//!   scoped by key and namespace, declared with validated names, serializers and optional TTL.
//! - [`backend`]: the [`KeyedStateBackend`] trait that backends implement and the typed
//!   accessors users call ([`KeyedStateBackendExt`]).
//! - [`operator`]: operator list state (even-split or union redistribution) and broadcast state.
//! - [`ttl`]: Flink's `StateTtlConfig` options and an injectable [`Clock`].
//! - [`timer`]: event-time and processing-time timers kept in the backend.
//! - [`serializer`]: serde + postcard by default, custom formats through [`StateSerializer`], and
//!   schema evolution (as is / after migration / incompatible).
//! - [`snapshot`]: the canonical, backend-independent snapshot stream, grouped by key group with
//!   offsets, magic, version and checksums.
//! - [`checkpointing`]: the snapshot contract between backends and checkpoints: canonical
//!   streams, deltas on earlier checkpoints, or immutable native files with a manifest;
//!   completion and abort notifications; which native files a restore needs.
//! - `testing` (feature `test-util`): the conformance suite every backend runs.
//!
//! This crate does no I/O beyond `std::io::{Read, Write}`.
//!
//! # Example
//!
//! ```
//! use state_api::{assign_to_key_group, KeyGroupRange, StateSerializer, PostcardSerializer};
//!
//! // Which subtask of 4 owns the key "user-42" when the job has 128 key groups?
//! let mut key = Vec::new();
//! PostcardSerializer::<String>::new().serialize(&"user-42".to_string(), &mut key).unwrap();
//! let key_group = assign_to_key_group(&key, 128);
//! let owner = (0..4)
//!     .find(|i| KeyGroupRange::for_operator(128, 4, *i).unwrap().contains(key_group))
//!     .unwrap();
//! assert_eq!(owner, state_api::operator_index_for_key_group(128, 4, key_group));
//! ```
//!
//! | feature     | what it adds                                                    |
//! |-------------|-----------------------------------------------------------------|
//! | `test-util` | `state_api::testing`: the backend conformance suite (proptest)  |

#![warn(missing_docs)]

pub mod backend;
pub mod checkpointing;
pub mod descriptor;
pub mod error;
pub mod key_group;
pub mod operator;
pub mod serializer;
pub mod snapshot;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod timer;
pub mod ttl;

pub use backend::*;
pub use descriptor::*;
pub use error::{Error, Result};
pub use key_group::*;
pub use operator::{
    redistribute, BroadcastState, BroadcastStateDescriptor, OperatorListState,
    OperatorListStateDescriptor, OperatorStateStore, RedistributionMode,
};
pub use serializer::*;
pub use snapshot::{SnapshotHeader, SnapshotSummary};
pub use timer::{
    KeyGroupTimers, TimeDomain, Timer, TimerAccess, TimerServiceDescriptor, TimerServiceHandle,
};
pub use ttl::*;
