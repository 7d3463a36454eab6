//! The `_metadata` file of a checkpoint or savepoint, byte by byte (see
//! `docs/checkpoint-format.md`). All integers are big-endian.
//!
//! ```text
//! "FLWC" | version u16 | body_len u64 | body | crc32c(magic .. body) u32
//! ```
//!
//! Every length read is checked against what remains of the file before anything is allocated,
//! and every structure is validated (key-group ranges, offsets inside their files, embedded
//! snapshot headers and operator state with their own checksums).

use state_api::snapshot::{Decoder, KeyGroupOffset, SnapshotHeader, SnapshotReader};
use state_api::{validate_parallelism, KeyGroupRange, OperatorStateStore, StateMeta};

use crate::error::{Error, Result};
use crate::storage::validate_name;

/// The magic bytes that open every metadata file.
pub const METADATA_MAGIC: [u8; 4] = *b"FLWC";
/// The metadata format version this build writes (it also reads version 2, which has no
/// recorded duration, and version 1, which has no tombstone blocks either).
pub const METADATA_VERSION: u16 = 3;
/// Largest metadata file accepted (256 MiB).
pub const MAX_METADATA_LEN: u64 = 256 << 20;

/// Whether a metadata file describes a checkpoint or a savepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// A checkpoint: owned by the coordinator, may share files with other checkpoints.
    Checkpoint,
    /// A savepoint: owned by the user, self-contained, canonical format.
    Savepoint,
}

impl SnapshotKind {
    fn code(self) -> u8 {
        match self {
            SnapshotKind::Checkpoint => 1,
            SnapshotKind::Savepoint => 2,
        }
    }
}

/// Where a state file lives, relative to the metadata that refers to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileLocation {
    /// In the directory of the `_metadata` file (`chk-<n>/` or `savepoint-<id>/`).
    Exclusive(String),
    /// In the job's `shared/` directory (incremental checkpoints).
    Shared(String),
}

impl FileLocation {
    /// The file name.
    pub fn name(&self) -> &str {
        match self {
            FileLocation::Exclusive(n) | FileLocation::Shared(n) => n,
        }
    }
}

/// A file a checkpoint refers to, with its size and CRC32C as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// Where the file is.
    pub location: FileLocation,
    /// Its size in bytes.
    pub size: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

/// The part of a keyed state handle that lives in one file: a canonical snapshot stream of which
/// the handle uses the listed key-group blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedStateFile {
    /// The file.
    pub file: FileRef,
    /// The stream's header bytes exactly as in the file (magic, version, body, CRC): the
    /// serializer snapshots of every state.
    pub header_bytes: Vec<u8>,
    /// The decoded header.
    pub header: SnapshotHeader,
    /// The key-group blocks this handle takes from the file, in key-group order.
    pub key_groups: Vec<KeyGroupOffset>,
    /// The tombstone blocks this handle takes from the file (delta streams only), in
    /// key-group order.
    pub tombstones: Vec<KeyGroupOffset>,
}

/// The keyed state of one subtask: key-group blocks in one file (full snapshots) or spread over
/// several (incremental snapshots). A key group may appear in several files: the files are in
/// chain order (a base, then deltas), and a later record or tombstone of the same entry
/// supersedes an earlier one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedStateHandle {
    /// The key groups the subtask owned.
    pub key_group_range: KeyGroupRange,
    /// The files.
    pub files: Vec<KeyedStateFile>,
}

impl KeyedStateHandle {
    /// Bytes of key-group blocks the handle uses.
    pub fn state_size(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.key_groups.iter())
            .map(|k| k.length)
            .sum()
    }

    /// The metadata of every state in any of the handle's files (first occurrence wins).
    pub fn states(&self) -> Vec<StateMeta> {
        let mut out: Vec<StateMeta> = Vec::new();
        for f in &self.files {
            for s in &f.header.states {
                if !out.iter().any(|o| o.name == s.name) {
                    out.push(s.clone());
                }
            }
        }
        out
    }
}

/// A file of a backend-native keyed state handle and the key groups it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFile {
    /// The file.
    pub file: FileRef,
    /// The key groups whose state it holds (visible part).
    pub key_groups: KeyGroupRange,
}

