//! Engine keys and values of keyed state.
//!
//! Key: `key_group u16 | state id u16 | key_len u32 | key | ns_len u32 | namespace [| user key]`
//! (big-endian; the lengths make every `(key group, state, key, namespace)` a contiguous
//! range, one key group a contiguous range, and one map a prefix).
//!
//! Timers use a layout of their own, in due-time order (module `backend::timers`).
//!
//! Values: value/reducing/aggregating `ts i64 | bytes`; list `(ts i64 | len u32 | element)*`
//! (so concatenation is the merge operator); one map entry per user key, `ts i64 | bytes`.

use state_api::{Error, Result, StateName};

#[inline]
pub(crate) fn push_prefix(out: &mut Vec<u8>, kg: u32, id: u16, key: &[u8]) {
    out.clear();
    out.extend_from_slice(&(kg as u16).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
pub(crate) fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

/// `[kg | id]` as a 4-byte prefix.
pub(crate) fn kg_state(kg: u32, id: u16) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&(kg as u16).to_be_bytes());
    b[2..].copy_from_slice(&id.to_be_bytes());
    b
}

/// `[kg]` as a 2-byte prefix.
pub(crate) fn kg_prefix(kg: u32) -> [u8; 2] {
    (kg as u16).to_be_bytes()
}

/// The parts of an engine key.
pub(crate) struct KeyParts<'a> {
    pub kg: u32,
    pub key: &'a [u8],
    pub ns: &'a [u8],
    pub user_key: &'a [u8],
    /// Length of `kg | id | key | ns` (the map prefix).
    pub prefix_len: usize,
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Length of `kg | id | key | ns` of a generic state key (the map prefix), or `None` for a key
/// that is not one (timer keys: their fifth byte, a domain code, makes the key length field
/// larger than the key). Allocation-free: the engine calls it for every key it stores.
#[inline]
pub(crate) fn prefix_len(k: &[u8]) -> Option<usize> {
    let klen = u32_at(k, 4)?;
    let nlen = u32_at(k, 8usize.checked_add(klen)?)?;
    let end = (12 + klen).checked_add(nlen)?;
    (end <= k.len()).then_some(end)
}

pub(crate) fn parse_key<'a>(k: &'a [u8], file: &str) -> Result<KeyParts<'a>> {
    let bad = || Error::Corrupt {
        stream: file.to_string(),
        offset: 0,
        reason: format!("malformed state key {:02x?}", &k[..k.len().min(32)]),
    };
    if k.len() < 8 {
        return Err(bad());
    }
    let kg = u32::from(u16::from_be_bytes([k[0], k[1]]));
    let klen = u32_at(k, 4).ok_or_else(bad)?;
    let key = k.get(8..8 + klen).ok_or_else(bad)?;
    let nlen = u32_at(k, 8 + klen).ok_or_else(bad)?;
    let ns_at = 12 + klen;
    let ns = k.get(ns_at..ns_at + nlen).ok_or_else(bad)?;
    let prefix_len = ns_at + nlen;
    Ok(KeyParts {
        kg,
        key,
        ns,
        user_key: &k[prefix_len..],
        prefix_len,
    })
}

pub(crate) fn corrupt_value(state: &StateName, what: &str) -> Error {
    Error::Corrupt {
        stream: format!("state '{state}'"),
        offset: 0,
        reason: format!("malformed stored {what}"),
    }
}

#[inline]
pub(crate) fn ts_of(v: &[u8]) -> Option<i64> {
    let s = v.get(..8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(i64::from_be_bytes(a))
}

/// Splits a stored list into `(ts, element bytes)`.
pub(crate) fn parse_list<'a>(v: &'a [u8], state: &StateName) -> Result<Vec<(i64, &'a [u8])>> {
    list_elements(v, state).collect()
}

/// The `(ts, element bytes)` of a stored list, one at a time (no allocation).
pub(crate) fn list_elements<'a, 's>(v: &'a [u8], state: &'s StateName) -> ListElements<'a, 's> {
    ListElements { v, p: 0, state }
}

/// Iterator of [`list_elements`].
pub(crate) struct ListElements<'a, 's> {
    v: &'a [u8],
    p: usize,
    state: &'s StateName,
}

impl<'a> Iterator for ListElements<'a, '_> {
    type Item = Result<(i64, &'a [u8])>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let (v, p) = (self.v, self.p);
        if p >= v.len() {
            return None;
        }
        let element = (|| {
            let ts = ts_of(&v[p..])?;
            let n = u32_at(v, p + 8)?;
            let e = v.get(p + 12..(p + 12).checked_add(n)?)?;
            Some((ts, e, 12 + n))
        })();
        match element {
            Some((ts, e, len)) => {
                self.p += len;
                Some(Ok((ts, e)))
            }
            None => {
                self.p = v.len();
                Some(Err(corrupt_value(self.state, "list element")))
            }
        }
    }
}

/// Fills in the length of an element started with [`begin_element`].
#[inline]
pub(crate) fn end_element(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Starts an element: writes `ts` and a length placeholder; returns the placeholder position.
#[inline]
pub(crate) fn begin_element(out: &mut Vec<u8>, ts: i64) -> usize {
    out.extend_from_slice(&ts.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}
