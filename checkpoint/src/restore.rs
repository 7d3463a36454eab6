//! Reading a checkpoint or savepoint back: find it, validate it, and restore each new subtask
//! from the key-group ranges it owns (range reads, never whole files) and its share of the
//! operator state.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use state_api::checkpointing::{
    CheckpointableBackend, NativeFileRef, NativeFormat, NativeRestoreSource, NativeSource,
};
use state_api::{redistribute, KeyGroupRange, KeyedStateBackend, OperatorStateStore};

use crate::commit::CommitLog;
use crate::error::{Error, Result};
use crate::format::{CheckpointMetadata, FileLocation, FileRef, KeyedStateFile, MAX_METADATA_LEN};
use crate::storage::{CheckpointStorage, METADATA_FILE};

/// Native files a restore downloads at a time.
const NATIVE_DOWNLOADS: usize = 4;
use state_api::snapshot::{KeyGroupBlock, KeyGroupOffset, RawRecord};
use state_api::StateKind;

/// Per key group: each entry (its identity bytes) written or removed by a file of a chain
/// after the key group's first, with the index of the last file that does so; and the highest
/// such index (blocks of files from there on need no filtering).
type Superseded = HashMap<u32, Arc<(usize, Identities)>>;

/// Entry identities and the last file of a chain that writes or removes each. Hashed with
/// foldhash: every record of a chain's earlier files is looked up (SipHash, std's default, was
/// a third of a chain restore's time on the reading thread); the identities come from the
/// checkpoint's own files.
type Identities = HashMap<Vec<u8>, usize, foldhash::fast::RandomState>;

/// Options of a restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Skip the state of operators the job does not have instead of failing (Flink's
    /// `--allowNonRestoredState`).
    pub allow_non_restored_state: bool,
}

/// A checkpoint or savepoint that was read and validated, ready to restore subtasks from.
#[derive(Clone, Debug)]
pub struct CompletedCheckpoint {
    /// The metadata.
    pub metadata: CheckpointMetadata,
    /// The path of the `_metadata` file.
    pub path: Path,
    /// The storage's location prefix (see [`CheckpointStorage::location`]).
    pub(crate) location_prefix: Arc<str>,
}

impl CompletedCheckpoint {
    pub(crate) fn new(
        storage: &CheckpointStorage,
        metadata: CheckpointMetadata,
        path: Path,
    ) -> Self {
        CompletedCheckpoint {
            metadata,
            path,
            location_prefix: storage.location_prefix(),
        }
    }

    /// The `_metadata` file as a person should see it: a path or URL that can be pasted into
    /// the next command (see [`CheckpointStorage::with_location_prefix`]).
    pub fn location(&self) -> String {
        self.location_of(&self.path)
    }

    /// The checkpoint's directory as a person should see it.
    pub fn dir_location(&self) -> String {
        self.location_of(&self.dir())
    }

    /// A path of this checkpoint's store as a person should see it.
    pub fn location_of(&self, path: &Path) -> String {
        format!("{}{path}", self.location_prefix)
    }

    /// Reads and validates the metadata at `path` (the `_metadata` file, or the directory
    /// holding it).
    pub fn load(storage: &CheckpointStorage, path: &Path) -> Result<Self> {
        let path = if path.filename() == Some(METADATA_FILE) {
            path.clone()
        } else {
            path.clone().join(METADATA_FILE)
        };
        let bytes = storage.get(&path, MAX_METADATA_LEN + 18)?;
        let metadata = CheckpointMetadata::decode(&bytes, &storage.location(&path))?;
        Ok(CompletedCheckpoint::new(storage, metadata, path))
    }

    /// The latest completed checkpoint of the storage's job (by the commit log), or `None`.
    pub fn latest(storage: &CheckpointStorage) -> Result<Option<Self>> {
        Ok(Self::retained(storage, 1)?.pop())
    }

