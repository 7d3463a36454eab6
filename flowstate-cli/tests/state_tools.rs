//! `flowstate state list|dump|get` and `flowstate savepoint` on a checkpoint of a job the CLI
//! knows nothing about: a click-session job written here with the library, with value state
//! in windows, list, map, a user type and event-time timers, and a second operator keyed by
//! fixed-width integers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use checkpoint::{
    assemble_operators, commit_checkpoint, write_subtask_snapshot, CommitLog, KeyedSnapshot,
    SnapshotTarget, SubtaskAck, SubtaskSnapshot,
};
use common::*;
use serde_json::Value;
use state_api::{
    assign_to_key_group, FixedWidthSerializer, KeyGroupRange, KeyedStateBackend,
    KeyedStateBackendExt, ListStateDescriptor, MapStateDescriptor, PostcardSerializer,
    StateSerializer, TimeDomain, TimerServiceDescriptor, ValueStateDescriptor,
};
use state_heap::HeapKeyedStateBackend;

const MAX_P: u32 = 128;
const USERS: u64 = 60;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Session {
    start: u64,
}

fn clicks() -> ValueStateDescriptor<u64, i64> {
    ValueStateDescriptor::new("clicks").unwrap()
}
fn pages() -> ListStateDescriptor<String> {
    ListStateDescriptor::new("pages").unwrap()
}
fn referrers() -> MapStateDescriptor<String, u32> {
    MapStateDescriptor::new("referrers").unwrap()
}
fn session() -> ValueStateDescriptor<Session> {
    ValueStateDescriptor::new("session").unwrap()
}
fn user(i: u64) -> String {
    format!("user-{i}")
}
fn key_group(user: &str) -> u32 {
    let mut b = Vec::new();
    PostcardSerializer::<String>::new()
        .serialize(&user.to_string(), &mut b)
        .unwrap();
    assign_to_key_group(&b, MAX_P)
}

/// (user, window) -> clicks: every user in window 0, even users in window 10000 too.
fn model_clicks() -> BTreeMap<(String, i64), u64> {
    let mut m = BTreeMap::new();
    for i in 0..USERS {
        m.insert((user(i), 0), i + 1);
        if i % 2 == 0 {
            m.insert((user(i), 10_000), 2 * (i + 1));
        }
    }
    m
}

