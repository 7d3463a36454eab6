//! The mmap backend's native checkpoints, measured as issue 20 asks and as Flink's RocksDB
//! backend is usually judged: `FLOWSTATE_BENCH_KEYS` keys (default 10,000,000) with 88-byte
//! values (raw bytes, ~100 B a record) in a job of parallelism 2 (two mmap backends, 256 MiB
//! budget each), checkpointed incrementally to a local directory through the coordinator:
//!
//! - the first checkpoint (every native file uploaded: a full checkpoint), and one after
//!   changing 1% of the keys (only new files uploaded);
//! - restore at the same parallelism, and rescale 2 -> 3 and 3 -> 2: each new subtask downloads
//!   only the files that hold its key groups (clipped to its range), restores run side by side
//!   as the subtasks of a job would; the time is the slowest subtask's;
//! - next to the time a plain sequential read of the same bytes takes on the same disk.
//!
//! Prints figures and `RESULT <name> <value>` lines (for `benches/flink-compare`); asserts only
//! that restored state reads back. `cargo bench -p integration-tests --bench mmap_checkpoint`
//! (env `FLOWSTATE_BENCH_KEYS`, `FLOWSTATE_BENCH_DIR`: where the state and checkpoints go, 3-4x
//! the state's size; `FLOWSTATE_BENCH_DROP_CACHES=1`: read cold, see [`drop_page_cache`]).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::*;
use state_api::*;
use state_mmap::MmapKeyedStateBackend;

const MAX_P: u32 = 128;
const VALUE_BYTES: usize = 88;
const BUDGET: usize = 256 << 20;
const WAIT: Duration = Duration::from_secs(1800);

type Mmap = MmapKeyedStateBackend<u64>;

fn descriptor() -> ValueStateDescriptor<Vec<u8>> {
    ValueStateDescriptor::<Vec<u8>>::new("payload")
        .unwrap()
        .with_value_serializer(BytesSerializer)
}

fn backend(dir: &Path, name: &str, range: KeyGroupRange) -> Mmap {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    MmapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .max_parallelism(MAX_P)
        .key_group_range(range)
        .memory_budget(BUDGET)
        .directory(&dir)
        .build()
        .unwrap()
}

fn ranges(parallelism: u32) -> Vec<KeyGroupRange> {
    (0..parallelism)
        .map(|i| KeyGroupRange::for_operator(MAX_P, parallelism, i).unwrap())
        .collect()
}

/// The subtask owning key `k` among `ranges`.
fn owner(ranges: &[KeyGroupRange], k: u64) -> usize {
    let kg = assign_to_key_group(&k.to_be_bytes(), MAX_P);
    ranges.iter().position(|r| r.contains(kg)).unwrap()
}

struct Job {
    coord: CheckpointCoordinator,
    eps: Vec<SubtaskEndpoint>,
    storage: CheckpointStorage,
}

fn job(dir: &Path, name: &str, parallelism: u32) -> Job {
    let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap());
    let storage = CheckpointStorage::new(store, "", name).unwrap();
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let eps = (0..parallelism)
        .map(|i| b.register_subtask("state", i, parallelism, MAX_P).unwrap())
        .collect();
    Job {
        coord: b.start().unwrap(),
        eps,
        storage,
    }
}

/// One checkpoint of every subtask: (total time, completed checkpoint).
fn checkpoint(job: &mut Job, backends: &mut [Mmap]) -> (Duration, CompletedCheckpoint) {
    let start = Instant::now();
    let pending = job.coord.trigger_checkpoint().unwrap();
    for (ep, b) in job.eps.iter_mut().zip(backends.iter_mut()) {
        let barrier = loop {
            if let SubtaskCommand::Barrier(x) = ep.recv_timeout(WAIT).unwrap() {
                break x;
            }
        };
        ep.snapshot_backend(&barrier, b, None).unwrap();
    }
    let done = pending.wait(WAIT).unwrap();
    let total = start.elapsed();
    // Deliver the completion (it moves the incremental base and lets files go).
    for ep in &mut job.eps {
        while let Some(c) = ep.recv_timeout(Duration::from_millis(200)) {
            if matches!(c, SubtaskCommand::CheckpointComplete { .. }) {
                break;
            }
        }
    }
    (total, done)
}

