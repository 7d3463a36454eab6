//! List states without TTL store their elements compactly (`varint length | element`), lists
//! with TTL keep `timestamp | length | element`; the encoding survives flush, compaction,
//! reopening and checkpoints, lists that gain a TTL are rewritten, and stores written before
//! (registry version 2, every list stamped) still open and read their lists.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::{MmapKeyedStateBackend, NativeCheckpointMeta, NativeRestore};

fn open(dir: &Path, clock: &ManualClock) -> MmapKeyedStateBackend<u64> {
    MmapKeyedStateBackend::<u64>::builder()
        .directory(dir)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap()
}

fn list_u64<B: KeyedStateBackend>(
    b: &mut B,
    name: &str,
    ttl: Option<i64>,
) -> ListStateHandle<u64, ()> {
    let mut d = ListStateDescriptor::<u64>::new(name).unwrap();
    if let Some(ms) = ttl {
        d = d.with_ttl(StateTtlConfig::new(Duration::from_millis(ms as u64)));
    }
    b.register_list(d).unwrap()
}

/// Every stored value of the engine (state id `id`'s entries only).
fn stored_values(b: &MmapKeyedStateBackend<u64>, id: u16) -> Vec<Vec<u8>> {
    let mut it = b.engine().iter(&[], None).unwrap();
    let mut out = Vec::new();
    while let Some((k, v)) = it.next().unwrap() {
        if k[2..4] == id.to_be_bytes() {
            out.push(v.to_vec());
        }
    }
    out
}

fn small(k: u64) -> Vec<u64> {
    (0..1 + k % 7).map(|i| (k + i) % 100).collect()
}

fn long(k: u64) -> Vec<String> {
    (0..1 + k % 3)
        .map(|i| format!("{k}-{i}-").repeat(40 + (k % 5) as usize))
        .collect()
}

#[test]
fn lists_without_ttl_are_compact_through_flush_compaction_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    let s = b
        .register_list(ListStateDescriptor::<String>::new("s").unwrap())
        .unwrap();
    let lt = list_u64(&mut b, "lt", Some(10_000));
    for k in 0..300u64 {
        b.set_current_key(k).unwrap();
        let want = small(k);
        let (first, rest) = want.split_at(1);
        b.list(&l).add(first[0]).unwrap();
        b.list(&lt).add(k).unwrap();
        if k % 2 == 0 {
            b.flush().unwrap(); // merge operands spread over sorted runs
        }
        b.list(&l).add_all(rest.to_vec()).unwrap();
        b.list(&s).update(long(k)).unwrap();
    }
    let check = |b: &mut MmapKeyedStateBackend<u64>| {
        for k in 0..300u64 {
            b.set_current_key(k).unwrap();
            assert_eq!(b.list(&l).get().unwrap(), Some(small(k)), "key {k}");
            assert_eq!(b.list(&s).get().unwrap(), Some(long(k)), "key {k}");
            assert_eq!(b.list(&lt).get().unwrap(), Some(vec![k]), "key {k}");
        }
    };
    check(&mut b);
    b.compact().unwrap();
    check(&mut b);
    // One byte per element plus one length byte: the 13-byte-per-element overhead is gone.
    let values = stored_values(&b, 0);
    assert_eq!(values.len(), 300);
    let total: usize = values.iter().map(Vec::len).sum();
    assert_eq!(
        total,
        (0..300u64).map(|k| 2 * small(k).len()).sum::<usize>()
    );
    // Elements longer than 127 bytes take a two-byte length.
    let total: usize = stored_values(&b, 1).iter().map(Vec::len).sum();
    let want: usize = (0..300u64)
        .flat_map(long)
        .map(|e| {
            let ser = e.len() + if e.len() < 128 { 1 } else { 2 };
            ser + if ser < 128 { 1 } else { 2 }
        })
        .sum();
    assert_eq!(total, want);
    // The TTL list keeps its timestamps (8 + 4 + 1 bytes per one-byte element).
    assert!(stored_values(&b, 2).iter().all(|v| v.len() >= 13));
    b.flush().unwrap();
    drop(b);

    let mut b = open(dir.path(), &clock);
    let l2 = list_u64(&mut b, "l", None);
    let s2 = b
        .register_list(ListStateDescriptor::<String>::new("s").unwrap())
        .unwrap();
    let lt2 = list_u64(&mut b, "lt", Some(10_000));
    assert_eq!((l2.id(), s2.id(), lt2.id()), (l.id(), s.id(), lt.id()));
    check(&mut b);
    for k in 0..300u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add(7).unwrap();
    }
    b.compact().unwrap();
    drop(b);
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    let total: usize = stored_values(&b, 0).iter().map(Vec::len).sum();
    assert_eq!(
        total,
        (0..300u64).map(|k| 2 * (small(k).len() + 1)).sum::<usize>(),
        "adopted as is after reopening: still compact"
    );
    for k in 0..300u64 {
        b.set_current_key(k).unwrap();
        let mut want = small(k);
        want.push(7);
        assert_eq!(b.list(&l).get().unwrap(), Some(want));
    }
}

