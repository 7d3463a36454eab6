//! Flink-style keyed state benchmarks (flink-benchmarks `StateBenchmarkConstants`): value
//! get/update/add, list add/append/get/add_all, map get/put/contains/iterate, on state-mmap,
//! state-heap and LMDB (heed), same process, same keys, fixed seed. Prints ops/s; asserts no
//! timing.
//!
//! `cargo run --release -- [keys] [rounds]` (default 500000 keys, 3 rounds, median printed).
//!
//! Read workloads run as flink-benchmarks runs them: on state the store had time to settle
//! (JMH measures reads after warm-up iterations, each benchmark on its own freshly written
//! state), so before each read workload the log-structured stores (state-mmap, RocksDB) finish
//! their flushes and compactions, untimed; before the list get they compact their state, as
//! flink-benchmarks' `ListStateBenchmark` compacts RocksDB's list state ("so all get
//! invocations access a single file"). LMDB and the heap have nothing to settle. The map reads
//! come before the map put: in flink-benchmarks every benchmark reads the state its setup
//! wrote, not another benchmark's overwrites. With
//! `PEER_BENCH_BACK_TO_BACK=1` every workload runs right after the previous one instead: reads
//! then meet the runs a write burst left and the compactions it started.

use std::collections::BTreeMap;
use std::time::Instant;

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MAP_ENTRIES: u64 = 10;
const ADD_ALL: u64 = 100;
const MAX_PARALLELISM: u32 = 128;

fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

/// Per workload: ops/s of wall-clock time, ops per second this (the calling) thread spent
/// on a CPU (background threads of a store are not counted: meaningful for reads, which do
/// all their work on the calling thread, and shows what a read costs apart from the CPU
/// share other threads leave it), and ops per second of the whole process's CPU time
/// (background threads included; printed only as `RESULT_CPU` lines).
#[derive(Default)]
struct Figures(
    BTreeMap<&'static str, Vec<f64>>,
    BTreeMap<&'static str, Vec<f64>>,
    BTreeMap<&'static str, Vec<f64>>,
);

