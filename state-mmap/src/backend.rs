//! [`MmapKeyedStateBackend`]: the `state-api` keyed state backend on the mmap engine.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::snapshot::{
    payload, restore_streams, Decoder, RawRecord, RestoreVisitor, SnapshotHeader, SnapshotReader,
    SnapshotSummary, SnapshotWriter,
};
use state_api::*;

use crate::codec::*;
use crate::engine::{CompactionFilter, Db, DbSnapshot, EngineOptions, FilterDecision};
use crate::environment::MmapEnvironment;
use crate::tempdir::TempDir;
use crate::typed::*;

#[path = "native.rs"]
pub(crate) mod native;
#[path = "timers.rs"]
mod timers;

use timers::DueIndex;

/// Builds a [`MmapKeyedStateBackend`].
pub struct MmapBackendBuilder<K> {
    max_parallelism: u32,
    range: Option<KeyGroupRange>,
    key_serializer: Arc<dyn StateSerializer<K>>,
    clock: Arc<dyn Clock>,
    location: Location,
    options: EngineOptions,
    environment: Option<MmapEnvironment>,
}

/// Where a backend keeps its files.
enum Location {
    /// A fresh private directory under the system temporary directory.
    Temporary,
    /// A fresh private directory under this parent.
    FreshIn(PathBuf),
    /// Exactly this directory (an existing store there is reopened).
    Exactly(PathBuf),
}

impl<K: StateKey> MmapBackendBuilder<K> {
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

    /// Keeps the files in exactly `dir` (created if needed). An existing store there is
    /// reopened: its states come back as restored state, bound when they are registered. The
    /// directory is the caller's: it is never deleted, and two backends open at once must not
    /// share it (use [`working_directory_in`](Self::working_directory_in) for a folder of
    /// their own under a common parent).
    ///
    /// Without a directory the backend uses a fresh private directory under the system
    /// temporary directory, as [`working_directory_in`](Self::working_directory_in) does under
    /// its parent.
    pub fn directory(mut self, dir: impl AsRef<Path>) -> Self {
        self.location = Location::Exactly(dir.as_ref().to_path_buf());
        self
    }

    /// Keeps the files in a fresh private directory under `parent` (created if needed), named
    /// `flowstate-mmap-<pid>-<n>-<salt>`, that no other backend of this or any other process
    /// shares, and that is deleted when the backend is dropped. Each such directory holds an
    /// `owner.lock` file that its backend keeps locked for its whole life; the operating system
    /// releases the lock however the process ends (`kill -9` included), so the first backend a
    /// later process makes under the same parent deletes the directories whose lock is free:
    /// those of finished or crashed processes. Directories whose lock is held (live backends,
    /// of any process) and anything else under `parent` are left alone.
    ///
    /// The store always starts empty (restore it from a checkpoint); to reopen a store in
    /// place, use [`directory`](Self::directory). This is the default with the system
    /// temporary directory as the parent.
    pub fn working_directory_in(mut self, parent: impl AsRef<Path>) -> Self {
        self.location = Location::FreshIn(parent.as_ref().to_path_buf());
        self
    }

    /// Opens the backend in `env`, sharing its memory budget and background threads with
    /// every other backend built from it (one environment per process: see
    /// [`MmapEnvironment`]). The backend's budget is then its share of the environment's, and
    /// [`memory_budget`](Self::memory_budget) is ignored. Without an environment the backend
    /// starts one of its own with its memory budget.
    pub fn environment(mut self, env: MmapEnvironment) -> Self {
        self.environment = Some(env);
        self
    }

