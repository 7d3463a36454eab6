//! Reading a checkpoint or savepoint back: find it, validate it, and restore each new subtask
//! from the key-group ranges it owns (range reads, never whole files) and its share of the
//! operator state.

use std::io::Cursor;
use std::ops::Range;

use object_store::path::Path;
use state_api::{redistribute, KeyGroupRange, KeyedStateBackend, OperatorStateStore};

use crate::commit::CommitLog;
use crate::error::{Error, Result};
use crate::format::{CheckpointMetadata, FileLocation, KeyedStateFile, MAX_METADATA_LEN};
use crate::storage::{CheckpointStorage, METADATA_FILE};

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
}

impl CompletedCheckpoint {
    /// Reads and validates the metadata at `path` (the `_metadata` file, or the directory
    /// holding it).
    pub fn load(storage: &CheckpointStorage, path: &Path) -> Result<Self> {
        let path = if path.filename() == Some(METADATA_FILE) {
            path.clone()
        } else {
            path.clone().join(METADATA_FILE)
        };
        let bytes = storage.get(&path, MAX_METADATA_LEN + 18)?;
        let metadata = CheckpointMetadata::decode(&bytes, path.as_ref())?;
        Ok(CompletedCheckpoint { metadata, path })
    }

    /// The latest completed checkpoint of the storage's job (by the commit log), or `None`.
    pub fn latest(storage: &CheckpointStorage) -> Result<Option<Self>> {
        Ok(Self::retained(storage, 1)?.pop())
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
                    checkpoint: self.path.to_string(),
                });
            }
        }
        Ok(())
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
        let streams = self.keyed_streams(
            storage,
            operator,
            backend.max_parallelism(),
            backend.key_group_range(),
        )?;
        backend
            .restore(streams)
            .map_err(|e| Error::state(operator, subtask, e))
    }

    /// The canonical snapshot streams holding the key groups of `range` of `operator`, built
    /// from range reads: each is the stored header, the owned blocks and an end marker.
    pub fn keyed_streams(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        max_parallelism: u32,
        range: KeyGroupRange,
    ) -> Result<Vec<(String, Cursor<Vec<u8>>)>> {
        let Some(op) = self.metadata.operator(operator) else {
            return Ok(Vec::new());
        };
        if op.max_parallelism != max_parallelism {
            return Err(Error::RestoreMismatch {
                operator: operator.to_string(),
                checkpoint: self.path.to_string(),
                reason: format!(
                    "the checkpoint has max parallelism {}, the job {max_parallelism}; max \
                     parallelism cannot change across a restore",
                    op.max_parallelism
                ),
            });
        }
        let mut streams = Vec::new();
        for st in &op.subtasks {
            let Some(k) = &st.keyed else { continue };
            if k.key_group_range.intersect(&range).is_empty() {
                continue;
            }
            for f in &k.files {
                if let Some(s) = self.read_owned(storage, f, range)? {
                    streams.push(s);
                }
            }
        }
        Ok(streams)
    }

    fn read_owned(
        &self,
        storage: &CheckpointStorage,
        f: &KeyedStateFile,
        range: KeyGroupRange,
    ) -> Result<Option<(String, Cursor<Vec<u8>>)>> {
        let owned: Vec<_> = f
            .key_groups
            .iter()
            .filter(|k| range.contains(k.key_group))
            .collect();
        if owned.is_empty() {
            return Ok(None);
        }
        let path = self.file_path(&f.file.location);
        // Adjacent blocks are read as one range.
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for k in &owned {
            match ranges.last_mut() {
                Some(r) if r.end == k.offset => r.end += k.length,
                _ => ranges.push(k.offset..k.offset + k.length),
            }
        }
        let parts = storage.get_ranges(&path, &ranges)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut stream = Vec::with_capacity(f.header_bytes.len() + total + 17);
        stream.extend_from_slice(&f.header_bytes);
        for p in &parts {
            stream.extend_from_slice(p);
        }
        // Check that each block starts where the metadata says, with its key group.
        let mut at = f.header_bytes.len();
        for k in &owned {
            let head = stream.get(at..at + 5).unwrap_or(&[]);
            if head.len() < 5 || head[0] != 0x01 || head[1..5] != k.key_group.to_be_bytes() {
                return Err(Error::Corrupt {
                    file: path.to_string(),
                    offset: k.offset,
                    reason: format!("no block of key group {} at this offset", k.key_group),
                });
            }
            at += k.length as usize;
        }
        // End marker with an empty index: 0x02 | count 0 | records 0 | crc32c(count, records).
        let body = [0u8; 12];
        stream.push(0x02);
        stream.extend_from_slice(&body);
        stream.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        Ok(Some((path.to_string(), Cursor::new(stream))))
    }

    /// The operator state of subtask `subtask` of `parallelism` for `operator`, redistributed
    /// from the checkpoint's subtasks (even split or union; broadcast state to everyone). Even
    /// split lists are concatenated in subtask order and cut into contiguous parts, so they stay
    /// in place when the parallelism is unchanged and every subtask had the same count.
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
        let old: Vec<OperatorStateStore> = op
            .subtasks
            .iter()
            .map(|s| s.operator_state.clone().unwrap_or_default())
            .collect();
        if old.iter().all(|s| s.is_empty()) {
            return Ok(OperatorStateStore::new());
        }
        // Union lists go to every subtask even when the parallelism is unchanged (as in Flink).
        Ok(redistribute(&old, parallelism)
            .into_iter()
            .nth(subtask as usize)
            .unwrap_or_default())
    }

    /// Reads every file the checkpoint refers to in full and checks its size and CRC32C.
    pub fn verify_files(&self, storage: &CheckpointStorage) -> Result<()> {
        for f in self.metadata.files() {
            let path = self.file_path(&f.location);
            let bytes = storage.get(&path, f.size)?;
            if bytes.len() as u64 != f.size {
                return Err(Error::Truncated {
                    file: path.to_string(),
                    expected: f.size,
                    found: bytes.len() as u64,
                });
            }
            let actual = crc32c::crc32c(&bytes);
            if actual != f.crc32c {
                return Err(Error::ChecksumMismatch {
                    file: path.to_string(),
                    expected: f.crc32c,
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// `<job>/shared` for a checkpoint directory `<job>/chk-<n>`.
pub(crate) fn shared_dir_of(dir: &Path) -> Path {
    dir.parent().unwrap_or_default().join("shared")
}
