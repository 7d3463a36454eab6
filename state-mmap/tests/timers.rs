//! Timers of the mmap backend live in its ordered store: memory stays bounded with many timers,
//! they survive reopening, native checkpoints and savepoints in both directions, and stores and
//! checkpoints written by version 1 (timers under the generic state key) are still read.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::{MmapKeyedStateBackend, NativeCheckpointMeta, NativeRestore};

fn service<B: KeyedStateBackend>(b: &mut B) -> TimerServiceHandle<u32> {
    b.register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
        .unwrap()
}

type Fired = Vec<(u64, u32, i64)>;

fn triples(fired: Vec<Timer<u64, u32>>) -> Fired {
    fired
        .into_iter()
        .map(|t| (t.key, t.namespace, t.timestamp))
        .collect()
}

/// Checks timestamp order (ties are ordered by key bytes, compared with the heap backend below).
fn assert_ordered(fired: &Fired) {
    assert!(
        fired.windows(2).all(|w| w[0].2 <= w[1].2),
        "timestamp order"
    );
}

#[test]
fn many_timers_are_kept_on_disk_not_in_memory() {
    const BUDGET: usize = 1 << 20;
    const KEYS: u64 = 20_000;
    const TIMERS: u64 = 200_000;
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(BUDGET)
        .build()
        .unwrap();
    let h = service(&mut b);
    let empty = b.timer_memory_bytes();
    assert!(
        empty > 0 && empty <= 128 * 64,
        "{empty} bytes for 128 key groups"
    );
    let mut max_buffer = 0;
    for i in 0..TIMERS {
        b.set_current_key(i % KEYS).unwrap();
        let ts = ((i * 7_919) % TIMERS) as i64;
        b.timers(&h)
            .register_event_time_timer(&((i % 3) as u32), ts)
            .unwrap();
        if i % 1000 == 0 {
            max_buffer = max_buffer.max(b.engine().stats().3);
        }
    }
    // ~7 MB of timers went through a 1 MiB budget: the in-memory part grew only by the ordered
    // bounds of the key groups (a fixed amount per key group, whatever the number of timers),
    // the write buffer stayed within its third of the budget, and the timers were flushed to runs.
    let per_key_groups = 128 * 2 * 64;
    assert!(
        b.timer_memory_bytes() <= empty + per_key_groups,
        "{} bytes, {empty} empty",
        b.timer_memory_bytes()
    );
    let (flushes, _, _, _) = b.engine().stats();
    assert!(flushes >= 5, "{flushes} flushes");
    assert!(
        max_buffer <= BUDGET / 2,
        "write buffer {max_buffer} bytes (limit {}, share {}, charged {})",
        b.engine().write_buffer_limit(),
        b.engine().memory_share(),
        b.engine().memory_charged()
    );

    // Registering a flushed timer again is a no-op; deleting a flushed timer keeps it from
    // firing.
    b.set_current_key(0).unwrap();
    b.timers(&h).register_event_time_timer(&0, 0).unwrap();
    b.set_current_key(1).unwrap();
    let deleted_ts = (7_919 % TIMERS) as i64;
    b.timers(&h)
        .delete_event_time_timer(&1, deleted_ts)
        .unwrap();

    let mut fired = 0u64;
    let mut last = i64::MIN;
    let mut seen = BTreeSet::new();
    for step in 1..=20 {
        let got = triples(b.advance_watermark(&h, step * 10_000 - 1).unwrap());
        assert_ordered(&got);
        for (k, ns, ts) in got {
            assert!(ts >= last && ts < step * 10_000);
            last = ts;
            assert!(seen.insert((k, ns, ts)), "fired twice: {k} {ns} {ts}");
            assert_ne!((k, ns, ts), (1, 1, deleted_ts), "a deleted timer fired");
            fired += 1;
        }
    }
    assert_eq!(fired, TIMERS - 1, "every timer but the deleted one, once");
    assert!(b.advance_watermark(&h, i64::MAX).unwrap().is_empty());
    assert!(b.timer_memory_bytes() <= empty + per_key_groups);
}

#[test]
fn timers_survive_reopening_and_due_processing_timers_fire_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        MmapKeyedStateBackend::<u64>::builder()
            .directory(dir.path())
            .memory_budget(256 << 10)
            .build()
            .unwrap()
    };
    let mut b = open();
    let h = service(&mut b);
    for k in 0..2_000u64 {
        b.set_current_key(k).unwrap();
        b.timers(&h)
            .register_event_time_timer(&((k % 4) as u32), (k % 100) as i64)
            .unwrap();
        b.timers(&h)
            .register_processing_time_timer(&0, 1_000 + (k % 10) as i64)
            .unwrap();
    }
    assert_eq!(b.advance_watermark(&h, 9).unwrap().len(), 200);
    b.flush().unwrap();
    drop(b);

    let mut b = open();
    let h = service(&mut b);
    // The job was down past every processing timer: they all fire on the first advance.
    let p = triples(b.advance_processing_time(&h, 5_000).unwrap());
    assert_eq!(p.len(), 2_000);
    assert_ordered(&p);
    let e = triples(b.advance_watermark(&h, i64::MAX).unwrap());
    assert_eq!(e.len(), 1_800, "the 200 fired before closing stay fired");
    assert_ordered(&e);
    assert!(e
        .iter()
        .all(|&(k, ns, ts)| ts == (k % 100) as i64 && ns == (k % 4) as u32 && ts >= 10));
}

