//! The state-api conformance suite against mmap backends that all share one environment (one
//! small memory budget and two worker threads for every backend of every test, running at
//! once): flushes and compactions of many backends interleave on the shared pool.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::testing::{BackendConfig, BackendFactory};
use state_api::{Result, StateKey};
use state_mmap::{EnvOptions, MmapEnvironment, MmapKeyedStateBackend};

struct SharedEnv;

fn env() -> &'static MmapEnvironment {
    static ENV: OnceLock<MmapEnvironment> = OnceLock::new();
    ENV.get_or_init(|| {
        MmapEnvironment::new(EnvOptions {
            // Small, so every backend flushes and compacts (it gets budget / live backends).
            memory_budget: 2 << 20,
            threads: 2,
        })
        .unwrap()
    })
}

impl BackendFactory for SharedEnv {
    type Backend<K: StateKey + Serialize + DeserializeOwned> = MmapKeyedStateBackend<K>;

    fn create<K: StateKey + Serialize + DeserializeOwned>(
        &self,
        config: BackendConfig,
    ) -> Result<MmapKeyedStateBackend<K>> {
        MmapKeyedStateBackend::<K>::builder()
            .max_parallelism(config.max_parallelism)
            .key_group_range(config.range)
            .clock(config.clock)
            .environment(env().clone())
            .build()
    }
}

state_api::conformance_tests!(SharedEnv);
state_api::timer_conformance_tests!(SharedEnv);
