//! The checkpoint protocol as plain code: what to do on trigger, acknowledgement, decline,
//! timeout and completion, with no I/O and no clock of its own.
//!
//! [`Protocol`] is fed events (with the current time as a [`Duration`] since any fixed origin)
//! and answers with [`Action`]s that the caller carries out: send barriers, write the metadata,
//! notify subtasks, discard files, fail the job. The [`crate::coordinator`] drives it with real
//! channels and storage; the tests drive it by hand.
//!
//! Semantics follow Flink's `CheckpointCoordinator` with the options of [`CheckpointConfig`]:
//! periodic triggers at `interval`, at most `max_concurrent` pending checkpoints, at least
//! `min_pause` between the end of one checkpoint and the start of the next (which implies one
//! at a time), pending checkpoints expire after `timeout`, a completed checkpoint subsumes older
//! pending ones and the completed ones beyond `retained`, and more than
//! `tolerable_failures` consecutive failures fail the job. Manual triggers and savepoints are
//! forced: they ignore `max_concurrent` and `min_pause`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::error::{Error, Result};

/// What happens to retained checkpoints when the coordinator shuts down (Flink's externalized
/// checkpoint cleanup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetentionOnShutdown {
    /// Delete every checkpoint (Flink's `DELETE_ON_CANCELLATION`).
    #[default]
    Delete,
    /// Keep the retained checkpoints (Flink's `RETAIN_ON_CANCELLATION`).
    Retain,
}

/// Checkpointing options, with Flink's meanings and defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Time between periodic checkpoints; `None` disables periodic checkpoints (default).
    pub interval: Option<Duration>,
    /// A pending checkpoint is aborted after this long (default 10 minutes).
    pub timeout: Duration,
    /// Minimum time between the end of a checkpoint and the trigger of the next (default 0).
    pub min_pause: Duration,
    /// Maximum number of pending checkpoints (default 1).
    pub max_concurrent: usize,
    /// Consecutive failed checkpoints tolerated before the job fails (default 0).
    pub tolerable_failures: u32,
    /// Completed checkpoints kept (default 1).
    pub retained: usize,
    /// Whether retained checkpoints survive a shutdown (default: deleted).
    pub retention_on_shutdown: RetentionOnShutdown,
    /// Incremental keyed snapshots where the backend supports them (default off).
    pub incremental: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval: None,
            timeout: Duration::from_secs(600),
            min_pause: Duration::ZERO,
            max_concurrent: 1,
            tolerable_failures: 0,
            retained: 1,
            retention_on_shutdown: RetentionOnShutdown::Delete,
            incremental: false,
        }
    }
}

impl CheckpointConfig {
    /// Checks the options (Flink's bounds: interval and timeout at least 10 ms).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if let Some(i) = self.interval {
            if i < Duration::from_millis(10) {
                return bad(format!(
                    "checkpoint interval {i:?} is below the minimum of 10 ms"
                ));
            }
        }
        if self.timeout < Duration::from_millis(10) {
            return bad(format!(
                "checkpoint timeout {:?} is below the minimum of 10 ms",
                self.timeout
            ));
        }
        if self.max_concurrent == 0 {
            return bad("max concurrent checkpoints must be at least 1".into());
        }
        if self.retained == 0 {
            return bad("retained checkpoints must be at least 1".into());
        }
        Ok(())
    }

    fn effective_max_concurrent(&self) -> usize {
        if self.min_pause > Duration::ZERO {
            1
        } else {
            self.max_concurrent
        }
    }
}

/// A checkpoint or a savepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    /// A checkpoint (retained per the configuration, may be incremental).
    Checkpoint,
    /// A savepoint (full, canonical, never subsumed or deleted by the coordinator).
    Savepoint,
}

/// Why a pending checkpoint was aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// A subtask declined it.
    Declined {
        /// The subtask.
        task: usize,
        /// Its reason.
        reason: String,
    },
    /// It did not complete within the timeout.
    Expired,
    /// A newer checkpoint completed first.
    Subsumed,
    /// Writing the metadata failed.
    FinalizeFailed(String),
    /// The coordinator shuts down.
    Shutdown,
}

