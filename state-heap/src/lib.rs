//! The in-memory keyed state backend of Flowstate (Flink's `HashMapStateBackend`).
//!
//! State lives as typed Rust values in hash tables, one table per key group of the backend's
//! [`KeyGroupRange`]: reads and writes do no serialization. A snapshot captures every key group
//! by reference in microseconds (copy-on-write per key group); the returned
//! [`KeyedStateSnapshot`] writes the canonical snapshot stream on any thread while processing
//! continues, and a key group is copied only if it is written while a snapshot still reads it.
//! A restore decodes on several threads, each owning a share of the key groups
//! ([`HeapBackendBuilder::restore_threads`]), into registered states as the streams are read;
//! the data of states registered later waits as the blocks read and is decoded (in parallel as
//! well) when they are registered. A state without TTL stores no timestamps. A value state
//! bound for a run of records ([`KeyedStateBackend::bind_value`], a [`HeapBoundValue`]) holds
//! its typed table and the current key, so that its accesses cost what the key-group design
//! itself costs.
//!
//! ```
//! use state_api::{KeyedStateBackend, KeyedStateBackendExt, KeyedStateSnapshot, ValueStateDescriptor};
//! use state_heap::HeapKeyedStateBackend;
//!
//! # fn main() -> state_api::Result<()> {
//! let mut backend = HeapKeyedStateBackend::<String>::builder().build()?;
//! let count = backend.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! for user in ["ann", "bob", "ann"] {
//!     backend.set_current_key(user.to_string())?;
//!     let n = backend.value(&count).get()?.unwrap_or(0);
//!     backend.value(&count).update(n + 1)?;
//! }
//!
//! // Snapshot (fast), write it (could be on another thread), restore into a fresh backend.
//! let snapshot = backend.snapshot()?;
//! let mut bytes = Vec::new();
//! snapshot.write_to(&mut bytes)?;
//! let mut restored = HeapKeyedStateBackend::<String>::builder().build()?;
//! restored.restore(vec![("chk-1".to_string(), &bytes[..])])?;
//! let count = restored.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! restored.set_current_key("ann".to_string())?;
//! assert_eq!(restored.value(&count).get()?, Some(2));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod bound;
mod changelog;
mod checkpointing;
mod restore;
mod small_map;
mod table;
mod timers;

pub use bound::HeapBoundValue;
pub use changelog::{HeapChanges, HeapDeltaSnapshot};

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::snapshot::{restore_streams, SnapshotHeader, SnapshotSummary, SnapshotWriter};
use state_api::*;

use restore::{check_key_serializer, PendingChunk};
use table::{
    after_access, read_single, write_ts, AggregatingKind, CurrentKey, ErasedTable, KeyHasher, Kind,
    ListKind, MapKind, MapStore, NoTtl, Now, ReducingKind, SharedTable, Stamp, Table, ValueKind,
};
use timers::TimerService;

/// Builds a [`HeapKeyedStateBackend`].
pub struct HeapBackendBuilder<K> {
    max_parallelism: u32,
    range: Option<KeyGroupRange>,
    key_serializer: Arc<dyn StateSerializer<K>>,
    clock: Arc<dyn Clock>,
    restore_threads: usize,
}

impl<K: StateKey> HeapBackendBuilder<K> {
    /// Sets the number of key groups (default 128).
    pub fn max_parallelism(mut self, max_parallelism: u32) -> Self {
        self.max_parallelism = max_parallelism;
        self
    }

    /// Sets the key groups this backend owns (default: all of them).
    pub fn key_group_range(mut self, range: KeyGroupRange) -> Self {
        self.range = Some(range);
        self
    }

    /// Uses `serializer` for keys (default: postcard).
    pub fn key_serializer(mut self, serializer: impl StateSerializer<K> + 'static) -> Self {
        self.key_serializer = Arc::new(serializer);
        self
    }

    /// Uses `clock` for TTL (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Threads that decode restored records (default: the cores available, at most 4). Each
    /// owns a share of the key groups, so restore scales with them; the calling thread reads
    /// the streams meanwhile. 1 still decodes beside the reading thread.
    pub fn restore_threads(mut self, threads: usize) -> Self {
        self.restore_threads = threads.max(1);
        self
    }

    /// Checks the settings and builds the backend.
    pub fn build(self) -> Result<HeapKeyedStateBackend<K>> {
        validate_max_parallelism(self.max_parallelism)?;
        let range = self
            .range
            .unwrap_or_else(|| KeyGroupRange::all(self.max_parallelism));
        if range.end() > self.max_parallelism {
            return Err(Error::InvalidParallelism {
                reason: format!(
                    "key group range {range} exceeds max parallelism {}",
                    self.max_parallelism
                ),
            });
        }
        Ok(HeapKeyedStateBackend {
            locator: Locator {
                max_parallelism: self.max_parallelism,
                range,
                kg_mask: self
                    .max_parallelism
                    .is_power_of_two()
                    .then(|| self.max_parallelism - 1),
                int_mask: self
                    .max_parallelism
                    .is_power_of_two()
                    .then(|| self.max_parallelism - 1)
                    .filter(|_| {
                        is_int_key::<K>()
                            && is_fixed_width_for::<K>(&self.key_serializer.snapshot())
                    }),
                part_base: range.start(),
                parts: range.len(),
            },
            key_serializer: self.key_serializer,
            clock: self.clock,
            restore_threads: self.restore_threads,
            key_buf: Vec::with_capacity(64),
            current: None,
            tables: Vec::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            per_record_cleanup: Vec::new(),
            timer_services: Vec::new(),
            timer_ids: HashMap::new(),
            timers_dirty: vec![false; range.len() as usize],
            changes: Default::default(),
            checkpoints: Default::default(),
        })
    }
}

/// Keyed state in memory for one subtask. See the [crate docs](crate).
pub struct HeapKeyedStateBackend<K> {
    key_serializer: Arc<dyn StateSerializer<K>>,
    /// Threads decoding restored records.
    restore_threads: usize,
    /// Where keys go: their hash and partition.
    locator: Locator,
    clock: Arc<dyn Clock>,
    /// The current key's serialized bytes (empty on the integer fast path: see `key_bytes`).
    key_buf: Vec<u8>,
    current: Option<CurrentKey<K>>,
    tables: Vec<Box<dyn ErasedTable<K>>>,
    ids: HashMap<StateName, StateId>,
    /// Restored states not registered yet; shared with snapshots, which write them unchanged.
    pending: HashMap<StateName, Vec<Arc<PendingChunk>>>,
    per_record_cleanup: Vec<usize>,
    timer_services: Vec<TimerService>,
    timer_ids: HashMap<StateName, usize>,
    /// Key groups whose timers changed since the last `take_changed_key_groups`.
    timers_dirty: Vec<bool>,
    /// Change tracking for delta snapshots (off until `track_changes`).
    changes: changelog::BackendLog,
    /// Change logs kept for delta checkpoints (see `checkpointing`).
    checkpoints: checkpointing::CheckpointLogs,
}

