//! What every worker of a job shares: where checkpoints go, what was restored, and the job's
//! failure, if any.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use checkpoint::{CheckpointConfig, CheckpointStorage, CommitLog, CompletedCheckpoint};

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
    /// `timeout`, `retained`, `tolerable_failures`. Checkpoints are always full (canonical)
    /// here: `incremental` and `retention_on_shutdown` do not apply.
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

pub(crate) struct JobShared {
    pub(crate) config: JobConfig,
    pub(crate) restored: Option<(CheckpointStorage, CompletedCheckpoint)>,
    /// Checkpoint `base_id + e + 1` is the cut at the end of epoch `e`.
    pub(crate) base_id: u64,
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
#[derive(Clone)]
pub struct Job {
    pub(crate) shared: Arc<JobShared>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("job", &self.shared.config.storage.job())
            .field("restored", &self.restored_id())
            .field("base_id", &self.shared.base_id)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Checks the options and finds the checkpoint to restore.
    ///
    /// Every process reads the commit log here; the launcher must make sure no process of an
    /// earlier run of the job still commits while the new run starts (a stale committer that
    /// does is fenced as soon as the new run's committer claims the job, but a process that
    /// opened the job before that commit restores an older checkpoint than one that opened it
    /// after).
    pub fn open(config: JobConfig) -> Result<Job> {
        config.checkpoint.validate()?;
        state_api::validate_max_parallelism(config.max_parallelism)
            .map_err(|e| Error::Cluster(format!("max parallelism: {e}")))?;
        let storage = &config.storage;
        let latest = CompletedCheckpoint::latest(storage)?;
        let restored = match &config.restore {
            RestoreFrom::Nothing => None,
            RestoreFrom::LatestIfAny => latest.clone().map(|c| (storage.clone(), c)),
            RestoreFrom::Latest => match latest.clone() {
                Some(c) => Some((storage.clone(), c)),
                None => {
                    return Err(Error::Failed(format!(
                        "nothing to restore: job '{}' has no completed checkpoint",
                        storage.job()
                    )))
                }
            },
            RestoreFrom::Checkpoint {
                storage,
                checkpoint,
            } => Some((storage.clone(), (**checkpoint).clone())),
        };
        // New checkpoints get ids above every id of the job so far (completed or not).
        let highest_dir = storage.checkpoint_dir_ids()?.into_iter().max().unwrap_or(0);
        let highest_log = CommitLog::read(storage)?
            .iter()
            .filter_map(|e| e.checkpoint_id())
            .max()
            .unwrap_or(0);
        let base_id = highest_dir.max(highest_log);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let file_epoch = nanos ^ (u64::from(std::process::id()) << 32);
        if let Some((_, c)) = &restored {
            tracing::info!(checkpoint = %c.location(), "restoring the job from a checkpoint");
        }
        Ok(Job {
            shared: Arc::new(JobShared {
                config,
                restored,
                base_id,
                file_epoch,
                failure: Mutex::new(None),
                final_checkpoint: Mutex::new(None),
                completed: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The options.
    pub fn config(&self) -> &JobConfig {
        &self.shared.config
    }

    /// The id of the restored checkpoint, if any.
    pub fn restored_id(&self) -> Option<u64> {
        self.shared
            .restored
            .as_ref()
            .map(|(_, c)| c.metadata.checkpoint_id)
    }

    /// The restored checkpoint and the storage it lives in, if any.
    pub fn restored(&self) -> Option<(&CheckpointStorage, &CompletedCheckpoint)> {
        self.shared.restored.as_ref().map(|(s, c)| (s, c))
    }

    /// The checkpoint id of the cut at the end of epoch `epoch`.
    pub fn checkpoint_id(&self, epoch: u64) -> u64 {
        self.shared.base_id + epoch + 1
    }

    /// The epoch whose end checkpoint `checkpoint_id` is, if it is one of this run's.
    pub fn epoch_of(&self, checkpoint_id: u64) -> Option<u64> {
        checkpoint_id.checked_sub(self.shared.base_id + 1)
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
