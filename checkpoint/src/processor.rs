//! The State Processor: read, write and transform the state of **any** job's checkpoint or
//! savepoint offline, in the spirit of Flink's State Processor API.
//!
//! Everything is driven by what the checkpoint records about itself — its `_metadata` and the
//! serializer snapshots in each keyed stream's header — never by knowledge of one job:
//!
//! - [`SavepointReader`] opens a checkpoint or savepoint and lists its operators and states
//!   ([`SavepointReader::operators`]: kind, serializers, TTL; [`SavepointReader::state_stats`]:
//!   entries and bytes per key group). It reads a keyed state as raw records
//!   ([`SavepointReader::raw_entries`]) or, given the serializers, as typed iterators
//!   ([`SavepointReader::read_value`], [`SavepointReader::read_list`],
//!   [`SavepointReader::read_map`], ...). Serializers are checked against the recorded
//!   snapshots first: a wrong one is an [`Error::IncompatibleSerializer`] naming the state.
//! - [`SavepointWriter`] writes a new savepoint from typed data (bootstrap:
//!   [`SavepointWriter::write_value`], [`SavepointWriter::write_list`],
//!   [`SavepointWriter::write_map`], ...) or from an existing one
//!   ([`SavepointWriter::from_reader`]) after changes (transform:
//!   [`SavepointWriter::map_values`], [`SavepointWriter::remove_state`],
//!   [`SavepointWriter::set_parallelism`], ...), at any parallelism. What it writes is the
//!   canonical savepoint format, which every backend restores.
//!
//! Native (backend-specific) checkpoint state, such as the mmap backend's files, is read after
//! converting it through a backend of that kind ([`SavepointReader::convert_native`]); the
//! [`RawSerializer`] keeps the job's key serializer snapshot unchanged on the way.
//!
//! The writer holds the state it writes in memory (grouped by key group); the reader streams
//! one key-group block at a time.
//!
//! ```
//! use std::sync::Arc;
//! use checkpoint::processor::{SavepointReader, SavepointWriter};
//! use checkpoint::CheckpointStorage;
//! use state_api::{PostcardSerializer, ValueStateDescriptor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(object_store::memory::InMemory::new());
//! let storage = CheckpointStorage::new(store, "savepoints-root", "clicks")?;
//! let counts = ValueStateDescriptor::<u64>::new("count")?;
//! let keys = PostcardSerializer::<String>::new();
//!
//! // Bootstrap: a savepoint of operator "counts" at parallelism 2 from plain data.
//! let mut writer = SavepointWriter::new();
//! writer.add_operator("counts", 128, 2)?;
//! writer.write_value("counts", &keys, &counts, [("ann".to_string(), (), 3u64)])?;
//! let written = writer.write(&storage, "bootstrap-1")?;
//!
//! // Read it back, typed.
//! let reader = SavepointReader::open(&storage, &written.path)?;
//! let entries: Vec<_> = reader
//!     .read_value("counts", PostcardSerializer::<String>::new(), &counts)?
//!     .collect::<Result<_, _>>()?;
//! assert_eq!(entries[0].key, "ann");
//! assert_eq!(entries[0].value, 3);
//! # Ok(()) }
//! ```

pub mod builtin;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use state_api::checkpointing::CheckpointableBackend;
use state_api::snapshot::{payload, Decoder, SnapshotReader, SnapshotWriter};
use state_api::{
    assign_to_key_group, redistribute, resolve_reader, AggregatingStateDescriptor, KeyGroupRange,
    KeyedStateSnapshot, ListStateDescriptor, MapKey, MapStateDescriptor, Namespace,
    OperatorStateStore, ReducingStateDescriptor, ResolvedReader, SerdeError, SerializerRole,
    SerializerSnapshot, SnapshotHeader, SnapshotSummary, StateKind, StateMeta, StateSerializer,
    StateType, ValueStateDescriptor,
};

use crate::complete::{assemble_operators, commit_savepoint, SubtaskAck};
use crate::error::{Error, Result};
use crate::format::NativeKeyedHandle;
use crate::inspect::KeyedFormat;
use crate::restore::CompletedCheckpoint;
use crate::storage::CheckpointStorage;
use crate::write::{write_subtask_snapshot, KeyedSnapshot, SnapshotTarget, SubtaskSnapshot};

/// What a checkpoint records about one operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorInfo {
    /// The operator's stable id.
    pub operator_id: String,
    /// Its parallelism when the checkpoint was taken.
    pub parallelism: u32,
    /// Its max parallelism (number of key groups).
    pub max_parallelism: u32,
    /// How its keyed state is stored.
    pub format: KeyedFormat,
    /// The serializer of its keys (`None` without readable keyed state).
    pub key_serializer: Option<SerializerSnapshot>,
    /// Its keyed states (empty for native state not yet converted, see
    /// [`SavepointReader::convert_native`]).
    pub states: Vec<StateMeta>,
    /// Names of its operator (non-keyed) states, over all subtasks.
    pub operator_states: Vec<String>,
}

impl OperatorInfo {
    /// The keyed state named `name`.
    pub fn state(&self, name: &str) -> Option<&StateMeta> {
        self.states.iter().find(|s| s.name.as_str() == name)
    }
}

/// Entries and bytes of one state in one key group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyGroupStats {
    /// Records: one per (key, namespace) (for timers: one per timer).
    pub entries: u64,
    /// Bytes of those records in the canonical format (key, namespace, payload and their
    /// 16 bytes of framing).
    pub bytes: u64,
}

/// Entries and bytes of one keyed state, per key group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateStats {
    /// The state.
    pub meta: StateMeta,
    /// Key groups that hold any of its entries, in order.
    pub key_groups: BTreeMap<u32, KeyGroupStats>,
}

impl StateStats {
    /// Entries over all key groups.
    pub fn entries(&self) -> u64 {
        self.key_groups.values().map(|k| k.entries).sum()
    }

    /// Bytes over all key groups.
    pub fn bytes(&self) -> u64 {
        self.key_groups.values().map(|k| k.bytes).sum()
    }
}

/// One stored record of a keyed state, undecoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    /// The state it belongs to (name, kind, TTL, serializer snapshots).
    pub state: Arc<StateMeta>,
    /// Its key group.
    pub key_group: u32,
    /// The serialized key.
    pub key: Vec<u8>,
    /// The serialized namespace.
    pub namespace: Vec<u8>,
    /// The kind-specific payload (see [`state_api::snapshot::payload`]).
    pub payload: Vec<u8>,
}

/// A value, reducing or aggregating state's entry (for aggregating state, the accumulator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueEntry<K, N, V> {
    /// The key.
    pub key: K,
    /// The namespace.
    pub namespace: N,
    /// The value.
    pub value: V,
    /// The TTL timestamp (last access, milliseconds; 0 for states without TTL).
    pub timestamp: i64,
}

