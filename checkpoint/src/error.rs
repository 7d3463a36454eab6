//! The error type of the checkpoint crate.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, committing, reading or restoring a checkpoint.
///
/// Every variant names what failed and where (file, operator, state, checkpoint), so the
/// message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request to the object store failed.
    #[error(
        "storage error while {context} '{path}': {}",
        storage_s3::one_line(source)
    )]
    Storage {
        /// What was being done (`reading`, `writing`, `listing`, `deleting`).
        context: &'static str,
        /// The object or prefix.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// An S3 request found no credentials: object_store fell back to the cloud's instance
    /// metadata service (169.254.169.254), which refused; its own error does not say that
    /// credentials are what is missing.
    #[error(
        "no S3 credentials while {context} '{path}': set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (in flowstate's config: s3.access-key-id, s3.secret-access-key); \
         the last fallback, the instance metadata service, answered: {}",
        storage_s3::one_line(source)
    )]
    MissingCredentials {
        /// What was being done.
        context: &'static str,
        /// The object or prefix.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A transfer through `storage-s3` (upload, download, create-only put) failed.
    #[error("storage error while {context} '{path}': {source}")]
    Transfer {
        /// What was being done (`uploading`, `downloading`, `writing`).
        context: &'static str,
        /// The object.
        path: String,
        /// The storage layer's error (boxed: it is large).
        #[source]
        source: Box<storage_s3::Error>,
    },
    /// A file the checkpoint refers to does not exist.
    #[error("missing file '{file}' (referenced by {referenced_by})")]
    MissingFile {
        /// The file that is missing.
        file: String,
        /// What refers to it (a metadata file, or "restore").
        referenced_by: String,
    },
    /// A file is damaged or is not what it claims to be.
    #[error("corrupt file '{file}' at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: String,
        /// Byte offset where the damage was found.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A file is shorter than what refers to it says.
    #[error("truncated file '{file}': expected {expected} bytes, found {found}")]
    Truncated {
        /// The file.
        file: String,
        /// Bytes expected (or the end of the range that was read).
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// A checksum did not match the bytes read.
    #[error("checksum mismatch in '{file}': expected {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// The file.
        file: String,
        /// The recorded checksum.
        expected: u32,
        /// The checksum of the bytes read.
        actual: u32,
    },
    /// A metadata file written by an unknown format version.
    #[error("'{file}' has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The file.
        file: String,
        /// Version found.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The state of an operator or subtask could not be restored or snapshotted.
    #[error("state of operator '{operator}' (subtask {subtask}): {source}")]
    State {
        /// The operator id.
        operator: String,
        /// The subtask index.
        subtask: u32,
        /// What the state API reported (names the state, stream and key group).
        #[source]
        source: state_api::Error,
    },
    /// A restored state's serializer cannot read what the checkpoint holds.
    #[error("incompatible serializer for the {what} of state '{state}' of operator '{operator}': {reason}")]
    IncompatibleSerializer {
        /// The operator id.
        operator: String,
        /// The state.
        state: String,
        /// Which serializer (key, value, namespace, ...).
        what: String,
        /// Why.
        reason: String,
    },
    /// An operator or state that the checkpoint (or the savepoint being written) does not
    /// have.
    #[error("no {what} '{name}' in {checkpoint} (there are: {available})")]
    UnknownState {
        /// What was looked for (`operator`, `state`).
        what: &'static str,
        /// Its name.
        name: String,
        /// Where it was looked for.
        checkpoint: String,
        /// The names there are.
        available: String,
    },
    /// A state was read or written as another kind than it has.
    #[error("state '{state}' of operator '{operator}' is {found} state, not {expected}")]
    WrongStateKind {
        /// The operator id.
        operator: String,
        /// The state.
        state: String,
        /// Its recorded kind.
        found: String,
        /// The kind asked for.
        expected: String,
    },
    /// Stored bytes could not be decoded with the serializer given.
    #[error(
        "cannot decode the {what} of an entry of state '{state}' of operator '{operator}' \
         (key group {key_group}): {reason}"
    )]
    Decode {
        /// The operator id.
        operator: String,
        /// The state.
        state: String,
        /// What was decoded (key, namespace, value, ...).
        what: &'static str,
        /// The entry's key group.
        key_group: u32,
        /// The serializer's error.
        reason: String,
    },
    /// The checkpoint holds state of an operator the job does not have.
    #[error(
        "checkpoint '{checkpoint}' holds state of operator '{operator}', which the job does not \
         have; set allow_non_restored_state to skip it"
    )]
    UnknownOperator {
        /// The operator id found in the checkpoint.
        operator: String,
        /// The metadata file.
        checkpoint: String,
    },
    /// The checkpoint and the job disagree (max parallelism, key groups, ...).
    #[error("cannot restore operator '{operator}' from '{checkpoint}': {reason}")]
    RestoreMismatch {
        /// The operator id.
        operator: String,
        /// The metadata file.
        checkpoint: String,
        /// What does not match.
        reason: String,
    },
    /// Another coordinator took over the job: this one must stop.
    #[error(
        "fenced: another coordinator took over job '{job}' in this checkpoint directory (epoch \
         {newer_epoch}, after this one's {epoch}), so this one stopped; checkpoint \
         {checkpoint_id} was not committed"
    )]
    Fenced {
        /// The job.
        job: String,
        /// This coordinator's epoch.
        epoch: u64,
        /// The epoch that fenced it.
        newer_epoch: u64,
        /// The checkpoint whose commit failed.
        checkpoint_id: u64,
    },
    /// A name (job id, operator id) that cannot be used in a path.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Invalid configuration or arguments.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint was aborted (declined, expired, subsumed, fenced or shut down).
    #[error("checkpoint {checkpoint_id} failed: {reason}")]
    CheckpointFailed {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Why.
        reason: String,
    },
    /// There is no completed checkpoint to restore.
    #[error("job '{job}' has no completed checkpoint")]
    NoCheckpoint {
        /// The job.
        job: String,
    },
    /// The coordinator has stopped (shut down, fenced, or failed the job).
    #[error("the checkpoint coordinator has stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// Local I/O failed (runtime start, worker threads).
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps a state API error, lifting serializer incompatibilities into
    /// [`Error::IncompatibleSerializer`].
    pub fn state(operator: &str, subtask: u32, source: state_api::Error) -> Self {
        match source {
            state_api::Error::IncompatibleSerializer {
                state,
                what,
                reason,
            } => Error::IncompatibleSerializer {
                operator: operator.to_string(),
                state,
                what: what.to_string(),
                reason,
            },
            source => Error::State {
                operator: operator.to_string(),
                subtask,
                source,
            },
        }
    }

    /// True for [`Error::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }

    /// A store error on `path` (as [`crate::CheckpointStorage::location`] shows it).
    /// A `storage-s3` error as this crate reports it: a missing object, a size or checksum
    /// mismatch are the same errors as when this crate finds them itself.
    pub(crate) fn transfer(context: &'static str, path: &str, source: storage_s3::Error) -> Self {
        match source {
            storage_s3::Error::NotFound { .. } => Error::MissingFile {
                file: path.to_string(),
                referenced_by: context.to_string(),
            },
            storage_s3::Error::ChecksumMismatch {
                expected, actual, ..
            } if expected.len == actual.len => Error::ChecksumMismatch {
                file: path.to_string(),
                expected: expected.crc32c,
                actual: actual.crc32c,
            },
            storage_s3::Error::ChecksumMismatch {
                expected, actual, ..
            } => Error::Truncated {
                file: path.to_string(),
                expected: expected.len,
                found: actual.len,
            },
            storage_s3::Error::SizeMismatch {
                expected, actual, ..
            } => Error::Truncated {
                file: path.to_string(),
                expected,
                found: actual,
            },
            source => Error::Transfer {
                context,
                path: path.to_string(),
                source: Box::new(source),
            },
        }
    }

    pub(crate) fn storage(context: &'static str, path: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Error::MissingFile {
                file: path.to_string(),
                referenced_by: context.to_string(),
            },
            // object_store tries the instance metadata service last; a refusal there means
            // no credentials were configured anywhere.
            source if source.to_string().contains("169.254.169.254") => Error::MissingCredentials {
                context,
                path: path.to_string(),
                source,
            },
            source => Error::Storage {
                context,
                path: path.to_string(),
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_of_the_instance_metadata_service_names_missing_credentials() {
        let imds = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://169.254.169.254/latest/api/token in 6ms - \
                     Server returned non-2xx status code: 403 Forbidden"
                .into(),
        };
        let e = Error::storage("listing", "s3://bucket/ck/job/_commits", imds);
        assert!(matches!(e, Error::MissingCredentials { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("no S3 credentials while listing 's3://bucket/ck/job/_commits'")
                && text.contains("AWS_ACCESS_KEY_ID")
                && text.contains("s3.access-key-id"),
            "{text}"
        );
        let other = object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        };
        assert!(matches!(
            Error::storage("listing", "p", other),
            Error::Storage { .. }
        ));
    }
}
