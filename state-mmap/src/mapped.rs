//! The only module with `unsafe` code: read-only memory maps of immutable sorted-run files,
//! CPU prefetch hints over their bytes, and handing freed heap memory back to the OS.
//!
//! # Truncation underneath a mapping
//!
//! Reading a mapped page whose file offset lies beyond the file's current end raises `SIGBUS`
//! and kills the process. Sorted-run files are written completely, closed and renamed into
//! place *before* they are mapped (their `fsync` may come later: it only matters to a crash of
//! the machine, not to the mapping), and this crate never writes, truncates or reopens a
//! published file for writing: it only maps it read-only and eventually unlinks it (unlinking
//! keeps the mapping valid until it is dropped). So truncation cannot happen through this crate's
//! API. Another process truncating or rewriting a file in the database directory can crash this
//! one; the directory must be private to the backend, as RocksDB's and LMDB's are.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: Option<memmap2::Mmap>,
    path: PathBuf,
}

impl MappedFile {
    /// Maps `path` read-only. An empty file gives an empty slice (mapping zero bytes fails on
    /// some platforms, so it is not mapped at all).
    pub(crate) fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| Error::io("opening a sorted run", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("reading the size of a sorted run", path, e))?
            .len();
        if len == 0 {
            return Ok(MappedFile {
                map: None,
                path: path.to_path_buf(),
            });
        }
        // SAFETY: the file is an immutable, fully written and closed sorted run that this crate
        // never modifies or truncates while it is mapped (see the module docs); the map is
        // read-only, so no `&mut` alias to its bytes can exist.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| Error::io("memory-mapping a sorted run", path, e))?;
        Ok(MappedFile {
            map: Some(map),
            path: path.to_path_buf(),
        })
    }

    /// The file's bytes.
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(m) => m,
            None => &[],
        }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the kernel that the mapping is read at random places (`MADV_RANDOM`): a page fault
    /// then reads that page, not a read-ahead window around it (up to the device's
    /// `read_ahead_kb`, 8 MiB on some disks), which would fill a small page cache with pages no
    /// lookup asked for. Sequential readers ask for what they will read with
    /// [`MappedFile::will_need`]. Best effort: an error only loses the hint.
    pub(crate) fn advise_random(&self) {
        if let Some(m) = &self.map {
            if let Err(e) = m.advise(memmap2::Advice::Random) {
                tracing::debug!(path = %self.path.display(), error = %e, "madvise(MADV_RANDOM) failed");
            }
        }
    }

    /// Starts reading the bytes `[off, off + len)` (clipped to the file) into the page cache in
    /// the background (`MADV_WILLNEED`): the read-ahead of a sequential reader of a mapping
    /// advised random. Best effort.
    pub(crate) fn will_need(&self, off: usize, len: usize) {
        if let Some(m) = &self.map {
            let len = len.min(m.len().saturating_sub(off));
            if len > 0 {
                let _ = m.advise_range(memmap2::Advice::WillNeed, off, len);
            }
        }
    }
}

/// Test support: what of a mapped file is in the page cache, and dropping it from there.
#[cfg(all(test, target_os = "linux"))]
impl MappedFile {
    /// Unmaps the file's pages from this process (`MADV_DONTNEED`: the next read of one
    /// faults it in again, from the page cache or the file) and asks the kernel to drop the
    /// file's clean pages that no process maps from the page cache (`POSIX_FADV_DONTNEED`; best
    /// effort: some file systems, such as tmpfs, keep them).
    pub(crate) fn drop_cached_pages(&self) {
        use std::os::fd::AsRawFd;
        if let Some(m) = &self.map {
            // SAFETY: the range is the whole mapping, a read-only shared map of a file: after
            // `MADV_DONTNEED` its pages read the file's bytes again, which never change while
            // it is mapped (module docs), so no reference into it sees other bytes.
            unsafe {
                libc::madvise(
                    m.as_ptr() as *mut libc::c_void,
                    m.len(),
                    libc::MADV_DONTNEED,
                );
            }
        }
        if let Ok(f) = File::open(&self.path) {
            // SAFETY: `posix_fadvise` takes a valid open descriptor and offsets; it only
            // changes what the kernel caches, never memory of this process.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }

    /// How many of the 4 KiB pages `[off / 4096, (off + len).div_ceil(4096))` of the
    /// mapping are in the page cache (`mincore`); `None` when the kernel does not say.
    pub(crate) fn resident_pages(&self, off: usize, len: usize) -> Option<usize> {
        let m = self.map.as_ref()?;
        // SAFETY: `sysconf` reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let start = off / page * page;
        let end = (off + len).min(m.len());
        if end <= start {
            return Some(0);
        }
        let mut vec = vec![0u8; (end - start).div_ceil(page)];
        // SAFETY: `[start, end)` lies inside the mapping (`end <= m.len()`), `start` is a
        // multiple of the page size and the mapping starts on a page; `vec` has one byte per
        // page of the range, which is what `mincore` writes.
        let rc = unsafe {
            libc::mincore(
                m.as_ptr().add(start) as *mut libc::c_void,
                end - start,
                vec.as_mut_ptr(),
            )
        };
        (rc == 0).then(|| vec.iter().filter(|b| **b & 1 == 1).count())
    }
}

/// Asks the CPU to start loading the cache lines of `bytes` (at most `max_lines` of them) while
/// other work goes on: a lookup that will read one of several places it cannot tell apart yet
/// (which offset of a data block) waits for one memory access instead of two in a row. Does
/// nothing on targets other than x86_64.
#[inline]
pub(crate) fn prefetch(bytes: &[u8], max_lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = bytes.as_ptr();
        let n = bytes.len().min(max_lines * 64);
        let mut i = 0;
        while i < n {
            // SAFETY: a prefetch is a hint: it never faults, reads nothing architecturally and
            // writes nothing; the address is inside `bytes`. It needs SSE, which every x86_64
            // CPU has (it is part of the target's baseline).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(i).cast::<i8>()) };
            i += 64;
        }
        if n > 0 {
            // SAFETY: as above; `n - 1 < bytes.len()`, so the last line is covered too.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(n - 1).cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, max_lines);
}

/// [`prefetch`] of the memory of one value (e.g. a write-buffer entry a flush reads a few
/// entries later).
#[inline]
pub(crate) fn prefetch_ref<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = (value as *const T).cast::<i8>();
        let n = std::mem::size_of::<T>();
        let mut i = 0;
        while i < n {
            // SAFETY: a prefetch is a hint that never faults, reads nothing architecturally and
            // writes nothing; the address is inside `*value` (`i < size_of::<T>()`), computed
            // with `wrapping_add`, so no pointer arithmetic leaves the object either.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i)) };
            i += 64;
        }
        if n > 1 {
            // SAFETY: as above; the last byte of `*value`, which may lie on the next line.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(n - 1)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Hands the allocator's free memory back to the OS (glibc's `malloc_trim`; nothing on other
/// platforms). Called after a write buffer was freed: glibc keeps freed memory of its heaps
/// for reuse, and the holes that freed small write-buffer allocations leave (those not kept for
/// the next buffer) would otherwise stay resident (before buffers were recycled, at 50M keys
/// and a 256 MiB budget, about a third of the process's anonymous memory).
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only returns pages of free chunks to the
    // kernel (`madvise`/`sbrk`) under the allocator's own locks; memory in use is untouched.
    // It is glibc's function: the cfg above limits the call to glibc targets.
    unsafe {
        libc::malloc_trim(0);
    }
}