/// Keyed state in a backend's own format (the mmap backend's immutable files): restorable only
/// into that backend, at any parallelism. Incremental by nature: files already uploaded by an
/// earlier checkpoint are referenced, not uploaded again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeKeyedHandle {
    /// Which backend wrote it (`"mmap"`).
    pub backend: String,
    /// The key groups the subtask owned.
    pub key_group_range: KeyGroupRange,
    /// The backend's own metadata (its states, serializer snapshots and file layout; it
    /// carries its own magic and checksum).
    pub metadata: Vec<u8>,
    /// The files, all in `shared/`.
    pub files: Vec<NativeFile>,
}

/// What one subtask of an operator contributed to a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubtaskState {
    /// The subtask index.
    pub subtask: u32,
    /// Keyed state as canonical snapshot streams, if the operator is keyed.
    pub keyed: Option<KeyedStateHandle>,
    /// Keyed state in a backend's native format (never together with `keyed`).
    pub native: Option<NativeKeyedHandle>,
    /// Operator state (list and broadcast), stored inline.
    pub operator_state: Option<OperatorStateStore>,
}

/// The state of one operator (by stable id) in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSnapshot {
    /// The operator's stable id.
    pub operator_id: String,
    /// Number of key groups.
    pub max_parallelism: u32,
    /// Parallelism when the checkpoint was taken.
    pub parallelism: u32,
    /// One entry per subtask, in subtask order.
    pub subtasks: Vec<SubtaskState>,
}

impl OperatorSnapshot {
    /// True when some subtask's keyed state is in a backend's native format.
    pub fn has_native_state(&self) -> bool {
        self.subtasks.iter().any(|s| s.native.is_some())
    }

    /// The native files of the subtasks whose key groups meet `range` (what a backend owning
    /// `range` restores from, and may reference in its next checkpoint).
    pub fn native_files_meeting(&self, range: KeyGroupRange) -> impl Iterator<Item = &NativeFile> {
        self.subtasks
            .iter()
            .filter_map(|s| s.native.as_ref())
            .filter(move |n| !n.key_group_range.intersect(&range).is_empty())
            .flat_map(|n| n.files.iter())
    }
}

/// The contents of a `_metadata` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointMetadata {
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// The checkpoint id.
    pub checkpoint_id: u64,
    /// The job.
    pub job_id: String,
    /// When the checkpoint was triggered (milliseconds since the epoch, from the coordinator's
    /// clock).
    pub timestamp_millis: i64,
    /// The coordinator epoch that wrote it.
    pub epoch: u64,
    /// The operators, by id.
    pub operators: Vec<OperatorSnapshot>,
    /// How long the checkpoint took from its trigger until its metadata was written, measured
    /// by the writer's own clock (`None` in files of format versions 1 and 2, and where not
    /// measured). Never derived from storage timestamps, which come from another clock.
    pub duration_millis: Option<u64>,
}

impl CheckpointMetadata {
    /// The operator with id `id`.
    pub fn operator(&self, id: &str) -> Option<&OperatorSnapshot> {
        self.operators.iter().find(|o| o.operator_id == id)
    }