    /// [`CompletedCheckpoint::load`] for async callers: runs on the storage's I/O runtime
    /// ([`CheckpointStorage::run_blocking`]), never blocking the caller's thread.
    pub fn load_async(
        storage: &CheckpointStorage,
        path: &Path,
    ) -> impl std::future::Future<Output = Result<Self>> + Send + 'static {
        let path = path.clone();
        storage.run_blocking(move |s| Self::load(s, &path))
    }

    /// [`CompletedCheckpoint::latest`] for async callers: runs on the storage's I/O runtime
    /// ([`CheckpointStorage::run_blocking`]), never blocking the caller's thread.
    pub fn latest_async(
        storage: &CheckpointStorage,
    ) -> impl std::future::Future<Output = Result<Option<Self>>> + Send + 'static {
        storage.run_blocking(Self::latest)
    }

    /// Up to `n` most recent completed checkpoints whose metadata still exists, oldest first.
    pub fn retained(storage: &CheckpointStorage, n: usize) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for entry in CommitLog::read(storage)?.iter().rev() {
            if out.len() >= n {
                break;
            }
            let Some(id) = entry.checkpoint_id() else {
                continue;
            };
            match Self::load(storage, &storage.metadata_path(id)) {
                Ok(c) => out.push(c),
                Err(Error::MissingFile { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The directory of the `_metadata` file.
    pub fn dir(&self) -> Path {
        self.path.parent().unwrap_or_default()
    }

    /// The full path of a file the metadata refers to.
    pub fn file_path(&self, location: &FileLocation) -> Path {
        match location {
            FileLocation::Exclusive(n) => self.dir().join(n.as_str()),
            FileLocation::Shared(n) => shared_dir_of(&self.dir()).join(n.as_str()),
        }
    }

    /// True when some subtask of `operator` was checkpointed as native (backend-specific)
    /// files, which restore into a fresh backend only ([`Self::restore_backend`]). Canonical
    /// state restores best into a backend whose states are registered already: their records
    /// are decoded straight into them, in one pass.
    pub fn has_native_state(&self, operator: &str) -> bool {
        self.metadata
            .operator(operator)
            .is_some_and(|o| o.has_native_state())
    }

    /// Checks that every operator in the checkpoint is one of `job_operators`, unless
    /// `options.allow_non_restored_state`.
    pub fn check_operators(&self, job_operators: &[&str], options: RestoreOptions) -> Result<()> {
        if options.allow_non_restored_state {
            return Ok(());
        }
        for op in &self.metadata.operators {
            if !job_operators.contains(&op.operator_id.as_str()) {
                return Err(Error::UnknownOperator {
                    operator: op.operator_id.clone(),
                    checkpoint: self.location(),
                });
            }
        }
        Ok(())
    }

    /// [`CompletedCheckpoint::restore_keyed`] for async callers: the backend moves to a
    /// blocking thread of the storage's I/O runtime ([`CheckpointStorage::run_blocking`]) and
    /// comes back restored; the caller's thread is never blocked. On an error the backend is
    /// dropped (a failed restore leaves it partly restored anyway).
    pub fn restore_keyed_async<B: KeyedStateBackend + Send + 'static>(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        mut backend: B,
    ) -> impl std::future::Future<Output = Result<B>> + Send + 'static {
        let checkpoint = self.clone();
        let operator = operator.to_string();
        storage.run_blocking(move |s| {
            checkpoint.restore_keyed(s, &operator, subtask, &mut backend)?;
            Ok(backend)
        })
    }

    /// Restores the keyed state of `operator` into `backend`, reading only the key groups of
    /// the backend's range. Nothing happens if the checkpoint has no keyed state for the
    /// operator. `subtask` names the subtask in errors.
    pub fn restore_keyed<B: KeyedStateBackend>(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        backend: &mut B,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let range = backend.key_group_range();
        let streams = self.keyed_streams(storage, operator, backend.max_parallelism(), range)?;
        let failures: Vec<_> = streams.iter().map(|(_, r)| r.failure()).collect();
        let files = streams.len();
        match backend.restore(streams) {
            Ok(()) => {
                // The owned blocks (records and tombstones) the streams read.
                let bytes: u64 = self
                    .metadata
                    .operator(operator)
                    .into_iter()
                    .flat_map(|op| op.subtasks.iter())
                    .filter_map(|s| s.keyed.as_ref())
                    .flat_map(|k| k.files.iter())
                    .flat_map(|f| f.key_groups.iter().chain(&f.tombstones))
                    .filter(|b| range.contains(b.key_group))
                    .map(|b| b.length)
                    .sum();
                tracing::info!(
                    checkpoint = %self.location(),
                    operator,
                    subtask,
                    what = "canonical",
                    files,
                    bytes,
                    millis = started.elapsed().as_millis() as u64,
                    "restored keyed state"
                );
                Ok(())
            }
            Err(e) => {
                // A storage failure while streaming is reported as itself, not as an I/O
                // error inside the state API's.
                for f in failures {
                    if let Ok(mut slot) = f.lock() {
                        if let Some(err) = slot.take() {
                            return Err(err);
                        }
                    }
                }
                Err(Error::state(operator, subtask, e))
            }
        }
    }

    /// Restores `operator` into `backend` through the snapshot contract: canonical state as
    /// [`Self::restore_keyed`] does; native state (written by a backend of the same
    /// [`NativeFormat::backend_id`]) by checking each intersecting old subtask's manifest
    /// against its handle ([`NativeFormat::check`]), streaming the files the backend needs for
    /// its range ([`NativeFormat::files_needed`]) into a directory of its own under
    /// `download_dir` (in chunks, each file checked against its size and CRC32C on the way,
    /// never whole in memory), then calling
    /// [`CheckpointableBackend::restore_from_native`].
    pub fn restore_backend<B: CheckpointableBackend>(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        backend: &mut B,
        download_dir: &std::path::Path,
    ) -> Result<()> {
        let Some(op) = self.metadata.operator(operator) else {
            return Ok(());
        };
        if !op.has_native_state() {
            return self.restore_keyed(storage, operator, subtask, backend);
        }
        let started = std::time::Instant::now();
        let mismatch = |reason: String| Error::RestoreMismatch {
            operator: operator.to_string(),
            checkpoint: self.location(),
            reason,
        };
        if op.max_parallelism != backend.max_parallelism() {
            return Err(mismatch(format!(
                "the checkpoint has max parallelism {}, the job {}; max parallelism cannot \
                 change across a restore",
                op.max_parallelism,
                backend.max_parallelism()
            )));
        }
        let range = backend.key_group_range();
        let mut sources = Vec::new();
        let mut downloads = Vec::new();
        let (mut files, mut bytes) = (0usize, 0u64);
        for st in &op.subtasks {
            if st.keyed.is_some() {
                return Err(mismatch("canonical and native state mixed".into()));
            }
            let Some(n) = &st.native else { continue };
            let Some(format) = backend.native_format() else {
                return Err(mismatch(format!(
                    "native state of backend '{}', which this backend cannot read",
                    n.backend
                )));
            };
            if n.backend != format.backend_id() {
                return Err(mismatch(format!(
                    "native state of backend '{}', this backend reads '{}'",
                    n.backend,
                    format.backend_id()
                )));
            }
            if n.key_group_range.intersect(&range).is_empty() {
                continue;
            }
            let (source, _) =
                self.native_source(format, operator, op.max_parallelism, st.subtask, n)?;
            let needed = format
                .files_needed(&source, range)
                .map_err(|e| Error::state(operator, subtask, e))?;
            let dir = download_dir.join(format!(
                "chk-{}-{operator}-{}",
                self.metadata.checkpoint_id, st.subtask
            ));
            std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
                context: format!("creating '{}'", dir.display()),
                source: e,
            })?;
            for name in needed {
                let r = n
                    .files
                    .iter()
                    .find(|x| x.file.location.name() == name)
                    .ok_or_else(|| Error::Corrupt {
                        file: self.location(),
                        offset: 0,
                        reason: format!(
                            "the native metadata of subtask {} names '{name}', which its handle \
                             does not list",
                            st.subtask
                        ),
                    })?;
                let (path, size) = self.checked_size(storage, &r.file)?;
                downloads.push((path, dir.join(&name), size, r.file.crc32c));
                files += 1;
                bytes += r.file.size;
            }
            sources.push(NativeRestoreSource { source, dir });
        }
        // Several files at a time: their transfers and checksums overlap. Not fsynced: the
        // checkpoint is the durable copy, and the backend makes them durable before its own
        // manifest names them (see `NativeRestoreSource`); waiting for the disk took 2.5-3 s of
        // a 3 s restore of 690 MB. From checkpoints on the local disk, hard links (backends
        // never write to restored files): no copy, only a read to check them.
        let download_started = std::time::Instant::now();
        let location = self.location();
        let copy = storage_s3::LocalCopy::Linked;
        storage.download_files(downloads, NATIVE_DOWNLOADS, copy, |e| match e {
            Error::MissingFile { file, .. } => Error::MissingFile {
                file,
                referenced_by: location.clone(),
            },
            e => e,
        })?;
        let download_millis = download_started.elapsed().as_millis() as u64;
        let open_started = std::time::Instant::now();
        backend
            .restore_from_native(sources)
            .map_err(|e| Error::state(operator, subtask, e))?;
        // Where the time went: the checks before, the downloads (transfer, checksum, write),
        // the backend opening the files.
        tracing::info!(
            checkpoint = %self.location(),
            operator,
            subtask,
            what = "native",
            files,
            bytes,
            millis = started.elapsed().as_millis() as u64,
            download_millis,
            open_millis = open_started.elapsed().as_millis() as u64,
            "restored keyed state"
        );
        Ok(())
    }

    /// The same as [`Self::restore_backend`]; kept under its earlier name.
    pub fn restore_mmap<B: CheckpointableBackend>(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        subtask: u32,
        backend: &mut B,
        download_dir: &std::path::Path,
    ) -> Result<()> {
        self.restore_backend(storage, operator, subtask, backend, download_dir)
    }

    /// Streams the file `f` refers to into the local file `local` through the storage layer
    /// (memory bounded by its buffers, not the file's size), checking its size and CRC32C on
    /// the way; `local` appears only once complete and verified.
    pub(crate) fn download_file(
        &self,
        storage: &CheckpointStorage,
        f: &FileRef,
        local: &std::path::Path,
    ) -> Result<()> {
        let (path, size) = self.checked_size(storage, f)?;
        storage
            .download_file(&path, local, size, f.crc32c)
            .map_err(|e| match e {
                Error::MissingFile { file, .. } => Error::MissingFile {
                    file,
                    referenced_by: self.location(),
                },
                e => e,
            })
    }

    /// The stored native state of subtask `subtask` of `operator` as the contract hands it to
    /// a backend, after `format` checked its manifest against the handle (the same max
    /// parallelism and key groups, every file listed with the same size and key groups).
    pub(crate) fn native_source(
        &self,
        format: &dyn NativeFormat,
        operator: &str,
        max_parallelism: u32,
        subtask: u32,
        n: &crate::format::NativeKeyedHandle,
    ) -> Result<(NativeSource, Vec<state_api::StateMeta>)> {
        let source = NativeSource {
            backend: n.backend.clone(),
            key_group_range: n.key_group_range,
            manifest: n.metadata.clone(),
            files: n
                .files
                .iter()
                .map(|f| NativeFileRef {
                    name: f.file.location.name().to_string(),
                    size: f.file.size,
                    key_groups: f.key_groups,
                })
                .collect(),
        };
        let states = format
            .check(&source, max_parallelism)
            .map_err(|e| Error::Corrupt {
                file: self.location(),
                offset: 0,
                reason: format!("operator '{operator}' subtask {subtask}: {e}"),
            })?;
        Ok((source, states))
    }

    /// The canonical snapshot streams holding the key groups of `range` of `operator`: each
    /// is the stored header, the owned blocks and an end marker. The blocks are fetched by
    /// range reads while the stream is read (adjacent blocks together, up to
    /// [`RESTORE_CHUNK`] bytes per read), after one size check per file.
    pub fn keyed_streams(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        max_parallelism: u32,
        range: KeyGroupRange,
    ) -> Result<Vec<(String, KeyGroupReader)>> {
        let Some(op) = self.metadata.operator(operator) else {
            return Ok(Vec::new());
        };
        if op.max_parallelism != max_parallelism {
            return Err(Error::RestoreMismatch {
                operator: operator.to_string(),
                checkpoint: self.location(),
                reason: format!(
                    "the checkpoint has max parallelism {}, the job {max_parallelism}; max \
                     parallelism cannot change across a restore",
                    op.max_parallelism
                ),
            });
        }
        if op.has_native_state() {
            return Err(Error::RestoreMismatch {
                operator: operator.to_string(),
                checkpoint: self.location(),
                reason: "the checkpoint holds the mmap backend's native files: restore them into \
                         mmap backends (restore_mmap), or restore from a savepoint"
                    .into(),
            });
        }
        let mut streams = Vec::new();
        for st in &op.subtasks {
            let Some(k) = &st.keyed else { continue };
            if k.key_group_range.intersect(&range).is_empty() {
                continue;
            }
            let superseded = self.superseded(storage, k, range, max_parallelism)?;
            for (i, f) in k.files.iter().enumerate() {
                if let Some(s) = self.read_owned(storage, f, range)? {
                    let (name, mut reader) = s;
                    if !superseded.is_empty() {
                        reader.set_filter(Filter {
                            file: i,
                            states: state_identities(f),
                            superseded: superseded.clone(),
                            max_parallelism,
                        });
                    }
                    streams.push((name, reader));
                }
            }
        }
        Ok(streams)
    }

    /// For a chain (a key group in several files, or tombstones): which entries later files
    /// write or remove, read from the blocks of every file but the first of each owned key
    /// group. Empty when nothing is superseded.
    fn superseded(
        &self,
        storage: &CheckpointStorage,
        k: &crate::format::KeyedStateHandle,
        range: KeyGroupRange,
        max_parallelism: u32,
    ) -> Result<Superseded> {
        let mut first: HashMap<u32, usize> = HashMap::new();
        for (i, f) in k.files.iter().enumerate() {
            for b in f.key_groups.iter().chain(&f.tombstones) {
                if range.contains(b.key_group) {
                    first.entry(b.key_group).or_insert(i);
                }
            }
        }
        let mut out: HashMap<u32, Identities> = HashMap::new();
        let mut id = Vec::new();
        for (i, f) in k.files.iter().enumerate() {
            let blocks: Vec<(KeyGroupOffset, bool)> = f
                .key_groups
                .iter()
                .map(|b| (*b, false))
                .chain(f.tombstones.iter().map(|b| (*b, true)))
                .filter(|(b, _)| first.get(&b.key_group).is_some_and(|&j| j < i))
                .collect();
            if blocks.is_empty() {
                continue;
            }
            let path = self.file_path(&f.file.location);
            let ranges: Vec<std::ops::Range<u64>> = blocks
                .iter()
                .map(|(b, _)| b.offset..b.offset + b.length)
                .collect();
            let bytes = storage.get_ranges(&path, &ranges).map_err(|e| match e {
                Error::MissingFile { file, .. } => Error::MissingFile {
                    file,
                    referenced_by: self.location(),
                },
                e => e,
            })?;
            let states = state_identities(f);
            let stream = self.location_of(&path);
            for ((b, tombs), data) in blocks.iter().zip(bytes) {
                let corrupt = |reason: String| Error::Corrupt {
                    file: stream.clone(),
                    offset: b.offset,
                    reason,
                };
                let block = KeyGroupBlock::decode(&data, b.offset, &stream, true)
                    .map_err(|e| corrupt(e.to_string()))?;
                if block.key_group != b.key_group || block.is_tombstones() != *tombs {
                    return Err(corrupt(format!(
                        "no {}block of key group {} at this offset",
                        if *tombs { "tombstone " } else { "" },
                        b.key_group
                    )));
                }
                let seen = out.entry(b.key_group).or_default();
                for r in block.records(&stream, max_parallelism) {
                    let r = r.map_err(|e| corrupt(e.to_string()))?;
                    identity(&mut id, &states, &r).map_err(corrupt)?;
                    seen.insert(id.clone(), i);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|(kg, m)| {
                let last = m.values().copied().max().unwrap_or(0);
                (kg, Arc::new((last, m)))
            })
            .collect())
    }

    fn read_owned(
        &self,
        storage: &CheckpointStorage,
        f: &KeyedStateFile,
        range: KeyGroupRange,
    ) -> Result<Option<(String, KeyGroupReader)>> {
        let owned: VecDeque<KeyGroupOffset> = f
            .key_groups
            .iter()
            .filter(|k| range.contains(k.key_group))
            .copied()
            .collect();
        if owned.is_empty() {
            return Ok(None);
        }
        let path = self.file_path(&f.file.location);
        let end = owned.iter().map(|k| k.offset + k.length).max().unwrap_or(0);
        let size = storage.size(&path).map_err(|e| match e {
            Error::MissingFile { file, .. } => Error::MissingFile {
                file,
                referenced_by: self.location(),
            },
            e => e,
        })?;
        if size < end || size < f.file.size {
            return Err(Error::Truncated {
                file: self.location_of(&path),
                expected: f.file.size,
                found: size,
            });
        }
        if size != f.file.size {
            return Err(Error::Corrupt {
                file: self.location_of(&path),
                offset: f.file.size,
                reason: format!(
                    "the file has {size} bytes, the metadata recorded {}",
                    f.file.size
                ),
            });
        }
        Ok(Some((
            self.location_of(&path),
            KeyGroupReader::new(
                storage.clone(),
                path,
                bytes::Bytes::from(f.header_bytes.clone()),
                owned,
            ),
        )))
    }

    /// The operator state of subtask `subtask` of `parallelism` for `operator`, redistributed
    /// from the checkpoint's subtasks (even split or union; broadcast state to everyone). Even
    /// split lists stay where they were when the parallelism is unchanged (a subtask that never
    /// registered a list gets it empty); otherwise they are concatenated in subtask order and cut
    /// into contiguous, even parts.
    pub fn operator_state(
        &self,
        operator: &str,
        subtask: u32,
        parallelism: u32,
    ) -> Result<OperatorStateStore> {
        if subtask >= parallelism {
            return Err(Error::InvalidConfig {
                reason: format!("subtask {subtask} is not below parallelism {parallelism}"),
            });
        }
        let Some(op) = self.metadata.operator(operator) else {
            return Ok(OperatorStateStore::new());
        };
        // One store per old subtask, in subtask order: a subtask that reported no operator
        // state still counts, so an unchanged parallelism keeps every list where it was.
        // (The metadata's decoder checked one entry per subtask of a valid parallelism.)
        let mut old = vec![OperatorStateStore::new(); op.parallelism as usize];
        for s in &op.subtasks {
            if let (Some(slot), Some(state)) = (old.get_mut(s.subtask as usize), &s.operator_state)
            {
                *slot = state.clone();
            }
        }
        if old.iter().all(|s| s.is_empty()) {
            return Ok(OperatorStateStore::new());
        }
        // Union lists go to every subtask even when the parallelism is unchanged (as in Flink).
        Ok(redistribute(&old, parallelism)
            .into_iter()
            .nth(subtask as usize)
            .unwrap_or_default())
    }

    /// Reads every file the checkpoint refers to and checks its size and CRC32C (streaming,
    /// see [`CompletedCheckpoint::verify_file`]).
    pub fn verify_files(&self, storage: &CheckpointStorage) -> Result<()> {
        for f in self.metadata.files() {
            self.verify_file(storage, f)?;
        }
        Ok(())
    }
}

