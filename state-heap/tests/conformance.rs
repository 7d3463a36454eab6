//! The state-api conformance suite against the heap backend.

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::testing::{BackendConfig, BackendFactory};
use state_api::{Result, StateKey};
use state_heap::HeapKeyedStateBackend;

struct Heap;

impl BackendFactory for Heap {
    type Backend<K: StateKey + Serialize + DeserializeOwned> = HeapKeyedStateBackend<K>;

    fn create<K: StateKey + Serialize + DeserializeOwned>(
        &self,
        config: BackendConfig,
    ) -> Result<HeapKeyedStateBackend<K>> {
        HeapKeyedStateBackend::<K>::builder()
            .max_parallelism(config.max_parallelism)
            .key_group_range(config.range)
            .clock(config.clock)
            .build()
    }
}

state_api::conformance_tests!(Heap);
state_api::timer_conformance_tests!(Heap);
