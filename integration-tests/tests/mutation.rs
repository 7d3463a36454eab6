//! Seeded mutation test (issue 15): real files of every kind Flowstate writes — a canonical
//! snapshot, a delta, `_metadata`, a commit log entry, mmap sorted runs (in a native checkpoint
//! and in a local store), a local store's `MANIFEST` and native checkpoint metadata — are
//! truncated, bit-flipped and given oversized length fields (checksums recomputed where that
//! lets the damage reach the decoder), then read through restore (heap and mmap), inspect and
//! state reads. Never a panic; any success yields exactly the original data; no reader
//! allocates more than [`ALLOC_BOUND`] (the global allocator enforces it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::*;
use state_api::*;
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

// ---------------------------------------------------------------------------------------------
// Allocation accounting

/// The system allocator with a limit: while a read of damaged files runs, the limit is what
/// was live before it plus [`ALLOC_BOUND`], so a reader that trusts a huge length field fails
/// its allocation (and the test) instead of taking the machine's memory.
#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Most bytes one read of damaged files may allocate on top of what was live before it.
const ALLOC_BOUND: usize = 256 << 20;

// ---------------------------------------------------------------------------------------------
// Data

const MAX_P: u32 = 16;
const KEYS: u64 = 300;
const WAIT: Duration = Duration::from_secs(60);
/// Mutations per file kind (`MUT_N` overrides it, `MUT_SEED` the seed, to explore further).
const N: usize = 40;

fn mutations() -> usize {
    std::env::var("MUT_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(N)
}

/// A tiny seeded xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct States {
    v: ValueStateHandle<u64, ()>,
    l: ListStateHandle<String, ()>,
    m: MapStateHandle<u32, String, ()>,
}

fn register<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> state_api::Result<States> {
    Ok(States {
        v: b.register_value(ValueStateDescriptor::<u64>::new("v")?)?,
        l: b.register_list(ListStateDescriptor::<String>::new("l")?)?,
        m: b.register_map(MapStateDescriptor::<u32, String>::new("m")?)?,
    })
}

/// Everything the states hold, as text per key.
type Dump = BTreeMap<u64, String>;

fn dump<B: KeyedStateBackend<Key = u64>>(b: &mut B) -> state_api::Result<Dump> {
    let s = register(b)?;
    let mut out = BTreeMap::new();
    for k in 0..KEYS {
        b.set_current_key(k)?;
        let v = b.value(&s.v).get()?;
        let l = b.list(&s.l).get()?;
        let mut m = b.map(&s.m).iter()?.collect::<state_api::Result<Vec<_>>>()?;
        m.sort();
        if v.is_some() || l.is_some() || !m.is_empty() {
            out.insert(k, format!("{v:?} {l:?} {m:?}"));
        }
    }
    Ok(out)
}

/// Round 0 writes every key; later rounds change, clear and remove a few.
fn write_round<B: KeyedStateBackend<Key = u64>>(b: &mut B, round: u64, rng: &mut Rng) {
    let s = register(b).unwrap();
    for k in 0..KEYS {
        if round > 0 && rng.below(10) != 0 {
            continue;
        }
        b.set_current_key(k).unwrap();
        match (round, rng.below(6)) {
            (0, _) | (_, 0) => b.value(&s.v).update(k * 1000 + round).unwrap(),
            (_, 1) => b.value(&s.v).clear().unwrap(),
            (_, 2) => b.list(&s.l).add(format!("{k}-{round}")).unwrap(),
            (_, 3) => b.map(&s.m).put(round as u32, format!("{k}")).unwrap(),
            (_, 4) => b.map(&s.m).clear().unwrap(),
            _ => b.list(&s.l).clear().unwrap(),
        }
        if round == 0 {
            b.list(&s.l).add(format!("{k}")).unwrap();
            b.map(&s.m)
                .put(k as u32 % 3, "x".repeat(k as usize % 7))
                .unwrap();
        }
    }
}