/// Registers the same timers on any backend.
fn fill<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &TimerServiceHandle<u32>) {
    for k in 0..3_000u64 {
        b.set_current_key(k).unwrap();
        b.timers(h)
            .register_event_time_timer(&((k % 5) as u32), (k % 97) as i64)
            .unwrap();
        if k % 2 == 0 {
            b.timers(h)
                .register_processing_time_timer(&7, (k % 13) as i64)
                .unwrap();
        }
    }
}

fn drain<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &TimerServiceHandle<u32>) -> Fired {
    let mut all = triples(b.advance_watermark(h, 40).unwrap());
    all.extend(triples(b.advance_processing_time(h, i64::MAX).unwrap()));
    all.extend(triples(b.advance_watermark(h, i64::MAX).unwrap()));
    all
}

fn snapshot<B: KeyedStateBackend>(b: &mut B) -> Vec<u8> {
    let mut out = Vec::new();
    b.snapshot().unwrap().write_to(&mut out).unwrap();
    out
}

#[test]
fn timer_savepoints_move_between_heap_and_mmap() {
    let mut heap = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let hh = service(&mut heap);
    fill(&mut heap, &hh);
    let mut mmap = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(256 << 10)
        .build()
        .unwrap();
    let hm = service(&mut mmap);
    fill(&mut mmap, &hm);
    let from_heap = snapshot(&mut heap);
    let from_mmap = snapshot(&mut mmap);
    let expected = drain(&mut heap, &hh);
    assert_eq!(expected.len(), 4_500);
    assert_eq!(drain(&mut mmap, &hm), expected, "same timers, same order");

    let mut m = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    m.restore(vec![("heap".to_string(), &from_heap[..])])
        .unwrap();
    let h = service(&mut m);
    assert_eq!(drain(&mut m, &h), expected, "heap savepoint into mmap");
    let mut hp = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    hp.restore(vec![("mmap".to_string(), &from_mmap[..])])
        .unwrap();
    let h = service(&mut hp);
    assert_eq!(drain(&mut hp, &h), expected, "mmap savepoint into heap");
}

#[test]
fn native_checkpoints_carry_timers_across_rescaling() {
    let shared = tempfile::tempdir().unwrap();
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(256 << 10)
        .build()
        .unwrap();
    let h = service(&mut b);
    fill(&mut b, &h);
    let c = b.checkpoint().unwrap();
    for f in c.files() {
        fs::copy(f.path(), shared.path().join(f.name())).unwrap();
    }
    let meta = c.metadata().to_vec();
    drop(c);
    let expected = drain(&mut b, &h);
    let mut got = Vec::new();
    for i in 0..2 {
        let range = KeyGroupRange::for_operator(128, 2, i).unwrap();
        let mut half = MmapKeyedStateBackend::<u64>::builder()
            .key_group_range(range)
            .build()
            .unwrap();
        half.restore_native(vec![NativeRestore {
            metadata: meta.clone(),
            files_dir: shared.path().to_path_buf(),
        }])
        .unwrap();
        let hh = service(&mut half);
        for t in drain(&mut half, &hh) {
            assert!(half.set_current_key(t.0).is_ok(), "foreign key group");
            got.push(t);
        }
    }
    got.sort();
    let mut want = expected;
    want.sort();
    assert_eq!(got, want);
}

/// `tests/fixtures/v1-timers` was written by the version-1 layout (timers under the generic state
/// key): a store directory (`MANIFEST`, one run) that is also a native checkpoint
/// (`checkpoint.meta`). 50 keys, each with an event timer `(k % 3, 10k)`, a processing timer
/// `(0, 1000 + k)` and a value state `v = k`.
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-timers");

