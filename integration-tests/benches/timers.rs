//! Timer benchmark on both backends: register 1,000,000 event-time timers over 100,000 keys,
//! then fire them all by advancing the watermark in 1,000 steps (Flink's
//! ProcessingTimerBenchmark uses 150,000 timers). Prints ops/s; asserts only that every timer
//! fires once. Firing is measured twice: collected per step (`advance_watermark`) and one timer
//! at a time (`next_due_timer`).
//!
//! Then, per backend in a child process of its own (so one backend's freed memory does not hide
//! the other's), the anonymous resident memory (`RssAnon`, Linux) the registration of the 1M
//! timers added: the heap backend holds every timer in memory, the mmap backend only its write
//! buffers (bounded by its memory budget) and 32 bytes per key group; its timers are in files.

use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, TimeDomain,
    TimerServiceDescriptor,
};
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

const KEYS: u64 = 100_000;
const TIMERS: u64 = 1_000_000;
/// Set in the child processes that measure memory: `heap` or `mmap:<budget MiB>`.
const MEMORY_CHILD: &str = "FLOWSTATE_TIMER_BENCH_MEMORY";

fn heap() -> HeapKeyedStateBackend<u64> {
    HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .build()
        .expect("heap backend")
}

fn mmap(budget: usize) -> MmapKeyedStateBackend<u64> {
    MmapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .memory_budget(budget)
        .build()
        .expect("mmap backend")
}

/// Registers the benchmark's timers; returns the service.
fn register<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> state_api::TimerServiceHandle<u64> {
    let h = b
        .register_timer_service(TimerServiceDescriptor::<u64>::new("timers").expect("name"))
        .expect("service");
    for i in 0..TIMERS {
        b.set_current_key(i % KEYS).expect("key");
        // Timestamps spread over 0..1,000,000 ms, 10 per key.
        let ts = ((i * 7_919) % TIMERS) as i64;
        b.timers(&h)
            .register_event_time_timer(&0, ts)
            .expect("register");
    }
    h
}

/// Median (register/s, fire/s, fire one at a time/s) of three rounds on fresh backends from
/// `make`.
fn measure<B: KeyedStateBackend<Key = u64>>(make: impl Fn() -> B) -> (f64, f64, f64) {
    let mut registered = Vec::new();
    let mut fire = Vec::new();
    let mut one_by_one = Vec::new();
    for _ in 0..3 {
        let mut b = make();
        let h = register(&mut b);
        let t = Instant::now();
        let mut fired = 0u64;
        for step in 1..=1000 {
            while let Some(timer) = b
                .next_due_timer(&h, TimeDomain::EventTime, step * 1000)
                .expect("next due timer")
            {
                black_box(timer);
                fired += 1;
            }
        }
        assert_eq!(fired, TIMERS, "every timer fires once");
        one_by_one.push(TIMERS as f64 / t.elapsed().as_secs_f64());

        let mut b = make();
        let t = Instant::now();
        let h = register(&mut b);
        registered.push(TIMERS as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut fired = 0;
        for step in 1..=1000 {
            fired += black_box(b.advance_watermark(&h, step * 1000).expect("advance")).len();
        }
        assert_eq!(fired as u64, TIMERS, "every timer fires once");
        fire.push(TIMERS as f64 / t.elapsed().as_secs_f64());
    }
    registered.sort_by(f64::total_cmp);
    fire.sort_by(f64::total_cmp);
    one_by_one.sort_by(f64::total_cmp);
    (registered[1], fire[1], one_by_one[1])
}

/// This process's anonymous resident memory in KiB (Linux), if known.
fn rss_anon_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// In a child process: registers the timers on one backend and prints the `RssAnon` growth in
/// KiB (and, for mmap, the bytes of its in-memory timer index).
fn memory_child(which: &str) {
    let before = rss_anon_kib().unwrap_or(0);
    if which == "heap" {
        let mut b = heap();
        register(&mut b);
        let after = rss_anon_kib().unwrap_or(0);
        println!("{} 0", after.saturating_sub(before));
        black_box(b);
    } else {
        let mib: usize = which
            .trim_start_matches("mmap:")
            .parse()
            .expect("budget in MiB");
        let mut b = mmap(mib << 20);
        register(&mut b);
        let after = rss_anon_kib().unwrap_or(0);
        println!(
            "{} {}",
            after.saturating_sub(before),
            b.timer_memory_bytes()
        );
        black_box(b);
    }
}

/// Runs [`memory_child`] in a fresh process: `(RssAnon growth in MiB, timer index bytes)`.
fn memory_of(which: &str) -> Option<(f64, u64)> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe).env(MEMORY_CHILD, which).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text.lines().last()?.split_whitespace();
    let kib: f64 = it.next()?.parse().ok()?;
    let index: u64 = it.next()?.parse().ok()?;
    Some((kib / 1024.0, index))
}

fn main() {
    if let Ok(which) = std::env::var(MEMORY_CHILD) {
        memory_child(&which);
        return;
    }
    let heap_ops = measure(heap);
    let mmap_ops = measure(|| mmap(256 << 20));
    println!("timers: {TIMERS} over {KEYS} keys, median of 3 (timers/s)");
    println!(
        "{:<6} {:>12} {:>12} {:>14}",
        "", "register", "fire (Vec)", "fire (1 by 1)"
    );
    for (name, (r, f, o)) in [("heap", heap_ops), ("mmap", mmap_ops)] {
        println!(
            "{name:<6} {:>11.2}M {:>11.2}M {:>13.2}M",
            r / 1e6,
            f / 1e6,
            o / 1e6
        );
    }
    println!(
        "mmap/heap: register {:.2}x, fire {:.2}x, fire one at a time {:.2}x",
        mmap_ops.0 / heap_ops.0,
        mmap_ops.1 / heap_ops.1,
        mmap_ops.2 / heap_ops.2
    );
    println!("memory after registering {TIMERS} timers (RssAnon growth, own process each):");
    for (label, which) in [
        ("heap", "heap"),
        ("mmap, budget 256 MiB", "mmap:256"),
        ("mmap, budget 32 MiB", "mmap:32"),
    ] {
        match memory_of(which) {
            Some((mib, 0)) => println!("  {label:<22} {mib:>8.1} MiB"),
            Some((mib, index)) => {
                println!("  {label:<22} {mib:>8.1} MiB  (timer index in memory: {index} bytes)")
            }
            None => println!("  {label:<22} n/a"),
        }
    }
}
