//! Validation of object paths built from job, state and file names.
//!
//! Names that end up in object paths come from users (job names, state names). They are checked
//! here so that no name can make a path escape the configured root prefix or mean something
//! different on another store:
//!
//! - a segment is never empty, `.` or `..`;
//! - a relative path never starts with `/` (no absolute paths) and has no empty segments;
//! - no control characters (ASCII or Unicode), no `\`, and none of the characters object_store
//!   would percent-encode (`%`, `#`, `?`, `*`, `<`, `>`, `|`, `"`, `{`, `}`, `[`, `]`, `^`, `` ` ``,
//!   `~`), so the stored key is exactly the name that was validated;
//! - a segment is at most [`MAX_SEGMENT_BYTES`] bytes, a whole path at most [`MAX_PATH_BYTES`].

use object_store::path::Path;

use crate::error::{Error, Result};

/// The longest path segment accepted, in bytes (the usual file-name limit of local filesystems).
pub const MAX_SEGMENT_BYTES: usize = 255;

/// The longest relative path accepted, in bytes (S3 keys are limited to 1024 bytes, and the root
/// prefix needs room too).
pub const MAX_PATH_BYTES: usize = 768;

const FORBIDDEN: &[char] = &[
    '/', '\\', '%', '#', '?', '*', '<', '>', '|', '"', '{', '}', '[', ']', '^', '`', '~',
];

/// Checks one path segment, e.g. a job or state name used as a directory name.
///
/// ```
/// use storage_s3::validate_segment;
/// assert!(validate_segment("orders-job").is_ok());
/// assert!(validate_segment("..").is_err());
/// assert!(validate_segment("a/b").is_err());
/// assert!(validate_segment("tab\there").is_err());
/// ```
pub fn validate_segment(segment: &str) -> Result<()> {
    let invalid = |reason: String| Error::InvalidPath {
        path: segment.to_owned(),
        reason,
    };
    if segment.is_empty() {
        return Err(invalid("empty path segment".into()));
    }
    if segment == "." || segment == ".." {
        return Err(invalid(format!(
            "`{segment}` is not allowed as a path segment"
        )));
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(invalid(format!(
            "segment is {} bytes, more than the limit of {MAX_SEGMENT_BYTES}",
            segment.len()
        )));
    }
    if let Some(c) = segment.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "control character U+{:04X} is not allowed",
            u32::from(c)
        )));
    }
    if let Some(c) = segment.chars().find(|c| FORBIDDEN.contains(c)) {
        return Err(invalid(format!(
            "character `{c}` is not allowed in a segment"
        )));
    }
    Ok(())
}

/// Parses and checks a relative path such as `"job-1/chk-7/_metadata"` and returns it as an
/// object_store [`Path`].
///
/// Rules: no empty path, no leading `/` (absolute path), no empty, `.` or `..` segment, no
/// control characters, no `\` and none of the characters object_store would percent-encode
/// (`%`, `#`, `?`, `*`, `<`, `>`, `|`, `"`, `{`, `}`, `[`, `]`, `^`, `` ` ``, `~`); at most
/// [`MAX_SEGMENT_BYTES`] per segment and [`MAX_PATH_BYTES`] in all.
///
/// ```
/// use storage_s3::relative_path;
/// assert_eq!(relative_path("job/chk-1/_metadata").unwrap().as_ref(), "job/chk-1/_metadata");
/// assert!(relative_path("/etc/passwd").is_err());
/// assert!(relative_path("job/../../escape").is_err());
/// assert!(relative_path("job//x").is_err());
/// ```
pub fn relative_path(path: &str) -> Result<Path> {
    let invalid = |reason: String| Error::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(invalid("empty path".into()));
    }
    if path.starts_with('/') {
        return Err(invalid("absolute paths are not allowed".into()));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "path is {} bytes, more than the limit of {MAX_PATH_BYTES}",
            path.len()
        )));
    }
    for segment in path.split('/') {
        validate_segment(segment).map_err(|e| match e {
            Error::InvalidPath { reason, .. } => invalid(format!("segment {segment:?}: {reason}")),
            other => other,
        })?;
    }
    // Every segment is valid, so `Path::parse` cannot fail and does not percent-encode anything.
    Path::parse(path).map_err(|e| invalid(e.to_string()))
}

/// Joins validated `segments` onto `base`.
///
/// ```
/// use object_store::path::Path;
/// use storage_s3::join_segments;
/// let p = join_segments(&Path::from("root"), &["job", "chk-1"]).unwrap();
/// assert_eq!(p.as_ref(), "root/job/chk-1");
/// assert!(join_segments(&Path::from("root"), &["job", ".."]).is_err());
/// ```
pub fn join_segments(base: &Path, segments: &[&str]) -> Result<Path> {
    let mut out = base.clone();
    for segment in segments {
        validate_segment(segment)?;
        out = out.join(*segment);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "job",
            "chk-12",
            "_metadata",
            "shared",
            "state.v1",
            "Zählerstand",
            "a b",
            "a=b,c;d@e+f",
            "..a",
            "a..",
        ] {
            validate_segment(ok).unwrap();
        }
        relative_path("a/b/c").unwrap();
        relative_path(&"x".repeat(MAX_SEGMENT_BYTES)).unwrap();
    }

    #[test]
    fn rejects_escapes_and_odd_characters() {
        for bad in [
            "", ".", "..", "a/b", "a\\b", "a\0b", "a\nb", "a\rb", "\u{7f}", "\u{85}", "%2e%2e",
            "a#b", "a?b", "a*b", "~",
        ] {
            assert!(
                matches!(validate_segment(bad), Err(Error::InvalidPath { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(validate_segment(&"x".repeat(MAX_SEGMENT_BYTES + 1)).is_err());
        for bad in [
            "",
            "/",
            "/abs",
            "a/",
            "a//b",
            "../a",
            "a/../../b",
            "a/./b",
            "a/b\u{1b}[31m",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?} accepted");
        }
        let long = ["x"; 400].join("/");
        assert!(relative_path(&long).is_err());
    }

    #[test]
    fn errors_name_the_offending_input() {
        let err = relative_path("job/../x").unwrap_err().to_string();
        assert!(err.contains("job/../x") && err.contains(".."), "{err}");
    }
}
