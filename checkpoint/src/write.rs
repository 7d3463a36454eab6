//! Writing the state of one subtask: the asynchronous part of a checkpoint.
//!
//! The synchronous part (on the subtask's thread) captures a [`KeyedStateSnapshot`] and a copy
//! of the [`OperatorStateStore`] into a [`SubtaskSnapshot`]; [`write_subtask_snapshot`] then
//! uploads the keyed stream (possibly on another thread) and returns the [`SubtaskState`] that
//! goes into the metadata.

use std::collections::BTreeSet;
use std::io::Write;

use object_store::path::Path;
use state_api::snapshot::SnapshotReader;
use state_api::{KeyedStateSnapshot, OperatorStateStore};

use crate::error::{Error, Result};
use crate::format::{FileLocation, FileRef, KeyedStateFile, KeyedStateHandle, SubtaskState};
use crate::storage::{validate_name, CheckpointStorage};

/// What a subtask captured synchronously for one checkpoint.
pub struct SubtaskSnapshot {
    /// The operator's stable id.
    pub operator_id: String,
    /// The subtask index.
    pub subtask: u32,
    /// The keyed state view, if the operator is keyed.
    pub keyed: Option<KeyedSnapshot>,
    /// The operator state, if any.
    pub operator_state: Option<OperatorStateStore>,
}

impl std::fmt::Debug for SubtaskSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubtaskSnapshot")
            .field("operator_id", &self.operator_id)
            .field("subtask", &self.subtask)
            .field("keyed", &self.keyed.is_some())
            .field("operator_state", &self.operator_state.is_some())
            .finish()
    }
}

/// A keyed state view to write.
pub enum KeyedSnapshot {
    /// Every key group.
    Full(Box<dyn KeyedStateSnapshot>),
    /// Only `changed` key groups (the snapshot is restricted to them); the others are taken
    /// from `base`, the handle of an earlier checkpoint whose files are all in `shared/`.
    Incremental {
        /// The view, restricted to `changed`.
        snapshot: Box<dyn KeyedStateSnapshot>,
        /// Key groups written since `base` (sorted).
        changed: Vec<u32>,
        /// The handle the checkpoint builds on, or `None` for a first (full) incremental one.
        base: Option<KeyedStateHandle>,
    },
}

/// Where a checkpoint's files go.
#[derive(Clone, Debug)]
pub struct SnapshotTarget {
    /// The directory of the `_metadata` file (exclusive files go here).
    pub dir: Path,
    /// The job's `shared/` directory (incremental files go here).
    pub shared_dir: Path,
    /// The checkpoint id.
    pub checkpoint_id: u64,
    /// The coordinator's epoch (part of every file name, so two coordinators never write the
    /// same file).
    pub epoch: u64,
}

/// Writes a subtask's captured state under `target`; returns its handle for the metadata.
///
/// On error, the file being written is abandoned (multipart uploads are aborted; a file already
/// complete is deleted).
pub fn write_subtask_snapshot(
    storage: &CheckpointStorage,
    target: &SnapshotTarget,
    snapshot: SubtaskSnapshot,
) -> Result<SubtaskState> {
    validate_name("operator id", &snapshot.operator_id)?;
    let op = snapshot.operator_id.as_str();
    let sub = snapshot.subtask;
    let keyed = match snapshot.keyed {
        None => None,
        Some(KeyedSnapshot::Full(s)) => {
            let name = format!("{op}-{sub}-e{}-c{}.kst", target.epoch, target.checkpoint_id);
            let path = target.dir.clone().join(name.as_str());
            let file = write_stream(storage, &path, FileLocation::Exclusive(name), &*s, op, sub)?;
            Some(KeyedStateHandle {
                key_group_range: s.key_group_range(),
                files: vec![file],
            })
        }
        Some(KeyedSnapshot::Incremental {
            snapshot: s,
            changed,
            base,
        }) => {
            let name = format!("{op}-{sub}-e{}-c{}.kst", target.epoch, target.checkpoint_id);
            let path = target.shared_dir.clone().join(name.as_str());
            let file = write_stream(storage, &path, FileLocation::Shared(name), &*s, op, sub)?;
            let range = s.key_group_range();
            let mut files = Vec::new();
            if let Some(base) = base {
                if base.key_group_range != range {
                    let _ = storage.delete(&path);
                    return Err(Error::RestoreMismatch {
                        operator: op.to_string(),
                        checkpoint: format!("checkpoint {}", target.checkpoint_id),
                        reason: format!(
                            "incremental base covers {}, the snapshot {}",
                            base.key_group_range, range
                        ),
                    });
                }
                let changed: BTreeSet<u32> = changed.into_iter().collect();
                for mut f in base.files {
                    if !matches!(f.file.location, FileLocation::Shared(_)) {
                        let _ = storage.delete(&path);
                        return Err(Error::InvalidConfig {
                            reason: format!(
                                "incremental base of operator '{op}' subtask {sub} refers to \
                                 the exclusive file '{}'",
                                f.file.location.name()
                            ),
                        });
                    }
                    f.key_groups.retain(|k| !changed.contains(&k.key_group));
                    if !f.key_groups.is_empty() {
                        files.push(f);
                    }
                }
            }
            if file.key_groups.is_empty() {
                // Nothing changed (or everything changed was emptied): the file is not needed.
                let _ = storage.delete(&path);
            } else {
                files.push(file);
            }
            Some(KeyedStateHandle {
                key_group_range: range,
                files,
            })
        }
    };
    Ok(SubtaskState {
        subtask: sub,
        keyed,
        operator_state: snapshot.operator_state,
    })
}

/// Keeps the bytes of the first write (the snapshot header, which `SnapshotWriter` writes with
/// one `write_all`) while passing everything on.
struct HeaderTap<W> {
    inner: W,
    first: Option<Vec<u8>>,
}

impl<W: Write> Write for HeaderTap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.first.is_none() {
            self.first = Some(buf[..n].to_vec());
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_stream(
    storage: &CheckpointStorage,
    path: &Path,
    location: FileLocation,
    snapshot: &dyn KeyedStateSnapshot,
    op: &str,
    sub: u32,
) -> Result<KeyedStateFile> {
    let mut tap = HeaderTap {
        inner: storage.writer(path.clone()),
        first: None,
    };
    let summary = match snapshot.write_to(&mut tap) {
        Ok(s) => s,
        Err(e) => {
            tap.inner.abort();
            return Err(Error::state(op, sub, e));
        }
    };
    let (size, crc) = tap.inner.finish()?;
    let header_len = summary.header_length as usize;
    let header_bytes = match tap.first {
        Some(mut first) if first.len() >= header_len => {
            first.truncate(header_len);
            first
        }
        _ => {
            // The header came in several writes: read it back.
            let header_range = 0..summary.header_length;
            let r = storage.get_ranges(path, std::slice::from_ref(&header_range))?;
            r.into_iter().next().map(|b| b.to_vec()).unwrap_or_default()
        }
    };
    let header = SnapshotReader::open(&header_bytes[..], path.to_string())
        .map_err(|e| Error::state(op, sub, e))?
        .header()
        .clone();
    if size != summary.bytes {
        let _ = storage.delete(path);
        return Err(Error::Truncated {
            file: path.to_string(),
            expected: summary.bytes,
            found: size,
        });
    }
    Ok(KeyedStateFile {
        file: FileRef {
            location,
            size,
            crc32c: crc,
        },
        header_bytes,
        header,
        key_groups: summary.key_groups,
    })
}
