//! One ValueState workload of `benches/value_state.rs` per process, for counting what a record
//! costs: `valgrind --tool=cachegrind --cache-sim=no` (instructions, machine-independent) or
//! `perf stat` on one workload, minus the same run with `none` (the setup alone). The bench's
//! summary times the workloads one after the other in one process, which a loaded machine
//! disturbs; this prints ops/s per wall second and per second of the thread's CPU time.
//!
//! `cargo run --profile bench -p state-heap --example value_ops -- <workload> [passes]`, workload
//! one of `none`, `heap-get`, `heap-update`, `heap-add`, `floor-get`, `floor-update`; a pass is
//! 500,000 operations over the shuffled key order (`heap-add`: keys never seen before).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor,
    ValueStateHandle,
};
use state_heap::HeapKeyedStateBackend;

const KEYS: u64 = 500_000;

type Heap = HeapKeyedStateBackend<u64>;
type Handle = ValueStateHandle<u64, ()>;

/// The stable key hash of the floor (XXH3 of the 8 big-endian key bytes).
fn floor_hash(k: u64) -> u64 {
    state_api::stable_key_hash(&k.to_be_bytes())
}

/// The bench's heap get loop: set the current key, read the value.
#[inline(never)]
fn heap_get(b: &mut Heap, h: &Handle, keys: &[u64]) -> u64 {
    let mut sum = 0;
    for &k in keys {
        b.set_current_key(k).expect("key");
        sum += b.value(h).get().expect("get").unwrap_or(0);
    }
    sum
}

/// The bench's heap update loop.
#[inline(never)]
fn heap_update(b: &mut Heap, h: &Handle, keys: &[u64]) {
    for &k in keys {
        b.set_current_key(k).expect("key");
        b.value(h).update(k + 1).expect("update");
    }
}

/// The bench's floor: 128 key-group tables, no API.
struct Floor(Vec<hashbrown::HashTable<(u64, u64)>>);

impl Floor {
    #[inline(never)]
    fn get(&self, keys: &[u64]) -> u64 {
        keys.iter()
            .map(|&k| {
                let h = floor_hash(k);
                self.0[((h >> 32) & 127) as usize]
                    .find(h, |e| e.0 == k)
                    .map_or(0, |e| e.1)
            })
            .sum()
    }

    #[inline(never)]
    fn update(&mut self, keys: &[u64]) {
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

/// Nanoseconds this thread has spent on a CPU (Linux; 0 elsewhere).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "heap-get".into());
    let passes: u64 = args.next().map_or(4, |p| p.parse().expect("passes"));
    let order = common::key_order(KEYS);
    let mut b = Heap::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .build()
        .expect("backend");
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("value").expect("descriptor"))
        .expect("register");
    let mut floor = Floor((0..128).map(|_| hashbrown::HashTable::new()).collect());
    // Both are set up whatever the workload, so that `none` is the baseline of every one.
    for k in 0..KEYS {
        b.set_current_key(k).expect("key");
        b.value(&h).update(k).expect("update");
        let h = floor_hash(k);
        floor.0[((h >> 32) & 127) as usize].insert_unique(h, (k, k), |e| floor_hash(e.0));
    }
    let (wall, cpu) = (Instant::now(), cpu_ns());
    let mut sum = 0;
    for pass in 0..passes {
        match workload.as_str() {
            "none" => {}
            "heap-get" => sum += heap_get(&mut b, &h, &order),
            "heap-update" => heap_update(&mut b, &h, &order),
            "heap-add" => {
                let fresh: Vec<u64> = order.iter().map(|k| k + KEYS * (pass + 1)).collect();
                heap_update(&mut b, &h, &fresh);
            }
            "floor-get" => sum += floor.get(&order),
            "floor-update" => floor.update(&order),
            other => {
                eprintln!("unknown workload {other}: none, heap-get, heap-update, heap-add, floor-get or floor-update");
                std::process::exit(2);
            }
        }
    }
    black_box(sum);
    let ops = (passes * KEYS) as f64;
    let wall = wall.elapsed().as_secs_f64();
    let cpu = (cpu_ns() - cpu) as f64 / 1e9;
    println!(
        "{workload}: {:.2}M ops/s wall, {:.2}M ops/s of CPU time ({passes} x {KEYS})",
        ops / wall / 1e6,
        ops / cpu / 1e6
    );
}
