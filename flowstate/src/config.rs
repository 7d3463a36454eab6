//! Configuration: a TOML file sets the defaults for every job, `FLOWSTATE_…` environment
//! variables override the file, and a job overrides both in code.
//!
//! Every key, its type and default is listed in [`KEYS`]; the README's table is made from it.
//! Unknown keys, wrong types and impossible values are errors at load time that name the key
//! and where it came from (the file, the variable, or code). Credentials are kept as
//! [`storage_s3::Secret`] and never printed.
//!
//! ```
//! use flowstate::config::{BackendKind, ConfigLoader};
//! use std::time::Duration;
//!
//! let file = r#"
//! [state]
//! backend = "heap"
//! [state.checkpoints]
//! dir = "memory:///checkpoints"
//! interval = "30s"
//! "#;
//! let config = ConfigLoader::new()
//!     .toml_str(file, "flowstate.toml")
//!     .unwrap()
//!     .env_vars([("FLOWSTATE_STATE_CHECKPOINTS_RETAINED", "3")])
//!     .unwrap()
//!     .set("state.checkpoints.interval", "5s") // the job's own choice wins
//!     .unwrap()
//!     .load()
//!     .unwrap();
//! assert_eq!(config.backend, BackendKind::Heap);
//! assert_eq!(config.checkpoints.interval, Duration::from_secs(5));
//! assert_eq!(config.checkpoints.retained, 3);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use storage_s3::Secret;

/// Smallest mmap memory budget accepted (16 MiB).
pub const MIN_MMAP_BUDGET: u64 = 16 << 20;

/// What a configuration key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// Any string.
    Str,
    /// A storage URL (`file:///…`, `memory://…`, `s3://bucket/prefix`).
    Url,
    /// `true` / `false`.
    Bool,
    /// A duration: `500ms`, `10s`, `5min`, `1h`.
    Duration,
    /// A byte size: `256MiB`, `1GiB`, `1048576`.
    Size,
    /// A non-negative integer.
    Count,
    /// One of the listed words.
    Choice(&'static [&'static str]),
    /// A secret string (credentials): never printed.
    Secret,
}

