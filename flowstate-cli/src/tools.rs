//! Offline tools behind the CLI: list and inspect checkpoints (the state of any job is read,
//! converted and written by [`crate::state`]).

use checkpoint::{CheckpointStorage, CompletedCheckpoint, FileLocation, SnapshotKind};
use object_store::path::Path as ObjectPath;
use serde_json::json;

use crate::job::JobError;
use flowstate::config::Config;

/// A URL for a path or URL: `scheme://…` is kept, a path becomes an absolute `file://` URL.
pub fn to_url(path_or_url: &str) -> Result<String, JobError> {
    if path_or_url.contains("://") {
        return Ok(path_or_url.to_string());
    }
    let p = std::path::Path::new(path_or_url);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(format!("file://{}", abs.display()))
}

/// Writes one line to standard output. A closed standard output (`flowstate ... | head -1`)
/// is an error the caller returns, which `main` turns into a quiet exit, never a panic.
pub fn print_line(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")
}

/// [`print_line`] with `format!` syntax, returning its error from the calling function.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::tools::print_line(format_args!($($arg)*))?
    };
}

/// A progress bar on standard error when `show` and standard error is a terminal (never in
/// pipes, logs or tests); `bytes` shows its counts as sizes.
pub fn progress_bar(
    show: bool,
    len: u64,
    bytes: bool,
    what: &str,
) -> Result<Option<indicatif::ProgressBar>, JobError> {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let template = if bytes {
        "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} | {msg}"
    } else {
        "{bar:30} {pos}/{len} | {msg}"
    };
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(template).map_err(|e| e.to_string())?);
    bar.set_message(what.to_string());
    Ok(Some(bar))
}

/// A checkpoint root as the user should see it: a `file://` URL as its path, anything else as
/// given (pasteable into the next command either way).
pub fn shown_dir(url: &str) -> String {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => path.to_string(),
        _ => url.to_string(),
    }
}

/// The jobs that have checkpoints under the root of `storage` (the folders beside its job's).
pub fn jobs_under(storage: &CheckpointStorage) -> Result<Vec<String>, JobError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let root = storage.root();
    let listed = rt.block_on(storage.store().list_with_delimiter(Some(root)));
    let listed = match listed {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut jobs: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .filter(|name| name != "savepoints")
        .collect();
    jobs.sort();
    Ok(jobs)
}

/// `" (jobs there: a, b)"`, `" (no job has checkpoints there)"`: what a user who named the
/// wrong job or directory needs to know.
pub fn jobs_hint(storage: &CheckpointStorage) -> Result<String, JobError> {
    let jobs = jobs_under(storage)?;
    Ok(if jobs.is_empty() {
        " (no job has checkpoints there)".to_string()
    } else {
        format!(" (jobs there: {}; choose one with --job)", jobs.join(", "))
    })
}

/// Splits a URL into the store's URL and the object path inside it: local paths get a store at
/// `/`, `s3://bucket/a/b` a store for the bucket and the path `a/b`.
fn split(url: &str) -> Result<(String, String), JobError> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(("file:///".into(), rest.trim_start_matches('/').to_string()));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        return Ok((
            format!("{scheme}://{bucket}"),
            path.trim_matches('/').to_string(),
        ));
    }
    Err(format!("'{url}' is not a URL").into())
}

/// Opens the checkpoint or savepoint at `path_or_url` (its directory or `_metadata`).
pub fn open_checkpoint(
    config: &Config,
    path_or_url: &str,
) -> Result<(CheckpointStorage, CompletedCheckpoint), JobError> {
    let (store_url, path) = split(&to_url(path_or_url)?)?;
    let storage = storage_s3::Storage::from_config(&config.storage_config(&store_url))?;
    let storage = CheckpointStorage::from_storage(&storage, "offline")?;
    let object = ObjectPath::parse(&path).map_err(|e| format!("bad path '{path}': {e}"))?;
    let c = CompletedCheckpoint::load(&storage, &object)
        .map_err(|e| format!("cannot read the checkpoint at {path_or_url}: {e}"))?;
    Ok((storage, c))
}

