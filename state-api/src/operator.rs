//! Operator (non-keyed) state: list state redistributed by even split or union on rescale,
//! and broadcast map state that every subtask holds in full.
//!
//! Operator state is small (source offsets, buffered elements), so [`OperatorStateStore`] keeps
//! it serialized and is shared by every backend.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::descriptor::{StateName, StateType};
use crate::error::{Error, Result};
use crate::serializer::{resolve_reader, PostcardSerializer, SerializerSnapshot, StateSerializer};
use crate::snapshot::{
    decode_serializer, encode_serializer, put_bytes, put_len, put_u16, put_u32, Decoder,
};

/// The magic bytes of an operator state snapshot.
pub const OPERATOR_SNAPSHOT_MAGIC: [u8; 4] = *b"FLWO";
/// The operator state snapshot format version.
pub const OPERATOR_SNAPSHOT_VERSION: u16 = 1;

/// How operator list state is split when the parallelism changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedistributionMode {
    /// The elements of all subtasks are concatenated and split into contiguous, even parts.
    EvenSplit,
    /// Every subtask receives all elements of all subtasks.
    Union,
}

impl RedistributionMode {
    fn code(self) -> u8 {
        match self {
            RedistributionMode::EvenSplit => 1,
            RedistributionMode::Union => 2,
        }
    }
}

/// Declares an operator list state.
pub struct OperatorListStateDescriptor<T> {
    name: StateName,
    mode: RedistributionMode,
    serializer: Arc<dyn StateSerializer<T>>,
}

impl<T: StateType + Serialize + DeserializeOwned> OperatorListStateDescriptor<T> {
    /// A list state with postcard serialization, redistributed by `mode`.
    pub fn new(name: &str, mode: RedistributionMode) -> Result<Self> {
        Ok(OperatorListStateDescriptor {
            name: StateName::new(name)?,
            mode,
            serializer: Arc::new(PostcardSerializer::<T>::new()),
        })
    }
}

impl<T: 'static> OperatorListStateDescriptor<T> {
    /// Uses `serializer` for the elements.
    pub fn with_serializer(mut self, serializer: impl StateSerializer<T> + 'static) -> Self {
        self.serializer = Arc::new(serializer);
        self
    }
}

/// Declares a broadcast map state.
pub struct BroadcastStateDescriptor<K, V> {
    name: StateName,
    key_serializer: Arc<dyn StateSerializer<K>>,
    value_serializer: Arc<dyn StateSerializer<V>>,
}

