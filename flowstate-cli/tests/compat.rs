//! A checkpoint written by an earlier release (committed under `tests/fixtures/checkpoint-v1`:
//! the Nexmark job at parallelism 2 after 6,000 events, metadata and canonical snapshot format
//! version 1) stays readable: it is inspected, and a run restored from it on either backend, at
//! another parallelism, ends in the same state as a run that never stopped.
//!
//! Regenerate only together with a new format version, keeping this one:
//! `FLOWSTATE_STATE_CHECKPOINTS_ON_SHUTDOWN=retain flowstate run --events 6000 --parallelism 2
//! --checkpoint-dir <dir>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn checkpoint_format_v1_restores_on_both_backends_at_another_parallelism() {
    let tmp = tempfile::tempdir().unwrap();
    // A copy: restoring must not need to write into the fixture.
    let root = tmp.path().join("old");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1"),
        &root,
    );
    let chk = root.join("nexmark/chk-1").display().to_string();
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["checkpoints", "inspect", &chk, "--json"])).unwrap();
    assert_eq!(json["kind"], "checkpoint");
    assert_eq!(json["operators"][0]["parallelism"], 2, "{json}");

    let dir = |name: &str| tmp.path().join(name).display().to_string();
    let clean = digest(&ok(&[
        "run",
        "--events",
        "12000",
        "--checkpoint-dir",
        &dir("clean"),
        "--quiet",
    ]));
    for (backend, p) in [("heap", "3"), ("mmap", "1")] {
        let resumed = ok(&[
            "run",
            "--restore",
            &chk,
            "--events",
            "12000",
            "--backend",
            backend,
            "--parallelism",
            p,
            "--checkpoint-dir",
            &dir(backend),
            "--quiet",
        ]);
        assert!(resumed.contains("restored checkpoint 1"), "{resumed}");
        assert_eq!(digest(&resumed), clean, "{backend} at parallelism {p}");
    }
}
