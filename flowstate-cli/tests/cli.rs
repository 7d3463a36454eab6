//! The `flowstate` binary end to end: run, crash and recover, list, inspect, convert a
//! checkpoint into a savepoint through the other backend at another parallelism, restore from
//! it, read a key — and the results match runs that never failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn latest_chk(root: &Path) -> String {
    all_chks(root).pop().expect("a completed checkpoint")
}

/// Upload staging files (`<name>#<digits>`) anywhere under `dir`.
fn staging_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else if name
                .split_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[test]
fn run_crash_recover_inspect_convert_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).display().to_string();

    // A run that never fails.
    let clean = ok(&[
        "run",
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("clean"),
        "--quiet",
    ]);
    let clean_digest = digest(&clean);

    // Crash after 60,000 events (checkpoints every 100 ms), then recover from the latest.
    let crashed = ok(&[
        "run",
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("crash"),
        "--fail-after",
        "60000",
        "--interval",
        "100ms",
        "--quiet",
    ]);
    assert!(
        crashed.contains("recovering from the latest completed checkpoint"),
        "{crashed}"
    );
    assert!(crashed.contains("restored checkpoint"), "{crashed}");
    assert_eq!(
        digest(&crashed),
        clean_digest,
        "recovery gives the same state as a clean run"
    );
    // Whatever uploads the crash cut off, and those in flight at the clean end, left nothing.
    assert_eq!(
        staging_files(&tmp.path().join("crash")),
        Vec::<String>::new()
    );

    // List and inspect.
    let list = ok(&["checkpoints", "list", &dir("crash")]);
    assert!(
        list.contains("full") && list.contains("nexmark/chk-"),
        "{list}"
    );
    let chk = latest_chk(&tmp.path().join("crash"));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["checkpoints", "inspect", &chk, "--json"])).unwrap();
    assert_eq!(json["kind"], "checkpoint");
    let ops: Vec<&str> = json["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["operator"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["auctions", "bidders", "source"]);
    assert_eq!(
        json["operators"][0]["states"]["window-timers"]["kind"],
        "timers"
    );
    let text = ok(&["checkpoints", "inspect", &chk]);
    assert!(text.contains("operator 'bidders': parallelism 2"), "{text}");

    // Convert the checkpoint into a savepoint through the mmap backend at parallelism 3 ...
    let converted = ok(&[
        "savepoint",
        &chk,
        "--to",
        &dir("sp"),
        "--backend",
        "mmap",
        "--parallelism",
        "3",
    ]);
    assert!(
        converted.contains("written at parallelism 3"),
        "{converted}"
    );
    let sp_root = tmp.path().join("sp").join("savepoints");
    let sp = std::fs::read_dir(&sp_root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let sp = sp.display().to_string();
    // ... read one key offline ...
    let got = ok(&["state", "get", &sp, "--state", "spend", "--key", "1001"]);
    assert!(got.starts_with("spend[1001] = ["), "{got}");
    // ... restore it on mmap at parallelism 3 and go on to 150,000 events: same state as a
    // clean heap run over 150,000 events.
    let resumed = ok(&[
        "run",
        "--restore",
        &sp,
        "--events",
        "150000",
        "--checkpoint-dir",
        &dir("resumed"),
        "--backend",
        "mmap",
        "--parallelism",
        "3",
        "--quiet",
    ]);
    assert!(resumed.contains("restored checkpoint"), "{resumed}");
    let longer = ok(&[
        "run",
        "--events",
        "150000",
        "--checkpoint-dir",
        &dir("longer"),
        "--quiet",
    ]);
    assert_eq!(digest(&resumed), digest(&longer));
    assert_ne!(digest(&longer), clean_digest);
}

#[test]
fn mmap_incremental_checkpoints_recover_and_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).display().to_string();
    let clean = digest(&ok(&[
        "run",
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("clean"),
        "--quiet",
    ]));
    // The mmap backend with incremental (native) checkpoints: crash after 60,000 events and
    // recover from the engine files of the latest checkpoint.
    let incremental = [
        ("FLOWSTATE_STATE_CHECKPOINTS_INCREMENTAL", "true"),
        ("FLOWSTATE_STATE_CHECKPOINTS_RETAINED", "2"),
    ];
    let crashed = ok_env(
        &[
            "run",
            "--backend",
            "mmap",
            "--events",
            "100000",
            "--checkpoint-dir",
            &dir("crash"),
            "--fail-after",
            "60000",
            "--interval",
            "100ms",
            "--quiet",
        ],
        &incremental,
    );
    assert!(crashed.contains("restored checkpoint"), "{crashed}");
    assert_eq!(digest(&crashed), clean, "native recovery = clean run");
    assert_eq!(
        staging_files(&tmp.path().join("crash")),
        Vec::<String>::new()
    );
    let chk = latest_chk(&tmp.path().join("crash"));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["checkpoints", "inspect", &chk, "--json"])).unwrap();
    assert_eq!(json["incremental"], true, "{json}");
    assert!(
        std::fs::read_dir(tmp.path().join("crash/nexmark/shared"))
            .unwrap()
            .count()
            > 0,
        "engine files are in shared/"
    );
    // One key read offline goes through the mmap backend.
    let got = ok(&["state", "get", &chk, "--state", "spend", "--key", "1001"]);
    assert!(got.starts_with("spend[1001] = ["), "{got}");
    // The heap cannot read engine files: a clear error says what to do.
    let out = flowstate(&[
        "savepoint",
        &chk,
        "--to",
        &dir("sp-heap"),
        "--backend",
        "heap",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--backend mmap"), "{err}");
    // Converted through mmap into a canonical savepoint, it restores on the heap.
    ok(&["savepoint", &chk, "--to", &dir("sp"), "--backend", "mmap"]);
    let sp = std::fs::read_dir(tmp.path().join("sp/savepoints"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let resumed = ok(&[
        "run",
        "--restore",
        &sp.display().to_string(),
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("resumed"),
        "--quiet",
    ]);
    assert_eq!(digest(&resumed), clean);
}

#[test]
fn errors_are_one_line_with_a_hint_and_a_failing_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[state.checkpoints]\ninterval = \"0s\"\n").unwrap();
    let out = flowstate(&["run", "--config", cfg.to_str().unwrap(), "--events", "10"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: invalid value for 'state.checkpoints.interval'"),
        "{err}"
    );
    assert!(err.contains("bad.toml") && err.contains("hint:"), "{err}");

    let out = flowstate(&[
        "checkpoints",
        "inspect",
        tmp.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the checkpoint"));

    for sub in [
        &["run", "--help"][..],
        &["checkpoints", "--help"],
        &["savepoint", "--help"],
        &["state", "--help"],
    ] {
        let help = ok(sub);
        assert!(help.contains("Example"), "{sub:?}: {help}");
    }
}

#[test]
fn ctrl_c_stops_after_a_final_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let child = Command::new(env!("CARGO_BIN_EXE_flowstate"))
        .args([
            "run",
            "--events",
            "1000000000",
            "--interval",
            "100ms",
            "--quiet",
        ])
        .arg("--checkpoint-dir")
        .arg(&ck)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the job is running and has checkpointed once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ck.join("nexmark").exists() || latest_chk_opt(&ck).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stopped after"), "{text}");
    // The final checkpoint holds the offset the job stopped at: a restore continues from there.
    let stopped_at: u64 = text
        .lines()
        .find_map(|l| l.split("(offset ").nth(1)?.split(')').next()?.parse().ok())
        .unwrap();
    let resumed = ok(&[
        "run",
        "--restore",
        "latest",
        "--events",
        &(stopped_at + 1000).to_string(),
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        resumed.contains(&format!("(source offset {stopped_at})")),
        "{resumed}"
    );
}

fn latest_chk_opt(root: &Path) -> Option<String> {
    if !root.join("nexmark").is_dir() {
        return None;
    }
    all_chks(root).pop()
}

/// Entries left in `dir` (names), sorted.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Issue 15, item 4: with `state.mmap.dir` set, the stores of one process (auctions and
/// bidders of every subtask) each get their own folder under it, a run restores from its
/// checkpoints, a crashed run recovers, and no folder outlives the runs.
#[test]
fn mmap_with_a_working_directory_runs_restores_and_recovers_without_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).display().to_string();
    let work = tmp.path().join("mmap-work");
    let cfg = tmp.path().join("m.toml");
    std::fs::write(
        &cfg,
        format!(
            "[state.checkpoints]\nincremental = true\nretained = 2\n\n[state.mmap]\ndir = {:?}\n",
            work.display().to_string()
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--backend", "mmap", "--config", &cfg];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--parallelism", "2", "--interval", "100ms", "--quiet"]);
        ok(&args.iter().map(|s| &**s).collect::<Vec<_>>())
    };
    let clean = digest(&ok(&[
        "run",
        "--events",
        "100000",
        "--parallelism",
        "2",
        "--checkpoint-dir",
        &dir("clean"),
        "--quiet",
    ]));

    // An uninterrupted run on mmap gives the heap's state.
    let whole = run(&["--events", "100000", "--checkpoint-dir", &dir("whole")]);
    assert_eq!(digest(&whole), clean, "mmap with state.mmap.dir = heap");
    assert_eq!(leftovers(&work), Vec::<String>::new(), "after a clean run");

    // A run that stops at 60,000 events, then a restore of its latest checkpoint that goes on.
    run(&["--events", "60000", "--checkpoint-dir", &dir("resume")]);
    let resumed = run(&[
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("resume"),
        "--restore",
        "latest",
    ]);
    assert!(resumed.contains("restored checkpoint"), "{resumed}");
    assert_eq!(digest(&resumed), clean, "restored run = uninterrupted run");
    assert_eq!(leftovers(&work), Vec::<String>::new(), "after a restore");

    // A crash after 60,000 events (the child leaves its folders), then recovery in this process.
    let crashed = run(&[
        "--events",
        "100000",
        "--checkpoint-dir",
        &dir("crash"),
        "--fail-after",
        "60000",
    ]);
    assert!(crashed.contains("restored checkpoint"), "{crashed}");
    assert_eq!(digest(&crashed), clean, "recovered run = uninterrupted run");
    assert_eq!(
        leftovers(&work),
        Vec::<String>::new(),
        "the crashed run's folders are swept, the recovered run's removed"
    );

    // A real crash: SIGKILL after a completed checkpoint leaves the folders of all four stores
    // behind; the restarted run sweeps them, restores and ends with nothing left.
    let ck = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowstate"))
        .args(["run", "--backend", "mmap", "--config", &cfg])
        .args([
            "--events",
            "100000",
            "--parallelism",
            "2",
            "--interval",
            "100ms",
        ])
        .arg("--checkpoint-dir")
        .arg(&ck)
        .arg("--quiet")
        .env_remove("FLOWSTATE_STATE_CHECKPOINTS_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Checkpoint 2's metadata is written once checkpoint 1 is complete (one at a time).
    let second_written = || {
        std::fs::read_dir(ck.join("nexmark")).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("chk-")?
                        .parse::<u64>()
                        .ok()
                        .filter(|id| *id >= 2 && e.path().join("_metadata").exists())
                })
                .next()
                .is_some()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !second_written() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended before it could be killed"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        leftovers(&work).len(),
        4,
        "a killed run leaves its folders: {:?}",
        leftovers(&work)
    );
    let restarted = run(&[
        "--events",
        "100000",
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--restore",
        "latest",
    ]);
    assert!(restarted.contains("restored checkpoint"), "{restarted}");
    assert_eq!(
        digest(&restarted),
        clean,
        "restarted run = uninterrupted run"
    );
    assert_eq!(
        leftovers(&work),
        Vec::<String>::new(),
        "the killed run's folders are swept"
    );
}

