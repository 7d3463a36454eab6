//! Immutable sorted-run files: writing (buffered, renamed into place; fsynced before a manifest
//! names them) and reading (memory-mapped, bounds-checked, checksummed). The byte layout is in
//! `docs/mmap-format.md`.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::mapped::MappedFile;
use crate::memtable::{head_of, OpKind};

/// Magic bytes at the start and at the end of every sorted-run file.
pub const RUN_MAGIC: [u8; 4] = *b"FLSR";
/// The sorted-run format version this build writes. It reads versions 1 to 3: version 1 data
/// blocks have no key fingerprints; version 2 blocks follow one another without regard to
/// pages; each version 3 block lies within one 4 KiB page of the file (a block larger than a
/// page holds one entry and starts at a page).
pub const RUN_VERSION: u16 = 3;
/// The oldest sorted-run format version this build reads.
pub const RUN_VERSION_MIN: u16 = 1;
/// Size of the fixed footer.
pub const FOOTER_LEN: usize = 48;
const HEADER_LEN: usize = 8;
const BLOCK_TARGET: usize = 4096;
/// Version 3 and later: no data block crosses a multiple of this offset in its file unless it
/// holds a single entry too large for one page (such a block starts at one). A lookup whose
/// block is not in the page cache then faults in one page, read with one device read, where a
/// block of about 4 KiB written across a page boundary (version 2: half of them) faulted in two
/// pages one after the other. The writer ends a block before an entry that would carry it over
/// the next boundary, and skips (zero bytes) to the boundary when what is left of the page is
/// too small for the next entry or shorter than [`MIN_TAIL_BLOCK`].
const PAGE: usize = 4096;
/// The smallest room before a page boundary that a version 3 writer starts a block in.
const MIN_TAIL_BLOCK: usize = 512;
/// What a sequential reader of a file asks the kernel to read ahead of it
/// ([`RunFile::read_ahead`]).
pub(crate) const READ_AHEAD: usize = 2 << 20;

/// Whether the bloom-filter block `line` (`None`: no filter) may hold hash `h`.
#[inline(always)]
fn bloom_passes(line: Option<&[u8; 64]>, h: u64) -> bool {
    match line {
        Some(block) => bloom_bits(h).all(|b| block[b / 8] & (1 << (b % 8)) != 0),
        None => true,
    }
}

/// Block heads per entry of a file's [`RunFile::tops`] (16 heads: four cache lines).
const HEAD_STRIDE: usize = 16;

/// `heads.partition_point(|h| *h < hk)` for sorted `heads`, whose [`RunFile::tops`] are
/// `tops`, in two steps: the stretch of [`HEAD_STRIDE`] heads from `tops`, then the heads of
/// that stretch.
#[inline]
fn first_at_least(heads: &[u128], tops: &[u128], hk: u128) -> usize {
    let s = tops.partition_point(|h| *h < hk);
    let start = s * HEAD_STRIDE;
    let Some(stretch) = heads.get(start..) else {
        return heads.len();
    };
    let stretch = &stretch[..stretch.len().min(HEAD_STRIDE)];
    if let Some(whole) = stretch.first_chunk::<HEAD_STRIDE>() {
        crate::mapped::prefetch_ref(whole);
    }
    start + stretch.partition_point(|h| *h < hk)
}

/// [`RunFile::tops`] of `heads`.
fn tops_of(heads: &[u128]) -> Vec<u128> {
    // Exactly as long as its capacity: [`RunFile::memory_bytes`] of a file not loaded yet
    // counts what it will hold.
    let mut tops = Vec::with_capacity(heads.len().div_ceil(HEAD_STRIDE));
    tops.extend(heads.chunks(HEAD_STRIDE).filter_map(|c| c.last().copied()));
    tops
}
const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_K: u8 = 7;

#[inline]
fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
#[inline]
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The bloom-filter hash of a whole key (compute it once per lookup over many files).
#[inline]
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    bloom_hash(key)
}

#[inline]
fn bloom_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x0b10_0f11)
}

/// The one-byte fingerprint of a key kept next to its offset in a data block (version 2): a
/// point lookup compares fingerprints and reads only the entries whose fingerprint matches.
#[inline]
pub(crate) fn fingerprint(hash: u64) -> u8 {
    (hash >> 16) as u8
}

/// The high bit of byte `i` set in the result where `fps[i] == fp` (the classic has-zero-byte
/// test on `word ^ fp * 0x0101..` flags every zero byte exactly below the first false positive;
/// callers check each candidate against the key anyway): eight fingerprints at a time.
#[inline(always)]
fn fingerprint_hits(fps: &[u8; 8], fp: u8) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let x = u64::from_le_bytes(*fps) ^ (u64::from(fp) * LO);
    x.wrapping_sub(LO) & !x & HI
}

/// The bloom-filter hash of a scan prefix (another seed than whole keys).
#[inline]
pub(crate) fn prefix_hash(prefix: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(prefix, 0x9e37_79b9)
}

/// Says how long the scan prefix of a key is (`None`: the key has none). Keys sharing a prefix
/// must be contiguous in key order. Prefixes go into the bloom filters, so a prefix scan skips
/// write buffers and files that cannot hold the prefix (RocksDB's prefix extractor).
pub type PrefixExtractor = std::sync::Arc<dyn Fn(&[u8]) -> Option<usize> + Send + Sync>;

const BLOOM_HAS_PREFIXES: u8 = 1;

/// The 64-byte block of a hash: `((h >> 32) * blocks) >> 32`.
#[inline]
fn bloom_block(h: u64, nblocks: usize) -> usize {
    (((h >> 32) * nblocks as u64) >> 32) as usize
}

/// The `BLOOM_K` bit positions (0..512) of a hash inside its block: `(x + i * d) mod 512` with
/// `x = h mod 2^32`, `d = (h >> 41) | 1`.
#[inline]
fn bloom_bits(h: u64) -> impl Iterator<Item = usize> {
    let (x, d) = (h as u32, ((h >> 41) as u32) | 1);
    (0..u32::from(BLOOM_K)).map(move |i| (x.wrapping_add(i.wrapping_mul(d)) & 511) as usize)
}

/// The entry count of a data block without its checksum (`body`: entries, offsets,
/// fingerprints, count), when it is plausible: not 0 and its offsets (and fingerprints) fit.
#[inline]
fn checked_count(body: &[u8], per_entry: usize) -> Option<u32> {
    let at = body.len().checked_sub(4)?;
    let count = be32(&body[at..]);
    (count != 0 && (count as usize).saturating_mul(per_entry) <= at).then_some(count)
}

/// Writes one sorted-run file. Keys must be added in strictly increasing order.
pub(crate) struct RunWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    written: u64,
    block: Vec<u8>,
    offsets: Vec<u32>,
    fingerprints: Vec<u8>,
    last_key: Vec<u8>,
    first_key: Option<Vec<u8>>,
    index: Vec<u8>,
    index_offsets: Vec<u32>,
    index_count: u32,
    hashes: Vec<u64>,
    entries: u64,
    prefix: Option<PrefixExtractor>,
    last_prefix: Option<u64>,
    /// The format version written ([`RUN_VERSION`]; tests write version 1 too).
    version: u16,
}

impl RunWriter {
    /// Starts `path` (written as `path.tmp` until [`RunWriter::finish`]).
    pub(crate) fn create(path: &Path, prefix: Option<PrefixExtractor>) -> Result<RunWriter> {
        RunWriter::create_version(path, prefix, RUN_VERSION)
    }