/// A list state's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry<K, N, T> {
    /// The key.
    pub key: K,
    /// The namespace.
    pub namespace: N,
    /// The elements, in order.
    pub elements: Vec<T>,
}

/// A map state's entry: the whole map of one (key, namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry<K, N, UK, UV> {
    /// The key.
    pub key: K,
    /// The namespace.
    pub namespace: N,
    /// The map's entries, in stored order.
    pub entries: Vec<(UK, UV)>,
}

/// A serializer of raw bytes that reports a given serializer snapshot: moves bytes written by
/// any serializer through a backend unchanged, keeping their recorded serializer (used to turn
/// native state into canonical streams, [`SavepointReader::convert_native`]).
#[derive(Clone, Debug)]
pub struct RawSerializer(pub SerializerSnapshot);

impl StateSerializer<Vec<u8>> for RawSerializer {
    fn serialize(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> std::result::Result<(), SerdeError> {
        out.extend_from_slice(value);
        Ok(())
    }

    fn deserialize(&self, bytes: &[u8]) -> std::result::Result<Vec<u8>, SerdeError> {
        Ok(bytes.to_vec())
    }

    fn snapshot(&self) -> SerializerSnapshot {
        self.0.clone()
    }
}

/// A canonical stream source: its name, the reader, the old subtask, and where a storage
/// failure while streaming is kept.
struct Source {
    name: String,
    subtask: u32,
    reader: Box<dyn Read + Send>,
    failure: Option<Arc<Mutex<Option<Error>>>>,
}

/// A checkpoint or savepoint opened for reading its state (see the module docs).
#[derive(Debug)]
pub struct SavepointReader {
    storage: CheckpointStorage,
    checkpoint: CompletedCheckpoint,
    /// Native state turned into canonical streams, per operator: (old subtask, stream).
    converted: HashMap<String, Vec<(u32, Arc<Vec<u8>>)>>,
}

impl SavepointReader {
    /// Opens the checkpoint or savepoint at `path` (its directory or `_metadata`).
    pub fn open(storage: &CheckpointStorage, path: &Path) -> Result<Self> {
        let checkpoint = CompletedCheckpoint::load(storage, path)?;
        Ok(Self::from_checkpoint(storage, checkpoint))
    }

    /// Reads a checkpoint already loaded.
    pub fn from_checkpoint(storage: &CheckpointStorage, checkpoint: CompletedCheckpoint) -> Self {
        SavepointReader {
            storage: storage.clone(),
            checkpoint,
            converted: HashMap::new(),
        }
    }

    /// The checkpoint read.
    pub fn checkpoint(&self) -> &CompletedCheckpoint {
        &self.checkpoint
    }

    /// The storage it is read from.
    pub fn storage(&self) -> &CheckpointStorage {
        &self.storage
    }

    /// True when some subtask of `operator` holds native (backend-specific) state that was not
    /// converted yet.
    pub fn has_native_state(&self, operator: &str) -> bool {
        !self.converted.contains_key(operator) && self.checkpoint.has_native_state(operator)
    }

    /// Turns the native state of every operator that has some into canonical streams: for
    /// each old subtask, `make(operator id, max parallelism, handle)` builds a fresh backend of
    /// the kind that wrote it for the handle's key groups (the handle's manifest, in the
    /// backend's format, names the key serializer: give the backend a [`RawSerializer`] of it
    /// when the key type is not known), the state is restored into it
    /// ([`CompletedCheckpoint::restore_backend`], files under `download_dir`) and snapshotted.
    /// The streams are kept in memory. Returns the operators converted.
    pub fn convert_native<B, F>(
        &mut self,
        mut make: F,
        download_dir: &std::path::Path,
    ) -> Result<Vec<String>>
    where
        B: CheckpointableBackend,
        F: FnMut(&str, u32, &NativeKeyedHandle) -> Result<B>,
    {
        let mut done = Vec::new();
        for op in &self.checkpoint.metadata.operators {
            if !op.has_native_state() || self.converted.contains_key(&op.operator_id) {
                continue;
            }
            let mut streams = Vec::new();
            for st in &op.subtasks {
                let Some(n) = &st.native else { continue };
                let mut backend = make(&op.operator_id, op.max_parallelism, n)?;
                self.checkpoint.restore_backend(
                    &self.storage,
                    &op.operator_id,
                    st.subtask,
                    &mut backend,
                    download_dir,
                )?;
                let snapshot = backend
                    .snapshot()
                    .map_err(|e| Error::state(&op.operator_id, st.subtask, e))?;
                let mut bytes = Vec::new();
                snapshot
                    .write_to(&mut bytes)
                    .map_err(|e| Error::state(&op.operator_id, st.subtask, e))?;
                streams.push((st.subtask, Arc::new(bytes)));
            }
            tracing::info!(
                checkpoint = %self.checkpoint.location(),
                operator = %op.operator_id,
                subtasks = streams.len(),
                "converted native state into canonical streams"
            );
            self.converted.insert(op.operator_id.clone(), streams);
            done.push(op.operator_id.clone());
        }
        Ok(done)
    }

    /// The operators of the checkpoint with their states (from the stream headers recorded in
    /// the metadata, or of the converted native state).
    pub fn operators(&self) -> Result<Vec<OperatorInfo>> {
        let mut out = Vec::new();
        for op in &self.checkpoint.metadata.operators {
            let native = op.subtasks.iter().find_map(|s| s.native.as_ref());
            let format = if let Some(n) = native {
                KeyedFormat::Native(n.backend.clone())
            } else if op.subtasks.iter().any(|s| s.keyed.is_some()) {
                KeyedFormat::Canonical
            } else {
                KeyedFormat::None
            };
            let mut key_serializer = None;
            let mut states: Vec<StateMeta> = Vec::new();
            let mut add = |header: &SnapshotHeader| {
                key_serializer.get_or_insert_with(|| header.key_serializer.clone());
                for s in &header.states {
                    if !states.iter().any(|o| o.name == s.name) {
                        states.push(s.clone());
                    }
                }
            };
            if let Some(converted) = self.converted.get(&op.operator_id) {
                for (subtask, bytes) in converted {
                    let name = self.converted_name(&op.operator_id, *subtask);
                    let r = SnapshotReader::open(&bytes[..], name)
                        .map_err(|e| Error::state(&op.operator_id, *subtask, e))?;
                    add(r.header());
                }
            } else {
                for k in op.subtasks.iter().filter_map(|s| s.keyed.as_ref()) {
                    for f in &k.files {
                        add(&f.header);
                    }
                }
            }
            let mut operator_states: Vec<String> = op
                .subtasks
                .iter()
                .filter_map(|s| s.operator_state.as_ref())
                .flat_map(|o| o.state_names())
                .map(|n| n.to_string())
                .collect();
            operator_states.sort();
            operator_states.dedup();
            out.push(OperatorInfo {
                operator_id: op.operator_id.clone(),
                parallelism: op.parallelism,
                max_parallelism: op.max_parallelism,
                format,
                key_serializer,
                states,
                operator_states,
            });
        }
        Ok(out)
    }