    /// Sets the memory budget of the engine's own buffers (see [`EngineOptions::memory_budget`])
    /// when the backend has no [`environment`](Self::environment).
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.options.memory_budget = bytes;
        self
    }

    /// Sets every engine option.
    pub fn engine_options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Checks the settings, opens the store and builds the backend.
    pub fn build(self) -> Result<MmapKeyedStateBackend<K>> {
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
        let (dir, temp) = match self.location {
            Location::Exactly(d) => (d, None),
            Location::Temporary => {
                let t = TempDir::new()?;
                (t.path().to_path_buf(), Some(t))
            }
            Location::FreshIn(parent) => {
                let t = TempDir::new_in(&parent)?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut options = self.options;
        // One map's entries share the prefix `kg | id | key | namespace`.
        options.prefix_extractor = Some(Arc::new(prefix_len));
        let mut db = match &self.environment {
            Some(env) => Db::open_in(&dir, options, env)?,
            None => Db::open(&dir, options)?,
        };
        let ttl_table: TtlTable = Arc::default();
        db.set_compaction_filter(Some(Arc::new(TtlFilter {
            table: Arc::clone(&ttl_table),
            clock: Arc::clone(&self.clock),
        })));
        db.set_keep_range(Some(keep_range(range)));
        db.set_file_boundary(Arc::new(|a: &[u8], b: &[u8]| a.get(..2) != b.get(..2)))?;
        let mut backend = MmapKeyedStateBackend {
            db,
            max_parallelism: self.max_parallelism,
            range,
            key_serializer: self.key_serializer,
            clock: self.clock,
            current: None,
            states: Vec::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            kbuf: Vec::with_capacity(64),
            vbuf: Vec::with_capacity(64),
            tbuf: Vec::new(),
            ends: Vec::new(),
            map_len_hint: 0,
            list_len_hint: 0,
            key_switches: 0,
            per_record_cleanup: Vec::new(),
            ttl_table,
            timers: HashMap::new(),
            _temp: temp,
        };
        let meta = backend.db.user_meta().to_vec();
        if !meta.is_empty() {
            let (max_parallelism, groups) = decode_registry(&meta, &dir)?;
            if max_parallelism != backend.max_parallelism {
                return Err(Error::RestoreMismatch {
                    reason: format!(
                        "the store in {} was written with max parallelism {max_parallelism}, \
                         the backend has {}",
                        dir.display(),
                        backend.max_parallelism
                    ),
                });
            }
            let mut timer_services = Vec::new();
            for (name, p) in groups {
                backend.next_id = backend.next_id.max(u32::from(p.id) + 1);
                if p.meta.kind == StateKind::Timers {
                    timer_services.push((p.id, name.clone()));
                }
                backend.pending.entry(name).or_default().push(p);
            }
            // Timers a version-1 store (or an interrupted rewrite) left in the old layout are
            // rewritten now (a seek per key group when there are none).
            for (id, name) in &timer_services {
                timers::migrate_v1(&mut backend.db, range, *id, name)?;
            }
        }
        Ok(backend)
    }
}

fn keep_range(range: KeyGroupRange) -> (Vec<u8>, Vec<u8>) {
    (
        kg_prefix(range.start()).to_vec(),
        kg_prefix(range.end()).to_vec(),
    )
}

/// The states whose expired entries compaction drops, by state id, shared with the filter.
#[derive(Default)]
struct TtlStates {
    by_id: RwLock<HashMap<u16, (StateKind, StateTtlConfig)>>,
    /// False while no state cleans up in compaction: the filter then keeps every entry without
    /// taking the lock (it is asked for every entry a compaction writes, on two threads).
    any: AtomicBool,
}

type TtlTable = Arc<TtlStates>;

/// Drops expired TTL state during compaction (Flink's RocksDB compaction filter).
struct TtlFilter {
    table: TtlTable,
    clock: Arc<dyn Clock>,
}

impl CompactionFilter for TtlFilter {
    fn filter(&self, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> FilterDecision {
        if !self.table.any.load(Ordering::Relaxed) {
            return FilterDecision::Keep;
        }
        let Some(id) = key.get(2..4).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return FilterDecision::Keep;
        };
        // The table holds only states that clean up in compaction.
        let found = match self.table.by_id.read() {
            Ok(t) => t.get(&id).copied(),
            Err(p) => p.into_inner().get(&id).copied(),
        };
        let Some((kind, ttl)) = found else {
            return FilterDecision::Keep;
        };
        let now = self.clock.now_millis();
        if kind == StateKind::List {
            // A state with TTL always stores stamped lists (see `StateEntry::list_enc`).
            let enc = ListEncoding::Stamped;
            let name = StateName::new("list").ok();
            let Some(Ok(items)) = name.map(|n| parse_list(value, enc, &n).map(|v| v.to_vec()))
            else {
                return FilterDecision::Keep;
            };
            let live: Vec<_> = items
                .iter()
                .filter(|(ts, _)| !ttl.is_expired(*ts, now))
                .collect();
            if live.is_empty() {
                return FilterDecision::Remove;
            }
            if live.len() == items.len() {
                return FilterDecision::Keep;
            }
            for (ts, e) in live {
                enc.push(out, *ts, e);
            }
            return FilterDecision::Change;
        }
        match ts_of(value) {
            Some(ts) if ttl.is_expired(ts, now) => FilterDecision::Remove,
            _ => FilterDecision::Keep,
        }
    }
}

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

impl<K: StateKey + Serialize + DeserializeOwned> MmapKeyedStateBackend<K> {
    /// A builder with postcard keys, 128 key groups, all of them owned, the system clock, a
    /// temporary directory and a 256 MiB memory budget.
    pub fn builder() -> MmapBackendBuilder<K> {
        MmapBackendBuilder {
            max_parallelism: DEFAULT_LOWER_BOUND_MAX_PARALLELISM,
            range: None,
            key_serializer: Arc::new(PostcardSerializer::<K>::new()),
            clock: Arc::new(SystemClock),
            location: Location::Temporary,
            options: EngineOptions::default(),
            environment: None,
        }
    }
}

fn unknown(name: &StateName) -> Error {
    Error::UnknownState {
        state: name.to_string(),
    }
}

fn type_mismatch(name: &StateName) -> Error {
    Error::StateTypeMismatch {
        state: name.to_string(),
        reason: "the value or namespace types differ from the registered ones".into(),
    }
}

/// Borrows (slot, entry, typed state, current key) for a handle, as disjoint field borrows.
macro_rules! typed {
    ($self:ident, $id:expr, $name:expr, $ty:ty) => {{
        let name: &StateName = $name;
        let cur = $self.current.as_ref().ok_or_else(|| Error::NoCurrentKey {
            state: name.to_string(),
        })?;
        let slot = $id.0 as usize;
        let e = $self
            .states
            .get(slot)
            .filter(|e| e.name == *name)
            .ok_or_else(|| unknown(name))?;
        let t = e
            .typed
            .as_any()
            .downcast_ref::<$ty>()
            .ok_or_else(|| type_mismatch(name))?;
        (e, t, cur)
    }};
}

/// Writes `kg | id | key | ns_len | ns` into `buf`.
#[inline]
fn state_key<N: 'static>(
    buf: &mut Vec<u8>,
    cur_kg: u32,
    id: u16,
    key: &[u8],
    ns_ser: &Arc<dyn StateSerializer<N>>,
    ns: &N,
    name: &StateName,
) -> Result<()> {
    push_prefix(buf, cur_kg, id, key);
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    ns_ser
        .serialize(ns, buf)
        .map_err(ser_err(name, "namespace"))?;
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

#[inline]
fn now_if(ttl: Option<StateTtlConfig>, clock: &dyn Clock) -> i64 {
    match ttl {
        Some(_) => clock.now_millis(),
        None => 0,
    }
}

/// Reads a single value (value, reducing, aggregating) with TTL semantics: `vbuf` gets
/// `ts | value`; returns whether there is a value to return. `for_update` treats expired values
/// as absent whatever the visibility (as the heap backend does).
#[inline]
fn read_single(
    db: &mut Db,
    clock: &dyn Clock,
    ttl: Option<StateTtlConfig>,
    key: &[u8],
    vbuf: &mut Vec<u8>,
    for_update: bool,
    name: &StateName,
) -> Result<bool> {
    vbuf.clear();
    if !db.get(key, vbuf)? {
        return Ok(false);
    }
    let ts = ts_of(vbuf).ok_or_else(|| corrupt_value(name, "value"))?;
    let Some(ttl) = ttl else { return Ok(true) };
    let now = clock.now_millis();
    if ttl.is_expired(ts, now) {
        db.delete(key)?;
        return Ok(ttl.returns_expired() && !for_update);
    }
    if ttl.refresh_on_read() && !for_update {
        vbuf[..8].copy_from_slice(&now.to_be_bytes());
        db.put(key, vbuf)?;
    }
    Ok(true)
}

/// Writes `values` as list elements into `out` (cleared first): serialized with one
/// [`StateSerializer::serialize_all`] call into `scratch`, then framed by `enc`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn encode_list<T: 'static>(
    ser: &dyn StateSerializer<T>,
    values: &[T],
    enc: ListEncoding,
    ts: i64,
    scratch: &mut Vec<u8>,
    ends: &mut Vec<usize>,
    out: &mut Vec<u8>,
    name: &StateName,
) -> Result<()> {
    scratch.clear();
    ends.clear();
    ser.serialize_all(values, scratch, ends)
        .map_err(ser_err(name, "list element"))?;
    // Slack for `push_all`'s fixed-size copies.
    scratch.extend_from_slice(&[0; 16]);
    out.clear();
    if ends.len() != values.len() || !enc.push_all(out, ts, scratch, ends) {
        return Err(ser_err(name, "list element")(SerdeError(format!(
            "serialize_all of {} values reported {} element ends, not all within the {} bytes it wrote",
            values.len(),
            ends.len(),
            scratch.len() - 16
        ))));
    }
    Ok(())
}

/// Resolved `(key, value)` pairs in `[start, end)` (`None`: no upper bound), at most `limit`.
fn scan(
    db: &Db,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut it = db.iter(start, end)?;
    let mut out = Vec::new();
    while out.len() < limit {
        match it.next()? {
            Some((k, v)) => out.push((k.to_vec(), v.to_vec())),
            None => break,
        }
    }
    Ok(out)
}

