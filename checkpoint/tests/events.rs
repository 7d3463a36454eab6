//! The coordinator and restore report what they do as `tracing` events: trigger, the
//! synchronous and asynchronous parts of each subtask's snapshot (bytes, delta bytes,
//! durations), completion, decline with its reason, abort, and restore (what, bytes, time).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use checkpoint::SubtaskCommand;
use common::*;
use state_api::testing::{event_number as number, EventLog};
use state_api::KeyedStateBackend;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn checkpoints_and_restores_are_reported_as_events() {
    let events = EventLog::default();
    tracing::subscriber::set_global_default(events.clone()).unwrap();

    let storage = memory_storage("job-events");
    let (coord, mut ep) = incremental_single(&storage);
    let mut task = Subtask::new(0, 1);
    let mut last = None;
    for round in 1..=2u64 {
        let keys = if round == 1 { 0..500 } else { 0..3 };
        for k in keys {
            task.add(k, round);
        }
        let pending = coord.trigger_checkpoint().unwrap();
        let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).unwrap() else {
            panic!("a barrier")
        };
        ep.snapshot_backend(&b, &mut task.backend, None).unwrap();
        last = Some(pending.wait(WAIT).unwrap());
        assert!(matches!(
            ep.recv_timeout(WAIT),
            Some(SubtaskCommand::CheckpointComplete { .. })
        ));
    }
    // Checkpoint 3 is declined by the subtask.
    let pending = coord.trigger_checkpoint().unwrap();
    let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).unwrap() else {
        panic!("a barrier")
    };
    ep.decline(&b, "the sink is not ready");
    assert!(pending.wait(WAIT).is_err());

    events.find("checkpoint triggered", &["checkpoint_id=1"]);
    let first = events.find(
        "subtask state written",
        &["checkpoint_id=1", "operator=agg"],
    );
    let second = events.find("subtask state written", &["checkpoint_id=2", "subtask=0"]);
    // The second is a delta: it writes far less than the state it refers to.
    assert!(number(&first, "bytes") > 0);
    assert_eq!(number(&first, "delta_bytes"), number(&first, "bytes"));
    assert!(number(&second, "delta_bytes") * 4 < number(&second, "bytes"));
    for line in [&first, &second] {
        assert!(line.contains(" async_millis="), "{line}");
    }
    events.find(
        "synchronous part of the snapshot taken",
        &["kind=\"delta\"", "sync_micros="],
    );
    events.find("checkpoint completed", &["checkpoint_id=2", "bytes="]);
    events.find(
        "checkpoint declined",
        &["checkpoint_id=3", "operator=agg", "the sink is not ready"],
    );
    events.find("checkpoint aborted", &["checkpoint_id=3"]);

    let mut restored = Subtask::new(0, 1);
    let c = last.unwrap();
    c.restore_keyed(&storage, "agg", 0, &mut restored.backend)
        .unwrap();
    assert_eq!(restored.backend.key_group_range().len(), MAX_P);
    let line = events.find(
        "restored keyed state",
        &["what=\"canonical\"", "operator=\"agg\""],
    );
    assert!(number(&line, "bytes") > 0, "{line}");
    assert!(line.contains(" millis="), "{line}");
    coord.shutdown().unwrap();
}
