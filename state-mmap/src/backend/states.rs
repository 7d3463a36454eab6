//! Registering states: state ids, re-registration, and binding restored (pending) data to a
//! state, in place or rewritten.

use std::any::TypeId;

use state_api::*;

use crate::codec::*;
use crate::engine::Db;
use crate::typed::*;

use super::keyed::{end_of, scan, type_mismatch};
use super::{MmapKeyedStateBackend, Pending, StateEntry};

impl<K: StateKey> MmapKeyedStateBackend<K> {
    fn alloc_id(&mut self) -> Result<u16> {
        let id = u16::try_from(self.next_id).map_err(|_| Error::Unsupported {
            state: String::new(),
            reason: "more than 65536 states (registered or restored) in one backend".into(),
        })?;
        self.next_id += 1;
        Ok(id)
    }

    pub(super) fn register_typed<T: TypedState + 'static>(
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
    pub(super) fn bind(
        &mut self,
        entry: &mut StateEntry,
        groups: &[Pending],
        fresh: bool,
    ) -> Result<()> {
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
    pub(super) fn for_each_stored(
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
}
