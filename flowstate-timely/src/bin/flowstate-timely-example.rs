//! A keyed windowed job on timely dataflow, for the crate's multi-process tests and as an
//! example: numbers from a split source, summed per key in event-time windows closed by
//! timers, checkpointed to a directory, with the final state's digest printed by process 0.
//!
//! ```text
//! flowstate-timely-example --dir /tmp/ck --events 20000 [--workers 2] \
//!     [--process 0 --hostfile hosts.txt] [--interval-ms 50] [--restore latest|none] \
//!     [--throttle-us 200] [--crash-after 5000] [--max-parallelism 128] [--connect-timeout-ms 30000]
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowstate_timely::cluster::run;
use flowstate_timely::{
    Checkpointing, Cluster, Job, JobConfig, KeyedContext, KeyedFunction, KeyedOptions, ReadOutcome,
    RestoreFrom, SourceOptions, SplitReader,
};
use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, ReducingStateDescriptor,
    ReducingStateHandle, Timer, ValueStateDescriptor, ValueStateHandle,
};
use state_heap::HeapKeyedStateBackend;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;

const SPLITS: u32 = 6;
const WINDOW: i64 = 1_000;

struct Args {
    dir: PathBuf,
    events: u64,
    workers: usize,
    process: usize,
    hostfile: Option<PathBuf>,
    interval_ms: u64,
    restore: String,
    throttle_us: u64,
    crash_after: Option<u64>,
    max_parallelism: u32,
    connect_timeout_ms: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::new(),
        events: 10_000,
        workers: 1,
        process: 0,
        hostfile: None,
        interval_ms: 100,
        restore: "latest".into(),
        throttle_us: 0,
        crash_after: None,
        max_parallelism: 128,
        connect_timeout_ms: 30_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: '{v}': {e}"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(value()?),
            "--events" => a.events = num(value()?)?,
            "--workers" => a.workers = num(value()?)? as usize,
            "--process" => a.process = num(value()?)? as usize,
            "--hostfile" => a.hostfile = Some(PathBuf::from(value()?)),
            "--interval-ms" => a.interval_ms = num(value()?)?,
            "--restore" => a.restore = value()?,
            "--throttle-us" => a.throttle_us = num(value()?)?,
            "--crash-after" => a.crash_after = Some(num(value()?)?),
            "--max-parallelism" => a.max_parallelism = num(value()?)? as u32,
            "--connect-timeout-ms" => a.connect_timeout_ms = num(value()?)?,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err("--dir is required".into());
    }
    Ok(a)
}

/// Split `s` holds the numbers `s, s + SPLITS, …` below `events`; number `n` has key
/// `n * 7919 % 97` and event time `n * 3` ms.
struct Numbers {
    events: u64,
    throttle: Duration,
    crash_after: Option<u64>,
    read: u64,
}

impl SplitReader for Numbers {
    type Item = (u64, u64, i64);
    fn read(
        &mut self,
        split: u32,
        offset: u64,
        max: usize,
        out: &mut Vec<((u64, u64, i64), i64)>,
    ) -> Result<ReadOutcome, String> {
        let mut o = offset;
        let at = |o: u64| u64::from(split) + o * u64::from(SPLITS);
        while out.len() < max.min(64) && at(o) < self.events {
            let n = at(o);
            let ts = n as i64 * 3;
            out.push(((n * 7919 % 97, n, ts), ts));
            o += 1;
        }
        self.read += out.len() as u64;
        if self.crash_after.is_some_and(|c| self.read >= c) {
            eprintln!("crashing on purpose after {} records", self.read);
            std::process::abort();
        }
        if !self.throttle.is_zero() {
            std::thread::sleep(self.throttle);
        }
        Ok(ReadOutcome {
            next_offset: o,
            finished: at(o) >= self.events,
        })
    }
}

struct States {
    window_sum: ReducingStateHandle<u64, i64>,
    totals: ValueStateHandle<(u64, u64), ()>,
}

struct WindowSums;

type B = HeapKeyedStateBackend<u64>;

impl KeyedFunction<B> for WindowSums {
    type Input = (u64, u64, i64);
    type Output = String;
    type States = States;
    type Namespace = i64;

    fn register(&mut self, b: &mut B) -> state_api::Result<States> {
        Ok(States {
            window_sum: b
                .register_reducing(ReducingStateDescriptor::new("window-sum", |a, b| a + b)?)?,
            totals: b.register_value(ValueStateDescriptor::new("totals")?)?,
        })
    }

    fn process(
        &mut self,
        ctx: &mut KeyedContext<'_, B, States, i64, String>,
        (_, n, ts): (u64, u64, i64),
    ) -> Result<(), String> {
        let window = ts - ts.rem_euclid(WINDOW);
        let (b, s) = ctx.parts();
        b.reducing_in(&s.window_sum, &window)
            .add(n)
            .map_err(|e| e.to_string())?;
        ctx.register_event_time_timer(&window, window + WINDOW - 1)
            .map_err(|e| e.to_string())
    }

