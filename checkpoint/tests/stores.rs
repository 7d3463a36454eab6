//! The whole cycle (incremental checkpoints, retention, restore at another parallelism, a
//! savepoint, fencing) against a local directory and against the S3 test server that
//! `scripts/test` starts. Without a configured server the S3 test prints a notice and passes,
//! unless `FLOWSTATE_REQUIRE_S3=1` or `CI=true`, where it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use checkpoint::*;
use common::*;

const WAIT: Duration = Duration::from_secs(60);
const KEYS: u64 = 3000;

fn state_of(subtasks: &mut [Subtask]) -> BTreeMap<u64, (u64, Vec<String>)> {
    let mut all = BTreeMap::new();
    for s in subtasks {
        all.extend(s.dump(0..KEYS));
    }
    all
}

fn answer(eps: &mut [SubtaskEndpoint], subtasks: &mut [Subtask]) {
    for (ep, s) in eps.iter_mut().zip(subtasks.iter_mut()) {
        loop {
            if let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).expect("a barrier") {
                ep.snapshot_heap(&b, &mut s.backend, Some(&s.ops)).unwrap();
                break;
            }
        }
    }
}

fn scenario(storage: CheckpointStorage) {
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config.clone());
    let mut eps: Vec<_> = (0..2)
        .map(|i| b.register_subtask("agg", i, 2, MAX_P).unwrap())
        .collect();
    let coord = b.start().unwrap();
    let mut subtasks: Vec<Subtask> = (0..2).map(|i| Subtask::new(i, 2)).collect();
    let mut last = None;
    for round in 1..=3u64 {
        for k in (0..KEYS).filter(|k| round == 1 || k % 97 == round) {
            subtasks
                .iter_mut()
                .find(|s| s.owns(k))
                .unwrap()
                .add(k, round);
        }
        let expected = state_of(&mut subtasks);
        let p = coord.trigger_checkpoint().unwrap();
        answer(&mut eps, &mut subtasks);
        let done = p.wait(WAIT).unwrap();
        done.verify_files(&storage).unwrap();
        let mut restored = restore(&storage, &done, 3).unwrap();
        assert_eq!(state_of(&mut restored), expected, "round {round}");
        last = Some((done.metadata.checkpoint_id, expected));
    }
    let (last_id, expected) = last.unwrap();
    assert_eq!(
        storage.checkpoint_dir_ids().unwrap(),
        vec![last_id - 1, last_id]
    );

    let sp = coord.trigger_savepoint(Some("sp")).unwrap();
    answer(&mut eps, &mut subtasks);
    let sp = sp.wait(WAIT).unwrap();
    let loaded =
        CompletedCheckpoint::load(&storage, &storage.savepoint_dir("sp").unwrap()).unwrap();
    assert_eq!(loaded.metadata, sp.metadata);
    let mut restored = restore(&storage, &loaded, 1).unwrap();
    assert_eq!(state_of(&mut restored), expected);

    // A second coordinator fences the first.
    let mut b2 = CheckpointCoordinator::builder(storage.clone(), config);
    let _ep2 = b2.register_subtask("agg", 0, 1, MAX_P).unwrap();
    let second = b2.start().unwrap();
    let p = coord.trigger_checkpoint().unwrap();
    answer(&mut eps, &mut subtasks);
    assert!(p.wait(WAIT).unwrap_err().is_fenced());
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata.checkpoint_id, last_id);
    let mut restored = restore(&storage, &latest, 4).unwrap();
    assert_eq!(state_of(&mut restored), expected);
    coord.shutdown().unwrap();
    second.shutdown().unwrap();
    native_scenario(storage.for_job(&format!("{}-mmap", storage.job())).unwrap());
}

