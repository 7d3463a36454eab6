//! State handles as dataflow records: what a worker's operator tells the committer after it
//! wrote its part of a checkpoint, and the completions the committer sends back.

use std::thread::JoinHandle;

use checkpoint::{
    write_subtask_snapshot, CheckpointMetadata, CheckpointStorage, OperatorSnapshot, SnapshotKind,
    SnapshotTarget, SubtaskAck, SubtaskSnapshot, SubtaskState,
};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use timely::scheduling::SyncActivator;

/// One operator instance's answer for one checkpoint, sent to the committer (worker 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMessage {
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// The operator's stable id.
    pub operator: String,
    /// The worker (subtask index).
    pub subtask: u32,
    /// The number of workers (the operator's parallelism).
    pub parallelism: u32,
    /// The operator's max parallelism.
    pub max_parallelism: u32,
    /// For sources: whether every split of this worker was read to its end.
    pub source_done: Option<bool>,
    /// The state handle (encoded, checksummed), or why the snapshot failed.
    pub outcome: Result<Vec<u8>, String>,
}

/// What the committer sends every worker when a checkpoint completed or was aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The worker the message is for.
    pub target: u32,
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// True for the last checkpoint of the run: every source had read all its input.
    pub last: bool,
    /// True when the checkpoint was aborted (failed, timed out or subsumed), not completed.
    pub aborted: bool,
}

/// Encodes a subtask's state handle with the checkpoint format's own encoder (a metadata
/// record of one operator whose other subtasks are empty), checksummed.
pub(crate) fn encode_state(
    ack: &SubtaskAck,
    checkpoint_id: u64,
    job: &str,
) -> checkpoint::Result<Vec<u8>> {
    let mut subtasks: Vec<SubtaskState> = (0..ack.parallelism)
        .map(|i| SubtaskState {
            subtask: i,
            keyed: None,
            native: None,
            operator_state: None,
        })
        .collect();
    let i = ack.state.subtask as usize;
    let Some(slot) = subtasks.get_mut(i) else {
        return Err(checkpoint::Error::InvalidConfig {
            reason: format!(
                "operator '{}': subtask {i} of {}",
                ack.operator_id, ack.parallelism
            ),
        });
    };
    *slot = ack.state.clone();
    CheckpointMetadata {
        kind: SnapshotKind::Checkpoint,
        checkpoint_id,
        job_id: job.to_string(),
        timestamp_millis: 0,
        epoch: 0,
        operators: vec![OperatorSnapshot {
            operator_id: ack.operator_id.clone(),
            max_parallelism: ack.max_parallelism,
            parallelism: ack.parallelism,
            subtasks,
        }],
        duration_millis: None,
    }
    .encode()
}

/// Decodes what [`encode_state`] wrote, checking that it is the state of `message`'s subtask.
pub(crate) fn decode_state(message: &AckMessage, bytes: &[u8]) -> checkpoint::Result<SubtaskAck> {
    let what = format!(
        "state handle of '{}' worker {} for checkpoint {}",
        message.operator, message.subtask, message.checkpoint_id
    );
    let metadata = CheckpointMetadata::decode(bytes, &what)?;
    let wrong = |reason: &str| checkpoint::Error::Corrupt {
        file: what.clone(),
        offset: 0,
        reason: reason.to_string(),
    };
    let op = metadata
        .operators
        .into_iter()
        .next()
        .ok_or_else(|| wrong("no operator"))?;
    if op.operator_id != message.operator
        || op.parallelism != message.parallelism
        || metadata.checkpoint_id != message.checkpoint_id
    {
        return Err(wrong("it belongs to another operator or checkpoint"));
    }
    let state = op
        .subtasks
        .into_iter()
        .nth(message.subtask as usize)
        .ok_or_else(|| wrong("no such subtask"))?;
    Ok(SubtaskAck {
        operator_id: op.operator_id,
        parallelism: op.parallelism,
        max_parallelism: op.max_parallelism,
        state,
    })
}

/// A finished upload: the checkpoint, the encoded handle or why it failed, and the state
/// written (what an incremental snapshot builds on once the checkpoint completes).
pub(crate) type UploadResult = (u64, Result<Vec<u8>, String>, Option<SubtaskState>);

struct UploadJob {
    target: SnapshotTarget,
    snapshot: SubtaskSnapshot,
    parallelism: u32,
    max_parallelism: u32,
}

/// The asynchronous part of an operator's snapshots: a thread that writes what the worker
/// captured and wakes the operator when a handle is ready.
pub(crate) struct Uploader {
    jobs: Option<Sender<UploadJob>>,
    results: Receiver<UploadResult>,
    thread: Option<JoinHandle<()>>,
    pending: usize,
}

impl Uploader {
    pub(crate) fn start(storage: CheckpointStorage, activator: SyncActivator) -> Self {
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<UploadJob>();
        let (results_tx, results) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("flowstate-upload".into())
            .spawn(move || {
                for job in jobs_rx {
                    let id = job.target.checkpoint_id;
                    let op = job.snapshot.operator_id.clone();
                    let started = std::time::Instant::now();
                    let mut written = None;
                    let outcome = write_subtask_snapshot(&storage, &job.target, job.snapshot)
                        .and_then(|state| {
                            let ack = SubtaskAck {
                                operator_id: op.clone(),
                                parallelism: job.parallelism,
                                max_parallelism: job.max_parallelism,
                                state,
                            };
                            let bytes = encode_state(&ack, id, storage.job());
                            written = Some(ack.state);
                            bytes
                        })
                        .map_err(|e| e.to_string());
                    tracing::debug!(
                        checkpoint = id,
                        operator = %op,
                        ok = outcome.is_ok(),
                        millis = started.elapsed().as_millis() as u64,
                        "snapshot written"
                    );
                    let written = written.filter(|_| outcome.is_ok());
                    if results_tx.send((id, outcome, written)).is_err() {
                        return;
                    }
                    // The operator may be gone already (end of the dataflow).
                    let _ = activator.activate();
                }
            })
            .ok();
        Uploader {
            jobs: Some(jobs),
            results,
            thread,
            pending: 0,
        }
    }

    /// Queues the asynchronous part of a snapshot.
    pub(crate) fn submit(
        &mut self,
        target: SnapshotTarget,
        snapshot: SubtaskSnapshot,
        parallelism: u32,
        max_parallelism: u32,
    ) -> Result<(), String> {
        let id = target.checkpoint_id;
        let sent = self.jobs.as_ref().is_some_and(|j| {
            j.send(UploadJob {
                target,
                snapshot,
                parallelism,
                max_parallelism,
            })
            .is_ok()
        });
        if self.thread.is_none() || !sent {
            return Err(format!("checkpoint {id}: the upload thread is gone"));
        }
        self.pending += 1;
        Ok(())
    }

    /// Finished uploads, in submission order.
    pub(crate) fn finished(&mut self) -> Vec<UploadResult> {
        let out: Vec<_> = self.results.try_iter().collect();
        self.pending -= out.len().min(self.pending);
        out
    }

    /// Uploads not finished yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
