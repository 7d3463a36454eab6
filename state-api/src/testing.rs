//! The backend conformance suite (feature `test-util`).
//!
//! Every keyed state backend runs the same behaviour tests from its own test files, so all
//! backends agree on Flink's semantics, on snapshots and on rescaling:
//!
//! ```text
//! struct MyFactory;
//! impl state_api::testing::BackendFactory for MyFactory { /* ... */ }
//! state_api::conformance_tests!(MyFactory);
//! ```
//!
//! The macro expands to one `#[test]` per case. Each case is also a public function taking the
//! factory, for backends that want to run them some other way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::*;

/// What a backend needs to be created for a test.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Number of key groups.
    pub max_parallelism: u32,
    /// Key groups owned.
    pub range: KeyGroupRange,
    /// Clock for TTL.
    pub clock: Arc<dyn Clock>,
}

impl BackendConfig {
    /// All key groups of `max_parallelism`, with a manual clock at 1000 ms.
    pub fn full(max_parallelism: u32) -> Self {
        BackendConfig {
            max_parallelism,
            range: KeyGroupRange::all(max_parallelism),
            clock: Arc::new(ManualClock::new(1000)),
        }
    }

    /// Subtask `index` of `parallelism`.
    pub fn subtask(
        max_parallelism: u32,
        parallelism: u32,
        index: u32,
        clock: Arc<dyn Clock>,
    ) -> Self {
        BackendConfig {
            max_parallelism,
            range: KeyGroupRange::for_operator(max_parallelism, parallelism, index).unwrap(),
            clock,
        }
    }
}

/// Creates fresh backends for the suite.
pub trait BackendFactory {
    /// The backend type for keys `K`.
    type Backend<K: StateKey + Serialize + DeserializeOwned>: KeyedStateBackend<Key = K>;
    /// A new, empty backend.
    fn create<K: StateKey + Serialize + DeserializeOwned>(
        &self,
        config: BackendConfig,
    ) -> Result<Self::Backend<K>>;
}

fn snapshot_bytes<B: KeyedStateBackend>(b: &mut B) -> Vec<u8> {
    let snap = b.snapshot().unwrap();
    let mut out = Vec::new();
    snap.write_to(&mut out).unwrap();
    out
}

fn restore_from<B: KeyedStateBackend>(b: &mut B, snapshots: &[&Vec<u8>]) -> Result<()> {
    b.restore(
        snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("snapshot-{i}"), &s[..]))
            .collect(),
    )
}

/// The number of keys with state in `h` in the default namespace (each read without error).
fn key_count<B: KeyedStateBackend>(b: &mut B, h: &dyn StateHandle<()>) -> usize {
    b.keys(h, &())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .len()
}

/// Value state: absent reads, update, clear, defaults, namespaces, `keys`.
pub fn value_state_semantics<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_value(ValueStateDescriptor::<String>::new("v").unwrap())
        .unwrap();
    let err = b.value(&h).get().unwrap_err();
    assert!(matches!(err, Error::NoCurrentKey { .. }), "{err}");
    b.set_current_key(1).unwrap();
    assert_eq!(b.current_key(), Some(&1));
    assert_eq!(b.value(&h).get().unwrap(), None);
    b.value(&h).update("a".into()).unwrap();
    assert_eq!(b.value(&h).get().unwrap().as_deref(), Some("a"));
    b.value(&h).update("b".into()).unwrap();
    assert_eq!(b.value(&h).get().unwrap().as_deref(), Some("b"));
    b.set_current_key(2).unwrap();
    assert_eq!(b.value(&h).get().unwrap(), None, "keys are isolated");
    b.set_current_key(1).unwrap();
    b.value(&h).clear().unwrap();
    assert_eq!(b.value(&h).get().unwrap(), None);
    b.value(&h).clear().unwrap();

    let d = ValueStateDescriptor::<u32>::new("with-default")
        .unwrap()
        .with_default(7);
    let hd = b.register_value(d).unwrap();
    assert_eq!(b.value(&hd).get().unwrap(), Some(7));
    b.value(&hd).update(8).unwrap();
    assert_eq!(b.value(&hd).get().unwrap(), Some(8));

    let hn = b
        .register_value(ValueStateDescriptor::<u32, String>::new("windowed").unwrap())
        .unwrap();
    b.value_in(&hn, &"w1".to_string()).update(1).unwrap();
    b.value_in(&hn, &"w2".to_string()).update(2).unwrap();
    assert_eq!(b.value_in(&hn, &"w1".to_string()).get().unwrap(), Some(1));
    assert_eq!(b.value_in(&hn, &"w2".to_string()).get().unwrap(), Some(2));
    b.value_in(&hn, &"w1".to_string()).clear().unwrap();
    assert_eq!(b.value_in(&hn, &"w1".to_string()).get().unwrap(), None);
    assert_eq!(b.value_in(&hn, &"w2".to_string()).get().unwrap(), Some(2));
    b.set_current_key(3).unwrap();
    b.value_in(&hn, &"w2".to_string()).update(3).unwrap();
    let mut keys = b
        .keys(&hn, &"w2".to_string())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    keys.sort();
    assert_eq!(keys, vec![1, 3]);
}

/// A value state bound with `bind_value`: the same semantics as the handle accessors, sharing
/// the backend's current key (taken over when bound, left to the backend when dropped), TTL and
/// per-record cleanup of the other states, range checks, and snapshots of what it wrote.
pub fn bound_value_state_semantics<F: BackendFactory>(f: &F) {
    let clock = ManualClock::new(0);
    let mut b = ttl_backend(f, &clock);
    let h = b
        .register_value(ValueStateDescriptor::<String>::new("v").unwrap())
        .unwrap();
    let hd = b
        .register_value(
            ValueStateDescriptor::<u32>::new("with-default")
                .unwrap()
                .with_default(7),
        )
        .unwrap();
    {
        let mut s = b.bind_value(&h, ()).unwrap();
        let err = s.get().unwrap_err();
        assert!(matches!(err, Error::NoCurrentKey { .. }), "{err}");
        s.set_current_key(1).unwrap();
        assert_eq!(s.get().unwrap(), None);
        s.update("a".into()).unwrap();
        assert_eq!(s.get().unwrap().as_deref(), Some("a"));
        s.set_current_key(2).unwrap();
        assert_eq!(s.get().unwrap(), None, "keys are isolated");
        s.update("b".into()).unwrap();
        s.set_current_key(3).unwrap();
        s.update("c".into()).unwrap();
        s.clear().unwrap();
        assert_eq!(s.get().unwrap(), None);
        s.set_current_key(1).unwrap();
    }
    assert_eq!(b.current_key(), Some(&1), "the last key set stays current");
    assert_eq!(b.value(&h).get().unwrap().as_deref(), Some("a"));
    b.set_current_key(2).unwrap();
    assert_eq!(b.value(&h).get().unwrap().as_deref(), Some("b"));
    b.value(&h).update("B".into()).unwrap();
    {
        let mut s = b.bind_value(&h, ()).unwrap();
        assert_eq!(
            s.get().unwrap().as_deref(),
            Some("B"),
            "the backend's current key is the bound state's first"
        );
        drop(s);
        let mut s = b.bind_value(&hd, ()).unwrap();
        assert_eq!(s.get().unwrap(), Some(7), "the descriptor's default");
        s.update(8).unwrap();
        assert_eq!(s.get().unwrap(), Some(8));
    }
    assert_eq!(b.value(&hd).get().unwrap(), Some(8));

    // Namespaces.
    let hn = b
        .register_value(ValueStateDescriptor::<u32, String>::new("windowed").unwrap())
        .unwrap();
    {
        let mut s = b.bind_value(&hn, "w1".to_string()).unwrap();
        s.update(1).unwrap();
        s.set_namespace("w2".to_string());
        assert_eq!(s.get().unwrap(), None);
        s.update(2).unwrap();
    }
    assert_eq!(b.value_in(&hn, &"w1".to_string()).get().unwrap(), Some(1));
    assert_eq!(b.value_in(&hn, &"w2".to_string()).get().unwrap(), Some(2));

    // A handle the backend did not give fails (at bind, or at the first access).
    let bogus =
        ValueStateHandle::<String, ()>::new(StateId(9_999), StateName::new("nope").unwrap());
    let res = b.bind_value(&bogus, ()).and_then(|mut s| s.get());
    assert!(matches!(res, Err(Error::UnknownState { .. })), "{res:?}");

    // TTL, and incremental cleanup of another state on every record.
    let ttl = StateTtlConfig::new(Duration::from_millis(100));
    let t = b
        .register_value(
            ValueStateDescriptor::<u64>::new("ttl")
                .unwrap()
                .with_ttl(ttl),
        )
        .unwrap();
    let inc = b
        .register_value(
            ValueStateDescriptor::<u64>::new("inc")
                .unwrap()
                .with_ttl(ttl.cleanup_incrementally(5, true)),
        )
        .unwrap();
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        b.value(&inc).update(k).unwrap();
    }
    {
        let mut s = b.bind_value(&t, ()).unwrap();
        s.set_current_key(1).unwrap();
        s.update(10).unwrap();
        clock.advance(60);
        assert_eq!(s.get().unwrap(), Some(10));
        clock.advance(50);
        assert_eq!(s.get().unwrap(), None, "expired value is not returned");
        s.update(11).unwrap();
        clock.advance(99);
        assert_eq!(s.get().unwrap(), Some(11), "a write resets the clock");
        clock.advance(1_000);
        for k in 0..40 {
            s.set_current_key(k).unwrap();
        }
    }
    let left = key_count(&mut b, &inc);
    assert!(
        left <= 1,
        "setting keys on a bound state cleans up the other states ({left} left)"
    );
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        b.value(&inc).update(k).unwrap();
    }
    clock.advance(1_000);
    {
        let mut s = b.bind_value(&inc, ()).unwrap();
        for k in 0..40 {
            s.set_current_key(k).unwrap();
        }
    }
    let left = key_count(&mut b, &inc);
    assert!(left <= 1, "and the bound state itself ({left} left)");

    // Out of range: an error, and no key is current any more.
    let mut sub = f
        .create::<u64>(BackendConfig::subtask(128, 2, 0, Arc::new(SystemClock)))
        .unwrap();
    let hs = sub
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let outside = (0..1_000u64)
        .find(|k| sub.set_current_key(*k).is_err())
        .unwrap();
    let inside = (0..1_000u64)
        .find(|k| sub.set_current_key(*k).is_ok())
        .unwrap();
    {
        let mut s = sub.bind_value(&hs, ()).unwrap();
        s.update(inside).unwrap();
        let err = s.set_current_key(outside).unwrap_err();
        assert!(matches!(err, Error::KeyGroupOutOfRange { .. }), "{err}");
        let err = s.get().unwrap_err();
        assert!(matches!(err, Error::NoCurrentKey { .. }), "{err}");
    }
    assert_eq!(sub.current_key(), None);
    sub.set_current_key(inside).unwrap();
    assert_eq!(sub.value(&hs).get().unwrap(), Some(inside));

    // What a bound state wrote is in snapshots.
    let bytes = snapshot_bytes(&mut b);
    let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r, &[&bytes]).unwrap();
    let rh = r
        .register_value(ValueStateDescriptor::<String>::new("v").unwrap())
        .unwrap();
    let mut s = r.bind_value(&rh, ()).unwrap();
    s.set_current_key(1).unwrap();
    assert_eq!(s.get().unwrap().as_deref(), Some("a"));
    s.set_current_key(2).unwrap();
    assert_eq!(s.get().unwrap().as_deref(), Some("B"));
}