impl AbortReason {
    /// Whether the failure counts against `tolerable_failures` (as in Flink's
    /// `CheckpointFailureManager`: declines, expiry and I/O failures count; subsumption and
    /// shutdown do not).
    pub fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            AbortReason::Declined { .. } | AbortReason::Expired | AbortReason::FinalizeFailed(_)
        )
    }
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortReason::Declined { task, reason } => {
                write!(f, "declined by subtask {task}: {reason}")
            }
            AbortReason::Expired => f.write_str("expired before completing"),
            AbortReason::Subsumed => f.write_str("subsumed by a newer completed checkpoint"),
            AbortReason::FinalizeFailed(r) => write!(f, "writing the metadata failed: {r}"),
            AbortReason::Shutdown => f.write_str("the coordinator shut down"),
        }
    }
}

/// What the caller must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<H> {
    /// Send the barrier of a new checkpoint to every task.
    SendBarrier {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Checkpoint or savepoint.
        kind: CheckpointKind,
    },
    /// Every task acknowledged: write the metadata, then report with
    /// [`Protocol::finalized`].
    Finalize {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Checkpoint or savepoint.
        kind: CheckpointKind,
        /// The acknowledged states, in task order.
        states: Vec<H>,
    },
    /// The checkpoint is complete: notify every task. `subsumed` completed checkpoints are no
    /// longer retained: discard them.
    Completed {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Checkpoint or savepoint.
        kind: CheckpointKind,
        /// Completed checkpoints to discard, oldest first.
        subsumed: Vec<u64>,
    },
    /// The checkpoint was aborted: notify every task and discard `states` (and any partial
    /// files).
    Aborted {
        /// The checkpoint.
        checkpoint_id: u64,
        /// Why.
        reason: AbortReason,
        /// States acknowledged before the abort.
        states: Vec<H>,
    },
    /// A state acknowledged for a checkpoint that is no longer pending: discard it.
    DiscardLate {
        /// The checkpoint.
        checkpoint_id: u64,
        /// The state.
        state: H,
    },
    /// Too many consecutive failures: fail the job.
    FailJob {
        /// Why.
        reason: String,
    },
}

struct Pending<H> {
    kind: CheckpointKind,
    triggered_at: Duration,
    acks: Vec<Option<H>>,
    missing: usize,
    finalizing: bool,
}

/// The coordinator's protocol state machine, generic over the acknowledged state `H`.
pub struct Protocol<H> {
    config: CheckpointConfig,
    tasks: usize,
    next_id: u64,
    pending: BTreeMap<u64, Pending<H>>,
    last_trigger: Option<Duration>,
    last_completion: Option<Duration>,
    consecutive_failures: u32,
    completed: VecDeque<u64>,
    failed: bool,
}

impl<H> std::fmt::Debug for Protocol<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protocol")
            .field("tasks", &self.tasks)
            .field("next_id", &self.next_id)
            .field("pending", &self.pending.keys().collect::<Vec<_>>())
            .field("completed", &self.completed)
            .field("consecutive_failures", &self.consecutive_failures)
            .finish()
    }
}