    fn on_timer(
        &mut self,
        ctx: &mut KeyedContext<'_, B, States, i64, String>,
        t: Timer<u64, i64>,
    ) -> Result<(), String> {
        let (b, s) = ctx.parts();
        let sum = b
            .reducing_in(&s.window_sum, &t.namespace)
            .get()
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        b.reducing_in(&s.window_sum, &t.namespace)
            .clear()
            .map_err(|e| e.to_string())?;
        let (w, total) = b
            .value(&s.totals)
            .get()
            .map_err(|e| e.to_string())?
            .unwrap_or((0, 0));
        b.value(&s.totals)
            .update((w + 1, total + sum))
            .map_err(|e| e.to_string())
    }

    fn on_end(&mut self, ctx: &mut KeyedContext<'_, B, States, i64, String>) -> Result<(), String> {
        let (b, s) = ctx.parts();
        let keys: Vec<u64> = b
            .keys(&s.totals, &())
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        for k in keys {
            b.set_current_key(k).map_err(|e| e.to_string())?;
            let (w, total) = b
                .value(&s.totals)
                .get()
                .map_err(|e| e.to_string())?
                .unwrap_or((0, 0));
            lines.push(format!("key {k}: {w} windows, sum {total}"));
        }
        lines.into_iter().for_each(|l| ctx.emit(l));
        Ok(())
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    // Timely's threads may still be closing connections to peers that ended first.
    std::process::exit(0);
}

fn real_main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    let mut cluster = match &args.hostfile {
        Some(h) => Cluster::from_hostfile(h, args.process, args.workers)?,
        None => Cluster::single(args.workers),
    };
    cluster.connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    std::fs::create_dir_all(&args.dir)?;
    let url = format!("file://{}", std::fs::canonicalize(&args.dir)?.display());
    let storage = storage_s3::Storage::from_config(&storage_s3::StorageConfig::new(url))?;
    let storage = checkpoint::CheckpointStorage::from_storage(&storage, "keyed")?;
    let mut config = JobConfig::new(storage);
    config.max_parallelism = args.max_parallelism;
    config.checkpoint.interval = Some(Duration::from_millis(args.interval_ms.max(10)));
    config.checkpoint.retained = 2;
    config.restore = match args.restore.as_str() {
        "latest" => RestoreFrom::LatestIfAny,
        "none" => RestoreFrom::Nothing,
        other => return Err(format!("--restore: '{other}' is not latest or none").into()),
    };
    let job = Job::open(config)?;
    // The run's start is agreed when the workers start: the first worker of the process to
    // build its dataflow says what this process restores.
    let told = Arc::new(std::sync::Once::new());
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (events, throttle, crash_after) = (
        args.events,
        Duration::from_micros(args.throttle_us),
        args.crash_after,
    );
    let collected = Arc::clone(&lines);
    let worker_job = job.clone();
    run(&cluster, &job, move |worker| {
        let lines = Arc::clone(&collected);
        let job = worker_job.clone();
        told.call_once(|| match job.restored_id() {
            Some(id) => eprintln!(
                "run {}: starting from checkpoint {id}",
                job.run_epoch().unwrap_or(0)
            ),
            None => eprintln!(
                "run {}: starting from the beginning",
                job.run_epoch().unwrap_or(0)
            ),
        });
        flowstate_timely::cluster::dataflow(worker, move |scope| {
            let mut ck = Checkpointing::new(scope, &job);
            let mut source = SourceOptions::new("numbers", SPLITS);
            source.out_of_orderness = 50;
            // The last event's time: windows up to it close, as a single pass would close them.
            source.end_watermark = (events.saturating_sub(1) as i64) * 3 - 50;
            let numbers = ck.split_source(
                source,
                Numbers {
                    events,
                    throttle,
                    crash_after,
                    read: 0,
                },
            )?;
            let out = ck.keyed(
                numbers,
                KeyedOptions::new("sums", FixedWidthSerializer::<u64>::new()),
                |r: &(u64, u64, i64)| r.0,
                |range, maxp| {
                    HeapKeyedStateBackend::<u64>::builder()
                        .max_parallelism(maxp)
                        .key_group_range(range)
                        .key_serializer(FixedWidthSerializer::<u64>::new())
                        .build()
                        .map_err(|e| e.to_string())
                },
                WindowSums,
            )?;
            out.sink(
                Exchange::new(|_: &String| 0),
                "collect",
                move |(input, _)| {
                    input.for_each(|_, d| {
                        if let Ok(mut l) = lines.lock() {
                            l.extend(d.drain(..));
                        }
                    });
                },
            );
            ck.finish();
            Ok::<_, flowstate_timely::Error>(())
        })
    })?;
    if args.process == 0 {
        let mut lines = lines.lock().map_err(|_| "lines lock poisoned")?.clone();
        lines.sort();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        println!("keys: {}", lines.len());
        println!(
            "restored: {}",
            job.restored_id().map_or("-".to_string(), |i| i.to_string())
        );
        println!(
            "last checkpoint: {}",
            job.final_checkpoint()
                .map_or("-".to_string(), |i| i.to_string())
        );
        println!(
            "digest: {:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        );
    }
    Ok(())
}