    /// Every file the checkpoint refers to.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.operators
            .iter()
            .flat_map(|o| o.subtasks.iter())
            .flat_map(|s| {
                let canonical = s.keyed.iter().flat_map(|k| k.files.iter().map(|f| &f.file));
                let native = s
                    .native
                    .iter()
                    .flat_map(|k| k.files.iter().map(|f| &f.file));
                canonical.chain(native)
            })
    }

    /// Encodes the metadata file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_version(METADATA_VERSION)
    }

    /// Encodes in format `version` (1: without tombstone lists, 2: without the duration; for
    /// tests of old files).
    fn encode_version(&self, version: u16) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        b.push(self.kind.code());
        put_u64(&mut b, self.checkpoint_id);
        put_str16(&mut b, &self.job_id)?;
        b.extend_from_slice(&self.timestamp_millis.to_be_bytes());
        put_u64(&mut b, self.epoch);
        put_u32(&mut b, len32(self.operators.len())?);
        for op in &self.operators {
            put_str16(&mut b, &op.operator_id)?;
            put_u32(&mut b, op.max_parallelism);
            put_u32(&mut b, op.parallelism);
            put_u32(&mut b, len32(op.subtasks.len())?);
            for st in &op.subtasks {
                put_u32(&mut b, st.subtask);
                match (&st.keyed, &st.native) {
                    (None, None) => b.push(0),
                    (Some(_), Some(_)) => {
                        return Err(Error::InvalidConfig {
                            reason: format!(
                                "operator '{}' subtask {}: both canonical and native keyed state",
                                op.operator_id, st.subtask
                            ),
                        })
                    }
                    (None, Some(n)) => {
                        b.push(2);
                        put_str16(&mut b, &n.backend)?;
                        put_u32(&mut b, n.key_group_range.start());
                        put_u32(&mut b, n.key_group_range.end());
                        put_u32(&mut b, len32(n.metadata.len())?);
                        b.extend_from_slice(&n.metadata);
                        put_u32(&mut b, len32(n.files.len())?);
                        for f in &n.files {
                            put_file_ref(&mut b, &f.file)?;
                            put_u32(&mut b, f.key_groups.start());
                            put_u32(&mut b, f.key_groups.end());
                        }
                    }
                    (Some(k), None) => {
                        b.push(1);
                        put_u32(&mut b, k.key_group_range.start());
                        put_u32(&mut b, k.key_group_range.end());
                        put_u32(&mut b, len32(k.files.len())?);
                        for f in &k.files {
                            put_file_ref(&mut b, &f.file)?;
                            put_u32(&mut b, len32(f.header_bytes.len())?);
                            b.extend_from_slice(&f.header_bytes);
                            let lists: &[&Vec<KeyGroupOffset>] = if version >= 2 {
                                &[&f.key_groups, &f.tombstones]
                            } else {
                                &[&f.key_groups]
                            };
                            for list in lists.iter().copied() {
                                put_u32(&mut b, len32(list.len())?);
                                for kg in list {
                                    put_u32(&mut b, kg.key_group);
                                    put_u64(&mut b, kg.offset);
                                    put_u64(&mut b, kg.length);
                                }
                            }
                        }
                    }
                }
                match &st.operator_state {
                    None => b.push(0),
                    Some(s) => {
                        b.push(1);
                        let bytes = s
                            .encode()
                            .map_err(|e| Error::state(&op.operator_id, st.subtask, e))?;
                        put_u32(&mut b, len32(bytes.len())?);
                        b.extend_from_slice(&bytes);
                    }
                }
            }
        }
        if version >= 3 {
            // u64::MAX: not measured.
            put_u64(&mut b, self.duration_millis.unwrap_or(u64::MAX));
        }
        let mut out = Vec::with_capacity(b.len() + 18);
        out.extend_from_slice(&METADATA_MAGIC);
        out.extend_from_slice(&version.to_be_bytes());
        put_u64(&mut out, b.len() as u64);
        out.extend_from_slice(&b);
        let crc = crc32c::crc32c(&out);
        put_u32(&mut out, crc);
        Ok(out)
    }

    /// Decodes and validates a metadata file; `file` names it in errors.
    pub fn decode(bytes: &[u8], file: &str) -> Result<Self> {
        if bytes.len() < 4 || bytes[0..4] != METADATA_MAGIC {
            return Err(Error::Corrupt {
                file: file.to_string(),
                offset: 0,
                reason: format!(
                    "bad magic {:02x?}: not a Flowstate checkpoint metadata file (expected \"FLWC\")",
                    &bytes[..bytes.len().min(4)]
                ),
            });
        }
        if bytes.len() < 6 {
            return Err(truncated(file, 6, bytes.len()));
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if !(1..=METADATA_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                file: file.to_string(),
                found: version,
                supported: METADATA_VERSION,
            });
        }
        if bytes.len() < 14 {
            return Err(truncated(file, 14, bytes.len()));
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&bytes[6..14]);
        let body_len = u64::from_be_bytes(l);
        if body_len > MAX_METADATA_LEN {
            return Err(Error::Corrupt {
                file: file.to_string(),
                offset: 6,
                reason: format!("body length {body_len} exceeds the limit of {MAX_METADATA_LEN}"),
            });
        }
        let total = 14 + body_len as usize + 4;
        if bytes.len() < total {
            return Err(truncated(file, total, bytes.len()));
        }
        if bytes.len() > total {
            return Err(Error::Corrupt {
                file: file.to_string(),
                offset: total as u64,
                reason: format!("{} bytes after the checksum", bytes.len() - total),
            });
        }
        let mut c = [0u8; 4];
        c.copy_from_slice(&bytes[total - 4..]);
        let expected = u32::from_be_bytes(c);
        let actual = crc32c::crc32c(&bytes[..total - 4]);
        if expected != actual {
            return Err(Error::ChecksumMismatch {
                file: file.to_string(),
                expected,
                actual,
            });
        }
        decode_body(&bytes[14..total - 4], file, version).map_err(|e| corrupt_from(e, file))
    }
}

