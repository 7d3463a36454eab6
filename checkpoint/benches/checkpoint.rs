//! Checkpoint benchmark: heap state of about 1 GiB (10M keys by default) checkpointed to a
//! local directory through the coordinator.
//!
//! Reports the synchronous pause, the total checkpoint time and bytes written against the
//! sequential write speed of the same directory (measured here, same byte count), the restore
//! time, and the size of incremental checkpoints after changing 1% of the keys (spread over all
//! key groups, and concentrated in 1% of the key groups).
//!
//! `cargo bench -p checkpoint --bench checkpoint` (env: `FLOWSTATE_BENCH_KEYS`,
//! `FLOWSTATE_BENCH_VALUE_BYTES`, `FLOWSTATE_BENCH_DIR`, `FLOWSTATE_BENCH_PARTS`: files a heap
//! snapshot is split into, default the number of cores up to 4).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::*;
use state_api::*;
use state_heap::HeapKeyedStateBackend;

const MAX_P: u32 = 128;
const WAIT: Duration = Duration::from_secs(600);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn key_group(k: u64) -> u32 {
    // Keys are fixed-width big-endian bytes (FixedWidthSerializer), as Flink's LongSerializer.
    assign_to_key_group(&k.to_be_bytes(), MAX_P)
}

/// CPU time (user + system) of this process so far, from /proc (Linux); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Restores `done` into a fresh heap backend (all key groups, or subtask `half` of 2),
/// registering the state before the restore (`register_first`) or after it; returns wall and
/// CPU seconds.
fn restore(
    done: &CompletedCheckpoint,
    storage: &CheckpointStorage,
    half: Option<u32>,
    register_first: bool,
    keys: u64,
) -> (f64, f64) {
    let (t, cpu) = (Instant::now(), cpu_seconds());
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .max_parallelism(MAX_P);
    if let Some(i) = half {
        b = b.key_group_range(KeyGroupRange::for_operator(MAX_P, 2, i).unwrap());
    }
    let mut restored = b.build().unwrap();
    let register = |r: &mut HeapKeyedStateBackend<u64>| {
        r.register_value(
            ValueStateDescriptor::<Vec<u8>>::new("payload")
                .unwrap()
                .with_value_serializer(BytesSerializer),
        )
        .unwrap()
    };
    let mut handle = register_first.then(|| register(&mut restored));
    done.restore_keyed(storage, "state", half.unwrap_or(0), &mut restored)
        .unwrap();
    let rh = handle
        .get_or_insert_with(|| register(&mut restored))
        .clone();
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    // A key the restored range owns holds its value.
    let key = (0..keys)
        .find(|&k| restored.key_group_range().contains(key_group(k)))
        .unwrap();
    restored.set_current_key(key).unwrap();
    assert!(restored.value(&rh).get().unwrap().is_some());
    (wall, cpu)
}

