//! The coordinator and restore report what they do as `tracing` events: trigger, the
//! synchronous and asynchronous parts of each subtask's snapshot (bytes, delta bytes,
//! durations), completion, decline with its reason, abort, and restore (what, bytes, time).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoint::{CheckpointConfig, CheckpointCoordinator, SubtaskCommand};
use common::*;
use state_api::KeyedStateBackend;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const WAIT: Duration = Duration::from_secs(60);

/// Every event as `message field=value ...`.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl Subscriber for Collect {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Collect {
    fn find(&self, message: &str, fields: &[&str]) -> String {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .find(|l| l.starts_with(message) && fields.iter().all(|f| l.contains(f)))
            .cloned()
            .unwrap_or_else(|| panic!("no event '{message}' with {fields:?} in {lines:#?}"))
    }
}

fn number(line: &str, field: &str) -> u64 {
    let at = line.find(&format!(" {field}=")).unwrap() + field.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn checkpoints_and_restores_are_reported_as_events() {
    let events = Collect::default();
    tracing::subscriber::set_global_default(events.clone()).unwrap();

    let storage = memory_storage("job-events");
    let config = CheckpointConfig {
        incremental: true,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let mut ep = builder.register_subtask("agg", 0, 1, MAX_P).unwrap();
    let coord = builder.start().unwrap();
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
