//! Restoring canonical snapshots: the sink that writes restored records into the engine under
//! pending state ids.

use state_api::snapshot::{payload, Decoder, RawRecord, RestoreVisitor, SnapshotHeader};
use state_api::*;

use crate::codec::*;
use crate::engine::Db;

use super::timers;
use super::Pending;

/// Writes restored records into the engine under pending state ids.
pub(super) struct RestoreSink<'a> {
    pub(super) db: &'a mut Db,
    pub(super) next_id: &'a mut u32,
    pub(super) existing: Vec<(StateName, Pending)>,
    pub(super) added: Vec<(StateName, Pending)>,
    /// Per state index of the current stream: its pending id and list encoding.
    pub(super) current: Vec<(u16, ListEncoding)>,
    pub(super) kbuf: Vec<u8>,
    pub(super) vbuf: Vec<u8>,
}

impl RestoreVisitor for RestoreSink<'_> {
    fn on_header(&mut self, _stream: &str, header: &SnapshotHeader) -> Result<()> {
        self.current.clear();
        for meta in &header.states {
            let same = |(n, p): &&(StateName, Pending)| {
                *n == meta.name && p.meta == *meta && p.key_ser == header.key_serializer
            };
            let id = match self
                .existing
                .iter()
                .find(same)
                .or_else(|| self.added.iter().find(same))
            {
                Some((_, p)) => (p.id, p.list_enc),
                None => {
                    let id = u16::try_from(*self.next_id).map_err(|_| Error::Unsupported {
                        state: meta.name.to_string(),
                        reason: "more than 65536 states in one backend".into(),
                    })?;
                    *self.next_id += 1;
                    // Restored lists are stored like a new state of this TTL setting stores them.
                    let list_enc = ListEncoding::for_state(meta.kind, meta.ttl_millis.is_some());
                    self.added.push((
                        meta.name.clone(),
                        Pending {
                            id,
                            meta: meta.clone(),
                            key_ser: header.key_serializer.clone(),
                            list_enc,
                        },
                    ));
                    (id, list_enc)
                }
            };
            self.current.push(id);
        }
        Ok(())
    }

    fn on_record(
        &mut self,
        stream: &str,
        state: &StateMeta,
        key_group: u32,
        r: RawRecord<'_>,
    ) -> Result<()> {
        let Some(&(id, enc)) = self.current.get(r.state_index as usize) else {
            return Ok(());
        };
        push_prefix(&mut self.kbuf, key_group, id, r.key);
        self.kbuf
            .extend_from_slice(&(r.namespace.len() as u32).to_be_bytes());
        self.kbuf.extend_from_slice(r.namespace);
        let mut d = Decoder::new(r.payload, r.payload_offset, stream);
        match state.kind {
            StateKind::List => {
                self.vbuf.clear();
                for (ts, b) in payload::decode_list(&mut d)? {
                    enc.push(&mut self.vbuf, ts, b);
                }
                self.db.put(&self.kbuf, &self.vbuf)?;
            }
            StateKind::Map => {
                let prefix = self.kbuf.len();
                for (ts, k, v) in payload::decode_map(&mut d)? {
                    self.kbuf.truncate(prefix);
                    self.kbuf.extend_from_slice(k);
                    self.vbuf.clear();
                    self.vbuf.extend_from_slice(&ts.to_be_bytes());
                    self.vbuf.extend_from_slice(v);
                    self.db.put(&self.kbuf, &self.vbuf)?;
                }
            }
            StateKind::Timers => {
                let (ts, domain) = state_api::timer::decode_timer_payload(&mut d)?;
                timers::timer_key(
                    &mut self.kbuf,
                    key_group,
                    id,
                    domain,
                    ts,
                    r.key,
                    r.namespace,
                );
                self.db.put(&self.kbuf, &[])?;
            }
            _ => {
                payload::decode_single(&mut d)?;
                self.db.put(&self.kbuf, r.payload)?;
            }
        }
        Ok(())
    }
}
