//! The coordinator with real channels, threads and an in-memory store: manual and periodic
//! checkpoints, notifications, retention, declines, timeouts, fencing, incremental snapshots.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::*;
use common::*;

const WAIT: Duration = Duration::from_secs(30);

fn keyed(p: u32) -> Vec<Subtask> {
    (0..p).map(|i| Subtask::new(i, p)).collect()
}

fn start(
    storage: &CheckpointStorage,
    config: CheckpointConfig,
    p: u32,
) -> (CheckpointCoordinator, Vec<SubtaskEndpoint>) {
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let eps = (0..p)
        .map(|i| b.register_subtask("agg", i, p, MAX_P).unwrap())
        .collect();
    (b.start().unwrap(), eps)
}

/// Delivers the barrier to every subtask (the test thread plays all of them).
fn answer_barrier(eps: &mut [SubtaskEndpoint], subtasks: &mut [Subtask]) -> u64 {
    let mut id = 0;
    for (ep, s) in eps.iter_mut().zip(subtasks.iter_mut()) {
        loop {
            match ep.recv_timeout(WAIT).expect("a barrier") {
                SubtaskCommand::Barrier(b) => {
                    id = b.checkpoint_id;
                    ep.snapshot_heap(&b, &mut s.backend, Some(&s.ops)).unwrap();
                    break;
                }
                _ => continue,
            }
        }
    }
    id
}

fn expect_complete(eps: &mut [SubtaskEndpoint], id: u64) {
    for ep in eps {
        loop {
            match ep.recv_timeout(WAIT).expect("a notification") {
                SubtaskCommand::CheckpointComplete { checkpoint_id } if checkpoint_id == id => {
                    break
                }
                SubtaskCommand::CheckpointComplete { .. }
                | SubtaskCommand::CheckpointAborted { .. } => {}
                SubtaskCommand::Barrier(b) => panic!("unexpected barrier {}", b.checkpoint_id),
            }
        }
    }
}

fn state_of(subtasks: &mut [Subtask], keys: u64) -> BTreeMap<u64, (u64, Vec<String>)> {
    let mut all = BTreeMap::new();
    for s in subtasks {
        all.extend(s.dump(0..keys));
    }
    all
}

fn mutate(subtasks: &mut [Subtask], round: u64, keys: impl Iterator<Item = u64>) {
    for k in keys {
        let s = subtasks.iter_mut().find(|s| s.owns(k)).unwrap();
        s.add(k, round);
    }
}

fn checkpoint_dirs(storage: &CheckpointStorage) -> Vec<u64> {
    storage.checkpoint_dir_ids().unwrap()
}

#[test]
fn manual_checkpoints_complete_notify_and_are_retained() {
    let storage = memory_storage("job-m");
    let config = CheckpointConfig {
        retained: 2,
        ..Default::default()
    };
    let (coord, mut eps) = start(&storage, config, 2);
    let events = coord.subscribe();
    let mut subtasks = keyed(2);
    for round in 1..=4u64 {
        mutate(&mut subtasks, round, 0..300);
        let expected = state_of(&mut subtasks, 300);
        let pending = coord.trigger_checkpoint().unwrap();
        let id = answer_barrier(&mut eps, &mut subtasks);
        assert_eq!(id, pending.id());
        // Processing goes on while the checkpoint is written: it must not leak into it.
        mutate(&mut subtasks, 1000, 0..300);
        let done = pending.wait(WAIT).unwrap();
        assert_eq!(done.metadata.checkpoint_id, id);
        expect_complete(&mut eps, id);
        assert_eq!(
            events.recv_timeout(WAIT).unwrap(),
            CheckpointEvent::Completed {
                checkpoint_id: id,
                kind: CheckpointKind::Checkpoint,
                path: done.path.to_string()
            }
        );
        let mut restored = restore(&storage, &done, 3).unwrap();
        assert_eq!(state_of(&mut restored, 300), expected, "round {round}");
    }
    // Two retained: the older ones were subsumed and deleted.
    assert_eq!(checkpoint_dirs(&storage), vec![3, 4]);
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata.checkpoint_id, 4);
    coord.shutdown().unwrap();
    // Retention on shutdown defaults to delete.
    assert!(checkpoint_dirs(&storage).is_empty());
    assert!(CompletedCheckpoint::latest(&storage).unwrap().is_none());
}

