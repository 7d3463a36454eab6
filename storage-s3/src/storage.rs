//! [`Storage`]: an `Arc<dyn ObjectStore>` plus its root prefix, built from a URL or config.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use url::Url;

use crate::config::{StorageConfig, TransferOptions};
use crate::error::{Error, Result};
use crate::paths::{join_segments, relative_path};

/// Which kind of object store a [`Storage`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreKind {
    /// A directory on the local filesystem (`file://`).
    Local,
    /// An in-memory store (`memory://`), for tests and examples.
    Memory,
    /// S3 or an S3-compatible server (`s3://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`, `abfs://`, ...).
    Azure,
    /// A store handed to [`Storage::from_store`].
    Other,
}

impl StoreKind {
    /// Whether the store keeps user metadata on objects (used to store [`Checksum`](crate::Checksum)s).
    pub fn keeps_user_metadata(self) -> bool {
        matches!(
            self,
            StoreKind::Memory | StoreKind::S3 | StoreKind::Gcs | StoreKind::Azure
        )
    }
}

/// An object store with a root prefix and the transfer settings it was configured with.
///
/// It is cheap to clone. The store itself is reachable with [`Storage::store`] (paths include the
/// root) or [`Storage::scoped_store`] (paths relative to the root), so code that only needs
/// `object_store` keeps using `Arc<dyn ObjectStore>`; the helpers on `Storage` add what
/// object_store does not give directly (file transfers, checksums, create-only puts with a clear
/// error, prefix listing and deletion).
///
/// Every helper takes a full object path and refuses paths outside the root; build paths from
/// names with [`Storage::path`] / [`Storage::child`], which validate them.
#[derive(Clone)]
pub struct Storage {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) root: Path,
    pub(crate) url: String,
    pub(crate) kind: StoreKind,
    pub(crate) config: Arc<StorageConfig>,
    /// The directory of a `file://` store.
    pub(crate) local_dir: Option<PathBuf>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("url", &self.url)
            .field("kind", &self.kind)
            .field("root", &self.root.as_ref())
            .field("transfer", &self.config.transfer)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Storage {
    /// Builds a store from a URL with default settings (for `s3://`, credentials, region and
    /// endpoint come from the `AWS_*` environment variables).
    ///
    /// ```
    /// # fn main() -> storage_s3::Result<()> {
    /// let storage = storage_s3::Storage::from_url("memory:///checkpoints")?;
    /// assert_eq!(storage.root().as_ref(), "checkpoints");
    /// # Ok(()) }
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&StorageConfig::new(url))
    }

    /// Checks that `url` is a storage URL [`Storage::from_config`] would accept (its syntax:
    /// no `.`/`..` segments, no credentials, query or fragment), without touching the file
    /// system or the network. Callers that create directories check the URL with this first.
    pub fn check_url(url: &str) -> Result<()> {
        parse_url(url, &redact_url(url)).map(|_| ())
    }

    /// Builds a store from a configuration.
    pub fn from_config(config: &StorageConfig) -> Result<Self> {
        let shown = redact_url(&config.url);
        let url = parse_url(&config.url, &shown)?;
        check_transfer(
            &config.transfer,
            matches!(url.scheme(), "s3" | "s3a"),
            &shown,
        )?;
        let mut local_dir = None;
        let (store, root, kind): (Arc<dyn ObjectStore>, Path, StoreKind) = match url.scheme() {
            "file" => {
                let (store, dir) = build_local(&url, config, &shown)?;
                local_dir = Some(dir);
                (store, Path::default(), StoreKind::Local)
            }
            "memory" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(Error::InvalidUrl {
                        url: shown,
                        reason: "memory URLs have no host: use memory:// or memory:///prefix"
                            .into(),
                    });
                }
                let root = root_from_url_path(url.path(), &shown)?;
                (Arc::new(InMemory::new()), root, StoreKind::Memory)
            }
            "s3" | "s3a" => {
                #[cfg(feature = "s3")]
                {
                    let root = root_from_url_path(url.path(), &shown)?;
                    (
                        crate::cloud::build_s3(&url, config, &shown)?,
                        root,
                        StoreKind::S3,
                    )
                }
                #[cfg(not(feature = "s3"))]
                return Err(Error::FeatureDisabled {
                    url: shown,
                    feature: "s3",
                });
            }
            "gs" => {
                #[cfg(feature = "gcp")]
                {
                    let root = root_from_url_path(url.path(), &shown)?;
                    (
                        crate::cloud::build_gcs(&url, config, &shown)?,
                        root,
                        StoreKind::Gcs,
                    )
                }
                #[cfg(not(feature = "gcp"))]
                return Err(Error::FeatureDisabled {
                    url: shown,
                    feature: "gcp",
                });
            }
            "az" | "adl" | "azure" | "abfs" | "abfss" => {
                #[cfg(feature = "azure")]
                {
                    let (store, root) = crate::cloud::build_azure(&url, config, &shown)?;
                    (store, root, StoreKind::Azure)
                }
                #[cfg(not(feature = "azure"))]
                return Err(Error::FeatureDisabled {
                    url: shown,
                    feature: "azure",
                });
            }
            other => {
                return Err(Error::InvalidUrl {
                    url: shown,
                    reason: format!(
                    "unsupported scheme `{other}` (use file://, memory://, s3://, gs:// or az://)"
                ),
                })
            }
        };
        Ok(Self {
            store,
            root,
            url: shown,
            kind,
            config: Arc::new(config.clone()),
            local_dir,
        })
    }

    /// Wraps a store built elsewhere. `label` names it in errors (it must not contain secrets);
    /// `root` is the prefix every helper stays inside.
    pub fn from_store(store: Arc<dyn ObjectStore>, root: Path, label: impl Into<String>) -> Self {
        let label = label.into();
        Self {
            store,
            root,
            url: redact_url(&label),
            kind: StoreKind::Other,
            config: Arc::new(StorageConfig::new(label)),
            local_dir: None,
        }
    }

    /// Returns a copy whose transfers use `transfer` instead of the configured options, after
    /// checking them like [`Storage::from_config`] does.
    pub fn with_transfer_options(mut self, transfer: TransferOptions) -> Result<Self> {
        check_transfer(&transfer, self.kind == StoreKind::S3, &self.url)?;
        let mut config = (*self.config).clone();
        config.transfer = transfer;
        self.config = Arc::new(config);
        Ok(self)
    }

    /// The object store; its paths include [`Storage::root`].
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The store seen from the root: paths are relative to [`Storage::root`].
    pub fn scoped_store(&self) -> Arc<dyn ObjectStore> {
        if self.root.as_ref().is_empty() {
            Arc::clone(&self.store)
        } else {
            Arc::new(PrefixStore::new(Arc::clone(&self.store), self.root.clone()))
        }
    }

    /// The root prefix inside the store (empty for `file://` URLs, whose directory is the root).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL this store was built from, with any credentials removed; used in errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What to put before an object path of this store to name the object for a person: a
    /// path or URL that can be pasted into the next command. For `file://` stores the local
    /// directory with a trailing `/` (object paths are relative to it), otherwise the URL's
    /// scheme and bucket, `s3://bucket/` (object paths include the root prefix).
    pub fn location_prefix(&self) -> String {
        if let Some(dir) = &self.local_dir {
            let dir = dir.display().to_string();
            return format!("{}/", dir.trim_end_matches('/'));
        }
        match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let authority = rest.split('/').next().unwrap_or("");
                format!("{scheme}://{authority}/")
            }
            None => String::new(),
        }
    }

    /// The kind of store.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The configuration this store was built from.
    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// The full path of `relative` (e.g. `"job-1/chk-7/_metadata"`) under the root, after
    /// validating it with [`relative_path`](crate::relative_path).
    pub fn path(&self, relative: &str) -> Result<Path> {
        let rel = relative_path(relative)?;
        Ok(self.root.parts().chain(rel.parts()).collect())
    }

    /// The full path of `segments` (each a name such as a job or state name) under the root,
    /// after validating every segment with [`validate_segment`](crate::validate_segment).
    pub fn child(&self, segments: &[&str]) -> Result<Path> {
        join_segments(&self.root, segments)
    }

    /// Removes the upload staging files a process killed mid-upload left under `prefix`, then
    /// the directories under `prefix` left empty, and returns how many files it removed.
    ///
    /// A `file://` store writes each object to `<name>#<n>` and renames it when complete; a
    /// process killed in between leaves the staging file behind, which listings never show and
    /// prefix deletion never removes, so the disk fills up crash after crash. An empty
    /// directory (a checkpoint folder whose only file was such a staging file, say) is
    /// invisible to listings too, so nothing else would ever remove it. Call this when no
    /// other process writes under `prefix` any more (e.g. when a job takes over its checkpoint
    /// directory after a restart): an upload still running there would fail. Other stores have
    /// no staging files (`Ok(0)`; S3 aborts incomplete multipart uploads by lifecycle rules).
    pub fn remove_staging_files(&self, prefix: &Path) -> Result<usize> {
        self.check_inside(prefix)?;
        let Some(dir) = &self.local_dir else {
            return Ok(0);
        };
        let mut start = dir.clone();
        for part in prefix.parts() {
            start.push(part.as_ref());
        }
        let mut removed = 0;
        let mut todo = vec![start];
        // Directories below `prefix`, parents before their children.
        let mut below = Vec::new();
        while let Some(d) = todo.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::error::io_error("list directory", &d, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| crate::error::io_error("list directory", &d, e))?;
                // DirEntry::file_type does not follow symbolic links: none is entered or removed.
                let ty = entry
                    .file_type()
                    .map_err(|e| crate::error::io_error("inspect", &entry.path(), e))?;
                if ty.is_dir() {
                    todo.push(entry.path());
                    below.push(entry.path());
                } else if ty.is_file() && is_staging_name(&entry.file_name().to_string_lossy()) {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(crate::error::io_error("remove", &entry.path(), e)),
                    }
                }
            }
        }
        // Children first, so a directory holding only empty directories goes too.
        for d in below.iter().rev() {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::NotFound
                    ) => {}
                Err(e) => return Err(crate::error::io_error("remove", d, e)),
            }
        }
        Ok(removed)
    }

    /// Checks that `path` lies inside the root prefix.
    pub fn check_inside(&self, path: &Path) -> Result<()> {
        if path.prefix_matches(&self.root) {
            Ok(())
        } else {
            Err(Error::OutsideRoot {
                url: self.url.clone(),
                path: path.to_string(),
                root: self.root.to_string(),
            })
        }
    }

    /// Like [`Storage::check_inside`], and the path must not be the root itself.
    pub(crate) fn check_strictly_inside(&self, path: &Path) -> Result<()> {
        self.check_inside(path)?;
        if path.parts_count() == self.root.parts_count() {
            return Err(Error::InvalidPath {
                path: path.to_string(),
                reason: "this operation needs a path below the storage root, not the root itself"
                    .into(),
            });
        }
        Ok(())
    }
}

