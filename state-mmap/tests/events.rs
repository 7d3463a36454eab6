//! Flushes and compactions are reported as `tracing` events (debug level) with their sizes and
//! durations, so `RUST_LOG=state_mmap=debug` shows what the engine does in the background.
#![allow(clippy::unwrap_used)]

use state_api::testing::{event_number as field, EventLog};
use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
use state_mmap::MmapKeyedStateBackend;

#[test]
fn flushes_and_compactions_are_reported() {
    let events = EventLog::default();
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
    let lines = events.lines();
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
