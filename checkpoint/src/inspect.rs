//! Inspecting a checkpoint or savepoint offline: what each subtask holds, read through the same
//! verifying readers a restore uses.
//!
//! Every file the metadata names is checked against its recorded size (the object's size, not
//! a guess) and its CRC32C, streaming in chunks of [`VERIFY_CHUNK`] bytes (never a whole file
//! in memory). Entry counts of canonical state come from the verified data itself: the streams
//! a restore would hand a backend ([`CompletedCheckpoint::keyed_streams`]: owned blocks of
//! every file of a chain, with the records later deltas supersede or remove dropped), read
//! block by block with each block's checksum verified. Native (mmap) state is described by its
//! files, the key groups they cover and the states of its registry, after its metadata is
//! decoded and checked against the handle; each file is copied (streaming) into a private
//! temporary directory and opened as the store opens it, every block's checksum verified. Any damage is an [`Error`] naming the file.

use std::collections::BTreeSet;

use state_api::checkpointing::NativeFormat;
use state_api::snapshot::SnapshotReader;
use state_api::{KeyGroupRange, StateMeta};

use crate::error::{Error, Result};
use crate::format::{FileLocation, FileRef, KeyedStateHandle, NativeKeyedHandle};
use crate::restore::CompletedCheckpoint;
use crate::storage::CheckpointStorage;

/// Most bytes [`CompletedCheckpoint::verify_file`] reads with one range read.
pub const VERIFY_CHUNK: u64 = 8 << 20;

/// One file of a subtask's keyed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSummary {
    /// Where the file is.
    pub location: FileLocation,
    /// Its size in bytes (verified against the object).
    pub size: u64,
    /// Native files: the key groups whose state it holds.
    pub key_groups: Option<KeyGroupRange>,
    /// Canonical files: true for a delta stream (on top of earlier files of the chain).
    pub delta: bool,
}

/// How a subtask's keyed state is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyedFormat {
    /// The subtask has no keyed state.
    None,
    /// Canonical snapshot streams (full or a chain of deltas).
    Canonical,
    /// A backend's native files; the backend's id (`"mmap"`).
    Native(String),
}

/// What one subtask of an operator holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubtaskSummary {
    /// The subtask index.
    pub subtask: u32,
    /// How its keyed state is stored.
    pub format: KeyedFormat,
    /// The key groups the subtask owned (`None` without keyed state).
    pub key_group_range: Option<KeyGroupRange>,
    /// Canonical: key groups with at least one live entry. Native: key groups some file
    /// covers.
    pub key_groups_with_data: u32,
    /// Canonical: live entries (what a restore hands the backend). Native: `None`, the native
    /// metadata does not record entry counts.
    pub entries: Option<u64>,
    /// Bytes of all its files.
    pub bytes: u64,
    /// Its keyed states (from the canonical files' headers, or the native state registry).
    pub states: Vec<StateMeta>,
    /// Its files, in handle order.
    pub files: Vec<FileSummary>,
}

/// What one operator holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSummary {
    /// The operator's stable id.
    pub operator_id: String,
    /// One entry per subtask, in subtask order.
    pub subtasks: Vec<SubtaskSummary>,
}

impl CompletedCheckpoint {
    /// Verifies every file and summarizes every subtask of every operator (see the module
    /// docs). Fails with an error naming the file at the first damage found.
    /// Native state needs its backend's format: see [`Self::inspect_with`]; here it is an
    /// error.
    pub fn inspect(&self, storage: &CheckpointStorage) -> Result<Vec<OperatorSummary>> {
        self.inspect_with(storage, &[])
    }