#[test]
fn periodic_checkpoints_with_subtask_threads() {
    let storage = memory_storage("job-p");
    let config = CheckpointConfig {
        interval: Some(Duration::from_millis(20)),
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let (coord, eps) = start(&storage, config, 2);
    let events = coord.subscribe();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, mut ep) in eps.into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            let mut s = Subtask::new(i as u32, 2);
            let mut completed = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                if s.owns(k % 500) {
                    s.add(k % 500, 1);
                }
                while let Some(c) = ep.try_recv() {
                    match c {
                        SubtaskCommand::Barrier(b) => {
                            ep.snapshot_heap(&b, &mut s.backend, Some(&s.ops)).unwrap()
                        }
                        SubtaskCommand::CheckpointComplete { checkpoint_id } => {
                            completed.push(checkpoint_id)
                        }
                        SubtaskCommand::CheckpointAborted { .. } => {}
                    }
                }
                if k.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            completed
        }));
    }
    let mut ids = Vec::new();
    while ids.len() < 3 {
        match events.recv_timeout(WAIT).unwrap() {
            CheckpointEvent::Completed { checkpoint_id, .. } => ids.push(checkpoint_id),
            other => panic!("{other:?}"),
        }
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Give the notifications time to arrive, then stop the subtasks.
    let deadline = Instant::now() + WAIT;
    while CompletedCheckpoint::latest(&storage).unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let completed = t.join().unwrap();
        assert!(
            completed.contains(&ids[0]),
            "{completed:?} lacks {}",
            ids[0]
        );
    }
    coord.shutdown().unwrap();
    // Retained on shutdown.
    assert!(CompletedCheckpoint::latest(&storage).unwrap().is_some());
}

#[test]
fn a_decline_fails_the_job_with_the_default_tolerance() {
    let storage = memory_storage("job-d");
    let (coord, mut eps) = start(&storage, CheckpointConfig::default(), 2);
    let events = coord.subscribe();
    let pending = coord.trigger_checkpoint().unwrap();
    let SubtaskCommand::Barrier(b) = eps[1].recv_timeout(WAIT).unwrap() else {
        panic!("a barrier")
    };
    eps[1].decline(&b, "the sink is not ready");
    let err = pending.wait(WAIT).unwrap_err();
    assert!(err.to_string().contains("the sink is not ready"), "{err}");
    assert!(matches!(
        events.recv_timeout(WAIT).unwrap(),
        CheckpointEvent::Aborted {
            checkpoint_id: 1,
            ..
        }
    ));
    assert!(matches!(
        events.recv_timeout(WAIT).unwrap(),
        CheckpointEvent::JobFailed { .. }
    ));
    assert!(coord.trigger_checkpoint().is_err());
    coord.shutdown().unwrap();
}

#[test]
fn an_expired_checkpoint_is_aborted_and_late_files_are_deleted() {
    let storage = memory_storage("job-t");
    let config = CheckpointConfig {
        timeout: Duration::from_millis(50),
        tolerable_failures: 100,
        ..Default::default()
    };
    let (coord, mut eps) = start(&storage, config, 2);
    let events = coord.subscribe();
    let mut subtasks = keyed(2);
    mutate(&mut subtasks, 1, 0..100);
    let pending = coord.trigger_checkpoint().unwrap();
    // Subtask 0 answers in time, subtask 1 only after the timeout.
    let SubtaskCommand::Barrier(b0) = eps[0].recv_timeout(WAIT).unwrap() else {
        panic!()
    };
    eps[0]
        .snapshot_heap(&b0, &mut subtasks[0].backend, None)
        .unwrap();
    let err = pending.wait(WAIT).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(matches!(
        events.recv_timeout(WAIT).unwrap(),
        CheckpointEvent::Aborted {
            checkpoint_id: 1,
            ..
        }
    ));
    let SubtaskCommand::Barrier(b1) = eps[1].recv_timeout(WAIT).unwrap() else {
        panic!()
    };
    eps[1]
        .snapshot_heap(&b1, &mut subtasks[1].backend, None)
        .unwrap();
    // The late files are discarded when the late acknowledgement arrives.
    let deadline = Instant::now() + WAIT;
    while !checkpoint_dirs(&storage).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(checkpoint_dirs(&storage).is_empty());
    // The job goes on: a later checkpoint completes. (Each attempt has the 50 ms timeout too, so
    // on a loaded machine one may expire as well: try again, as the job would.)
    let mut completed = None;
    for _ in 0..50 {
        let pending = coord.trigger_checkpoint().unwrap();
        answer_barrier(&mut eps, &mut subtasks);
        match pending.wait(WAIT) {
            Ok(c) => {
                completed = Some(c.metadata.checkpoint_id);
                break;
            }
            Err(e) => assert!(e.to_string().contains("expired"), "{e}"),
        }
    }
    assert!(completed.is_some_and(|id| id >= 2), "{completed:?}");
    coord.shutdown().unwrap();
}

