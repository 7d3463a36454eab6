//! Native incremental checkpoints: the store's immutable files themselves.
//!
//! [`MmapKeyedStateBackend::checkpoint`] flushes the write buffer and returns every live file
//! with its globally unique, immutable name and its key groups, plus a small metadata blob (the
//! state registry and the run layout). A checkpoint layer uploads the files whose names it has
//! not uploaded before and references the others, stores the metadata, and on restore downloads
//! the files a subtask needs ([`NativeCheckpointMeta::files_for`]) into a directory and calls
//! [`MmapKeyedStateBackend::restore_native`]. Files that hold key groups outside the restoring
//! range are clipped (only their owned keys are visible, compaction drops the rest), never
//! rewritten on restore.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use state_api::checkpointing::{
    BackendSnapshot, CheckpointableBackend, NativeFileSpec, NativeFormat, NativeRestoreSource,
    NativeSnapshot, NativeSource, SnapshotRequest,
};
use state_api::{Error, KeyGroupRange, Result, StateKey, StateKind, StateName};

use super::registry::decode_registry;
use super::{MmapKeyedStateBackend, Pending};
use crate::codec::kg_prefix;
use crate::engine::IngestFile;
use crate::run::RunFile;

const META_MAGIC: [u8; 4] = *b"FLNC";
const META_VERSION: u16 = 1;

/// One immutable file of a native checkpoint; holding it keeps the file on disk.
#[derive(Clone, Debug)]
pub struct CheckpointFile {
    file: Arc<RunFile>,
    key_groups: KeyGroupRange,
}

impl CheckpointFile {
    /// The file's unique name: the same bytes always carry the same name, so a name uploaded
    /// once is only referenced afterwards.
    pub fn name(&self) -> &str {
        self.file.name()
    }
    /// Where to read the file from.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }
    /// The key groups whose state the file holds (visible part only).
    pub fn key_groups(&self) -> KeyGroupRange {
        self.key_groups
    }
}

/// The result of [`MmapKeyedStateBackend::checkpoint`].
#[derive(Debug)]
pub struct NativeCheckpoint {
    files: Vec<CheckpointFile>,
    metadata: Vec<u8>,
}

impl NativeCheckpoint {
    /// Every live file (newest sorted run first).
    pub fn files(&self) -> &[CheckpointFile] {
        &self.files
    }
    /// The files whose names are not in `uploaded`: what an incremental checkpoint uploads.
    pub fn new_files<'a>(
        &'a self,
        uploaded: &'a HashSet<String>,
    ) -> impl Iterator<Item = &'a CheckpointFile> + 'a {
        self.files.iter().filter(|f| !uploaded.contains(f.name()))
    }
    /// The metadata to store with the checkpoint (registry and file layout, checksummed).
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }
}

/// A file named by checkpoint metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// The file's name.
    pub name: String,
    /// Its visible key groups.
    pub key_groups: KeyGroupRange,
    /// Its size.
    pub size: u64,
}

/// Decoded checkpoint metadata.
#[derive(Clone, Debug)]
pub struct NativeCheckpointMeta {
    /// Max parallelism of the writer.
    pub max_parallelism: u32,
    /// Key groups of the writer.
    pub key_group_range: KeyGroupRange,
    /// Sorted runs, newest first.
    pub runs: Vec<Vec<FileRef>>,
    registry: Vec<u8>,
}

