//! Timers: event-time and processing-time timers per (key, namespace, timestamp), kept in the
//! state backend, snapshotted with it and redistributed by key group on rescale.
//!
//! A job registers a timer service once ([`KeyedStateBackend::register_timer_service`]); for the
//! current key it registers and deletes timers ([`TimerAccess`]); advancing the watermark or the
//! processing time returns the due timers in timestamp order ([`KeyedStateBackend::advance_time`]),
//! or fires them one at a time in constant memory ([`KeyedStateBackend::next_due_timer`]).
//! Semantics follow Flink's `InternalTimerService`: at most one timer per (key, namespace,
//! timestamp) and domain (registering again is a no-op), a deleted timer never fires, and
//! processing-time timers that came due while the job was down fire on the first advance after
//! the restore.
//!
//! [`KeyGroupTimers`] is an in-memory, key-group-partitioned timer queue backends can use.

use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{KeyedStateBackend, StateId};
use crate::descriptor::{Namespace, SerializerRole, StateKind, StateMeta, StateName};
use crate::error::{Error, Result};
use crate::key_group::KeyGroupRange;
use crate::serializer::{PostcardSerializer, StateSerializer};
use crate::snapshot::Decoder;

/// Which clock a timer follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimeDomain {
    /// Fires when the watermark reaches the timestamp.
    EventTime,
    /// Fires when the processing time reaches the timestamp.
    ProcessingTime,
}

impl TimeDomain {
    /// The byte that stands for the domain in snapshots.
    pub fn code(self) -> u8 {
        match self {
            TimeDomain::EventTime => 1,
            TimeDomain::ProcessingTime => 2,
        }
    }

    /// The domain of a snapshot byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(TimeDomain::EventTime),
            2 => Some(TimeDomain::ProcessingTime),
            _ => None,
        }
    }
}

/// A timer that fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer<K, N> {
    /// The key the timer was registered for.
    pub key: K,
    /// The namespace (e.g. window) it was registered for.
    pub namespace: N,
    /// Its timestamp (milliseconds).
    pub timestamp: i64,
    /// Its domain.
    pub domain: TimeDomain,
}

/// Declares a timer service: a name (sharing the state namespace) and a namespace serializer.
pub struct TimerServiceDescriptor<N> {
    name: StateName,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
}

impl<N: Namespace + Serialize + DeserializeOwned> TimerServiceDescriptor<N> {
    /// A timer service with a postcard namespace serializer.
    pub fn new(name: &str) -> Result<Self> {
        Ok(TimerServiceDescriptor {
            name: StateName::new(name)?,
            namespace_serializer: Arc::new(PostcardSerializer::<N>::new()),
        })
    }
}

impl<N: Namespace> TimerServiceDescriptor<N> {
    /// Uses `serializer` for namespaces.
    pub fn with_namespace_serializer(mut self, serializer: impl StateSerializer<N>) -> Self {
        self.namespace_serializer = Arc::new(serializer);
        self
    }

    /// The service's name.
    pub fn name(&self) -> &StateName {
        &self.name
    }

    /// The namespace serializer.
    pub fn namespace_serializer(&self) -> &Arc<dyn StateSerializer<N>> {
        &self.namespace_serializer
    }

    /// What snapshots record about the service.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::Timers,
            ttl_millis: None,
            serializers: vec![(
                SerializerRole::Namespace,
                self.namespace_serializer.snapshot(),
            )],
        }
    }
}

/// A registered timer service.
pub struct TimerServiceHandle<N> {
    id: StateId,
    name: StateName,
    _types: PhantomData<fn() -> N>,
}

impl<N> TimerServiceHandle<N> {
    /// Made by backends when a timer service is registered.
    pub fn new(id: StateId, name: StateName) -> Self {
        TimerServiceHandle {
            id,
            name,
            _types: PhantomData,
        }
    }

    /// The backend's number for the service.
    pub fn id(&self) -> StateId {
        self.id
    }

    /// The service's name.
    pub fn name(&self) -> &StateName {
        &self.name
    }
}

impl<N> Clone for TimerServiceHandle<N> {
    fn clone(&self) -> Self {
        TimerServiceHandle::new(self.id, self.name.clone())
    }
}

impl<N> std::fmt::Debug for TimerServiceHandle<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TimerServiceHandle({:?}, {:?})", self.id, self.name)
    }
}

/// Timers of the current key, through [`crate::KeyedStateBackendExt::timers`].
pub struct TimerAccess<'a, B, N> {
    pub(crate) b: &'a mut B,
    pub(crate) h: &'a TimerServiceHandle<N>,
}