/// Nanoseconds the live threads of this process have spent on a CPU (the sum of
/// `/proc/self/task/*/schedstat`; 0 where those files do not exist).
fn process_cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|x| x.parse::<u64>().ok())
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Nanoseconds the calling thread has spent on a CPU (`/proc/thread-self/schedstat`; 0
/// where that file does not exist).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

impl Figures {
    fn time(&mut self, name: &'static str, ops: u64, f: impl FnOnce() -> Res<()>) -> Res<()> {
        let t = Instant::now();
        let c = thread_cpu_ns();
        let pc = process_cpu_ns();
        f()?;
        let s = t.elapsed().as_secs_f64();
        let cpu = (thread_cpu_ns() - c) as f64 / 1e9;
        let process_cpu = process_cpu_ns().saturating_sub(pc) as f64 / 1e9;
        self.0.entry(name).or_default().push(ops as f64 / s);
        if cpu > 0.0 {
            self.1.entry(name).or_default().push(ops as f64 / cpu);
        }
        if process_cpu > 0.0 {
            self.2
                .entry(name)
                .or_default()
                .push(ops as f64 / process_cpu);
        }
        Ok(())
    }
    fn median(&self, name: &str) -> f64 {
        median_of(&self.0, name)
    }
    fn median_on_cpu(&self, name: &str) -> f64 {
        median_of(&self.1, name)
    }
    fn median_on_process_cpu(&self, name: &str) -> f64 {
        median_of(&self.2, name)
    }
}

/// A markdown table of `figure` per workload and store, with the ratios of state-mmap (the
/// first store) to LMDB (the third) and RocksDB (the fourth).
fn print_table(
    results: &[(&str, Figures)],
    workloads: &[&str],
    figure: impl Fn(&Figures, &str) -> f64,
) {
    print!("| workload |");
    for (name, _) in results {
        print!(" {name} |");
    }
    println!(" mmap / LMDB | mmap / RocksDB |");
    println!("|---|{}---|---|", "---|".repeat(results.len()));
    let fmt = |x: f64| {
        if x >= 1e6 {
            format!("{:.2}M", x / 1e6)
        } else {
            format!("{:.0}k", x / 1e3)
        }
    };
    for &w in workloads {
        print!("| {w} |");
        for (_, f) in results {
            print!(" {} |", fmt(figure(f, w)));
        }
        let m = figure(&results[0].1, w);
        let ratio = |i: usize| match results.get(i).map(|r| figure(&r.1, w)) {
            Some(d) if d > 0.0 => format!("{:.2}", m / d),
            _ => "-".into(),
        };
        println!(" {} | {} |", ratio(2), ratio(3));
    }
}

fn median_of(m: &BTreeMap<&'static str, Vec<f64>>, name: &str) -> f64 {
    let mut v = m.get(name).cloned().unwrap_or_default();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The read workloads (all their work on the calling thread).
const READS: [&str; 5] = [
    "value get",
    "list get",
    "map get",
    "map contains",
    "map iterate(10)",
];

const WORKLOADS: [&str; 11] = [
    "value get",
    "value update",
    "value add",
    "list add",
    "list append",
    "list get",
    "list add_all(100)",
    "map get",
    "map contains",
    "map iterate(10)",
    "map put",
];

/// `set_current_key` alone over the same keys: what every operation pays before its state
/// access (measured on the backends, compared with Flink's `setCurrentKey` by
/// benches/flink-compare).
const NO_OP: &str = "no-op (set key)";

/// One machine-readable line per figure, `RESULT <backend> <workload> <ops/s>` (workload
/// names without spaces or the parenthesised counts), and `RESULT_CPU <backend> <workload>
/// <ops per second of the process's CPU time>`, printed with `PEER_BENCH_RESULT_LINES=1` for
/// benches/flink-compare.
fn print_result_lines(results: &[(&str, Figures)]) {
    for (name, figs) in results {
        let backend = match *name {
            "state-mmap" => "flowstate-mmap",
            "state-heap" => "flowstate-heap",
            "LMDB (heed)" => "lmdb",
            _ => "rocksdb",
        };
        for w in std::iter::once(NO_OP).chain(WORKLOADS) {
            let x = figs.median(w);
            if x > 0.0 {
                let token: String = w
                    .split('(')
                    .next()
                    .unwrap_or(w)
                    .trim()
                    .replace(' ', "_")
                    .replace('-', "");
                println!("RESULT {backend} {token} {x:.0}");
                let cpu = figs.median_on_process_cpu(w);
                if cpu > 0.0 {
                    println!("RESULT_CPU {backend} {token} {cpu:.0}");
                }
            }
        }
    }
}

/// Whether the read workloads run on settled stores (see the crate doc).
fn settle_before_reads() -> bool {
    std::env::var("PEER_BENCH_BACK_TO_BACK").map_or(true, |v| v.is_empty() || v == "0")
}

/// Runs the workloads in order. Before each read workload, `settle(&mut b, compact)` lets a
/// store finish its background work, and before the list get compact its state (`compact`
/// true), as flink-benchmarks does (see the crate doc); with `PEER_BENCH_BACK_TO_BACK=1` the
/// reads run right after the writes instead.
fn run_backend<B: KeyedStateBackend<Key = u64>>(
    figs: &mut Figures,
    mut b: B,
    n: u64,
    seed: u64,
    mut settle: impl FnMut(&mut B, bool) -> Res<()>,
) -> Res<()> {
    let settling = settle_before_reads();
    let mut settle = |b: &mut B, compact: bool| -> Res<()> {
        if settling {
            settle(b, compact)?;
        }
        Ok(())
    };
    let v = b.register_value(ValueStateDescriptor::<u64>::new("value")?)?;
    let l = b.register_list(ListStateDescriptor::<u64>::new("list")?)?;
    let m = b.register_map(MapStateDescriptor::<u64, u64>::new("map")?)?;
    for k in 0..n {
        b.set_current_key(k)?;
        b.value(&v).update(k)?;
        b.list(&l).add(k)?;
        b.map(&m)
            .put_all((0..MAP_ENTRIES).map(|i| (i, k + i)).collect())?;
    }
    let order = shuffled(n, seed);
    settle(&mut b, false)?;
    // The framework's share of every operation: selecting the key alone (not in the tables;
    // printed on its own line and as a RESULT line).
    figs.time(NO_OP, n, || {
        for &k in &order {
            b.set_current_key(k)?;
            // Every key's selection happens (the next one cannot make it dead).
            std::hint::black_box(&mut b);
        }
        Ok(())
    })?;
    // The value workloads go through a state bound once (`bind_value`), as flink-benchmarks'
    // ValueState benchmarks call `value()`/`update()` on a state object obtained in setup.
    figs.time("value get", n, || {
        let mut s = b.bind_value(&v, ())?;
        for &k in &order {
            s.set_current_key(k)?;
            std::hint::black_box(s.get()?);
        }
        Ok(())
    })?;
    figs.time("value update", n, || {
        let mut s = b.bind_value(&v, ())?;
        for &k in &order {
            s.set_current_key(k)?;
            s.update(k + 1)?;
        }
        Ok(())
    })?;
    figs.time("value add", n, || {
        let mut s = b.bind_value(&v, ())?;
        for &k in &order {
            s.set_current_key(k + n)?;
            s.update(k)?;
        }
        Ok(())
    })?;
    figs.time("list add", n, || {
        for &k in &order {
            b.set_current_key(k + n)?;
            b.list(&l).add(k)?;
        }
        Ok(())
    })?;
    figs.time("list append", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            b.list(&l).add(k)?;
        }
        Ok(())
    })?;
    settle(&mut b, true)?;
    figs.time("list get", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.list(&l).get()?);
        }
        Ok(())
    })?;
    let batch: Vec<u64> = (0..ADD_ALL).collect();
    let few = n / 10;
    figs.time("list add_all(100)", few, || {
        for &k in &order[..few as usize] {
            b.set_current_key(k + 2 * n)?;
            b.list(&l).add_all(batch.clone())?;
        }
        Ok(())
    })?;
    settle(&mut b, false)?;
    figs.time("map get", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.map(&m).get(&(k % MAP_ENTRIES))?);
        }
        Ok(())
    })?;
    settle(&mut b, false)?;
    figs.time("map contains", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.map(&m).contains(&(k % (2 * MAP_ENTRIES)))?);
        }
        Ok(())
    })?;
    settle(&mut b, false)?;
    figs.time("map iterate(10)", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            // Every entry read, as the iterator is advanced.
            for entry in b.map(&m).iter()? {
                std::hint::black_box(entry?);
            }
        }
        Ok(())
    })?;
    figs.time("map put", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            b.map(&m).put(k % MAP_ENTRIES, k)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// LMDB with the same key layout as the backends: `key group u16 | key u64` (+ `user key u64`
/// for maps), 8-byte values, lists as concatenated u64s; 10k operations per write transaction.
fn run_lmdb(figs: &mut Figures, n: u64, seed: u64) -> Res<()> {
    const TXN: usize = 10_000;
    let dir = tempfile::tempdir()?;
    // SAFETY: the directory is fresh and private to this process.
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(32 << 30)
            .max_dbs(4)
            .open(dir.path())?
    };
    let mut w = env.write_txn()?;
    let vdb: Database<Bytes, Bytes> = env.create_database(&mut w, Some("value"))?;
    let ldb: Database<Bytes, Bytes> = env.create_database(&mut w, Some("list"))?;
    let mdb: Database<Bytes, Bytes> = env.create_database(&mut w, Some("map"))?;
    w.commit()?;
    let key = |k: u64| {
        let kb = k.to_be_bytes();
        let kg = assign_to_key_group(&kb, MAX_PARALLELISM) as u16;
        let mut out = [0u8; 10];
        out[..2].copy_from_slice(&kg.to_be_bytes());
        out[2..].copy_from_slice(&kb);
        out
    };
    let mkey = |k: u64, uk: u64| {
        let mut out = [0u8; 18];
        out[..10].copy_from_slice(&key(k));
        out[10..].copy_from_slice(&uk.to_be_bytes());
        out
    };
    let mut w = env.write_txn()?;
    for k in 0..n {
        vdb.put(&mut w, &key(k), &k.to_be_bytes())?;
        ldb.put(&mut w, &key(k), &k.to_be_bytes())?;
        for i in 0..MAP_ENTRIES {
            mdb.put(&mut w, &mkey(k, i), &(k + i).to_be_bytes())?;
        }
    }
    w.commit()?;
    let order = shuffled(n, seed);
    // Writes in transactions of TXN operations.
    let write = |f: &mut dyn FnMut(&mut heed::RwTxn, u64) -> Res<()>, keys: &[u64]| -> Res<()> {
        for chunk in keys.chunks(TXN) {
            let mut w = env.write_txn()?;
            for &k in chunk {
                f(&mut w, k)?;
            }
            w.commit()?;
        }
        Ok(())
    };
    figs.time("value get", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            std::hint::black_box(vdb.get(&r, &key(k))?.map(|b| b.len()));
        }
        Ok(())
    })?;
    figs.time("value update", n, || {
        write(
            &mut |w, k| Ok(vdb.put(w, &key(k), &(k + 1).to_be_bytes())?),
            &order,
        )
    })?;
    figs.time("value add", n, || {
        write(
            &mut |w, k| Ok(vdb.put(w, &key(k + n), &k.to_be_bytes())?),
            &order,
        )
    })?;
    let append = |w: &mut heed::RwTxn, k: u64, add: &[u8]| -> Res<()> {
        let mut v = ldb.get(w, &key(k))?.map(<[u8]>::to_vec).unwrap_or_default();
        v.extend_from_slice(add);
        ldb.put(w, &key(k), &v)?;
        Ok(())
    };
    figs.time("list add", n, || {
        write(&mut |w, k| append(w, k + n, &k.to_be_bytes()), &order)
    })?;
    figs.time("list append", n, || {
        write(&mut |w, k| append(w, k, &k.to_be_bytes()), &order)
    })?;
    figs.time("list get", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            let v: Vec<u64> = ldb
                .get(&r, &key(k))?
                .unwrap_or_default()
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            std::hint::black_box(v);
        }
        Ok(())
    })?;
    let batch: Vec<u8> = (0..ADD_ALL).flat_map(|i| i.to_be_bytes()).collect();
    let few = n / 10;
    figs.time("list add_all(100)", few, || {
        write(
            &mut |w, k| append(w, k + 2 * n, &batch),
            &order[..few as usize],
        )
    })?;
    figs.time("map get", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            std::hint::black_box(mdb.get(&r, &mkey(k, k % MAP_ENTRIES))?.map(|b| b.len()));
        }
        Ok(())
    })?;
    figs.time("map contains", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            std::hint::black_box(mdb.get(&r, &mkey(k, k % (2 * MAP_ENTRIES)))?.is_some());
        }
        Ok(())
    })?;
    figs.time("map iterate(10)", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            let mut out = Vec::with_capacity(MAP_ENTRIES as usize);
            for e in mdb.prefix_iter(&r, &key(k))? {
                let (k, v) = e?;
                out.push((k.len(), v.len()));
            }
            std::hint::black_box(out);
        }
        Ok(())
    })?;
    figs.time("map put", n, || {
        write(
            &mut |w, k| Ok(mdb.put(w, &mkey(k, k % MAP_ENTRIES), &k.to_be_bytes())?),
            &order,
        )
    })?;
    Ok(())
}

