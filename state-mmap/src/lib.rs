//! Off-heap keyed state backend for Flowstate (work in progress).
//!
//! This crate will hold an embedded log-structured merge store over memory-mapped files: keys
//! ordered as `[key group][state id][key][namespace][user key]`, a bounded write buffer, immutable
//! sorted-run files with index, bloom filter and checksums, background compaction and a merge
//! operator for list appends. It will implement the `state-api` backend traits and hand its
//! immutable files to incremental checkpoints. Nothing is implemented yet; see issue "state-mmap".
//!
//! ```
//! // The crate currently exposes no items; depending on it compiles.
//! ```
