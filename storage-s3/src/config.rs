//! Configuration of a [`Storage`](crate::Storage): URL, S3 settings, retries, timeouts, transfers.

use std::fmt;
use std::time::Duration;

/// A secret string (secret key, session token) whose `Debug` output is redacted.
///
/// It has no `Display`; read it with [`Secret::expose`] only where it is handed to the client.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Everything needed to build a [`Storage`](crate::Storage).
///
/// Fields are public and the struct is `#[non_exhaustive]`: start from [`StorageConfig::new`] and
/// change what you need.
///
/// ```
/// use std::time::Duration;
/// use storage_s3::StorageConfig;
///
/// let mut config = StorageConfig::new("s3://checkpoints/prod");
/// config.s3.endpoint = Some("http://127.0.0.1:8333".into());
/// config.s3.allow_http = Some(true);
/// config.retry.max_retries = 3;
/// config.http.request_timeout = Duration::from_secs(10);
/// config.transfer.part_size = 32 * 1024 * 1024;
/// // Debug output never shows credentials.
/// config.s3.secret_access_key = Some("very-secret".into());
/// assert!(!format!("{config:?}").contains("very-secret"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StorageConfig {
    /// Where the data lives: `file:///abs/dir`, `memory://`, `s3://bucket/prefix`
    /// (feature `s3`), `gs://bucket/prefix` (feature `gcp`), `az://container/prefix` (feature
    /// `azure`). A bare absolute path `/abs/dir` is taken as `file:///abs/dir`.
    pub url: String,
    /// S3 settings, used for `s3://` URLs.
    pub s3: S3Options,
    /// Retries of failed requests to HTTP stores (S3, GCS, Azure).
    pub retry: RetryOptions,
    /// Timeouts of requests to HTTP stores.
    pub http: HttpOptions,
    /// Part size and concurrency of file uploads.
    pub transfer: TransferOptions,
    /// Local filesystem settings, used for `file://` URLs.
    pub local: LocalOptions,
}

impl StorageConfig {
    /// A configuration for `url` with default settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            s3: S3Options::default(),
            retry: RetryOptions::default(),
            http: HttpOptions::default(),
            transfer: TransferOptions::default(),
            local: LocalOptions::default(),
        }
    }
}

/// Settings of an S3 or S3-compatible store.
///
/// Unset values come from the standard AWS environment variables when [`S3Options::from_env`] is
/// true (the default): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, and the rest that
/// object_store's `AmazonS3Builder::from_env` reads (instance/container credentials included).
/// Values set here override the environment.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct S3Options {
    /// The endpoint, e.g. `http://127.0.0.1:8333` for a local server; AWS when unset.
    pub endpoint: Option<String>,
    /// The region, e.g. `us-east-1`.
    pub region: Option<String>,
    /// The access key id.
    pub access_key_id: Option<Secret>,
    /// The secret access key.
    pub secret_access_key: Option<Secret>,
    /// A session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// Allow plain `http://` endpoints (local test servers).
    pub allow_http: Option<bool>,
    /// Use virtual-hosted-style requests (`bucket.host`); path style (`host/bucket`) when false
    /// or unset, which is what S3-compatible servers expect.
    pub virtual_hosted_style: Option<bool>,
    /// Read unset values from the `AWS_*` environment variables (default: true).
    pub from_env: Option<bool>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &Option<Secret>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field(
                "endpoint",
                &self.endpoint.as_deref().map(crate::storage::redact_url),
            )
            .field("region", &self.region)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("session_token", &set(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("from_env", &self.from_env)
            .finish()
    }
}

/// Retries with exponential backoff of requests that failed transiently (5xx, connection errors,
/// timeouts of idempotent requests); mapped onto object_store's `RetryConfig`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryOptions {
    /// Retries per request; 0 disables retrying.
    pub max_retries: usize,
    /// The first backoff.
    pub init_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// The multiplier of the backoff after each retry.
    pub backoff_base: f64,
    /// No retry is started after this long since the first attempt.
    pub retry_timeout: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        Self {
            max_retries: 10,
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            backoff_base: 2.0,
            retry_timeout: Duration::from_secs(3 * 60),
        }
    }
}

/// Timeouts of single HTTP requests, so that a wrong endpoint or a dead server fails in bounded
/// time instead of hanging.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Timeout for establishing a connection.
    pub connect_timeout: Duration,
    /// Timeout of a whole request, including reading the response body. It must allow one part
    /// of [`TransferOptions::part_size`] to be sent on the slowest link in use.
    pub request_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Part size and concurrency of [`Storage::upload_file`](crate::Storage::upload_file).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransferOptions {
    /// Size of one multipart part in bytes (S3 needs at least 5 MiB). Files up to this size are
    /// sent with a single put.
    pub part_size: usize,
    /// Parts in flight at once. Memory use of an upload is about
    /// `part_size * (max_concurrency + 2)`.
    pub max_concurrency: usize,
}

/// The smallest part size S3 accepts for all but the last part.
pub const MIN_S3_PART_SIZE: usize = 5 * 1024 * 1024;

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            part_size: 16 * 1024 * 1024,
            max_concurrency: 4,
        }
    }
}

/// Settings of a local-filesystem store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalOptions {
    /// Fsync files and directories on put/copy/rename/multipart completion so a completed write
    /// survives a crash (default: true).
    pub fsync: bool,
    /// Create the root directory if it does not exist (default: true).
    pub create_root: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            create_root: true,
        }
    }
}