    fn create_version(
        path: &Path,
        prefix: Option<PrefixExtractor>,
        version: u16,
    ) -> Result<RunWriter> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| Error::io("creating a sorted run", &tmp, e))?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&RUN_MAGIC);
        head[4..6].copy_from_slice(&version.to_be_bytes());
        out.write_all(&head)
            .map_err(|e| Error::io("writing a sorted run", &tmp, e))?;
        Ok(RunWriter {
            out,
            tmp,
            path: path.to_path_buf(),
            written: HEADER_LEN as u64,
            block: Vec::with_capacity(BLOCK_TARGET * 2),
            offsets: Vec::new(),
            fingerprints: Vec::new(),
            last_key: Vec::new(),
            first_key: None,
            index: Vec::new(),
            index_offsets: Vec::new(),
            index_count: 0,
            hashes: Vec::new(),
            entries: 0,
            prefix,
            last_prefix: None,
            version,
        })
    }

    /// A writer of the version 1 format (no fingerprints), to test that it is still read.
    #[cfg(test)]
    pub(crate) fn create_v1(path: &Path) -> Result<RunWriter> {
        RunWriter::create_version(path, None, 1)
    }

    /// Bytes written so far (approximately the file size).
    pub(crate) fn size(&self) -> u64 {
        self.written + self.block.len() as u64
    }

    /// Appends an entry.
    pub(crate) fn add(&mut self, key: &[u8], kind: OpKind, value: &[u8]) -> Result<()> {
        if self.first_key.is_some() && key <= &self.last_key[..] {
            return Err(Error::Config {
                reason: "sorted run keys must be added in increasing order".into(),
            });
        }
        if self.first_key.is_none() {
            self.first_key = Some(key.to_vec());
        }
        let (klen, vlen) = (u32::try_from(key.len()), u32::try_from(value.len()));
        let (Ok(klen), Ok(vlen)) = (klen, vlen) else {
            return Err(Error::Config {
                reason: "keys and values are limited to 4 GiB".into(),
            });
        };
        if self.version >= 3 {
            self.place_entry(9 + key.len() + value.len())?;
        }
        self.offsets.push(self.block.len() as u32);
        self.block.push(kind as u8);
        self.block.extend_from_slice(&klen.to_be_bytes());
        self.block.extend_from_slice(&vlen.to_be_bytes());
        self.block.extend_from_slice(key);
        self.block.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        let h = bloom_hash(key);
        self.hashes.push(h);
        self.fingerprints.push(fingerprint(h));
        if let Some(len) = self.prefix.as_ref().and_then(|p| p(key)) {
            let h = prefix_hash(&key[..len.min(key.len())]);
            if self.last_prefix != Some(h) {
                self.hashes.push(h);
                self.last_prefix = Some(h);
            }
        }
        self.entries += 1;
        if self.version < 3 && self.block.len() >= BLOCK_TARGET {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Version 3 block placement for an entry of `entry_len` bytes about to be added: ends the
    /// current block when the entry would carry it over the next page boundary, and starts a
    /// new block at that boundary (skipping the rest of the page) when the entry does not fit
    /// in what is left of the page, or that is less than [`MIN_TAIL_BLOCK`].
    fn place_entry(&mut self, entry_len: usize) -> Result<()> {
        // A block's size with `n` entries of `data` bytes: offsets, fingerprints, count, crc.
        let framed = |data: usize, n: usize| data + n * 5 + 8;
        let room = |written: u64| PAGE - (written % PAGE as u64) as usize;
        if !self.offsets.is_empty()
            && framed(self.block.len() + entry_len, self.offsets.len() + 1) > room(self.written)
        {
            self.finish_block()?;
        }
        if self.offsets.is_empty() {
            let left = room(self.written);
            if left < PAGE && (left < MIN_TAIL_BLOCK || framed(entry_len, 1) > left) {
                const ZEROS: [u8; PAGE] = [0; PAGE];
                self.out
                    .write_all(&ZEROS[..left])
                    .map_err(|e| Error::io("writing a sorted run", &self.tmp, e))?;
                self.written += left as u64;
            }
        }
        Ok(())
    }

    fn finish_block(&mut self) -> Result<()> {
        if self.offsets.is_empty() {
            return Ok(());
        }
        for o in &self.offsets {
            self.block.extend_from_slice(&o.to_be_bytes());
        }
        if self.version >= 2 {
            self.block.extend_from_slice(&self.fingerprints);
        }
        self.block
            .extend_from_slice(&(self.offsets.len() as u32).to_be_bytes());
        let crc = crc32c::crc32c(&self.block);
        self.block.extend_from_slice(&crc.to_be_bytes());
        let off = self.written;
        let len = self.block.len() as u32;
        self.out
            .write_all(&self.block)
            .map_err(|e| Error::io("writing a sorted run", &self.tmp, e))?;
        self.written += u64::from(len);
        self.index_offsets.push(self.index.len() as u32);
        self.index
            .extend_from_slice(&(self.last_key.len() as u32).to_be_bytes());
        self.index.extend_from_slice(&self.last_key);
        self.index.extend_from_slice(&off.to_be_bytes());
        self.index.extend_from_slice(&len.to_be_bytes());
        self.index_count += 1;
        self.block.clear();
        self.offsets.clear();
        self.fingerprints.clear();
        Ok(())
    }

    fn write_section(&mut self, mut body: Vec<u8>) -> Result<(u64, u32)> {
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        let off = self.written;
        self.out
            .write_all(&body)
            .map_err(|e| Error::io("writing a sorted run", &self.tmp, e))?;
        self.written += body.len() as u64;
        Ok((off, body.len() as u32))
    }

    /// Writes index, bloom filter, properties and footer and renames the file into place.
    /// Returns `None` (and removes the file) when no entry was added. The file is complete and
    /// readable (it is mapped from the page cache) but not durable: the engine fsyncs it (on
    /// its manifest thread) before a manifest names it.
    pub(crate) fn finish(mut self) -> Result<Option<PathBuf>> {
        let Some(first_key) = self.first_key.take() else {
            drop(self.out);
            let _ = fs::remove_file(&self.tmp);
            return Ok(None);
        };
        self.finish_block()?;
        // Index block.
        let mut index = std::mem::take(&mut self.index);
        for o in &self.index_offsets {
            index.extend_from_slice(&o.to_be_bytes());
        }
        index.extend_from_slice(&self.index_count.to_be_bytes());
        let (index_off, index_len) = self.write_section(index)?;
        // Bloom filter.
        // A blocked filter: all probes of a key fall in one 64-byte block (one cache line).
        let nblocks = (self.hashes.len() * BLOOM_BITS_PER_KEY)
            .div_ceil(512)
            .max(1);
        let mut bits = vec![0u8; nblocks * 64];
        // Each hash sets bits in a random block: the block of a hash some hashes ahead is
        // loaded meanwhile (waiting for each block was most of a large compaction's finish).
        const AHEAD: usize = 16;
        for (i, h) in self.hashes.iter().enumerate() {
            if let Some(&next) = self.hashes.get(i + AHEAD) {
                let at = bloom_block(next, nblocks) * 64;
                if let Some(line) = bits.get(at..at + 64) {
                    crate::mapped::prefetch(line, 1);
                }
            }
            let base = bloom_block(*h, nblocks) * 512;
            for bit in bloom_bits(*h) {
                let b = base + bit;
                bits[b / 8] |= 1 << (b % 8);
            }
        }
        let mut bloom = Vec::with_capacity(bits.len() + 2);
        bloom.push(BLOOM_K);
        bloom.push(if self.prefix.is_some() {
            BLOOM_HAS_PREFIXES
        } else {
            0
        });
        bloom.extend_from_slice(&bits);
        let (bloom_off, bloom_len) = self.write_section(bloom)?;
        // Properties.
        let mut props = Vec::new();
        props.extend_from_slice(&self.entries.to_be_bytes());
        props.extend_from_slice(&(first_key.len() as u32).to_be_bytes());
        props.extend_from_slice(&first_key);
        props.extend_from_slice(&(self.last_key.len() as u32).to_be_bytes());
        props.extend_from_slice(&self.last_key);
        let (props_off, props_len) = self.write_section(props)?;
        // Footer.
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(&index_off.to_be_bytes());
        footer.extend_from_slice(&index_len.to_be_bytes());
        footer.extend_from_slice(&bloom_off.to_be_bytes());
        footer.extend_from_slice(&bloom_len.to_be_bytes());
        footer.extend_from_slice(&props_off.to_be_bytes());
        footer.extend_from_slice(&props_len.to_be_bytes());
        footer.extend_from_slice(&self.version.to_be_bytes());
        footer.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&crc.to_be_bytes());
        footer.extend_from_slice(&RUN_MAGIC);
        self.out
            .write_all(&footer)
            .map_err(|e| Error::io("writing a sorted run", &self.tmp, e))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("writing a sorted run", &self.tmp, e.into_error()))?;
        drop(file);
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io("publishing a sorted run", &self.path, e))?;
        Ok(Some(self.path))
    }
}

/// A published, memory-mapped sorted-run file.
#[derive(Debug)]
pub struct RunFile {
    number: u64,
    map: MappedFile,
    index_off: usize,
    index_end: usize,
    index_count: usize,
    /// Where the bloom filter's 64-byte blocks start in the file.
    bloom_off: usize,
    /// The bloom filter's 64-byte blocks; 0 when the file has no filter this version can use
    /// (then every probe may match).
    bloom_blocks: usize,
    bloom_flags: u8,
    /// The bloom filter and block index in memory, once loaded ([`RunFile::pin`]; at open for
    /// every file but a compaction's outputs, which are loaded once the compaction's inputs
    /// are freed). Until then lookups read the filter and the index from the mapped file.
    pins: OnceLock<Pins>,
    first_key: Vec<u8>,
    last_key: Vec<u8>,
    /// [`head_of`] the first and the last key (most comparisons need no `memcmp`).
    first_head: u128,
    last_head: u128,
    entries: u64,
    verify_blocks: bool,
    /// Version 2 and later: data blocks carry one fingerprint byte per entry.
    fingerprints: bool,
    obsolete: AtomicBool,
    name: String,
    clip: Option<(Vec<u8>, Vec<u8>)>,
}