/// List state: add, add_all, update (with `[]` clearing), clear.
pub fn list_state_semantics<F: BackendFactory>(f: &F) {
    let mut b = f.create::<String>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_list(ListStateDescriptor::<u32>::new("l").unwrap())
        .unwrap();
    b.set_current_key("k".into()).unwrap();
    assert_eq!(b.list(&h).get().unwrap(), None);
    b.list(&h).add(1).unwrap();
    b.list(&h).add(2).unwrap();
    b.list(&h).add_all(vec![3, 4]).unwrap();
    b.list(&h).add_all(vec![]).unwrap();
    assert_eq!(b.list(&h).get().unwrap(), Some(vec![1, 2, 3, 4]));
    b.list(&h).update(vec![9]).unwrap();
    assert_eq!(b.list(&h).get().unwrap(), Some(vec![9]));
    b.list(&h).update(vec![]).unwrap();
    assert_eq!(b.list(&h).get().unwrap(), None, "update with [] clears");
    b.list(&h).add_all(vec![5, 6]).unwrap();
    b.list(&h).clear().unwrap();
    assert_eq!(b.list(&h).get().unwrap(), None);
    assert!(b
        .keys(&h, &())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .is_empty());
}

/// Map state: put, put_all, get, contains, remove, iteration, emptiness.
pub fn map_state_semantics<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_map(MapStateDescriptor::<String, i64>::new("m").unwrap())
        .unwrap();
    b.set_current_key(5).unwrap();
    assert!(b.map(&h).is_empty().unwrap());
    assert_eq!(b.map(&h).get(&"a".into()).unwrap(), None);
    b.map(&h).put("a".into(), 1).unwrap();
    b.map(&h)
        .put_all(vec![("b".into(), 2), ("c".into(), 3)])
        .unwrap();
    b.map(&h).put("a".into(), 10).unwrap();
    assert_eq!(b.map(&h).get(&"a".into()).unwrap(), Some(10));
    assert!(b.map(&h).contains(&"b".into()).unwrap());
    assert!(!b.map(&h).contains(&"z".into()).unwrap());
    let mut entries = b
        .map(&h)
        .iter()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    entries.sort();
    assert_eq!(
        entries,
        vec![("a".into(), 10), ("b".into(), 2), ("c".into(), 3)]
    );
    let keys: BTreeSet<String> = b
        .map(&h)
        .keys()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(keys.len(), 3);
    let mut values = b
        .map(&h)
        .values()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    values.sort();
    assert_eq!(values, vec![2, 3, 10]);
    b.map(&h).remove(&"a".into()).unwrap();
    b.map(&h).remove(&"nothing".into()).unwrap();
    assert!(!b.map(&h).contains(&"a".into()).unwrap());
    assert!(!b.map(&h).is_empty().unwrap());
    b.map(&h).remove(&"b".into()).unwrap();
    b.map(&h).remove(&"c".into()).unwrap();
    assert!(b.map(&h).is_empty().unwrap());
    assert!(
        b.keys(&h, &())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .is_empty(),
        "an empty map is absent"
    );
    b.map(&h).put("x".into(), 1).unwrap();
    b.map(&h).clear().unwrap();
    assert!(b.map(&h).is_empty().unwrap());
}

/// Average of u64 inputs: accumulator (sum, count).
#[derive(Debug, Clone, Copy)]
pub struct Avg;
impl AggregateFunction<u64, (u64, u64), f64> for Avg {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: u64, (s, c): (u64, u64)) -> (u64, u64) {
        (s + v, c + 1)
    }
    fn get_result(&self, (s, c): &(u64, u64)) -> f64 {
        *s as f64 / *c as f64
    }
    fn merge(&self, a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
        (a.0 + b.0, a.1 + b.1)
    }
}

/// Reducing and aggregating state with their functions.
pub fn reducing_and_aggregating_semantics<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let r = b
        .register_reducing(ReducingStateDescriptor::<u64>::new("sum", |a, b| a + b).unwrap())
        .unwrap();
    let a = b
        .register_aggregating(
            AggregatingStateDescriptor::<u64, (u64, u64), f64>::new("avg", Avg).unwrap(),
        )
        .unwrap();
    b.set_current_key(1).unwrap();
    assert_eq!(b.reducing(&r).get().unwrap(), None);
    assert_eq!(b.aggregating(&a).get().unwrap(), None);
    for v in [1, 2, 3, 6] {
        b.reducing(&r).add(v).unwrap();
        b.aggregating(&a).add(v).unwrap();
    }
    assert_eq!(b.reducing(&r).get().unwrap(), Some(12));
    assert_eq!(b.aggregating(&a).get().unwrap(), Some(3.0));
    b.set_current_key(2).unwrap();
    assert_eq!(b.reducing(&r).get().unwrap(), None);
    b.set_current_key(1).unwrap();
    b.reducing(&r).clear().unwrap();
    b.aggregating(&a).clear().unwrap();
    assert_eq!(b.reducing(&r).get().unwrap(), None);
    assert_eq!(b.aggregating(&a).get().unwrap(), None);
}

/// Merging namespaces of list, reducing and aggregating state.
pub fn merging_namespaces<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let l = b
        .register_list(ListStateDescriptor::<u32, u32>::new("l").unwrap())
        .unwrap();
    let r = b
        .register_reducing(ReducingStateDescriptor::<u32, u32>::new("r", |a, b| a.max(b)).unwrap())
        .unwrap();
    let a = b
        .register_aggregating(
            AggregatingStateDescriptor::<u64, (u64, u64), f64, u32>::new("a", Avg).unwrap(),
        )
        .unwrap();
    b.set_current_key(9).unwrap();
    for (ns, v) in [(1u32, 10u32), (2, 20), (3, 30), (3, 31)] {
        b.list_in(&l, &ns).add(v).unwrap();
        b.reducing_in(&r, &ns).add(v).unwrap();
        b.aggregating_in(&a, &ns).add(u64::from(v)).unwrap();
    }
    b.list_in(&l, &10).merge_namespaces(&[1, 3, 4]).unwrap();
    let mut merged = b.list_in(&l, &10).get().unwrap().unwrap();
    merged.sort();
    assert_eq!(merged, vec![10, 30, 31]);
    assert_eq!(
        b.list_in(&l, &1).get().unwrap(),
        None,
        "sources are cleared"
    );
    assert_eq!(b.list_in(&l, &2).get().unwrap(), Some(vec![20]));
    b.reducing_in(&r, &2).merge_namespaces(&[1, 3]).unwrap();
    assert_eq!(b.reducing_in(&r, &2).get().unwrap(), Some(31));
    assert_eq!(b.reducing_in(&r, &3).get().unwrap(), None);
    b.aggregating_in(&a, &1).merge_namespaces(&[2, 3]).unwrap();
    assert_eq!(b.aggregating_in(&a, &1).get().unwrap(), Some(22.75));
    // Merging nothing into an empty target leaves it empty.
    b.list_in(&l, &77).merge_namespaces(&[55]).unwrap();
    assert_eq!(b.list_in(&l, &77).get().unwrap(), None);
}