/// The end of the keys that start with `prefix`: its successor, `None` (no upper bound) for a
/// prefix of 0xff bytes.
fn end_of(prefix: &[u8]) -> Option<Vec<u8>> {
    successor(prefix)
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

    fn alloc_id(&mut self) -> Result<u16> {
        let id = u16::try_from(self.next_id).map_err(|_| Error::Unsupported {
            state: String::new(),
            reason: "more than 65536 states (registered or restored) in one backend".into(),
        })?;
        self.next_id += 1;
        Ok(id)
    }

    pub(crate) fn save_registry(&mut self) {
        let mut groups: Vec<RegistryEntry> = self
            .states
            .iter()
            .map(|s| RegistryEntry {
                id: s.id,
                pending: false,
                meta: s.typed.meta(&s.name, s.ttl.as_ref()),
                key_ser: self.key_serializer.snapshot(),
                list_enc: s.list_enc,
            })
            .collect();
        for ps in self.pending.values() {
            for p in ps {
                groups.push(RegistryEntry {
                    id: p.id,
                    pending: true,
                    meta: p.meta.clone(),
                    key_ser: p.key_ser.clone(),
                    list_enc: p.list_enc,
                });
            }
        }
        if let Ok(bytes) = encode_registry(self.max_parallelism, self.range, &groups) {
            self.db.set_user_meta(bytes);
        }
    }

    fn update_ttl_table(&self) {
        let mut t = match self.ttl_table.by_id.write() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        t.clear();
        for s in &self.states {
            if let Some(ttl) = s.ttl.filter(|t| t.is_cleanup_in_compaction()) {
                t.insert(s.id, (s.kind, ttl));
            }
        }
        self.ttl_table.any.store(!t.is_empty(), Ordering::Relaxed);
    }

    fn register_typed<T: TypedState + 'static>(
        &mut self,
        name: &StateName,
        ttl: Option<StateTtlConfig>,
        typed: T,
    ) -> Result<StateId> {
        if let Some(&slot) = self.ids.get(name) {
            let e = &mut self.states[slot];
            if e.kind != typed.kind() {
                return Err(Error::StateKindMismatch {
                    state: name.to_string(),
                    existing: e.kind,
                    requested: typed.kind(),
                });
            }
            if e.typed.as_any().type_id() != TypeId::of::<T>() {
                return Err(type_mismatch(name));
            }
            // Re-registration may change the functions or TTL: take the new ones.
            let gained_ttl = e.ttl.is_none() && ttl.is_some();
            e.typed = Box::new(typed);
            e.ttl = ttl;
            let compact_list = e.kind == StateKind::List && e.list_enc == ListEncoding::Compact;
            if ttl.is_some() && (gained_ttl || compact_list) && e.kind != StateKind::Timers {
                // Data written without TTL carries time 0 (or, in compact lists, no time at
                // all): switching TTL on rewrites it stamped with now, as a restore does, so
                // that it does not expire at once.
                let (id, name, from) = (e.id, e.name.clone(), e.list_enc);
                let to = if e.kind == StateKind::List {
                    ListEncoding::Stamped
                } else {
                    from
                };
                let meta = e.typed.meta(&name, None);
                let now = self.clock.now_millis();
                let t = e.typed.transcoder(&name, &meta, Some(now), (from, to))?;
                self.copy_state(id, id, t.as_deref(), &name)?;
                self.states[slot].list_enc = to;
            }
            self.after_registration(slot);
            return Ok(StateId(slot as u32));
        }
        if ttl.is_some_and(|t| t.ttl().is_zero()) {
            return Err(Error::InvalidTtl {
                state: name.to_string(),
                reason: "the time to live must be positive".into(),
            });
        }
        let id = self.alloc_id()?;
        let kind = typed.kind();
        let mut entry = StateEntry {
            name: name.clone(),
            id,
            kind,
            ttl,
            typed: Box::new(typed),
            cleanup_pos: None,
            list_enc: ListEncoding::for_state(kind, ttl.is_some()),
        };
        if let Some(groups) = self.pending.get(name).cloned() {
            // Restored data waits here; it stays pending if it does not fit this descriptor.
            self.bind(&mut entry, &groups, true)?;
            self.pending.remove(name);
        }
        let slot = self.states.len();
        self.states.push(entry);
        self.ids.insert(name.clone(), slot);
        self.after_registration(slot);
        Ok(StateId(slot as u32))
    }

    fn after_registration(&mut self, slot: usize) {
        self.per_record_cleanup.retain(|s| *s != slot);
        if self.states[slot]
            .ttl
            .and_then(|t| t.incremental_cleanup())
            .is_some_and(|c| c.run_for_every_record)
        {
            self.per_record_cleanup.push(slot);
        }
        self.update_ttl_table();
        self.save_registry();
    }

    /// Moves restored groups into a state: checks keys, kind and serializers first (nothing
    /// changes on error), then adopts the data in place or rewrites it.
    fn bind(&mut self, entry: &mut StateEntry, groups: &[Pending], fresh: bool) -> Result<()> {
        let now = self.clock.now_millis();
        // Data adopted in place keeps its list encoding unless the state now has a TTL and the
        // data is compact (no timestamps); data copied takes the entry's encoding.
        let adopt = fresh && groups.len() == 1;
        let target_enc = if adopt && entry.ttl.is_none() {
            groups[0].list_enc
        } else {
            entry.list_enc
        };
        let mut plans = Vec::with_capacity(groups.len());
        for g in groups {
            match self.key_serializer.compatibility(&g.key_ser) {
                Compatibility::CompatibleAsIs => {}
                Compatibility::CompatibleAfterMigration(_) => {
                    return Err(Error::IncompatibleSerializer {
                        state: entry.name.to_string(),
                        what: "key",
                        reason: "keys cannot be migrated: their bytes decide their key group"
                            .into(),
                    })
                }
                Compatibility::Incompatible(reason) => {
                    return Err(Error::IncompatibleSerializer {
                        state: entry.name.to_string(),
                        what: "key",
                        reason,
                    })
                }
            }
            if g.meta.kind != entry.kind {
                return Err(Error::StateKindMismatch {
                    state: entry.name.to_string(),
                    existing: g.meta.kind,
                    requested: entry.kind,
                });
            }
            let unstamped = g.meta.ttl_millis.is_none()
                || (g.meta.kind == StateKind::List && g.list_enc == ListEncoding::Compact);
            let stamp = (unstamped && entry.ttl.is_some()).then_some(now);
            plans.push(entry.typed.transcoder(
                &entry.name,
                &g.meta,
                stamp,
                (g.list_enc, target_enc),
            )?);
        }
        entry.list_enc = target_enc;
        if adopt && plans[0].is_none() {
            entry.id = groups[0].id;
            return Ok(());
        }
        for (g, plan) in groups.iter().zip(plans) {
            if entry.kind == StateKind::Timers {
                self.copy_timers(g.id, entry.id, plan.as_deref(), &entry.name)?;
            } else {
                self.copy_state(g.id, entry.id, plan.as_deref(), &entry.name)?;
            }
        }
        Ok(())
    }

    /// Calls `each` with the engine and every stored (key, value) of state id `from`, key
    /// group by key group, in batches; `each` may delete or rewrite what it is given (the scan
    /// goes on after the batch it read).
    fn for_each_stored(
        &mut self,
        from: u16,
        mut each: impl FnMut(&mut Db, &[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        const BATCH: usize = 4096;
        for kg in self.range.iter() {
            let prefix = kg_state(kg, from);
            let end = end_of(&prefix);
            let mut start = prefix.to_vec();
            loop {
                let batch = scan(&self.db, &start, end.as_deref(), BATCH)?;
                for (k, v) in &batch {
                    each(&mut self.db, k, v)?;
                }
                match batch.last() {
                    Some((k, _)) if batch.len() == BATCH => {
                        start = k.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }

    /// Rewrites every entry of state id `from` under `to` (through `t` when given).
    fn copy_state(
        &mut self,
        from: u16,
        to: u16,
        t: Option<&dyn Transcoder>,
        name: &StateName,
    ) -> Result<()> {
        self.for_each_stored(from, |db, k, v| {
            let p = parse_key(k, name.as_str())?;
            let mut nk = Vec::with_capacity(k.len());
            push_prefix(&mut nk, p.kg, to, p.key);
            let at = nk.len();
            nk.extend_from_slice(&[0; 4]);
            match t {
                Some(t) => t.ns(p.ns, &mut nk)?,
                None => nk.extend_from_slice(p.ns),
            }
            let len = (nk.len() - at - 4) as u32;
            nk[at..at + 4].copy_from_slice(&len.to_be_bytes());
            let mut nv = Vec::with_capacity(v.len());
            match t {
                Some(t) => {
                    t.user_key(p.user_key, &mut nk)?;
                    t.value(v, &mut nv)?;
                }
                None => {
                    nk.extend_from_slice(p.user_key);
                    nv.extend_from_slice(v);
                }
            }
            // Deleted first: with `from == to` the entry is rewritten in place.
            db.delete(k)?;
            db.put(&nk, &nv)?;
            Ok(())
        })
    }

    /// Incremental TTL cleanup: checks up to `n` stored entries of the state at `slot`,
    /// continuing where the previous run stopped.
    fn incremental_cleanup(&mut self, slot: usize, n: usize, now: i64) -> Result<()> {
        let (id, kind, ttl, name, enc) = {
            let e = &self.states[slot];
            let Some(ttl) = e.ttl else { return Ok(()) };
            (e.id, e.kind, ttl, e.name.clone(), e.list_enc)
        };
        let first = kg_state(self.range.start(), id).to_vec();
        let mut pos = self.states[slot]
            .cleanup_pos
            .take()
            .unwrap_or_else(|| first.clone());
        let mut checked = 0;
        let mut wrapped = false;
        while checked < n {
            let kg = pos
                .get(..2)
                .map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])))
                .unwrap_or(self.range.end());
            if kg >= self.range.end() {
                if wrapped {
                    break;
                }
                wrapped = true;
                pos = first.clone();
                continue;
            }
            let end = end_of(&kg_state(kg, id));
            let batch = scan(&self.db, &pos, end.as_deref(), n - checked)?;
            pos = match batch.last() {
                Some((k, _)) if checked + batch.len() >= n => {
                    let mut p = k.clone();
                    p.push(0);
                    p
                }
                _ => kg_state(kg + 1, id).to_vec(),
            };
            for (k, v) in batch {
                checked += 1;
                if kind == StateKind::List {
                    let items = parse_list(&v, enc, &name)?;
                    let live: Vec<_> = items
                        .iter()
                        .filter(|(ts, _)| !ttl.is_expired(*ts, now))
                        .collect();
                    if live.is_empty() {
                        self.db.delete(&k)?;
                    } else if live.len() < items.len() {
                        let mut out = Vec::new();
                        for (ts, e) in live {
                            enc.push(&mut out, *ts, e);
                        }
                        self.db.put(&k, &out)?;
                    }
                } else if ts_of(&v).is_some_and(|ts| ttl.is_expired(ts, now)) {
                    self.db.delete(&k)?;
                }
            }
        }
        self.states[slot].cleanup_pos = Some(pos);
        Ok(())
    }

    /// Runs incremental cleanup for the state of `slot` when it has it (on state access).
    #[inline]
    fn after_access(&mut self, slot: usize) -> Result<()> {
        let Some(inc) = self
            .states
            .get(slot)
            .and_then(|e| e.ttl)
            .and_then(|t| t.incremental_cleanup())
        else {
            return Ok(());
        };
        let now = self.clock.now_millis();
        self.incremental_cleanup(slot, inc.cleanup_size, now)
    }

    fn erased(&self, id: StateId, name: &StateName) -> Result<(usize, &StateEntry)> {
        let slot = id.0 as usize;
        let e = self
            .states
            .get(slot)
            .filter(|e| e.name == *name)
            .ok_or_else(|| unknown(name))?;
        Ok((slot, e))
    }

    /// Builds the key of the current key in `ns` for an erased handle into `kbuf`.
    fn erased_key(&mut self, id: StateId, name: &StateName, ns: &dyn Any) -> Result<usize> {
        let cur = self.current.as_ref().ok_or_else(|| Error::NoCurrentKey {
            state: name.to_string(),
        })?;
        let slot = id.0 as usize;
        let e = self
            .states
            .get(slot)
            .filter(|e| e.name == *name)
            .ok_or_else(|| unknown(name))?;
        push_prefix(&mut self.kbuf, cur.kg, e.id, &cur.bytes);
        let at = self.kbuf.len();
        self.kbuf.extend_from_slice(&[0; 4]);
        e.typed.ns_bytes(name, ns, &mut self.kbuf)?;
        let len = (self.kbuf.len() - at - 4) as u32;
        self.kbuf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(slot)
    }

    /// Reads the single value of the erased key in `kbuf`; `Some((ts, value))`.
    fn erased_single(&mut self, slot: usize, for_update: bool) -> Result<Option<Vec<u8>>> {
        let e = &self.states[slot];
        let key = std::mem::take(&mut self.kbuf);
        let r = read_single(
            &mut self.db,
            &*self.clock,
            e.ttl,
            &key,
            &mut self.vbuf,
            for_update,
            &e.name,
        );
        self.kbuf = key;
        Ok(r?.then(|| self.vbuf[8..].to_vec()))
    }
}

impl<K: StateKey> KeyedStateBackend for MmapKeyedStateBackend<K> {
    type Key = K;

    fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.range
    }

    #[inline]
    fn set_current_key(&mut self, key: K) -> Result<()> {
        let mut bytes = self
            .current
            .take()
            .map(|c| c.bytes)
            .unwrap_or_else(|| Vec::with_capacity(32));
        bytes.clear();
        self.key_serializer
            .serialize(&key, &mut bytes)
            .map_err(|e| Error::Serialize {
                state: "<current key>".into(),
                what: "key",
                reason: e.0,
            })?;
        let kg = key_group_for_hash(stable_key_hash(&bytes), self.max_parallelism);
        if !self.range.contains(kg) {
            return Err(Error::KeyGroupOutOfRange {
                key_group: kg,
                range: self.range,
            });
        }
        self.current = Some(Cur { key, bytes, kg });
        // Reads alone never install a finished compaction (writes do): look now and then, so
        // a read-mostly phase does not keep searching the compaction's inputs.
        self.key_switches = self.key_switches.wrapping_add(1);
        if self.key_switches.is_multiple_of(256) {
            self.db.install_finished()?;
        }
        if !self.per_record_cleanup.is_empty() {
            let now = self.clock.now_millis();
            for i in self.per_record_cleanup.clone() {
                if let Some(inc) = self.states[i].ttl.and_then(|t| t.incremental_cleanup()) {
                    self.incremental_cleanup(i, inc.cleanup_size, now)?;
                }
            }
        }
        Ok(())
    }

    fn current_key(&self) -> Option<&K> {
        self.current.as_ref().map(|c| &c.key)
    }

    fn current_key_group(&self) -> Option<u32> {
        self.current.as_ref().map(|c| c.kg)
    }

    fn register_value<V: StateType, N: Namespace>(
        &mut self,
        d: ValueStateDescriptor<V, N>,
    ) -> Result<ValueStateHandle<V, N>> {
        let name = d.name().clone();
        let id = self.register_typed(
            &name,
            d.ttl().copied(),
            ValueT {
                ser: Arc::clone(d.value_serializer()),
                ns: Arc::clone(d.namespace_serializer()),
                default: d.default_value().cloned(),
            },
        )?;
        Ok(ValueStateHandle::new(id, name))
    }

    fn register_list<T: StateType, N: Namespace>(
        &mut self,
        d: ListStateDescriptor<T, N>,
    ) -> Result<ListStateHandle<T, N>> {
        let name = d.name().clone();
        let id = self.register_typed(
            &name,
            d.ttl().copied(),
            ListT {
                ser: Arc::clone(d.element_serializer()),
                ns: Arc::clone(d.namespace_serializer()),
            },
        )?;
        Ok(ListStateHandle::new(id, name))
    }

    fn register_map<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        d: MapStateDescriptor<UK, UV, N>,
    ) -> Result<MapStateHandle<UK, UV, N>> {
        let name = d.name().clone();
        let id = self.register_typed(
            &name,
            d.ttl().copied(),
            MapT {
                key_ser: Arc::clone(d.user_key_serializer()),
                value_ser: Arc::clone(d.user_value_serializer()),
                ns: Arc::clone(d.namespace_serializer()),
            },
        )?;
        Ok(MapStateHandle::new(id, name))
    }

    fn register_reducing<T: StateType, N: Namespace>(
        &mut self,
        d: ReducingStateDescriptor<T, N>,
    ) -> Result<ReducingStateHandle<T, N>> {
        let name = d.name().clone();
        let id = self.register_typed(
            &name,
            d.ttl().copied(),
            ReducingT {
                ser: Arc::clone(d.value_serializer()),
                ns: Arc::clone(d.namespace_serializer()),
                reduce: Arc::clone(d.reduce_fn()),
            },
        )?;
        Ok(ReducingStateHandle::new(id, name))
    }

    fn register_aggregating<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace>(
        &mut self,
        d: AggregatingStateDescriptor<IN, ACC, OUT, N>,
    ) -> Result<AggregatingStateHandle<IN, OUT, N>> {
        let name = d.name().clone();
        let id = self.register_typed(
            &name,
            d.ttl().copied(),
            AggregatingT::<IN, ACC, OUT, N> {
                ser: Arc::clone(d.accumulator_serializer()),
                ns: Arc::clone(d.namespace_serializer()),
                func: Arc::clone(d.function()),
            },
        )?;
        Ok(AggregatingStateHandle::new(id, name))
    }

    #[inline]
    fn value_get<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
    ) -> Result<Option<V>> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ValueT<V, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let found = read_single(
            &mut self.db,
            &*self.clock,
            e.ttl,
            &self.kbuf,
            &mut self.vbuf,
            false,
            &e.name,
        )?;
        if !found {
            return Ok(t.default.clone());
        }
        t.ser
            .deserialize(&self.vbuf[8..])
            .map(Some)
            .map_err(de_err(&e.name, "value"))
    }

    #[inline]
    fn value_update<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
        value: V,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ValueT<V, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        self.vbuf.clear();
        self.vbuf
            .extend_from_slice(&now_if(e.ttl, &*self.clock).to_be_bytes());
        t.ser
            .serialize(&value, &mut self.vbuf)
            .map_err(ser_err(&e.name, "value"))?;
        Ok(self.db.put(&self.kbuf, &self.vbuf)?)
    }

    fn list_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<Vec<T>>> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ListT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        self.vbuf.clear();
        if !self.db.get_merged(&self.kbuf, &mut self.vbuf)? {
            return Ok(None);
        }
        let de = de_err(&e.name, "list element");
        let enc = e.list_enc;
        let Some(ttl) = e.ttl else {
            // Sized like the last list read (lists of a state tend to be alike): one
            // allocation, without the growth path.
            let mut out = Vec::with_capacity(self.list_len_hint);
            for item in list_elements(&self.vbuf, enc, &e.name) {
                out.push(t.ser.deserialize(item?.1).map_err(&de)?);
            }
            self.list_len_hint = out.len().min(1024);
            return Ok((!out.is_empty()).then_some(out));
        };
        let items = parse_list(&self.vbuf, enc, &e.name)?;
        let now = self.clock.now_millis();
        let any_expired = items.iter().any(|(ts, _)| ttl.is_expired(*ts, now));
        let mut out = Vec::new();
        for (ts, b) in &items {
            if ttl.returns_expired() || !ttl.is_expired(*ts, now) {
                out.push(t.ser.deserialize(b).map_err(&de)?);
            }
        }
        if any_expired || ttl.refresh_on_read() {
            self.tbuf.clear();
            for (ts, b) in items.iter().filter(|(ts, _)| !ttl.is_expired(*ts, now)) {
                let ts = if ttl.refresh_on_read() { now } else { *ts };
                enc.push(&mut self.tbuf, ts, b);
            }
            if self.tbuf.is_empty() {
                self.db.delete(&self.kbuf)?;
            } else {
                self.db.put(&self.kbuf, &self.tbuf)?;
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    #[inline]
    fn list_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ListT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        self.vbuf.clear();
        let enc = e.list_enc;
        let at = enc.begin(&mut self.vbuf, now_if(e.ttl, &*self.clock));
        t.ser
            .serialize(&value, &mut self.vbuf)
            .map_err(ser_err(&e.name, "list element"))?;
        enc.end(&mut self.vbuf, at);
        Ok(self.db.merge(&self.kbuf, &self.vbuf)?)
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
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ListT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let ts = now_if(e.ttl, &*self.clock);
        encode_list(
            &*t.ser,
            &values,
            e.list_enc,
            ts,
            &mut self.tbuf,
            &mut self.ends,
            &mut self.vbuf,
            &e.name,
        )?;
        Ok(self.db.merge(&self.kbuf, &self.vbuf)?)
    }

    fn list_update<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ListT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        if values.is_empty() {
            return Ok(self.db.delete(&self.kbuf)?);
        }
        let ts = now_if(e.ttl, &*self.clock);
        encode_list(
            &*t.ser,
            &values,
            e.list_enc,
            ts,
            &mut self.tbuf,
            &mut self.ends,
            &mut self.vbuf,
            &e.name,
        )?;
        Ok(self.db.put(&self.kbuf, &self.vbuf)?)
    }

    fn map_get<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<Option<UV>> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        t.key_ser
            .serialize(user_key, &mut self.kbuf)
            .map_err(ser_err(&e.name, "map user key"))?;
        let found = read_single(
            &mut self.db,
            &*self.clock,
            e.ttl,
            &self.kbuf,
            &mut self.vbuf,
            false,
            &e.name,
        )?;
        if !found {
            return Ok(None);
        }
        t.value_ser
            .deserialize(&self.vbuf[8..])
            .map(Some)
            .map_err(de_err(&e.name, "map user value"))
    }

    fn map_put<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: UK,
        value: UV,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        t.key_ser
            .serialize(&user_key, &mut self.kbuf)
            .map_err(ser_err(&e.name, "map user key"))?;
        self.vbuf.clear();
        self.vbuf
            .extend_from_slice(&now_if(e.ttl, &*self.clock).to_be_bytes());
        t.value_ser
            .serialize(&value, &mut self.vbuf)
            .map_err(ser_err(&e.name, "map user value"))?;
        Ok(self.db.put(&self.kbuf, &self.vbuf)?)
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
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let prefix = self.kbuf.len();
        let ts = now_if(e.ttl, &*self.clock);
        for (k, v) in &entries {
            self.kbuf.truncate(prefix);
            t.key_ser
                .serialize(k, &mut self.kbuf)
                .map_err(ser_err(&e.name, "map user key"))?;
            self.vbuf.clear();
            self.vbuf.extend_from_slice(&ts.to_be_bytes());
            t.value_ser
                .serialize(v, &mut self.vbuf)
                .map_err(ser_err(&e.name, "map user value"))?;
            self.db.put(&self.kbuf, &self.vbuf)?;
        }
        Ok(())
    }

    fn map_remove<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        t.key_ser
            .serialize(user_key, &mut self.kbuf)
            .map_err(ser_err(&e.name, "map user key"))?;
        Ok(self.db.delete(&self.kbuf)?)
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
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let prefix = self.kbuf.len();
        if e.ttl.is_none() {
            // Nothing to delete or refresh: stream the entries from the engine.
            let end = end_of(&self.kbuf);
            return Ok(Box::new(crate::keys::Entries::new(
                self.db.iter(&self.kbuf, end.as_deref())?,
                prefix,
                e.name.clone(),
                Arc::clone(&t.key_ser),
                Arc::clone(&t.value_ser),
            )));
        }
        // Sized like the last map read (maps of a state tend to be alike): one allocation.
        let mut out = Vec::with_capacity(self.map_len_hint);
        let now = now_if(e.ttl, &*self.clock);
        let mut dead: Vec<Vec<u8>> = Vec::new();
        let mut refresh: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.db.scan_prefix(&self.kbuf, |k, v| -> Result<bool> {
            let ts = ts_of(v).ok_or_else(|| corrupt_value(&e.name, "map entry"))?;
            if let Some(ttl) = e.ttl {
                let expired = ttl.is_expired(ts, now);
                if expired {
                    dead.push(k.to_vec());
                    if !ttl.returns_expired() {
                        return Ok(true);
                    }
                } else if ttl.refresh_on_read() {
                    let mut nv = v.to_vec();
                    nv[..8].copy_from_slice(&now.to_be_bytes());
                    refresh.push((k.to_vec(), nv));
                }
            }
            let uk = t
                .key_ser
                .deserialize(&k[prefix..])
                .map_err(de_err(&e.name, "map user key"))?;
            let uv = t
                .value_ser
                .deserialize(&v[8..])
                .map_err(de_err(&e.name, "map user value"))?;
            out.push((uk, uv));
            Ok(true)
        })?;
        self.map_len_hint = out.len().min(1024);
        for k in dead {
            self.db.delete(&k)?;
        }
        for (k, v) in refresh {
            self.db.put(&k, &v)?;
        }
        Ok(Box::new(out.into_iter().map(Ok)))
    }

    fn map_is_empty<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<bool> {
        let (e, t, cur) = typed!(self, h.id(), h.name(), MapT<UK, UV, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let now = self.clock.now_millis();
        let mut empty = true;
        self.db.scan_prefix(&self.kbuf, |_, v| -> Result<bool> {
            let Some(ttl) = e.ttl else {
                empty = false;
                return Ok(false);
            };
            let ts = ts_of(v).ok_or_else(|| corrupt_value(&e.name, "map entry"))?;
            if ttl.returns_expired() || !ttl.is_expired(ts, now) {
                empty = false;
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(empty)
    }

    fn reducing_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<T>> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ReducingT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let found = read_single(
            &mut self.db,
            &*self.clock,
            e.ttl,
            &self.kbuf,
            &mut self.vbuf,
            false,
            &e.name,
        )?;
        if !found {
            return Ok(None);
        }
        t.ser
            .deserialize(&self.vbuf[8..])
            .map(Some)
            .map_err(de_err(&e.name, "value"))
    }

    fn reducing_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let (e, t, cur) = typed!(self, h.id(), h.name(), ReducingT<T, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        let found = read_single(
            &mut self.db,
            &*self.clock,
            e.ttl,
            &self.kbuf,
            &mut self.vbuf,
            true,
            &e.name,
        )?;
        let new = if found {
            let old = t
                .ser
                .deserialize(&self.vbuf[8..])
                .map_err(de_err(&e.name, "value"))?;
            (t.reduce)(old, value)
        } else {
            value
        };
        self.vbuf.clear();
        self.vbuf
            .extend_from_slice(&now_if(e.ttl, &*self.clock).to_be_bytes());
        t.ser
            .serialize(&new, &mut self.vbuf)
            .map_err(ser_err(&e.name, "value"))?;
        Ok(self.db.put(&self.kbuf, &self.vbuf)?)
    }

    fn aggregating_get<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
    ) -> Result<Option<OUT>> {
        self.after_access(h.id().0 as usize)?;
        let slot = self.erased_key(h.id(), h.name(), ns)?;
        let acc = self.erased_single(slot, false)?;
        let e = &self.states[slot];
        let mut out: Option<OUT> = None;
        e.typed
            .aggregate_result(&e.name, acc.as_deref(), &mut out)?;
        Ok(out)
    }

    fn aggregating_add<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
        value: IN,
    ) -> Result<()> {
        self.after_access(h.id().0 as usize)?;
        let slot = self.erased_key(h.id(), h.name(), ns)?;
        let acc = self.erased_single(slot, true)?;
        let e = &self.states[slot];
        self.vbuf.clear();
        self.vbuf
            .extend_from_slice(&now_if(e.ttl, &*self.clock).to_be_bytes());
        let mut value = Some(value);
        e.typed
            .aggregate_add(&e.name, acc.as_deref(), &mut value, &mut self.vbuf)?;
        Ok(self.db.put(&self.kbuf, &self.vbuf)?)
    }

    fn clear<N: Namespace>(&mut self, h: &dyn StateHandle<N>, ns: &N) -> Result<()> {
        let name = h.state_name().clone();
        let slot = self.erased_key(h.state_id(), &name, ns)?;
        if self.states[slot].kind == StateKind::Map {
            let mut keys: Vec<Vec<u8>> = Vec::new();
            self.db.scan_prefix(&self.kbuf, |k, _| -> Result<bool> {
                keys.push(k.to_vec());
                Ok(true)
            })?;
            for k in keys {
                self.db.delete(&k)?;
            }
            return Ok(());
        }
        Ok(self.db.delete(&self.kbuf)?)
    }

    fn merge_namespaces<N: Namespace>(
        &mut self,
        h: &dyn MergeableHandle<N>,
        target: &N,
        sources: &[N],
    ) -> Result<()> {
        let name = h.state_name().clone();
        let (slot, e) = self.erased(h.state_id(), &name)?;
        let (kind, ttl) = (e.kind, e.ttl);
        if !kind.is_mergeable() {
            return Err(Error::Unsupported {
                state: name.to_string(),
                reason: format!("{kind} state cannot merge namespaces"),
            });
        }
        let now = self.clock.now_millis();
        let expired = |ts: i64| ttl.is_some_and(|t| t.is_expired(ts, now));
        self.erased_key(h.state_id(), &name, target)?;
        let target_key = self.kbuf.clone();
        let mut acc: Option<Vec<u8>> = None;
        for ns in sources {
            self.erased_key(h.state_id(), &name, ns)?;
            if self.kbuf == target_key {
                continue;
            }
            let key = self.kbuf.clone();
            self.vbuf.clear();
            if !self.db.get(&key, &mut self.vbuf)? {
                continue;
            }
            self.db.delete(&key)?;
            acc = self.fold(slot, kind, acc, &expired)?;
        }
        let Some(merged) = acc else { return Ok(()) };
        self.vbuf.clear();
        let merged = if self.db.get(&target_key, &mut self.vbuf)? {
            match self.fold(slot, kind, None, &expired)? {
                Some(t) => self.fold_pair(slot, kind, t, merged)?,
                None => merged,
            }
        } else {
            merged
        };
        let out = if kind == StateKind::List {
            merged
        } else {
            let mut out = now_if(ttl, &*self.clock).to_be_bytes().to_vec();
            out.extend_from_slice(&merged);
            out
        };
        Ok(self.db.put(&target_key, &out)?)
    }

    fn keys<'a, N: Namespace>(
        &'a mut self,
        h: &dyn StateHandle<N>,
        ns: &N,
    ) -> Result<KeyIter<'a, K>> {
        let name = h.state_name().clone();
        let (_, e) = self.erased(h.state_id(), &name)?;
        let id = e.id;
        let mut ns_bytes = Vec::new();
        e.typed.ns_bytes(&name, ns, &mut ns_bytes)?;
        Ok(Box::new(crate::keys::Keys::new(
            self.db.snapshot(),
            self.range.iter(),
            id,
            ns_bytes,
            name,
            Arc::clone(&self.key_serializer),
        )))
    }

    fn register_timer_service<N: Namespace>(
        &mut self,
        d: TimerServiceDescriptor<N>,
    ) -> Result<TimerServiceHandle<N>> {
        let name = d.name().clone();
        let known = self.ids.contains_key(&name);
        let id = self.register_typed(
            &name,
            None,
            TimerT {
                ns: Arc::clone(d.namespace_serializer()),
                meta: d.meta(),
            },
        )?;
        let slot = id.0 as usize;
        if !known {
            self.load_timers(slot)?;
        }
        Ok(TimerServiceHandle::new(id, name))
    }

    #[inline]
    fn register_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        let kg = self.timer_key(h, domain, ns, timestamp)?;
        self.timers
            .get_mut(&(h.id().0 as usize))
            .ok_or_else(|| unknown(h.name()))?
            .note(kg, domain, timestamp);
        // The key is the whole timer: putting it again changes nothing (dedup without a read).
        Ok(self.db.put(&self.kbuf, &[])?)
    }

    fn delete_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        self.timer_key(h, domain, ns, timestamp)?;
        // A blind tombstone; the due-time lower bound stays valid (it may only be early).
        Ok(self.db.delete(&self.kbuf)?)
    }

    fn advance_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Vec<Timer<K, N>>> {
        let slot = h.id().0 as usize;
        let e = self
            .states
            .get(slot)
            .filter(|e| e.name == *h.name())
            .ok_or_else(|| unknown(h.name()))?;
        let t = e
            .typed
            .as_any()
            .downcast_ref::<TimerT<N>>()
            .ok_or_else(|| type_mismatch(h.name()))?;
        let index = self.timers.get(&slot).ok_or_else(|| unknown(h.name()))?;
        let (due, updates) = index.collect_due(&self.db, e.id, domain, time, h.name())?;
        // Decode everything first: on a decoding error nothing is deleted or marked fired.
        let de = |what, e: SerdeError| Error::Deserialize {
            state: h.name().to_string(),
            what,
            reason: e.0,
        };
        let mut fired = Vec::with_capacity(due.len());
        for d in &due {
            fired.push(Timer {
                key: self
                    .key_serializer
                    .deserialize(d.key())
                    .map_err(|e| de("timer key", e))?,
                namespace: t
                    .ns
                    .deserialize(d.ns())
                    .map_err(|e| de("timer namespace", e))?,
                timestamp: d.ts,
                domain,
            });
        }
        for d in &due {
            self.db.delete(&d.raw)?;
        }
        if let Some(index) = self.timers.get_mut(&slot) {
            index.apply(domain, &updates);
        }
        Ok(fired)
    }

    fn snapshot(&mut self) -> Result<Box<dyn KeyedStateSnapshot>> {
        Ok(Box::new(self.snapshot_mmap()?))
    }

    fn restore<R: Read>(&mut self, streams: Vec<(String, R)>) -> Result<()> {
        let existing: Vec<(StateName, Pending)> = self
            .pending
            .iter()
            .flat_map(|(n, ps)| ps.iter().map(move |p| (n.clone(), p.clone())))
            .collect();
        let mut sink = RestoreSink {
            db: &mut self.db,
            next_id: &mut self.next_id,
            existing,
            added: Vec::new(),
            current: Vec::new(),
            kbuf: Vec::new(),
            vbuf: Vec::new(),
        };
        restore_streams(streams, self.max_parallelism, self.range, &mut sink)?;
        let added = std::mem::take(&mut sink.added);
        for (name, p) in added {
            self.pending.entry(name).or_default().push(p);
        }
        // States registered already take their data now.
        let names: Vec<StateName> = self
            .pending
            .keys()
            .filter(|n| self.ids.contains_key(*n))
            .cloned()
            .collect();
        for name in names {
            let slot = self.ids[&name];
            let groups = self.pending.get(&name).cloned().unwrap_or_default();
            let mut entry = std::mem::replace(&mut self.states[slot], placeholder_entry(&name));
            let r = self.bind(&mut entry, &groups, false);
            let timers = entry.kind == StateKind::Timers;
            self.states[slot] = entry;
            r?;
            self.pending.remove(&name);
            if timers {
                self.load_timers(slot)?;
            }
        }
        self.save_registry();
        Ok(())
    }
}