/// Writes checkpoint 1 of job "clicks" under `root` (a file:// URL): operator "sessions" at
/// parallelism 2 and "totals" (u64 keys, fixed width) at parallelism 1.
fn write_job(root: &str) -> String {
    let config = flowstate::config::ConfigLoader::new().load().unwrap();
    let storage = flowstate_cli::job::open_storage(&config, root, "clicks").unwrap();
    let mut log = CommitLog::claim(&storage).unwrap();
    let target = SnapshotTarget {
        dir: storage.checkpoint_dir(1),
        shared_dir: storage.shared_dir(),
        checkpoint_id: 1,
        epoch: log.epoch(),
    };
    let model = model_clicks();
    let mut acks = Vec::new();
    for i in 0..2 {
        let range = KeyGroupRange::for_operator(MAX_P, 2, i).unwrap();
        let mut b = HeapKeyedStateBackend::<String>::builder()
            .key_group_range(range)
            .build()
            .unwrap();
        let c = b.register_value(clicks()).unwrap();
        let p = b.register_list(pages()).unwrap();
        let r = b.register_map(referrers()).unwrap();
        let s = b.register_value(session()).unwrap();
        let t = b
            .register_timer_service(TimerServiceDescriptor::<i64>::new("session-end").unwrap())
            .unwrap();
        for n in (0..USERS).filter(|n| range.contains(key_group(&user(*n)))) {
            b.set_current_key(user(n)).unwrap();
            for ((_, w), v) in model.iter().filter(|((u, _), _)| *u == user(n)) {
                b.value_in(&c, w).update(*v).unwrap();
            }
            for j in 0..n % 3 {
                b.list(&p).add(format!("/page/{j}")).unwrap();
            }
            b.map(&r).put("search".into(), n as u32).unwrap();
            b.value(&s).update(Session { start: n }).unwrap();
            b.register_timer(&t, TimeDomain::EventTime, &0, 20_000 + n as i64)
                .unwrap();
        }
        let state = write_subtask_snapshot(
            &storage,
            &target,
            SubtaskSnapshot {
                operator_id: "sessions".into(),
                subtask: i,
                keyed: Some(KeyedSnapshot::Full(vec![b.snapshot().unwrap()])),
                operator_state: None,
            },
        )
        .unwrap();
        acks.push(SubtaskAck {
            operator_id: "sessions".into(),
            parallelism: 2,
            max_parallelism: MAX_P,
            state,
        });
    }
    let mut b = HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .build()
        .unwrap();
    let total = b
        .register_value(ValueStateDescriptor::<u64>::new("total").unwrap())
        .unwrap();
    for k in 0..5u64 {
        b.set_current_key(k).unwrap();
        b.value(&total).update(k * 100).unwrap();
    }
    let state = write_subtask_snapshot(
        &storage,
        &target,
        SubtaskSnapshot {
            operator_id: "totals".into(),
            subtask: 0,
            keyed: Some(KeyedSnapshot::Full(vec![b.snapshot().unwrap()])),
            operator_state: None,
        },
    )
    .unwrap();
    acks.push(SubtaskAck {
        operator_id: "totals".into(),
        parallelism: 1,
        max_parallelism: MAX_P,
        state,
    });
    let c = commit_checkpoint(
        &storage,
        &mut log,
        1,
        1_000,
        Some(5),
        assemble_operators(acks).unwrap(),
    )
    .unwrap();
    c.dir_location()
}

