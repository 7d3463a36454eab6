//! Per-key change tracking for delta checkpoints (Flink's changelog idea, kept in memory).
//!
//! Once [`HeapKeyedStateBackend::track_changes`](crate::HeapKeyedStateBackend::track_changes)
//! is called (the checkpoint coordinator does it at the first incremental checkpoint), every
//! write, removal or clear of an entry records its (key, namespace) in a log per state and key
//! group; every registered, deleted or fired timer is recorded the same way. Until then the
//! logs are off and a write costs one predictable branch.
//!
//! A log is bounded: when a key group's log grows past about half of the key group's entries
//! (after removing duplicates), the key group is marked *replaced* and its log dropped; a delta
//! then writes that key group whole, as a full snapshot would (the fallback of the key-group
//! incremental snapshots).
//!
//! [`HeapDeltaSnapshot`] writes a delta stream (canonical stream version 2): for each logged
//! (key, namespace) of a key group, the entry's current value as a record, or a tombstone when
//! it no longer exists (or expired); replaced key groups in full.

use std::any::Any;
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use state_api::snapshot::{SnapshotSummary, SnapshotWriter};
use state_api::timer::TimerBytes;
use state_api::{
    Error, KeyGroupRange, KeyedStateSnapshot, Result, StateKey, StateSerializer, TimeDomain,
};

use crate::HeapSnapshot;

/// A log is compacted (duplicates removed) when it reaches this length, then at twice its
/// compacted length.
const FIRST_LIMIT: usize = 1024;

/// True when `changes` (distinct) entries of a key group of `entries` entries are better
/// written as the whole key group.
fn too_many(changes: usize, entries: usize) -> bool {
    changes > entries / 2 + 64
}

/// The logged changes of one state in one key group.
pub(crate) struct PartLog<K, N> {
    /// (hash in the key group's table, key, namespace); duplicates allowed.
    items: Vec<(u64, K, N)>,
    /// The key group changed too much: write it whole.
    full: bool,
    limit: usize,
}

impl<K, N> PartLog<K, N> {
    fn new() -> Self {
        PartLog {
            items: Vec::new(),
            full: false,
            limit: FIRST_LIMIT,
        }
    }
}

/// Removes duplicate (hash, key, namespace) items (order is not kept).
fn dedup<K: Eq, N: Eq>(items: &mut Vec<(u64, K, N)>) {
    items.sort_unstable_by_key(|i| i.0);
    let mut out: Vec<(u64, K, N)> = Vec::with_capacity(items.len());
    for it in items.drain(..) {
        let dup = out
            .iter()
            .rev()
            .take_while(|o| o.0 == it.0)
            .any(|o| o.1 == it.1 && o.2 == it.2);
        if !dup {
            out.push(it);
        }
    }
    *items = out;
}

/// The change log of one state: one [`PartLog`] per key group while tracking is on.
pub(crate) struct TableLog<K, N> {
    on: bool,
    parts: Vec<PartLog<K, N>>,
}