    /// The operator `operator`, or an error naming the ones there are.
    pub fn operator(&self, operator: &str) -> Result<OperatorInfo> {
        let all = self.operators()?;
        let names: Vec<String> = all.iter().map(|o| o.operator_id.clone()).collect();
        all.into_iter()
            .find(|o| o.operator_id == operator)
            .ok_or_else(|| Error::UnknownState {
                what: "operator",
                name: operator.to_string(),
                checkpoint: self.checkpoint.location(),
                available: names.join(", "),
            })
    }

    /// The state `state` of `operator`, or an error naming the states there are.
    pub fn state(&self, operator: &str, state: &str) -> Result<StateMeta> {
        let op = self.operator(operator)?;
        if self.has_native_state(operator) {
            return Err(self.native_error(operator, &op));
        }
        let names: Vec<&str> = op.states.iter().map(|s| s.name.as_str()).collect();
        op.state(state).cloned().ok_or_else(|| Error::UnknownState {
            what: "state",
            name: format!("{state}' of operator '{operator}"),
            checkpoint: self.checkpoint.location(),
            available: names.join(", "),
        })
    }

    fn native_error(&self, operator: &str, op: &OperatorInfo) -> Error {
        let backend = match &op.format {
            KeyedFormat::Native(b) => b.as_str(),
            _ => "?",
        };
        Error::RestoreMismatch {
            operator: operator.to_string(),
            checkpoint: self.checkpoint.location(),
            reason: format!(
                "its keyed state is in the native format of the '{backend}' backend: convert \
                 it first (SavepointReader::convert_native with that backend)"
            ),
        }
    }

    fn converted_name(&self, operator: &str, subtask: u32) -> String {
        format!(
            "{} (operator '{operator}' subtask {subtask}, converted)",
            self.checkpoint.location()
        )
    }

    /// The canonical streams of `operator`, one or more per old subtask, holding the key
    /// groups of `only` (all without).
    fn sources(&self, operator: &str, only: Option<KeyGroupRange>) -> Result<(u32, Vec<Source>)> {
        let Some(op) = self.checkpoint.metadata.operator(operator) else {
            // The error that names the operators there are.
            self.operator(operator)?;
            return Ok((0, Vec::new()));
        };
        let mut sources = Vec::new();
        if let Some(converted) = self.converted.get(operator) {
            for (subtask, bytes) in converted {
                sources.push(Source {
                    name: self.converted_name(operator, *subtask),
                    subtask: *subtask,
                    reader: Box::new(std::io::Cursor::new(ArcBytes(Arc::clone(bytes)))),
                    failure: None,
                });
            }
            return Ok((op.max_parallelism, sources));
        }
        if op.has_native_state() {
            let info = self.operator(operator)?;
            return Err(self.native_error(operator, &info));
        }
        for st in &op.subtasks {
            let Some(k) = &st.keyed else { continue };
            let range = match only {
                Some(r) => r.intersect(&k.key_group_range),
                None => k.key_group_range,
            };
            if range.is_empty() {
                continue;
            }
            let streams = self.checkpoint.keyed_streams(
                &self.storage,
                operator,
                op.max_parallelism,
                range,
            )?;
            for (name, reader) in streams {
                let failure = Some(reader.failure());
                sources.push(Source {
                    name,
                    subtask: st.subtask,
                    reader: Box::new(reader),
                    failure,
                });
            }
        }
        Ok((op.max_parallelism, sources))
    }

    /// Every record of every keyed state of `operator` (with `state`: of that state only), key
    /// group by key group of each old subtask; each block's checksum is verified as it is read.
    pub fn raw_entries(&self, operator: &str, state: Option<&str>) -> Result<RawEntries> {
        if let Some(s) = state {
            self.state(operator, s)?;
        }
        let (max_parallelism, sources) = self.sources(operator, None)?;
        Ok(RawEntries {
            operator: operator.to_string(),
            max_parallelism,
            only: state.map(str::to_string),
            key: None,
            sources: sources.into(),
            current: None,
            buffer: VecDeque::new(),
            done: false,
        })
    }

    /// The records of one key (its serialized bytes) in `operator` (with `state`: of that state
    /// only), in every namespace; only the key's key group is read.
    pub fn raw_entries_of_key(
        &self,
        operator: &str,
        state: Option<&str>,
        key: &[u8],
    ) -> Result<RawEntries> {
        if let Some(s) = state {
            self.state(operator, s)?;
        }
        let max_parallelism = self.operator(operator)?.max_parallelism;
        let kg = assign_to_key_group(key, max_parallelism);
        let (max_parallelism, sources) =
            self.sources(operator, Some(KeyGroupRange::new(kg, kg + 1)))?;
        Ok(RawEntries {
            operator: operator.to_string(),
            max_parallelism,
            only: state.map(str::to_string),
            key: Some(key.to_vec()),
            sources: sources.into(),
            current: None,
            buffer: VecDeque::new(),
            done: false,
        })
    }

    /// Entries and bytes per key group of every keyed state of `operator`, counted from the
    /// verified records.
    pub fn state_stats(&self, operator: &str) -> Result<Vec<StateStats>> {
        let info = self.operator(operator)?;
        if self.has_native_state(operator) {
            return Err(self.native_error(operator, &info));
        }
        let mut stats: Vec<StateStats> = info
            .states
            .iter()
            .map(|m| StateStats {
                meta: m.clone(),
                key_groups: BTreeMap::new(),
            })
            .collect();
        if matches!(info.format, KeyedFormat::None) {
            return Ok(stats);
        }
        for e in self.raw_entries(operator, None)? {
            let e = e?;
            if let Some(s) = stats.iter_mut().find(|s| s.meta.name == e.state.name) {
                let k = s.key_groups.entry(e.key_group).or_default();
                k.entries += 1;
                k.bytes += (e.key.len() + e.namespace.len() + e.payload.len() + 16) as u64;
            }
        }
        Ok(stats)
    }

