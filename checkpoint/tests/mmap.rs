//! The mmap backend through the coordinator: native incremental checkpoints that upload only
//! new immutable files and reference the others, restored at another parallelism; canonical
//! savepoints from it restore into the heap backend.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use checkpoint::*;
use common::*;
use state_api::{KeyGroupRange, KeyedStateBackend, KeyedStateBackendExt};
use state_mmap::MmapKeyedStateBackend;

const WAIT: Duration = Duration::from_secs(60);
const KEYS: u64 = 3000;

fn mmap(p: u32, i: u32, dir: &std::path::Path) -> MmapKeyedStateBackend<u64> {
    MmapKeyedStateBackend::builder()
        .max_parallelism(MAX_P)
        .key_group_range(KeyGroupRange::for_operator(MAX_P, p, i).unwrap())
        .directory(dir)
        .build()
        .unwrap()
}

fn add<B: KeyedStateBackend<Key = u64>>(b: &mut B, key: u64, v: u64) {
    let h = b.register_value(sum_desc()).unwrap();
    b.set_current_key(key).unwrap();
    let n = b.value(&h).get().unwrap().unwrap_or(0);
    b.value(&h).update(n + v).unwrap();
}

fn dump<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> BTreeMap<u64, u64> {
    let h = b.register_value(sum_desc()).unwrap();
    let r = b.key_group_range();
    let mut out = BTreeMap::new();
    for k in (0..KEYS).filter(|k| r.contains(key_group_of(*k))) {
        b.set_current_key(k).unwrap();
        if let Some(v) = b.value(&h).get().unwrap() {
            out.insert(k, v);
        }
    }
    out
}

fn shared_on_store(storage: &CheckpointStorage) -> BTreeSet<String> {
    use futures::TryStreamExt;
    block_on(
        storage
            .store()
            .list(Some(&storage.shared_dir()))
            .try_collect::<Vec<_>>(),
    )
    .unwrap()
    .into_iter()
    .map(|m| m.location.filename().unwrap().to_string())
    .collect()
}

fn etags(storage: &CheckpointStorage) -> BTreeMap<String, Option<String>> {
    use futures::TryStreamExt;
    block_on(
        storage
            .store()
            .list(Some(&storage.shared_dir()))
            .try_collect::<Vec<_>>(),
    )
    .unwrap()
    .into_iter()
    .map(|m| (m.location.filename().unwrap().to_string(), m.e_tag))
    .collect()
}

fn names(c: &CompletedCheckpoint) -> BTreeMap<String, u64> {
    c.metadata
        .files()
        .map(|f| (f.location.name().to_string(), f.size))
        .collect()
}