impl<K, V> BroadcastStateDescriptor<K, V>
where
    K: StateType + Serialize + DeserializeOwned,
    V: StateType + Serialize + DeserializeOwned,
{
    /// A broadcast map state with postcard serialization.
    pub fn new(name: &str) -> Result<Self> {
        Ok(BroadcastStateDescriptor {
            name: StateName::new(name)?,
            key_serializer: Arc::new(PostcardSerializer::<K>::new()),
            value_serializer: Arc::new(PostcardSerializer::<V>::new()),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ListEntry {
    mode: RedistributionMode,
    serializer: SerializerSnapshot,
    elements: Vec<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct BroadcastEntry {
    key_serializer: SerializerSnapshot,
    value_serializer: SerializerSnapshot,
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The operator state of one subtask; also its snapshot (it is cheap to clone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorStateStore {
    lists: BTreeMap<StateName, ListEntry>,
    broadcast: BTreeMap<StateName, BroadcastEntry>,
}

fn ser<T: 'static>(s: &Arc<dyn StateSerializer<T>>, v: &T, state: &StateName) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    s.serialize(v, &mut out).map_err(|e| Error::Serialize {
        state: state.to_string(),
        what: "operator state element",
        reason: e.0,
    })?;
    Ok(out)
}

fn de<T: 'static>(s: &Arc<dyn StateSerializer<T>>, b: &[u8], state: &StateName) -> Result<T> {
    s.deserialize(b).map_err(|e| Error::Deserialize {
        state: state.to_string(),
        what: "operator state element",
        reason: e.0,
    })
}

/// Re-encodes restored bytes with the current serializer if the old ones need a migration.
fn migrate<T: 'static>(
    current: &Arc<dyn StateSerializer<T>>,
    previous: &SerializerSnapshot,
    items: impl Iterator<Item = Vec<u8>>,
    state: &StateName,
    what: &'static str,
) -> Result<Vec<Vec<u8>>> {
    let reader =
        resolve_reader(current, previous).map_err(|reason| Error::IncompatibleSerializer {
            state: state.to_string(),
            what,
            reason,
        })?;
    if !reader.is_migration() {
        return Ok(items.collect());
    }
    items
        .map(|b| {
            let v = reader.read(&b).map_err(|e| Error::Deserialize {
                state: state.to_string(),
                what,
                reason: e.0,
            })?;
            ser(current, &v, state)
        })
        .collect()
}

impl OperatorStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or re-obtains) an operator list state; restored elements are checked against
    /// the descriptor's serializer (and migrated if it says so).
    pub fn list_state<'a, T: 'static>(
        &'a mut self,
        d: &'a OperatorListStateDescriptor<T>,
    ) -> Result<OperatorListState<'a, T>> {
        let snapshot = d.serializer.snapshot();
        if let Some(e) = self.lists.get_mut(&d.name) {
            if e.mode != d.mode {
                return Err(Error::StateTypeMismatch {
                    state: d.name.to_string(),
                    reason: format!("redistribution mode {:?} vs {:?}", e.mode, d.mode),
                });
            }
            if e.serializer != snapshot {
                // Migrate into a new vector: a failed check leaves the restored data untouched.
                e.elements = migrate(
                    &d.serializer,
                    &e.serializer,
                    e.elements.iter().cloned(),
                    &d.name,
                    "operator list element",
                )?;
                e.serializer = snapshot;
            }
        } else {
            self.lists.insert(
                d.name.clone(),
                ListEntry {
                    mode: d.mode,
                    serializer: snapshot,
                    elements: Vec::new(),
                },
            );
        }
        let entry = self
            .lists
            .get_mut(&d.name)
            .ok_or_else(|| Error::UnknownState {
                state: d.name.to_string(),
            })?;
        Ok(OperatorListState { entry, d })
    }

    /// Registers (or re-obtains) a broadcast map state.
    pub fn broadcast_state<'a, K: 'static, V: 'static>(
        &'a mut self,
        d: &'a BroadcastStateDescriptor<K, V>,
    ) -> Result<BroadcastState<'a, K, V>> {
        let ks = d.key_serializer.snapshot();
        let vs = d.value_serializer.snapshot();
        if let Some(e) = self.broadcast.get_mut(&d.name) {
            if e.key_serializer != ks || e.value_serializer != vs {
                let (keys, values): (Vec<_>, Vec<_>) = e
                    .entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .unzip();
                let keys = migrate(
                    &d.key_serializer,
                    &e.key_serializer,
                    keys.into_iter(),
                    &d.name,
                    "broadcast key",
                )?;
                let values = migrate(
                    &d.value_serializer,
                    &e.value_serializer,
                    values.into_iter(),
                    &d.name,
                    "broadcast value",
                )?;
                e.entries = keys.into_iter().zip(values).collect();
                e.key_serializer = ks;
                e.value_serializer = vs;
            }
        } else {
            self.broadcast.insert(
                d.name.clone(),
                BroadcastEntry {
                    key_serializer: ks,
                    value_serializer: vs,
                    entries: BTreeMap::new(),
                },
            );
        }
        let entry = self
            .broadcast
            .get_mut(&d.name)
            .ok_or_else(|| Error::UnknownState {
                state: d.name.to_string(),
            })?;
        Ok(BroadcastState {
            entry,
            d,
            _p: PhantomData,
        })
    }

    /// Names of the list states and broadcast states held.
    pub fn state_names(&self) -> Vec<StateName> {
        self.lists
            .keys()
            .chain(self.broadcast.keys())
            .cloned()
            .collect()
    }

    /// True when no operator state is held.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty() && self.broadcast.is_empty()
    }

    /// Encodes the store (magic, version, body, crc32c; see `docs/snapshot-format.md`).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        put_len(&mut body, self.lists.len(), "operator list states")?;
        for (name, e) in &self.lists {
            put_bytes(&mut body, name.as_str().as_bytes(), "state name")?;
            body.push(e.mode.code());
            encode_serializer(&mut body, &e.serializer)?;
            put_len(&mut body, e.elements.len(), "operator list")?;
            for el in &e.elements {
                put_bytes(&mut body, el, "operator list element")?;
            }
        }
        put_len(&mut body, self.broadcast.len(), "broadcast states")?;
        for (name, e) in &self.broadcast {
            put_bytes(&mut body, name.as_str().as_bytes(), "state name")?;
            encode_serializer(&mut body, &e.key_serializer)?;
            encode_serializer(&mut body, &e.value_serializer)?;
            put_len(&mut body, e.entries.len(), "broadcast map")?;
            for (k, v) in &e.entries {
                put_bytes(&mut body, k, "broadcast key")?;
                put_bytes(&mut body, v, "broadcast value")?;
            }
        }
        let mut out = Vec::with_capacity(body.len() + 14);
        out.extend_from_slice(&OPERATOR_SNAPSHOT_MAGIC);
        put_u16(&mut out, OPERATOR_SNAPSHOT_VERSION);
        put_len(&mut out, body.len(), "operator state")?;
        out.extend_from_slice(&body);
        put_u32(&mut out, crc32c::crc32c(&body));
        Ok(out)
    }

    /// Decodes and verifies an encoded store; `stream` names it in errors.
    pub fn decode(bytes: &[u8], stream: &str) -> Result<Self> {
        let mut d = Decoder::new(bytes, 0, stream);
        if d.take(4, "operator state magic")? != OPERATOR_SNAPSHOT_MAGIC {
            return Err(Error::Corrupt {
                stream: stream.to_string(),
                offset: 0,
                reason: "bad magic: not a Flowstate operator state snapshot".into(),
            });
        }
        let version = d.u16("operator state version")?;
        if version != OPERATOR_SNAPSHOT_VERSION {
            return Err(Error::UnsupportedVersion {
                stream: stream.to_string(),
                found: version,
                supported: OPERATOR_SNAPSHOT_VERSION,
            });
        }
        let body = d.bytes("operator state body")?;
        let crc = d.u32("operator state checksum")?;
        if !d.is_empty() {
            return Err(d.corrupt("bytes after the operator state checksum"));
        }
        if crc != crc32c::crc32c(body) {
            return Err(Error::Corrupt {
                stream: stream.to_string(),
                offset: 10 + body.len() as u64,
                reason: "operator state checksum mismatch".into(),
            });
        }
        let mut d = Decoder::new(body, 10, stream);
        let mut store = OperatorStateStore::new();
        let name = |d: &mut Decoder<'_>| -> Result<StateName> {
            let raw = d.bytes("state name")?;
            let s = std::str::from_utf8(raw).map_err(|_| d.corrupt("state name is not UTF-8"))?;
            StateName::new(s).map_err(|e| d.corrupt(e.to_string()))
        };
        let n = d.u32("operator list states")?;
        for _ in 0..n {
            let name = name(&mut d)?;
            let mode = match d.u8("redistribution mode")? {
                1 => RedistributionMode::EvenSplit,
                2 => RedistributionMode::Union,
                m => return Err(d.corrupt(format!("unknown redistribution mode {m}"))),
            };
            let serializer = decode_serializer(&mut d)?;
            let count = d.u32("operator list")? as usize;
            if count > d.remaining() / 4 {
                return Err(d.corrupt(format!("operator list claims {count} elements")));
            }
            let mut elements = Vec::with_capacity(count);
            for _ in 0..count {
                elements.push(d.bytes("operator list element")?.to_vec());
            }
            store.lists.insert(
                name,
                ListEntry {
                    mode,
                    serializer,
                    elements,
                },
            );
        }
        let n = d.u32("broadcast states")?;
        for _ in 0..n {
            let name = name(&mut d)?;
            let key_serializer = decode_serializer(&mut d)?;
            let value_serializer = decode_serializer(&mut d)?;
            let count = d.u32("broadcast map")?;
            let mut entries = BTreeMap::new();
            for _ in 0..count {
                let k = d.bytes("broadcast key")?.to_vec();
                let v = d.bytes("broadcast value")?.to_vec();
                entries.insert(k, v);
            }
            store.broadcast.insert(
                name,
                BroadcastEntry {
                    key_serializer,
                    value_serializer,
                    entries,
                },
            );
        }
        if !d.is_empty() {
            return Err(d.corrupt("bytes after the last operator state"));
        }
        Ok(store)
    }
}