impl<K: StateKey, N: Eq + Clone + Send + Sync + 'static> TableLog<K, N> {
    /// A log that is off.
    pub fn new() -> Self {
        TableLog {
            on: false,
            parts: Vec::new(),
        }
    }

    /// Turns logging on for `parts` key groups (no effect when on).
    pub fn turn_on(&mut self, parts: usize) {
        if !self.on {
            self.on = true;
            self.parts = (0..parts).map(|_| PartLog::new()).collect();
        }
    }

    /// A log for the same state in a rebuilt table (TTL switched on or off): every key group
    /// is replaced, since every entry's stored form changed. Off when `self` is off.
    pub fn all_replaced(&self) -> Self {
        TableLog {
            on: self.on,
            parts: (0..self.parts.len())
                .map(|_| PartLog {
                    items: Vec::new(),
                    full: true,
                    limit: FIRST_LIMIT,
                })
                .collect(),
        }
    }

    /// Marks key group `part` replaced: the next delta writes it whole (every entry of it
    /// changed, e.g. TTL timestamps were set).
    pub fn part_replaced(&mut self, part: usize) {
        if let Some(p) = self.parts.get_mut(part) {
            p.full = true;
            p.items = Vec::new();
        }
    }

    /// Records a change of (key, ns), whose hash in the table of key group `part` is `hash`;
    /// `entries` gives the key group's number of entries (asked only when the log is compacted).
    #[inline]
    pub fn record(
        &mut self,
        part: usize,
        hash: u64,
        key: &K,
        ns: &N,
        entries: impl FnOnce() -> usize,
    ) {
        if self.on {
            self.push(part, hash, key, ns, entries);
        }
    }

    // Out of line: with tracking off, a write pays only the branch in `record`.
    #[inline(never)]
    fn push(&mut self, part: usize, hash: u64, key: &K, ns: &N, entries: impl FnOnce() -> usize) {
        let Some(p) = self.parts.get_mut(part) else {
            return;
        };
        if p.full {
            return;
        }
        if p.items
            .last()
            .is_some_and(|l| l.0 == hash && l.1 == *key && l.2 == *ns)
        {
            return;
        }
        p.items.push((hash, key.clone(), ns.clone()));
        if p.items.len() >= p.limit {
            dedup(&mut p.items);
            if too_many(p.items.len(), entries()) {
                p.full = true;
                p.items = Vec::new();
            } else {
                p.limit = (2 * p.items.len()).max(FIRST_LIMIT);
            }
        }
    }

    /// Takes the logs (leaving empty ones); `None` when logging is off.
    pub fn take(&mut self) -> Option<Box<dyn TakenChanges>> {
        if !self.on {
            return None;
        }
        let n = self.parts.len();
        let parts = std::mem::replace(&mut self.parts, (0..n).map(|_| PartLog::new()).collect());
        Some(Box::new(TakenLog { parts }))
    }
}

/// The logs of one state taken at a checkpoint.
struct TakenLog<K, N> {
    parts: Vec<PartLog<K, N>>,
}

/// A state's taken logs with their key types erased.
pub(crate) trait TakenChanges: Send + Sync {
    /// True when key group `part` has logged changes or is replaced.
    fn changed(&self, part: usize) -> bool;
    /// True when key group `part` is replaced (written whole).
    fn full(&self, part: usize) -> bool;
    fn as_any(&self) -> &dyn Any;
}