/// Every completed checkpoint directory of the job under `root`, by id.
fn all_chks(root: &Path) -> Vec<String> {
    let job = root.join("nexmark");
    let mut ids: Vec<u64> = std::fs::read_dir(&job)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("chk-")?
                .parse()
                .ok()
        })
        .filter(|id| job.join(format!("chk-{id}/_metadata")).exists())
        .collect();
    ids.sort();
    ids.iter()
        .map(|id| job.join(format!("chk-{id}")).display().to_string())
        .collect()
}

/// Per operator, the sum of the subtasks' entries in an `inspect --json` document.
fn entries_by_operator(json: &serde_json::Value) -> Vec<(String, u64)> {
    json["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let n = o["subtasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["entries"].as_u64().unwrap_or(0))
                .sum();
            (o["operator"].as_str().unwrap().to_string(), n)
        })
        .collect()
}

/// Issue 15 item 5: inspect read the end marker of each file at an offset guessed from the
/// handle's key-group count, which is wrong for delta streams and for base files a later delta
/// replaced key groups of; it rejected most incremental heap checkpoints. Every retained
/// checkpoint must inspect, and its live entries must equal those of a full savepoint of it.
#[test]
fn inspect_reads_every_incremental_heap_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).display().to_string();
    ok_env(
        &[
            "run",
            "--events",
            "100000",
            "--checkpoint-dir",
            &dir("inc"),
            "--interval",
            "100ms",
            "--quiet",
        ],
        &[
            ("FLOWSTATE_STATE_CHECKPOINTS_INCREMENTAL", "true"),
            ("FLOWSTATE_STATE_CHECKPOINTS_RETAINED", "100"),
        ],
    );
    let chks = all_chks(&tmp.path().join("inc"));
    assert!(chks.len() >= 3, "{chks:?}");
    let mut deltas = 0;
    for chk in &chks {
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["checkpoints", "inspect", chk, "--json"])).unwrap();
        assert_eq!(json["incremental"], true, "{chk}");
        deltas += json["operators"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|o| o["subtasks"].as_array().unwrap())
            .flat_map(|s| s["files"].as_array().unwrap())
            .filter(|f| f["delta"] == true)
            .count();
        ok(&["checkpoints", "inspect", chk]);
    }
    assert!(deltas > 0, "no checkpoint had delta files");
    // Live entries of the newest and of a middle checkpoint = those of a full savepoint.
    for (i, chk) in [chks.len() - 1, chks.len() / 2]
        .into_iter()
        .map(|i| &chks[i])
        .enumerate()
    {
        let to = dir(&format!("sp{i}"));
        ok(&["savepoint", chk, "--to", &to, "--backend", "heap"]);
        let sp = std::fs::read_dir(Path::new(&to).join("savepoints"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let of = |p: &str| -> serde_json::Value {
            serde_json::from_str(&ok(&["checkpoints", "inspect", p, "--json"])).unwrap()
        };
        let chk_entries = entries_by_operator(&of(chk));
        assert!(chk_entries.iter().any(|(_, n)| *n > 0), "{chk_entries:?}");
        assert_eq!(
            chk_entries,
            entries_by_operator(&of(&sp.display().to_string())),
            "{chk}"
        );
    }
}

/// Takes a checkpoint of the one subtask of `ep` and waits until it knows it completed (a
/// delta builds on the last checkpoint the subtask heard completed).
fn checkpoint_heap(
    coord: &checkpoint::CheckpointCoordinator,
    ep: &mut checkpoint::SubtaskEndpoint,
    b: &mut flowstate::heap::HeapKeyedStateBackend<u64>,
) -> checkpoint::CompletedCheckpoint {
    use checkpoint::SubtaskCommand;
    let wait = std::time::Duration::from_secs(60);
    let pending = coord.trigger_checkpoint().unwrap();
    loop {
        if let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(wait).unwrap() {
            ep.snapshot_heap(&barrier, b, None).unwrap();
            break;
        }
    }
    let done = pending.wait(wait).unwrap();
    loop {
        if let SubtaskCommand::CheckpointComplete { checkpoint_id } = ep.recv_timeout(wait).unwrap()
        {
            if checkpoint_id == done.metadata.checkpoint_id {
                break;
            }
        }
    }
    done
}

/// Issue 15 item 5, deterministically: a delta that writes some key groups whole drops them
/// from the base file's part of the handle, so the handle lists fewer blocks than the base
/// file's end marker, whose place inspect guessed from the handle. Inspect must read such
/// chains, and count exactly the live entries.
#[test]
fn inspect_reads_a_delta_chain_that_replaced_key_groups() {
    use flowstate::api::{
        assign_to_key_group, KeyedStateBackend, KeyedStateBackendExt, PostcardSerializer,
        StateSerializer, ValueStateDescriptor,
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib");
    std::fs::create_dir_all(&root).unwrap();
    let store =
        flowstate::storage::Storage::from_url(&format!("file://{}", root.display())).unwrap();
    let storage = checkpoint::CheckpointStorage::new(
        std::sync::Arc::clone(store.store()),
        store.root().as_ref(),
        "nexmark",
    )
    .unwrap();
    let config = checkpoint::CheckpointConfig {
        incremental: true,
        retained: 10,
        ..Default::default()
    };
    let mut builder = checkpoint::CheckpointCoordinator::builder(storage.clone(), config);
    let mut ep = builder.register_subtask("agg", 0, 1, 8).unwrap();
    let coord = builder.start().unwrap();
    let mut b = flowstate::heap::HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(8)
        .build()
        .unwrap();
    let v = b
        .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
        .unwrap();
    let kg = |k: u64| {
        let mut bytes = Vec::new();
        PostcardSerializer::<u64>::new()
            .serialize(&k, &mut bytes)
            .unwrap();
        assign_to_key_group(&bytes, 8)
    };
    let mut live = std::collections::BTreeSet::new();
    for k in 0..3000u64 {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k).unwrap();
        live.insert(k);
    }
    let mut expected = vec![live.len() as u64];
    let base = checkpoint_heap(&coord, &mut ep, &mut b);
    // Every key of the even key groups changes (written whole), a few others too, some go.
    for round in 1..=2u64 {
        if round == 1 {
            // 3 × 375 logged changes reach the log's first limit (1024), where the key group's
            // distinct changes are found to be too many.
            for pass in 0..3u64 {
                for k in (0..3000u64).filter(|k| kg(*k) % 2 == 0) {
                    b.set_current_key(k).unwrap();
                    b.value(&v).update(k * 10 + pass).unwrap();
                }
            }
        }
        for k in 0..3000u64 {
            b.set_current_key(k).unwrap();
            if k % (41 + round) == 0 {
                b.value(&v).clear().unwrap();
                live.remove(&k);
            } else if k % 53 == 0 {
                b.value(&v).update(k * 10 + round).unwrap();
                live.insert(k);
            }
        }
        expected.push(live.len() as u64);
        checkpoint_heap(&coord, &mut ep, &mut b);
    }
    drop(coord);
    // The chain really dropped key groups from the base file.
    let base_file = &base.metadata.operators[0].subtasks[0]
        .keyed
        .as_ref()
        .unwrap()
        .files[0];
    let chk2 = checkpoint::CompletedCheckpoint::load(&storage, &storage.metadata_path(2)).unwrap();
    let files2 = &chk2.metadata.operators[0].subtasks[0]
        .keyed
        .as_ref()
        .unwrap()
        .files;
    assert!(files2.len() >= 2, "{files2:?}");
    assert_eq!(files2[0].file.location, base_file.file.location);
    assert!(
        files2[0].key_groups.len() < base_file.key_groups.len(),
        "{:?}\n{:?}",
        base.metadata.operators[0].subtasks[0].keyed,
        files2
    );
    for (id, want) in (1..=3u64).zip(expected) {
        let chk = root.join(format!("nexmark/chk-{id}")).display().to_string();
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["checkpoints", "inspect", &chk, "--json"])).unwrap();
        assert_eq!(
            entries_by_operator(&json),
            [("agg".to_string(), want)],
            "checkpoint {id}"
        );
        ok(&["checkpoints", "inspect", &chk]);
    }
}