/// What a file keeps in memory once pinned.
#[derive(Debug)]
struct Pins {
    /// The bloom filter's 64-byte blocks, copied out of the file: pinned in memory (and
    /// counted in [`RunFile::memory_bytes`]) so that data pages read by lookups never evict it
    /// from a small page cache, and a lookup that the filter rules out reads nothing from the
    /// device.
    bloom: Box<[u8]>,
    /// Per data block: the [`head_of`] its last key (a lookup binary-searches these and reads
    /// the mapped index only when several blocks share a head) and its [`BlockMeta`]: 32
    /// bytes per block of about 4 KiB, 0.8 % of the data.
    heads: Vec<u128>,
    /// The last head of every [`HEAD_STRIDE`] heads (the last one of a shorter tail too): a
    /// search of these (few, so they stay in cache) picks the stretch of `heads` to search,
    /// whose cache lines then load together instead of one after the other.
    tops: Vec<u128>,
    blocks: Vec<BlockMeta>,
}

/// Where a data block is, and (once read) how many entries it has, so a point lookup goes
/// straight to the block's fingerprints and offsets instead of first reading its trailer.
#[derive(Debug)]
struct BlockMeta {
    off: u64,
    len: u32,
    /// The block's checked entry count; 0 until the block's trailer was read (files opened
    /// without `verify_all` do not touch their data blocks when opened).
    count: AtomicU32,
}

/// A key being looked up, with its [`head_of`] (compared before the bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe<'a> {
    pub key: &'a [u8],
    pub head: u128,
    /// Bytes 16..24 of the key, zero-padded, as a big-endian number (see [`tail_of`]).
    tail: u64,
}

/// Bytes 16..24 of `b` (after its [`head_of`]), zero-padded, as a big-endian number: the keys
/// of one map share their first 16 bytes and usually differ in these.
#[inline]
fn tail_of(b: &[u8]) -> u64 {
    let s = b.get(16..).unwrap_or(&[]);
    match s.first_chunk::<8>() {
        Some(c) => u64::from_be_bytes(*c),
        None => s
            .iter()
            .enumerate()
            .fold(0, |x, (i, b)| x | u64::from(*b) << (56 - 8 * i)),
    }
}

impl<'a> Probe<'a> {
    #[inline]
    pub(crate) fn new(key: &'a [u8]) -> Probe<'a> {
        Probe {
            key,
            head: head_of(key),
            tail: tail_of(key),
        }
    }

    /// True when the probe's key is larger than `k`: by the first 16 bytes as a number, then
    /// (keys of one map share those) the next 8, then as bytes.
    #[inline]
    pub(crate) fn after_key(&self, k: &[u8]) -> bool {
        let h = head_of(k);
        if self.head != h {
            return self.head > h;
        }
        let t = tail_of(k);
        if self.tail != t {
            return self.tail > t;
        }
        self.key > k
    }
}

/// Orders `(head, bytes)` pairs like the bytes: heads are the zero-padded first 16 bytes, so a
/// difference in them decides, and equal heads fall through to the bytes.
#[inline]
fn cmp_headed(ah: u128, a: &[u8], bh: u128, b: &[u8]) -> std::cmp::Ordering {
    ah.cmp(&bh).then_with(|| a.cmp(b))
}

/// One entry of a block, borrowed from the map.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawEntry<'a> {
    pub kind: OpKind,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Where a checked data block is in its file (no borrow: cursors keep it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockPos {
    start: usize,
    data_len: usize,
    offsets_at: usize,
    count: usize,
}

/// A checked view of a data block.
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    data: &'a [u8],
    offsets_at: usize,
    count: usize,
    base: u64,
}

impl RunFile {
    /// Opens and maps `path`; checks magic, version, footer, index, bloom and properties
    /// checksums, and (with `verify_all`) every data block's checksum.
    pub(crate) fn open(
        path: &Path,
        number: u64,
        verify_all: bool,
        verify_blocks: bool,
    ) -> Result<RunFile> {
        let run = Self::open_unpinned(path, number, verify_blocks)?;
        let pins = run.load_pins(verify_all)?;
        let _ = run.pins.set(pins);
        Ok(run)
    }