impl<K: StateKey, N: Eq + Clone + Send + Sync + 'static> TakenChanges for TakenLog<K, N> {
    fn changed(&self, part: usize) -> bool {
        self.parts
            .get(part)
            .is_some_and(|p| p.full || !p.items.is_empty())
    }
    fn full(&self, part: usize) -> bool {
        self.parts.get(part).is_some_and(|p| p.full)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The distinct (hash, key, namespace) logged for key group `part` in any of `logs` (the
/// taken logs of one state at successive checkpoints).
pub(crate) fn changed_in_part<K: StateKey, N: Eq + Clone + Send + Sync + 'static>(
    logs: &[&dyn TakenChanges],
    part: usize,
) -> Vec<(u64, K, N)> {
    let mut items = Vec::new();
    for l in logs {
        if let Some(t) = l.as_any().downcast_ref::<TakenLog<K, N>>() {
            if let Some(p) = t.parts.get(part) {
                items.extend(p.items.iter().cloned());
            }
        }
    }
    dedup(&mut items);
    items
}

/// Receives what a state writes into a delta for one key group.
pub(crate) trait DeltaSink {
    /// Writes the entry of `key` (a `&K`) and namespace bytes `ns`; `payload` appends its
    /// payload or answers false (expired): then a tombstone is written instead.
    fn record(
        &mut self,
        key: &dyn Any,
        ns: &[u8],
        payload: &mut dyn FnMut(&mut Vec<u8>) -> Result<bool>,
    ) -> Result<()>;
    /// Writes a tombstone for `key` (a `&K`) and namespace bytes `ns`.
    fn tombstone(&mut self, key: &dyn Any, ns: &[u8]) -> Result<()>;
}

/// The logged timers of one timer service in one key group.
#[derive(Clone)]
pub(crate) struct TimerPartLog {
    items: Vec<(TimeDomain, TimerBytes)>,
    full: bool,
    limit: usize,
}

impl TimerPartLog {
    fn new() -> Self {
        TimerPartLog {
            items: Vec::new(),
            full: false,
            limit: FIRST_LIMIT,
        }
    }
}

/// The backend-wide part of change tracking: the on switch and the timer logs.
#[derive(Default)]
pub(crate) struct BackendLog {
    on: bool,
    parts: usize,
    /// Per timer service (by index), per key group.
    timers: Vec<Vec<TimerPartLog>>,
}

impl BackendLog {
    /// True when changes are tracked.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Turns tracking on for `parts` key groups.
    pub fn turn_on(&mut self, parts: usize) {
        self.on = true;
        self.parts = parts;
    }

    fn service(&mut self, service: usize) -> Option<&mut Vec<TimerPartLog>> {
        if !self.on {
            return None;
        }
        if self.timers.len() <= service {
            let parts = self.parts;
            self.timers
                .resize_with(service + 1, || vec![TimerPartLog::new(); parts]);
        }
        self.timers.get_mut(service)
    }

    /// Records a change of a timer of `service` in key group `part` (`timer` builds it);
    /// `count` gives the key group's number of timers (asked only when the log is compacted).
    #[inline]
    pub fn timer(
        &mut self,
        service: usize,
        part: usize,
        domain: TimeDomain,
        timer: impl FnOnce() -> TimerBytes,
        count: impl FnOnce() -> usize,
    ) {
        if !self.on {
            return;
        }
        let Some(p) = self.service(service).and_then(|s| s.get_mut(part)) else {
            return;
        };
        if p.full {
            return;
        }
        p.items.push((domain, timer()));
        if p.items.len() >= p.limit {
            p.items.sort_unstable();
            p.items.dedup();
            if too_many(p.items.len(), count()) {
                p.full = true;
                p.items = Vec::new();
            } else {
                p.limit = (2 * p.items.len()).max(FIRST_LIMIT);
            }
        }
    }

    /// Marks every key group of timer service `service` replaced (e.g. timers were restored).
    pub fn timers_replaced(&mut self, service: usize) {
        if let Some(s) = self.service(service) {
            for p in s {
                p.full = true;
                p.items = Vec::new();
            }
        }
    }

    fn take_timers(&mut self) -> Vec<Vec<TimerPartLog>> {
        let parts = self.parts;
        self.timers
            .iter_mut()
            .map(|s| std::mem::replace(s, vec![TimerPartLog::new(); parts]))
            .collect()
    }
}

/// The changes of a heap backend between two calls of
/// [`HeapKeyedStateBackend::take_changes`](crate::HeapKeyedStateBackend::take_changes):
/// per state and key group the changed (key, namespace) entries, or "replaced" when too many
/// changed.
pub struct HeapChanges {
    tables: Vec<Option<Box<dyn TakenChanges>>>,
    timers: Vec<Vec<TimerPartLog>>,
    range: KeyGroupRange,
}

impl std::fmt::Debug for HeapChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeapChanges")
            .field("range", &self.range)
            .field("changed", &self.changed_key_groups())
            .field("replaced", &self.replaced_key_groups())
            .finish()
    }
}

impl HeapChanges {
    fn changed(&self, part: usize) -> bool {
        self.tables.iter().flatten().any(|t| t.changed(part))
            || self
                .timers
                .iter()
                .filter_map(|s| s.get(part))
                .any(|p| p.full || !p.items.is_empty())
    }

    fn full(&self, part: usize) -> bool {
        self.tables.iter().flatten().any(|t| t.full(part))
            || self
                .timers
                .iter()
                .filter_map(|s| s.get(part))
                .any(|p| p.full)
    }

    /// Key groups with any change, in order.
    pub fn changed_key_groups(&self) -> Vec<u32> {
        self.range
            .iter()
            .enumerate()
            .filter(|(p, _)| self.changed(*p))
            .map(|(_, kg)| kg)
            .collect()
    }

    /// Key groups with so many changes that a delta writes them whole, in order.
    pub fn replaced_key_groups(&self) -> Vec<u32> {
        self.range
            .iter()
            .enumerate()
            .filter(|(p, _)| self.full(*p))
            .map(|(_, kg)| kg)
            .collect()
    }
}