fn truncated(file: &str, expected: usize, found: usize) -> Error {
    Error::Truncated {
        file: file.to_string(),
        expected: expected as u64,
        found: found as u64,
    }
}

/// Turns the state API's corruption report into ours, keeping the file name.
fn corrupt_from(e: state_api::Error, file: &str) -> Error {
    match e {
        state_api::Error::Corrupt { offset, reason, .. } => Error::Corrupt {
            file: file.to_string(),
            offset,
            reason,
        },
        state_api::Error::UnsupportedVersion {
            found, supported, ..
        } => Error::UnsupportedVersion {
            file: file.to_string(),
            found,
            supported,
        },
        other => Error::Corrupt {
            file: file.to_string(),
            offset: 0,
            reason: other.to_string(),
        },
    }
}

fn decode_body(body: &[u8], file: &str, version: u16) -> state_api::Result<CheckpointMetadata> {
    let mut d = Decoder::new(body, 14, file);
    let kind = match d.u8("snapshot kind")? {
        1 => SnapshotKind::Checkpoint,
        2 => SnapshotKind::Savepoint,
        k => return Err(d.corrupt(format!("unknown snapshot kind {k}"))),
    };
    let checkpoint_id = d.u64("checkpoint id")?;
    let job_id = d.str16("job id")?.to_string();
    validate_name("job id", &job_id).map_err(|e| d.corrupt(e.to_string()))?;
    let timestamp_millis = d.i64("timestamp")?;
    let epoch = d.u64("epoch")?;
    let n_ops = d.u32("operator count")?;
    let mut operators: Vec<OperatorSnapshot> = Vec::new();
    for _ in 0..n_ops {
        let operator_id = d.str16("operator id")?.to_string();
        validate_name("operator id", &operator_id).map_err(|e| d.corrupt(e.to_string()))?;
        if operators.iter().any(|o| o.operator_id == operator_id) {
            return Err(d.corrupt(format!("operator '{operator_id}' appears twice")));
        }
        let max_parallelism = d.u32("max parallelism")?;
        let parallelism = d.u32("parallelism")?;
        validate_parallelism(max_parallelism, parallelism)
            .map_err(|e| d.corrupt(format!("operator '{operator_id}': {e}")))?;
        let n_sub = d.u32("subtask count")?;
        if n_sub != parallelism {
            return Err(d.corrupt(format!(
                "operator '{operator_id}' has {n_sub} subtasks but parallelism {parallelism}"
            )));
        }
        let mut subtasks = Vec::new();
        for i in 0..n_sub {
            let subtask = d.u32("subtask index")?;
            if subtask != i {
                return Err(d.corrupt(format!(
                    "operator '{operator_id}': subtask {subtask} where {i} was expected"
                )));
            }
            let (keyed, native) = match d.u8("keyed state tag")? {
                0 => (None, None),
                1 => (
                    Some(decode_keyed(
                        &mut d,
                        &operator_id,
                        max_parallelism,
                        parallelism,
                        subtask,
                        file,
                        version,
                    )?),
                    None,
                ),
                2 => (
                    None,
                    Some(decode_native(
                        &mut d,
                        &operator_id,
                        max_parallelism,
                        parallelism,
                        subtask,
                    )?),
                ),
                t => return Err(d.corrupt(format!("unknown keyed state tag {t}"))),
            };
            let operator_state = match d.u8("operator state tag")? {
                0 => None,
                1 => {
                    let raw = d.bytes("operator state")?;
                    let name = format!("{file} (operator state of '{operator_id}' subtask {i})");
                    Some(OperatorStateStore::decode(raw, &name)?)
                }
                t => return Err(d.corrupt(format!("unknown operator state tag {t}"))),
            };
            subtasks.push(SubtaskState {
                subtask,
                keyed,
                native,
                operator_state,
            });
        }
        operators.push(OperatorSnapshot {
            operator_id,
            max_parallelism,
            parallelism,
            subtasks,
        });
    }
    let duration_millis = if version >= 3 {
        Some(d.u64("duration")?).filter(|&ms| ms != u64::MAX)
    } else {
        None
    };
    if !d.is_empty() {
        return Err(d.corrupt("bytes after the last operator"));
    }
    Ok(CheckpointMetadata {
        kind,
        checkpoint_id,
        job_id,
        timestamp_millis,
        epoch,
        operators,
        duration_millis,
    })
}