    /// [`RunFile::open`] without loading the bloom filter and block index into memory (nor
    /// checking the data blocks): lookups read them from the mapped file until
    /// [`RunFile::pin`]. For a compaction's outputs, whose inputs hold as much memory until
    /// they are replaced.
    pub(crate) fn open_unpinned(path: &Path, number: u64, verify_blocks: bool) -> Result<RunFile> {
        let map = MappedFile::open(path)?;
        let b = map.bytes();
        let corrupt = |off: u64, r: &str| Error::corrupt(path, off, r.to_string());
        if b.len() < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(0, "file too short for a sorted run"));
        }
        if b[..4] != RUN_MAGIC {
            return Err(corrupt(0, "bad magic: not a Flowstate sorted run"));
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if !(RUN_VERSION_MIN..=RUN_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                found: version,
                supported: RUN_VERSION,
            });
        }
        let fo = b.len() - FOOTER_LEN;
        let f = &b[fo..];
        if f[44..48] != RUN_MAGIC {
            return Err(corrupt(
                fo as u64 + 44,
                "bad trailing magic (truncated file?)",
            ));
        }
        if be32(&f[40..44]) != crc32c::crc32c(&f[..40]) {
            return Err(corrupt(fo as u64, "footer checksum mismatch"));
        }
        let section = |off: u64, len: u32, what: &str| -> Result<(usize, usize)> {
            let end = off.checked_add(u64::from(len));
            match end {
                Some(end) if off >= HEADER_LEN as u64 && end <= fo as u64 && len >= 4 => {
                    let (s, e) = (off as usize, end as usize);
                    if be32(&b[e - 4..e]) != crc32c::crc32c(&b[s..e - 4]) {
                        return Err(corrupt(off, &format!("{what} checksum mismatch")));
                    }
                    Ok((s, e - 4))
                }
                _ => Err(corrupt(fo as u64, &format!("{what} lies outside the file"))),
            }
        };
        let (index_off, index_end) = section(be64(&f[0..8]), be32(&f[8..12]), "index block")?;
        let (bloom_off, bloom_end) = section(be64(&f[12..20]), be32(&f[20..24]), "bloom filter")?;
        let (props_off, props_end) = section(be64(&f[24..32]), be32(&f[32..36]), "properties")?;
        if index_end - index_off < 4 || bloom_end <= bloom_off + 2 {
            return Err(corrupt(index_off as u64, "index or bloom filter too short"));
        }
        let index_count = be32(&b[index_end - 4..index_end]) as usize;
        if index_count.saturating_mul(4) > index_end - index_off - 4 {
            return Err(corrupt(
                index_off as u64,
                "index count larger than the index",
            ));
        }
        let bloom_k = b[bloom_off];
        let bloom_flags = b[bloom_off + 1];
        let bloom_off = bloom_off + 2;
        let props = &b[props_off..props_end];
        let mut p = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = props
                .get(p..p + n)
                .ok_or_else(|| corrupt(props_off as u64 + p as u64, "properties truncated"))?;
            p += n;
            Ok(s)
        };
        let entries = be64(take(8)?);
        let n = be32(take(4)?) as usize;
        let first_key = take(n)?.to_vec();
        let n = be32(take(4)?) as usize;
        let last_key = take(n)?.to_vec();
        let run = RunFile {
            number,
            map,
            index_off,
            index_end,
            index_count,
            bloom_off,
            bloom_blocks: if bloom_k == BLOOM_K {
                (bloom_end - bloom_off) / 64
            } else {
                0
            },
            bloom_flags,
            pins: OnceLock::new(),
            first_head: head_of(&first_key),
            last_head: head_of(&last_key),
            first_key,
            last_key,
            entries,
            verify_blocks,
            fingerprints: version >= 2,
            obsolete: AtomicBool::new(false),
            name: String::new(),
            clip: None,
        };
        // Opening reads the footer and properties only; lookups read single blocks.
        run.map.advise_random();
        Ok(run)
    }

    /// Loads the bloom filter and block index into memory (once; lookups then no longer
    /// read them from the mapped file). The index and filter are read ahead in the background
    /// first: the mapping is advised random, and a file just written by a compaction may have
    /// left a small page cache.
    pub(crate) fn pin(&self) -> Result<()> {
        if self.pins.get().is_none() {
            let pins = self.load_pins(false)?;
            let _ = self.pins.set(pins);
        }
        Ok(())
    }

    /// The in-memory block index's entries (empty until pinned).
    #[cfg(test)]
    fn pinned_blocks(&self) -> &[BlockMeta] {
        self.pins.get().map_or(&[], |p| &p.blocks)
    }

    /// Whether the bloom filter and block index are in memory.
    #[cfg(test)]
    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.get().is_some()
    }

    /// Reads the bloom filter and block index into memory; with `verify_all` also checks
    /// every data block's checksum and the bytes between blocks.
    fn load_pins(&self, verify_all: bool) -> Result<Pins> {
        let run = self;
        let corrupt = |off: u64, r: &str| run.corrupt(off as usize, r.to_string());
        run.map
            .will_need(run.index_off, run.index_end - run.index_off);
        run.map.will_need(run.bloom_off, run.bloom_blocks * 64);
        let bloom: Box<[u8]> = run
            .bytes()
            .get(run.bloom_off..run.bloom_off + run.bloom_blocks * 64)
            .unwrap_or(&[])
            .into();
        let per_entry = if run.fingerprints { 5 } else { 4 };
        let mut heads = Vec::with_capacity(run.index_count);
        let mut blocks = Vec::with_capacity(run.index_count);
        // With `verify_all`: where the previous block ended. Blocks follow one another, and
        // what lies between them (version 3: skipped to a page boundary) must be zero bytes,
        // so no byte of the data section escapes a check.
        let mut prev_end = HEADER_LEN;
        let zeros = |from: usize, to: usize| run.bytes()[from..to].iter().all(|x| *x == 0);
        for i in 0..run.index_count {
            let (key, off, len) = run.index_entry(i)?;
            heads.push(head_of(key));
            let mut count = 0;
            if verify_all {
                if off < prev_end || !zeros(prev_end, off) {
                    return Err(corrupt(
                        prev_end as u64,
                        &format!("bad bytes or overlap before data block {i}"),
                    ));
                }
                prev_end = off + len;
                let blk = run
                    .bytes()
                    .get(off..off + len)
                    .ok_or_else(|| corrupt(off as u64, "data block lies outside the file"))?;
                if len < 8 || be32(&blk[len - 4..]) != crc32c::crc32c(&blk[..len - 4]) {
                    return Err(corrupt(
                        off as u64,
                        &format!("checksum mismatch in data block {i}"),
                    ));
                }
                count = checked_count(&blk[..len - 4], per_entry)
                    .ok_or_else(|| corrupt(off as u64, "bad entry count in data block"))?;
            }
            blocks.push(BlockMeta {
                off: off as u64,
                len: len as u32,
                count: AtomicU32::new(count),
            });
        }
        if verify_all && (run.index_off < prev_end || !zeros(prev_end, run.index_off)) {
            return Err(corrupt(
                prev_end as u64,
                "bad bytes or overlap between the data blocks and the index",
            ));
        }
        Ok(Pins {
            bloom,
            tops: tops_of(&heads),
            heads,
            blocks,
        })
    }

    /// Opens the sorted-run file at `path` read-only and verifies it as a store opening it
    /// with `verify_on_open` does: magics, version, footer, index, bloom filter and properties
    /// checksums, every offset and length against the file size, and every data block's
    /// checksum and entry count. For tools that check a file without a store (`entries()`
    /// then gives the count its properties record).
    pub fn verify(path: &Path) -> Result<RunFile> {
        Self::open(path, 0, true, false)
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// Sets the checkpoint name and the visible key range.
    pub(crate) fn with_origin(mut self, name: String, clip: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        self.name = name;
        self.clip = clip;
        self
    }

    /// The file's globally unique name in checkpoints (`<store id>-<number>.run`, or the name it
    /// had in the checkpoint it was restored from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The visible key range `[lo, hi)` when only part of the file belongs to this store.
    pub fn clip(&self) -> Option<&(Vec<u8>, Vec<u8>)> {
        self.clip.as_ref()
    }

    /// True when `key` is inside the visible range.
    #[inline]
    pub(crate) fn visible(&self, key: &[u8]) -> bool {
        match &self.clip {
            Some((lo, hi)) => key >= &lo[..] && key < &hi[..],
            None => true,
        }
    }

    fn corrupt(&self, off: usize, reason: impl Into<String>) -> Error {
        Error::corrupt(self.map.path(), off as u64, reason)
    }

    /// The file number (its name in the database directory).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Smallest key in the file.
    pub fn first_key(&self) -> &[u8] {
        &self.first_key
    }

    /// Largest key in the file.
    pub fn last_key(&self) -> &[u8] {
        &self.last_key
    }

    /// True when every key of the file is smaller than the probe's.
    #[inline]
    pub(crate) fn before(&self, p: &Probe) -> bool {
        cmp_headed(self.last_head, &self.last_key, p.head, p.key).is_lt()
    }

    /// True when the file's first key is below the probe's key (by the first 16 bytes as a
    /// number, then as bytes).
    #[inline]
    pub(crate) fn starts_before(&self, p: &Probe) -> bool {
        cmp_headed(self.first_head, &self.first_key, p.head, p.key).is_lt()
    }

    /// True when every key of the file is larger than the probe's.
    #[inline]
    pub(crate) fn after(&self, p: &Probe) -> bool {
        cmp_headed(self.first_head, &self.first_key, p.head, p.key).is_gt()
    }

    /// Bytes of memory the file's in-memory block index and bloom filter hold (once pinned:
    /// a compaction's output is charged from its installation on, before its index is loaded).
    pub fn memory_bytes(&self) -> usize {
        let keys = self.first_key.capacity() + self.last_key.capacity();
        match self.pins.get() {
            Some(p) => {
                (p.heads.capacity() + p.tops.capacity()) * 16
                    + p.bloom.len()
                    + p.blocks.capacity() * std::mem::size_of::<BlockMeta>()
                    + keys
            }
            None => {
                (self.index_count + self.index_count.div_ceil(HEAD_STRIDE)) * 16
                    + self.bloom_blocks * 64
                    + self.index_count * std::mem::size_of::<BlockMeta>()
                    + keys
            }
        }
    }

    /// Number of entries.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Marks the file to be deleted when the last reference to it goes.
    pub(crate) fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::SeqCst);
    }

    /// `(last key, block offset, block length)` of index entry `i`.
    fn index_entry(&self, i: usize) -> Result<(&[u8], usize, usize)> {
        let b = self.bytes();
        let offs_at = self.index_end - 4 - self.index_count * 4;
        let o = be32(&b[offs_at + i * 4..]) as usize;
        let at = self.index_off + o;
        let bad = || self.corrupt(at, "index entry out of bounds");
        if at + 4 > offs_at {
            return Err(bad());
        }
        let klen = be32(&b[at..]) as usize;
        let end = at + 4 + klen + 12;
        if end > offs_at {
            return Err(bad());
        }
        let key = &b[at + 4..at + 4 + klen];
        let off = be64(&b[at + 4 + klen..]);
        let len = be32(&b[at + 12 + klen..]) as usize;
        if off.saturating_add(len as u64) > (self.bytes().len() - FOOTER_LEN) as u64 || len < 8 {
            return Err(self.corrupt(at, "index points outside the file"));
        }
        Ok((key, off as usize, len))
    }

    /// Number of data blocks.
    pub(crate) fn block_count(&self) -> usize {
        self.index_count
    }

    /// Data block `i`, checked.
    #[inline]
    pub(crate) fn block(&self, i: usize) -> Result<Block<'_>> {
        if i >= self.index_count {
            return Err(self.corrupt(self.index_off, format!("no data block {i}")));
        }
        let (off, len, m) = match self.pins.get() {
            Some(p) => {
                let Some(m) = p.blocks.get(i) else {
                    return Err(self.corrupt(self.index_off, format!("no data block {i}")));
                };
                (m.off as usize, m.len as usize, Some(m))
            }
            // Checked by `index_entry` against the file size (and `len >= 8`).
            None => {
                let (_, off, len) = self.index_entry(i)?;
                (off, len, None)
            }
        };
        // Checked against the file size when it was opened (and `len >= 8`).
        let b = &self.bytes()[off..off + len];
        if self.verify_blocks && be32(&b[len - 4..]) != crc32c::crc32c(&b[..len - 4]) {
            return Err(self.corrupt(off, format!("checksum mismatch in data block {i}")));
        }
        let data = &b[..len - 8];
        // Per entry: a u32 offset, and (version 2) a fingerprint byte.
        let per_entry = if self.fingerprints { 5 } else { 4 };
        let mut count = m.map_or(0, |m| m.count.load(Ordering::Relaxed) as usize);
        if count == 0 {
            count = checked_count(&b[..len - 4], per_entry)
                .ok_or_else(|| self.corrupt(off, "bad entry count in data block"))?
                as usize;
            if let Some(m) = m {
                m.count.store(count as u32, Ordering::Relaxed);
            }
        }
        Ok(Block {
            data,
            offsets_at: data.len() - count * per_entry,
            count,
            base: off as u64,
        })
    }

    /// Read-ahead for a sequential reader at block `pos` of this file: when it comes within
    /// half a window of `*ahead` (the end of what was asked for so far; 0 for a new reader),
    /// asks the kernel to read the next [`READ_AHEAD`] bytes in the background and moves
    /// `*ahead`. Lookups read without read-ahead (the mapping is advised random), so scans and
    /// compactions ask for theirs.
    #[inline]
    pub(crate) fn read_ahead(&self, pos: &BlockPos, ahead: &mut usize) {
        let off = pos.start;
        if off + READ_AHEAD / 2 >= *ahead {
            let from = off.max(*ahead);
            self.map.will_need(from, off + READ_AHEAD - from);
            *ahead = off + READ_AHEAD;
        }
    }

    /// The position of checked block `i`, to come back to it without checking again.
    pub(crate) fn block_pos(&self, i: usize) -> Result<BlockPos> {
        let b = self.block(i)?;
        Ok(BlockPos {
            start: b.base as usize,
            data_len: b.data.len(),
            offsets_at: b.offsets_at,
            count: b.count,
        })
    }

    /// The block at a position from [`RunFile::block_pos`] of this file.
    #[inline]
    pub(crate) fn block_at(&self, p: BlockPos) -> Block<'_> {
        match self.bytes().get(p.start..p.start + p.data_len) {
            Some(data) => Block {
                data,
                offsets_at: p.offsets_at,
                count: p.count,
                base: p.start as u64,
            },
            None => Block {
                data: &[],
                offsets_at: 0,
                count: 0,
                base: 0,
            },
        }
    }

    /// Byte offset of `s` (a slice of this file's map) in the file.
    #[inline]
    pub(crate) fn offset_of(&self, s: &[u8]) -> usize {
        (s.as_ptr() as usize).wrapping_sub(self.bytes().as_ptr() as usize)
    }

    /// The bytes `[a, b)` of the file (empty when out of bounds).
    #[inline]
    pub(crate) fn slice(&self, a: usize, b: usize) -> &[u8] {
        self.bytes().get(a..b).unwrap_or(&[])
    }

    /// Starts reading the data block that would hold the probe's key into the page cache in
    /// the background (`MADV_WILLNEED` of its page), without waiting for it and without
    /// touching the mapped file: a batch of lookups asks for every key's block first, so the
    /// device works on all of them at once (queue depth above one), and each lookup then finds
    /// its page cached. When the in-memory heads leave two blocks possible, both are asked
    /// for; with more (keys sharing their first 16 bytes across blocks), none.
    pub(crate) fn will_need_block(&self, p: &Probe) {
        let Some(pins) = self.pins.get() else {
            if let Ok(Some(i)) = self.find_block_headed(p.key, p.head) {
                if let Ok((_, off, len)) = self.index_entry(i) {
                    self.map.will_need(off, len);
                }
            }
            return;
        };
        let lo = first_at_least(&pins.heads, &pins.tops, p.head);
        let hi = match pins.heads.get(lo) {
            Some(h) if *h == p.head => lo + pins.heads[lo..].partition_point(|h| *h <= p.head),
            _ => lo,
        };
        // `lo..=hi`: the blocks the key may be in (`hi` when it is larger than every key of
        // the blocks ending in its head).
        if hi > lo + 1 {
            return;
        }
        for m in pins.blocks.iter().skip(lo).take(hi - lo + 1) {
            self.map.will_need(m.off as usize, m.len as usize);
        }
    }

    /// The first block whose last key is `>= key`.
    pub(crate) fn find_block(&self, key: &[u8]) -> Result<Option<usize>> {
        self.find_block_headed(key, head_of(key))
    }

    /// [`RunFile::find_block`] of a key whose [`head_of`] is `hk`.
    #[inline]
    fn find_block_headed(&self, key: &[u8], hk: u128) -> Result<Option<usize>> {
        let Some(pins) = self.pins.get() else {
            // Not pinned yet: a binary search of the whole mapped index.
            return self.search_index(key, 0, self.index_count);
        };
        // The in-memory heads decide unless blocks end in keys with the key's head: a smaller
        // head is a smaller key, a larger head a larger one.
        let mut lo = first_at_least(&pins.heads, &pins.tops, hk);
        // Usually no block ends in a key with the key's head: then block `lo` is the one.
        let hi = match pins.heads.get(lo) {
            Some(h) if *h == hk => lo + pins.heads[lo..].partition_point(|h| *h <= hk),
            _ => lo,
        };
        if hi == lo + 1 {
            // One block ends in a key with the key's head (with unique heads, a lookup of that
            // very key): its last entry, on the page the lookup reads next anyway, decides
            // instead of its index entry, whose page of the mapped index a small page cache
            // may have evicted (an extra device read for one lookup in ~35).
            let b = self.block(lo)?;
            if b.key_at(b.len().saturating_sub(1), self)? < key {
                lo += 1;
            }
            return Ok((lo < self.index_count).then_some(lo));
        }
        self.search_index(key, lo, hi)
    }

    /// The first block in `lo..hi` of the mapped index whose last key is `>= key` (`hi` if
    /// none), or `None` past the last block.
    #[inline]
    fn search_index(&self, key: &[u8], mut lo: usize, mut hi: usize) -> Result<Option<usize>> {
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.index_entry(mid)?.0 < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok((lo < self.index_count).then_some(lo))
    }

    /// False when the file holds no key with the scan prefix hashed to `h` (only files written
    /// with a prefix extractor know; others answer true).
    #[inline]
    pub(crate) fn may_contain_prefix(&self, h: u64) -> bool {
        self.bloom_flags & BLOOM_HAS_PREFIXES == 0 || self.may_contain_hash(h)
    }

    /// The bloom-filter block of a key hash (`None`: no usable filter).
    #[inline(always)]
    fn filter_block(&self, h: u64) -> Option<&[u8; 64]> {
        if self.bloom_blocks == 0 {
            return None;
        }
        let at = bloom_block(h, self.bloom_blocks) * 64;
        match self.pins.get() {
            Some(p) => p.bloom.get(at..)?.first_chunk::<64>(),
            None => self
                .bytes()
                .get(self.bloom_off + at..self.bloom_off + self.bloom_blocks * 64)?
                .first_chunk::<64>(),
        }
    }

    #[inline(always)]
    fn may_contain_hash(&self, h: u64) -> bool {
        bloom_passes(self.filter_block(h), h)
    }

    /// Starts loading the bloom-filter line of a key hash (so a later
    /// [`RunFile::may_contain_located`] does not wait for it).
    /// Returns that line (`None`: no filter), for [`RunFile::may_contain_at`].
    #[inline]
    pub(crate) fn prefetch_filter(&self, h: u64) -> Option<&[u8; 64]> {
        let block = self.filter_block(h);
        if let Some(block) = block {
            crate::mapped::prefetch_ref(block);
        }
        block
    }

    /// False when the file cannot hold the probe's key (whose [`key_hash`] is `hash`): above
    /// its key range, outside its visible range, or absent from its bloom filter. For a file
    /// its run's search picked, the first whose last key is not below the probe's: that check
    /// is not repeated here.
    #[inline(always)]
    pub(crate) fn may_contain_located(&self, p: &Probe, hash: u64) -> bool {
        self.may_contain_at(self.filter_block(hash), p, hash)
    }

    /// [`RunFile::may_contain_located`] with the filter line [`RunFile::prefetch_filter`]
    /// returned for `hash`.
    #[inline(always)]
    pub(crate) fn may_contain_at(&self, line: Option<&[u8; 64]>, p: &Probe, hash: u64) -> bool {
        bloom_passes(line, hash) && !self.after(p) && self.visible(p.key)
    }

    /// The entry stored for exactly `key` (whose [`key_hash`] is `hash`), without the filter
    /// check [`RunFile::may_contain_located`] (done already).
    #[inline]
    pub(crate) fn get_unfiltered(&self, p: &Probe, hash: u64) -> Result<Option<RawEntry<'_>>> {
        let Some(bi) = self.find_block_headed(p.key, p.head)? else {
            return Ok(None);
        };
        self.locate_block(bi)?.find(p.key, hash, self)
    }

    /// Block `i`, with its fingerprints and offsets starting to load (what a [`Block::find`]
    /// in it reads first).
    #[inline]
    fn locate_block(&self, i: usize) -> Result<Block<'_>> {
        let b = self.block(i)?;
        b.prefetch_lookup();
        Ok(b)
    }

    /// The block that would hold the probe's key, with its fingerprints and offsets starting
    /// to load (a later [`Block::find`] in it waits less): lookups in several runs locate
    /// every run's block first, so the blocks load together.
    #[inline]
    pub(crate) fn locate(&self, p: &Probe) -> Result<Option<Block<'_>>> {
        let Some(bi) = self.find_block_headed(p.key, p.head)? else {
            return Ok(None);
        };
        self.locate_block(bi).map(Some)
    }

    /// The entry stored for exactly `key`, whose [`key_hash`] is `hash`.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &[u8], hash: u64) -> Result<Option<RawEntry<'_>>> {
        let p = Probe::new(key);
        if self.before(&p) || !self.may_contain_located(&p, hash) {
            return Ok(None);
        }
        self.get_unfiltered(&p, hash)
    }
}

