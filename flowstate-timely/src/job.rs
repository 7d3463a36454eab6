//! What every worker of a job shares: where checkpoints go, what was restored, and the job's
//! failure, if any.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use checkpoint::{CheckpointConfig, CheckpointStorage, CommitLog, CompletedCheckpoint};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a job starts from.
#[derive(Clone, Debug, Default)]
pub enum RestoreFrom {
    /// Empty state (earlier checkpoints of the job are left alone; new ones get higher ids).
    Nothing,
    /// The latest completed checkpoint of the job, or empty state when there is none.
    #[default]
    LatestIfAny,
    /// The latest completed checkpoint of the job; an error when there is none.
    Latest,
    /// A given checkpoint or savepoint, read from `storage`.
    Checkpoint {
        /// Where it lives (a savepoint may live outside the job's checkpoint directory).
        storage: CheckpointStorage,
        /// The checkpoint.
        checkpoint: Box<CompletedCheckpoint>,
    },
}

/// The options of a job on timely dataflow.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// Where checkpoints are written (`<root>/<job>/chk-<n>/…`, the commit log).
    pub storage: CheckpointStorage,
    /// Checkpoint options: `interval` (how often every source closes an epoch; `None`: only at
    /// the end of the input), `max_concurrent` and `min_pause` (a source closes an epoch only
    /// when fewer of its checkpoints are pending, and that long after the last one ended),
    /// `timeout`, `retained`, `tolerable_failures`, and `incremental`: deltas on the last
    /// checkpoint a worker heard completed (heap) or backend-native files referenced across
    /// checkpoints (mmap), in `shared/`; shared files no retained checkpoint uses are deleted
    /// when the run ends and when the next run starts. `retention_on_shutdown` does not
    /// apply (checkpoints are kept).
    pub checkpoint: CheckpointConfig,
    /// Number of key groups of every keyed operator (cannot change across restores).
    pub max_parallelism: u32,
    /// Where to start from.
    pub restore: RestoreFrom,
}

impl JobConfig {
    /// A job writing checkpoints to `storage` with default options (restoring the latest
    /// checkpoint if there is one, max parallelism 128, a checkpoint per second).
    pub fn new(storage: CheckpointStorage) -> Self {
        JobConfig {
            storage,
            checkpoint: CheckpointConfig {
                interval: Some(Duration::from_secs(1)),
                ..CheckpointConfig::default()
            },
            max_parallelism: 128,
            restore: RestoreFrom::LatestIfAny,
        }
    }
}

/// How a run starts, as worker 0 decided it and told every worker: the same for every process
/// of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunStart {
    /// The epoch of the commit-log claim worker 0 made for this run.
    pub(crate) claim_epoch: u64,
    /// Checkpoint `base_id + e + 1` is the cut at the end of epoch `e`.
    pub(crate) base_id: u64,
    /// What to restore, or why the run cannot start.
    pub(crate) restore: std::result::Result<RestorePlan, String>,
}

/// What every process restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RestorePlan {
    /// Empty state.
    Nothing,
    /// This checkpoint of the job's own storage.
    Checkpoint(u64),
    /// The checkpoint or savepoint given in [`RestoreFrom::Checkpoint`] (every process has it).
    Given,
}

/// What the run restored and where its checkpoint ids start, once the workers agreed.
pub(crate) struct Started {
    pub(crate) restored: Option<(CheckpointStorage, CompletedCheckpoint)>,
    pub(crate) base_id: u64,
    pub(crate) claim_epoch: u64,
}

pub(crate) struct JobShared {
    pub(crate) config: JobConfig,
    /// Set by the first worker of the process that learns the run's start.
    pub(crate) started: OnceLock<Started>,
    settling: Mutex<()>,
    /// Worker 0's claim on the commit log, until its committer takes it.
    pub(crate) claim: Mutex<Option<CommitLog>>,
    /// Unique to this run of this process: part of every file name it writes, so that two runs
    /// never write the same file.
    pub(crate) file_epoch: u64,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) final_checkpoint: Mutex<Option<u64>>,
    pub(crate) completed: Mutex<Vec<u64>>,
}

