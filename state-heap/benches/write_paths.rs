//! Flink's list and map write workloads on the heap backend (flink-benchmarks'
//! `ListStateBenchmark` / `MapStateBenchmark`: 500,000 keys, 10 map entries per key,
//! `add_all` of 100 elements), next to the floor of the key-group design for the same data: XXH3
//! of the key bytes, one of 128 per-key-group tables holding a `Vec<u64>` per key for lists and a
//! `hashbrown::HashMap<u64, u64>` per key for maps, no backend API around it.
//!
//! State is set up as `benches/peer-bench` sets it up (each key: a value, a one-element list and
//! a 10-entry map, all in one backend); each workload then runs once over a shuffled key order,
//! median of 3 fresh setups. `cargo bench -p state-heap --bench write_paths` (env
//! `FLOWSTATE_BENCH_KEYS`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use state_api::*;
use state_heap::HeapKeyedStateBackend;

const MAP_ENTRIES: u64 = 10;
const ADD_ALL: u64 = 100;

fn keys() -> u64 {
    std::env::var("FLOWSTATE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000)
}

const WORKLOADS: [&str; 4] = ["list add", "list append", "list add_all(100)", "map put"];

/// (ops per wall second, per CPU second) of each workload on the heap backend, in `WORKLOADS`
/// order.
fn heap_round(n: u64, order: &[u64]) -> Vec<(f64, f64)> {
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .build()
        .unwrap();
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("value").unwrap())
        .unwrap();
    let l = b
        .register_list(ListStateDescriptor::<u64>::new("list").unwrap())
        .unwrap();
    let m = b
        .register_map(MapStateDescriptor::<u64, u64>::new("map").unwrap())
        .unwrap();
    for k in 0..n {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k).unwrap();
        b.list(&l).add(k).unwrap();
        b.map(&m)
            .put_all((0..MAP_ENTRIES).map(|i| (i, k + i)).collect())
            .unwrap();
    }
    let few = order.len() / 10;
    let batch: Vec<u64> = (0..ADD_ALL).collect();
    let mut out = Vec::new();
    let t = Timer::start();
    for &k in order {
        b.set_current_key(k + n).unwrap();
        b.list(&l).add(k).unwrap();
    }
    out.push(t.rates(order.len()));
    let t = Timer::start();
    for &k in order {
        b.set_current_key(k).unwrap();
        b.list(&l).add(k).unwrap();
    }
    out.push(t.rates(order.len()));
    let t = Timer::start();
    for &k in &order[..few] {
        b.set_current_key(k + 2 * n).unwrap();
        b.list(&l).add_all(batch.clone()).unwrap();
    }
    out.push(t.rates(few));
    let t = Timer::start();
    for &k in order {
        b.set_current_key(k).unwrap();
        b.map(&m).put(k % MAP_ENTRIES, k).unwrap();
    }
    out.push(t.rates(order.len()));
    black_box(b);
    out
}

/// Nanoseconds this thread has spent on a CPU (`/proc/thread-self/schedstat`, Linux): rates per
/// CPU second are what load on a shared machine disturbs least.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// A started measurement: wall clock and thread CPU time.
struct Timer(Instant, u64);

impl Timer {
    fn start() -> Self {
        Timer(Instant::now(), cpu_ns())
    }

    /// (ops per wall second, ops per CPU second) for `ops` operations.
    fn rates(&self, ops: usize) -> (f64, f64) {
        let wall = self.0.elapsed().as_secs_f64();
        let cpu = (cpu_ns().saturating_sub(self.1)) as f64 / 1e9;
        (ops as f64 / wall, ops as f64 / cpu.max(1e-9))
    }
}

fn floor_hash(k: u64) -> u64 {
    stable_key_hash(&k.to_be_bytes())
}

/// 128 key-group tables of `(key, payload)`.
struct Floor<P> {
    parts: Vec<hashbrown::HashTable<(u64, P)>>,
}

