//! A savepoint of heap backends restores into mmap backends at another parallelism, and a
//! savepoint of those restores into heap backends again: the canonical format is backend
//! independent.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use checkpoint::*;
use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

const MAX_P: u32 = 128;
const KEYS: u64 = 2000;
const WAIT: Duration = Duration::from_secs(60);

fn kg(k: u64) -> u32 {
    let mut b = Vec::new();
    PostcardSerializer::<u64>::new()
        .serialize(&k, &mut b)
        .unwrap();
    assign_to_key_group(&b, MAX_P)
}

fn range(p: u32, i: u32) -> KeyGroupRange {
    KeyGroupRange::for_operator(MAX_P, p, i).unwrap()
}

/// Writes `model` into `backend` for the keys it owns: a value per key and a map per key.
fn fill<B: KeyedStateBackend<Key = u64>>(b: &mut B, model: &BTreeMap<u64, u64>) {
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let m = b
        .register_map(MapStateDescriptor::<String, u64>::new("m").unwrap())
        .unwrap();
    let r = b.key_group_range();
    for (k, x) in model.iter().filter(|(k, _)| r.contains(kg(**k))) {
        b.set_current_key(*k).unwrap();
        b.value(&v).update(*x).unwrap();
        b.map(&m).put(format!("k{}", x % 7), *x).unwrap();
    }
}

fn dump<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> BTreeMap<u64, (u64, Vec<(String, u64)>)> {
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let m = b
        .register_map(MapStateDescriptor::<String, u64>::new("m").unwrap())
        .unwrap();
    let r = b.key_group_range();
    let mut out = BTreeMap::new();
    for k in (0..KEYS).filter(|k| r.contains(kg(*k))) {
        b.set_current_key(k).unwrap();
        if let Some(x) = b.value(&v).get().unwrap() {
            let mut e = b
                .map(&m)
                .iter()
                .unwrap()
                .collect::<state_api::Result<Vec<_>>>()
                .unwrap();
            e.sort();
            out.insert(k, (x, e));
        }
    }
    out
}

fn expected(model: &BTreeMap<u64, u64>) -> BTreeMap<u64, (u64, Vec<(String, u64)>)> {
    model
        .iter()
        .map(|(k, x)| (*k, (*x, vec![(format!("k{}", x % 7), *x)])))
        .collect()
}

/// Takes a savepoint named `name` of `backends` (one subtask each) through a coordinator.
fn savepoint<B: KeyedStateBackend<Key = u64>>(
    storage: &CheckpointStorage,
    backends: &mut [B],
    name: &str,
) -> CompletedCheckpoint {
    let p = backends.len() as u32;
    let mut builder = CheckpointCoordinator::builder(storage.clone(), CheckpointConfig::default());
    let mut eps: Vec<_> = (0..p)
        .map(|i| builder.register_subtask("op", i, p, MAX_P).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let pending = coord.trigger_savepoint(Some(name)).unwrap();
    for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
        let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
            panic!("a barrier")
        };
        ep.snapshot(&barrier, Some(b), None).unwrap();
    }
    let done = pending.wait(WAIT).unwrap();
    coord.shutdown().unwrap();
    done
}

#[test]
fn heap_to_mmap_and_back_through_savepoints_at_other_parallelisms() {
    let storage =
        CheckpointStorage::new(Arc::new(object_store::memory::InMemory::new()), "", "job-b")
            .unwrap();
    let mut model: BTreeMap<u64, u64> = (0..KEYS).map(|k| (k, k * 3 + 1)).collect();

    // Heap at parallelism 2 -> savepoint.
    let mut heaps: Vec<HeapKeyedStateBackend<u64>> = (0..2)
        .map(|i| {
            HeapKeyedStateBackend::builder()
                .max_parallelism(MAX_P)
                .key_group_range(range(2, i))
                .build()
                .unwrap()
        })
        .collect();
    for h in heaps.iter_mut() {
        fill(h, &model);
    }
    let sp1 = savepoint(&storage, &mut heaps, "from-heap");

    // Into mmap at parallelism 3; change some state; savepoint again.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut mmaps: Vec<MmapKeyedStateBackend<u64>> = (0..3u32)
        .map(|i| {
            let mut b = MmapKeyedStateBackend::builder()
                .max_parallelism(MAX_P)
                .key_group_range(range(3, i))
                .directory(dirs[i as usize].path())
                .build()
                .unwrap();
            sp1.restore_keyed(&storage, "op", i, &mut b).unwrap();
            b
        })
        .collect();
    let mut got = BTreeMap::new();
    for m in mmaps.iter_mut() {
        got.extend(dump(m));
    }
    assert_eq!(got, expected(&model));
    for k in (0..KEYS).step_by(5) {
        model.insert(k, k + 1_000_000);
    }
    for m in mmaps.iter_mut() {
        let v = m
            .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
            .unwrap();
        let mm = m
            .register_map(MapStateDescriptor::<String, u64>::new("m").unwrap())
            .unwrap();
        let r = m.key_group_range();
        for k in (0..KEYS).step_by(5).filter(|k| r.contains(kg(*k))) {
            m.set_current_key(k).unwrap();
            m.map(&mm).clear().unwrap();
            m.value(&v).update(k + 1_000_000).unwrap();
            m.map(&mm)
                .put(format!("k{}", (k + 1_000_000) % 7), k + 1_000_000)
                .unwrap();
        }
    }
    let sp2 = savepoint(&storage, &mut mmaps, "from-mmap");

    // Back into a single heap backend.
    let mut heap = HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(MAX_P)
        .build()
        .unwrap();
    sp2.restore_keyed(&storage, "op", 0, &mut heap).unwrap();
    assert_eq!(dump(&mut heap), expected(&model));
}
