//! The threads of backends built from one environment are the environment's: however many
//! backends, the process runs its pool and service threads only, and they stop when the last
//! backend and handle are gone. (One test in a binary of its own: other tests' backends would
//! start threads too.)
#![allow(clippy::unwrap_used)]

use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};
use state_mmap::{EnvOptions, MmapEnvironment, MmapKeyedStateBackend};

/// Names of this process's threads that start with `prefix` (Linux: `/proc/self/task/*/comm`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end().starts_with(prefix))
        .count()
}

/// [`threads_named`] once it equals `want`, or after 5 s: a new thread names itself when it
/// starts running, a moment after it was spawned.
fn threads_named_settled(prefix: &str, want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let n = threads_named(prefix);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn write_some(backend: &mut MmapKeyedStateBackend<u64>) {
    let count = backend
        .register_value(ValueStateDescriptor::<u64>::new("count").unwrap())
        .unwrap();
    for key in 0u64..20_000 {
        backend.set_current_key(key).unwrap();
        backend.value(&count).update(key).unwrap();
    }
    backend.flush().unwrap();
    backend.set_current_key(7).unwrap();
    assert_eq!(backend.value(&count).get().unwrap(), Some(7));
}

#[cfg(target_os = "linux")]
#[test]
fn backends_of_one_environment_run_on_its_threads_only() {
    let env = MmapEnvironment::new(EnvOptions {
        memory_budget: 4 << 20,
        threads: 2,
    })
    .unwrap();
    let prefix = env.thread_name_prefix();
    // Two workers, and the threads freeing buffers, unmapping files and writing manifests.
    assert_eq!(env.thread_count(), 5);
    assert_eq!(threads_named_settled(&prefix, 5), 5);
    let mut backends: Vec<_> = (0..8)
        .map(|_| {
            MmapKeyedStateBackend::<u64>::builder()
                .environment(env.clone())
                .build()
                .unwrap()
        })
        .collect();
    for b in &mut backends {
        write_some(b);
        assert!(b.engine().stats().0 > 0, "flushed on the pool");
    }
    assert_eq!(env.live_engines(), 8);
    // Eight backends, five threads, and no other engine thread in the process.
    assert_eq!(threads_named(&prefix), 5);
    assert_eq!(threads_named("mmap"), 5);
    // A backend without an environment has one of its own (three workers, three others).
    let mut alone = MmapKeyedStateBackend::<u64>::builder()
        .memory_budget(4 << 20)
        .build()
        .unwrap();
    write_some(&mut alone);
    let own = alone.engine().environment().thread_name_prefix();
    assert_ne!(own, prefix);
    assert_eq!(threads_named_settled(&own, 6), 6);
    drop(alone);
    assert_eq!(threads_named(&own), 0, "its threads stop with it");
    // The environment's threads stop once the last backend and handle are gone.
    drop(backends);
    assert_eq!(threads_named(&prefix), 5, "the handle keeps them");
    drop(env);
    assert_eq!(threads_named(&prefix), 0);
    assert_eq!(threads_named("mmap"), 0);
}
