//! The snapshot contract between a keyed state backend and a checkpoint layer.
//!
//! A checkpoint layer (Flowstate's `checkpoint` crate, or another) knows backends only through
//! [`CheckpointableBackend`]; it never names a concrete backend. What a backend hands a
//! checkpoint is data ([`BackendSnapshot`]):
//!
//! - [`BackendSnapshot::Canonical`]: canonical snapshot streams (one or several parts over
//!   disjoint key groups), restorable into any backend;
//! - [`BackendSnapshot::Delta`]: delta streams on top of the files of an earlier checkpoint the
//!   layer named in [`SnapshotRequest::delta_base`] (changed entries and tombstones, some key
//!   groups written whole);
//! - [`BackendSnapshot::Native`]: a set of immutable local files, each with the key groups it
//!   covers, and the backend's own manifest; files with a name already uploaded are referenced,
//!   never uploaded again.
//!
//! Completion and abort reach the backend through
//! [`CheckpointableBackend::notify_checkpoint_complete`] and
//! [`CheckpointableBackend::notify_checkpoint_aborted`], on the backend's own thread and always
//! before the next [`CheckpointableBackend::snapshot_for_checkpoint`], so a backend can release
//! or keep what a delta or native checkpoint needs.
//!
//! On restore of native state, the backend's [`NativeFormat`] says which files it needs for its
//! [`KeyGroupRange`]; the checkpoint layer streams exactly those into a local directory (never
//! whole in memory) and calls [`CheckpointableBackend::restore_from_native`] with the
//! directories. The sequence of calls is written down in `docs/snapshot-contract.md`.
//!
//! This module does no I/O: paths are data the backend and the checkpoint layer use.
//!
//! ```
//! use state_api::checkpointing::{BackendSnapshot, SnapshotRequest};
//!
//! // What a checkpoint layer asks for a savepoint: canonical streams in up to 4 parts.
//! let request = SnapshotRequest::canonical(7, 4);
//! assert!(request.canonical_only && request.delta_base.is_none());
//! # let _ = |s: BackendSnapshot| s.kind_name();
//! ```

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::backend::{KeyedStateBackend, KeyedStateSnapshot};
use crate::descriptor::StateMeta;
use crate::error::{Error, Result};
use crate::key_group::KeyGroupRange;

/// What a checkpoint layer asks a backend for at a barrier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The checkpoint (or savepoint) id; notifications later name it.
    pub checkpoint_id: u64,
    /// True for savepoints and non-incremental checkpoints: only
    /// [`BackendSnapshot::Canonical`] is accepted.
    pub canonical_only: bool,
    /// The checkpoint a delta may build on: the last one whose completion the backend was
    /// notified of and whose files the layer still holds. `None`: no delta is possible.
    pub delta_base: Option<u64>,
    /// How many parts canonical or delta streams may be split into (written in parallel).
    pub parts: usize,
}

impl SnapshotRequest {
    /// A request for canonical streams only (savepoints, full checkpoints).
    pub fn canonical(checkpoint_id: u64, parts: usize) -> Self {
        SnapshotRequest {
            checkpoint_id,
            canonical_only: true,
            delta_base: None,
            parts,
        }
    }

    /// A request for an incremental checkpoint: any kind of snapshot, a delta on `delta_base`
    /// if given.
    pub fn incremental(checkpoint_id: u64, delta_base: Option<u64>, parts: usize) -> Self {
        SnapshotRequest {
            checkpoint_id,
            canonical_only: false,
            delta_base,
            parts,
        }
    }
}

/// What a backend hands a checkpoint: the synchronous part of a snapshot, written afterwards on
/// another thread while processing continues.
pub enum BackendSnapshot {
    /// Canonical streams, one per part; the parts cover disjoint key groups and together every
    /// key group of the backend's range.
    Canonical(Vec<Box<dyn KeyedStateSnapshot>>),
    /// Delta streams on top of the checkpoint named by [`SnapshotRequest::delta_base`]: per
    /// changed entry its current record or a tombstone. Key groups in `replaced` are written
    /// whole (the base's blocks of them are dropped). Only valid when a base was given.
    Delta {
        /// The delta views, over disjoint subsets of the changed key groups.
        parts: Vec<Box<dyn KeyedStateSnapshot>>,
        /// Key groups written whole (sorted).
        replaced: Vec<u32>,
    },
    /// Immutable native files and the backend's manifest. Only valid when not
    /// [`SnapshotRequest::canonical_only`].
    Native(NativeSnapshot),
}

impl BackendSnapshot {
    /// `"canonical"`, `"delta"` or `"native"` (for logs).
    pub fn kind_name(&self) -> &'static str {
        match self {
            BackendSnapshot::Canonical(_) => "canonical",
            BackendSnapshot::Delta { .. } => "delta",
            BackendSnapshot::Native(_) => "native",
        }
    }
}

impl fmt::Debug for BackendSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSnapshot::Canonical(p) => f.debug_tuple("Canonical").field(&p.len()).finish(),
            BackendSnapshot::Delta { parts, replaced } => f
                .debug_struct("Delta")
                .field("parts", &parts.len())
                .field("replaced", replaced)
                .finish(),
            BackendSnapshot::Native(n) => f.debug_tuple("Native").field(n).finish(),
        }
    }
}

/// A snapshot in a backend's native format: immutable local files (uploaded unless a file of
/// the same name was uploaded before) and the backend's manifest.
pub struct NativeSnapshot {
    /// Which backend wrote it (stored with the checkpoint; a restore checks it against
    /// [`NativeFormat::backend_id`]): 1–32 printable ASCII bytes.
    pub backend: String,
    /// The key groups the subtask owns.
    pub key_group_range: KeyGroupRange,
    /// The backend's own manifest, stored as is and handed back on restore.
    pub manifest: Vec<u8>,
    /// The files.
    pub files: Vec<NativeFileSpec>,
    /// Whatever keeps the local files alive (and unchanged) until they are uploaded.
    pub keep_alive: Box<dyn Any + Send>,
}