/// Kind and type mismatches, foreign key groups, bad names.
pub fn registration_errors<F: BackendFactory>(f: &F) {
    let mut b = f
        .create::<u64>(BackendConfig::subtask(
            128,
            2,
            0,
            Arc::new(ManualClock::new(0)),
        ))
        .unwrap();
    b.register_value(ValueStateDescriptor::<u64>::new("s").unwrap())
        .unwrap();
    let err = b
        .register_list(ListStateDescriptor::<u64>::new("s").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StateKindMismatch { .. }), "{err}");
    assert!(err.to_string().contains("'s'"), "{err}");
    let err = b
        .register_value(ValueStateDescriptor::<String>::new("s").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StateTypeMismatch { .. }), "{err}");
    // Registering again with the same types gives a working handle to the same state.
    let h1 = b
        .register_value(ValueStateDescriptor::<u64>::new("s").unwrap())
        .unwrap();
    let key = (0u64..).find(|k| b.set_current_key(*k).is_ok()).unwrap();
    b.value(&h1).update(4).unwrap();
    let h2 = b
        .register_value(ValueStateDescriptor::<u64>::new("s").unwrap())
        .unwrap();
    b.set_current_key(key).unwrap();
    assert_eq!(b.value(&h2).get().unwrap(), Some(4));
    // A key of another subtask's key group is rejected.
    let foreign = (0u64..).find(|k| b.set_current_key(*k).is_err()).unwrap();
    let err = b.set_current_key(foreign).unwrap_err();
    assert!(matches!(err, Error::KeyGroupOutOfRange { .. }), "{err}");
    assert!(matches!(
        ValueStateDescriptor::<u64>::new("../etc"),
        Err(Error::InvalidStateName { .. })
    ));
}

struct AllKinds {
    v: ValueStateHandle<String, ()>,
    vn: ValueStateHandle<u64, u32>,
    l: ListStateHandle<u64, ()>,
    m: MapStateHandle<u32, String, ()>,
    r: ReducingStateHandle<u64, ()>,
    a: AggregatingStateHandle<u64, f64, ()>,
}

fn register_all<B: KeyedStateBackend>(b: &mut B) -> AllKinds {
    AllKinds {
        v: b.register_value(ValueStateDescriptor::new("v").unwrap())
            .unwrap(),
        vn: b
            .register_value(ValueStateDescriptor::new("vn").unwrap())
            .unwrap(),
        l: b.register_list(ListStateDescriptor::new("l").unwrap())
            .unwrap(),
        m: b.register_map(MapStateDescriptor::new("m").unwrap())
            .unwrap(),
        r: b.register_reducing(ReducingStateDescriptor::new("r", |a: u64, b| a + b).unwrap())
            .unwrap(),
        a: b.register_aggregating(
            AggregatingStateDescriptor::<u64, (u64, u64), f64>::new("a", Avg).unwrap(),
        )
        .unwrap(),
    }
}

fn fill<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &AllKinds, keys: impl Iterator<Item = u64>) {
    for k in keys {
        if b.set_current_key(k).is_err() {
            continue;
        }
        b.value(&h.v).update(format!("v{k}")).unwrap();
        b.value_in(&h.vn, &((k % 3) as u32)).update(k * 2).unwrap();
        b.list(&h.l).add_all(vec![k, k + 1]).unwrap();
        b.map(&h.m)
            .put_all(vec![(1, format!("a{k}")), (2, format!("b{k}"))])
            .unwrap();
        b.reducing(&h.r).add(k).unwrap();
        b.reducing(&h.r).add(1).unwrap();
        b.aggregating(&h.a).add(k).unwrap();
        b.aggregating(&h.a).add(k + 2).unwrap();
    }
}

/// Checks the state of `k` as written by `fill`; returns false if the backend has no trace of it.
fn check<B: KeyedStateBackend<Key = u64>>(b: &mut B, h: &AllKinds, k: u64) -> bool {
    b.set_current_key(k).unwrap();
    let Some(v) = b.value(&h.v).get().unwrap() else {
        assert_eq!(b.list(&h.l).get().unwrap(), None);
        assert!(b.map(&h.m).is_empty().unwrap());
        assert_eq!(b.reducing(&h.r).get().unwrap(), None);
        return false;
    };
    assert_eq!(v, format!("v{k}"));
    assert_eq!(
        b.value_in(&h.vn, &((k % 3) as u32)).get().unwrap(),
        Some(k * 2)
    );
    assert_eq!(
        b.value_in(&h.vn, &((k % 3 + 1) as u32)).get().unwrap(),
        None
    );
    assert_eq!(b.list(&h.l).get().unwrap(), Some(vec![k, k + 1]));
    assert_eq!(b.map(&h.m).get(&2).unwrap(), Some(format!("b{k}")));
    assert_eq!(
        b.map(&h.m)
            .iter()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(b.reducing(&h.r).get().unwrap(), Some(k + 1));
    assert_eq!(b.aggregating(&h.a).get().unwrap(), Some(k as f64 + 1.0));
    true
}

/// Every kind survives snapshot + restore (restore before and after registration).
pub fn snapshot_restore_round_trip<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = register_all(&mut b);
    fill(&mut b, &h, 0..500);
    let bytes = snapshot_bytes(&mut b);

    // Restore, then register.
    let mut r1 = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r1, &[&bytes]).unwrap();
    let h1 = register_all(&mut r1);
    // Register, then restore.
    let mut r2 = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h2 = register_all(&mut r2);
    restore_from(&mut r2, &[&bytes]).unwrap();
    for k in 0..500 {
        assert!(
            check(&mut r1, &h1, k),
            "key {k} missing after restore-then-register"
        );
        assert!(
            check(&mut r2, &h2, k),
            "key {k} missing after register-then-restore"
        );
    }
    assert!(!check(&mut r1, &h1, 10_000));
    // A snapshot of the restored backend is again a full copy.
    let again = snapshot_bytes(&mut r1);
    let mut r3 = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r3, &[&again]).unwrap();
    let h3 = register_all(&mut r3);
    for k in (0..500).step_by(7) {
        assert!(check(&mut r3, &h3, k));
    }
}

/// Rescaling 1 -> 2 -> 1 and 2 -> 3 keeps every key exactly once.
pub fn rescale_one_to_two_and_back<F: BackendFactory>(f: &F) {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
    let mut one = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = register_all(&mut one);
    fill(&mut one, &h, 0..1000);
    let full = snapshot_bytes(&mut one);

    let mut halves = Vec::new();
    let mut seen = BTreeMap::<u64, usize>::new();
    for i in 0..2 {
        let mut b = f
            .create::<u64>(BackendConfig::subtask(128, 2, i, Arc::clone(&clock)))
            .unwrap();
        restore_from(&mut b, &[&full]).unwrap();
        let hb = register_all(&mut b);
        for k in 0..1000 {
            if b.set_current_key(k).is_ok() && check(&mut b, &hb, k) {
                *seen.entry(k).or_default() += 1;
            }
        }
        halves.push(snapshot_bytes(&mut b));
    }
    assert_eq!(seen.len(), 1000, "every key lands in one of the two halves");
    assert!(seen.values().all(|n| *n == 1), "no key is in both halves");

    // 2 -> 1: both halves restored into one backend.
    let mut merged = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut merged, &[&halves[0], &halves[1]]).unwrap();
    let hm = register_all(&mut merged);
    for k in 0..1000 {
        assert!(check(&mut merged, &hm, k), "key {k} lost in 2 -> 1");
    }
    // 2 -> 3 from the halves: each key exactly once again.
    let mut count = BTreeMap::<u64, usize>::new();
    for i in 0..3 {
        let mut b = f
            .create::<u64>(BackendConfig::subtask(128, 3, i, Arc::clone(&clock)))
            .unwrap();
        restore_from(&mut b, &[&halves[0], &halves[1]]).unwrap();
        let hb = register_all(&mut b);
        for k in 0..1000 {
            if b.set_current_key(k).is_ok() && check(&mut b, &hb, k) {
                *count.entry(k).or_default() += 1;
            }
        }
    }
    assert_eq!(count.len(), 1000);
    assert!(count.values().all(|n| *n == 1));
    // Max parallelism cannot change.
    let mut other = f.create::<u64>(BackendConfig::full(256)).unwrap();
    let err = restore_from(&mut other, &[&full]).unwrap_err();
    assert!(err.to_string().contains("max parallelism"), "{err}");
}

/// A snapshot holds the writes before it and none after it, written on another thread.
pub fn snapshot_is_isolated_from_later_writes<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let l = b
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
        .unwrap();
    for k in 0..200 {
        b.set_current_key(k).unwrap();
        b.value(&h).update(k).unwrap();
        b.list(&l).add(k).unwrap();
    }
    let snap = b.snapshot().unwrap();
    // Writes after the snapshot started: overwrite, add, delete.
    for k in 0..200 {
        b.set_current_key(k).unwrap();
        if k % 2 == 0 {
            b.value(&h).update(k + 1_000_000).unwrap();
            b.list(&l).add(99).unwrap();
        } else {
            b.value(&h).clear().unwrap();
            b.list(&l).clear().unwrap();
        }
    }
    for k in 200..300 {
        b.set_current_key(k).unwrap();
        b.value(&h).update(k).unwrap();
    }
    // The snapshot is written on another thread while the live state keeps changing.
    let bytes = std::thread::spawn(move || {
        let mut out = Vec::new();
        snap.write_to(&mut out).unwrap();
        out
    })
    .join()
    .unwrap();
    let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r, &[&bytes]).unwrap();
    let rh = r
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let rl = r
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
        .unwrap();
    for k in 0..300 {
        r.set_current_key(k).unwrap();
        let expect = (k < 200).then_some(k);
        assert_eq!(r.value(&rh).get().unwrap(), expect, "key {k}");
        assert_eq!(
            r.list(&rl).get().unwrap(),
            expect.map(|k| vec![k]),
            "key {k}"
        );
    }
    // And the live state has the later writes.
    b.set_current_key(2).unwrap();
    assert_eq!(b.value(&h).get().unwrap(), Some(1_000_002));
    b.set_current_key(3).unwrap();
    assert_eq!(b.value(&h).get().unwrap(), None);
}

fn ttl_backend<F: BackendFactory>(f: &F, clock: &ManualClock) -> F::Backend<u64> {
    f.create::<u64>(BackendConfig {
        max_parallelism: 128,
        range: KeyGroupRange::all(128),
        clock: Arc::new(clock.clone()),
    })
    .unwrap()
}

