//! The timely job checkpointing over S3 to a multi-node SeaweedFS (scripts/s3-cluster: one
//! master, three volume servers with replication 001, a filer and the S3 gateway, each a process
//! of its own): a volume server killed mid-run does not stop checkpoints from completing, and a
//! gateway killed mid-run makes checkpoints fail (they time out and are aborted, within the
//! tolerable failures) until it is back, then they complete again. The digest stays the
//! single-process job's.
//!
//! Needs the cluster's variables (`eval "$(scripts/s3-cluster start)"`; `./scripts/test` does
//! it); without them the tests print a notice and pass, unless `FLOWSTATE_REQUIRE_S3=1` or
//! `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowstate");
/// Events of every run (about 20 s of event time); the timely runs read them slowly (see
/// `start_job`) to last several checkpoints.
const EVENTS: &str = "200000";
/// Checkpoint failures in a row the gateway test tolerates.
const TOLERABLE: u32 = 20;

struct ClusterEnv {
    bucket: String,
    script: String,
    config: PathBuf,
    /// Checkpoints time out after 3 s here and at most 20 may fail in a row: the gateway test.
    short_timeout: PathBuf,
}

/// The cluster's settings as a config file in `dir`, or `None` (with a notice) without one.
fn cluster(dir: &Path) -> Option<ClusterEnv> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(endpoint), Some(bucket), Some(key), Some(secret), Some(script)) = (
        var("FLOWSTATE_S3_CLUSTER_ENDPOINT"),
        var("FLOWSTATE_S3_CLUSTER_BUCKET"),
        var("FLOWSTATE_S3_CLUSTER_KEY_ID"),
        var("FLOWSTATE_S3_CLUSTER_SECRET"),
        var("FLOWSTATE_S3_CLUSTER_SCRIPT"),
    ) else {
        let required = var("FLOWSTATE_REQUIRE_S3").as_deref() == Some("1")
            || var("CI").as_deref() == Some("true");
        assert!(
            !required,
            "no SeaweedFS cluster: run eval \"$(scripts/s3-cluster start)\" first"
        );
        eprintln!("notice: no SeaweedFS cluster (scripts/s3-cluster start): test skipped");
        return None;
    };
    let write = |name: &str, timeout: &str, tolerable: u32| {
        let config = dir.join(name);
        std::fs::write(
            &config,
            format!(
                "[state.checkpoints]\ntimeout = \"{timeout}\"\ntolerable-failures = {tolerable}\n\n\
                 [s3]\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nallow-http = true\n\
                 access-key-id = \"{key}\"\nsecret-access-key = \"{secret}\"\n"
            ),
        )
        .expect("config");
        config
    };
    Some(ClusterEnv {
        bucket,
        script,
        config: write("flowstate.toml", "30s", 1000),
        short_timeout: write("short-timeout.toml", "3s", TOLERABLE),
    })
}

