//! Canonical savepoints move between the heap and the mmap backend, and a reopened directory
//! keeps what was flushed.
#![allow(clippy::unwrap_used)]

use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

struct Handles {
    v: ValueStateHandle<String, ()>,
    l: ListStateHandle<u64, u32>,
    m: MapStateHandle<u32, String, ()>,
}

fn register<B: KeyedStateBackend>(b: &mut B) -> Handles {
    Handles {
        v: b.register_value(ValueStateDescriptor::new("v").unwrap())
            .unwrap(),
        l: b.register_list(ListStateDescriptor::new("l").unwrap())
            .unwrap(),
        m: b.register_map(MapStateDescriptor::new("m").unwrap())
            .unwrap(),
    }
}

fn fill<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &Handles) {
    for k in 0..2000u64 {
        b.set_current_key(k).unwrap();
        b.value(&h.v).update(format!("v{k}")).unwrap();
        b.list_in(&h.l, &((k % 4) as u32))
            .add_all(vec![k, k * 2])
            .unwrap();
        for i in 0..(k % 5) as u32 {
            b.map(&h.m).put(i, format!("{k}-{i}")).unwrap();
        }
    }
}

fn check<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &Handles) {
    for k in 0..2000u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.value(&h.v).get().unwrap(), Some(format!("v{k}")));
        assert_eq!(
            b.list_in(&h.l, &((k % 4) as u32)).get().unwrap(),
            Some(vec![k, k * 2])
        );
        let mut m = b
            .map(&h.m)
            .iter()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        m.sort();
        let want: Vec<_> = (0..(k % 5) as u32)
            .map(|i| (i, format!("{k}-{i}")))
            .collect();
        assert_eq!(m, want, "key {k}");
    }
}

fn bytes<B: KeyedStateBackend>(b: &mut B) -> Vec<u8> {
    let mut out = Vec::new();
    b.snapshot().unwrap().write_to(&mut out).unwrap();
    out
}

#[test]
fn heap_to_mmap_to_heap() {
    let mut heap = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let h = register(&mut heap);
    fill(&mut heap, &h);
    let from_heap = bytes(&mut heap);

    let mut mmap = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(128 << 10)
        .build()
        .unwrap();
    mmap.restore(vec![("heap".into(), &from_heap[..])]).unwrap();
    let hm = register(&mut mmap);
    check(&mut mmap, &hm);
    mmap.compact().unwrap();
    check(&mut mmap, &hm);
    let from_mmap = bytes(&mut mmap);

    let mut back = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let hb = register(&mut back);
    back.restore(vec![("mmap".into(), &from_mmap[..])]).unwrap();
    check(&mut back, &hb);
}

#[test]
fn mmap_savepoint_rescales_into_heap_halves() {
    let mut mmap = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    let h = register(&mut mmap);
    fill(&mut mmap, &h);
    let snap = bytes(&mut mmap);
    let mut seen = 0;
    for i in 0..2 {
        let mut half = HeapKeyedStateBackend::<u64>::builder()
            .key_group_range(KeyGroupRange::for_operator(128, 2, i).unwrap())
            .build()
            .unwrap();
        half.restore(vec![("mmap".into(), &snap[..])]).unwrap();
        let hh = register(&mut half);
        for k in 0..2000u64 {
            if half.set_current_key(k).is_ok() {
                assert_eq!(half.value(&hh.v).get().unwrap(), Some(format!("v{k}")));
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 2000);
}

#[test]
fn reopen_keeps_flushed_state_and_registry() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut b = MmapKeyedStateBackend::<u64>::builder()
            .directory(dir.path())
            .memory_budget(64 << 10)
            .build()
            .unwrap();
        let h = register(&mut b);
        fill(&mut b, &h);
        b.flush().unwrap();
        // Not flushed: lost on reopen (no write-ahead log; checkpoints give durability).
        b.set_current_key(99_999).unwrap();
        b.value(&h.v).update("late".into()).unwrap();
    }
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .directory(dir.path())
        .build()
        .unwrap();
    let mut pending = b.pending_restored_states();
    pending.sort();
    assert_eq!(pending.len(), 3);
    let h = register(&mut b);
    check(&mut b, &h);
    b.set_current_key(99_999).unwrap();
    assert_eq!(b.value(&h.v).get().unwrap(), None);
    // Another max parallelism is refused.
    drop(b);
    let err = MmapKeyedStateBackend::<u64>::builder()
        .directory(dir.path())
        .max_parallelism(256)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max parallelism"), "{err}");
}

#[test]
fn unregistered_restored_states_survive_the_next_snapshot() {
    let mut heap = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    let h = register(&mut heap);
    fill(&mut heap, &h);
    let first = bytes(&mut heap);
    let mut mmap = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    mmap.restore(vec![("first".into(), &first[..])]).unwrap();
    // Only the value state is registered (and changed) before the next snapshot.
    let v = mmap
        .register_value(ValueStateDescriptor::<String>::new("v").unwrap())
        .unwrap();
    mmap.set_current_key(3).unwrap();
    mmap.value(&v).update("changed".into()).unwrap();
    mmap.set_current_key(3).unwrap();
    mmap.value(&v).update("v3".into()).unwrap();
    let second = bytes(&mut mmap);
    let mut last = HeapKeyedStateBackend::<u64>::builder().build().unwrap();
    last.restore(vec![("second".into(), &second[..])]).unwrap();
    let hl = register(&mut last);
    check(&mut last, &hl);
}
