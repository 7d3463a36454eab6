//! The `KeyedStateBackend` implementation: the state operations of every state kind, namespace
//! merges, key iteration, timers, and the helpers they share.

use std::any::Any;
use std::io::Read;
use std::sync::Arc;

use state_api::snapshot::restore_streams;
use state_api::*;

use crate::codec::*;
use crate::engine::Db;
use crate::typed::*;

use super::restore::RestoreSink;
use super::timers::{self, DueIndex};
use super::{Cur, MmapKeyedStateBackend, Pending, StateEntry};

pub(super) fn unknown(name: &StateName) -> Error {
    Error::UnknownState {
        state: name.to_string(),
    }
}

pub(super) fn type_mismatch(name: &StateName) -> Error {
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
pub(super) fn state_key<N: 'static>(
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
pub(super) fn now_if(ttl: Option<StateTtlConfig>, clock: &dyn Clock) -> i64 {
    match ttl {
        Some(_) => clock.now_millis(),
        None => 0,
    }
}

/// Reads a single value (value, reducing, aggregating) with TTL semantics: `vbuf` gets
/// `ts | value`; returns whether there is a value to return. `for_update` treats expired values
/// as absent whatever the visibility (as the heap backend does).
#[inline]
pub(super) fn read_single(
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
pub(super) fn encode_list<T: 'static>(
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
pub(super) fn scan(
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
pub(super) fn end_of(prefix: &[u8]) -> Option<Vec<u8>> {
    successor(prefix)
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

    state_api::generic_bound_value!();

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
        let kg = self.timer_key(h, domain, ns, timestamp)?;
        // A blind tombstone; the due-time lower bound stays valid (it may only be early), and
        // timers read ahead in that key group are read again.
        if let Some(index) = self.timers.get_mut(&(h.id().0 as usize)) {
            index.forget(kg, domain);
        }
        Ok(self.db.delete(&self.kbuf)?)
    }

    fn advance_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Vec<Timer<K, N>>> {
        let slot = h.id().0 as usize;
        let (e, t) = timer_state(&self.states, h)?;
        let index = self.timers.get(&slot).ok_or_else(|| unknown(h.name()))?;
        let (due, updates) = index.collect_due(&self.db, e.id, domain, time, h.name())?;
        // Decode everything first: on a decoding error nothing is deleted or marked fired.
        let mut fired = Vec::with_capacity(due.len());
        for d in &due {
            fired.push(decode_due(&*self.key_serializer, t, d, domain, h.name())?);
        }
        for d in &due {
            self.db.delete(&d.raw)?;
        }
        if let Some(index) = self.timers.get_mut(&slot) {
            index.apply(domain, &updates);
        }
        Ok(fired)
    }

    fn next_due_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Option<Timer<K, N>>> {
        let slot = h.id().0 as usize;
        let (e, t) = timer_state(&self.states, h)?;
        let index = self
            .timers
            .get_mut(&slot)
            .ok_or_else(|| unknown(h.name()))?;
        let Some((i, due)) = index.next_due(&self.db, e.id, domain, time, h.name())? else {
            return Ok(None);
        };
        // Decode first: on a decoding error the timer is neither deleted nor marked fired.
        let timer = decode_due(&*self.key_serializer, t, &due, domain, h.name())?;
        self.db.delete(&due.raw)?;
        if let Some(index) = self.timers.get_mut(&slot) {
            index.fired(i, domain, due);
        }
        Ok(Some(timer))
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

pub(super) fn placeholder_entry(name: &StateName) -> StateEntry {
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
    /// Starts reading, in the background, what a get of `h`'s value for the current key in
    /// namespace `ns` will read from the device ([`Db::prefetch`]): a batch of gets of state
    /// larger than the page cache sets each key and calls this first, then sets each key
    /// again and gets it; the device then reads the batch's blocks together instead of one
    /// after the other. Changes nothing and waits for nothing.
    pub fn prefetch_value<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
    ) -> Result<()> {
        let (e, t, cur) = typed!(self, h.id(), h.name(), ValueT<V, N>);
        state_key(&mut self.kbuf, cur.kg, e.id, &cur.bytes, &t.ns, ns, &e.name)?;
        self.db.prefetch(&self.kbuf);
        Ok(())
    }
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
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

    /// Rewrites every timer of service id `from` under `to` (namespaces through `t` when given).
    pub(super) fn copy_timers(
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
}

/// The entry and typed part of the timer service `h` names.
fn timer_state<'a, N: Namespace>(
    states: &'a [StateEntry],
    h: &TimerServiceHandle<N>,
) -> Result<(&'a StateEntry, &'a TimerT<N>)> {
    let e = states
        .get(h.id().0 as usize)
        .filter(|e| e.name == *h.name())
        .ok_or_else(|| unknown(h.name()))?;
    let t = e
        .typed
        .as_any()
        .downcast_ref::<TimerT<N>>()
        .ok_or_else(|| type_mismatch(h.name()))?;
    Ok((e, t))
}

/// Decodes a due timer read from the engine.
fn decode_due<K: 'static, N: Namespace>(
    key_serializer: &dyn StateSerializer<K>,
    t: &TimerT<N>,
    due: &timers::Due,
    domain: TimeDomain,
    name: &StateName,
) -> Result<Timer<K, N>> {
    let de = |what, e: SerdeError| Error::Deserialize {
        state: name.to_string(),
        what,
        reason: e.0,
    };
    Ok(Timer {
        key: key_serializer
            .deserialize(due.key())
            .map_err(|e| de("timer key", e))?,
        namespace: t
            .ns
            .deserialize(due.ns())
            .map_err(|e| de("timer namespace", e))?,
        timestamp: due.ts,
        domain,
    })
}
