//! Checkpoint history: every checkpoint and savepoint attempt a coordinator made — completed,
//! aborted, or declined by a subtask, with the reason — its sizes (all files it refers to, and
//! those written for it: the delta of an incremental checkpoint), and per subtask the
//! synchronous and asynchronous durations and sizes.
//!
//! Each attempt is one small object, `<root>/<job>/_history/<checkpoint id, 20 digits>-e<epoch>`,
//! written by the coordinator when the attempt ends (so the history survives the process and
//! is read by tools from the store alone); the coordinator keeps the last [`HISTORY_LIMIT`]
//! and deletes older ones. Durations are measured by one clock each (the coordinator's
//! monotonic clock from trigger to end, the subtask's for its synchronous part, the writer
//! thread's for the upload), never by comparing the clocks of two machines. The format is in
//! `docs/checkpoint-format.md` ("Checkpoint history").

use std::collections::VecDeque;

use object_store::path::Path;
use state_api::snapshot::Decoder;

use crate::error::{Error, Result};
use crate::protocol::CheckpointKind;
use crate::storage::CheckpointStorage;

/// The magic bytes that open every history record.
pub const HISTORY_MAGIC: [u8; 4] = *b"FLWH";
/// The history record format version this build writes and reads.
pub const HISTORY_VERSION: u16 = 1;
/// Attempts kept per job.
pub const HISTORY_LIMIT: usize = 1000;
/// The folder of the history under the job's directory.
pub const HISTORY_DIR: &str = "_history";
/// Largest record accepted (reasons are cut to [`MAX_REASON`] bytes when written).
const MAX_RECORD_LEN: u64 = 64 << 20;
/// Longest reason kept.
pub const MAX_REASON: usize = 2048;

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptStatus {
    /// Its metadata was committed.
    Completed,
    /// It was aborted (timeout, subsumed, failed to commit, shut down, ...).
    Aborted,
    /// A subtask declined it (its snapshot or upload failed).
    Declined,
}

impl AttemptStatus {
    fn code(self) -> u8 {
        match self {
            AttemptStatus::Completed => 1,
            AttemptStatus::Aborted => 2,
            AttemptStatus::Declined => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => AttemptStatus::Completed,
            2 => AttemptStatus::Aborted,
            3 => AttemptStatus::Declined,
            _ => return None,
        })
    }

    /// `completed`, `aborted`, `declined`.
    pub fn name(self) -> &'static str {
        match self {
            AttemptStatus::Completed => "completed",
            AttemptStatus::Aborted => "aborted",
            AttemptStatus::Declined => "declined",
        }
    }
}

/// What one subtask answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubtaskStatus {
    /// It acknowledged with its state.
    Acknowledged,
    /// It declined.
    Declined,
    /// The attempt ended before it answered.
    NoAnswer,
}

impl SubtaskStatus {
    fn code(self) -> u8 {
        match self {
            SubtaskStatus::Acknowledged => 1,
            SubtaskStatus::Declined => 2,
            SubtaskStatus::NoAnswer => 0,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => SubtaskStatus::Acknowledged,
            2 => SubtaskStatus::Declined,
            0 => SubtaskStatus::NoAnswer,
            _ => return None,
        })
    }

    /// `acknowledged`, `declined`, `no answer`.
    pub fn name(self) -> &'static str {
        match self {
            SubtaskStatus::Acknowledged => "acknowledged",
            SubtaskStatus::Declined => "declined",
            SubtaskStatus::NoAnswer => "no answer",
        }
    }
}

/// One subtask's part of an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubtaskAttempt {
    /// The operator.
    pub operator_id: String,
    /// The subtask index.
    pub subtask: u32,
    /// What it answered.
    pub status: SubtaskStatus,
    /// The synchronous part on the subtask's thread, in microseconds (its clock).
    pub sync_micros: Option<u64>,
    /// The asynchronous part (writing its state) in milliseconds (the writer thread's clock).
    pub async_millis: Option<u64>,
    /// Bytes of every file its state refers to.
    pub bytes: u64,
    /// Bytes written for this attempt (the delta of an incremental checkpoint).
    pub delta_bytes: u64,
    /// Why it declined.
    pub reason: Option<String>,
}

