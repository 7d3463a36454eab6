//! The error type of the state API and of the backends built on it.

use crate::descriptor::StateKind;
use crate::key_group::KeyGroupRange;

/// Result alias used throughout the state API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when declaring, accessing, snapshotting or restoring state.
///
/// Every variant names what failed and where (state name, key group, stream and byte offset) so
/// the message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A state name that cannot be used (empty, too long, path separators, control characters).
    #[error("invalid state name {name:?}: {reason}")]
    InvalidStateName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Parallelism or max parallelism out of bounds.
    #[error("invalid parallelism: {reason}")]
    InvalidParallelism {
        /// What is wrong.
        reason: String,
    },
    /// Keyed state accessed before `set_current_key`.
    #[error("no current key: call set_current_key before accessing keyed state '{state}'")]
    NoCurrentKey {
        /// The state that was accessed.
        state: String,
    },
    /// The current key hashes to a key group this backend does not own.
    #[error("key group {key_group} of the current key is outside this backend's range {range}")]
    KeyGroupOutOfRange {
        /// The key's key group.
        key_group: u32,
        /// The backend's range.
        range: KeyGroupRange,
    },
    /// A value could not be serialized.
    #[error("failed to serialize the {what} of state '{state}': {reason}")]
    Serialize {
        /// The state (or `"<key>"` for the key serializer).
        state: String,
        /// Which part (key, namespace, value, user key, ...).
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
    /// Bytes could not be deserialized.
    #[error("failed to deserialize the {what} of state '{state}': {reason}")]
    Deserialize {
        /// The state.
        state: String,
        /// Which part (key, namespace, value, user key, ...).
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
    /// A state registered (or restored) as one kind was requested as another.
    #[error("state '{state}' is a {existing} state but was requested as a {requested} state")]
    StateKindMismatch {
        /// The state.
        state: String,
        /// The kind it already has.
        existing: StateKind,
        /// The kind that was requested.
        requested: StateKind,
    },
    /// The same state name was registered twice with different Rust types.
    #[error("state '{state}' is already registered with different types ({reason})")]
    StateTypeMismatch {
        /// The state.
        state: String,
        /// What differs.
        reason: String,
    },
    /// A handle was used that this backend did not hand out.
    #[error("state handle '{state}' does not belong to this backend")]
    UnknownState {
        /// The state named by the handle.
        state: String,
    },
    /// The serializer of the new job cannot read what the snapshot holds.
    #[error("incompatible serializer for the {what} of state '{state}': {reason}")]
    IncompatibleSerializer {
        /// The state.
        state: String,
        /// Which part (key, namespace, value, user key, ...).
        what: &'static str,
        /// Why (the serializer's verdict).
        reason: String,
    },
    /// A snapshot stream is damaged or not a snapshot at all.
    #[error("corrupt snapshot '{stream}' at byte {offset}: {reason}")]
    Corrupt {
        /// The stream's name (file, object or a description given by the caller).
        stream: String,
        /// Byte offset in the stream where the damage was found.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A snapshot written by a newer (or unknown) format version.
    #[error(
        "snapshot '{stream}' has format version {found}; this build reads version {supported}"
    )]
    UnsupportedVersion {
        /// The stream's name.
        stream: String,
        /// Version found in the stream.
        found: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// Snapshots to restore disagree with each other or with the backend.
    #[error("cannot restore: {reason}")]
    RestoreMismatch {
        /// What does not match.
        reason: String,
    },
    /// An operation that the state's kind does not support (e.g. merging value state).
    #[error("state '{state}': {reason}")]
    Unsupported {
        /// The state.
        state: String,
        /// What is not supported.
        reason: String,
    },
    /// An invalid TTL configuration.
    #[error("invalid TTL configuration for state '{state}': {reason}")]
    InvalidTtl {
        /// The state.
        state: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a snapshot stream failed.
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
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
