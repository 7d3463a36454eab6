//! Helpers shared by the checkpoint tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use checkpoint::*;
use state_api::*;
use state_heap::HeapKeyedStateBackend;

pub const MAX_P: u32 = 128;

pub fn memory_storage(job: &str) -> CheckpointStorage {
    CheckpointStorage::new(Arc::new(object_store::memory::InMemory::new()), "ck", job).unwrap()
}

/// A started coordinator of incremental checkpoints on `storage` for one subtask of operator
/// `agg`, and that subtask's endpoint.
pub fn incremental_single(storage: &CheckpointStorage) -> (CheckpointCoordinator, SubtaskEndpoint) {
    let config = CheckpointConfig {
        incremental: true,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let ep = builder.register_subtask("agg", 0, 1, MAX_P).unwrap();
    (builder.start().unwrap(), ep)
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn key_group_of(k: u64) -> u32 {
    let mut b = Vec::new();
    PostcardSerializer::<u64>::new()
        .serialize(&k, &mut b)
        .unwrap();
    assign_to_key_group(&b, MAX_P)
}

pub fn sum_desc() -> ValueStateDescriptor<u64> {
    ValueStateDescriptor::<u64>::new("sum").unwrap()
}

pub fn list_desc() -> ListStateDescriptor<String> {
    ListStateDescriptor::<String>::new("seen").unwrap()
}

pub fn offsets_desc() -> OperatorListStateDescriptor<u64> {
    OperatorListStateDescriptor::<u64>::new("offsets", RedistributionMode::EvenSplit).unwrap()
}

pub fn union_desc() -> OperatorListStateDescriptor<String> {
    OperatorListStateDescriptor::<String>::new("names", RedistributionMode::Union).unwrap()
}

pub fn rules_desc() -> BroadcastStateDescriptor<String, u32> {
    BroadcastStateDescriptor::<String, u32>::new("rules").unwrap()
}

/// A keyed subtask: a heap backend and its operator state.
pub struct Subtask {
    pub index: u32,
    pub parallelism: u32,
    pub backend: HeapKeyedStateBackend<u64>,
    pub ops: OperatorStateStore,
}

impl Subtask {
    pub fn new(index: u32, parallelism: u32) -> Self {
        let backend = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(MAX_P)
            .key_group_range(KeyGroupRange::for_operator(MAX_P, parallelism, index).unwrap())
            .build()
            .unwrap();
        Subtask {
            index,
            parallelism,
            backend,
            ops: OperatorStateStore::new(),
        }
    }

    pub fn owns(&self, key: u64) -> bool {
        self.backend.key_group_range().contains(key_group_of(key))
    }

    /// Adds `v` to the sum of `key` and records `tag` in its list.
    pub fn add(&mut self, key: u64, v: u64) {
        let h = self.backend.register_value(sum_desc()).unwrap();
        let l = self.backend.register_list(list_desc()).unwrap();
        self.backend.set_current_key(key).unwrap();
        let n = self.backend.value(&h).get().unwrap().unwrap_or(0);
        self.backend.value(&h).update(n + v).unwrap();
        self.backend.list(&l).add(format!("{key}:{v}")).unwrap();
    }

    pub fn remove(&mut self, key: u64) {
        let h = self.backend.register_value(sum_desc()).unwrap();
        let l = self.backend.register_list(list_desc()).unwrap();
        self.backend.set_current_key(key).unwrap();
        self.backend.value(&h).clear().unwrap();
        self.backend.list(&l).clear().unwrap();
    }

    /// `key -> (sum, list)` for the given keys this subtask owns.
    pub fn dump(&mut self, keys: impl Iterator<Item = u64>) -> BTreeMap<u64, (u64, Vec<String>)> {
        let h = self.backend.register_value(sum_desc()).unwrap();
        let l = self.backend.register_list(list_desc()).unwrap();
        let mut out = BTreeMap::new();
        let range = self.backend.key_group_range();
        for k in keys.filter(|k| range.contains(key_group_of(*k))) {
            self.backend.set_current_key(k).unwrap();
            let s = self.backend.value(&h).get().unwrap();
            let lst = self.backend.list(&l).get().unwrap();
            if let Some(s) = s {
                out.insert(k, (s, lst.unwrap_or_default()));
            } else {
                assert!(lst.is_none());
            }
        }
        out
    }

    pub fn snapshot(&mut self) -> SubtaskSnapshot {
        SubtaskSnapshot {
            operator_id: "agg".into(),
            subtask: self.index,
            keyed: Some(KeyedSnapshot::Full(vec![self.backend.snapshot().unwrap()])),
            operator_state: Some(self.ops.clone()),
        }
    }
}

/// Writes and commits a full checkpoint of `subtasks`.
pub fn checkpoint(
    storage: &CheckpointStorage,
    log: &mut CommitLog,
    id: u64,
    subtasks: &mut [Subtask],
) -> checkpoint::Result<CompletedCheckpoint> {
    let target = SnapshotTarget {
        dir: storage.checkpoint_dir(id),
        shared_dir: storage.shared_dir(),
        checkpoint_id: id,
        epoch: log.epoch(),
    };
    let mut acks = Vec::new();
    for s in subtasks.iter_mut() {
        let snap = s.snapshot();
        let state = write_subtask_snapshot(storage, &target, snap)?;
        acks.push(SubtaskAck {
            operator_id: "agg".into(),
            parallelism: s.parallelism,
            max_parallelism: MAX_P,
            state,
        });
    }
    commit_checkpoint(
        storage,
        log,
        id,
        id as i64 * 1000,
        Some(id),
        assemble_operators(acks)?,
    )
}

/// Restores `parallelism` subtasks from `c`.
pub fn restore(
    storage: &CheckpointStorage,
    c: &CompletedCheckpoint,
    parallelism: u32,
) -> checkpoint::Result<Vec<Subtask>> {
    let mut out = Vec::new();
    for i in 0..parallelism {
        let mut s = Subtask::new(i, parallelism);
        c.restore_keyed(storage, "agg", i, &mut s.backend)?;
        s.ops = c.operator_state("agg", i, parallelism)?;
        out.push(s);
    }
    Ok(out)
}
