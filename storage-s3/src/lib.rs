//! Durable storage for Flowstate checkpoints, built on `object_store` (work in progress).
//!
//! ```
//! // The crate currently exposes no items; depending on it compiles.
//! ```
