//! State tables: live typed entries in one hash table per key group, copy-on-write per key group.

use std::any::Any;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::changelog::{changed_in_part, DeltaSink, TableLog, TakenChanges};
use state_api::snapshot::{payload, Decoder, RawRecord};
use state_api::{
    AggregateFunction, Clock, Error, KeyIter, MapKey, Namespace, ReduceFn, ResolvedReader, Result,
    SerializerRole, StateKey, StateKind, StateMeta, StateName, StateSerializer, StateTtlConfig,
    StateType,
};

/// The current key as the backend keeps it: the key, its stable hash and its partition.
pub(crate) struct CurrentKey<K> {
    pub key: K,
    pub hash: u64,
    pub part: usize,
}

/// The TTL timestamp an entry carries: `i64` in tables of single values (value, reducing,
/// aggregating) with TTL, nothing ([`NoTtl`]) elsewhere, so that entries of the common case stay
/// as small as key + value (16 bytes for u64 keys and values) and twice as many fit in cache.
pub(crate) trait Stamp: Copy + Send + Sync + 'static {
    /// True when the stamp stores a timestamp.
    const STORED: bool;
    fn new(ts: i64) -> Self;
    fn get(self) -> i64;
}

/// No timestamp: every entry reads as written at time 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NoTtl;

impl Stamp for NoTtl {
    const STORED: bool = false;
    #[inline]
    fn new(_: i64) -> Self {
        NoTtl
    }
    #[inline]
    fn get(self) -> i64 {
        0
    }
}

impl Stamp for i64 {
    const STORED: bool = true;
    #[inline]
    fn new(ts: i64) -> Self {
        ts
    }
    #[inline]
    fn get(self) -> i64 {
        self
    }
}

/// One entry: a (key, namespace) and what the kind stores for it. The table hash is not stored:
/// lookups compare keys, and resizing recomputes it from the key ([`KeyHasher`]: inline for
/// fixed-width integer keys, by serializing the key otherwise).
#[derive(Clone)]
pub(crate) struct Entry<K, N, S, T = NoTtl> {
    pub key: K,
    pub ns: N,
    /// TTL timestamp of single values (value, reducing, aggregating) with TTL.
    stamp: T,
    pub value: S,
}

impl<K, N, S, T: Stamp> Entry<K, N, S, T> {
    /// The TTL timestamp (0 without one).
    #[inline]
    pub fn ts(&self) -> i64 {
        self.stamp.get()
    }

    /// Sets the TTL timestamp (ignored without one).
    #[inline]
    pub fn set_ts(&mut self, ts: i64) {
        self.stamp = T::new(ts);
    }
}

/// A key group's entries and whether they were written since the last `take_dirty`.
pub(crate) struct Slot<E> {
    part: Part<E>,
    dirty: bool,
}

impl<E: Clone> Slot<E> {
    fn new() -> Self {
        Slot {
            part: Part::Owned(HashTable::new()),
            dirty: false,
        }
    }

    #[inline]
    fn get(&self) -> &HashTable<E> {
        self.part.get()
    }

    /// Mutable access for a write: marks the key group dirty, copies it if a snapshot reads it.
    #[inline]
    fn write(&mut self) -> &mut HashTable<E> {
        self.dirty = true;
        self.part.get_mut()
    }

    fn share(&mut self) -> Arc<HashTable<E>> {
        self.part.share()
    }
}

/// A key group's entries, either owned by the backend or shared with running snapshots.
pub(crate) enum Part<E> {
    Owned(HashTable<E>),
    Shared(Arc<HashTable<E>>),
}

impl<E: Clone> Part<E> {
    #[inline]
    fn get(&self) -> &HashTable<E> {
        match self {
            Part::Owned(t) => t,
            Part::Shared(t) => t,
        }
    }

    /// Mutable access; copies the key group only if a snapshot still reads it.
    #[inline]
    fn get_mut(&mut self) -> &mut HashTable<E> {
        if let Part::Shared(_) = self {
            self.unshare();
        }
        match self {
            Part::Owned(t) => t,
            Part::Shared(_) => unreachable!("made owned just above"),
        }
    }

    /// Takes the key group back from snapshots: copies it if one still reads it. Out of line
    /// and cold, so that a write to an owned key group (the common case) stays a branch.
    #[cold]
    #[inline(never)]
    fn unshare(&mut self) {
        if let Part::Shared(shared) = self {
            let shared = std::mem::take(shared);
            *self = Part::Owned(Arc::unwrap_or_clone(shared));
        }
    }

    /// Shares the key group with a snapshot (no copy).
    fn share(&mut self) -> Arc<HashTable<E>> {
        if let Part::Owned(t) = self {
            *self = Part::Shared(Arc::new(std::mem::take(t)));
        }
        match self {
            Part::Shared(t) => Arc::clone(t),
            Part::Owned(_) => unreachable!("made shared just above"),
        }
    }
}

#[inline]
fn ns_hash<N: Hash>(ns: &N) -> u64 {
    if std::mem::size_of::<N>() == 0 {
        0
    } else {
        foldhash::fast::FixedState::with_seed(0x5eed).hash_one(ns)
    }
}

/// The hash used inside a key group's table: the key's XXH3 hash itself (already well mixed;
/// the key group comes from bits 32.. so the low bits hashbrown uses still vary), combined with
/// the namespace's hash when there is a namespace.
#[inline]
fn table_hash(key_hash: u64, ns_hash: u64) -> u64 {
    key_hash ^ ns_hash.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Recomputes the table hash of an entry already in a table (on resize and rebuilds) from its
/// key: inline for integer keys written by [`state_api::FixedWidthSerializer`], otherwise by
/// serializing the key again.
#[derive(Clone)]
pub(crate) struct KeyHasher<K> {
    ser: Arc<dyn StateSerializer<K>>,
    /// True when keys are primitive integers written by the fixed-width serializer, whose
    /// stable hash [`crate::int_key_hash`] computes without the serializer.
    int_keys: bool,
}

impl<K: StateKey> KeyHasher<K> {
    pub fn new(ser: Arc<dyn StateSerializer<K>>) -> Self {
        let int_keys = crate::is_int_key::<K>() && crate::is_fixed_width_for::<K>(&ser.snapshot());
        KeyHasher { ser, int_keys }
    }

    /// The table hash of (`key`, `ns`).
    ///
    /// The key serialized once already when it became the current key; serializers are
    /// deterministic, so this cannot fail for a key in a table. Should a user serializer fail
    /// anyway, the entry gets hash 0: it stays in the table and in snapshots, and only lookups
    /// of that one key would miss it.
    #[inline]
    pub fn hash<N: Hash>(&self, key: &K, ns: &N) -> u64 {
        if self.int_keys {
            if let Some(h) = crate::int_key_hash(key) {
                return table_hash(h, ns_hash(ns));
            }
        }
        rehash(&*self.ser, key, ns)
    }
}

/// The hash of an entry from its serialized key (see [`KeyHasher::hash`]).
fn rehash<K: 'static, N: Hash>(ser: &dyn StateSerializer<K>, key: &K, ns: &N) -> u64 {
    thread_local! {
        static KEY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KEY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        match ser.serialize(key, &mut buf) {
            Ok(()) => table_hash(state_api::stable_key_hash(&buf), ns_hash(ns)),
            Err(_) => 0,
        }
    })
}

