//! Crash recovery with real processes: a job of N processes (N from 1 to 4) is killed with
//! SIGKILL at a random moment, one random process at a time, and restarted from the latest
//! checkpoint, often at another N; after the kills it runs to the end, and its digest must
//! equal a run that never failed. At least 20 kills; `FLOWSTATE_KILL_CAMPAIGN=<kills>` runs a
//! longer campaign, `FLOWSTATE_KILL_SEED=<seed>` replays one.
//!
//! Also: a stale run (still going when a new run of the same job starts) is fenced and stops
//! with an error naming it, while the new run completes; every process of the new run
//! restores the same checkpoint although the stale run went on committing while they started.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::completions;

const BIN: &str = env!("CARGO_BIN_EXE_flowstate-timely-example");
const EVENTS: &str = "24000";

/// A small xorshift generator: the campaign is random, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn hostfile(dir: &Path, n: usize, attempt: usize) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    let text: String = listeners
        .iter()
        .map(|l| format!("127.0.0.1:{}\n", l.local_addr().expect("port").port()))
        .collect();
    let path = dir.join(format!("hosts-{attempt}"));
    std::fs::write(&path, text).expect("hostfile");
    path
}

fn start(dir: &Path, n: usize, attempt: usize, throttle_us: u64) -> Vec<Child> {
    start_staggered(dir, n, attempt, throttle_us, Duration::ZERO)
}

/// [`start`], waiting `stagger` before starting each process after the first.
fn start_staggered(
    dir: &Path,
    n: usize,
    attempt: usize,
    throttle_us: u64,
    stagger: Duration,
) -> Vec<Child> {
    let hosts = hostfile(dir, n, attempt);
    (0..n)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(stagger);
            }
            let mut c = Command::new(BIN);
            c.args(["--dir", &dir.join("ck").display().to_string()])
                .args(["--events", EVENTS, "--interval-ms", "60"])
                .args(["--throttle-us", &throttle_us.to_string()])
                .args(["--connect-timeout-ms", "5000"]);
            if n > 1 {
                c.args(["--process", &i.to_string()])
                    .arg("--hostfile")
                    .arg(&hosts);
            }
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn the example")
        })
        .collect()
}

/// Waits for every process, killing any still there after `limit` (then the test fails: a
/// process whose peer died must stop by itself).
fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<Output> {
    let deadline = Instant::now() + limit;
    let mut outs = Vec::new();
    for mut c in children {
        while c.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let out = c.wait_with_output().expect("output");
                panic!(
                    "a process did not stop within {limit:?} after its peer was killed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        outs.push(c.wait_with_output().expect("output"));
    }
    outs
}

fn digest(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("digest: ").map(str::to_string))
        .unwrap_or_else(|| panic!("no digest: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn random_kill_9_and_restarts_at_other_process_counts_end_with_the_failure_free_digest() {
    let kills: usize = std::env::var("FLOWSTATE_KILL_CAMPAIGN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(20);
    let seed: u64 = std::env::var("FLOWSTATE_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    eprintln!("kill campaign: {kills} kills, FLOWSTATE_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().expect("tempdir");

    let reference = wait_all(
        start(&tmp.path().join("ref"), 1, 0, 0),
        Duration::from_secs(120),
    );
    assert!(reference[0].status.success());
    let expected = digest(&reference[0]);

    let dir = tmp.path().join("killed");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut restored_runs = 0;
    for attempt in 0..kills {
        let n = 1 + rng.below(4) as usize;
        // Throttled so that a run lasts a few seconds: the kill lands before its end.
        let mut children = start(&dir, n, attempt, 5_000);
        let at = Duration::from_millis(100 + rng.below(2_400));
        std::thread::sleep(at);
        let victim = rng.below(n as u64) as usize;
        children[victim].kill().expect("kill -9");
        let outs = wait_all(children, Duration::from_secs(60));
        let finished = outs.iter().filter(|o| o.status.success()).count();
        let restored = outs
            .iter()
            .all(|o| String::from_utf8_lossy(&o.stderr).contains("starting from checkpoint"));
        restored_runs += usize::from(restored);
        if finished > 0 {
            // The job had ended (its last checkpoint committed) before the kill landed: the
            // next attempt starts from the beginning.
            std::fs::remove_dir_all(dir.join("ck")).expect("clean");
        }
    }
    // The last run, at a random N, goes to the end.
    let n = 1 + rng.below(4) as usize;
    let outs = wait_all(start(&dir, n, kills, 0), Duration::from_secs(120));
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!("{restored_runs} of {kills} killed runs had restored a checkpoint");
    assert_eq!(
        digest(&outs[0]),
        expected,
        "after {kills} kills (seed {seed}) and a last run on {n} processes"
    );
}

#[test]
fn a_stale_run_is_fenced_and_every_process_of_the_new_run_restores_the_same_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = wait_all(
        start(&tmp.path().join("ref"), 1, 0, 0),
        Duration::from_secs(120),
    );
    assert!(reference[0].status.success());
    let expected = digest(&reference[0]);
    let dir = tmp.path().join("fence");
    std::fs::create_dir_all(&dir).expect("dir");
    // The old run: slow, one process, a checkpoint every 60 ms.
    let old = start(&dir, 1, 0, 20_000);
    let deadline = Instant::now() + Duration::from_secs(60);
    while completions(&dir) == 0 {
        assert!(
            Instant::now() < deadline,
            "the old run never completed a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A new run of the same job starts while the old one still commits, its three processes
    // 400 ms apart: each of them reading the latest checkpoint by itself would see another.
    let new = start_staggered(&dir, 3, 1, 0, Duration::from_millis(400));
    let new = wait_all(new, Duration::from_secs(120));
    for o in &new {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let starts: Vec<String> = new
        .iter()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| l.contains("starting from"))
                .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&o.stderr)))
                .to_string()
        })
        .collect();
    assert!(
        starts[0].contains("starting from checkpoint"),
        "the new run restores the old run's checkpoint: {starts:?}"
    );
    assert!(
        starts.iter().all(|s| *s == starts[0]),
        "every process of the new run restores the same checkpoint: {starts:?}"
    );
    assert_eq!(digest(&new[0]), expected);
    let old = wait_all(old, Duration::from_secs(120));
    assert!(!old[0].status.success(), "the stale run went on");
    let err = String::from_utf8_lossy(&old[0].stderr);
    assert!(err.contains("fenced"), "{err}");
}
