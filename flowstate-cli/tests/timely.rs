//! `flowstate run --engine timely`: the Nexmark job on timely dataflow in real OS processes
//! on 127.0.0.1 ends with the single-process job's digest, at any process and worker count,
//! restored at another process count or not.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowstate");
/// Enough events for windows to close (about 15 s of event time).
const EVENTS: &str = "150000";

fn flowstate(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowstate")
}

/// Waits for a run, killing it after two minutes (a hang is a failure, not a stuck test).
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flowstate did not end within two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "flowstate failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn line(out: &Output, prefix: &str) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' in {}", String::from_utf8_lossy(&out.stdout)))
        .to_string()
}

fn reference(dir: &Path) -> (String, String) {
    let ck = dir.join("threads").display().to_string();
    let out = finish(flowstate(&[
        "run",
        "--events",
        EVENTS,
        "--checkpoint-dir",
        &ck,
        "--quiet",
    ]));
    let windows = line(&out, "closed windows:");
    assert!(
        !windows.starts_with("closed windows: 0,"),
        "windows close: {windows}"
    );
    (line(&out, "state digest:"), windows)
}

#[test]
fn timely_digest_equals_the_single_process_job_at_any_process_and_worker_count() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (digest, windows) = reference(tmp.path());
    for (n, w, backend) in [(1, 2, "heap"), (2, 1, "heap"), (3, 2, "mmap")] {
        let ck = tmp.path().join(format!("n{n}w{w}")).display().to_string();
        let (n_s, w_s) = (n.to_string(), w.to_string());
        let out = finish(flowstate(&[
            "run",
            "--engine",
            "timely",
            "--processes",
            &n_s,
            "--workers",
            &w_s,
            "--backend",
            backend,
            "--events",
            EVENTS,
            "--checkpoint-dir",
            &ck,
            "--interval",
            "300ms",
            "--quiet",
        ]));
        assert_eq!(
            line(&out, "state digest:"),
            digest,
            "{n} processes of {w} workers on {backend}"
        );
        assert_eq!(line(&out, "closed windows:"), windows);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("awaiting connections"), "{text}");
    }
}

