//! The Nexmark job on the mmap backend builds every backend (2 operators x 4 subtasks) from
//! one environment: the process runs that environment's threads only, not six per backend.
//! (A binary of its own: other tests' backends would start threads too.)
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use flowstate::config::ConfigLoader;
use flowstate_cli::job::{self, JobOptions, Progress, RestoreFrom};

/// The names of this process's threads (Linux: `/proc/self/task/*/comm`).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn the_job_runs_every_mmap_backend_on_one_environment() {
    let work = tempfile::tempdir().unwrap();
    let config = ConfigLoader::new()
        .set("state.backend", "mmap")
        .unwrap()
        .set("state.mmap.memory-budget", "32MiB")
        .unwrap()
        .set(
            "state.mmap.dir",
            work.path().join("mmap").display().to_string(),
        )
        .unwrap()
        .set(
            "state.checkpoints.dir",
            format!("file://{}", work.path().join("checkpoints").display()),
        )
        .unwrap()
        .load()
        .unwrap();
    // Per batch: the engine threads (named `mmap<env>-<role>`) and the environments they belong to.
    let seen: Arc<Mutex<Vec<(usize, BTreeSet<String>)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let progress = Arc::new(move |_: &Progress| {
        let engine: Vec<String> = thread_names()
            .into_iter()
            .filter(|n| n.starts_with("mmap"))
            .collect();
        let envs = engine
            .iter()
            .filter_map(|n| n.split_once('-').map(|(env, _)| env.to_string()))
            .collect();
        record.lock().unwrap().push((engine.len(), envs));
    });
    let report = job::run(JobOptions {
        config,
        job: "nexmark".into(),
        events: 100_000,
        parallelism: 4,
        restore: RestoreFrom::Nothing,
        crash_after: None,
        progress: Some(progress),
        stop: Arc::new(AtomicBool::new(false)),
    })
    .unwrap();
    assert_eq!(report.processed, 100_000);
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 10, "{} batches", seen.len());
    for (threads, envs) in seen.iter() {
        assert_eq!(
            envs.len(),
            1,
            "one environment for all 8 backends: {envs:?}"
        );
        // Its three workers and three service threads.
        assert_eq!(*threads, 6, "engine threads of 8 backends");
    }
    // The environment is gone with the job.
    assert!(thread_names().iter().all(|n| !n.starts_with("mmap")));
}