#[test]
fn native_incremental_checkpoints_upload_only_new_files_and_restore_rescaled() {
    let storage = memory_storage("job-mmap");
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let mut eps: Vec<_> = (0..2)
        .map(|i| builder.register_subtask("agg", i, 2, MAX_P).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut backends: Vec<_> = (0..2u32)
        .map(|i| mmap(2, i, dirs[i as usize].path()))
        .collect();
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut previous: Option<BTreeMap<String, u64>> = None;
    let mut last = None;
    for round in 1..=4u64 {
        let keys: Vec<u64> = if round == 1 {
            (0..KEYS).collect()
        } else {
            (0..KEYS).filter(|k| k % 50 == round).collect()
        };
        for k in keys {
            let b = backends
                .iter_mut()
                .find(|b| b.key_group_range().contains(key_group_of(k)))
                .unwrap();
            add(b, k, round);
            *model.entry(k).or_insert(0) += round;
        }
        let tags_before = etags(&storage);
        let p = coord.trigger_checkpoint().unwrap();
        for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
            let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
                panic!("a barrier")
            };
            ep.snapshot_mmap(&barrier, b, None).unwrap();
        }
        let done = p.wait(WAIT).unwrap();
        for ep in eps.iter_mut() {
            loop {
                if let SubtaskCommand::CheckpointComplete { .. } = ep.recv_timeout(WAIT).unwrap() {
                    break;
                }
            }
        }
        assert!(done.metadata.operators[0]
            .subtasks
            .iter()
            .all(|s| s.native.is_some() && s.keyed.is_none()));
        let now = names(&done);
        let tags_after = etags(&storage);
        if let Some(prev) = &previous {
            // Referenced, not uploaded again: same name as before and the same e-tag.
            let reused: u64 = now
                .iter()
                .filter(|(n, _)| {
                    prev.contains_key(*n)
                        && tags_before.contains_key(*n)
                        && tags_before.get(*n) == tags_after.get(*n)
                })
                .map(|(_, s)| s)
                .sum();
            let total: u64 = now.values().sum();
            assert!(
                reused * 2 > total,
                "round {round}: reused {reused} of {total}"
            );
        }
        previous = Some(now);
        // shared/ holds exactly what the retained checkpoints use.
        let retained = CompletedCheckpoint::retained(&storage, 2).unwrap();
        let used: BTreeSet<String> = retained
            .iter()
            .flat_map(|c| registry::shared_files(&c.metadata))
            .collect();
        assert_eq!(shared_on_store(&storage), used, "round {round}");
        last = Some(done);
    }
    let done = last.unwrap();
    done.verify_files(&storage).unwrap();

    // Restore at parallelism 3 into fresh mmap backends.
    let download = tempfile::tempdir().unwrap();
    let mut got = BTreeMap::new();
    let rdirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut rescaled = Vec::new();
    for i in 0..3u32 {
        let mut b = mmap(3, i, rdirs[i as usize].path());
        done.restore_mmap(&storage, "agg", i, &mut b, download.path())
            .unwrap();
        got.extend(dump(&mut b));
        rescaled.push(b);
    }
    assert_eq!(got, model);
    // Native state does not restore into another backend.
    let mut heap = Subtask::new(0, 1);
    let err = done
        .restore_keyed(&storage, "agg", 0, &mut heap.backend)
        .unwrap_err();
    assert!(matches!(err, Error::RestoreMismatch { .. }), "{err}");

    // A savepoint of the mmap backends is canonical and restores into the heap backend.
    let sp = coord.trigger_savepoint(Some("mmap-sp")).unwrap();
    for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
        let barrier = loop {
            if let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).unwrap() {
                break b;
            }
        };
        ep.snapshot_mmap(&barrier, b, None).unwrap();
    }
    let sp = sp.wait(WAIT).unwrap();
    assert!(sp.metadata.operators[0]
        .subtasks
        .iter()
        .all(|s| s.keyed.is_some() && s.native.is_none()));
    sp.restore_keyed(&storage, "agg", 0, &mut heap.backend)
        .unwrap();
    assert_eq!(dump(&mut heap.backend), model);

    // The job restarts at parallelism 3 from the latest checkpoint (the old coordinator is
    // gone as in a crash): the first native checkpoint references the restored files.
    drop(coord);
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        ..Default::default()
    };
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata, done.metadata);
    let mut builder =
        CheckpointCoordinator::builder(storage.clone(), config).restored_from(&latest);
    let mut eps: Vec<_> = (0..3)
        .map(|i| builder.register_subtask("agg", i, 3, MAX_P).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let tags_before = etags(&storage);
    let p = coord.trigger_checkpoint().unwrap();
    for (ep, b) in eps.iter_mut().zip(rescaled.iter_mut()) {
        let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
            panic!("a barrier")
        };
        ep.snapshot_mmap(&barrier, b, None).unwrap();
    }
    let after = p.wait(WAIT).unwrap();
    // Files not uploaded again keep their e-tag (the in-memory store counts puts).
    let tags_after = etags(&storage);
    let now = names(&after);
    let reused: u64 = now
        .iter()
        .filter(|(n, _)| tags_before.contains_key(*n) && tags_before.get(*n) == tags_after.get(*n))
        .map(|(_, s)| s)
        .sum();
    let total: u64 = now.values().sum();
    assert!(reused * 2 > total, "reused {reused} of {total}");
    let mut got = BTreeMap::new();
    for i in 0..2u32 {
        let dir = tempfile::tempdir().unwrap();
        let mut b = mmap(2, i, dir.path());
        after
            .restore_mmap(&storage, "agg", i, &mut b, download.path())
            .unwrap();
        got.extend(dump(&mut b));
    }
    assert_eq!(got, model);
    coord.shutdown().unwrap();
    assert!(shared_on_store(&storage).is_empty());
}