#[test]
fn timely_processes_from_a_hostfile_and_a_restore_at_another_process_count() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (digest, _) = reference(tmp.path());
    let ck = tmp.path().join("hostfile").display().to_string();
    // Half the input on two processes started one by one from a hostfile (as on two machines).
    let ports: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    let hosts = tmp.path().join("hosts");
    let text: String = ports
        .iter()
        .map(|l| format!("127.0.0.1:{}\n", l.local_addr().expect("port").port()))
        .collect();
    std::fs::write(&hosts, text).expect("hostfile");
    drop(ports);
    let hosts = hosts.display().to_string();
    let children: Vec<Child> = (0..2)
        .map(|i| {
            flowstate(&[
                "run",
                "--engine",
                "timely",
                "--process",
                &i.to_string(),
                "--hostfile",
                &hosts,
                "--events",
                "75000",
                "--checkpoint-dir",
                &ck,
                "--interval",
                "300ms",
                "--quiet",
            ])
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(finish).collect();
    line(&outs[0], "state digest:");
    assert!(
        !String::from_utf8_lossy(&outs[1].stdout).contains("state digest"),
        "only process 0 reports"
    );
    // The rest on three local processes, from the first run's last checkpoint.
    let out = finish(flowstate(&[
        "run",
        "--engine",
        "timely",
        "--processes",
        "3",
        "--restore",
        "latest",
        "--events",
        EVENTS,
        "--checkpoint-dir",
        &ck,
        "--interval",
        "300ms",
        "--quiet",
    ]));
    assert!(line(&out, "restored checkpoint").contains("source offset 75000"));
    assert_eq!(line(&out, "state digest:"), digest);
}

#[test]
fn timely_options_are_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = tmp.path().display().to_string();
    let out = Command::new(BIN)
        .args([
            "run",
            "--processes",
            "2",
            "--checkpoint-dir",
            &ck,
            "--events",
            "10",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --engine timely"));
    let hosts = tmp.path().join("bad-hosts");
    std::fs::write(&hosts, "no-port-here\n").expect("hostfile");
    let out = Command::new(BIN)
        .args(["run", "--engine", "timely", "--process", "0", "--hostfile"])
        .arg(&hosts)
        .args(["--checkpoint-dir", &ck, "--events", "10"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'no-port-here' is not host:port"), "{err}");
}

#[test]
fn timely_fail_after_crashes_a_process_and_restarts_all_from_the_latest_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (digest, windows) = reference(tmp.path());
    let ck = tmp.path().join("fail-after").display().to_string();
    // Two processes; the second crashes (exit code 3, no final checkpoint) once it read its
    // half of 100,000 events; both start again from the latest completed checkpoint.
    let out = finish(flowstate(&[
        "run",
        "--engine",
        "timely",
        "--processes",
        "2",
        "--fail-after",
        "100000",
        "--events",
        EVENTS,
        "--checkpoint-dir",
        &ck,
        "--interval",
        "100ms",
    ]));
    let crashed = line(&out, "the job crashed");
    assert!(crashed.contains("restarting its 2 processes"), "{crashed}");
    let restored = line(&out, "restored checkpoint");
    assert!(!restored.contains("source offset 0)"), "{restored}");
    assert_eq!(line(&out, "state digest:"), digest);
    assert_eq!(line(&out, "closed windows:"), windows);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("crashing on purpose"), "{err}");
}

#[test]
fn timely_incremental_checkpoints_restore_from_their_chain_at_another_process_count() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (digest, windows) = reference(tmp.path());
    let config = tmp.path().join("incremental.toml");
    std::fs::write(
        &config,
        "[state.checkpoints]\nincremental = true\nretained = 2\n",
    )
    .expect("config");
    let config = config.display().to_string();
    // Heap: a full snapshot into shared/, then deltas on it; mmap: native files, those of
    // completed checkpoints referenced instead of uploaded again.
    for backend in ["heap", "mmap"] {
        let ck = tmp.path().join(format!("inc-{backend}"));
        let ck_s = ck.display().to_string();
        let first = finish(flowstate(&[
            "run",
            "--engine",
            "timely",
            "--processes",
            "2",
            "--backend",
            backend,
            "--config",
            &config,
            "--events",
            "75000",
            "--checkpoint-dir",
            &ck_s,
            "--interval",
            "100ms",
            "--quiet",
        ]));
        let completed = line(&first, "checkpoints completed:");
        let n: u64 = completed
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n >= 2, "a chain of checkpoints on {backend}: {completed}");
        let list = Command::new(BIN)
            .args(["checkpoints", "list", &ck_s, "--json"])
            .output()
            .expect("list");
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
        let latest = list
            .as_array()
            .and_then(|a| a.last())
            .cloned()
            .expect("a checkpoint");
        assert_eq!(latest["incremental"], true, "{backend}: {latest}");
        let shared = std::fs::read_dir(ck.join("nexmark/shared"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(shared > 0, "{backend}: files in shared/");
        // The rest of the input on three processes, from that incremental checkpoint.
        let out = finish(flowstate(&[
            "run",
            "--engine",
            "timely",
            "--processes",
            "3",
            "--backend",
            backend,
            "--config",
            &config,
            "--restore",
            "latest",
            "--events",
            EVENTS,
            "--checkpoint-dir",
            &ck_s,
            "--interval",
            "100ms",
            "--quiet",
        ]));
        assert!(
            line(&out, "restored checkpoint").contains("source offset 75000"),
            "{backend}"
        );
        assert_eq!(line(&out, "state digest:"), digest, "{backend}");
        assert_eq!(line(&out, "closed windows:"), windows, "{backend}");
    }
}
