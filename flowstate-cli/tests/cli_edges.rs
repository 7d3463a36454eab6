//! The CLI's edges: what it prints must be pasteable, what it cannot find is an error, hostile
//! environments and closed pipes end cleanly (issue 15's items 8-15).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowstate"));
    c.env_remove("FLOWSTATE_STATE_CHECKPOINTS_DIR");
    c
}

/// A small run with checkpoints every 100 ms under `root`; returns its output.
fn small_run(root: &Path) -> String {
    ok(&[
        "run",
        "--events",
        "30000",
        "--interval",
        "100ms",
        "--checkpoint-dir",
        root.to_str().unwrap(),
        "--quiet",
    ])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The one-line error of a failed command (and its hint line).
fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let err = stderr(out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.lines().count(), 2, "one error line and one hint: {err}");
    err
}

/// The checkpoint paths `checkpoints list` prints (last column).
fn listed_paths(list: &str) -> Vec<String> {
    list.lines()
        .skip(1)
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect()
}

#[test]
fn environment_variables_that_are_not_utf8_do_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    small_run(&root);
    // A variable that is not ours is ignored.
    let out = bin()
        .args(["checkpoints", "list", root.to_str().unwrap()])
        .env("FOO", OsStr::from_bytes(b"\xff"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // One of ours is an error naming it.
    let out = bin()
        .args(["checkpoints", "list", root.to_str().unwrap()])
        .env("FLOWSTATE_STATE_BACKEND", OsStr::from_bytes(b"he\xffap"))
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("FLOWSTATE_STATE_BACKEND") && err.contains("UTF-8"),
        "{err}"
    );
}

/// Runs the binary with a standard output whose reader is already gone.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    bin()
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    small_run(&root);
    let list = ok(&["checkpoints", "list", root.to_str().unwrap()]);
    let chk = listed_paths(&list).pop().unwrap();
    for args in [
        &["checkpoints", "list", root.to_str().unwrap()][..],
        &["checkpoints", "inspect", &chk, "--json"],
        &["checkpoints", "inspect", &chk],
        &["state", "get", &chk, "--state", "spend", "--key", "1001"],
    ] {
        let out = with_closed_stdout(args);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {err}");
    }
}

#[test]
fn a_refused_checkpoint_dir_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/b/a/../../outside", tmp.path().display());
    let out = flowstate(&["run", "--events", "10", "--checkpoint-dir", &url, "--quiet"]);
    let err = failed(&out);
    assert!(err.contains(".."), "{err}");
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.is_empty(),
        "created before the URL was refused: {left:?}"
    );
}

#[test]
fn list_shows_the_duration_the_coordinator_measured_not_a_clock_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    small_run(&root);
    // A store whose clock is far behind ours (S3 on another machine): Last-Modified before the
    // trigger. The listing must not depend on it.
    for chk in listed_paths(&ok(&["checkpoints", "list", root.to_str().unwrap()])) {
        let f = std::fs::File::options()
            .write(true)
            .open(Path::new(&chk).join("_metadata"))
            .unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
    }
    let list = ok(&["checkpoints", "list", root.to_str().unwrap()]);
    for line in list.lines().skip(1) {
        let ms: i64 = line
            .split_whitespace()
            .rev()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("no duration in {line:?}"));
        assert!((0..60_000).contains(&ms), "{line}");
    }
}

#[test]
fn what_is_not_found_is_an_error_that_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    small_run(&root);
    let r = root.to_str().unwrap();
    // Restoring the latest checkpoint of a job that has none.
    let out = flowstate(&[
        "run",
        "--restore",
        "latest",
        "--job",
        "nope",
        "--checkpoint-dir",
        r,
        "--events",
        "10",
        "--quiet",
    ]);
    let err = failed(&out);
    assert!(
        err.contains("'nope'") && err.contains(r) && err.contains("nexmark"),
        "{err}"
    );
    // Listing a job or a directory that has none.
    let err = failed(&flowstate(&["checkpoints", "list", r, "--job", "nope"]));
    assert!(err.contains("'nope'") && err.contains("nexmark"), "{err}");
    let missing = tmp.path().join("missing");
    let err = failed(&flowstate(&[
        "checkpoints",
        "list",
        missing.to_str().unwrap(),
    ]));
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!missing.exists(), "listing must not create the directory");
    // A crash before the first checkpoint still recovers (from nothing).
    let out = ok(&[
        "run",
        "--events",
        "2000",
        "--checkpoint-dir",
        tmp.path().join("early").to_str().unwrap(),
        "--fail-after",
        "1",
        "--interval",
        "1h",
        "--quiet",
    ]);
    assert!(out.contains("state digest"), "{out}");
}