/// A documented configuration key.
#[derive(Clone, Copy, Debug)]
pub struct KeyDoc {
    /// The dotted key, as in the file (`state.checkpoints.interval`).
    pub key: &'static str,
    /// Its type.
    pub ty: KeyType,
    /// Its default, as written in a file ("" when unset).
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

impl KeyDoc {
    /// The environment variable that overrides the key: `FLOWSTATE_` + the key in upper case
    /// with `.` and `-` as `_`.
    pub fn env_var(&self) -> String {
        format!(
            "FLOWSTATE_{}",
            self.key.replace(['.', '-'], "_").to_ascii_uppercase()
        )
    }
}

/// Every configuration key.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "state.backend",
        ty: KeyType::Choice(&["heap", "mmap"]),
        default: "heap",
        doc: "the keyed state backend of every job",
    },
    KeyDoc {
        key: "state.max-parallelism",
        ty: KeyType::Count,
        default: "128",
        doc: "number of key groups (1..=32768); cannot change across restores",
    },
    KeyDoc {
        key: "state.checkpoints.dir",
        ty: KeyType::Url,
        default: "",
        doc: "where checkpoints go: file:///abs/dir, s3://bucket/prefix or memory://",
    },
    KeyDoc {
        key: "state.checkpoints.incremental",
        ty: KeyType::Bool,
        default: "false",
        doc: "upload only what changed since the previous checkpoint",
    },
    KeyDoc {
        key: "state.checkpoints.interval",
        ty: KeyType::Duration,
        default: "10s",
        doc: "time between checkpoint triggers (> 0)",
    },
    KeyDoc {
        key: "state.checkpoints.timeout",
        ty: KeyType::Duration,
        default: "10min",
        doc: "a checkpoint not complete after this is aborted",
    },
    KeyDoc {
        key: "state.checkpoints.min-pause",
        ty: KeyType::Duration,
        default: "0s",
        doc: "least time between the end of one checkpoint and the next trigger",
    },
    KeyDoc {
        key: "state.checkpoints.max-concurrent",
        ty: KeyType::Count,
        default: "1",
        doc: "checkpoints in flight at once (>= 1)",
    },
    KeyDoc {
        key: "state.checkpoints.retained",
        ty: KeyType::Count,
        default: "1",
        doc: "completed checkpoints kept (>= 1)",
    },
    KeyDoc {
        key: "state.checkpoints.tolerable-failures",
        ty: KeyType::Count,
        default: "0",
        doc: "consecutive failed checkpoints before the job fails",
    },
    KeyDoc {
        key: "state.checkpoints.on-shutdown",
        ty: KeyType::Choice(&["delete", "retain"]),
        default: "delete",
        doc: "what happens to checkpoints when the job ends normally",
    },
    KeyDoc {
        key: "state.savepoints.dir",
        ty: KeyType::Url,
        default: "",
        doc: "default directory of savepoints",
    },
    KeyDoc {
        key: "state.mmap.memory-budget",
        ty: KeyType::Size,
        default: "256MiB",
        doc: "memory the mmap backends of the process may use together for their own buffers (>= 16MiB): one environment per process holds it, every backend (each operator and subtask) gets an even share, and all share one pool of background threads",
    },
    KeyDoc {
        key: "state.mmap.dir",
        ty: KeyType::Str,
        default: "",
        doc: "local folder under which each mmap backend gets a fresh working folder of its own, deleted when it ends and swept by the next run after a crash (default: the system temporary directory)",
    },
    KeyDoc {
        key: "s3.endpoint",
        ty: KeyType::Str,
        default: "",
        doc: "S3 endpoint, e.g. http://127.0.0.1:8333 (AWS when unset; AWS_ENDPOINT also works)",
    },
    KeyDoc {
        key: "s3.region",
        ty: KeyType::Str,
        default: "",
        doc: "S3 region (AWS_REGION also works)",
    },
    KeyDoc {
        key: "s3.access-key-id",
        ty: KeyType::Secret,
        default: "",
        doc: "S3 access key id (AWS_ACCESS_KEY_ID also works)",
    },
    KeyDoc {
        key: "s3.secret-access-key",
        ty: KeyType::Secret,
        default: "",
        doc: "S3 secret key (AWS_SECRET_ACCESS_KEY also works); never printed",
    },
    KeyDoc {
        key: "s3.allow-http",
        ty: KeyType::Bool,
        default: "false",
        doc: "allow plain http:// endpoints (local servers)",
    },
    KeyDoc {
        key: "s3.virtual-hosted-style",
        ty: KeyType::Bool,
        default: "false",
        doc: "bucket.host requests instead of host/bucket",
    },
];

fn key_doc(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|k| k.key == key)
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// The job's code.
    Code,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Code => f.write_str("the job's code"),
        }
    }
}

/// A configuration error: which key, from where, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that does not exist.
    #[error("unknown key '{key}' in {origin}{hint}")]
    UnknownKey {
        /// The key.
        key: String,
        /// Where it was.
        origin: Origin,
        /// A suggestion.
        hint: String,
    },
    /// A value of the wrong type or out of range.
    #[error("invalid value for '{key}' in {origin}: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// Where it was.
        origin: Origin,
        /// What is wrong.
        message: String,
    },
}

/// The keyed state backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `state-heap`.
    Heap,
    /// `state-mmap`.
    Mmap,
}

/// What happens to retained checkpoints when the job ends normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Delete them.
    Delete,
    /// Keep them.
    Retain,
}

/// Checkpoint settings, with Flink's meanings and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSettings {
    /// Checkpoint directory URL.
    pub dir: Option<String>,
    /// Incremental checkpoints.
    pub incremental: bool,
    /// Trigger interval.
    pub interval: Duration,
    /// Timeout.
    pub timeout: Duration,
    /// Minimum pause between checkpoints.
    pub min_pause: Duration,
    /// Maximum concurrent checkpoints.
    pub max_concurrent: u32,
    /// Retained completed checkpoints.
    pub retained: u32,
    /// Tolerable consecutive failures.
    pub tolerable_failures: u32,
    /// Retention on shutdown.
    pub on_shutdown: Retention,
}

