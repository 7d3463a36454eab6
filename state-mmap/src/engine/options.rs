//! [`EngineOptions`]: what an engine is configured with, and the limits derived from it.

use crate::run::PrefixExtractor;

/// Options of the engine.
#[derive(Clone)]
pub struct EngineOptions {
    /// The memory budget for the engine's own memory: the in-memory block indexes and bloom
    /// filters of the sorted runs (32 bytes per data block of about 4 KiB and 10 bits per key)
    /// and the reservations of running
    /// compactions (their outputs' block indexes, at most the inputs', and a sixteenth of
    /// `target_file_bytes` for the file being written) first; of the rest, the active write
    /// buffer gets a third, one immutable write buffer waiting for its flush another third
    /// (writers wait while it is being flushed and the active one is full), and the rest is
    /// headroom for the allocator, small buffers and the last flushed write buffer, whose
    /// allocations a thread of its own empties and keeps for the next buffer (a flush waits
    /// for the one before it to be emptied; a write buffer never gets less than a twelfth of
    /// the budget). Data pages of sorted runs are
    /// mapped and belong to the OS page cache, outside the budget (a container's memory limit
    /// counts them; the kernel evicts them within it); a lookup faults in the one page its
    /// block lies in (the mappings are advised random), scans and compactions ask for
    /// read-ahead. Default 256 MiB.
    ///
    /// An engine opened in an [`MmapEnvironment`] ([`Db::open_in`]) ignores this: its budget is
    /// its share of the environment's ([`Db::memory_share`]). [`Db::open`] starts an
    /// environment of its own with this budget.
    ///
    /// [`MmapEnvironment`]: crate::environment::MmapEnvironment
    /// [`Db::open_in`]: super::Db::open_in
    /// [`Db::memory_share`]: super::Db::memory_share
    /// [`Db::open`]: super::Db::open
    pub memory_budget: usize,
    /// Compaction starts when this many sorted runs exist (bounds read amplification). Default 6.
    /// Runs each larger than all newer runs together are left out of such a merge (it would
    /// rewrite most of the data to remove one run), so up to about log2(data / write buffer)
    /// such runs may exist on top of this.
    pub max_sorted_runs: usize,
    /// The files a flush or a compaction writes (one sorted run) are cut once this large: at
    /// the next boundary the owner accepts when it set one ([`Db::set_file_boundary`]: the
    /// backend cuts only between key groups, so a file holds whole key groups and, unless a
    /// key group alone is larger, not much more than this). Small files are what lets a
    /// restore at another parallelism download little beyond the key groups it owns: only the
    /// one file of each sorted run that straddles a boundary of its range holds foreign key
    /// groups. Default 8 MiB (a sorted run has about one file per 8 MiB, or one per key group
    /// where key groups are larger).
    ///
    /// [`Db::set_file_boundary`]: super::Db::set_file_boundary
    pub target_file_bytes: u64,
    /// Check every data block's checksum when a file is opened (default true).
    pub verify_on_open: bool,
    /// Check a data block's checksum on every read of it (default false: files are verified at
    /// open, and pages then come from the OS page cache).
    pub verify_blocks_on_read: bool,
    /// Scan prefixes of keys, kept in write buffers and bloom filters for
    /// [`Db::scan_prefix`](super::Db::scan_prefix) (default none).
    pub prefix_extractor: Option<PrefixExtractor>,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("memory_budget", &self.memory_budget)
            .field("max_sorted_runs", &self.max_sorted_runs)
            .field("target_file_bytes", &self.target_file_bytes)
            .field("verify_on_open", &self.verify_on_open)
            .field("verify_blocks_on_read", &self.verify_blocks_on_read)
            .field("prefix_extractor", &self.prefix_extractor.is_some())
            .finish()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            memory_budget: 256 << 20,
            max_sorted_runs: 6,
            target_file_bytes: 8 << 20,
            verify_on_open: true,
            verify_blocks_on_read: false,
            prefix_extractor: None,
        }
    }
}

impl EngineOptions {
    pub(super) const MAX_IMMUTABLE: usize = 1;

    /// Budget bytes a compaction holds until it is installed: the buffers of the output file
    /// being written (write buffer, index, one bloom hash per entry: a sixteenth of
    /// [`EngineOptions::target_file_bytes`]). Its finished outputs hold no memory until it is
    /// installed: their block indexes and bloom filters are loaded once the inputs' are freed
    /// ([`crate::run::RunFile::pin`]), so the two never exist at once.
    pub(super) fn compaction_reserve(&self) -> usize {
        usize::try_from(self.target_file_bytes / 16).unwrap_or(usize::MAX)
    }
    /// Compactions of one engine queued or running at once: while one merges large old runs,
    /// another keeps the newest (small) runs merged, so their number stays bounded. (How many
    /// run at once over all engines is the environment's pool's limit.)
    pub(super) const COMPACTION_THREADS: usize = 2;
    /// Writers wait for a compaction once this many sorted runs exist (the background cannot
    /// keep up, and every point read would probe them all).
    pub(super) fn stall_runs(&self) -> usize {
        3 * self.max_sorted_runs
    }
}