/// A time as RFC 3339 in UTC, to the second.
pub fn time(millis: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn is_incremental(c: &CompletedCheckpoint) -> bool {
    c.metadata
        .files()
        .any(|f| matches!(f.location, FileLocation::Shared(_)))
}

fn size(c: &CompletedCheckpoint) -> u64 {
    c.metadata.files().map(|f| f.size).sum()
}

/// The storage of `job` under the checkpoint root `dir` (a path or URL); a local directory
/// that does not exist is an error that says so.
pub fn job_storage(config: &Config, dir: &str, job: &str) -> Result<CheckpointStorage, JobError> {
    let url = to_url(dir)?;
    if let Some(path) = url.strip_prefix("file://") {
        if !std::path::Path::new(path).is_dir() {
            return Err(format!("no checkpoint directory at {path}: it does not exist").into());
        }
    }
    crate::job::open_storage(config, &url, job)
}

/// Prints the completed checkpoints of `job` under `dir` (`json`: as a JSON array). A
/// directory or job without any checkpoint is an error that says what was not found.
pub fn list(config: &Config, dir: &str, job: &str, json_out: bool) -> Result<(), JobError> {
    let url = to_url(dir)?;
    let storage = job_storage(config, dir, job)?;
    let all = CompletedCheckpoint::retained(&storage, usize::MAX)?;
    if all.is_empty() {
        return Err(format!(
            "no completed checkpoint of job '{job}' under {}{}",
            shown_dir(&url),
            jobs_hint(&storage)?
        )
        .into());
    }
    if json_out {
        let doc: Vec<serde_json::Value> = all
            .iter()
            .map(|c| {
                json!({
                    "id": c.metadata.checkpoint_id,
                    "time": time(c.metadata.timestamp_millis),
                    "timestamp_millis": c.metadata.timestamp_millis,
                    "bytes": size(c),
                    "incremental": is_incremental(c),
                    "duration_millis": c.metadata.duration_millis,
                    "path": c.dir_location(),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    outln!(
        "{:>6}  {:<20}  {:>12}  {:<11}  {:>10}  path",
        "id",
        "time (UTC)",
        "size",
        "kind",
        "duration"
    );
    for c in all {
        // Recorded by the coordinator from its own clock (trigger to `_metadata`); never the
        // store's Last-Modified minus the trigger time, which mixes two clocks.
        let duration = c
            .metadata
            .duration_millis
            .map_or("-".to_string(), |ms| format!("{ms} ms"));
        outln!(
            "{:>6}  {:<20}  {:>12}  {:<11}  {:>10}  {}",
            c.metadata.checkpoint_id,
            time(c.metadata.timestamp_millis),
            c_size(size(&c)),
            if is_incremental(&c) {
                "incremental"
            } else {
                "full"
            },
            duration,
            c.dir_location()
        );
    }
    Ok(())
}

/// A size for people: `12 B`, `3.4 KiB`, `1.2 MiB`, `2.0 GiB`.
pub fn c_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// A subtask's summary as JSON (`checkpoint::CompletedCheckpoint::inspect` verified it).
fn subtask_json(s: &checkpoint::SubtaskSummary) -> serde_json::Value {
    json!({
        "subtask": s.subtask,
        "format": match &s.format {
            checkpoint::KeyedFormat::None => None,
            checkpoint::KeyedFormat::Canonical => Some("canonical".to_string()),
            checkpoint::KeyedFormat::Native(b) => Some(format!("native {b}")),
        },
        "key_groups": s.key_group_range.map(|r| r.to_string()),
        "key_groups_with_data": s.key_groups_with_data,
        "entries": s.entries,
        "bytes": s.bytes,
        "files": s.files.iter().map(|f| json!({
            "name": f.location.name(),
            "shared": matches!(f.location, FileLocation::Shared(_)),
            "size": f.size,
            "delta": f.delta,
            "key_groups": f.key_groups.map(|r| r.to_string()),
        })).collect::<Vec<_>>(),
    })
}

/// Prints what a checkpoint or savepoint holds (`json` for machines).
pub fn inspect(config: &Config, path: &str, json_out: bool) -> Result<(), JobError> {
    let (storage, c) = open_checkpoint(config, path)?;
    // Every file verified (size, CRC32C, blocks); entries counted from the verified data.
    // Native state is read through its backend's format (the mmap one, when compiled in).
    #[cfg(feature = "mmap")]
    let formats: &[&dyn state_api::checkpointing::NativeFormat] = &[&state_mmap::MmapNativeFormat];
    #[cfg(not(feature = "mmap"))]
    let formats: &[&dyn state_api::checkpointing::NativeFormat] = &[];
    let summary = c.inspect_with(&storage, formats)?;
    let m = &c.metadata;
    let mut operators = Vec::new();
    for (op, sum) in m.operators.iter().zip(&summary) {
        let mut states = std::collections::BTreeMap::new();
        let mut subtasks = Vec::new();
        for (s, ss) in op.subtasks.iter().zip(&sum.subtasks) {
            // Canonical files' headers, or the native state registry.
            for st in &ss.states {
                states.insert(
                    st.name.to_string(),
                    json!({
                        "kind": st.kind.to_string(),
                        "ttl_millis": st.ttl_millis,
                        "serializers": st.serializers.iter().map(|(r, s)| json!({
                            "role": r.name(), "id": s.id, "version": s.version,
                            "schema": String::from_utf8_lossy(&s.schema),
                        })).collect::<Vec<_>>(),
                    }),
                );
            }
            let mut sub = subtask_json(ss);
            sub["operator_state"] = json!(s.operator_state.as_ref().map(|o| o
                .state_names()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()));
            subtasks.push(sub);
        }
        operators.push(json!({
            "operator": op.operator_id,
            "parallelism": op.parallelism,
            "max_parallelism": op.max_parallelism,
            "states": states,
            "subtasks": subtasks,
        }));
    }
    let doc = json!({
        "path": c.path.to_string(),
        "kind": match m.kind { SnapshotKind::Checkpoint => "checkpoint", SnapshotKind::Savepoint => "savepoint" },
        "id": m.checkpoint_id,
        "job": m.job_id,
        "time": time(m.timestamp_millis),
        "incremental": is_incremental(&c),
        "bytes": size(&c),
        "operators": operators,
    });
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    outln!(
        "{} {} of job '{}' at {} ({}, {})",
        doc["kind"].as_str().unwrap_or("?"),
        m.checkpoint_id,
        m.job_id,
        time(m.timestamp_millis),
        if is_incremental(&c) {
            "incremental"
        } else {
            "full"
        },
        c_size(size(&c))
    );
    for op in &m.operators {
        outln!(
            "operator '{}': parallelism {}, max parallelism {}",
            op.operator_id,
            op.parallelism,
            op.max_parallelism
        );
        if let Some(states) = doc["operators"]
            .as_array()
            .and_then(|ops| {
                ops.iter()
                    .find(|o| o["operator"] == op.operator_id.as_str())
            })
            .and_then(|o| o["states"].as_object())
        {
            for (name, s) in states {
                let sers: Vec<String> = s["serializers"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                format!(
                                    "{} {} v{}",
                                    x["role"].as_str().unwrap_or(""),
                                    x["id"].as_str().unwrap_or(""),
                                    x["version"]
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                outln!(
                    "  state '{name}': {} [{}]",
                    s["kind"].as_str().unwrap_or("?"),
                    sers.join(", ")
                );
            }
        }
        let subs = summary
            .iter()
            .find(|o| o.operator_id == op.operator_id)
            .map(|o| &o.subtasks[..])
            .unwrap_or_default();
        for (s, ss) in op.subtasks.iter().zip(subs) {
            match (&ss.format, ss.key_group_range) {
                (checkpoint::KeyedFormat::Native(b), Some(r)) => outln!(
                    "  subtask {}: key groups {r}, native {b} files covering {} key groups, {} files, {}",
                    s.subtask,
                    ss.key_groups_with_data,
                    ss.files.len(),
                    c_size(ss.bytes)
                ),
                (_, Some(r)) => outln!(
                    "  subtask {}: key groups {r}, {} entries, {} files, {}",
                    s.subtask,
                    ss.entries.unwrap_or(0),
                    ss.files.len(),
                    c_size(ss.bytes)
                ),
                (_, None) => outln!(
                    "  subtask {}: operator state [{}]",
                    s.subtask,
                    s.operator_state
                        .as_ref()
                        .map(|o| o
                            .state_names()
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                ),
            }
        }
    }
    Ok(())
}