fn parse_url(raw: &str, shown: &str) -> Result<Url> {
    let raw = raw.trim();
    // URL parsing silently resolves `.` and `..`; refuse them instead of guessing what was meant.
    let dot_segment = raw.split(['/', '\\']).any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    if dot_segment {
        return Err(Error::InvalidUrl {
            url: shown.to_owned(),
            reason: "`.` and `..` segments are not allowed".into(),
        });
    }
    match Url::parse(raw) {
        Ok(url) => {
            if url.query().is_some() || url.fragment().is_some() {
                return Err(Error::InvalidUrl {
                    url: shown.to_owned(),
                    reason: "query strings and fragments are not supported; set options in StorageConfig".into(),
                });
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(Error::InvalidUrl {
                    url: shown.to_owned(),
                    reason: "credentials in the URL are not supported; set them in StorageConfig or the environment".into(),
                });
            }
            Ok(url)
        }
        Err(url::ParseError::RelativeUrlWithoutBase) if raw.starts_with('/') => {
            Url::from_file_path(raw).map_err(|()| Error::InvalidUrl {
                url: shown.to_owned(),
                reason: "not a valid absolute path".into(),
            })
        }
        Err(e) => Err(Error::InvalidUrl {
            url: shown.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Validates the path part of a URL as a root prefix.
fn root_from_url_path(url_path: &str, shown: &str) -> Result<Path> {
    let decoded = percent_decode(url_path);
    let trimmed = decoded.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(Path::default());
    }
    relative_path(trimmed).map_err(|e| Error::InvalidUrl {
        url: shown.to_owned(),
        reason: format!("invalid prefix: {e}"),
    })
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn build_local(
    url: &Url,
    config: &StorageConfig,
    shown: &str,
) -> Result<(Arc<dyn ObjectStore>, PathBuf)> {
    if url
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(Error::InvalidUrl {
            url: shown.to_owned(),
            reason: "file URLs need an absolute path: file:///abs/dir".into(),
        });
    }
    let dir = url.to_file_path().map_err(|()| Error::InvalidUrl {
        url: shown.to_owned(),
        reason: "not a valid absolute file path".into(),
    })?;
    if dir
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::InvalidUrl {
            url: shown.to_owned(),
            reason: "`..` is not allowed in the directory".into(),
        });
    }
    if config.local.create_root {
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::error::io_error("create directory", &dir, e))?;
    }
    let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
        .map_err(|source| Error::Build {
            url: shown.to_owned(),
            source: Box::new(source),
        })?
        .with_automatic_cleanup(true)
        .with_fsync(config.local.fsync);
    Ok((Arc::new(fs), dir))
}

