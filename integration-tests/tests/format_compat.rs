//! Snapshots written by earlier releases stay readable: a canonical snapshot stream committed
//! under `fixtures/` (format version 1, every state kind, namespaces, TTL and timers) restores
//! into the heap and the mmap backends, at parallelism 1 and 2, with exactly the contents the
//! generator below wrote.
//!
//! Regenerate a fixture only together with a new format version, keeping the old file:
//! `FLOWSTATE_WRITE_FIXTURES=1 cargo test -p integration-tests --test format_compat`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

const MAX_P: u32 = 128;
const KEYS: u64 = 300;
/// The clock reading the fixture was written at (TTL timestamps are absolute).
const WRITTEN_AT: i64 = 1_000_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// (count, sum) of the aggregated inputs.
struct CountSum;

impl AggregateFunction<u64, (u64, u64), (u64, u64)> for CountSum {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: u64, (n, s): (u64, u64)) -> (u64, u64) {
        (n + 1, s + v)
    }
    fn get_result(&self, acc: &(u64, u64)) -> (u64, u64) {
        *acc
    }
    fn merge(&self, a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
        (a.0 + b.0, a.1 + b.1)
    }
}

struct Handles {
    value: ValueStateHandle<u64, ()>,
    list: ListStateHandle<String, ()>,
    map: MapStateHandle<u32, String, ()>,
    reducing: ReducingStateHandle<u64, u32>,
    aggregating: AggregatingStateHandle<u64, (u64, u64), ()>,
    ttl: ValueStateHandle<String, ()>,
    timers: TimerServiceHandle<u32>,
}

fn register<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> Handles {
    Handles {
        value: b
            .register_value(ValueStateDescriptor::new("value").unwrap())
            .unwrap(),
        list: b
            .register_list(ListStateDescriptor::new("list").unwrap())
            .unwrap(),
        map: b
            .register_map(MapStateDescriptor::new("map").unwrap())
            .unwrap(),
        reducing: b
            .register_reducing(ReducingStateDescriptor::new("sum", |a, b| a + b).unwrap())
            .unwrap(),
        aggregating: b
            .register_aggregating(AggregatingStateDescriptor::new("count-sum", CountSum).unwrap())
            .unwrap(),
        ttl: b
            .register_value(
                ValueStateDescriptor::new("with-ttl")
                    .unwrap()
                    .with_ttl(StateTtlConfig::new(Duration::from_secs(3600))),
            )
            .unwrap(),
        timers: b
            .register_timer_service(TimerServiceDescriptor::new("timers").unwrap())
            .unwrap(),
    }
}

/// What key `k` holds, as the generator writes it and every restore must read it.
#[derive(Debug, PartialEq)]
struct Contents {
    value: Option<u64>,
    list: Option<Vec<String>>,
    map: Vec<(u32, String)>,
    sums: (Option<u64>, Option<u64>),
    count_sum: Option<(u64, u64)>,
    ttl: Option<String>,
}

fn expected(k: u64) -> Contents {
    Contents {
        value: Some(k * 3),
        list: k
            .is_multiple_of(3)
            .then(|| vec![format!("a{k}"), format!("b{k}")]),
        map: if k.is_multiple_of(2) {
            vec![(1, format!("x{k}")), (2, format!("y{k}"))]
        } else {
            Vec::new()
        },
        sums: (Some(k), k.is_multiple_of(4).then_some(2 * k + 2 * k)),
        count_sum: Some((2, k + 1 + k + 2)),
        ttl: k.is_multiple_of(5).then(|| format!("t{k}")),
    }
}

/// Event-time timers (key, namespace, timestamp) and processing-time ones.
fn expected_timers() -> (BTreeSet<(u64, u32, i64)>, BTreeSet<(u64, u32, i64)>) {
    let event = (0..KEYS)
        .filter(|k| k % 5 == 0)
        .map(|k| (k, (k % 4) as u32, k as i64))
        .collect();
    let processing = (0..KEYS)
        .filter(|k| k % 7 == 0)
        .map(|k| (k, 0, 5_000 + k as i64))
        .collect();
    (event, processing)
}

fn generate(b: &mut HeapKeyedStateBackend<u64>) {
    let h = register(b);
    for k in 0..KEYS {
        b.set_current_key(k).unwrap();
        b.value(&h.value).update(k * 3).unwrap();
        if k % 3 == 0 {
            b.list(&h.list).add(format!("a{k}")).unwrap();
            b.list(&h.list).add(format!("b{k}")).unwrap();
        }
        if k % 2 == 0 {
            b.map(&h.map).put(1, format!("x{k}")).unwrap();
            b.map(&h.map).put(2, format!("y{k}")).unwrap();
        }
        b.reducing_in(&h.reducing, &7).add(k).unwrap();
        if k % 4 == 0 {
            b.reducing_in(&h.reducing, &8).add(2 * k).unwrap();
            b.reducing_in(&h.reducing, &8).add(2 * k).unwrap();
        }
        b.aggregating(&h.aggregating).add(k + 1).unwrap();
        b.aggregating(&h.aggregating).add(k + 2).unwrap();
        if k % 5 == 0 {
            b.value(&h.ttl).update(format!("t{k}")).unwrap();
            b.timers(&h.timers)
                .register_event_time_timer(&((k % 4) as u32), k as i64)
                .unwrap();
        }
        if k % 7 == 0 {
            b.timers(&h.timers)
                .register_processing_time_timer(&0, 5_000 + k as i64)
                .unwrap();
        }
    }
}

