//! The commit log of a job: writer fencing with create-only puts.
//!
//! `<job>/_commits/` holds numbered entries (`<seq>` as 20 decimal digits). Every entry is
//! created with `PutMode::Create`, so each number is written by exactly one writer. A
//! coordinator *claims* an epoch by appending a claim entry with the next epoch; it *commits*
//! checkpoint `n` by appending a completion entry right after the last entry it knows. If that
//! number is taken, another coordinator has claimed a newer epoch since: the commit fails with
//! [`Error::Fenced`]. A checkpoint is complete when its `_metadata` exists **and** its
//! completion entry is in the log, so a fenced coordinator leaves no completed checkpoint
//! behind (it also deletes the metadata it wrote, best effort).
//!
//! Entry (27 bytes): `"FLWL" | version u16 | kind u8 (1 claim, 2 completion) | epoch u64 |
//! checkpoint id u64 (0 for claims) | crc32c(all before) u32`.

use object_store::path::Path;

use crate::error::{Error, Result};
use crate::storage::CheckpointStorage;

const LOG_MAGIC: [u8; 4] = *b"FLWL";
const LOG_VERSION: u16 = 1;
const ENTRY_LEN: usize = 27;
/// How often a claim is retried when other coordinators claim at the same time.
const CLAIM_ATTEMPTS: usize = 64;

/// One entry of the commit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogEntry {
    /// A coordinator took over the job with this epoch.
    Claim {
        /// Position in the log.
        seq: u64,
        /// The new epoch.
        epoch: u64,
    },
    /// A checkpoint was completed by the coordinator of `epoch`.
    Completed {
        /// Position in the log.
        seq: u64,
        /// The writer's epoch.
        epoch: u64,
        /// The checkpoint.
        checkpoint_id: u64,
    },
}

impl LogEntry {
    /// Position in the log.
    pub fn seq(&self) -> u64 {
        match *self {
            LogEntry::Claim { seq, .. } | LogEntry::Completed { seq, .. } => seq,
        }
    }

    /// The epoch of the writer.
    pub fn epoch(&self) -> u64 {
        match *self {
            LogEntry::Claim { epoch, .. } | LogEntry::Completed { epoch, .. } => epoch,
        }
    }

