//! `flowstate state list|dump|get` and `flowstate savepoint` for any job's checkpoint or
//! savepoint, on the State Processor of the checkpoint crate
//! ([`checkpoint::processor`]): driven by the checkpoint's metadata and serializer snapshots,
//! decoding what the built-in serializers wrote and showing the rest as hex with its key
//! group.

use std::io::Write;

use checkpoint::processor::builtin::{decode, encode_text, hex, unhex, Decoded};
use checkpoint::processor::{RawEntry, SavepointReader, SavepointWriter};
use checkpoint::{KeyedFormat, SnapshotKind};
use serde_json::{json, Value};
use state_api::snapshot::{payload, Decoder};
use state_api::{SerializerRole, SerializerSnapshot, StateKind, StateMeta};

use crate::job::JobError;

/// Writes a line to standard output (see [`crate::tools::print_line`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        crate::tools::print_line(format_args!($($arg)*))?
    };
}
use crate::tools::{open_checkpoint, to_url};
use flowstate::config::{BackendKind, Config};

/// Opens the checkpoint or savepoint at `path` for reading its state. Native (mmap) state is
/// converted through the mmap backend when `convert` (and the `mmap` feature) allow it.
pub fn open_reader(
    config: &Config,
    path: &str,
    convert: bool,
) -> Result<SavepointReader, JobError> {
    let (storage, c) = open_checkpoint(config, path)?;
    let mut reader = SavepointReader::from_checkpoint(&storage, c);
    let native: Vec<String> = reader
        .checkpoint()
        .metadata
        .operators
        .iter()
        .filter(|o| reader.has_native_state(&o.operator_id))
        .map(|o| o.operator_id.clone())
        .collect();
    if !native.is_empty() && convert {
        convert_native(config, &mut reader)?;
    }
    Ok(reader)
}

