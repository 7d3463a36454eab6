//! The crate's one error type.

/// What went wrong in a job on timely dataflow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint layer failed (storage, format, restore, fencing).
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// Keyed or operator state failed.
    #[error("{operator} (worker {worker}): {source}")]
    State {
        /// The operator.
        operator: String,
        /// The worker.
        worker: usize,
        /// The state error.
        source: state_api::Error,
    },
    /// A source could not read a split.
    #[error("source '{operator}' (worker {worker}) split {split}: {reason}")]
    Source {
        /// The operator.
        operator: String,
        /// The worker.
        worker: usize,
        /// The split.
        split: u32,
        /// What failed.
        reason: String,
    },
    /// The cluster configuration is wrong (worker counts, process index, hostfile).
    #[error("invalid cluster configuration: {0}")]
    Cluster(String),
    /// A process of the job stopped (killed, crashed or unreachable), so this one stopped too.
    #[error("a peer process of the job is gone ({0}); this process stopped too")]
    PeerFailed(String),
    /// The job failed: too many failed checkpoints, a fenced committer, or an operator error.
    #[error("job failed: {0}")]
    Failed(String),
    /// The user's function failed.
    #[error("{operator} (worker {worker}): {reason}")]
    User {
        /// The operator.
        operator: String,
        /// The worker.
        worker: usize,
        /// What the function reported.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
