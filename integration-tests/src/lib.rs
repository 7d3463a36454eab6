//! Cross-crate tests for Flowstate: see the `tests/` directory of this crate.
//!
//! ```
//! // This crate only carries tests.
//! ```
