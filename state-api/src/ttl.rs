//! Time-to-live for keyed state, with Flink's options, and the clock it reads.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The time source for TTL. Inject a [`ManualClock`] in tests.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch (or any fixed origin; only differences matter).
    fn now_millis(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `millis`.
    pub fn new(millis: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(millis)))
    }

    /// Sets the time.
    pub fn set(&self, millis: i64) {
        self.0.store(millis, Ordering::SeqCst);
    }

    /// Moves the time forward by `millis`.
    pub fn advance(&self, millis: i64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// When the last-access timestamp of an entry is refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TtlUpdateType {
    /// On creation and on every write.
    OnCreateAndWrite,
    /// On creation, every write and every read.
    OnReadAndWrite,
}

/// Whether an expired entry that is still stored may be returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TtlVisibility {
    /// Expired entries are never returned.
    NeverReturnExpired,
    /// An expired entry is returned if it has not been cleaned up yet (it is removed as it is read).
    ReturnExpiredIfNotCleanedUp,
}

/// Incremental cleanup: every state access also checks up to `cleanup_size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IncrementalCleanup {
    /// Entries checked per trigger.
    pub cleanup_size: usize,
    /// Also trigger on every record processed (every `set_current_key`), not only on state access.
    pub run_for_every_record: bool,
}

/// TTL configuration of one state (Flink's `StateTtlConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateTtlConfig {
    ttl: Duration,
    update_type: TtlUpdateType,
    visibility: TtlVisibility,
    cleanup_full_snapshot: bool,
    incremental: Option<IncrementalCleanup>,
    cleanup_in_compaction: bool,
}

impl StateTtlConfig {
    /// Entries expire `ttl` after their last create/write; expired entries are never returned.
    pub fn new(ttl: Duration) -> Self {
        StateTtlConfig {
            ttl,
            update_type: TtlUpdateType::OnCreateAndWrite,
            visibility: TtlVisibility::NeverReturnExpired,
            cleanup_full_snapshot: false,
            incremental: None,
            cleanup_in_compaction: true,
        }
    }

    /// Sets when the timestamp is refreshed.
    pub fn update_type(mut self, update_type: TtlUpdateType) -> Self {
        self.update_type = update_type;
        self
    }

    /// Sets whether expired-but-present entries may be returned.
    pub fn visibility(mut self, visibility: TtlVisibility) -> Self {
        self.visibility = visibility;
        self
    }

    /// Drops expired entries from full snapshots.
    pub fn cleanup_full_snapshot(mut self) -> Self {
        self.cleanup_full_snapshot = true;
        self
    }

    /// Checks `cleanup_size` entries on every state access (and every record, if asked).
    pub fn cleanup_incrementally(
        mut self,
        cleanup_size: usize,
        run_for_every_record: bool,
    ) -> Self {
        self.incremental = Some(IncrementalCleanup {
            cleanup_size,
            run_for_every_record,
        });
        self
    }

    /// Whether backends with compaction (state-mmap) drop expired entries while compacting.
    pub fn cleanup_in_compaction(mut self, enabled: bool) -> Self {
        self.cleanup_in_compaction = enabled;
        self
    }

    /// The time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The time to live in milliseconds (saturating).
    pub fn ttl_millis(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// When timestamps are refreshed.
    pub fn get_update_type(&self) -> TtlUpdateType {
        self.update_type
    }

    /// Whether expired entries may be returned.
    pub fn get_visibility(&self) -> TtlVisibility {
        self.visibility
    }

    /// Whether full snapshots drop expired entries.
    pub fn is_cleanup_full_snapshot(&self) -> bool {
        self.cleanup_full_snapshot
    }

    /// Incremental cleanup settings, if enabled.
    pub fn incremental_cleanup(&self) -> Option<IncrementalCleanup> {
        self.incremental
    }

    /// Whether compaction drops expired entries.
    pub fn is_cleanup_in_compaction(&self) -> bool {
        self.cleanup_in_compaction
    }

    /// True when an entry last stamped at `timestamp` has expired at `now`.
    #[inline]
    pub fn is_expired(&self, timestamp: i64, now: i64) -> bool {
        timestamp.saturating_add(self.ttl_millis()) <= now
    }

    /// True when reads refresh the timestamp.
    #[inline]
    pub fn refresh_on_read(&self) -> bool {
        self.update_type == TtlUpdateType::OnReadAndWrite
    }

    /// True when expired entries may still be returned.
    #[inline]
    pub fn returns_expired(&self) -> bool {
        self.visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_boundary_and_clock() {
        let c = StateTtlConfig::new(Duration::from_millis(100));
        assert!(!c.is_expired(1000, 1099));
        assert!(c.is_expired(1000, 1100));
        assert!(!StateTtlConfig::new(Duration::MAX).is_expired(i64::MAX - 1, i64::MAX - 1));
        let clock = ManualClock::new(5);
        let other = clock.clone();
        clock.advance(10);
        assert_eq!(other.now_millis(), 15);
        assert!(SystemClock.now_millis() > 1_600_000_000_000);
    }
}