fn decode_keyed(
    d: &mut Decoder<'_>,
    operator: &str,
    max_parallelism: u32,
    parallelism: u32,
    subtask: u32,
    file: &str,
    version: u16,
) -> state_api::Result<KeyedStateHandle> {
    let start = d.u32("key group range start")?;
    let end = d.u32("key group range end")?;
    let range = KeyGroupRange::new(start, end);
    let expected = KeyGroupRange::for_operator(max_parallelism, parallelism, subtask)?;
    if range != expected || end < start {
        return Err(d.corrupt(format!(
            "operator '{operator}' subtask {subtask}: key groups [{start}, {end}) but the \
             subtask owns {expected}"
        )));
    }
    let n_files = d.u32("file count")?;
    let mut files = Vec::new();
    for _ in 0..n_files {
        let FileRef {
            location,
            size,
            crc32c: crc,
        } = decode_file_ref(d)?;
        let header_bytes = d.bytes("snapshot header")?.to_vec();
        let stream = format!("{file} (header of '{}')", location.name());
        let header = SnapshotReader::open(&header_bytes[..], stream)?
            .header()
            .clone();
        if header.max_parallelism != max_parallelism {
            return Err(d.corrupt(format!(
                "file '{}' has max parallelism {}, operator '{operator}' has {max_parallelism}",
                location.name(),
                header.max_parallelism
            )));
        }
        let key_groups = decode_blocks(d, &range, &header, &header_bytes, &location, size, "")?;
        let tombstones = if version >= 2 {
            decode_blocks(
                d,
                &range,
                &header,
                &header_bytes,
                &location,
                size,
                "tombstone ",
            )?
        } else {
            Vec::new()
        };
        if !tombstones.is_empty() && header_bytes.get(4..6) != Some(&[0, 2]) {
            return Err(d.corrupt(format!(
                "'{}' lists tombstone blocks but is not a delta stream",
                location.name()
            )));
        }
        files.push(KeyedStateFile {
            file: FileRef {
                location,
                size,
                crc32c: crc,
            },
            header_bytes,
            header,
            key_groups,
            tombstones,
        });
    }
    Ok(KeyedStateHandle {
        key_group_range: range,
        files,
    })
}

/// Reads a file's list of blocks (`what` is "" or "tombstone "): each in the subtask's range,
/// at most once, in order, inside the file after the header.
fn decode_blocks(
    d: &mut Decoder<'_>,
    range: &KeyGroupRange,
    header: &SnapshotHeader,
    header_bytes: &[u8],
    location: &FileLocation,
    size: u64,
    what: &str,
) -> state_api::Result<Vec<KeyGroupOffset>> {
    let n_kg = d.u32("key group count")?;
    if n_kg > range.len() {
        return Err(d.corrupt(format!(
            "{n_kg} {what}key groups in a range of {}",
            range.len()
        )));
    }
    let mut key_groups: Vec<KeyGroupOffset> = Vec::new();
    for _ in 0..n_kg {
        let key_group = d.u32("key group")?;
        let offset = d.u64("key group offset")?;
        let length = d.u64("key group length")?;
        if !range.contains(key_group) || !header.key_group_range.contains(key_group) {
            return Err(d.corrupt(format!(
                "{what}key group {key_group} outside the subtask's range {range}"
            )));
        }
        if key_groups.last().is_some_and(|l| l.key_group >= key_group) {
            return Err(d.corrupt(format!(
                "{what}key group {key_group} listed twice or out of order in '{}'",
                location.name()
            )));
        }
        if offset < header_bytes.len() as u64
            || offset.checked_add(length).is_none_or(|e| e > size)
            || length < 17
        {
            return Err(d.corrupt(format!(
                "{what}key group {key_group}: block at {offset}+{length} does not fit in '{}' \
                 of {size} bytes",
                location.name()
            )));
        }
        key_groups.push(KeyGroupOffset {
            key_group,
            offset,
            length,
        });
    }
    Ok(key_groups)
}

