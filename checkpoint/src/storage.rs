//! The checkpoint layout on an object store and the blocking edge around `object_store`.
//!
//! Everything the crate stores goes through [`CheckpointStorage`], a thin synchronous wrapper
//! over an `Arc<dyn ObjectStore>` that owns a small tokio runtime for the store's I/O. Its
//! blocking calls never start a runtime ([`storage_s3::block_on_io`]) and the runtime shuts down
//! in the background when the last clone is dropped, so the storage can be created, used and
//! dropped on a plain thread and inside async code alike. The layout under the root is:
//!
//! ```text
//! <root>/<job>/chk-<n>/_metadata            the checkpoint's metadata, written last (create-only)
//! <root>/<job>/chk-<n>/<files>              files only checkpoint n uses
//! <root>/<job>/shared/<files>               incremental files several checkpoints use
//! <root>/<job>/_commits/<seq, 20 digits>    the commit log: epoch claims and completions
//! <root>/<job>/_history/<id>-e<epoch>       the history of checkpoint attempts (the last 1,000)
//! <root>/savepoints/savepoint-<id>/...      self-contained savepoints
//! ```

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};

/// Part size of streaming uploads (and the size below which a file is sent in one put).
pub const UPLOAD_PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

/// Checks a job id, operator id or savepoint name: 1 to 128 bytes of `[A-Za-z0-9._-]`, not
/// starting with a dot.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 128 {
        Some("must be at most 128 bytes")
    } else if name.starts_with('.') {
        Some("must not start with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may only contain ASCII letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The checkpoints of one job on an object store, and the blocking calls the crate makes.
///
/// Cloning is cheap (the store and the runtime are shared). Every method may be called from a
/// plain thread or from inside an async runtime (a blocking method then blocks that thread
/// while it waits: see the crate docs on async callers); none starts a runtime, and dropping the
/// last clone inside async code is safe.
#[derive(Clone)]
pub struct CheckpointStorage {
    store: Arc<dyn ObjectStore>,
    root: Path,
    job: String,
    /// The I/O runtime, alive while any clone lives.
    io: Arc<IoRuntime>,
    /// The storage layer over the same store: file transfers and create-only puts go through
    /// it (verified, streaming, paths checked to stay under `root`).
    transfer: storage_s3::Storage,
    /// Put before an object path to name it for a person (see [`CheckpointStorage::location`]).
    location_prefix: Arc<str>,
}

impl std::fmt::Debug for CheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStorage")
            .field("store", &self.store.to_string())
            .field("root", &self.root.as_ref())
            .field("job", &self.job)
            .finish()
    }
}