/// What differs between state kinds: the stored type, its snapshot encoding and merging.
pub(crate) trait Kind: Send + Sync + 'static {
    type Stored: Clone + Send + Sync + 'static;
    type Readers: Send + Sync + 'static;
    /// True for kinds that store one value per entry with the entry's TTL timestamp (value,
    /// reducing, aggregating); lists and maps stamp each element instead.
    const SINGLE: bool;

    fn kind(&self) -> StateKind;
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta;
    /// Appends the payload of `s`; returns false (writing nothing useful) when TTL left nothing.
    fn encode(
        &self,
        name: &StateName,
        s: &Self::Stored,
        ts: i64,
        expired: &dyn Fn(i64) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<bool>;
    fn resolve(&self, meta: &StateMeta) -> Result<Self::Readers>;
    /// Reads a payload into `(stored, ts)`; `fix_ts` adjusts restored timestamps.
    fn decode(
        &self,
        name: &StateName,
        readers: &Self::Readers,
        d: &mut Decoder<'_>,
        fix_ts: &dyn Fn(i64) -> i64,
    ) -> Result<(Self::Stored, i64)>;
    /// Aggregating state only: the result of an accumulator, written into `out` (an `Option<OUT>`).
    fn aggregate_result(
        &self,
        name: &StateName,
        _acc: Option<&Self::Stored>,
        _out: &mut dyn Any,
    ) -> Result<()> {
        Err(Error::StateKindMismatch {
            state: name.to_string(),
            existing: self.kind(),
            requested: StateKind::Aggregating,
        })
    }
    /// Aggregating state only: adds the input taken from `value` (an `Option<IN>`) to `acc`.
    fn aggregate_add(
        &self,
        name: &StateName,
        _acc: Option<Self::Stored>,
        _value: &mut dyn Any,
    ) -> Result<Self::Stored> {
        Err(Error::StateKindMismatch {
            state: name.to_string(),
            existing: self.kind(),
            requested: StateKind::Aggregating,
        })
    }
    /// True when something stored has expired (the value, or any element).
    fn any_expired(&self, _s: &Self::Stored, ts: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        expired(ts)
    }
    /// Drops expired elements; returns true when the whole entry is dead.
    fn drop_expired(&self, _s: &mut Self::Stored, ts: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        expired(ts)
    }
    /// Sets every element's TTL timestamp to `now` (lists and maps, when TTL is switched on;
    /// single values carry theirs in the entry).
    fn stamp_elements(&self, _s: &mut Self::Stored, _now: i64) {}
    /// Combines two stored values when namespaces are merged.
    fn merge(&self, name: &StateName, _a: Self::Stored, _b: Self::Stored) -> Result<Self::Stored> {
        Err(Error::Unsupported {
            state: name.to_string(),
            reason: format!("{} state cannot merge namespaces", self.kind()),
        })
    }
}

fn ser_err<'a>(
    name: &'a StateName,
    what: &'static str,
) -> impl Fn(state_api::SerdeError) -> Error + 'a {
    move |e| Error::Serialize {
        state: name.to_string(),
        what,
        reason: e.0,
    }
}

fn de_err<'a>(
    name: &'a StateName,
    what: &'static str,
) -> impl Fn(state_api::SerdeError) -> Error + 'a {
    move |e| Error::Deserialize {
        state: name.to_string(),
        what,
        reason: e.0,
    }
}

fn meta_of(
    name: &StateName,
    kind: StateKind,
    ttl: Option<&StateTtlConfig>,
    serializers: Vec<(SerializerRole, state_api::SerializerSnapshot)>,
) -> StateMeta {
    StateMeta {
        name: name.clone(),
        kind,
        ttl_millis: ttl.map(|t| t.ttl_millis()),
        serializers,
    }
}

/// Encoding shared by value, reducing and aggregating state: one value and its timestamp.
fn encode_single<T: 'static>(
    name: &StateName,
    ser: &Arc<dyn StateSerializer<T>>,
    v: &T,
    ts: i64,
    expired: &dyn Fn(i64) -> bool,
    out: &mut Vec<u8>,
) -> Result<bool> {
    if expired(ts) {
        return Ok(false);
    }
    payload::single(out, ts, |o| {
        ser.serialize(v, o).map_err(ser_err(name, "value"))
    })?;
    Ok(true)
}

fn decode_single<T: 'static>(
    name: &StateName,
    reader: &ResolvedReader<T>,
    d: &mut Decoder<'_>,
    fix_ts: &dyn Fn(i64) -> i64,
) -> Result<(T, i64)> {
    let (ts, bytes) = payload::decode_single(d)?;
    let v = reader.read(bytes).map_err(de_err(name, "value"))?;
    Ok((v, fix_ts(ts)))
}

/// The methods value, reducing and aggregating state share: one value of type `$t` stored
/// with its timestamp, serialized by `self.ser`.
macro_rules! single_value_methods {
    ($t:ty) => {
        fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
            meta_of(
                name,
                self.kind(),
                ttl,
                vec![(SerializerRole::Value, self.ser.snapshot())],
            )
        }
        fn encode(
            &self,
            name: &StateName,
            s: &$t,
            ts: i64,
            expired: &dyn Fn(i64) -> bool,
            out: &mut Vec<u8>,
        ) -> Result<bool> {
            encode_single(name, &self.ser, s, ts, expired, out)
        }
        fn resolve(&self, meta: &StateMeta) -> Result<Self::Readers> {
            meta.reader_for(SerializerRole::Value, &self.ser)
        }
        fn decode(
            &self,
            name: &StateName,
            r: &Self::Readers,
            d: &mut Decoder<'_>,
            fix_ts: &dyn Fn(i64) -> i64,
        ) -> Result<($t, i64)> {
            decode_single(name, r, d, fix_ts)
        }
    };
}

pub(crate) struct ValueKind<V> {
    pub ser: Arc<dyn StateSerializer<V>>,
    pub default: Option<V>,
}