impl<B: KeyedStateBackend, N: Namespace> TimerAccess<'_, B, N> {
    /// Registers an event-time timer for the current key (a no-op if it exists).
    pub fn register_event_time_timer(&mut self, namespace: &N, timestamp: i64) -> Result<()> {
        self.b
            .register_timer(self.h, TimeDomain::EventTime, namespace, timestamp)
    }

    /// Registers a processing-time timer for the current key (a no-op if it exists).
    pub fn register_processing_time_timer(&mut self, namespace: &N, timestamp: i64) -> Result<()> {
        self.b
            .register_timer(self.h, TimeDomain::ProcessingTime, namespace, timestamp)
    }

    /// Deletes an event-time timer of the current key (a no-op if there is none).
    pub fn delete_event_time_timer(&mut self, namespace: &N, timestamp: i64) -> Result<()> {
        self.b
            .delete_timer(self.h, TimeDomain::EventTime, namespace, timestamp)
    }

    /// Deletes a processing-time timer of the current key (a no-op if there is none).
    pub fn delete_processing_time_timer(&mut self, namespace: &N, timestamp: i64) -> Result<()> {
        self.b
            .delete_timer(self.h, TimeDomain::ProcessingTime, namespace, timestamp)
    }
}

/// A serialized timer: `(timestamp, key bytes, namespace bytes)`, ordered by timestamp first.
pub type TimerBytes = (i64, Vec<u8>, Vec<u8>);

/// Event-time and processing-time timers of one timer service, in one ordered set per key group
/// (Flink's key-group-partitioned priority queue), keyed by serialized key and namespace.
///
/// Beside the sets it keeps, per domain, the earliest timestamp of every non-empty key group in
/// one ordered index, so the earliest due timer is found in `O(log n)` whatever the number of
/// key groups ([`KeyGroupTimers::pop_first_due`]).
#[derive(Clone, Debug)]
pub struct KeyGroupTimers {
    range: KeyGroupRange,
    event: Vec<Arc<BTreeSet<TimerBytes>>>,
    processing: Vec<Arc<BTreeSet<TimerBytes>>>,
    /// `(earliest timestamp, key-group position)` of every non-empty set, per domain slot.
    heads: [BTreeSet<(i64, usize)>; 2],
}

fn slot(domain: TimeDomain) -> usize {
    match domain {
        TimeDomain::EventTime => 0,
        TimeDomain::ProcessingTime => 1,
    }
}

impl KeyGroupTimers {
    /// Empty queues for the key groups of `range`.
    pub fn new(range: KeyGroupRange) -> Self {
        let n = range.len() as usize;
        KeyGroupTimers {
            range,
            event: (0..n).map(|_| Arc::new(BTreeSet::new())).collect(),
            processing: (0..n).map(|_| Arc::new(BTreeSet::new())).collect(),
            heads: [BTreeSet::new(), BTreeSet::new()],
        }
    }

    /// Runs `change` on the set of key-group position `i` of `domain` (copied first if a
    /// snapshot still shares it) and keeps the heads index in step.
    fn change<T>(
        &mut self,
        domain: TimeDomain,
        i: usize,
        change: impl FnOnce(&mut BTreeSet<TimerBytes>) -> T,
    ) -> T {
        let q = match domain {
            TimeDomain::EventTime => &mut self.event[i],
            TimeDomain::ProcessingTime => &mut self.processing[i],
        };
        let before = q.first().map(|t| t.0);
        let out = change(Arc::make_mut(q));
        let after = q.first().map(|t| t.0);
        if before != after {
            let heads = &mut self.heads[slot(domain)];
            if let Some(ts) = before {
                heads.remove(&(ts, i));
            }
            if let Some(ts) = after {
                heads.insert((ts, i));
            }
        }
        out
    }

    fn queues(&self, domain: TimeDomain) -> &[Arc<BTreeSet<TimerBytes>>] {
        match domain {
            TimeDomain::EventTime => &self.event,
            TimeDomain::ProcessingTime => &self.processing,
        }
    }

    fn index(&self, key_group: u32) -> Result<usize> {
        if !self.range.contains(key_group) {
            return Err(Error::KeyGroupOutOfRange {
                key_group,
                range: self.range,
            });
        }
        Ok((key_group - self.range.start()) as usize)
    }

    /// Adds a timer; returns false if it was already there.
    pub fn register(
        &mut self,
        domain: TimeDomain,
        key_group: u32,
        timer: TimerBytes,
    ) -> Result<bool> {
        let i = self.index(key_group)?;
        if self.queues(domain)[i].contains(&timer) {
            return Ok(false);
        }
        // Copies the key group's set only if a snapshot still shares it.
        Ok(self.change(domain, i, |q| q.insert(timer)))
    }

    /// Removes a timer; returns false if there was none.
    pub fn delete(
        &mut self,
        domain: TimeDomain,
        key_group: u32,
        timer: &TimerBytes,
    ) -> Result<bool> {
        let i = self.index(key_group)?;
        if !self.queues(domain)[i].contains(timer) {
            return Ok(false);
        }
        Ok(self.change(domain, i, |q| q.remove(timer)))
    }

    /// Removes and returns every timer of `domain` with a timestamp at or before `time`, in
    /// timestamp order (ties: key bytes, then namespace bytes).
    pub fn pop_due(&mut self, domain: TimeDomain, time: i64) -> Vec<TimerBytes> {
        let mut due = Vec::new();
        let positions: Vec<usize> = self.heads[slot(domain)]
            .range(..=(time, usize::MAX))
            .map(|&(_, i)| i)
            .collect();
        for i in positions {
            let part = self.change(domain, i, |set| {
                let later = match time.checked_add(1) {
                    Some(next) => set.split_off(&(next, Vec::new(), Vec::new())),
                    None => BTreeSet::new(),
                };
                std::mem::replace(set, later)
            });
            due.extend(part);
        }
        due.sort();
        due
    }