/// Bytes of the files `done` references that `before` did not (all of them without `before`).
fn uploaded_by(done: &CompletedCheckpoint, before: Option<&CompletedCheckpoint>) -> u64 {
    let old: std::collections::HashSet<String> = before
        .into_iter()
        .flat_map(|b| b.metadata.files())
        .map(|f| f.location.name().to_string())
        .collect();
    done.metadata
        .files()
        .filter(|f| !old.contains(f.location.name()))
        .map(|f| f.size)
        .sum()
}

fn total_bytes(done: &CompletedCheckpoint) -> u64 {
    done.metadata.files().map(|f| f.size).sum()
}

/// Restores `done` into new backends of `parallelism`, side by side; returns them and the
/// slowest subtask's time.
/// This process's CPU seconds, all threads (Linux; 0 elsewhere): a restore's wall time on a
/// loaded machine says little, its CPU time what it costs.
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

/// Restores `done` at `parallelism` as a job's subtasks would, side by side: the backends, the
/// slowest subtask's time and the CPU seconds all took.
fn restore(
    dir: &Path,
    tag: &str,
    job: &Job,
    done: &CompletedCheckpoint,
    parallelism: u32,
) -> (Vec<Mmap>, Duration, f64) {
    let cpu = process_cpu();
    let results: Vec<(Mmap, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges(parallelism)
            .into_iter()
            .enumerate()
            .map(|(i, range)| {
                let storage = &job.storage;
                s.spawn(move || {
                    let start = Instant::now();
                    let mut b = backend(dir, &format!("{tag}-{i}"), range);
                    let download = dir.join(format!("{tag}-{i}-download"));
                    std::fs::create_dir_all(&download).unwrap();
                    done.restore_backend(storage, "state", i as u32, &mut b, &download)
                        .unwrap();
                    b.register_value(descriptor()).unwrap();
                    (b, start.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    let cpu = process_cpu() - cpu;
    (results.into_iter().map(|r| r.0).collect(), slowest, cpu)
}

/// Reads back sample keys: value bytes start with the key and the round that wrote them.
fn check(backends: &mut [Mmap], keys: u64, changed: &dyn Fn(u64) -> bool) {
    let rs: Vec<KeyGroupRange> = backends.iter().map(|b| b.key_group_range()).collect();
    let handles: Vec<_> = backends
        .iter_mut()
        .map(|b| b.register_value(descriptor()).unwrap())
        .collect();
    for k in (0..keys).step_by((keys / 997).max(1) as usize) {
        let i = owner(&rs, k);
        let b = &mut backends[i];
        b.set_current_key(k).unwrap();
        let v = b.value(&handles[i]).get().unwrap().expect("restored key");
        assert_eq!(v[..8], k.to_le_bytes(), "key {k}");
        assert_eq!(v[8], u8::from(changed(k)), "round of key {k}");
    }
}

/// Seconds to read every file under `dir` once, sequentially.
fn sequential_read(dir: &Path) -> (u64, f64) {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut f = std::fs::File::open(&p).unwrap();
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
        }
    }
    (bytes, start.elapsed().as_secs_f64())
}

/// With `FLOWSTATE_BENCH_DROP_CACHES=1` (root): evicts the page cache so that reads come from
/// the disk, as on a fresh machine (it affects the whole machine: off by default). Without it
/// the restores and the plain read alike are served from memory.
fn drop_page_cache() {
    if std::env::var("FLOWSTATE_BENCH_DROP_CACHES").is_ok_and(|v| v == "1") {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg("sync; echo 1 > /proc/sys/vm/drop_caches")
            .status();
    }
}

fn result(name: &str, value: f64) {
    println!("RESULT mmap {name} {value:.3}");
}

fn main() {
    // `RUST_LOG=info` shows each restore's split: download and open times.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let keys: u64 = std::env::var("FLOWSTATE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let tmp = tempfile::Builder::new()
        .prefix("flowstate-mmap-checkpoint-bench")
        .tempdir_in(
            std::env::var_os("FLOWSTATE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
        )
        .unwrap();
    let dir = tmp.path();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "mmap native checkpoints: {keys} keys x {VALUE_BYTES} B, parallelism 2, {} MiB budget \
         per backend, dir {}; load average {}",
        BUDGET >> 20,
        dir.display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Populate two subtasks.
    let t = Instant::now();
    let r2 = ranges(2);
    let mut backends: Vec<Mmap> = r2
        .iter()
        .enumerate()
        .map(|(i, r)| backend(dir, &format!("p2-{i}"), *r))
        .collect();
    let hs: Vec<_> = backends
        .iter_mut()
        .map(|b| b.register_value(descriptor()).unwrap())
        .collect();
    let mut value = vec![0u8; VALUE_BYTES];
    for k in 0..keys {
        let i = owner(&r2, k);
        value[..8].copy_from_slice(&k.to_le_bytes());
        backends[i].set_current_key(k).unwrap();
        backends[i].value(&hs[i]).update(value.clone()).unwrap();
    }
    println!("populated in {:.1} s", t.elapsed().as_secs_f64());
    // Settled as Flink's side is (no flush or compaction running or pending), so that the
    // second checkpoint's upload is the 1% change, not whichever compaction of the load
    // finished in between.
    let t = Instant::now();
    for b in &mut backends {
        b.wait_for_background_work().unwrap();
    }
    println!(
        "background work (the load's compactions) settled in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let ckpt = dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut j2 = job(&ckpt, "p2", 2);
    let (full, first) = checkpoint(&mut j2, &mut backends);
    let full_bytes = uploaded_by(&first, None);
    println!(
        "first (full) checkpoint: {:.2} s, {:.1} MB uploaded ({:.0} MB/s)",
        full.as_secs_f64(),
        full_bytes as f64 / 1e6,
        full_bytes as f64 / 1e6 / full.as_secs_f64()
    );
    result("checkpoint_full_s", full.as_secs_f64());
    result("checkpoint_full_mb", full_bytes as f64 / 1e6);

    // 1% of the keys, spread over every key group.
    let changed = |k: u64| k % 100 == 37;
    value[8] = 1;
    for k in (0..keys).filter(|&k| changed(k)) {
        let i = owner(&r2, k);
        value[..8].copy_from_slice(&k.to_le_bytes());
        backends[i].set_current_key(k).unwrap();
        backends[i].value(&hs[i]).update(value.clone()).unwrap();
    }
    let (inc, second) = checkpoint(&mut j2, &mut backends);
    let inc_bytes = uploaded_by(&second, Some(&first));
    println!(
        "incremental checkpoint after changing 1% of the keys: {:.2} s, {:.1} MB uploaded \
         ({:.1}% of the first), checkpoint references {:.1} MB",
        inc.as_secs_f64(),
        inc_bytes as f64 / 1e6,
        100.0 * inc_bytes as f64 / full_bytes.max(1) as f64,
        total_bytes(&second) as f64 / 1e6
    );
    result("checkpoint_incremental_s", inc.as_secs_f64());
    result("checkpoint_incremental_mb", inc_bytes as f64 / 1e6);
    drop(backends);

    let (read_bytes, read_s) = {
        drop_page_cache();
        sequential_read(&ckpt.join("p2"))
    };
    println!(
        "sequential read of the checkpoint directory: {:.1} MB in {read_s:.2} s ({:.0} MB/s)",
        read_bytes as f64 / 1e6,
        read_bytes as f64 / 1e6 / read_s
    );
    result("sequential_read_s", read_s);

    drop_page_cache();
    let (mut same, t_same, cpu_same) = restore(dir, "r2", &j2, &second, 2);
    check(&mut same, keys, &changed);
    println!(
        "restore at parallelism 2: {:.2} s (slowest subtask), {cpu_same:.2} s CPU",
        t_same.as_secs_f64()
    );
    result("restore_s", t_same.as_secs_f64());
    drop(same);

    drop_page_cache();
    let (mut three, t_up, cpu_up) = restore(dir, "r3", &j2, &second, 3);
    check(&mut three, keys, &changed);
    println!(
        "rescale 2 -> 3: {:.2} s (slowest subtask), {cpu_up:.2} s CPU",
        t_up.as_secs_f64()
    );
    result("rescale_2_to_3_s", t_up.as_secs_f64());

    // A checkpoint of the three, then back to two.
    let mut j3 = job(&ckpt, "p3", 3);
    let (_, third) = checkpoint(&mut j3, &mut three);
    drop(three);
    drop_page_cache();
    let (mut two, t_down, cpu_down) = restore(dir, "r32", &j3, &third, 2);
    check(&mut two, keys, &changed);
    println!(
        "rescale 3 -> 2: {:.2} s (slowest subtask), {cpu_down:.2} s CPU",
        t_down.as_secs_f64()
    );
    result("rescale_3_to_2_s", t_down.as_secs_f64());
    println!(
        "restore / sequential read of the whole checkpoint: {:.2}x; rescale 2->3 {:.2}x, 3->2 \
         {:.2}x",
        t_same.as_secs_f64() / read_s,
        t_up.as_secs_f64() / read_s,
        t_down.as_secs_f64() / read_s
    );
}
