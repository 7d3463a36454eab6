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

/// A keyed state view to write, as one or several parts covering disjoint key groups (the
/// parts are written in parallel, one file each).
pub enum KeyedSnapshot {
    /// Every key group.
    Full(Vec<Box<dyn KeyedStateSnapshot>>),
    /// Only `changed` key groups (the parts are restricted to them); the others are taken from
    /// `base`, the handle of an earlier checkpoint whose files are all in `shared/`.
    Incremental {
        /// The views, restricted to disjoint subsets of `changed`.
        parts: Vec<Box<dyn KeyedStateSnapshot>>,
        /// Key groups written since `base` (sorted).
        changed: Vec<u32>,
        /// The handle the checkpoint builds on, or `None` for a first (full) incremental one.
        base: Option<KeyedStateHandle>,
    },
    /// A delta on top of `base`: the parts (delta streams, restricted to disjoint subsets of
    /// the changed key groups) hold, per changed entry, its current value or a tombstone; the
    /// key groups in `replaced` are written whole (what `base` holds for them is dropped).
    /// Written into `shared/`; the handle is `base`'s files followed by the new ones.
    Delta {
        /// The delta views.
        parts: Vec<Box<dyn KeyedStateSnapshot>>,
        /// Key groups written whole (sorted).
        replaced: Vec<u32>,
        /// The handle the delta builds on (all its files in `shared/`).
        base: KeyedStateHandle,
    },
    /// Backend-native files; those in `known` (already in `shared/`, referenced by a retained
    /// checkpoint) are referenced instead of uploaded.
    Native {
        /// The snapshot.
        snapshot: NativeSnapshot,
        /// Files already uploaded, by name.
        known: std::collections::HashMap<String, FileRef>,
    },
}

/// A snapshot in a backend's native format (the contract's type, under its former name here).
pub use state_api::checkpointing::NativeSnapshot;

/// A local file of a [`NativeSnapshot`] (the contract's `NativeFileSpec`).
pub use state_api::checkpointing::NativeFileSpec as NativeLocalFile;

/// Splits key groups into at most `parts` contiguous chunks of similar size.
pub use state_api::checkpointing::split_key_groups;

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
    Ok(write_subtask_snapshot_tracked(storage, target, snapshot)?.0)
}

/// Like [`write_subtask_snapshot`], also returning the names of the files written into
/// `shared/` for this checkpoint.
pub fn write_subtask_snapshot_tracked(
    storage: &CheckpointStorage,
    target: &SnapshotTarget,
    snapshot: SubtaskSnapshot,
) -> Result<(SubtaskState, Vec<String>)> {
    let mut uploaded = Vec::new();
    validate_name("operator id", &snapshot.operator_id)?;
    let op = snapshot.operator_id.as_str();
    let sub = snapshot.subtask;
    let prefix = format!("{op}-{sub}-e{}-c{}", target.epoch, target.checkpoint_id);
    let mut native = None;
    let keyed = match snapshot.keyed {
        None => None,
        Some(KeyedSnapshot::Native { snapshot: n, known }) => {
            native = Some(write_native(
                storage,
                &target.shared_dir,
                n,
                &known,
                &mut uploaded,
                op,
                sub,
            )?);
            None
        }
        Some(KeyedSnapshot::Full(parts)) => {
            let range = first_range(&parts, op, sub)?;
            let files = write_parts(storage, &target.dir, false, &prefix, parts, op, sub)?;
            Some(KeyedStateHandle {
                key_group_range: range,
                files,
            })
        }
        Some(KeyedSnapshot::Delta {
            parts,
            replaced,
            base,
        }) => {
            let range = first_range(&parts, op, sub)?;
            let written = write_parts(storage, &target.shared_dir, true, &prefix, parts, op, sub)?;
            let handle = chain_handle(base, range, &replaced, written, |name| {
                let _ = storage.delete(&target.shared_dir.clone().join(name));
            });
            let handle = handle.map_err(|reason| Error::InvalidConfig {
                reason: format!("operator '{op}' subtask {sub}: {reason}"),
            })?;
            for f in &handle.1 {
                uploaded.push(f.clone());
            }
            Some(handle.0)
        }
        Some(KeyedSnapshot::Incremental {
            parts,
            changed,
            base,
        }) => {
            let range = first_range(&parts, op, sub)?;
            let written = write_parts(storage, &target.shared_dir, true, &prefix, parts, op, sub)?;
            let delete_written = || {
                for f in &written {
                    let _ = storage.delete(&target.shared_dir.clone().join(f.file.location.name()));
                }
            };
            let mut files = Vec::new();
            if let Some(base) = base {
                if base.key_group_range != range {
                    delete_written();
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
                        delete_written();
                        return Err(Error::InvalidConfig {
                            reason: format!(
                                "incremental base of operator '{op}' subtask {sub} refers to \
                                 the exclusive file '{}'",
                                f.file.location.name()
                            ),
                        });
                    }
                    f.key_groups.retain(|k| !changed.contains(&k.key_group));
                    f.tombstones.retain(|k| !changed.contains(&k.key_group));
                    if !f.key_groups.is_empty() || !f.tombstones.is_empty() {
                        files.push(f);
                    }
                }
            }
            for file in written {
                uploaded.push(file.file.location.name().to_string());
                if file.key_groups.is_empty() {
                    // Nothing changed here (or it was emptied): the file is not needed.
                    let _ =
                        storage.delete(&target.shared_dir.clone().join(file.file.location.name()));
                } else {
                    files.push(file);
                }
            }
            Some(KeyedStateHandle {
                key_group_range: range,
                files,
            })
        }
    };
    Ok((
        SubtaskState {
            subtask: sub,
            keyed,
            native,
            operator_state: snapshot.operator_state,
        },
        uploaded,
    ))
}

