//! Canonical snapshots: [`MmapSnapshot`], the view a snapshot takes, and the writer of the
//! `state-api` snapshot stream.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;

use state_api::snapshot::{payload, SnapshotHeader, SnapshotSummary, SnapshotWriter};
use state_api::*;

use crate::codec::*;
use crate::engine::DbSnapshot;

use super::timers;
use super::{MmapKeyedStateBackend, Pending};

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

impl<K: StateKey> MmapKeyedStateBackend<K> {
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