#[test]
fn a_second_coordinator_fences_the_first_which_leaves_nothing_behind() {
    let storage = memory_storage("job-f");
    let config = CheckpointConfig {
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let (first, mut eps1) = start(&storage, config.clone(), 1);
    let mut subtasks = keyed(1);
    mutate(&mut subtasks, 1, 0..50);
    let p = first.trigger_checkpoint().unwrap();
    answer_barrier(&mut eps1, &mut subtasks);
    assert_eq!(p.wait(WAIT).unwrap().metadata.checkpoint_id, 1);

    let (second, mut eps2) = start(&storage, config, 1);
    assert!(second.epoch() > first.epoch());
    let events = first.subscribe();
    let p = first.trigger_checkpoint().unwrap();
    let fenced_id = p.id();
    answer_barrier(&mut eps1, &mut subtasks);
    let err = p.wait(WAIT).unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(
        err.to_string().contains("another coordinator took over"),
        "{err}"
    );
    loop {
        if let CheckpointEvent::JobFailed { reason } = events.recv_timeout(WAIT).unwrap() {
            assert!(reason.contains("fenced"), "{reason}");
            break;
        }
    }
    assert!(first.trigger_checkpoint().unwrap_err().is_fenced());
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata.checkpoint_id, 1);
    assert!(CompletedCheckpoint::load(&storage, &storage.metadata_path(fenced_id)).is_err());
    // The new coordinator works.
    let p = second.trigger_checkpoint().unwrap();
    answer_barrier(&mut eps2, &mut subtasks);
    let done = p.wait(WAIT).unwrap();
    assert!(done.metadata.checkpoint_id >= fenced_id);
    assert_eq!(done.metadata.epoch, second.epoch());
    first.shutdown().unwrap();
    second.shutdown().unwrap();
    assert!(CompletedCheckpoint::latest(&storage).unwrap().is_some());
}

#[test]
fn incremental_checkpoints_write_only_changed_key_groups_and_share_files() {
    let storage = memory_storage("job-i");
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        ..Default::default()
    };
    let (coord, mut eps) = start(&storage, config, 2);
    let mut subtasks = keyed(2);
    const KEYS: u64 = 5000;
    mutate(&mut subtasks, 1, 0..KEYS);
    let mut sizes = Vec::new();
    for round in 1..=5u64 {
        if round > 1 {
            // A few keys in a few key groups change; one key is removed.
            mutate(
                &mut subtasks,
                round,
                (0..KEYS).filter(|k| u64::from(key_group_of(*k)) % 40 == round),
            );
            let victim = (0..KEYS).find(|k| key_group_of(*k) == 7).unwrap();
            subtasks
                .iter_mut()
                .find(|s| s.owns(victim))
                .unwrap()
                .remove(victim);
        }
        let expected = state_of(&mut subtasks, KEYS);
        let p = coord.trigger_checkpoint().unwrap();
        let id = answer_barrier(&mut eps, &mut subtasks);
        let done = p.wait(WAIT).unwrap();
        expect_complete(&mut eps, id);
        // Every keyed file is in shared/; the new files hold only changed key groups.
        let new_bytes: u64 = done
            .metadata
            .files()
            .filter(|f| f.location.name().contains(&format!("-c{id}-p")))
            .map(|f| f.size)
            .sum();
        let total: u64 = done.metadata.operators[0]
            .subtasks
            .iter()
            .map(|s| s.keyed.as_ref().unwrap().state_size())
            .sum();
        sizes.push((new_bytes, total));
        assert!(done
            .metadata
            .files()
            .all(|f| matches!(f.location, FileLocation::Shared(_))));
        for p in [1, 2, 3] {
            let mut restored = restore(&storage, &done, p).unwrap();
            assert_eq!(
                state_of(&mut restored, KEYS),
                expected,
                "round {round}, p {p}"
            );
        }
        // shared/ holds exactly the files the retained checkpoints use.
        let retained = CompletedCheckpoint::retained(&storage, 2).unwrap();
        let mut used: Vec<String> = retained
            .iter()
            .flat_map(|c| registry::shared_files(&c.metadata))
            .collect();
        used.sort();
        used.dedup();
        let on_store: Vec<String> = futures_list(&storage);
        assert_eq!(on_store, used, "round {round}");
    }
    for (new, total) in &sizes[1..] {
        assert!(new * 5 < *total, "incremental {new} of {total}: {sizes:?}");
    }
    coord.shutdown().unwrap();
    assert!(futures_list(&storage).is_empty());
}

