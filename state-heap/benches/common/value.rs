//! What the ValueState bench (`benches/value_state.rs`) and the `value_ops` example share: the
//! heap backend's get and update loops, and the floor of the key-group design they are
//! compared with.

use state_api::{
    BoundValueState, FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt,
    ValueStateDescriptor, ValueStateHandle,
};
use state_heap::HeapKeyedStateBackend;

/// The heap backend with `u64` keys.
pub type Heap = HeapKeyedStateBackend<u64>;
/// Its value state handle.
pub type Handle = ValueStateHandle<u64, ()>;

/// A heap backend holding value `k` for each key `k` of `0..keys` (keys as 8 big-endian bytes,
/// as Flink's LongSerializer writes them).
pub fn heap_setup(keys: u64) -> (Heap, Handle) {
    let mut b = Heap::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .build()
        .expect("backend");
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("value").expect("descriptor"))
        .expect("register");
    for k in 0..keys {
        b.set_current_key(k).expect("key");
        b.value(&h).update(k).expect("update");
    }
    (b, h)
}

/// The heap get loop: set the current key, read the value.
#[inline(never)]
pub fn heap_get(b: &mut Heap, h: &Handle, keys: &[u64]) -> u64 {
    let mut sum = 0;
    for &k in keys {
        b.set_current_key(k).expect("key");
        sum += b.value(h).get().expect("get").unwrap_or(0);
    }
    sum
}

/// The heap update loop: set the current key, write `k + 1`.
#[inline(never)]
pub fn heap_update(b: &mut Heap, h: &Handle, keys: &[u64]) {
    for &k in keys {
        b.set_current_key(k).expect("key");
        b.value(h).update(k + 1).expect("update");
    }
}

/// The heap get loop through a bound value state (the state found once, as a Flink
/// `ValueState` object holds its table).
#[inline(never)]
pub fn bound_get(b: &mut Heap, h: &Handle, keys: &[u64]) -> u64 {
    let mut state = b.bind_value(h, ()).expect("bind");
    let mut sum = 0;
    for &k in keys {
        state.set_current_key(k).expect("key");
        sum += state.get().expect("get").unwrap_or(0);
    }
    sum
}

/// The heap update loop through a bound value state.
#[inline(never)]
pub fn bound_update(b: &mut Heap, h: &Handle, keys: &[u64]) {
    let mut state = b.bind_value(h, ()).expect("bind");
    for &k in keys {
        state.set_current_key(k).expect("key");
        state.update(k + 1).expect("update");
    }
}

/// The stable key hash of the floor (XXH3 of the 8 big-endian key bytes, as key groups need).
pub fn floor_hash(k: u64) -> u64 {
    state_api::stable_key_hash(&k.to_be_bytes())
}

/// The floor of the design, without a backend around it: the stable key hash and a lookup in
/// one of 128 per-key-group tables.
pub struct Floor(Vec<hashbrown::HashTable<(u64, u64)>>);

impl Floor {
    /// Value `k` for each key `k` of `0..keys`.
    pub fn new(keys: u64) -> Self {
        let mut parts: Vec<hashbrown::HashTable<(u64, u64)>> =
            (0..128).map(|_| hashbrown::HashTable::new()).collect();
        for k in 0..keys {
            let h = floor_hash(k);
            parts[((h >> 32) & 127) as usize].insert_unique(h, (k, k), |e| floor_hash(e.0));
        }
        Floor(parts)
    }

    /// The floor's get loop.
    #[inline(never)]
    pub fn get(&self, keys: &[u64]) -> u64 {
        keys.iter()
            .map(|&k| {
                let h = floor_hash(k);
                self.0[((h >> 32) & 127) as usize]
                    .find(h, |e| e.0 == k)
                    .map_or(0, |e| e.1)
            })
            .sum()
    }

    /// The floor's update loop.
    #[inline(never)]
    pub fn update(&mut self, keys: &[u64]) {
        for &k in keys {
            let h = floor_hash(k);
            let t = &mut self.0[((h >> 32) & 127) as usize];
            match t.find_mut(h, |e| e.0 == k) {
                Some(e) => e.1 = k + 1,
                None => {
                    t.insert_unique(h, (k, k + 1), |e| floor_hash(e.0));
                }
            }
        }
    }
}
