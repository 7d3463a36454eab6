//! Full checkpoints of several heap backends with operator state, restored at the same and at
//! other parallelisms; range reads; fencing; metadata damage.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use checkpoint::*;
use common::*;
use object_store::{ObjectStoreExt, PutPayload};
use state_api::KeyedStateBackend;

const KEYS: u64 = 2000;

fn populated(parallelism: u32) -> Vec<Subtask> {
    let mut subtasks: Vec<Subtask> = (0..parallelism)
        .map(|i| Subtask::new(i, parallelism))
        .collect();
    for k in 0..KEYS {
        let s = subtasks.iter_mut().find(|s| s.owns(k)).unwrap();
        s.add(k, k * 3 + 1);
        if k % 3 == 0 {
            s.add(k, 5);
        }
    }
    for s in subtasks.iter_mut() {
        let i = u64::from(s.index);
        s.ops
            .list_state(&offsets_desc())
            .unwrap()
            .update(&[i * 10, i * 10 + 1])
            .unwrap();
        s.ops
            .list_state(&union_desc())
            .unwrap()
            .add(&format!("s{i}"))
            .unwrap();
        s.ops
            .broadcast_state(&rules_desc())
            .unwrap()
            .put(&"limit".to_string(), &7)
            .unwrap();
    }
    subtasks
}

fn dump_all(subtasks: &mut [Subtask]) -> BTreeMap<u64, (u64, Vec<String>)> {
    let mut all = BTreeMap::new();
    for s in subtasks {
        all.extend(s.dump(0..KEYS));
    }
    all
}

#[test]
fn full_checkpoint_restores_at_every_parallelism() {
    let storage = memory_storage("job-a");
    let mut log = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(4);
    let expected = dump_all(&mut subtasks);
    assert_eq!(expected.len(), KEYS as usize);
    let done = checkpoint(&storage, &mut log, 1, &mut subtasks).unwrap();
    assert_eq!(done.metadata.checkpoint_id, 1);
    assert_eq!(done.metadata.epoch, log.epoch());
    done.verify_files(&storage).unwrap();

    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata, done.metadata);
    // The serializer snapshots of every state are in the metadata.
    let states = latest.metadata.operators[0].subtasks[0]
        .keyed
        .as_ref()
        .unwrap()
        .states();
    let names: Vec<_> = states.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, vec!["sum", "seen"]);
    assert!(states.iter().all(|s| !s.serializers.is_empty()));

    for p in [1u32, 2, 3, 4, 7] {
        let mut restored = restore(&storage, &latest, p).unwrap();
        assert_eq!(dump_all(&mut restored), expected, "parallelism {p}");
        let mut offsets = Vec::new();
        for s in restored.iter_mut() {
            let part = s.ops.list_state(&offsets_desc()).unwrap().get().unwrap();
            // Even split: parts differ by at most one element.
            assert!(part.len() == 8 / p as usize || part.len() == 8 / p as usize + 1);
            offsets.extend(part);
            assert_eq!(
                s.ops.list_state(&union_desc()).unwrap().get().unwrap(),
                vec!["s0", "s1", "s2", "s3"]
            );
            assert_eq!(
                s.ops
                    .broadcast_state(&rules_desc())
                    .unwrap()
                    .get(&"limit".into())
                    .unwrap(),
                Some(7)
            );
        }
        assert_eq!(
            offsets,
            vec![0, 1, 10, 11, 20, 21, 30, 31],
            "parallelism {p}"
        );
    }
}

