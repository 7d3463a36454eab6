//! The default (temporary) working directory: a process killed with SIGKILL leaves its directory
//! behind; the next backend that makes one in the same place removes it, and never removes
//! the directory of a backend that is still alive.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use state_api::*;
use state_mmap::MmapKeyedStateBackend;

const CHILD_ENV: &str = "STATE_MMAP_TEMPDIR_CHILD";
const TEST: &str = "a_killed_backends_temp_dir_is_swept_and_a_live_one_is_kept";

/// The child: a backend on a temporary directory with some flushed data; reports its directory
/// in `ready-<tag>`, then either waits to be killed (`hold`) or drops the backend (`once`).
fn child(spec: &str) {
    let (mode, tag) = spec.split_once(':').unwrap();
    let mut b = MmapKeyedStateBackend::<u64>::builder().build().unwrap();
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    for k in 0..1000 {
        b.set_current_key(k).unwrap();
        b.value(&h).update(k).unwrap();
    }
    b.flush().unwrap();
    let dirs = backend_dirs(&std::env::temp_dir());
    let ready = std::env::temp_dir().join(format!("ready-{tag}"));
    fs::write(ready.with_extension("tmp"), dirs.join("\n")).unwrap();
    fs::rename(ready.with_extension("tmp"), &ready).unwrap();
    if mode == "hold" {
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    drop(b);
}

/// Names of the backend directories under `root`.
fn backend_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("flowstate-mmap-"))
        .collect();
    names.sort();
    names
}

/// Starts a child with `root` as its temporary directory and waits until it is ready; returns
/// it and the backend directories it saw then (its own among them).
fn spawn(root: &Path, mode: &str, tag: &str) -> (Child, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture"])
        .env(CHILD_ENV, format!("{mode}:{tag}"))
        .env("TMPDIR", root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready: PathBuf = root.join(format!("ready-{tag}"));
    for _ in 0..3000 {
        if let Ok(s) = fs::read_to_string(&ready) {
            return (child, s.lines().map(str::to_string).collect());
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child {tag} exited before it was ready: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    panic!("child {tag} not ready after 30 s");
}

#[test]
fn a_killed_backends_temp_dir_is_swept_and_a_live_one_is_kept() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let root = tempfile::tempdir().unwrap();

    // A is killed while its backend is open: its directory (with data) stays behind.
    let (mut a, seen) = spawn(root.path(), "hold", "a");
    assert_eq!(seen.len(), 1, "A sees only its own directory: {seen:?}");
    let a_dir = root.path().join(&seen[0]);
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    assert!(
        a_dir.is_dir(),
        "a killed process cannot remove its directory"
    );
    assert!(
        fs::read_dir(&a_dir).unwrap().count() > 1,
        "it holds the killed backend's files"
    );

    // B makes its own directory and removes A's on the way.
    let (mut b, seen) = spawn(root.path(), "hold", "b");
    assert!(!a_dir.exists(), "the dead owner's directory is swept");
    assert_eq!(seen.len(), 1, "B sees only its own directory: {seen:?}");
    let b_dir = root.path().join(&seen[0]);

    // C runs while B lives: B's directory is kept; C's own is removed when C drops its backend.
    let (mut c, seen) = spawn(root.path(), "once", "c");
    assert_eq!(seen.len(), 2, "C sees B's directory and its own: {seen:?}");
    assert!(c.wait().unwrap().success());
    assert!(b_dir.is_dir(), "a live backend's directory is never swept");
    assert_eq!(
        backend_dirs(root.path()),
        vec![seen
            .iter()
            .find(|n| root.path().join(n) == b_dir)
            .unwrap()
            .clone()],
        "C removed its own directory on drop"
    );

    b.kill().unwrap();
    b.wait().unwrap();
}