fn placeholder_entry(name: &StateName) -> StateEntry {
    StateEntry {
        name: name.clone(),
        id: 0,
        kind: StateKind::Value,
        ttl: None,
        typed: Box::new(ValueT::<(), ()> {
            ser: Arc::new(PostcardSerializer::<()>::new()),
            ns: Arc::new(PostcardSerializer::<()>::new()),
            default: None,
        }),
        cleanup_pos: None,
        list_enc: ListEncoding::Stamped,
    }
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
    /// Folds the stored value in `vbuf` into `acc` (merging namespaces); expired parts are
    /// dropped.
    fn fold(
        &mut self,
        slot: usize,
        kind: StateKind,
        acc: Option<Vec<u8>>,
        expired: &dyn Fn(i64) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let e = &self.states[slot];
        if kind == StateKind::List {
            let mut live = Vec::new();
            let enc = e.list_enc;
            for item in list_elements(&self.vbuf, enc, &e.name) {
                let (ts, b) = item?;
                if !expired(ts) {
                    enc.push(&mut live, ts, b);
                }
            }
            if live.is_empty() {
                return Ok(acc);
            }
            return Ok(Some(match acc {
                Some(mut a) => {
                    a.extend_from_slice(&live);
                    a
                }
                None => live,
            }));
        }
        let ts = ts_of(&self.vbuf).ok_or_else(|| corrupt_value(&e.name, "value"))?;
        if expired(ts) {
            return Ok(acc);
        }
        let v = self.vbuf[8..].to_vec();
        match acc {
            None => Ok(Some(v)),
            Some(a) => self.fold_pair(slot, kind, a, v).map(Some),
        }
    }

    /// (Re)reads the earliest due times of the timer service at `slot` from the engine.
    fn load_timers(&mut self, slot: usize) -> Result<()> {
        let (sid, name) = (self.states[slot].id, self.states[slot].name.clone());
        let index = DueIndex::load(&self.db, self.range, sid, &name)?;
        self.timers.insert(slot, index);
        Ok(())
    }

    /// Builds the engine key of a timer of the current key into `kbuf`; returns the key group.
    #[inline]
    fn timer_key<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<u32> {
        let (e, t, cur) = typed!(self, h.id(), h.name(), TimerT<N>);
        let at =
            timers::begin_timer_key(&mut self.kbuf, cur.kg, e.id, domain, timestamp, &cur.bytes);
        t.ns.serialize(ns, &mut self.kbuf)
            .map_err(ser_err(&e.name, "namespace"))?;
        timers::end_timer_key(&mut self.kbuf, at);
        Ok(cur.kg)
    }

    /// Bytes the timer services hold in memory: per service and owned key group, a lower bound
    /// of the earliest due time of each domain (32 bytes). It does not grow with the number of
    /// timers, which live in the engine (write buffer, then sorted runs on disk).
    pub fn timer_memory_bytes(&self) -> usize {
        self.timers.values().map(DueIndex::heap_bytes).sum()
    }

    /// Rewrites every timer of service id `from` under `to` (namespaces through `t` when given).
    fn copy_timers(
        &mut self,
        from: u16,
        to: u16,
        t: Option<&dyn Transcoder>,
        name: &StateName,
    ) -> Result<()> {
        let mut nk = Vec::new();
        let mut ns = Vec::new();
        self.for_each_stored(from, |db, k, _| {
            let p = timers::parse_timer_key(k, name)?;
            ns.clear();
            match t {
                Some(t) => t.ns(p.ns, &mut ns)?,
                None => ns.extend_from_slice(p.ns),
            }
            timers::timer_key(&mut nk, p.kg, to, p.domain, p.ts, p.key, &ns);
            // Deleted first, as in `copy_state`: a rewrite in place keeps the timer.
            db.delete(k)?;
            db.put(&nk, &[])?;
            Ok(())
        })
    }

    fn fold_pair(&self, slot: usize, kind: StateKind, a: Vec<u8>, b: Vec<u8>) -> Result<Vec<u8>> {
        if kind == StateKind::List {
            let mut a = a;
            a.extend_from_slice(&b);
            return Ok(a);
        }
        let e = &self.states[slot];
        let mut out = Vec::new();
        e.typed.merge_values(&e.name, &a, &b, &mut out)?;
        Ok(out)
    }

    /// Like [`KeyedStateBackend::snapshot`], with the concrete type.
    pub fn snapshot_mmap(&mut self) -> Result<MmapSnapshot> {
        let view = self.db.snapshot_detached()?;
        let mut ids = HashMap::new();
        let mut states = Vec::new();
        for (i, s) in self.states.iter().enumerate() {
            ids.insert(
                s.id,
                (
                    i as u32,
                    s.kind,
                    s.ttl.filter(|t| t.is_cleanup_full_snapshot()),
                    s.list_enc,
                ),
            );
            states.push(s.typed.meta(&s.name, s.ttl.as_ref()));
        }
        // Restored states not registered yet are carried over unchanged (one group per name:
        // the stream has one description per state, and keys of the current serializer).
        let key_ser = self.key_serializer.snapshot();
        let mut pending: Vec<(&StateName, &Vec<Pending>)> = self.pending.iter().collect();
        pending.sort_by(|a, b| a.0.cmp(b.0));
        for (_, groups) in pending {
            if let Some(g) = groups.iter().find(|g| g.key_ser == key_ser) {
                ids.insert(g.id, (states.len() as u32, g.meta.kind, None, g.list_enc));
                states.push(g.meta.clone());
            }
        }
        Ok(MmapSnapshot {
            header: SnapshotHeader {
                max_parallelism: self.max_parallelism,
                key_group_range: self.range,
                key_serializer: key_ser,
                states,
            },
            view,
            ids,
            now: self.clock.now_millis(),
        })
    }
}

