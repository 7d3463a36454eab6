//! The heap backend's side of the snapshot contract
//! ([`state_api::checkpointing::CheckpointableBackend`]): canonical snapshots split by key
//! group, and for incremental checkpoints a delta chain built from the backend's change logs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use state_api::checkpointing::{
    split_key_groups, BackendSnapshot, CheckpointableBackend, SnapshotRequest,
};
use state_api::{KeyedStateBackend, KeyedStateSnapshot, Result, StateKey};

use crate::changelog::HeapChanges;
use crate::HeapKeyedStateBackend;

/// The change logs a delta checkpoint needs, kept until a later checkpoint completes.
#[derive(Debug, Default)]
pub(crate) struct CheckpointLogs {
    /// The first checkpoint taken with change tracking on: logs cover every change after it.
    since: Option<u64>,
    /// The logs taken at each checkpoint after the last completed one.
    changes: BTreeMap<u64, Arc<HeapChanges>>,
    /// Checkpoints snapshotted incrementally and not yet completed or aborted.
    taken: BTreeSet<u64>,
}

impl<K: StateKey> HeapKeyedStateBackend<K> {
    fn full_parts(&mut self, parts: usize) -> Vec<Box<dyn KeyedStateSnapshot>> {
        let all: Vec<u32> = self.key_group_range().iter().collect();
        split_key_groups(&all, parts)
            .into_iter()
            .map(|kgs| {
                Box::new(self.snapshot_heap().restrict_to(kgs)) as Box<dyn KeyedStateSnapshot>
            })
            .collect()
    }
}

impl<K: StateKey> CheckpointableBackend for HeapKeyedStateBackend<K> {
    /// Canonical parts, or with an incremental request a delta on the base when the change
    /// logs cover everything since it (a canonical snapshot otherwise: the first incremental
    /// checkpoint, which also starts change tracking).
    fn snapshot_for_checkpoint(&mut self, request: &SnapshotRequest) -> Result<BackendSnapshot> {
        if request.canonical_only {
            return Ok(BackendSnapshot::Canonical(self.full_parts(request.parts)));
        }
        let tracking = self.is_tracking_changes();
        self.track_changes();
        let id = request.checkpoint_id;
        if tracking {
            let taken = Arc::new(self.take_changes());
            self.checkpoints.changes.insert(id, taken);
        } else {
            self.checkpoints.since = Some(id);
            self.checkpoints.changes.clear();
        }
        self.checkpoints.taken.insert(id);
        let covered = request
            .delta_base
            .filter(|b| tracking && self.checkpoints.since.is_some_and(|s| s <= *b));
        let Some(base) = covered else {
            return Ok(BackendSnapshot::Canonical(self.full_parts(request.parts)));
        };
        let changes: Vec<_> = self
            .checkpoints
            .changes
            .range(base + 1..)
            .map(|(_, c)| Arc::clone(c))
            .collect();
        let probe = self.snapshot_delta(changes.clone());
        let changed = probe.changed_key_groups();
        let replaced = probe.replaced_key_groups();
        drop(probe);
        let parts = split_key_groups(&changed, request.parts.max(1))
            .into_iter()
            .map(|kgs| {
                Box::new(self.snapshot_delta(changes.clone()).restrict_to(kgs))
                    as Box<dyn KeyedStateSnapshot>
            })
            .collect();
        Ok(BackendSnapshot::Delta { parts, replaced })
    }

    /// Drops the change logs up to a completed incremental checkpoint (a later delta builds on
    /// it).
    fn notify_checkpoint_complete(&mut self, checkpoint_id: u64) {
        if self.checkpoints.taken.contains(&checkpoint_id) {
            self.checkpoints.changes.retain(|id, _| *id > checkpoint_id);
            self.checkpoints.taken.retain(|id| *id > checkpoint_id);
        }
    }

    fn notify_checkpoint_aborted(&mut self, checkpoint_id: u64) {
        // Its log stays: a later delta on an earlier base still needs those changes.
        self.checkpoints.taken.remove(&checkpoint_id);
    }
}
