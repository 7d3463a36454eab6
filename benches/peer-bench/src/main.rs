//! Flink-style keyed state benchmarks (flink-benchmarks `StateBenchmarkConstants`): value
//! get/update/add, list add/append/get/add_all, map get/put/contains/iterate, on state-mmap,
//! state-heap and LMDB (heed), same process, same keys, fixed seed. Prints ops/s; asserts no
//! timing.
//!
//! `cargo run --release -- [keys] [rounds]` (default 500000 keys, 3 rounds, median printed).

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

#[derive(Default)]
struct Figures(BTreeMap<&'static str, Vec<f64>>);

impl Figures {
    fn time(&mut self, name: &'static str, ops: u64, f: impl FnOnce() -> Res<()>) -> Res<()> {
        let t = Instant::now();
        f()?;
        let s = t.elapsed().as_secs_f64();
        self.0.entry(name).or_default().push(ops as f64 / s);
        Ok(())
    }
    fn median(&self, name: &str) -> f64 {
        let mut v = self.0.get(name).cloned().unwrap_or_default();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

const WORKLOADS: [&str; 11] = [
    "value get",
    "value update",
    "value add",
    "list add",
    "list append",
    "list get",
    "list add_all(100)",
    "map get",
    "map put",
    "map contains",
    "map iterate(10)",
];

fn run_backend<B: KeyedStateBackend<Key = u64>>(
    figs: &mut Figures,
    mut b: B,
    n: u64,
    seed: u64,
) -> Res<()> {
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
    figs.time("value get", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.value(&v).get()?);
        }
        Ok(())
    })?;
    figs.time("value update", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            b.value(&v).update(k + 1)?;
        }
        Ok(())
    })?;
    figs.time("value add", n, || {
        for &k in &order {
            b.set_current_key(k + n)?;
            b.value(&v).update(k)?;
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
    figs.time("map get", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.map(&m).get(&(k % MAP_ENTRIES))?);
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
    figs.time("map contains", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.map(&m).contains(&(k % (2 * MAP_ENTRIES)))?);
        }
        Ok(())
    })?;
    figs.time("map iterate(10)", n, || {
        for &k in &order {
            b.set_current_key(k)?;
            std::hint::black_box(b.map(&m).iter()?);
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
        write(&mut |w, k| Ok(vdb.put(w, &key(k + n), &k.to_be_bytes())?), &order)
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
        write(&mut |w, k| append(w, k + 2 * n, &batch), &order[..few as usize])
    })?;
    figs.time("map get", n, || {
        let r = env.read_txn()?;
        for &k in &order {
            std::hint::black_box(mdb.get(&r, &mkey(k, k % MAP_ENTRIES))?.map(|b| b.len()));
        }
        Ok(())
    })?;
    figs.time("map put", n, || {
        write(
            &mut |w, k| Ok(mdb.put(w, &mkey(k, k % MAP_ENTRIES), &k.to_be_bytes())?),
            &order,
        )
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
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500_000);
    let rounds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let only: Option<String> = args.next();
    let want = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == name));
    let mut results: Vec<(&str, Figures)> = Vec::new();
    let mut mmap = Figures::default();
    let mut heap = Figures::default();
    let mut lmdb = Figures::default();
    for round in 0..rounds {
        let seed = 0x5eed + round;
        if want("mmap") {
            let b = MmapKeyedStateBackend::<u64>::builder()
                .key_serializer(FixedWidthSerializer::<u64>::new())
                .memory_budget(256 << 20)
                .build()?;
            run_backend(&mut mmap, b, n, seed)?;
        }
        if want("heap") {
            let b = HeapKeyedStateBackend::<u64>::builder()
                .key_serializer(FixedWidthSerializer::<u64>::new())
                .build()?;
            run_backend(&mut heap, b, n, seed)?;
        }
        if want("lmdb") {
            run_lmdb(&mut lmdb, n, seed)?;
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    results.push(("state-mmap", mmap));
    results.push(("state-heap", heap));
    results.push(("LMDB (heed)", lmdb));
    println!(
        "{n} keys, {MAP_ENTRIES} map entries per key, add_all of {ADD_ALL}; median of {rounds} rounds, ops/s"
    );
    print!("| workload |");
    for (name, _) in &results {
        print!(" {name} |");
    }
    println!(" mmap / LMDB | mmap / heap |");
    println!("|---|{}---|---|", "---|".repeat(results.len()));
    let fmt = |x: f64| {
        if x >= 1e6 {
            format!("{:.2}M", x / 1e6)
        } else {
            format!("{:.0}k", x / 1e3)
        }
    };
    for w in WORKLOADS {
        print!("| {w} |");
        for (_, f) in &results {
            print!(" {} |", fmt(f.median(w)));
        }
        let m = results[0].1.median(w);
        let ratio = |d: f64| if d > 0.0 { format!("{:.2}", m / d) } else { "-".into() };
        println!(" {} | {} |", ratio(results[2].1.median(w)), ratio(results[1].1.median(w)));
    }
    Ok(())
}
