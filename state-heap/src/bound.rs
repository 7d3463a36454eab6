//! Value states bound for a run of records ([`KeyedStateBackend::bind_value`]): the state's
//! typed table is found once, when it is bound, instead of on every access by the handle's
//! number and a type check. Each access is then the key's hash, its key group's table and one
//! probe, as a Flink `ValueState` object reads the state table it holds.

use std::sync::Arc;

use state_api::*;

use crate::table::{read_single, write_ts, CurrentKey, ErasedTable, NoTtl, Table, ValueKind};
use crate::{no_current_key, stamped, unknown, HeapKeyedStateBackend, Locator, Stamped};

/// A value state's table without TTL stamps, and with them.
type Plain<K, N, V> = Table<K, N, ValueKind<V>, NoTtl>;
type WithTtl<K, N, V> = Table<K, N, ValueKind<V>, i64>;

/// A value state of a [`HeapKeyedStateBackend`] bound for a run of records (see
/// [`KeyedStateBackend::bind_value`]). It holds the state's typed table and, apart from it,
/// what setting the current key needs; the backend's current key moves into it while it is
/// bound and back when it is dropped.
pub struct HeapBoundValue<'a, K: StateKey, V: StateType, N: Namespace> {
    table: Stamped<'a, Plain<K, N, V>, WithTtl<K, N, V>>,
    locator: Locator,
    key_serializer: &'a Arc<dyn StateSerializer<K>>,
    key_buf: &'a mut Vec<u8>,
    clock: &'a Arc<dyn Clock>,
    cleanup: PerRecordCleanup<'a, K>,
    /// The current key while bound (here, where the accesses read it from registers).
    cur: Option<CurrentKey<K>>,
    /// The backend's current key: none while bound (had the bound state been leaked, the
    /// backend would have no current key rather than a stale one), its last one afterwards.
    current: &'a mut Option<CurrentKey<K>>,
    ns: N,
}

/// The states that clean up expired entries on every record (Flink's incremental cleanup with
/// `run_for_every_record`): the backend's other tables around the bound one, at `at`.
struct PerRecordCleanup<'a, K> {
    ids: &'a [usize],
    at: usize,
    before: &'a mut [Box<dyn ErasedTable<K>>],
    after: &'a mut [Box<dyn ErasedTable<K>>],
}

impl<'a, K: StateKey, V: StateType, N: Namespace> HeapBoundValue<'a, K, V, N> {
    /// Binds value state `h` of `b` in `ns`.
    pub(crate) fn bind(
        b: &'a mut HeapKeyedStateBackend<K>,
        h: &ValueStateHandle<V, N>,
        ns: N,
    ) -> Result<Self> {
        let at = h.id().0 as usize;
        let HeapKeyedStateBackend {
            tables,
            locator,
            key_serializer,
            key_buf,
            clock,
            per_record_cleanup,
            current,
            ..
        } = b;
        if tables.get(at).is_none_or(|t| t.name() != h.name()) {
            return Err(unknown(h.name()));
        }
        let (before, rest) = tables.split_at_mut(at);
        let (mine, after) = rest.split_first_mut().ok_or_else(|| unknown(h.name()))?;
        let table = stamped(&mut **mine).ok_or_else(|| unknown(h.name()))?;
        Ok(HeapBoundValue {
            table,
            locator: *locator,
            key_serializer,
            key_buf,
            clock,
            cleanup: PerRecordCleanup {
                ids: per_record_cleanup,
                at,
                before,
                after,
            },
            cur: current.take(),
            current,
            ns,
        })
    }

    /// Incremental TTL cleanup of the states that run it on every record (as the backend's
    /// `set_current_key` does).
    #[inline(never)]
    fn cleanup_per_record(&mut self) {
        let now = self.clock.now_millis();
        let c = &mut self.cleanup;
        for &i in c.ids {
            match i.cmp(&c.at) {
                std::cmp::Ordering::Less => c.before[i].incremental_cleanup(now, true),
                std::cmp::Ordering::Greater => c.after[i - c.at - 1].incremental_cleanup(now, true),
                std::cmp::Ordering::Equal => match &mut self.table {
                    Stamped::Plain(t) => ErasedTable::incremental_cleanup(&mut **t, now, true),
                    Stamped::Stamped(t) => ErasedTable::incremental_cleanup(&mut **t, now, true),
                },
            }
        }
    }
}

impl<K: StateKey, V: StateType, N: Namespace> BoundValueState<K, V, N>
    for HeapBoundValue<'_, K, V, N>
{
    #[inline(always)]
    fn set_current_key(&mut self, key: K) -> Result<()> {
        // Checked against the table's own partition count (the backend's range), so that the
        // range check is also the bounds check of the access that follows.
        let parts = match &self.table {
            Stamped::Plain(t) => t.parts_len(),
            Stamped::Stamped(t) => t.parts_len(),
        };
        let (hash, kg) = self
            .locator
            .hash_and_group_of(&key, self.key_serializer, self.key_buf)?;
        let part = kg.wrapping_sub(self.locator.part_base) as usize;
        if part >= parts {
            return Err(self.locator.out_of_range(kg, &mut self.cur));
        }
        if !self.cleanup.ids.is_empty() {
            self.cleanup_per_record();
        }
        self.cur = Some(CurrentKey { key, hash, part });
        Ok(())
    }

    fn set_namespace(&mut self, ns: N) {
        self.ns = ns;
    }

    #[inline(always)]
    fn get(&mut self) -> Result<Option<V>> {
        let (cur, ns, clock) = (&self.cur, &self.ns, self.clock);
        match &mut self.table {
            Stamped::Plain(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                match t.find(cur, ns) {
                    Some(e) => Ok(Some(e.value.clone())),
                    None => Ok(t.kind.default.clone()),
                }
            }
            Stamped::Stamped(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                match read_single(t, cur, ns, clock, false) {
                    Some(v) => Ok(Some(v)),
                    None => Ok(t.kind.default.clone()),
                }
            }
        }
    }

    #[inline(always)]
    fn update(&mut self, value: V) -> Result<()> {
        let (cur, ns, clock) = (&self.cur, &self.ns, self.clock);
        match &mut self.table {
            Stamped::Plain(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                // No TTL: entries carry no timestamp.
                t.put(cur, ns, 0, value);
            }
            Stamped::Stamped(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                let ts = write_ts(t, clock);
                t.put(cur, ns, ts, value);
            }
        }
        Ok(())
    }

    fn clear(&mut self) -> Result<()> {
        let (cur, ns) = (&self.cur, &self.ns);
        match &mut self.table {
            Stamped::Plain(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                t.remove(cur, ns);
            }
            Stamped::Stamped(t) => {
                let cur = cur.as_ref().ok_or_else(|| no_current_key(&t.name))?;
                t.remove(cur, ns);
            }
        }
        Ok(())
    }
}

impl<K: StateKey, V: StateType, N: Namespace> std::fmt::Debug for HeapBoundValue<'_, K, V, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &self.table {
            Stamped::Plain(t) => &t.name,
            Stamped::Stamped(t) => &t.name,
        };
        f.debug_struct("HeapBoundValue")
            .field("state", name)
            .field("has_current_key", &self.cur.is_some())
            .finish_non_exhaustive()
    }
}

impl<K: StateKey, V: StateType, N: Namespace> Drop for HeapBoundValue<'_, K, V, N> {
    fn drop(&mut self) {
        *self.current = self.cur.take();
    }
}