    /// Checks `state` of `operator` is of one of `kinds` and resolves the key and namespace
    /// readers.
    fn typed<K: 'static, N: 'static>(
        &self,
        operator: &str,
        state: &str,
        kinds: &[StateKind],
        key: Arc<dyn StateSerializer<K>>,
        namespace: &Arc<dyn StateSerializer<N>>,
    ) -> Result<(StateMeta, Typed<K, N>)> {
        let meta = self.state(operator, state)?;
        if !kinds.contains(&meta.kind) {
            return Err(Error::WrongStateKind {
                operator: operator.to_string(),
                state: state.to_string(),
                found: meta.kind.to_string(),
                expected: kinds
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
        let info = self.operator(operator)?;
        let recorded = info.key_serializer.ok_or_else(|| Error::UnknownState {
            what: "keyed state of operator",
            name: operator.to_string(),
            checkpoint: self.checkpoint.location(),
            available: String::new(),
        })?;
        let key =
            resolve_reader(&key, &recorded).map_err(|reason| Error::IncompatibleSerializer {
                operator: operator.to_string(),
                state: state.to_string(),
                what: "key".into(),
                reason,
            })?;
        let namespace = self.resolve(operator, &meta, SerializerRole::Namespace, namespace)?;
        Ok((
            meta,
            Typed {
                operator: operator.to_string(),
                key,
                namespace,
            },
        ))
    }

    fn resolve<T: 'static>(
        &self,
        operator: &str,
        meta: &StateMeta,
        role: SerializerRole,
        current: &Arc<dyn StateSerializer<T>>,
    ) -> Result<ResolvedReader<T>> {
        meta.reader_for(role, current)
            .map_err(|e| Error::state(operator, 0, e))
    }

    fn read_single<K, N, V>(
        &self,
        operator: &str,
        state: &str,
        kinds: &[StateKind],
        key: Arc<dyn StateSerializer<K>>,
        namespace: &Arc<dyn StateSerializer<N>>,
        value: &Arc<dyn StateSerializer<V>>,
    ) -> Result<TypedEntries<ValueEntry<K, N, V>>>
    where
        K: 'static,
        N: Namespace,
        V: StateType,
    {
        let (meta, typed) = self.typed(operator, state, kinds, key, namespace)?;
        let value = self.resolve(operator, &meta, SerializerRole::Value, value)?;
        let raw = self.raw_entries(operator, Some(state))?;
        Ok(TypedEntries {
            raw,
            decode: Box::new(move |e: RawEntry| {
                let (key, namespace) = typed.key_and_namespace(&e)?;
                let mut d = Decoder::new(&e.payload, 0, "payload");
                let (timestamp, bytes) =
                    payload::decode_single(&mut d).map_err(|err| typed.corrupt(&e, err))?;
                let value = value
                    .read(bytes)
                    .map_err(|err| typed.decode_error(&e, "value", err))?;
                Ok(ValueEntry {
                    key,
                    namespace,
                    value,
                    timestamp,
                })
            }),
        })
    }

    /// The entries of the value state `descriptor` names, typed; keys read with `key`. The
    /// serializers are checked against the recorded ones first.
    pub fn read_value<K, N, V>(
        &self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &ValueStateDescriptor<V, N>,
    ) -> Result<TypedEntries<ValueEntry<K, N, V>>>
    where
        K: 'static,
        N: Namespace,
        V: StateType,
    {
        self.read_single(
            operator,
            descriptor.name().as_str(),
            &[StateKind::Value],
            Arc::new(key),
            descriptor.namespace_serializer(),
            descriptor.value_serializer(),
        )
    }

    /// The entries of the reducing state `descriptor` names, typed.
    pub fn read_reducing<K, N, T>(
        &self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &ReducingStateDescriptor<T, N>,
    ) -> Result<TypedEntries<ValueEntry<K, N, T>>>
    where
        K: 'static,
        N: Namespace,
        T: StateType,
    {
        self.read_single(
            operator,
            descriptor.name().as_str(),
            &[StateKind::Reducing],
            Arc::new(key),
            descriptor.namespace_serializer(),
            descriptor.value_serializer(),
        )
    }

    /// The accumulators of the aggregating state `descriptor` names, typed.
    pub fn read_aggregating<K, N, IN, ACC, OUT>(
        &self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &AggregatingStateDescriptor<IN, ACC, OUT, N>,
    ) -> Result<TypedEntries<ValueEntry<K, N, ACC>>>
    where
        K: 'static,
        N: Namespace,
        ACC: StateType,
        IN: 'static,
        OUT: 'static,
    {
        self.read_single(
            operator,
            descriptor.name().as_str(),
            &[StateKind::Aggregating],
            Arc::new(key),
            descriptor.namespace_serializer(),
            descriptor.accumulator_serializer(),
        )
    }

    /// The lists of the list state `descriptor` names, typed.
    pub fn read_list<K, N, T>(
        &self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &ListStateDescriptor<T, N>,
    ) -> Result<TypedEntries<ListEntry<K, N, T>>>
    where
        K: 'static,
        N: Namespace,
        T: StateType,
    {
        let state = descriptor.name().as_str();
        let (meta, typed) = self.typed(
            operator,
            state,
            &[StateKind::List],
            Arc::new(key),
            descriptor.namespace_serializer(),
        )?;
        let element = self.resolve(
            operator,
            &meta,
            SerializerRole::Value,
            descriptor.element_serializer(),
        )?;
        let raw = self.raw_entries(operator, Some(state))?;
        Ok(TypedEntries {
            raw,
            decode: Box::new(move |e: RawEntry| {
                let (key, namespace) = typed.key_and_namespace(&e)?;
                let mut d = Decoder::new(&e.payload, 0, "payload");
                let items = payload::decode_list(&mut d).map_err(|err| typed.corrupt(&e, err))?;
                let elements = items
                    .into_iter()
                    .map(|(_, b)| element.read(b))
                    .collect::<std::result::Result<Vec<T>, _>>()
                    .map_err(|err| typed.decode_error(&e, "list element", err))?;
                Ok(ListEntry {
                    key,
                    namespace,
                    elements,
                })
            }),
        })
    }

    /// The maps of the map state `descriptor` names, typed.
    pub fn read_map<K, N, UK, UV>(
        &self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &MapStateDescriptor<UK, UV, N>,
    ) -> Result<TypedEntries<MapEntry<K, N, UK, UV>>>
    where
        K: 'static,
        N: Namespace,
        UK: MapKey,
        UV: StateType,
    {
        let state = descriptor.name().as_str();
        let (meta, typed) = self.typed(
            operator,
            state,
            &[StateKind::Map],
            Arc::new(key),
            descriptor.namespace_serializer(),
        )?;
        let uk = self.resolve(
            operator,
            &meta,
            SerializerRole::UserKey,
            descriptor.user_key_serializer(),
        )?;
        let uv = self.resolve(
            operator,
            &meta,
            SerializerRole::UserValue,
            descriptor.user_value_serializer(),
        )?;
        let raw = self.raw_entries(operator, Some(state))?;
        Ok(TypedEntries {
            raw,
            decode: Box::new(move |e: RawEntry| {
                let (key, namespace) = typed.key_and_namespace(&e)?;
                let mut d = Decoder::new(&e.payload, 0, "payload");
                let items = payload::decode_map(&mut d).map_err(|err| typed.corrupt(&e, err))?;
                let mut entries = Vec::with_capacity(items.len());
                for (_, k, v) in items {
                    let k = uk
                        .read(k)
                        .map_err(|err| typed.decode_error(&e, "map user key", err))?;
                    let v = uv
                        .read(v)
                        .map_err(|err| typed.decode_error(&e, "map user value", err))?;
                    entries.push((k, v));
                }
                Ok(MapEntry {
                    key,
                    namespace,
                    entries,
                })
            }),
        })
    }
}

/// Bytes shared by a cursor.
struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Key and namespace readers of a typed read.
struct Typed<K, N> {
    operator: String,
    key: ResolvedReader<K>,
    namespace: ResolvedReader<N>,
}

impl<K: 'static, N: 'static> Typed<K, N> {
    fn key_and_namespace(&self, e: &RawEntry) -> Result<(K, N)> {
        let key = self
            .key
            .read(&e.key)
            .map_err(|err| self.decode_error(e, "key", err))?;
        let namespace = self
            .namespace
            .read(&e.namespace)
            .map_err(|err| self.decode_error(e, "namespace", err))?;
        Ok((key, namespace))
    }

    fn decode_error(&self, e: &RawEntry, what: &'static str, err: SerdeError) -> Error {
        Error::Decode {
            operator: self.operator.clone(),
            state: e.state.name.to_string(),
            what,
            key_group: e.key_group,
            reason: err.0,
        }
    }

    fn corrupt(&self, e: &RawEntry, err: state_api::Error) -> Error {
        Error::Decode {
            operator: self.operator.clone(),
            state: e.state.name.to_string(),
            what: "payload",
            key_group: e.key_group,
            reason: err.to_string(),
        }
    }
}

/// Typed entries of one state: each raw record decoded with the serializers given.
pub struct TypedEntries<T> {
    raw: RawEntries,
    decode: Box<dyn FnMut(RawEntry) -> Result<T> + Send>,
}

impl<T> std::fmt::Debug for TypedEntries<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedEntries")
            .field("raw", &self.raw)
            .finish()
    }
}

impl<T> Iterator for TypedEntries<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        let e = self.raw.next()?;
        Some(e.and_then(&mut self.decode))
    }
}