/// Issue 15 item 7: a native mmap incremental checkpoint keeps its state in native files,
/// which inspect ignored (entries 0, bytes 0, key groups null).
#[test]
fn inspect_shows_native_mmap_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mm").display().to_string();
    ok_env(
        &[
            "run",
            "--backend",
            "mmap",
            "--events",
            "50000",
            "--checkpoint-dir",
            &dir,
            "--quiet",
        ],
        &[("FLOWSTATE_STATE_CHECKPOINTS_INCREMENTAL", "true")],
    );
    let chk = latest_chk(&tmp.path().join("mm"));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["checkpoints", "inspect", &chk, "--json"])).unwrap();
    let bidders = json["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["operator"] == "bidders")
        .unwrap();
    for s in bidders["subtasks"].as_array().unwrap() {
        assert_eq!(s["format"], "native mmap", "{s}");
        assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(s["key_groups"].is_string(), "{s}");
        assert!(s["key_groups_with_data"].as_u64().unwrap() > 0, "{s}");
        let files = s["files"].as_array().unwrap();
        assert!(!files.is_empty(), "{s}");
        assert!(files.iter().all(|f| f["key_groups"].is_string()), "{s}");
        assert_eq!(
            s["bytes"].as_u64().unwrap(),
            files
                .iter()
                .map(|f| f["size"].as_u64().unwrap())
                .sum::<u64>()
        );
    }
    // The states come from the native state registry.
    assert_eq!(
        bidders["states"]["spend"]["kind"], "aggregating",
        "{bidders}"
    );
    let text = ok(&["checkpoints", "inspect", &chk]);
    assert!(text.contains("native mmap files covering"), "{text}");
    assert!(text.contains("state 'spend'"), "{text}");
}