/// Splits the operator state of `old.len()` subtasks among `new_parallelism` subtasks.
///
/// Even-split lists: all elements in subtask order, cut into contiguous parts whose sizes differ
/// by at most one (the first parts get the extra elements); at an unchanged parallelism each
/// subtask keeps exactly its own elements (an empty list where an old subtask never registered
/// the state). Union lists: every subtask gets all elements. Broadcast state: every subtask gets
/// the complete state, copied from an old subtask that holds it (round robin over those).
pub fn redistribute(old: &[OperatorStateStore], new_parallelism: u32) -> Vec<OperatorStateStore> {
    let p = new_parallelism.max(1) as usize;
    let mut out = vec![OperatorStateStore::new(); p];
    let mut names: Vec<&StateName> = old.iter().flat_map(|s| s.lists.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let parts: Vec<&ListEntry> = old.iter().filter_map(|s| s.lists.get(name)).collect();
        let Some(first) = parts.first() else { continue };
        let all: Vec<Vec<u8>> = parts
            .iter()
            .flat_map(|e| e.elements.iter().cloned())
            .collect();
        match first.mode {
            RedistributionMode::Union => {
                for s in out.iter_mut() {
                    s.lists.insert(
                        name.clone(),
                        ListEntry {
                            elements: all.clone(),
                            ..(*first).clone()
                        },
                    );
                }
            }
            // At the same parallelism every subtask keeps its own elements, as Flink does; a
            // subtask that never registered the state gets an empty one (source offsets of a
            // plain recovery must not move).
            RedistributionMode::EvenSplit if old.len() == p => {
                for (s, o) in out.iter_mut().zip(old) {
                    let entry = o.lists.get(name).cloned().unwrap_or_else(|| ListEntry {
                        mode: first.mode,
                        serializer: first.serializer.clone(),
                        elements: Vec::new(),
                    });
                    s.lists.insert(name.clone(), entry);
                }
            }
            RedistributionMode::EvenSplit => {
                let (base, extra) = (all.len() / p, all.len() % p);
                let mut it = all.into_iter();
                for (i, s) in out.iter_mut().enumerate() {
                    let n = base + usize::from(i < extra);
                    s.lists.insert(
                        name.clone(),
                        ListEntry {
                            mode: first.mode,
                            serializer: first.serializer.clone(),
                            elements: it.by_ref().take(n).collect(),
                        },
                    );
                }
            }
        }
    }
    // Broadcast state: each new subtask copies the state from one old subtask that reported it
    // (round robin over those, as Flink does), never from one that has none.
    let mut names: Vec<&StateName> = old.iter().flat_map(|s| s.broadcast.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let having: Vec<&BroadcastEntry> =
            old.iter().filter_map(|s| s.broadcast.get(name)).collect();
        for (i, s) in out.iter_mut().enumerate() {
            s.broadcast
                .insert(name.clone(), having[i % having.len()].clone());
        }
    }
    out
}