/// An open stream of [`RawEntries`].
struct OpenSource {
    name: String,
    subtask: u32,
    reader: SnapshotReader<Box<dyn Read + Send>>,
    states: Vec<Arc<StateMeta>>,
    failure: Option<Arc<Mutex<Option<Error>>>>,
}

/// The records of an operator's keyed states ([`SavepointReader::raw_entries`]).
pub struct RawEntries {
    operator: String,
    max_parallelism: u32,
    only: Option<String>,
    key: Option<Vec<u8>>,
    sources: VecDeque<Source>,
    current: Option<OpenSource>,
    buffer: VecDeque<RawEntry>,
    done: bool,
}

impl std::fmt::Debug for RawEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEntries")
            .field("operator", &self.operator)
            .field("streams_left", &self.sources.len())
            .finish()
    }
}

impl RawEntries {
    /// A stream error as this crate reports it: a storage failure while streaming as itself,
    /// damage as [`Error::Corrupt`] naming the file.
    fn error(
        &self,
        failure: Option<&Arc<Mutex<Option<Error>>>>,
        subtask: u32,
        e: state_api::Error,
    ) -> Error {
        crate::restore::stream_error(failure.map(|f| &**f), &self.operator, subtask, e)
    }

    /// Reads the next block into the buffer; false when every stream is done.
    fn fill(&mut self) -> Result<bool> {
        loop {
            let Some(open) = self.current.as_mut() else {
                let Some(s) = self.sources.pop_front() else {
                    return Ok(false);
                };
                let reader = match SnapshotReader::open(s.reader, s.name.clone()) {
                    Ok(r) => r,
                    Err(e) => return Err(self.error(s.failure.as_ref(), s.subtask, e)),
                };
                let states = reader
                    .header()
                    .states
                    .iter()
                    .cloned()
                    .map(Arc::new)
                    .collect();
                self.current = Some(OpenSource {
                    name: s.name,
                    subtask: s.subtask,
                    reader,
                    states,
                    failure: s.failure,
                });
                continue;
            };
            let block = match open.reader.next_block() {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Err(e) => {
                    let (failure, subtask) = (open.failure.clone(), open.subtask);
                    return Err(self.error(failure.as_ref(), subtask, e));
                }
            };
            for r in block.records(&open.name, self.max_parallelism) {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        let (failure, subtask) = (open.failure.clone(), open.subtask);
                        return Err(self.error(failure.as_ref(), subtask, e));
                    }
                };
                let Some(state) = open.states.get(r.state_index as usize) else {
                    return Err(Error::Corrupt {
                        file: open.name.clone(),
                        offset: block.offset,
                        reason: format!(
                            "a record of state {} in a stream of {} states",
                            r.state_index,
                            open.states.len()
                        ),
                    });
                };
                if self
                    .only
                    .as_deref()
                    .is_some_and(|o| o != state.name.as_str())
                    || self.key.as_deref().is_some_and(|k| k != r.key)
                {
                    continue;
                }
                self.buffer.push_back(RawEntry {
                    state: Arc::clone(state),
                    key_group: block.key_group,
                    key: r.key.to_vec(),
                    namespace: r.namespace.to_vec(),
                    payload: r.payload.to_vec(),
                });
            }
            return Ok(true);
        }
    }
}

impl Iterator for RawEntries {
    type Item = Result<RawEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffer.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The identity of a record: state index, key, namespace, and for timers the timer's payload.
type EntryId = (u32, Vec<u8>, Vec<u8>, Vec<u8>);

/// One operator of a [`SavepointWriter`].
#[derive(Clone, Debug)]
struct OperatorData {
    id: String,
    max_parallelism: u32,
    parallelism: u32,
    key_serializer: Option<SerializerSnapshot>,
    states: Vec<StateMeta>,
    /// Per key group, each entry's payload.
    records: BTreeMap<u32, BTreeMap<EntryId, Vec<u8>>>,
    /// The operator state of each old subtask (redistributed when written).
    operator_state: Vec<OperatorStateStore>,
}

/// Writes a savepoint from typed data or from an existing checkpoint (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct SavepointWriter {
    operators: Vec<OperatorData>,
    checkpoint_id: u64,
    timestamp_millis: i64,
    entry_timestamp: Option<i64>,
}

impl SavepointWriter {
    /// An empty savepoint (checkpoint id 0, timestamp 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding everything `reader`'s checkpoint holds (keyed records of every state,
    /// operator state of every subtask), same ids, parallelisms and timestamps: change it,
    /// then [`SavepointWriter::write`] it (transform).
    pub fn from_reader(reader: &SavepointReader) -> Result<Self> {
        let m = &reader.checkpoint.metadata;
        let mut w = SavepointWriter {
            operators: Vec::new(),
            checkpoint_id: m.checkpoint_id,
            timestamp_millis: m.timestamp_millis,
            entry_timestamp: None,
        };
        for (op, info) in m.operators.iter().zip(reader.operators()?) {
            let mut data = OperatorData {
                id: op.operator_id.clone(),
                max_parallelism: op.max_parallelism,
                parallelism: op.parallelism,
                key_serializer: info.key_serializer.clone(),
                states: info.states.clone(),
                records: BTreeMap::new(),
                operator_state: vec![OperatorStateStore::new(); op.parallelism as usize],
            };
            for s in &op.subtasks {
                if let (Some(slot), Some(o)) = (
                    data.operator_state.get_mut(s.subtask as usize),
                    &s.operator_state,
                ) {
                    *slot = o.clone();
                }
            }
            if !matches!(info.format, KeyedFormat::None) {
                for e in reader.raw_entries(&op.operator_id, None)? {
                    let e = e?;
                    let index = data
                        .states
                        .iter()
                        .position(|s| s.name == e.state.name)
                        .ok_or_else(|| Error::Corrupt {
                            file: reader.checkpoint.location(),
                            offset: 0,
                            reason: format!("a record of unknown state '{}'", e.state.name),
                        })? as u32;
                    data.insert(index, e.key_group, e.key, e.namespace, e.payload);
                }
            }
            w.operators.push(data);
        }
        Ok(w)
    }