impl NativeCheckpointMeta {
    /// Decodes and verifies metadata written by [`NativeCheckpoint::metadata`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |off: usize, r: &str| Error::Corrupt {
            stream: "native checkpoint metadata".into(),
            offset: off as u64,
            reason: r.to_string(),
        };
        if bytes.len() < 10 || bytes[..4] != META_MAGIC {
            return Err(bad(0, "bad magic"));
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != META_VERSION {
            return Err(Error::UnsupportedVersion {
                stream: "native checkpoint metadata".into(),
                found: version,
                supported: META_VERSION,
            });
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) != crc32c::crc32c(body) {
            return Err(bad(body.len(), "checksum mismatch"));
        }
        let mut p = 6;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = body.get(p..p + n).ok_or_else(|| bad(p, "truncated"))?;
            p += n;
            Ok(s)
        };
        let u32_of = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
        let max_parallelism = u32_of(take(4)?);
        let start = u32_of(take(4)?);
        let end = u32_of(take(4)?);
        if state_api::validate_max_parallelism(max_parallelism).is_err()
            || start > end
            || end > max_parallelism
        {
            return Err(bad(
                10,
                &format!("key groups [{start}, {end}) of max parallelism {max_parallelism}"),
            ));
        }
        let range = KeyGroupRange::new(start, end);
        let n = u32_of(take(4)?) as usize;
        let registry = take(n)?.to_vec();
        let nruns = u32_of(take(4)?) as usize;
        let mut runs = Vec::new();
        for _ in 0..nruns {
            let nf = u32_of(take(4)?) as usize;
            let mut files = Vec::new();
            for _ in 0..nf {
                let l = u32_of(take(4)?) as usize;
                let name = String::from_utf8(take(l)?.to_vec())
                    .map_err(|_| bad(0, "file name is not UTF-8"))?;
                let s = u32_of(take(4)?);
                let e = u32_of(take(4)?);
                // The writer records the visible part of each file inside its own range.
                if s > e || (s < e && (s < range.start() || e > range.end())) {
                    return Err(bad(
                        0,
                        &format!("file '{name}' holds key groups [{s}, {e}) outside {range}"),
                    ));
                }
                let mut size = [0u8; 8];
                size.copy_from_slice(take(8)?);
                files.push(FileRef {
                    name,
                    key_groups: KeyGroupRange::new(s, e),
                    size: u64::from_be_bytes(size),
                });
            }
            runs.push(files);
        }
        Ok(NativeCheckpointMeta {
            max_parallelism,
            key_group_range: range,
            runs,
            registry,
        })
    }

    /// The states the checkpoint holds (name, kind, TTL and serializer snapshots), decoded and
    /// verified from its state registry, in registry order.
    pub fn states(&self) -> Result<Vec<state_api::StateMeta>> {
        let (_, registry) =
            decode_registry(&self.registry, Path::new("native checkpoint metadata"))?;
        Ok(registry.into_iter().map(|(_, p)| p.meta).collect())
    }

    /// The key serializers the states' keys were written with, each once (a tool that
    /// converts the files without knowing the key type builds its backend with this one, so
    /// the restored states are carried over).
    pub fn key_serializers(&self) -> Result<Vec<state_api::SerializerSnapshot>> {
        let (_, registry) =
            decode_registry(&self.registry, Path::new("native checkpoint metadata"))?;
        let mut out: Vec<state_api::SerializerSnapshot> = Vec::new();
        for (_, p) in registry {
            if !out.contains(&p.key_ser) {
                out.push(p.key_ser);
            }
        }
        Ok(out)
    }

    /// The files a backend owning `range` needs (to download before restoring).
    pub fn files_for(&self, range: KeyGroupRange) -> Vec<&FileRef> {
        self.runs
            .iter()
            .flatten()
            .filter(|f| !f.key_groups.intersect(&range).is_empty())
            .collect()
    }
}

/// One checkpoint to restore from: its metadata and a directory holding (at least) the files
/// [`NativeCheckpointMeta::files_for`] names, under their names.
#[derive(Clone, Debug)]
pub struct NativeRestore {
    /// The checkpoint's metadata.
    pub metadata: Vec<u8>,
    /// Where its files were downloaded.
    pub files_dir: PathBuf,
}