/// A state registered again with a TTL keeps its values: they count as written at the
/// re-registration (not at time 0, which would expire them at once), then expire on schedule.
pub fn ttl_enabled_by_re_registration_keeps_values<F: BackendFactory>(f: &F) {
    let clock = ManualClock::new(10_000);
    let mut b = ttl_backend(f, &clock);
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let l = b
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
        .unwrap();
    let m = b
        .register_map(MapStateDescriptor::<u64, u64>::new("m").unwrap())
        .unwrap();
    let r = b
        .register_reducing(ReducingStateDescriptor::<u64>::new("r", |a, b| a + b).unwrap())
        .unwrap();
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k).unwrap();
        b.list(&l).add_all(vec![k, k + 1]).unwrap();
        b.map(&m).put(k, k * 2).unwrap();
        b.reducing(&r).add(k).unwrap();
    }
    let ttl = StateTtlConfig::new(Duration::from_millis(100));
    clock.advance(1_000);
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap().with_ttl(ttl))
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
    let r = b
        .register_reducing(
            ReducingStateDescriptor::<u64>::new("r", |a, b| a + b)
                .unwrap()
                .with_ttl(ttl),
        )
        .unwrap();
    clock.advance(50);
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.value(&v).get().unwrap(), Some(k), "value of key {k}");
        assert_eq!(
            b.list(&l).get().unwrap(),
            Some(vec![k, k + 1]),
            "list of key {k}"
        );
        assert_eq!(b.map(&m).get(&k).unwrap(), Some(k * 2), "map of key {k}");
        assert_eq!(
            b.reducing(&r).get().unwrap(),
            Some(k),
            "reducing of key {k}"
        );
    }
    clock.advance(60);
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        assert_eq!(b.value(&v).get().unwrap(), None, "value of key {k} expired");
        assert_eq!(b.list(&l).get().unwrap(), None, "list of key {k} expired");
        assert_eq!(b.map(&m).get(&k).unwrap(), None, "map of key {k} expired");
        assert_eq!(
            b.reducing(&r).get().unwrap(),
            None,
            "reducing of key {k} expired"
        );
    }
}

/// A state registered again without its TTL keeps its values, which no longer expire: list
/// elements and map entries written with timestamps read as plain values, new ones are added
/// beside them, and a snapshot restored with TTL on again stamps them anew.
pub fn ttl_disabled_by_re_registration_keeps_values<F: BackendFactory>(f: &F) {
    let clock = ManualClock::new(10_000);
    let mut b = ttl_backend(f, &clock);
    let ttl = StateTtlConfig::new(Duration::from_millis(100));
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
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add_all(vec![k, k + 1]).unwrap();
        b.map(&m).put(k, k * 2).unwrap();
    }
    clock.advance(50);
    let l = b
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
        .unwrap();
    let m = b
        .register_map(MapStateDescriptor::<u64, u64>::new("m").unwrap())
        .unwrap();
    clock.advance(1_000);
    for k in 0..50u64 {
        b.set_current_key(k).unwrap();
        b.list(&l).add(k + 2).unwrap();
        b.map(&m).put(k + 1, k).unwrap();
    }
    clock.advance(1_000);
    let check = |b: &mut F::Backend<u64>,
                 l: &ListStateHandle<u64, ()>,
                 m: &MapStateHandle<u64, u64, ()>| {
        for k in 0..50u64 {
            b.set_current_key(k).unwrap();
            assert_eq!(
                b.list(l).get().unwrap(),
                Some(vec![k, k + 1, k + 2]),
                "list of key {k} after TTL was switched off"
            );
            assert_eq!(b.map(m).get(&k).unwrap(), Some(k * 2), "map of key {k}");
            assert_eq!(b.map(m).get(&(k + 1)).unwrap(), Some(k), "map of key {k}");
        }
    };
    check(&mut b, &l, &m);
    let bytes = snapshot_bytes(&mut b);
    let mut r = ttl_backend(f, &clock);
    restore_from(&mut r, &[&bytes]).unwrap();
    let rl = r
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
        .unwrap();
    let rm = r
        .register_map(MapStateDescriptor::<u64, u64>::new("m").unwrap())
        .unwrap();
    check(&mut r, &rl, &rm);
    // TTL on again: everything counts as written now and expires on schedule.
    let rl = r
        .register_list(ListStateDescriptor::<u64>::new("l").unwrap().with_ttl(ttl))
        .unwrap();
    clock.advance(50);
    r.set_current_key(7).unwrap();
    assert_eq!(r.list(&rl).get().unwrap(), Some(vec![7, 8, 9]));
    clock.advance(60);
    assert_eq!(
        r.list(&rl).get().unwrap(),
        None,
        "list expired after TTL on again"
    );
}

/// TTL update types, visibility, per element and per entry expiry, with a manual clock.
pub fn ttl_semantics<F: BackendFactory>(f: &F) {
    let clock = ManualClock::new(10_000);
    let mut b = ttl_backend(f, &clock);
    let ttl = StateTtlConfig::new(Duration::from_millis(100));
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap().with_ttl(ttl))
        .unwrap();
    let rw = b
        .register_value(
            ValueStateDescriptor::<u64>::new("rw")
                .unwrap()
                .with_ttl(ttl.update_type(TtlUpdateType::OnReadAndWrite)),
        )
        .unwrap();
    let ret = b
        .register_value(
            ValueStateDescriptor::<u64>::new("ret")
                .unwrap()
                .with_ttl(ttl.visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp)),
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
    b.set_current_key(1).unwrap();
    b.value(&v).update(1).unwrap();
    b.value(&rw).update(2).unwrap();
    b.value(&ret).update(3).unwrap();
    b.list(&l).add(10).unwrap();
    b.map(&m).put(1, 100).unwrap();
    clock.advance(60);
    assert_eq!(b.value(&v).get().unwrap(), Some(1));
    assert_eq!(b.value(&rw).get().unwrap(), Some(2)); // refreshes to t+60
    b.list(&l).add(11).unwrap(); // element written at t+60
    b.map(&m).put(2, 200).unwrap();
    clock.advance(50); // t+110: first writes expired, refreshed/newer ones alive
    assert_eq!(
        b.value(&v).get().unwrap(),
        None,
        "expired value is not returned"
    );
    assert_eq!(
        b.value(&rw).get().unwrap(),
        Some(2),
        "read refreshed the timestamp"
    );
    assert_eq!(
        b.value(&ret).get().unwrap(),
        Some(3),
        "expired but not cleaned up is returned once"
    );
    assert_eq!(
        b.value(&ret).get().unwrap(),
        None,
        "and it was cleaned up by that read"
    );
    assert_eq!(b.list(&l).get().unwrap(), Some(vec![11]), "per element TTL");
    assert_eq!(b.map(&m).get(&1).unwrap(), None, "per entry TTL");
    assert_eq!(
        b.map(&m)
            .iter()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        vec![(2, 200)]
    );
    clock.advance(1000);
    assert_eq!(b.list(&l).get().unwrap(), None);
    assert!(b.map(&m).is_empty().unwrap());
    assert_eq!(b.value(&rw).get().unwrap(), None);
    // A write resets the clock of a value.
    b.value(&v).update(5).unwrap();
    clock.advance(99);
    assert_eq!(b.value(&v).get().unwrap(), Some(5));
}

/// TTL cleanup in full snapshots and incrementally on access.
pub fn ttl_cleanup_on_snapshot_and_incrementally<F: BackendFactory>(f: &F) {
    let clock = ManualClock::new(0);
    let mut b = ttl_backend(f, &clock);
    let ttl = StateTtlConfig::new(Duration::from_millis(100))
        .visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp);
    let full = b
        .register_value(
            ValueStateDescriptor::<u64>::new("full")
                .unwrap()
                .with_ttl(ttl.cleanup_full_snapshot()),
        )
        .unwrap();
    let inc = b
        .register_value(
            ValueStateDescriptor::<u64>::new("inc")
                .unwrap()
                .with_ttl(ttl.cleanup_incrementally(10, false)),
        )
        .unwrap();
    let none = b
        .register_value(
            ValueStateDescriptor::<u64>::new("none")
                .unwrap()
                .with_ttl(ttl),
        )
        .unwrap();
    for k in 0..100 {
        b.set_current_key(k).unwrap();
        b.value(&full).update(k).unwrap();
        b.value(&inc).update(k).unwrap();
        b.value(&none).update(k).unwrap();
    }
    clock.advance(500);
    let bytes = snapshot_bytes(&mut b);
    let mut r = ttl_backend(f, &clock);
    restore_from(&mut r, &[&bytes]).unwrap();
    let rf = r
        .register_value(
            ValueStateDescriptor::<u64>::new("full")
                .unwrap()
                .with_ttl(ttl.cleanup_full_snapshot()),
        )
        .unwrap();
    let rn = r
        .register_value(
            ValueStateDescriptor::<u64>::new("none")
                .unwrap()
                .with_ttl(ttl),
        )
        .unwrap();
    assert!(
        r.keys(&rf, &())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .is_empty(),
        "full-snapshot cleanup dropped expired entries"
    );
    assert_eq!(
        key_count(&mut r, &rn),
        100,
        "without cleanup they survive the snapshot"
    );

    // Incremental cleanup: accessing one key checks 10 other entries each time.
    b.set_current_key(0).unwrap();
    assert_eq!(key_count(&mut b, &inc), 100);
    for _ in 0..30 {
        b.value(&inc).update(1).unwrap();
    }
    let left = key_count(&mut b, &inc);
    assert!(
        left <= 1,
        "incremental cleanup removed expired entries ({left} left)"
    );
    assert_eq!(
        key_count(&mut b, &none),
        100,
        "states without it keep theirs"
    );
}