    /// Sets the checkpoint id and trigger time the savepoint records.
    pub fn with_checkpoint_id(mut self, checkpoint_id: u64, timestamp_millis: i64) -> Self {
        self.checkpoint_id = checkpoint_id;
        self.timestamp_millis = timestamp_millis;
        self
    }

    /// The TTL timestamp (last access, milliseconds since the epoch) written with entries of
    /// states that have a TTL; required before writing into such a state (states without TTL
    /// store 0).
    pub fn with_entry_timestamp(mut self, millis: i64) -> Self {
        self.entry_timestamp = Some(millis);
        self
    }

    /// The ids of the operators, in order.
    pub fn operator_ids(&self) -> Vec<&str> {
        self.operators.iter().map(|o| o.id.as_str()).collect()
    }

    /// Adds an operator with no state yet.
    pub fn add_operator(&mut self, id: &str, max_parallelism: u32, parallelism: u32) -> Result<()> {
        crate::storage::validate_name("operator id", id)?;
        state_api::validate_parallelism(max_parallelism, parallelism)
            .map_err(|e| Error::state(id, 0, e))?;
        if self.operators.iter().any(|o| o.id == id) {
            return Err(Error::InvalidConfig {
                reason: format!("the savepoint already has an operator '{id}'"),
            });
        }
        self.operators.push(OperatorData {
            id: id.to_string(),
            max_parallelism,
            parallelism,
            key_serializer: None,
            states: Vec::new(),
            records: BTreeMap::new(),
            operator_state: Vec::new(),
        });
        Ok(())
    }

    /// Removes an operator and all its state.
    pub fn remove_operator(&mut self, id: &str) -> Result<()> {
        let at = self.index(id)?;
        self.operators.remove(at);
        Ok(())
    }

    /// Changes the parallelism `id` is written at (its max parallelism stays).
    pub fn set_parallelism(&mut self, id: &str, parallelism: u32) -> Result<()> {
        let at = self.index(id)?;
        let op = &mut self.operators[at];
        state_api::validate_parallelism(op.max_parallelism, parallelism)
            .map_err(|e| Error::state(id, 0, e))?;
        op.parallelism = parallelism;
        Ok(())
    }

    /// Sets the operator state of `id`, one store per subtask of the parallelism it was
    /// written with (redistributed to the parallelism written, as a restore does).
    pub fn set_operator_state(&mut self, id: &str, stores: Vec<OperatorStateStore>) -> Result<()> {
        let at = self.index(id)?;
        self.operators[at].operator_state = stores;
        Ok(())
    }

    /// Removes the keyed state `state` of `operator` and its entries.
    pub fn remove_state(&mut self, operator: &str, state: &str) -> Result<()> {
        let at = self.index(operator)?;
        let op = &mut self.operators[at];
        let Some(index) = op.states.iter().position(|s| s.name.as_str() == state) else {
            return Err(Error::UnknownState {
                what: "state",
                name: format!("{state}' of operator '{operator}"),
                checkpoint: "the savepoint being written".into(),
                available: op
                    .states
                    .iter()
                    .map(|s| s.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        op.states.remove(index);
        let index = index as u32;
        for entries in op.records.values_mut() {
            let old = std::mem::take(entries);
            *entries = old
                .into_iter()
                .filter(|((s, ..), _)| *s != index)
                .map(|((s, k, n, t), p)| ((if s > index { s - 1 } else { s }, k, n, t), p))
                .collect();
        }
        op.records.retain(|_, e| !e.is_empty());
        Ok(())
    }

    fn index(&self, id: &str) -> Result<usize> {
        self.operators
            .iter()
            .position(|o| o.id == id)
            .ok_or_else(|| Error::UnknownState {
                what: "operator",
                name: id.to_string(),
                checkpoint: "the savepoint being written".into(),
                available: self.operator_ids().join(", "),
            })
    }

    /// Declares `meta` in `operator` with keys of `key`'s serializer: a new state, or the same
    /// state again (same kind and serializers). Returns its index and the operator.
    fn declare<K: 'static>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        meta: StateMeta,
    ) -> Result<(u32, Option<i64>, &mut OperatorData)> {
        let at = self.index(operator)?;
        let ts = self.entry_timestamp;
        let op = &mut self.operators[at];
        let key_snapshot = key.snapshot();
        match &op.key_serializer {
            Some(k) if *k != key_snapshot => {
                return Err(Error::IncompatibleSerializer {
                    operator: operator.to_string(),
                    state: meta.name.to_string(),
                    what: "key".into(),
                    reason: format!("the operator's keys are written by {k}, not {key_snapshot}"),
                })
            }
            Some(_) => {}
            None => op.key_serializer = Some(key_snapshot),
        }
        let timestamp = match (meta.ttl_millis, ts) {
            (None, _) => None,
            (Some(_), Some(ts)) => Some(ts),
            (Some(_), None) => {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "state '{}' of operator '{operator}' has a TTL: give its entries' last \
                         access time with SavepointWriter::with_entry_timestamp",
                        meta.name
                    ),
                })
            }
        };
        let index = match op.states.iter().position(|s| s.name == meta.name) {
            Some(i) if op.states[i] == meta => i,
            Some(i) => {
                let old = &op.states[i];
                return Err(Error::IncompatibleSerializer {
                    operator: operator.to_string(),
                    state: meta.name.to_string(),
                    what: "state".into(),
                    reason: format!(
                        "the savepoint holds it as {} state with serializers [{}], written now \
                         as {} with [{}]",
                        old.kind,
                        describe(old),
                        meta.kind,
                        describe(&meta)
                    ),
                });
            }
            None => {
                op.states.push(meta);
                op.states.len() - 1
            }
        };
        Ok((index as u32, timestamp, op))
    }

