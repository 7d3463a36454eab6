//! Flink's ValueState benchmark on the heap backend, next to a plain `hashbrown::HashMap`.
//!
//! 500,000 u64 keys are pre-filled; then `get`, `update` and `add` (a key never seen before)
//! run over a shuffled key order. Each heap operation includes `set_current_key` (serializing
//! the key, hashing it into its key group) exactly as Flink's benchmark calls `setCurrentKey`.
//! Criterion prints its statistics per case; a summary at the end prints ops/s of both sides
//! measured in the same process and the ratio heap / hashbrown, next to the floor of the
//! key-group design (stable hash + per-key-group table, no backend API) and the heap's share
//! of it. `get` and `update` run twice on the heap: through `backend.value(&handle)` (the state
//! found by its handle on every access) and through a state bound once with `bind_value` (as a
//! Flink `ValueState` object holds its table). The summary's workloads take turns, round after
//! round, so that a change in the machine's load moves all of them alike.

#[path = "common/mod.rs"]
mod common;
#[path = "common/value.rs"]
mod value;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use value::{bound_get, bound_update, heap_get, heap_setup, heap_update, Floor};

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
    g.bench_function("heap/bound_get", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| black_box(bound_get(&mut b, &h, &keys)),
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
    g.bench_function("heap/bound_update", |bn| {
        bn.iter_batched(
            &mut next_batch,
            |keys| bound_update(&mut b, &h, &keys),
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

/// Ops/s of one timed pass of `op` over `n` operations.
fn rate(n: usize, op: impl FnOnce()) -> f64 {
    let t = Instant::now();
    op();
    n as f64 / t.elapsed().as_secs_f64()
}

/// The median of `rates`.
fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Rounds of the summary: each runs every workload once.
const ROUNDS: usize = 9;

/// The same workloads, timed in turns, with ratios.
fn summary() {
    let order = key_order();
    let n = order.len();
    let (mut b, h) = heap_setup(SETUP_KEYS);
    let mut m = map_setup();
    let mut floor = Floor::new(SETUP_KEYS);
    // Add: 500,000 keys never seen before, into a fresh pre-filled structure each round.
    let new_keys: Vec<u64> = order.iter().map(|k| k + SETUP_KEYS).collect();
    let mut r: [Vec<f64>; 10] = Default::default();
    for _ in 0..ROUNDS {
        r[0].push(rate(n, || {
            black_box(heap_get(&mut b, &h, &order));
        }));
        r[1].push(rate(n, || {
            black_box(bound_get(&mut b, &h, &order));
        }));
        r[2].push(rate(n, || {
            black_box(map_get(&m, &order));
        }));
        r[3].push(rate(n, || {
            black_box(floor.get(&order));
        }));
        r[4].push(rate(n, || heap_update(&mut b, &h, &order)));
        r[5].push(rate(n, || bound_update(&mut b, &h, &order)));
        r[6].push(rate(n, || map_update(&mut m, &order)));
        r[7].push(rate(n, || floor.update(&order)));
        let (mut fresh, fh) = heap_setup(SETUP_KEYS);
        r[8].push(rate(n, || heap_update(&mut fresh, &fh, &new_keys)));
        let mut fresh_map = map_setup();
        r[9].push(rate(n, || map_update(&mut fresh_map, &new_keys)));
    }
    let [heap_g, bound_g, map_g, floor_g, heap_u, bound_u, map_u, floor_u, heap_a, map_a] =
        r.map(median);
    println!();
    println!(
        "ValueState, 500,000 keys (median ops/s of {ROUNDS} rounds, workloads in turns, same process)"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>8} {:>16} {:>10}",
        "workload", "heap backend", "hashbrown", "ratio", "floor (no API)", "of floor"
    );
    for (name, heap, map, floor) in [
        ("get", heap_g, map_g, Some(floor_g)),
        ("get (bound)", bound_g, map_g, Some(floor_g)),
        ("update", heap_u, map_u, Some(floor_u)),
        ("update (bound)", bound_u, map_u, Some(floor_u)),
        ("add", heap_a, map_a, None),
    ] {
        let floor = floor.map_or_else(
            || format!("{:>16} {:>10}", "-", "-"),
            |f| format!("{:>15.2}M {:>9.2}x", f / 1e6, heap / f),
        );
        println!(
            "{name:<16} {:>12.2}M {:>12.2}M {:>7.2}x {floor}",
            heap / 1e6,
            map / 1e6,
            heap / map
        );
    }
    println!(
        "floor: XXH3 of the key bytes + lookup in one of 128 key-group tables, i.e. what the \
         key-group design costs before any backend API; (bound): through `bind_value`"
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