/// What the workers of one process share: the configuration, the restored checkpoint, and the
/// job's failure. Made once per process with [`Job::open`], before the workers start; every
/// process of the job must open the same job with the same options.
///
/// Where a run starts is decided once for all its processes: when the workers start
/// ([`crate::cluster::run`]), worker 0 claims the job's commit log (a create-only entry that
/// fences every committer of an earlier run, which can then complete no checkpoint), reads the
/// latest completed checkpoint *after* that claim, and sends its id and the first new
/// checkpoint id to every worker through the dataflow. So every process restores the same
/// checkpoint, even while a stale run of the job is still going.
#[derive(Clone)]
pub struct Job {
    pub(crate) shared: Arc<JobShared>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("job", &self.shared.config.storage.job())
            .field("restored", &self.restored_id())
            .field("base_id", &self.shared.started.get().map(|s| s.base_id))
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Checks the options. Nothing is read yet: the checkpoint to restore is chosen when the
    /// workers start (see [`Job`]).
    pub fn open(config: JobConfig) -> Result<Job> {
        config.checkpoint.validate()?;
        state_api::validate_max_parallelism(config.max_parallelism)
            .map_err(|e| Error::Cluster(format!("max parallelism: {e}")))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let file_epoch = nanos ^ (u64::from(std::process::id()) << 32);
        Ok(Job {
            shared: Arc::new(JobShared {
                config,
                started: OnceLock::new(),
                settling: Mutex::new(()),
                claim: Mutex::new(None),
                file_epoch,
                failure: Mutex::new(None),
                final_checkpoint: Mutex::new(None),
                completed: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Worker 0's decision: claims the commit log (fencing every earlier run's committer), then
    /// picks the checkpoint to restore and the first new checkpoint id. The claim is kept for
    /// the committer.
    pub(crate) fn decide(&self) -> RunStart {
        match self.try_decide() {
            Ok(s) => s,
            Err(e) => RunStart {
                claim_epoch: 0,
                base_id: 0,
                restore: Err(e.to_string()),
            },
        }
    }

    fn try_decide(&self) -> Result<RunStart> {
        let config = &self.shared.config;
        let storage = &config.storage;
        let log = CommitLog::claim(storage)?;
        tracing::info!(epoch = log.epoch(), "claimed the job for this run");
        let claim_epoch = log.epoch();
        if let Ok(mut c) = self.shared.claim.lock() {
            *c = Some(log);
        }
        // After the claim no earlier run can complete a checkpoint: what is latest now stays
        // latest until this run commits.
        let restore = match &config.restore {
            RestoreFrom::Nothing => RestorePlan::Nothing,
            RestoreFrom::Checkpoint { .. } => RestorePlan::Given,
            RestoreFrom::LatestIfAny | RestoreFrom::Latest => {
                match CompletedCheckpoint::latest(storage)? {
                    Some(c) => RestorePlan::Checkpoint(c.metadata.checkpoint_id),
                    None if matches!(config.restore, RestoreFrom::Latest) => {
                        return Err(Error::Failed(format!(
                            "nothing to restore: job '{}' has no completed checkpoint",
                            storage.job()
                        )))
                    }
                    None => RestorePlan::Nothing,
                }
            }
        };
        // New checkpoints get ids above every id of the job so far (completed or not).
        let highest_dir = storage.checkpoint_dir_ids()?.into_iter().max().unwrap_or(0);
        let highest_log = CommitLog::read(storage)?
            .iter()
            .filter_map(|e| e.checkpoint_id())
            .max()
            .unwrap_or(0);
        Ok(RunStart {
            claim_epoch,
            base_id: highest_dir.max(highest_log),
            restore: Ok(restore),
        })
    }

    /// Takes what worker 0 decided: the first worker of the process to get here reads the
    /// checkpoint's metadata, the others find it done.
    pub(crate) fn settle(&self, start: &RunStart) -> Result<()> {
        let _one_at_a_time = self
            .shared
            .settling
            .lock()
            .map_err(|_| Error::Failed("a worker failed while starting".into()))?;
        if self.shared.started.get().is_some() {
            return Ok(());
        }
        let config = &self.shared.config;
        let restored = match &start.restore {
            Err(reason) => return Err(Error::Failed(reason.clone())),
            Ok(RestorePlan::Nothing) => None,
            Ok(RestorePlan::Checkpoint(id)) => {
                let storage = &config.storage;
                let c = CompletedCheckpoint::load(storage, &storage.metadata_path(*id))?;
                Some((storage.clone(), c))
            }
            Ok(RestorePlan::Given) => match &config.restore {
                RestoreFrom::Checkpoint {
                    storage,
                    checkpoint,
                } => Some((storage.clone(), (**checkpoint).clone())),
                _ => {
                    return Err(Error::Failed(
                        "worker 0 restores a given checkpoint, this process was given none: \
                         start every process with the same options"
                            .into(),
                    ))
                }
            },
        };
        if let Some((_, c)) = &restored {
            tracing::info!(checkpoint = %c.location(), "restoring the job from a checkpoint");
        }
        let _ = self.shared.started.set(Started {
            restored,
            base_id: start.base_id,
            claim_epoch: start.claim_epoch,
        });
        Ok(())
    }

    /// The options.
    pub fn config(&self) -> &JobConfig {
        &self.shared.config
    }

    /// The id of the restored checkpoint, if any (known once the workers started: inside
    /// the dataflow builder of [`crate::cluster::run`] and after it).
    pub fn restored_id(&self) -> Option<u64> {
        self.restored().map(|(_, c)| c.metadata.checkpoint_id)
    }

    /// The restored checkpoint and the storage it lives in, if any (known once the workers
    /// started).
    pub fn restored(&self) -> Option<(&CheckpointStorage, &CompletedCheckpoint)> {
        self.shared
            .started
            .get()
            .and_then(|s| s.restored.as_ref())
            .map(|(s, c)| (s, c))
    }

    /// The epoch of this run's claim on the commit log (the run's id among the job's runs),
    /// once the workers started.
    pub fn run_epoch(&self) -> Option<u64> {
        self.shared.started.get().map(|s| s.claim_epoch)
    }

    fn base_id(&self) -> u64 {
        self.shared.started.get().map_or(0, |s| s.base_id)
    }

    /// The checkpoint id of the cut at the end of epoch `epoch`.
    pub fn checkpoint_id(&self, epoch: u64) -> u64 {
        self.base_id() + epoch + 1
    }

    /// The epoch whose end checkpoint `checkpoint_id` is, if it is one of this run's.
    pub fn epoch_of(&self, checkpoint_id: u64) -> Option<u64> {
        checkpoint_id.checked_sub(self.base_id() + 1)
    }

    /// The last checkpoint of the run (committed once every source had read all its input),
    /// once worker 0 of this process committed it.
    pub fn final_checkpoint(&self) -> Option<u64> {
        self.shared.final_checkpoint.lock().ok().and_then(|g| *g)
    }

    /// Fails the job: every worker of this process stops at its next step.
    pub fn fail(&self, reason: String) {
        tracing::error!(%reason, "the job failed");
        if let Ok(mut f) = self.shared.failure.lock() {
            if f.is_none() {
                *f = Some(reason);
            }
        }
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The checkpoints this process's committer (worker 0, in process 0) completed, in order.
    pub fn completed(&self) -> Vec<u64> {
        self.shared
            .completed
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    pub(crate) fn push_completed(&self, id: u64) {
        if let Ok(mut c) = self.shared.completed.lock() {
            c.push(id);
        }
    }

    pub(crate) fn set_final(&self, id: u64) {
        if let Ok(mut f) = self.shared.final_checkpoint.lock() {
            *f = Some(id);
        }
    }
}

/// Milliseconds since the Unix epoch by the wall clock (processing time, metadata timestamps).
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
