//! Profiling aid: sets up the peer-bench state on state-mmap, then repeats one read workload
//! (`value-get`, `list-get`, `map-get`, `map-contains`, `map-iter`) so `perf` sees only it.
//!
//! `cargo run --release --example prof -- value-get [keys] [passes]`

use state_api::*;
use state_mmap::MmapKeyedStateBackend;
use std::time::Instant;

/// Nanoseconds this thread has spent on a CPU (`/proc/thread-self/schedstat`).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let mut a = std::env::args().skip(1);
    let what = a.next().unwrap_or_else(|| "value-get".into());
    let n: u64 = a.next().and_then(|s| s.parse().ok()).unwrap_or(500_000);
    let passes: u32 = a.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    // A directory of our own, removed before the early exit below (the backend's default
    // directory is removed by its drop, which that exit skips).
    let dir = tempfile::tempdir().map_err(|e| Error::Io {
        context: "creating a directory for the engine".into(),
        source: e,
    })?;
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .engine_options(state_mmap::engine::EngineOptions {
            // PROF_RUNS=k: at most k sorted runs before compacting (the engine's default else).
            max_sorted_runs: std::env::var("PROF_RUNS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(state_mmap::engine::EngineOptions::default().max_sorted_runs),
            ..state_mmap::engine::EngineOptions::default()
        })
        .memory_budget(256 << 20)
        .directory(dir.path())
        .build()?;
    let v = b.register_value(ValueStateDescriptor::<u64>::new("value")?)?;
    let l = b.register_list(ListStateDescriptor::<u64>::new("list")?)?;
    let m = b.register_map(MapStateDescriptor::<u64, u64>::new("map")?)?;
    for k in 0..n {
        b.set_current_key(k)?;
        b.value(&v).update(k)?;
        b.list(&l).add(k)?;
        b.map(&m).put_all((0..10).map(|i| (i, k + i)).collect())?;
    }
    eprintln!("after setup: {:?}", b.engine().stats());
    // PROF_WRITES=1: the peer bench's write workloads before its list get, in its order
    // (value update, value add, list add, list append), so the reads meet the same runs.
    if std::env::var_os("PROF_WRITES").is_some() {
        let t = Instant::now();
        for k in 0..n {
            b.set_current_key(k)?;
            b.value(&v).update(k + 1)?;
        }
        for k in 0..n {
            b.set_current_key(k + n)?;
            b.value(&v).update(k)?;
        }
        for k in 0..n {
            b.set_current_key(k + n)?;
            b.list(&l).add(k)?;
        }
        for k in 0..n {
            b.set_current_key(k)?;
            b.list(&l).add(k)?;
        }
        eprintln!(
            "after the bench's writes ({:.0}k/s): {:?}",
            4.0 * n as f64 / t.elapsed().as_secs_f64() / 1e3,
            b.engine().stats()
        );
    }
    // PROF_APPEND=1: append to every list first, as the peer bench does before its list get
    // (every list is then a merge operand in the write buffer over a base in a sorted run).
    if std::env::var_os("PROF_APPEND").is_some() {
        for k in 0..n {
            b.set_current_key(k)?;
            b.list(&l).add(k)?;
        }
        eprintln!("after append: {:?}", b.engine().stats());
    }
    // PROF_MAPPUT=1: overwrite one entry of every map first, as the peer bench does before
    // its map iterate (a map's entries are then in two sources until a compaction merges them).
    if std::env::var_os("PROF_MAPPUT").is_some() {
        for k in 0..n {
            let k = (k * 7_919) % n;
            b.set_current_key(k)?;
            b.map(&m).put(k % 10, k)?;
        }
        eprintln!("after map put: {:?}", b.engine().stats());
    }
    // PROF_COMPACT=1: compact everything first (one sorted run, empty write buffer), to see
    // what the number of runs and the write buffer cost a read.
    // PROF_DRAIN=1: wait for the flushes and compactions under way (reads then meet a run
    // structure that does not change under them).
    if std::env::var_os("PROF_DRAIN").is_some() {
        b.wait_for_background_work()?;
        eprintln!("after drain: {:?}", b.engine().stats());
    }
    if std::env::var_os("PROF_COMPACT").is_some() {
        b.compact()?;
        eprintln!("after compact: {:?}", b.engine().stats());
    } else if std::env::var_os("PROF_FLUSH").is_some() {
        // PROF_FLUSH=1: flush only (the same runs, an empty write buffer).
        b.flush()?;
        eprintln!("after compact: {:?}", b.engine().stats());
    }
    let mut order: Vec<u64> = (0..n).collect();
    let mut s = 0x5eedu64;
    for i in (1..order.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let runs = |b: &MmapKeyedStateBackend<u64>| -> Vec<(usize, u64, u64)> {
        b.engine()
            .sorted_runs()
            .iter()
            .map(|r| {
                let mb = r.iter().map(|f| f.size()).sum::<u64>() >> 20;
                (r.len(), mb, r.iter().map(|f| f.entries()).sum::<u64>())
            })
            .collect()
    };
    eprintln!("runs (files, MiB, entries), newest first: {:?}", runs(&b));
    for _ in 0..passes {
        let t = Instant::now();
        let c = cpu_ns();
        read_pass(&mut b, &what, &order, n, &v, &l, &m)?;
        eprintln!(
            "{what}: {:.0}k/s wall, {:.0}k/s on-cpu  stats {:?}",
            n as f64 / t.elapsed().as_secs_f64() / 1e3,
            n as f64 / ((cpu_ns() - c) as f64 / 1e9) / 1e3,
            b.engine().stats()
        );
    }
    // Skip the drop (waiting for a compaction is slow under valgrind), but not the directory:
    // a few hundred MB per run otherwise stay in $TMPDIR.
    let _ = std::fs::remove_dir_all(dir.path());
    std::process::exit(0)
}

/// One pass of the workload over every key (a function of its own for
/// `valgrind --tool=callgrind --toggle-collect=prof::read_pass`).
#[inline(never)]
fn read_pass(
    b: &mut MmapKeyedStateBackend<u64>,
    what: &str,
    order: &[u64],
    n: u64,
    v: &ValueStateHandle<u64, ()>,
    l: &ListStateHandle<u64, ()>,
    m: &MapStateHandle<u64, u64, ()>,
) -> Result<()> {
    for &k in order {
        b.set_current_key(k)?;
        match what {
            "value-get" => {
                std::hint::black_box(b.value(v).get()?);
            }
            "list-get" => {
                std::hint::black_box(b.list(l).get()?);
            }
            "map-get" => {
                std::hint::black_box(b.map(m).get(&(k % 10))?);
            }
            "map-contains" => {
                std::hint::black_box(b.map(m).contains(&(k % 20))?);
            }
            "map-iter" => {
                // Every entry read: the iterator is lazy.
                for entry in b.map(m).iter()? {
                    std::hint::black_box(entry?);
                }
            }
            "list-add-all" => {
                b.set_current_key(k + 2 * n)?;
                b.list(l).add_all((0..100).collect())?;
            }
            _ => panic!("unknown workload {what}"),
        }
    }
    Ok(())
}