impl<K: StateKey> crate::HeapKeyedStateBackend<K> {
    /// Starts logging changed entries per key for delta checkpoints ([`Self::take_changes`],
    /// [`Self::snapshot_delta`]). Does nothing when already on. Until this is called, writes
    /// log nothing.
    pub fn track_changes(&mut self) {
        if self.changes.is_on() {
            return;
        }
        let parts = self.locator.range.len() as usize;
        self.changes.turn_on(parts);
        for t in &mut self.tables {
            t.track_changes();
        }
    }

    /// True once [`Self::track_changes`] was called.
    pub fn is_tracking_changes(&self) -> bool {
        self.changes.is_on()
    }

    /// Takes the changes logged since the previous call (or since tracking started). Call it
    /// in the synchronous part of a checkpoint, right before [`Self::snapshot_delta`].
    pub fn take_changes(&mut self) -> HeapChanges {
        HeapChanges {
            tables: self.tables.iter_mut().map(|t| t.take_changes()).collect(),
            timers: self.changes.take_timers(),
            range: self.locator.range,
        }
    }

    /// A delta snapshot: the current state of the entries named by `changes` (the changes
    /// taken since the snapshot the delta builds on, oldest first), copy-on-write like
    /// [`Self::snapshot_heap`].
    pub fn snapshot_delta(&mut self, changes: Vec<Arc<HeapChanges>>) -> HeapDeltaSnapshot<K> {
        let view = self.snapshot_heap();
        let parts = self.locator.range.len() as usize;
        let mut changed = vec![false; parts];
        let mut replaced = vec![false; parts];
        for c in &changes {
            for p in 0..parts {
                changed[p] |= c.changed(p);
                replaced[p] |= c.full(p);
            }
        }
        HeapDeltaSnapshot {
            view,
            changes,
            changed,
            replaced,
            only: None,
        }
    }
}

/// A delta view of a heap backend taken by
/// [`HeapKeyedStateBackend::snapshot_delta`](crate::HeapKeyedStateBackend::snapshot_delta):
/// writes a delta stream (version 2) on any thread.
pub struct HeapDeltaSnapshot<K> {
    view: HeapSnapshot<K>,
    changes: Vec<Arc<HeapChanges>>,
    changed: Vec<bool>,
    replaced: Vec<bool>,
    only: Option<Vec<u32>>,
}

impl<K: StateKey> HeapDeltaSnapshot<K> {
    fn key_groups(&self, of: &[bool]) -> Vec<u32> {
        let range = self.view.header.key_group_range;
        range
            .iter()
            .enumerate()
            .filter(|(p, _)| of.get(*p).copied().unwrap_or(false))
            .map(|(_, kg)| kg)
            .filter(|kg| {
                self.only
                    .as_ref()
                    .is_none_or(|o| o.binary_search(kg).is_ok())
            })
            .collect()
    }

    /// The key groups the delta writes (changed or replaced), in order.
    pub fn changed_key_groups(&self) -> Vec<u32> {
        self.key_groups(&self.changed)
    }

    /// The key groups the delta writes whole (a restore drops what earlier snapshots hold for
    /// them), in order.
    pub fn replaced_key_groups(&self) -> Vec<u32> {
        self.key_groups(&self.replaced)
    }

    /// Limits the delta to the given key groups (sorted), to write it as several files.
    pub fn restrict_to(mut self, key_groups: Vec<u32>) -> Self {
        self.only = Some(key_groups);
        self
    }
}

/// The key serializer, erased: the sink gets keys as `&dyn Any`.
struct KeyWriter<'a, K> {
    ser: &'a Arc<dyn StateSerializer<K>>,
    buf: Vec<u8>,
}

impl<K: StateKey> KeyWriter<'_, K> {
    fn key(&mut self, key: &dyn Any, state: &str) -> Result<&[u8]> {
        let key = key
            .downcast_ref::<K>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: state.to_string(),
                reason: "key type differs from the backend's".into(),
            })?;
        self.buf.clear();
        self.ser
            .serialize(key, &mut self.buf)
            .map_err(|e| Error::Serialize {
                state: state.to_string(),
                what: "key",
                reason: e.0,
            })?;
        Ok(&self.buf)
    }
}

struct StateSink<'a, 'w, K> {
    w: &'a mut SnapshotWriter<&'w mut dyn Write>,
    keys: KeyWriter<'a, K>,
    state: u32,
    name: &'a str,
}

