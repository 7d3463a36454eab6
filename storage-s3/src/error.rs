//! The crate's one error type.

use std::path::PathBuf;

use crate::checksum::Checksum;

/// A specialised `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in `storage-s3`.
///
/// Every variant names the store (its URL, with any credentials removed) and the object path or
/// local file involved. Credentials never appear in an error: URLs are redacted before they are
/// stored here, and secrets are never part of a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage URL could not be parsed or has a shape this crate does not accept.
    #[error("invalid storage URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL, with credentials removed.
        url: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The URL needs a cargo feature of `storage-s3` that this build does not enable.
    #[error("storage URL {url:?} needs the `{feature}` feature of storage-s3, which this build does not enable")]
    FeatureDisabled {
        /// The URL, with credentials removed.
        url: String,
        /// The cargo feature to enable.
        feature: &'static str,
    },

    /// A configuration value is invalid.
    #[error("invalid storage configuration for {url}: `{field}` {reason}")]
    InvalidConfig {
        /// The URL of the store being configured, with credentials removed.
        url: String,
        /// The configuration field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A path (or a name used as a path segment) was rejected by validation.
    #[error("invalid storage path {path:?}: {reason}")]
    InvalidPath {
        /// The rejected path or segment, as given.
        path: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A path lies outside the root prefix the store was configured with.
    #[error("{url}: path {path:?} is outside the storage root {root:?}")]
    OutsideRoot {
        /// The store URL, with credentials removed.
        url: String,
        /// The offending path.
        path: String,
        /// The configured root prefix.
        root: String,
    },

    /// A create-only put found an object already at the path.
    #[error("{url}: object {path:?} already exists")]
    AlreadyExists {
        /// The store URL, with credentials removed.
        url: String,
        /// The object path.
        path: String,
    },

    /// The object does not exist.
    #[error("{url}: object {path:?} not found")]
    NotFound {
        /// The store URL, with credentials removed.
        url: String,
        /// The object path.
        path: String,
    },

    /// What was read back does not match what was written.
    #[error("{url}: checksum mismatch for {path:?}: expected {expected}, read {actual}")]
    ChecksumMismatch {
        /// The store URL, with credentials removed.
        url: String,
        /// The object path.
        path: String,
        /// The checksum recorded when the object was written.
        expected: Checksum,
        /// The checksum of the bytes actually read.
        actual: Checksum,
    },

    /// An object's size is not what was written or announced.
    #[error("{url}: object {path:?} has {actual} bytes where {expected} were expected")]
    SizeMismatch {
        /// The store URL, with credentials removed.
        url: String,
        /// The object path.
        path: String,
        /// The expected size.
        expected: u64,
        /// The size found.
        actual: u64,
    },

    /// An object is larger than the caller's limit for an in-memory read.
    #[error("{url}: object {path:?} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// The store URL, with credentials removed.
        url: String,
        /// The object path.
        path: String,
        /// The object's size.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },

    /// An operation on the object store failed (after object_store's own retries, for HTTP stores).
    #[error("{url}: {operation} {path:?} failed: {}", one_line(source))]
    Store {
        /// The store URL, with credentials removed.
        url: String,
        /// What was being done ("put", "multipart upload", "get", "list", "delete", ...).
        operation: &'static str,
        /// The object path or prefix.
        path: String,
        /// The error object_store returned.
        #[source]
        source: Box<object_store::Error>,
    },

    /// A multipart upload failed; the upload was aborted, so no object was created from it.
    ///
    /// `abort_error` is set when aborting failed too (for example because the server is gone);
    /// the parts already uploaded then stay on the server until its incomplete-upload cleanup
    /// removes them, but they are never visible as an object.
    #[error(
        "{url}: multipart upload of {file:?} to {path:?} failed{}: {}",
        abort_error.as_deref().map(|e| format!(" (and aborting it failed: {})", one_line(&e))).unwrap_or_default(),
        one_line(source)
    )]
    UploadFailed {
        /// The store URL, with credentials removed.
        url: String,
        /// The destination object path.
        path: String,
        /// The local file being uploaded.
        file: PathBuf,
        /// The error that stopped the upload.
        #[source]
        source: Box<object_store::Error>,
        /// The error returned when aborting the upload, if aborting failed.
        abort_error: Option<String>,
    },

    /// Building the object store client failed.
    #[error("{url}: building the object store failed: {}", one_line(source))]
    Build {
        /// The store URL, with credentials removed.
        url: String,
        /// The error object_store returned.
        #[source]
        source: Box<object_store::Error>,
    },

    /// Reading or writing a local file failed.
    #[error("{operation} local file {file:?} failed: {source}")]
    Io {
        /// What was being done ("open", "read", "write", "rename", ...).
        operation: &'static str,
        /// The local file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A background task of a transfer panicked or was cancelled.
    #[error("{url}: {operation} {path:?}: background task failed: {reason}")]
    Task {
        /// The store URL, with credentials removed.
        url: String,
        /// What was being done.
        operation: &'static str,
        /// The object path.
        path: String,
        /// The join error.
        reason: String,
    },
}