fn script(c: &ClusterEnv, args: &[&str]) {
    let out = Command::new(&c.script)
        .args(args)
        .output()
        .expect("s3-cluster");
    assert!(
        out.status.success(),
        "s3-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_job(c: &ClusterEnv, config: &Path, prefix: &str) -> Child {
    Command::new(BIN)
        .args([
            "run",
            "--engine",
            "timely",
            "--processes",
            "2",
            "--events",
            EVENTS,
        ])
        .args(["--interval", "300ms", "--job", "nexmark"])
        // Each source read (64 events of a split) is followed by 7 ms of sleep: a run lasts
        // about 15 s, longer than the faults injected, and reads slower than even a loaded
        // machine processes (a backlog would make checkpoints time out by themselves).
        .args(["--read-delay-us", "7000"])
        .args(["--checkpoint-dir", &format!("s3://{}/{prefix}", c.bucket)])
        .arg("--config")
        .arg(config)
        // The committer's log: which checkpoints completed and which were aborted, and why.
        .env("RUST_LOG", "flowstate_timely=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowstate")
}

/// The highest completed checkpoint of the job (by `flowstate checkpoints list`), if any.
fn last_checkpoint(c: &ClusterEnv, prefix: &str) -> Option<u64> {
    let out = Command::new(BIN)
        .args([
            "checkpoints",
            "list",
            &format!("s3://{}/{prefix}", c.bucket),
        ])
        .args(["--job", "nexmark", "--config"])
        .arg(&c.config)
        .output()
        .expect("list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .max()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the job did not end within three minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "the job failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn digest(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("state digest:"))
        .expect("a digest")
        .to_string()
}

/// The single-process job over the same events, on local disk: the failure-free digest.
fn start_reference(dir: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--events", EVENTS, "--quiet", "--checkpoint-dir"])
        .arg(dir.join("reference"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reference run")
}

#[test]
fn s3_cluster_faults_volume_server_and_gateway() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(c) = cluster(tmp.path()) else {
        return;
    };
    // Whatever an earlier run left killed is started again.
    script(&c, &["revive"]);
    std::thread::sleep(Duration::from_secs(2));
    let reference = start_reference(tmp.path());
    let run = format!("timely-{}", std::process::id());

    // A volume server dies: files are on two of three servers, checkpoints go on completing.
    let prefix = format!("{run}-volume");
    let job = start_job(&c, &c.config, &prefix);
    wait_for("a first checkpoint", Duration::from_secs(60), || {
        last_checkpoint(&c, &prefix).is_some()
    });
    let before = last_checkpoint(&c, &prefix).expect("a checkpoint");
    script(&c, &["kill", "volume1"]);
    wait_for(
        "a checkpoint completed with a volume server down",
        Duration::from_secs(60),
        || last_checkpoint(&c, &prefix).is_some_and(|id| id > before),
    );
    script(&c, &["restart", "volume1"]);
    let out = finish(job);
    let expected = digest(&finish(reference));
    assert_eq!(digest(&out), expected);

    // The gateway dies: checkpoints time out and are aborted meanwhile (tolerated), and
    // complete again once it is back.
    let prefix = format!("{run}-gateway");
    let job = start_job(&c, &c.short_timeout, &prefix);
    wait_for("a first checkpoint", Duration::from_secs(60), || {
        last_checkpoint(&c, &prefix).is_some()
    });
    let before = last_checkpoint(&c, &prefix).expect("a checkpoint");
    let mut job = job;
    assert!(
        job.try_wait().expect("wait").is_none(),
        "the job ended before the gateway was killed: make it last longer"
    );
    script(&c, &["kill", "s3"]);
    std::thread::sleep(Duration::from_secs(6));
    script(&c, &["restart", "s3"]);
    let out = finish(job);
    assert_eq!(digest(&out), expected);
    let log = String::from_utf8_lossy(&out.stderr);
    let failed = committer_events(&log, "checkpoint aborted");
    let completed = committer_events(&log, "checkpoint completed");
    let down: Vec<u64> = failed.iter().copied().filter(|id| *id > before).collect();
    assert!(
        !down.is_empty(),
        "no checkpoint after {before} was aborted while the gateway was down:\n{log}"
    );
    assert!(
        failed.len() <= TOLERABLE as usize,
        "{} checkpoints failed, more than the {TOLERABLE} tolerated, and the job still ran",
        failed.len()
    );
    let last_failed = down.iter().max().copied().unwrap_or(before);
    assert!(
        completed.iter().any(|id| *id > last_failed),
        "no checkpoint completed after the gateway came back (last aborted: {last_failed}):\n{log}"
    );
    wait_for("the gateway back", Duration::from_secs(30), || {
        last_checkpoint(&c, &prefix).is_some()
    });
    let after = last_checkpoint(&c, &prefix).expect("checkpoints");
    assert!(
        after > last_failed,
        "the latest checkpoint is one completed after the gateway came back ({last_failed} -> {after})"
    );
}

/// The checkpoint ids of the committer's log lines `what` (`checkpoint aborted` or `checkpoint
/// completed`, with a `checkpoint=<id>` field), leaving out checkpoints aborted because a later
/// one completed first (subsumed: not a failure).
fn committer_events(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(what) && !l.contains("subsumed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("checkpoint="))
                .and_then(|id| id.parse().ok())
        })
        .collect()
}