/// Issue 15 item 6: inspect on a damaged file printed nonsense and exited 0. It must verify
/// sizes and checksums as restore does and fail with one line naming the file.
#[test]
fn inspect_fails_on_a_damaged_file_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("full").display().to_string();
    ok(&[
        "run",
        "--events",
        "20000",
        "--checkpoint-dir",
        &dir,
        "--quiet",
    ]);
    let chk = latest_chk(&tmp.path().join("full"));
    let kst: Vec<std::path::PathBuf> = std::fs::read_dir(&chk)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "kst"))
        .collect();
    let victim = kst
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let original = std::fs::read(victim).unwrap();
    let len = original.len();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("truncated in a block", original[..len / 2].to_vec()),
        ("truncated in the end marker", original[..len - 10].to_vec()),
        ("a bit flipped in a block", {
            let mut b = original.clone();
            b[len / 2] ^= 0x10;
            b
        }),
        ("a bit flipped in the record count", {
            let mut b = original.clone();
            b[len - 6] ^= 0x01;
            b
        }),
    ];
    for (what, bytes) in damages {
        std::fs::write(victim, &bytes).unwrap();
        for args in [
            &["checkpoints", "inspect", &chk][..],
            &["checkpoints", "inspect", &chk, "--json"],
        ] {
            let out = flowstate(args);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: exit 0\n{stdout}\n{err}");
            let first = err.lines().next().unwrap_or("");
            assert!(
                first.starts_with("error: ") && first.contains(&name),
                "{what}: {err}"
            );
            assert!(!stdout.contains("entries"), "{what}: {stdout}");
        }
    }
    std::fs::write(victim, &original).unwrap();
    ok(&["checkpoints", "inspect", &chk]);
}