/// A consistent view of an mmap backend's state, taken by [`KeyedStateBackend::snapshot`]: the
/// write buffers and sorted runs of that moment, held by reference (files stay on disk while
/// the view lives).
pub struct MmapSnapshot {
    header: SnapshotHeader,
    view: DbSnapshot,
    /// Per state id: its index in the header, kind, TTL to apply and list encoding.
    ids: HashMap<u16, (u32, StateKind, Option<StateTtlConfig>, ListEncoding)>,
    now: i64,
}

impl fmt::Debug for MmapSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapSnapshot")
            .field("range", &self.header.key_group_range)
            .field("states", &self.header.states.len())
            .finish()
    }
}

impl KeyedStateSnapshot for MmapSnapshot {
    fn write_to(&self, out: &mut dyn Write) -> Result<SnapshotSummary> {
        let mut w = SnapshotWriter::new(out, &self.header)?;
        let mut payload = Vec::new();
        // A map being gathered: (state index, key, ns, ttl) and its entries.
        let mut map: Option<(u32, Vec<u8>, Vec<u8>, usize)> = None;
        let mut map_count = 0u32;
        let mut map_body = Vec::new();
        let flush_map = |w: &mut SnapshotWriter<&mut dyn Write>,
                         map: &mut Option<(u32, Vec<u8>, Vec<u8>, usize)>,
                         count: &mut u32,
                         body: &mut Vec<u8>|
         -> Result<()> {
            if let Some((idx, key, ns, _)) = map.take() {
                if *count > 0 {
                    let mut p = Vec::with_capacity(body.len() + 4);
                    payload::count(&mut p, *count);
                    p.extend_from_slice(body);
                    w.write_record(idx, &key, &ns, &p)?;
                }
            }
            *count = 0;
            body.clear();
            Ok(())
        };
        for kg in self.header.key_group_range.iter() {
            w.begin_key_group(kg)?;
            let start = kg_prefix(kg);
            let end = kg_prefix(kg + 1);
            let mut it = self.view.iter(&start, Some(&end))?;
            while let Some((k, v)) = it.next()? {
                // The state id decides the key layout (timers have their own).
                let id = match k.get(2..4) {
                    Some(b) => u16::from_be_bytes([b[0], b[1]]),
                    None => {
                        parse_key(k, "snapshot")?; // names the malformed key
                        continue;
                    }
                };
                let Some(&(idx, kind, ttl, enc)) = self.ids.get(&id) else {
                    continue;
                };
                let name = &self.header.states[idx as usize].name;
                if kind == StateKind::Timers {
                    flush_map(&mut w, &mut map, &mut map_count, &mut map_body)?;
                    let t = timers::parse_timer_key(k, name)?;
                    let payload = state_api::timer::encode_timer_payload(t.ts, t.domain);
                    w.write_record(idx, t.key, t.ns, &payload)?;
                    continue;
                }
                let p = parse_key(k, "snapshot")?;
                let expired = |ts: i64| ttl.is_some_and(|t| t.is_expired(ts, self.now));
                match kind {
                    StateKind::Map => {
                        let same = map
                            .as_ref()
                            .is_some_and(|(i, key, ns, _)| *i == idx && key == p.key && ns == p.ns);
                        if !same {
                            flush_map(&mut w, &mut map, &mut map_count, &mut map_body)?;
                            map = Some((idx, p.key.to_vec(), p.ns.to_vec(), p.prefix_len));
                        }
                        let ts = ts_of(v).ok_or_else(|| corrupt_value(name, "map entry"))?;
                        if expired(ts) {
                            continue;
                        }
                        payload::map_entry::<Error>(
                            &mut map_body,
                            ts,
                            |o| {
                                o.extend_from_slice(p.user_key);
                                Ok(())
                            },
                            |o| {
                                o.extend_from_slice(&v[8..]);
                                Ok(())
                            },
                        )?;
                        map_count += 1;
                    }
                    StateKind::List => {
                        flush_map(&mut w, &mut map, &mut map_count, &mut map_body)?;
                        // Compact lists have no timestamps: their elements are written with 0,
                        // as a state without TTL writes them (the canonical format is the same).
                        let items = parse_list(v, enc, name)?;
                        let live: Vec<_> = items.iter().filter(|(ts, _)| !expired(*ts)).collect();
                        if live.is_empty() {
                            continue;
                        }
                        payload.clear();
                        payload::count(&mut payload, live.len() as u32);
                        for (ts, b) in live {
                            payload::list_element::<Error>(&mut payload, *ts, |o| {
                                o.extend_from_slice(b);
                                Ok(())
                            })?;
                        }
                        w.write_record(idx, p.key, p.ns, &payload)?;
                    }
                    _ => {
                        flush_map(&mut w, &mut map, &mut map_count, &mut map_body)?;
                        let ts = ts_of(v).ok_or_else(|| corrupt_value(name, "value"))?;
                        if expired(ts) {
                            continue;
                        }
                        w.write_record(idx, p.key, p.ns, v)?;
                    }
                }
            }
            flush_map(&mut w, &mut map, &mut map_count, &mut map_body)?;
        }
        Ok(w.finish()?.0)
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.header.key_group_range
    }
}