impl<K: StateKey> DeltaSink for StateSink<'_, '_, K> {
    fn record(
        &mut self,
        key: &dyn Any,
        ns: &[u8],
        payload: &mut dyn FnMut(&mut Vec<u8>) -> Result<bool>,
    ) -> Result<()> {
        let key = self.keys.key(key, self.name)?;
        if !self.w.write_record_with(self.state, key, ns, payload)? {
            self.w.write_tombstone(self.state, key, ns, &[])?;
        }
        Ok(())
    }

    fn tombstone(&mut self, key: &dyn Any, ns: &[u8]) -> Result<()> {
        let key = self.keys.key(key, self.name)?;
        self.w.write_tombstone(self.state, key, ns, &[])
    }
}

impl<K: StateKey> KeyedStateSnapshot for HeapDeltaSnapshot<K> {
    fn write_to(&self, out: &mut dyn Write) -> Result<SnapshotSummary> {
        let view = &self.view;
        let mut w = SnapshotWriter::new_delta(out, &view.header)?;
        let mut key_buf = Vec::new();
        let range = view.header.key_group_range;
        let base = view.tables.len();
        for (part, kg) in range.iter().enumerate() {
            if !self.changed.get(part).copied().unwrap_or(false)
                || self
                    .only
                    .as_ref()
                    .is_some_and(|o| o.binary_search(&kg).is_err())
            {
                continue;
            }
            w.begin_key_group(kg)?;
            if self.replaced.get(part).copied().unwrap_or(false) {
                view.write_key_group(&mut w, part, kg, &mut key_buf)?;
                continue;
            }
            for (i, t) in view.tables.iter().enumerate() {
                let logs: Vec<&dyn TakenChanges> = self
                    .changes
                    .iter()
                    .filter_map(|c| c.tables.get(i).and_then(|t| t.as_deref()))
                    .filter(|l| l.changed(part))
                    .collect();
                if logs.is_empty() {
                    continue;
                }
                let name = view.header.states[i].name.as_str();
                let mut sink = StateSink {
                    w: &mut w,
                    keys: KeyWriter {
                        ser: &view.key_serializer,
                        buf: std::mem::take(&mut key_buf),
                    },
                    state: i as u32,
                    name,
                };
                let r = t.write_changed(part, &logs, view.now, &mut sink);
                key_buf = sink.keys.buf;
                r?;
            }
            for (i, timers) in view.timers.iter().enumerate() {
                // Logged timers of this key group: bit 1 << domain code per timer.
                let mut logged: HashMap<&TimerBytes, u8> = HashMap::new();
                for c in &self.changes {
                    if let Some(p) = c.timers.get(i).and_then(|s| s.get(part)) {
                        for (domain, t) in &p.items {
                            *logged.entry(t).or_insert(0) |= 1 << domain.code();
                        }
                    }
                }
                if logged.is_empty() {
                    continue;
                }
                let state = (base + i) as u32;
                for (domain, t) in timers.timers_of(part) {
                    if let Some(mask) = logged.get_mut(t) {
                        if *mask & (1 << domain.code()) != 0 {
                            *mask &= !(1 << domain.code());
                            let payload = state_api::timer::encode_timer_payload(t.0, domain);
                            w.write_record(state, &t.1, &t.2, &payload)?;
                        }
                    }
                }
                let mut gone: Vec<(&TimerBytes, u8)> =
                    logged.into_iter().filter(|(_, m)| *m != 0).collect();
                gone.sort();
                for (t, mask) in gone {
                    for domain in [TimeDomain::EventTime, TimeDomain::ProcessingTime] {
                        if mask & (1 << domain.code()) != 0 {
                            let payload = state_api::timer::encode_timer_payload(t.0, domain);
                            w.write_tombstone(state, &t.1, &t.2, &payload)?;
                        }
                    }
                }
            }
        }
        Ok(w.finish()?.0)
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.view.header.key_group_range
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::HeapKeyedStateBackend;
    use state_api::snapshot::SnapshotReader;
    use state_api::{KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor};

    fn kg(b: &mut HeapKeyedStateBackend<u64>, k: u64) -> u32 {
        b.set_current_key(k).unwrap();
        b.current_key_group().unwrap()
    }

    /// (key group, tombstone block?, number of records) of each block of a delta stream.
    fn blocks(bytes: &[u8]) -> Vec<(u32, bool, usize)> {
        let mut r = SnapshotReader::open(bytes, "delta").unwrap();
        let mut out = Vec::new();
        while let Some(b) = r.next_any_block().unwrap() {
            out.push((
                b.key_group,
                b.is_tombstones(),
                b.records("delta", 4).count(),
            ));
        }
        out
    }

    #[test]
    fn nothing_is_logged_until_tracking_starts() {
        let mut b = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(4)
            .build()
            .unwrap();
        let v = b
            .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
            .unwrap();
        for k in 0..100 {
            b.set_current_key(k).unwrap();
            b.value(&v).update(k).unwrap();
        }
        assert!(!b.is_tracking_changes());
        let c = b.take_changes();
        assert!(c.changed_key_groups().is_empty(), "{c:?}");
        assert!(c.tables.iter().all(Option::is_none));
    }

    #[test]
    fn deltas_hold_changed_entries_and_tombstones_and_replace_busy_key_groups() {
        let mut b = HeapKeyedStateBackend::<u64>::builder()
            .max_parallelism(4)
            .build()
            .unwrap();
        let v = b
            .register_value(ValueStateDescriptor::<u64>::new("v").unwrap())
            .unwrap();
        for k in 0..10_000 {
            b.set_current_key(k).unwrap();
            b.value(&v).update(k).unwrap();
        }
        b.track_changes();
        // One key written many times and another removed: two entries, no replacement.
        let (hot, gone) = (5u64, 6u64);
        for i in 0..5000 {
            b.set_current_key(hot).unwrap();
            b.value(&v).update(i).unwrap();
        }
        b.set_current_key(gone).unwrap();
        b.value(&v).clear().unwrap();
        let c = Arc::new(b.take_changes());
        let mut expect: Vec<u32> = vec![kg(&mut b, hot), kg(&mut b, gone)];
        expect.sort();
        expect.dedup();
        assert_eq!(c.changed_key_groups(), expect);
        assert!(c.replaced_key_groups().is_empty());
        let delta = b.snapshot_delta(vec![Arc::clone(&c)]);
        let mut bytes = Vec::new();
        let summary = delta.write_to(&mut bytes).unwrap();
        assert_eq!(summary.records, 1);
        assert_eq!(summary.tombstones.len(), 1);
        let records: usize = blocks(&bytes).iter().map(|b| b.2).sum();
        assert_eq!(records, 2);
        // A second change set on top: the delta covers both.
        b.set_current_key(7).unwrap();
        b.value(&v).update(70).unwrap();
        let c2 = Arc::new(b.take_changes());
        let both = b.snapshot_delta(vec![Arc::clone(&c), c2]);
        let mut bytes = Vec::new();
        assert_eq!(both.write_to(&mut bytes).unwrap().records, 2);

        // Every key changes: each key group is written whole, without tombstones.
        for k in 0..10_000 {
            b.set_current_key(k).unwrap();
            b.value(&v).update(k + 1).unwrap();
        }
        let all = Arc::new(b.take_changes());
        assert_eq!(all.replaced_key_groups(), vec![0, 1, 2, 3]);
        let delta = b.snapshot_delta(vec![all]);
        assert_eq!(delta.replaced_key_groups(), vec![0, 1, 2, 3]);
        let mut bytes = Vec::new();
        let summary = delta.write_to(&mut bytes).unwrap();
        assert_eq!(summary.records, 10_000);
        assert!(summary.tombstones.is_empty());
        // Restricted to some key groups, the delta writes only those.
        let keys: Vec<u64> = (0..40).collect();
        for &k in &keys {
            b.set_current_key(k).unwrap();
            b.value(&v).update(0).unwrap();
        }
        let some = Arc::new(b.take_changes());
        let first = kg(&mut b, 0);
        let part = b.snapshot_delta(vec![some]).restrict_to(vec![first]);
        assert_eq!(part.changed_key_groups(), vec![first]);
        let mut bytes = Vec::new();
        let n = keys.iter().filter(|&&k| kg(&mut b, k) == first).count();
        assert_eq!(part.write_to(&mut bytes).unwrap().records, n as u64);
    }
}