/// Native incremental checkpoints of mmap backends, restored at another parallelism.
fn native_scenario(storage: CheckpointStorage) {
    use state_api::{KeyGroupRange, KeyedStateBackend, KeyedStateBackendExt};
    use state_mmap::MmapKeyedStateBackend;
    let config = CheckpointConfig {
        incremental: true,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let mut eps: Vec<_> = (0..2)
        .map(|i| b.register_subtask("agg", i, 2, MAX_P).unwrap())
        .collect();
    let coord = b.start().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let build = |p: u32, i: u32, dir: &std::path::Path| {
        MmapKeyedStateBackend::<u64>::builder()
            .max_parallelism(MAX_P)
            .key_group_range(KeyGroupRange::for_operator(MAX_P, p, i).unwrap())
            .directory(dir)
            .build()
            .unwrap()
    };
    let mut backends: Vec<_> = (0..2u32)
        .map(|i| build(2, i, dirs[i as usize].path()))
        .collect();
    let mut model = BTreeMap::new();
    let mut done = None;
    for round in 1..=2u64 {
        for k in (0..KEYS).filter(|k| round == 1 || k % 10 == 0) {
            let b = backends
                .iter_mut()
                .find(|b| b.key_group_range().contains(key_group_of(k)))
                .unwrap();
            let h = b.register_value(sum_desc()).unwrap();
            b.set_current_key(k).unwrap();
            b.value(&h).update(k * round).unwrap();
            model.insert(k, k * round);
        }
        let p = coord.trigger_checkpoint().unwrap();
        for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
            let barrier = loop {
                if let SubtaskCommand::Barrier(x) = ep.recv_timeout(WAIT).expect("a barrier") {
                    break x;
                }
            };
            ep.snapshot_mmap(&barrier, b, None).unwrap();
        }
        done = Some(p.wait(WAIT).unwrap());
    }
    let done = done.unwrap();
    done.verify_files(&storage).unwrap();
    let download = tempfile::tempdir().unwrap();
    let mut restored = build(1, 0, dirs[2].path());
    done.restore_mmap(&storage, "agg", 0, &mut restored, download.path())
        .unwrap();
    let h = restored.register_value(sum_desc()).unwrap();
    for (k, v) in &model {
        restored.set_current_key(*k).unwrap();
        assert_eq!(restored.value(&h).get().unwrap(), Some(*v), "key {k}");
    }
    coord.shutdown().unwrap();
}

#[test]
fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let s = storage_s3::Storage::from_url(&url).unwrap();
    scenario(CheckpointStorage::new(s.scoped_store(), "", "job-local").unwrap());
    // The files are real files in the directory.
    assert!(dir.path().join("job-local").join("_commits").is_dir());
}

#[test]
fn s3_server() {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(endpoint), Some(key), Some(secret)) = (
        var("FLOWSTATE_S3_TEST_ENDPOINT"),
        var("AWS_ACCESS_KEY_ID"),
        var("AWS_SECRET_ACCESS_KEY"),
    ) else {
        let required = var("FLOWSTATE_REQUIRE_S3").is_some_and(|v| v != "0")
            || var("CI").is_some_and(|v| v == "true" || v == "1");
        assert!(
            !required,
            "the S3 tests are required here (FLOWSTATE_REQUIRE_S3 or CI is set) but no S3 server \
             is configured: run ./scripts/test, which starts SeaweedFS"
        );
        eprintln!("NOTICE: skipping checkpoint S3 test: no S3 server configured");
        return;
    };
    let bucket = var("FLOWSTATE_S3_TEST_BUCKET").unwrap_or_else(|| "flowstate-test".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut config =
        storage_s3::StorageConfig::new(format!("s3://{bucket}/checkpoint-test-{nanos}"));
    config.s3.endpoint = Some(endpoint);
    config.s3.region = Some("us-east-1".into());
    config.s3.access_key_id = Some(key.as_str().into());
    config.s3.secret_access_key = Some(secret.as_str().into());
    config.s3.allow_http = Some(true);
    config.s3.from_env = Some(false);
    let s = storage_s3::Storage::from_config(&config).unwrap();
    scenario(CheckpointStorage::new(s.scoped_store(), "", "job-s3").unwrap());
}