impl<P> Floor<P> {
    fn new() -> Self {
        Floor {
            parts: (0..128).map(|_| hashbrown::HashTable::new()).collect(),
        }
    }

    fn entry(&mut self, k: u64, new: impl FnOnce() -> P) -> &mut P {
        let h = floor_hash(k);
        let t = &mut self.parts[((h >> 32) & 127) as usize];
        let e = t.entry(h, |e| e.0 == k, |e| floor_hash(e.0));
        &mut e.or_insert_with(|| (k, new())).into_mut().1
    }
}

/// (ops per wall second, per CPU second) of each workload on the floor, in `WORKLOADS` order.
fn floor_round(n: u64, order: &[u64]) -> Vec<(f64, f64)> {
    let mut values: Floor<u64> = Floor::new();
    let mut lists: Floor<Vec<u64>> = Floor::new();
    let mut maps: Floor<hashbrown::HashMap<u64, u64>> = Floor::new();
    for k in 0..n {
        *values.entry(k, || 0) = k;
        lists.entry(k, Vec::new).push(k);
        maps.entry(k, hashbrown::HashMap::new)
            .extend((0..MAP_ENTRIES).map(|i| (i, k + i)));
    }
    let few = order.len() / 10;
    let batch: Vec<u64> = (0..ADD_ALL).collect();
    let mut out = Vec::new();
    let t = Timer::start();
    for &k in order {
        lists.entry(k + n, Vec::new).push(k);
    }
    out.push(t.rates(order.len()));
    let t = Timer::start();
    for &k in order {
        lists.entry(k, Vec::new).push(k);
    }
    out.push(t.rates(order.len()));
    let t = Timer::start();
    for &k in &order[..few] {
        lists
            .entry(k + 2 * n, Vec::new)
            .extend_from_slice(&batch.clone());
    }
    out.push(t.rates(few));
    let t = Timer::start();
    for &k in order {
        maps.entry(k, hashbrown::HashMap::new)
            .insert(k % MAP_ENTRIES, k);
    }
    out.push(t.rates(order.len()));
    black_box((values, lists, maps));
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = keys();
    let order = common::key_order(n);
    let mut heap: Vec<Vec<(f64, f64)>> = vec![Vec::new(); WORKLOADS.len()];
    let mut floor: Vec<Vec<(f64, f64)>> = vec![Vec::new(); WORKLOADS.len()];
    for _ in 0..3 {
        for (i, r) in heap_round(n, &order).into_iter().enumerate() {
            heap[i].push(r);
        }
        for (i, r) in floor_round(n, &order).into_iter().enumerate() {
            floor[i].push(r);
        }
    }
    println!("List and map writes, {n} keys (median of 3 setups, same process)");
    println!(
        "{:<18} {:>12} {:>16} {:>8} {:>14} {:>14} {:>8}",
        "workload", "heap ops/s", "floor ops/s", "ratio", "heap /CPU s", "floor /CPU s", "ratio"
    );
    for (i, name) in WORKLOADS.iter().enumerate() {
        let hw = median(heap[i].iter().map(|r| r.0).collect());
        let fw = median(floor[i].iter().map(|r| r.0).collect());
        let hc = median(heap[i].iter().map(|r| r.1).collect());
        let fc = median(floor[i].iter().map(|r| r.1).collect());
        println!(
            "{name:<18} {:>11.2}M {:>15.2}M {:>7.2}x {:>13.2}M {:>13.2}M {:>7.2}x",
            hw / 1e6,
            fw / 1e6,
            hw / fw,
            hc / 1e6,
            fc / 1e6,
            hc / fc
        );
    }
    println!(
        "floor: XXH3 of the key bytes + one of 128 key-group tables of Vec<u64> lists and \
         HashMap<u64, u64> maps, no backend API; /CPU s: operations per second of this thread's \
         CPU time"
    );
}