/// Most bytes a [`KeyGroupReader`] fetches with one range read (more only for a single larger
/// block).
pub const RESTORE_CHUNK: u64 = 16 << 20;

/// A canonical snapshot stream made of a file's header (from the metadata), the blocks of the
/// owned key groups (fetched by range reads) and an end marker with an empty index. From its
/// first read on, a thread of its own fetches (and, for a chain, filters) the next chunk while
/// the current one is decoded: storage latency and the filtering leave the reading thread.
pub struct KeyGroupReader {
    name: String,
    buf: bytes::Bytes,
    pos: usize,
    failure: Arc<Mutex<Option<Error>>>,
    source: Source,
}

/// Where a [`KeyGroupReader`]'s next chunk comes from.
enum Source {
    /// Not read yet: the fetcher starts on the first read.
    Idle(Box<Fetcher>),
    /// The read-ahead thread's chunks, in order; closed after the end marker.
    Ahead(Receiver<std::io::Result<bytes::Bytes>>),
}

/// Chunks of a read-ahead thread waiting to be decoded (each at most [`RESTORE_CHUNK`] bytes).
const READ_AHEAD: usize = 1;

/// Fetches a stream's owned blocks, run by run, and filters a chain's superseded records.
struct Fetcher {
    storage: CheckpointStorage,
    path: Path,
    blocks: VecDeque<KeyGroupOffset>,
    end_sent: bool,
    failure: Arc<Mutex<Option<Error>>>,
    filter: Option<Filter>,
}