/// RocksDB as Flink runs it: WAL off, a 256 MiB block cache, one column family per state
/// kind, lists through an appending merge operator.
#[cfg(feature = "rocksdb")]
fn run_rocksdb(figs: &mut Figures, n: u64, seed: u64) -> Res<()> {
    use rocksdb::{
        BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, MergeOperands,
        Options, WriteOptions, DB,
    };
    fn concat(_: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
        let mut v = existing.map(<[u8]>::to_vec).unwrap_or_default();
        for op in ops {
            v.extend_from_slice(op);
        }
        Some(v)
    }
    let dir = tempfile::tempdir()?;
    let cache = Cache::new_lru_cache(256 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    let mut cf = Options::default();
    cf.set_block_based_table_factory(&table);
    cf.set_merge_operator_associative("append", concat);
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let db = DB::open_cf_descriptors(
        &opts,
        dir.path(),
        ["value", "list", "map"].map(|n| ColumnFamilyDescriptor::new(n, cf.clone())),
    )?;
    let (vcf, lcf, mcf) = (
        db.cf_handle("value").ok_or("cf")?,
        db.cf_handle("list").ok_or("cf")?,
        db.cf_handle("map").ok_or("cf")?,
    );
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let key = |k: u64| {
        let kb = k.to_be_bytes();
        let kg = assign_to_key_group(&kb, MAX_PARALLELISM) as u16;
        let mut out = [0u8; 10];
        out[..2].copy_from_slice(&kg.to_be_bytes());
        out[2..].copy_from_slice(&kb);
        out
    };
    let mkey = |k: u64, uk: u64| {
        let mut out = [0u8; 18];
        out[..10].copy_from_slice(&key(k));
        out[10..].copy_from_slice(&uk.to_be_bytes());
        out
    };
    for k in 0..n {
        db.put_cf_opt(&vcf, key(k), k.to_be_bytes(), &wo)?;
        db.merge_cf_opt(&lcf, key(k), k.to_be_bytes(), &wo)?;
        for i in 0..MAP_ENTRIES {
            db.put_cf_opt(&mcf, mkey(k, i), (k + i).to_be_bytes(), &wo)?;
        }
    }
    // Before a read workload (see the crate doc): no flush or compaction running or pending
    // (polled: the crate has no wait); before the list get, every column family compacted.
    let settling = settle_before_reads();
    let settle = |compact: bool| -> Res<()> {
        if !settling {
            return Ok(());
        }
        if compact {
            for cf in [&vcf, &lcf, &mcf] {
                db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
            }
        }
        rocksdb_wait_idle(&db);
        Ok(())
    };
    let order = shuffled(n, seed);
    settle(false)?;
    figs.time("value get", n, || {
        for &k in &order {
            std::hint::black_box(db.get_pinned_cf(&vcf, key(k))?.map(|v| v.len()));
        }
        Ok(())
    })?;
    figs.time("value update", n, || {
        for &k in &order {
            db.put_cf_opt(&vcf, key(k), (k + 1).to_be_bytes(), &wo)?;
        }
        Ok(())
    })?;
    figs.time("value add", n, || {
        for &k in &order {
            db.put_cf_opt(&vcf, key(k + n), k.to_be_bytes(), &wo)?;
        }
        Ok(())
    })?;
    figs.time("list add", n, || {
        for &k in &order {
            db.merge_cf_opt(&lcf, key(k + n), k.to_be_bytes(), &wo)?;
        }
        Ok(())
    })?;
    figs.time("list append", n, || {
        for &k in &order {
            db.merge_cf_opt(&lcf, key(k), k.to_be_bytes(), &wo)?;
        }
        Ok(())
    })?;
    settle(true)?;
    figs.time("list get", n, || {
        for &k in &order {
            let v: Vec<u64> = db
                .get_pinned_cf(&lcf, key(k))?
                .map(|b| {
                    b.chunks_exact(8)
                        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect()
                })
                .unwrap_or_default();
            std::hint::black_box(v);
        }
        Ok(())
    })?;
    let batch: Vec<u8> = (0..ADD_ALL).flat_map(|i| i.to_be_bytes()).collect();
    let few = n / 10;
    figs.time("list add_all(100)", few, || {
        for &k in &order[..few as usize] {
            db.merge_cf_opt(&lcf, key(k + 2 * n), &batch, &wo)?;
        }
        Ok(())
    })?;
    settle(false)?;
    figs.time("map get", n, || {
        for &k in &order {
            std::hint::black_box(
                db.get_pinned_cf(&mcf, mkey(k, k % MAP_ENTRIES))?
                    .map(|v| v.len()),
            );
        }
        Ok(())
    })?;
    settle(false)?;
    figs.time("map contains", n, || {
        for &k in &order {
            std::hint::black_box(
                db.get_pinned_cf(&mcf, mkey(k, k % (2 * MAP_ENTRIES)))?
                    .is_some(),
            );
        }
        Ok(())
    })?;
    settle(false)?;
    figs.time("map iterate(10)", n, || {
        for &k in &order {
            let prefix = key(k);
            let mut out = Vec::with_capacity(MAP_ENTRIES as usize);
            for e in db.iterator_cf(&mcf, IteratorMode::From(&prefix, Direction::Forward)) {
                let (k, v) = e?;
                if !k.starts_with(&prefix) {
                    break;
                }
                out.push((k.len(), v.len()));
            }
            std::hint::black_box(out);
        }
        Ok(())
    })?;
    figs.time("map put", n, || {
        for &k in &order {
            db.put_cf_opt(&mcf, mkey(k, k % MAP_ENTRIES), k.to_be_bytes(), &wo)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Waits until RocksDB has no flush or compaction running or pending (polled: the crate has
/// no wait).
#[cfg(feature = "rocksdb")]
fn rocksdb_wait_idle(db: &rocksdb::DB) {
    let busy = |p: &str| db.property_int_value(p).ok().flatten().unwrap_or(0) > 0;
    while busy("rocksdb.compaction-pending")
        || busy("rocksdb.num-running-compactions")
        || busy("rocksdb.num-running-flushes")
        || busy("rocksdb.mem-table-flush-pending")
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Resident memory of the process from /proc/self/status: (peak total kB, current anonymous kB).
fn rss() -> (u64, u64) {
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

/// Bytes this process has caused to be read from the storage device so far (`read_bytes` of
/// /proc/self/io: page-cache misses, not reads served from the cache).
fn device_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Page faults of this process so far that had to wait for a device read (`majflt` of
/// /proc/self/stat): a get of a memory-mapped store that misses the page cache takes one per
/// page it reads.
fn major_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(9)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// CPU seconds so far: (this thread, the whole process), from /proc.
fn cpu() -> (f64, f64, f64) {
    // The calling thread's time on a CPU and time runnable but waiting for one (the first two
    // fields of schedstat, in nanoseconds).
    let sched: Vec<f64> = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .take(2)
                .filter_map(|x| x.parse::<f64>().ok())
                .map(|ns| ns / 1e9)
                .collect()
        })
        .unwrap_or_default();
    let thread = sched.first().copied().unwrap_or(0.0);
    let runnable = sched.get(1).copied().unwrap_or(0.0);
    // utime and stime (fields 14 and 15) in clock ticks, assumed 100 per second.
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0)
        / 100.0;
    (thread, process, runnable)
}

/// Prints a phase's wall and CPU time to stderr (the CPU figures do not depend on what else
/// runs on the machine), and how the foreground thread's wall time divides: on a CPU,
/// runnable but waiting for one (the machine's load), and blocked (waiting for background
/// work, the device, or reclaim in a memory cgroup).
fn phase(name: &str, ops: u64, start: Instant, cpu0: (f64, f64, f64)) -> (f64, f64, f64) {
    let now = cpu();
    let wall = start.elapsed().as_secs_f64();
    let (on_cpu, runnable) = (now.0 - cpu0.0, now.2 - cpu0.2);
    eprintln!(
        "{name}: {wall:.1} s wall, CPU per op: {:.2} us foreground, {:.2} us all threads; foreground {on_cpu:.1} s on a CPU, {runnable:.1} s waiting for one, {:.1} s blocked",
        on_cpu / ops as f64 * 1e6,
        (now.1 - cpu0.1) / ops as f64 * 1e6,
        (wall - on_cpu - runnable).max(0.0)
    );
    now
}

/// Prints the major page faults per get since `faults0` (stderr).
fn faults_per_get(ops: u64, faults0: u64) {
    eprintln!(
        "get: {:.3} major page faults per get",
        (major_faults() - faults0) as f64 / ops as f64
    );
}

/// Prints how long the background work left before the updates took (wall and CPU seconds).
fn settled_phase(before: &str, start: Instant, cpu0: (f64, f64, f64)) -> (f64, f64, f64) {
    let now = cpu();
    eprintln!(
        "background work before the {before}: {:.1} s wall, {:.1} s CPU",
        start.elapsed().as_secs_f64(),
        now.1 - cpu0.1
    );
    now
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    let m = e.metadata().ok();
                    if m.as_ref().is_some_and(|m| m.is_dir()) {
                        dir_size(&e.path())
                    } else {
                        m.map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Larger than the budget: `n` keys with 100-byte values, random gets and updates.
/// Prints the engine's counters and the bytes its flushes and compactions wrote (stderr).
fn engine_report(b: &MmapKeyedStateBackend<u64>) {
    eprintln!(
        "engine (flushes, compactions, runs, buffer): {:?}, bytes written (flush, compaction): {:?}, write stalls {:?}, charged to the budget: {} MiB (anon RSS {} MiB)",
        b.engine().stats(),
        b.engine().bytes_written(),
        b.engine().write_stalls(),
        b.engine().memory_charged() >> 20,
        rss().1 >> 10
    );
}

/// The seed of the batched gets' keys.
const BATCH_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// Prints the rate of a batched get phase and the device bytes it read per get (stderr).
fn batched_report(batch: usize, ops: u64, t: Instant, read0: u64) {
    eprintln!(
        "batched get ({batch} in flight): {:.1}k/s, {:.0} device bytes per get",
        ops as f64 / t.elapsed().as_secs_f64() / 1e3,
        (device_read_bytes() - read0) as f64 / ops as f64
    );
}

fn large(n: u64, budget_mib: usize, which: &str) -> Res<()> {
    let env_count = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let ops = env_count("PEER_BENCH_GETS").unwrap_or(n.min(2_000_000));
    // Updates run longer than gets: 2M updates of 100 bytes fill only a few write buffers, so
    // whether a compaction happened to run beside them decided much of the figure (1.4x and
    // 3.1x RocksDB in two runs of the same code). 10M updates (1 GB of writes) include several
    // flushes and compactions on both stores, and the flush of the last write buffer is timed.
    let update_ops = env_count("PEER_BENCH_UPDATES").unwrap_or(n.min(10_000_000));
    // Gets in batches: `batch` gets in flight, each key's block asked for (state-mmap:
    // `prefetch_value`) `batch` gets before it is read; RocksDB: `multi_get` of `batch` keys.
    // Other random keys than the single gets' (whose pages a small cache may still hold).
    let batch = env_count("PEER_BENCH_BATCH").unwrap_or(32) as usize;
    // Random keys from a generator, generated again for each phase: a shuffled array of 50M
    // keys would add 400 MB to the RSS being measured, even 2M keys 16 MB.
    let order_seeded = move |ops: u64, seed: u64| {
        let mut s = seed;
        (0..ops).map(move |_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        })
    };
    let order = |ops: u64| order_seeded(ops, 0x9e37_79b9_7f4a_7c15u64);
    let value = vec![7u8; 100];
    let dir = tempfile::tempdir()?;
    // Peak anonymous RSS, sampled every 10 ms on a thread of its own (a sample in the loops
    // would miss short peaks such as the end of a large compaction).
    let sampled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (sampled, stop) = (sampled.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sampled.fetch_max(rss().1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let mut peak_anon = 0u64;
    let t = Instant::now();
    let t0 = t;
    let c0 = cpu();
    // `update` stops at the flush of the last write buffer; `settled` also at the end of the
    // compactions the updates left (both stores start the update phase with no background
    // work: what the load left was finished before, untimed).
    let (load, get, update, settled, read_per_get);
    if which == "mmap" {
        let mut b = MmapKeyedStateBackend::<u64>::builder()
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .memory_budget(budget_mib << 20)
            .directory(dir.path())
            .build()?;
        let h = b.register_value(ValueStateDescriptor::<Vec<u8>>::new("v")?)?;
        for k in 0..n {
            b.set_current_key(k)?;
            b.value(&h).update(value.clone())?;
            if k % 1_000_000 == 0 {
                peak_anon = peak_anon.max(rss().1);
            }
        }
        b.flush()?;
        load = n as f64 / t.elapsed().as_secs_f64();
        let c = phase("load", n, t0, c0);
        engine_report(&b);
        // Gets read a settled store (untimed): a compaction left by the load would read
        // and write gigabytes beside them and count its reads as theirs.
        let t = Instant::now();
        b.wait_for_background_work()?;
        let c = settled_phase("gets", t, c);
        let t = Instant::now();
        let (read0, faults0) = (device_read_bytes(), major_faults());
        for k in order(ops) {
            b.set_current_key(k)?;
            std::hint::black_box(b.value(&h).get()?);
        }
        get = ops as f64 / t.elapsed().as_secs_f64();
        read_per_get = (device_read_bytes() - read0) as f64 / ops as f64;
        faults_per_get(ops, faults0);
        let c = phase("get", ops, t, c);
        engine_report(&b);
        peak_anon = peak_anon.max(rss().1);
        let c = if batch > 0 {
            let t = Instant::now();
            let read0 = device_read_bytes();
            let mut ahead = std::collections::VecDeque::with_capacity(batch + 1);
            for k in order_seeded(ops, BATCH_SEED) {
                b.set_current_key(k)?;
                b.prefetch_value(&h, &())?;
                ahead.push_back(k);
                if ahead.len() > batch {
                    if let Some(k) = ahead.pop_front() {
                        b.set_current_key(k)?;
                        std::hint::black_box(b.value(&h).get()?);
                    }
                }
            }
            for k in ahead {
                b.set_current_key(k)?;
                std::hint::black_box(b.value(&h).get()?);
            }
            batched_report(batch, ops, t, read0);
            phase("batched get", ops, t, c)
        } else {
            c
        };
        let t = Instant::now();
        b.wait_for_background_work()?;
        let c = settled_phase("updates", t, c);
        engine_report(&b);
        let t = Instant::now();
        for k in order(update_ops) {
            b.set_current_key(k)?;
            b.value(&h).update(value.clone())?;
            if k % 100_000 == 0 {
                peak_anon = peak_anon.max(rss().1);
            }
        }
        b.flush()?;
        update = update_ops as f64 / t.elapsed().as_secs_f64();
        phase("update", update_ops, t, c);
        engine_report(&b);
        b.wait_for_background_work()?;
        settled = update_ops as f64 / t.elapsed().as_secs_f64();
        phase("update and its compactions", update_ops, t, c);
        engine_report(&b);
    } else {
        #[cfg(feature = "rocksdb")]
        {
            use rocksdb::{BlockBasedOptions, Cache, Options, WriteOptions, DB};
            let budget = budget_mib << 20;
            let cache = Cache::new_lru_cache(budget / 2);
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.set_block_based_table_factory(&table);
            opts.set_write_buffer_size(budget / 8);
            opts.set_max_write_buffer_number(2);
            let db = DB::open(&opts, dir.path())?;
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            let key = |k: u64| {
                let kb = k.to_be_bytes();
                let kg = assign_to_key_group(&kb, MAX_PARALLELISM) as u16;
                let mut out = [0u8; 10];
                out[..2].copy_from_slice(&kg.to_be_bytes());
                out[2..].copy_from_slice(&kb);
                out
            };
            for k in 0..n {
                db.put_opt(key(k), &value, &wo)?;
                if k % 1_000_000 == 0 {
                    peak_anon = peak_anon.max(rss().1);
                }
            }
            db.flush()?;
            load = n as f64 / t.elapsed().as_secs_f64();
            let c = phase("load", n, t0, c0);
            let t = Instant::now();
            rocksdb_wait_idle(&db);
            let c = settled_phase("gets", t, c);
            let t = Instant::now();
            let (read0, faults0) = (device_read_bytes(), major_faults());
            for k in order(ops) {
                std::hint::black_box(db.get_pinned(key(k))?.map(|v| v.len()));
            }
            get = ops as f64 / t.elapsed().as_secs_f64();
            read_per_get = (device_read_bytes() - read0) as f64 / ops as f64;
            faults_per_get(ops, faults0);
            let c = phase("get", ops, t, c);
            peak_anon = peak_anon.max(rss().1);
            let c = if batch > 0 {
                let t = Instant::now();
                let read0 = device_read_bytes();
                let mut keys = Vec::with_capacity(batch);
                let mut it = order_seeded(ops, BATCH_SEED).peekable();
                while it.peek().is_some() {
                    keys.clear();
                    keys.extend(it.by_ref().take(batch).map(key));
                    for v in db.multi_get(&keys) {
                        std::hint::black_box(v?.map(|v| v.len()));
                    }
                }
                batched_report(batch, ops, t, read0);
                phase("batched get", ops, t, c)
            } else {
                c
            };
            let t = Instant::now();
            rocksdb_wait_idle(&db);
            let c = settled_phase("updates", t, c);
            let t = Instant::now();
            for k in order(update_ops) {
                db.put_opt(key(k), &value, &wo)?;
                if k % 100_000 == 0 {
                    peak_anon = peak_anon.max(rss().1);
                }
            }
            db.flush()?;
            update = update_ops as f64 / t.elapsed().as_secs_f64();
            phase("update", update_ops, t, c);
            rocksdb_wait_idle(&db);
            settled = update_ops as f64 / t.elapsed().as_secs_f64();
            phase("update and its compactions", update_ops, t, c);
        }
        #[cfg(not(feature = "rocksdb"))]
        {
            return Err("build with --features rocksdb".into());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let peak_anon = peak_anon.max(sampled.load(std::sync::atomic::Ordering::Relaxed));
    let (hwm, _) = rss();
    println!(
        "| {which} | {n} | {budget_mib} MiB | {:.0}k | {:.1}k | {:.0} B | {:.0}k | {:.0}k | {} MiB | {} MiB | {} MiB |",
        load / 1e3,
        get / 1e3,
        read_per_get,
        update / 1e3,
        settled / 1e3,
        peak_anon / 1024,
        hwm / 1024,
        dir_size(dir.path()) >> 20
    );
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("large") {
        let _ = args.next();
        let n: u64 = args
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(5_000_000);
        let budget: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
        let which = args.next().unwrap_or_else(|| "mmap".into());
        println!("| backend | keys | budget | load/s | random get/s | device bytes read per get | random update/s | update/s incl. its compactions | peak anon RSS | peak RSS (incl. mapped pages) | disk |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        return large(n, budget, &which);
    }
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(500_000);
    let rounds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let only: Option<String> = args.next();
    let want = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == name))
    };
    let mut results: Vec<(&str, Figures)> = Vec::new();
    let mut mmap = Figures::default();
    let mut heap = Figures::default();
    let mut lmdb = Figures::default();
    #[cfg_attr(not(feature = "rocksdb"), allow(unused_mut))]
    let mut rocks = Figures::default();
    for round in 0..rounds {
        let seed = 0x5eed + round;
        if want("mmap") {
            let b = MmapKeyedStateBackend::<u64>::builder()
                .key_serializer(FixedWidthSerializer::<u64>::new())
                .memory_budget(256 << 20)
                .build()?;
            run_backend(&mut mmap, b, n, seed, |b, compact| {
                if compact {
                    b.compact()?;
                } else {
                    b.wait_for_background_work()?;
                }
                Ok(())
            })?;
        }
        if want("heap") {
            let b = HeapKeyedStateBackend::<u64>::builder()
                .key_serializer(FixedWidthSerializer::<u64>::new())
                .build()?;
            run_backend(&mut heap, b, n, seed, |_, _| Ok(()))?;
        }
        if want("lmdb") {
            run_lmdb(&mut lmdb, n, seed)?;
        }
        #[cfg(feature = "rocksdb")]
        if want("rocksdb") {
            run_rocksdb(&mut rocks, n, seed)?;
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    results.push(("state-mmap", mmap));
    results.push(("state-heap", heap));
    results.push(("LMDB (heed)", lmdb));
    results.push(("RocksDB", rocks));
    println!(
        "{n} keys, {MAP_ENTRIES} map entries per key, add_all of {ADD_ALL}; median of {rounds} rounds, ops/s; {}",
        if settle_before_reads() {
            "reads on settled stores (log-structured stores finish background work before each read workload and compact before the list get, as flink-benchmarks does)"
        } else {
            "reads right after the writes (PEER_BENCH_BACK_TO_BACK)"
        }
    );
    print_table(&results, &WORKLOADS, Figures::median);
    println!();
    println!("Reads per second of the reading thread's CPU time (median; background threads not counted):");
    print_table(&results, &READS, Figures::median_on_cpu);
    for (name, figs) in &results {
        let x = figs.median(NO_OP);
        if x > 0.0 {
            println!("{name}: set_current_key alone {:.1} ns per key", 1e9 / x);
        }
    }
    if std::env::var("PEER_BENCH_RESULT_LINES").is_ok_and(|v| v == "1") {
        print_result_lines(&results);
    }
    Ok(())
}
