//! The `flowstate` command-line tool's library: the Nexmark job it runs ([`job`]) and the
//! offline tools behind `checkpoints list|inspect` ([`tools`]), `savepoint` and
//! `state list|dump|get` ([`state`]: any job's state, through the checkpoint crate's State
//! Processor).
//!
//! The binary is `flowstate` (`cargo run --release -p flowstate-cli -- run`); a library user
//! wants the `flowstate` facade instead, which carries none of this crate's dependencies
//! (clap, nexmark, indicatif). The job is usable from code too:
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use std::sync::Arc;
//!
//! use flowstate::config::ConfigLoader;
//! use flowstate_cli::job::{self, JobOptions, RestoreFrom};
//!
//! # fn main() -> Result<(), flowstate_cli::job::JobError> {
//! let config = ConfigLoader::new()
//!     .set("state.checkpoints.dir", "file:///tmp/flowstate-example")?
//!     .load()?;
//! let report = job::run(JobOptions {
//!     config,
//!     job: "nexmark".into(),
//!     events: 100_000,
//!     parallelism: 2,
//!     restore: RestoreFrom::Nothing,
//!     crash_after: None,
//!     progress: None,
//!     stop: Arc::new(AtomicBool::new(false)),
//! })?;
//! println!("digest {:016x}", report.digest);
//! # Ok(()) }
//! ```
//!
//! | feature | adds |
//! |---|---|
//! | `mmap` | the off-heap backend: `--backend mmap`, native checkpoints in the tools |
//! | `s3` | checkpoints on S3 and S3-compatible stores |
//! | `parquet` | `state dump --format parquet` (Apache Arrow and Parquet) |

#![warn(missing_docs)]

pub mod history;
pub mod job;
pub mod state;
pub mod timely_job;
pub mod tools;