/// Drops the records of a chain's file that later files supersede.
struct Filter {
    /// The file's position in its handle.
    file: usize,
    /// Per state index of the file's header: name and whether it is a timer service.
    states: Vec<(Vec<u8>, bool)>,
    superseded: Superseded,
    max_parallelism: u32,
}

/// Names and kinds of a file's states, by index, for [`identity`].
fn state_identities(f: &KeyedStateFile) -> Vec<(Vec<u8>, bool)> {
    f.header
        .states
        .iter()
        .map(|s| {
            (
                s.name.as_str().as_bytes().to_vec(),
                s.kind == StateKind::Timers,
            )
        })
        .collect()
}

/// The identity of a record's entry: state name, key and namespace (and, for timers, the
/// timer's payload: timestamp and domain), each length-prefixed, into `out`.
fn identity(
    out: &mut Vec<u8>,
    states: &[(Vec<u8>, bool)],
    r: &RawRecord<'_>,
) -> std::result::Result<(), String> {
    let (name, timers) = states
        .get(r.state_index as usize)
        .ok_or_else(|| format!("record of state {} of {}", r.state_index, states.len()))?;
    out.clear();
    for part in [&name[..], r.key, r.namespace] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    if *timers {
        out.extend_from_slice(r.payload);
    }
    Ok(())
}