impl<V: StateType> Kind for ValueKind<V> {
    type Stored = V;
    type Readers = ResolvedReader<V>;
    const SINGLE: bool = true;
    fn kind(&self) -> StateKind {
        StateKind::Value
    }
    single_value_methods!(V);
}

pub(crate) struct ReducingKind<T> {
    pub ser: Arc<dyn StateSerializer<T>>,
    pub reduce: ReduceFn<T>,
}

impl<T: StateType> Kind for ReducingKind<T> {
    type Stored = T;
    type Readers = ResolvedReader<T>;
    const SINGLE: bool = true;
    fn kind(&self) -> StateKind {
        StateKind::Reducing
    }
    single_value_methods!(T);
    fn merge(&self, _: &StateName, a: T, b: T) -> Result<T> {
        Ok((self.reduce)(a, b))
    }
}

pub(crate) struct AggregatingKind<IN, ACC, OUT> {
    pub ser: Arc<dyn StateSerializer<ACC>>,
    pub func: Arc<dyn AggregateFunction<IN, ACC, OUT>>,
}

impl<IN: 'static, ACC: StateType, OUT: 'static> Kind for AggregatingKind<IN, ACC, OUT> {
    type Stored = ACC;
    type Readers = ResolvedReader<ACC>;
    const SINGLE: bool = true;
    fn kind(&self) -> StateKind {
        StateKind::Aggregating
    }
    single_value_methods!(ACC);
    fn merge(&self, _: &StateName, a: ACC, b: ACC) -> Result<ACC> {
        Ok(self.func.merge(a, b))
    }
    fn aggregate_result(
        &self,
        name: &StateName,
        acc: Option<&ACC>,
        out: &mut dyn Any,
    ) -> Result<()> {
        let out = out
            .downcast_mut::<Option<OUT>>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: name.to_string(),
                reason: "the output type differs from the registered one".into(),
            })?;
        *out = acc.map(|a| self.func.get_result(a));
        Ok(())
    }
    fn aggregate_add(
        &self,
        name: &StateName,
        acc: Option<ACC>,
        value: &mut dyn Any,
    ) -> Result<ACC> {
        let value = value
            .downcast_mut::<Option<IN>>()
            .and_then(Option::take)
            .ok_or_else(|| Error::StateTypeMismatch {
                state: name.to_string(),
                reason: "the input type differs from the registered one".into(),
            })?;
        let acc = acc.unwrap_or_else(|| self.func.create_accumulator());
        Ok(self.func.add(value, acc))
    }
}

/// List state. Each element carries stamp `S`: its TTL timestamp (`i64`) when the state has a
/// TTL, nothing ([`NoTtl`]) otherwise, so that a list of `u64` without TTL takes 8 bytes an
/// element and the user's `Vec` becomes the stored list without a copy.
pub(crate) struct ListKind<T, S = NoTtl> {
    pub ser: Arc<dyn StateSerializer<T>>,
    pub stamp: std::marker::PhantomData<fn() -> S>,
}

impl<T, S> ListKind<T, S> {
    pub fn new(ser: Arc<dyn StateSerializer<T>>) -> Self {
        ListKind {
            ser,
            stamp: std::marker::PhantomData,
        }
    }
}

impl<T: StateType, S: Stamp> Kind for ListKind<T, S> {
    /// Elements with their stamps.
    type Stored = Vec<(T, S)>;
    type Readers = ResolvedReader<T>;
    const SINGLE: bool = false;
    fn kind(&self) -> StateKind {
        StateKind::List
    }
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            self.kind(),
            ttl,
            vec![(SerializerRole::Value, self.ser.snapshot())],
        )
    }
    fn encode(
        &self,
        name: &StateName,
        s: &Self::Stored,
        _ts: i64,
        expired: &dyn Fn(i64) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let live = if S::STORED {
            s.iter().filter(|(_, ts)| !expired(ts.get())).count()
        } else if s.is_empty() || expired(0) {
            0
        } else {
            s.len()
        };
        if live == 0 {
            return Ok(false);
        }
        payload::count(out, live as u32);
        for (v, ts) in s.iter().filter(|(_, ts)| !S::STORED || !expired(ts.get())) {
            payload::list_element(out, ts.get(), |o| {
                self.ser
                    .serialize(v, o)
                    .map_err(ser_err(name, "list element"))
            })?;
        }
        Ok(true)
    }
    fn resolve(&self, meta: &StateMeta) -> Result<Self::Readers> {
        meta.reader_for(SerializerRole::Value, &self.ser)
    }
    fn decode(
        &self,
        name: &StateName,
        r: &Self::Readers,
        d: &mut Decoder<'_>,
        fix_ts: &dyn Fn(i64) -> i64,
    ) -> Result<(Self::Stored, i64)> {
        let items = payload::decode_list(d)?;
        let mut out = Vec::with_capacity(items.len());
        for (ts, b) in items {
            out.push((
                r.read(b).map_err(de_err(name, "list element"))?,
                S::new(fix_ts(ts)),
            ));
        }
        Ok((out, 0))
    }
    fn merge(&self, _: &StateName, mut a: Self::Stored, b: Self::Stored) -> Result<Self::Stored> {
        a.extend(b);
        Ok(a)
    }
    fn any_expired(&self, s: &Self::Stored, _: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        s.iter().any(|(_, ts)| expired(ts.get()))
    }
    fn drop_expired(&self, s: &mut Self::Stored, _: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        s.retain(|(_, ts)| !expired(ts.get()));
        s.is_empty()
    }
    fn stamp_elements(&self, s: &mut Self::Stored, now: i64) {
        s.iter_mut().for_each(|(_, ts)| *ts = S::new(now));
    }
}

/// A map state's entries: user key to user value and stamp (`i64` TTL timestamp or nothing).
pub(crate) type MapStore<UK, UV, S = NoTtl> = crate::small_map::SmallMap<UK, (UV, S)>;

/// Map state, entries stamped `S` as list elements are (see [`ListKind`]).
pub(crate) struct MapKind<UK, UV, S = NoTtl> {
    pub key_ser: Arc<dyn StateSerializer<UK>>,
    pub value_ser: Arc<dyn StateSerializer<UV>>,
    pub stamp: std::marker::PhantomData<fn() -> S>,
}

impl<UK, UV, S> MapKind<UK, UV, S> {
    pub fn new(
        key_ser: Arc<dyn StateSerializer<UK>>,
        value_ser: Arc<dyn StateSerializer<UV>>,
    ) -> Self {
        MapKind {
            key_ser,
            value_ser,
            stamp: std::marker::PhantomData,
        }
    }
}