fn decode_native(
    d: &mut Decoder<'_>,
    operator: &str,
    max_parallelism: u32,
    parallelism: u32,
    subtask: u32,
) -> state_api::Result<NativeKeyedHandle> {
    let backend = d.str16("native backend id")?.to_string();
    if backend.is_empty() || backend.len() > 32 || !backend.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(d.corrupt(format!("invalid native backend id {backend:?}")));
    }
    let start = d.u32("key group range start")?;
    let end = d.u32("key group range end")?;
    let range = KeyGroupRange::new(start, end);
    let expected = KeyGroupRange::for_operator(max_parallelism, parallelism, subtask)?;
    if range != expected || end < start {
        return Err(d.corrupt(format!(
            "operator '{operator}' subtask {subtask}: key groups [{start}, {end}) but the \
             subtask owns {expected}"
        )));
    }
    let metadata = d.bytes("native metadata")?.to_vec();
    let n = d.u32("native file count")?;
    let mut files = Vec::new();
    for _ in 0..n {
        let file = decode_file_ref(d)?;
        let kg_start = d.u32("file key group start")?;
        let kg_end = d.u32("file key group end")?;
        let key_groups = KeyGroupRange::new(kg_start, kg_end);
        if kg_end < kg_start || key_groups.intersect(&range) != key_groups {
            return Err(d.corrupt(format!(
                "file '{}' holds key groups [{kg_start}, {kg_end}) outside the subtask's {range}",
                file.location.name()
            )));
        }
        files.push(NativeFile { file, key_groups });
    }
    Ok(NativeKeyedHandle {
        backend,
        key_group_range: range,
        metadata,
        files,
    })
}

/// File names are one path segment: `[A-Za-z0-9._-]`, 1..=200 bytes, not starting with a dot.
pub(crate) fn validate_file_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!("invalid file name {name:?}"));
    }
    Ok(())
}

fn put_file_ref(b: &mut Vec<u8>, f: &FileRef) -> Result<()> {
    let (tag, name) = match &f.location {
        FileLocation::Exclusive(n) => (1u8, n),
        FileLocation::Shared(n) => (2u8, n),
    };
    b.push(tag);
    put_str16(b, name)?;
    put_u64(b, f.size);
    put_u32(b, f.crc32c);
    Ok(())
}

fn decode_file_ref(d: &mut Decoder<'_>) -> state_api::Result<FileRef> {
    let location = match d.u8("file location")? {
        1 => FileLocation::Exclusive(d.str16("file name")?.to_string()),
        2 => FileLocation::Shared(d.str16("file name")?.to_string()),
        t => return Err(d.corrupt(format!("unknown file location tag {t}"))),
    };
    validate_file_name(location.name()).map_err(|r| d.corrupt(r))?;
    let size = d.u64("file size")?;
    let crc32c = d.u32("file checksum")?;
    Ok(FileRef {
        location,
        size,
        crc32c,
    })
}