impl<'a> Block<'a> {
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Entry `i` of the block.
    #[inline]
    pub(crate) fn entry(&self, i: usize, run: &RunFile) -> Result<RawEntry<'a>> {
        let o = be32(&self.data[self.offsets_at + i * 4..]) as usize;
        let bad = || run.corrupt(self.base as usize + o, "entry out of bounds in data block");
        if o + 9 > self.offsets_at {
            return Err(bad());
        }
        let kind = OpKind::from_u8(self.data[o])
            .ok_or_else(|| run.corrupt(self.base as usize + o, "unknown entry kind"))?;
        let klen = be32(&self.data[o + 1..]) as usize;
        let vlen = be32(&self.data[o + 5..]) as usize;
        let ks = o + 9;
        let vs = ks.checked_add(klen).ok_or_else(bad)?;
        let ve = vs.checked_add(vlen).ok_or_else(bad)?;
        if ve > self.offsets_at {
            return Err(bad());
        }
        Ok(RawEntry {
            kind,
            key: &self.data[ks..vs],
            value: &self.data[vs..ve],
        })
    }

    /// Only the key of entry `i` (what searches compare).
    #[inline]
    fn key_at(&self, i: usize, run: &RunFile) -> Result<&'a [u8]> {
        let o = be32(&self.data[self.offsets_at + i * 4..]) as usize;
        let ks = o + 9;
        let klen = self.data.get(o + 1..ks).map(be32).ok_or_else(|| {
            run.corrupt(self.base as usize + o, "entry out of bounds in data block")
        })? as usize;
        match ks.checked_add(klen) {
            Some(ke) if ke <= self.offsets_at => Ok(&self.data[ks..ke]),
            _ => Err(run.corrupt(self.base as usize + o, "entry out of bounds in data block")),
        }
    }

    /// The fingerprints of the entries (empty in version 1 files).
    #[inline]
    fn fingerprints(&self) -> &'a [u8] {
        let at = self.offsets_at + self.count * 4;
        let fps = self.data.get(at..).unwrap_or(&[]);
        if fps.len() == self.count {
            fps
        } else {
            &[]
        }
    }

    /// Starts loading the first entry whose fingerprint matches `hash` (the entry a
    /// [`Block::find`] most likely reads), so that the entry misses of blocks in several runs
    /// overlap instead of following one another. Waits for the fingerprints.
    #[inline]
    pub(crate) fn prefetch_match(&self, hash: u64) {
        let fp = fingerprint(hash);
        let (words, _) = self.fingerprints().as_chunks::<8>();
        for (c, w) in words.iter().enumerate() {
            let hits = fingerprint_hits(w, fp);
            if hits != 0 {
                self.prefetch_entry(c * 8 + (hits.trailing_zeros() / 8) as usize);
                return;
            }
        }
    }

    /// The entry of exactly `key` (whose [`key_hash`] is `hash`): with fingerprints, only
    /// entries with the key's fingerprint are read; without, a binary search. The block should
    /// come from [`RunFile::locate`] (its fingerprints and offsets are then loading).
    #[inline]
    pub(crate) fn find(
        &self,
        key: &[u8],
        hash: u64,
        run: &RunFile,
    ) -> Result<Option<RawEntry<'a>>> {
        let fps = self.fingerprints();
        if fps.is_empty() {
            let i = self.lower_bound(key, run)?;
            if i < self.count {
                let e = self.entry(i, run)?;
                if e.key == key {
                    return Ok(Some(e));
                }
            }
            return Ok(None);
        }
        // Eight fingerprints at a time ([`fingerprint_hits`]). The last few are padded with
        // zeros: a match there lies past the last entry and is skipped.
        let fp = fingerprint(hash);
        let (words, rest) = fps.as_chunks::<8>();
        let mut tail = [0u8; 8];
        // Byte by byte: a `copy_from_slice` of a variable length is a call to `memcpy`.
        for (t, f) in tail.iter_mut().zip(rest) {
            *t = *f;
        }
        let last = (!rest.is_empty()).then_some(&tail);
        for (c, w) in words.iter().chain(last).enumerate() {
            let mut hits = fingerprint_hits(w, fp);
            while hits != 0 {
                let i = c * 8 + (hits.trailing_zeros() / 8) as usize;
                hits &= hits - 1;
                if i < self.count {
                    let e = self.entry(i, run)?;
                    if e.key == key {
                        return Ok(Some(e));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Index of the first entry with key `>= key`.
    ///
    /// A first round of up to seven pivots whose keys are loaded together (the block is
    /// usually not in cache: a binary search would wait for seven key reads in a row), then a
    /// binary search of the eighth of the block they leave, whose lines load together.
    pub(crate) fn lower_bound(&self, key: &[u8], run: &RunFile) -> Result<usize> {
        const WAYS: usize = 8;
        let hk = head_of(key);
        self.prefetch_search();
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let n = hi - lo;
            // Pivots: every entry of a short range, else `WAYS - 1` spread evenly.
            let mut pivots = [0usize; WAYS - 1];
            let np = n.min(WAYS - 1);
            for (j, p) in pivots.iter_mut().enumerate().take(np) {
                *p = if n < WAYS {
                    lo + j
                } else {
                    lo + n * (j + 1) / WAYS
                };
                self.prefetch_entry(*p);
            }
            // The first pivot whose key is `>= key` bounds the range from above.
            let mut next = (lo, hi);
            let mut found = false;
            for (j, &p) in pivots[..np].iter().enumerate() {
                let k = self.key_at(p, run)?;
                if !cmp_headed(head_of(k), k, hk, key).is_lt() {
                    next = (if j == 0 { lo } else { pivots[j - 1] + 1 }, p);
                    found = true;
                    break;
                }
            }
            if !found {
                next = (pivots[np - 1] + 1, hi);
            }
            if n < WAYS {
                // Every entry of the range was a pivot.
                return Ok(if found { next.1 } else { hi });
            }
            (lo, hi) = next;
            // The rest of the search reads only the entries of this range: load them together.
            let from = self.data.get(self.offsets_at + lo * 4..).map_or(0, be32) as usize;
            let to = match self.data.get(self.offsets_at + hi * 4..) {
                Some(b) if hi < self.count => be32(b) as usize,
                _ => self.offsets_at,
            };
            if let Some(range) = self.data.get(from..to.min(self.offsets_at)) {
                crate::mapped::prefetch(range, 16);
            }
            // Those lines load together: a plain binary search over them waits for them once
            // and compares fewer keys than more rounds of pivots.
            while lo < hi {
                let mid = (lo + hi) / 2;
                let k = self.key_at(mid, run)?;
                if cmp_headed(head_of(k), k, hk, key).is_lt() {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
        }
        Ok(lo)
    }

    /// Starts loading what the first round of [`Block::lower_bound`] reads: the offsets, and
    /// (a guess that needs no offset: entries are about equally long) the lines at each
    /// eighth of the entries' bytes, where its pivots' keys are. Call it early, before other
    /// work, so the loads overlap it.
    #[inline]
    pub(crate) fn prefetch_search(&self) {
        let offsets = self.offsets_at..self.offsets_at + self.count * 4;
        crate::mapped::prefetch(self.data.get(offsets).unwrap_or(&[]), 16);
        if self.count >= 8 {
            for j in 1..8 {
                let at = self.offsets_at * j / 8;
                crate::mapped::prefetch(self.data.get(at..self.offsets_at).unwrap_or(&[]), 1);
            }
        }
    }

    /// Starts loading what a [`Block::find`] reads first: the fingerprints and the offsets
    /// (contiguous).
    #[inline]
    pub(crate) fn prefetch_lookup(&self) {
        let at = self.offsets_at + self.count * 4;
        crate::mapped::prefetch(self.data.get(at..).unwrap_or(&[]), 8);
        crate::mapped::prefetch(self.data.get(self.offsets_at..).unwrap_or(&[]), 16);
    }

    /// Starts loading up to `lines` cache lines of the entries from entry `i` on (a scan
    /// reads them next).
    #[inline]
    pub(crate) fn prefetch_from(&self, i: usize, lines: usize) {
        if let Some(o) = self.data.get(self.offsets_at + i * 4..).map(be32) {
            if let Some(e) = self.data.get(o as usize..self.offsets_at) {
                crate::mapped::prefetch(e, lines);
            }
        }
    }

    /// Starts loading the first line of entry `i` (its header and the start of its key).
    #[inline]
    fn prefetch_entry(&self, i: usize) {
        if let Some(o) = self.data.get(self.offsets_at + i * 4..).map(be32) {
            if let Some(e) = self.data.get(o as usize..) {
                crate::mapped::prefetch(e, 1);
            }
        }
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::SeqCst) {
            // Unlinking a mapped file is safe: the mapping stays valid until it is dropped.
            let _ = fs::remove_file(self.map.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes a run of format `version` at `path` holding `entries` (puts, keys ascending).
    fn write_run<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        path: &Path,
        version: u16,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> PathBuf {
        let mut w = RunWriter::create_version(path, None, version).unwrap();
        for (k, v) in entries {
            w.add(k.as_ref(), OpKind::Put, v.as_ref()).unwrap();
        }
        w.finish().unwrap().unwrap()
    }

    /// A run of the current format named `name` holding `entries`, in a temporary directory
    /// (kept alive by the returned guard).
    fn temp_run<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        name: &str,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = write_run(&dir.path().join(name), RUN_VERSION, entries);
        (dir, p)
    }

    proptest! {
        /// A probe orders keys as their bytes do, for keys around the 16- and 24-byte marks
        /// where its numeric heads and tails end, sharing long prefixes and zero bytes.
        #[test]
        fn probes_order_keys_as_bytes(
            common in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xffu8)], 0..26),
            a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xffu8)], 0..10),
            b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xffu8)], 0..10),
        ) {
            let ka = [&common[..], &a[..]].concat();
            let kb = [&common[..], &b[..]].concat();
            prop_assert_eq!(Probe::new(&ka).after_key(&kb), ka > kb, "{:?} vs {:?}", ka, kb);
            prop_assert_eq!(Probe::new(&kb).after_key(&ka), kb > ka);
        }

        /// The two-step search of block heads finds what one binary search of them finds,
        /// with runs of equal heads, probes between, on and beyond them, and any length.
        #[test]
        fn head_search_in_two_steps_matches_one_binary_search(
            mut heads in proptest::collection::vec(0u128..64, 0..200),
            probes in proptest::collection::vec(0u128..70, 1..20),
        ) {
            heads.sort_unstable();
            let tops = tops_of(&heads);
            for hk in probes {
                prop_assert_eq!(
                    first_at_least(&heads, &tops, hk),
                    heads.partition_point(|h| *h < hk)
                );
            }
        }
    }

    /// A data block whose entry count is damaged is a clear error on reads of files opened
    /// without verifying their blocks (not a panic, not a wrong answer).
    #[test]
    fn bad_entry_counts_are_errors_on_read() {
        let (_dir, p) = temp_run("c.run", (0u32..2000).map(|i| (i.to_be_bytes(), [7; 20])));
        let f = RunFile::open(&p, 1, true, true).unwrap();
        let blocks = f.pinned_blocks();
        let (off, len) = (blocks[0].off as usize, blocks[0].len as usize);
        drop(f);
        let mut bytes = fs::read(&p).unwrap();
        for bad in [0u32, 1 << 30] {
            bytes[off + len - 8..off + len - 4].copy_from_slice(&bad.to_be_bytes());
            fs::write(&p, &bytes).unwrap();
            // Verified at open: the checksum no longer matches.
            let err = RunFile::open(&p, 1, true, false).unwrap_err().to_string();
            assert!(err.contains("checksum mismatch in data block 0"), "{err}");
            // Not verified: the first read of the block reports it.
            let f = RunFile::open(&p, 1, false, false).unwrap();
            let k = 0u32.to_be_bytes();
            let err = f.get(&k, key_hash(&k)).unwrap_err().to_string();
            assert!(err.contains("bad entry count in data block"), "{err}");
            assert!(err.contains("c.run"), "{err}");
            // Other blocks are still read.
            let k = 1999u32.to_be_bytes();
            assert!(f.get(&k, key_hash(&k)).unwrap().is_some());
        }
    }

    /// A block's lower bound (searched in rounds of pivots) is the first entry `>= key`, for
    /// keys before, between, equal to and after the entries, in blocks of every entry count
    /// from 1 up, with keys that share their first 16 bytes and keys shorter than 16 bytes.
    #[test]
    fn lower_bound_is_the_first_entry_not_below_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (n, vlen) in [
            (1usize, 5000usize),
            (2, 2000),
            (7, 600),
            (8, 500),
            (9, 400),
            (300, 0),
        ] {
            let path = dir.path().join(format!("lb{n}.run"));
            let mut w = RunWriter::create(&path, None).unwrap();
            // Keys: a 16-byte shared head then an even number, or a short key.
            let key = |i: u32| -> Vec<u8> {
                let mut k = vec![b'h'; 16];
                k.extend_from_slice(&(i * 2).to_be_bytes());
                k
            };
            let count = (n * 5) as u32;
            for i in 0..count {
                w.add(&key(i), OpKind::Put, &vec![1; vlen]).unwrap();
            }
            let p = w.finish().unwrap().unwrap();
            let f = RunFile::open(&p, 1, true, true).unwrap();
            for b in 0..f.block_count() {
                let blk = f.block(b).unwrap();
                let keys: Vec<&[u8]> = (0..blk.len())
                    .map(|i| blk.entry(i, &f).unwrap().key)
                    .collect();
                let mut probes: Vec<Vec<u8>> = vec![vec![], vec![b'h'; 3], vec![0xff; 20]];
                for i in 0..count * 2 + 2 {
                    let mut k = vec![b'h'; 16];
                    k.extend_from_slice(&i.to_be_bytes());
                    probes.push(k);
                }
                for probe in &probes {
                    let want = keys
                        .iter()
                        .position(|k| *k >= &probe[..])
                        .unwrap_or(keys.len());
                    assert_eq!(
                        blk.lower_bound(probe, &f).unwrap(),
                        want,
                        "n {n} block {b} {probe:?}"
                    );
                }
            }
        }
    }

    /// Version 1 files (no fingerprints in data blocks) are still read: point lookups, absent
    /// keys and block scans.
    #[test]
    fn version_1_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        for (version, name) in [(1u16, "v1.run"), (2, "v2.run"), (RUN_VERSION, "v3.run")] {
            let path = dir.path().join(name);
            let mut w = if version == 1 {
                RunWriter::create_v1(&path).unwrap()
            } else if version == RUN_VERSION {
                RunWriter::create(&path, None).unwrap()
            } else {
                RunWriter::create_version(&path, None, version).unwrap()
            };
            for i in (0u32..5000).map(|i| i * 2) {
                w.add(&i.to_be_bytes(), OpKind::Put, &[i as u8; 30])
                    .unwrap();
            }
            let p = w.finish().unwrap().unwrap();
            let bytes = fs::read(&p).unwrap();
            assert_eq!(u16::from_be_bytes([bytes[4], bytes[5]]), version);
            let f = RunFile::open(&p, 1, true, true).unwrap();
            assert_eq!(f.fingerprints, version >= 2);
            assert!(f.block_count() > 10);
            let crossing = f
                .pinned_blocks()
                .iter()
                .filter(|b| b.off / PAGE as u64 != (b.off + u64::from(b.len) - 1) / PAGE as u64)
                .count();
            assert_eq!(
                crossing == 0,
                version >= 3,
                "{version}: {crossing} blocks cross pages"
            );
            for i in 0u32..10_000 {
                let k = i.to_be_bytes();
                let e = f.get(&k, key_hash(&k)).unwrap();
                if i % 2 == 0 {
                    let e = e.unwrap();
                    assert_eq!((e.key, e.value), (&k[..], &[i as u8; 30][..]));
                } else {
                    assert!(e.is_none(), "{version}: {i}");
                }
            }
            let mut n = 0;
            for b in 0..f.block_count() {
                let blk = f.block(b).unwrap();
                for i in 0..blk.len() {
                    let e = blk.entry(i, &f).unwrap();
                    assert_eq!(e.key, (n * 2u32).to_be_bytes());
                    n += 1;
                }
            }
            assert_eq!(n, 5000);
            // Opened without reading its data blocks: the entry counts are read on first use.
            let f = RunFile::open(&p, 1, false, false).unwrap();
            assert!(f
                .pinned_blocks()
                .iter()
                .all(|b| b.count.load(Ordering::Relaxed) == 0));
            for i in 0u32..10_000 {
                let k = i.to_be_bytes();
                let e = f.get(&k, key_hash(&k)).unwrap();
                assert_eq!(e.is_some(), i % 2 == 0, "{version}: {i}");
            }
            assert!(f
                .pinned_blocks()
                .iter()
                .all(|b| b.count.load(Ordering::Relaxed) > 0));
        }
        // An unknown version is refused with a clear error.
        let path = dir.path().join("v2.run");
        let mut bytes = fs::read(&path).unwrap();
        bytes[5] = 9;
        fs::write(&path, &bytes).unwrap();
        let err = RunFile::open(&path, 1, true, true).unwrap_err().to_string();
        assert!(err.contains("version"), "{err}");
    }

    /// Version 3: every data block lies within one 4 KiB page (a cold lookup faults in one
    /// page) unless it is a single entry larger than a page, which starts at a page; entries of
    /// every size are read back, and the padding costs little for 100-byte values.
    #[test]
    fn blocks_lie_within_one_page() {
        let dir = tempfile::tempdir().unwrap();
        // Sizes from a few bytes to over two pages, in a fixed pseudo-random order.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut sizes = Vec::new();
        for i in 0..6000u32 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            sizes.push(match i % 100 {
                0 => 4100 + (s % 6000) as usize,
                1..=9 => 600 + (s % 3000) as usize,
                _ => (s % 300) as usize,
            });
        }
        let path = dir.path().join("mixed.run");
        let mut w = RunWriter::create(&path, None).unwrap();
        for (i, n) in sizes.iter().enumerate() {
            w.add(&(i as u32).to_be_bytes(), OpKind::Put, &vec![i as u8; *n])
                .unwrap();
        }
        let p = w.finish().unwrap().unwrap();
        let f = RunFile::open(&p, 1, true, true).unwrap();
        let page = PAGE as u64;
        let mut single_large = 0;
        for (i, b) in f.pinned_blocks().iter().enumerate() {
            let end = b.off + u64::from(b.len);
            if b.len as usize > PAGE {
                assert_eq!(
                    b.off % page,
                    0,
                    "block {i} larger than a page starts at one"
                );
                assert_eq!(f.block(i).unwrap().len(), 1, "block {i}");
                single_large += 1;
            } else {
                assert_eq!(b.off / page, (end - 1) / page, "block {i} crosses a page");
            }
        }
        assert!(single_large >= 50, "{single_large}");
        for (i, n) in sizes.iter().enumerate() {
            let k = (i as u32).to_be_bytes();
            let e = f.get(&k, key_hash(&k)).unwrap().unwrap();
            assert_eq!(e.value, &vec![i as u8; *n][..], "{i}");
        }
        // 100-byte values (the benchmarks'): the file grows by under 3 % against version 2.
        let mut len = [0u64; 2];
        for (slot, version) in [2u16, RUN_VERSION].into_iter().enumerate() {
            let path = dir.path().join(format!("small-{version}.run"));
            let mut w = RunWriter::create_version(&path, None, version).unwrap();
            for i in 0u64..100_000 {
                w.add(&i.to_be_bytes(), OpKind::Put, &[7; 100]).unwrap();
            }
            len[slot] = fs::metadata(w.finish().unwrap().unwrap()).unwrap().len();
        }
        assert!(
            len[1] > len[0] && len[1] < len[0] + len[0] * 3 / 100,
            "{len:?}"
        );
    }

    /// A file opened without its block index and filter in memory (a compaction's output
    /// before its inputs are freed) answers every lookup as the pinned file does, from the
    /// mapped index and filter, and is charged what it will hold once pinned.
    #[test]
    fn unpinned_files_answer_as_pinned_ones() {
        let (_dir, p) = temp_run(
            "u.run",
            (0u64..20_000).map(|i| ((i * 2).to_be_bytes(), i.to_be_bytes())),
        );
        let pinned = RunFile::open(&p, 1, true, true).unwrap();
        let unpinned = RunFile::open_unpinned(&p, 2, true).unwrap();
        assert!(pinned.is_pinned() && !unpinned.is_pinned());
        assert_eq!(unpinned.memory_bytes(), pinned.memory_bytes());
        for i in 0u64..40_001 {
            let k = i.to_be_bytes();
            let h = key_hash(&k);
            let a = pinned.get(&k, h).unwrap().map(|e| e.value.to_vec());
            let b = unpinned.get(&k, h).unwrap().map(|e| e.value.to_vec());
            assert_eq!(a, b, "key {i}");
            assert_eq!(a.is_some(), i % 2 == 0 && i < 40_000, "key {i}");
            assert_eq!(
                pinned.find_block(&k).unwrap(),
                unpinned.find_block(&k).unwrap()
            );
            assert_eq!(pinned.may_contain_hash(h), unpinned.may_contain_hash(h));
        }
        unpinned.pin().unwrap();
        assert!(unpinned.is_pinned());
        assert_eq!(unpinned.memory_bytes(), pinned.memory_bytes());
        let k = 4000u64.to_be_bytes();
        assert!(unpinned.get(&k, key_hash(&k)).unwrap().is_some());
    }

    /// Asking for a key's block in the background reads that block's page and no other
    /// (what a batch of gets does for each key before reading any).
    #[cfg(target_os = "linux")]
    #[test]
    fn asking_for_a_block_reads_its_page() {
        let (_dir, p) = temp_run("w.run", (0u64..40_000).map(|i| (i.to_be_bytes(), [7; 100])));
        for f in [
            RunFile::open(&p, 1, false, false).unwrap(),
            RunFile::open_unpinned(&p, 2, false).unwrap(),
        ] {
            let (from, to) = (PAGE, f.index_off / PAGE * PAGE);
            f.map.drop_cached_pages();
            if f.map.resident_pages(from, to - from) != Some(0) {
                eprintln!("the file system keeps dropped pages: nothing to observe");
                return;
            }
            let k = 12_345u64.to_be_bytes();
            let bi = f.find_block(&k).unwrap().unwrap();
            let off = f.block_pos(bi).unwrap().start;
            f.map.drop_cached_pages();
            f.will_need_block(&Probe::new(&k));
            // The read runs in the background: wait for it (at most 10 s).
            for _ in 0..1000 {
                if f.map.resident_pages(off, 1) == Some(1) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert_eq!(f.map.resident_pages(off, 1), Some(1));
            assert_eq!(f.map.resident_pages(from, to - from), Some(1));
        }
    }

    /// A lookup of a key whose block is not in the page cache reads one page of the file in
    /// version 3 (its block lies within one page, and the mapping is advised random: no
    /// read-ahead); in version 2 about half the lookups read two. Checked with `mincore` after
    /// dropping the file's data pages from the page cache; where the file system keeps them
    /// (tmpfs), there is nothing to observe and the test says so.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_cold_lookup_reads_one_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut pages_read = Vec::new();
        for version in [2u16, RUN_VERSION] {
            let path = dir.path().join(format!("cold-{version}.run"));
            let p = write_run(
                &path,
                version,
                (0u64..40_000).map(|i| (i.to_be_bytes(), [7; 100])),
            );
            // Not verified on open: the data blocks are not touched.
            let f = RunFile::open(&p, 1, false, false).unwrap();
            // The pages between the header's and the index's (opening the file read those).
            let (from, to) = (PAGE, f.index_off / PAGE * PAGE);
            let lookups = 64u64;
            let mut read = 0;
            for n in 0..lookups {
                f.map.drop_cached_pages();
                if f.map.resident_pages(from, to - from) != Some(0) {
                    eprintln!("the file system keeps dropped pages: nothing to observe");
                    return;
                }
                let k = (n * 613 + 100).to_be_bytes();
                assert!(f.get(&k, key_hash(&k)).unwrap().is_some());
                read += f.map.resident_pages(from, to - from).unwrap();
            }
            pages_read.push(read as f64 / lookups as f64);
        }
        eprintln!("pages per cold lookup (version 2, 3): {pages_read:?}");
        assert_eq!(
            pages_read[1], 1.0,
            "version 3 pages per cold lookup: {pages_read:?}"
        );
        assert!(
            pages_read[0] > 1.2,
            "version 2 pages per cold lookup: {pages_read:?}"
        );
    }

    /// The block search agrees with a search of the index's last keys when keys share their
    /// first 16 bytes (the in-memory heads): one block ending in the probe's head (decided by
    /// the block's last entry), several (a search of the mapped index), none.
    #[test]
    fn block_search_with_shared_heads_matches_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.run");
        let mut w = RunWriter::create(&path, None).unwrap();
        let key = |group: u64, i: u32| {
            let mut k = [0u8; 16].to_vec();
            k[8..].copy_from_slice(&group.to_be_bytes());
            k.extend_from_slice(&i.to_be_bytes());
            k
        };
        // Groups of 1 to 400 entries of 60 bytes: some end a block, some span several.
        let mut keys = Vec::new();
        for group in 0u64..300 {
            for i in 0..(1 + (group * 37) % 400) as u32 {
                keys.push(key(group * 2, i * 2 + 1));
            }
        }
        for k in &keys {
            w.add(k, OpKind::Put, &[1; 60]).unwrap();
        }
        let f = RunFile::open(&w.finish().unwrap().unwrap(), 1, true, false).unwrap();
        let last_keys: Vec<Vec<u8>> = (0..f.block_count())
            .map(|b| f.index_entry(b).unwrap().0.to_vec())
            .collect();
        let mut probes = keys.clone();
        for group in 0u64..301 {
            probes.extend([0, 2, 500, 1000, u32::MAX].map(|i| key(group * 2, i)));
            probes.push(key(group * 2 + 1, 0));
        }
        for p in &probes {
            let want = last_keys.iter().position(|l| l.as_slice() >= p.as_slice());
            assert_eq!(f.find_block(p).unwrap(), want, "{p:?}");
        }
        for k in &keys {
            assert!(f.get(k, key_hash(k)).unwrap().is_some());
        }
    }
}