    /// [`Self::inspect`], reading native state through the backend format among `formats`
    /// whose id it carries (for the mmap backend, `state_mmap::MmapNativeFormat`). Native
    /// state of a backend without a format here is an error.
    pub fn inspect_with(
        &self,
        storage: &CheckpointStorage,
        formats: &[&dyn NativeFormat],
    ) -> Result<Vec<OperatorSummary>> {
        let mut out = Vec::new();
        for op in &self.metadata.operators {
            let mut subtasks = Vec::new();
            for st in &op.subtasks {
                let summary = match (&st.keyed, &st.native) {
                    (Some(k), _) => self.inspect_canonical(
                        storage,
                        &op.operator_id,
                        op.max_parallelism,
                        st.subtask,
                        k,
                    )?,
                    (None, Some(n)) => self.inspect_native(
                        storage,
                        &op.operator_id,
                        op.max_parallelism,
                        st.subtask,
                        n,
                        formats,
                    )?,
                    (None, None) => SubtaskSummary {
                        subtask: st.subtask,
                        format: KeyedFormat::None,
                        key_group_range: None,
                        key_groups_with_data: 0,
                        entries: None,
                        bytes: 0,
                        states: Vec::new(),
                        files: Vec::new(),
                    },
                };
                subtasks.push(summary);
            }
            out.push(OperatorSummary {
                operator_id: op.operator_id.clone(),
                subtasks,
            });
        }
        Ok(out)
    }

    /// Checks that the file `f` refers to has exactly the recorded size and CRC32C, reading it
    /// in chunks of at most [`VERIFY_CHUNK`] bytes.
    pub fn verify_file(&self, storage: &CheckpointStorage, f: &FileRef) -> Result<()> {
        self.stream_file(storage, f, |_| Ok(()))
    }

    /// Reads the file `f` refers to in chunks of at most [`VERIFY_CHUNK`] bytes, handing each
    /// to `sink`, after checking its size; fails if its CRC32C differs from the recorded one
    /// (after the last chunk: what `sink` received must be discarded then).
    pub(crate) fn stream_file(
        &self,
        storage: &CheckpointStorage,
        f: &FileRef,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let (path, size) = self.checked_size(storage, f)?;
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < size {
            let end = size.min(at + VERIFY_CHUNK);
            let parts = storage.get_ranges(&path, std::slice::from_ref(&(at..end)))?;
            for p in &parts {
                crc = crc32c::crc32c_append(crc, p);
                sink(p)?;
            }
            at = end;
        }
        if crc != f.crc32c {
            return Err(Error::ChecksumMismatch {
                file: self.location_of(&path),
                expected: f.crc32c,
                actual: crc,
            });
        }
        Ok(())
    }

    /// The object `f` refers to and its size, checked against the recorded size (missing,
    /// truncated and too long are each their own error).
    pub(crate) fn checked_size(
        &self,
        storage: &CheckpointStorage,
        f: &FileRef,
    ) -> Result<(object_store::path::Path, u64)> {
        let path = self.file_path(&f.location);
        let size = storage.size(&path).map_err(|e| match e {
            Error::MissingFile { .. } => Error::MissingFile {
                file: self.location_of(&path),
                referenced_by: self.location(),
            },
            e => e,
        })?;
        if size < f.size {
            return Err(Error::Truncated {
                file: self.location_of(&path),
                expected: f.size,
                found: size,
            });
        }
        if size != f.size {
            return Err(Error::Corrupt {
                file: self.location_of(&path),
                offset: f.size,
                reason: format!(
                    "the file has {size} bytes, the metadata recorded {}",
                    f.size
                ),
            });
        }
        Ok((path, size))
    }