impl CheckpointStorage {
    /// The checkpoints of job `job` under `root` (an object path prefix, `""` for the store's
    /// root) of `store`.
    pub fn new(store: Arc<dyn ObjectStore>, root: &str, job: &str) -> Result<Self> {
        validate_name("job id", job)?;
        let root = Path::parse(root).map_err(|e| Error::InvalidConfig {
            reason: format!("checkpoint root {root:?}: {e}"),
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flowstate-checkpoint-io")
            .enable_all()
            .build()
            .map_err(|e| Error::Io {
                context: "starting the checkpoint I/O runtime".into(),
                source: e,
            })?;
        let mut options = storage_s3::TransferOptions::default();
        options.part_size = UPLOAD_PART_SIZE;
        options.max_concurrency = UPLOAD_CONCURRENCY;
        let transfer = storage_s3::Storage::from_store(
            Arc::clone(&store),
            root.clone(),
            format!("checkpoint storage under '{root}'"),
        )
        .with_transfer_options(options)
        .map_err(|e| Error::InvalidConfig {
            reason: e.to_string(),
        })?;
        Ok(CheckpointStorage {
            store,
            root,
            job: job.to_string(),
            io: Arc::new(IoRuntime {
                handle: rt.handle().clone(),
                rt: Some(rt),
            }),
            transfer,
            location_prefix: Arc::from(""),
        })
    }

    /// The checkpoints of job `job` in `storage`: its store and root, its transfer options
    /// (part size, parts in flight) for every upload and download, and objects named in
    /// messages as it names them ([`storage_s3::Storage::location_prefix`]).
    pub fn from_storage(storage: &storage_s3::Storage, job: &str) -> Result<Self> {
        let mut s = Self::new(Arc::clone(storage.store()), storage.root().as_ref(), job)?;
        s.transfer = storage.clone();
        Ok(s.with_location_prefix(storage.location_prefix()))
    }

    /// Names objects in messages with `prefix` in front of their object path, so that what is
    /// printed can be pasted into the next command: the local directory of a `file://` store
    /// (`/var/lib/ck/`), or `s3://bucket/`. Without it messages show bare object paths.
    pub fn with_location_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.location_prefix = Arc::from(prefix.into());
        self
    }

    /// The prefix set by [`CheckpointStorage::with_location_prefix`] (empty by default).
    pub(crate) fn location_prefix(&self) -> Arc<str> {
        Arc::clone(&self.location_prefix)
    }

    /// The object at `path` as a person should see it: the location prefix, then the path.
    pub fn location(&self, path: &Path) -> String {
        format!("{}{path}", self.location_prefix)
    }

    /// The same store and runtime for another job.
    pub fn for_job(&self, job: &str) -> Result<Self> {
        validate_name("job id", job)?;
        Ok(CheckpointStorage {
            job: job.to_string(),
            ..self.clone()
        })
    }

    /// The job id.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The root prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<job>`.
    pub fn job_dir(&self) -> Path {
        self.root.clone().join(self.job.as_str())
    }

    /// `<root>/<job>/chk-<id>`.
    pub fn checkpoint_dir(&self, id: u64) -> Path {
        self.job_dir().join(format!("chk-{id}"))
    }

    /// `<root>/<job>/chk-<id>/_metadata`.
    pub fn metadata_path(&self, id: u64) -> Path {
        self.checkpoint_dir(id).join(METADATA_FILE)
    }

    /// `<root>/<job>/shared`.
    pub fn shared_dir(&self) -> Path {
        self.job_dir().join("shared")
    }

    /// `<root>/<job>/_commits`.
    pub fn commit_log_dir(&self) -> Path {
        self.job_dir().join("_commits")
    }

    /// `<root>/savepoints`.
    pub fn savepoints_dir(&self) -> Path {
        self.root.clone().join("savepoints")
    }

    /// `<root>/savepoints/savepoint-<name>`.
    pub fn savepoint_dir(&self, name: &str) -> Result<Path> {
        validate_name("savepoint name", name)?;
        Ok(self.savepoints_dir().join(format!("savepoint-{name}")))
    }

    /// The ids of the `chk-<n>` directories of the job that hold at least one object
    /// (complete or not), sorted. (Some stores, SeaweedFS among them, keep listing a directory
    /// after its last object is deleted.)
    pub fn checkpoint_dir_ids(&self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for dir in self.list_dirs(&self.job_dir())? {
            let Some(id) = dir
                .filename()
                .and_then(|f| f.strip_prefix("chk-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !self.list(&dir)?.is_empty() {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs the blocking `f` (any call of this crate: a load, a restore, waiting for a
    /// checkpoint) on a blocking thread of the storage's I/O runtime, and waits for it without
    /// blocking: the future can be awaited on any executor, a current-thread tokio runtime
    /// included, and it keeps the caller's threads free. Nothing starts until it is polled.
    ///
    /// A panic in `f` resumes in the caller; [`Error::Stopped`] if the I/O runtime shut down
    /// before `f` ran.
    pub fn run_blocking<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&CheckpointStorage) -> Result<T> + Send + 'static,
    {
        let storage = self.clone();
        async move {
            let handle = storage.io.handle.clone();
            match handle.spawn_blocking(move || f(&storage)).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Err(Error::Stopped {
                    reason: "the checkpoint I/O runtime shut down".into(),
                }),
            }
        }
    }

    /// Waits for `f`, whose I/O runs on the storage's runtime, without starting a runtime: callable
    /// from any thread, also one that drives an async runtime.
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        storage_s3::block_on_io(&self.io.handle, f)
    }

    /// Writes `bytes` at `path` only if nothing is there (a create-only put); `Ok(false)` when
    /// something is.
    pub(crate) fn put_if_absent(&self, path: &Path, bytes: Vec<u8>) -> Result<bool> {
        match self.block_on(self.transfer.put_if_absent(path, bytes)) {
            Ok(_) => Ok(true),
            Err(storage_s3::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(Error::transfer("writing", &self.location(path), e)),
        }
    }

    /// Uploads the local file `local` to `path` (streaming, multipart for large files, with
    /// the storage layer's part size and concurrency); returns its length and CRC32C.
    pub(crate) fn upload_file(&self, local: &std::path::Path, path: &Path) -> Result<(u64, u32)> {
        let up = self
            .block_on(self.transfer.upload_file(local, path))
            .map_err(|e| Error::transfer("uploading", &self.location(path), e))?;
        Ok((up.checksum.len, up.checksum.crc32c))
    }

    /// Downloads `path` into the local file `local`, streaming (memory bounded by the storage
    /// layer's buffers and parts, never the object's size), checked against `size` and
    /// `crc32c`; `local` appears only once complete and verified.
    pub(crate) fn download_file(
        &self,
        path: &Path,
        local: &std::path::Path,
        size: u64,
        crc32c: u32,
    ) -> Result<()> {
        let expected = storage_s3::Checksum { crc32c, len: size };
        self.block_on(self.transfer.download_file(path, local, Some(expected)))
            .map_err(|e| Error::transfer("downloading", &self.location(path), e))?;
        Ok(())
    }

    /// Downloads each `(path, local file, size, crc32c)` as [`Self::download_file`] does, left
    /// as `copy` says (fsynced or in the page cache), up to `concurrency` at a time (their
    /// transfers and fsyncs overlap); stops at the first error (the downloads still running
    /// are dropped and leave no file).
    pub(crate) fn download_files(
        &self,
        files: Vec<(Path, std::path::PathBuf, u64, u32)>,
        concurrency: usize,
        copy: storage_s3::LocalCopy,
        on_error: impl Fn(Error) -> Error,
    ) -> Result<()> {
        use futures::StreamExt;
        self.block_on(async {
            let mut downloads = futures::stream::iter(files.into_iter().map(
                |(path, local, size, crc32c)| async move {
                    let expected = storage_s3::Checksum { crc32c, len: size };
                    self.transfer
                        .download_file_as(&path, &local, Some(expected), copy)
                        .await
                        .map_err(|e| Error::transfer("downloading", &self.location(&path), e))
                },
            ))
            .buffer_unordered(concurrency.max(1));
            while let Some(r) = downloads.next().await {
                r.map_err(&on_error)?;
            }
            Ok(())
        })
    }

    /// Uses `options` for file transfers (part size and parts in flight: what bounds the
    /// memory of an upload or a download) instead of `storage-s3`'s defaults.
    pub fn with_transfer_options(mut self, options: storage_s3::TransferOptions) -> Result<Self> {
        self.transfer =
            self.transfer
                .with_transfer_options(options)
                .map_err(|e| Error::InvalidConfig {
                    reason: e.to_string(),
                })?;
        Ok(self)
    }

    /// Reads a whole object of at most `max_len` bytes (checked before reading).
    pub(crate) fn get(&self, path: &Path, max_len: u64) -> Result<Bytes> {
        self.block_on(async {
            let r = self
                .store
                .get(path)
                .await
                .map_err(|e| Error::storage("reading", &self.location(path), e))?;
            let size = r.meta.size;
            if size > max_len {
                return Err(Error::Corrupt {
                    file: self.location(path),
                    offset: 0,
                    reason: format!("{size} bytes is more than the limit of {max_len}"),
                });
            }
            let bytes = r
                .bytes()
                .await
                .map_err(|e| Error::storage("reading", &self.location(path), e))?;
            if bytes.len() as u64 != size {
                return Err(Error::Truncated {
                    file: self.location(path),
                    expected: size,
                    found: bytes.len() as u64,
                });
            }
            Ok(bytes)
        })
    }

    /// The size of an object.
    pub(crate) fn size(&self, path: &Path) -> Result<u64> {
        let meta = self
            .block_on(self.store.head(path))
            .map_err(|e| Error::storage("reading", &self.location(path), e))?;
        Ok(meta.size)
    }

    /// Reads byte ranges of an object; a range past the end is [`Error::Truncated`].
    pub(crate) fn get_ranges(&self, path: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        let res = self.block_on(self.store.get_ranges(path, ranges));
        let parts = match res {
            Ok(p) => p,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::MissingFile {
                    file: self.location(path),
                    referenced_by: "a state handle".into(),
                })
            }
            Err(e) => {
                // Stores report a range past the end in different ways: ask for the size.
                let size = self.size(path)?;
                if size < end {
                    return Err(Error::Truncated {
                        file: self.location(path),
                        expected: end,
                        found: size,
                    });
                }
                return Err(Error::storage("reading", &self.location(path), e));
            }
        };
        for (r, b) in ranges.iter().zip(&parts) {
            if b.len() as u64 != r.end - r.start {
                return Err(Error::Truncated {
                    file: self.location(path),
                    expected: r.end,
                    found: r.start + b.len() as u64,
                });
            }
        }
        Ok(parts)
    }

    /// Every object under `prefix`.
    pub fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.block_on(self.store.list(Some(prefix)).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage("listing", &self.location(prefix), e))
    }