/// Restore outcomes: compatible as is, after migration, incompatible (data kept), wrong kind or key type.
pub fn schema_evolution<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let v1 = ValueStateDescriptor::<u32>::new("count")
        .unwrap()
        .with_value_serializer(PostcardSerializer::<u32>::new().with_schema("count"));
    let h = b.register_value(v1).unwrap();
    for k in 0..50 {
        b.set_current_key(k).unwrap();
        b.value(&h).update(k as u32).unwrap();
    }
    let bytes = snapshot_bytes(&mut b);

    // Compatible as is.
    let mut same = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut same, &[&bytes]).unwrap();
    let hs = same
        .register_value(
            ValueStateDescriptor::<u32>::new("count")
                .unwrap()
                .with_value_serializer(PostcardSerializer::<u32>::new().with_schema("count")),
        )
        .unwrap();
    same.set_current_key(7).unwrap();
    assert_eq!(same.value(&hs).get().unwrap(), Some(7));

    // Incompatible: a clear error naming the state; the restored data is kept for a retry.
    let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r, &[&bytes]).unwrap();
    let err = r
        .register_value(ValueStateDescriptor::<String>::new("count").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
    assert!(err.to_string().contains("'count'"), "{err}");

    // Compatible after migration: u32 v1 -> u64 v2 (x 1000).
    let v2 = ValueStateDescriptor::<u64>::new("count")
        .unwrap()
        .with_value_serializer(
            PostcardSerializer::<u64>::new()
                .with_schema("count")
                .with_version(2)
                .with_migration(1, |bytes| {
                    PostcardSerializer::<u32>::new()
                        .deserialize(bytes)
                        .map(|v| u64::from(v) * 1000)
                }),
        );
    let hm = r.register_value(v2).unwrap();
    r.set_current_key(7).unwrap();
    assert_eq!(r.value(&hm).get().unwrap(), Some(7000));
    r.set_current_key(49).unwrap();
    assert_eq!(r.value(&hm).get().unwrap(), Some(49_000));

    // A state restored as another kind is refused.
    let mut k = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut k, &[&bytes]).unwrap();
    let err = k
        .register_list(ListStateDescriptor::<u32>::new("count").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StateKindMismatch { .. }), "{err}");
    // Keys of another type are refused.
    let mut s = f.create::<String>(BackendConfig::full(128)).unwrap();
    restore_from(&mut s, &[&bytes]).unwrap();
    let err = s
        .register_value(
            ValueStateDescriptor::<u32>::new("count")
                .unwrap()
                .with_value_serializer(PostcardSerializer::<u32>::new().with_schema("count")),
        )
        .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
}

/// An order as version 1 of an application wrote it.
mod shop_v1 {
    /// The order.
    #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
    pub struct Order {
        pub id: u64,
        pub item: String,
    }
}

/// The same order after the type moved to another module (its `type_name` changed).
mod shop_v2 {
    pub mod model {
        /// The order, moved.
        #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
        pub struct Order {
            pub id: u64,
            pub item: String,
        }
    }
}

/// Schema names decide compatibility, never Rust type names: an unnamed type moved to another
/// module restores as is; an explicit rename without a declared alias or migration is a clear
/// `IncompatibleSerializer` error naming both schemas and the ways out (the data stays pending);
/// with an alias it restores as is, with a version bump and a migration it is migrated.
pub fn schema_names<F: BackendFactory>(f: &F) {
    use shop_v1::Order as Old;
    use shop_v2::model::Order as New;
    let write = |ser: PostcardSerializer<Old>| {
        let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
        let h = b
            .register_value(
                ValueStateDescriptor::<Old>::new("orders")
                    .unwrap()
                    .with_value_serializer(ser),
            )
            .unwrap();
        for k in 0..30u64 {
            b.set_current_key(k).unwrap();
            let order = Old {
                id: k,
                item: format!("item-{k}"),
            };
            b.value(&h).update(order).unwrap();
        }
        snapshot_bytes(&mut b)
    };
    let read = |bytes: &Vec<u8>, ser: PostcardSerializer<New>| -> Result<Vec<Option<New>>> {
        let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
        restore_from(&mut r, &[bytes]).unwrap();
        let h = r.register_value(
            ValueStateDescriptor::<New>::new("orders")
                .unwrap()
                .with_value_serializer(ser),
        )?;
        (0..30u64)
            .map(|k| {
                r.set_current_key(k).unwrap();
                r.value(&h).get()
            })
            .collect()
    };
    let expected: Vec<Option<New>> = (0..30u64)
        .map(|k| {
            Some(New {
                id: k,
                item: format!("item-{k}"),
            })
        })
        .collect();

    // Unnamed, moved to another module: as is.
    let unnamed = write(PostcardSerializer::new());
    assert_eq!(read(&unnamed, PostcardSerializer::new()).unwrap(), expected);
    // Naming a previously unnamed state is not a rename.
    assert_eq!(
        read(&unnamed, PostcardSerializer::named("shop.Order")).unwrap(),
        expected
    );

    // Named, moved and renamed without a word: refused, saying how to resolve it.
    let named = write(PostcardSerializer::named("shop.Order"));
    assert_eq!(
        read(&named, PostcardSerializer::named("shop.Order")).unwrap(),
        expected,
        "same name, moved type"
    );
    let err = read(&named, PostcardSerializer::named("shop.Purchase")).unwrap_err();
    assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
    let msg = err.to_string();
    for part in [
        "'orders'",
        "'shop.Order'",
        "'shop.Purchase'",
        "rename the schema back",
        "with_migration",
        "with_alias(\"shop.Order\")",
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
    // The rename declared compatible: as is.
    assert_eq!(
        read(
            &named,
            PostcardSerializer::named("shop.Purchase").with_alias("shop.Order")
        )
        .unwrap(),
        expected
    );
    // The rename with a migration: every value goes through it.
    let migrated = read(
        &named,
        PostcardSerializer::named("shop.Purchase")
            .with_version(2)
            .with_migration(1, |bytes| {
                let old: Old = PostcardSerializer::new().deserialize(bytes)?;
                Ok(New {
                    id: old.id,
                    item: old.item.to_uppercase(),
                })
            }),
    )
    .unwrap();
    assert_eq!(
        migrated[3].as_ref().map(|o| o.item.as_str()),
        Some("ITEM-3")
    );

    // A snapshot from before schema names holds the old type name: an unnamed type reads it
    // as is, a named one once the old type name is declared.
    let legacy = write(PostcardSerializer::new().with_schema("my_app::shop::Order"));
    assert_eq!(read(&legacy, PostcardSerializer::new()).unwrap(), expected);
    assert!(read(&legacy, PostcardSerializer::named("shop.Order")).is_err());
    assert_eq!(
        read(
            &legacy,
            PostcardSerializer::named("shop.Order").with_alias("my_app::shop::Order")
        )
        .unwrap(),
        expected
    );
}

/// Namespace serializers migrate like value serializers (Flink refuses a namespace serializer
/// that needs migration; Flowstate runs the user's migration): windows written as `u32` starts
/// come back as `u64` starts, and without a migration the change is a clear error.
pub fn namespace_serializer_migration<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let v1 = ValueStateDescriptor::<u64, u32>::new("per-window")
        .unwrap()
        .with_namespace_serializer(PostcardSerializer::<u32>::new().with_schema("window"));
    let h = b.register_value(v1).unwrap();
    for k in 0..40u64 {
        b.set_current_key(k).unwrap();
        for w in [10u32, 20] {
            b.value_in(&h, &w).update(k * 100 + u64::from(w)).unwrap();
        }
    }
    let bytes = snapshot_bytes(&mut b);

    // No migration from version 1: refused, naming the state; the data stays pending.
    let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r, &[&bytes]).unwrap();
    let err = r
        .register_value(
            ValueStateDescriptor::<u64, u64>::new("per-window")
                .unwrap()
                .with_namespace_serializer(
                    PostcardSerializer::<u64>::new()
                        .with_schema("window")
                        .with_version(2),
                ),
        )
        .unwrap_err();
    assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
    assert!(err.to_string().contains("'per-window'"), "{err}");

    // With a migration u32 -> u64 (x 1000): every (key, window) is found under its new window.
    let v2 = ValueStateDescriptor::<u64, u64>::new("per-window")
        .unwrap()
        .with_namespace_serializer(
            PostcardSerializer::<u64>::new()
                .with_schema("window")
                .with_version(2)
                .with_migration(1, |bytes| {
                    PostcardSerializer::<u32>::new()
                        .deserialize(bytes)
                        .map(|w| u64::from(w) * 1000)
                }),
        );
    let hm = r.register_value(v2.clone()).unwrap();
    for k in 0..40u64 {
        r.set_current_key(k).unwrap();
        for w in [10u32, 20] {
            let new_w = u64::from(w) * 1000;
            assert_eq!(
                r.value_in(&hm, &new_w).get().unwrap(),
                Some(k * 100 + u64::from(w)),
                "key {k} window {w}"
            );
            assert_eq!(r.value_in(&hm, &u64::from(w)).get().unwrap(), None);
        }
    }
    // The migrated state is written in the new format: it restores as is.
    r.set_current_key(3).unwrap();
    r.value_in(&hm, &30_000).update(7).unwrap();
    let migrated = snapshot_bytes(&mut r);
    let mut again = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut again, &[&migrated]).unwrap();
    let ha = again.register_value(v2).unwrap();
    again.set_current_key(3).unwrap();
    assert_eq!(again.value_in(&ha, &10_000).get().unwrap(), Some(310));
    assert_eq!(again.value_in(&ha, &30_000).get().unwrap(), Some(7));
}