fn kg_of(key: &[u8]) -> u32 {
    key.get(..2)
        .map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])))
        .unwrap_or(0)
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
    /// Flushes the write buffer and returns the live immutable files and the metadata of a
    /// native checkpoint. The synchronous part is the flush (one sorted-run write, then the fsync
    /// of the new files and the manifest); the files can then be uploaded on another thread
    /// while processing continues.
    pub fn checkpoint(&mut self) -> Result<NativeCheckpoint> {
        self.save_registry();
        self.db.flush()?;
        let mut files = Vec::new();
        let mut body = Vec::new();
        body.extend_from_slice(&META_MAGIC);
        body.extend_from_slice(&META_VERSION.to_be_bytes());
        body.extend_from_slice(&self.max_parallelism.to_be_bytes());
        body.extend_from_slice(&self.range.start().to_be_bytes());
        body.extend_from_slice(&self.range.end().to_be_bytes());
        let registry = self.db.user_meta().to_vec();
        body.extend_from_slice(&(registry.len() as u32).to_be_bytes());
        body.extend_from_slice(&registry);
        let runs = self.db.sorted_runs();
        body.extend_from_slice(&(runs.len() as u32).to_be_bytes());
        for r in &runs {
            body.extend_from_slice(&(r.len() as u32).to_be_bytes());
            for f in r.iter() {
                let mut kgs = KeyGroupRange::new(kg_of(f.first_key()), kg_of(f.last_key()) + 1)
                    .intersect(&self.range);
                if let Some((lo, hi)) = f.clip() {
                    kgs = kgs.intersect(&KeyGroupRange::new(kg_of(lo), kg_of(hi)));
                }
                body.extend_from_slice(&(f.name().len() as u32).to_be_bytes());
                body.extend_from_slice(f.name().as_bytes());
                body.extend_from_slice(&kgs.start().to_be_bytes());
                body.extend_from_slice(&kgs.end().to_be_bytes());
                body.extend_from_slice(&f.size().to_be_bytes());
                files.push(CheckpointFile {
                    file: Arc::clone(f),
                    key_groups: kgs,
                });
            }
        }
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        Ok(NativeCheckpoint {
            files,
            metadata: body,
        })
    }

    /// Restores a fresh backend from native checkpoints (one, or several at another
    /// parallelism): opens the files that hold owned key groups (hard links, no rewrite),
    /// clipped to this backend's range; states come back as restored state bound at
    /// registration.
    pub fn restore_native(&mut self, sources: Vec<NativeRestore>) -> Result<()> {
        let (_, _, runs, mem) = self.db.stats();
        if !self.states.is_empty() || !self.pending.is_empty() || runs > 0 || mem > 0 {
            return Err(Error::RestoreMismatch {
                reason: "restore_native needs a fresh backend (no state registered or written)"
                    .into(),
            });
        }
        let mut groups: HashMap<u16, (StateName, Pending)> = HashMap::new();
        let mut ingest = Vec::new();
        // Timer services: entries of version-1 checkpoints are rewritten into the current layout.
        let mut timer_services: Vec<(u16, StateName)> = Vec::new();
        for src in &sources {
            let meta = NativeCheckpointMeta::decode(&src.metadata)?;
            if meta.max_parallelism != self.max_parallelism {
                return Err(Error::RestoreMismatch {
                    reason: format!(
                        "checkpoint written with max parallelism {}, the backend has {}",
                        meta.max_parallelism, self.max_parallelism
                    ),
                });
            }
            let (_, registry) = decode_registry(&meta.registry, &src.files_dir)?;
            for (name, p) in registry {
                if p.meta.kind == StateKind::Timers
                    && !timer_services.iter().any(|(id, _)| *id == p.id)
                {
                    timer_services.push((p.id, name.clone()));
                }
                match groups.get(&p.id) {
                    Some((n, q))
                        if *n == name
                            && q.meta == p.meta
                            && q.key_ser == p.key_ser
                            && q.list_enc == p.list_enc => {}
                    Some((n, _)) => {
                        return Err(Error::RestoreMismatch {
                            reason: format!(
                                "state id {} is '{n}' in one checkpoint and '{name}' (or \
                                 another schema) in another; restore from a canonical \
                                 savepoint instead",
                                p.id
                            ),
                        })
                    }
                    None => {
                        groups.insert(p.id, (name, p));
                    }
                }
            }
            for r in &meta.runs {
                let mut files = Vec::new();
                for f in r {
                    let kgs = f.key_groups.intersect(&self.range);
                    if kgs.is_empty() {
                        continue;
                    }
                    files.push(IngestFile {
                        path: src.files_dir.join(&f.name),
                        name: f.name.clone(),
                        clip: Some((
                            kg_prefix(kgs.start()).to_vec(),
                            kg_prefix(kgs.end()).to_vec(),
                        )),
                    });
                }
                if !files.is_empty() {
                    ingest.push(files);
                }
            }
        }
        for (id, (name, p)) in groups {
            self.next_id = self.next_id.max(u32::from(id) + 1);
            self.pending.entry(name).or_default().push(p);
        }
        self.save_registry();
        self.db.ingest(ingest)?;
        for (id, name) in &timer_services {
            super::timers::migrate_v1(&mut self.db, self.range, *id, name)?;
        }
        Ok(())
    }
}