impl std::fmt::Debug for KeyGroupReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("KeyGroupReader");
        d.field("stream", &self.name);
        if let Source::Idle(fetcher) = &self.source {
            d.field("blocks_left", &fetcher.blocks.len());
        }
        d.finish()
    }
}

impl KeyGroupReader {
    fn new(
        storage: CheckpointStorage,
        path: Path,
        header: bytes::Bytes,
        blocks: VecDeque<KeyGroupOffset>,
    ) -> Self {
        let failure: Arc<Mutex<Option<Error>>> = Arc::default();
        KeyGroupReader {
            name: storage.location(&path),
            buf: header,
            pos: 0,
            failure: Arc::clone(&failure),
            source: Source::Idle(Box::new(Fetcher {
                storage,
                path,
                blocks,
                end_sent: false,
                failure,
                filter: None,
            })),
        }
    }

    /// Where the first storage error met while reading is kept (the `Read` impl can only
    /// return an `io::Error`).
    pub fn failure(&self) -> Arc<Mutex<Option<Error>>> {
        Arc::clone(&self.failure)
    }

    fn set_filter(&mut self, filter: Filter) {
        if let Source::Idle(fetcher) = &mut self.source {
            fetcher.filter = Some(filter);
        }
    }

    /// The next chunk of the stream, `None` after the end marker. The first call starts the
    /// read-ahead thread.
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        if let Source::Idle(_) = &self.source {
            let (tx, rx) = sync_channel(READ_AHEAD);
            let Source::Idle(mut fetcher) = std::mem::replace(&mut self.source, Source::Ahead(rx))
            else {
                return Ok(None);
            };
            std::thread::Builder::new()
                .name("flowstate-restore-read".into())
                .spawn(move || loop {
                    let next = fetcher.next();
                    let last = !matches!(next, Ok(Some(_)));
                    let sent = match next {
                        Ok(Some(chunk)) => tx.send(Ok(chunk)),
                        Ok(None) => Ok(()),
                        Err(e) => tx.send(Err(e)),
                    };
                    // Stops at the end, on an error, or when the stream is dropped.
                    if last || sent.is_err() {
                        return;
                    }
                })
                .map_err(|e| {
                    std::io::Error::other(format!(
                        "starting the read-ahead thread of '{}': {e}",
                        self.name
                    ))
                })?;
        }
        match &self.source {
            // A closed channel without an end marker is a stream cut short: the snapshot
            // reader reports it.
            Source::Ahead(rx) => rx.recv().map_or(Ok(None), |r| r.map(Some)),
            Source::Idle(_) => Ok(None),
        }
    }
}

