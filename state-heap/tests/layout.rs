//! The heap tables' compact layout: entries keep no hash (it is recomputed from the key when a
//! table grows), integer keys take a fast path (current key and regrowth) that must agree with
//! their serializer, and TTL stamps exist only where TTL is configured.

use std::sync::Arc;
use std::time::Duration;

use state_api::{
    key_group_for_hash, stable_key_hash, FixedWidthSerializer, KeyGroupRange, KeyedStateBackend,
    KeyedStateBackendExt, ManualClock, ReducingStateDescriptor, StateSerializer, StateTtlConfig,
    ValueStateDescriptor,
};
use state_heap::HeapKeyedStateBackend;

const KEYS: u64 = 40_000;

/// Writes `KEYS` keys in two namespaces, checks every one reads back after the tables grew many
/// times, then restores a snapshot into a fresh backend and checks again.
fn grow_and_read<K: state_api::StateKey>(
    build: impl Fn() -> HeapKeyedStateBackend<K>,
    key: impl Fn(u64) -> K,
) {
    let mut b = build();
    let h = b
        .register_value(ValueStateDescriptor::<u64, u32>::new("v").expect("descriptor"))
        .expect("register");
    for i in 0..KEYS {
        b.set_current_key(key(i)).expect("key");
        b.value_in(&h, &1).update(i).expect("update");
        b.value_in(&h, &2).update(i * 2).expect("update");
    }
    assert_eq!(b.num_entries(), 2 * KEYS as usize);
    let check = |b: &mut HeapKeyedStateBackend<K>| {
        for i in 0..KEYS {
            b.set_current_key(key(i)).expect("key");
            assert_eq!(b.value_in(&h, &1).get().expect("get"), Some(i), "key {i}");
            assert_eq!(
                b.value_in(&h, &2).get().expect("get"),
                Some(i * 2),
                "key {i}"
            );
            assert_eq!(b.value_in(&h, &3).get().expect("get"), None, "key {i}");
        }
    };
    check(&mut b);
    let mut bytes = Vec::new();
    b.snapshot()
        .expect("snapshot")
        .write_to(&mut bytes)
        .expect("write");
    let mut r = build();
    let h2 = r
        .register_value(ValueStateDescriptor::<u64, u32>::new("v").expect("descriptor"))
        .expect("register");
    assert_eq!(h2.id(), h.id());
    r.restore(vec![("s".to_string(), &bytes[..])])
        .expect("restore");
    check(&mut r);
    // Removing half the keys leaves the other half findable.
    for i in (0..KEYS).step_by(2) {
        r.set_current_key(key(i)).expect("key");
        r.value_in(&h, &1).clear().expect("clear");
    }
    for i in 0..KEYS {
        r.set_current_key(key(i)).expect("key");
        let expect = (i % 2 == 1).then_some(i);
        assert_eq!(r.value_in(&h, &1).get().expect("get"), expect, "key {i}");
    }
}

#[test]
fn growing_tables_find_every_key_with_each_key_serializer() {
    // Default (postcard) u64 keys: the serializer path.
    grow_and_read(
        || {
            HeapKeyedStateBackend::<u64>::builder()
                .build()
                .expect("build")
        },
        |i| i,
    );
    // Fixed-width u64 keys: the inline integer path.
    grow_and_read(
        || {
            HeapKeyedStateBackend::<u64>::builder()
                .key_serializer(FixedWidthSerializer::<u64>::new())
                .build()
                .expect("build")
        },
        |i| i,
    );
    // Fixed-width signed keys, negative ones included.
    grow_and_read(
        || {
            HeapKeyedStateBackend::<i32>::builder()
                .key_serializer(FixedWidthSerializer::<i32>::new())
                .build()
                .expect("build")
        },
        |i| i as i32 - 20_000,
    );
    // String keys.
    grow_and_read(
        || {
            HeapKeyedStateBackend::<String>::builder()
                .build()
                .expect("build")
        },
        |i| format!("key-{i}"),
    );
}

#[test]
fn integer_fast_path_agrees_with_the_serializer_on_key_groups() {
    for max_p in [128u32, 100, 32768] {
        let mut b = HeapKeyedStateBackend::<i64>::builder()
            .max_parallelism(max_p)
            .key_serializer(FixedWidthSerializer::<i64>::new())
            .build()
            .expect("build");
        let ser = FixedWidthSerializer::<i64>::new();
        for k in (-5_000i64..5_000).chain([i64::MIN, i64::MAX]) {
            b.set_current_key(k).expect("key");
            let mut bytes = Vec::new();
            ser.serialize(&k, &mut bytes).expect("serialize");
            let expected = key_group_for_hash(stable_key_hash(&bytes), max_p);
            assert_eq!(
                b.current_key_group(),
                Some(expected),
                "key {k} max_p {max_p}"
            );
        }
    }
    // A key outside the backend's range is refused, on the fast path as on the other.
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .key_group_range(KeyGroupRange::new(0, 64))
        .build()
        .expect("build");
    let outside = (0u64..1000)
        .find(|k| key_group_for_hash(stable_key_hash(&k.to_be_bytes()), 128) >= 64)
        .expect("some key lands in the upper half");
    assert!(b.set_current_key(outside).is_err());
    assert_eq!(b.current_key(), None);
}

#[test]
fn ttl_switched_on_and_off_by_re_registration_keeps_the_values() {
    let clock = Arc::new(ManualClock::new(1_000));
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .clock(clock.clone())
        .build()
        .expect("build");
    let plain = ValueStateDescriptor::<u64>::new("v").expect("descriptor");
    let h = b.register_value(plain.clone()).expect("register");
    let r = b
        .register_reducing(ReducingStateDescriptor::<u64>::new("sum", |a, b| a + b).expect("d"))
        .expect("register");
    for k in 0..1_000 {
        b.set_current_key(k).expect("key");
        b.value(&h).update(k).expect("update");
        b.reducing(&r).add(k).expect("add");
    }
    // TTL on: the values stay, stamped with the time of the re-registration.
    let ttl = StateTtlConfig::new(Duration::from_millis(100));
    let h = b
        .register_value(plain.clone().with_ttl(ttl))
        .expect("re-register with TTL");
    let r = b
        .register_reducing(
            ReducingStateDescriptor::<u64>::new("sum", |a, b| a + b)
                .expect("d")
                .with_ttl(ttl),
        )
        .expect("re-register with TTL");
    clock.advance(50);
    for k in 0..1_000 {
        b.set_current_key(k).expect("key");
        assert_eq!(b.value(&h).get().expect("get"), Some(k));
        assert_eq!(b.reducing(&r).get().expect("get"), Some(k));
    }
    // Key 0 is written again at 1050; the rest expire at 1100.
    b.set_current_key(0).expect("key");
    b.value(&h).update(7).expect("update");
    clock.advance(60);
    for k in 1..1_000 {
        b.set_current_key(k).expect("key");
        assert_eq!(b.value(&h).get().expect("get"), None, "key {k} expired");
        assert_eq!(b.reducing(&r).get().expect("get"), None, "key {k} expired");
    }
    b.set_current_key(0).expect("key");
    assert_eq!(b.value(&h).get().expect("get"), Some(7));
    // TTL off again: what is left never expires.
    let h = b.register_value(plain).expect("re-register without TTL");
    clock.advance(1_000_000);
    b.set_current_key(0).expect("key");
    assert_eq!(b.value(&h).get().expect("get"), Some(7));
    b.set_current_key(1).expect("key");
    assert_eq!(b.value(&h).get().expect("get"), None);
}
