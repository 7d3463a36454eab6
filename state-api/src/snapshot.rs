//! The canonical, backend-independent snapshot stream of keyed state.
//!
//! A backend writes its keyed state as a stream grouped by key group into any
//! [`std::io::Write`]; any backend restores from one or several such streams, keeping only the
//! key groups of its [`KeyGroupRange`]. Savepoints use this form, which is what lets a heap
//! snapshot restore into the mmap backend and back. The byte layout is documented in
//! `docs/snapshot-format.md` at the repository root; in short (all integers big-endian):
//!
//! ```text
//! header   "FLWS" | version u16 | body_len u32 | body | crc32c(body) u32
//! block*   0x01 | key_group u32 | body_len u64 | records | crc32c(key_group, body_len, records) u32
//! end      0x02 | count u32 | (key_group u32, offset u64, length u64)* | records u64 | crc32c u32
//! ```
//!
//! A *delta* stream (version 2, [`SnapshotWriter::new_delta`]) may also hold tombstone blocks
//! (tag `0x03`, same layout as a block) listing the (key, namespace) entries removed since the
//! snapshot it builds on. Only a checkpoint restore that applies deltas in order understands
//! them; [`restore_streams`] rejects a stream that contains one.
//!
//! Every length read from a stream is checked against what remains of its enclosing structure
//! before use, and bodies are read incrementally, so a hostile stream cannot make the reader
//! allocate more than the stream holds. Each record's key is re-hashed and must belong to the
//! block's key group.

use std::io::{Read, Write};

use crate::descriptor::{SerializerRole, StateKind, StateMeta, StateName};
use crate::error::{Error, Result};
use crate::key_group::{assign_to_key_group, KeyGroupRange};
use crate::serializer::SerializerSnapshot;

/// The magic bytes that open every snapshot stream.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"FLWS";
/// The format version of full snapshot streams (this build writes it and reads it).
pub const SNAPSHOT_VERSION: u16 = 1;
/// The format version of delta streams: version 1 plus tombstone blocks (tag `0x03`). This
/// build reads both versions.
pub const SNAPSHOT_DELTA_VERSION: u16 = 2;
/// Largest header accepted (64 MiB).
pub const MAX_HEADER_LEN: u32 = 64 << 20;
/// Largest key-group block accepted (64 GiB).
pub const MAX_BLOCK_LEN: u64 = 64 << 30;

const TAG_BLOCK: u8 = 0x01;
const TAG_END: u8 = 0x02;
const TAG_TOMBSTONES: u8 = 0x03;

/// What a snapshot stream says about itself before its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The max parallelism (number of key groups) of the job that wrote the stream.
    pub max_parallelism: u32,
    /// The key groups the writer owned.
    pub key_group_range: KeyGroupRange,
    /// The serializer of the keys.
    pub key_serializer: SerializerSnapshot,
    /// The states in the stream; records refer to them by position.
    pub states: Vec<StateMeta>,
}

/// Where one key group's block sits in a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyGroupOffset {
    /// The key group.
    pub key_group: u32,
    /// Byte offset of the block's tag from the start of the stream.
    pub offset: u64,
    /// Length of the whole block (tag to checksum).
    pub length: u64,
}

/// What writing a snapshot produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Total bytes written.
    pub bytes: u64,
    /// Length of the header (the bytes before the first block).
    pub header_length: u64,
    /// Offsets of the key-group blocks, in key-group order (empty key groups have no block).
    pub key_groups: Vec<KeyGroupOffset>,
    /// Number of records written.
    pub records: u64,
    /// Offsets of the tombstone blocks of a delta stream, in key-group order (empty otherwise).
    pub tombstones: Vec<KeyGroupOffset>,
}

// ---------------------------------------------------------------------------------------------
// Primitive encoding

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_len(out: &mut Vec<u8>, len: usize, what: &str) -> Result<()> {
    let len = u32::try_from(len).map_err(|_| Error::Serialize {
        state: what.to_string(),
        what: "snapshot field",
        reason: format!("{len} bytes is more than a snapshot field can hold (4 GiB)"),
    })?;
    put_u32(out, len);
    Ok(())
}
pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8], what: &str) -> Result<()> {
    put_len(out, b.len(), what)?;
    out.extend_from_slice(b);
    Ok(())
}

/// A bounds-checked reader over a byte slice that reports damage as [`Error::Corrupt`].
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    stream: &'a str,
}

impl<'a> Decoder<'a> {
    /// Reads `buf`, which starts at byte `base` of the stream named `stream`.
    pub fn new(buf: &'a [u8], base: u64, stream: &'a str) -> Self {
        Decoder {
            buf,
            pos: 0,
            base,
            stream,
        }
    }

    /// A corruption error at the current position.
    pub fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            stream: self.stream.to_string(),
            offset: self.base + self.pos as u64,
            reason: reason.into(),
        }
    }

    /// True when everything has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{what}: needs {n} bytes but only {} remain",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A byte.
    pub fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    /// A big-endian u16.
    pub fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    /// A big-endian u32.
    pub fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    /// A big-endian u64.
    pub fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    /// A big-endian i64.
    pub fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    /// A u32-length-prefixed byte string.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    /// A u16-length-prefixed UTF-8 string.
    pub fn str16(&mut self, what: &str) -> Result<&'a str> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))
    }
}

// ---------------------------------------------------------------------------------------------
// Record payloads (the per-kind part of a record)

/// Encoders and decoders of record payloads, one layout per state kind:
///
/// - value, reducing, aggregating: `timestamp i64 | value bytes (to the end)`
/// - list: `count u32 | (timestamp i64 | len u32 | element)*`
/// - map: `count u32 | (timestamp i64 | len u32 | user key | len u32 | user value)*`
///
/// The timestamp is the TTL timestamp (last access, milliseconds); states without TTL write 0.
pub mod payload {
    use super::{put_i64, put_u32, Decoder};
    use crate::error::Result;