impl Fetcher {
    fn fail(&self, e: Error) -> std::io::Error {
        let msg = e.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(e);
        }
        std::io::Error::other(msg)
    }

    /// Fetches the next run of adjacent blocks (or the end marker); `None` after the end.
    fn next(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let Some(first) = self.blocks.pop_front() else {
            if self.end_sent {
                return Ok(None);
            }
            // 0x02 | count 0 u32 | records 0 u64 | crc32c(count, records)
            let body = [0u8; 12];
            let mut end = Vec::with_capacity(17);
            end.push(0x02);
            end.extend_from_slice(&body);
            end.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
            self.end_sent = true;
            return Ok(Some(end.into()));
        };
        let mut run = vec![first];
        let mut end = first.offset + first.length;
        while let Some(next) = self.blocks.front() {
            if next.offset != end || end + next.length - first.offset > RESTORE_CHUNK {
                break;
            }
            end += next.length;
            run.push(*next);
            self.blocks.pop_front();
        }
        let range = first.offset..end;
        let bytes = match self
            .storage
            .get_ranges(&self.path, std::slice::from_ref(&range))
        {
            Ok(mut parts) => parts.pop().unwrap_or_default(),
            Err(e) => return Err(self.fail(e)),
        };
        // Each block must start where the metadata says, with its key group.
        let mut at = 0usize;
        for k in &run {
            let head = bytes.get(at..at + 5).unwrap_or(&[]);
            if head.len() < 5 || head[0] != 0x01 || head[1..5] != k.key_group.to_be_bytes() {
                return Err(self.fail(Error::Corrupt {
                    file: self.storage.location(&self.path),
                    offset: k.offset,
                    reason: format!("no block of key group {} at this offset", k.key_group),
                }));
            }
            at += k.length as usize;
        }
        let Some(filter) = &self.filter else {
            // The read bytes are the chunk (no copy).
            return Ok(Some(bytes));
        };
        let mut at = 0usize;
        let mut buf = Vec::with_capacity(bytes.len());
        for k in &run {
            let raw = &bytes[at..at + k.length as usize];
            at += k.length as usize;
            match filter.superseded.get(&k.key_group) {
                Some(later) if later.0 > filter.file => {
                    match filter.apply(raw, k, &later.1, &self.storage.location(&self.path)) {
                        Ok(block) => buf.extend_from_slice(&block),
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                _ => buf.extend_from_slice(raw),
            }
        }
        Ok(Some(buf.into()))
    }
}

impl Filter {
    /// The block `raw` without the records that later files supersede.
    fn apply(
        &self,
        raw: &[u8],
        k: &KeyGroupOffset,
        later: &Identities,
        stream: &str,
    ) -> Result<Vec<u8>> {
        let stream = stream.to_string();
        let corrupt = |reason: String| Error::Corrupt {
            file: stream.clone(),
            offset: k.offset,
            reason,
        };
        let block = KeyGroupBlock::decode(raw, k.offset, &stream, false)
            .map_err(|e| corrupt(e.to_string()))?;
        // `decode` checked the framing: tag, key group and length (8 bytes), the records, a
        // checksum. Records are copied as byte spans of `raw`: a run of kept records at once.
        let records = raw.get(13..raw.len().saturating_sub(4)).unwrap_or(&[]);
        let base = k.offset + 13;
        let mut body = Vec::with_capacity(records.len());
        let mut id = Vec::new();
        let (mut kept_from, mut at) = (0usize, 0usize);
        for r in block.records(&stream, self.max_parallelism) {
            let r = r.map_err(|e| corrupt(e.to_string()))?;
            let end = (r.payload_offset - base) as usize + r.payload.len();
            identity(&mut id, &self.states, &r).map_err(corrupt)?;
            if later.get(&id[..]).is_some_and(|&j| j > self.file) {
                body.extend_from_slice(records.get(kept_from..at).unwrap_or(&[]));
                kept_from = end;
            }
            at = end;
        }
        body.extend_from_slice(records.get(kept_from..at).unwrap_or(&[]));
        Ok(KeyGroupBlock::encode(k.key_group, false, &body))
    }
}

impl Read for KeyGroupReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.next_chunk()? {
                Some(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// An error of reading a snapshot stream as this crate reports it: the storage failure the
/// stream's reader recorded (`failure`) as itself, damage as [`Error::Corrupt`] naming the file,
/// anything else as an error of `operator`'s `subtask`.
pub(crate) fn stream_error(
    failure: Option<&Mutex<Option<Error>>>,
    operator: &str,
    subtask: u32,
    e: state_api::Error,
) -> Error {
    if let Some(Ok(mut slot)) = failure.map(|f| f.lock()) {
        if let Some(err) = slot.take() {
            return err;
        }
    }
    match e {
        state_api::Error::Corrupt {
            stream,
            offset,
            reason,
        } => Error::Corrupt {
            file: stream,
            offset,
            reason,
        },
        e => Error::state(operator, subtask, e),
    }
}

/// `<job>/shared` for a checkpoint directory `<job>/chk-<n>`.
pub(crate) fn shared_dir_of(dir: &Path) -> Path {
    dir.parent().unwrap_or_default().join("shared")
}
