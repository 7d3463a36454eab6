//! The front door: a pipeline of keyed subtasks on threads, checkpointed manually and
//! periodically, restored at another parallelism.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use flowstate::api::{
    KeyedStateBackend, KeyedStateBackendExt, OperatorListStateDescriptor, RedistributionMode,
    ValueStateDescriptor,
};
use flowstate::config::{Config, ConfigLoader};
use flowstate::pipeline::{Pipeline, Subtask};

type Heap = flowstate::heap::HeapKeyedStateBackend<String>;

fn config(dir: &std::path::Path, interval: &str) -> Config {
    ConfigLoader::new()
        .set("state.checkpoints.dir", format!("file://{}", dir.display()))
        .unwrap()
        .set("state.checkpoints.interval", interval)
        .unwrap()
        .set("state.checkpoints.on-shutdown", "retain")
        .unwrap()
        .load()
        .unwrap()
}

/// Counts the events `0..n` whose key this subtask owns, polling between events; keeps the
/// number of events seen in operator state.
fn count(mut s: Subtask<Heap>, n: u64, parallelism: u32) -> Subtask<Heap> {
    let desc = ValueStateDescriptor::<u64>::new("count").unwrap();
    let seen = OperatorListStateDescriptor::<u64>::new("seen", RedistributionMode::Union).unwrap();
    let h = s.backend().register_value(desc).unwrap();
    for i in 0..n {
        let key = format!("k{}", i % 50);
        let kg =
            flowstate::api::assign_to_key_group(&postcard_key(&key), s.backend().max_parallelism());
        let owner = flowstate::api::operator_index_for_key_group(
            s.backend().max_parallelism(),
            parallelism,
            kg,
        );
        if owner == s.index() {
            s.backend().set_current_key(key).unwrap();
            let c = s.backend().value(&h).get().unwrap().unwrap_or(0);
            s.backend().value(&h).update(c + 1).unwrap();
        }
        s.poll().unwrap();
    }
    let mut l = s.operator_state().list_state(&seen).unwrap();
    l.add(&n).unwrap();
    s
}

fn postcard_key(k: &String) -> Vec<u8> {
    let mut out = Vec::new();
    flowstate::api::StateSerializer::serialize(
        &flowstate::api::PostcardSerializer::<String>::new(),
        k,
        &mut out,
    )
    .unwrap();
    out
}

fn counts(subtasks: &mut [Subtask<Heap>]) -> BTreeMap<String, u64> {
    let desc = ValueStateDescriptor::<u64>::new("count").unwrap();
    let mut out = BTreeMap::new();
    for s in subtasks {
        let h = s.backend().register_value(desc.clone()).unwrap();
        let keys: Vec<String> = s
            .backend()
            .keys(&h, &())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for k in keys {
            s.backend().set_current_key(k.clone()).unwrap();
            out.insert(k, s.backend().value(&h).get().unwrap().unwrap());
        }
    }
    out
}

#[test]
fn a_pipeline_checkpoints_and_restores_at_another_parallelism() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "1h");
    let mut pipeline = Pipeline::heap::<String>(&cfg, "clicks")
        .unwrap()
        .operator("counts", 2)
        .start()
        .unwrap();
    assert_eq!(pipeline.restored_checkpoint(), None);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = pipeline
        .take_subtasks("counts")
        .into_iter()
        .map(|s| {
            let done = done_tx.clone();
            thread::spawn(move || {
                let s = count(s, 1000, 2);
                done.send(()).unwrap();
                s.serve_until_stopped().unwrap()
            })
        })
        .collect();
    // Once every subtask has counted its events, a manual checkpoint takes all of them.
    for _ in 0..2 {
        done_rx.recv().unwrap();
    }
    let id = pipeline.checkpoint().unwrap();
    pipeline.stop().unwrap();
    let mut before: Vec<Subtask<Heap>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let expected = counts(&mut before);
    assert_eq!(expected.len(), 50);
    assert_eq!(expected.values().sum::<u64>(), 1000);

    // A new pipeline at parallelism 3 starts from that checkpoint, each subtask with its keys.
    let mut again = Pipeline::heap::<String>(&cfg, "clicks")
        .unwrap()
        .operator("counts", 3)
        .start()
        .unwrap();
    assert_eq!(again.restored_checkpoint(), Some(id));
    let mut restored = again.take_subtasks("counts");
    assert_eq!(restored.len(), 3);
    assert_eq!(counts(&mut restored), expected);
    let seen = OperatorListStateDescriptor::<u64>::new("seen", RedistributionMode::Union).unwrap();
    for s in &mut restored {
        let l = s.operator_state().list_state(&seen).unwrap().get().unwrap();
        assert_eq!(l, vec![1000, 1000], "union state of both old subtasks");
    }
    again.stop().unwrap();
}

#[test]
fn periodic_checkpoints_complete_while_subtasks_poll() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "20ms");
    let mut pipeline = Pipeline::heap::<String>(&cfg, "periodic")
        .unwrap()
        .operator("a", 1)
        .operator("b", 2)
        .start()
        .unwrap();
    let mut workers = Vec::new();
    for op in ["a", "b"] {
        for s in pipeline.take_subtasks(op) {
            workers.push(thread::spawn(move || s.serve_until_stopped().unwrap()));
        }
    }
    let storage = cfg.checkpoint_storage("periodic").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while flowstate::checkpoint::CompletedCheckpoint::latest(&storage)
        .unwrap()
        .is_none_or(|c| c.metadata.checkpoint_id < 3)
    {
        assert!(Instant::now() < deadline, "no periodic checkpoints");
        thread::sleep(Duration::from_millis(10));
    }
    pipeline.stop().unwrap();
    for w in workers {
        w.join().unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn checkpoint_async_lets_subtask_tasks_of_a_current_thread_runtime_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "1h");
    let mut pipeline = Pipeline::heap::<String>(&cfg, "async")
        .unwrap()
        .operator("counts", 2)
        .start()
        .unwrap();
    let mut tasks = Vec::new();
    for mut s in pipeline.take_subtasks("counts") {
        tasks.push(tokio::spawn(async move {
            while !s.is_stopped() {
                s.poll().unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    // A blocking wait here would starve the subtask tasks of this one thread.
    let id = pipeline.checkpoint_async().await.unwrap();
    assert_eq!(id, 1);
    pipeline.stop().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let storage = cfg.checkpoint_storage("async").unwrap();
    let latest = flowstate::checkpoint::CompletedCheckpoint::latest(&storage)
        .unwrap()
        .unwrap();
    assert_eq!(latest.metadata.checkpoint_id, 1);
}