impl<K> fmt::Debug for HeapKeyedStateBackend<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapKeyedStateBackend")
            .field("max_parallelism", &self.locator.max_parallelism)
            .field("range", &self.locator.range)
            .field("states", &self.ids.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<K: StateKey + Serialize + DeserializeOwned> HeapKeyedStateBackend<K> {
    /// A builder with postcard keys, 128 key groups, all of them owned, and the system clock.
    pub fn builder() -> HeapBackendBuilder<K> {
        HeapBackendBuilder {
            max_parallelism: DEFAULT_LOWER_BOUND_MAX_PARALLELISM,
            range: None,
            key_serializer: Arc::new(PostcardSerializer::<K>::new()),
            clock: Arc::new(SystemClock),
            restore_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 4),
        }
    }
}

/// Where keys go in a backend: their stable hash and partition (key group minus the range's
/// first); also the backend's key groups (its max parallelism and range). Copied into bound
/// states, which set the current key without the backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Locator {
    max_parallelism: u32,
    range: KeyGroupRange,
    /// `max_parallelism - 1` when it is a power of two: the key group is then a mask away.
    kg_mask: Option<u32>,
    /// `max_parallelism - 1` when keys are primitive integers written by
    /// [`FixedWidthSerializer`] and the key groups a power of two: their hash and key group are
    /// computed inline, without calling the serializer.
    int_mask: Option<u32>,
    /// The first key group of the range (the partition of key group `kg` is `kg - part_base`).
    part_base: u32,
    /// The number of key groups in the range.
    parts: u32,
}

impl Locator {
    /// The stable hash and key group of `key`: inline for integer keys, otherwise through the
    /// serializer. (Callers check the key group against the range themselves: the backend
    /// against its range, a bound state against its table's partitions, so that the range check
    /// is also the bounds check of the access that follows.)
    #[inline(always)]
    fn hash_and_group_of<K: StateKey>(
        &self,
        key: &K,
        ser: &Arc<dyn StateSerializer<K>>,
        key_buf: &mut Vec<u8>,
    ) -> Result<(u64, u32)> {
        let fast = self
            .int_mask
            .and_then(|mask| int_key_hash(key).map(|hash| (hash, mask)));
        match fast {
            Some((hash, mask)) => Ok((hash, (hash >> 32) as u32 & mask)),
            None => self.hash_and_group(key, ser, key_buf),
        }
    }

    /// The stable hash and key group of a key off the integer fast path: serialized into
    /// `key_buf`, hashed, and the key group taken from the hash.
    #[inline(never)]
    fn hash_and_group<K: StateKey>(
        &self,
        key: &K,
        ser: &Arc<dyn StateSerializer<K>>,
        key_buf: &mut Vec<u8>,
    ) -> Result<(u64, u32)> {
        key_buf.clear();
        ser.serialize(key, key_buf).map_err(|e| Error::Serialize {
            state: "<current key>".into(),
            what: "key",
            reason: e.0,
        })?;
        let hash = stable_key_hash(key_buf);
        let kg = match self.kg_mask {
            Some(mask) => (hash >> 32) as u32 & mask,
            None => key_group_for_hash(hash, self.max_parallelism),
        };
        Ok((hash, kg))
    }

    /// A key outside the range: no key is current any more.
    #[cold]
    #[inline(never)]
    fn out_of_range<K>(&self, key_group: u32, current: &mut Option<CurrentKey<K>>) -> Error {
        *current = None;
        Error::KeyGroupOutOfRange {
            key_group,
            range: self.range,
        }
    }
}

fn unknown(name: &StateName) -> Error {
    Error::UnknownState {
        state: name.to_string(),
    }
}

/// A state's table in one of its two stored forms: entries (single values) or elements (lists,
/// maps) without TTL stamps, or with them.
enum Stamped<'a, P, S> {
    Plain(&'a mut P),
    Stamped(&'a mut S),
}

/// Runs `$body` with `$t` bound to the table inside a [`Stamped`], whichever its form.
macro_rules! on_stamped {
    ($tables:expr, |$t:ident| $body:expr) => {
        match $tables {
            Stamped::Plain($t) => $body,
            Stamped::Stamped($t) => $body,
        }
    };
}

/// Runs `$body` with `$cur` bound to the current key and `$t` to the table of handle `$h`,
/// of type `$plain` when the state stores no TTL stamps or `$stamped` when it does (the body
/// is expanded for both). The plain type is tried first, so the common path checks one type
/// and reads no other flag; a state with TTL pays a second check.
macro_rules! with_stamped {
    ($self:ident, $plain:ty, $stamped:ty, $h:ident, |$cur:ident, $t:ident| $body:expr) => {{
        let $cur = $self
            .current
            .as_ref()
            .ok_or_else(|| no_current_key($h.name()))?;
        let any: &mut dyn Any = &mut **$self
            .tables
            .get_mut($h.id().0 as usize)
            .ok_or_else(|| unknown($h.name()))?;
        if let Some($t) = any.downcast_mut::<$plain>() {
            $body
        } else if let Some($t) = any.downcast_mut::<$stamped>() {
            $body
        } else {
            return Err(unknown($h.name()));
        }
    }};
}

/// [`with_stamped!`] for a single-value state of kind `$kd` (value, reducing, aggregating).
macro_rules! with_single {
    ($self:ident, $kd:ty, $h:ident, |$cur:ident, $t:ident| $body:expr) => {
        with_stamped!(
            $self,
            Table<K, N, $kd, NoTtl>,
            Table<K, N, $kd, i64>,
            $h,
            |$cur, $t| $body
        )
    };
}

/// [`with_stamped!`] for a list state with elements `$ty`.
macro_rules! with_list {
    ($self:ident, $ty:ty, $h:ident, |$cur:ident, $t:ident| $body:expr) => {
        with_stamped!(
            $self,
            Table<K, N, ListKind<$ty, NoTtl>>,
            Table<K, N, ListKind<$ty, i64>>,
            $h,
            |$cur, $t| $body
        )
    };
}

/// [`with_stamped!`] for a map state with user keys `$uk` and values `$uv`.
macro_rules! with_map {
    ($self:ident, $uk:ty, $uv:ty, $h:ident, |$cur:ident, $t:ident| $body:expr) => {
        with_stamped!(
            $self,
            Table<K, N, MapKind<$uk, $uv, NoTtl>>,
            Table<K, N, MapKind<$uk, $uv, i64>>,
            $h,
            |$cur, $t| $body
        )
    };
}

/// The error of a state access without a current key.
fn no_current_key(name: &StateName) -> Error {
    Error::NoCurrentKey {
        state: name.to_string(),
    }
}

/// The typed table of a handle — `P` when the state stores no TTL stamps, `S` when it does —
/// and the current key, for callers that return a borrow of it (which [`with_stamped!`]
/// cannot give).
fn access_stamped<'a, K: StateKey, P: 'static, S: 'static>(
    tables: &'a mut [Box<dyn ErasedTable<K>>],
    current: &'a Option<CurrentKey<K>>,
    id: StateId,
    name: &StateName,
) -> Result<(&'a CurrentKey<K>, Stamped<'a, P, S>)> {
    let cur = current.as_ref().ok_or_else(|| no_current_key(name))?;
    let table = tables.get_mut(id.0 as usize).ok_or_else(|| unknown(name))?;
    Ok((cur, stamped(&mut **table).ok_or_else(|| unknown(name))?))
}