/// The handle of a delta: `base`'s files without the key groups in `replaced` (files left with
/// nothing are dropped), then the `written` files that hold anything. Written files that hold
/// nothing are deleted with `delete`. Returns the handle and the names of the files written.
fn chain_handle(
    base: KeyedStateHandle,
    range: state_api::KeyGroupRange,
    replaced: &[u32],
    written: Vec<KeyedStateFile>,
    delete: impl Fn(&str),
) -> std::result::Result<(KeyedStateHandle, Vec<String>), String> {
    let names: Vec<String> = written
        .iter()
        .map(|f| f.file.location.name().to_string())
        .collect();
    let fail = |reason: String| {
        for n in &names {
            delete(n);
        }
        Err(reason)
    };
    if base.key_group_range != range {
        return fail(format!(
            "delta base covers {}, the snapshot {}",
            base.key_group_range, range
        ));
    }
    let replaced: BTreeSet<u32> = replaced.iter().copied().collect();
    let mut files = Vec::new();
    for mut f in base.files {
        if !matches!(f.file.location, FileLocation::Shared(_)) {
            return fail(format!(
                "delta base refers to the exclusive file '{}'",
                f.file.location.name()
            ));
        }
        f.key_groups.retain(|k| !replaced.contains(&k.key_group));
        f.tombstones.retain(|k| !replaced.contains(&k.key_group));
        if !f.key_groups.is_empty() || !f.tombstones.is_empty() {
            files.push(f);
        }
    }
    for f in written {
        if f.key_groups.is_empty() && f.tombstones.is_empty() {
            delete(f.file.location.name());
        } else {
            files.push(f);
        }
    }
    Ok((
        KeyedStateHandle {
            key_group_range: range,
            files,
        },
        names,
    ))
}

fn write_native(
    storage: &CheckpointStorage,
    shared_dir: &Path,
    n: NativeSnapshot,
    known: &std::collections::HashMap<String, FileRef>,
    uploaded: &mut Vec<String>,
    op: &str,
    sub: u32,
) -> Result<crate::format::NativeKeyedHandle> {
    let mut files = Vec::with_capacity(n.files.len());
    let res = (|| {
        for f in &n.files {
            crate::format::validate_file_name(&f.name).map_err(|reason| Error::InvalidConfig {
                reason: format!("operator '{op}' subtask {sub}: {reason}"),
            })?;
            let file = match known.get(&f.name) {
                Some(r) if r.size == f.size => r.clone(),
                _ => {
                    let path = shared_dir.clone().join(f.name.as_str());
                    let (size, crc) = upload_file(storage, &path, &f.path)?;
                    uploaded.push(f.name.clone());
                    if size != f.size {
                        return Err(Error::Truncated {
                            file: f.path.display().to_string(),
                            expected: f.size,
                            found: size,
                        });
                    }
                    FileRef {
                        location: FileLocation::Shared(f.name.clone()),
                        size,
                        crc32c: crc,
                    }
                }
            };
            files.push(crate::format::NativeFile {
                file,
                key_groups: f.key_groups,
            });
        }
        Ok(())
    })();
    drop(n.keep_alive);
    if let Err(e) = res {
        for name in uploaded.drain(..) {
            let _ = storage.delete(&shared_dir.clone().join(name.as_str()));
        }
        return Err(e);
    }
    Ok(crate::format::NativeKeyedHandle {
        backend: n.backend,
        key_group_range: n.key_group_range,
        metadata: n.manifest,
        files,
    })
}

