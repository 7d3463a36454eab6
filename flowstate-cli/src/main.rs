//! The `flowstate` command-line tool: run the Nexmark job, list and inspect checkpoints,
//! convert and rescale savepoints, read one key offline.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use flowstate::config::{BackendKind, Config, ConfigLoader};
use flowstate_cli::job::{self, JobError, JobOptions, RestoreFrom};
use flowstate_cli::{history, state, timely_job, tools};

/// Writes a line to standard output; a closed one ends the command quietly (see `main`).
macro_rules! outln {
    ($($arg:tt)*) => {
        tools::print_line(format_args!($($arg)*))?
    };
}

const EXAMPLES_RUN: &str = "Examples:
  flowstate run
  flowstate run --events 5000000 --parallelism 4 --checkpoint-dir file:///tmp/fs-ckpt
  flowstate run --fail-after 300000          # crash, then recover from the latest checkpoint
  flowstate run --restore latest --events 4000000
  flowstate run --config flowstate.toml --backend mmap
  flowstate run --engine timely --processes 3 --workers 2   # 3 local processes on 127.0.0.1
  flowstate run --engine timely --process 1 --hostfile hosts.txt --workers 4   # one of several machines";

const EXAMPLES_CHECKPOINTS: &str = "Examples:
  flowstate checkpoints list /tmp/flowstate-$USER/checkpoints
  flowstate checkpoints history /tmp/flowstate-$USER/checkpoints --plot history.svg
  flowstate checkpoints inspect /tmp/flowstate-$USER/checkpoints/nexmark/chk-7 --json";

const EXAMPLES_SAVEPOINT: &str = "Examples:
  flowstate savepoint /tmp/flowstate-$USER/checkpoints/nexmark/chk-7 --to /tmp/flowstate-$USER/savepoints
  flowstate savepoint /tmp/ck/nexmark/chk-7 --to /tmp/sp --backend mmap --parallelism 3
  flowstate savepoint /tmp/ck/clicks/chk-9 --operator counts --allow-non-restored-state
    (--to defaults to state.savepoints.dir)";

const EXAMPLES_STATE: &str = "Examples:
  flowstate state get /tmp/flowstate-$USER/checkpoints/nexmark/chk-7 --state spend --key 1001
  flowstate state get /tmp/sp/savepoints/savepoint-3 --state window-bids --key 1005 --namespace 1000
  flowstate state get /tmp/sp/savepoints/savepoint-3 --state counts --key user-42 --operator sessions";

const EXAMPLES_STATE_LIST: &str = "Examples:
  flowstate state list /tmp/flowstate-$USER/checkpoints/nexmark/chk-7
  flowstate state list s3://bucket/ck/clicks/chk-12 --json --config flowstate.toml";

const EXAMPLES_STATE_DUMP: &str = "Examples:
  flowstate state dump /tmp/flowstate-$USER/checkpoints/nexmark/chk-7 > state.jsonl
  flowstate state dump /tmp/sp/savepoints/savepoint-3 --operator bidders --state spend -o spend.jsonl";

/// Keyed state, checkpoints and savepoints for stream processors.
#[derive(Parser, Debug)]
#[command(name = "flowstate", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Show the library's log events: -v info, -vv debug, -vvv trace (RUST_LOG, when set,
    /// decides instead, e.g. RUST_LOG=checkpoint=debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors: no progress bar, no log events below error.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Nexmark job (per-auction windowed bids, per-person running spend) with checkpoints.
    #[command(after_help = EXAMPLES_RUN)]
    Run(RunArgs),
    /// List or inspect checkpoints, or show every attempt's history.
    #[command(subcommand, after_help = EXAMPLES_CHECKPOINTS)]
    Checkpoints(CheckpointsCmd),
    /// Write a savepoint of a checkpoint or savepoint, on another backend or parallelism.
    #[command(after_help = EXAMPLES_SAVEPOINT)]
    Savepoint(SavepointArgs),
    /// Read any job's state offline: list, dump, get.
    #[command(subcommand, after_help = EXAMPLES_STATE)]
    State(StateCmd),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DumpFormatArg {
    /// JSON Lines: one JSON object per entry.
    Jsonl,
    /// Apache Parquet: one row per entry.
    Parquet,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Heap,
    Mmap,
}