impl<UK: MapKey, UV: StateType, S: Stamp> Kind for MapKind<UK, UV, S> {
    type Stored = MapStore<UK, UV, S>;
    type Readers = (ResolvedReader<UK>, ResolvedReader<UV>);
    const SINGLE: bool = false;
    fn kind(&self) -> StateKind {
        StateKind::Map
    }
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            self.kind(),
            ttl,
            vec![
                (SerializerRole::UserKey, self.key_ser.snapshot()),
                (SerializerRole::UserValue, self.value_ser.snapshot()),
            ],
        )
    }
    fn encode(
        &self,
        name: &StateName,
        s: &Self::Stored,
        _ts: i64,
        expired: &dyn Fn(i64) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let live = if S::STORED {
            s.values().filter(|(_, ts)| !expired(ts.get())).count()
        } else if s.is_empty() || expired(0) {
            0
        } else {
            s.len()
        };
        if live == 0 {
            return Ok(false);
        }
        payload::count(out, live as u32);
        for (k, (v, ts)) in s
            .iter()
            .filter(|(_, (_, ts))| !S::STORED || !expired(ts.get()))
        {
            payload::map_entry(
                out,
                ts.get(),
                |o| {
                    self.key_ser
                        .serialize(k, o)
                        .map_err(ser_err(name, "map user key"))
                },
                |o| {
                    self.value_ser
                        .serialize(v, o)
                        .map_err(ser_err(name, "map user value"))
                },
            )?;
        }
        Ok(true)
    }
    fn resolve(&self, meta: &StateMeta) -> Result<Self::Readers> {
        Ok((
            meta.reader_for(SerializerRole::UserKey, &self.key_ser)?,
            meta.reader_for(SerializerRole::UserValue, &self.value_ser)?,
        ))
    }
    fn decode(
        &self,
        name: &StateName,
        (kr, vr): &Self::Readers,
        d: &mut Decoder<'_>,
        fix_ts: &dyn Fn(i64) -> i64,
    ) -> Result<(Self::Stored, i64)> {
        let items = payload::decode_map(d)?;
        let mut out = MapStore::with_capacity(items.len());
        for (ts, k, v) in items {
            let k = kr.read(k).map_err(de_err(name, "map user key"))?;
            let v = vr.read(v).map_err(de_err(name, "map user value"))?;
            out.insert(k, (v, S::new(fix_ts(ts))));
        }
        Ok((out, 0))
    }
    fn any_expired(&self, s: &Self::Stored, _: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        s.values().any(|(_, ts)| expired(ts.get()))
    }
    fn drop_expired(&self, s: &mut Self::Stored, _: i64, expired: &dyn Fn(i64) -> bool) -> bool {
        s.retain(|_, (_, ts)| !expired(ts.get()));
        s.is_empty()
    }
    fn stamp_elements(&self, s: &mut Self::Stored, now: i64) {
        s.values_mut().for_each(|(_, ts)| *ts = S::new(now));
    }
}

/// Readers resolved for one restored stream of a state.
pub(crate) struct RestoreReaders<N, R> {
    ns: ResolvedReader<N>,
    kind: R,
    /// True when the snapshot had no TTL but the state has one now: stamp restored entries.
    stamp_now: bool,
}

/// One state: a hash table of entries per key group of the backend's range.
pub(crate) struct Table<K, N, KD: Kind, T: Stamp = NoTtl> {
    pub name: StateName,
    pub kind: Arc<KD>,
    pub ttl: Option<StateTtlConfig>,
    pub ns_ser: Arc<dyn StateSerializer<N>>,
    /// The backend's key serializer: recomputes hashes when a table grows.
    key_ser: KeyHasher<K>,
    /// Per key group of the range: entries, and whether written since the last `take_dirty`
    /// (for incremental snapshots).
    parts: Vec<Slot<Entry<K, N, KD::Stored, T>>>,
    /// Changed (key, namespace) per key group, once change tracking is on (delta snapshots).
    log: TableLog<K, N>,
    readers: Option<RestoreReaders<N, KD::Readers>>,
    /// Incremental TTL cleanup: entries still to check, and the next partition to scan.
    cleanup_queue: Vec<(usize, K, N)>,
    cleanup_next_part: usize,
}

/// Entries of a table with stamp `T`.
type Entries<K, N, KD, T> = HashTable<Entry<K, N, <KD as Kind>::Stored, T>>;

impl<K: StateKey, N: Namespace, KD: Kind, T: Stamp> Table<K, N, KD, T> {
    pub fn new(
        name: StateName,
        kind: Arc<KD>,
        ttl: Option<StateTtlConfig>,
        ns_ser: Arc<dyn StateSerializer<N>>,
        key_ser: KeyHasher<K>,
        parts: usize,
    ) -> Self {
        Table {
            name,
            kind,
            ttl,
            ns_ser,
            key_ser,
            parts: (0..parts).map(|_| Slot::new()).collect(),
            log: TableLog::new(),
            readers: None,
            cleanup_queue: Vec::new(),
            cleanup_next_part: 0,
        }
    }

    /// The same entries in a table with another stamp type (TTL switched on or off by a
    /// re-registration): entries gaining a timestamp get `now`.
    pub fn restamp<U: Stamp>(
        &self,
        kind: Arc<KD>,
        ttl: Option<StateTtlConfig>,
        now: i64,
    ) -> Table<K, N, KD, U> {
        self.rebuild(kind, ttl, |e| {
            let ts = if T::STORED { e.ts() } else { now };
            (U::new(ts), e.value.clone())
        })
    }

    /// The same entries under another kind whose stored values `convert` makes from these
    /// (a list or map state whose elements gain or lose their TTL stamps on re-registration).
    pub fn convert_kind<KD2: Kind>(
        &self,
        kind: Arc<KD2>,
        ttl: Option<StateTtlConfig>,
        convert: impl Fn(&KD::Stored) -> KD2::Stored,
    ) -> Table<K, N, KD2, T> {
        self.rebuild(kind, ttl, |e| (e.stamp, convert(&e.value)))
    }

    /// A new table of kind `KD2` and stamp `U` with an entry made by `make` (its stamp and
    /// stored value) for each of these; every key group counts as replaced for delta
    /// snapshots.
    fn rebuild<KD2: Kind, U: Stamp>(
        &self,
        kind: Arc<KD2>,
        ttl: Option<StateTtlConfig>,
        make: impl Fn(&Entry<K, N, KD::Stored, T>) -> (U, KD2::Stored),
    ) -> Table<K, N, KD2, U> {
        let mut t = Table::new(
            self.name.clone(),
            kind,
            ttl,
            Arc::clone(&self.ns_ser),
            self.key_ser.clone(),
            self.parts.len(),
        );
        for (i, part) in self.parts.iter().enumerate() {
            let src = part.get();
            let dst = t.parts[i].write();
            dst.reserve(src.len(), |e| self.key_ser.hash(&e.key, &e.ns));
            for e in src.iter() {
                let h = self.key_ser.hash(&e.key, &e.ns);
                let (stamp, value) = make(e);
                dst.insert_unique(
                    h,
                    Entry {
                        key: e.key.clone(),
                        ns: e.ns.clone(),
                        stamp,
                        value,
                    },
                    |x| self.key_ser.hash(&x.key, &x.ns),
                );
            }
            t.parts[i].dirty = part.dirty || !src.is_empty();
        }
        t.log = self.log.all_replaced();
        t
    }

