//! Compaction drops TTL-expired state (Flink's compaction filter), keeps live state, and honours
//! `cleanup_in_compaction(false)`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use state_api::*;
use state_mmap::MmapKeyedStateBackend;

#[test]
fn compaction_drops_expired_entries_and_elements() {
    let clock = ManualClock::new(1_000);
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    // ReturnExpiredIfNotCleanedUp makes "still stored" visible to the test.
    let ttl = StateTtlConfig::new(Duration::from_millis(100))
        .visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp);
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap().with_ttl(ttl))
        .unwrap();
    let kept = b
        .register_value(
            ValueStateDescriptor::<u64>::new("kept")
                .unwrap()
                .with_ttl(ttl.cleanup_in_compaction(false)),
        )
        .unwrap();
    let l = b
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap().with_ttl(ttl))
        .unwrap();
    let m = b
        .register_map(
            MapStateDescriptor::<u64, u64>::new("m")
                .unwrap()
                .with_ttl(ttl),
        )
        .unwrap();
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k).unwrap();
        b.value(&kept).update(k).unwrap();
        b.list(&l).add(1).unwrap();
        b.map(&m).put(1, k).unwrap();
    }
    clock.advance(60);
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        b.list(&l).add(2).unwrap(); // younger element
        if k % 2 == 0 {
            b.value(&v).update(k).unwrap(); // refreshed
            b.map(&m).put(2, k).unwrap();
        }
    }
    clock.advance(60); // first writes expired, the second ones alive
    b.compact().unwrap();
    assert_eq!(
        b.keys(&v, &())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len(),
        50,
        "expired values dropped"
    );
    assert_eq!(
        b.keys(&kept, &())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len(),
        100,
        "cleanup_in_compaction(false)"
    );
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        assert_eq!(
            b.list(&l).get().unwrap(),
            Some(vec![2]),
            "expired element dropped"
        );
        let mut entries = b
            .map(&m)
            .iter()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        entries.sort();
        let want = if k % 2 == 0 { vec![(2, k)] } else { vec![] };
        assert_eq!(entries, want);
        // The value without cleanup is still there (expired, returned once).
        assert_eq!(b.value(&kept).get().unwrap(), Some(k));
    }
}
