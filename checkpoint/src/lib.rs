//! Checkpoints and savepoints for Flowstate (work in progress).
//!
//! This crate will hold the checkpoint coordinator (triggers, barriers, acknowledgements,
//! `_metadata` written last), the checkpoint and savepoint layout on an `object_store` store,
//! restore, and rescaling by key-group ranges. Nothing is implemented yet.
//!
//! ```
//! // The crate currently exposes no items; depending on it compiles.
//! ```