    /// Stamps every list element and map entry with `now` (their TTL was just switched on:
    /// until then they carried 0, which would expire them at once).
    pub fn stamp_elements(&mut self, now: i64) {
        for (i, slot) in self.parts.iter_mut().enumerate() {
            if slot.get().is_empty() {
                continue;
            }
            for e in slot.write().iter_mut() {
                self.kind.stamp_elements(&mut e.value, now);
            }
            self.log.part_replaced(i);
        }
    }

    pub fn meta(&self) -> StateMeta {
        let mut m = self.kind.meta(&self.name, self.ttl.as_ref());
        m.serializers
            .insert(0, (SerializerRole::Namespace, self.ns_ser.snapshot()));
        m
    }

    /// The number of key groups (partitions) of the table: the backend's range.
    #[inline]
    pub fn parts_len(&self) -> usize {
        self.parts.len()
    }

    #[inline]
    pub fn find(&self, cur: &CurrentKey<K>, ns: &N) -> Option<&Entry<K, N, KD::Stored, T>> {
        let h = table_hash(cur.hash, ns_hash(ns));
        self.parts[cur.part]
            .get()
            .find(h, |e| e.key == cur.key && e.ns == *ns)
    }

    #[inline]
    pub fn find_mut(
        &mut self,
        cur: &CurrentKey<K>,
        ns: &N,
    ) -> Option<&mut Entry<K, N, KD::Stored, T>> {
        let h = table_hash(cur.hash, ns_hash(ns));
        self.log.record(cur.part, h, &cur.key, ns, || {
            self.parts[cur.part].get().len()
        });
        self.parts[cur.part]
            .write()
            .find_mut(h, |e| e.key == cur.key && e.ns == *ns)
    }

    /// Inserts or replaces the entry of (current key, ns). Always inlined: the replace path
    /// is a probe and two stores, and a call around it would cost as much again.
    #[inline(always)]
    pub fn put(&mut self, cur: &CurrentKey<K>, ns: &N, ts: i64, value: KD::Stored) {
        let h = table_hash(cur.hash, ns_hash(ns));
        self.log.record(cur.part, h, &cur.key, ns, || {
            self.parts[cur.part].get().len()
        });
        let t = self.parts[cur.part].write();
        match t.find_mut(h, |e| e.key == cur.key && e.ns == *ns) {
            Some(e) => {
                e.value = value;
                e.stamp = T::new(ts);
            }
            None => self.insert_new(cur, ns, h, ts, value),
        }
    }

    /// The insert half of [`Self::put`], out of line so the update path stays small.
    #[inline(never)]
    fn insert_new(&mut self, cur: &CurrentKey<K>, ns: &N, h: u64, ts: i64, value: KD::Stored) {
        let key_ser = &self.key_ser;
        self.parts[cur.part].write().insert_unique(
            h,
            Entry {
                key: cur.key.clone(),
                ns: ns.clone(),
                stamp: T::new(ts),
                value,
            },
            |e| key_ser.hash(&e.key, &e.ns),
        );
    }

    /// Removes and returns the entry of (current key, ns).
    pub fn remove(&mut self, cur: &CurrentKey<K>, ns: &N) -> Option<Entry<K, N, KD::Stored, T>> {
        let h = table_hash(cur.hash, ns_hash(ns));
        // Avoid copying a shared key group when there is nothing to remove.
        self.parts[cur.part]
            .get()
            .find(h, |e| e.key == cur.key && e.ns == *ns)?;
        self.log.record(cur.part, h, &cur.key, ns, || {
            self.parts[cur.part].get().len()
        });
        self.parts[cur.part]
            .write()
            .find_entry(h, |e| e.key == cur.key && e.ns == *ns)
            .ok()
            .map(|o| o.remove().0)
    }

    /// Keys with an entry in `ns`.
    pub fn keys_in(&self, ns: N) -> impl Iterator<Item = K> + '_ {
        self.parts
            .iter()
            .flat_map(|p| p.get().iter())
            .filter(move |e| e.ns == ns)
            .map(|e| e.key.clone())
    }

    /// Number of (key, namespace) entries.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.get().len()).sum()
    }

    /// Shares every key group with a snapshot.
    pub fn share_all(&mut self) -> Vec<Arc<Entries<K, N, KD, T>>> {
        self.parts.iter_mut().map(Slot::share).collect()
    }

    /// Returns and resets the per-partition "written since last time" flags.
    pub fn take_dirty(&mut self) -> Vec<bool> {
        self.parts
            .iter_mut()
            .map(|p| std::mem::replace(&mut p.dirty, false))
            .collect()
    }

    /// Runs incremental TTL cleanup on up to `n` entries.
    pub fn incremental_cleanup(&mut self, n: usize, now: i64) {
        let Some(ttl) = self.ttl else { return };
        for _ in 0..n {
            if self.cleanup_queue.is_empty() {
                let p = self.cleanup_next_part % self.parts.len().max(1);
                self.cleanup_next_part = p + 1;
                let Some(part) = self.parts.get(p) else {
                    return;
                };
                self.cleanup_queue
                    .extend(part.get().iter().map(|e| (p, e.key.clone(), e.ns.clone())));
                if self.cleanup_queue.is_empty() {
                    continue;
                }
            }
            let Some((p, key, ns)) = self.cleanup_queue.pop() else {
                return;
            };
            let h = self.key_ser.hash(&key, &ns);
            let eq = |e: &Entry<K, N, KD::Stored, T>| e.key == key && e.ns == ns;
            let Some(e) = self.parts[p].get().find(h, eq) else {
                continue;
            };
            let expired = |ts: i64| ttl.is_expired(ts, now);
            if !self.kind.any_expired(&e.value, e.ts(), &expired) {
                continue;
            }
            self.log
                .record(p, h, &key, &ns, || self.parts[p].get().len());
            let t = self.parts[p].write();
            if let Ok(occ) = t.find_entry(h, eq) {
                let entry = occ.into_mut();
                let ts = entry.ts();
                if self.kind.drop_expired(&mut entry.value, ts, &expired) {
                    if let Ok(occ) = t.find_entry(h, eq) {
                        occ.remove();
                    }
                }
            }
        }
    }

    fn downcast_ns(&self, ns: &dyn Any) -> Result<N> {
        ns.downcast_ref::<N>()
            .cloned()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: self.name.to_string(),
                reason: "namespace type differs from the registered one".into(),
            })
    }
}

