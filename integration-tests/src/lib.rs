//! Cross-crate tests for Flowstate: see the `tests/` directory of this crate (exactly-once under
//! SIGKILL with rescaling, savepoints across backends, committed format fixtures) and its
//! `benches/` (timers on both backends).
//!
//! The tests route keys the way every backend does, by key group of the serialized key:
//!
//! ```
//! use state_api::{assign_to_key_group, KeyGroupRange};
//!
//! let kg = assign_to_key_group(&42u64.to_be_bytes(), 128);
//! let owner = (0..4)
//!     .find(|i| KeyGroupRange::for_operator(128, 4, *i).unwrap().contains(kg))
//!     .unwrap();
//! assert!(owner < 4);
//! ```
