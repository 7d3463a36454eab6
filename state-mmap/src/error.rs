//! The error type of the mmap engine and how it maps onto [`state_api::Error`].

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the storage engine. Each variant names the file (and the byte
/// offset where it applies).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("I/O error while {context} ({path}): {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's bytes are damaged (checksum mismatch, impossible length, bad magic).
    #[error("corrupt file {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Byte offset of the damage.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A file written by an unknown format version.
    #[error("file {file} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// An invalid option or argument.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The background worker thread stopped (it panicked or failed earlier).
    #[error("the background flush or compaction thread failed: {reason}")]
    Worker {
        /// Why.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

impl From<Error> for state_api::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io {
                context,
                path,
                source,
            } => state_api::Error::Io {
                context: format!("{context} ({})", path.display()),
                source,
            },
            Error::Corrupt {
                file,
                offset,
                reason,
            } => state_api::Error::Corrupt {
                stream: file.display().to_string(),
                offset,
                reason,
            },
            Error::UnsupportedVersion {
                file,
                found,
                supported,
            } => state_api::Error::UnsupportedVersion {
                stream: file.display().to_string(),
                found,
                supported,
            },
            other => state_api::Error::Io {
                context: "the mmap state backend".into(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }
}
