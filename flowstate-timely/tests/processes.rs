//! Multi-process tests: the example job runs as real OS processes that find each other through
//! a hostfile on 127.0.0.1; digests are compared with a single-process run over the same events.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::completions;

const BIN: &str = env!("CARGO_BIN_EXE_flowstate-timely-example");

/// `n` free ports on 127.0.0.1, written as a hostfile.
fn hostfile(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create dir");
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    let text: String = listeners
        .iter()
        .map(|l| format!("127.0.0.1:{}\n", l.local_addr().expect("address").port()))
        .collect();
    let path = dir.join(format!("hosts-{n}-{}", std::process::id()));
    std::fs::write(&path, text).expect("write hostfile");
    path
}

fn spawn(args: &[String]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the example")
}

/// Waits for a child, killing it after `limit` (a hang is a failure, not a stuck test).
fn wait(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "a process did not end within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the job as `n` processes of `w` workers; returns process 0's output lines.
fn run_job(dir: &Path, n: usize, w: usize, extra: &[&str]) -> Vec<String> {
    let mut base: Vec<String> = vec![
        "--dir".into(),
        dir.join("ck").display().to_string(),
        "--workers".into(),
        w.to_string(),
    ];
    base.extend(extra.iter().map(|s| s.to_string()));
    let children: Vec<Child> = if n == 1 {
        vec![spawn(&base)]
    } else {
        let hosts = hostfile(dir, n);
        (0..n)
            .map(|i| {
                let mut a = base.clone();
                a.extend([
                    "--process".into(),
                    i.to_string(),
                    "--hostfile".into(),
                    hosts.display().to_string(),
                ]);
                spawn(&a)
            })
            .collect()
    };
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| wait(c, Duration::from_secs(120)))
        .collect();
    for (i, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "process {i} of {n} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&outputs[0].stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn field(lines: &[String], name: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no '{name}' in {lines:?}"))
        .to_string()
}

#[test]
fn digest_is_the_same_at_any_process_and_worker_count() {
    let events = "30000";
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = run_job(&tmp.path().join("ref"), 1, 1, &["--events", events]);
    let digest = field(&reference, "digest");
    assert_ne!(field(&reference, "keys"), "0");
    for (n, w) in [(2, 1), (3, 1), (2, 2), (3, 2)] {
        let dir = tmp.path().join(format!("n{n}w{w}"));
        let out = run_job(&dir, n, w, &["--events", events, "--interval-ms", "100"]);
        assert_eq!(
            field(&out, "digest"),
            digest,
            "{n} processes of {w} workers"
        );
        assert_ne!(field(&out, "last checkpoint"), "-");
    }
}

#[test]
fn kill_9_then_restore_at_another_process_count_gives_the_same_result() {
    let events = "30000";
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = run_job(&tmp.path().join("ref"), 1, 1, &["--events", events]);
    let digest = field(&reference, "digest");
    for (first, victim, then) in [(2usize, 1usize, 3usize), (3, 0, 1)] {
        let dir = tmp.path().join(format!("{first}to{then}"));
        let hosts = hostfile(&dir, first);
        let mut children: Vec<Child> = (0..first)
            .map(|i| {
                spawn(
                    &[
                        "--dir",
                        &dir.join("ck").display().to_string(),
                        "--events",
                        events,
                        "--interval-ms",
                        "50",
                        "--throttle-us",
                        "20000",
                        "--process",
                        &i.to_string(),
                        "--hostfile",
                        &hosts.display().to_string(),
                    ]
                    .map(str::to_string),
                )
            })
            .collect();
        // Once a checkpoint completed, one process is killed with SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(60);
        while completions(&dir) == 0 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint completed within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        children[victim].kill().expect("kill -9");
        // The others notice and stop with an error instead of waiting for the dead peer.
        for (i, c) in children.into_iter().enumerate() {
            let out = wait(c, Duration::from_secs(60));
            assert!(
                !out.status.success(),
                "process {i} of the killed run ended with success"
            );
        }
        let out = run_job(&dir, then, 1, &["--events", events, "--interval-ms", "100"]);
        assert_ne!(field(&out, "restored"), "-", "{first} processes, kill -9 of {victim}: the run after restores a checkpoint; commit log: {:?}", std::fs::read_dir(dir.join("ck/keyed/_commits")).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect::<Vec<_>>()));
        assert_eq!(
            field(&out, "digest"),
            digest,
            "{first} processes, kill -9, then {then}"
        );
    }
}
