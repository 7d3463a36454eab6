//! Restore of a canonical snapshot into the heap backend: `FLOWSTATE_BENCH_KEYS` keys (default
//! 2,000,000) with 88-byte values, one value state, max parallelism 128, from an in-memory
//! stream (no I/O: what the backend itself costs). Prints the median of 3 restores: wall time,
//! the restoring thread's CPU time (less sensitive to other load on the machine than wall time)
//! and MB/s of stream, and the anonymous memory the restore held at its peak beyond the
//! restored state. Asserts only that every key came back.

use std::hint::black_box;
use std::time::Instant;

use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor,
};
use state_heap::HeapKeyedStateBackend;

/// This thread's CPU seconds (Linux; 0 elsewhere).
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1e9
}

/// (peak, current) anonymous resident KiB of this process (`VmHWM` covers file pages too; this
/// bench maps none).
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("RssAnon:"))
}

fn backend() -> HeapKeyedStateBackend<u64> {
    HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .max_parallelism(128)
        .build()
        .expect("heap backend")
}

fn main() {
    let keys: u64 = std::env::var("FLOWSTATE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let mut b = backend();
    let d = ValueStateDescriptor::<Vec<u8>>::new("v").expect("descriptor");
    let h = b.register_value(d.clone()).expect("register");
    for k in 0..keys {
        b.set_current_key(k).expect("key");
        b.value(&h)
            .update(vec![(k % 251) as u8; 88])
            .expect("update");
    }
    let mut stream = Vec::new();
    b.snapshot()
        .expect("snapshot")
        .write_to(&mut stream)
        .expect("write");
    drop(b);
    let mb = stream.len() as f64 / 1e6;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut r = backend();
        let h = r.register_value(d.clone()).expect("register");
        let (_, before) = rss_kib();
        let (t, c) = (Instant::now(), thread_cpu());
        r.restore(vec![("snapshot".to_string(), &stream[..])])
            .expect("restore");
        let (wall, cpu) = (t.elapsed().as_secs_f64(), thread_cpu() - c);
        let (peak, after) = rss_kib();
        r.set_current_key(keys - 1).expect("key");
        assert!(
            r.value(&h).get().expect("get").is_some(),
            "the last key came back"
        );
        runs.push((
            wall,
            cpu,
            peak.saturating_sub(before),
            after.saturating_sub(before),
        ));
        black_box(r);
    }
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (wall, cpu, _, state) = runs[1];
    println!(
        "heap restore of {keys} keys x 88 B ({mb:.0} MB stream, median of 3): {wall:.2} s wall, \
         {cpu:.2} s CPU ({:.0} MB per CPU second); state after restore {} MiB of anonymous memory",
        mb / cpu,
        state / 1024
    );
    println!(
        "peak resident memory of the process (first restore raises it): {} MiB",
        rss_kib().0 / 1024
    );
}