    /// The earliest timer of `domain` with a timestamp at or before `time`, without removing
    /// it: its key-group position in the range and the timer. Among timers with the same
    /// timestamp, those of the earlier key group come first, then by key and namespace bytes.
    pub fn first_due(&self, domain: TimeDomain, time: i64) -> Option<(usize, &TimerBytes)> {
        let &(ts, i) = self.heads[slot(domain)].first()?;
        if ts > time {
            return None;
        }
        Some((i, self.queues(domain)[i].first()?))
    }

    /// Removes and returns the timer [`KeyGroupTimers::first_due`] names (`O(log n)`).
    pub fn pop_first_due(&mut self, domain: TimeDomain, time: i64) -> Option<TimerBytes> {
        let (i, _) = self.first_due(domain, time)?;
        self.change(domain, i, |q| q.pop_first())
    }

    /// The earliest timestamp of `domain`, if any timer is set.
    pub fn next_timestamp(&self, domain: TimeDomain) -> Option<i64> {
        self.heads[slot(domain)].first().map(|&(ts, _)| ts)
    }

    /// Number of timers of both domains.
    pub fn len(&self) -> usize {
        self.event
            .iter()
            .chain(&self.processing)
            .map(|q| q.len())
            .sum()
    }

    /// True when no timer is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cheap copy sharing every key group (for asynchronous snapshots).
    pub fn share(&self) -> KeyGroupTimers {
        self.clone()
    }

    /// The timers of the key group at position `index` of the range, both domains.
    pub fn timers_of(&self, index: usize) -> impl Iterator<Item = (TimeDomain, &TimerBytes)> {
        let ev = self.event.get(index).into_iter().flat_map(|q| q.iter());
        let pr = self
            .processing
            .get(index)
            .into_iter()
            .flat_map(|q| q.iter());
        ev.map(|t| (TimeDomain::EventTime, t))
            .chain(pr.map(|t| (TimeDomain::ProcessingTime, t)))
    }
}

/// Encodes the snapshot payload of a timer record: `timestamp i64 | domain u8`.
pub fn encode_timer_payload(timestamp: i64, domain: TimeDomain) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[..8].copy_from_slice(&timestamp.to_be_bytes());
    out[8] = domain.code();
    out
}

/// Decodes the snapshot payload of a timer record.
pub fn decode_timer_payload(d: &mut Decoder<'_>) -> Result<(i64, TimeDomain)> {
    let ts = d.i64("timer timestamp")?;
    let code = d.u8("timer domain")?;
    let domain = TimeDomain::from_code(code)
        .ok_or_else(|| d.corrupt(format!("unknown time domain {code}")))?;
    if !d.is_empty() {
        return Err(d.corrupt("bytes after the timer payload"));
    }
    Ok((ts, domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ts: i64, k: u8) -> TimerBytes {
        (ts, vec![k], vec![])
    }

    #[test]
    fn queue_orders_dedups_deletes_and_shares() {
        let mut q = KeyGroupTimers::new(KeyGroupRange::new(2, 6));
        assert!(q.register(TimeDomain::EventTime, 3, t(30, 1)).unwrap());
        assert!(!q.register(TimeDomain::EventTime, 3, t(30, 1)).unwrap());
        q.register(TimeDomain::EventTime, 5, t(10, 2)).unwrap();
        q.register(TimeDomain::EventTime, 2, t(20, 3)).unwrap();
        q.register(TimeDomain::ProcessingTime, 2, t(5, 3)).unwrap();
        assert!(q.register(TimeDomain::EventTime, 9, t(1, 1)).is_err());
        assert!(q.delete(TimeDomain::EventTime, 2, &t(20, 3)).unwrap());
        assert!(!q.delete(TimeDomain::EventTime, 2, &t(20, 3)).unwrap());
        let snapshot = q.share();
        assert_eq!(q.next_timestamp(TimeDomain::EventTime), Some(10));
        let due = q.pop_due(TimeDomain::EventTime, 30);
        assert_eq!(due, vec![t(10, 2), t(30, 1)]);
        assert!(q.pop_due(TimeDomain::EventTime, i64::MAX).is_empty());
        assert_eq!(q.len(), 1);
        assert_eq!(snapshot.len(), 3, "the shared copy is unaffected");
        assert_eq!(
            q.pop_due(TimeDomain::ProcessingTime, i64::MAX),
            vec![t(5, 3)]
        );
        let p = encode_timer_payload(-7, TimeDomain::ProcessingTime);
        let mut d = Decoder::new(&p, 0, "t");
        assert_eq!(
            decode_timer_payload(&mut d).unwrap(),
            (-7, TimeDomain::ProcessingTime)
        );
        let mut bad = p;
        bad[8] = 9;
        assert!(decode_timer_payload(&mut Decoder::new(&bad, 0, "t")).is_err());
    }
}
