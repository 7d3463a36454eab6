//! Delta checkpoints of the heap backend: every state kind (value, list, map, reducing,
//! aggregating, TTL, namespaces and their merging) and timers round-trip through a base and a
//! chain of deltas, at the same and other parallelisms; damaged or missing delta files are
//! clear errors; 1% of changed keys gives a small delta.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use checkpoint::*;
use common::{block_on, key_group_of, memory_storage, MAX_P};
use object_store::{ObjectStoreExt, PutPayload};
use state_api::*;
use state_heap::HeapKeyedStateBackend;

const WAIT: Duration = Duration::from_secs(30);
const KEYS: u64 = 600;

struct Avg;
impl AggregateFunction<u64, (u64, u64), u64> for Avg {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: u64, (s, c): (u64, u64)) -> (u64, u64) {
        (s + v, c + 1)
    }
    fn get_result(&self, (s, c): &(u64, u64)) -> u64 {
        s / (*c).max(1)
    }
    fn merge(&self, a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
        (a.0 + b.0, a.1 + b.1)
    }
}

struct Handles {
    v: ValueStateHandle<u64, u32>,
    l: ListStateHandle<String, u32>,
    m: MapStateHandle<u32, String, u32>,
    r: ReducingStateHandle<u64, u32>,
    a: AggregatingStateHandle<u64, u64, u32>,
    t: ValueStateHandle<u64, ()>,
    timers: TimerServiceHandle<u32>,
}

struct Task {
    b: HeapKeyedStateBackend<u64>,
    h: Handles,
}

fn backend(p: u32, i: u32, clock: &ManualClock) -> Task {
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(MAX_P)
        .key_group_range(KeyGroupRange::for_operator(MAX_P, p, i).unwrap())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let h = register(&mut b);
    Task { b, h }
}

fn register(b: &mut HeapKeyedStateBackend<u64>) -> Handles {
    Handles {
        v: b.register_value(ValueStateDescriptor::<u64, u32>::new("v").unwrap())
            .unwrap(),
        l: b.register_list(ListStateDescriptor::<String, u32>::new("l").unwrap())
            .unwrap(),
        m: b.register_map(MapStateDescriptor::<u32, String, u32>::new("m").unwrap())
            .unwrap(),
        r: b.register_reducing(
            ReducingStateDescriptor::<u64, u32>::new("r", |a, b| a + b).unwrap(),
        )
        .unwrap(),
        a: b.register_aggregating(
            AggregatingStateDescriptor::<u64, (u64, u64), u64, u32>::new("a", Avg).unwrap(),
        )
        .unwrap(),
        t: b.register_value(
            ValueStateDescriptor::<u64>::new("t")
                .unwrap()
                .with_ttl(StateTtlConfig::new(Duration::from_millis(1000))),
        )
        .unwrap(),
        timers: b
            .register_timer_service(TimerServiceDescriptor::<u32>::new("timers").unwrap())
            .unwrap(),
    }
}

/// Everything the states hold for `keys`, as text.
fn dump(tasks: &mut [Task], keys: u64) -> BTreeMap<(u64, u32), String> {
    let mut out = BTreeMap::new();
    for t in tasks {
        let range = t.b.key_group_range();
        for k in (0..keys).filter(|k| range.contains(key_group_of(*k))) {
            t.b.set_current_key(k).unwrap();
            let ttl = t.b.value(&t.h.t).get().unwrap();
            if ttl.is_some() {
                out.insert((k, 99), format!("{ttl:?}"));
            }
            for ns in 0..3u32 {
                let v = t.b.value_in(&t.h.v, &ns).get().unwrap();
                let l = t.b.list_in(&t.h.l, &ns).get().unwrap();
                let mut m =
                    t.b.map_in(&t.h.m, &ns)
                        .iter()
                        .unwrap()
                        .collect::<state_api::Result<Vec<_>>>()
                        .unwrap();
                m.sort();
                let r = t.b.reducing_in(&t.h.r, &ns).get().unwrap();
                let a = t.b.aggregating_in(&t.h.a, &ns).get().unwrap();
                if v.is_some() || l.is_some() || !m.is_empty() || r.is_some() || a.is_some() {
                    out.insert((k, ns), format!("{v:?} {l:?} {m:?} {r:?} {a:?}"));
                }
            }
        }
    }
    out
}

