//! The state registry: which states a store holds (ids, metadata, serializers, list encodings),
//! kept in the engine's manifest, and its byte format.

use std::path::Path;

use state_api::snapshot::{SnapshotHeader, SnapshotReader, SnapshotWriter};
use state_api::*;

use crate::codec::*;

use super::{MmapKeyedStateBackend, Pending};

pub(super) const REGISTRY_MAGIC: [u8; 4] = *b"FLRG";
/// Version 3: every entry records its list encoding (compact lists without TTL). Version 2:
/// timers are stored in due-time order (module `timers`). Versions 1 and 2 are still read (their
/// lists are stamped); version-1 timers are rewritten when the store is opened.
pub(super) const REGISTRY_VERSION: u8 = 3;

/// One state of the registry.
pub(crate) struct RegistryEntry {
    pub id: u16,
    pub pending: bool,
    pub meta: StateMeta,
    pub key_ser: SerializerSnapshot,
    pub list_enc: ListEncoding,
}

/// Encodes the state registry: per state its id, whether it is pending, its list encoding and a
/// one-state canonical snapshot header holding its metadata and key serializer.
pub(crate) fn encode_registry(
    max_parallelism: u32,
    range: KeyGroupRange,
    groups: &[RegistryEntry],
) -> Result<Vec<u8>> {
    let mut out = REGISTRY_MAGIC.to_vec();
    out.push(REGISTRY_VERSION);
    out.extend_from_slice(&(groups.len() as u32).to_be_bytes());
    for g in groups {
        let header = SnapshotHeader {
            max_parallelism,
            key_group_range: range,
            key_serializer: g.key_ser.clone(),
            states: vec![g.meta.clone()],
        };
        let (_, stream) = SnapshotWriter::new(Vec::new(), &header)?.finish()?;
        out.extend_from_slice(&g.id.to_be_bytes());
        out.push(u8::from(g.pending));
        out.push(g.list_enc.code());
        out.extend_from_slice(&(stream.len() as u32).to_be_bytes());
        out.extend_from_slice(&stream);
    }
    Ok(out)
}

/// Decodes a registry (version 1 to 3) into `(max parallelism, [(name, group)])`; every entry
/// comes back as pending (registration binds it again).
pub(crate) fn decode_registry(b: &[u8], dir: &Path) -> Result<(u32, Vec<(StateName, Pending)>)> {
    let what = format!("state registry in {}", dir.display());
    let bad = |off: usize, reason: &str| Error::Corrupt {
        stream: what.clone(),
        offset: off as u64,
        reason: reason.to_string(),
    };
    if b.len() < 9 || b[..4] != REGISTRY_MAGIC {
        return Err(bad(0, "bad magic"));
    }
    let version = b[4];
    if !(1..=REGISTRY_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            stream: what,
            found: u16::from(version),
            supported: u16::from(REGISTRY_VERSION),
        });
    }
    // `id u16 | pending u8 [| list encoding u8 (version 3)] | stream_len u32`
    let head = if version >= 3 { 8 } else { 7 };
    let n = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize;
    let mut p = 9;
    let mut out = Vec::new();
    let mut max_parallelism = 0;
    for _ in 0..n {
        let h = b.get(p..p + head).ok_or_else(|| bad(p, "truncated"))?;
        let id = u16::from_be_bytes([h[0], h[1]]);
        let list_enc = if version >= 3 {
            ListEncoding::from_code(h[3])
                .ok_or_else(|| bad(p + 3, &format!("unknown list encoding {}", h[3])))?
        } else {
            ListEncoding::Stamped
        };
        let l = &h[head - 4..];
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        let s = b
            .get(p + head..p + head + len)
            .ok_or_else(|| bad(p, "truncated"))?;
        let r = SnapshotReader::open(s, what.clone())?;
        let header = r.header();
        max_parallelism = header.max_parallelism;
        let meta = header
            .states
            .first()
            .cloned()
            .ok_or_else(|| bad(p, "entry without a state"))?;
        out.push((
            meta.name.clone(),
            Pending {
                id,
                meta,
                key_ser: header.key_serializer.clone(),
                list_enc,
            },
        ));
        p += head + len;
    }
    Ok((max_parallelism, out))
}

impl<K: StateKey> MmapKeyedStateBackend<K> {
    pub(crate) fn save_registry(&mut self) {
        let mut groups: Vec<RegistryEntry> = self
            .states
            .iter()
            .map(|s| RegistryEntry {
                id: s.id,
                pending: false,
                meta: s.typed.meta(&s.name, s.ttl.as_ref()),
                key_ser: self.key_serializer.snapshot(),
                list_enc: s.list_enc,
            })
            .collect();
        for ps in self.pending.values() {
            for p in ps {
                groups.push(RegistryEntry {
                    id: p.id,
                    pending: true,
                    meta: p.meta.clone(),
                    key_ser: p.key_ser.clone(),
                    list_enc: p.list_enc,
                });
            }
        }
        if let Ok(bytes) = encode_registry(self.max_parallelism, self.range, &groups) {
            self.db.set_user_meta(bytes);
        }
    }
}
