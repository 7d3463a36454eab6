//! Keys of a state and entries of a map streamed from the engine
//! ([`state_api::KeyedStateBackend::keys`], [`state_api::KeyedStateBackend::map_entries`]):
//! one entry at a time, so only the current one is held in memory.

use std::ops::Range;
use std::sync::Arc;

use state_api::{Error, Result, StateName, StateSerializer};

use crate::codec::{corrupt_value, kg_state, parse_key, successor};
use crate::engine::{DbIter, DbSnapshot};

/// Distinct keys with an entry of one state in one namespace, over a snapshot of the engine.
pub(crate) struct Keys<K> {
    snapshot: DbSnapshot,
    groups: Range<u32>,
    id: u16,
    ns: Vec<u8>,
    name: StateName,
    key_serializer: Arc<dyn StateSerializer<K>>,
    /// The scan of the current key group.
    current: Option<DbIter>,
    /// The bytes of the key returned last (a key has one entry per user key or element).
    last: Option<Vec<u8>>,
    /// After an error the iterator ends.
    failed: bool,
}

impl<K: 'static> Keys<K> {
    /// Keys of state `id` in namespace `ns` (its bytes) in the key groups `groups`.
    pub(crate) fn new(
        snapshot: DbSnapshot,
        groups: Range<u32>,
        id: u16,
        ns: Vec<u8>,
        name: StateName,
        key_serializer: Arc<dyn StateSerializer<K>>,
    ) -> Self {
        Keys {
            snapshot,
            groups,
            id,
            ns,
            name,
            key_serializer,
            current: None,
            last: None,
            failed: false,
        }
    }

    fn advance(&mut self) -> Result<Option<K>> {
        loop {
            let Some(it) = self.current.as_mut() else {
                let Some(kg) = self.groups.next() else {
                    return Ok(None);
                };
                let prefix = kg_state(kg, self.id);
                let end = successor(&prefix);
                self.current = Some(self.snapshot.iter(&prefix, end.as_deref())?);
                continue;
            };
            let Some((k, _)) = it.next()? else {
                self.current = None;
                continue;
            };
            let p = parse_key(k, self.name.as_str())?;
            if p.ns != &self.ns[..] || self.last.as_deref() == Some(p.key) {
                continue;
            }
            let key = self
                .key_serializer
                .deserialize(p.key)
                .map_err(|e| Error::Deserialize {
                    state: self.name.to_string(),
                    what: "key",
                    reason: e.0,
                })?;
            let last = self.last.get_or_insert_with(Vec::new);
            last.clear();
            last.extend_from_slice(p.key);
            return Ok(Some(key));
        }
    }
}

impl<K: 'static> Iterator for Keys<K> {
    type Item = Result<K>;

    fn next(&mut self) -> Option<Result<K>> {
        if self.failed {
            return None;
        }
        match self.advance() {
            Ok(Some(k)) => Some(Ok(k)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The entries of one map (a key and namespace) without TTL, over an engine scan of its prefix.
pub(crate) struct Entries<UK, UV> {
    it: DbIter,
    /// Length of the map's prefix: the user key follows it.
    prefix: usize,
    name: StateName,
    key_ser: Arc<dyn StateSerializer<UK>>,
    value_ser: Arc<dyn StateSerializer<UV>>,
    failed: bool,
}

impl<UK: 'static, UV: 'static> Entries<UK, UV> {
    /// Entries of the scan `it` over keys that start with a prefix of `prefix` bytes.
    pub(crate) fn new(
        it: DbIter,
        prefix: usize,
        name: StateName,
        key_ser: Arc<dyn StateSerializer<UK>>,
        value_ser: Arc<dyn StateSerializer<UV>>,
    ) -> Self {
        Entries {
            it,
            prefix,
            name,
            key_ser,
            value_ser,
            failed: false,
        }
    }

    fn advance(&mut self) -> Result<Option<(UK, UV)>> {
        let Some((k, v)) = self.it.next()? else {
            return Ok(None);
        };
        let de = |what, e: state_api::SerdeError| Error::Deserialize {
            state: self.name.to_string(),
            what,
            reason: e.0,
        };
        let uk = self
            .key_ser
            .deserialize(k.get(self.prefix..).unwrap_or_default())
            .map_err(|e| de("map user key", e))?;
        let value = v
            .get(8..)
            .ok_or_else(|| corrupt_value(&self.name, "map entry"))?;
        let uv = self
            .value_ser
            .deserialize(value)
            .map_err(|e| de("map user value", e))?;
        Ok(Some((uk, uv)))
    }
}

impl<UK: 'static, UV: 'static> Iterator for Entries<UK, UV> {
    type Item = Result<(UK, UV)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.advance() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