    fn inspect_canonical(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        max_parallelism: u32,
        subtask: u32,
        k: &KeyedStateHandle,
    ) -> Result<SubtaskSummary> {
        for f in &k.files {
            self.verify_file(storage, &f.file)?;
            // The header a restore takes from the metadata is the file's own.
            let path = self.file_path(&f.file.location);
            let head_range = 0..f.header_bytes.len() as u64;
            let head = storage.get_ranges(&path, std::slice::from_ref(&head_range))?;
            if head.first().map(|h| &h[..]) != Some(&f.header_bytes[..]) {
                return Err(Error::Corrupt {
                    file: self.location_of(&path),
                    offset: 0,
                    reason: "the stream's header differs from the one in the metadata".into(),
                });
            }
        }
        let streams = self.keyed_streams(storage, operator, max_parallelism, k.key_group_range)?;
        let mut entries = 0u64;
        let mut with_data = BTreeSet::new();
        for (name, reader) in streams {
            let failure = reader.failure();
            // A storage failure while streaming is reported as itself.
            let fail = |e: state_api::Error| -> Error {
                crate::restore::stream_error(Some(&failure), operator, subtask, e)
            };
            let mut r = SnapshotReader::open(reader, name.clone()).map_err(&fail)?;
            let states = r.header().states.len();
            while let Some(block) = r.next_block().map_err(&fail)? {
                let mut n = 0u64;
                for rec in block.records(&name, max_parallelism) {
                    let rec = rec.map_err(&fail)?;
                    if rec.state_index as usize >= states {
                        return Err(Error::Corrupt {
                            file: name.clone(),
                            offset: block.offset,
                            reason: format!(
                                "a record of state {} in a stream of {states} states",
                                rec.state_index
                            ),
                        });
                    }
                    n += 1;
                }
                if n > 0 {
                    with_data.insert(block.key_group);
                }
                entries += n;
            }
        }
        Ok(SubtaskSummary {
            subtask,
            format: KeyedFormat::Canonical,
            key_group_range: Some(k.key_group_range),
            key_groups_with_data: with_data.len() as u32,
            entries: Some(entries),
            bytes: k.files.iter().map(|f| f.file.size).sum(),
            states: k.states(),
            files: k
                .files
                .iter()
                .map(|f| FileSummary {
                    location: f.file.location.clone(),
                    size: f.file.size,
                    key_groups: None,
                    delta: f.header_bytes.get(4..6) == Some(&[0, 2]),
                })
                .collect(),
        })
    }

    fn inspect_native(
        &self,
        storage: &CheckpointStorage,
        operator: &str,
        max_parallelism: u32,
        subtask: u32,
        n: &NativeKeyedHandle,
        formats: &[&dyn NativeFormat],
    ) -> Result<SubtaskSummary> {
        let corrupt = |reason: String| Error::Corrupt {
            file: self.location(),
            offset: 0,
            reason: format!("operator '{operator}' subtask {subtask}: {reason}"),
        };
        let Some(format) = formats.iter().find(|f| f.backend_id() == n.backend) else {
            return Err(corrupt(format!(
                "native state of backend '{}', whose format was not given to read it",
                n.backend
            )));
        };
        let (source, states) =
            self.native_source(*format, operator, max_parallelism, subtask, n)?;
        let mut covered = BTreeSet::new();
        for f in &source.files {
            covered.extend(f.key_groups.intersect(&n.key_group_range).iter());
        }
        // Each file is verified as a restore does: size and CRC32C on the way to a local
        // copy, then opened as the backend opens it.
        let scratch = Scratch::new()?;
        for f in &n.files {
            let path = self.file_path(&f.file.location);
            let local = scratch.0.join(f.file.location.name());
            self.download_file(storage, &f.file, &local)?;
            let opened = format.verify_file(&local).map_err(|e| Error::Corrupt {
                file: self.location_of(&path),
                offset: 0,
                reason: e.to_string(),
            });
            let _ = std::fs::remove_file(&local);
            opened?;
        }
        Ok(SubtaskSummary {
            subtask,
            format: KeyedFormat::Native(n.backend.clone()),
            key_group_range: Some(n.key_group_range),
            key_groups_with_data: covered.len() as u32,
            entries: None,
            bytes: n.files.iter().map(|f| f.file.size).sum(),
            states,
            files: n
                .files
                .iter()
                .map(|f| FileSummary {
                    location: f.file.location.clone(),
                    size: f.file.size,
                    key_groups: Some(f.key_groups),
                    delta: false,
                })
                .collect(),
        })
    }
}

/// A private directory for the local copies of native files, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("flowstate-inspect-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            context: format!("creating '{}'", dir.display()),
            source: e,
        })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