    /// The immediate "directories" under `prefix`.
    pub(crate) fn list_dirs(&self, prefix: &Path) -> Result<Vec<Path>> {
        let r = self
            .block_on(self.store.list_with_delimiter(Some(prefix)))
            .map_err(|e| Error::storage("listing", &self.location(prefix), e))?;
        Ok(r.common_prefixes)
    }

    /// Deletes an object; a missing object is not an error.
    pub fn delete(&self, path: &Path) -> Result<()> {
        match self.block_on(self.store.delete(path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::storage("deleting", &self.location(path), e)),
        }
    }

    /// Deletes every object under `prefix`; returns how many.
    pub(crate) fn delete_prefix(&self, prefix: &Path) -> Result<usize> {
        let objects = self.list(prefix)?;
        for o in &objects {
            self.delete(&o.location)?;
        }
        Ok(objects.len())
    }

    /// A streaming writer of a new object at `path`.
    pub(crate) fn writer(&self, path: Path) -> Result<ObjectWriter> {
        let location = self.location(&path);
        let inner = self
            .transfer
            .blocking_writer(&path, self.io.handle.clone())
            .map_err(|e| Error::transfer("writing", &location, e))?;
        Ok(ObjectWriter { inner, location })
    }
}

/// The storage's I/O runtime. Dropping a tokio `Runtime` inside async code panics ("Cannot
/// drop a runtime in a context where blocking is not allowed"), and the last clone of a
/// storage may well be dropped there: it shuts down in the background instead, never waiting.
struct IoRuntime {
    /// What the blocking calls and writers run their I/O on.
    handle: tokio::runtime::Handle,
    /// Taken on drop.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The name of the metadata file of a checkpoint or savepoint.
pub const METADATA_FILE: &str = "_metadata";

/// A streaming upload behind `std::io::Write` (the storage layer's
/// [`storage_s3::BlockingWriter`]: one put for small objects, multipart in
/// [`UPLOAD_PART_SIZE`] parts for large ones), with errors named as this crate names them.
pub(crate) struct ObjectWriter {
    inner: storage_s3::BlockingWriter,
    location: String,
}

impl ObjectWriter {
    /// Completes the upload; returns `(length, crc32c)` of the object.
    pub(crate) fn finish(self) -> Result<(u64, u32)> {
        let up = self
            .inner
            .finish()
            .map_err(|e| Error::transfer("writing", &self.location, e))?;
        Ok((up.checksum.len, up.checksum.crc32c))
    }

    /// Abandons the upload (best effort).
    pub(crate) fn abort(self) {
        self.inner.abort();
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.inner.write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