    /// Writes a single-value payload whose value is produced by `write_value`.
    pub fn single<E>(
        out: &mut Vec<u8>,
        timestamp: i64,
        write_value: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        put_i64(out, timestamp);
        write_value(out)
    }

    /// Starts a list or map payload of `count` items.
    pub fn count(out: &mut Vec<u8>, count: u32) {
        put_u32(out, count);
    }

    /// Appends a u32-length-prefixed item produced by `write`.
    pub fn prefixed<E>(
        out: &mut Vec<u8>,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let at = out.len();
        put_u32(out, 0);
        write(out)?;
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Appends a list element.
    pub fn list_element<E>(
        out: &mut Vec<u8>,
        timestamp: i64,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        put_i64(out, timestamp);
        prefixed(out, write)
    }

    /// Appends a map entry.
    pub fn map_entry<E>(
        out: &mut Vec<u8>,
        timestamp: i64,
        write_key: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
        write_value: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        put_i64(out, timestamp);
        prefixed(out, write_key)?;
        prefixed(out, write_value)
    }

    /// Reads a single-value payload: `(timestamp, value bytes)`.
    pub fn decode_single<'a>(d: &mut Decoder<'a>) -> Result<(i64, &'a [u8])> {
        let ts = d.i64("value timestamp")?;
        let rest = d.remaining();
        Ok((ts, d.take(rest, "value")?))
    }

    /// Reads a list payload: `(timestamp, element bytes)` per element.
    pub fn decode_list<'a>(d: &mut Decoder<'a>) -> Result<Vec<(i64, &'a [u8])>> {
        let n = d.u32("list length")? as usize;
        // Each element takes at least 12 bytes: bound the allocation by what is there.
        if n > d.remaining() / 12 {
            return Err(d.corrupt(format!(
                "list claims {n} elements in {} bytes",
                d.remaining()
            )));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let ts = d.i64("list element timestamp")?;
            items.push((ts, d.bytes("list element")?));
        }
        if !d.is_empty() {
            return Err(d.corrupt("bytes after the last list element"));
        }
        Ok(items)
    }

    /// One map entry of a payload: `(timestamp, user key bytes, user value bytes)`.
    pub type MapEntryBytes<'a> = (i64, &'a [u8], &'a [u8]);

    /// Reads a map payload.
    pub fn decode_map<'a>(d: &mut Decoder<'a>) -> Result<Vec<MapEntryBytes<'a>>> {
        let n = d.u32("map size")? as usize;
        if n > d.remaining() / 16 {
            return Err(d.corrupt(format!("map claims {n} entries in {} bytes", d.remaining())));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let ts = d.i64("map entry timestamp")?;
            let k = d.bytes("map user key")?;
            let v = d.bytes("map user value")?;
            items.push((ts, k, v));
        }
        if !d.is_empty() {
            return Err(d.corrupt("bytes after the last map entry"));
        }
        Ok(items)
    }
}

// ---------------------------------------------------------------------------------------------
// Header

pub(crate) fn encode_serializer(out: &mut Vec<u8>, s: &SerializerSnapshot) -> Result<()> {
    let id = s.id.as_bytes();
    let id_len = u16::try_from(id.len()).map_err(|_| Error::Serialize {
        state: s.id.clone(),
        what: "serializer id",
        reason: "longer than 65535 bytes".into(),
    })?;
    put_u16(out, id_len);
    out.extend_from_slice(id);
    put_u32(out, s.version);
    put_bytes(out, &s.schema, "serializer schema")
}

pub(crate) fn decode_serializer(d: &mut Decoder<'_>) -> Result<SerializerSnapshot> {
    Ok(SerializerSnapshot {
        id: d.str16("serializer id")?.to_string(),
        version: d.u32("serializer version")?,
        schema: d.bytes("serializer schema")?.to_vec(),
    })
}

/// Encodes a header (magic, version, body, checksum) of a full stream.
pub fn encode_header(h: &SnapshotHeader) -> Result<Vec<u8>> {
    encode_header_version(h, SNAPSHOT_VERSION)
}

fn encode_header_version(h: &SnapshotHeader, version: u16) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    put_u32(&mut body, h.max_parallelism);
    put_u32(&mut body, h.key_group_range.start());
    put_u32(&mut body, h.key_group_range.end());
    encode_serializer(&mut body, &h.key_serializer)?;
    put_len(&mut body, h.states.len(), "state count")?;
    for s in &h.states {
        let name = s.name.as_str().as_bytes();
        put_u16(&mut body, name.len() as u16); // validated names are at most 255 bytes
        body.extend_from_slice(name);
        body.push(s.kind.code());
        match s.ttl_millis {
            Some(t) => {
                body.push(1);
                put_i64(&mut body, t);
            }
            None => body.push(0),
        }
        body.push(s.serializers.len() as u8);
        for (role, snap) in &s.serializers {
            body.push(role.code());
            encode_serializer(&mut body, snap)?;
        }
    }
    let mut out = Vec::with_capacity(body.len() + 14);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    put_u16(&mut out, version);
    put_len(&mut out, body.len(), "snapshot header")?;
    out.extend_from_slice(&body);
    put_u32(&mut out, crc32c::crc32c(&body));
    Ok(out)
}