/// A type-erased table as `P` (no TTL stamps) or `S` (stamped); `None` when it is neither.
fn stamped<'a, K: StateKey, P: 'static, S: 'static>(
    table: &'a mut dyn ErasedTable<K>,
) -> Option<Stamped<'a, P, S>> {
    let any: &mut dyn Any = table;
    if any.is::<P>() {
        any.downcast_mut::<P>().map(Stamped::Plain)
    } else {
        any.downcast_mut::<S>().map(Stamped::Stamped)
    }
}

/// A list's elements with TTL semantics (expired elements dropped, read refreshing the rest
/// when configured).
#[inline]
fn list_get_in<K: StateKey, N: Namespace, T: StateType, S: Stamp, C: Now + ?Sized>(
    t: &mut Table<K, N, ListKind<T, S>>,
    cur: &CurrentKey<K>,
    ns: &N,
    clock: &C,
) -> Option<Vec<T>> {
    let ttl = match t.ttl {
        Some(ttl) if S::STORED => ttl,
        _ => {
            return t
                .find(cur, ns)
                .map(|e| e.value.iter().map(|(v, _)| v.clone()).collect())
        }
    };
    let now = clock.now();
    after_access(t, now);
    let e = t.find(cur, ns)?;
    let any_expired = e.value.iter().any(|(_, ts)| ttl.is_expired(ts.get(), now));
    let out: Vec<T> = e
        .value
        .iter()
        .filter(|(_, ts)| ttl.returns_expired() || !ttl.is_expired(ts.get(), now))
        .map(|(v, _)| v.clone())
        .collect();
    if any_expired || ttl.refresh_on_read() {
        if let Some(e) = t.find_mut(cur, ns) {
            e.value.retain(|(_, ts)| !ttl.is_expired(ts.get(), now));
            if ttl.refresh_on_read() {
                e.value.iter_mut().for_each(|(_, ts)| *ts = S::new(now));
            }
            if e.value.is_empty() {
                t.remove(cur, ns);
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A map entry's value with TTL semantics.
#[inline]
fn map_get_in<K: StateKey, N: Namespace, UK: MapKey, UV: StateType, S: Stamp, C: Now + ?Sized>(
    t: &mut Table<K, N, MapKind<UK, UV, S>>,
    cur: &CurrentKey<K>,
    ns: &N,
    user_key: &UK,
    clock: &C,
) -> Option<UV> {
    let ttl = match t.ttl {
        Some(ttl) if S::STORED => ttl,
        _ => {
            return t
                .find(cur, ns)
                .and_then(|e| e.value.get(user_key))
                .map(|(v, _)| v.clone())
        }
    };
    let now = clock.now();
    after_access(t, now);
    let (v, ts) = t
        .find(cur, ns)
        .and_then(|e| e.value.get(user_key))
        .cloned()?;
    if ttl.is_expired(ts.get(), now) {
        remove_user_key(t, cur, ns, user_key);
        return ttl.returns_expired().then_some(v);
    }
    if ttl.refresh_on_read() {
        if let Some(e) = t.find_mut(cur, ns) {
            if let Some(entry) = e.value.get_mut(user_key) {
                entry.1 = S::new(now);
            }
        }
    }
    Some(v)
}

/// A map's entries with TTL semantics; without TTL they are cloned as the iterator goes.
fn map_entries_in<
    'a,
    K: StateKey,
    N: Namespace,
    UK: MapKey,
    UV: StateType,
    S: Stamp,
    C: Now + ?Sized,
>(
    t: &'a mut Table<K, N, MapKind<UK, UV, S>>,
    cur: &CurrentKey<K>,
    ns: &N,
    clock: &C,
) -> MapIter<'a, UK, UV> {
    let ttl = match t.ttl {
        Some(ttl) if S::STORED => ttl,
        _ => {
            // Nothing is written on a read: the entries are cloned as they go.
            let Some(e) = t.find(cur, ns) else {
                return Box::new(std::iter::empty());
            };
            return Box::new(e.value.iter().map(|(k, (v, _))| Ok((k.clone(), v.clone()))));
        }
    };
    let now = clock.now();
    after_access(t, now);
    let Some(e) = t.find(cur, ns) else {
        return Box::new(std::iter::empty());
    };
    let any_expired = e
        .value
        .values()
        .any(|(_, ts)| ttl.is_expired(ts.get(), now));
    let out: Vec<(UK, UV)> = e
        .value
        .iter()
        .filter(|(_, (_, ts))| ttl.returns_expired() || !ttl.is_expired(ts.get(), now))
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    if any_expired || ttl.refresh_on_read() {
        if let Some(e) = t.find_mut(cur, ns) {
            e.value.retain(|_, (_, ts)| !ttl.is_expired(ts.get(), now));
            if ttl.refresh_on_read() {
                e.value.values_mut().for_each(|(_, ts)| *ts = S::new(now));
            }
            if e.value.is_empty() {
                t.remove(cur, ns);
            }
        }
    }
    Box::new(out.into_iter().map(Ok))
}

/// The stable hash of an integer key's [`FixedWidthSerializer`] bytes (big-endian, full width),
/// computed without a serializer call or buffer; `None` when `K` is not a primitive integer.
/// The type tests resolve at compile time.
#[inline]
fn int_key_hash<K: Any>(key: &K) -> Option<u64> {
    let key: &dyn Any = key;
    macro_rules! try_int {
        ($($t:ty),*) => {$(
            if let Some(v) = key.downcast_ref::<$t>() {
                return Some(stable_key_hash(&v.to_be_bytes()));
            }
        )*};
    }
    try_int!(u64, i64, u32, i32, u128, i128, u16, i16, u8, i8);
    None
}

/// True when `K` is a primitive integer type ([`int_key_hash`] has a fast path for it).
fn is_int_key<K: Any>() -> bool {
    use std::any::TypeId;
    [
        TypeId::of::<u64>(),
        TypeId::of::<i64>(),
        TypeId::of::<u32>(),
        TypeId::of::<i32>(),
        TypeId::of::<u128>(),
        TypeId::of::<i128>(),
        TypeId::of::<u16>(),
        TypeId::of::<i16>(),
        TypeId::of::<u8>(),
        TypeId::of::<i8>(),
    ]
    .contains(&TypeId::of::<K>())
}

/// True when the key serializer is [`FixedWidthSerializer<K>`] for the integer type `K`.
fn is_fixed_width_for<K: Any>(snapshot: &state_api::SerializerSnapshot) -> bool {
    snapshot.id == state_api::FIXED_WIDTH_SERIALIZER_ID
        && state_api::builtin_schema_name::<K>().is_some_and(|n| snapshot.schema == n.as_bytes())
}

/// True when TTL cleanup runs on every record (`set_current_key`).
fn per_record_cleanup(ttl: Option<StateTtlConfig>) -> bool {
    ttl.and_then(|t| t.incremental_cleanup())
        .is_some_and(|c| c.run_for_every_record)
}

impl<K: StateKey> HeapKeyedStateBackend<K> {
    /// Names of the registered states.
    pub fn state_names(&self) -> Vec<StateName> {
        self.tables.iter().map(|t| t.name().clone()).collect()
    }

    /// Number of (key, namespace) entries over all states.
    pub fn num_entries(&self) -> usize {
        self.tables.iter().map(|t| t.len()).sum()
    }

    /// Names of restored states not registered yet (their data waits for registration).
    pub fn pending_restored_states(&self) -> Vec<StateName> {
        self.pending.keys().cloned().collect()
    }

    /// The key groups written since the previous call, over all states, in key-group order
    /// (used for incremental checkpoints).
    pub fn take_changed_key_groups(&mut self) -> Vec<u32> {
        let n = self.locator.range.len() as usize;
        let mut changed = std::mem::replace(&mut self.timers_dirty, vec![false; n]);
        for t in &mut self.tables {
            for (i, d) in t.take_dirty().into_iter().enumerate() {
                changed[i] |= d;
            }
        }
        changed
            .into_iter()
            .enumerate()
            .filter(|(_, c)| *c)
            .map(|(i, _)| self.locator.range.start() + i as u32)
            .collect()
    }

    /// Registers (or re-obtains) the table of a state of kind `kind`; restored data waiting
    /// under its name is checked and loaded. Single values with TTL get stamped entries.
    fn register<N: Namespace, KD: Kind>(
        &mut self,
        name: &StateName,
        kind: KD,
        ttl: Option<StateTtlConfig>,
        ns_ser: &Arc<dyn StateSerializer<N>>,
    ) -> Result<StateId> {
        if KD::SINGLE && ttl.is_some() {
            self.register_stamped::<N, KD, i64, NoTtl>(name, kind, ttl, ns_ser)
        } else {
            self.register_stamped::<N, KD, NoTtl, i64>(name, kind, ttl, ns_ser)
        }
    }

    /// Registers a list state whose elements carry stamp `S` (TTL timestamps or nothing); a
    /// table registered before with element stamp `U` (TTL switched on or off since) is
    /// converted first, elements gaining a timestamp getting now.
    fn register_list_as<T: StateType, N: Namespace, S: Stamp, U: Stamp>(
        &mut self,
        name: &StateName,
        ser: &Arc<dyn StateSerializer<T>>,
        ttl: Option<StateTtlConfig>,
        ns_ser: &Arc<dyn StateSerializer<N>>,
    ) -> Result<StateId> {
        let kind = || ListKind::<T, S>::new(Arc::clone(ser));
        self.convert_registered::<N, ListKind<T, U>, _>(name, kind(), ttl, |list, now| {
            list.iter()
                .map(|(v, u)| (v.clone(), S::new(if U::STORED { u.get() } else { now })))
                .collect()
        });
        self.register(name, kind(), ttl, ns_ser)
    }

    /// Registers a map state whose entries carry stamp `S`, converting a table registered
    /// before with entry stamp `U` (as [`Self::register_list_as`] does for lists).
    #[allow(clippy::type_complexity)]
    fn register_map_as<UK: MapKey, UV: StateType, N: Namespace, S: Stamp, U: Stamp>(
        &mut self,
        name: &StateName,
        (key_ser, value_ser): (&Arc<dyn StateSerializer<UK>>, &Arc<dyn StateSerializer<UV>>),
        ttl: Option<StateTtlConfig>,
        ns_ser: &Arc<dyn StateSerializer<N>>,
    ) -> Result<StateId> {
        let kind = || MapKind::<UK, UV, S>::new(Arc::clone(key_ser), Arc::clone(value_ser));
        self.convert_registered::<N, MapKind<UK, UV, U>, _>(name, kind(), ttl, |map, now| {
            map.iter()
                .map(|(k, (v, u))| {
                    let ts = if U::STORED { u.get() } else { now };
                    (k.clone(), (v.clone(), S::new(ts)))
                })
                .collect()
        });
        self.register(name, kind(), ttl, ns_ser)
    }

    /// A table registered under `name` as kind `Old` (its elements stamped the other way) is
    /// rebuilt as kind `New`, each stored value made by `convert` (given now).
    fn convert_registered<N: Namespace, Old: Kind, New: Kind>(
        &mut self,
        name: &StateName,
        kind: New,
        ttl: Option<StateTtlConfig>,
        convert: impl Fn(&Old::Stored, i64) -> New::Stored,
    ) {
        let Some(&id) = self.ids.get(name) else {
            return;
        };
        let now = self.clock.now_millis();
        let i = id.0 as usize;
        let old = self.tables[i]
            .as_any_mut()
            .downcast_mut::<Table<K, N, Old>>();
        if let Some(old) = old {
            let converted = old.convert_kind(Arc::new(kind), ttl, |s| convert(s, now));
            self.tables[i] = Box::new(converted);
        }
    }

    /// [`Self::register`] with entries stamped `T`; a table registered before with stamp `U`
    /// (TTL switched on or off since) is converted.
    fn register_stamped<N: Namespace, KD: Kind, T: Stamp, U: Stamp>(
        &mut self,
        name: &StateName,
        kind: KD,
        ttl: Option<StateTtlConfig>,
        ns_ser: &Arc<dyn StateSerializer<N>>,
    ) -> Result<StateId> {
        let parts = self.locator.range.len() as usize;
        let kind = Arc::new(kind);
        let key_ser = &self.key_serializer;
        let make = || {
            Table::<K, N, KD, T>::new(
                name.clone(),
                Arc::clone(&kind),
                ttl,
                Arc::clone(ns_ser),
                KeyHasher::new(Arc::clone(key_ser)),
                parts,
            )
        };
        if let Some(&id) = self.ids.get(name) {
            let now = self.clock.now_millis();
            let t = &mut self.tables[id.0 as usize];
            if t.state_kind() != kind.kind() {
                return Err(Error::StateKindMismatch {
                    state: name.to_string(),
                    existing: t.state_kind(),
                    requested: kind.kind(),
                });
            }
            let any = t.as_any_mut();
            if let Some(existing) = any.downcast_mut::<Table<K, N, KD, T>>() {
                // Re-registration may change the functions or TTL: take the new ones. List
                // elements and map entries written without TTL carry time 0: switching TTL on
                // stamps them with now, as restoring such state does.
                let gained_ttl = existing.ttl.is_none() && ttl.is_some();
                existing.kind = kind;
                existing.ttl = ttl;
                if gained_ttl && !KD::SINGLE {
                    existing.stamp_elements(now);
                }
                if per_record_cleanup(ttl) != self.per_record_cleanup.contains(&(id.0 as usize)) {
                    self.per_record_cleanup.retain(|&i| i != id.0 as usize);
                    if per_record_cleanup(ttl) {
                        self.per_record_cleanup.push(id.0 as usize);
                    }
                }
                return Ok(id);
            }
            return match any.downcast_mut::<Table<K, N, KD, U>>() {
                Some(existing) => {
                    let converted: Table<K, N, KD, T> = existing.restamp(kind, ttl, now);
                    self.per_record_cleanup.retain(|&i| i != id.0 as usize);
                    if per_record_cleanup(ttl) {
                        self.per_record_cleanup.push(id.0 as usize);
                    }
                    *t = Box::new(converted);
                    Ok(id)
                }
                None => Err(Error::StateTypeMismatch {
                    state: name.to_string(),
                    reason: "the value or namespace types differ from the first registration"
                        .into(),
                }),
            };
        }
        let mut table = make();
        if self.changes.is_on() {
            table.track_changes();
        }
        if self.timer_ids.contains_key(name) {
            return Err(Error::StateKindMismatch {
                state: name.to_string(),
                existing: StateKind::Timers,
                requested: table.kind.kind(),
            });
        }
        if let Some(ttl) = &table.ttl {
            if ttl.ttl().is_zero() {
                return Err(Error::InvalidTtl {
                    state: name.to_string(),
                    reason: "the time to live must be positive".into(),
                });
            }
        }
        if let Some(chunks) = self.pending.get(name) {
            // Restored data waits here; it stays pending if it does not fit this descriptor.
            let now = self.clock.now_millis();
            for chunk in chunks {
                Self::apply_chunk(
                    &mut table,
                    chunk,
                    &self.key_serializer,
                    self.locator.range,
                    now,
                    self.restore_threads,
                )?;
            }
            self.pending.remove(name);
        }
        let id = StateId(self.tables.len() as u32);
        if per_record_cleanup(table.ttl) {
            self.per_record_cleanup.push(self.tables.len());
        }
        self.tables.push(Box::new(table));
        self.ids.insert(name.clone(), id);
        Ok(id)
    }

    /// Incremental TTL cleanup of the states that run it on every record.
    #[inline(never)]
    fn cleanup_per_record(&mut self) {
        let now = self.clock.now_millis();
        for &i in &self.per_record_cleanup {
            self.tables[i].incremental_cleanup(now, true);
        }
    }

    /// The serialized bytes of `key`.
    fn key_bytes(&self, key: &K) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.key_serializer
            .serialize(key, &mut bytes)
            .map_err(|e| Error::Serialize {
                state: "<current key>".into(),
                what: "key",
                reason: e.0,
            })?;
        Ok(bytes)
    }

    fn timer_service<N: Namespace>(&self, h: &TimerServiceHandle<N>) -> Result<&TimerService> {
        self.timer_services
            .get(h.id().0 as usize)
            .filter(|t| t.name == *h.name())
            .ok_or_else(|| unknown(h.name()))
    }

    /// The key group and serialized timer of the current key.
    fn timer_for<N: Namespace>(
        &self,
        h: &TimerServiceHandle<N>,
        ns: &N,
        timestamp: i64,
    ) -> Result<(u32, state_api::timer::TimerBytes)> {
        let service = self.timer_service(h)?;
        let cur = self.current.as_ref().ok_or_else(|| Error::NoCurrentKey {
            state: h.name().to_string(),
        })?;
        let mut ns_bytes = Vec::new();
        service
            .serializer::<N>()?
            .serialize(ns, &mut ns_bytes)
            .map_err(|e| Error::Serialize {
                state: h.name().to_string(),
                what: "namespace",
                reason: e.0,
            })?;
        let kg = self.locator.range.start() + cur.part as u32;
        Ok((kg, (timestamp, self.key_bytes(&cur.key)?, ns_bytes)))
    }

    fn apply_timer_chunk(&mut self, i: usize, chunk: &PendingChunk) -> Result<()> {
        if chunk.meta.kind != StateKind::Timers {
            return Err(Error::StateKindMismatch {
                state: chunk.meta.name.to_string(),
                existing: chunk.meta.kind,
                requested: StateKind::Timers,
            });
        }
        check_key_serializer(
            &self.key_serializer,
            &chunk.meta.name,
            &chunk.key_serializer,
        )?;
        self.timer_services[i].restore(chunk)?;
        self.timers_dirty.iter_mut().for_each(|d| *d = true);
        self.changes.timers_replaced(i);
        Ok(())
    }

    fn apply_chunk(
        table: &mut dyn ErasedTable<K>,
        chunk: &PendingChunk,
        key_serializer: &Arc<dyn StateSerializer<K>>,
        range: KeyGroupRange,
        now: i64,
        workers: usize,
    ) -> Result<()> {
        check_key_serializer(key_serializer, &chunk.meta.name, &chunk.key_serializer)?;
        table.prepare_restore(&chunk.meta)?;
        restore::apply_chunk_parallel(table, chunk, &**key_serializer, range, now, workers)
    }
}

/// A consistent view of a heap backend's state, taken by [`KeyedStateBackend::snapshot`].
pub struct HeapSnapshot<K> {
    header: SnapshotHeader,
    tables: Vec<Box<dyn SharedTable>>,
    timers: Vec<KeyGroupTimers>,
    pending: Vec<Vec<Arc<PendingChunk>>>,
    key_serializer: Arc<dyn StateSerializer<K>>,
    now: i64,
    only: Option<Vec<u32>>,
}

impl<K: StateKey> HeapSnapshot<K> {
    /// Limits the snapshot to the given key groups (for incremental checkpoints); the stream
    /// still has a complete header.
    pub fn restrict_to(mut self, key_groups: Vec<u32>) -> Self {
        self.only = Some(key_groups);
        self
    }
}

impl<K: StateKey> HeapSnapshot<K> {
    /// Writes every record of key group `kg` (at position `part` of the range) into the block
    /// `w` has begun.
    pub(crate) fn write_key_group(
        &self,
        w: &mut SnapshotWriter<&mut dyn Write>,
        part: usize,
        kg: u32,
        key_buf: &mut Vec<u8>,
    ) -> Result<()> {
        for (i, t) in self.tables.iter().enumerate() {
            let name = &self.header.states[i].name;
            t.write_part(part, self.now, &mut |key: &dyn Any,
                                               ns: &[u8],
                                               payload: &mut dyn FnMut(
                &mut Vec<u8>,
            )
                -> Result<
                bool,
            >| {
                let key = key.downcast_ref::<K>().ok_or_else(|| unknown(name))?;
                key_buf.clear();
                self.key_serializer
                    .serialize(key, key_buf)
                    .map_err(|e| Error::Serialize {
                        state: name.to_string(),
                        what: "key",
                        reason: e.0,
                    })?;
                w.write_record_with(i as u32, key_buf, ns, payload)?;
                Ok(())
            })?;
        }
        let base = self.tables.len();
        for (i, timers) in self.timers.iter().enumerate() {
            for (domain, (ts, key, ns)) in timers.timers_of(part) {
                let payload = state_api::timer::encode_timer_payload(*ts, domain);
                w.write_record((base + i) as u32, key, ns, &payload)?;
            }
        }
        let base = base + self.timers.len();
        for (i, chunks) in self.pending.iter().enumerate() {
            for chunk in chunks {
                for raw in chunk.records_of(kg) {
                    let raw = raw?;
                    w.write_record((base + i) as u32, raw.key, raw.namespace, raw.payload)?;
                }
            }
        }
        Ok(())
    }
}

impl<K: StateKey> KeyedStateSnapshot for HeapSnapshot<K> {
    fn write_to(&self, out: &mut dyn Write) -> Result<SnapshotSummary> {
        let mut w = SnapshotWriter::new(out, &self.header)?;
        let mut key_buf = Vec::new();
        let range = self.header.key_group_range;
        for (part, kg) in range.iter().enumerate() {
            if let Some(only) = &self.only {
                if only.binary_search(&kg).is_err() {
                    continue;
                }
            }
            w.begin_key_group(kg)?;
            self.write_key_group(&mut w, part, kg, &mut key_buf)?;
        }
        Ok(w.finish()?.0)
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.header.key_group_range
    }
}

impl<K: StateKey> HeapKeyedStateBackend<K> {
    /// Like [`KeyedStateBackend::snapshot`], with the concrete type (for
    /// [`HeapSnapshot::restrict_to`]).
    pub fn snapshot_heap(&mut self) -> HeapSnapshot<K> {
        let tables: Vec<Box<dyn SharedTable>> = self.tables.iter_mut().map(|t| t.share()).collect();
        // Restored but unregistered states go into the snapshot unchanged: nothing restored is
        // lost because a job did not touch a state before the next checkpoint.
        let mut pending: Vec<(StateName, Vec<Arc<PendingChunk>>)> = self
            .pending
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        let states = tables
            .iter()
            .map(|t| t.meta())
            .chain(self.timer_services.iter().map(|t| t.meta.clone()))
            .chain(
                pending
                    .iter()
                    .filter_map(|(_, c)| c.first().map(|c| c.meta.clone())),
            )
            .collect();
        HeapSnapshot {
            header: SnapshotHeader {
                max_parallelism: self.locator.max_parallelism,
                key_group_range: self.locator.range,
                key_serializer: self.key_serializer.snapshot(),
                states,
            },
            tables,
            timers: self
                .timer_services
                .iter()
                .map(|t| t.timers.share())
                .collect(),
            pending: pending.into_iter().map(|(_, c)| c).collect(),
            key_serializer: Arc::clone(&self.key_serializer),
            now: self.clock.now_millis(),
            only: None,
        }
    }
}

impl<K: StateKey> KeyedStateBackend for HeapKeyedStateBackend<K> {
    type Key = K;

    fn max_parallelism(&self) -> u32 {
        self.locator.max_parallelism
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.locator.range
    }

    #[inline(always)]
    fn set_current_key(&mut self, key: K) -> Result<()> {
        // The hot path stays small (a few dozen instructions for integer keys), so that the
        // CPU overlaps the memory accesses of consecutive records; the rest is out of line.
        let (hash, kg) =
            self.locator
                .hash_and_group_of(&key, &self.key_serializer, &mut self.key_buf)?;
        let part = kg.wrapping_sub(self.locator.part_base);
        if part >= self.locator.parts {
            return Err(self.locator.out_of_range(kg, &mut self.current));
        }
        if !self.per_record_cleanup.is_empty() {
            self.cleanup_per_record();
        }
        // Stored last, after any call: the state access that follows then reads the key,
        // hash and partition from registers rather than reloading them.
        self.current = Some(CurrentKey {
            key,
            hash,
            part: part as usize,
        });
        Ok(())
    }

    fn current_key(&self) -> Option<&K> {
        self.current.as_ref().map(|c| &c.key)
    }

    fn current_key_group(&self) -> Option<u32> {
        self.current
            .as_ref()
            .map(|c| self.locator.range.start() + c.part as u32)
    }

    fn register_value<V: StateType, N: Namespace>(
        &mut self,
        d: ValueStateDescriptor<V, N>,
    ) -> Result<ValueStateHandle<V, N>> {
        let name = d.name().clone();
        let kind = ValueKind {
            ser: Arc::clone(d.value_serializer()),
            default: d.default_value().cloned(),
        };
        let id = self.register(&name, kind, d.ttl().copied(), d.namespace_serializer())?;
        Ok(ValueStateHandle::new(id, name))
    }

    fn register_list<T: StateType, N: Namespace>(
        &mut self,
        d: ListStateDescriptor<T, N>,
    ) -> Result<ListStateHandle<T, N>> {
        let name = d.name().clone();
        let ser = d.element_serializer();
        let ttl = d.ttl().copied();
        let id = if ttl.is_some() {
            self.register_list_as::<T, N, i64, NoTtl>(&name, ser, ttl, d.namespace_serializer())?
        } else {
            self.register_list_as::<T, N, NoTtl, i64>(&name, ser, ttl, d.namespace_serializer())?
        };
        Ok(ListStateHandle::new(id, name))
    }

    fn register_map<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        d: MapStateDescriptor<UK, UV, N>,
    ) -> Result<MapStateHandle<UK, UV, N>> {
        let name = d.name().clone();
        let sers = (d.user_key_serializer(), d.user_value_serializer());
        let ttl = d.ttl().copied();
        let id = if ttl.is_some() {
            self.register_map_as::<UK, UV, N, i64, NoTtl>(
                &name,
                sers,
                ttl,
                d.namespace_serializer(),
            )?
        } else {
            self.register_map_as::<UK, UV, N, NoTtl, i64>(
                &name,
                sers,
                ttl,
                d.namespace_serializer(),
            )?
        };
        Ok(MapStateHandle::new(id, name))
    }

    fn register_reducing<T: StateType, N: Namespace>(
        &mut self,
        d: ReducingStateDescriptor<T, N>,
    ) -> Result<ReducingStateHandle<T, N>> {
        let name = d.name().clone();
        let kind = ReducingKind {
            ser: Arc::clone(d.value_serializer()),
            reduce: Arc::clone(d.reduce_fn()),
        };
        let id = self.register(&name, kind, d.ttl().copied(), d.namespace_serializer())?;
        Ok(ReducingStateHandle::new(id, name))
    }

    fn register_aggregating<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace>(
        &mut self,
        d: AggregatingStateDescriptor<IN, ACC, OUT, N>,
    ) -> Result<AggregatingStateHandle<IN, OUT, N>> {
        let name = d.name().clone();
        let kind = AggregatingKind {
            ser: Arc::clone(d.accumulator_serializer()),
            func: Arc::clone(d.function()),
        };
        let id = self.register(&name, kind, d.ttl().copied(), d.namespace_serializer())?;
        Ok(AggregatingStateHandle::new(id, name))
    }

    type BoundValue<'a, V: StateType, N: Namespace>
        = HeapBoundValue<'a, K, V, N>
    where
        Self: 'a;

    fn bind_value<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: N,
    ) -> Result<HeapBoundValue<'_, K, V, N>> {
        HeapBoundValue::bind(self, h, ns)
    }

    #[inline(always)]
    fn value_get<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
    ) -> Result<Option<V>> {
        let clock = &self.clock;
        with_single!(
            self,
            ValueKind<V>,
            h,
            |cur, t| match read_single(t, cur, ns, clock, false) {
                Some(v) => Ok(Some(v)),
                None => Ok(t.kind.default.clone()),
            }
        )
    }

    #[inline(always)]
    fn value_update<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
        value: V,
    ) -> Result<()> {
        let clock = &self.clock;
        with_single!(self, ValueKind<V>, h, |cur, t| {
            let ts = write_ts(t, clock);
            t.put(cur, ns, ts, value);
        });
        Ok(())
    }

    fn list_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<Vec<T>>> {
        let clock = &self.clock;
        Ok(with_list!(self, T, h, |cur, t| list_get_in(
            t, cur, ns, clock
        )))
    }

    #[inline]
    fn list_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        let clock = &self.clock;
        with_list!(self, T, h, |cur, t| {
            let ts = Stamp::new(write_ts(t, clock));
            match t.find_mut(cur, ns) {
                Some(e) => e.value.push((value, ts)),
                None => {
                    // Room for a few elements, as a first `Vec::push` makes: appends follow
                    // adds, and growing from one element would reallocate at once.
                    let mut list = Vec::with_capacity(4);
                    list.push((value, ts));
                    t.put(cur, ns, 0, list);
                }
            }
        });
        Ok(())
    }

    fn list_add_all<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let clock = &self.clock;
        with_list!(self, T, h, |cur, t| {
            let ts = Stamp::new(write_ts(t, clock));
            // Without TTL the stamp takes no room and the collect below reuses the allocation
            // of `values` (the element layout is the same).
            let items = values.into_iter().map(|v| (v, ts));
            match t.find_mut(cur, ns) {
                Some(e) => e.value.extend(items),
                None => t.put(cur, ns, 0, items.collect()),
            }
        });
        Ok(())
    }

    fn list_update<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()> {
        let clock = &self.clock;
        with_list!(self, T, h, |cur, t| {
            if values.is_empty() {
                t.remove(cur, ns);
            } else {
                let ts = Stamp::new(write_ts(t, clock));
                t.put(cur, ns, 0, values.into_iter().map(|v| (v, ts)).collect());
            }
        });
        Ok(())
    }

    fn map_get<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<Option<UV>> {
        let clock = &self.clock;
        Ok(with_map!(self, UK, UV, h, |cur, t| map_get_in(
            t, cur, ns, user_key, clock
        )))
    }

    fn map_put<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: UK,
        value: UV,
    ) -> Result<()> {
        let clock = &self.clock;
        with_map!(self, UK, UV, h, |cur, t| {
            let ts = Stamp::new(write_ts(t, clock));
            match t.find_mut(cur, ns) {
                Some(e) => {
                    e.value.insert(user_key, (value, ts));
                }
                None => {
                    let mut map = MapStore::default();
                    map.insert(user_key, (value, ts));
                    t.put(cur, ns, 0, map);
                }
            }
        });
        Ok(())
    }

    fn map_put_all<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        entries: Vec<(UK, UV)>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let clock = &self.clock;
        with_map!(self, UK, UV, h, |cur, t| {
            let ts = Stamp::new(write_ts(t, clock));
            let items = entries.into_iter().map(|(k, v)| (k, (v, ts)));
            match t.find_mut(cur, ns) {
                Some(e) => e.value.extend(items),
                None => t.put(cur, ns, 0, items.collect::<MapStore<_, _, _>>()),
            }
        });
        Ok(())
    }

    fn map_remove<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<()> {
        let clock = &self.clock;
        with_map!(self, UK, UV, h, |cur, t| {
            if t.ttl.is_some() {
                after_access(t, clock.now_millis());
            }
            remove_user_key(t, cur, ns, user_key);
        });
        Ok(())
    }

    fn map_contains<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<bool> {
        Ok(self.map_get(h, ns, user_key)?.is_some())
    }

    fn map_entries<'a, UK: MapKey, UV: StateType, N: Namespace>(
        &'a mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<MapIter<'a, UK, UV>> {
        let (cur, t) = access_stamped::<
            K,
            Table<K, N, MapKind<UK, UV, NoTtl>>,
            Table<K, N, MapKind<UK, UV, i64>>,
        >(&mut self.tables, &self.current, h.id(), h.name())?;
        let clock = &self.clock;
        Ok(on_stamped!(t, |t| map_entries_in(t, cur, ns, clock)))
    }

    fn map_is_empty<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<bool> {
        let clock = &self.clock;
        Ok(with_map!(self, UK, UV, h, |cur, t| {
            let ttl = t.ttl;
            t.find(cur, ns).is_none_or(|e| match ttl {
                None => e.value.is_empty(),
                Some(ttl) => {
                    // The clock is read only for a state with TTL.
                    let now = clock.now();
                    !e.value
                        .values()
                        .any(|(_, ts)| ttl.returns_expired() || !ttl.is_expired(ts.get(), now))
                }
            })
        }))
    }

    fn reducing_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<T>> {
        let clock = &self.clock;
        Ok(with_single!(
            self,
            ReducingKind<T>,
            h,
            |cur, t| read_single(t, cur, ns, clock, false)
        ))
    }

    fn reducing_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        let clock = &self.clock;
        with_single!(self, ReducingKind<T>, h, |cur, t| {
            let old = read_single(t, cur, ns, clock, true);
            let new = match old {
                Some(a) => (t.kind.reduce)(a, value),
                None => value,
            };
            let ts = write_ts(t, clock);
            t.put(cur, ns, ts, new);
        });
        Ok(())
    }

    fn aggregating_get<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
    ) -> Result<Option<OUT>> {
        let (cur, t) = erased(&mut self.tables, &self.current, h.id(), h.name())?;
        // The handle does not name the accumulator type: the table fills `out` through `Any`.
        let mut out: Option<OUT> = None;
        t.aggregate_get(cur, ns, &mut out, &*self.clock)?;
        Ok(out)
    }

    fn aggregating_add<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
        value: IN,
    ) -> Result<()> {
        let (cur, t) = erased(&mut self.tables, &self.current, h.id(), h.name())?;
        let mut value = Some(value);
        t.aggregate_add(cur, ns, &mut value, &*self.clock)
    }

    fn clear<N: Namespace>(&mut self, h: &dyn StateHandle<N>, ns: &N) -> Result<()> {
        let name = h.state_name().clone();
        let (cur, t) = erased(&mut self.tables, &self.current, h.state_id(), &name)?;
        t.clear(cur, ns)
    }

    fn merge_namespaces<N: Namespace>(
        &mut self,
        h: &dyn MergeableHandle<N>,
        target: &N,
        sources: &[N],
    ) -> Result<()> {
        let name = h.state_name().clone();
        let now = self.clock.now_millis();
        let (cur, t) = erased(&mut self.tables, &self.current, h.state_id(), &name)?;
        t.merge(cur, target, &sources.to_vec(), now)
    }

    fn keys<'a, N: Namespace>(
        &'a mut self,
        h: &dyn StateHandle<N>,
        ns: &N,
    ) -> Result<KeyIter<'a, K>> {
        let name = h.state_name().clone();
        self.tables
            .get(h.state_id().0 as usize)
            .filter(|t| *t.name() == name)
            .ok_or_else(|| unknown(&name))?
            .keys(ns)
    }

    fn register_timer_service<N: Namespace>(
        &mut self,
        d: TimerServiceDescriptor<N>,
    ) -> Result<TimerServiceHandle<N>> {
        let name = d.name().clone();
        if let Some(&id) = self.ids.get(&name) {
            return Err(Error::StateKindMismatch {
                state: name.to_string(),
                existing: self.tables[id.0 as usize].state_kind(),
                requested: StateKind::Timers,
            });
        }
        if let Some(&i) = self.timer_ids.get(&name) {
            if self.timer_services[i].ns_type != std::any::TypeId::of::<N>() {
                return Err(Error::StateTypeMismatch {
                    state: name.to_string(),
                    reason: "the namespace type differs from the first registration".into(),
                });
            }
            return Ok(TimerServiceHandle::new(StateId(i as u32), name));
        }
        let mut service = TimerService::new(&d, self.locator.range);
        if let Some(chunks) = self.pending.get(&name) {
            for chunk in chunks {
                if chunk.meta.kind != StateKind::Timers {
                    return Err(Error::StateKindMismatch {
                        state: name.to_string(),
                        existing: chunk.meta.kind,
                        requested: StateKind::Timers,
                    });
                }
                check_key_serializer(
                    &self.key_serializer,
                    &chunk.meta.name,
                    &chunk.key_serializer,
                )?;
                service.restore(chunk)?;
            }
            self.pending.remove(&name);
            self.changes.timers_replaced(self.timer_services.len());
        }
        let i = self.timer_services.len();
        self.timer_services.push(service);
        self.timer_ids.insert(name.clone(), i);
        self.timers_dirty.iter_mut().for_each(|d| *d = true);
        Ok(TimerServiceHandle::new(StateId(i as u32), name))
    }

    fn register_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        let (kg, timer) = self.timer_for(h, ns, timestamp)?;
        let service = &mut self.timer_services[h.id().0 as usize];
        let part = (kg - self.locator.range.start()) as usize;
        self.changes.timer(
            h.id().0 as usize,
            part,
            domain,
            || timer.clone(),
            || service.timers.timers_of(part).count(),
        );
        if service.timers.register(domain, kg, timer)? {
            self.timers_dirty[(kg - self.locator.range.start()) as usize] = true;
        }
        Ok(())
    }

    fn delete_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        let (kg, timer) = self.timer_for(h, ns, timestamp)?;
        let service = &mut self.timer_services[h.id().0 as usize];
        let part = (kg - self.locator.range.start()) as usize;
        self.changes.timer(
            h.id().0 as usize,
            part,
            domain,
            || timer.clone(),
            || service.timers.timers_of(part).count(),
        );
        if service.timers.delete(domain, kg, &timer)? {
            self.timers_dirty[(kg - self.locator.range.start()) as usize] = true;
        }
        Ok(())
    }

    fn advance_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Vec<Timer<K, N>>> {
        let ns_ser = Arc::clone(self.timer_service(h)?.serializer::<N>()?);
        let due = self.timer_services[h.id().0 as usize]
            .timers
            .pop_due(domain, time);
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut fired = Vec::with_capacity(due.len());
        for (timestamp, key, ns) in due {
            let kg = assign_to_key_group(&key, self.locator.max_parallelism);
            let part = kg.wrapping_sub(self.locator.range.start()) as usize;
            if let Some(d) = self.timers_dirty.get_mut(part) {
                *d = true;
            }
            let service = &self.timer_services[h.id().0 as usize];
            self.changes.timer(
                h.id().0 as usize,
                part,
                domain,
                || (timestamp, key.clone(), ns.clone()),
                || service.timers.timers_of(part).count(),
            );
            let de = |what, e: SerdeError| Error::Deserialize {
                state: h.name().to_string(),
                what,
                reason: e.0,
            };
            fired.push(Timer {
                key: self
                    .key_serializer
                    .deserialize(&key)
                    .map_err(|e| de("timer key", e))?,
                namespace: ns_ser
                    .deserialize(&ns)
                    .map_err(|e| de("timer namespace", e))?,
                timestamp,
                domain,
            });
        }
        Ok(fired)
    }

    fn next_due_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Option<Timer<K, N>>> {
        let ns_ser = Arc::clone(self.timer_service(h)?.serializer::<N>()?);
        let sid = h.id().0 as usize;
        let Some((part, (timestamp, key, ns))) =
            self.timer_services[sid].timers.first_due(domain, time)
        else {
            return Ok(None);
        };
        // Decode before removing: on a decoding error the timer stays where it was.
        let de = |what, e: SerdeError| Error::Deserialize {
            state: h.name().to_string(),
            what,
            reason: e.0,
        };
        let timer = Timer {
            key: self
                .key_serializer
                .deserialize(key)
                .map_err(|e| de("timer key", e))?,
            namespace: ns_ser
                .deserialize(ns)
                .map_err(|e| de("timer namespace", e))?,
            timestamp: *timestamp,
            domain,
        };
        let service = &mut self.timer_services[sid];
        if let Some(fired) = service.timers.pop_first_due(domain, time) {
            if let Some(d) = self.timers_dirty.get_mut(part) {
                *d = true;
            }
            let service = &self.timer_services[sid];
            self.changes.timer(
                sid,
                part,
                domain,
                || fired,
                || service.timers.timers_of(part).count(),
            );
        }
        Ok(Some(timer))
    }

    fn snapshot(&mut self) -> Result<Box<dyn KeyedStateSnapshot>> {
        Ok(Box::new(self.snapshot_heap()))
    }

    fn restore<R: Read>(&mut self, streams: Vec<(String, R)>) -> Result<()> {
        let now = self.clock.now_millis();
        let collect = if self.tables.is_empty() {
            // Nothing registered: every block waits for its state's registration.
            let mut collect = restore::Collect::new(self.locator.range);
            restore_streams(
                streams,
                self.locator.max_parallelism,
                self.locator.range,
                &mut collect,
            )?;
            collect.finish_stream();
            collect
        } else {
            restore::restore_parallel(
                streams,
                self.restore_threads,
                &mut self.tables,
                &self.ids,
                &self.timer_ids,
                &self.key_serializer,
                self.locator.max_parallelism,
                self.locator.range,
                now,
            )?
        };
        for (name, chunk) in collect.chunks {
            if let Some(&i) = self.timer_ids.get(&name) {
                self.apply_timer_chunk(i, &chunk)?;
                continue;
            }
            match self.ids.get(&name) {
                Some(&id) => Self::apply_chunk(
                    &mut *self.tables[id.0 as usize],
                    &chunk,
                    &self.key_serializer,
                    self.locator.range,
                    now,
                    self.restore_threads,
                )?,
                None => self.pending.entry(name).or_default().push(Arc::new(chunk)),
            }
        }
        Ok(())
    }
}