/// A coarse classification of an [`Error`] that tells the caller what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input (URL, config, path) is wrong: fix it, retrying will not help.
    Invalid,
    /// The object does not exist.
    NotFound,
    /// A create-only write lost: the object exists already.
    AlreadyExists,
    /// Data read back is not what was written.
    Corrupt,
    /// Credentials are missing, wrong, or lack permission.
    Denied,
    /// The store or the local disk failed (network, server, I/O); retrying later may help.
    Unavailable,
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidUrl { .. }
            | Error::FeatureDisabled { .. }
            | Error::InvalidConfig { .. }
            | Error::InvalidPath { .. }
            | Error::OutsideRoot { .. }
            | Error::TooLarge { .. } => ErrorKind::Invalid,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::ChecksumMismatch { .. } | Error::SizeMismatch { .. } => ErrorKind::Corrupt,
            Error::Store { source, .. }
            | Error::UploadFailed { source, .. }
            | Error::Build { source, .. } => store_error_kind(source.as_ref()),
            Error::Io { .. } | Error::Task { .. } => ErrorKind::Unavailable,
        }
    }
}

fn store_error_kind(error: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match error {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } => ErrorKind::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Denied,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::Invalid,
        _ => ErrorKind::Unavailable,
    }
}

/// Wraps an object_store error of `operation` on `path`, turning `NotFound`/`AlreadyExists` into
/// this crate's variants of the same name.
pub(crate) fn store_error(
    url: &str,
    operation: &'static str,
    path: &object_store::path::Path,
    source: object_store::Error,
) -> Error {
    match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            url: url.to_owned(),
            path: path.to_string(),
        },
        object_store::Error::AlreadyExists { .. } => Error::AlreadyExists {
            url: url.to_owned(),
            path: path.to_string(),
        },
        source => Error::Store {
            url: url.to_owned(),
            operation,
            path: path.to_string(),
            source: Box::new(source),
        },
    }
}

pub(crate) fn io_error(
    operation: &'static str,
    file: &std::path::Path,
    source: std::io::Error,
) -> Error {
    Error::Io {
        operation,
        file: file.to_owned(),
        source,
    }
}

/// An error's message on one line, for people: an S3 error document (the XML body a server
/// answers with) becomes its `Code: Message` after the HTTP status that precedes it, XML
/// entities are decoded, and line breaks collapse into spaces. Messages without such a
/// document are only collapsed onto one line.
///
/// ```
/// let e = "Error performing GET http://127.0.0.1:8333/b/k in 2ms - Server returned non-2xx \
///          status code: 404 Not Found: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\
///          <Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message>\
///          <Resource>/b/k</Resource></Error>";
/// assert_eq!(
///     storage_s3::one_line(&e),
///     "Error performing GET http://127.0.0.1:8333/b/k in 2ms - Server returned non-2xx \
///      status code: 404 Not Found: NoSuchBucket: The specified bucket does not exist"
/// );
/// ```
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let xml = text.find("<?xml").or_else(|| text.find("<Error>"));
    let out = match xml {
        None => text.clone(),
        Some(at) => {
            let doc = &text[at..];
            let tag = |name: &str| -> Option<String> {
                let open = format!("<{name}>");
                let close = format!("</{name}>");
                let start = doc.find(&open)? + open.len();
                let len = doc[start..].find(&close)?;
                Some(unescape(doc[start..start + len].trim()))
            };
            let head = text[..at].trim_end().trim_end_matches(':').trim_end();
            let what = match (tag("Code"), tag("Message")) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => "an error document without a code".to_string(),
            };
            // What follows the document (object_store may add retry details).
            let rest = doc
                .find("</Error>")
                .map(|i| doc[i + "</Error>".len()..].trim())
                .unwrap_or("");
            let rest = rest.trim_start_matches([')', ',']).trim();
            let what = if rest.is_empty() {
                what
            } else {
                format!("{what} {rest}")
            };
            if head.is_empty() {
                what
            } else {
                format!("{head}: {what}")
            }
        }
    };
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod one_line_tests {
    use super::*;

    #[test]
    fn an_s3_error_document_becomes_status_code_and_message() {
        let body = "Error performing PUT http://127.0.0.1:8333/bucket/job/chk-1/_metadata in \
                    3.1ms - Server returned non-2xx status code: 403 Forbidden: <?xml \
                    version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\n  <Code>AccessDenied</Code>\n  \
                    <Message>Access Denied &amp; logged</Message>\n  \
                    <RequestId>1234</RequestId>\n</Error>";
        let e = Error::Store {
            url: "s3://bucket".into(),
            operation: "put",
            path: "job/chk-1/_metadata".into(),
            source: Box::new(object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::other(body)),
            }),
        };
        let msg = e.to_string();
        assert!(!msg.contains('<') && !msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("403 Forbidden: AccessDenied: Access Denied & logged"),
            "{msg}"
        );
        assert!(
            msg.starts_with("s3://bucket: put \"job/chk-1/_metadata\" failed: "),
            "{msg}"
        );
        // Without a document, only the line breaks go.
        assert_eq!(one_line(&"a\n  b"), "a b");
        assert_eq!(one_line(&"<Error><Code>X</Code></Error>"), "X");
    }
}
