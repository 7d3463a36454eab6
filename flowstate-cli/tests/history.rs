//! `flowstate checkpoints history` on a job whose coordinator saw a subtask decline: the
//! table, the JSON and the SVG plot show the failure next to the completed checkpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use checkpoint::{CheckpointConfig, CheckpointCoordinator, SubtaskCommand, SubtaskEndpoint};
use common::*;
use serde_json::Value;
use state_api::{KeyGroupRange, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
use state_heap::HeapKeyedStateBackend;

const WAIT: Duration = Duration::from_secs(60);

fn barrier(ep: &mut SubtaskEndpoint) -> checkpoint::Barrier {
    loop {
        if let SubtaskCommand::Barrier(b) = ep.recv_timeout(WAIT).expect("a command") {
            return b;
        }
    }
}

/// Runs job "orders" under `root`: checkpoints 1, 2 and 4 complete, 3 is declined.
fn run_job(root: &str) {
    let config = flowstate::config::ConfigLoader::new().load().unwrap();
    let storage = flowstate_cli::job::open_storage(&config, root, "orders").unwrap();
    let cfg = CheckpointConfig {
        tolerable_failures: 5,
        retention_on_shutdown: checkpoint::RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage, cfg);
    let mut eps: Vec<_> = (0..2)
        .map(|i| builder.register_subtask("totals", i, 2, 128).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let mut backends: Vec<_> = (0..2)
        .map(|i| {
            HeapKeyedStateBackend::<u64>::builder()
                .key_group_range(KeyGroupRange::for_operator(128, 2, i).unwrap())
                .build()
                .unwrap()
        })
        .collect();
    for round in 1..=4u64 {
        for b in backends.iter_mut() {
            let h = b
                .register_value(ValueStateDescriptor::<u64>::new("total").unwrap())
                .unwrap();
            for k in 0..(round * 500) {
                if b.set_current_key(k).is_ok() {
                    b.value(&h).update(k * round).unwrap();
                }
            }
        }
        let p = coord.trigger_checkpoint().unwrap();
        if round == 3 {
            let b = barrier(&mut eps[0]);
            eps[0].decline(&b, "upload refused: quota exceeded");
            let _ = barrier(&mut eps[1]);
            assert!(p.wait(WAIT).is_err());
            continue;
        }
        for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
            let barrier = barrier(ep);
            ep.snapshot_heap(&barrier, b, None).unwrap();
        }
        p.wait(WAIT).unwrap();
    }
    coord.shutdown().unwrap();
}

#[test]
fn history_table_json_and_plot_show_the_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    run_job(&format!("file://{}", root.display()));
    let dir = root.to_str().unwrap();

    let json: Value = serde_json::from_str(&ok(&[
        "checkpoints",
        "history",
        dir,
        "--job",
        "orders",
        "--json",
    ]))
    .unwrap();
    let attempts = json.as_array().unwrap();
    let outcome: Vec<(u64, &str)> = attempts
        .iter()
        .map(|a| (a["id"].as_u64().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcome,
        [
            (1, "completed"),
            (2, "completed"),
            (3, "declined"),
            (4, "completed")
        ]
    );
    assert!(
        attempts[2]["reason"]
            .as_str()
            .unwrap()
            .contains("quota exceeded"),
        "{}",
        attempts[2]
    );
    assert_eq!(attempts[2]["subtasks"][0]["status"], "declined");
    // Sizes grow with the state; each subtask's parts were measured.
    let bytes: Vec<u64> = [0, 1, 3]
        .iter()
        .map(|i| attempts[*i]["bytes"].as_u64().unwrap())
        .collect();
    assert!(bytes[0] < bytes[1] && bytes[1] < bytes[2], "{bytes:?}");
    for s in attempts[3]["subtasks"].as_array().unwrap() {
        assert_eq!(s["status"], "acknowledged");
        assert!(
            s["sync_micros"].is_u64() && s["async_millis"].is_u64(),
            "{s}"
        );
    }

    // The table, and the plot.
    let plot = tmp.path().join("history.svg");
    let table = ok(&[
        "checkpoints",
        "history",
        dir,
        "--job",
        "orders",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let row3 = table
        .lines()
        .find(|l| l.trim_start().starts_with("3 "))
        .unwrap();
    assert!(
        row3.contains("declined") && row3.contains("quota exceeded"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains("completed")).count(),
        3,
        "{table}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("3 completed, 1 failed"),
        "the caption counts them"
    );
    // The failure is drawn in red (a cross: two red lines), the completed ones in blue.
    assert!(svg.contains("#FF0000"), "a red failure mark");
    assert!(svg.contains("#0000FF"), "blue series");

    // checkpoints list --json: the retained checkpoint.
    let list: Value = serde_json::from_str(&ok(&[
        "checkpoints",
        "list",
        dir,
        "--job",
        "orders",
        "--json",
    ]))
    .unwrap();
    assert_eq!(list[0]["id"], 4);

    // A job without history says so and names the jobs there are.
    let out = flowstate(&["checkpoints", "history", dir, "--job", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no checkpoint history of job 'nope'") && err.contains("orders"),
        "{err}"
    );
}