fn check_v1(b: &mut MmapKeyedStateBackend<u64>) {
    let h = service(b);
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.value(&v).get().unwrap(), Some(k));
    }
    let e = triples(b.advance_watermark(&h, i64::MAX).unwrap());
    let want: Fired = (0..50u64)
        .map(|k| (k, (k % 3) as u32, (k * 10) as i64))
        .collect();
    assert_eq!(e, want);
    let p = triples(b.advance_processing_time(&h, 1_024).unwrap());
    assert_eq!(
        p,
        (0..25u64)
            .map(|k| (k, 0, 1_000 + k as i64))
            .collect::<Fired>()
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn version_1_stores_and_checkpoints_are_read() {
    // Reopening the store directory.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new(FIXTURE), dir.path());
    let open = || {
        MmapKeyedStateBackend::<u64>::builder()
            .directory(dir.path())
            .build()
            .unwrap()
    };
    let mut b = open();
    check_v1(&mut b);
    // Rewritten once: flushed, the store reopens in the current layout.
    b.flush().unwrap();
    drop(b);
    let mut b = open();
    let h = service(&mut b);
    assert_eq!(b.advance_processing_time(&h, i64::MAX).unwrap().len(), 25);

    // Restoring the native checkpoint (its files under their checkpoint names).
    let files = tempfile::tempdir().unwrap();
    let metadata = fs::read(Path::new(FIXTURE).join("checkpoint.meta")).unwrap();
    let meta = NativeCheckpointMeta::decode(&metadata).unwrap();
    for f in meta.runs.iter().flatten() {
        let local = f.name.rsplit('-').next().unwrap();
        fs::copy(Path::new(FIXTURE).join(local), files.path().join(&f.name)).unwrap();
    }
    let mut r = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    r.restore_native(vec![NativeRestore {
        metadata,
        files_dir: files.path().to_path_buf(),
    }])
    .unwrap();
    check_v1(&mut r);
}

#[test]
fn sparse_key_groups_and_late_registrations_fire_correctly() {
    // Few keys, so most key groups have no timers and some run dry between advances; the
    // per-key-group lower bounds must never hide a timer registered later below them.
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(64 << 10)
        .build()
        .unwrap();
    let h = service(&mut b);
    for k in 0..6u64 {
        b.set_current_key(k).unwrap();
        b.timers(&h)
            .register_event_time_timer(&0, 100 * (k as i64 + 1))
            .unwrap();
    }
    assert!(b.advance_watermark(&h, 50).unwrap().is_empty());
    assert_eq!(triples(b.advance_watermark(&h, 250).unwrap()).len(), 2);
    // Below the bounds now held for keys 0..6 (the next due 300..600, or none).
    for k in 0..6u64 {
        b.set_current_key(k).unwrap();
        b.timers(&h).register_event_time_timer(&1, 260).unwrap();
    }
    b.set_current_key(3).unwrap();
    b.timers(&h).delete_event_time_timer(&0, 400).unwrap();
    let got = triples(b.advance_watermark(&h, 400).unwrap());
    let mut want: Fired = (0..6u64).map(|k| (k, 1, 260)).collect();
    want.push((2, 0, 300));
    let mut got_sorted = got.clone();
    got_sorted.sort_by_key(|t| (t.2, t.0));
    assert_eq!(got_sorted, want);
    assert_ordered(&got);
    assert_eq!(
        triples(b.advance_watermark(&h, i64::MAX).unwrap()),
        vec![(4, 0, 500), (5, 0, 600)]
    );
    // Timers at the extremes of the timestamp range.
    b.set_current_key(9).unwrap();
    b.timers(&h)
        .register_event_time_timer(&0, i64::MIN)
        .unwrap();
    b.timers(&h)
        .register_event_time_timer(&0, i64::MAX)
        .unwrap();
    assert_eq!(
        triples(b.advance_watermark(&h, i64::MAX - 1).unwrap()),
        vec![(9, 0, i64::MIN)]
    );
    assert_eq!(
        triples(b.advance_watermark(&h, i64::MAX).unwrap()),
        vec![(9, 0, i64::MAX)]
    );
    assert!(b.advance_watermark(&h, i64::MAX).unwrap().is_empty());
}

#[test]
fn restored_timers_not_yet_registered_survive_the_next_snapshot() {
    let mut heap = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let hh = service(&mut heap);
    fill(&mut heap, &hh);
    let first = snapshot(&mut heap);
    let expected = drain(&mut heap, &hh);
    let mut m = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    m.restore(vec![("heap".to_string(), &first[..])]).unwrap();
    // The service is not registered: its timers are carried over as they are.
    let second = snapshot(&mut m);
    let mut back = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    back.restore(vec![("mmap".to_string(), &second[..])])
        .unwrap();
    let h = service(&mut back);
    assert_eq!(drain(&mut back, &h), expected);
}

/// Firing one at a time reads ahead what follows a key group's due timers; a timer registered
/// later, between the fired ones and that next one, still fires, in order, on both backends.
#[test]
fn a_timer_registered_between_fired_ones_and_the_next_still_fires() {
    fn run<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> Fired {
        let h = service(b);
        b.set_current_key(7).unwrap();
        for ts in [10, 20, 40] {
            b.timers(&h).register_event_time_timer(&1, ts).unwrap();
        }
        let mut fired = Vec::new();
        fired.extend(b.next_due_timer(&h, TimeDomain::EventTime, 10).unwrap());
        // Right after the first fired: one before the next timer (20), one after it.
        b.set_current_key(7).unwrap();
        b.timers(&h).register_event_time_timer(&2, 15).unwrap();
        b.timers(&h).register_event_time_timer(&3, 30).unwrap();
        while let Some(t) = b.next_due_timer(&h, TimeDomain::EventTime, 50).unwrap() {
            fired.push(t);
        }
        triples(fired)
    }
    let mut m = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    let mut heap = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let fired = run(&mut m);
    assert_eq!(
        fired,
        vec![(7, 1, 10), (7, 2, 15), (7, 1, 20), (7, 3, 30), (7, 1, 40)]
    );
    assert_eq!(fired, run(&mut heap));
}