fn checkpoint_once<B>(
    coord: &CheckpointCoordinator,
    ep: &mut SubtaskEndpoint,
    b: &mut B,
    snap: impl Fn(&mut SubtaskEndpoint, &Barrier, &mut B),
) -> CompletedCheckpoint {
    let pending = coord.trigger_checkpoint().unwrap();
    loop {
        if let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() {
            snap(ep, &barrier, b);
            break;
        }
    }
    let done = pending.wait(WAIT).unwrap();
    loop {
        if let SubtaskCommand::CheckpointComplete { checkpoint_id } = ep.recv_timeout(WAIT).unwrap()
        {
            if checkpoint_id == done.metadata.checkpoint_id {
                break;
            }
        }
    }
    done
}

fn storage_at(root: &Path, job: &str) -> CheckpointStorage {
    let store = object_store::local::LocalFileSystem::new_with_prefix(root).unwrap();
    CheckpointStorage::new(Arc::new(store), "ck", job).unwrap()
}

/// The local file of an object path.
fn local(root: &Path, p: &object_store::path::Path) -> PathBuf {
    root.join(p.as_ref())
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// Where a file kind keeps its length fields and how to make a change pass its checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Canonical,
    Delta,
    Metadata,
    CommitLog,
    NativeRun,
    LocalRun,
    Manifest,
    NativeMeta,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if at + 4 <= b.len() {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if at + 8 <= b.len() {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}

/// Recomputes the checksum of the canonical block at `off..off + len` (tag, 12 header bytes,
/// body, crc32c of everything after the tag).
fn fix_block_crc(b: &mut [u8], off: usize, len: usize) {
    if off + len <= b.len() && len >= 17 {
        let crc = crc32c::crc32c(&b[off + 1..off + len - 4]);
        put_u32(b, off + len - 4, crc);
    }
}

/// A length or size field: its offset and width in bytes (2, 4 or 8).
type Field = (usize, usize);

/// Reads big-endian integers while walking a structure; past the end it yields zeros.
struct Walk<'a> {
    b: &'a [u8],
    p: usize,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn int(&mut self, w: usize) -> u64 {
        let v = self
            .b
            .get(self.p..self.p + w)
            .map_or(0, |s| s.iter().fold(0u64, |a, x| (a << 8) | u64::from(*x)));
        self.p += w;
        v
    }
    /// A length field of width `w`: recorded, then its bytes skipped.
    fn len(&mut self, w: usize) -> usize {
        self.fields.push((self.p, w));
        let n = self.int(w) as usize;
        self.p += n;
        n
    }
    /// A count field of width `w` (recorded).
    fn count(&mut self, w: usize) -> u64 {
        self.fields.push((self.p, w));
        self.int(w)
    }
}

/// The length, count and size fields of a `_metadata` file (docs/checkpoint-format.md).
fn metadata_fields(b: &[u8]) -> (Vec<Field>, usize) {
    let mut w = Walk {
        b,
        p: 14,
        fields: vec![(6, 8)],
    };
    w.p += 1 + 8;
    w.len(2);
    w.p += 16;
    for _ in 0..w.count(4) {
        w.len(2);
        w.p += 8;
        for _ in 0..w.count(4) {
            w.p += 4;
            match w.int(1) {
                1 => {
                    w.p += 8;
                    for _ in 0..w.count(4) {
                        w.p += 1;
                        w.len(2);
                        w.count(8); // file size
                        w.p += 4;
                        w.len(4);
                        for _ in 0..2 {
                            let n = w.count(4);
                            for _ in 0..n {
                                w.p += 4;
                                w.count(8);
                                w.count(8);
                            }
                        }
                    }
                }
                2 => {
                    w.len(2);
                    w.p += 8;
                    w.len(4);
                    for _ in 0..w.count(4) {
                        w.p += 1;
                        w.len(2);
                        w.count(8);
                        w.p += 12;
                    }
                }
                _ => {}
            }
            if w.int(1) == 1 {
                w.len(4);
            }
        }
    }
    if b.get(4..6) >= Some(&[0, 3][..]) {
        // Version 3: the checkpoint's duration (`u64`).
        w.count(8);
    }
    (w.fields, w.p)
}

/// The length and count fields of a state registry at `at` (docs/mmap-format.md).
fn registry_fields(w: &mut Walk<'_>, end: usize) {
    let at = w.p;
    w.p += 5;
    for _ in 0..w.count(4) {
        if w.p >= end {
            break;
        }
        w.p += 4;
        w.len(4);
    }
    w.p = end.max(at);
}

/// The length and count fields of native checkpoint metadata (docs/mmap-format.md).
fn native_meta_fields(b: &[u8]) -> (Vec<Field>, usize) {
    let mut w = Walk {
        b,
        p: 18,
        fields: Vec::new(),
    };
    w.fields.push((18, 4));
    let n = w.int(4) as usize;
    let end = w.p + n;
    registry_fields(&mut w, end);
    for _ in 0..w.count(4) {
        for _ in 0..w.count(4) {
            w.len(4);
            // The file's key groups: a range that disagrees with the handle's must not pass.
            w.count(4);
            w.count(4);
            w.count(8);
        }
    }
    (w.fields, w.p)
}

/// The length and count fields of a store's MANIFEST (docs/mmap-format.md).
fn manifest_fields(b: &[u8]) -> (Vec<Field>, usize) {
    let mut w = Walk {
        b,
        p: 26,
        fields: vec![(6, 4)],
    };
    for _ in 0..w.count(4) {
        for _ in 0..w.count(4) {
            w.p += 8;
            w.len(4);
            if w.int(1) == 1 {
                w.len(4);
                w.len(4);
            }
        }
    }
    w.fields.push((w.p, 4));
    let n = w.int(4) as usize;
    let end = w.p + n;
    registry_fields(&mut w, end);
    (w.fields, w.p)
}

/// Writes a huge value into `field` of `b` (if it lies inside).
fn oversize(b: &mut [u8], (at, w): Field, rng: &mut Rng) {
    let v = u64::MAX - rng.next() % 1024;
    if at + w <= b.len() {
        let bytes = v.to_be_bytes();
        b[at..at + w].copy_from_slice(&bytes[8 - w..]);
    }
}

/// A huge length: around what a u32 or u64 field holds, never quite the maximum.
fn huge32(rng: &mut Rng) -> u32 {
    u32::MAX - (rng.next() % 1024) as u32
}

/// Mutation `i` of `orig` (a third truncations, a third bit flips, a third oversized length
/// fields); `blocks` are `(offset, length, is_record_block)` of a canonical file's blocks.
fn mutate(
    kind: Kind,
    orig: &[u8],
    i: usize,
    rng: &mut Rng,
    blocks: &[(u64, u64, bool)],
) -> (String, Vec<u8>) {
    let len = orig.len();
    let mut b = orig.to_vec();
    match i % 3 {
        0 => {
            let at = match i % 9 {
                0 => 0,
                3 => len.saturating_sub(1 + rng.below(8)),
                _ => rng.below(len),
            };
            b.truncate(at);
            (format!("truncated to {at} of {len}"), b)
        }
        1 => {
            let n = 1 + rng.below(3);
            let mut at = Vec::new();
            for _ in 0..n {
                let p = rng.below(len);
                b[p] ^= 1 << rng.below(8);
                at.push(p);
            }
            (format!("bits flipped at {at:?}"), b)
        }
        _ => {
            let desc = match kind {
                Kind::Canonical | Kind::Delta => match rng.below(3) {
                    0 => {
                        put_u32(&mut b, 6, huge32(rng));
                        "header length".to_string()
                    }
                    1 => {
                        let (off, _, _) = blocks[rng.below(blocks.len())];
                        put_u64(&mut b, off as usize + 5, u64::MAX - rng.next() % 1024);
                        format!("block length at {off}")
                    }
                    _ => {
                        // The first record's key length, the block's checksum recomputed.
                        let (off, blen, _) = blocks[rng.below(blocks.len())];
                        put_u32(&mut b, off as usize + 17, huge32(rng));
                        fix_block_crc(&mut b, off as usize, blen as usize);
                        format!("record key length in the block at {off} (crc fixed)")
                    }
                },
                Kind::Metadata => {
                    // A length, count or size field; the crc fixed.
                    let fields = metadata_fields(orig).0;
                    let f = fields[rng.below(fields.len())];
                    oversize(&mut b, f, rng);
                    let crc = crc32c::crc32c(&b[..len - 4]);
                    put_u32(&mut b, len - 4, crc);
                    format!("field {f:?} (crc fixed)")
                }
                Kind::CommitLog => {
                    b.extend_from_slice(&[0xff; 4096]);
                    "4096 bytes appended".to_string()
                }
                Kind::NativeRun | Kind::LocalRun => {
                    // Footer: index, bloom, properties offsets (u64) and lengths (u32); its
                    // crc32c (of the 40 bytes before) recomputed.
                    let f = len - 48;
                    let fields = [(0, 8), (8, 4), (12, 8), (20, 4), (24, 8), (32, 4)];
                    let (o, w) = fields[rng.below(fields.len())];
                    if w == 8 {
                        put_u64(&mut b, f + o, u64::MAX - rng.next() % 1024);
                    } else {
                        put_u32(&mut b, f + o, huge32(rng));
                    }
                    let crc = crc32c::crc32c(&b[f..f + 40]);
                    put_u32(&mut b, f + 40, crc);
                    format!("footer field at {o} (crc fixed)")
                }
                Kind::Manifest => {
                    let fields = manifest_fields(orig).0;
                    let f = fields[rng.below(fields.len())];
                    oversize(&mut b, f, rng);
                    let crc = crc32c::crc32c(&b[10..len - 4]);
                    put_u32(&mut b, len - 4, crc);
                    format!("field {f:?} (crc fixed)")
                }
                Kind::NativeMeta => {
                    let fields = native_meta_fields(orig).0;
                    let f = fields[rng.below(fields.len())];
                    oversize(&mut b, f, rng);
                    let crc = crc32c::crc32c(&b[..len - 4]);
                    put_u32(&mut b, len - 4, crc);
                    format!("field {f:?} (crc fixed)")
                }
            };
            (format!("oversized {desc}"), b)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

#[derive(Default)]
struct Report {
    failures: Vec<String>,
    runs: BTreeMap<String, usize>,
    errors: usize,
    successes: usize,
}

impl Report {
    /// Runs `op` (one read of damaged files) catching panics and measuring its allocations;
    /// `Ok(false)` from `op` is a success that yielded different data. Returns true when `op`
    /// succeeded with the original data.
    fn check(
        &mut self,
        what: &str,
        op: impl FnOnce() -> std::result::Result<bool, String>,
    ) -> bool {
        *self
            .runs
            .entry(what.split(':').next().unwrap_or(what).to_string())
            .or_default() += 1;
        // Bounded while the read runs (other threads' allocations count too; the bound is
        // far above what any of them holds).
        let limited = ALLOCATOR
            .set_limit(ALLOCATOR.allocated().saturating_add(ALLOC_BOUND))
            .is_ok();
        let r = catch_unwind(AssertUnwindSafe(op));
        ALLOCATOR
            .set_limit(usize::MAX)
            .expect("no limit is below what is allocated");
        assert!(limited, "{what}: the allocation bound could not be set");
        let original = matches!(r, Ok(Ok(true)));
        match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{what}: panic: {msg}"));
            }
            Ok(Ok(true)) => {
                self.successes += 1;
                // MUT_DEBUG=1 lists the damages every reader accepted (with the original data).
                if std::env::var("MUT_DEBUG").is_ok() {
                    eprintln!("OK {what}");
                }
            }
            Ok(Ok(false)) => self
                .failures
                .push(format!("{what}: success with different data")),
            Ok(Err(_)) => self.errors += 1,
        }
        original
    }
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// What inspect reports that must not change: per subtask, entries and key groups with data.
fn inspect_digest(s: &[OperatorSummary]) -> Vec<(String, u32, Option<u64>, u32)> {
    s.iter()
        .flat_map(|o| {
            o.subtasks.iter().map(move |t| {
                (
                    o.operator_id.clone(),
                    t.subtask,
                    t.entries,
                    t.key_groups_with_data,
                )
            })
        })
        .collect()
}

/// A checkpoint to read after each mutation, and what it must yield.
struct Target<'a> {
    storage: &'a CheckpointStorage,
    metadata: object_store::path::Path,
    native: bool,
    expected: &'a Dump,
    /// Heap entries of the original (a restore must not add entries outside the keys dumped).
    entries: usize,
    inspected: Vec<(String, u32, Option<u64>, u32)>,
    scratch: &'a Path,
}

impl Target<'_> {
    fn load(&self) -> std::result::Result<CompletedCheckpoint, String> {
        CompletedCheckpoint::load(self.storage, &self.metadata).map_err(s)
    }

    /// Inspect, restore into the heap (canonical checkpoints) and into mmap, read every key.
    fn read_all(&self, report: &mut Report, what: &str) {
        let inspected = report.check(&format!("inspect: {what}"), || {
            let c = self.load()?;
            let got = c
                .inspect_with(self.storage, &[&state_mmap::MmapNativeFormat])
                .map_err(s)?;
            Ok(inspect_digest(&got) == self.inspected)
        });
        if !self.native {
            let restored = report.check(&format!("restore heap: {what}"), || {
                let c = self.load()?;
                let mut b = HeapKeyedStateBackend::<u64>::builder()
                    .max_parallelism(MAX_P)
                    .build()
                    .map_err(s)?;
                c.restore_keyed(self.storage, "op", 0, &mut b).map_err(s)?;
                Ok(dump(&mut b).map_err(s)? == *self.expected && b.num_entries() == self.entries)
            });
            // Inspect verifies at least what a restore verifies.
            if inspected && !restored {
                report.failures.push(format!(
                    "inspect: {what}: accepted what a heap restore rejected"
                ));
            }
        }
        let restored = report.check(&format!("restore mmap: {what}"), || {
            let c = self.load()?;
            let mut b = MmapKeyedStateBackend::<u64>::builder()
                .max_parallelism(MAX_P)
                .build()
                .map_err(s)?;
            let download = self.scratch.join("download");
            let r = c.restore_mmap(self.storage, "op", 0, &mut b, &download);
            let _ = std::fs::remove_dir_all(&download);
            r.map_err(s)?;
            Ok(dump(&mut b).map_err(s)? == *self.expected)
        });
        if inspected && !restored {
            report.failures.push(format!(
                "inspect: {what}: accepted what an mmap restore rejected"
            ));
        }
    }
}

/// Re-encodes the metadata at `meta_file` with the size and crc32c of `bytes` for the file
/// named `name` (so that the damage reaches the readers behind the whole-file checksum).
fn fix_metadata(meta_file: &Path, pristine: &[u8], name: &str, bytes: &[u8]) {
    let mut m = CheckpointMetadata::decode(pristine, "m").unwrap();
    for op in &mut m.operators {
        for st in &mut op.subtasks {
            let keyed = st
                .keyed
                .iter_mut()
                .flat_map(|k| k.files.iter_mut().map(|f| &mut f.file));
            let native = st
                .native
                .iter_mut()
                .flat_map(|n| n.files.iter_mut().map(|f| &mut f.file));
            for f in keyed.chain(native) {
                if f.location.name() == name {
                    f.size = bytes.len() as u64;
                    f.crc32c = crc32c::crc32c(bytes);
                }
            }
        }
    }
    std::fs::write(meta_file, m.encode().unwrap()).unwrap();
}

/// Applies [`mutations()`] mutations to the file `file` (referenced as `name` by the metadata of
/// `target`), reading everything after each, then puts the file back.
#[allow(clippy::too_many_arguments)]
fn campaign(
    report: &mut Report,
    rng: &mut Rng,
    kind: Kind,
    file: &Path,
    name: &str,
    target: &Target<'_>,
    blocks: &[(u64, u64, bool)],
) {
    let orig = std::fs::read(file).unwrap();
    let meta_file = local_of_meta(target);
    let meta = std::fs::read(&meta_file).unwrap();
    for i in 0..mutations() {
        let (desc, bytes) = mutate(kind, &orig, i, rng, blocks);
        std::fs::write(file, &bytes).unwrap();
        // Every other mutation also rewrites the metadata to match the damaged file.
        let fixed = i % 2 == 1 && kind != Kind::Metadata;
        if fixed {
            fix_metadata(&meta_file, &meta, name, &bytes);
        }
        let what = format!(
            "{kind:?} {name} #{i} {desc}{}",
            if fixed { " + metadata fixed" } else { "" }
        );
        target.read_all(report, &what);
        std::fs::write(file, &orig).unwrap();
        std::fs::write(&meta_file, &meta).unwrap();
    }
}

fn local_of_meta(t: &Target<'_>) -> PathBuf {
    t.scratch
        .parent()
        .unwrap()
        .join("store")
        .join(t.metadata.as_ref())
}

fn canonical_blocks(c: &CompletedCheckpoint, name: &str) -> Vec<(u64, u64, bool)> {
    let k = c.metadata.operators[0].subtasks[0].keyed.as_ref().unwrap();
    let f = k
        .files
        .iter()
        .find(|f| f.file.location.name() == name)
        .unwrap();
    f.key_groups
        .iter()
        .map(|b| (b.offset, b.length, true))
        .chain(f.tombstones.iter().map(|b| (b.offset, b.length, false)))
        .collect()
}

#[test]
fn damaged_files_are_errors_never_panics_or_different_data() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    let seed = std::env::var("MUT_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0015);
    let mut rng = Rng(seed);
    let config = CheckpointConfig {
        incremental: true,
        retained: 5,
        ..Default::default()
    };

    // Heap: a full base and two deltas (with tombstones).
    let heap_storage = storage_at(&root, "heap");
    let mut builder = CheckpointCoordinator::builder(heap_storage.clone(), config.clone());
    let mut ep = builder.register_subtask("op", 0, 1, MAX_P).unwrap();
    let coord = builder.start().unwrap();
    let mut heap = HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(MAX_P)
        .build()
        .unwrap();
    let mut last = None;
    for round in 0..3 {
        write_round(&mut heap, round, &mut rng);
        last = Some(checkpoint_once(&coord, &mut ep, &mut heap, |ep, b, h| {
            ep.snapshot_heap(b, h, None).unwrap()
        }));
    }
    drop(coord);
    let heap_chk = last.unwrap();
    let heap_expected = dump(&mut heap).unwrap();
    let heap_entries = heap.num_entries();
    let files = &heap_chk.metadata.operators[0].subtasks[0]
        .keyed
        .as_ref()
        .unwrap()
        .files;
    assert!(files.len() >= 2, "a base and deltas: {files:?}");
    assert!(
        files.iter().skip(1).any(|f| !f.tombstones.is_empty()),
        "tombstones"
    );
    let base_name = files[0].file.location.name().to_string();
    let delta_name = files.last().unwrap().file.location.name().to_string();
    assert_eq!(files[0].header_bytes[4..6], [0, 1]);
    assert_eq!(files.last().unwrap().header_bytes[4..6], [0, 2]);

    // Mmap: two native incremental checkpoints.
    let mm_storage = storage_at(&root, "mm");
    let mut builder = CheckpointCoordinator::builder(mm_storage.clone(), config.clone());
    let mut ep = builder.register_subtask("op", 0, 1, MAX_P).unwrap();
    let coord = builder.start().unwrap();
    let mm_dir = tmp.path().join("mm-local");
    let mut mm = MmapKeyedStateBackend::<u64>::builder()
        .max_parallelism(MAX_P)
        .directory(&mm_dir)
        .build()
        .unwrap();
    let mut last = None;
    for round in 0..2 {
        write_round(&mut mm, round, &mut rng);
        last = Some(checkpoint_once(&coord, &mut ep, &mut mm, |ep, b, m| {
            ep.snapshot_mmap(b, m, None).unwrap()
        }));
    }
    drop(coord);
    let mm_chk = last.unwrap();
    let mm_expected = dump(&mut mm).unwrap();
    mm.flush().unwrap();
    drop(mm);
    let native = mm_chk.metadata.operators[0].subtasks[0]
        .native
        .as_ref()
        .unwrap();
    assert!(!native.files.is_empty());

    let heap_target = Target {
        storage: &heap_storage,
        metadata: heap_chk.path.clone(),
        native: false,
        expected: &heap_expected,
        entries: heap_entries,
        inspected: inspect_digest(&heap_chk.inspect(&heap_storage).unwrap()),
        scratch: &scratch,
    };
    let mm_target = Target {
        storage: &mm_storage,
        metadata: mm_chk.path.clone(),
        native: true,
        expected: &mm_expected,
        entries: 0,
        inspected: inspect_digest(
            &mm_chk
                .inspect_with(&mm_storage, &[&state_mmap::MmapNativeFormat])
                .unwrap(),
        ),
        scratch: &scratch,
    };
    // The pristine checkpoints read back whole.
    let mut report = Report::default();
    heap_target.read_all(&mut report, "pristine heap");
    mm_target.read_all(&mut report, "pristine mmap");
    assert!(
        report.failures.is_empty() && report.errors == 0,
        "{:?}",
        report.failures
    );

    // The walks over the formats find their length fields (they end where the data ends).
    let meta_bytes = std::fs::read(local(&root, &heap_chk.path)).unwrap();
    assert_eq!(metadata_fields(&meta_bytes).1, meta_bytes.len() - 4);
    let mm_meta = std::fs::read(local(&root, &mm_chk.path)).unwrap();
    assert_eq!(metadata_fields(&mm_meta).1, mm_meta.len() - 4);
    assert_eq!(
        native_meta_fields(&native.metadata).1,
        native.metadata.len() - 4
    );
    let manifest = std::fs::read(mm_dir.join("MANIFEST")).unwrap();
    assert_eq!(manifest_fields(&manifest).1, manifest.len() - 4);

    // Canonical snapshot, delta, `_metadata`.
    for (kind, name) in [(Kind::Canonical, &base_name), (Kind::Delta, &delta_name)] {
        let file = local(
            &root,
            &heap_chk.file_path(&FileLocation::Shared(name.clone())),
        );
        let blocks = canonical_blocks(&heap_chk, name);
        campaign(
            &mut report,
            &mut rng,
            kind,
            &file,
            name,
            &heap_target,
            &blocks,
        );
    }
    let meta_file = local(&root, &heap_chk.path);
    campaign(
        &mut report,
        &mut rng,
        Kind::Metadata,
        &meta_file,
        "_metadata",
        &heap_target,
        &[],
    );

    // Commit log: the entry completing the latest checkpoint.
    let log_dir = local(&root, &heap_storage.commit_log_dir());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let entry = entries.last().unwrap().clone();
    let orig = std::fs::read(&entry).unwrap();
    for i in 0..mutations() {
        let (desc, bytes) = mutate(Kind::CommitLog, &orig, i, &mut rng, &[]);
        std::fs::write(&entry, &bytes).unwrap();
        let what = format!("CommitLog #{i} {desc}");
        report.check(&format!("latest: {what}"), || {
            let latest = CompletedCheckpoint::latest(&heap_storage).map_err(s)?;
            Ok(latest.is_some_and(|c| c.metadata == heap_chk.metadata))
        });
        report.check(&format!("restore latest: {what}"), || {
            let c = CompletedCheckpoint::latest(&heap_storage)
                .map_err(s)?
                .ok_or("no checkpoint")?;
            let mut b = HeapKeyedStateBackend::<u64>::builder()
                .max_parallelism(MAX_P)
                .build()
                .map_err(s)?;
            c.restore_keyed(&heap_storage, "op", 0, &mut b).map_err(s)?;
            Ok(dump(&mut b).map_err(s)? == heap_expected && b.num_entries() == heap_entries)
        });
    }
    std::fs::write(&entry, &orig).unwrap();

    // Native checkpoint: its sorted runs and its metadata blob.
    for f in native.files.iter().take(2) {
        let name = f.file.location.name().to_string();
        let file = local(&root, &mm_chk.file_path(&f.file.location));
        campaign(
            &mut report,
            &mut rng,
            Kind::NativeRun,
            &file,
            &name,
            &mm_target,
            &[],
        );
    }
    let meta_file = local(&root, &mm_chk.path);
    let pristine = std::fs::read(&meta_file).unwrap();
    for i in 0..mutations() {
        let (desc, bytes) = mutate(Kind::NativeMeta, &native.metadata, i, &mut rng, &[]);
        let mut m = mm_chk.metadata.clone();
        if let Some(n) = m.operators[0].subtasks[0].native.as_mut() {
            n.metadata = bytes;
        }
        std::fs::write(&meta_file, m.encode().unwrap()).unwrap();
        mm_target.read_all(&mut report, &format!("NativeMeta #{i} {desc}"));
    }
    // Native metadata that narrows each file's key groups (inside the writer's range, so
    // well-formed) disagrees with the handle: restoring it would clip state away.
    let u32_at = |b: &[u8], p: usize| u32::from_be_bytes(b[p..p + 4].try_into().unwrap());
    let registry = u32_at(&native.metadata, 18) as usize;
    let mut at = 22 + registry;
    let runs = u32_at(&native.metadata, at);
    at += 4;
    for r in 0..runs {
        let files = u32_at(&native.metadata, at);
        at += 4;
        for f in 0..files {
            let name_len = u32_at(&native.metadata, at) as usize;
            let kg = at + 4 + name_len;
            let (start, end) = (
                u32_at(&native.metadata, kg),
                u32_at(&native.metadata, kg + 4),
            );
            if end > start + 1 {
                let mut b = native.metadata.clone();
                b[kg + 4..kg + 8].copy_from_slice(&(start + 1).to_be_bytes());
                let n = b.len() - 4;
                let crc = crc32c::crc32c(&b[..n]);
                b[n..].copy_from_slice(&crc.to_be_bytes());
                let mut m = mm_chk.metadata.clone();
                if let Some(n) = m.operators[0].subtasks[0].native.as_mut() {
                    n.metadata = b;
                }
                std::fs::write(&meta_file, m.encode().unwrap()).unwrap();
                mm_target.read_all(
                    &mut report,
                    &format!("NativeMeta run {r} file {f} narrowed"),
                );
            }
            at = kg + 16;
        }
    }
    std::fs::write(&meta_file, &pristine).unwrap();

    // The local store: its MANIFEST and sorted runs, reopened.
    let mut runs: Vec<PathBuf> = std::fs::read_dir(&mm_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "run"))
        .collect();
    runs.sort();
    assert!(!runs.is_empty());
    let mut victims = vec![(Kind::Manifest, mm_dir.join("MANIFEST"))];
    victims.extend(runs.iter().take(2).map(|r| (Kind::LocalRun, r.clone())));
    for (kind, victim) in victims {
        let orig = std::fs::read(&victim).unwrap();
        let rel = victim.file_name().unwrap().to_owned();
        for i in 0..mutations() {
            let (desc, bytes) = mutate(kind, &orig, i, &mut rng, &[]);
            let copy = scratch.join(format!("store-{i}"));
            std::fs::create_dir_all(&copy).unwrap();
            for e in std::fs::read_dir(&mm_dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
                }
            }
            std::fs::write(copy.join(&rel), &bytes).unwrap();
            report.check(&format!("reopen: {kind:?} #{i} {desc}"), || {
                let mut b = MmapKeyedStateBackend::<u64>::builder()
                    .max_parallelism(MAX_P)
                    .directory(&copy)
                    .build()
                    .map_err(s)?;
                Ok(dump(&mut b).map_err(s)? == mm_expected)
            });
            let _ = std::fs::remove_dir_all(&copy);
        }
    }

    let elapsed = started.elapsed();
    eprintln!(
        "mutation test: {} mutations per file kind, {} reads ({:?}), {} errors, {} \
         successes with the original data, {:.1}s",
        mutations(),
        report.runs.values().sum::<usize>(),
        report.runs,
        report.errors,
        report.successes,
        elapsed.as_secs_f64()
    );
    assert!(
        report.failures.is_empty(),
        "{} failures:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}