/// Streams a local file to `path` through the storage layer; returns its length and CRC32C.
fn upload_file(
    storage: &CheckpointStorage,
    path: &Path,
    local: &std::path::Path,
) -> Result<(u64, u32)> {
    storage.upload_file(local, path)
}

fn first_range(
    parts: &[Box<dyn KeyedStateSnapshot>],
    op: &str,
    sub: u32,
) -> Result<state_api::KeyGroupRange> {
    let range = parts
        .first()
        .map(|p| p.key_group_range())
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!("operator '{op}' subtask {sub}: a keyed snapshot without parts"),
        })?;
    if parts.iter().any(|p| p.key_group_range() != range) {
        return Err(Error::InvalidConfig {
            reason: format!("operator '{op}' subtask {sub}: snapshot parts of different ranges"),
        });
    }
    Ok(range)
}

/// Writes each part to `<dir>/<prefix>-p<k>.kst`, in parallel; on error the files already
/// written are deleted.
fn write_parts(
    storage: &CheckpointStorage,
    dir: &Path,
    shared: bool,
    prefix: &str,
    parts: Vec<Box<dyn KeyedStateSnapshot>>,
    op: &str,
    sub: u32,
) -> Result<Vec<KeyedStateFile>> {
    let location = |name: String| {
        if shared {
            FileLocation::Shared(name)
        } else {
            FileLocation::Exclusive(name)
        }
    };
    let jobs: Vec<(Path, String, Box<dyn KeyedStateSnapshot>)> = parts
        .into_iter()
        .enumerate()
        .map(|(k, p)| {
            let name = format!("{prefix}-p{k}.kst");
            (dir.clone().join(name.as_str()), name, p)
        })
        .collect();
    let results: Vec<(Path, Result<KeyedStateFile>)> = if jobs.len() == 1 {
        jobs.into_iter()
            .map(|(path, name, p)| {
                let r = write_stream(storage, &path, location(name), &*p, op, sub);
                (path, r)
            })
            .collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .into_iter()
                .map(|(path, name, p)| {
                    let loc = location(name);
                    scope.spawn(move || {
                        let r = write_stream(storage, &path, loc, &*p, op, sub);
                        (path, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        (
                            Path::default(),
                            Err(Error::InvalidConfig {
                                reason: format!(
                                    "operator '{op}' subtask {sub}: a snapshot writer panicked"
                                ),
                            }),
                        )
                    })
                })
                .collect()
        })
    };
    let mut files = Vec::with_capacity(results.len());
    let mut first_err = None;
    let mut written = Vec::new();
    for (path, r) in results {
        match r {
            Ok(f) => {
                written.push(path);
                files.push(f);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        for p in written {
            let _ = storage.delete(&p);
        }
        return Err(e);
    }
    Ok(files)
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
        inner: storage.writer(path.clone())?,
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
    let header = SnapshotReader::open(&header_bytes[..], storage.location(path))
        .map_err(|e| Error::state(op, sub, e))?
        .header()
        .clone();
    if size != summary.bytes {
        let _ = storage.delete(path);
        return Err(Error::Truncated {
            file: storage.location(path),
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
        tombstones: summary.tombstones,
    })
}

#[cfg(test)]
mod tests {
    use super::split_key_groups;

    #[test]
    fn split_is_contiguous_balanced_and_never_empty() {
        let kgs: Vec<u32> = (10..17).collect();
        assert_eq!(
            split_key_groups(&kgs, 3),
            vec![vec![10, 11, 12], vec![13, 14], vec![15, 16]]
        );
        assert_eq!(split_key_groups(&kgs[..2], 4), vec![vec![10], vec![11]]);
        assert_eq!(split_key_groups(&[], 4), vec![Vec::<u32>::new()]);
        assert_eq!(split_key_groups(&kgs, 0), vec![kgs.clone()]);
    }
}