/// Sequential write of `bytes` in 8 MiB writes, then fsync; returns MB/s.
fn sequential_write(dir: &std::path::Path, bytes: u64) -> (f64, f64) {
    let path = dir.join("seq-write-probe");
    let chunk = vec![0x5au8; 8 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    let buffered = start.elapsed();
    f.sync_all().unwrap();
    let synced = start.elapsed();
    drop(f);
    std::fs::remove_file(&path).unwrap();
    (
        mb(bytes) / buffered.as_secs_f64(),
        mb(bytes) / synced.as_secs_f64(),
    )
}

struct Run {
    coord: CheckpointCoordinator,
    ep: SubtaskEndpoint,
    storage: CheckpointStorage,
}

fn start(dir: &std::path::Path, job: &str, incremental: bool) -> Run {
    let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap());
    let storage = CheckpointStorage::new(store, "", job).unwrap();
    let config = CheckpointConfig {
        incremental,
        retained: 2,
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    if let Ok(parts) = std::env::var("FLOWSTATE_BENCH_PARTS") {
        b = b.write_parts(parts.parse().expect("FLOWSTATE_BENCH_PARTS is a number"));
    }
    let ep = b.register_subtask("state", 0, 1, MAX_P).unwrap();
    Run {
        coord: b.start().unwrap(),
        ep,
        storage,
    }
}

/// One checkpoint: returns (sync pause, total time, completed checkpoint).
fn checkpoint_once(
    run: &mut Run,
    backend: &mut HeapKeyedStateBackend<u64>,
) -> (Duration, Duration, CompletedCheckpoint) {
    let start = Instant::now();
    let pending = run.coord.trigger_checkpoint().unwrap();
    let barrier = loop {
        if let SubtaskCommand::Barrier(b) = run.ep.recv_timeout(WAIT).unwrap() {
            break b;
        }
    };
    let sync_start = Instant::now();
    run.ep.snapshot_heap(&barrier, backend, None).unwrap();
    let pause = sync_start.elapsed();
    let done = pending.wait(WAIT).unwrap();
    let total = start.elapsed();
    // Drain the completion notification (it moves the incremental base).
    while let Some(c) = run.ep.recv_timeout(Duration::from_millis(200)) {
        if matches!(c, SubtaskCommand::CheckpointComplete { .. }) {
            break;
        }
    }
    (pause, total, done)
}

fn new_bytes(done: &CompletedCheckpoint) -> u64 {
    let mark = format!("-c{}-p", done.metadata.checkpoint_id);
    done.metadata
        .files()
        .filter(|f| f.location.name().contains(&mark))
        .map(|f| f.size)
        .sum()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let keys = env("FLOWSTATE_BENCH_KEYS", 10_000_000);
    let value_bytes = env("FLOWSTATE_BENCH_VALUE_BYTES", 88) as usize;
    let tmp = tempfile::Builder::new()
        .prefix("flowstate-checkpoint-bench")
        .tempdir_in(
            std::env::var_os("FLOWSTATE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
        )
        .unwrap();
    let dir = tmp.path();
    println!("checkpoint benchmark: {keys} keys, {value_bytes}-byte values, max parallelism {MAX_P}, dir {}", dir.display());

    let t = Instant::now();
    let mut backend = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .max_parallelism(MAX_P)
        .build()
        .unwrap();
    let h = backend
        .register_value(
            ValueStateDescriptor::<Vec<u8>>::new("payload")
                .unwrap()
                .with_value_serializer(BytesSerializer),
        )
        .unwrap();
    let mut value = vec![0u8; value_bytes];
    for k in 0..keys {
        value[..8].copy_from_slice(&k.to_le_bytes());
        backend.set_current_key(k).unwrap();
        backend.value(&h).update(value.clone()).unwrap();
    }
    println!("populated in {:.1} s", t.elapsed().as_secs_f64());

    // Serialization alone (no storage), on this thread.
    let (t, c0) = (Instant::now(), cpu_seconds());
    let mut sink = std::io::sink();
    let summary = backend.snapshot().unwrap().write_to(&mut sink).unwrap();
    println!(
        "serializing the snapshot stream alone: {:.2} s ({:.2} s CPU), {:.1} MB, {:.0} MB/s",
        t.elapsed().as_secs_f64(),
        cpu_seconds() - c0,
        mb(summary.bytes),
        mb(summary.bytes) / t.elapsed().as_secs_f64()
    );

    if std::env::var("FLOWSTATE_BENCH_PROBE").is_ok() {
        let all: Vec<u32> = (0..MAX_P).collect();
        for parts in [1usize, 2] {
            let views: Vec<_> = split_key_groups(&all, parts)
                .into_iter()
                .map(|kgs| backend.snapshot_heap().restrict_to(kgs))
                .collect();
            let (t, c0) = (Instant::now(), cpu_seconds());
            std::thread::scope(|s| {
                for v in &views {
                    s.spawn(move || {
                        let mut sink = std::io::sink();
                        v.write_to(&mut sink).unwrap();
                    });
                }
            });
            println!(
                "probe: {parts} part(s) to a sink: {:.2} s wall, {:.2} s CPU",
                t.elapsed().as_secs_f64(),
                cpu_seconds() - c0
            );
        }
    }

    // Full checkpoints and sequential writes of the same size, alternated; medians of 3.
    let mut full = start(dir, "full", false);
    let mut runs = Vec::new();
    let mut seq = Vec::new();
    let mut done = None;
    let mut cpu = Vec::new();
    for _ in 0..3 {
        let c0 = cpu_seconds();
        let (pause, total, d) = checkpoint_once(&mut full, &mut backend);
        cpu.push(cpu_seconds() - c0);
        let bytes: u64 = d.metadata.files().map(|f| f.size).sum();
        runs.push((total, pause, bytes));
        seq.push(sequential_write(dir, bytes));
        done = Some(d);
    }
    let done = done.unwrap();
    runs.sort();
    let (total, pause, bytes) = runs[1];
    let max_pause = runs.iter().map(|r| r.1).max().unwrap();
    seq.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seq_buffered, _) = seq[1];
    seq.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (_, seq_synced) = seq[1];
    let ckpt_speed = mb(bytes) / total.as_secs_f64();
    println!("full checkpoint (median of 3): sync pause {:.3} ms (max {:.3} ms), total {:.2} s, {:.1} MB written, {:.0} MB/s", pause.as_secs_f64() * 1e3, max_pause.as_secs_f64() * 1e3, total.as_secs_f64(), mb(bytes), ckpt_speed);
    cpu.sort_by(f64::total_cmp);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("full checkpoint CPU time (median of 3): {:.2} s ({:.0} MB per CPU second); load average: {}", cpu[1], mb(bytes) / cpu[1].max(1e-9), load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("sequential write of the same size (median of 3): {seq_buffered:.0} MB/s buffered, {seq_synced:.0} MB/s with fsync; the checkpoint (not fsynced) reaches {:.0}% of the buffered speed", 100.0 * ckpt_speed / seq_buffered);

    // Restore (all key groups, then half of them), into states registered before the restore
    // (records decoded straight into their tables) and before registration (kept, decoded when
    // the state is registered).
    for first in [true, false] {
        let (all, all_cpu) = restore(&done, &full.storage, None, first, keys);
        let (half, half_cpu) = restore(&done, &full.storage, Some(1), first, keys);
        println!(
            "restore {}: all key groups {:.2} s ({:.0} MB/s, {:.2} s CPU); subtask 1 of 2 {:.2} s ({:.2} s CPU)",
            if first { "into registered states" } else { "before registration" },
            all,
            mb(bytes) / all,
            all_cpu,
            half,
            half_cpu,
        );
    }
    drop(full);

    // Incremental checkpoints.
    let mut inc = start(dir, "incremental", true);
    backend.take_changed_key_groups();
    let (pause, total, first) = checkpoint_once(&mut inc, &mut backend);
    let first_bytes = new_bytes(&first);
    println!(
        "incremental (first, full) checkpoint: pause {:.3} ms, total {:.2} s, {:.1} MB",
        pause.as_secs_f64() * 1e3,
        total.as_secs_f64(),
        mb(first_bytes)
    );
    // 1% of the keys, spread over every key group (three times, other keys each time: each
    // checkpoint is a delta on top of the previous one).
    let mut deltas = Vec::new();
    for round in 0..3u64 {
        for k in (round..keys).step_by(100) {
            backend.set_current_key(k).unwrap();
            backend.value(&h).update(vec![1u8; value_bytes]).unwrap();
        }
        let (pause, total, spread) = checkpoint_once(&mut inc, &mut backend);
        deltas.push((pause, total, new_bytes(&spread)));
    }
    let max_pause = deltas.iter().map(|d| d.0).max().unwrap();
    deltas.sort();
    let (pause, total, spread_bytes) = deltas[1];
    println!("incremental after changing 1% of keys spread over all key groups (median of 3 successive deltas): {:.1} MB = {:.1}% of full (pause {:.3} ms, max {:.3} ms; total {:.2} s)", mb(spread_bytes), 100.0 * spread_bytes as f64 / first_bytes as f64, pause.as_secs_f64() * 1e3, max_pause.as_secs_f64() * 1e3, total.as_secs_f64());
    // 1% of the keys, all in the first ~1% of the key groups (2 of 128 key groups hold
    // ~1.6% of the keys: change 1% of all keys among them).
    let target = keys / 100;
    let mut changed = 0;
    for k in 0..keys {
        if changed >= target {
            break;
        }
        if key_group(k) < 2 {
            backend.set_current_key(k).unwrap();
            backend.value(&h).update(vec![2u8; value_bytes]).unwrap();
            changed += 1;
        }
    }
    let (pause, total, local) = checkpoint_once(&mut inc, &mut backend);
    let local_bytes = new_bytes(&local);
    println!("incremental after changing 1% of keys in 2 of 128 key groups: {:.1} MB = {:.1}% of full (pause {:.3} ms, total {:.2} s)", mb(local_bytes), 100.0 * local_bytes as f64 / first_bytes as f64, pause.as_secs_f64() * 1e3, total.as_secs_f64());
    for first in [true, false] {
        let (wall, cpu) = restore(&local, &inc.storage, None, first, keys);
        println!(
            "restore of the last incremental checkpoint ({} files) {}: {:.2} s ({:.2} s CPU)",
            local.metadata.files().count(),
            if first {
                "into registered states"
            } else {
                "before registration"
            },
            wall,
            cpu
        );
    }
}