/// Every timer, popped from the restored backends.
fn fire_all(tasks: &mut [Task]) -> BTreeSet<(u64, u32, i64, bool)> {
    let mut out = BTreeSet::new();
    for t in tasks {
        for (domain, ev) in [
            (TimeDomain::EventTime, true),
            (TimeDomain::ProcessingTime, false),
        ] {
            for f in t.b.advance_time(&t.h.timers, domain, i64::MAX).unwrap() {
                out.insert((f.key, f.namespace, f.timestamp, ev));
            }
        }
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Random writes, removals, clears and merges on `share` of the keys; timers registered,
/// deleted and fired (the model follows).
fn mutate(
    tasks: &mut [Task],
    rng: &mut Rng,
    round: u64,
    share: u64,
    timers: &mut BTreeSet<(u64, u32, i64, bool)>,
) {
    for k in 0..KEYS {
        if rng.next(100) >= share {
            continue;
        }
        let t = tasks
            .iter_mut()
            .find(|t| t.b.key_group_range().contains(key_group_of(k)))
            .unwrap();
        let (b, h) = (&mut t.b, &t.h);
        b.set_current_key(k).unwrap();
        let ns = rng.next(3) as u32;
        match rng.next(14) {
            0 => b.value_in(&h.v, &ns).update(round * 1000 + k).unwrap(),
            1 => b.value_in(&h.v, &ns).clear().unwrap(),
            2 => b.list_in(&h.l, &ns).add(format!("{k}-{round}")).unwrap(),
            3 => b.list_in(&h.l, &ns).update(vec![]).unwrap(),
            4 => b
                .map_in(&h.m, &ns)
                .put(rng.next(4) as u32, format!("{round}"))
                .unwrap(),
            5 => b.map_in(&h.m, &ns).remove(&(rng.next(4) as u32)).unwrap(),
            6 => b.reducing_in(&h.r, &ns).add(round).unwrap(),
            7 => b.aggregating_in(&h.a, &ns).add(round * 10).unwrap(),
            8 => {
                b.reducing_in(&h.r, &0).merge_namespaces(&[1, 2]).unwrap();
                b.aggregating_in(&h.a, &0)
                    .merge_namespaces(&[1, 2])
                    .unwrap();
                b.list_in(&h.l, &0).merge_namespaces(&[1, 2]).unwrap();
            }
            9 => b.map_in(&h.m, &ns).clear().unwrap(),
            10 => b.value(&h.t).update(round).unwrap(),
            11 => {
                let ts = (round * 10 + rng.next(10)) as i64;
                let ev = rng.next(2) == 0;
                let mut tm = b.timers(&h.timers);
                if ev {
                    tm.register_event_time_timer(&ns, ts).unwrap();
                } else {
                    tm.register_processing_time_timer(&ns, ts).unwrap();
                }
                timers.insert((k, ns, ts, ev));
            }
            12 => {
                if let Some(&(_, tns, ts, ev)) = timers.range((k, 0, i64::MIN, false)..).next() {
                    if timers.range((k, 0, i64::MIN, false)..).next().map(|t| t.0) == Some(k) {
                        let mut tm = b.timers(&h.timers);
                        if ev {
                            tm.delete_event_time_timer(&tns, ts).unwrap();
                        } else {
                            tm.delete_processing_time_timer(&tns, ts).unwrap();
                        }
                        timers.remove(&(k, tns, ts, ev));
                    }
                }
            }
            _ => b.value_in(&h.v, &ns).update(k).unwrap(),
        }
    }
    // Fire the event-time timers of earlier rounds.
    let watermark = (round * 10) as i64 - 5;
    for t in tasks.iter_mut() {
        for f in
            t.b.advance_time(&t.h.timers, TimeDomain::EventTime, watermark)
                .unwrap()
        {
            assert!(timers.remove(&(f.key, f.namespace, f.timestamp, true)));
        }
    }
}

fn start(
    storage: &CheckpointStorage,
    p: u32,
    retained: usize,
) -> (CheckpointCoordinator, Vec<SubtaskEndpoint>) {
    let config = CheckpointConfig {
        incremental: true,
        retained,
        ..Default::default()
    };
    let mut b = CheckpointCoordinator::builder(storage.clone(), config);
    let eps = (0..p)
        .map(|i| b.register_subtask("agg", i, p, MAX_P).unwrap())
        .collect();
    (b.start().unwrap(), eps)
}

fn checkpoint(
    coord: &CheckpointCoordinator,
    eps: &mut [SubtaskEndpoint],
    tasks: &mut [Task],
) -> CompletedCheckpoint {
    let pending = coord.trigger_checkpoint().unwrap();
    for (ep, t) in eps.iter_mut().zip(tasks.iter_mut()) {
        loop {
            if let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).unwrap() {
                ep.snapshot_heap(&b, &mut t.b, None).unwrap();
                break;
            }
        }
    }
    let done = pending.wait(WAIT).unwrap();
    for ep in eps.iter_mut() {
        loop {
            if let SubtaskCommand::CheckpointComplete { checkpoint_id } =
                ep.recv_timeout(WAIT).unwrap()
            {
                if checkpoint_id == done.metadata.checkpoint_id {
                    break;
                }
            }
        }
    }
    done
}

fn restore(
    storage: &CheckpointStorage,
    c: &CompletedCheckpoint,
    p: u32,
    clock: &ManualClock,
) -> checkpoint::Result<Vec<Task>> {
    let mut out = Vec::new();
    for i in 0..p {
        let mut b = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(MAX_P)
            .key_group_range(KeyGroupRange::for_operator(MAX_P, p, i).unwrap())
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        c.restore_keyed(storage, "agg", i, &mut b)?;
        let h = register(&mut b);
        out.push(Task { b, h });
    }
    Ok(out)
}

fn delta_files(c: &CompletedCheckpoint) -> Vec<(KeyedStateFile, u32)> {
    c.metadata.operators[0]
        .subtasks
        .iter()
        .flat_map(|s| {
            s.keyed
                .iter()
                .flat_map(move |k| k.files.iter().map(move |f| (f.clone(), s.subtask)))
        })
        .filter(|(f, _)| f.header_bytes[4..6] == [0, 2])
        .collect()
}

#[test]
fn every_state_kind_and_timers_round_trip_through_base_and_deltas_at_any_parallelism() {
    let storage = memory_storage("job-delta");
    let clock = ManualClock::new(1_000_000);
    let (coord, mut eps) = start(&storage, 2, 2);
    let mut tasks: Vec<Task> = (0..2).map(|i| backend(2, i, &clock)).collect();
    let mut rng = Rng(7);
    let mut timers = BTreeSet::new();
    mutate(&mut tasks, &mut rng, 1, 100, &mut timers);
    let mut saw_tombstones = false;
    let mut saw_chain = 0;
    for round in 1..=7u64 {
        if round > 1 {
            mutate(&mut tasks, &mut rng, round, 8, &mut timers);
        }
        if round == 4 {
            // Some TTL values expire.
            clock.advance(700);
        }
        let expected = dump(&mut tasks, KEYS);
        let done = checkpoint(&coord, &mut eps, &mut tasks);
        let deltas = delta_files(&done);
        saw_tombstones |= deltas.iter().any(|(f, _)| !f.tombstones.is_empty());
        saw_chain = saw_chain.max(deltas.len());
        for p in [1, 2, 3] {
            let mut restored = restore(&storage, &done, p, &clock).unwrap();
            assert_eq!(dump(&mut restored, KEYS), expected, "round {round}, p {p}");
            assert_eq!(
                fire_all(&mut restored),
                timers,
                "timers, round {round}, p {p}"
            );
        }
    }
    assert!(saw_tombstones, "no delta removed anything");
    assert!(saw_chain >= 2, "deltas did not chain: {saw_chain}");
    coord.shutdown().unwrap();
}

#[test]
fn a_damaged_or_missing_delta_file_is_a_clear_error() {
    let storage = memory_storage("job-delta-bad");
    let clock = ManualClock::new(0);
    let (coord, mut eps) = start(&storage, 1, 1);
    let mut tasks = vec![backend(1, 0, &clock)];
    let mut rng = Rng(3);
    let mut timers = BTreeSet::new();
    mutate(&mut tasks, &mut rng, 1, 100, &mut timers);
    checkpoint(&coord, &mut eps, &mut tasks);
    mutate(&mut tasks, &mut rng, 2, 10, &mut timers);
    let done = checkpoint(&coord, &mut eps, &mut tasks);
    let (f, _) = delta_files(&done).into_iter().next().expect("a delta file");
    let path = done.file_path(&f.file.location);
    let store = storage.store();
    let original = block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() });
    let clean = restore(&storage, &done, 1, &clock);
    assert!(clean.is_ok());

    // A flipped byte inside a block of the delta.
    let block = f.key_groups.first().or(f.tombstones.first()).unwrap();
    let mut bad = original.to_vec();
    bad[(block.offset + block.length / 2) as usize] ^= 0x55;
    block_on(async { store.put(&path, PutPayload::from(bad)).await.unwrap() });
    let err = restore(&storage, &done, 1, &clock)
        .err()
        .expect("damage detected");
    let msg = err.to_string();
    assert!(
        msg.contains(f.file.location.name()) && msg.contains("checksum"),
        "{msg}"
    );

    // The delta file is gone.
    block_on(async { store.delete(&path).await.unwrap() });
    let err = restore(&storage, &done, 1, &clock)
        .err()
        .expect("missing file detected");
    assert!(
        matches!(err, checkpoint::Error::MissingFile { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(f.file.location.name()), "{err}");
    coord.shutdown().unwrap();
}

#[test]
fn one_percent_of_changed_keys_makes_a_small_delta() {
    let storage = memory_storage("job-delta-size");
    let clock = ManualClock::new(0);
    let (coord, mut eps) = start(&storage, 1, 2);
    let mut tasks = vec![backend(1, 0, &clock)];
    const N: u64 = 20_000;
    let t = &mut tasks[0];
    for k in 0..N {
        t.b.set_current_key(k).unwrap();
        t.b.value_in(&t.h.v, &0).update(k).unwrap();
    }
    let first = checkpoint(&coord, &mut eps, &mut tasks);
    let full: u64 = first.metadata.files().map(|f| f.size).sum();
    let t = &mut tasks[0];
    for k in (0..N).step_by(100) {
        t.b.set_current_key(k).unwrap();
        t.b.value_in(&t.h.v, &0).update(k + 1).unwrap();
    }
    // One removal too.
    t.b.set_current_key(1).unwrap();
    t.b.value_in(&t.h.v, &0).clear().unwrap();
    let second = checkpoint(&coord, &mut eps, &mut tasks);
    let delta: u64 = delta_files(&second).iter().map(|(f, _)| f.file.size).sum();
    assert!(delta > 0);
    assert!(
        delta * 100 < full * 3,
        "delta of {delta} bytes for a full snapshot of {full}"
    );
    let mut restored = restore(&storage, &second, 1, &clock).unwrap();
    assert_eq!(dump(&mut restored, N), dump(&mut tasks, N));
    coord.shutdown().unwrap();
}