/// One checkpoint or savepoint attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointAttempt {
    /// The checkpoint id.
    pub checkpoint_id: u64,
    /// The epoch of the coordinator that made it.
    pub epoch: u64,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// How it ended.
    pub status: AttemptStatus,
    /// Why it did not complete.
    pub reason: Option<String>,
    /// When it was triggered (milliseconds since the epoch, the coordinator's wall clock; for
    /// display only).
    pub trigger_timestamp_millis: i64,
    /// From the trigger to its end, by the coordinator's monotonic clock.
    pub duration_millis: u64,
    /// Bytes of every file the acknowledged subtasks' states refer to.
    pub bytes: u64,
    /// Bytes written for this attempt.
    pub delta_bytes: u64,
    /// Every subtask, in registration order.
    pub subtasks: Vec<SubtaskAttempt>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_REASON);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn opt_u64(v: Option<u64>) -> u64 {
    v.unwrap_or(u64::MAX)
}

fn from_opt(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

impl CheckpointAttempt {
    /// Encodes the record: `"FLWH" | version u16 | body_len u32 | body | crc32c u32` (see
    /// `docs/checkpoint-format.md`).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.checkpoint_id.to_be_bytes());
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.push(match self.kind {
            CheckpointKind::Checkpoint => 1,
            CheckpointKind::Savepoint => 2,
        });
        b.push(self.status.code());
        put_str(&mut b, self.reason.as_deref().unwrap_or(""));
        b.extend_from_slice(&self.trigger_timestamp_millis.to_be_bytes());
        b.extend_from_slice(&self.duration_millis.to_be_bytes());
        b.extend_from_slice(&self.bytes.to_be_bytes());
        b.extend_from_slice(&self.delta_bytes.to_be_bytes());
        b.extend_from_slice(&(self.subtasks.len() as u32).to_be_bytes());
        for s in &self.subtasks {
            put_str(&mut b, &s.operator_id);
            b.extend_from_slice(&s.subtask.to_be_bytes());
            b.push(s.status.code());
            b.extend_from_slice(&opt_u64(s.sync_micros).to_be_bytes());
            b.extend_from_slice(&opt_u64(s.async_millis).to_be_bytes());
            b.extend_from_slice(&s.bytes.to_be_bytes());
            b.extend_from_slice(&s.delta_bytes.to_be_bytes());
            put_str(&mut b, s.reason.as_deref().unwrap_or(""));
        }
        let mut out = Vec::with_capacity(b.len() + 14);
        out.extend_from_slice(&HISTORY_MAGIC);
        out.extend_from_slice(&HISTORY_VERSION.to_be_bytes());
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(&b);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes and checks a record; `file` names it in errors.
    pub fn decode(bytes: &[u8], file: &str) -> Result<Self> {
        let corrupt = |offset: u64, reason: String| Error::Corrupt {
            file: file.to_string(),
            offset,
            reason,
        };
        if bytes.len() < 14 || bytes[0..4] != HISTORY_MAGIC {
            return Err(corrupt(
                0,
                "not a Flowstate checkpoint history record (expected \"FLWH\")".into(),
            ));
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != HISTORY_VERSION {
            return Err(Error::UnsupportedVersion {
                file: file.to_string(),
                found: version,
                supported: HISTORY_VERSION,
            });
        }
        let len = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
        if bytes.len() != 10 + len + 4 {
            return Err(corrupt(
                6,
                format!("{} bytes for a body of {len}", bytes.len()),
            ));
        }
        let (head, crc) = bytes.split_at(10 + len);
        if crc32c::crc32c(head) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(corrupt(10 + len as u64, "checksum mismatch".into()));
        }
        let mut d = Decoder::new(&head[10..], 10, file);
        let body = |d: &mut Decoder<'_>| -> state_api::Result<CheckpointAttempt> {
            let checkpoint_id = d.u64("checkpoint id")?;
            let epoch = d.u64("epoch")?;
            let kind = match d.u8("kind")? {
                1 => CheckpointKind::Checkpoint,
                2 => CheckpointKind::Savepoint,
                k => return Err(d.corrupt(format!("unknown kind {k}"))),
            };
            let code = d.u8("status")?;
            let status = AttemptStatus::from_code(code)
                .ok_or_else(|| d.corrupt(format!("unknown status {code}")))?;
            let reason = Some(d.str16("reason")?.to_string()).filter(|r| !r.is_empty());
            let trigger_timestamp_millis = d.i64("trigger time")?;
            let duration_millis = d.u64("duration")?;
            let bytes = d.u64("bytes")?;
            let delta_bytes = d.u64("delta bytes")?;
            let n = d.u32("subtask count")? as usize;
            // Each subtask takes at least 43 bytes: bound the allocation by what is there.
            if n > d.remaining() / 43 {
                return Err(d.corrupt(format!("{n} subtasks in {} bytes", d.remaining())));
            }
            let mut subtasks = Vec::with_capacity(n);
            for _ in 0..n {
                let operator_id = d.str16("operator id")?.to_string();
                let subtask = d.u32("subtask")?;
                let code = d.u8("subtask status")?;
                let status = SubtaskStatus::from_code(code)
                    .ok_or_else(|| d.corrupt(format!("unknown subtask status {code}")))?;
                subtasks.push(SubtaskAttempt {
                    operator_id,
                    subtask,
                    status,
                    sync_micros: from_opt(d.u64("sync duration")?),
                    async_millis: from_opt(d.u64("async duration")?),
                    bytes: d.u64("subtask bytes")?,
                    delta_bytes: d.u64("subtask delta bytes")?,
                    reason: Some(d.str16("subtask reason")?.to_string()).filter(|r| !r.is_empty()),
                });
            }
            if !d.is_empty() {
                return Err(d.corrupt("bytes after the last subtask"));
            }
            Ok(CheckpointAttempt {
                checkpoint_id,
                epoch,
                kind,
                status,
                reason,
                trigger_timestamp_millis,
                duration_millis,
                bytes,
                delta_bytes,
                subtasks,
            })
        };
        body(&mut d).map_err(|e| match e {
            state_api::Error::Corrupt { offset, reason, .. } => corrupt(offset, reason),
            e => corrupt(0, e.to_string()),
        })
    }

    /// The record's object name: the checkpoint id (20 digits, so names sort as ids) and the
    /// epoch.
    pub fn object_name(&self) -> String {
        format!("{:020}-e{}", self.checkpoint_id, self.epoch)
    }
}

