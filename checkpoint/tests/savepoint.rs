//! Savepoints (self-contained, canonical, restorable from a path into another backend
//! instance at another parallelism) and every validation error of a restore, each named.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use checkpoint::*;
use common::*;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use state_api::{KeyedStateBackend, ValueStateDescriptor};

const WAIT: Duration = Duration::from_secs(30);
const KEYS: u64 = 400;

fn populated(p: u32) -> Vec<Subtask> {
    let mut subtasks: Vec<Subtask> = (0..p).map(|i| Subtask::new(i, p)).collect();
    for k in 0..KEYS {
        subtasks
            .iter_mut()
            .find(|s| s.owns(k))
            .unwrap()
            .add(k, k + 1);
    }
    for s in subtasks.iter_mut() {
        let i = u64::from(s.index);
        s.ops
            .list_state(&offsets_desc())
            .unwrap()
            .update(&[i])
            .unwrap();
    }
    subtasks
}

fn state_of(subtasks: &mut [Subtask]) -> BTreeMap<u64, (u64, Vec<String>)> {
    let mut all = BTreeMap::new();
    for s in subtasks {
        all.extend(s.dump(0..KEYS));
    }
    all
}

fn get(storage: &CheckpointStorage, path: &Path) -> Vec<u8> {
    block_on(async {
        storage
            .store()
            .get(path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    })
}

fn put(storage: &CheckpointStorage, path: &Path, bytes: Vec<u8>) {
    block_on(storage.store().put(path, PutPayload::from(bytes))).unwrap();
}

fn list(storage: &CheckpointStorage, prefix: &Path) -> Vec<Path> {
    block_on(storage.store().list(Some(prefix)).try_collect::<Vec<_>>())
        .unwrap()
        .into_iter()
        .map(|m| m.location)
        .collect()
}

/// Takes a savepoint named `name` of `subtasks` through a coordinator (incremental
/// checkpoints on, to show that savepoints are full anyway), then shuts it down.
fn savepoint(
    storage: &CheckpointStorage,
    subtasks: &mut [Subtask],
    name: &str,
) -> CompletedCheckpoint {
    let config = CheckpointConfig {
        incremental: true,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let p = subtasks.len() as u32;
    let mut eps: Vec<_> = (0..p)
        .map(|i| b.register_subtask("agg", i, p, MAX_P).unwrap())
        .collect();
    let coord = b.start().unwrap();
    let pending = coord.trigger_savepoint(Some(name)).unwrap();
    for (ep, s) in eps.iter_mut().zip(subtasks.iter_mut()) {
        let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
            panic!("a barrier")
        };
        assert_eq!(barrier.kind, CheckpointKind::Savepoint);
        ep.snapshot_heap(&barrier, &mut s.backend, Some(&s.ops))
            .unwrap();
    }
    let done = pending.wait(WAIT).unwrap();
    coord.shutdown().unwrap();
    done
}

#[test]
fn savepoints_are_self_contained_and_restore_elsewhere_at_another_parallelism() {
    let storage = memory_storage("job-s");
    let mut subtasks = populated(2);
    let expected = state_of(&mut subtasks);
    let done = savepoint(&storage, &mut subtasks, "before-upgrade");
    assert_eq!(done.metadata.kind, SnapshotKind::Savepoint);
    let dir = storage.savepoint_dir("before-upgrade").unwrap();
    assert_eq!(done.path, dir.clone().join("_metadata"));
    assert!(done
        .metadata
        .files()
        .all(|f| matches!(f.location, FileLocation::Exclusive(_))));
    // The coordinator's shutdown (retention: delete) left the savepoint alone.
    assert!(!list(&storage, &dir).is_empty());
    assert!(list(&storage, &storage.job_dir().join("shared")).is_empty());

    // Move it somewhere else, delete the original, restore from the new path as another job.
    for p in list(&storage, &dir) {
        let name = p.filename().unwrap().to_string();
        let to = Path::from("moved").join("sp").join(name.as_str());
        put(&storage, &to, get(&storage, &p));
        block_on(storage.store().delete(&p)).unwrap();
    }
    let other = storage.for_job("job-s2").unwrap();
    let loaded = CompletedCheckpoint::load(&other, &Path::from("moved/sp")).unwrap();
    assert_eq!(loaded.metadata, done.metadata);
    loaded.verify_files(&other).unwrap();
    for p in [1, 3] {
        let mut restored = restore(&other, &loaded, p).unwrap();
        assert_eq!(state_of(&mut restored), expected, "parallelism {p}");
        let mut offsets: Vec<u64> = Vec::new();
        for s in restored.iter_mut() {
            offsets.extend(s.ops.list_state(&offsets_desc()).unwrap().get().unwrap());
        }
        assert_eq!(offsets, vec![0, 1]);
    }
}

#[test]
fn a_savepoint_name_is_taken_once() {
    let storage = memory_storage("job-s3");
    let mut subtasks = populated(1);
    savepoint(&storage, &mut subtasks, "sp");
    let config = CheckpointConfig::default();
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let mut ep = b.register_subtask("agg", 0, 1, MAX_P).unwrap();
    let coord = b.start().unwrap();
    assert!(matches!(
        coord.trigger_savepoint(Some("../x")),
        Err(Error::InvalidName { .. })
    ));
    let err = coord.trigger_savepoint(Some("sp")).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // Another name works; the first savepoint is untouched.
    let pending = coord.trigger_savepoint(Some("sp-2")).unwrap();
    let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
        panic!()
    };
    ep.snapshot_heap(&barrier, &mut subtasks[0].backend, None)
        .unwrap();
    pending.wait(WAIT).unwrap();
    coord.shutdown().unwrap();
    let first = CompletedCheckpoint::load(&storage, &storage.savepoint_dir("sp").unwrap()).unwrap();
    first.verify_files(&storage).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Validation: every error is clear and names the file or state; none panics.

fn checkpointed() -> (CheckpointStorage, CompletedCheckpoint) {
    let storage = memory_storage("job-v");
    let mut log = CommitLog::claim(&storage).unwrap();
    let mut subtasks = populated(2);
    let done = checkpoint(&storage, &mut log, 1, &mut subtasks).unwrap();
    (storage, done)
}

fn damage_metadata(f: impl FnOnce(&mut Vec<u8>)) -> (CheckpointStorage, Path, Error) {
    let (storage, done) = checkpointed();
    let mut bytes = get(&storage, &done.path);
    f(&mut bytes);
    put(&storage, &done.path, bytes);
    let err = CompletedCheckpoint::load(&storage, &done.path).unwrap_err();
    (storage, done.path, err)
}

#[test]
fn bad_magic_is_reported() {
    let (_, path, err) = damage_metadata(|b| b[0..4].copy_from_slice(b"NOPE"));
    assert!(matches!(err, Error::Corrupt { offset: 0, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad magic") && msg.contains(path.as_ref()),
        "{msg}"
    );
}

#[test]
fn an_unknown_version_is_reported() {
    let (_, _, err) = damage_metadata(|b| b[4..6].copy_from_slice(&9u16.to_be_bytes()));
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 9,
                supported: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_checksum_mismatch_is_reported() {
    let (_, path, err) = damage_metadata(|b| {
        let n = b.len();
        b[n / 2] ^= 0x10;
    });
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(path.as_ref()));
}

#[test]
fn a_truncated_metadata_file_is_reported() {
    let (_, _, err) = damage_metadata(|b| {
        let n = b.len();
        b.truncate(n - 9);
    });
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
}

#[test]
fn a_huge_declared_length_is_rejected_before_allocating() {
    let (_, _, err) = damage_metadata(|b| b[6..14].copy_from_slice(&u64::MAX.to_be_bytes()));
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[test]
fn a_truncated_state_file_is_reported() {
    let (storage, done) = checkpointed();
    let f = &done.metadata.operators[0].subtasks[1]
        .keyed
        .as_ref()
        .unwrap()
        .files[0];
    let path = done.file_path(&f.file.location);
    let mut bytes = get(&storage, &path);
    bytes.truncate(bytes.len() / 2);
    put(&storage, &path, bytes);
    let mut s = Subtask::new(1, 2);
    let err = done
        .restore_keyed(&storage, "agg", 1, &mut s.backend)
        .unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    assert!(err.to_string().contains(path.as_ref()), "{err}");
}

#[test]
fn a_missing_state_file_is_reported() {
    let (storage, done) = checkpointed();
    let f = &done.metadata.operators[0].subtasks[0]
        .keyed
        .as_ref()
        .unwrap()
        .files[0];
    let path = done.file_path(&f.file.location);
    block_on(storage.store().delete(&path)).unwrap();
    let mut s = Subtask::new(0, 1);
    let err = done
        .restore_keyed(&storage, "agg", 0, &mut s.backend)
        .unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains(path.as_ref()), "{err}");
    assert!(matches!(
        done.verify_files(&storage),
        Err(Error::MissingFile { .. })
    ));
    // A missing metadata file too.
    let err = CompletedCheckpoint::load(&storage, &storage.metadata_path(9)).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
}

#[test]
fn an_incompatible_serializer_names_the_state() {
    let (storage, done) = checkpointed();
    let mut s = Subtask::new(0, 1);
    done.restore_keyed(&storage, "agg", 0, &mut s.backend)
        .unwrap();
    // The job now declares "sum" as a string: the restored bytes cannot be read as one.
    let err = s
        .backend
        .register_value(ValueStateDescriptor::<String>::new("sum").unwrap())
        .map_err(|e| Error::state("agg", 0, e))
        .unwrap_err();
    match &err {
        Error::IncompatibleSerializer {
            operator, state, ..
        } => {
            assert_eq!((operator.as_str(), state.as_str()), ("agg", "sum"));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("sum"), "{err}");
    // The compatible declaration still works.
    s.backend.register_value(sum_desc()).unwrap();
}

#[test]
fn an_unknown_operator_fails_unless_non_restored_state_is_allowed() {
    let (_, done) = checkpointed();
    let err = done
        .check_operators(&["source", "sink"], RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::UnknownOperator { .. }), "{err}");
    assert!(err.to_string().contains("'agg'"), "{err}");
    assert!(
        err.to_string().contains("allow_non_restored_state"),
        "{err}"
    );
    done.check_operators(
        &["source"],
        RestoreOptions {
            allow_non_restored_state: true,
        },
    )
    .unwrap();
    done.check_operators(&["agg", "source"], RestoreOptions::default())
        .unwrap();
}

#[test]
fn a_changed_max_parallelism_is_reported() {
    let (storage, done) = checkpointed();
    let mut b = state_heap::HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(256)
        .build()
        .unwrap();
    let err = done.restore_keyed(&storage, "agg", 0, &mut b).unwrap_err();
    assert!(matches!(err, Error::RestoreMismatch { .. }), "{err}");
    assert!(err.to_string().contains("max parallelism"), "{err}");
    assert_eq!(b.max_parallelism(), 256);
}
