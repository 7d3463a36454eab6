//! Flushes and compactions are reported as `tracing` events (debug level) with their sizes and
//! durations, so `RUST_LOG=state_mmap=debug` shows what the engine does in the background.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
use state_mmap::MmapKeyedStateBackend;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Every event as `message field=value ...`, from every thread.
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

fn field(line: &str, name: &str) -> u64 {
    let at = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn flushes_and_compactions_are_reported() {
    let events = Collect::default();
    tracing::subscriber::set_global_default(events.clone()).unwrap();
    let mut b = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    for round in 0..3u64 {
        for k in 0..2000u64 {
            b.set_current_key(k).unwrap();
            b.value(&h).update(k + round).unwrap();
        }
        b.flush().unwrap();
    }
    b.compact().unwrap();
    let lines = events.0.lock().unwrap().clone();
    let flushes: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("state-mmap flushed a write buffer"))
        .collect();
    assert!(flushes.len() >= 3, "{lines:#?}");
    assert!(flushes
        .iter()
        .all(|l| field(l, "bytes") > 0 && l.contains(" dir=")));
    let compaction = lines
        .iter()
        .find(|l| l.starts_with("state-mmap compacted runs"))
        .unwrap_or_else(|| panic!("no compaction event in {lines:#?}"));
    assert!(field(compaction, "runs") >= 2, "{compaction}");
    assert!(
        field(compaction, "in_bytes") > field(compaction, "out_bytes"),
        "{compaction}"
    );
}