/// Decodes a restored record of state `name` with the readers prepared for its stream; returns
/// its table hash and entry.
fn decode_entry<K: StateKey, N: Namespace, KD: Kind, T: Stamp>(
    name: &StateName,
    kind: &KD,
    readers: Option<&RestoreReaders<N, KD::Readers>>,
    key: K,
    record: &RawRecord<'_>,
    stream: &str,
    now: i64,
) -> Result<(u64, Entry<K, N, KD::Stored, T>)> {
    let readers = readers.ok_or_else(|| Error::RestoreMismatch {
        reason: format!("state '{name}' has no restore serializers prepared"),
    })?;
    let ns = readers
        .ns
        .read(record.namespace)
        .map_err(de_err(name, "namespace"))?;
    let stamp = readers.stamp_now;
    let fix = move |ts: i64| if stamp { now } else { ts };
    let mut d = Decoder::new(record.payload, record.payload_offset, stream);
    let (value, ts) = kind.decode(name, &readers.kind, &mut d, &fix)?;
    let h = table_hash(state_api::stable_key_hash(record.key), ns_hash(&ns));
    Ok((
        h,
        Entry {
            key,
            ns,
            stamp: T::new(ts),
            value,
        },
    ))
}

/// The readers of a restored stream's state for a table of this kind (`prepare_restore`).
fn restore_readers<N: Namespace, KD: Kind>(
    name: &StateName,
    kind: &KD,
    ttl: Option<StateTtlConfig>,
    ns_ser: &Arc<dyn StateSerializer<N>>,
    meta: &StateMeta,
) -> Result<RestoreReaders<N, KD::Readers>> {
    if meta.kind != kind.kind() {
        return Err(Error::StateKindMismatch {
            state: name.to_string(),
            existing: meta.kind,
            requested: kind.kind(),
        });
    }
    let ns = meta.reader_for(SerializerRole::Namespace, ns_ser)?;
    Ok(RestoreReaders {
        ns,
        kind: kind.resolve(meta)?,
        stamp_now: meta.ttl_millis.is_none() && ttl.is_some(),
    })
}

/// Restores records into the key groups of one table that one thread of a parallel restore
/// owns (partitions `p` with `p % workers == worker`): threads decode and insert side by side
/// without sharing a key group.
pub(crate) trait PartSink<K>: Send {
    /// Prepares the serializers of a stream's state before its records.
    fn prepare(&mut self, meta: &StateMeta) -> Result<()>;
    /// Makes room for `additional` more entries in partition `part`.
    fn reserve(&mut self, part: usize, additional: usize);
    /// Decodes a record of partition `part` and inserts it (replacing an equal key and
    /// namespace).
    fn restore(
        &mut self,
        part: usize,
        key: K,
        record: &RawRecord<'_>,
        stream: &str,
        now: i64,
    ) -> Result<()>;
}

/// A [`PartSink`] over a [`Table`]'s partitions.
struct Sink<'a, K, N, KD: Kind, T: Stamp> {
    name: &'a StateName,
    kind: &'a KD,
    ttl: Option<StateTtlConfig>,
    ns_ser: &'a Arc<dyn StateSerializer<N>>,
    key_ser: &'a KeyHasher<K>,
    readers: Option<RestoreReaders<N, KD::Readers>>,
    workers: usize,
    worker: usize,
    /// Partition `p` of the table at `p / workers`.
    slots: Vec<&'a mut Slot<Entry<K, N, KD::Stored, T>>>,
}

impl<K: StateKey, N: Namespace, KD: Kind, T: Stamp> Sink<'_, K, N, KD, T> {
    fn slot(&mut self, part: usize) -> Result<&mut HashTable<Entry<K, N, KD::Stored, T>>> {
        let name = self.name;
        let (workers, worker) = (self.workers, self.worker);
        match self.slots.get_mut(part / workers) {
            Some(slot) if part % workers == worker => Ok(slot.write()),
            _ => Err(Error::RestoreMismatch {
                reason: format!(
                    "state '{name}': a record of key-group position {part} outside the backend's \
                     range"
                ),
            }),
        }
    }
}

impl<K: StateKey, N: Namespace, KD: Kind, T: Stamp> PartSink<K> for Sink<'_, K, N, KD, T> {
    fn prepare(&mut self, meta: &StateMeta) -> Result<()> {
        self.readers = Some(restore_readers(
            self.name,
            self.kind,
            self.ttl,
            self.ns_ser,
            meta,
        )?);
        Ok(())
    }

    fn reserve(&mut self, part: usize, additional: usize) {
        let key_ser = self.key_ser;
        if let Ok(t) = self.slot(part) {
            t.reserve(additional, |x| key_ser.hash(&x.key, &x.ns));
        }
    }

    fn restore(
        &mut self,
        part: usize,
        key: K,
        record: &RawRecord<'_>,
        stream: &str,
        now: i64,
    ) -> Result<()> {
        let (h, e) = decode_entry::<K, N, KD, T>(
            self.name,
            self.kind,
            self.readers.as_ref(),
            key,
            record,
            stream,
            now,
        )?;
        let key_ser = self.key_ser;
        let t = self.slot(part)?;
        match t.find_mut(h, |x| x.key == e.key && x.ns == e.ns) {
            Some(x) => *x = e,
            None => {
                t.insert_unique(h, e, |x| key_ser.hash(&x.key, &x.ns));
            }
        }
        Ok(())
    }
}

/// A clock as the access paths take it: the backend passes its `Arc<dyn Clock>` itself, which
/// is dereferenced only when a state with TTL reads the time (not on every access).
pub(crate) trait Now {
    /// The clock's time in milliseconds.
    fn now(&self) -> i64;
}

impl Now for dyn Clock + '_ {
    #[inline]
    fn now(&self) -> i64 {
        self.now_millis()
    }
}

impl Now for Arc<dyn Clock> {
    #[inline]
    fn now(&self) -> i64 {
        self.now_millis()
    }
}

