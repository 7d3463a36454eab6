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
    /// pending.
    pub fn unregister(&mut self, metadata: &CheckpointMetadata, next_checkpoint_id: u64) {
        for f in shared_files(metadata) {
            if let Some(n) = self.refs.get_mut(&f) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&f);
                    self.parked.insert(f, next_checkpoint_id);
                }
            }
        }
    }

    /// Parks files no checkpoint refers to (e.g. written by an aborted checkpoint).
    pub fn park_unreferenced(
        &mut self,
        files: impl IntoIterator<Item = String>,
        next_checkpoint_id: u64,
    ) {
        for f in files {
            if !self.refs.contains_key(&f) {
                self.parked.insert(f, next_checkpoint_id);
            }
        }
    }

    /// Takes out the parked files that may be deleted now, given the lowest pending checkpoint
    /// id (`None` when nothing is pending).
    pub fn take_deletable(&mut self, lowest_pending: Option<u64>) -> Vec<String> {
        let deletable: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, tag)| lowest_pending.is_none_or(|p| p >= **tag))
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