fn failed(args: &[&str]) -> String {
    let out = flowstate(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn list_dump_and_get_any_jobs_state() {
    let tmp = tempfile::tempdir().unwrap();
    let root = format!("file://{}", tmp.path().join("ck").display());
    let chk = write_job(&root);
    let model = model_clicks();

    // list: operators, kinds, serializers, entries per key group.
    let doc: Value = serde_json::from_str(&ok(&["state", "list", &chk, "--json"])).unwrap();
    let ops = doc["operators"].as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0]["operator"], "sessions");
    assert_eq!(ops[0]["key_serializer"]["schema"], "String");
    let states: BTreeMap<&str, (&str, u64)> = ops[0]["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                (s["kind"].as_str().unwrap(), s["entries"].as_u64().unwrap()),
            )
        })
        .collect();
    let lists = (0..USERS).filter(|n| n % 3 != 0).count() as u64;
    assert_eq!(
        states,
        BTreeMap::from([
            ("clicks", ("value", model.len() as u64)),
            ("pages", ("list", lists)),
            ("referrers", ("map", USERS)),
            ("session", ("value", USERS)),
            ("session-end", ("timers", USERS)),
        ])
    );
    let per_kg: u64 = ops[0]["states"][0]["key_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["entries"].as_u64().unwrap())
        .sum();
    assert_eq!(per_kg, model.len() as u64);
    let text = ok(&["state", "list", &chk]);
    assert!(
        text.contains("state 'clicks': value [namespace postcard v1 i64, value postcard v1 u64]"),
        "{text}"
    );

    // dump: one JSON object per entry, checked line by line.
    let all = lines(&ok(&["state", "dump", &chk]));
    assert_eq!(all.len() as u64, model.len() as u64 + lists + 3 * USERS + 5);
    let mut seen_clicks = BTreeMap::new();
    let mut kinds = BTreeSet::new();
    for l in &all {
        kinds.insert(l["state"].as_str().unwrap().to_string());
        if l["operator"] == "totals" {
            let k = l["key"].as_u64().unwrap();
            assert_eq!(l["value"].as_u64().unwrap(), k * 100, "{l}");
            continue;
        }
        let u = l["key"].as_str().unwrap();
        let n: u64 = u.strip_prefix("user-").unwrap().parse().unwrap();
        assert_eq!(
            l["key_group"].as_u64().unwrap(),
            u64::from(key_group(u)),
            "{l}"
        );
        match l["state"].as_str().unwrap() {
            "clicks" => {
                let w = l["namespace"].as_i64().unwrap();
                seen_clicks.insert((u.to_string(), w), l["value"].as_u64().unwrap());
            }
            "pages" => {
                assert!(l["namespace"].is_null(), "{l}");
                let want: Vec<String> = (0..n % 3).map(|j| format!("/page/{j}")).collect();
                assert_eq!(l["value"], serde_json::json!(want), "{l}");
            }
            "referrers" => {
                assert_eq!(
                    l["value"],
                    serde_json::json!([{"key": "search", "value": n}]),
                    "{l}"
                );
            }
            "session" => {
                // A user type: not decodable without it, shown as hex.
                let hex = l["value"]["hex"].as_str().unwrap();
                let mut b = Vec::new();
                PostcardSerializer::<Session>::new()
                    .serialize(&Session { start: n }, &mut b)
                    .unwrap();
                assert_eq!(hex, checkpoint::processor::builtin::hex(&b), "{l}");
            }
            "session-end" => {
                assert_eq!(l["namespace"], 0, "{l}");
                assert_eq!(
                    l["value"],
                    serde_json::json!({"timestamp": 20_000 + n, "domain": "event-time"}),
                    "{l}"
                );
            }
            other => panic!("unexpected state {other}"),
        }
    }
    assert_eq!(seen_clicks, model);
    assert_eq!(kinds.len(), 6);
    // One state of one operator, into a file.
    let out = tmp.path().join("pages.jsonl");
    ok(&[
        "state",
        "dump",
        &chk,
        "--operator",
        "sessions",
        "--state",
        "pages",
        "-o",
        out.to_str().unwrap(),
    ]);
    let pages = lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(pages.len() as u64, lists);
    assert!(pages.iter().all(|l| l["state"] == "pages"));

    // get: every namespace of a key, or one.
    let got = ok(&["state", "get", &chk, "--state", "clicks", "--key", "user-4"]);
    let mut got: Vec<&str> = got.lines().collect();
    got.sort();
    assert_eq!(
        got,
        ["clicks[user-4] @ 0 = 5", "clicks[user-4] @ 10000 = 10"]
    );
    let got = ok(&[
        "state",
        "get",
        &chk,
        "--state",
        "clicks",
        "--key",
        "user-4",
        "--namespace",
        "10000",
    ]);
    assert_eq!(got, "clicks[user-4] @ 10000 = 10\n");
    let got = ok(&[
        "state",
        "get",
        &chk,
        "--state",
        "referrers",
        "--key",
        "user-7",
    ]);
    assert_eq!(
        got,
        "referrers[user-7] = [{\"key\":\"search\",\"value\":7}]\n"
    );
    let got = ok(&["state", "get", &chk, "--state", "total", "--key", "3"]);
    assert_eq!(got, "total[3] = 300\n");
    let got = ok(&["state", "get", &chk, "--state", "clicks", "--key", "nobody"]);
    assert!(
        got.starts_with("clicks[nobody]: no entry (key group "),
        "{got}"
    );
    let j = lines(&ok(&[
        "state", "get", &chk, "--state", "session", "--key", "user-2", "--json",
    ]));
    assert_eq!(j.len(), 1);
    assert!(j[0]["value"]["hex"].is_string(), "{}", j[0]);

    // Errors name what is wrong.
    let err = failed(&["state", "get", &chk, "--state", "total", "--key", "abc"]);
    assert!(err.contains("'abc' is not a u64"), "{err}");
    let err = failed(&["state", "get", &chk, "--state", "nope", "--key", "1"]);
    assert!(err.contains("no state 'nope'"), "{err}");
    assert!(
        err.contains("sessions/clicks") && err.contains("totals/total"),
        "{err}"
    );
    let err = failed(&["state", "dump", &chk, "--operator", "nope"]);
    assert!(err.contains("sessions, totals"), "{err}");
    if cfg!(not(feature = "parquet")) {
        let err = failed(&[
            "state",
            "dump",
            &chk,
            "--format",
            "parquet",
            "-o",
            "x.parquet",
        ]);
        assert!(err.contains("--features parquet"), "{err}");
    }
}