/// True for the names the local store stages uploads under, `<name>#<digits>`: exactly the
/// files its listings hide (the same rule as object_store's).
fn is_staging_name(name: &str) -> bool {
    name.split_once('#')
        .is_some_and(|(_, suffix)| !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

fn check_transfer(t: &TransferOptions, is_s3: bool, shown: &str) -> Result<()> {
    let invalid = |field, reason: String| Error::InvalidConfig {
        url: shown.to_owned(),
        field,
        reason,
    };
    if t.part_size == 0 {
        return Err(invalid("transfer.part_size", "must be positive".into()));
    }
    if t.max_concurrency == 0 {
        return Err(invalid(
            "transfer.max_concurrency",
            "must be positive".into(),
        ));
    }
    if is_s3 && t.part_size < crate::config::MIN_S3_PART_SIZE {
        return Err(invalid(
            "transfer.part_size",
            format!(
                "is {} bytes; S3 needs at least {} (5 MiB)",
                t.part_size,
                crate::config::MIN_S3_PART_SIZE
            ),
        ));
    }
    Ok(())
}

/// Removes credentials (user info), query and fragment from a URL-like string, for messages.
/// Works on the text as given (no normalisation), so the message shows what the user wrote.
pub(crate) fn redact_url(raw: &str) -> String {
    let raw = raw.trim();
    let (body, had_query) = match raw.find(['?', '#']) {
        Some(i) => (&raw[..i], true),
        None => (raw, false),
    };
    let mut out = match body.find("://") {
        Some(i) => {
            let (scheme, rest) = body.split_at(i + 3);
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => format!("{scheme}***@{}{path}", &authority[at + 1..]),
                None => body.to_owned(),
            }
        }
        None => body.to_owned(),
    };
    if had_query {
        out.push_str("?<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("s3://AKIA:supersecret@bucket/p?x-amz-signature=abc"),
            "s3://***@bucket/p?<redacted>"
        );
        assert_eq!(redact_url("http://user:pw@host:1/"), "http://***@host:1/");
        assert_eq!(redact_url("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(redact_url("/tmp/x?secret"), "/tmp/x?<redacted>");
        assert_eq!(redact_url("s3://bucket/a/../b"), "s3://bucket/a/../b");
        assert_eq!(redact_url("s3://k:s@b@bucket"), "s3://***@bucket");
    }

    #[test]
    fn locations_are_pasteable() {
        let tmp = std::env::temp_dir().join(format!("fs-loc-{}", std::process::id()));
        let s = Storage::from_url(&format!("file://{}", tmp.display())).unwrap();
        let p = s.path("job/chk-1/_metadata").unwrap();
        let shown = format!("{}{p}", s.location_prefix());
        assert_eq!(shown, format!("{}/job/chk-1/_metadata", tmp.display()));
        let root = Storage::from_url("file:///").unwrap();
        assert_eq!(root.location_prefix(), "/");
        let m = Storage::from_url("memory:///a/b").unwrap();
        let p = m.path("x").unwrap();
        assert_eq!(format!("{}{p}", m.location_prefix()), "memory:///a/b/x");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn memory_urls() {
        let s = Storage::from_url("memory://").unwrap();
        assert_eq!(s.root().as_ref(), "");
        assert_eq!(s.kind(), StoreKind::Memory);
        let s = Storage::from_url("memory:///a/b/").unwrap();
        assert_eq!(s.root().as_ref(), "a/b");
        assert!(Storage::from_url("memory:///a/../b").is_err());
        assert!(Storage::from_url("memory:///a/%2E%2e/b").is_err());
        assert!(Storage::from_url("/tmp/x/../y").is_err());
        assert!(Storage::from_url("memory://host/x").is_err());
    }

    #[test]
    fn rejected_urls_name_the_problem() {
        let err = Storage::from_url("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        let err = Storage::from_url("relative/dir").unwrap_err().to_string();
        assert!(err.contains("relative/dir"), "{err}");
        let err = Storage::from_url("s3://key:topsecret@bucket/x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret") && !err.contains("key:"), "{err}");
        let err = Storage::from_url("file://host/x").unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
        let err = Storage::from_url("memory://?a=b").unwrap_err().to_string();
        assert!(err.contains("query"), "{err}");
    }

    #[test]
    fn paths_stay_inside_the_root() {
        let s = Storage::from_url("memory:///root").unwrap();
        assert_eq!(s.path("job/chk-1").unwrap().as_ref(), "root/job/chk-1");
        assert_eq!(
            s.child(&["job", "chk-1"]).unwrap().as_ref(),
            "root/job/chk-1"
        );
        assert!(s.path("../x").is_err());
        assert!(s.child(&["job", ".."]).is_err());
        assert!(s.check_inside(&Path::from("root/a")).is_ok());
        assert!(s.check_inside(&Path::from("rootx/a")).is_err());
        assert!(s.check_inside(&Path::from("other")).is_err());
        assert!(s.check_strictly_inside(&Path::from("root")).is_err());
    }

    #[test]
    fn transfer_options_are_checked() {
        let mut c = StorageConfig::new("memory://");
        c.transfer.part_size = 0;
        assert!(Storage::from_config(&c).is_err());
        let mut c = StorageConfig::new("memory://");
        c.transfer.max_concurrency = 0;
        let err = Storage::from_config(&c).unwrap_err().to_string();
        assert!(err.contains("max_concurrency"), "{err}");
        let s = Storage::from_url("memory://").unwrap();
        let t = TransferOptions {
            part_size: 0,
            ..TransferOptions::default()
        };
        assert!(s.clone().with_transfer_options(t).is_err());
        let mut c = StorageConfig::new("s3://bucket");
        c.transfer.part_size = 1024;
        let err = Storage::from_config(&c).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig { .. } | Error::FeatureDisabled { .. }
            ),
            "{err}"
        );
    }

    #[cfg(not(feature = "s3"))]
    #[test]
    fn s3_needs_the_feature() {
        let err = Storage::from_url("s3://bucket/x").unwrap_err();
        assert!(matches!(err, Error::FeatureDisabled { feature: "s3", .. }));
    }
}