fn decode_header_body(body: &[u8], stream: &str) -> Result<SnapshotHeader> {
    let mut d = Decoder::new(body, 10, stream);
    let max_parallelism = d.u32("max parallelism")?;
    let start = d.u32("key group range start")?;
    let end = d.u32("key group range end")?;
    if end < start || end > max_parallelism {
        return Err(d.corrupt(format!(
            "key group range [{start}, {end}) does not fit max parallelism {max_parallelism}"
        )));
    }
    let key_serializer = decode_serializer(&mut d)?;
    let n = d.u32("state count")? as usize;
    if n > d.remaining() / 4 {
        return Err(d.corrupt(format!("header claims {n} states")));
    }
    let mut states = Vec::with_capacity(n);
    for _ in 0..n {
        let raw = d.str16("state name")?;
        let name = StateName::new(raw)
            .map_err(|e| d.corrupt(format!("invalid state name in header: {e}")))?;
        let code = d.u8("state kind")?;
        let kind = StateKind::from_code(code)
            .ok_or_else(|| d.corrupt(format!("unknown state kind {code} for state '{name}'")))?;
        let ttl_millis = match d.u8("ttl flag")? {
            0 => None,
            1 => Some(d.i64("ttl")?),
            f => return Err(d.corrupt(format!("bad TTL flag {f} for state '{name}'"))),
        };
        let count = d.u8("serializer count")?;
        let mut serializers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let rc = d.u8("serializer role")?;
            let role = SerializerRole::from_code(rc).ok_or_else(|| {
                d.corrupt(format!("unknown serializer role {rc} for state '{name}'"))
            })?;
            serializers.push((role, decode_serializer(&mut d)?));
        }
        if states.iter().any(|s: &StateMeta| s.name == name) {
            return Err(d.corrupt(format!("state '{name}' appears twice in the header")));
        }
        states.push(StateMeta {
            name,
            kind,
            ttl_millis,
            serializers,
        });
    }
    if !d.is_empty() {
        return Err(d.corrupt("bytes after the last state of the header"));
    }
    Ok(SnapshotHeader {
        max_parallelism,
        key_group_range: KeyGroupRange::new(start, end),
        key_serializer,
        states,
    })
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Writes a snapshot stream: the header, then key-group blocks in increasing key-group order,
/// then the end marker with the offset index.
///
/// A block is assembled in memory before it is written (its length comes first), so memory use
/// is bounded by the largest key group, not by the whole state.
pub struct SnapshotWriter<W: Write> {
    out: W,
    written: u64,
    header_length: u64,
    states: usize,
    offsets: Vec<KeyGroupOffset>,
    block: Vec<u8>,
    current: Option<u32>,
    last: Option<u32>,
    range: KeyGroupRange,
    max_parallelism: u32,
    records: u64,
    /// Delta streams only: the tombstones of the current key group, and the blocks written.
    delta: bool,
    tombs: Vec<u8>,
    tomb_offsets: Vec<KeyGroupOffset>,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header of a full stream and returns a writer for the blocks.
    pub fn new(out: W, header: &SnapshotHeader) -> Result<Self> {
        Self::with_version(out, header, SNAPSHOT_VERSION)
    }

    /// Writes the header of a delta stream (version 2): besides records, each key group may
    /// carry tombstones ([`SnapshotWriter::write_tombstone`]).
    pub fn new_delta(out: W, header: &SnapshotHeader) -> Result<Self> {
        Self::with_version(out, header, SNAPSHOT_DELTA_VERSION)
    }

    fn with_version(mut out: W, header: &SnapshotHeader, version: u16) -> Result<Self> {
        let bytes = encode_header_version(header, version)?;
        out.write_all(&bytes)
            .map_err(|e| Error::io("writing the snapshot header", e))?;
        Ok(SnapshotWriter {
            out,
            written: bytes.len() as u64,
            header_length: bytes.len() as u64,
            states: header.states.len(),
            offsets: Vec::new(),
            block: Vec::new(),
            current: None,
            last: None,
            range: header.key_group_range,
            max_parallelism: header.max_parallelism,
            records: 0,
            delta: version == SNAPSHOT_DELTA_VERSION,
            tombs: Vec::new(),
            tomb_offsets: Vec::new(),
        })
    }

    /// Delta streams only: records that the entry of `key` and `namespace` of the state at
    /// `state_index` no longer exists (for timers, `payload` is the timer's payload and names
    /// the timer; for other states it is empty).
    pub fn write_tombstone(
        &mut self,
        state_index: u32,
        key: &[u8],
        namespace: &[u8],
        payload: &[u8],
    ) -> Result<()> {
        if !self.delta || self.current.is_none() || state_index as usize >= self.states {
            return Err(Error::Unsupported {
                state: String::new(),
                reason: format!(
                    "snapshot writer: tombstone of state {state_index} outside a key group of a \
                     delta stream"
                ),
            });
        }
        put_u32(&mut self.tombs, state_index);
        put_bytes(&mut self.tombs, key, "key")?;
        put_bytes(&mut self.tombs, namespace, "namespace")?;
        put_bytes(&mut self.tombs, payload, "tombstone payload")
    }

    /// Starts the block of `key_group` (finishing the previous one). Key groups must increase.
    pub fn begin_key_group(&mut self, key_group: u32) -> Result<()> {
        self.end_key_group()?;
        if !self.range.contains(key_group) || self.last.is_some_and(|l| key_group <= l) {
            return Err(Error::Unsupported {
                state: String::new(),
                reason: format!(
                    "snapshot writer: key group {key_group} out of order or outside {}",
                    self.range
                ),
            });
        }
        self.current = Some(key_group);
        self.block.clear();
        Ok(())
    }

    /// Appends a record of the state at `state_index` in the header. `payload` is produced with
    /// the [`payload`] encoders.
    pub fn write_record(
        &mut self,
        state_index: u32,
        key: &[u8],
        namespace: &[u8],
        payload: &[u8],
    ) -> Result<()> {
        let Some(kg) = self.current else {
            return Err(Error::Unsupported {
                state: String::new(),
                reason: "snapshot writer: record written outside a key group".into(),
            });
        };
        debug_assert_eq!(assign_to_key_group(key, self.max_parallelism), kg);
        if state_index as usize >= self.states {
            return Err(Error::Unsupported {
                state: String::new(),
                reason: format!("snapshot writer: no state at index {state_index}"),
            });
        }
        put_u32(&mut self.block, state_index);
        put_bytes(&mut self.block, key, "key")?;
        put_bytes(&mut self.block, namespace, "namespace")?;
        put_bytes(&mut self.block, payload, "record payload")?;
        self.records += 1;
        Ok(())
    }

