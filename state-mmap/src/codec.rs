//! Engine keys and values of keyed state.
//!
//! Key: `key_group u16 | state id u16 | key_len u32 | key | ns_len u32 | namespace [| user key]`
//! (big-endian; the lengths make every `(key group, state, key, namespace)` a contiguous
//! range, one key group a contiguous range, and one map a prefix).
//!
//! Timers use a layout of their own, in due-time order (module `backend::timers`).
//!
//! Values: value/reducing/aggregating `ts i64 | bytes`; one map entry per user key,
//! `ts i64 | bytes`; list: a sequence of elements, so concatenation is the merge operator, each
//! element either `ts i64 | len u32 | element` ([`ListEncoding::Stamped`]) or
//! `len varint | element` ([`ListEncoding::Compact`], lists without TTL).

use state_api::{Error, Result, StateKind, StateName};

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
    let i = successor_at(prefix)?;
    Some([&prefix[..i], &[prefix[i] + 1]].concat())
}

/// Where [`successor`] of `prefix` ends: it is `prefix[..i]` and then `prefix[i] + 1`, for the
/// last byte `i` below 0xff (`None`: only 0xff bytes, no key is greater than all with the
/// prefix).
#[inline]
pub(crate) fn successor_at(prefix: &[u8]) -> Option<usize> {
    prefix.iter().rposition(|&b| b < 0xff)
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

/// How the elements of a stored list are encoded; fixed per state and recorded in the state
/// registry (docs/mmap-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListEncoding {
    /// `ts i64 | len u32 | element` (every list of registry versions 1 and 2, lists with TTL).
    Stamped,
    /// `len varint | element` (LEB128, at most 5 bytes): lists created without TTL.
    Compact,
}

impl ListEncoding {
    /// The encoding a state of `kind` created with (`ttl`) or without a TTL uses: compact for
    /// lists without TTL (other kinds record `Stamped`; they have no list elements).
    pub(crate) fn for_state(kind: StateKind, ttl: bool) -> Self {
        if kind == StateKind::List && !ttl {
            ListEncoding::Compact
        } else {
            ListEncoding::Stamped
        }
    }
    /// Its code in the state registry.
    pub(crate) fn code(self) -> u8 {
        match self {
            ListEncoding::Stamped => 0,
            ListEncoding::Compact => 1,
        }
    }
    /// The encoding of a registry code.
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ListEncoding::Stamped),
            1 => Some(ListEncoding::Compact),
            _ => None,
        }
    }
    /// Starts an element (see [`ListEncoding::end`]); `ts` is dropped by the compact encoding.
    #[inline]
    pub(crate) fn begin(self, out: &mut Vec<u8>, ts: i64) -> usize {
        match self {
            ListEncoding::Stamped => begin_element(out, ts),
            ListEncoding::Compact => {
                out.push(0);
                out.len() - 1
            }
        }
    }
    /// Finishes an element started with [`ListEncoding::begin`] at `at` (its bytes follow).
    #[inline]
    pub(crate) fn end(self, out: &mut Vec<u8>, at: usize) {
        match self {
            ListEncoding::Stamped => end_element(out, at),
            ListEncoding::Compact => {
                let len = out.len() - at - 1;
                if len < 0x80 {
                    out[at] = len as u8;
                } else {
                    let mut v = [0u8; 5];
                    let n = varint(len as u32, &mut v);
                    out.splice(at..at + 1, v[..n].iter().copied());
                }
            }
        }
    }
    /// Appends one element.
    #[inline]
    pub(crate) fn push(self, out: &mut Vec<u8>, ts: i64, element: &[u8]) {
        match self {
            ListEncoding::Stamped => {
                out.extend_from_slice(&ts.to_be_bytes());
                out.extend_from_slice(&(element.len() as u32).to_be_bytes());
            }
            ListEncoding::Compact => {
                let mut v = [0u8; 5];
                let n = varint(element.len() as u32, &mut v);
                out.extend_from_slice(&v[..n]);
            }
        }
        out.extend_from_slice(element);
    }
    /// Appends the elements serialized one after the other in `bytes` (element `i` ends at
    /// `ends[i]`, the first starts at 0), as [`StateSerializer::serialize_all`] writes them;
    /// false (nothing appended) when `ends` do not increase within `bytes`. Elements followed
    /// by 16 bytes of `bytes` (pad it) are copied without a `memcpy` call.
    ///
    /// [`StateSerializer::serialize_all`]: state_api::StateSerializer::serialize_all
    #[inline]
    pub(crate) fn push_all(self, out: &mut Vec<u8>, ts: i64, bytes: &[u8], ends: &[usize]) -> bool {
        let base = out.len();
        let mut start = 0;
        if self == ListEncoding::Stamped {
            out.reserve(bytes.len() + ends.len() * 12);
            for &end in ends {
                let Some(element) = bytes.get(start..end) else {
                    out.truncate(base);
                    return false;
                };
                self.push(out, ts, element);
                start = end;
            }
            return true;
        }
        // Compact: sized once (a length takes at most 5 bytes), written through a position,
        // cut to length at the end; 16 bytes of slack for the chunk copies.
        out.resize(base + bytes.len() + ends.len() * 5 + 16, 0);
        let mut p = base;
        for &end in ends {
            let Some(element) = bytes.get(start..end) else {
                out.truncate(base);
                return false;
            };
            let n = element.len();
            match (n < 16, bytes.get(start..start + 16), out.get_mut(p..p + 17)) {
                (true, Some(chunk), Some(dst)) => {
                    // One fixed-size 16-byte copy, of which the element's bytes are kept.
                    dst[0] = n as u8;
                    dst[1..].copy_from_slice(chunk);
                    p += 1 + n;
                }
                _ => {
                    let mut v = [0u8; 5];
                    let h = varint(n as u32, &mut v);
                    out[p..p + h].copy_from_slice(&v[..h]);
                    out[p + h..p + h + n].copy_from_slice(element);
                    p += h + n;
                }
            }
            start = end;
        }
        out.truncate(p);
        true
    }
}