impl<H> Protocol<H> {
    /// A protocol for `tasks` tasks whose next checkpoint id is `next_id`, with `completed`
    /// already retained checkpoints (oldest first, e.g. found at start-up).
    pub fn new(
        config: CheckpointConfig,
        tasks: usize,
        next_id: u64,
        completed: Vec<u64>,
    ) -> Result<Self> {
        config.validate()?;
        if tasks == 0 {
            return Err(Error::InvalidConfig {
                reason: "a checkpointed job needs at least one task".into(),
            });
        }
        Ok(Protocol {
            config,
            tasks,
            next_id: next_id.max(1),
            pending: BTreeMap::new(),
            last_trigger: None,
            last_completion: None,
            consecutive_failures: 0,
            completed: completed.into(),
            failed: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    /// The id the next triggered checkpoint gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Ids of the pending checkpoints.
    pub fn pending(&self) -> Vec<u64> {
        self.pending.keys().copied().collect()
    }

    /// Ids of the retained completed checkpoints, oldest first.
    pub fn completed(&self) -> Vec<u64> {
        self.completed.iter().copied().collect()
    }

    /// Consecutive failed checkpoints so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// True once the job was failed.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// When [`Protocol::tick`] next has something to do (a periodic trigger or an expiry).
    pub fn next_wakeup(&self) -> Option<Duration> {
        let expiry = self
            .pending
            .values()
            .filter(|p| !p.finalizing)
            .map(|p| p.triggered_at + self.config.timeout)
            .min();
        // A periodic trigger blocked by pending checkpoints waits for an event, not a time.
        let periodic = self.next_periodic().filter(|_| self.has_capacity());
        match (expiry, periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_periodic(&self) -> Option<Duration> {
        let interval = self.config.interval?;
        let mut at = self.last_trigger.map_or(interval, |t| t + interval);
        if let Some(c) = self.last_completion {
            at = at.max(c + self.config.min_pause);
        }
        Some(at)
    }

    fn has_capacity(&self) -> bool {
        !self.failed
            && self
                .pending
                .values()
                .filter(|p| p.kind == CheckpointKind::Checkpoint)
                .count()
                < self.config.effective_max_concurrent()
    }

    fn can_trigger_periodic(&self, now: Duration) -> bool {
        self.has_capacity() && self.next_periodic().is_some_and(|at| now >= at)
    }

    /// Expires overdue checkpoints and triggers a periodic checkpoint when one is due.
    pub fn tick(&mut self, now: Duration) -> Vec<Action<H>> {
        let mut out = Vec::new();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.finalizing && now >= p.triggered_at + self.config.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.abort(id, AbortReason::Expired, &mut out);
        }
        if self.can_trigger_periodic(now) {
            self.start(now, CheckpointKind::Checkpoint, &mut out);
        }
        out
    }

    /// Triggers a checkpoint or savepoint now, ignoring `max_concurrent` and `min_pause`
    /// (Flink's forced checkpoints). Returns its id and the actions.
    pub fn trigger(
        &mut self,
        now: Duration,
        kind: CheckpointKind,
    ) -> Result<(u64, Vec<Action<H>>)> {
        if self.failed {
            return Err(Error::Stopped {
                reason: "the job failed".into(),
            });
        }
        let mut out = Vec::new();
        let id = self.start(now, kind, &mut out);
        Ok((id, out))
    }

    fn start(&mut self, now: Duration, kind: CheckpointKind, out: &mut Vec<Action<H>>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if kind == CheckpointKind::Checkpoint {
            self.last_trigger = Some(now);
        }
        self.pending.insert(
            id,
            Pending {
                kind,
                triggered_at: now,
                acks: (0..self.tasks).map(|_| None).collect(),
                missing: self.tasks,
                finalizing: false,
            },
        );
        out.push(Action::SendBarrier {
            checkpoint_id: id,
            kind,
        });
        id
    }

    /// Task `task` acknowledged checkpoint `id` with `state`.
    pub fn ack(&mut self, id: u64, task: usize, state: H) -> Vec<Action<H>> {
        let mut out = Vec::new();
        let Some(p) = self.pending.get_mut(&id) else {
            out.push(Action::DiscardLate {
                checkpoint_id: id,
                state,
            });
            return out;
        };
        match p.acks.get_mut(task) {
            Some(slot @ None) if !p.finalizing => {
                *slot = Some(state);
                p.missing -= 1;
            }
            // Unknown task, duplicate ack, or ack after finalization started.
            _ => {
                out.push(Action::DiscardLate {
                    checkpoint_id: id,
                    state,
                });
                return out;
            }
        }
        if p.missing == 0 {
            p.finalizing = true;
            let states = p.acks.iter_mut().filter_map(Option::take).collect();
            out.push(Action::Finalize {
                checkpoint_id: id,
                kind: p.kind,
                states,
            });
        }
        out
    }

    /// Task `task` declined checkpoint `id`.
    pub fn decline(&mut self, id: u64, task: usize, reason: String) -> Vec<Action<H>> {
        let mut out = Vec::new();
        if self.pending.get(&id).is_some_and(|p| !p.finalizing) {
            self.abort(id, AbortReason::Declined { task, reason }, &mut out);
        }
        out
    }

    /// The metadata of checkpoint `id` was written (`Ok`) or could not be (`Err(reason)`).
    /// `fatal` failures (fencing) fail the job at once.
    pub fn finalized(
        &mut self,
        now: Duration,
        id: u64,
        result: std::result::Result<(), (String, bool)>,
    ) -> Vec<Action<H>> {
        let mut out = Vec::new();
        let Some(p) = self.pending.get(&id) else {
            return out;
        };
        let kind = p.kind;
        match result {
            Ok(()) => {
                self.pending.remove(&id);
                self.consecutive_failures = 0;
                let mut subsumed = Vec::new();
                if kind == CheckpointKind::Checkpoint {
                    self.last_completion = Some(now);
                    // Older pending checkpoints can never be useful any more.
                    let older: Vec<u64> = self
                        .pending
                        .iter()
                        .filter(|(pid, pp)| {
                            **pid < id && pp.kind == CheckpointKind::Checkpoint && !pp.finalizing
                        })
                        .map(|(pid, _)| *pid)
                        .collect();
                    for pid in older {
                        self.abort(pid, AbortReason::Subsumed, &mut out);
                    }
                    self.completed.push_back(id);
                    while self.completed.len() > self.config.retained {
                        if let Some(old) = self.completed.pop_front() {
                            subsumed.push(old);
                        }
                    }
                }
                out.insert(
                    0,
                    Action::Completed {
                        checkpoint_id: id,
                        kind,
                        subsumed,
                    },
                );
            }
            Err((reason, fatal)) => {
                if fatal {
                    self.pending.remove(&id);
                    out.push(Action::Aborted {
                        checkpoint_id: id,
                        reason: AbortReason::FinalizeFailed(reason.clone()),
                        states: Vec::new(),
                    });
                    self.fail(reason, &mut out);
                } else {
                    self.abort(id, AbortReason::FinalizeFailed(reason), &mut out);
                }
            }
        }
        out
    }

    /// Aborts every pending checkpoint (without counting failures).
    pub fn shutdown(&mut self) -> Vec<Action<H>> {
        let mut out = Vec::new();
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.abort(id, AbortReason::Shutdown, &mut out);
        }
        self.failed = true;
        out
    }

    fn abort(&mut self, id: u64, reason: AbortReason, out: &mut Vec<Action<H>>) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let counts = reason.counts_as_failure() && p.kind == CheckpointKind::Checkpoint;
        let text = reason.to_string();
        out.push(Action::Aborted {
            checkpoint_id: id,
            reason,
            states: p.acks.into_iter().flatten().collect(),
        });
        if counts {
            self.consecutive_failures += 1;
            if self.consecutive_failures > self.config.tolerable_failures {
                self.fail(
                    format!(
                        "{} consecutive checkpoint failures exceed the {} tolerated; last: \
                         checkpoint {id} {text}",
                        self.consecutive_failures, self.config.tolerable_failures
                    ),
                    out,
                );
            }
        }
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Action<H>>) {
        if self.failed {
            return;
        }
        self.failed = true;
        out.push(Action::FailJob { reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config() -> CheckpointConfig {
        CheckpointConfig {
            interval: Some(ms(100)),
            timeout: ms(1000),
            ..Default::default()
        }
    }

    fn barrier_ids(actions: &[Action<u32>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendBarrier { checkpoint_id, .. } => Some(*checkpoint_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn defaults_are_flinks() {
        let c = CheckpointConfig::default();
        assert_eq!(c.timeout, Duration::from_secs(600));
        assert_eq!(c.min_pause, Duration::ZERO);
        assert_eq!(c.max_concurrent, 1);
        assert_eq!(c.tolerable_failures, 0);
        assert_eq!(c.retained, 1);
        assert_eq!(c.retention_on_shutdown, RetentionOnShutdown::Delete);
        assert!(c.validate().is_ok());
        for bad in [
            CheckpointConfig {
                interval: Some(ms(1)),
                ..config()
            },
            CheckpointConfig {
                max_concurrent: 0,
                ..config()
            },
            CheckpointConfig {
                retained: 0,
                ..config()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::InvalidConfig { .. })));
        }
        assert!(Protocol::<u32>::new(config(), 0, 1, vec![]).is_err());
    }

    #[test]
    fn periodic_trigger_acks_finalize_complete() {
        let mut p = Protocol::<u32>::new(config(), 2, 1, vec![]).unwrap();
        assert_eq!(p.next_wakeup(), Some(ms(100)));
        assert!(p.tick(ms(50)).is_empty());
        let a = p.tick(ms(100));
        assert_eq!(barrier_ids(&a), vec![1]);
        // max concurrent 1: no second trigger while 1 is pending.
        assert!(barrier_ids(&p.tick(ms(250))).is_empty());
        assert!(p.ack(1, 0, 10).is_empty());
        let a = p.ack(1, 1, 11);
        assert_eq!(
            a,
            vec![Action::Finalize {
                checkpoint_id: 1,
                kind: CheckpointKind::Checkpoint,
                states: vec![10, 11]
            }]
        );
        // Finalizing checkpoints do not expire.
        assert!(p
            .tick(ms(5000))
            .iter()
            .all(|a| !matches!(a, Action::Aborted { .. })));
        let a = p.finalized(ms(5000), 1, Ok(()));
        assert_eq!(
            a[0],
            Action::Completed {
                checkpoint_id: 1,
                kind: CheckpointKind::Checkpoint,
                subsumed: vec![]
            }
        );
        assert_eq!(p.completed(), vec![1]);
        // The trigger that was due meanwhile happens on the next tick.
        assert_eq!(barrier_ids(&p.tick(ms(5001))), vec![2]);
        p.ack(2, 0, 20);
        p.ack(2, 1, 21);
        let a = p.finalized(ms(5100), 2, Ok(()));
        assert_eq!(
            a[0],
            Action::Completed {
                checkpoint_id: 2,
                kind: CheckpointKind::Checkpoint,
                subsumed: vec![1]
            }
        );
        assert_eq!(p.completed(), vec![2]);
    }

    #[test]
    fn min_pause_delays_the_next_trigger_and_implies_one_at_a_time() {
        let cfg = CheckpointConfig {
            min_pause: ms(500),
            max_concurrent: 3,
            ..config()
        };
        let mut p = Protocol::<u32>::new(cfg, 1, 1, vec![]).unwrap();
        assert_eq!(barrier_ids(&p.tick(ms(100))), vec![1]);
        assert!(barrier_ids(&p.tick(ms(200))).is_empty(), "one at a time");
        p.ack(1, 0, 1);
        p.finalized(ms(210), 1, Ok(()));
        assert_eq!(p.next_wakeup(), Some(ms(710)));
        assert!(barrier_ids(&p.tick(ms(700))).is_empty());
        assert_eq!(barrier_ids(&p.tick(ms(710))), vec![2]);
    }

    #[test]
    fn max_concurrent_allows_overlap_and_completion_subsumes_older_pending() {
        let cfg = CheckpointConfig {
            max_concurrent: 2,
            retained: 2,
            tolerable_failures: 5,
            ..config()
        };
        let mut p = Protocol::<u32>::new(cfg, 1, 7, vec![3, 5]).unwrap();
        assert_eq!(barrier_ids(&p.tick(ms(100))), vec![7]);
        assert_eq!(barrier_ids(&p.tick(ms(200))), vec![8]);
        assert!(barrier_ids(&p.tick(ms(300))).is_empty());
        p.ack(8, 0, 80);
        let a = p.finalized(ms(310), 8, Ok(()));
        assert_eq!(
            a[0],
            Action::Completed {
                checkpoint_id: 8,
                kind: CheckpointKind::Checkpoint,
                subsumed: vec![3]
            }
        );
        assert!(a.contains(&Action::Aborted {
            checkpoint_id: 7,
            reason: AbortReason::Subsumed,
            states: vec![]
        }));
        assert_eq!(p.consecutive_failures(), 0, "subsumption is no failure");
        assert_eq!(p.completed(), vec![5, 8]);
        // A late ack for the subsumed checkpoint is discarded.
        assert_eq!(
            p.ack(7, 0, 70),
            vec![Action::DiscardLate {
                checkpoint_id: 7,
                state: 70
            }]
        );
    }

    #[test]
    fn decline_and_expiry_count_against_tolerable_failures() {
        let cfg = CheckpointConfig {
            tolerable_failures: 1,
            ..config()
        };
        let mut p = Protocol::<u32>::new(cfg, 2, 1, vec![]).unwrap();
        p.tick(ms(100));
        p.ack(1, 0, 10);
        let a = p.decline(1, 1, "disk full".into());
        assert_eq!(
            a,
            vec![Action::Aborted {
                checkpoint_id: 1,
                reason: AbortReason::Declined {
                    task: 1,
                    reason: "disk full".into()
                },
                states: vec![10]
            }]
        );
        assert_eq!(p.consecutive_failures(), 1);
        assert_eq!(barrier_ids(&p.tick(ms(200))), vec![2]);
        assert_eq!(
            p.next_wakeup(),
            Some(ms(1200)),
            "the expiry; the trigger is blocked"
        );
        let a = p.tick(ms(1200));
        assert!(matches!(
            a[0],
            Action::Aborted {
                checkpoint_id: 2,
                reason: AbortReason::Expired,
                ..
            }
        ));
        assert!(matches!(a[1], Action::FailJob { .. }), "{a:?}");
        assert!(p.has_failed());
        assert!(p.tick(ms(5000)).is_empty());
        assert!(p.trigger(ms(5000), CheckpointKind::Checkpoint).is_err());
    }

    #[test]
    fn a_completion_resets_the_failure_count() {
        let cfg = CheckpointConfig {
            tolerable_failures: 1,
            ..config()
        };
        let mut p = Protocol::<u32>::new(cfg, 1, 1, vec![]).unwrap();
        p.tick(ms(100));
        p.decline(1, 0, "x".into());
        p.tick(ms(200));
        p.ack(2, 0, 2);
        p.finalized(ms(210), 2, Ok(()));
        assert_eq!(p.consecutive_failures(), 0);
        p.tick(ms(310));
        let a = p.decline(3, 0, "y".into());
        assert!(!a.iter().any(|a| matches!(a, Action::FailJob { .. })));
    }

    #[test]
    fn default_tolerance_fails_on_the_first_failure_and_fencing_is_fatal() {
        let mut p = Protocol::<u32>::new(config(), 1, 1, vec![]).unwrap();
        p.tick(ms(100));
        p.ack(1, 0, 1);
        let a = p.finalized(ms(110), 1, Err(("fenced".into(), true)));
        assert!(matches!(a[1], Action::FailJob { .. }), "{a:?}");

        let mut p = Protocol::<u32>::new(config(), 1, 1, vec![]).unwrap();
        p.tick(ms(100));
        let a = p.decline(1, 0, "no".into());
        assert!(matches!(a.last(), Some(Action::FailJob { .. })), "{a:?}");
    }

    #[test]
    fn manual_triggers_and_savepoints_are_forced_and_not_retained() {
        let mut p = Protocol::<u32>::new(config(), 1, 1, vec![]).unwrap();
        p.tick(ms(100));
        let (id, a) = p.trigger(ms(101), CheckpointKind::Savepoint).unwrap();
        assert_eq!((id, barrier_ids(&a)), (2, vec![2]));
        let (id3, _) = p.trigger(ms(102), CheckpointKind::Checkpoint).unwrap();
        assert_eq!(id3, 3);
        assert_eq!(p.pending(), vec![1, 2, 3]);
        p.ack(2, 0, 2);
        let a = p.finalized(ms(110), 2, Ok(()));
        assert_eq!(
            a,
            vec![Action::Completed {
                checkpoint_id: 2,
                kind: CheckpointKind::Savepoint,
                subsumed: vec![]
            }]
        );
        assert!(
            p.completed().is_empty(),
            "savepoints are not retained checkpoints"
        );
        assert_eq!(p.pending(), vec![1, 3], "savepoints subsume nothing");
    }

    #[test]
    fn duplicate_and_unknown_acks_are_discarded() {
        let mut p = Protocol::<u32>::new(config(), 2, 1, vec![]).unwrap();
        p.tick(ms(100));
        p.ack(1, 0, 1);
        assert!(matches!(
            p.ack(1, 0, 9)[0],
            Action::DiscardLate { state: 9, .. }
        ));
        assert!(matches!(
            p.ack(1, 5, 9)[0],
            Action::DiscardLate { state: 9, .. }
        ));
        assert!(matches!(
            p.ack(42, 0, 9)[0],
            Action::DiscardLate { state: 9, .. }
        ));
        let a = p.shutdown();
        assert_eq!(
            a,
            vec![Action::Aborted {
                checkpoint_id: 1,
                reason: AbortReason::Shutdown,
                states: vec![1]
            }]
        );
        assert_eq!(p.consecutive_failures(), 0);
    }
}