/// S3 settings (credentials also come from the usual `AWS_*` variables).
#[derive(Clone, Default)]
pub struct S3Settings {
    /// Endpoint.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<Secret>,
    /// Secret access key.
    pub secret_access_key: Option<Secret>,
    /// Allow http.
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests.
    pub virtual_hosted_style: Option<bool>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &Option<Secret>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

/// A loaded, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The backend.
    pub backend: BackendKind,
    /// Number of key groups.
    pub max_parallelism: u32,
    /// Checkpoint settings.
    pub checkpoints: CheckpointSettings,
    /// Savepoint directory URL.
    pub savepoints_dir: Option<String>,
    /// mmap memory budget in bytes, per process: every mmap backend of a job shares it.
    pub mmap_memory_budget: u64,
    /// Parent of the mmap backends' working folders (each backend makes a fresh one under it).
    pub mmap_dir: Option<PathBuf>,
    /// S3 settings.
    pub s3: S3Settings,
}

impl Config {
    /// The storage configuration of a URL with this configuration's S3 settings.
    pub fn storage_config(&self, url: &str) -> storage_s3::StorageConfig {
        let mut c = storage_s3::StorageConfig::new(url);
        c.s3.endpoint = self.s3.endpoint.clone();
        c.s3.region = self.s3.region.clone();
        c.s3.access_key_id = self.s3.access_key_id.clone();
        c.s3.secret_access_key = self.s3.secret_access_key.clone();
        c.s3.allow_http = self.s3.allow_http;
        c.s3.virtual_hosted_style = self.s3.virtual_hosted_style;
        c
    }
}

/// Layers of configuration, applied in order: defaults, file, environment, code.
#[derive(Debug, Default)]
pub struct ConfigLoader {
    values: BTreeMap<&'static str, (String, Origin)>,
}

/// Edit distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn unknown(key: &str, origin: Origin) -> ConfigError {
    let candidates = KEYS
        .iter()
        .map(|k| (k.key.to_string(), k.key))
        .chain(KEYS.iter().map(|k| (k.env_var(), k.key)));
    let hint = candidates
        .map(|(name, key_name)| (distance(key, &name), name, key_name))
        .filter(|(d, _, _)| *d <= 3)
        .min_by_key(|(d, _, _)| *d)
        .map(|(_, name, _)| format!(" (did you mean '{name}'?)"))
        .unwrap_or_else(|| " (see the README for the list of keys)".into());
    ConfigError::UnknownKey {
        key: key.to_string(),
        origin,
        hint,
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => out.push((key, other.clone())),
        }
    }
}

impl ConfigLoader {
    /// An empty loader (defaults only).
    pub fn new() -> Self {
        Self::default()
    }

    fn put(mut self, key: &str, value: String, origin: Origin) -> Result<Self, ConfigError> {
        let doc = key_doc(key).ok_or_else(|| unknown(key, origin.clone()))?;
        check_value(doc, &value, &origin)?;
        self.values.insert(doc.key, (value, origin));
        Ok(self)
    }

    /// Reads a TOML file.
    pub fn file(self, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.toml_str(&text, path)
    }