/// Flipped bytes and truncations are errors naming the stream, never panics.
pub fn corrupt_snapshots_are_errors<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(16)).unwrap();
    let h = register_all(&mut b);
    fill(&mut b, &h, 0..20);
    let bytes = snapshot_bytes(&mut b);
    let step = (bytes.len() / 200).max(1);
    for i in (0..bytes.len()).step_by(step) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x5a;
        let mut r = f.create::<u64>(BackendConfig::full(16)).unwrap();
        assert!(
            restore_from(&mut r, &[&bad]).is_err(),
            "flipped byte {i} not detected"
        );
        let mut r = f.create::<u64>(BackendConfig::full(16)).unwrap();
        assert!(
            restore_from(&mut r, &[&bytes[..i].to_vec()]).is_err(),
            "truncation at {i}"
        );
    }
    let mut r = f.create::<u64>(BackendConfig::full(16)).unwrap();
    let err = restore_from(&mut r, &[&b"not a snapshot at all".to_vec()]).unwrap_err();
    assert!(
        err.to_string().contains("snapshot-0"),
        "error names the stream: {err}"
    );
}

/// Operator list and broadcast state through encode, decode and redistribution.
pub fn operator_state_round_trip<F: BackendFactory>(_f: &F) {
    let offsets =
        OperatorListStateDescriptor::<u64>::new("offsets", RedistributionMode::EvenSplit).unwrap();
    let rules = BroadcastStateDescriptor::<String, String>::new("rules").unwrap();
    let mut stores = Vec::new();
    for i in 0..3u64 {
        let mut s = OperatorStateStore::new();
        s.list_state(&offsets)
            .unwrap()
            .update(&[i * 10, i * 10 + 1])
            .unwrap();
        s.broadcast_state(&rules)
            .unwrap()
            .put(&"r".into(), &"x".into())
            .unwrap();
        let bytes = s.encode().unwrap();
        stores.push(OperatorStateStore::decode(&bytes, "op").unwrap());
    }
    let mut all = Vec::new();
    for mut s in redistribute(&stores, 2) {
        all.extend(s.list_state(&offsets).unwrap().get().unwrap());
        assert_eq!(
            s.broadcast_state(&rules)
                .unwrap()
                .get(&"r".into())
                .unwrap()
                .as_deref(),
            Some("x")
        );
    }
    assert_eq!(all, vec![0, 1, 10, 11, 20, 21]);
}

#[derive(Clone, Debug)]
enum Op {
    Key(u8),
    ValuePut(u8, u16),
    ValueClear(u8),
    ListAdd(u8, u16),
    ListAddAll(u8, Vec<u16>),
    ListUpdate(u8, Vec<u16>),
    ListClear(u8),
    MapPut(u8, u8, u16),
    MapRemove(u8, u8),
    MapClear(u8),
    SnapshotRestore,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let ns = 0u8..3;
    prop_oneof![
        3 => (0u8..8).prop_map(Op::Key),
        3 => (ns.clone(), any::<u16>()).prop_map(|(n, v)| Op::ValuePut(n, v)),
        1 => ns.clone().prop_map(Op::ValueClear),
        3 => (ns.clone(), any::<u16>()).prop_map(|(n, v)| Op::ListAdd(n, v)),
        1 => (ns.clone(), prop::collection::vec(any::<u16>(), 0..4)).prop_map(|(n, v)| Op::ListAddAll(n, v)),
        1 => (ns.clone(), prop::collection::vec(any::<u16>(), 0..3)).prop_map(|(n, v)| Op::ListUpdate(n, v)),
        1 => ns.clone().prop_map(Op::ListClear),
        3 => (ns.clone(), 0u8..4, any::<u16>()).prop_map(|(n, k, v)| Op::MapPut(n, k, v)),
        2 => (ns.clone(), 0u8..4).prop_map(|(n, k)| Op::MapRemove(n, k)),
        1 => ns.prop_map(Op::MapClear),
        1 => Just(Op::SnapshotRestore),
    ]
}

#[derive(Default, Clone, Debug, PartialEq)]
struct Model {
    values: BTreeMap<(u8, u8), u16>,
    lists: BTreeMap<(u8, u8), Vec<u16>>,
    maps: BTreeMap<(u8, u8), BTreeMap<u8, u16>>,
}

type Handles = (
    ValueStateHandle<u16, u8>,
    ListStateHandle<u16, u8>,
    MapStateHandle<u8, u16, u8>,
);

fn model_handles<B: KeyedStateBackend>(b: &mut B) -> Handles {
    (
        b.register_value(ValueStateDescriptor::new("v").unwrap())
            .unwrap(),
        b.register_list(ListStateDescriptor::new("l").unwrap())
            .unwrap(),
        b.register_map(MapStateDescriptor::new("m").unwrap())
            .unwrap(),
    )
}

fn compare<B: KeyedStateBackend<Key = u8>>(
    b: &mut B,
    h: &Handles,
    model: &Model,
) -> Result<(), TestCaseError> {
    for k in 0u8..8 {
        b.set_current_key(k).unwrap();
        for ns in 0u8..3 {
            prop_assert_eq!(
                b.value_in(&h.0, &ns).get().unwrap(),
                model.values.get(&(k, ns)).copied()
            );
            prop_assert_eq!(
                b.list_in(&h.1, &ns).get().unwrap(),
                model.lists.get(&(k, ns)).cloned()
            );
            let got: BTreeMap<u8, u16> = b
                .map_in(&h.2, &ns)
                .iter()
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .into_iter()
                .collect();
            prop_assert_eq!(&got, &model.maps.get(&(k, ns)).cloned().unwrap_or_default());
            prop_assert_eq!(b.map_in(&h.2, &ns).is_empty().unwrap(), got.is_empty());
        }
    }
    Ok(())
}

/// Random operation sequences on value, list and map state against a `BTreeMap` model, compared
/// after every step, and after snapshot + restore (into one backend and into two halves).
pub fn model_based_property_test<F: BackendFactory>(f: &F) {
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 48,
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&prop::collection::vec(op_strategy(), 1..80), |ops| {
            let mut b = f.create::<u8>(BackendConfig::full(8)).unwrap();
            let mut h = model_handles(&mut b);
            let mut m = Model::default();
            let mut key = 0u8;
            b.set_current_key(0).unwrap();
            for op in ops {
                match op {
                    Op::Key(k) => {
                        key = k;
                    }
                    Op::ValuePut(n, v) => {
                        b.value_in(&h.0, &n).update(v).unwrap();
                        m.values.insert((key, n), v);
                    }
                    Op::ValueClear(n) => {
                        b.value_in(&h.0, &n).clear().unwrap();
                        m.values.remove(&(key, n));
                    }
                    Op::ListAdd(n, v) => {
                        b.list_in(&h.1, &n).add(v).unwrap();
                        m.lists.entry((key, n)).or_default().push(v);
                    }
                    Op::ListAddAll(n, vs) => {
                        b.list_in(&h.1, &n).add_all(vs.clone()).unwrap();
                        if !vs.is_empty() {
                            m.lists.entry((key, n)).or_default().extend(vs);
                        }
                    }
                    Op::ListUpdate(n, vs) => {
                        b.list_in(&h.1, &n).update(vs.clone()).unwrap();
                        if vs.is_empty() {
                            m.lists.remove(&(key, n));
                        } else {
                            m.lists.insert((key, n), vs);
                        }
                    }
                    Op::ListClear(n) => {
                        b.list_in(&h.1, &n).clear().unwrap();
                        m.lists.remove(&(key, n));
                    }
                    Op::MapPut(n, uk, v) => {
                        b.map_in(&h.2, &n).put(uk, v).unwrap();
                        m.maps.entry((key, n)).or_default().insert(uk, v);
                    }
                    Op::MapRemove(n, uk) => {
                        b.map_in(&h.2, &n).remove(&uk).unwrap();
                        if let Some(map) = m.maps.get_mut(&(key, n)) {
                            map.remove(&uk);
                            if map.is_empty() {
                                m.maps.remove(&(key, n));
                            }
                        }
                    }
                    Op::MapClear(n) => {
                        b.map_in(&h.2, &n).clear().unwrap();
                        m.maps.remove(&(key, n));
                    }
                    Op::SnapshotRestore => {
                        let bytes = snapshot_bytes(&mut b);
                        b = f.create::<u8>(BackendConfig::full(8)).unwrap();
                        restore_from(&mut b, &[&bytes]).unwrap();
                        h = model_handles(&mut b);
                    }
                }
                b.set_current_key(key).unwrap();
                compare(&mut b, &h, &m)?;
                b.set_current_key(key).unwrap();
            }
            // Rescale: two halves together hold exactly the model.
            let bytes = snapshot_bytes(&mut b);
            let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
            let mut union = Model::default();
            for i in 0..2 {
                let mut half = f
                    .create::<u8>(BackendConfig::subtask(8, 2, i, Arc::clone(&clock)))
                    .unwrap();
                restore_from(&mut half, &[&bytes]).unwrap();
                let hh = model_handles(&mut half);
                for k in 0u8..8 {
                    if half.set_current_key(k).is_err() {
                        continue;
                    }
                    for ns in 0u8..3 {
                        if let Some(v) = half.value_in(&hh.0, &ns).get().unwrap() {
                            prop_assert!(union.values.insert((k, ns), v).is_none());
                        }
                        if let Some(l) = half.list_in(&hh.1, &ns).get().unwrap() {
                            union.lists.insert((k, ns), l);
                        }
                        let map: BTreeMap<u8, u16> = half
                            .map_in(&hh.2, &ns)
                            .iter()
                            .unwrap()
                            .collect::<Result<Vec<_>, _>>()
                            .unwrap()
                            .into_iter()
                            .collect();
                        if !map.is_empty() {
                            union.maps.insert((k, ns), map);
                        }
                    }
                }
            }
            prop_assert_eq!(union, m);
            Ok(())
        })
        .unwrap();
}