/// The mmap backend's native checkpoint format, for restore and offline inspection through
/// [`state_api::checkpointing::NativeFormat`]: the manifest is [`NativeCheckpointMeta`], the
/// files are sorted runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapNativeFormat;

/// The backend id the mmap backend stores with its native snapshots.
pub const MMAP_BACKEND_ID: &str = "mmap";

impl NativeFormat for MmapNativeFormat {
    fn backend_id(&self) -> &str {
        MMAP_BACKEND_ID
    }

    fn check(
        &self,
        source: &NativeSource,
        max_parallelism: u32,
    ) -> Result<Vec<state_api::StateMeta>> {
        let corrupt = |reason: String| Error::Corrupt {
            stream: "native checkpoint metadata".into(),
            offset: 0,
            reason,
        };
        let meta = NativeCheckpointMeta::decode(&source.manifest)?;
        if meta.max_parallelism != max_parallelism || meta.key_group_range != source.key_group_range
        {
            return Err(corrupt(format!(
                "the native metadata is for max parallelism {} and key groups {}, the handle \
                 for {max_parallelism} and {}",
                meta.max_parallelism, meta.key_group_range, source.key_group_range
            )));
        }
        for f in meta.runs.iter().flatten() {
            let r = source
                .files
                .iter()
                .find(|x| x.name == f.name)
                .ok_or_else(|| {
                    corrupt(format!(
                        "the native metadata names '{}', which the handle does not list",
                        f.name
                    ))
                })?;
            if r.size != f.size || r.key_groups != f.key_groups {
                return Err(corrupt(format!(
                    "'{}' has {} bytes and key groups {} in the native metadata, {} bytes and \
                     {} in the handle",
                    f.name, f.size, f.key_groups, r.size, r.key_groups
                )));
            }
        }
        meta.states()
    }

    fn files_needed(&self, source: &NativeSource, range: KeyGroupRange) -> Result<Vec<String>> {
        let meta = NativeCheckpointMeta::decode(&source.manifest)?;
        Ok(meta
            .files_for(range)
            .into_iter()
            .map(|f| f.name.clone())
            .collect())
    }

    fn verify_file(&self, path: &Path) -> Result<()> {
        crate::run::RunFile::verify(path)
            .map(drop)
            .map_err(|e| Error::Corrupt {
                stream: path.display().to_string(),
                offset: 0,
                reason: e.to_string(),
            })
    }
}

impl<K: StateKey> CheckpointableBackend for MmapKeyedStateBackend<K> {
    /// Native files for incremental checkpoints ([`MmapKeyedStateBackend::checkpoint`]: a
    /// flush, then every live immutable file); a canonical stream otherwise.
    fn snapshot_for_checkpoint(&mut self, request: &SnapshotRequest) -> Result<BackendSnapshot> {
        if request.canonical_only {
            return Ok(BackendSnapshot::Canonical(vec![
                state_api::KeyedStateBackend::snapshot(self)?,
            ]));
        }
        let cp = self.checkpoint()?;
        let files = cp
            .files()
            .iter()
            .map(|f| NativeFileSpec {
                name: f.name().to_string(),
                path: f.path().to_path_buf(),
                size: f.size(),
                key_groups: f.key_groups(),
            })
            .collect();
        Ok(BackendSnapshot::Native(NativeSnapshot {
            backend: MMAP_BACKEND_ID.into(),
            key_group_range: self.range,
            manifest: cp.metadata().to_vec(),
            files,
            keep_alive: Box::new(cp),
        }))
    }

    fn native_format(&self) -> Option<&dyn NativeFormat> {
        Some(&MmapNativeFormat)
    }

    /// Opens the downloaded files in place (hard links, no rewrite), clipped to this
    /// backend's range ([`MmapKeyedStateBackend::restore_native`]).
    fn restore_from_native(&mut self, sources: Vec<NativeRestoreSource>) -> Result<()> {
        self.restore_native(
            sources
                .into_iter()
                .map(|s| NativeRestore {
                    metadata: s.source.manifest,
                    files_dir: s.dir,
                })
                .collect(),
        )
    }
}