/// Reads a single value (value, reducing, aggregating) with TTL semantics.
/// `for_update` treats expired values as absent whatever the visibility (Flink's TTL states do).
#[inline]
pub(crate) fn read_single<K: StateKey, N: Namespace, KD: Kind, T: Stamp, C: Now + ?Sized>(
    t: &mut Table<K, N, KD, T>,
    cur: &CurrentKey<K>,
    ns: &N,
    clock: &C,
    for_update: bool,
) -> Option<KD::Stored> {
    let ttl = match t.ttl {
        Some(ttl) if T::STORED => ttl,
        _ => return t.find(cur, ns).map(|e| e.value.clone()),
    };
    let now = clock.now();
    after_access(t, now);
    let e = t.find(cur, ns)?;
    if ttl.is_expired(e.ts(), now) {
        let e = t.remove(cur, ns)?;
        return (ttl.returns_expired() && !for_update).then_some(e.value);
    }
    if ttl.refresh_on_read() && !for_update {
        let e = t.find_mut(cur, ns)?;
        e.set_ts(now);
        return Some(e.value.clone());
    }
    Some(e.value.clone())
}

#[inline]
pub(crate) fn after_access<K: StateKey, N: Namespace, KD: Kind, T: Stamp>(
    t: &mut Table<K, N, KD, T>,
    now: i64,
) {
    if let Some(inc) = t.ttl.and_then(|c| c.incremental_cleanup()) {
        t.incremental_cleanup(inc.cleanup_size, now);
    }
}

/// The timestamp written with a value: now with TTL, 0 without.
#[inline]
pub(crate) fn write_ts<K: StateKey, N: Namespace, KD: Kind, T: Stamp, C: Now + ?Sized>(
    t: &mut Table<K, N, KD, T>,
    clock: &C,
) -> i64 {
    if KD::SINGLE && !T::STORED {
        // A single value with TTL is registered with stamped entries: none here.
        return 0;
    }
    match t.ttl {
        Some(_) => {
            let now = clock.now();
            after_access(t, now);
            now
        }
        None => 0,
    }
}

/// The type-erased face of a table, for operations that do not know the value types.
pub(crate) trait ErasedTable<K>: Any + Send {
    fn name(&self) -> &StateName;
    fn state_kind(&self) -> StateKind;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn len(&self) -> usize;
    fn clear(&mut self, cur: &CurrentKey<K>, ns: &dyn Any) -> Result<()>;
    fn keys(&self, ns: &dyn Any) -> Result<KeyIter<'_, K>>;
    fn merge(
        &mut self,
        cur: &CurrentKey<K>,
        target: &dyn Any,
        sources: &dyn Any,
        now: i64,
    ) -> Result<()>;
    fn share(&mut self) -> Box<dyn SharedTable>;
    fn aggregate_get(
        &mut self,
        cur: &CurrentKey<K>,
        ns: &dyn Any,
        out: &mut dyn Any,
        clock: &dyn Clock,
    ) -> Result<()>;
    fn aggregate_add(
        &mut self,
        cur: &CurrentKey<K>,
        ns: &dyn Any,
        value: &mut dyn Any,
        clock: &dyn Clock,
    ) -> Result<()>;
    fn take_dirty(&mut self) -> Vec<bool>;
    /// Starts logging changed entries (delta snapshots).
    fn track_changes(&mut self);
    /// Takes the change logs; `None` when not tracking.
    fn take_changes(&mut self) -> Option<Box<dyn TakenChanges>>;
    fn incremental_cleanup(&mut self, now: i64, per_record: bool);
    fn prepare_restore(&mut self, meta: &StateMeta) -> Result<()>;
    /// One [`PartSink`] per thread of a parallel restore, sink `w` owning partitions `p` with
    /// `p % workers == w`.
    fn split_restore(&mut self, workers: usize) -> Vec<Box<dyn PartSink<K> + '_>>;
    /// After a parallel restore: the change log counts every written key group as replaced.
    fn log_written_parts(&mut self);
}

/// A table's key groups as captured by a snapshot; written on any thread.
pub(crate) trait SharedTable: Send + Sync {
    fn meta(&self) -> StateMeta;
    /// Writes the records of partition `part`: `write` gets the key, the namespace bytes and a
    /// function that appends the payload (false: the entry expired, drop the record).
    fn write_part(&self, part: usize, now: i64, write: &mut RecordSink<'_>) -> Result<()>;
    /// Delta snapshots: writes the entries of partition `part` named in `logs` (this state's
    /// change logs), present ones as records, absent or expired ones as tombstones.
    fn write_changed(
        &self,
        part: usize,
        logs: &[&dyn TakenChanges],
        now: i64,
        sink: &mut dyn DeltaSink,
    ) -> Result<()>;
}

/// Receives the records of a partition: key, namespace bytes, payload writer.
pub(crate) type RecordSink<'a> =
    dyn FnMut(&dyn Any, &[u8], &mut dyn FnMut(&mut Vec<u8>) -> Result<bool>) -> Result<()> + 'a;

struct Shared<K, N, KD: Kind, T: Stamp> {
    meta: StateMeta,
    name: StateName,
    kind: Arc<KD>,
    ttl: Option<StateTtlConfig>,
    ns_ser: Arc<dyn StateSerializer<N>>,
    parts: Vec<Arc<Entries<K, N, KD, T>>>,
}

impl<K: StateKey, N: Namespace, KD: Kind, T: Stamp> SharedTable for Shared<K, N, KD, T> {
    fn meta(&self) -> StateMeta {
        self.meta.clone()
    }

    fn write_part(&self, part: usize, now: i64, write: &mut RecordSink<'_>) -> Result<()> {
        let Some(entries) = self.parts.get(part) else {
            return Ok(());
        };
        let ttl = self.ttl.filter(|t| t.is_cleanup_full_snapshot());
        let expired = move |ts: i64| ttl.is_some_and(|t| t.is_expired(ts, now));
        let mut ns_buf = Vec::new();
        let zero_sized_ns = std::mem::size_of::<N>() == 0;
        for (i, e) in entries.iter().enumerate() {
            // A zero-sized namespace serializes the same every time: once is enough.
            if i == 0 || !zero_sized_ns {
                ns_buf.clear();
                self.ns_ser
                    .serialize(&e.ns, &mut ns_buf)
                    .map_err(ser_err(&self.name, "namespace"))?;
            }
            // The payload goes straight into the snapshot's block (no intermediate copy).
            write(&e.key, &ns_buf, &mut |out: &mut Vec<u8>| {
                self.kind
                    .encode(&self.name, &e.value, e.ts(), &expired, out)
            })?;
        }
        Ok(())
    }

