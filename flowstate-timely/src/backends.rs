//! Backend factories for [`crate::Checkpointing::keyed`]: the heap backend, and the mmap
//! backend with the `mmap` feature. Any other `CheckpointableBackend` works the same way
//! through a closure of your own.

use state_api::{KeyGroupRange, StateKey, StateSerializer};
use state_heap::HeapKeyedStateBackend;

/// Makes each worker's heap backend for its key groups, keys hashed by `key_serializer`
/// (give the operator the same serializer in its [`crate::KeyedOptions`]).
pub fn heap<
    K: StateKey + serde::Serialize + serde::de::DeserializeOwned,
    S: StateSerializer<K> + Clone,
>(
    key_serializer: S,
) -> impl FnOnce(KeyGroupRange, u32) -> Result<HeapKeyedStateBackend<K>, String> {
    move |range, max_parallelism| {
        HeapKeyedStateBackend::<K>::builder()
            .max_parallelism(max_parallelism)
            .key_group_range(range)
            .key_serializer(key_serializer)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// Makes each worker's mmap backend for its key groups, keys hashed by `key_serializer`, in
/// `env` (one environment per process: its memory budget and background threads are shared
/// by every backend of the process), in a fresh working directory under `parent` (the system
/// temporary directory when `None`).
#[cfg(feature = "mmap")]
pub fn mmap<
    K: StateKey + serde::Serialize + serde::de::DeserializeOwned,
    S: StateSerializer<K> + Clone,
>(
    key_serializer: S,
    env: state_mmap::MmapEnvironment,
    parent: Option<std::path::PathBuf>,
) -> impl FnOnce(KeyGroupRange, u32) -> Result<state_mmap::MmapKeyedStateBackend<K>, String> {
    move |range, max_parallelism| {
        let mut b = state_mmap::MmapKeyedStateBackend::<K>::builder()
            .max_parallelism(max_parallelism)
            .key_group_range(range)
            .key_serializer(key_serializer)
            .environment(env);
        if let Some(p) = parent {
            b = b.working_directory_in(p);
        }
        b.build().map_err(|e| e.to_string())
    }
}