    /// Reads TOML text; `path` names it in errors.
    pub fn toml_str(mut self, text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string().trim().to_string(),
                })?;
        let mut flat = Vec::new();
        flatten("", &table, &mut flat);
        for (key, value) in flat {
            let origin = Origin::File(path.to_path_buf());
            let doc = key_doc(&key).ok_or_else(|| unknown(&key, origin.clone()))?;
            let text = match (&value, doc.ty) {
                (toml::Value::String(s), _) => s.clone(),
                (toml::Value::Boolean(b), KeyType::Bool) => b.to_string(),
                (toml::Value::Integer(i), KeyType::Count | KeyType::Size) => i.to_string(),
                (v, _) => {
                    return Err(ConfigError::Invalid {
                        key,
                        origin,
                        message: format!("expected {}, found {}", describe(doc.ty), v.type_str()),
                    })
                }
            };
            self = self.put(&key, text, origin)?;
        }
        Ok(self)
    }

    /// Applies `FLOWSTATE_…` variables from `vars`; other variables are ignored. A
    /// `FLOWSTATE_…` variable that is not a key is not an error (tests and tools use the prefix
    /// too), but one that is a near miss of a key — a typo — is: it names the key it resembles.
    pub fn env_vars<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        for (name, value) in vars {
            let name = name.as_ref();
            if !name.starts_with("FLOWSTATE_") {
                continue;
            }
            let origin = Origin::Env(name.to_string());
            match KEYS.iter().find(|k| k.env_var() == name) {
                Some(doc) => self = self.put(doc.key, value.as_ref().to_string(), origin)?,
                None => {
                    let near = KEYS.iter().any(|k| distance(name, &k.env_var()) <= 2);
                    if near {
                        return Err(unknown(name, origin));
                    }
                }
            }
        }
        Ok(self)
    }

    /// Applies the process's environment. Variables whose name or value is not valid UTF-8 are
    /// not ours and are skipped, unless the name is one of our keys' variables: then the value
    /// is an error naming it.
    pub fn env(self) -> Result<Self, ConfigError> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            match value.into_string() {
                Ok(value) => vars.push((name.to_string(), value)),
                Err(raw) => {
                    if let Some(doc) = KEYS.iter().find(|k| k.env_var() == name) {
                        return Err(ConfigError::Invalid {
                            key: doc.key.to_string(),
                            origin: Origin::Env(name.to_string()),
                            message: format!("{raw:?} is not valid UTF-8"),
                        });
                    }
                }
            }
        }
        self.env_vars(vars)
    }

    /// Sets a key from the job's code (wins over file and environment).
    pub fn set(self, key: &str, value: impl Into<String>) -> Result<Self, ConfigError> {
        self.put(key, value.into(), Origin::Code)
    }

    /// Where the value of `key` comes from.
    pub fn origin(&self, key: &str) -> Origin {
        self.values
            .get(key)
            .map(|(_, o)| o.clone())
            .unwrap_or(Origin::Default)
    }

    /// Validates the layers into a [`Config`].
    pub fn load(&self) -> Result<Config, ConfigError> {
        let get = |key: &'static str| -> (String, Origin) {
            match self.values.get(key) {
                Some(v) => v.clone(),
                None => (
                    key_doc(key).map(|d| d.default).unwrap_or("").to_string(),
                    Origin::Default,
                ),
            }
        };
        let opt = |key: &'static str| -> Option<String> {
            let (v, _) = get(key);
            (!v.is_empty()).then_some(v)
        };
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            origin: self.origin(key),
            message,
        };
        let count = |key: &'static str| -> Result<u32, ConfigError> {
            let (v, o) = get(key);
            parse_count(&v).map_err(|m| ConfigError::Invalid {
                key: key.into(),
                origin: o,
                message: m,
            })
        };
        let duration = |key: &'static str| -> Result<Duration, ConfigError> {
            let (v, o) = get(key);
            parse_duration(&v).map_err(|m| ConfigError::Invalid {
                key: key.into(),
                origin: o,
                message: m,
            })
        };
        let boolean = |key: &'static str| -> Result<bool, ConfigError> {
            let (v, o) = get(key);
            parse_bool(&v).map_err(|m| ConfigError::Invalid {
                key: key.into(),
                origin: o,
                message: m,
            })
        };
        let backend = match get("state.backend").0.as_str() {
            "mmap" => BackendKind::Mmap,
            _ => BackendKind::Heap,
        };
        let max_parallelism = count("state.max-parallelism")?;
        state_api::validate_max_parallelism(max_parallelism)
            .map_err(|e| invalid("state.max-parallelism", e.to_string()))?;
        // Flink's bounds, which the checkpoint coordinator enforces too: checked here so the
        // error names the key and where its value came from.
        let interval = duration("state.checkpoints.interval")?;
        if interval < Duration::from_millis(10) {
            return Err(invalid(
                "state.checkpoints.interval",
                "must be at least 10ms".into(),
            ));
        }
        let timeout = duration("state.checkpoints.timeout")?;
        if timeout < Duration::from_millis(10) {
            return Err(invalid(
                "state.checkpoints.timeout",
                "must be at least 10ms".into(),
            ));
        }
        let max_concurrent = count("state.checkpoints.max-concurrent")?;
        if max_concurrent == 0 {
            return Err(invalid(
                "state.checkpoints.max-concurrent",
                "must be at least 1".into(),
            ));
        }
        let retained = count("state.checkpoints.retained")?;
        if retained == 0 {
            return Err(invalid(
                "state.checkpoints.retained",
                "must be at least 1".into(),
            ));
        }
        let (budget, budget_origin) = get("state.mmap.memory-budget");
        let mmap_memory_budget = parse_size(&budget).map_err(|m| ConfigError::Invalid {
            key: "state.mmap.memory-budget".into(),
            origin: budget_origin.clone(),
            message: m,
        })?;
        if mmap_memory_budget < MIN_MMAP_BUDGET {
            return Err(ConfigError::Invalid {
                key: "state.mmap.memory-budget".into(),
                origin: budget_origin,
                message: format!("{budget} is below the minimum of 16MiB"),
            });
        }
        let checkpoints_dir = opt("state.checkpoints.dir");
        let savepoints_dir = opt("state.savepoints.dir");
        for (key, dir) in [
            ("state.checkpoints.dir", &checkpoints_dir),
            ("state.savepoints.dir", &savepoints_dir),
        ] {
            if let Some(url) = dir {
                check_dir_url(url).map_err(|m| invalid(key, m))?;
            }
        }
        let secret = |key: &'static str| opt(key).map(Secret::new);
        let optional_bool = |key: &'static str| -> Result<Option<bool>, ConfigError> {
            match self.values.get(key) {
                Some(_) => boolean(key).map(Some),
                None => Ok(None),
            }
        };
        Ok(Config {
            backend,
            max_parallelism,
            checkpoints: CheckpointSettings {
                dir: checkpoints_dir,
                incremental: boolean("state.checkpoints.incremental")?,
                interval,
                timeout,
                min_pause: duration("state.checkpoints.min-pause")?,
                max_concurrent,
                retained,
                tolerable_failures: count("state.checkpoints.tolerable-failures")?,
                on_shutdown: match get("state.checkpoints.on-shutdown").0.as_str() {
                    "retain" => Retention::Retain,
                    _ => Retention::Delete,
                },
            },
            savepoints_dir,
            mmap_memory_budget,
            mmap_dir: opt("state.mmap.dir").map(PathBuf::from),
            s3: S3Settings {
                endpoint: opt("s3.endpoint"),
                region: opt("s3.region"),
                access_key_id: secret("s3.access-key-id"),
                secret_access_key: secret("s3.secret-access-key"),
                allow_http: optional_bool("s3.allow-http")?,
                virtual_hosted_style: optional_bool("s3.virtual-hosted-style")?,
            },
        })
    }
}