impl From<BackendArg> for BackendKind {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Heap => BackendKind::Heap,
            BackendArg::Mmap => BackendKind::Mmap,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// This process's threads, one coordinator (the default).
    Threads,
    /// Timely dataflow: workers in one or several processes, epochs as barriers.
    Timely,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where the job runs: `threads` of this process, or `timely` dataflow across processes.
    #[arg(long, value_enum, default_value = "threads")]
    engine: EngineArg,
    /// timely: local processes to start on 127.0.0.1 (a hostfile with free ports is written).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// timely: worker threads per process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// timely: run only process `i` of the hostfile (a multi-machine deployment).
    #[arg(long, requires = "hostfile")]
    process: Option<usize>,
    /// timely: `host:port` of every process, one a line, in process order.
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// State backend (overrides state.backend).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Checkpoint directory URL or path (overrides state.checkpoints.dir).
    #[arg(long)]
    checkpoint_dir: Option<String>,
    /// Stop when the source offset reaches this many events.
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Parallelism of the keyed operators.
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// Configuration file (TOML; default: ./flowstate.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Restore from `latest` or from a checkpoint/savepoint path.
    #[arg(long)]
    restore: Option<String>,
    /// Simulate a crash after this many events, then recover from the latest checkpoint
    /// (with --engine timely: the last local process crashes once it read its share of this
    /// many events and a checkpoint completed, then every process starts again from the
    /// latest checkpoint).
    #[arg(long)]
    fail_after: Option<u64>,
    /// Checkpoint interval (overrides state.checkpoints.interval), e.g. 500ms.
    #[arg(long)]
    interval: Option<String>,
    /// Job id: the directory under the checkpoint root.
    #[arg(long, default_value = "nexmark")]
    job: String,
    /// Internal: crash after this many events (used by --fail-after).
    #[arg(long, hide = true)]
    crash_after: Option<u64>,
    /// Internal: restore the latest checkpoint if there is one (the restart of --fail-after).
    #[arg(long, hide = true)]
    restore_if_any: bool,
    /// Internal (tests): timely sources read batches of 64 events and sleep this many
    /// microseconds after each, so that a small input lasts long enough for faults injected
    /// mid-run.
    #[arg(long, hide = true, default_value_t = 0)]
    read_delay_us: u64,
    /// Internal (benchmarks, --engine timely): bytes of padding stored with every person's
    /// city, for more state (left out of the digest).
    #[arg(long, hide = true, default_value_t = 0)]
    state_padding: usize,
}