#[test]
fn a_compact_list_that_gains_a_ttl_is_stamped_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    let m = list_u64(&mut b, "m", None);
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add_all(small(k)).unwrap();
        b.list(&m).add_all(small(k)).unwrap();
    }
    b.flush().unwrap();
    // Re-registered in the same backend with a TTL: rewritten, stamped with now.
    clock.set(5_000);
    let m = list_u64(&mut b, "m", Some(1_000));
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.list(&m).get().unwrap(), Some(small(k)));
    }
    b.flush().unwrap();
    drop(b);
    // Reopened with a TTL: the adopted compact data is rewritten, stamped with now.
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", Some(1_000));
    let m = list_u64(&mut b, "m", Some(1_000));
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.list(&l).get().unwrap(), Some(small(k)));
        assert_eq!(b.list(&m).get().unwrap(), Some(small(k)));
        b.list(&l).add(99).unwrap();
    }
    clock.set(5_500);
    b.compact().unwrap();
    b.set_current_key(3).unwrap();
    let mut want = small(3);
    want.push(99);
    assert_eq!(b.list(&l).get().unwrap(), Some(want));
    clock.set(6_001);
    b.compact().unwrap();
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.list(&l).get().unwrap(), None, "expired after the TTL");
        assert_eq!(b.list(&m).get().unwrap(), None, "expired after the TTL");
    }
    b.flush().unwrap();
    drop(b);
    // A stamped (TTL) list reopened without TTL keeps its stamped data and reads it.
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    b.set_current_key(1).unwrap();
    b.list(&l).add_all(vec![1, 2]).unwrap();
    b.flush().unwrap();
    drop(b);
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    b.set_current_key(1).unwrap();
    b.list(&l).add(3).unwrap();
    assert_eq!(b.list(&l).get().unwrap(), Some(vec![1, 2, 3]));
}

#[test]
fn compact_lists_round_trip_through_savepoints_and_native_checkpoints() {
    let clock = ManualClock::new(1_000);
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let l = list_u64(&mut b, "l", None);
    let lt = list_u64(&mut b, "lt", Some(10_000));
    for k in 0..100u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add_all(small(k)).unwrap();
        b.list(&lt).add(k).unwrap();
    }
    // mmap -> heap -> mmap through the canonical format.
    let mut sp = Vec::new();
    b.snapshot().unwrap().write_to(&mut sp).unwrap();
    let mut h = HeapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    h.restore(vec![("sp".to_string(), &sp[..])]).unwrap();
    let hl = list_u64(&mut h, "l", None);
    let hlt = list_u64(&mut h, "lt", Some(10_000));
    let mut sp2 = Vec::new();
    for k in 0..100u64 {
        h.set_current_key(k).unwrap();
        assert_eq!(h.list(&hl).get().unwrap(), Some(small(k)));
        assert_eq!(h.list(&hlt).get().unwrap(), Some(vec![k]));
    }
    h.snapshot().unwrap().write_to(&mut sp2).unwrap();
    let mut r = MmapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    r.restore(vec![("sp2".to_string(), &sp2[..])]).unwrap();
    let rl = list_u64(&mut r, "l", None);
    let rlt = list_u64(&mut r, "lt", Some(10_000));
    for k in 0..100u64 {
        r.set_current_key(k).unwrap();
        assert_eq!(r.list(&rl).get().unwrap(), Some(small(k)));
        assert_eq!(r.list(&rlt).get().unwrap(), Some(vec![k]));
    }
    let total: usize = stored_values(&r, 0).iter().map(Vec::len).sum();
    assert_eq!(
        total,
        (0..100u64).map(|k| 2 * small(k).len()).sum::<usize>()
    );

    // Native checkpoint: the files and the registry (with the encoding) move as they are.
    let cp = b.checkpoint().unwrap();
    let files = tempfile::tempdir().unwrap();
    for f in cp.files() {
        fs::copy(f.path(), files.path().join(f.name())).unwrap();
    }
    let mut n = MmapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    n.restore_native(vec![NativeRestore {
        metadata: cp.metadata().to_vec(),
        files_dir: files.path().to_path_buf(),
    }])
    .unwrap();
    let nl = list_u64(&mut n, "l", None);
    let nlt = list_u64(&mut n, "lt", Some(10_000));
    for k in 0..100u64 {
        n.set_current_key(k).unwrap();
        assert_eq!(n.list(&nl).get().unwrap(), Some(small(k)));
        assert_eq!(n.list(&nlt).get().unwrap(), Some(vec![k]));
    }
}