/// An operator list state of one subtask.
pub struct OperatorListState<'a, T> {
    entry: &'a mut ListEntry,
    d: &'a OperatorListStateDescriptor<T>,
}

impl<T: 'static> OperatorListState<'_, T> {
    /// Every element.
    pub fn get(&self) -> Result<Vec<T>> {
        self.entry
            .elements
            .iter()
            .map(|b| de(&self.d.serializer, b, &self.d.name))
            .collect()
    }
    /// Appends an element.
    pub fn add(&mut self, value: &T) -> Result<()> {
        let b = ser(&self.d.serializer, value, &self.d.name)?;
        self.entry.elements.push(b);
        Ok(())
    }
    /// Replaces every element.
    pub fn update(&mut self, values: &[T]) -> Result<()> {
        let new = values
            .iter()
            .map(|v| ser(&self.d.serializer, v, &self.d.name))
            .collect::<Result<Vec<_>>>()?;
        self.entry.elements = new;
        Ok(())
    }
    /// Removes every element.
    pub fn clear(&mut self) {
        self.entry.elements.clear();
    }
}

/// A broadcast map state of one subtask.
pub struct BroadcastState<'a, K, V> {
    entry: &'a mut BroadcastEntry,
    d: &'a BroadcastStateDescriptor<K, V>,
    _p: PhantomData<(K, V)>,
}