#[cfg(feature = "mmap")]
fn convert_native(config: &Config, reader: &mut SavepointReader) -> Result<(), JobError> {
    use checkpoint::processor::RawSerializer;
    let env = state_mmap::MmapEnvironment::new(state_mmap::EnvOptions {
        memory_budget: usize::try_from(config.mmap_memory_budget).unwrap_or(usize::MAX),
        ..state_mmap::EnvOptions::default()
    })?;
    let scratch = std::env::temp_dir().join(format!("flowstate-convert-{}", std::process::id()));
    let download = scratch.join("download");
    let mmap_dir = config.mmap_dir.clone();
    let result = reader.convert_native(
        |operator, max_parallelism, handle| {
            let corrupt = |reason: String| checkpoint::Error::Corrupt {
                file: format!("the native state of operator '{operator}'"),
                offset: 0,
                reason,
            };
            let meta = state_mmap::NativeCheckpointMeta::decode(&handle.metadata)
                .map_err(|e| corrupt(e.to_string()))?;
            let keys = meta.key_serializers().map_err(|e| corrupt(e.to_string()))?;
            if keys.len() > 1 {
                return Err(corrupt(format!(
                    "its states were written with {} different key serializers",
                    keys.len()
                )));
            }
            let key = keys.into_iter().next().unwrap_or(SerializerSnapshot {
                id: String::new(),
                version: 0,
                schema: Vec::new(),
            });
            let mut b = state_mmap::MmapKeyedStateBackend::<Vec<u8>>::builder()
                .max_parallelism(max_parallelism)
                .key_group_range(handle.key_group_range)
                .key_serializer(RawSerializer(key))
                .environment(env.clone());
            if let Some(dir) = &mmap_dir {
                b = b.working_directory_in(dir);
            }
            b.build()
                .map_err(|e| checkpoint::Error::state(operator, 0, e))
        },
        &download,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(())
}

#[cfg(not(feature = "mmap"))]
fn convert_native(_config: &Config, reader: &mut SavepointReader) -> Result<(), JobError> {
    Err(format!(
        "{} holds native mmap files, which only the mmap backend reads: use a build with \
         --features mmap",
        reader.checkpoint().location()
    )
    .into())
}

/// A number as JSON: exact when it fits 64 bits, a string otherwise.
fn json_of(d: &Decoded) -> Value {
    match d {
        Decoded::Unit | Decoded::None => Value::Null,
        Decoded::Bool(b) => json!(b),
        Decoded::Int(i) => i64::try_from(*i).map_or_else(|_| json!(i.to_string()), |v| json!(v)),
        Decoded::UInt(u) => u64::try_from(*u).map_or_else(|_| json!(u.to_string()), |v| json!(v)),
        Decoded::Float(x) => {
            serde_json::Number::from_f64(*x).map_or(json!(x.to_string()), Value::Number)
        }
        Decoded::Str(s) => json!(s),
        Decoded::Bytes(b) => json!({ "hex": hex(b) }),
        Decoded::Some(v) => json_of(v),
        Decoded::Seq(items) => Value::Array(items.iter().map(json_of).collect()),
    }
}

/// Bytes of a serializer `role` as JSON: decoded when a built-in serializer wrote them,
/// otherwise `{"hex": ...}` (with the decoder's complaint when they did not fit).
fn field(serializer: Option<&SerializerSnapshot>, bytes: &[u8]) -> Value {
    match serializer.and_then(|s| decode(s, bytes)) {
        Some(Ok(d)) => json_of(&d),
        Some(Err(e)) => json!({ "hex": hex(bytes), "error": e }),
        None => json!({ "hex": hex(bytes) }),
    }
}

/// One entry as a JSON object: operator, state, kind, key group, key, namespace, value (for
/// lists an array, for maps an array of `{key, value}`, for timers `{timestamp, domain}`).
/// `key_serializer` is the operator's.
pub fn entry_json(
    operator: &str,
    key_serializer: Option<&SerializerSnapshot>,
    e: &RawEntry,
) -> Value {
    let meta = &e.state;
    let role = |r: SerializerRole| meta.serializer(r);
    let mut d = Decoder::new(&e.payload, 0, "payload");
    let raw = || json!({ "hex": hex(&e.payload) });
    let (value, ttl) = match meta.kind {
        StateKind::Value | StateKind::Reducing | StateKind::Aggregating => {
            match payload::decode_single(&mut d) {
                Ok((ts, v)) => (field(role(SerializerRole::Value), v), ts),
                Err(_) => (raw(), 0),
            }
        }
        StateKind::List => match payload::decode_list(&mut d) {
            Ok(items) => (
                Value::Array(
                    items
                        .iter()
                        .map(|(_, v)| field(role(SerializerRole::Value), v))
                        .collect(),
                ),
                items.iter().map(|(ts, _)| *ts).max().unwrap_or(0),
            ),
            Err(_) => (raw(), 0),
        },
        StateKind::Map => match payload::decode_map(&mut d) {
            Ok(items) => (
                Value::Array(
                    items
                        .iter()
                        .map(|(_, k, v)| {
                            json!({
                                "key": field(role(SerializerRole::UserKey), k),
                                "value": field(role(SerializerRole::UserValue), v),
                            })
                        })
                        .collect(),
                ),
                items.iter().map(|(ts, _, _)| *ts).max().unwrap_or(0),
            ),
            Err(_) => (raw(), 0),
        },
        StateKind::Timers => match state_api::timer::decode_timer_payload(&mut d) {
            Ok((ts, domain)) => (
                json!({
                    "timestamp": ts,
                    "domain": match domain {
                        state_api::TimeDomain::EventTime => "event-time",
                        state_api::TimeDomain::ProcessingTime => "processing-time",
                    },
                }),
                0,
            ),
            Err(_) => (raw(), 0),
        },
    };
    let mut out = json!({
        "operator": operator,
        "state": meta.name.as_str(),
        "kind": meta.kind.to_string(),
        "key_group": e.key_group,
        "key": field(key_serializer, &e.key),
        "namespace": field(role(SerializerRole::Namespace), &e.namespace),
        "value": value,
    });
    if meta.ttl_millis.is_some() {
        out["ttl_timestamp"] = json!(ttl);
    }
    out
}

fn serializers_json(m: &StateMeta) -> Value {
    Value::Array(
        m.serializers
            .iter()
            .map(|(r, s)| {
                json!({
                    "role": r.name(),
                    "id": s.id,
                    "version": s.version,
                    "schema": String::from_utf8_lossy(&s.schema),
                })
            })
            .collect(),
    )
}

fn describe(s: &SerializerSnapshot) -> String {
    if s.schema.is_empty() {
        format!("{} v{}", s.id, s.version)
    } else {
        format!(
            "{} v{} {}",
            s.id,
            s.version,
            String::from_utf8_lossy(&s.schema)
        )
    }
}

fn format_name(f: &KeyedFormat) -> String {
    match f {
        KeyedFormat::None => "no keyed state".into(),
        KeyedFormat::Canonical => "canonical".into(),
        KeyedFormat::Native(b) => format!("native {b}"),
    }
}

/// `flowstate state list`: operators, states (kind, serializers, TTL), entries and bytes per
/// key group.
pub fn list(config: &Config, path: &str, json_out: bool) -> Result<(), JobError> {
    let reader = open_reader(config, path, true)?;
    let c = reader.checkpoint();
    let mut operators = Vec::new();
    for op in reader.operators()? {
        let stats = if matches!(op.format, KeyedFormat::None) {
            Vec::new()
        } else {
            reader.state_stats(&op.operator_id)?
        };
        let states: Vec<Value> = op
            .states
            .iter()
            .map(|m| {
                let s = stats.iter().find(|s| s.meta.name == m.name);
                json!({
                    "name": m.name.as_str(),
                    "kind": m.kind.to_string(),
                    "ttl_millis": m.ttl_millis,
                    "serializers": serializers_json(m),
                    "entries": s.map_or(0, |s| s.entries()),
                    "bytes": s.map_or(0, |s| s.bytes()),
                    "key_groups": s.map(|s| s.key_groups.iter().map(|(kg, k)| json!({
                        "key_group": kg, "entries": k.entries, "bytes": k.bytes,
                    })).collect::<Vec<_>>()).unwrap_or_default(),
                })
            })
            .collect();
        operators.push(json!({
            "operator": op.operator_id,
            "parallelism": op.parallelism,
            "max_parallelism": op.max_parallelism,
            "format": format_name(&op.format),
            "key_serializer": op.key_serializer.as_ref().map(|s| json!({
                "id": s.id, "version": s.version, "schema": String::from_utf8_lossy(&s.schema),
            })),
            "states": states,
            "operator_states": op.operator_states,
        }));
    }
    let m = &c.metadata;
    let kind = match m.kind {
        SnapshotKind::Checkpoint => "checkpoint",
        SnapshotKind::Savepoint => "savepoint",
    };
    if json_out {
        let doc = json!({
            "path": c.dir_location(),
            "kind": kind,
            "id": m.checkpoint_id,
            "job": m.job_id,
            "operators": operators,
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    outln!(
        "{kind} {} of job '{}': {}",
        m.checkpoint_id,
        m.job_id,
        c.dir_location()
    );
    for op in &operators {
        outln!(
            "operator '{}': parallelism {}, max parallelism {}, {}{}",
            op["operator"].as_str().unwrap_or(""),
            op["parallelism"],
            op["max_parallelism"],
            op["format"].as_str().unwrap_or(""),
            op["key_serializer"]
                .as_object()
                .map(|k| format!(
                    ", keys {} v{} {}",
                    k["id"].as_str().unwrap_or(""),
                    k["version"],
                    k["schema"].as_str().unwrap_or("")
                ))
                .unwrap_or_default()
        );
        for s in op["states"].as_array().into_iter().flatten() {
            let sers: Vec<String> = s["serializers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    let schema = x["schema"].as_str().unwrap_or("");
                    format!(
                        "{} {} v{}{}{}",
                        x["role"].as_str().unwrap_or(""),
                        x["id"].as_str().unwrap_or(""),
                        x["version"],
                        if schema.is_empty() { "" } else { " " },
                        schema
                    )
                })
                .collect();
            outln!(
                "  state '{}': {}{} [{}]: {} entries in {} key groups, {} bytes",
                s["name"].as_str().unwrap_or(""),
                s["kind"].as_str().unwrap_or(""),
                s["ttl_millis"]
                    .as_i64()
                    .map(|t| format!(" (TTL {t} ms)"))
                    .unwrap_or_default(),
                sers.join(", "),
                s["entries"],
                s["key_groups"].as_array().map_or(0, |a| a.len()),
                s["bytes"]
            );
        }
        if let Some(names) = op["operator_states"].as_array().filter(|a| !a.is_empty()) {
            let names: Vec<&str> = names.iter().filter_map(|n| n.as_str()).collect();
            outln!("  operator state: {}", names.join(", "));
        }
    }
    Ok(())
}

/// What `flowstate state dump` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpFormat {
    /// One JSON object per line ([`entry_json`]).
    JsonLines,
    /// An Apache Parquet file (feature `parquet`): one row per entry, columns `operator`,
    /// `state`, `kind`, `key_group`, and `key`, `namespace`, `value` as JSON text (as in the
    /// JSON Lines), `ttl_timestamp` (null without TTL).
    Parquet,
}

/// Options of `flowstate state dump`.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// Only this operator (all without).
    pub operator: Option<String>,
    /// Only this state (of every operator that has one of that name, or of `operator`).
    pub state: Option<String>,
    /// The output format.
    pub format: DumpFormat,
    /// The output file (standard output without; required for Parquet).
    pub output: Option<std::path::PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// `flowstate state dump`: every entry of the chosen states, one JSON object per line
/// ([`entry_json`]).
pub fn dump(config: &Config, path: &str, opts: &DumpOptions) -> Result<(), JobError> {
    let reader = open_reader(config, path, true)?;
    let ops = reader.operators()?;
    if let Some(op) = &opts.operator {
        reader.operator(op)?;
    }
    let chosen: Vec<_> = ops
        .iter()
        .filter(|o| opts.operator.as_ref().is_none_or(|x| *x == o.operator_id))
        .filter(|o| !matches!(o.format, KeyedFormat::None))
        .filter(|o| opts.state.as_ref().is_none_or(|s| o.state(s).is_some()))
        .collect();
    if let Some(s) = &opts.state {
        if chosen.is_empty() {
            let mut have = Vec::new();
            for o in &ops {
                for st in &o.states {
                    have.push(format!("{}/{}", o.operator_id, st.name));
                }
            }
            return Err(format!(
                "no state '{s}' in {} (there are: {})",
                reader.checkpoint().dir_location(),
                have.join(", ")
            )
            .into());
        }
    }
    let total: u64 = chosen
        .iter()
        .map(|o| {
            reader
                .checkpoint()
                .metadata
                .operator(&o.operator_id)
                .map_or(0, |m| {
                    m.subtasks
                        .iter()
                        .filter_map(|s| s.keyed.as_ref())
                        .map(|k| k.state_size())
                        .sum::<u64>()
                })
        })
        .sum();
    let bar = crate::tools::progress_bar(opts.progress, total, true, "dumping state")?;
    if opts.format == DumpFormat::Parquet {
        let path = opts
            .output
            .as_deref()
            .ok_or("Parquet output goes to a file: pass --output FILE.parquet")?;
        let mut sink = parquet_out::ParquetSink::create(path)?;
        for op in chosen {
            for e in reader.raw_entries(&op.operator_id, opts.state.as_deref())? {
                let e = e?;
                if let Some(bar) = &bar {
                    bar.inc((e.key.len() + e.namespace.len() + e.payload.len() + 16) as u64);
                }
                sink.push(&entry_json(&op.operator_id, op.key_serializer.as_ref(), &e))?;
            }
        }
        sink.finish()?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        return Ok(());
    }
    let mut out: Box<dyn Write> = match &opts.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(|e| format!("cannot create '{}': {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for op in chosen {
        for e in reader.raw_entries(&op.operator_id, opts.state.as_deref())? {
            let e = e?;
            if let Some(bar) = &bar {
                bar.inc((e.key.len() + e.namespace.len() + e.payload.len() + 16) as u64);
            }
            // A closed standard output is an I/O error (a quiet end in `main`), not JSON's.
            serde_json::to_writer(
                &mut out,
                &entry_json(&op.operator_id, op.key_serializer.as_ref(), &e),
            )
            .map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// Options of `flowstate state get`.
#[derive(Clone, Debug)]
pub struct GetOptions {
    /// The state.
    pub state: String,
    /// The key, as text (or hex with `key_hex`).
    pub key: String,
    /// `key` is the key's serialized bytes in hex.
    pub key_hex: bool,
    /// The operator (needed when several have a state of that name).
    pub operator: Option<String>,
    /// Only this namespace, as text.
    pub namespace: Option<String>,
    /// JSON Lines instead of text.
    pub json: bool,
}

/// `flowstate state get`: the entries of one key of one state, in every namespace (or one).
pub fn get(config: &Config, path: &str, opts: &GetOptions) -> Result<(), JobError> {
    let reader = open_reader(config, path, true)?;
    let ops = reader.operators()?;
    let with_state: Vec<_> = ops
        .iter()
        .filter(|o| opts.operator.as_ref().is_none_or(|x| *x == o.operator_id))
        .filter(|o| o.state(&opts.state).is_some())
        .collect();
    let op = match with_state[..] {
        [op] => op,
        [] => {
            if let Some(o) = &opts.operator {
                reader.state(o, &opts.state)?;
            }
            let have: Vec<String> = ops
                .iter()
                .flat_map(|o| {
                    o.states
                        .iter()
                        .map(move |s| format!("{}/{}", o.operator_id, s.name))
                })
                .collect();
            return Err(format!(
                "no state '{}' in {} (there are: {})",
                opts.state,
                reader.checkpoint().dir_location(),
                have.join(", ")
            )
            .into());
        }
        _ => {
            let names: Vec<&str> = with_state.iter().map(|o| o.operator_id.as_str()).collect();
            return Err(format!(
                "operators {} all have a state '{}': choose one with --operator",
                names.join(", "),
                opts.state
            )
            .into());
        }
    };
    let meta = op.state(&opts.state).cloned().ok_or("state vanished")?;
    let key_ser = op
        .key_serializer
        .clone()
        .ok_or_else(|| format!("operator '{}' has no keyed state", op.operator_id))?;
    let key = if opts.key_hex {
        unhex(&opts.key).map_err(|e| format!("--key-hex: {e}"))?
    } else {
        match encode_text(&key_ser, &opts.key) {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(format!("--key: {e}").into()),
            None => {
                return Err(format!(
                    "keys of operator '{}' are written by {}, which cannot be typed here: pass \
                     the key's serialized bytes with --key-hex",
                    op.operator_id,
                    describe(&key_ser)
                )
                .into())
            }
        }
    };
    let namespace = match &opts.namespace {
        None => None,
        Some(text) => {
            let ns = meta
                .serializer(SerializerRole::Namespace)
                .ok_or("the state records no namespace serializer")?;
            match encode_text(ns, text) {
                Some(Ok(b)) => Some(b),
                Some(Err(e)) => return Err(format!("--namespace: {e}").into()),
                None => {
                    return Err(format!(
                        "namespaces of state '{}' are written by {}, which cannot be typed here",
                        opts.state,
                        describe(ns)
                    )
                    .into())
                }
            }
        }
    };
    let kg = state_api::assign_to_key_group(&key, op.max_parallelism);
    let mut found = 0;
    for e in reader.raw_entries_of_key(&op.operator_id, Some(&opts.state), &key)? {
        let e = e?;
        if namespace.as_ref().is_some_and(|n| *n != e.namespace) {
            continue;
        }
        found += 1;
        let j = entry_json(&op.operator_id, Some(&key_ser), &e);
        if opts.json {
            outln!("{}", serde_json::to_string(&j)?);
        } else if j["namespace"].is_null() {
            outln!("{}[{}] = {}", opts.state, opts.key, j["value"]);
        } else {
            outln!(
                "{}[{}] @ {} = {}",
                opts.state,
                opts.key,
                j["namespace"],
                j["value"]
            );
        }
    }
    if found == 0 && !opts.json {
        outln!("{}[{}]: no entry (key group {kg})", opts.state, opts.key);
    }
    Ok(())
}

/// Options of `flowstate savepoint`.
#[derive(Clone, Debug)]
pub struct SavepointOptions {
    /// The savepoint root (default: `state.savepoints.dir`).
    pub to: Option<String>,
    /// The backend that reads native state (mmap files need `Mmap`).
    pub backend: BackendKind,
    /// Parallelism of every keyed operator (default: as in the source).
    pub parallelism: Option<u32>,
    /// The operators of the job that will restore it (all without).
    pub operators: Vec<String>,
    /// Drop the state of operators not in `operators` instead of failing.
    pub allow_non_restored_state: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// `flowstate savepoint`: a canonical savepoint (restorable by either backend) of any job's
/// checkpoint or savepoint, at another parallelism if asked.
pub fn savepoint(config: &Config, path: &str, opts: &SavepointOptions) -> Result<(), JobError> {
    let to = match (&opts.to, &config.savepoints_dir) {
        (Some(t), _) => to_url(t)?,
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(
                "no savepoint directory: pass --to <dir>, or set state.savepoints.dir \
                        (FLOWSTATE_STATE_SAVEPOINTS_DIR)"
                    .into(),
            )
        }
    };
    let mut reader = open_reader(config, path, false)?;
    let native: Vec<String> = reader
        .checkpoint()
        .metadata
        .operators
        .iter()
        .filter(|o| reader.has_native_state(&o.operator_id))
        .map(|o| o.operator_id.clone())
        .collect();
    if !native.is_empty() {
        if opts.backend != BackendKind::Mmap {
            return Err(format!(
                "operator '{}' of {} holds native mmap files, which only the mmap backend \
                 reads: use --backend mmap",
                native[0],
                reader.checkpoint().dir_location()
            )
            .into());
        }
        let bar = crate::tools::progress_bar(
            opts.progress,
            native.len() as u64,
            false,
            "converting native state",
        )?;
        convert_native(config, &mut reader)?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    let m = reader.checkpoint().metadata.clone();
    let mut w = SavepointWriter::from_reader(&reader)?;
    if !opts.operators.is_empty() {
        for op in &m.operators {
            if opts.operators.contains(&op.operator_id) {
                continue;
            }
            if !opts.allow_non_restored_state {
                return Err(format!(
                    "{} holds state of operator '{}', which is not among --operator {}: pass \
                     --allow-non-restored-state to leave it out",
                    reader.checkpoint().dir_location(),
                    op.operator_id,
                    opts.operators.join(", ")
                )
                .into());
            }
            w.remove_operator(&op.operator_id)?;
        }
    }
    let infos = reader.operators()?;
    let mut p_max = 0;
    for op in &infos {
        if !w.operator_ids().contains(&op.operator_id.as_str()) {
            continue;
        }
        let p = match (opts.parallelism, &op.format) {
            (Some(p), KeyedFormat::Canonical | KeyedFormat::Native(_)) => {
                w.set_parallelism(&op.operator_id, p)?;
                p
            }
            _ => op.parallelism,
        };
        p_max = p_max.max(p);
    }
    let dest = crate::job::open_storage(config, &to, &m.job_id)?;
    let name = format!("{}-p{p_max}-{}", m.checkpoint_id, std::process::id());
    let bar = crate::tools::progress_bar(opts.progress, 0, false, "subtasks written")?;
    let done = w.write_with_progress(&dest, &name, &mut |n, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(n);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    outln!(
        "savepoint of {} {} written at parallelism {p_max}: {}",
        if m.kind == SnapshotKind::Checkpoint {
            "checkpoint"
        } else {
            "savepoint"
        },
        m.checkpoint_id,
        done.dir_location()
    );
    Ok(())
}

#[cfg(not(feature = "parquet"))]
mod parquet_out {
    use crate::job::JobError;

    /// Stands in for the Parquet writer in builds without the `parquet` feature.
    pub struct ParquetSink;

    impl ParquetSink {
        pub fn create(_path: &std::path::Path) -> Result<Self, JobError> {
            Err(
                "this build has no Parquet output: build flowstate-cli with --features parquet, \
                 or use --format jsonl"
                    .into(),
            )
        }
        pub fn push(&mut self, _entry: &serde_json::Value) -> Result<(), JobError> {
            Ok(())
        }
        pub fn finish(self) -> Result<(), JobError> {
            Ok(())
        }
    }
}

#[cfg(feature = "parquet")]
mod parquet_out {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;

    use crate::job::JobError;

    /// Rows written per record batch.
    const BATCH: usize = 8192;

    /// Entries ([`super::entry_json`]) as rows of a Parquet file.
    pub struct ParquetSink {
        writer: ArrowWriter<std::fs::File>,
        schema: Arc<Schema>,
        text: [Vec<String>; 6],
        key_group: Vec<u32>,
        ttl: Vec<Option<i64>>,
    }

    const TEXT: [&str; 6] = ["operator", "state", "kind", "key", "namespace", "value"];

    impl ParquetSink {
        pub fn create(path: &std::path::Path) -> Result<Self, JobError> {
            let mut fields: Vec<Field> = TEXT[..3]
                .iter()
                .map(|n| Field::new(*n, DataType::Utf8, false))
                .collect();
            fields.push(Field::new("key_group", DataType::UInt32, false));
            fields.extend(
                TEXT[3..]
                    .iter()
                    .map(|n| Field::new(*n, DataType::Utf8, false)),
            );
            fields.push(Field::new("ttl_timestamp", DataType::Int64, true));
            let schema = Arc::new(Schema::new(fields));
            let file = std::fs::File::create(path)
                .map_err(|e| format!("cannot create '{}': {e}", path.display()))?;
            let writer = ArrowWriter::try_new(file, Arc::clone(&schema), None)?;
            Ok(ParquetSink {
                writer,
                schema,
                text: Default::default(),
                key_group: Vec::new(),
                ttl: Vec::new(),
            })
        }

        pub fn push(&mut self, entry: &serde_json::Value) -> Result<(), JobError> {
            for (i, name) in TEXT.iter().enumerate() {
                let v = &entry[*name];
                let text = match (i, v) {
                    // operator, state, kind are plain strings; the rest JSON text.
                    (0..=2, serde_json::Value::String(s)) => s.clone(),
                    _ => serde_json::to_string(v)?,
                };
                self.text[i].push(text);
            }
            self.key_group
                .push(entry["key_group"].as_u64().unwrap_or(0) as u32);
            self.ttl.push(entry["ttl_timestamp"].as_i64());
            if self.key_group.len() >= BATCH {
                self.flush()?;
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), JobError> {
            if self.key_group.is_empty() {
                return Ok(());
            }
            let text = |i: usize, t: &mut [Vec<String>; 6]| -> ArrayRef {
                Arc::new(StringArray::from(std::mem::take(&mut t[i])))
            };
            let columns: Vec<ArrayRef> = vec![
                text(0, &mut self.text),
                text(1, &mut self.text),
                text(2, &mut self.text),
                Arc::new(UInt32Array::from(std::mem::take(&mut self.key_group))),
                text(3, &mut self.text),
                text(4, &mut self.text),
                text(5, &mut self.text),
                Arc::new(Int64Array::from(std::mem::take(&mut self.ttl))),
            ];
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
            self.writer.write(&batch)?;
            Ok(())
        }

        pub fn finish(mut self) -> Result<(), JobError> {
            self.flush()?;
            self.writer.close()?;
            Ok(())
        }
    }
}