    /// Like [`SnapshotWriter::write_record`], with the payload appended by `payload` straight
    /// into the block (no intermediate buffer). When `payload` answers `false` (e.g. the entry
    /// expired) or fails, the record is dropped and nothing of it stays in the block.
    pub fn write_record_with(
        &mut self,
        state_index: u32,
        key: &[u8],
        namespace: &[u8],
        payload: &mut dyn FnMut(&mut Vec<u8>) -> Result<bool>,
    ) -> Result<bool> {
        if self.current.is_none() || state_index as usize >= self.states {
            // The checks and their messages of `write_record`.
            return self
                .write_record(state_index, key, namespace, &[])
                .map(|()| false);
        }
        let mark = self.block.len();
        put_u32(&mut self.block, state_index);
        put_bytes(&mut self.block, key, "key")?;
        put_bytes(&mut self.block, namespace, "namespace")?;
        let at = self.block.len();
        put_u32(&mut self.block, 0);
        match payload(&mut self.block) {
            Ok(true) => {
                let len = self.block.len() - at - 4;
                let Ok(len) = u32::try_from(len) else {
                    self.block.truncate(mark);
                    return Err(Error::Serialize {
                        state: String::new(),
                        what: "record payload",
                        reason: format!("{len} bytes is more than a record can hold (4 GiB)"),
                    });
                };
                self.block[at..at + 4].copy_from_slice(&len.to_be_bytes());
                self.records += 1;
                Ok(true)
            }
            Ok(false) => {
                self.block.truncate(mark);
                Ok(false)
            }
            Err(e) => {
                self.block.truncate(mark);
                Err(e)
            }
        }
    }

    fn end_key_group(&mut self) -> Result<()> {
        let Some(kg) = self.current.take() else {
            return Ok(());
        };
        self.last = Some(kg);
        if !self.block.is_empty() {
            let o = self.emit(TAG_BLOCK, kg, false)?;
            self.offsets.push(o);
        }
        if !self.tombs.is_empty() {
            let o = self.emit(TAG_TOMBSTONES, kg, true)?;
            self.tomb_offsets.push(o);
        }
        Ok(())
    }

    /// Writes the block buffer (or the tombstone buffer) as a block with `tag`, then clears it.
    fn emit(&mut self, tag: u8, kg: u32, tombs: bool) -> Result<KeyGroupOffset> {
        let body = if tombs { &self.tombs } else { &self.block };
        let mut head = [0u8; 13];
        head[0] = tag;
        head[1..5].copy_from_slice(&kg.to_be_bytes());
        head[5..13].copy_from_slice(&(body.len() as u64).to_be_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head[1..]), body);
        let ctx = |e| Error::io(format!("writing the block of key group {kg}"), e);
        self.out.write_all(&head).map_err(ctx)?;
        self.out.write_all(body).map_err(ctx)?;
        self.out.write_all(&crc.to_be_bytes()).map_err(ctx)?;
        let length = 13 + body.len() as u64 + 4;
        let o = KeyGroupOffset {
            key_group: kg,
            offset: self.written,
            length,
        };
        self.written += length;
        if tombs {
            self.tombs.clear();
        } else {
            self.block.clear();
        }
        Ok(o)
    }

    /// Writes the end marker, flushes, and reports what was written.
    pub fn finish(mut self) -> Result<(SnapshotSummary, W)> {
        self.end_key_group()?;
        let mut end = Vec::with_capacity(17 + self.offsets.len() * 20);
        end.push(TAG_END);
        put_len(&mut end, self.offsets.len(), "key group index")?;
        for o in &self.offsets {
            put_u32(&mut end, o.key_group);
            put_u64(&mut end, o.offset);
            put_u64(&mut end, o.length);
        }
        put_u64(&mut end, self.records);
        let crc = crc32c::crc32c(&end[1..]);
        put_u32(&mut end, crc);
        let ctx = |e| Error::io("writing the snapshot end marker", e);
        self.out.write_all(&end).map_err(ctx)?;
        self.out.flush().map_err(ctx)?;
        self.written += end.len() as u64;
        Ok((
            SnapshotSummary {
                bytes: self.written,
                header_length: self.header_length,
                key_groups: self.offsets,
                records: self.records,
                tombstones: self.tomb_offsets,
            },
            self.out,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

/// One record of a key-group block, borrowed from the block.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// Index of the state in the stream's header.
    pub state_index: u32,
    /// The serialized key.
    pub key: &'a [u8],
    /// The serialized namespace.
    pub namespace: &'a [u8],
    /// The kind-specific payload (see [`payload`]).
    pub payload: &'a [u8],
    /// Offset of the payload in the stream, for error messages.
    pub payload_offset: u64,
}

/// A key group's block, read and checksum-verified.
#[derive(Debug)]
pub struct KeyGroupBlock {
    /// The key group.
    pub key_group: u32,
    /// Offset of the block in the stream.
    pub offset: u64,
    body: Vec<u8>,
    tombstones: bool,
}

impl KeyGroupBlock {
    /// True for a tombstone block of a delta stream (its records name removed entries).
    pub fn is_tombstones(&self) -> bool {
        self.tombstones
    }

    /// Decodes one whole block (tag to checksum) held in `bytes`, which start at byte `offset`
    /// of the stream named `stream`: checks the tag, that the length fits `bytes` exactly and
    /// the checksum. `tombstones_allowed`: accept a tombstone block (delta streams).
    pub fn decode(
        bytes: &[u8],
        offset: u64,
        stream: &str,
        tombstones_allowed: bool,
    ) -> Result<Self> {
        let mut d = Decoder::new(bytes, offset, stream);
        let tag = d.u8("block tag")?;
        let tombstones = match tag {
            TAG_BLOCK => false,
            TAG_TOMBSTONES if tombstones_allowed => true,
            t => return Err(d.corrupt(format!("expected a key-group block, found tag {t:#04x}"))),
        };
        let head = d.take(12, "block header")?;
        let kg = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&head[4..12]);
        let len = u64::from_be_bytes(len8);
        if len != d.remaining().saturating_sub(4) as u64 || d.remaining() < 4 {
            return Err(d.corrupt(format!(
                "block of key group {kg} declares {len} bytes, {} are there",
                d.remaining().saturating_sub(4)
            )));
        }
        let body = d.take(len as usize, "block body")?;
        let crc = d.u32("block checksum")?;
        if crc != crc32c::crc32c_append(crc32c::crc32c(head), body) {
            return Err(d.corrupt(format!("checksum mismatch in the block of key group {kg}")));
        }
        Ok(KeyGroupBlock {
            key_group: kg,
            offset,
            body: body.to_vec(),
            tombstones,
        })
    }

    /// Encodes a block of `key_group` (a tombstone block if `tombstones`) around `records`,
    /// which were appended with [`append_record`].
    pub fn encode(key_group: u32, tombstones: bool, records: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(records.len() + 17);
        out.push(if tombstones {
            TAG_TOMBSTONES
        } else {
            TAG_BLOCK
        });
        put_u32(&mut out, key_group);
        put_u64(&mut out, records.len() as u64);
        out.extend_from_slice(records);
        let crc = crc32c::crc32c(&out[1..]);
        put_u32(&mut out, crc);
        out
    }

    /// How many records of each state (by index in the stream's header, which has `states`)
    /// the block of stream `stream` holds, read from the record framing alone (no key hashing):
    /// for making room before decoding, or checking a block kept for later cheaply. A framing
    /// error or a record naming a state the header does not have is a corruption error.
    pub fn record_counts(&self, stream: &str, states: usize) -> Result<Vec<usize>> {
        let mut counts = vec![0usize; states];
        let mut d = Decoder::new(&self.body, self.offset + 13, stream);
        while !d.is_empty() {
            let state = d.u32("record state index")?;
            let at = d.base + d.pos as u64;
            d.bytes("record key")?;
            d.bytes("record namespace")?;
            d.bytes("record payload")?;
            match counts.get_mut(state as usize) {
                Some(c) => *c += 1,
                None => {
                    return Err(Error::Corrupt {
                        stream: stream.to_string(),
                        offset: at,
                        reason: format!("record refers to state {state} of {states}"),
                    })
                }
            }
        }
        Ok(counts)
    }

    /// The block's records, in the order they were written.
    pub fn records<'a>(&'a self, stream: &'a str, max_parallelism: u32) -> RecordIter<'a> {
        RecordIter {
            d: Decoder::new(&self.body, self.offset + 13, stream),
            key_group: self.key_group,
            max_parallelism,
        }
    }
}

/// Appends `r` to the records of a block being built for [`KeyGroupBlock::encode`].
pub fn append_record(out: &mut Vec<u8>, r: &RawRecord<'_>) -> Result<()> {
    put_u32(out, r.state_index);
    put_bytes(out, r.key, "key")?;
    put_bytes(out, r.namespace, "namespace")?;
    put_bytes(out, r.payload, "record payload")
}

/// Iterates over the records of a [`KeyGroupBlock`].
#[derive(Debug)]
pub struct RecordIter<'a> {
    d: Decoder<'a>,
    key_group: u32,
    max_parallelism: u32,
}

