//! Durable storage for Flowstate checkpoints and savepoints, built on [`object_store`]: a local
//! directory, memory, or S3 (and S3-compatible servers), with GCS and Azure passed through.
//!
//! [`Storage`] is an `Arc<dyn ObjectStore>` plus a root prefix, built from a URL or a
//! [`StorageConfig`]. Code that only needs object_store uses [`Storage::store`] or
//! [`Storage::scoped_store`]; there is no second storage trait. `Storage` adds what checkpoints
//! need and object_store does not give directly:
//!
//! - [`Storage::upload_file`]: streaming multipart upload of a large local file with a
//!   configurable part size and concurrency, aborted cleanly on failure;
//! - [`Storage::download_file`]: streaming download into a local file (parallel range requests
//!   for large objects), atomically renamed into place once complete and verified;
//! - [`Storage::blocking_writer`]: a streaming upload behind `std::io::Write` for synchronous
//!   writers (bounded memory, checksum computed on the way), callable from any thread, also one
//!   that drives an async runtime ([`block_on_io`] waits without starting a runtime);
//! - [`Storage::put_if_absent`]: create-only put; a lost race is [`Error::AlreadyExists`];
//! - [`Storage::list`], [`Storage::list_children`], [`Storage::delete_prefix`];
//! - end-to-end [`Checksum`]s (CRC32C + length) computed over exactly the bytes sent and
//!   received, checked on every verified read;
//! - [`Storage::path`] / [`Storage::child`]: paths from job and state names, validated so that
//!   nothing escapes the root (see [`relative_path`]).
//!
//! Transient failures of HTTP stores are retried with exponential backoff by object_store
//! ([`RetryOptions`]); every request has a connect and a total timeout ([`HttpOptions`]), so a
//! wrong endpoint or a dead server is an error in bounded time, not a hang. Errors name the URL
//! and the path and never contain credentials; the configuration's `Debug` output redacts them.
//!
//! # Example
//!
//! ```
//! use storage_s3::{Checksum, Storage};
//!
//! # fn main() -> storage_s3::Result<()> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let storage = Storage::from_url("memory:///checkpoints")?;
//! let metadata = storage.path("job-1/chk-1/_metadata")?;
//!
//! // Commit the checkpoint's metadata exactly once.
//! let written = storage.put_if_absent(&metadata, b"checkpoint 1".to_vec()).await?;
//! assert_eq!(written.checksum, Checksum::of(b"checkpoint 1"));
//! let again = storage.put_if_absent(&metadata, b"other".to_vec()).await;
//! assert!(matches!(again, Err(storage_s3::Error::AlreadyExists { .. })));
//!
//! // Read it back, verified against the recorded checksum and bounded in size.
//! let bytes = storage.get_verified(&metadata, Some(written.checksum), 1 << 20).await?;
//! assert_eq!(&bytes[..], b"checkpoint 1");
//!
//! // Names from users are validated: nothing escapes the root.
//! assert!(storage.path("job-1/../../etc").is_err());
//!
//! // Clean the checkpoint up.
//! assert_eq!(storage.delete_prefix(&storage.path("job-1/chk-1")?).await?, 1);
//! # Ok(())
//! # })
//! # }
//! ```
//!
//! # URLs
//!
//! | URL | store | feature |
//! |---|---|---|
//! | `file:///abs/dir` or `/abs/dir` | `LocalFileSystem` rooted at the directory (created if missing, fsync on) | always |
//! | `memory://`, `memory:///prefix` | `InMemory` | always |
//! | `s3://bucket/prefix` | `AmazonS3`: endpoint, region, path style, allow-http and credentials from [`S3Options`] or the `AWS_*` environment variables | `s3` |
//! | `gs://bucket/prefix` | `GoogleCloudStorage`, configured from the environment | `gcp` |
//! | `az://container/prefix` | `MicrosoftAzure`, configured from the environment | `azure` |
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (default) | local directories and memory; no HTTP or TLS dependencies |
//! | `s3` | S3 and S3-compatible servers (object_store's `aws`) |
//! | `gcp` | Google Cloud Storage (object_store's `gcp`) |
//! | `azure` | Azure Blob Storage (object_store's `azure`) |
//!
//! # Checksums
//!
//! Every put and upload returns an [`Uploaded`] with the [`Checksum`] of exactly the bytes handed
//! to the store, computed while they are sent (no second pass, no read-back). The caller
//! records it (the checkpoint layer keeps it in `_metadata`) and passes it to
//! [`Storage::download_file`], [`Storage::get_verified`] or [`Storage::verify`], which compute
//! the checksum of exactly the bytes received and fail with [`Error::ChecksumMismatch`] (the
//! destination file is then left untouched). On stores that keep user metadata (S3, memory,
//! GCS, Azure) single-put objects also carry their CRC as the `flowstate-crc32c` metadata entry,
//! so reads without a recorded checksum are still verified; multipart uploads cannot carry it
//! (it is known only after the last part), so their size is checked against the bytes sent
//! right after completion, and their checksum must come from the caller's record.

#[cfg(any(feature = "s3", feature = "gcp", feature = "azure"))]
mod cloud;

mod blocking;
mod checksum;
mod config;
mod error;
mod paths;
mod storage;
mod transfer;
mod writer;

pub use blocking::block_on_io;
pub use checksum::{Checksum, ParseChecksumError, CHECKSUM_METADATA_KEY};
pub use config::{
    HttpOptions, LocalOptions, RetryOptions, S3Options, Secret, StorageConfig, TransferOptions,
    MIN_S3_PART_SIZE,
};
pub use error::{one_line, Error, ErrorKind, Result};
pub use paths::{
    join_segments, relative_path, validate_segment, MAX_PATH_BYTES, MAX_SEGMENT_BYTES,
};
pub use storage::{Storage, StoreKind};
pub use transfer::{LocalCopy, Uploaded};
pub use writer::BlockingWriter;

/// The object_store crate this crate builds on, re-exported so users name the same version.
pub use object_store;