#[test]
fn restore_reads_only_the_owned_key_groups() {
    let storage = memory_storage("job-b");
    let mut log = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(2);
    let expected = dump_all(&mut subtasks);
    let done = checkpoint(&storage, &mut log, 1, &mut subtasks).unwrap();

    // Damage the last key group block of old subtask 0's file (key groups [0, 64)).
    let handle = done.metadata.operators[0].subtasks[0]
        .keyed
        .clone()
        .unwrap();
    let file = &handle.files[0];
    let damaged = *file.key_groups.last().unwrap();
    let path = done.file_path(&file.file.location);
    let mut bytes = storage.store().get(&path).await_bytes();
    bytes[(damaged.offset + damaged.length / 2) as usize] ^= 0x55;
    put(&storage, &path, bytes);

    // At parallelism 4, subtask 0 owns [0, 32) and subtask 2 [64, 96): neither reads the
    // damaged block. Subtask 1 owns [32, 64), which holds it.
    let mut fine = Vec::new();
    for i in [0u32, 2, 3] {
        let mut s = Subtask::new(i, 4);
        assert!(!s.backend.key_group_range().contains(damaged.key_group) || i == 1);
        done.restore_keyed(&storage, "agg", i, &mut s.backend)
            .unwrap();
        fine.push(s);
    }
    let mut got = dump_all(&mut fine);
    let mut s1 = Subtask::new(1, 4);
    assert!(s1.backend.key_group_range().contains(damaged.key_group));
    let err = done
        .restore_keyed(&storage, "agg", 1, &mut s1.backend)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("checksum") && msg.contains(&format!("key group {}", damaged.key_group)),
        "{msg}"
    );
    assert!(msg.contains("agg") && msg.contains(path.as_ref()), "{msg}");
    // What was restored is exactly the expected state of the undamaged ranges.
    let range1 = s1.backend.key_group_range();
    let expected_rest: BTreeMap<_, _> = expected
        .into_iter()
        .filter(|(k, _)| !range1.contains(key_group_of(*k)))
        .collect();
    got.retain(|k, _| !range1.contains(key_group_of(*k)));
    assert_eq!(got, expected_rest);
    let err = done.verify_files(&storage).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn a_second_coordinator_fences_the_first() {
    let storage = memory_storage("job-c");
    let mut first = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(2);
    checkpoint(&storage, &mut first, 1, &mut subtasks).unwrap();

    let mut second = CommitLog::claim(&storage).unwrap();
    assert!(second.epoch() > first.epoch());
    let key = (0..KEYS).find(|k| subtasks[0].owns(*k)).unwrap();
    subtasks[0].add(key, 1000);
    let err = checkpoint(&storage, &mut first, 2, &mut subtasks).unwrap_err();
    assert!(err.is_fenced(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("fenced") && msg.contains("job-c"), "{msg}");
    // No completed checkpoint 2 is left behind.
    assert_eq!(
        CompletedCheckpoint::latest(&storage)
            .unwrap()
            .unwrap()
            .metadata
            .checkpoint_id,
        1
    );
    assert!(matches!(
        CompletedCheckpoint::load(&storage, &storage.metadata_path(2)),
        Err(Error::MissingFile { .. })
    ));
    // The fenced writer stays fenced; the new one commits.
    assert!(checkpoint(&storage, &mut first, 3, &mut subtasks)
        .unwrap_err()
        .is_fenced());
    let done = checkpoint(&storage, &mut second, 4, &mut subtasks).unwrap();
    assert_eq!(done.metadata.epoch, second.epoch());
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata.checkpoint_id, 4);
}

#[test]
fn metadata_round_trips_and_every_damage_is_an_error() {
    let storage = memory_storage("job-d");
    let mut log = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(3);
    let done = checkpoint(&storage, &mut log, 1, &mut subtasks).unwrap();
    let bytes = done.metadata.encode().unwrap();
    assert_eq!(
        CheckpointMetadata::decode(&bytes, "m").unwrap(),
        done.metadata
    );
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x21;
        assert!(CheckpointMetadata::decode(&b, "m").is_err(), "flip at {i}");
    }
    for n in 0..bytes.len() {
        let err = CheckpointMetadata::decode(&bytes[..n], "m").unwrap_err();
        assert!(
            matches!(err, Error::Truncated { .. } | Error::Corrupt { .. }),
            "length {n}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(CheckpointMetadata::decode(&longer, "m").is_err());
}

trait AwaitBytes {
    fn await_bytes(self) -> Vec<u8>;
}

impl<F: std::future::Future<Output = object_store::Result<object_store::GetResult>>> AwaitBytes
    for F
{
    fn await_bytes(self) -> Vec<u8> {
        block_on(async { self.await.unwrap().bytes().await.unwrap().to_vec() })
    }
}

fn put(storage: &CheckpointStorage, path: &object_store::path::Path, bytes: Vec<u8>) {
    block_on(storage.store().put(path, PutPayload::from(bytes))).unwrap();
}

#[test]
fn stale_metadata_of_a_fenced_coordinator_does_not_block_the_same_id() {
    let storage = memory_storage("job-e");
    let mut old = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(1);
    checkpoint(&storage, &mut old, 1, &mut subtasks).unwrap();
    let mut new = CommitLog::claim(&storage).unwrap();
    // The old coordinator got as far as writing the metadata of checkpoint 2.
    assert!(checkpoint(&storage, &mut old, 2, &mut subtasks)
        .unwrap_err()
        .is_fenced());
    let stale = CheckpointMetadata {
        epoch: old.epoch(),
        checkpoint_id: 2,
        ..CompletedCheckpoint::latest(&storage)
            .unwrap()
            .unwrap()
            .metadata
    };
    put(&storage, &storage.metadata_path(2), stale.encode().unwrap());
    // The new coordinator commits checkpoint 2 anyway.
    let done = checkpoint(&storage, &mut new, 2, &mut subtasks).unwrap();
    assert_eq!(done.metadata.epoch, new.epoch());
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(
        (latest.metadata.checkpoint_id, latest.metadata.epoch),
        (2, new.epoch())
    );
    // Metadata of a newer epoch is never replaced.
    let newer = CheckpointMetadata {
        epoch: new.epoch() + 5,
        checkpoint_id: 3,
        ..latest.metadata.clone()
    };
    put(&storage, &storage.metadata_path(3), newer.encode().unwrap());
    let err = checkpoint(&storage, &mut new, 3, &mut subtasks).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}