#[test]
fn savepoints_of_any_job_rescaled_and_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let root = format!("file://{}", tmp.path().join("ck").display());
    let chk = write_job(&root);
    let sp_root = format!("file://{}", tmp.path().join("sp").display());

    // --to comes from state.savepoints.dir.
    let out = ok_env(
        &["savepoint", &chk, "--parallelism", "3"],
        &[("FLOWSTATE_STATE_SAVEPOINTS_DIR", &sp_root)],
    );
    assert!(out.contains("written at parallelism 3"), "{out}");
    let sp = out.trim().rsplit(": ").next().unwrap().to_string();
    assert!(
        sp.starts_with(tmp.path().join("sp").to_str().unwrap()),
        "{out}"
    );

    // Same entries as the checkpoint, now at parallelism 3.
    let sorted = |text: String| {
        let mut l: Vec<String> = text.lines().map(str::to_string).collect();
        l.sort();
        l
    };
    assert_eq!(
        sorted(ok(&["state", "dump", &sp])),
        sorted(ok(&["state", "dump", &chk]))
    );
    let doc: Value = serde_json::from_str(&ok(&["state", "list", &sp, "--json"])).unwrap();
    assert_eq!(doc["kind"], "savepoint");
    assert_eq!(doc["operators"][0]["parallelism"], 3);

    // The job's own code restores it at parallelism 3.
    let config = flowstate::config::ConfigLoader::new().load().unwrap();
    let (storage, c) = flowstate_cli::tools::open_checkpoint(&config, &sp).unwrap();
    let mut restored = BTreeMap::new();
    for i in 0..3 {
        let mut b = HeapKeyedStateBackend::<String>::builder()
            .key_group_range(KeyGroupRange::for_operator(MAX_P, 3, i).unwrap())
            .build()
            .unwrap();
        c.restore_keyed(&storage, "sessions", i, &mut b).unwrap();
        let h = b.register_value(clicks()).unwrap();
        for n in 0..USERS {
            if !b.key_group_range().contains(key_group(&user(n))) {
                continue;
            }
            b.set_current_key(user(n)).unwrap();
            for w in [0i64, 10_000] {
                if let Some(v) = b.value_in(&h, &w).get().unwrap() {
                    restored.insert((user(n), w), v);
                }
            }
        }
    }
    assert_eq!(restored, model_clicks());

    // A savepoint for a job that only has "sessions".
    let err = failed(&[
        "savepoint",
        &chk,
        "--to",
        &sp_root,
        "--operator",
        "sessions",
    ]);
    assert!(
        err.contains("'totals'") && err.contains("--allow-non-restored-state"),
        "{err}"
    );
    let out = ok(&[
        "savepoint",
        &chk,
        "--to",
        &sp_root,
        "--operator",
        "sessions",
        "--allow-non-restored-state",
    ]);
    let pruned = out.trim().rsplit(": ").next().unwrap().to_string();
    let doc: Value = serde_json::from_str(&ok(&["state", "list", &pruned, "--json"])).unwrap();
    let ops: Vec<&str> = doc["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["operator"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["sessions"]);

    // No --to and no state.savepoints.dir.
    let err = failed(&["savepoint", &chk]);
    assert!(err.contains("state.savepoints.dir"), "{err}");
}