/// Writes restored records into the engine under pending state ids.
struct RestoreSink<'a> {
    db: &'a mut Db,
    next_id: &'a mut u32,
    existing: Vec<(StateName, Pending)>,
    added: Vec<(StateName, Pending)>,
    /// Per state index of the current stream: its pending id and list encoding.
    current: Vec<(u16, ListEncoding)>,
    kbuf: Vec<u8>,
    vbuf: Vec<u8>,
}

impl RestoreVisitor for RestoreSink<'_> {
    fn on_header(&mut self, _stream: &str, header: &SnapshotHeader) -> Result<()> {
        self.current.clear();
        for meta in &header.states {
            let same = |(n, p): &&(StateName, Pending)| {
                *n == meta.name && p.meta == *meta && p.key_ser == header.key_serializer
            };
            let id = match self
                .existing
                .iter()
                .find(same)
                .or_else(|| self.added.iter().find(same))
            {
                Some((_, p)) => (p.id, p.list_enc),
                None => {
                    let id = u16::try_from(*self.next_id).map_err(|_| Error::Unsupported {
                        state: meta.name.to_string(),
                        reason: "more than 65536 states in one backend".into(),
                    })?;
                    *self.next_id += 1;
                    // Restored lists are stored like a new state of this TTL setting stores them.
                    let list_enc = ListEncoding::for_state(meta.kind, meta.ttl_millis.is_some());
                    self.added.push((
                        meta.name.clone(),
                        Pending {
                            id,
                            meta: meta.clone(),
                            key_ser: header.key_serializer.clone(),
                            list_enc,
                        },
                    ));
                    (id, list_enc)
                }
            };
            self.current.push(id);
        }
        Ok(())
    }

    fn on_record(
        &mut self,
        stream: &str,
        state: &StateMeta,
        key_group: u32,
        r: RawRecord<'_>,
    ) -> Result<()> {
        let Some(&(id, enc)) = self.current.get(r.state_index as usize) else {
            return Ok(());
        };
        push_prefix(&mut self.kbuf, key_group, id, r.key);
        self.kbuf
            .extend_from_slice(&(r.namespace.len() as u32).to_be_bytes());
        self.kbuf.extend_from_slice(r.namespace);
        let mut d = Decoder::new(r.payload, r.payload_offset, stream);
        match state.kind {
            StateKind::List => {
                self.vbuf.clear();
                for (ts, b) in payload::decode_list(&mut d)? {
                    enc.push(&mut self.vbuf, ts, b);
                }
                self.db.put(&self.kbuf, &self.vbuf)?;
            }
            StateKind::Map => {
                let prefix = self.kbuf.len();
                for (ts, k, v) in payload::decode_map(&mut d)? {
                    self.kbuf.truncate(prefix);
                    self.kbuf.extend_from_slice(k);
                    self.vbuf.clear();
                    self.vbuf.extend_from_slice(&ts.to_be_bytes());
                    self.vbuf.extend_from_slice(v);
                    self.db.put(&self.kbuf, &self.vbuf)?;
                }
            }
            StateKind::Timers => {
                let (ts, domain) = state_api::timer::decode_timer_payload(&mut d)?;
                timers::timer_key(
                    &mut self.kbuf,
                    key_group,
                    id,
                    domain,
                    ts,
                    r.key,
                    r.namespace,
                );
                self.db.put(&self.kbuf, &[])?;
            }
            _ => {
                payload::decode_single(&mut d)?;
                self.db.put(&self.kbuf, r.payload)?;
            }
        }
        Ok(())
    }
}