impl fmt::Debug for NativeSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeSnapshot")
            .field("backend", &self.backend)
            .field("key_group_range", &self.key_group_range)
            .field("manifest_bytes", &self.manifest.len())
            .field("files", &self.files)
            .finish()
    }
}

/// A local file of a [`NativeSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFileSpec {
    /// Its name: unique and immutable (the same name always means the same bytes), one path
    /// segment of `[A-Za-z0-9._-]`, at most 200 bytes.
    pub name: String,
    /// Where to read it.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The key groups whose state it holds (inside the snapshot's range).
    pub key_groups: KeyGroupRange,
}

/// A file of stored native state, as the checkpoint's metadata records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFileRef {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The key groups whose state it holds.
    pub key_groups: KeyGroupRange,
}

/// The stored native state of one old subtask: what the checkpoint recorded from a
/// [`NativeSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeSource {
    /// The backend id.
    pub backend: String,
    /// The key groups the writing subtask owned.
    pub key_group_range: KeyGroupRange,
    /// The backend's manifest.
    pub manifest: Vec<u8>,
    /// Every file of the snapshot.
    pub files: Vec<NativeFileRef>,
}

/// A [`NativeSource`] whose needed files ([`NativeFormat::files_needed`]) were streamed into
/// `dir` under their names, each checked against its recorded size and checksum.
///
/// The files are working copies of what the checkpoint keeps: they are not fsynced (a restore
/// waits for the copy, not for the disk), so a power loss may leave them incomplete. A backend
/// that names them in anything durable of its own (a manifest it reopens) fsyncs them first.
/// From checkpoints on the local filesystem they may be hard links to the checkpoint's own
/// files: a backend never writes to them (reading, linking, renaming and deleting are fine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeRestoreSource {
    /// The stored state.
    pub source: NativeSource,
    /// The directory holding its needed files.
    pub dir: PathBuf,
}

/// How a backend's native checkpoints are read: used by restore and by offline inspection
/// without a backend instance.
pub trait NativeFormat: Send + Sync {
    /// The id stored with the backend's native snapshots.
    fn backend_id(&self) -> &str;

    /// Checks the manifest of `source` (its own checksums, the max parallelism, and that it
    /// agrees with the file list the checkpoint recorded: names, sizes, key groups) and returns
    /// the states it holds. A mismatch is an error (a file restored under other key groups
    /// would silently lose or add state).
    fn check(&self, source: &NativeSource, max_parallelism: u32) -> Result<Vec<StateMeta>>;

    /// The names of the files a backend owning `range` needs from `source` (after
    /// [`Self::check`]). The default: every file whose key groups intersect `range`.
    fn files_needed(&self, source: &NativeSource, range: KeyGroupRange) -> Result<Vec<String>> {
        Ok(source
            .files
            .iter()
            .filter(|f| !f.key_groups.intersect(&range).is_empty())
            .map(|f| f.name.clone())
            .collect())
    }

    /// Verifies a downloaded file the way the backend opens it (block checksums and the
    /// like). The default accepts any file (the checkpoint layer already checked its size
    /// and CRC32C).
    fn verify_file(&self, path: &Path) -> Result<()> {
        let _ = path;
        Ok(())
    }
}

/// A keyed state backend that takes part in checkpoints through this contract. Every method
/// has a default: a backend that implements nothing gets full canonical snapshots.
pub trait CheckpointableBackend: KeyedStateBackend {
    /// The synchronous part of a checkpoint at a barrier: what to write for `request`.
    /// The default is one canonical part ([`KeyedStateBackend::snapshot`]).
    fn snapshot_for_checkpoint(&mut self, request: &SnapshotRequest) -> Result<BackendSnapshot> {
        let _ = request;
        Ok(BackendSnapshot::Canonical(vec![self.snapshot()?]))
    }

    /// Checkpoint `checkpoint_id` completed: its files (and those of the checkpoints it
    /// builds on) are durable; a later delta may build on it. Called before the next
    /// snapshot, on the backend's thread.
    fn notify_checkpoint_complete(&mut self, checkpoint_id: u64) {
        let _ = checkpoint_id;
    }

    /// Checkpoint `checkpoint_id` was aborted: nothing will build on it.
    fn notify_checkpoint_aborted(&mut self, checkpoint_id: u64) {
        let _ = checkpoint_id;
    }

    /// How this backend's native snapshots are read, if it writes any.
    fn native_format(&self) -> Option<&dyn NativeFormat> {
        None
    }

    /// Restores a fresh backend from native snapshots (one, or several at another
    /// parallelism), whose needed files are in each source's directory. The backend may
    /// move, link or keep the files; the directories are its own afterwards.
    fn restore_from_native(&mut self, sources: Vec<NativeRestoreSource>) -> Result<()> {
        let _ = sources;
        Err(Error::RestoreMismatch {
            reason: "this backend cannot restore native snapshots".into(),
        })
    }
}

/// Splits `key_groups` into at most `parts` contiguous, non-empty chunks of similar size (for
/// the parts of a [`BackendSnapshot`]).
pub fn split_key_groups(key_groups: &[u32], parts: usize) -> Vec<Vec<u32>> {
    let parts = parts.clamp(1, key_groups.len().max(1));
    let (base, extra) = (key_groups.len() / parts, key_groups.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for i in 0..parts {
        let n = base + usize::from(i < extra);
        out.push(key_groups[at..at + n].to_vec());
        at += n;
    }
    out
}
