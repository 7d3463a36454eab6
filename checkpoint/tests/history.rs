//! The coordinator records every attempt: completed ones with their sizes and per-subtask
//! durations, a declined one with the subtask's reason, one aborted by its timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use checkpoint::*;
use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// Waits for the next barrier (skipping notifications).
fn barrier(ep: &mut SubtaskEndpoint) -> Barrier {
    loop {
        match ep.recv_timeout(WAIT).expect("a command") {
            SubtaskCommand::Barrier(b) => return b,
            _ => continue,
        }
    }
}

#[test]
fn every_attempt_is_recorded_with_its_outcome() {
    let storage = memory_storage("job-history");
    let config = CheckpointConfig {
        tolerable_failures: 10,
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let mut eps: Vec<_> = (0..2)
        .map(|i| builder.register_subtask("agg", i, 2, MAX_P).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let mut subtasks: Vec<Subtask> = (0..2).map(|i| Subtask::new(i, 2)).collect();
    for k in 0..200 {
        let s = subtasks.iter_mut().find(|s| s.owns(k)).unwrap();
        s.add(k, 1);
    }

    // 1: completed.
    let p = coord.trigger_checkpoint().unwrap();
    for (ep, s) in eps.iter_mut().zip(subtasks.iter_mut()) {
        let b = barrier(ep);
        ep.snapshot_heap(&b, &mut s.backend, None).unwrap();
    }
    p.wait(WAIT).unwrap();

    // 2: subtask 1 declines (its disk is full) before subtask 0 answers.
    let p = coord.trigger_checkpoint().unwrap();
    let b = barrier(&mut eps[1]);
    eps[1].decline(&b, "no space left on device");
    let _ignored = barrier(&mut eps[0]);
    let err = p.wait(WAIT).unwrap_err();
    assert!(err.to_string().contains("no space left"), "{err}");

    // 3: subtask 1 never answers: aborted by the timeout.
    let p = coord.trigger_checkpoint().unwrap();
    let b = barrier(&mut eps[0]);
    eps[0]
        .snapshot_heap(&b, &mut subtasks[0].backend, None)
        .unwrap();
    let _ignored = barrier(&mut eps[1]);
    assert!(p.wait(WAIT).is_err());

    // 4: completed again.
    let p = coord.trigger_checkpoint().unwrap();
    for (ep, s) in eps.iter_mut().zip(subtasks.iter_mut()) {
        let b = barrier(ep);
        ep.snapshot_heap(&b, &mut s.backend, None).unwrap();
    }
    let done = p.wait(WAIT).unwrap();
    coord.shutdown().unwrap();

    let history = read_history(&storage).unwrap();
    let outcome: Vec<(u64, AttemptStatus)> = history
        .iter()
        .map(|a| (a.checkpoint_id, a.status))
        .collect();
    assert_eq!(
        outcome,
        [
            (1, AttemptStatus::Completed),
            (2, AttemptStatus::Declined),
            (3, AttemptStatus::Aborted),
            (4, AttemptStatus::Completed),
        ]
    );
    let first = &history[0];
    assert!(first.reason.is_none());
    assert_eq!(first.subtasks.len(), 2);
    for s in &first.subtasks {
        assert_eq!(s.status, SubtaskStatus::Acknowledged);
        assert!(s.sync_micros.is_some() && s.async_millis.is_some(), "{s:?}");
        assert!(s.bytes > 0);
        assert_eq!(
            s.bytes, s.delta_bytes,
            "a full checkpoint writes all it refers to"
        );
    }
    assert_eq!(
        first.bytes,
        first.subtasks.iter().map(|s| s.bytes).sum::<u64>()
    );
    // The completed attempt's size is its metadata's.
    let last = &history[3];
    assert_eq!(
        last.bytes,
        done.metadata.files().map(|f| f.size).sum::<u64>()
    );

    let declined = &history[1];
    assert!(
        declined
            .reason
            .as_deref()
            .unwrap()
            .contains("no space left"),
        "{declined:?}"
    );
    assert_eq!(declined.subtasks[0].status, SubtaskStatus::NoAnswer);
    assert_eq!(declined.subtasks[1].status, SubtaskStatus::Declined);
    assert_eq!(
        declined.subtasks[1].reason.as_deref(),
        Some("no space left on device")
    );

    let aborted = &history[2];
    assert!(aborted.reason.is_some());
    assert_eq!(aborted.subtasks[1].status, SubtaskStatus::NoAnswer);
}