const REGISTRY_MAGIC: [u8; 4] = *b"FLRG";
/// Version 3: every entry records its list encoding (compact lists without TTL). Version 2:
/// timers are stored in due-time order (module `timers`). Versions 1 and 2 are still read (their
/// lists are stamped); version-1 timers are rewritten when the store is opened.
const REGISTRY_VERSION: u8 = 3;

/// One state of the registry.
pub(crate) struct RegistryEntry {
    pub id: u16,
    pub pending: bool,
    pub meta: StateMeta,
    pub key_ser: SerializerSnapshot,
    pub list_enc: ListEncoding,
}

/// Encodes the state registry: per state its id, whether it is pending, its list encoding and a
/// one-state canonical snapshot header holding its metadata and key serializer.
pub(crate) fn encode_registry(
    max_parallelism: u32,
    range: KeyGroupRange,
    groups: &[RegistryEntry],
) -> Result<Vec<u8>> {
    let mut out = REGISTRY_MAGIC.to_vec();
    out.push(REGISTRY_VERSION);
    out.extend_from_slice(&(groups.len() as u32).to_be_bytes());
    for g in groups {
        let header = SnapshotHeader {
            max_parallelism,
            key_group_range: range,
            key_serializer: g.key_ser.clone(),
            states: vec![g.meta.clone()],
        };
        let (_, stream) = SnapshotWriter::new(Vec::new(), &header)?.finish()?;
        out.extend_from_slice(&g.id.to_be_bytes());
        out.push(u8::from(g.pending));
        out.push(g.list_enc.code());
        out.extend_from_slice(&(stream.len() as u32).to_be_bytes());
        out.extend_from_slice(&stream);
    }
    Ok(out)
}