    fn write_changed(
        &self,
        part: usize,
        logs: &[&dyn TakenChanges],
        now: i64,
        sink: &mut dyn DeltaSink,
    ) -> Result<()> {
        let Some(entries) = self.parts.get(part) else {
            return Ok(());
        };
        let ttl = self.ttl.filter(|t| t.is_cleanup_full_snapshot());
        let expired = move |ts: i64| ttl.is_some_and(|t| t.is_expired(ts, now));
        let mut ns_buf = Vec::new();
        for (h, key, ns) in changed_in_part::<K, N>(logs, part) {
            ns_buf.clear();
            self.ns_ser
                .serialize(&ns, &mut ns_buf)
                .map_err(ser_err(&self.name, "namespace"))?;
            match entries.find(h, |e| e.key == key && e.ns == ns) {
                Some(e) => sink.record(&e.key, &ns_buf, &mut |out: &mut Vec<u8>| {
                    self.kind
                        .encode(&self.name, &e.value, e.ts(), &expired, out)
                })?,
                None => sink.tombstone(&key, &ns_buf)?,
            }
        }
        Ok(())
    }
}

impl<K: StateKey, N: Namespace, KD: Kind, T: Stamp> ErasedTable<K> for Table<K, N, KD, T> {
    fn name(&self) -> &StateName {
        &self.name
    }
    fn state_kind(&self) -> StateKind {
        self.kind.kind()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn len(&self) -> usize {
        Table::len(self)
    }

    fn clear(&mut self, cur: &CurrentKey<K>, ns: &dyn Any) -> Result<()> {
        let ns = ns
            .downcast_ref::<N>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: self.name.to_string(),
                reason: "namespace type differs from the registered one".into(),
            })?;
        self.remove(cur, ns);
        Ok(())
    }

    fn keys(&self, ns: &dyn Any) -> Result<KeyIter<'_, K>> {
        let ns = ns
            .downcast_ref::<N>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: self.name.to_string(),
                reason: "namespace type differs from the registered one".into(),
            })?;
        Ok(Box::new(self.keys_in(ns.clone()).map(Ok)))
    }

    fn merge(
        &mut self,
        cur: &CurrentKey<K>,
        target: &dyn Any,
        sources: &dyn Any,
        now: i64,
    ) -> Result<()> {
        let mismatch = || Error::StateTypeMismatch {
            state: self.name.to_string(),
            reason: "namespace type differs from the registered one".into(),
        };
        let target = target.downcast_ref::<N>().ok_or_else(mismatch)?;
        let sources = sources.downcast_ref::<Vec<N>>().ok_or_else(mismatch)?;
        if !self.kind.kind().is_mergeable() {
            return Err(Error::Unsupported {
                state: self.name.to_string(),
                reason: format!("{} state cannot merge namespaces", self.kind.kind()),
            });
        }
        let ttl = self.ttl;
        let expired = |ts: i64| ttl.is_some_and(|t| t.is_expired(ts, now));
        let mut acc: Option<KD::Stored> = None;
        for ns in sources.iter().filter(|n| *n != target) {
            if let Some(mut e) = self.remove(cur, ns) {
                let ts = e.ts();
                if self.kind.drop_expired(&mut e.value, ts, &expired) {
                    continue;
                }
                acc = Some(match acc {
                    None => e.value,
                    Some(a) => self.kind.merge(&self.name, a, e.value)?,
                });
            }
        }
        let Some(merged) = acc else { return Ok(()) };
        let merged = match self.remove(cur, target) {
            Some(mut t) => {
                let ts = t.ts();
                if self.kind.drop_expired(&mut t.value, ts, &expired) {
                    merged
                } else {
                    self.kind.merge(&self.name, t.value, merged)?
                }
            }
            None => merged,
        };
        let ts = if ttl.is_some() { now } else { 0 };
        self.put(cur, target, ts, merged);
        Ok(())
    }

    fn aggregate_get(
        &mut self,
        cur: &CurrentKey<K>,
        ns: &dyn Any,
        out: &mut dyn Any,
        clock: &dyn Clock,
    ) -> Result<()> {
        let ns = self.downcast_ns(ns)?;
        let acc = read_single(self, cur, &ns, clock, false);
        self.kind.aggregate_result(&self.name, acc.as_ref(), out)
    }

    fn aggregate_add(
        &mut self,
        cur: &CurrentKey<K>,
        ns: &dyn Any,
        value: &mut dyn Any,
        clock: &dyn Clock,
    ) -> Result<()> {
        let ns = self.downcast_ns(ns)?;
        let old = read_single(self, cur, &ns, clock, true);
        let new = self.kind.aggregate_add(&self.name, old, value)?;
        let ts = write_ts(self, clock);
        self.put(cur, &ns, ts, new);
        Ok(())
    }

    fn share(&mut self) -> Box<dyn SharedTable> {
        Box::new(Shared {
            meta: Table::meta(self),
            name: self.name.clone(),
            kind: Arc::clone(&self.kind),
            ttl: self.ttl,
            ns_ser: Arc::clone(&self.ns_ser),
            parts: self.share_all(),
        })
    }

    fn take_dirty(&mut self) -> Vec<bool> {
        Table::take_dirty(self)
    }

    fn track_changes(&mut self) {
        let parts = self.parts.len();
        self.log.turn_on(parts);
    }

    fn take_changes(&mut self) -> Option<Box<dyn TakenChanges>> {
        self.log.take()
    }

    fn incremental_cleanup(&mut self, now: i64, per_record: bool) {
        if let Some(inc) = self.ttl.and_then(|t| t.incremental_cleanup()) {
            if !per_record || inc.run_for_every_record {
                Table::incremental_cleanup(self, inc.cleanup_size, now);
            }
        }
    }

    fn prepare_restore(&mut self, meta: &StateMeta) -> Result<()> {
        self.readers = Some(restore_readers(
            &self.name,
            &*self.kind,
            self.ttl,
            &self.ns_ser,
            meta,
        )?);
        Ok(())
    }

    fn split_restore(&mut self, workers: usize) -> Vec<Box<dyn PartSink<K> + '_>> {
        let workers = workers.max(1);
        let mut slots: Vec<Vec<&mut Slot<_>>> = (0..workers).map(|_| Vec::new()).collect();
        for (p, slot) in self.parts.iter_mut().enumerate() {
            slots[p % workers].push(slot);
        }
        let (name, kind, ttl, ns_ser) = (&self.name, &*self.kind, self.ttl, &self.ns_ser);
        let key_ser = &self.key_ser;
        slots
            .into_iter()
            .enumerate()
            .map(|(worker, slots)| {
                Box::new(Sink {
                    name,
                    kind,
                    ttl,
                    ns_ser,
                    key_ser,
                    readers: None,
                    workers,
                    worker,
                    slots,
                }) as Box<dyn PartSink<K> + '_>
            })
            .collect()
    }

    fn log_written_parts(&mut self) {
        for (p, slot) in self.parts.iter().enumerate() {
            if slot.dirty {
                self.log.part_replaced(p);
            }
        }
    }
}
