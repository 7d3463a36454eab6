//! Flink's ValueState benchmark on the heap backend, next to a plain `hashbrown::HashMap`.
//!
//! 500,000 u64 keys are pre-filled; then `get`, `update` and `add` (a key never seen before)
//! run over a shuffled key order. Each heap operation includes `set_current_key` (serializing
//! the key, hashing it into its key group) exactly as Flink's benchmark calls `setCurrentKey`.
//! Criterion prints its statistics per case; a summary at the end prints ops/s of both sides
//! measured in the same process and the ratio heap / hashbrown, next to the floor of the
//! key-group design (stable hash + per-key-group table, no backend API).

#[path = "common/mod.rs"]
mod common;
#[path = "common/value.rs"]
mod value;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use value::{heap_get, heap_setup, heap_update, Floor};

const SETUP_KEYS: u64 = 500_000;
const BATCH: u64 = 10_000;

/// A shuffled order of the setup keys.
fn key_order() -> Vec<u64> {
    common::key_order(SETUP_KEYS)
}

fn map_setup() -> hashbrown::HashMap<u64, u64> {
    (0..SETUP_KEYS).map(|k| (k, k)).collect()
}

fn map_get(m: &hashbrown::HashMap<u64, u64>, keys: &[u64]) -> u64 {
    keys.iter().map(|k| m.get(k).copied().unwrap_or(0)).sum()
}

fn map_update(m: &mut hashbrown::HashMap<u64, u64>, keys: &[u64]) {
    for &k in keys {
        m.insert(k, k + 1);
    }
}

fn bench(c: &mut Criterion) {
    let order = key_order();
    let (mut b, h) = heap_setup(SETUP_KEYS);
    let mut m = map_setup();
    let mut g = c.benchmark_group("value_state_500k");
    g.throughput(Throughput::Elements(BATCH));
    g.measurement_time(Duration::from_secs(3));
    let mut at = 0usize;
    let mut next_batch = move || {
        at = (at + BATCH as usize) % (order.len() - BATCH as usize);
        order[at..at + BATCH as usize].to_vec()
    };
    g.bench_function("heap/get", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| black_box(heap_get(&mut b, &h, &keys)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hashbrown/get", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| black_box(map_get(&m, &keys)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("heap/update", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| heap_update(&mut b, &h, &keys),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hashbrown/update", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| map_update(&mut m, &keys),
            BatchSize::SmallInput,
        )
    });
    let mut new_key = SETUP_KEYS;
    let mut new_batch = move || {
        let keys: Vec<u64> = (new_key..new_key + BATCH).collect();
        new_key += BATCH;
        keys
    };
    g.bench_function("heap/add", |bn| {
        bn.iter_batched(
            &mut new_batch,
            |keys| heap_update(&mut b, &h, &keys),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hashbrown/add", |bn| {
        bn.iter_batched(
            &mut new_batch,
            |keys| map_update(&mut m, &keys),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Median ops/s of `runs` timed passes of `op` over `n` operations.
fn ops_per_sec(runs: usize, n: usize, mut op: impl FnMut()) -> f64 {
    let mut rates: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            op();
            n as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[runs / 2]
}

/// The same three workloads, timed side by side, with ratios.
fn summary() {
    let order = key_order();
    let n = order.len();
    let (mut b, h) = heap_setup(SETUP_KEYS);
    let mut m = map_setup();
    let heap_get_rate = ops_per_sec(5, n, || {
        black_box(heap_get(&mut b, &h, &order));
    });
    let map_get_rate = ops_per_sec(5, n, || {
        black_box(map_get(&m, &order));
    });
    let heap_upd_rate = ops_per_sec(5, n, || heap_update(&mut b, &h, &order));
    let map_upd_rate = ops_per_sec(5, n, || map_update(&mut m, &order));
    let mut floor = Floor::new(SETUP_KEYS);
    let floor_get_rate = ops_per_sec(5, n, || {
        black_box(floor.get(&order));
    });
    let floor_upd_rate = ops_per_sec(5, n, || floor.update(&order));
    // Add: a fresh pre-filled structure per run, then 500,000 keys it has never seen.
    let new_keys: Vec<u64> = order.iter().map(|k| k + SETUP_KEYS).collect();
    let mut heap_add = Vec::new();
    let mut map_add = Vec::new();
    for _ in 0..3 {
        let (mut b, h) = heap_setup(SETUP_KEYS);
        let t = Instant::now();
        heap_update(&mut b, &h, &new_keys);
        heap_add.push(n as f64 / t.elapsed().as_secs_f64());
        let mut m = map_setup();
        let t = Instant::now();
        map_update(&mut m, &new_keys);
        map_add.push(n as f64 / t.elapsed().as_secs_f64());
    }
    heap_add.sort_by(f64::total_cmp);
    map_add.sort_by(f64::total_cmp);
    println!();
    println!("ValueState, 500,000 keys (median ops/s, same process)");
    println!(
        "{:<10} {:>14} {:>14} {:>8} {:>16} {:>8}",
        "workload", "heap backend", "hashbrown", "ratio", "floor (no API)", "ratio"
    );
    for (name, heap, map, floor) in [
        ("get", heap_get_rate, map_get_rate, Some(floor_get_rate)),
        ("update", heap_upd_rate, map_upd_rate, Some(floor_upd_rate)),
        ("add", heap_add[1], map_add[1], None),
    ] {
        let floor = floor.map_or_else(
            || format!("{:>16} {:>8}", "-", "-"),
            |f| format!("{:>15.2}M {:>7.2}x", f / 1e6, f / map),
        );
        println!(
            "{name:<10} {:>12.2}M {:>12.2}M {:>7.2}x {floor}",
            heap / 1e6,
            map / 1e6,
            heap / map
        );
    }
    println!(
        "floor: XXH3 of the key bytes + lookup in one of 128 key-group tables, i.e. what the \
         key-group design costs before any backend API"
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