/// `<root>/<job>/_history`.
pub fn history_dir(storage: &CheckpointStorage) -> Path {
    storage.job_dir().join(HISTORY_DIR)
}

/// The names of the job's history records, oldest first.
fn record_names(storage: &CheckpointStorage) -> Result<Vec<String>> {
    let mut names: Vec<String> = storage
        .list(&history_dir(storage))?
        .into_iter()
        .filter_map(|m| m.location.filename().map(str::to_string))
        .filter(|n| n.len() > 20 && n.as_bytes()[..20].iter().all(u8::is_ascii_digit))
        .collect();
    names.sort();
    Ok(names)
}

/// Every recorded attempt of the storage's job, oldest first. A damaged record is an error
/// naming it.
pub fn read_history(storage: &CheckpointStorage) -> Result<Vec<CheckpointAttempt>> {
    let mut out = Vec::new();
    for name in record_names(storage)? {
        let path = history_dir(storage).join(name.as_str());
        let bytes = match storage.get(&path, MAX_RECORD_LEN) {
            Ok(b) => b,
            // Pruned by the writer while we listed.
            Err(Error::MissingFile { .. }) => continue,
            Err(e) => return Err(e),
        };
        out.push(CheckpointAttempt::decode(&bytes, &storage.location(&path))?);
    }
    Ok(out)
}

/// Appends attempts to a job's history and keeps the last [`HISTORY_LIMIT`].
#[derive(Debug)]
pub struct HistoryWriter {
    storage: CheckpointStorage,
    names: VecDeque<String>,
    limit: usize,
}