/// `tests/fixtures/v2-lists` was written before the compact encoding (registry version 2, every
/// list stamped): a store directory (`MANIFEST`, two runs) that is also a native checkpoint
/// (`checkpoint.meta`). Clock 1000: for keys 0..40 list `l` (no TTL) got
/// `add_all(k..k + 1 + k % 5)` and `lt` (TTL 10 s) `add(2k)`; flushed; clock 2000: `l` got
/// `add(1000 + k)` and `lt` `add(2k + 1)`; checkpointed.
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v2-lists");

fn v2_l(k: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (k..k + 1 + k % 5).collect();
    v.push(1_000 + k);
    v
}

fn check_v2(b: &mut MmapKeyedStateBackend<u64>, clock: &ManualClock) {
    clock.set(2_500);
    let l = list_u64(b, "l", None);
    let lt = list_u64(b, "lt", Some(10_000));
    for k in 0..40u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.list(&l).get().unwrap(), Some(v2_l(k)), "key {k}");
        assert_eq!(b.list(&lt).get().unwrap(), Some(vec![2 * k, 2 * k + 1]));
    }
    // Appends to the adopted (stamped) list merge with the old elements through compaction.
    for k in 0..40u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add(5_000 + k).unwrap();
    }
    clock.set(11_500); // the first `lt` elements (written at 1000) expire
    b.compact().unwrap();
    for k in 0..40u64 {
        b.set_current_key(k).unwrap();
        let mut want = v2_l(k);
        want.push(5_000 + k);
        assert_eq!(b.list(&l).get().unwrap(), Some(want), "key {k}");
        assert_eq!(b.list(&lt).get().unwrap(), Some(vec![2 * k + 1]));
    }
}

#[test]
fn version_2_stores_and_checkpoints_read_their_stamped_lists() {
    let dir = tempfile::tempdir().unwrap();
    for e in fs::read_dir(FIXTURE).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let clock = ManualClock::new(0);
    let mut b = open(dir.path(), &clock);
    check_v2(&mut b, &clock);
    // Written back as registry version 3, the store reopens with the same data.
    b.flush().unwrap();
    drop(b);
    let mut b = open(dir.path(), &clock);
    let l = list_u64(&mut b, "l", None);
    b.set_current_key(7).unwrap();
    let mut want = v2_l(7);
    want.push(5_007);
    assert_eq!(b.list(&l).get().unwrap(), Some(want));

    // Restoring the native checkpoint (its files under their checkpoint names).
    let files = tempfile::tempdir().unwrap();
    let metadata = fs::read(Path::new(FIXTURE).join("checkpoint.meta")).unwrap();
    let meta = NativeCheckpointMeta::decode(&metadata).unwrap();
    for f in meta.runs.iter().flatten() {
        let local = f.name.rsplit('-').next().unwrap();
        fs::copy(Path::new(FIXTURE).join(local), files.path().join(&f.name)).unwrap();
    }
    let clock = ManualClock::new(0);
    let mut r = MmapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    r.restore_native(vec![NativeRestore {
        metadata,
        files_dir: files.path().to_path_buf(),
    }])
    .unwrap();
    check_v2(&mut r, &clock);
}
