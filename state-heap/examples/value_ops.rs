//! One ValueState workload of `benches/value_state.rs` per process, for counting what a record
//! costs: `valgrind --tool=cachegrind --cache-sim=no` (instructions, machine-independent) or
//! `perf stat` on one workload, minus the same run with `none` (the setup alone). The bench's
//! summary times the workloads one after the other in one process, which a loaded machine
//! disturbs; this prints ops/s per wall second and per second of the thread's CPU time.
//!
//! `cargo run --profile bench -p state-heap --example value_ops -- <workload> [passes]`, workload
//! one of `none`, `heap-get`, `heap-update`, `heap-add`, `bound-get`, `bound-update` (through a bound value state),
//! `floor-get`, `floor-update`; a pass is
//! 500,000 operations over the shuffled key order (`heap-add`: keys never seen before).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "../benches/common/value.rs"]
mod value;

use std::hint::black_box;
use std::time::Instant;

use value::{bound_get, bound_update, heap_get, heap_setup, heap_update, Floor};

const KEYS: u64 = 500_000;

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
    // Both are set up whatever the workload, so that `none` is the baseline of every one.
    let (mut b, h) = heap_setup(KEYS);
    let mut floor = Floor::new(KEYS);
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
            "bound-get" => sum += bound_get(&mut b, &h, &order),
            "bound-update" => bound_update(&mut b, &h, &order),
            "floor-get" => sum += floor.get(&order),
            "floor-update" => floor.update(&order),
            other => {
                eprintln!("unknown workload {other}: none, heap-get, heap-update, heap-add, bound-get, bound-update, floor-get or floor-update");
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
