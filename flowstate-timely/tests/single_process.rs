//! One process (its workers are threads of the test): the keyed operator on the mmap backend
//! gives the heap backend's result, a heap checkpoint restores into mmap backends at another
//! worker count, and processing-time timers fire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoint::CheckpointStorage;
use flowstate_timely::cluster::{dataflow, run};
use flowstate_timely::*;
use state_api::checkpointing::CheckpointableBackend;
use state_api::{
    FixedWidthSerializer, KeyedStateBackendExt, ReducingStateDescriptor, ReducingStateHandle, Timer,
};
use timely::dataflow::operators::Inspect;

/// Split `s` of 4 holds `s, s + 4, …` below `end`; event time = the number; reads sleep
/// `pause` (so the input lasts a while).
#[derive(Clone)]
struct Numbers {
    end: u64,
    pause: Duration,
}

impl SplitReader for Numbers {
    type Item = u64;
    fn read(
        &mut self,
        split: u32,
        offset: u64,
        max: usize,
        out: &mut Vec<(u64, i64)>,
    ) -> Result<ReadOutcome, String> {
        let at = |o: u64| u64::from(split) + 4 * o;
        let mut o = offset;
        while out.len() < max.min(50) && at(o) < self.end {
            out.push((at(o), at(o) as i64));
            o += 1;
        }
        std::thread::sleep(self.pause);
        Ok(ReadOutcome {
            next_offset: o,
            finished: at(o) >= self.end,
        })
    }
}

/// Sums per key `n % 13`; emits `(key, sum)` at the end, and `(key, u64::MAX)` when the
/// processing-time timer of a key fires.
struct Sums {
    processing_timer: bool,
}

impl<B: CheckpointableBackend<Key = u64>> KeyedFunction<B> for Sums {
    type Input = u64;
    type Output = (u64, u64);
    type States = ReducingStateHandle<u64, ()>;
    type Namespace = ();
    fn register(&mut self, b: &mut B) -> state_api::Result<Self::States> {
        b.register_reducing(ReducingStateDescriptor::new("sum", |a, b| a + b)?)
    }
    fn process(
        &mut self,
        ctx: &mut KeyedContext<'_, B, Self::States, (), (u64, u64)>,
        n: u64,
    ) -> Result<(), String> {
        let (b, sum) = ctx.parts();
        let first = b.reducing(sum).get().map_err(|e| e.to_string())?.is_none();
        b.reducing(sum).add(n).map_err(|e| e.to_string())?;
        if first && self.processing_timer {
            ctx.register_processing_time_timer(&(), job::now_millis() + 5)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn on_timer(
        &mut self,
        ctx: &mut KeyedContext<'_, B, Self::States, (), (u64, u64)>,
        t: Timer<u64, ()>,
    ) -> Result<(), String> {
        assert_eq!(t.domain, state_api::TimeDomain::ProcessingTime);
        ctx.emit((t.key, u64::MAX));
        Ok(())
    }
    fn on_end(
        &mut self,
        ctx: &mut KeyedContext<'_, B, Self::States, (), (u64, u64)>,
    ) -> Result<(), String> {
        let (b, sum) = ctx.parts();
        let keys: Vec<u64> = b
            .keys(sum, &())
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for k in keys {
            b.set_current_key(k).map_err(|e| e.to_string())?;
            out.push((
                k,
                b.reducing(sum)
                    .get()
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0),
            ));
        }
        out.into_iter().for_each(|r| ctx.emit(r));
        Ok(())
    }
}

enum Backend {
    Heap,
    Mmap,
}

fn run_sums(
    dir: &std::path::Path,
    workers: usize,
    end: u64,
    backend: Backend,
    processing_timer: bool,
) -> (Vec<(u64, u64)>, Job) {
    std::fs::create_dir_all(dir).expect("dir");
    let store =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).expect("store"));
    let storage = CheckpointStorage::new(store, "checkpoints", "sums").expect("storage");
    let mut config = JobConfig::new(storage);
    config.checkpoint.interval = Some(Duration::from_millis(30));
    let job = Job::open(config).expect("open");
    let out = Arc::new(Mutex::new(Vec::new()));
    let (seen, worker_job) = (Arc::clone(&out), job.clone());
    let pause = Duration::from_millis(if processing_timer { 5 } else { 0 });
    let env = state_mmap::MmapEnvironment::new(state_mmap::EnvOptions::default()).expect("env");
    let use_mmap = matches!(backend, Backend::Mmap);
    run(&Cluster::single(workers), &job, move |worker| {
        let (seen, job, env) = (Arc::clone(&seen), worker_job.clone(), env.clone());
        dataflow(worker, move |scope| {
            let mut ck = Checkpointing::new(scope, &job);
            let numbers =
                ck.split_source(SourceOptions::new("numbers", 4), Numbers { end, pause })?;
            let options = || {
                let mut o = KeyedOptions::new("sums", FixedWidthSerializer::<u64>::new());
                o.processing_time_interval = Some(Duration::from_millis(5));
                o
            };
            let key = |n: &u64| n % 13;
            let sums = Sums { processing_timer };
            let out = if use_mmap {
                let make = backends::mmap(FixedWidthSerializer::<u64>::new(), env, None);
                ck.keyed(numbers, options(), key, make, sums)?
            } else {
                let make = backends::heap(FixedWidthSerializer::<u64>::new());
                ck.keyed(numbers, options(), key, make, sums)?
            };
            out.inspect(move |r| seen.lock().expect("not poisoned").push(*r));
            ck.finish();
            Ok(())
        })
    })
    .expect("the job runs");
    let mut out = out.lock().expect("not poisoned").clone();
    out.sort_unstable();
    (out, job)
}

fn expected(end: u64) -> Vec<(u64, u64)> {
    let mut sums = [0u64; 13];
    for n in 0..end {
        sums[(n % 13) as usize] += n;
    }
    (0..13).map(|k| (k, sums[k as usize])).collect()
}

#[test]
fn mmap_backend_gives_the_heap_result_and_restores_a_heap_checkpoint_at_another_worker_count() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (heap, job) = run_sums(&tmp.path().join("heap"), 2, 3_000, Backend::Heap, false);
    assert_eq!(heap, expected(3_000));
    assert!(job.final_checkpoint().is_some());
    let (mmap, _) = run_sums(&tmp.path().join("mmap"), 3, 3_000, Backend::Mmap, false);
    assert_eq!(mmap, heap);
    // The heap run's last checkpoint, restored into three mmap workers, continues to 6000.
    let (more, job) = run_sums(&tmp.path().join("heap"), 3, 6_000, Backend::Mmap, false);
    assert!(job.restored_id().is_some());
    assert_eq!(more, expected(6_000));
}

#[test]
fn processing_time_timers_fire_while_the_input_lasts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (out, _) = run_sums(tmp.path(), 2, 2_000, Backend::Heap, true);
    let fired: Vec<u64> = out
        .iter()
        .filter(|r| r.1 == u64::MAX)
        .map(|r| r.0)
        .collect();
    assert_eq!(fired, (0..13).collect::<Vec<_>>(), "one timer per key");
    let sums: Vec<(u64, u64)> = out.into_iter().filter(|r| r.1 != u64::MAX).collect();
    assert_eq!(sums, expected(2_000));
}