#[test]
fn the_default_checkpoint_directory_is_per_user() {
    let tmp = tempfile::tempdir().unwrap();
    let run_as = |user: &str| {
        let out = bin()
            .args(["run", "--events", "2000", "--quiet"])
            .env("TMPDIR", tmp.path())
            .env("USER", user)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for user in ["alice", "bob"] {
        let out = run_as(user);
        let dir = tmp.path().join(format!("flowstate-{user}/checkpoints"));
        assert!(
            out.contains(&format!("in {}", dir.display())),
            "the printed directory is the user's own and pasteable: {out}"
        );
        assert!(dir.join("nexmark").is_dir(), "{out}");
    }
}

#[test]
fn printed_paths_can_be_pasted_into_the_next_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    let run = small_run(&root);
    assert!(
        run.contains(&format!("in {}", root.display())),
        "the run names its directory as given: {run}"
    );
    let list = ok(&["checkpoints", "list", root.to_str().unwrap()]);
    let chk = listed_paths(&list).pop().unwrap();
    assert!(Path::new(&chk).join("_metadata").is_file(), "{list}");
    // The savepoint's printed path is where it is, and the next command takes it.
    let sp_root = tmp.path().join("sp");
    let out = ok(&["savepoint", &chk, "--to", sp_root.to_str().unwrap()]);
    let sp = out.trim().rsplit(": ").next().unwrap().to_string();
    assert!(sp.starts_with(sp_root.to_str().unwrap()), "{out}");
    assert!(Path::new(&sp).join("_metadata").is_file(), "{out}");
    ok(&["state", "get", &sp, "--state", "spend", "--key", "1001"]);
    // A file that is missing is named by its full path.
    let gone = tmp.path().join("ck/nexmark/chk-999999");
    let err = failed(&flowstate(&[
        "state",
        "get",
        gone.to_str().unwrap(),
        "--state",
        "spend",
        "--key",
        "1",
    ]));
    assert!(
        err.contains(&format!("'{}/_metadata'", gone.display())),
        "{err}"
    );
}

#[test]
fn taking_over_removes_checkpoint_folders_a_kill_left_without_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    small_run(&root);
    // A kill during the first upload of a checkpoint leaves its folder with a staging file
    // only, or (after a sweep of staging files) empty.
    let job = root.join("nexmark");
    std::fs::create_dir_all(job.join("chk-900")).unwrap();
    std::fs::write(job.join("chk-900/auctions-0-e9-c900-p0.kst#17"), b"half").unwrap();
    std::fs::create_dir_all(job.join("chk-901")).unwrap();
    ok(&[
        "run",
        "--restore",
        "latest",
        "--events",
        "31000",
        "--checkpoint-dir",
        root.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!job.join("chk-900").exists());
    assert!(!job.join("chk-901").exists());
    for e in std::fs::read_dir(&job).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("chk-") {
            assert!(p.join("_metadata").is_file(), "{name} has no _metadata");
        }
    }
}

#[test]
fn a_run_fenced_by_another_says_what_happened_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    let r = root.to_str().unwrap();
    let first = bin()
        .args([
            "run",
            "--events",
            "100000000",
            "--interval",
            "100ms",
            "--checkpoint-dir",
            r,
            "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first run has completed a checkpoint, a second run takes the directory over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_dir(root.join("nexmark"))
        .map(|d| d.flatten().any(|e| e.path().join("_metadata").exists()))
        .unwrap_or(false)
    {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    small_run(&root);
    let out = first.wait_with_output().unwrap();
    let err = failed(&out);
    assert!(
        err.contains("another coordinator took over job 'nexmark'"),
        "{err}"
    );
    assert!(
        err.contains("hint: two runs used one job's checkpoint directory"),
        "{err}"
    );
}

#[test]
fn checkpoint_bounds_are_checked_at_start_naming_key_and_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    for (var, key) in [
        (
            "FLOWSTATE_STATE_CHECKPOINTS_TIMEOUT",
            "state.checkpoints.timeout",
        ),
        (
            "FLOWSTATE_STATE_CHECKPOINTS_INTERVAL",
            "state.checkpoints.interval",
        ),
    ] {
        let out = bin()
            .args(["run", "--events", "10", "--checkpoint-dir"])
            .arg(&dir)
            .env(var, "5ms")
            .output()
            .unwrap();
        let err = failed(&out);
        assert!(
            err.contains(&format!("'{key}'")) && err.contains(var) && err.contains("10ms"),
            "{err}"
        );
    }
}
