//! The memory budget of one engine: its share of the environment's budget, what its block
//! indexes and running compactions charge to it, and the write buffer size that is left.

use crate::environment::MmapEnvironment;

use super::Db;

/// The write buffer size of an engine with budget share `share` when its block indexes,
/// bloom filters and compaction reservations take `index_bytes` of it: a third of the rest,
/// and never less than a twelfth of `even` (the environment's budget divided by the engines
/// open in it: an engine whose indexes take more than the budget still writes in buffers of a
/// useful size).
pub(super) fn write_buffer_bytes(share: usize, index_bytes: usize, even: usize) -> usize {
    (share.saturating_sub(index_bytes) / 3)
        .max(even / 12)
        .max(4096)
}

impl Db {
    /// Reports what the engine charges (block indexes and bloom filters of the live runs,
    /// reservations of running compactions) to the environment and takes its share anew:
    /// that charge plus an even part of what no engine charges; the write buffers get the
    /// latter.
    pub(crate) fn update_buffer_bytes(&mut self) {
        let charged = self.charged_bytes();
        self.env.set_charged(self.env_key, charged);
        self.env_generation = self.env.generation();
        self.share = charged + self.env.memory_share();
        self.buffer_bytes = write_buffer_bytes(self.share, charged, self.env.budget_per_engine());
    }

    /// The engine's share of its environment's memory budget, as last taken (at its last
    /// write, flush or compaction): what it charges for its block indexes, bloom filters and
    /// running compactions, plus the budget nobody charges divided by the engines open in it
    /// ([`MmapEnvironment::memory_share`]). An engine with more state gets more; every
    /// engine's write buffers get the same.
    pub fn memory_share(&self) -> usize {
        self.share
    }

    /// The size at which the engine's active write buffer is flushed, as last computed.
    pub fn write_buffer_limit(&self) -> usize {
        self.buffer_bytes
    }

    /// The memory the engine charges to its budget share now: the block indexes of its live
    /// runs, the reservations of its running compactions, its write buffer and the write
    /// buffers waiting for their flush (accounted as described in `docs/mmap-format.md`).
    /// Memory the environment's threads are still freeing, and mapped pages, are not charged.
    pub fn memory_charged(&self) -> usize {
        self.charged_bytes() + self.mem.bytes() + self.imm.iter().map(|m| m.bytes()).sum::<usize>()
    }

    /// The environment the engine runs in.
    pub fn environment(&self) -> &MmapEnvironment {
        &self.env
    }

    /// Budget bytes not available to write buffers: the in-memory block indexes of the live
    /// runs plus what running compactions reserved.
    fn charged_bytes(&self) -> usize {
        let index: usize = self
            .runs
            .iter()
            .flat_map(|r| r.iter())
            .map(|f| f.memory_bytes())
            .sum();
        index + self.reserved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineOptions;

    /// A running compaction is charged to the budget: from its start until it is installed the
    /// write buffer gets what the live block indexes *and* the compaction's reservation (its
    /// writer's buffers) leave; afterwards the reservation is released and only the live
    /// runs' indexes are charged.
    #[test]
    fn a_running_compaction_is_charged_to_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EngineOptions {
            memory_budget: 4 << 20,
            max_sorted_runs: 64,
            target_file_bytes: 256 << 10,
            ..EngineOptions::default()
        };
        let mut db = Db::open(dir.path(), opts.clone()).unwrap();
        for round in 0u32..3 {
            for i in 0u32..20_000 {
                db.put(&(i * 3 + round).to_be_bytes(), &[round as u8; 40])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        db.drain().unwrap();
        assert_eq!(db.compacting, 0);
        assert_eq!(db.reserved, 0);
        let index = db.charged_bytes();
        assert!(index > 0);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, index, opts.memory_budget)
        );
        let n = db.runs.len();
        assert!(n >= 2, "{n} runs");
        // Nothing is installed before the next poll: the reservation is observable. It is the
        // writer's buffers only: the outputs load their block indexes and filters once the
        // inputs' are freed.
        db.start_compaction(0..n).unwrap();
        assert_eq!(db.reserved, (256 << 10) / 16);
        assert_eq!(db.charged_bytes(), index + db.reserved);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, index + db.reserved, opts.memory_budget)
        );
        assert!(
            db.buffer_bytes < write_buffer_bytes(opts.memory_budget, index, opts.memory_budget)
        );
        db.drain().unwrap();
        assert_eq!(db.reserved, 0);
        assert_eq!(db.runs.len(), 1);
        assert_eq!(
            db.buffer_bytes,
            write_buffer_bytes(opts.memory_budget, db.charged_bytes(), opts.memory_budget)
        );
        // The merge was cut into output files of about the target size, whose indexes and
        // filters were loaded after the inputs were freed (`drain` waits for that).
        assert!(db.runs[0].len() > 1, "{} files", db.runs[0].len());
        assert!(db.runs[0].iter().all(|f| f.is_pinned()));
    }
}