fn len32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::InvalidConfig {
        reason: format!("{n} entries do not fit in a metadata file"),
    })
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let n = u16::try_from(s.len()).map_err(|_| Error::InvalidConfig {
        reason: format!("name of {} bytes is too long for a metadata file", s.len()),
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use state_api::snapshot::encode_header;
    use state_api::{SerializerSnapshot, StateKind, StateName};

    fn sample() -> CheckpointMetadata {
        let range = KeyGroupRange::for_operator(8, 2, 1).unwrap_or(KeyGroupRange::new(4, 8));
        let header = SnapshotHeader {
            max_parallelism: 8,
            key_group_range: range,
            key_serializer: SerializerSnapshot {
                id: "postcard".into(),
                version: 1,
                schema: b"u64".to_vec(),
            },
            states: vec![StateMeta {
                name: StateName::new("sum").unwrap(),
                kind: StateKind::Value,
                ttl_millis: None,
                serializers: vec![],
            }],
        };
        let header_bytes = encode_header(&header).unwrap();
        let h = header_bytes.len() as u64;
        let keyed = KeyedStateHandle {
            key_group_range: range,
            files: vec![KeyedStateFile {
                file: FileRef {
                    location: FileLocation::Shared("op-1-e1-c3.kst".into()),
                    size: h + 100,
                    crc32c: 7,
                },
                header_bytes,
                header,
                key_groups: vec![
                    KeyGroupOffset {
                        key_group: 4,
                        offset: h,
                        length: 40,
                    },
                    KeyGroupOffset {
                        key_group: 6,
                        offset: h + 40,
                        length: 40,
                    },
                ],
                tombstones: vec![],
            }],
        };
        CheckpointMetadata {
            kind: SnapshotKind::Checkpoint,
            checkpoint_id: 3,
            job_id: "job".into(),
            timestamp_millis: 1_700_000_000_000,
            epoch: 2,
            duration_millis: Some(1234),
            operators: vec![OperatorSnapshot {
                operator_id: "op".into(),
                max_parallelism: 8,
                parallelism: 2,
                subtasks: vec![
                    SubtaskState {
                        subtask: 0,
                        keyed: None,
                        native: Some(NativeKeyedHandle {
                            backend: "mmap".into(),
                            key_group_range: KeyGroupRange::new(0, 4),
                            metadata: b"FLNC blob".to_vec(),
                            files: vec![NativeFile {
                                file: FileRef {
                                    location: FileLocation::Shared("00ab-000000000001.run".into()),
                                    size: 4096,
                                    crc32c: 9,
                                },
                                key_groups: KeyGroupRange::new(1, 3),
                            }],
                        }),
                        operator_state: Some(OperatorStateStore::new()),
                    },
                    SubtaskState {
                        subtask: 1,
                        keyed: Some(keyed),
                        native: None,
                        operator_state: None,
                    },
                ],
            }],
        }
    }

    #[test]
    fn round_trip_and_the_fixed_prefix() {
        let m = sample();
        let b = m.encode().unwrap();
        assert_eq!(&b[0..6], b"FLWC\x00\x03");
        assert_eq!(CheckpointMetadata::decode(&b, "m").unwrap(), m);
        let unmeasured = CheckpointMetadata {
            duration_millis: None,
            ..m.clone()
        };
        let b = unmeasured.encode().unwrap();
        assert_eq!(CheckpointMetadata::decode(&b, "m").unwrap(), unmeasured);
        // Version 2 files (no duration) and version 1 files (no tombstone lists either) are
        // still read.
        let v2 = m.encode_version(2).unwrap();
        assert_eq!(&v2[0..6], b"FLWC\x00\x02");
        assert_eq!(CheckpointMetadata::decode(&v2, "m").unwrap(), unmeasured);
        let v1 = m.encode_version(1).unwrap();
        assert_eq!(&v1[0..6], b"FLWC\x00\x01");
        assert_eq!(CheckpointMetadata::decode(&v1, "m").unwrap(), unmeasured);
        for version in [0u16, 4] {
            let mut other = m.encode().unwrap();
            other[4..6].copy_from_slice(&version.to_be_bytes());
            let err = CheckpointMetadata::decode(&other, "m").unwrap_err();
            assert!(
                matches!(err, Error::UnsupportedVersion { found, .. } if found == version),
                "{err}"
            );
        }
    }

    #[test]
    fn inconsistent_handles_are_rejected() {
        let mut m = sample();
        if let Some(k) = m.operators[0].subtasks[1].keyed.as_mut() {
            k.files[0].key_groups[1].offset = k.files[0].file.size; // past the end
        }
        let err = CheckpointMetadata::decode(&m.encode().unwrap(), "m").unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let mut m = sample();
        if let Some(k) = m.operators[0].subtasks[1].keyed.as_mut() {
            k.files[0].key_groups[1].key_group = 2; // not the subtask's
        }
        let err = CheckpointMetadata::decode(&m.encode().unwrap(), "m").unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let mut m = sample();
        m.operators[0].subtasks.pop();
        let err = CheckpointMetadata::decode(&m.encode().unwrap(), "m").unwrap_err();
        assert!(err.to_string().contains("subtasks"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = CheckpointMetadata::decode(&bytes, "x");
        }

        #[test]
        fn every_mutation_is_an_error(at in 0usize..4096, xor in 1u8..=255) {
            let b = sample().encode().unwrap();
            let mut m = b.clone();
            let i = at % m.len();
            m[i] ^= xor;
            prop_assert!(CheckpointMetadata::decode(&m, "x").is_err());
        }
    }
}