    /// The checkpoint of a completion entry.
    pub fn checkpoint_id(&self) -> Option<u64> {
        match *self {
            LogEntry::Completed { checkpoint_id, .. } => Some(checkpoint_id),
            LogEntry::Claim { .. } => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let (kind, epoch, id) = match *self {
            LogEntry::Claim { epoch, .. } => (1u8, epoch, 0),
            LogEntry::Completed {
                epoch,
                checkpoint_id,
                ..
            } => (2u8, epoch, checkpoint_id),
        };
        let mut b = Vec::with_capacity(ENTRY_LEN);
        b.extend_from_slice(&LOG_MAGIC);
        b.extend_from_slice(&LOG_VERSION.to_be_bytes());
        b.push(kind);
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(&id.to_be_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(seq: u64, b: &[u8], file: &str) -> Result<Self> {
        let corrupt = |offset: u64, reason: String| Error::Corrupt {
            file: file.to_string(),
            offset,
            reason,
        };
        if b.len() != ENTRY_LEN {
            return Err(Error::Truncated {
                file: file.to_string(),
                expected: ENTRY_LEN as u64,
                found: b.len() as u64,
            });
        }
        if b[0..4] != LOG_MAGIC {
            return Err(corrupt(0, "bad magic: not a commit log entry".into()));
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != LOG_VERSION {
            return Err(Error::UnsupportedVersion {
                file: file.to_string(),
                found: version,
                supported: LOG_VERSION,
            });
        }
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[23..27]);
        let expected = u32::from_be_bytes(c);
        let actual = crc32c::crc32c(&b[..23]);
        if expected != actual {
            return Err(Error::ChecksumMismatch {
                file: file.to_string(),
                expected,
                actual,
            });
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&b[7..15]);
        let epoch = u64::from_be_bytes(e);
        e.copy_from_slice(&b[15..23]);
        let checkpoint_id = u64::from_be_bytes(e);
        match b[6] {
            1 => Ok(LogEntry::Claim { seq, epoch }),
            2 => Ok(LogEntry::Completed {
                seq,
                epoch,
                checkpoint_id,
            }),
            k => Err(corrupt(6, format!("unknown entry kind {k}"))),
        }
    }
}

/// A coordinator's hold on a job's commit log.
#[derive(Debug)]
pub struct CommitLog {
    storage: CheckpointStorage,
    epoch: u64,
    last_seq: u64,
}

fn entry_path(storage: &CheckpointStorage, seq: u64) -> Path {
    storage.commit_log_dir().join(format!("{seq:020}"))
}

impl CommitLog {
    /// Every entry of the job's log, in order.
    pub fn read(storage: &CheckpointStorage) -> Result<Vec<LogEntry>> {
        let mut seqs: Vec<u64> = storage
            .list(&storage.commit_log_dir())?
            .into_iter()
            .filter_map(|m| m.location.filename().and_then(|f| f.parse::<u64>().ok()))
            .collect();
        seqs.sort_unstable();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match read_entry(storage, seq) {
                Ok(e) => out.push(e),
                // Pruned by the writer while we listed.
                Err(Error::MissingFile { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Claims the next epoch of the job: from now on every older coordinator's commit fails.
    pub fn claim(storage: &CheckpointStorage) -> Result<Self> {
        for _ in 0..CLAIM_ATTEMPTS {
            let entries = Self::read(storage)?;
            let (seq, epoch) = match entries.last() {
                Some(e) => (e.seq() + 1, e.epoch() + 1),
                None => (0, 1),
            };
            let entry = LogEntry::Claim { seq, epoch };
            if storage.put_if_absent(&entry_path(storage, seq), entry.encode())? {
                return Ok(CommitLog {
                    storage: storage.clone(),
                    epoch,
                    last_seq: seq,
                });
            }
        }
        Err(Error::InvalidConfig {
            reason: format!(
                "could not claim job '{}': {CLAIM_ATTEMPTS} attempts lost against other coordinators",
                storage.job()
            ),
        })
    }

    /// This coordinator's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends the completion of `checkpoint_id`; [`Error::Fenced`] if a newer coordinator
    /// claimed the job.
    pub fn commit(&mut self, checkpoint_id: u64) -> Result<()> {
        let seq = self.last_seq + 1;
        let entry = LogEntry::Completed {
            seq,
            epoch: self.epoch,
            checkpoint_id,
        };
        if self
            .storage
            .put_if_absent(&entry_path(&self.storage, seq), entry.encode())?
        {
            self.last_seq = seq;
            return Ok(());
        }
        let newer_epoch = match read_entry(&self.storage, seq) {
            Ok(e) => e.epoch(),
            Err(_) => self.epoch + 1,
        };
        Err(Error::Fenced {
            job: self.storage.job().to_string(),
            epoch: self.epoch,
            newer_epoch,
            checkpoint_id,
        })
    }

    /// Checks that no newer coordinator has claimed the job (without writing).
    pub fn check_not_fenced(&self, checkpoint_id: u64) -> Result<()> {
        match read_entry(&self.storage, self.last_seq + 1) {
            Err(Error::MissingFile { .. }) => Ok(()),
            Ok(e) => Err(Error::Fenced {
                job: self.storage.job().to_string(),
                epoch: self.epoch,
                newer_epoch: e.epoch(),
                checkpoint_id,
            }),
            Err(e) => Err(e),
        }
    }

    /// Deletes the entries before the completion entry of `oldest_retained` (the log never
    /// becomes empty: the last entry is always kept).
    pub fn prune(&self, oldest_retained: u64) -> Result<()> {
        let entries = Self::read(&self.storage)?;
        let Some(keep_from) = entries
            .iter()
            .find(|e| e.checkpoint_id() == Some(oldest_retained))
            .map(|e| e.seq())
        else {
            return Ok(());
        };
        for e in entries
            .iter()
            .filter(|e| e.seq() < keep_from && e.seq() < self.last_seq)
        {
            self.storage.delete(&entry_path(&self.storage, e.seq()))?;
        }
        Ok(())
    }
}

fn read_entry(storage: &CheckpointStorage, seq: u64) -> Result<LogEntry> {
    let path = entry_path(storage, seq);
    let bytes = storage.get(&path, ENTRY_LEN as u64)?;
    LogEntry::decode(seq, &bytes, path.as_ref())
}