/// LEB128 of `x` into `out`; returns its length.
#[inline]
fn varint(mut x: u32, out: &mut [u8; 5]) -> usize {
    let mut n = 0;
    while x >= 0x80 {
        out[n] = (x as u8) | 0x80;
        x >>= 7;
        n += 1;
    }
    out[n] = x as u8;
    n + 1
}

/// Reads a LEB128 `u32` at `p`: `(value, bytes read)`.
#[inline]
fn read_varint(v: &[u8], p: usize) -> Option<(usize, usize)> {
    let mut x: u32 = 0;
    for i in 0..5 {
        let b = *v.get(p + i)?;
        if i == 4 && b > 0x0f {
            return None;
        }
        x |= u32::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((x as usize, i + 1));
        }
    }
    None
}

/// Splits a stored list into `(ts, element bytes)` (`ts` is 0 for compact lists).
pub(crate) fn parse_list<'a>(
    v: &'a [u8],
    enc: ListEncoding,
    state: &StateName,
) -> Result<Vec<(i64, &'a [u8])>> {
    list_elements(v, enc, state).collect()
}

/// The `(ts, element bytes)` of a stored list, one at a time (no allocation).
pub(crate) fn list_elements<'a, 's>(
    v: &'a [u8],
    enc: ListEncoding,
    state: &'s StateName,
) -> ListElements<'a, 's> {
    ListElements {
        v,
        p: 0,
        enc,
        state,
    }
}

/// Iterator of [`list_elements`].
pub(crate) struct ListElements<'a, 's> {
    v: &'a [u8],
    p: usize,
    enc: ListEncoding,
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
        let element = match self.enc {
            ListEncoding::Stamped => (|| {
                let ts = ts_of(&v[p..])?;
                let n = u32_at(v, p + 8)?;
                let e = v.get(p + 12..(p + 12).checked_add(n)?)?;
                Some((ts, e, 12 + n))
            })(),
            ListEncoding::Compact => (|| {
                let (n, h) = read_varint(v, p)?;
                let e = v.get(p + h..(p + h).checked_add(n)?)?;
                Some((0, e, h + n))
            })(),
        };
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
fn end_element(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Starts a stamped element: writes `ts` and a length placeholder; returns the placeholder
/// position.
#[inline]
fn begin_element(out: &mut Vec<u8>, ts: i64) -> usize {
    out.extend_from_slice(&ts.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_round_trip_elements_of_every_length_class() {
        let name = StateName::new("l").unwrap();
        let elements: Vec<Vec<u8>> = [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000]
            .iter()
            .map(|&n| (0..n).map(|i| i as u8).collect())
            .collect();
        for enc in [ListEncoding::Stamped, ListEncoding::Compact] {
            let mut built = Vec::new();
            let mut pushed = Vec::new();
            for (i, e) in elements.iter().enumerate() {
                let at = enc.begin(&mut built, i as i64 + 5);
                built.extend_from_slice(e);
                enc.end(&mut built, at);
                enc.push(&mut pushed, i as i64 + 5, e);
            }
            assert_eq!(built, pushed, "{enc:?}");
            // The batch path frames the same bytes.
            let (flat, ends): (Vec<u8>, Vec<usize>) =
                elements
                    .iter()
                    .fold((Vec::new(), Vec::new()), |(mut f, mut e), x| {
                        f.extend_from_slice(x);
                        e.push(f.len());
                        (f, e)
                    });
            let mut all = Vec::new();
            for (i, end) in ends.iter().enumerate() {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                assert!(enc.push_all(&mut all, i as i64 + 5, &flat[start..*end], &[end - start]));
            }
            assert_eq!(all, pushed, "{enc:?}");
            let mut all = Vec::new();
            assert!(enc.push_all(&mut all, 9, &flat, &ends));
            assert_eq!(parse_list(&all, enc, &name).unwrap().len(), elements.len());
            // Ends that decrease or run past the bytes are refused, nothing appended.
            for bad in [&[3usize, 2][..], &[flat.len() + 1]] {
                let mut out = vec![1];
                assert!(!enc.push_all(&mut out, 0, &flat, bad));
                assert_eq!(out, [1]);
            }
            let got = parse_list(&built, enc, &name).unwrap();
            assert_eq!(got.len(), elements.len());
            for (i, (ts, e)) in got.iter().enumerate() {
                assert_eq!(*e, &elements[i][..]);
                let want = if enc == ListEncoding::Stamped {
                    i as i64 + 5
                } else {
                    0
                };
                assert_eq!(*ts, want);
            }
        }
        // A one-byte element costs two bytes compact, thirteen stamped.
        let mut c = Vec::new();
        ListEncoding::Compact.push(&mut c, 0, &[7]);
        assert_eq!(c, [1, 7]);
        // Truncated and overlong lengths are corrupt, not a panic.
        for bad in [&[0x80u8][..], &[5, 1, 2], &[0xff, 0xff, 0xff, 0xff, 0x7f]] {
            assert!(parse_list(bad, ListEncoding::Compact, &name).is_err());
        }
    }
}