/// Restored states that the job has not registered (yet) are carried into the next snapshot
/// unchanged: a checkpoint taken before a state is touched again loses nothing.
pub fn unregistered_restored_state_survives_snapshots<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = register_all(&mut b);
    fill(&mut b, &h, 0..200);
    let first = snapshot_bytes(&mut b);
    let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut r, &[&first]).unwrap();
    // Only one state is registered before the next snapshot, and it is changed.
    let v = r
        .register_value(ValueStateDescriptor::<String>::new("v").unwrap())
        .unwrap();
    r.set_current_key(3).unwrap();
    r.value(&v).update("changed".into()).unwrap();
    let second = snapshot_bytes(&mut r);
    let mut last = f.create::<u64>(BackendConfig::full(128)).unwrap();
    restore_from(&mut last, &[&second]).unwrap();
    let h2 = register_all(&mut last);
    for k in (0..200).filter(|k| *k != 3) {
        assert!(
            check(&mut last, &h2, k),
            "key {k} lost by the second snapshot"
        );
    }
    last.set_current_key(3).unwrap();
    assert_eq!(last.value(&h2.v).get().unwrap().as_deref(), Some("changed"));
    assert_eq!(last.list(&h2.l).get().unwrap(), Some(vec![3, 4]));
}

/// Timers: timestamp order, one timer per (key, namespace, timestamp), deletes, domains.
pub fn timers_order_dedup_delete<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
        .unwrap();
    for (k, ns, ts) in [
        (1u64, 0u32, 30i64),
        (2, 0, 10),
        (3, 1, 20),
        (1, 1, 30),
        (1, 0, 30),
    ] {
        b.set_current_key(k).unwrap();
        b.timers(&h).register_event_time_timer(&ns, ts).unwrap();
    }
    b.set_current_key(4).unwrap();
    b.timers(&h).register_event_time_timer(&0, 15).unwrap();
    b.timers(&h).delete_event_time_timer(&0, 15).unwrap();
    b.timers(&h).delete_event_time_timer(&0, 99).unwrap();
    b.timers(&h).register_processing_time_timer(&0, 5).unwrap();
    assert!(b.advance_watermark(&h, 9).unwrap().is_empty());
    let fired = b.advance_watermark(&h, 30).unwrap();
    let got: Vec<(u64, u32, i64)> = fired
        .iter()
        .map(|t| (t.key, t.namespace, t.timestamp))
        .collect();
    assert_eq!(
        got.len(),
        4,
        "the duplicate registration and the deleted timer do not fire: {got:?}"
    );
    assert_eq!(&got[..2], &[(2, 0, 10), (3, 1, 20)]);
    let mut at_30: Vec<_> = got[2..].to_vec();
    at_30.sort();
    assert_eq!(at_30, vec![(1, 0, 30), (1, 1, 30)]);
    assert!(fired.iter().all(|t| t.domain == TimeDomain::EventTime));
    assert!(
        b.advance_watermark(&h, i64::MAX).unwrap().is_empty(),
        "fired timers are gone"
    );
    let p = b.advance_processing_time(&h, 5).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].key, p[0].domain), (4, TimeDomain::ProcessingTime));
    let err = b
        .register_value(ValueStateDescriptor::<u64>::new("t").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StateKindMismatch { .. }), "{err}");
    let err = b
        .register_timer_service(TimerServiceDescriptor::<String>::new("t").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StateTypeMismatch { .. }), "{err}");
}

