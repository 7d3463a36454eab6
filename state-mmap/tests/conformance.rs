//! The state-api conformance suite against the mmap backend.
#![allow(clippy::unwrap_used)]

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::testing::{BackendConfig, BackendFactory};
use state_api::{Result, StateKey};
use state_mmap::MmapKeyedStateBackend;

struct Mmap;

impl BackendFactory for Mmap {
    type Backend<K: StateKey + Serialize + DeserializeOwned> = MmapKeyedStateBackend<K>;

    fn create<K: StateKey + Serialize + DeserializeOwned>(
        &self,
        config: BackendConfig,
    ) -> Result<MmapKeyedStateBackend<K>> {
        MmapKeyedStateBackend::<K>::builder()
            .max_parallelism(config.max_parallelism)
            .key_group_range(config.range)
            .clock(config.clock)
            // A small budget so the suite also runs through flushes and compactions.
            .memory_budget(256 << 10)
            .build()
    }
}

state_api::conformance_tests!(Mmap);
state_api::timer_conformance_tests!(Mmap);