fn describe(ty: KeyType) -> String {
    match ty {
        KeyType::Str | KeyType::Secret => "a string".into(),
        KeyType::Url => "a URL string".into(),
        KeyType::Bool => "true or false".into(),
        KeyType::Duration => "a duration string such as \"10s\"".into(),
        KeyType::Size => "a size such as \"256MiB\"".into(),
        KeyType::Count => "a non-negative integer".into(),
        KeyType::Choice(c) => format!("one of {}", c.join(", ")),
    }
}

fn check_value(doc: &KeyDoc, value: &str, origin: &Origin) -> Result<(), ConfigError> {
    let result = match doc.ty {
        KeyType::Str | KeyType::Secret | KeyType::Url => Ok(()),
        KeyType::Bool => parse_bool(value).map(|_| ()),
        KeyType::Duration => parse_duration(value).map(|_| ()),
        KeyType::Size => parse_size(value).map(|_| ()),
        KeyType::Count => parse_count(value).map(|_| ()),
        KeyType::Choice(choices) => {
            if choices.contains(&value) {
                Ok(())
            } else {
                Err(format!("'{value}' is not {}", describe(doc.ty)))
            }
        }
    };
    result.map_err(|message| ConfigError::Invalid {
        key: doc.key.to_string(),
        origin: origin.clone(),
        message,
    })
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("'{other}' is not true or false")),
    }
}

