//! `keys()` and map entries stream from the mmap engine: iterating every key of a large state,
//! or every entry of a large map, allocates a small, fixed amount, far below what the keys
//! themselves take (a collecting implementation needs `KEYS × 8` bytes for the `Vec<u64>`
//! alone, `ENTRIES × 8` for the `Vec<(u32, u32)>`, and aborts under the bound).
//!
//! In a test binary of its own: the bound is enforced by a global allocator (`cap`), which
//! counts every allocation of the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use state_api::*;
use state_mmap::MmapKeyedStateBackend;

#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Keys in the state.
const KEYS: u64 = 1_200_000;
/// Keys written again after the compaction: they are in the memtable and in the sorted run.
/// (The first scan of a memtable builds its ordered index, 48 bytes an entry, which counts
/// against the bound: it grows with the memtable, bounded by the memory budget, not with the
/// state.)
const REWRITTEN: u64 = 5_000;
/// Entries of one map (of one key).
const ENTRIES: u32 = 300_000;
/// What iterating every key may allocate at most, all at once.
const BOUND: usize = 1 << 20;

#[test]
fn iterating_every_key_and_map_entry_of_an_mmap_state_keeps_memory_flat() {
    // Collecting the keys would need far more than the bound.
    assert!(KEYS as usize * std::mem::size_of::<u64>() >= 8 * BOUND);
    assert!(ENTRIES as usize * std::mem::size_of::<(u32, u32)>() >= 2 * BOUND);
    let dir = tempfile::tempdir().unwrap();
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .working_directory_in(dir.path())
        .memory_budget(32 << 20)
        .build()
        .unwrap();
    let v = b
        .register_value(ValueStateDescriptor::<u8>::new("v").unwrap())
        .unwrap();
    // Another state whose keys must not show up.
    let other = b
        .register_value(ValueStateDescriptor::<u8>::new("other").unwrap())
        .unwrap();
    let map = b
        .register_map(MapStateDescriptor::<u32, u32>::new("m").unwrap())
        .unwrap();
    b.set_current_key(KEYS / 2).unwrap();
    for i in 0..ENTRIES {
        b.map(&map).put(i, i * 2).unwrap();
    }
    for k in 0..KEYS {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k as u8).unwrap();
        if k % 10 == 0 {
            b.set_current_key(k + KEYS).unwrap();
            b.value(&other).update(1).unwrap();
        }
    }
    b.compact().unwrap();
    // Some keys in the memtable too, over the same keys in the sorted run: each once.
    for k in 0..REWRITTEN {
        b.set_current_key(k * 3).unwrap();
        b.value(&v).update(7).unwrap();
    }
    b.wait_for_background_work().unwrap();

    let baseline = ALLOCATOR.allocated();
    ALLOCATOR
        .set_limit(baseline + BOUND)
        .expect("the limit is above what is allocated");
    let (mut count, mut sum, mut most) = (0u64, 0u64, 0usize);
    let mut out_of_range = 0u64;
    for key in b.keys(&v, &()).unwrap() {
        let key = key.unwrap();
        count += 1;
        sum = sum.wrapping_add(key);
        if key >= KEYS {
            out_of_range += 1;
        }
        most = most.max(ALLOCATOR.allocated().saturating_sub(baseline));
    }
    b.set_current_key(KEYS / 2).unwrap();
    let (mut entries, mut key_sum) = (0u32, 0u64);
    let mut map_most = 0usize;
    for entry in b.map(&map).iter().unwrap() {
        let (k, v) = entry.unwrap();
        assert_eq!(v, k * 2);
        entries += 1;
        key_sum += u64::from(k);
        map_most = map_most.max(ALLOCATOR.allocated().saturating_sub(baseline));
    }
    ALLOCATOR
        .set_limit(usize::MAX)
        .expect("no limit is below what is allocated");
    assert_eq!(entries, ENTRIES, "every map entry once");
    assert_eq!(
        key_sum,
        u64::from(ENTRIES) * u64::from(ENTRIES - 1) / 2,
        "every map entry once"
    );
    assert!(
        map_most <= BOUND,
        "iterating {ENTRIES} map entries held {map_most} bytes at once (bound {BOUND})"
    );

    assert_eq!(count, KEYS, "every key once");
    assert_eq!(sum, KEYS * (KEYS - 1) / 2, "every key once");
    assert_eq!(out_of_range, 0, "only the keys of this state");
    assert!(
        most <= BOUND,
        "iterating {KEYS} keys held {most} bytes at once (bound {BOUND})"
    );
    eprintln!(
        "iterating {KEYS} keys held at most {most} bytes at once, {ENTRIES} map entries {map_most}"
    );
}
