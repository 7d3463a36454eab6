//! State time-to-live cleanup: the compaction filter that drops expired values, and the
//! incremental cleanup run on state access.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use state_api::*;

use crate::codec::*;
use crate::engine::{CompactionFilter, FilterDecision};

use super::keyed::{end_of, scan};
use super::MmapKeyedStateBackend;

/// The states whose expired entries compaction drops, by state id, shared with the filter.
#[derive(Default)]
pub(super) struct TtlStates {
    by_id: RwLock<HashMap<u16, (StateKind, StateTtlConfig)>>,
    /// False while no state cleans up in compaction: the filter then keeps every entry without
    /// taking the lock (it is asked for every entry a compaction writes, on two threads).
    any: AtomicBool,
}

pub(super) type TtlTable = Arc<TtlStates>;

/// Drops expired TTL state during compaction (Flink's RocksDB compaction filter).
pub(super) struct TtlFilter {
    pub(super) table: TtlTable,
    pub(super) clock: Arc<dyn Clock>,
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

impl<K: StateKey> MmapKeyedStateBackend<K> {
    pub(super) fn update_ttl_table(&self) {
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

    /// Incremental TTL cleanup: checks up to `n` stored entries of the state at `slot`,
    /// continuing where the previous run stopped.
    pub(super) fn incremental_cleanup(&mut self, slot: usize, n: usize, now: i64) -> Result<()> {
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
    pub(super) fn after_access(&mut self, slot: usize) -> Result<()> {
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
}
