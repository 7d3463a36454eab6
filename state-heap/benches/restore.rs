//! Restore of a canonical snapshot into the heap backend: `FLOWSTATE_BENCH_KEYS` keys (default
//! 2,000,000) with 88-byte values (raw bytes), one value state, max parallelism 128, from
//! in-memory streams (no I/O: what the backend itself costs), split into
//! `FLOWSTATE_BENCH_PARTS` streams by key group as checkpoints split them (default 1). Restores
//! into registered states, then before registration (the state registered after). Prints the
//! median of 3 restores: wall time, the process's CPU time, MB/s of stream, and the anonymous
//! memory the restore held at its peak beyond what the process had. Asserts only that the last
//! key came back.

use std::hint::black_box;
use std::time::Instant;

use state_api::{
    BytesSerializer, FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt,
    KeyedStateSnapshot, ValueStateDescriptor,
};
use state_heap::HeapKeyedStateBackend;

/// This process's CPU seconds, all threads (Linux; 0 elsewhere).
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    (ticks(11) + ticks(12)) / 100.0
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
    // Values as raw bytes, as the checkpoint benchmark writes them.
    let d = ValueStateDescriptor::<Vec<u8>>::new("v")
        .expect("descriptor")
        .with_value_serializer(BytesSerializer);
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
    let mb = stream.len() as f64 / 1e6;
    // Split as checkpoints split it (`FLOWSTATE_BENCH_PARTS`, default 1): one stream per part
    // of the key groups.
    let parts: usize = std::env::var("FLOWSTATE_BENCH_PARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let streams: Vec<Vec<u8>> = if parts <= 1 {
        vec![stream]
    } else {
        let all: Vec<u32> = (0..128).collect();
        all.chunks(128_usize.div_ceil(parts))
            .map(|kgs| {
                let mut out = Vec::new();
                b.snapshot_heap()
                    .restrict_to(kgs.to_vec())
                    .write_to(&mut out)
                    .expect("write part");
                out
            })
            .collect()
    };
    drop(b);
    let inputs = || {
        streams
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("part-{i}"), &s[..]))
            .collect::<Vec<_>>()
    };
    // Restore into registered states, then restore first and register after (the order of a
    // job that restores before its operators open, as Flink does).
    for register_first in [true, false] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut r = backend();
            let h0 = register_first.then(|| r.register_value(d.clone()).expect("register"));
            let (_, before) = rss_kib();
            let (t, c) = (Instant::now(), process_cpu());
            r.restore(inputs()).expect("restore");
            let h = match h0 {
                Some(h) => h,
                None => r.register_value(d.clone()).expect("register"),
            };
            let (wall, cpu) = (t.elapsed().as_secs_f64(), process_cpu() - c);
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
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (wall, cpu, peak, state) = runs[1];
        let order = if register_first {
            "into registered states"
        } else {
            "before registration"
        };
        println!(
        "heap restore {order} of {keys} keys x 88 B ({mb:.0} MB in {} stream(s), median of 3): \
         {wall:.2} s wall ({:.0} MB/s), {cpu:.2} s CPU of the process; state after restore {} MiB \
         of anonymous memory, peak {} MiB above the start",
        streams.len(),
        mb / wall,
        state / 1024,
        peak / 1024
    );
    }
    println!(
        "peak resident memory of the process (first restore raises it): {} MiB",
        rss_kib().0 / 1024
    );
}