/// From checkpoints on the local disk, a native restore hard-links the checkpoint's files
/// instead of copying them. The restored backend's compactions then delete its links, never
/// the checkpoint's files: the checkpoint still verifies and restores the same state. The
/// backend's own directory (which it made durable in the background) reopens to that state.
#[cfg(unix)]
#[test]
fn a_restore_from_local_disk_links_the_files_and_leaves_the_checkpoint_intact() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let url = format!("file://{}", root.path().join("store").display());
    let storage =
        CheckpointStorage::from_storage(&storage_s3::Storage::from_url(&url).unwrap(), "job-ln")
            .unwrap();
    let (coord, mut ep) = incremental_single(&storage);
    let dir = tempfile::tempdir().unwrap();
    let mut b = mmap(1, 0, dir.path());
    let mut model = BTreeMap::new();
    for k in 0..KEYS {
        add(&mut b, k, k + 1);
        model.insert(k, k + 1);
    }
    let p = coord.trigger_checkpoint().unwrap();
    let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
        panic!("a barrier")
    };
    ep.snapshot_mmap(&barrier, &mut b, None).unwrap();
    let done = p.wait(WAIT).unwrap();
    drop(b);

    let restored_dir = tempfile::tempdir().unwrap();
    let download = tempfile::tempdir().unwrap();
    let mut r = mmap(1, 0, restored_dir.path());
    done.restore_mmap(&storage, "agg", 0, &mut r, download.path())
        .unwrap();
    // Every file the restore placed is the checkpoint's own file, linked.
    let placed: Vec<_> = std::fs::read_dir(download.path())
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!placed.is_empty());
    for f in &placed {
        let links = std::fs::metadata(f).unwrap().nlink();
        // The checkpoint's file, the download and the backend's own name.
        assert_eq!(links, 3, "{}: {links} links", f.display());
    }
    assert_eq!(dump(&mut r), model);
    // New writes, then a compaction that replaces (deletes) every restored file.
    for k in 0..KEYS {
        add(&mut r, k, 1);
        *model.get_mut(&k).unwrap() += 1;
    }
    r.compact().unwrap();
    drop(r);
    for f in &placed {
        let links = std::fs::metadata(f).unwrap().nlink();
        assert_eq!(links, 2, "{}: still {links} links", f.display());
    }
    // The checkpoint is whole: it verifies and restores the state it recorded.
    done.verify_files(&storage).unwrap();
    let again_dir = tempfile::tempdir().unwrap();
    let download2 = tempfile::tempdir().unwrap();
    let mut again = mmap(1, 0, again_dir.path());
    done.restore_mmap(&storage, "agg", 0, &mut again, download2.path())
        .unwrap();
    let recorded: BTreeMap<u64, u64> = (0..KEYS).map(|k| (k, k + 1)).collect();
    assert_eq!(dump(&mut again), recorded);
    drop(again);
    // The restored-then-written backend's directory reopens to what it held at its last flush
    // (the compaction flushed): the restored files were made durable before its manifest
    // named them.
    let mut reopened = mmap(1, 0, restored_dir.path());
    assert_eq!(dump(&mut reopened), model);
    coord.shutdown().unwrap();
}