impl<K: 'static, V: 'static> BroadcastState<'_, K, V> {
    /// The value of `key`.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let k = ser(&self.d.key_serializer, key, &self.d.name)?;
        self.entry
            .entries
            .get(&k)
            .map(|v| de(&self.d.value_serializer, v, &self.d.name))
            .transpose()
    }
    /// Sets the value of `key`.
    pub fn put(&mut self, key: &K, value: &V) -> Result<()> {
        let k = ser(&self.d.key_serializer, key, &self.d.name)?;
        let v = ser(&self.d.value_serializer, value, &self.d.name)?;
        self.entry.entries.insert(k, v);
        Ok(())
    }
    /// Removes `key`.
    pub fn remove(&mut self, key: &K) -> Result<()> {
        let k = ser(&self.d.key_serializer, key, &self.d.name)?;
        self.entry.entries.remove(&k);
        Ok(())
    }
    /// True when `key` is present.
    pub fn contains(&self, key: &K) -> Result<bool> {
        let k = ser(&self.d.key_serializer, key, &self.d.name)?;
        Ok(self.entry.entries.contains_key(&k))
    }
    /// Every entry, ordered by serialized key.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        self.entry
            .entries
            .iter()
            .map(|(k, v)| {
                Ok((
                    de(&self.d.key_serializer, k, &self.d.name)?,
                    de(&self.d.value_serializer, v, &self.d.name)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(offsets: &[u64], union: &[&str]) -> OperatorStateStore {
        let mut s = OperatorStateStore::new();
        let d = OperatorListStateDescriptor::<u64>::new("offsets", RedistributionMode::EvenSplit)
            .unwrap();
        s.list_state(&d).unwrap().update(offsets).unwrap();
        let u =
            OperatorListStateDescriptor::<String>::new("seen", RedistributionMode::Union).unwrap();
        let mut l = s.list_state(&u).unwrap();
        for x in union {
            l.add(&x.to_string()).unwrap();
        }
        let b = BroadcastStateDescriptor::<String, u32>::new("rules").unwrap();
        s.broadcast_state(&b)
            .unwrap()
            .put(&"r1".into(), &7)
            .unwrap();
        s
    }

    #[test]
    fn even_split_union_and_broadcast() {
        let old = [store_with(&[1, 2, 3], &["a"]), store_with(&[4, 5], &["b"])];
        let new = redistribute(&old, 3);
        let d = OperatorListStateDescriptor::<u64>::new("offsets", RedistributionMode::EvenSplit)
            .unwrap();
        let u =
            OperatorListStateDescriptor::<String>::new("seen", RedistributionMode::Union).unwrap();
        let b = BroadcastStateDescriptor::<String, u32>::new("rules").unwrap();
        let mut all = Vec::new();
        for mut s in new {
            let part = s.list_state(&d).unwrap().get().unwrap();
            assert!(part.len() == 1 || part.len() == 2);
            all.extend(part);
            assert_eq!(s.list_state(&u).unwrap().get().unwrap(), vec!["a", "b"]);
            assert_eq!(
                s.broadcast_state(&b).unwrap().get(&"r1".into()).unwrap(),
                Some(7)
            );
        }
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
        let back = redistribute(&redistribute(&old, 3), 1);
        let mut one = back.into_iter().next().unwrap();
        assert_eq!(
            one.list_state(&d).unwrap().get().unwrap(),
            vec![1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn same_parallelism_keeps_elements_in_place() {
        let old = [store_with(&[1, 2, 3], &[]), store_with(&[4], &[])];
        let d = OperatorListStateDescriptor::<u64>::new("offsets", RedistributionMode::EvenSplit)
            .unwrap();
        let mut new = redistribute(&old, 2);
        assert_eq!(new[0].list_state(&d).unwrap().get().unwrap(), vec![1, 2, 3]);
        assert_eq!(new[1].list_state(&d).unwrap().get().unwrap(), vec![4]);
    }

    #[test]
    fn same_parallelism_keeps_elements_in_place_when_some_subtasks_lack_the_state() {
        // Old subtask 0 holds [1, 2]; subtask 1 never registered the state (Flink: [1, 2] | []).
        let d =
            OperatorListStateDescriptor::<u64>::new("t-1", RedistributionMode::EvenSplit).unwrap();
        let mut first = OperatorStateStore::new();
        first.list_state(&d).unwrap().update(&[1, 2]).unwrap();
        let old = [first, OperatorStateStore::new()];
        let mut new = redistribute(&old, 2);
        assert_eq!(new[0].list_state(&d).unwrap().get().unwrap(), vec![1, 2]);
        assert_eq!(
            new[1].list_state(&d).unwrap().get().unwrap(),
            Vec::<u64>::new()
        );
        // The other way round too: the elements stay with subtask 1.
        let old = [old[1].clone(), old[0].clone()];
        let mut new = redistribute(&old, 2);
        assert_eq!(
            new[0].list_state(&d).unwrap().get().unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(new[1].list_state(&d).unwrap().get().unwrap(), vec![1, 2]);
        // A changed parallelism still splits evenly.
        let mut new = redistribute(&old, 3);
        let parts: Vec<Vec<u64>> = new
            .iter_mut()
            .map(|s| s.list_state(&d).unwrap().get().unwrap())
            .collect();
        assert_eq!(parts, vec![vec![1], vec![2], vec![]]);
    }

    #[test]
    fn every_subtask_gets_the_broadcast_state_of_a_subtask_that_has_it() {
        let b = BroadcastStateDescriptor::<String, u32>::new("rules").unwrap();
        let mut with = OperatorStateStore::new();
        with.broadcast_state(&b)
            .unwrap()
            .put(&"r1".into(), &7)
            .unwrap();
        // Only old subtask 1 of 3 reported the broadcast state.
        let old = [OperatorStateStore::new(), with, OperatorStateStore::new()];
        for p in [1, 2, 3, 4, 7] {
            for (i, mut s) in redistribute(&old, p).into_iter().enumerate() {
                assert_eq!(
                    s.broadcast_state(&b).unwrap().entries().unwrap(),
                    vec![("r1".to_string(), 7)],
                    "subtask {i} of {p}"
                );
            }
        }
        // Two broadcast states held by different subtasks: everyone gets both.
        let c = BroadcastStateDescriptor::<String, u32>::new("limits").unwrap();
        let mut other = OperatorStateStore::new();
        other
            .broadcast_state(&c)
            .unwrap()
            .put(&"l".into(), &1)
            .unwrap();
        let old = [old[1].clone(), other];
        for mut s in redistribute(&old, 3) {
            assert_eq!(
                s.broadcast_state(&b).unwrap().get(&"r1".into()).unwrap(),
                Some(7)
            );
            assert_eq!(
                s.broadcast_state(&c).unwrap().get(&"l".into()).unwrap(),
                Some(1)
            );
        }
    }

    #[test]
    fn encode_decode_and_corruption() {
        let s = store_with(&[9, 8], &["x"]);
        let bytes = s.encode().unwrap();
        assert_eq!(OperatorStateStore::decode(&bytes, "op").unwrap(), s);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(OperatorStateStore::decode(&b, "op").is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(OperatorStateStore::decode(&bytes[..n], "op").is_err());
        }
    }

    /// Operator state follows schema names as keyed state does: an unnamed type moved to
    /// another module restores as is, a rename is refused until declared, the old built-in
    /// type name of the v1 format (`alloc::string::String`) still restores.
    #[test]
    fn operator_state_schema_names() {
        mod before {
            #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
            pub struct Offset(pub u64);
        }
        mod after {
            #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
            pub struct Offset(pub u64);
        }
        let list = |name: &str, ser: PostcardSerializer<after::Offset>| {
            OperatorListStateDescriptor::<after::Offset>::new(name, RedistributionMode::Union)
                .unwrap()
                .with_serializer(ser)
        };
        let mut s = OperatorStateStore::new();
        for (name, ser) in [
            ("unnamed", PostcardSerializer::<before::Offset>::new()),
            ("named", PostcardSerializer::named("src.Offset")),
        ] {
            let d =
                OperatorListStateDescriptor::<before::Offset>::new(name, RedistributionMode::Union)
                    .unwrap()
                    .with_serializer(ser);
            s.list_state(&d)
                .unwrap()
                .update(&[before::Offset(5)])
                .unwrap();
        }
        let mut r = OperatorStateStore::decode(&s.encode().unwrap(), "op").unwrap();
        let got = |r: &mut OperatorStateStore, d: &OperatorListStateDescriptor<after::Offset>| {
            r.list_state(d).map(|l| l.get().unwrap())
        };
        assert_eq!(
            got(&mut r, &list("unnamed", PostcardSerializer::new())).unwrap(),
            vec![after::Offset(5)]
        );
        let err = got(
            &mut r,
            &list("named", PostcardSerializer::named("src.Position")),
        )
        .err()
        .unwrap();
        assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
        assert!(err.to_string().contains("'src.Offset'"), "{err}");
        assert!(err.to_string().contains("with_alias"), "{err}");
        assert_eq!(
            got(
                &mut r,
                &list(
                    "named",
                    PostcardSerializer::named("src.Position").with_alias("src.Offset")
                )
            )
            .unwrap(),
            vec![after::Offset(5)]
        );

        // A v1 element serializer snapshot of a String list, as the fixtures hold it.
        let mut v1 = store_with(&[], &["x"]);
        v1.lists
            .get_mut(&StateName::new("seen").unwrap())
            .unwrap()
            .serializer
            .schema = b"alloc::string::String".to_vec();
        let v1 = v1.encode().unwrap();
        let strings =
            OperatorListStateDescriptor::<String>::new("seen", RedistributionMode::Union).unwrap();
        let mut r = OperatorStateStore::decode(&v1, "op").unwrap();
        assert_eq!(r.list_state(&strings).unwrap().get().unwrap(), vec!["x"]);
        let numbers =
            OperatorListStateDescriptor::<u64>::new("seen", RedistributionMode::Union).unwrap();
        let mut r = OperatorStateStore::decode(&v1, "op").unwrap();
        let err = r.list_state(&numbers).err().unwrap();
        assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
    }

    #[test]
    fn restored_elements_with_other_types_are_rejected_or_migrated() {
        let s = store_with(&[1, 2], &[]);
        let mut restored = OperatorStateStore::decode(&s.encode().unwrap(), "op").unwrap();
        let wrong =
            OperatorListStateDescriptor::<String>::new("offsets", RedistributionMode::EvenSplit)
                .unwrap();
        let err = restored.list_state(&wrong).err().unwrap();
        assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
        let migrating =
            OperatorListStateDescriptor::<String>::new("offsets", RedistributionMode::EvenSplit)
                .unwrap()
                .with_serializer(
                    PostcardSerializer::<String>::new()
                        .with_version(2)
                        .with_migration(1, |b| {
                            PostcardSerializer::<u64>::new()
                                .deserialize(b)
                                .map(|v| format!("#{v}"))
                        }),
                );
        assert_eq!(
            restored.list_state(&migrating).unwrap().get().unwrap(),
            vec!["#1", "#2"]
        );
    }
}