/// Decodes a registry (version 1 to 3) into `(max parallelism, [(name, group)])`; every entry
/// comes back as pending (registration binds it again).
pub(crate) fn decode_registry(b: &[u8], dir: &Path) -> Result<(u32, Vec<(StateName, Pending)>)> {
    let what = format!("state registry in {}", dir.display());
    let bad = |off: usize, reason: &str| Error::Corrupt {
        stream: what.clone(),
        offset: off as u64,
        reason: reason.to_string(),
    };
    if b.len() < 9 || b[..4] != REGISTRY_MAGIC {
        return Err(bad(0, "bad magic"));
    }
    let version = b[4];
    if !(1..=REGISTRY_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            stream: what,
            found: u16::from(version),
            supported: u16::from(REGISTRY_VERSION),
        });
    }
    // `id u16 | pending u8 [| list encoding u8 (version 3)] | stream_len u32`
    let head = if version >= 3 { 8 } else { 7 };
    let n = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize;
    let mut p = 9;
    let mut out = Vec::new();
    let mut max_parallelism = 0;
    for _ in 0..n {
        let h = b.get(p..p + head).ok_or_else(|| bad(p, "truncated"))?;
        let id = u16::from_be_bytes([h[0], h[1]]);
        let list_enc = if version >= 3 {
            ListEncoding::from_code(h[3])
                .ok_or_else(|| bad(p + 3, &format!("unknown list encoding {}", h[3])))?
        } else {
            ListEncoding::Stamped
        };
        let l = &h[head - 4..];
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        let s = b
            .get(p + head..p + head + len)
            .ok_or_else(|| bad(p, "truncated"))?;
        let r = SnapshotReader::open(s, what.clone())?;
        let header = r.header();
        max_parallelism = header.max_parallelism;
        let meta = header
            .states
            .first()
            .cloned()
            .ok_or_else(|| bad(p, "entry without a state"))?;
        out.push((
            meta.name.clone(),
            Pending {
                id,
                meta,
                key_ser: header.key_serializer.clone(),
                list_enc,
            },
        ));
        p += head + len;
    }
    Ok((max_parallelism, out))
}
