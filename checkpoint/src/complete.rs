//! Turning acknowledged subtask states into a committed checkpoint or a savepoint.

use std::collections::BTreeMap;

use object_store::path::Path;

use crate::commit::CommitLog;
use crate::error::{Error, Result};
use crate::format::{CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskState};
use crate::restore::CompletedCheckpoint;
use crate::storage::{validate_name, CheckpointStorage, METADATA_FILE};

/// What one subtask acknowledged: where it belongs and the state it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubtaskAck {
    /// The operator's stable id.
    pub operator_id: String,
    /// The operator's parallelism.
    pub parallelism: u32,
    /// The operator's max parallelism.
    pub max_parallelism: u32,
    /// The subtask's state handle.
    pub state: SubtaskState,
}

/// Groups acknowledgements by operator (sorted by id) and checks that every subtask of every
/// operator is there exactly once with consistent parallelism.
pub fn assemble_operators(acks: Vec<SubtaskAck>) -> Result<Vec<OperatorSnapshot>> {
    let mut ops: BTreeMap<String, (u32, u32, BTreeMap<u32, SubtaskState>)> = BTreeMap::new();
    for a in acks {
        validate_name("operator id", &a.operator_id)?;
        let e = ops
            .entry(a.operator_id.clone())
            .or_insert_with(|| (a.parallelism, a.max_parallelism, BTreeMap::new()));
        if e.0 != a.parallelism || e.1 != a.max_parallelism {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "operator '{}': subtasks disagree on parallelism ({}/{} vs {}/{})",
                    a.operator_id, e.0, e.1, a.parallelism, a.max_parallelism
                ),
            });
        }
        let sub = a.state.subtask;
        if e.2.insert(sub, a.state).is_some() {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "operator '{}': subtask {sub} acknowledged twice",
                    a.operator_id
                ),
            });
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    for (operator_id, (parallelism, max_parallelism, subtasks)) in ops {
        let subtasks: Vec<SubtaskState> = subtasks.into_values().collect();
        if subtasks.len() != parallelism as usize
            || subtasks
                .iter()
                .enumerate()
                .any(|(i, s)| s.subtask != i as u32)
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "operator '{operator_id}': {} of {parallelism} subtasks acknowledged",
                    subtasks.len()
                ),
            });
        }
        out.push(OperatorSnapshot {
            operator_id,
            max_parallelism,
            parallelism,
            subtasks,
        });
    }
    Ok(out)
}

/// Writes `_metadata` of checkpoint `checkpoint_id` (create-only) and appends its completion
/// to the commit log. If a newer coordinator fenced this one, the metadata is deleted again and
/// [`Error::Fenced`] is returned: no completed checkpoint is left behind. `duration_millis` is
/// how long the checkpoint took until now by the writer's clock (recorded in the metadata).
pub fn commit_checkpoint(
    storage: &CheckpointStorage,
    log: &mut CommitLog,
    checkpoint_id: u64,
    timestamp_millis: i64,
    duration_millis: Option<u64>,
    operators: Vec<OperatorSnapshot>,
) -> Result<CompletedCheckpoint> {
    let metadata = CheckpointMetadata {
        kind: SnapshotKind::Checkpoint,
        checkpoint_id,
        job_id: storage.job().to_string(),
        timestamp_millis,
        epoch: log.epoch(),
        operators,
        duration_millis,
    };
    let bytes = metadata.encode()?;
    log.check_not_fenced(checkpoint_id)?;
    let path = storage.metadata_path(checkpoint_id);
    if !storage.put_if_absent(&path, bytes.clone())? {
        // A coordinator of an older epoch may have used the same id just before this one
        // claimed the job: it can never commit it (its log append collides with the claim),
        // so its metadata is garbage and may go.
        let stale = match CompletedCheckpoint::load(storage, &path) {
            Ok(c) => c.metadata.epoch < log.epoch(),
            Err(Error::MissingFile { .. }) => true,
            Err(_) => false,
        };
        if !stale {
            return Err(Error::CheckpointFailed {
                checkpoint_id,
                reason: format!(
                    "'{}' already exists (written by another coordinator?)",
                    storage.location(&path)
                ),
            });
        }
        storage.delete(&path)?;
        if !storage.put_if_absent(&path, bytes)? {
            return Err(Error::CheckpointFailed {
                checkpoint_id,
                reason: format!(
                    "'{}' was written again by another coordinator",
                    storage.location(&path)
                ),
            });
        }
    }
    if let Err(e) = log.commit(checkpoint_id) {
        let _ = storage.delete(&path);
        return Err(e);
    }
    Ok(CompletedCheckpoint::new(storage, metadata, path))
}

/// Writes the `_metadata` of a savepoint into `dir` (create-only). The state files must already
/// be in `dir` (savepoints are self-contained). `duration_millis` as for [`commit_checkpoint`].
pub fn commit_savepoint(
    storage: &CheckpointStorage,
    dir: &Path,
    checkpoint_id: u64,
    timestamp_millis: i64,
    duration_millis: Option<u64>,
    epoch: u64,
    operators: Vec<OperatorSnapshot>,
) -> Result<CompletedCheckpoint> {
    let metadata = CheckpointMetadata {
        kind: SnapshotKind::Savepoint,
        checkpoint_id,
        job_id: storage.job().to_string(),
        timestamp_millis,
        epoch,
        operators,
        duration_millis,
    };
    if metadata
        .operators
        .iter()
        .flat_map(|o| o.subtasks.iter())
        .filter_map(|s| s.keyed.as_ref())
        .flat_map(|k| k.files.iter())
        .any(|f| !matches!(f.file.location, crate::format::FileLocation::Exclusive(_)))
    {
        return Err(Error::InvalidConfig {
            reason: "a savepoint must not refer to shared files".into(),
        });
    }
    let path = dir.clone().join(METADATA_FILE);
    if !storage.put_if_absent(&path, metadata.encode()?)? {
        return Err(Error::CheckpointFailed {
            checkpoint_id,
            reason: format!("savepoint '{}' already exists", storage.location(&path)),
        });
    }
    Ok(CompletedCheckpoint::new(storage, metadata, path))
}

/// Deletes the files of a checkpoint that only it uses (its directory); shared files are left
/// to the shared-state registry.
pub fn discard_checkpoint_dir(storage: &CheckpointStorage, checkpoint_id: u64) -> Result<()> {
    // The metadata goes first: a checkpoint without metadata is not restorable, never half.
    storage.delete(&storage.metadata_path(checkpoint_id))?;
    storage.delete_prefix(&storage.checkpoint_dir(checkpoint_id))?;
    Ok(())
}