impl<'a> RecordIter<'a> {
    fn read(&mut self) -> Result<RawRecord<'a>> {
        let state_index = self.d.u32("record state index")?;
        let key = self.d.bytes("record key")?;
        let namespace = self.d.bytes("record namespace")?;
        let plen = self.d.u32("record payload")? as usize;
        let payload_offset = self.d.base + self.d.pos as u64;
        let payload = self.d.take(plen, "record payload")?;
        let kg = assign_to_key_group(key, self.max_parallelism);
        if kg != self.key_group {
            return Err(self.d.corrupt(format!(
                "a key of key group {kg} is stored in the block of key group {}",
                self.key_group
            )));
        }
        Ok(RawRecord {
            state_index,
            key,
            namespace,
            payload,
            payload_offset,
        })
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RawRecord<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.d.is_empty() {
            return None;
        }
        let r = self.read();
        if r.is_err() {
            self.d.pos = self.d.buf.len();
        }
        Some(r)
    }
}

/// Reads a snapshot stream: the header, then blocks one at a time.
pub struct SnapshotReader<R: Read> {
    input: R,
    pos: u64,
    header: SnapshotHeader,
    stream: String,
    finished: bool,
    last: Option<u32>,
    last_tombs: Option<u32>,
    version: u16,
}

fn read_exact_or_corrupt<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    stream: &str,
    offset: u64,
    what: &str,
) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Corrupt {
                stream: stream.to_string(),
                offset,
                reason: format!("truncated: the stream ends inside the {what}"),
            }
        } else {
            Error::io(format!("reading the {what} of '{stream}'"), e)
        }
    })
}