    fn write_entries<K: 'static, N: 'static, X>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        namespace: &Arc<dyn StateSerializer<N>>,
        meta: StateMeta,
        entries: impl IntoIterator<Item = (K, N, X)>,
        mut encode: impl FnMut(&X, i64, &mut Vec<u8>) -> std::result::Result<(), SerdeError>,
    ) -> Result<u64> {
        let state = meta.name.to_string();
        let (index, timestamp, op) = self.declare(operator, key, meta)?;
        let ser_err = |what: &str, e: SerdeError| Error::InvalidConfig {
            reason: format!(
                "cannot serialize a {what} of state '{state}' of operator '{operator}': {e}"
            ),
        };
        let mut n = 0u64;
        for (k, ns, x) in entries {
            let mut kb = Vec::new();
            key.serialize(&k, &mut kb).map_err(|e| ser_err("key", e))?;
            let mut nb = Vec::new();
            namespace
                .serialize(&ns, &mut nb)
                .map_err(|e| ser_err("namespace", e))?;
            let mut p = Vec::new();
            encode(&x, timestamp.unwrap_or(0), &mut p).map_err(|e| ser_err("value", e))?;
            let kg = assign_to_key_group(&kb, op.max_parallelism);
            op.insert(index, kg, kb, nb, p);
            n += 1;
        }
        Ok(n)
    }

    /// Writes `entries` (key, namespace, value) into the value state `descriptor` declares in
    /// `operator`, keys serialized with `key` (the same for every state of the operator). An
    /// entry written twice keeps the last value. Returns the number of entries written.
    pub fn write_value<K, N, V>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        descriptor: &ValueStateDescriptor<V, N>,
        entries: impl IntoIterator<Item = (K, N, V)>,
    ) -> Result<u64>
    where
        K: 'static,
        V: StateType,
        N: Namespace,
    {
        let ser = Arc::clone(descriptor.value_serializer());
        self.write_entries(
            operator,
            key,
            descriptor.namespace_serializer(),
            descriptor.meta(),
            entries,
            move |v, ts, out| payload::single(out, ts, |o| ser.serialize(v, o)),
        )
    }

    /// Writes `entries` (key, namespace, value) into the reducing state `descriptor` declares.
    pub fn write_reducing<K, N, T>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        descriptor: &ReducingStateDescriptor<T, N>,
        entries: impl IntoIterator<Item = (K, N, T)>,
    ) -> Result<u64>
    where
        K: 'static,
        T: StateType,
        N: Namespace,
    {
        let ser = Arc::clone(descriptor.value_serializer());
        self.write_entries(
            operator,
            key,
            descriptor.namespace_serializer(),
            descriptor.meta(),
            entries,
            move |v, ts, out| payload::single(out, ts, |o| ser.serialize(v, o)),
        )
    }

    /// Writes `entries` (key, namespace, accumulator) into the aggregating state `descriptor`
    /// declares.
    pub fn write_aggregating<K, N, IN, ACC, OUT>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        descriptor: &AggregatingStateDescriptor<IN, ACC, OUT, N>,
        entries: impl IntoIterator<Item = (K, N, ACC)>,
    ) -> Result<u64>
    where
        K: 'static,
        ACC: StateType,
        IN: 'static,
        OUT: 'static,
        N: Namespace,
    {
        let ser = Arc::clone(descriptor.accumulator_serializer());
        self.write_entries(
            operator,
            key,
            descriptor.namespace_serializer(),
            descriptor.meta(),
            entries,
            move |v, ts, out| payload::single(out, ts, |o| ser.serialize(v, o)),
        )
    }

    /// Writes `entries` (key, namespace, list) into the list state `descriptor` declares; an
    /// empty list writes nothing (empty state reads as absent).
    pub fn write_list<K, N, T>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        descriptor: &ListStateDescriptor<T, N>,
        entries: impl IntoIterator<Item = (K, N, Vec<T>)>,
    ) -> Result<u64>
    where
        K: 'static,
        T: StateType,
        N: Namespace,
    {
        let ser = Arc::clone(descriptor.element_serializer());
        self.write_entries(
            operator,
            key,
            descriptor.namespace_serializer(),
            descriptor.meta(),
            entries.into_iter().filter(|(_, _, l)| !l.is_empty()),
            move |list, ts, out| {
                payload::count(out, list.len() as u32);
                for v in list {
                    payload::list_element(out, ts, |o| ser.serialize(v, o))?;
                }
                Ok(())
            },
        )
    }

    /// Writes `entries` (key, namespace, map entries) into the map state `descriptor`
    /// declares; an empty map writes nothing.
    pub fn write_map<K, N, UK, UV>(
        &mut self,
        operator: &str,
        key: &dyn StateSerializer<K>,
        descriptor: &MapStateDescriptor<UK, UV, N>,
        entries: impl IntoIterator<Item = (K, N, Vec<(UK, UV)>)>,
    ) -> Result<u64>
    where
        K: 'static,
        UK: MapKey,
        UV: StateType,
        N: Namespace,
    {
        let uk = Arc::clone(descriptor.user_key_serializer());
        let uv = Arc::clone(descriptor.user_value_serializer());
        self.write_entries(
            operator,
            key,
            descriptor.namespace_serializer(),
            descriptor.meta(),
            entries.into_iter().filter(|(_, _, m)| !m.is_empty()),
            move |map, ts, out| {
                payload::count(out, map.len() as u32);
                for (k, v) in map {
                    payload::map_entry(out, ts, |o| uk.serialize(k, o), |o| uv.serialize(v, o))?;
                }
                Ok(())
            },
        )
    }

    /// Rewrites every entry of the value state `descriptor` names in `operator`: `f` gets the
    /// key, namespace and value and returns the new value, or `None` to drop the entry. The
    /// serializers are checked against the recorded ones. Returns the entries kept.
    pub fn map_values<K, N, V>(
        &mut self,
        operator: &str,
        key: impl StateSerializer<K>,
        descriptor: &ValueStateDescriptor<V, N>,
        mut f: impl FnMut(&K, &N, V) -> Option<V>,
    ) -> Result<u64>
    where
        K: 'static,
        N: Namespace,
        V: StateType,
    {
        let at = self.index(operator)?;
        let op = &mut self.operators[at];
        let name = descriptor.name();
        let Some(index) = op.states.iter().position(|s| &s.name == name) else {
            return Err(Error::UnknownState {
                what: "state",
                name: format!("{name}' of operator '{operator}"),
                checkpoint: "the savepoint being written".into(),
                available: op
                    .states
                    .iter()
                    .map(|s| s.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let meta = op.states[index].clone();
        if meta.kind != StateKind::Value {
            return Err(Error::WrongStateKind {
                operator: operator.to_string(),
                state: name.to_string(),
                found: meta.kind.to_string(),
                expected: StateKind::Value.to_string(),
            });
        }
        let recorded = op.key_serializer.clone().unwrap_or_else(|| key.snapshot());
        let key_ser: Arc<dyn StateSerializer<K>> = Arc::new(key);
        let incompatible = |what: &str, reason: String| Error::IncompatibleSerializer {
            operator: operator.to_string(),
            state: name.to_string(),
            what: what.into(),
            reason,
        };
        let key_reader = resolve_reader(&key_ser, &recorded).map_err(|r| incompatible("key", r))?;
        let ns_reader = meta
            .reader_for(SerializerRole::Namespace, descriptor.namespace_serializer())
            .map_err(|e| Error::state(operator, 0, e))?;
        let value_reader = meta
            .reader_for(SerializerRole::Value, descriptor.value_serializer())
            .map_err(|e| Error::state(operator, 0, e))?;
        // Values read through a migration are written back with the new serializer: the state's
        // recorded serializers become the descriptor's.
        let new_meta = StateMeta {
            ttl_millis: meta.ttl_millis,
            ..descriptor.meta()
        };
        let decode_err = |kg: u32, what: &'static str, reason: String| Error::Decode {
            operator: operator.to_string(),
            state: name.to_string(),
            what,
            key_group: kg,
            reason,
        };
        let ser = descriptor.value_serializer();
        let mut kept = 0u64;
        let index = index as u32;
        for (kg, entries) in op.records.iter_mut() {
            let old = std::mem::take(entries);
            for (id, p) in old {
                if id.0 != index {
                    entries.insert(id, p);
                    continue;
                }
                let k = key_reader
                    .read(&id.1)
                    .map_err(|e| decode_err(*kg, "key", e.0))?;
                let n = ns_reader
                    .read(&id.2)
                    .map_err(|e| decode_err(*kg, "namespace", e.0))?;
                let mut d = Decoder::new(&p, 0, "payload");
                let (ts, bytes) = payload::decode_single(&mut d)
                    .map_err(|e| decode_err(*kg, "payload", e.to_string()))?;
                let v = value_reader
                    .read(bytes)
                    .map_err(|e| decode_err(*kg, "value", e.0))?;
                if let Some(v) = f(&k, &n, v) {
                    let mut out = Vec::new();
                    payload::single(&mut out, ts, |o| ser.serialize(&v, o)).map_err(|e| {
                        Error::InvalidConfig {
                            reason: format!("cannot serialize a value of state '{name}': {e}"),
                        }
                    })?;
                    entries.insert(id, out);
                    kept += 1;
                }
            }
        }
        op.records.retain(|_, e| !e.is_empty());
        op.states[index as usize] = new_meta;
        Ok(kept)
    }

    /// Writes the savepoint under `storage`'s savepoint directory as `savepoint-<name>` (a
    /// name already taken is refused) and returns it. Each operator is written at its
    /// parallelism, one canonical stream per subtask.
    pub fn write(&self, storage: &CheckpointStorage, name: &str) -> Result<CompletedCheckpoint> {
        self.write_with_progress(storage, name, &mut |_, _| {})
    }

    /// [`SavepointWriter::write`], calling `progress(subtasks written, subtasks)` after each
    /// subtask's state is written.
    pub fn write_with_progress(
        &self,
        storage: &CheckpointStorage,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CompletedCheckpoint> {
        let total: u64 = self
            .operators
            .iter()
            .map(|o| u64::from(o.parallelism))
            .sum();
        let mut done_subtasks = 0u64;
        let dir = storage.savepoint_dir(name)?;
        let target = SnapshotTarget {
            dir: dir.clone(),
            shared_dir: storage.shared_dir(),
            checkpoint_id: self.checkpoint_id,
            epoch: 0,
        };
        let mut acks = Vec::new();
        for op in &self.operators {
            let p = op.parallelism;
            let operator_state = if op.operator_state.iter().all(|s| s.is_empty()) {
                None
            } else {
                Some(redistribute(&op.operator_state, p))
            };
            let keyed = op.key_serializer.is_some() && !op.states.is_empty();
            for i in 0..p {
                let keyed = if keyed {
                    Some(KeyedSnapshot::Full(vec![Box::new(op.stream(i)?)]))
                } else {
                    None
                };
                let state = write_subtask_snapshot(
                    storage,
                    &target,
                    SubtaskSnapshot {
                        operator_id: op.id.clone(),
                        subtask: i,
                        keyed,
                        operator_state: operator_state
                            .as_ref()
                            .and_then(|s| s.get(i as usize).cloned()),
                    },
                )?;
                acks.push(SubtaskAck {
                    operator_id: op.id.clone(),
                    parallelism: p,
                    max_parallelism: op.max_parallelism,
                    state,
                });
                done_subtasks += 1;
                progress(done_subtasks, total);
            }
        }
        let done = commit_savepoint(
            storage,
            &dir,
            self.checkpoint_id,
            self.timestamp_millis,
            None,
            0,
            assemble_operators(acks)?,
        )?;
        tracing::info!(
            savepoint = %done.location(),
            operators = self.operators.len(),
            "wrote savepoint"
        );
        Ok(done)
    }
}

/// `role id vN schema` of every serializer of a state, for messages.
fn describe(m: &StateMeta) -> String {
    m.serializers
        .iter()
        .map(|(r, s)| format!("{} {s}", r.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl OperatorData {
    fn insert(&mut self, state: u32, kg: u32, key: Vec<u8>, ns: Vec<u8>, payload: Vec<u8>) {
        let timers = self
            .states
            .get(state as usize)
            .is_some_and(|s| s.kind == StateKind::Timers);
        let id = if timers {
            (state, key, ns, payload.clone())
        } else {
            (state, key, ns, Vec::new())
        };
        self.records.entry(kg).or_default().insert(id, payload);
    }

    /// The canonical stream of subtask `i` at the operator's parallelism.
    fn stream(&self, i: u32) -> Result<MemoryStream> {
        let range = KeyGroupRange::for_operator(self.max_parallelism, self.parallelism, i)
            .map_err(|e| Error::state(&self.id, i, e))?;
        let header = SnapshotHeader {
            max_parallelism: self.max_parallelism,
            key_group_range: range,
            key_serializer: self.key_serializer.clone().unwrap_or(SerializerSnapshot {
                id: String::new(),
                version: 0,
                schema: Vec::new(),
            }),
            states: self.states.clone(),
        };
        let err = |e| Error::state(&self.id, i, e);
        let mut w = SnapshotWriter::new(Vec::new(), &header).map_err(err)?;
        for (kg, entries) in self.records.range(range.start()..range.end()) {
            w.begin_key_group(*kg).map_err(err)?;
            for ((state, key, ns, _), p) in entries {
                w.write_record(*state, key, ns, p).map_err(err)?;
            }
        }
        let (summary, bytes) = w.finish().map_err(err)?;
        Ok(MemoryStream {
            bytes,
            summary,
            range,
        })
    }
}

/// A finished canonical stream held in memory.
struct MemoryStream {
    bytes: Vec<u8>,
    summary: SnapshotSummary,
    range: KeyGroupRange,
}

impl KeyedStateSnapshot for MemoryStream {
    fn write_to(&self, out: &mut dyn std::io::Write) -> state_api::Result<SnapshotSummary> {
        out.write_all(&self.bytes)
            .map_err(|source| state_api::Error::Io {
                context: "writing a savepoint stream".into(),
                source,
            })?;
        Ok(self.summary.clone())
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.range
    }
}
