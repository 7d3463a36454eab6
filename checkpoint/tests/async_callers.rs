//! The checkpoint and restore API from every kind of caller: a plain thread without tokio,
//! and async code on a multi-thread or current-thread tokio runtime (issue 16, item 3).
//!
//! Each test builds a `CheckpointStorage`, runs a coordinator with one heap subtask, takes a
//! checkpoint, restores it, and drops everything in the caller's context (dropping a tokio
//! runtime inside async code panics, so the drop is part of what is tested).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use checkpoint::*;
use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
use state_heap::HeapKeyedStateBackend;

const WAIT: Duration = Duration::from_secs(30);

fn storage() -> CheckpointStorage {
    let store = Arc::new(object_store::memory::InMemory::new());
    CheckpointStorage::new(store, "checkpoints", "job-1").unwrap()
}

/// Checkpoints one heap subtask through a coordinator and restores it with the blocking API.
fn checkpoint_and_restore_blocking() {
    let storage = storage();
    let mut builder = CheckpointCoordinator::builder(storage.clone(), CheckpointConfig::default());
    let mut endpoint = builder.register_subtask("counts", 0, 1, 128).unwrap();
    let coordinator = builder.start().unwrap();

    let mut backend = HeapKeyedStateBackend::<String>::builder().build().unwrap();
    let count = backend
        .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
        .unwrap();
    backend.set_current_key("ann".to_string()).unwrap();
    backend.value(&count).update(41).unwrap();

    let pending = coordinator.trigger_checkpoint().unwrap();
    loop {
        match endpoint.recv_timeout(WAIT).expect("a barrier") {
            SubtaskCommand::Barrier(barrier) => {
                endpoint
                    .snapshot_heap(&barrier, &mut backend, None)
                    .unwrap();
                break;
            }
            _ => continue,
        }
    }
    let completed = pending.wait(WAIT).unwrap();
    assert_eq!(completed.metadata.checkpoint_id, 1);

    let latest = CompletedCheckpoint::latest(&storage)
        .unwrap()
        .expect("one checkpoint");
    let mut restored = HeapKeyedStateBackend::<String>::builder().build().unwrap();
    latest
        .restore_keyed(&storage, "counts", 0, &mut restored)
        .unwrap();
    let count = restored
        .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
        .unwrap();
    restored.set_current_key("ann".to_string()).unwrap();
    assert_eq!(restored.value(&count).get().unwrap(), Some(41));

    // Drop order as a service would: the coordinator (retaining nothing), then the storage.
    drop(endpoint);
    coordinator.shutdown().unwrap();
    drop(latest);
    drop(completed);
    drop(storage);
}

#[test]
fn blocking_api_from_a_plain_thread() {
    checkpoint_and_restore_blocking();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_api_inside_a_multi_thread_runtime() {
    checkpoint_and_restore_blocking();
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_api_inside_a_current_thread_runtime() {
    checkpoint_and_restore_blocking();
}

/// Checkpoints one heap subtask and restores it with the async API, the subtask running as a
/// task of the caller's runtime: on a current-thread runtime it can answer the barrier only if
/// no call blocks the thread while the checkpoint is pending.
async fn checkpoint_and_restore_async() {
    let storage = storage();
    let mut builder = CheckpointCoordinator::builder(storage.clone(), CheckpointConfig::default());
    let mut endpoint = builder.register_subtask("counts", 0, 1, 128).unwrap();
    let coordinator = builder.start().unwrap();

    let subtask = tokio::spawn(async move {
        let mut backend = HeapKeyedStateBackend::<String>::builder().build().unwrap();
        let count = backend
            .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
            .unwrap();
        backend.set_current_key("bob".to_string()).unwrap();
        backend.value(&count).update(7).unwrap();
        // Polls its endpoint between records, like an operator; yields to the runtime when idle.
        loop {
            match endpoint.try_recv() {
                Some(SubtaskCommand::Barrier(barrier)) => {
                    endpoint
                        .snapshot_heap(&barrier, &mut backend, None)
                        .unwrap();
                }
                Some(SubtaskCommand::CheckpointComplete { checkpoint_id }) => return checkpoint_id,
                Some(_) => {}
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });

    let pending = coordinator.trigger_checkpoint_async().await.unwrap();
    let completed = pending.wait_async(WAIT).await.unwrap();
    assert_eq!(completed.metadata.checkpoint_id, 1);
    assert_eq!(subtask.await.unwrap(), 1);

    let latest = CompletedCheckpoint::latest_async(&storage)
        .await
        .unwrap()
        .expect("one checkpoint");
    let loaded = CompletedCheckpoint::load_async(&storage, &storage.checkpoint_dir(1))
        .await
        .unwrap();
    assert_eq!(loaded.metadata.checkpoint_id, 1);
    let restored = HeapKeyedStateBackend::<String>::builder().build().unwrap();
    let mut restored = latest
        .restore_keyed_async(&storage, "counts", 0, restored)
        .await
        .unwrap();
    let count = restored
        .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
        .unwrap();
    restored.set_current_key("bob".to_string()).unwrap();
    assert_eq!(restored.value(&count).get().unwrap(), Some(7));

    coordinator.shutdown_async().await.unwrap();
    drop(storage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_api_inside_a_multi_thread_runtime() {
    checkpoint_and_restore_async().await;
}

#[tokio::test(flavor = "current_thread")]
async fn async_api_inside_a_current_thread_runtime() {
    checkpoint_and_restore_async().await;
}

/// A storage used and dropped (its only clone, so its runtime goes with it) on a thread that
/// drives a runtime: `Runtime::block_on` and dropping a `Runtime` both panic there.
fn use_and_drop_the_only_storage() {
    let storage = storage();
    assert!(CompletedCheckpoint::latest(&storage).unwrap().is_none());
    assert!(storage.checkpoint_dir_ids().unwrap().is_empty());
    drop(storage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_storage_dropped_inside_a_multi_thread_runtime() {
    use_and_drop_the_only_storage();
}

#[tokio::test(flavor = "current_thread")]
async fn the_only_storage_dropped_inside_a_current_thread_runtime() {
    use_and_drop_the_only_storage();
}
