//! The shared-state registry: reference counts of the files in `<job>/shared/`.
//!
//! Every retained completed checkpoint holds one reference to each shared file its metadata
//! names. When a checkpoint is subsumed or discarded, its references go; a file whose count
//! drops to zero is not deleted at once but parked until every checkpoint that was pending at
//! that moment has finished, because such a checkpoint may have been built (by a subtask that
//! had not yet heard of the newer completion) on the file. A parked file that a completing
//! checkpoint uses is taken back.

use std::collections::{BTreeMap, BTreeSet};

use crate::format::{CheckpointMetadata, FileLocation};

/// Reference counts of shared files, by file name.
#[derive(Debug, Default, Clone)]
pub struct SharedStateRegistry {
    refs: BTreeMap<String, usize>,
    /// Unreferenced files and the id of the first checkpoint that cannot refer to them: they
    /// may be deleted once no checkpoint below that id is pending.
    parked: BTreeMap<String, u64>,
}

/// The shared file names a checkpoint refers to (each once).
pub fn shared_files(metadata: &CheckpointMetadata) -> BTreeSet<String> {
    metadata
        .files()
        .filter_map(|f| match &f.location {
            FileLocation::Shared(n) => Some(n.clone()),
            FileLocation::Exclusive(_) => None,
        })
        .collect()
}

/// The backend-native file names of a checkpoint.
pub fn native_files(metadata: &CheckpointMetadata) -> BTreeSet<String> {
    metadata
        .operators
        .iter()
        .flat_map(|o| o.subtasks.iter())
        .filter_map(|s| s.native.as_ref())
        .flat_map(|n| n.files.iter().map(|f| f.file.location.name().to_string()))
        .collect()
}

impl SharedStateRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one reference per shared file of `metadata` (a checkpoint being retained).
    pub fn register(&mut self, metadata: &CheckpointMetadata) {
        for f in shared_files(metadata) {
            self.parked.remove(&f);
            *self.refs.entry(f).or_insert(0) += 1;
        }
    }

    /// Drops the references of `metadata` (a checkpoint no longer retained). Files that lose
    /// their last reference are parked until no checkpoint below `next_checkpoint_id` is
    /// pending; backend-native files (whose names a later checkpoint may upload again) until
    /// no checkpoint at all is pending.
    pub fn unregister(&mut self, metadata: &CheckpointMetadata, next_checkpoint_id: u64) {
        let native = native_files(metadata);
        for f in shared_files(metadata) {
            if let Some(n) = self.refs.get_mut(&f) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&f);
                    let tag = if native.contains(&f) {
                        u64::MAX
                    } else {
                        next_checkpoint_id
                    };
                    self.parked.insert(f, tag);
                }
            }
        }
    }

    /// Parks files no checkpoint refers to (e.g. written by an aborted checkpoint), each with
    /// the id of the first checkpoint that cannot refer to it (`u64::MAX`: only when nothing
    /// is pending).
    pub fn park_unreferenced(&mut self, files: impl IntoIterator<Item = (String, u64)>) {
        for (f, tag) in files {
            if !self.refs.contains_key(&f) {
                let t = self.parked.entry(f).or_insert(tag);
                *t = (*t).max(tag);
            }
        }
    }

    /// Takes out the parked files that may be deleted now, given the lowest pending checkpoint
    /// id (`None` when nothing is pending).
    pub fn take_deletable(&mut self, lowest_pending: Option<u64>) -> Vec<String> {
        let deletable: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, tag)| lowest_pending.is_none_or(|p| p >= **tag && **tag != u64::MAX))
            .map(|(f, _)| f.clone())
            .collect();
        for f in &deletable {
            self.parked.remove(f);
        }
        deletable
    }

    /// The reference count of a file.
    pub fn references(&self, file: &str) -> usize {
        self.refs.get(file).copied().unwrap_or(0)
    }

    /// True when the file is referenced or parked (still on the store).
    pub fn is_known(&self, file: &str) -> bool {
        self.refs.contains_key(file) || self.parked.contains_key(file)
    }

    /// Every referenced file.
    pub fn referenced(&self) -> impl Iterator<Item = &str> {
        self.refs.keys().map(String::as_str)
    }
}