#[derive(Subcommand, Debug)]
enum CheckpointsCmd {
    /// Completed checkpoints of a job: id, time, size, full/incremental, duration.
    #[command(
        after_help = "Example:\n  flowstate checkpoints list /tmp/flowstate-$USER/checkpoints --job nexmark"
    )]
    List {
        /// The checkpoint root (URL or path).
        dir: String,
        /// The job id.
        #[arg(long, default_value = "nexmark")]
        job: String,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Every checkpoint attempt of a job (the last 1,000): completed, aborted or declined with
    /// the reason, duration, sizes, slowest subtask's synchronous and asynchronous parts.
    #[command(
        after_help = "Examples:\n  flowstate checkpoints history /tmp/flowstate-$USER/checkpoints\n  flowstate checkpoints history /tmp/flowstate-$USER/checkpoints --json\n  flowstate checkpoints history /tmp/flowstate-$USER/checkpoints --plot history.svg"
    )]
    History {
        /// The checkpoint root (URL or path).
        dir: String,
        /// The job id.
        #[arg(long, default_value = "nexmark")]
        job: String,
        /// Machine-readable JSON, with every subtask.
        #[arg(long)]
        json: bool,
        /// Also draw durations and sizes over time, failures marked, into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Operators, states (kind, serializers), key groups, entries and bytes of a checkpoint or savepoint.
    #[command(
        after_help = "Examples:\n  flowstate checkpoints inspect /tmp/flowstate-$USER/checkpoints/nexmark/chk-7\n  flowstate checkpoints inspect s3://bucket/ck/nexmark/chk-7 --json --config flowstate.toml"
    )]
    Inspect {
        /// The checkpoint or savepoint directory (or its `_metadata`), as a URL or path.
        path: String,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct SavepointArgs {
    /// The checkpoint or savepoint to convert (URL or path).
    path: String,
    /// The savepoint root to write into (URL or path; default: state.savepoints.dir).
    #[arg(long)]
    to: Option<String>,
    /// Backend that reads the source's native state (mmap checkpoints need mmap); the
    /// savepoint is canonical and restores on either backend.
    #[arg(long, value_enum, default_value = "heap")]
    backend: BackendArg,
    /// Parallelism of the keyed operators in the savepoint (default: as in the source).
    #[arg(long)]
    parallelism: Option<u32>,
    /// The operators of the job that will restore the savepoint (repeatable; default: all
    /// of the source's).
    #[arg(long = "operator")]
    operators: Vec<String>,
    /// Leave out the state of operators not given with --operator instead of failing.
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum StateCmd {
    /// Operators and states of any job's checkpoint or savepoint: kind, serializers, TTL,
    /// entries and bytes (per key group with --json).
    #[command(after_help = EXAMPLES_STATE_LIST)]
    List {
        /// The checkpoint or savepoint (URL or path).
        path: String,
        /// Machine-readable JSON, with entries and bytes per key group.
        #[arg(long)]
        json: bool,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Every entry of the chosen states as JSON Lines: operator, state, kind, key group, key,
    /// namespace, value (decoded when a built-in serializer wrote it, else {"hex": ...}).
    #[command(after_help = EXAMPLES_STATE_DUMP)]
    Dump {
        /// The checkpoint or savepoint (URL or path).
        path: String,
        /// Only this operator.
        #[arg(long)]
        operator: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Output format: JSON Lines, or Parquet (needs --output and a build with the
        /// `parquet` feature).
        #[arg(long, value_enum, default_value = "jsonl")]
        format: DumpFormatArg,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The entries of one key of one state (every namespace, or --namespace).
    #[command(after_help = EXAMPLES_STATE)]
    Get {
        /// The checkpoint or savepoint (URL or path).
        path: String,
        /// The state name (see `flowstate state list`).
        #[arg(long)]
        state: String,
        /// The key, typed as its built-in type (a number, a string, true/false).
        #[arg(long, allow_hyphen_values = true)]
        key: String,
        /// --key is the key's serialized bytes in hex (for keys of other serializers).
        #[arg(long)]
        key_hex: bool,
        /// The operator, when several have a state of that name.
        #[arg(long)]
        operator: Option<String>,
        /// Only this namespace (e.g. a window start), typed as its built-in type.
        #[arg(long, allow_hyphen_values = true)]
        namespace: Option<String>,
        /// One JSON object per entry.
        #[arg(long)]
        json: bool,
        /// Configuration file, for S3 settings (default: ./flowstate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `$TMPDIR/flowstate-<user>/checkpoints`: one default directory per user, so runs of
/// different users of a machine never share (and fence each other in) one directory.
fn default_checkpoint_dir() -> PathBuf {
    let user = ["USER", "LOGNAME"]
        .iter()
        .filter_map(|v| std::env::var_os(v)?.into_string().ok())
        .find(|u| {
            !u.is_empty()
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .unwrap_or_else(|| {
            // No usable name: the user id, from the owner of this process's /proc entry.
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").map_or_else(|_| "user".into(), |m| m.uid().to_string())
        });
    std::env::temp_dir()
        .join(format!("flowstate-{user}"))
        .join("checkpoints")
}

fn load_config(file: Option<&PathBuf>) -> Result<ConfigLoader, JobError> {
    let mut loader = ConfigLoader::new();
    let default_file = PathBuf::from("flowstate.toml");
    match file {
        Some(f) => loader = loader.file(f)?,
        None if default_file.exists() => loader = loader.file(&default_file)?,
        None => {}
    }
    Ok(loader.env()?)
}

fn config_only(file: Option<&PathBuf>) -> Result<Config, JobError> {
    Ok(load_config(file)?.load()?)
}

fn run(args: RunArgs, quiet: bool) -> Result<(), JobError> {
    let mut loader = load_config(args.config.as_ref())?;
    if let Some(b) = args.backend {
        let name = match b {
            BackendArg::Heap => "heap",
            BackendArg::Mmap => "mmap",
        };
        loader = loader.set("state.backend", name)?;
    }
    if let Some(dir) = &args.checkpoint_dir {
        loader = loader.set("state.checkpoints.dir", tools::to_url(dir)?)?;
    } else if loader.origin("state.checkpoints.dir") == flowstate::config::Origin::Default {
        let dir = default_checkpoint_dir();
        loader = loader.set(
            "state.checkpoints.dir",
            tools::to_url(&dir.to_string_lossy())?,
        )?;
    }
    if let Some(i) = &args.interval {
        loader = loader.set("state.checkpoints.interval", i.as_str())?;
    } else if loader.origin("state.checkpoints.interval") == flowstate::config::Origin::Default {
        loader = loader.set("state.checkpoints.interval", "1s")?;
    }
    // The CLI keeps checkpoints when the job ends, so `--restore latest` and `checkpoints list`
    // have something to work on (set state.checkpoints.on-shutdown = "delete" to clean up).
    if loader.origin("state.checkpoints.on-shutdown") == flowstate::config::Origin::Default {
        loader = loader.set("state.checkpoints.on-shutdown", "retain")?;
    }
    let config = loader.load()?;
    let restore = match args.restore.as_deref() {
        None if args.restore_if_any => RestoreFrom::LatestIfAny,
        None => RestoreFrom::Nothing,
        Some("latest") => RestoreFrom::Latest,
        Some(path) => RestoreFrom::Path(path.to_string()),
    };
    if args.engine == EngineArg::Timely {
        return run_timely(config, &args, restore);
    }
    if args.hostfile.is_some() || args.processes != 1 || args.workers != 1 {
        return Err("--processes, --workers, --process and --hostfile need --engine timely".into());
    }

    if let Some(n) = args.fail_after {
        // Run the job in a child process that crashes after n events, then recover here.
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("run")
            .arg("--events")
            .arg(args.events.to_string())
            .arg("--parallelism")
            .arg(args.parallelism.to_string())
            .arg("--job")
            .arg(&args.job)
            .arg("--crash-after")
            .arg(n.to_string())
            .arg("--checkpoint-dir")
            .arg(config.checkpoints.dir.clone().unwrap_or_default())
            .arg("--interval")
            .arg(format!("{}ms", config.checkpoints.interval.as_millis()))
            .arg("--quiet");
        if let Some(c) = &args.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(b) = args.backend {
            cmd.arg("--backend").arg(match b {
                BackendArg::Heap => "heap",
                BackendArg::Mmap => "mmap",
            });
        }
        if let Some(r) = &args.restore {
            cmd.arg("--restore").arg(r);
        }
        let status = cmd.status()?;
        if status.success() {
            outln!("the job finished before crashing ({n} events requested)");
            return Ok(());
        }
        outln!("the job crashed ({status}); recovering from the latest completed checkpoint");
        return run_job(config, &args, quiet, RestoreFrom::LatestIfAny, None);
    }
    run_job(config, &args, quiet, restore, args.crash_after)
}

/// `run --engine timely`: one process of a hostfile, or `--processes N` local processes
/// (this process starts them and prints process 0's report), or one process of `--workers`.
/// With `--fail-after K` the local processes are started, the last one crashes once it read
/// its share of K events and a checkpoint of the run completed (the others stop: their peer
/// is gone), and all of them are started again from the latest completed checkpoint.
fn run_timely(config: Config, args: &RunArgs, restore: RestoreFrom) -> Result<(), JobError> {
    if args.fail_after.is_some() && args.hostfile.is_some() {
        return Err(
            "--fail-after starts local processes: it does not go with --process/--hostfile".into(),
        );
    }
    if let Some(hostfile) = &args.hostfile {
        let cluster = flowstate_timely::Cluster::from_hostfile(
            hostfile,
            args.process.unwrap_or(0),
            args.workers,
        )?;
        return run_timely_process(config, args, restore, cluster);
    }
    if args.processes == 0 {
        return Err("--processes must be at least 1".into());
    }
    let Some(k) = args.fail_after else {
        if args.processes == 1 {
            let cluster = flowstate_timely::Cluster::single(args.workers);
            return run_timely_process(config, args, restore, cluster);
        }
        // A one-command demo: N processes of this program on 127.0.0.1.
        return match launch_local(&config, args, args.restore.as_deref(), None)? {
            Some(f) => Err(f.into()),
            None => Ok(()),
        };
    };
    // The last process crashes once it read its share of the K events (the splits are spread
    // evenly over the processes).
    let n = args.processes as u64;
    let share = k.div_ceil(n).max(1);
    let crash = Some((args.processes - 1, share));
    let Some(failure) = launch_local(&config, args, args.restore.as_deref(), crash)? else {
        outln!("the job finished before crashing ({k} events requested)");
        return Ok(());
    };
    outln!(
        "the job crashed ({failure}); restarting its {} processes from the latest completed checkpoint",
        args.processes
    );
    match launch_local(&config, args, None, None)? {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// Starts `--processes` local processes of this program on 127.0.0.1 (a hostfile with free
/// ports), each restoring `restore` (`None`: the latest checkpoint if there is one when
/// `--fail-after` restarts them, else nothing), process `crash.0` crashing after reading
/// `crash.1` events; prints process 0's report and waits for all. Returns the first failure.
fn launch_local(
    config: &Config,
    args: &RunArgs,
    restore: Option<&str>,
    crash: Option<(usize, u64)>,
) -> Result<Option<String>, JobError> {
    let dir = tempfile::tempdir()?;
    let hosts = timely_job::local_hostfile(dir.path(), args.processes)?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..args.processes {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("run")
            .args(["--engine", "timely", "--events", &args.events.to_string()])
            .args(["--workers", &args.workers.to_string(), "--job", &args.job])
            .args(["--process", &i.to_string()])
            .arg("--hostfile")
            .arg(&hosts)
            .arg("--checkpoint-dir")
            .arg(config.checkpoints.dir.clone().unwrap_or_default())
            .arg("--interval")
            .arg(format!("{}ms", config.checkpoints.interval.as_millis()));
        if let Some(c) = &args.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(b) = args.backend {
            cmd.arg("--backend").arg(match b {
                BackendArg::Heap => "heap",
                BackendArg::Mmap => "mmap",
            });
        }
        match restore {
            Some(r) => {
                cmd.args(["--restore", r]);
            }
            None if args.fail_after.is_some() => {
                cmd.arg("--restore-if-any");
            }
            None => {}
        }
        if args.read_delay_us > 0 {
            cmd.args(["--read-delay-us", &args.read_delay_us.to_string()]);
        }
        if args.state_padding > 0 {
            cmd.args(["--state-padding", &args.state_padding.to_string()]);
        }
        if let Some((_, events)) = crash.filter(|(victim, _)| *victim == i) {
            cmd.args(["--crash-after", &events.to_string()]);
        }
        // Process 0 prints the report; timely's own connection notices are left out.
        cmd.stdout(if i == 0 {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        children.push(cmd.spawn()?);
    }
    let report = children[0].stdout.take().map(|out| {
        std::thread::spawn(move || -> std::io::Result<()> {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let line = line?;
                if !line.starts_with("awaiting connections") {
                    println!("{line}");
                }
            }
            Ok(())
        })
    });
    // A process that fails takes the others down (timely stops them); report the first.
    let mut failed = None;
    for (i, mut c) in children.into_iter().enumerate() {
        let status = c.wait()?;
        if !status.success() && failed.is_none() {
            failed = Some(format!(
                "process {i} of {} failed ({status})",
                args.processes
            ));
        }
    }
    if let Some(r) = report {
        r.join().map_err(|_| "printing the report failed")??;
    }
    Ok(failed)
}

fn run_timely_process(
    config: Config,
    args: &RunArgs,
    restore: RestoreFrom,
    cluster: flowstate_timely::Cluster,
) -> Result<(), JobError> {
    let dir = config.checkpoints.dir.clone().unwrap_or_default();
    let (processes, workers) = (cluster.processes(), cluster.workers);
    let report = timely_job::run(timely_job::TimelyOptions {
        config,
        job: args.job.clone(),
        events: args.events,
        cluster,
        restore,
        crash_after: args.crash_after,
        read_delay: std::time::Duration::from_micros(args.read_delay_us),
        state_padding: args.state_padding,
    })?;
    let Some(report) = report else {
        return Ok(());
    };
    if let Some((id, offset)) = report.restored {
        outln!("restored checkpoint {id} (source offset {offset})");
    }
    outln!(
        "processed {} events (offset {}) in {:.2}s, {:.0} events/s on timely: {} processes of {} workers",
        report.processed,
        report.offset,
        report.elapsed.as_secs_f64(),
        report.processed as f64 / report.elapsed.as_secs_f64().max(1e-9),
        processes,
        workers
    );
    outln!(
        "checkpoints completed: {} (last: {}) in {}",
        report.checkpoints.len(),
        report
            .checkpoints
            .last()
            .map_or("-".into(), |c| c.to_string()),
        tools::shown_dir(&dir)
    );
    outln!(
        "closed windows: {}, bids in them: {}, bidders: {}",
        report.windows_closed,
        report.bids_in_closed_windows,
        report.bidders
    );
    outln!("state digest: {:016x}", report.digest);
    Ok(())
}

fn run_job(
    config: Config,
    args: &RunArgs,
    quiet: bool,
    restore: RestoreFrom,
    crash_after: Option<u64>,
) -> Result<(), JobError> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // A second Ctrl-C while the final checkpoint is written kills the process as usual.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let show = !quiet && std::io::stderr().is_terminal();
    let bar = if show {
        let bar = indicatif::ProgressBar::new(args.events);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} events {per_sec} | {msg}",
            )
            .map_err(|e| e.to_string())?,
        );
        Some(bar)
    } else {
        None
    };
    let progress_bar = bar.clone();
    let progress: Option<Arc<dyn Fn(&job::Progress) + Send + Sync>> = progress_bar.map(|bar| {
        Arc::new(move |p: &job::Progress| {
            bar.set_position(p.offset);
            bar.set_message(format!(
                "state {} entries | last checkpoint {}",
                p.state_entries.map_or("-".into(), |n| n.to_string()),
                p.last_checkpoint.map_or("-".into(), |c| c.to_string())
            ));
        }) as Arc<dyn Fn(&job::Progress) + Send + Sync>
    });
    let dir = config.checkpoints.dir.clone().unwrap_or_default();
    let backend = config.backend;
    let report = job::run(JobOptions {
        config,
        job: args.job.clone(),
        events: args.events,
        parallelism: args.parallelism,
        restore,
        crash_after,
        progress,
        stop,
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some((id, offset)) = report.restored {
        outln!("restored checkpoint {id} (source offset {offset})");
    }
    outln!(
        "{} {} events (offset {}) in {:.2}s, {:.0} events/s on the {:?} backend, parallelism {}",
        if report.stopped {
            "stopped after"
        } else {
            "processed"
        },
        report.processed,
        report.offset,
        report.elapsed.as_secs_f64(),
        report.processed as f64 / report.elapsed.as_secs_f64().max(1e-9),
        backend,
        args.parallelism
    );
    outln!(
        "checkpoints completed: {} (last: {}) in {}",
        report.checkpoints.len(),
        report
            .checkpoints
            .last()
            .map_or("-".into(), |c| c.to_string()),
        tools::shown_dir(&dir)
    );
    outln!(
        "closed windows: {}, bids in them: {}, bidders: {}",
        report.windows_closed,
        report.bids_in_closed_windows,
        report.bidders
    );
    outln!("state digest: {:016x}", report.digest);
    Ok(())
}

/// A hint for what to do about `e`.
fn hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    match e.downcast_ref::<checkpoint::Error>() {
        Some(c) if c.is_fenced() => {
            "two runs used one job's checkpoint directory: give each run that runs at the \
             same time its own --job or --checkpoint-dir"
        }
        _ => "run with --help for usage and examples",
    }
}

/// Sends the library's `tracing` events to standard error: RUST_LOG when set, otherwise
/// warnings and errors, more with `-v`, only errors with `--quiet`.
fn install_subscriber(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_subscriber(cli.verbose, cli.quiet);
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Run(args) => run(args, quiet),
        Command::Checkpoints(CheckpointsCmd::List {
            dir,
            job,
            json,
            config,
        }) => config_only(config.as_ref()).and_then(|c| tools::list(&c, &dir, &job, json)),
        Command::Checkpoints(CheckpointsCmd::History {
            dir,
            job,
            json,
            plot,
            config,
        }) => config_only(config.as_ref())
            .and_then(|c| history::history(&c, &dir, &job, json, plot.as_deref())),
        Command::Checkpoints(CheckpointsCmd::Inspect { path, json, config }) => {
            config_only(config.as_ref()).and_then(|c| tools::inspect(&c, &path, json))
        }
        Command::Savepoint(a) => config_only(a.config.as_ref()).and_then(|c| {
            let opts = state::SavepointOptions {
                to: a.to.clone(),
                backend: a.backend.into(),
                parallelism: a.parallelism,
                operators: a.operators.clone(),
                allow_non_restored_state: a.allow_non_restored_state,
                progress: !quiet,
            };
            state::savepoint(&c, &a.path, &opts)
        }),
        Command::State(StateCmd::List { path, json, config }) => {
            config_only(config.as_ref()).and_then(|c| state::list(&c, &path, json))
        }
        Command::State(StateCmd::Dump {
            path,
            operator,
            state: name,
            format,
            output,
            config,
        }) => config_only(config.as_ref()).and_then(|c| {
            let opts = state::DumpOptions {
                operator,
                state: name,
                format: match format {
                    DumpFormatArg::Jsonl => state::DumpFormat::JsonLines,
                    DumpFormatArg::Parquet => state::DumpFormat::Parquet,
                },
                output,
                progress: !quiet,
            };
            state::dump(&c, &path, &opts)
        }),
        Command::State(StateCmd::Get {
            path,
            state: name,
            key,
            key_hex,
            operator,
            namespace,
            json,
            config,
        }) => config_only(config.as_ref()).and_then(|c| {
            let opts = state::GetOptions {
                state: name,
                key,
                key_hex,
                operator,
                namespace,
                json,
            };
            state::get(&c, &path, &opts)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<job::SimulatedCrash>().is_some() => {
            // A crash: no cleanup, no final checkpoint, a failing exit code.
            eprintln!("{e}");
            std::process::exit(3)
        }
        // The reader of our output went away (`| head -1`): nothing more to say to anyone.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line, whatever the error carries (an S3 error document, a multi-line cause).
            eprintln!("error: {}", storage_s3::one_line(&e));
            eprintln!("hint: {}", hint(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