fn futures_list(storage: &CheckpointStorage) -> Vec<String> {
    use futures::TryStreamExt;
    let mut v: Vec<String> = block_on(
        storage
            .store()
            .list(Some(&storage.shared_dir()))
            .try_collect::<Vec<_>>(),
    )
    .unwrap()
    .into_iter()
    .map(|m| m.location.filename().unwrap().to_string())
    .collect();
    v.sort();
    v
}

#[test]
fn a_restart_with_fewer_retained_checkpoints_discards_the_older_ones() {
    let storage = memory_storage("job-r");
    let config = CheckpointConfig {
        incremental: true,
        retained: 3,
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let (coord, mut eps) = start(&storage, config.clone(), 1);
    let mut subtasks = keyed(1);
    for round in 1..=3 {
        mutate(
            &mut subtasks,
            round,
            (0..200).filter(|k| k % 3 == round % 3),
        );
        let p = coord.trigger_checkpoint().unwrap();
        let id = answer_barrier(&mut eps, &mut subtasks);
        p.wait(WAIT).unwrap();
        expect_complete(&mut eps, id);
    }
    coord.shutdown().unwrap();
    assert_eq!(checkpoint_dirs(&storage), vec![1, 2, 3]);
    let expected = state_of(&mut subtasks, 200);

    let config = CheckpointConfig {
        retained: 1,
        ..config
    };
    let (coord, _eps) = start(&storage, config, 1);
    assert_eq!(checkpoint_dirs(&storage), vec![3]);
    let latest = CompletedCheckpoint::latest(&storage).unwrap().unwrap();
    assert_eq!(latest.metadata.checkpoint_id, 3);
    let used: Vec<String> = registry::shared_files(&latest.metadata)
        .into_iter()
        .collect();
    assert_eq!(futures_list(&storage), used);
    let mut restored = restore(&storage, &latest, 2).unwrap();
    assert_eq!(state_of(&mut restored, 200), expected);
    coord.shutdown().unwrap();
}

/// An in-memory store whose puts of checkpoint data files wait while `gate` is closed (true).
#[derive(Debug)]
struct GatedPuts {
    inner: object_store::memory::InMemory,
    gate: AtomicBool,
}

impl std::fmt::Display for GatedPuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatedPuts")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for GatedPuts {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if location.as_ref().ends_with(".kst") {
            while self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn shutdown_waits_for_writes_in_flight_and_leaves_no_file_of_the_aborted_checkpoint() {
    let store = Arc::new(GatedPuts {
        inner: object_store::memory::InMemory::new(),
        gate: AtomicBool::new(false),
    });
    let storage = CheckpointStorage::new(store.clone(), "ck", "job-s").unwrap();
    let config = CheckpointConfig {
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let (coord, mut eps) = start(&storage, config, 2);
    let mut subtasks = keyed(2);
    mutate(&mut subtasks, 1, 0..200);
    let pending = coord.trigger_checkpoint().unwrap();
    answer_barrier(&mut eps, &mut subtasks);
    assert_eq!(pending.wait(WAIT).unwrap().metadata.checkpoint_id, 1);
    // Checkpoint 2's files are being written (held at the gate) when the job shuts down.
    store.gate.store(true, Ordering::SeqCst);
    mutate(&mut subtasks, 2, 0..200);
    let _pending = coord.trigger_checkpoint().unwrap();
    assert_eq!(answer_barrier(&mut eps, &mut subtasks), 2);
    let shutdown = std::thread::spawn(move || coord.shutdown());
    // The shutdown waits for the writes in flight instead of returning under them.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !shutdown.is_finished(),
        "shutdown returned with writes in flight"
    );
    store.gate.store(false, Ordering::SeqCst);
    shutdown.join().unwrap().unwrap();
    // It aborted checkpoint 2 and deleted what its writes produced; nothing of it shows up
    // later either (the writes ended before the shutdown returned).
    assert_eq!(checkpoint_dirs(&storage), vec![1]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(checkpoint_dirs(&storage), vec![1]);
    drop(eps);
}
