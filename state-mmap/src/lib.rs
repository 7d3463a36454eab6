//! Off-heap keyed state for Flowstate: an embedded log-structured merge store over
//! memory-mapped files (the role Flink gives its RocksDB backend).
//!
//! The [`engine`] keeps recent writes in a bounded write buffer, flushes it to immutable sorted
//! runs ([`run`]) on a background thread, reads them through `mmap`, and compacts them on the
//! same thread. List appends are blind merges (no read-modify-write).
//!
//! ```
//! use state_mmap::engine::{Db, EngineOptions};
//!
//! # fn main() -> state_mmap::Result<()> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let mut db = Db::open(dir.path(), EngineOptions::default())?;
//! db.put(b"k", b"v1")?;
//! db.merge(b"k", b"+v2")?; // appended without reading
//! db.flush()?;
//! let mut out = Vec::new();
//! assert!(db.get(b"k", &mut out)?);
//! assert_eq!(out, b"v1+v2");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod engine;
pub mod error;
mod iter;
mod manifest;
mod mapped;
mod memtable;
pub mod run;

pub use error::{Error, Result};
