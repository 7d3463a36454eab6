//! Size-tiered compaction: which runs to merge, the merge itself (on a pool thread) and the
//! compaction filter that drops values during it.

use std::sync::Arc;

use crate::error::Result;
use crate::iter::{Cursor, MergeIter, Resolve, RunCursor};
use crate::memtable::OpKind;
use crate::run::RunFile;

use super::jobs::{Job, RunOutput, WorkerCtx};
use super::{Db, EngineOptions, SortedRun};

/// What a compaction filter decides for one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterDecision {
    /// Keep the value as it is.
    Keep,
    /// Drop the entry.
    Remove,
    /// Replace the value with the bytes the filter wrote into its output buffer.
    Change,
}

/// Decides, during compaction, whether values survive (drops TTL-expired state).
pub trait CompactionFilter: Send + Sync {
    /// Judges the resolved value of `key`; for [`FilterDecision::Change`] writes the new value
    /// into `out` (empty on entry).
    fn filter(&self, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> FilterDecision;
}

/// Which of the newest runs to merge, given the sizes of the runs no compaction is merging
/// (newest first): `Some(k)` merges runs `0..k`. Once there are `max_runs / 2` runs or more,
/// the newest runs while each next (older) run is at most twice the ones taken so far
/// together: runs of similar sizes (55, 93 and 113 MB after a bulk load) do not stay apart
/// for every point read to probe, at the price of more rewrites (a merge grows a run by half
/// or more, so a byte is rewritten up to about log1.5(data / write buffer) times; with the
/// factor one it was log2); with
/// `max_runs` of them, all but the oldest runs that are each larger than all newer runs
/// together: merging those would rewrite most of the data (at 50M keys, a 6 GB bottom run
/// every few flushes) to remove one run; they join a merge once the newer runs have grown.
pub(super) fn pick_compaction(sizes: &[u64], max_runs: usize) -> Option<usize> {
    let n = sizes.len();
    if n < (max_runs / 2).max(2) {
        return None;
    }
    let mut take = 1;
    let mut sum = sizes[0];
    while take < n && sizes[take] <= 2 * sum {
        sum += sizes[take];
        take += 1;
    }
    if take >= 2 {
        return Some(take);
    }
    if n < max_runs {
        return None;
    }
    let mut all = n;
    while all > 2 && sizes[all - 1] > sizes[..all - 1].iter().sum::<u64>() {
        all -= 1;
    }
    Some(all)
}

impl WorkerCtx {
    pub(super) fn compact(
        &self,
        inputs: &[SortedRun],
        bottommost: bool,
        filter: Option<&Arc<dyn CompactionFilter>>,
        keep: Option<&(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<Arc<RunFile>>> {
        let (start, end) = match keep {
            Some((s, e)) => (s.clone(), Some(e.clone())),
            None => (Vec::new(), None),
        };
        let mut sources: Vec<Box<dyn Cursor>> = Vec::new();
        for r in inputs {
            sources.push(Box::new(RunCursor::new(
                Arc::clone(r),
                &start,
                end.as_deref(),
            )?));
        }
        let resolve = if bottommost {
            Resolve::Bottommost
        } else {
            Resolve::Partial
        };
        let mut it = MergeIter::new(sources, resolve);
        let mut out = RunOutput::compaction(self);
        let mut changed = Vec::new();
        while let Some((kind, key, value)) = it.next()? {
            let mut kind = kind;
            let mut value = value;
            if kind == OpKind::Put {
                if let Some(f) = filter {
                    changed.clear();
                    match f.filter(key, value, &mut changed) {
                        FilterDecision::Keep => {}
                        FilterDecision::Remove if bottommost => continue,
                        FilterDecision::Remove => {
                            kind = OpKind::Delete;
                            value = &[];
                        }
                        FilterDecision::Change => value = &changed,
                    }
                }
            }
            out.add(key, kind, value)?;
        }
        out.finish()
    }
}

impl Db {
    /// Size-tiered compaction of the runs newer than those a running compaction merges (see
    /// [`pick_compaction`]).
    /// Up to [`EngineOptions::COMPACTION_THREADS`] compactions are queued or run at once.
    pub(super) fn maybe_compact(&mut self) -> Result<()> {
        if self.compacting >= EngineOptions::COMPACTION_THREADS {
            return Ok(());
        }
        let n = self
            .runs
            .iter()
            .position(|r| self.busy.iter().any(|b| Arc::ptr_eq(r, b)))
            .unwrap_or(self.runs.len());
        let size = |r: &SortedRun| r.iter().map(|f| f.size()).sum::<u64>();
        let sizes: Vec<u64> = self.runs[..n].iter().map(size).collect();
        match pick_compaction(&sizes, self.opts.max_sorted_runs) {
            Some(take) => self.start_compaction(0..take),
            None => Ok(()),
        }
    }

    pub(super) fn start_compaction(&mut self, runs: std::ops::Range<usize>) -> Result<()> {
        self.compacting += 1;
        let inputs = self.runs[runs.clone()].to_vec();
        self.busy.extend(inputs.iter().cloned());
        let reserved = self.opts.compaction_reserve();
        self.reserved += reserved;
        // The write buffer shrinks now (it rotates sooner), not only after the next flush.
        self.update_buffer_bytes();
        let job = Job::Compact {
            inputs,
            reserved,
            bottommost: runs.end == self.runs.len(),
            filter: self.filter.clone(),
            keep: self.keep.clone(),
        };
        self.send(job)
    }

    /// Flushes, then compacts every sorted run into one (applying the filter and keep range).
    pub fn compact(&mut self) -> Result<()> {
        self.flush()?;
        self.drain()?;
        if !self.runs.is_empty() {
            self.start_compaction(0..self.runs.len())?;
            self.drain()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size-tiered picks: the newest runs while each older one is at most twice those taken;
    /// with `max_runs` runs, all but the oldest runs larger than everything newer together.
    #[test]
    fn compaction_picks_leave_out_runs_larger_than_all_newer_ones() {
        assert_eq!(pick_compaction(&[10, 10], 6), None);
        assert_eq!(pick_compaction(&[10, 10, 10], 6), Some(3));
        assert_eq!(pick_compaction(&[10, 10, 30, 5000], 6), Some(3));
        // Runs of similar sizes (a bulk load's) merge, each older one a bit larger.
        assert_eq!(pick_compaction(&[55, 93, 113], 6), Some(3));
        assert_eq!(pick_compaction(&[10, 21, 40, 5000], 6), None);
        assert_eq!(pick_compaction(&[10, 20, 25, 80, 200, 5000], 6), Some(5));
        // The bottom run joins once the newer runs are half as large together.
        assert_eq!(pick_compaction(&[10, 20, 40, 80, 160, 600], 6), Some(6));
        assert_eq!(pick_compaction(&[10, 20, 40, 80, 160, 700], 6), Some(5));
        // Below `max_runs` runs that grow too fast stay; at `max_runs`, all but the oldest
        // runs larger than all newer ones together, and at least two, are merged.
        assert_eq!(pick_compaction(&[10, 30, 100, 300, 1000], 6), None);
        assert_eq!(pick_compaction(&[10, 30, 100, 300, 1000, 5000], 6), Some(2));
        assert_eq!(pick_compaction(&[10, 25, 30, 300, 1000, 5000], 6), Some(3));
    }
}