fn parse_count(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .map_err(|_| format!("'{v}' is not a non-negative integer"))
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("'{v}' is not a duration ({e}); write e.g. 500ms, 10s, 5min"))
}

fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{v}' is not a size; write e.g. 256MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        "TiB" | "T" | "TB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{v}'; use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{v}' is too large"))
}

/// A checkpoint or savepoint URL must parse, have a supported scheme, and for local
/// directories be creatable and writable.
fn check_dir_url(url: &str) -> Result<(), String> {
    // Syntax first (`..` segments, credentials): nothing is created for a URL that is refused.
    storage_s3::Storage::check_url(url).map_err(|e| e.to_string())?;
    let local = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(format!("'{url}' must be an absolute file:/// URL"));
        }
        Some(PathBuf::from(rest))
    } else if url.starts_with('/') {
        Some(PathBuf::from(url))
    } else if url.starts_with("memory://") {
        None
    } else if let Some(rest) = url.strip_prefix("s3://") {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(format!("'{url}' has no bucket: write s3://bucket/prefix"));
        }
        None
    } else {
        return Err(format!(
            "'{url}' is not a supported URL: use file:///abs/dir, s3://bucket/prefix or memory://"
        ));
    };
    if let Some(dir) = local {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
        let probe = dir.join(format!(".flowstate-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .map_err(|e| format!("directory {} is not writable: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_default_file_env_code() {
        let file = "[state.checkpoints]\ninterval = \"20s\"\nretained = 2\ntimeout = \"1min\"\n";
        let l = ConfigLoader::new().toml_str(file, "/etc/f.toml").unwrap();
        let c = l.load().unwrap();
        assert_eq!(c.checkpoints.interval, Duration::from_secs(20));
        assert_eq!(c.checkpoints.min_pause, Duration::ZERO, "default");
        let l = l
            .env_vars([
                ("FLOWSTATE_STATE_CHECKPOINTS_INTERVAL", "30s"),
                ("FLOWSTATE_STATE_CHECKPOINTS_RETAINED", "4"),
                ("PATH", "/bin"),
                ("FLOWSTATE_REQUIRE_S3", "1"),
                ("FLOWSTATE_S3_TEST_BUCKET", "b"),
            ])
            .unwrap();
        let l = l.set("state.checkpoints.interval", "40s").unwrap();
        let c = l.load().unwrap();
        assert_eq!(c.checkpoints.interval, Duration::from_secs(40), "code wins");
        assert_eq!(c.checkpoints.retained, 4, "env wins over file");
        assert_eq!(
            c.checkpoints.timeout,
            Duration::from_secs(60),
            "file wins over default"
        );
        assert_eq!(
            l.origin("state.checkpoints.retained"),
            Origin::Env("FLOWSTATE_STATE_CHECKPOINTS_RETAINED".into())
        );
        assert_eq!(l.origin("state.backend"), Origin::Default);
    }

    #[test]
    fn bad_input_names_the_key_and_the_source() {
        let err = |file: &str| {
            ConfigLoader::new()
                .toml_str(file, "/etc/flowstate.toml")
                .and_then(|l| l.load())
                .unwrap_err()
                .to_string()
        };
        let e = err("[state]\nbackend = \"rocks\"\n");
        assert!(
            e.contains("state.backend")
                && e.contains("/etc/flowstate.toml")
                && e.contains("heap, mmap"),
            "{e}"
        );
        let e = err("[state.checkpoints]\nintervall = \"1s\"\n");
        assert!(
            e.contains("unknown key 'state.checkpoints.intervall'") && e.contains("did you mean"),
            "{e}"
        );
        let e = err("[state.checkpoints]\ninterval = \"0s\"\n");
        assert!(
            e.contains("state.checkpoints.interval") && e.contains("at least 10ms"),
            "{e}"
        );
        let e = err("[state.checkpoints]\ninterval = 10\n");
        assert!(e.contains("expected a duration"), "{e}");
        let e = err("[state.mmap]\nmemory-budget = \"1MiB\"\n");
        assert!(e.contains("below the minimum"), "{e}");
        let e = err("[state.checkpoints]\ndir = \"ftp://x/y\"\n");
        assert!(e.contains("not a supported URL"), "{e}");
        let e = err("[state.checkpoints]\ndir = \"s3://\"\n");
        assert!(e.contains("no bucket"), "{e}");
        let e = err("[state.checkpoints]\ndir = \"file:///proc/forbidden/dir\"\n");
        assert!(
            e.contains("cannot create directory") || e.contains("not writable"),
            "{e}"
        );
        let e = err("[state\nbackend=");
        assert!(e.contains("not valid TOML"), "{e}");
        let e = err("[state]\nmax-parallelism = 40000\n");
        assert!(e.contains("state.max-parallelism"), "{e}");
        let e = ConfigLoader::new()
            .env_vars([("FLOWSTATE_STATE_BACKND", "heap")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLOWSTATE_STATE_BACKND"), "{e}");
        let e = ConfigLoader::new()
            .file("/nonexistent/flowstate.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/flowstate.toml"), "{e}");
    }

    #[test]
    fn secrets_are_never_printed() {
        let c = ConfigLoader::new()
            .toml_str(
                "[s3]\nsecret-access-key = \"hunter2\"\naccess-key-id = \"AKIA123\"\n",
                "f.toml",
            )
            .unwrap()
            .load()
            .unwrap();
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("AKIA123"),
            "{printed}"
        );
        assert_eq!(
            c.s3.secret_access_key.as_ref().map(Secret::expose),
            Some("hunter2")
        );
    }

    #[test]
    fn sizes_and_env_names() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(KEYS[0].env_var(), "FLOWSTATE_STATE_BACKEND");
        let doc = key_doc("state.checkpoints.min-pause").unwrap();
        assert_eq!(doc.env_var(), "FLOWSTATE_STATE_CHECKPOINTS_MIN_PAUSE");
        // Every default parses.
        let c = ConfigLoader::new().load().unwrap();
        assert_eq!(c.max_parallelism, 128);
        assert_eq!(c.checkpoints.timeout, Duration::from_secs(600));
        assert_eq!(c.mmap_memory_budget, 256 << 20);
    }
}

#[cfg(test)]
mod readme {
    use super::KEYS;

    /// The README documents every key with its variable and default: keep it true.
    #[test]
    fn readme_lists_every_key() {
        let readme = include_str!("../../README.md");
        for k in KEYS {
            let default = if k.default.is_empty() {
                "—".to_string()
            } else {
                format!("`{}`", k.default)
            };
            let row = format!("| `{}` | `{}` | {} |", k.key, k.env_var(), default);
            assert!(
                readme.contains(&row),
                "README lacks the row for {}: {row}",
                k.key
            );
        }
        // The README's example file uses only known keys with valid values.
        let start = readme.find("```toml\n").expect("a toml block") + 8;
        let end = start + readme[start..].find("```").expect("its end");
        super::ConfigLoader::new()
            .toml_str(&readme[start..end], "README.md")
            .expect("the README's example config is valid");
    }
}