fn read_body<R: Read>(
    r: &mut R,
    len: u64,
    stream: &str,
    offset: u64,
    what: &str,
) -> Result<Vec<u8>> {
    // Grow with the data actually present instead of trusting the declared length.
    let mut body = Vec::with_capacity(len.min(1 << 20) as usize);
    let got = r
        .by_ref()
        .take(len)
        .read_to_end(&mut body)
        .map_err(|e| Error::io(format!("reading the {what} of '{stream}'"), e))?;
    if (got as u64) < len {
        return Err(Error::Corrupt {
            stream: stream.to_string(),
            offset,
            reason: format!("truncated: the {what} declares {len} bytes but only {got} follow"),
        });
    }
    Ok(body)
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and verifies the header. `stream` names the stream in errors (a file or object name).
    pub fn open(mut input: R, stream: impl Into<String>) -> Result<Self> {
        let stream = stream.into();
        let mut head = [0u8; 10];
        read_exact_or_corrupt(&mut input, &mut head, &stream, 0, "snapshot header")?;
        if head[0..4] != SNAPSHOT_MAGIC {
            return Err(Error::Corrupt {
                stream,
                offset: 0,
                reason: format!(
                    "bad magic {:02x?}: not a Flowstate snapshot (expected \"FLWS\")",
                    &head[0..4]
                ),
            });
        }
        let version = u16::from_be_bytes([head[4], head[5]]);
        if version != SNAPSHOT_VERSION && version != SNAPSHOT_DELTA_VERSION {
            return Err(Error::UnsupportedVersion {
                stream,
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let len = u32::from_be_bytes([head[6], head[7], head[8], head[9]]);
        if len > MAX_HEADER_LEN {
            return Err(Error::Corrupt {
                stream,
                offset: 6,
                reason: format!("header length {len} exceeds the limit of {MAX_HEADER_LEN}"),
            });
        }
        let body = read_body(&mut input, u64::from(len), &stream, 10, "snapshot header")?;
        let mut crc = [0u8; 4];
        let crc_at = 10 + u64::from(len);
        read_exact_or_corrupt(&mut input, &mut crc, &stream, crc_at, "header checksum")?;
        if u32::from_be_bytes(crc) != crc32c::crc32c(&body) {
            return Err(Error::Corrupt {
                stream,
                offset: crc_at,
                reason: "header checksum mismatch".into(),
            });
        }
        let header = decode_header_body(&body, &stream)?;
        Ok(SnapshotReader {
            input,
            pos: crc_at + 4,
            header,
            stream,
            finished: false,
            last: None,
            last_tombs: None,
            version,
        })
    }

    /// The stream's format version ([`SNAPSHOT_VERSION`] or [`SNAPSHOT_DELTA_VERSION`]).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The stream's header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The stream's name as given to [`SnapshotReader::open`].
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            stream: self.stream.clone(),
            offset,
            reason: reason.into(),
        }
    }

    /// The next block, or `None` after the end marker (whose checksum is verified). A
    /// tombstone block (delta streams) is an error: such a stream must be applied through the
    /// checkpoint that lists it ([`SnapshotReader::next_any_block`] returns them).
    pub fn next_block(&mut self) -> Result<Option<KeyGroupBlock>> {
        let at = self.pos;
        match self.next_any_block()? {
            Some(b) if b.tombstones => Err(self.corrupt(
                at,
                format!(
                    "tombstone block of key group {}: '{}' is a delta snapshot, restorable only \
                     through the checkpoint that lists it after its base",
                    b.key_group, self.stream
                ),
            )),
            other => Ok(other),
        }
    }

    /// Like [`SnapshotReader::next_block`], also returning the tombstone blocks of a delta
    /// stream.
    pub fn next_any_block(&mut self) -> Result<Option<KeyGroupBlock>> {
        if self.finished {
            return Ok(None);
        }
        let at = self.pos;
        let mut tag = [0u8; 1];
        read_exact_or_corrupt(&mut self.input, &mut tag, &self.stream, at, "end marker")?;
        let tombstones = tag[0] == TAG_TOMBSTONES && self.version == SNAPSHOT_DELTA_VERSION;
        match tag[0] {
            TAG_BLOCK | TAG_TOMBSTONES if tag[0] == TAG_BLOCK || tombstones => {
                let mut head = [0u8; 12];
                read_exact_or_corrupt(
                    &mut self.input,
                    &mut head,
                    &self.stream,
                    at + 1,
                    "block header",
                )?;
                let kg = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let mut len8 = [0u8; 8];
                len8.copy_from_slice(&head[4..12]);
                let len = u64::from_be_bytes(len8);
                if !self.header.key_group_range.contains(kg) {
                    return Err(self.corrupt(
                        at + 1,
                        format!(
                            "block of key group {kg} outside the stream's range {}",
                            self.header.key_group_range
                        ),
                    ));
                }
                let out_of_order = if tombstones {
                    self.last.is_some_and(|l| kg < l) || self.last_tombs.is_some_and(|l| kg <= l)
                } else {
                    self.last.is_some_and(|l| kg <= l) || self.last_tombs.is_some_and(|l| kg <= l)
                };
                if out_of_order {
                    return Err(
                        self.corrupt(at + 1, format!("block of key group {kg} out of order"))
                    );
                }
                if len > MAX_BLOCK_LEN {
                    return Err(
                        self.corrupt(at + 5, format!("block length {len} exceeds the limit"))
                    );
                }
                let body = read_body(
                    &mut self.input,
                    len,
                    &self.stream,
                    at + 13,
                    "key group block",
                )?;
                let mut crc = [0u8; 4];
                let crc_at = at + 13 + len;
                read_exact_or_corrupt(
                    &mut self.input,
                    &mut crc,
                    &self.stream,
                    crc_at,
                    "block checksum",
                )?;
                if u32::from_be_bytes(crc) != crc32c::crc32c_append(crc32c::crc32c(&head), &body) {
                    return Err(self.corrupt(
                        crc_at,
                        format!("checksum mismatch in the block of key group {kg}"),
                    ));
                }
                self.pos = crc_at + 4;
                if tombstones {
                    self.last_tombs = Some(kg);
                } else {
                    self.last = Some(kg);
                }
                Ok(Some(KeyGroupBlock {
                    key_group: kg,
                    offset: at,
                    body,
                    tombstones,
                }))
            }
            TAG_END => {
                let mut n4 = [0u8; 4];
                read_exact_or_corrupt(
                    &mut self.input,
                    &mut n4,
                    &self.stream,
                    at + 1,
                    "end marker",
                )?;
                let n = u64::from(u32::from_be_bytes(n4));
                if n > u64::from(self.header.key_group_range.len()) {
                    return Err(self.corrupt(at + 1, format!("end marker lists {n} key groups")));
                }
                let rest = read_body(
                    &mut self.input,
                    n * 20 + 12,
                    &self.stream,
                    at + 5,
                    "end marker",
                )?;
                let (idx, crc) = rest.split_at(rest.len() - 4);
                let want = crc32c::crc32c_append(crc32c::crc32c(&n4), idx);
                if u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) != want {
                    return Err(self.corrupt(at, "checksum mismatch in the end marker"));
                }
                self.finished = true;
                Ok(None)
            }
            other => Err(self.corrupt(at, format!("unknown block tag {other:#04x}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restore from several streams

/// Receives what [`restore_streams`] reads.
pub trait RestoreVisitor {
    /// Called once per stream, after its header is verified and before its records.
    fn on_header(&mut self, stream: &str, header: &SnapshotHeader) -> Result<()>;
    /// Called for each record of a key group in the restoring range. `state` is the record's
    /// state as described by the stream's header.
    fn on_record(
        &mut self,
        stream: &str,
        state: &StateMeta,
        key_group: u32,
        record: RawRecord<'_>,
    ) -> Result<()>;

    /// Called for each block of a key group in the restoring range, checksum verified; the
    /// default hands its records one by one to [`Self::on_record`]. A visitor that overrides
    /// it takes the block whole (to decode it on another thread, or keep it for later) and
    /// reads its records with [`KeyGroupBlock::records`] and [`record_state`].
    fn on_block(
        &mut self,
        stream: &str,
        header: &SnapshotHeader,
        block: KeyGroupBlock,
    ) -> Result<()> {
        for rec in block.records(stream, header.max_parallelism) {
            let rec = rec?;
            let state = record_state(stream, header, &rec)?;
            self.on_record(stream, state, block.key_group, rec)?;
        }
        Ok(())
    }
}

/// The state a record of `stream` (whose header is `header`) belongs to; a corruption error
/// when its state index is not in the header.
pub fn record_state<'h>(
    stream: &str,
    header: &'h SnapshotHeader,
    rec: &RawRecord<'_>,
) -> Result<&'h StateMeta> {
    header
        .states
        .get(rec.state_index as usize)
        .ok_or_else(|| Error::Corrupt {
            stream: stream.to_string(),
            offset: rec.payload_offset,
            reason: format!(
                "record refers to state {} of {}",
                rec.state_index,
                header.states.len()
            ),
        })
}

/// Reads every stream and hands the records of key groups in `range` to `visitor`; blocks of
/// other key groups are skipped. Fails on a stream of another max parallelism, on a state that
/// has different kinds in different streams, and on any damage.
pub fn restore_streams<R: Read>(
    streams: impl IntoIterator<Item = (String, R)>,
    max_parallelism: u32,
    range: KeyGroupRange,
    visitor: &mut dyn RestoreVisitor,
) -> Result<()> {
    let mut kinds: Vec<(StateName, StateKind)> = Vec::new();
    for (name, input) in streams {
        let mut reader = SnapshotReader::open(input, name)?;
        let header = reader.header().clone();
        if header.max_parallelism != max_parallelism {
            return Err(Error::RestoreMismatch {
                reason: format!(
                    "snapshot '{}' was written with max parallelism {}, the backend has {}; \
                     max parallelism cannot change across a restore",
                    reader.stream_name(),
                    header.max_parallelism,
                    max_parallelism
                ),
            });
        }
        for s in &header.states {
            match kinds.iter().find(|(n, _)| *n == s.name) {
                Some((_, k)) if *k != s.kind => {
                    return Err(Error::StateKindMismatch {
                        state: s.name.to_string(),
                        existing: *k,
                        requested: s.kind,
                    })
                }
                Some(_) => {}
                None => kinds.push((s.name.clone(), s.kind)),
            }
        }
        visitor.on_header(reader.stream_name(), &header)?;
        if header.key_group_range.intersect(&range).is_empty() {
            continue;
        }
        while let Some(block) = reader.next_block()? {
            if !range.contains(block.key_group) {
                continue;
            }
            visitor.on_block(reader.stream_name(), &header, block)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(range: KeyGroupRange) -> SnapshotHeader {
        SnapshotHeader {
            max_parallelism: 8,
            key_group_range: range,
            key_serializer: SerializerSnapshot {
                id: "postcard".into(),
                version: 1,
                schema: b"u64".to_vec(),
            },
            states: vec![StateMeta {
                name: StateName::new("s").unwrap(),
                kind: StateKind::Value,
                ttl_millis: Some(5),
                serializers: vec![],
            }],
        }
    }

    fn key_in(kg: u32) -> Vec<u8> {
        (0u64..)
            .map(|i| i.to_be_bytes().to_vec())
            .find(|k| assign_to_key_group(k, 8) == kg)
            .unwrap()
    }

    fn sample() -> (Vec<u8>, SnapshotSummary) {
        let mut w = SnapshotWriter::new(Vec::new(), &header(KeyGroupRange::all(8))).unwrap();
        for kg in [1u32, 5] {
            w.begin_key_group(kg).unwrap();
            let mut p = Vec::new();
            payload::single::<Error>(&mut p, 7, |o| {
                o.extend_from_slice(&[kg as u8]);
                Ok(())
            })
            .unwrap();
            w.write_record(0, &key_in(kg), b"", &p).unwrap();
        }
        w.begin_key_group(6).unwrap(); // empty: no block
        let (summary, bytes) = w.finish().unwrap();
        (bytes, summary)
    }

    struct Collect(Vec<(u32, Vec<u8>)>);
    impl RestoreVisitor for Collect {
        fn on_header(&mut self, _: &str, _: &SnapshotHeader) -> Result<()> {
            Ok(())
        }
        fn on_record(&mut self, _: &str, _: &StateMeta, kg: u32, r: RawRecord<'_>) -> Result<()> {
            self.0.push((kg, r.payload.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn round_trip_and_range_filter() {
        let (bytes, summary) = sample();
        assert_eq!(summary.bytes, bytes.len() as u64);
        assert_eq!(summary.key_groups.len(), 2);
        assert_eq!(summary.records, 2);
        let r = SnapshotReader::open(&bytes[..], "mem").unwrap();
        assert_eq!(r.header(), &header(KeyGroupRange::all(8)));
        let mut all = Collect(vec![]);
        restore_streams(
            [("a".to_string(), &bytes[..])],
            8,
            KeyGroupRange::all(8),
            &mut all,
        )
        .unwrap();
        assert_eq!(all.0.len(), 2);
        let mut part = Collect(vec![]);
        restore_streams(
            [("a".to_string(), &bytes[..])],
            8,
            KeyGroupRange::new(4, 8),
            &mut part,
        )
        .unwrap();
        assert_eq!(part.0.len(), 1);
        assert_eq!(part.0[0].0, 5);
        // Reading a block straight from its recorded offset works.
        let o = summary.key_groups[1];
        assert_eq!(bytes[o.offset as usize], TAG_BLOCK);
        let err = restore_streams(
            [("a".to_string(), &bytes[..])],
            16,
            KeyGroupRange::all(16),
            &mut all,
        )
        .unwrap_err();
        assert!(err.to_string().contains("max parallelism"), "{err}");
    }

    #[test]
    fn records_written_in_place_or_dropped() {
        let mut w = SnapshotWriter::new(Vec::new(), &header(KeyGroupRange::all(8))).unwrap();
        w.begin_key_group(1).unwrap();
        let key = key_in(1);
        let kept = w
            .write_record_with(0, &key, b"", &mut |out| {
                out.extend_from_slice(&[0; 8]);
                out.push(42);
                Ok(true)
            })
            .unwrap();
        let dropped = w
            .write_record_with(0, &key, b"", &mut |out| {
                out.push(1);
                Ok(false)
            })
            .unwrap();
        assert!(kept && !dropped);
        assert!(w
            .write_record_with(5, &key, b"", &mut |_| Ok(true))
            .is_err());
        let (summary, bytes) = w.finish().unwrap();
        assert_eq!(summary.records, 1);
        let mut c = Collect(vec![]);
        restore_streams(
            [("a".to_string(), &bytes[..])],
            8,
            KeyGroupRange::all(8),
            &mut c,
        )
        .unwrap();
        assert_eq!(c.0, vec![(1, [0, 0, 0, 0, 0, 0, 0, 0, 42].to_vec())]);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_an_error() {
        let (bytes, _) = sample();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let mut c = Collect(vec![]);
            let r = restore_streams(
                [("x".to_string(), &b[..])],
                8,
                KeyGroupRange::all(8),
                &mut c,
            );
            assert!(r.is_err(), "flip at {i} not detected");
        }
        for len in 0..bytes.len() {
            let mut c = Collect(vec![]);
            let r = restore_streams(
                [("x".to_string(), &bytes[..len])],
                8,
                KeyGroupRange::all(8),
                &mut c,
            );
            let err = r.expect_err("truncation not detected");
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        }
    }

    #[test]
    fn delta_streams_carry_tombstone_blocks_that_only_next_any_block_returns() {
        let mut w = SnapshotWriter::new_delta(Vec::new(), &header(KeyGroupRange::all(8))).unwrap();
        w.begin_key_group(1).unwrap();
        w.write_record(0, &key_in(1), b"", &[0; 9]).unwrap();
        w.write_tombstone(0, &key_in(1), b"ns", &[]).unwrap();
        w.begin_key_group(3).unwrap();
        w.write_tombstone(0, &key_in(3), b"", &[]).unwrap();
        assert!(w.write_tombstone(4, &key_in(3), b"", &[]).is_err());
        let (summary, bytes) = w.finish().unwrap();
        assert_eq!(&bytes[4..6], &SNAPSHOT_DELTA_VERSION.to_be_bytes());
        assert_eq!(summary.key_groups.len(), 1);
        assert_eq!(
            summary
                .tombstones
                .iter()
                .map(|t| t.key_group)
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
        // Read whole, a delta is refused at its first tombstone block.
        let mut c = Collect(vec![]);
        let err = restore_streams(
            [("d".to_string(), &bytes[..])],
            8,
            KeyGroupRange::all(8),
            &mut c,
        )
        .unwrap_err();
        assert!(err.to_string().contains("delta snapshot"), "{err}");
        let mut r = SnapshotReader::open(&bytes[..], "d").unwrap();
        assert_eq!(r.version(), SNAPSHOT_DELTA_VERSION);
        let kinds: Vec<(u32, bool)> = std::iter::from_fn(|| r.next_any_block().unwrap())
            .map(|b| (b.key_group, b.is_tombstones()))
            .collect();
        assert_eq!(kinds, vec![(1, false), (1, true), (3, true)]);
        // A block decoded from its offsets and encoded again is the same bytes.
        let t = summary.tombstones[0];
        let raw = &bytes[t.offset as usize..(t.offset + t.length) as usize];
        let b = KeyGroupBlock::decode(raw, t.offset, "d", true).unwrap();
        assert!(b.is_tombstones());
        let mut body = Vec::new();
        for rec in b.records("d", 8) {
            append_record(&mut body, &rec.unwrap()).unwrap();
        }
        assert_eq!(KeyGroupBlock::encode(1, true, &body), raw);
        assert!(KeyGroupBlock::decode(raw, t.offset, "d", false).is_err());
        let mut bad = raw.to_vec();
        bad[15] ^= 1;
        let err = KeyGroupBlock::decode(&bad, t.offset, "d", true).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        // Full streams never hold tombstones.
        let mut full = SnapshotWriter::new(Vec::new(), &header(KeyGroupRange::all(8))).unwrap();
        full.begin_key_group(1).unwrap();
        assert!(full.write_tombstone(0, &key_in(1), b"", &[]).is_err());
    }

    #[test]
    fn hostile_lengths_do_not_allocate() {
        let mut b = Vec::new();
        b.extend_from_slice(&SNAPSHOT_MAGIC);
        b.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        b.extend_from_slice(&(MAX_HEADER_LEN + 1).to_be_bytes());
        assert!(SnapshotReader::open(&b[..], "h").is_err());
        let mut b2 = b[..6].to_vec();
        b2.extend_from_slice(&MAX_HEADER_LEN.to_be_bytes());
        let err = SnapshotReader::open(&b2[..], "h").err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = SnapshotReader::open(&b"NOPE\0\x01\0\0\0\0"[..], "h")
            .err()
            .unwrap();
        assert!(err.to_string().contains("bad magic"), "{err}");
        let err = SnapshotReader::open(&b"FLWS\0\x09\0\0\0\0"[..], "h")
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::UnsupportedVersion { found: 9, .. }),
            "{err}"
        );
    }
}
