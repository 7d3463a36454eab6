//! The main job for now: a keyed, windowed count over generated click events on the heap
//! backend, with a checkpoint to local disk and a restore at another parallelism.
//!
//! 1. Two subtasks count clicks per user in 10-second tumbling windows (reducing state, the
//!    window as namespace) and keep each user's last click time (value state).
//! 2. Half-way, both subtasks snapshot; the snapshots are written to files on another thread
//!    while processing goes on.
//! 3. Three fresh subtasks restore from the two files (each keeps only its key groups) and
//!    process the rest of the events.
//! 4. Every (user, window) count is checked against a plain in-memory computation.
//!
//! ```text
//! cargo run --release -p flowstate --example windowed_count -- [EVENTS] [DIR]
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Instant;

use flowstate::api::{
    assign_to_key_group, operator_index_for_key_group, KeyGroupRange, KeyedStateBackend,
    KeyedStateBackendExt, PostcardSerializer, ReducingStateDescriptor, ReducingStateHandle,
    StateSerializer, ValueStateDescriptor, ValueStateHandle,
};
use flowstate::heap::HeapKeyedStateBackend;

const MAX_PARALLELISM: u32 = 128;
const USERS: u64 = 20_000;
const WINDOW_MS: u64 = 10_000;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A click: which user, when (ms). Deterministic, skewed towards low user ids.
fn event(i: u64) -> (u64, u64) {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 32;
    let user = (z % USERS) * (z % 3 + 1) / 3;
    (user, i * 3) // a click every 3 ms
}

struct Subtask {
    backend: HeapKeyedStateBackend<u64>,
    counts: ReducingStateHandle<u64, u64>,
    last_seen: ValueStateHandle<u64, ()>,
}

impl Subtask {
    fn new(parallelism: u32, index: u32) -> Result<Self, Error> {
        let mut backend = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(MAX_PARALLELISM)
            .key_group_range(KeyGroupRange::for_operator(
                MAX_PARALLELISM,
                parallelism,
                index,
            )?)
            .build()?;
        let counts = backend.register_reducing(ReducingStateDescriptor::<u64, u64>::new(
            "clicks-per-window",
            |a, b| a + b,
        )?)?;
        let last_seen = backend.register_value(ValueStateDescriptor::<u64>::new("last-seen")?)?;
        Ok(Subtask {
            backend,
            counts,
            last_seen,
        })
    }

    fn process(&mut self, user: u64, ts: u64) -> Result<(), Error> {
        self.backend.set_current_key(user)?;
        let window = ts - ts % WINDOW_MS;
        self.backend.reducing_in(&self.counts, &window).add(1)?;
        self.backend.value(&self.last_seen).update(ts)?;
        Ok(())
    }
}

/// Which subtask of `parallelism` owns `user`.
fn route(user: u64, parallelism: u32) -> Result<usize, Error> {
    let mut key = Vec::new();
    PostcardSerializer::<u64>::new().serialize(&user, &mut key)?;
    let kg = assign_to_key_group(&key, MAX_PARALLELISM);
    Ok(operator_index_for_key_group(MAX_PARALLELISM, parallelism, kg) as usize)
}

fn run(subtasks: &mut [Subtask], events: std::ops::Range<u64>) -> Result<(), Error> {
    let p = subtasks.len() as u32;
    for i in events {
        let (user, ts) = event(i);
        subtasks[route(user, p)?].process(user, ts)?;
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let total: u64 = match args.next() {
        Some(n) => n
            .parse()
            .map_err(|e| format!("EVENTS must be a number: {e}"))?,
        None => 2_000_000,
    };
    let dir: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("flowstate-windowed-count"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create checkpoint directory {}: {e}", dir.display()))?;
    let half = total / 2;
    let started = Instant::now();

    // Phase 1: two subtasks.
    let mut first: Vec<Subtask> = (0..2)
        .map(|i| Subtask::new(2, i))
        .collect::<Result<_, _>>()?;
    run(&mut first, 0..half)?;

    // Checkpoint: the synchronous part is short, the files are written on other threads.
    let t = Instant::now();
    let snapshots: Vec<_> = first
        .iter_mut()
        .map(|s| s.backend.snapshot())
        .collect::<Result<_, _>>()?;
    let pause = t.elapsed();
    let writers: Vec<_> = snapshots
        .into_iter()
        .enumerate()
        .map(|(i, snap)| {
            let path = dir.join(format!("chk-1-subtask-{i}.snapshot"));
            std::thread::spawn(move || -> Result<(PathBuf, u64), Error> {
                let file = File::create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                let mut out = BufWriter::new(file);
                let summary = snap.write_to(&mut out)?;
                out.into_inner()
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?
                    .sync_all()?;
                Ok((path, summary.bytes))
            })
        })
        .collect();
    // Processing would continue here while the files are written; the job just waits.
    let mut files = Vec::new();
    let mut bytes = 0;
    for w in writers {
        let (path, n) = w.join().map_err(|_| "snapshot writer thread panicked")??;
        bytes += n;
        files.push(path);
    }
    let entries: usize = first.iter().map(|s| s.backend.num_entries()).sum();
    println!(
        "checkpoint 1: {half} events on 2 subtasks, {entries} state entries, {bytes} bytes in {} files, synchronous pause {:?}",
        files.len(),
        pause
    );
    drop(first);

    // Phase 2: restore into three subtasks (rescale 2 -> 3) and go on.
    let t = Instant::now();
    let mut second: Vec<Subtask> = (0..3)
        .map(|i| Subtask::new(3, i))
        .collect::<Result<_, _>>()?;
    for s in &mut second {
        let streams = files
            .iter()
            .map(|p| {
                File::open(p)
                    .map(|f| (p.display().to_string(), std::io::BufReader::new(f)))
                    .map_err(|e| format!("cannot open {}: {e}", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        s.backend.restore(streams)?;
    }
    println!("restored into 3 subtasks in {:?}", t.elapsed());
    run(&mut second, half..total)?;

    // Verify every count against a plain computation over the same events.
    let mut expected: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for i in 0..total {
        let (user, ts) = event(i);
        *expected.entry((user, ts - ts % WINDOW_MS)).or_default() += 1;
        last.insert(user, ts);
    }
    for (&(user, window), &count) in &expected {
        let s = &mut second[route(user, 3)?];
        s.backend.set_current_key(user)?;
        let got = s.backend.reducing_in(&s.counts, &window).get()?;
        if got != Some(count) {
            return Err(
                format!("user {user} window {window}: expected {count}, got {got:?}").into(),
            );
        }
    }
    for (&user, &ts) in &last {
        let s = &mut second[route(user, 3)?];
        s.backend.set_current_key(user)?;
        if s.backend.value(&s.last_seen).get()? != Some(ts) {
            return Err(format!("user {user}: last-seen mismatch").into());
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ok: {total} events, {} (user, window) counts and {} users verified after restore at a new parallelism; {:.2} s, {:.0} events/s",
        expected.len(),
        last.len(),
        secs,
        total as f64 / secs
    );
    Ok(())
}
