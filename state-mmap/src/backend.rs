//! [`MmapKeyedStateBackend`]: the `state-api` keyed state backend on the mmap engine.
//!
//! This file defines the backend's struct and its registered states; the rest lives with the
//! part it belongs to:
//!
//! - `builder`: [`MmapBackendBuilder`], opening a store;
//! - `keyed`: the `KeyedStateBackend` methods (every state kind, namespaces, keys, timers);
//! - `states`: registering states and binding restored data to them;
//! - `ttl`: TTL cleanup in compaction and on access;
//! - `snapshot`: [`MmapSnapshot`] and the canonical snapshot writer;
//! - `restore`: the sink that restores canonical snapshots;
//! - `registry`: the state registry and its byte format;
//! - `native` (native incremental checkpoints) and `timers` (timer order in the engine).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use state_api::*;

use crate::codec::*;
use crate::engine::Db;
use crate::tempdir::TempDir;
use crate::typed::*;

pub(crate) mod native;
mod timers;

use timers::DueIndex;

mod builder;
mod keyed;
mod registry;
mod restore;
mod snapshot;
mod states;
mod ttl;

pub use builder::MmapBackendBuilder;
pub use snapshot::MmapSnapshot;

use ttl::TtlTable;

/// The current key: the key, its serialized bytes and its key group.
struct Cur<K> {
    key: K,
    bytes: Vec<u8>,
    kg: u32,
}

/// A registered state.
struct StateEntry {
    name: StateName,
    id: u16,
    kind: StateKind,
    ttl: Option<StateTtlConfig>,
    typed: Box<dyn TypedState>,
    cleanup_pos: Option<Vec<u8>>,
    /// List states: how elements are stored. Fixed when the state's data is created (compact
    /// without TTL); a state with TTL is always stamped (a list that gains a TTL is rewritten),
    /// one that loses it keeps its stamped data.
    list_enc: ListEncoding,
}

/// Restored data of a state that is not registered yet, stored under its own state id.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub id: u16,
    pub meta: StateMeta,
    pub key_ser: SerializerSnapshot,
    /// List states: how the stored elements are encoded.
    pub list_enc: ListEncoding,
}

/// Keyed state for one subtask in a log-structured merge store on memory-mapped files. See the
/// [crate docs](crate).
pub struct MmapKeyedStateBackend<K> {
    db: Db,
    max_parallelism: u32,
    range: KeyGroupRange,
    key_serializer: Arc<dyn StateSerializer<K>>,
    clock: Arc<dyn Clock>,
    current: Option<Cur<K>>,
    states: Vec<StateEntry>,
    ids: HashMap<StateName, usize>,
    pending: HashMap<StateName, Vec<Pending>>,
    next_id: u32,
    kbuf: Vec<u8>,
    vbuf: Vec<u8>,
    tbuf: Vec<u8>,
    /// Element ends of a list being written (`StateSerializer::serialize_all`).
    ends: Vec<usize>,
    /// Entries of the last map read whole (the next one's vector is sized so).
    map_len_hint: usize,
    /// Elements of the last list read (the next one's vector is sized so).
    list_len_hint: usize,
    /// `set_current_key` calls (every 256th installs finished background work).
    key_switches: u32,
    per_record_cleanup: Vec<usize>,
    ttl_table: TtlTable,
    /// Per registered timer service (by slot), a lower bound of the earliest due time per key
    /// group and domain; the timers themselves are engine entries in due-time order (module
    /// `timers`).
    timers: HashMap<usize, DueIndex>,
    // Dropped after `db`: removes the temporary directory once the files are closed.
    _temp: Option<TempDir>,
}

impl<K> fmt::Debug for MmapKeyedStateBackend<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapKeyedStateBackend")
            .field("max_parallelism", &self.max_parallelism)
            .field("range", &self.range)
            .field("db", &self.db)
            .field(
                "states",
                &self.states.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
    /// Names of the registered states.
    pub fn state_names(&self) -> Vec<StateName> {
        self.states.iter().map(|s| s.name.clone()).collect()
    }

    /// Names of restored states not registered yet (their data waits for registration).
    pub fn pending_restored_states(&self) -> Vec<StateName> {
        self.pending.keys().cloned().collect()
    }

    /// The engine underneath (for statistics and tests).
    pub fn engine(&self) -> &Db {
        &self.db
    }

    /// Flushes the write buffer to a sorted run and makes it durable with the state registry:
    /// reopening the directory finds everything written before the call.
    pub fn flush(&mut self) -> Result<()> {
        self.save_registry();
        Ok(self.db.flush()?)
    }

    /// Waits until the background flushes and compactions under way, and those they start,
    /// are done (benchmarks count the background work of a phase this way).
    pub fn wait_for_background_work(&mut self) -> Result<()> {
        Ok(self.db.drain()?)
    }

    /// Flushes and compacts every sorted run into one (drops tombstones, expired TTL state,
    /// merges list appends, drops key groups outside the backend's range).
    pub fn compact(&mut self) -> Result<()> {
        self.save_registry();
        Ok(self.db.compact()?)
    }
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
    /// Bytes the timer services hold in memory: per service and owned key group, a lower bound
    /// of the earliest due time of each domain (32 bytes). It does not grow with the number of
    /// timers, which live in the engine (write buffer, then sorted runs on disk).
    pub fn timer_memory_bytes(&self) -> usize {
        self.timers.values().map(DueIndex::heap_bytes).sum()
    }
}