fn kg(k: u64) -> u32 {
    let mut bytes = Vec::new();
    PostcardSerializer::<u64>::new()
        .serialize(&k, &mut bytes)
        .unwrap();
    assign_to_key_group(&bytes, MAX_P)
}

/// Restores `snapshot` into `b` and checks every key it owns, and its timers.
fn check<B: KeyedStateBackend<Key = u64>>(b: &mut B, snapshot: &[u8], what: &str) -> usize {
    b.restore(vec![("fixture".to_string(), snapshot)]).unwrap();
    let h = register(b);
    let range = b.key_group_range();
    let mut seen = 0;
    for k in (0..KEYS).filter(|k| range.contains(kg(*k))) {
        b.set_current_key(k).unwrap();
        let mut map = b
            .map(&h.map)
            .iter()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        map.sort();
        let got = Contents {
            value: b.value(&h.value).get().unwrap(),
            list: b.list(&h.list).get().unwrap(),
            map,
            sums: (
                b.reducing_in(&h.reducing, &7).get().unwrap(),
                b.reducing_in(&h.reducing, &8).get().unwrap(),
            ),
            count_sum: b.aggregating(&h.aggregating).get().unwrap(),
            ttl: b.value(&h.ttl).get().unwrap(),
        };
        assert_eq!(got, expected(k), "{what}: key {k}");
        seen += 1;
    }
    let (event, processing) = expected_timers();
    let owned = |t: &&(u64, u32, i64)| range.contains(kg(t.0));
    let fired: BTreeSet<_> = b
        .advance_watermark(&h.timers, i64::MAX)
        .unwrap()
        .into_iter()
        .map(|t| (t.key, t.namespace, t.timestamp))
        .collect();
    assert_eq!(
        fired,
        event.iter().filter(owned).copied().collect(),
        "{what}: event-time timers"
    );
    let fired: BTreeSet<_> = b
        .advance_processing_time(&h.timers, i64::MAX)
        .unwrap()
        .into_iter()
        .map(|t| (t.key, t.namespace, t.timestamp))
        .collect();
    assert_eq!(
        fired,
        processing.iter().filter(owned).copied().collect(),
        "{what}: processing-time timers"
    );
    seen
}

fn clock() -> Arc<ManualClock> {
    // Half an hour after writing: TTL values (one hour) are still alive.
    Arc::new(ManualClock::new(WRITTEN_AT + 1_800_000))
}

#[test]
fn snapshot_format_v1_restores_into_every_backend_and_parallelism() {
    let path = fixture("snapshot-v1.bin");
    if std::env::var_os("FLOWSTATE_WRITE_FIXTURES").is_some() && !path.exists() {
        let mut b = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(MAX_P)
            .clock(Arc::new(ManualClock::new(WRITTEN_AT)))
            .build()
            .unwrap();
        generate(&mut b);
        let mut bytes = Vec::new();
        b.snapshot().unwrap().write_to(&mut bytes).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let snapshot = std::fs::read(&path).unwrap();
    let mut per_backend = BTreeMap::new();
    for p in [1u32, 2] {
        let (mut heap_keys, mut mmap_keys) = (0, 0);
        for i in 0..p {
            let range = KeyGroupRange::for_operator(MAX_P, p, i).unwrap();
            let mut heap = HeapKeyedStateBackend::<u64>::builder()
                .max_parallelism(MAX_P)
                .key_group_range(range)
                .clock(clock())
                .build()
                .unwrap();
            heap_keys += check(&mut heap, &snapshot, &format!("heap p={p} i={i}"));
            let dir = tempfile::tempdir().unwrap();
            let mut mmap = MmapKeyedStateBackend::<u64>::builder()
                .max_parallelism(MAX_P)
                .key_group_range(range)
                .clock(clock())
                .directory(dir.path().join("db"))
                .build()
                .unwrap();
            mmap_keys += check(&mut mmap, &snapshot, &format!("mmap p={p} i={i}"));
        }
        per_backend.insert(p, (heap_keys, mmap_keys));
    }
    // Every key was checked exactly once per backend and parallelism.
    for (p, (heap, mmap)) in per_backend {
        assert_eq!(heap, KEYS as usize, "heap p={p}");
        assert_eq!(mmap, KEYS as usize, "mmap p={p}");
    }
    // The fixture is what it claims to be: a version-1 stream (docs/snapshot-format.md).
    assert_eq!(&snapshot[..4], b"FLWS");
    assert_eq!(
        u16::from_be_bytes(snapshot[4..6].try_into().unwrap()),
        1,
        "format version"
    );
}