/// Timers survive snapshots and go to the subtask owning their key group on rescale; processing
/// timers that came due while the job was down fire on the first advance after the restore.
pub fn timers_snapshot_restore_and_rescale<F: BackendFactory>(f: &F) {
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h = b
        .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
        .unwrap();
    for k in 0..1000u64 {
        b.set_current_key(k).unwrap();
        b.timers(&h)
            .register_event_time_timer(&((k % 3) as u32), (k % 50) as i64)
            .unwrap();
        b.timers(&h)
            .register_processing_time_timer(&0, 100)
            .unwrap();
    }
    let bytes = snapshot_bytes(&mut b);
    b.set_current_key(5000).unwrap();
    b.timers(&h).register_event_time_timer(&0, 1).unwrap(); // after the snapshot: not in it
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
    let mut seen = BTreeMap::<u64, usize>::new();
    let mut halves = Vec::new();
    for i in 0..2 {
        let mut half = f
            .create::<u64>(BackendConfig::subtask(128, 2, i, Arc::clone(&clock)))
            .unwrap();
        restore_from(&mut half, &[&bytes]).unwrap();
        let hh = half
            .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
            .unwrap();
        halves.push(snapshot_bytes(&mut half));
        let fired = half.advance_watermark(&hh, i64::MAX).unwrap();
        assert!(fired.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        for t in fired {
            assert_eq!(t.namespace, (t.key % 3) as u32);
            assert_eq!(t.timestamp, (t.key % 50) as i64);
            assert!(
                half.set_current_key(t.key).is_ok(),
                "timer of a foreign key group"
            );
            *seen.entry(t.key).or_default() += 1;
        }
        let processing = half.advance_processing_time(&hh, 1_000).unwrap();
        assert!(processing.iter().all(|t| t.timestamp == 100));
        for t in processing {
            *seen.entry(t.key).or_default() += 10;
        }
    }
    assert_eq!(seen.len(), 1000);
    assert!(
        seen.values().all(|n| *n == 11),
        "every timer fires exactly once"
    );
    // 2 -> 1, with the service registered before the restore.
    let mut one = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let h1 = one
        .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
        .unwrap();
    restore_from(&mut one, &[&halves[0], &halves[1]]).unwrap();
    assert_eq!(one.advance_watermark(&h1, 24).unwrap().len(), 500);
    assert_eq!(one.advance_processing_time(&h1, 100).unwrap().len(), 1000);
    assert_eq!(one.advance_watermark(&h1, 49).unwrap().len(), 500);
}

/// Timers fired one at a time ([`KeyedStateBackend::next_due_timer`]): the same timers as
/// `advance_time`, in timestamp order, with state used and timers registered between calls (a
/// timer registered at or before the time fires in the same loop, one after it does not, one
/// deleted before its turn never fires), a snapshot in the middle of the loop holding exactly
/// the timers not fired yet, and a restored backend firing those.
pub fn timers_fire_one_at_a_time<F: BackendFactory>(f: &F) {
    let new = |f: &F| {
        let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
        let h = b
            .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
            .unwrap();
        let count = b
            .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
            .unwrap();
        for k in 0..3000u64 {
            b.set_current_key(k).unwrap();
            for ns in 0..(k % 3) as u32 + 1 {
                b.timers(&h)
                    .register_event_time_timer(&ns, (k % 40) as i64)
                    .unwrap();
            }
            b.timers(&h)
                .register_processing_time_timer(&0, (k % 5) as i64)
                .unwrap();
        }
        (b, h, count)
    };
    let (mut eager, he, _) = new(f);
    let mut expected: Vec<(i64, u64, u32)> = eager
        .advance_watermark(&he, 20)
        .unwrap()
        .into_iter()
        .map(|t| (t.timestamp, t.key, t.namespace))
        .collect();
    // Firing a key's timer in namespace 0 deletes its timer in namespace 1 at the same time,
    // which comes next in that key group: it must not fire.
    expected.retain(|&(_, k, ns)| !(ns == 1 && k % 3 >= 1));
    expected.sort();
    assert!(expected.len() > 2000, "{} timers due", expected.len());

    let (mut b, h, count) = new(f);
    assert!(b
        .next_due_timer(&h, TimeDomain::EventTime, -1)
        .unwrap()
        .is_none());
    let mut fired = Vec::new();
    let mut restored_rest = None;
    while let Some(t) = b.next_due_timer(&h, TimeDomain::EventTime, 20).unwrap() {
        assert_eq!(t.domain, TimeDomain::EventTime);
        assert!(t.timestamp <= 20);
        if let Some(&(last, _, _)) = fired.last() {
            assert!(last <= t.timestamp, "timestamp order: {last} then {t:?}");
        }
        b.set_current_key(t.key).unwrap();
        let n = b.value(&count).get().unwrap().unwrap_or(0);
        b.value(&count).update(n + 1).unwrap();
        if t.namespace == 0 && t.key % 3 >= 1 {
            b.timers(&h)
                .delete_event_time_timer(&1, t.timestamp)
                .unwrap();
        }
        if t.namespace < 100 {
            // Due now: fires in this loop; later than the time: does not.
            b.timers(&h)
                .register_event_time_timer(&(t.namespace + 100), t.timestamp)
                .unwrap();
            b.timers(&h)
                .register_event_time_timer(&(t.namespace + 200), 21)
                .unwrap();
        }
        fired.push((t.timestamp, t.key, t.namespace));
        if fired.len() == expected.len() / 2 {
            // Half way: a snapshot holds exactly what is left.
            let bytes = snapshot_bytes(&mut b);
            let mut r = f.create::<u64>(BackendConfig::full(128)).unwrap();
            let hr = r
                .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
                .unwrap();
            restore_from(&mut r, &[&bytes]).unwrap();
            let mut rest = Vec::new();
            while let Some(t) = r.next_due_timer(&hr, TimeDomain::EventTime, 20).unwrap() {
                if t.namespace == 0 && t.key % 3 >= 1 {
                    r.set_current_key(t.key).unwrap();
                    r.timers(&hr)
                        .delete_event_time_timer(&1, t.timestamp)
                        .unwrap();
                }
                rest.push((t.timestamp, t.key, t.namespace));
            }
            restored_rest = Some(rest);
        }
    }
    let (original, follow_ups): (Vec<_>, Vec<_>) = fired.iter().partition(|t| t.2 < 100);
    let mut original: Vec<_> = original.into_iter().copied().collect();
    original.sort();
    assert_eq!(original, expected, "the same timers as advance_time");
    let mut follow_ups: Vec<_> = follow_ups.into_iter().copied().collect();
    follow_ups.sort();
    let mut want: Vec<_> = expected
        .iter()
        .map(|&(ts, k, ns)| (ts, k, ns + 100))
        .collect();
    want.sort();
    assert_eq!(
        follow_ups, want,
        "timers registered due fire in the same loop"
    );
    let mut rest = restored_rest.expect("the loop passed its middle");
    rest.sort();
    let mut left: Vec<_> = fired[expected.len() / 2..].to_vec();
    // What the snapshot held: the originals not fired yet and the follow-ups registered so far.
    left.retain(|t| t.2 < 100 || fired[..expected.len() / 2].contains(&(t.0, t.1, t.2 - 100)));
    left.sort();
    assert_eq!(
        rest, left,
        "a snapshot in the loop holds what has not fired"
    );
    b.set_current_key(0).unwrap();
    assert_eq!(
        b.value(&count).get().unwrap(),
        Some(2),
        "state used in the loop"
    );
    assert!(b
        .next_due_timer(&h, TimeDomain::EventTime, 20)
        .unwrap()
        .is_none());
    let later = b.advance_watermark(&h, 21).unwrap();
    assert_eq!(
        later.iter().filter(|t| t.namespace >= 200).count(),
        expected.len(),
        "one timer at 21 per timer fired at or before 20"
    );
    assert!(later.iter().all(|t| t.timestamp == 21));
    let mut p = 0;
    while let Some(t) = b.next_due_timer(&h, TimeDomain::ProcessingTime, 2).unwrap() {
        assert!(t.timestamp <= 2 && t.domain == TimeDomain::ProcessingTime);
        p += 1;
    }
    assert_eq!(p, (0..3000u64).filter(|k| k % 5 <= 2).count());
}

/// A tumbling-window sum built on reducing state and event-time timers, checked against a plain
/// computation over the same events.
pub fn tumbling_window_example<F: BackendFactory>(f: &F) {
    const SIZE: i64 = 100;
    let events: Vec<(u64, i64, u64)> = (0..3000u64)
        .map(|i| (i * 7 % 13, (i * 3) as i64, i % 10))
        .collect();
    let mut expected = BTreeMap::<(u64, i64), u64>::new();
    for &(k, ts, v) in &events {
        *expected.entry((k, ts - ts % SIZE)).or_default() += v;
    }
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let sum = b
        .register_reducing(ReducingStateDescriptor::<u64, i64>::new("sum", |a, b| a + b).unwrap())
        .unwrap();
    let timers = b
        .register_timer_service(TimerServiceDescriptor::<i64>::new("windows").unwrap())
        .unwrap();
    let mut results = BTreeMap::new();
    let fire = |b: &mut F::Backend<u64>, wm: i64, results: &mut BTreeMap<(u64, i64), u64>| {
        for t in b.advance_watermark(&timers, wm).unwrap() {
            b.set_current_key(t.key).unwrap();
            let v = b.reducing_in(&sum, &t.namespace).get().unwrap().unwrap();
            b.reducing_in(&sum, &t.namespace).clear().unwrap();
            assert!(
                results.insert((t.key, t.namespace), v).is_none(),
                "a window fired twice"
            );
        }
    };
    for (i, &(k, ts, v)) in events.iter().enumerate() {
        b.set_current_key(k).unwrap();
        let window = ts - ts % SIZE;
        b.reducing_in(&sum, &window).add(v).unwrap();
        b.timers(&timers)
            .register_event_time_timer(&window, window + SIZE - 1)
            .unwrap();
        if i % 50 == 0 {
            fire(&mut b, ts - 1, &mut results);
        }
    }
    fire(&mut b, i64::MAX, &mut results);
    assert_eq!(results, expected);
}

/// Session windows (gap-based) built on value and reducing state and event-time timers that
/// are moved as sessions grow, checked against a plain computation.
pub fn session_window_example<F: BackendFactory>(f: &F) {
    const GAP: i64 = 100;
    let events: Vec<(u64, i64)> = (0..2000u64)
        .map(|i| (i * 5 % 11, (i * 7 + (i / 37) * 60) as i64))
        .collect();
    // Plain computation: per key, consecutive events closer than GAP share a session.
    let mut by_key = BTreeMap::<u64, Vec<i64>>::new();
    for &(k, ts) in &events {
        by_key.entry(k).or_default().push(ts);
    }
    let mut expected = BTreeMap::<(u64, i64), (i64, u64)>::new();
    for (k, tss) in by_key {
        let (mut start, mut end, mut n) = (tss[0], tss[0], 0u64);
        for ts in tss {
            if ts - end >= GAP {
                expected.insert((k, start), (end, n));
                start = ts;
                n = 0;
            }
            end = ts;
            n += 1;
        }
        expected.insert((k, start), (end, n));
    }
    let mut b = f.create::<u64>(BackendConfig::full(128)).unwrap();
    let session = b
        .register_value(ValueStateDescriptor::<(i64, i64)>::new("session").unwrap())
        .unwrap();
    let count = b
        .register_reducing(ReducingStateDescriptor::<u64, i64>::new("count", |a, b| a + b).unwrap())
        .unwrap();
    let timers = b
        .register_timer_service(TimerServiceDescriptor::<i64>::new("sessions").unwrap())
        .unwrap();
    let mut results = BTreeMap::new();
    let fire =
        |b: &mut F::Backend<u64>, wm: i64, results: &mut BTreeMap<(u64, i64), (i64, u64)>| {
            for t in b.advance_watermark(&timers, wm).unwrap() {
                b.set_current_key(t.key).unwrap();
                let (start, end) = b.value(&session).get().unwrap().unwrap();
                assert_eq!(
                    (start, end + GAP),
                    (t.namespace, t.timestamp),
                    "a stale timer fired"
                );
                let n = b.reducing_in(&count, &start).get().unwrap().unwrap();
                b.reducing_in(&count, &start).clear().unwrap();
                b.value(&session).clear().unwrap();
                assert!(results.insert((t.key, start), (end, n)).is_none());
            }
        };
    for &(k, ts) in &events {
        // The watermark (ts - 1) passes before the element: due sessions close first.
        fire(&mut b, ts - 1, &mut results);
        b.set_current_key(k).unwrap();
        let (start, end) = match b.value(&session).get().unwrap() {
            Some((start, end)) if ts - end < GAP => {
                b.timers(&timers)
                    .delete_event_time_timer(&start, end + GAP)
                    .unwrap();
                (start, ts)
            }
            _ => (ts, ts),
        };
        b.value(&session).update((start, end)).unwrap();
        b.reducing_in(&count, &start).add(1).unwrap();
        b.timers(&timers)
            .register_event_time_timer(&start, end + GAP)
            .unwrap();
    }
    fire(&mut b, i64::MAX, &mut results);
    assert!(
        expected.len() < events.len() / 2,
        "sessions do grow in this data: {} sessions for {} events",
        expected.len(),
        events.len()
    );
    assert_eq!(results, expected);
}

/// Expands to one `#[test]` per timer conformance case for the factory expression given.
#[macro_export]
macro_rules! timer_conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            timers_order_dedup_delete,
            timers_fire_one_at_a_time,
            timers_snapshot_restore_and_rescale,
            tumbling_window_example,
            session_window_example
        );
    };
}

/// Expands to one `#[test]` per conformance case for the factory expression given.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            value_state_semantics,
            bound_value_state_semantics,
            list_state_semantics,
            map_state_semantics,
            reducing_and_aggregating_semantics,
            merging_namespaces,
            registration_errors,
            snapshot_restore_round_trip,
            rescale_one_to_two_and_back,
            snapshot_is_isolated_from_later_writes,
            ttl_semantics,
            ttl_enabled_by_re_registration_keeps_values,
            ttl_disabled_by_re_registration_keeps_values,
            ttl_cleanup_on_snapshot_and_incrementally,
            schema_evolution,
            schema_names,
            namespace_serializer_migration,
            corrupt_snapshots_are_errors,
            operator_state_round_trip,
            unregistered_restored_state_survives_snapshots,
            model_based_property_test
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::testing::$case(&$factory);
            }
        )*
    };
}

/// A `tracing` subscriber that keeps every event, from every thread, as one line
/// `message field=value ...`: for tests of what a crate reports (install it with
/// `tracing::subscriber::set_global_default(log.clone())`).
#[derive(Clone, Default)]
pub struct EventLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

struct EventLine(String);

impl tracing::field::Visit for EventLine {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl tracing::Subscriber for EventLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = EventLine(String::new());
        event.record(&mut line);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl EventLog {
    /// Every event so far, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first event whose message starts with `message` and that holds every one of
    /// `fields` (e.g. `"checkpoint_id=2"`); panics listing all events when there is none.
    pub fn find(&self, message: &str, fields: &[&str]) -> String {
        let lines = self.lines();
        lines
            .iter()
            .find(|l| l.starts_with(message) && fields.iter().all(|f| l.contains(f)))
            .cloned()
            .unwrap_or_else(|| panic!("no event '{message}' with {fields:?} in {lines:#?}"))
    }
}

/// The number recorded as `field` in an [`EventLog`] line; panics when there is none.
pub fn event_number(line: &str, field: &str) -> u64 {
    line.find(&format!(" {field}="))
        .and_then(|at| {
            line[at + field.len() + 2..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no number {field}= in {line}"))
}