/// Finds the type-erased table of a handle, and the current key.
fn erased<'a, K: StateKey>(
    tables: &'a mut [Box<dyn ErasedTable<K>>],
    current: &'a Option<CurrentKey<K>>,
    id: StateId,
    name: &StateName,
) -> Result<(&'a CurrentKey<K>, &'a mut dyn ErasedTable<K>)> {
    let cur = current.as_ref().ok_or_else(|| Error::NoCurrentKey {
        state: name.to_string(),
    })?;
    let table = tables
        .get_mut(id.0 as usize)
        .filter(|t| t.name() == name)
        .ok_or_else(|| unknown(name))?;
    Ok((cur, &mut **table))
}

/// Removes one user key of a map; drops the map when it becomes empty.
fn remove_user_key<K: StateKey, N: Namespace, UK: MapKey, UV: StateType, S: Stamp>(
    t: &mut Table<K, N, MapKind<UK, UV, S>>,
    cur: &CurrentKey<K>,
    ns: &N,
    user_key: &UK,
) {
    if !t
        .find(cur, ns)
        .is_some_and(|e| e.value.contains_key(user_key))
    {
        return;
    }
    let now_empty = t.find_mut(cur, ns).is_some_and(|e| {
        e.value.remove(user_key);
        e.value.is_empty()
    });
    if now_empty {
        t.remove(cur, ns);
    }
}