impl HistoryWriter {
    /// A writer for the storage's job (lists the records there are).
    pub fn open(storage: &CheckpointStorage) -> Result<Self> {
        Ok(HistoryWriter {
            storage: storage.clone(),
            names: record_names(storage)?.into(),
            limit: HISTORY_LIMIT,
        })
    }

    /// Keeps `limit` records instead of [`HISTORY_LIMIT`] (at least 1).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// Writes `attempt` and deletes the oldest records beyond the limit.
    pub fn record(&mut self, attempt: &CheckpointAttempt) -> Result<()> {
        let name = attempt.object_name();
        let path = history_dir(&self.storage).join(name.as_str());
        // Create-only: a record is never overwritten (a second record of one id and epoch
        // cannot happen; if it did, the first one stays).
        self.storage.put_if_absent(&path, attempt.encode())?;
        if !self.names.contains(&name) {
            self.names.push_back(name);
        }
        while self.names.len() > self.limit {
            if let Some(old) = self.names.pop_front() {
                self.storage
                    .delete(&history_dir(&self.storage).join(old.as_str()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn sample() -> CheckpointAttempt {
        CheckpointAttempt {
            checkpoint_id: 42,
            epoch: 3,
            kind: CheckpointKind::Checkpoint,
            status: AttemptStatus::Declined,
            reason: Some("subtask 1 of 'op' declined: disk full".into()),
            trigger_timestamp_millis: 1_700_000_000_000,
            duration_millis: 120,
            bytes: 4096,
            delta_bytes: 1024,
            subtasks: vec![
                SubtaskAttempt {
                    operator_id: "op".into(),
                    subtask: 0,
                    status: SubtaskStatus::Acknowledged,
                    sync_micros: Some(40),
                    async_millis: Some(12),
                    bytes: 4096,
                    delta_bytes: 1024,
                    reason: None,
                },
                SubtaskAttempt {
                    operator_id: "op".into(),
                    subtask: 1,
                    status: SubtaskStatus::Declined,
                    sync_micros: None,
                    async_millis: None,
                    bytes: 0,
                    delta_bytes: 0,
                    reason: Some("disk full".into()),
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_fixed_prefix() {
        let a = sample();
        let b = a.encode();
        assert_eq!(&b[0..6], b"FLWH\x00\x01");
        assert_eq!(CheckpointAttempt::decode(&b, "h").unwrap(), a);
        let mut other = b.clone();
        other[5] = 2;
        assert!(matches!(
            CheckpointAttempt::decode(&other, "h"),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
        // Long reasons are cut at a character boundary.
        let mut long = sample();
        long.reason = Some("é".repeat(5000));
        let back = CheckpointAttempt::decode(&long.encode(), "h").unwrap();
        assert!(back.reason.unwrap().len() <= MAX_REASON);
    }

    #[test]
    fn keeps_the_last_records() {
        let storage = CheckpointStorage::new(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            "root",
            "job",
        )
        .unwrap();
        let mut w = HistoryWriter::open(&storage).unwrap().with_limit(3);
        for id in 1..=5 {
            w.record(&CheckpointAttempt {
                checkpoint_id: id,
                ..sample()
            })
            .unwrap();
        }
        let ids: Vec<u64> = read_history(&storage)
            .unwrap()
            .iter()
            .map(|a| a.checkpoint_id)
            .collect();
        assert_eq!(ids, [3, 4, 5]);
        // A new writer (a restarted coordinator) picks up where the last one was.
        let mut w = HistoryWriter::open(&storage).unwrap().with_limit(3);
        w.record(&CheckpointAttempt {
            checkpoint_id: 6,
            ..sample()
        })
        .unwrap();
        let ids: Vec<u64> = read_history(&storage)
            .unwrap()
            .iter()
            .map(|a| a.checkpoint_id)
            .collect();
        assert_eq!(ids, [4, 5, 6]);
    }

    proptest! {
        #[test]
        fn damage_is_an_error_never_a_panic(at in 0usize..4096, xor in 1u8..=255) {
            let mut b = sample().encode();
            let i = at % b.len();
            b[i] ^= xor;
            prop_assert!(CheckpointAttempt::decode(&b, "h").is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = CheckpointAttempt::decode(&bytes, "h");
        }
    }
}
