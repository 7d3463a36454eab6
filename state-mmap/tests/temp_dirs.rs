//! The default (temporary) working directory and a fresh one under a parent of the caller's
//! (`working_directory_in`): a process killed with SIGKILL leaves its directory behind; the
//! next backend that makes one in the same place removes it, and never removes the directory
//! of a backend that is still alive. Backends built with the same parent never share a folder.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use state_api::*;
use state_mmap::MmapKeyedStateBackend;

const CHILD_ENV: &str = "STATE_MMAP_TEMPDIR_CHILD";
/// Set in a child: build with `working_directory_in(<this>)` instead of the default.
const PARENT_ENV: &str = "STATE_MMAP_TEMPDIR_PARENT";
const TEST: &str = "a_killed_backends_temp_dir_is_swept_and_a_live_one_is_kept";
const TEST_IN: &str = "a_killed_backends_folder_under_a_parent_is_swept_and_a_live_one_is_kept";

/// The child: a backend on a temporary directory with some flushed data; reports its directory
/// in `ready-<tag>`, then either waits to be killed (`hold`) or drops the backend (`once`).
fn child(spec: &str) {
    let (mode, tag) = spec.split_once(':').unwrap();
    let parent = std::env::var_os(PARENT_ENV).map(PathBuf::from);
    let mut builder = MmapKeyedStateBackend::<u64>::builder();
    if let Some(parent) = &parent {
        builder = builder.working_directory_in(parent);
    }
    let mut b = builder.build().unwrap();
    let h = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    for k in 0..1000 {
        b.set_current_key(k).unwrap();
        b.value(&h).update(k).unwrap();
    }
    b.flush().unwrap();
    let dirs = backend_dirs(parent.as_deref().unwrap_or(&std::env::temp_dir()));
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
    spawn_child(TEST, root, None, mode, tag)
}

/// [`spawn`] for test `test`, the child's backend under `parent` when given.
fn spawn_child(
    test: &str,
    root: &Path,
    parent: Option<&Path>,
    mode: &str,
    tag: &str,
) -> (Child, Vec<String>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture"])
        .env(CHILD_ENV, format!("{mode}:{tag}"))
        .env("TMPDIR", root);
    if let Some(parent) = parent {
        cmd.env(PARENT_ENV, parent);
    }
    let mut child = cmd
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

/// Issue 15, item 4: backends given the same parent (as the job does with `state.mmap.dir`)
/// each get a folder of their own, removed on drop; a SIGKILLed process's folder is removed by
/// the next backend this process makes there, a live process's folder is kept.
#[test]
fn a_killed_backends_folder_under_a_parent_is_swept_and_a_live_one_is_kept() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let parent = root.path().join("work"); // created by the first backend
    let build = || {
        MmapKeyedStateBackend::<u64>::builder()
            .working_directory_in(&parent)
            .build()
            .unwrap()
    };

    // A dies by SIGKILL with its backend open; B lives on.
    let (mut a, seen) = spawn_child(TEST_IN, root.path(), Some(&parent), "hold", "a");
    assert_eq!(seen.len(), 1, "A sees only its own folder: {seen:?}");
    let a_dir = parent.join(&seen[0]);
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    assert!(a_dir.is_dir(), "a killed process cannot remove its folder");
    let (mut b, seen) = spawn_child(TEST_IN, root.path(), Some(&parent), "hold", "b");
    let b_dir = parent.join(seen.iter().find(|n| parent.join(n) != a_dir).unwrap());

    // Two stores of this process (the job's auctions and bidders of one subtask).
    let mut one = build();
    assert!(!a_dir.exists(), "the dead process's folder is swept");
    assert!(b_dir.is_dir(), "a live process's folder is never swept");
    let two = build();
    let d1 = one.engine().dir().to_path_buf();
    let d2 = two.engine().dir().to_path_buf();
    assert_ne!(d1, d2, "each backend has its own folder");
    assert_eq!(d1.parent(), Some(parent.as_path()));
    assert_eq!(d2.parent(), Some(parent.as_path()));
    // Each is a working store of its own: data written to one is not in the other.
    let h = one
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    one.set_current_key(7).unwrap();
    one.value(&h).update(7).unwrap();
    one.flush().unwrap();
    assert!(two.state_names().is_empty());

    drop(one);
    drop(two);
    assert!(!d1.exists() && !d2.exists(), "dropping removes the folders");
    b.kill().unwrap();
    b.wait().unwrap();
    // B is dead now: the next process to make a folder there sweeps it.
    let (mut c, seen) = spawn_child(TEST_IN, root.path(), Some(&parent), "once", "c");
    assert_eq!(seen.len(), 1, "C sees only its own folder: {seen:?}");
    assert!(c.wait().unwrap().success());
    assert_eq!(backend_dirs(&parent), Vec::<String>::new(), "nothing left");
}
