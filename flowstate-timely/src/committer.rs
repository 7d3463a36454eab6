//! The committer: worker 0 collects every operator's state handle for a checkpoint, writes
//! `_metadata` through the fenced commit log, and sends the completion back to every worker.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use checkpoint::{
    assemble_operators, commit_checkpoint, discard_checkpoint_dir, CheckpointMetadata, CommitLog,
    CompletedCheckpoint, SharedStateRegistry, SubtaskAck,
};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::Concatenate;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback};
use timely::dataflow::{Scope, Stream};
use timely::order::Product;

use crate::ack::{decode_state, AckMessage, Completion};
use crate::job::{now_millis, Job};
use crate::Time;

/// Builds the checkpointing part of a dataflow: every source and keyed operator made with it
/// sends its state handles to the committer, and receives the completions.
///
/// Make one per dataflow with [`Checkpointing::new`], build the sources and operators, then
/// call [`Checkpointing::finish`].
pub struct Checkpointing<'scope> {
    pub(crate) job: Job,
    pub(crate) scope: Scope<'scope, Time>,
    handle: timely::dataflow::operators::core::feedback::Handle<'scope, Time, Vec<Completion>>,
    completions: Stream<'scope, Time, Vec<Completion>>,
    acks: Vec<Stream<'scope, Time, Vec<AckMessage>>>,
    operators: Vec<(String, bool)>,
}

impl<'scope> Checkpointing<'scope> {
    /// Starts the checkpointing part of a dataflow in `scope`.
    pub fn new(scope: Scope<'scope, Time>, job: &Job) -> Self {
        // Completions go around a loop: one epoch later, to operators whose outputs do not
        // depend on them.
        let (handle, completions) = scope.feedback(Product::new(1, 0));
        Checkpointing {
            job: job.clone(),
            scope,
            handle,
            completions,
            acks: Vec::new(),
            operators: Vec::new(),
        }
    }

    /// The job.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// The scope.
    pub fn scope(&self) -> Scope<'scope, Time> {
        self.scope
    }

    pub(crate) fn completions(&self) -> Stream<'scope, Time, Vec<Completion>> {
        self.completions.clone()
    }

    pub(crate) fn register(
        &mut self,
        operator: &str,
        source: bool,
        acks: Stream<'scope, Time, Vec<AckMessage>>,
    ) -> Result<(), crate::Error> {
        checkpoint::validate_name("operator id", operator)?;
        if self.operators.iter().any(|(o, _)| o == operator) {
            return Err(crate::Error::Cluster(format!(
                "two operators are named '{operator}'"
            )));
        }
        self.operators.push((operator.to_string(), source));
        self.acks.push(acks);
        Ok(())
    }

    /// Builds the committer (it works on worker 0) and closes the completion loop.
    pub fn finish(self) {
        let Checkpointing {
            job,
            scope,
            handle,
            acks,
            operators,
            ..
        } = self;
        let acks = scope.concatenate(acks);
        let peers = scope.peers() as u32;
        let index = scope.index();
        let mut builder = OperatorBuilder::new("flowstate-committer".into(), scope);
        let info = builder.operator_info();
        let activator = scope.activator_for(info.address.clone());
        let mut input = builder.new_input(acks, Exchange::new(|_: &AckMessage| 0u64));
        let (output, completions) = builder.new_output::<Vec<Completion>>();
        let mut output = OutputBuilder::from(output);
        let mut committer = Committer::new(job, operators, peers, index == 0);
        builder.build(move |_caps| {
            move |frontiers| {
                input.for_each(|cap, data| {
                    for m in data.drain(..) {
                        let Some(time) = cap.stamp().elements().first().cloned() else {
                            continue;
                        };
                        let held = cap.delayed(&time, 0);
                        committer.receive(m, held);
                    }
                });
                let mut out = output.activate();
                for (cap, completions) in committer.progress() {
                    out.session(&cap).give_iterator(completions.into_iter());
                }
                if frontiers[0].is_empty() {
                    // The job ended: what never completed (epochs closed after the last
                    // checkpoint) goes, and the shared files no retained checkpoint uses.
                    for id in std::mem::take(&mut committer.pending).into_keys() {
                        let _ = discard_checkpoint_dir(&committer.job.config().storage, id);
                    }
                    committer.delete_released();
                } else if !committer.pending.is_empty() {
                    activator.activate_after(Duration::from_millis(100));
                }
            }
        });
        completions.connect_loop(handle);
    }
}

/// Deletes the files in `shared/` that `registry` holds no reference to.
fn delete_unreferenced(storage: &checkpoint::CheckpointStorage, registry: &SharedStateRegistry) {
    let files = match storage.list(&storage.shared_dir()) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the shared files");
            return;
        }
    };
    for o in files {
        if let Some(name) = o.location.filename() {
            if registry.references(name) == 0 {
                if let Err(e) = storage.delete(&o.location) {
                    tracing::warn!(file = %name, error = %e, "could not delete a shared file");
                }
            }
        }
    }
}

struct Pending {
    cap: Capability<Time>,
    started: Instant,
    acks: BTreeMap<(String, u32), SubtaskAck>,
    sources_done: usize,
    failed: Option<String>,
}

struct Committer {
    job: Job,
    operators: Vec<(String, bool)>,
    peers: u32,
    log: Option<CommitLog>,
    pending: BTreeMap<u64, Pending>,
    /// The retained checkpoints, oldest first (those of earlier runs too).
    committed: VecDeque<(u64, CheckpointMetadata)>,
    /// References of the retained checkpoints to files in `shared/` (incremental checkpoints).
    registry: SharedStateRegistry,
    last_committed: u64,
    /// Checkpoints aborted above the last committed one: late handles for them are ignored.
    aborted: std::collections::BTreeSet<u64>,
    failures: u32,
}

impl Committer {
    fn new(job: Job, operators: Vec<(String, bool)>, peers: u32, active: bool) -> Self {
        // Worker 0 claimed the job when the run started (fencing every committer of an
        // earlier run); its committer takes the claim.
        let log = if active {
            let claim = job.shared.claim.lock().ok().and_then(|mut c| c.take());
            if claim.is_none() {
                job.fail("the committer holds no claim on the job".into());
            }
            claim
        } else {
            None
        };
        // The retained checkpoints of earlier runs: retention goes on with them, and the files
        // in `shared/` they use stay until no retained checkpoint does.
        let mut committed = VecDeque::new();
        let mut registry = SharedStateRegistry::new();
        if log.is_some() {
            let storage = &job.config().storage;
            let retained = job.config().checkpoint.retained.max(1);
            match CompletedCheckpoint::retained(storage, retained) {
                Ok(found) => {
                    for c in found {
                        registry.register(&c.metadata);
                        committed.push_back((c.metadata.checkpoint_id, c.metadata));
                    }
                    if let Some((s, c)) = job.restored() {
                        if s.shared_dir() == storage.shared_dir() {
                            registry.register(&c.metadata);
                        }
                    }
                    // Files of earlier runs no retained checkpoint uses (discarded or aborted
                    // checkpoints; an earlier run is fenced by now). No worker of this run has
                    // written anything yet: its first epoch cannot end before this worker runs.
                    delete_unreferenced(storage, &registry);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not read the retained checkpoints: earlier runs' are left alone"
                ),
            }
        }
        Committer {
            job,
            operators,
            peers,
            log,
            pending: BTreeMap::new(),
            committed,
            registry,
            last_committed: 0,
            aborted: Default::default(),
            failures: 0,
        }
    }

    fn receive(&mut self, m: AckMessage, cap: Capability<Time>) {
        let id = m.checkpoint_id;
        if id <= self.last_committed || self.aborted.contains(&id) {
            return;
        }
        let p = self.pending.entry(id).or_insert_with(|| Pending {
            cap,
            started: Instant::now(),
            acks: BTreeMap::new(),
            sources_done: 0,
            failed: None,
        });
        if m.source_done == Some(true) {
            p.sources_done += 1;
        }
        match &m.outcome {
            Err(reason) => {
                p.failed.get_or_insert_with(|| {
                    format!("'{}' worker {} declined: {reason}", m.operator, m.subtask)
                });
            }
            Ok(bytes) => match decode_state(&m, bytes) {
                Ok(ack) => {
                    p.acks.insert((m.operator.clone(), m.subtask), ack);
                }
                Err(e) => {
                    p.failed.get_or_insert_with(|| e.to_string());
                }
            },
        }
    }

    /// Commits what is complete, aborts what failed or timed out; the notifications to send.
    fn progress(&mut self) -> Vec<(Capability<Time>, Vec<Completion>)> {
        let mut out = Vec::new();
        let expected = self.operators.len() * self.peers as usize;
        let sources = self.operators.iter().filter(|(_, s)| *s).count() * self.peers as usize;
        let timeout = self.job.config().checkpoint.timeout;
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            let failed = p.failed.clone().or_else(|| {
                (p.started.elapsed() > timeout && p.acks.len() < expected).then(|| {
                    format!(
                        "timed out after {:?} with {} of {expected} state handles",
                        timeout,
                        p.acks.len()
                    )
                })
            });
            if failed.is_none() && p.acks.len() < expected {
                continue;
            }
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            if let Some(reason) = failed {
                self.abort(id, &reason);
                out.push(self.notify(p.cap, id, false, true));
                continue;
            }
            let last = p.sources_done == sources;
            match self.commit(id, p.acks.into_values().collect(), p.started) {
                Ok(()) => {
                    self.failures = 0;
                    if last {
                        self.job.set_final(id);
                    }
                    out.push(self.notify(p.cap, id, last, false));
                    // Older checkpoints still pending are subsumed.
                    let older: Vec<u64> = self.pending.range(..id).map(|(k, _)| *k).collect();
                    for o in older {
                        if let Some(old) = self.pending.remove(&o) {
                            self.abort(o, &format!("subsumed by checkpoint {id}"));
                            out.push(self.notify(old.cap, o, false, true));
                        }
                    }
                }
                Err(e) if e.is_fenced() => {
                    self.job.fail(format!("the committer was fenced: {e}"));
                    return out;
                }
                Err(e) => {
                    self.abort(id, &e.to_string());
                    out.push(self.notify(p.cap, id, false, true));
                }
            }
        }
        out
    }

    /// The notification of checkpoint `id` for every worker.
    fn notify(
        &self,
        cap: Capability<Time>,
        id: u64,
        last: bool,
        aborted: bool,
    ) -> (Capability<Time>, Vec<Completion>) {
        let all = (0..self.peers)
            .map(|target| Completion {
                target,
                checkpoint_id: id,
                last,
                aborted,
            })
            .collect();
        (cap, all)
    }

    fn commit(
        &mut self,
        id: u64,
        acks: Vec<SubtaskAck>,
        started: Instant,
    ) -> checkpoint::Result<()> {
        let storage = &self.job.config().storage;
        let Some(log) = self.log.as_mut() else {
            return Err(checkpoint::Error::InvalidConfig {
                reason: "the committer holds no claim on the job".into(),
            });
        };
        let operators = assemble_operators(acks)?;
        let duration = started.elapsed().as_millis() as u64;
        let completed =
            commit_checkpoint(storage, log, id, now_millis(), Some(duration), operators)?;
        tracing::info!(checkpoint = id, millis = duration, "checkpoint completed");
        self.last_committed = id;
        self.aborted = self.aborted.split_off(&id);
        self.job.push_completed(id);
        self.registry.register(&completed.metadata);
        self.committed.push_back((id, completed.metadata));
        let retained = self.job.config().checkpoint.retained.max(1);
        while self.committed.len() > retained {
            if let Some((old, metadata)) = self.committed.pop_front() {
                // Its shared files that no retained checkpoint uses go at the end of the run.
                self.registry.unregister(&metadata, u64::MAX);
                if let Err(e) = discard_checkpoint_dir(storage, old) {
                    tracing::warn!(checkpoint = old, error = %e, "could not delete an old checkpoint");
                }
            }
        }
        if let Some((oldest, _)) = self.committed.front() {
            if let Err(e) = log.prune(*oldest) {
                tracing::warn!(error = %e, "could not prune the commit log");
            }
        }
        Ok(())
    }

    /// Deletes the shared files of checkpoints no longer retained. Only when no snapshot can
    /// come any more (the end of the run): a worker that has not heard of the latest
    /// completion yet may build its next snapshot on an older checkpoint's files.
    fn delete_released(&mut self) {
        let storage = &self.job.config().storage;
        for name in self.registry.take_deletable(None) {
            let path = storage.shared_dir().join(name.as_str());
            if let Err(e) = storage.delete(&path) {
                tracing::warn!(file = %name, error = %e, "could not delete a shared file");
            }
        }
    }

    fn abort(&mut self, id: u64, reason: &str) {
        tracing::warn!(checkpoint = id, %reason, "checkpoint aborted");
        self.aborted.insert(id);
        if let Err(e) = discard_checkpoint_dir(&self.job.config().storage, id) {
            tracing::debug!(checkpoint = id, error = %e, "could not delete an aborted checkpoint");
        }
        if reason.starts_with("subsumed") {
            return;
        }
        self.failures += 1;
        let tolerable = self.job.config().checkpoint.tolerable_failures;
        if self.failures > tolerable {
            self.job.fail(format!(
                "{} consecutive checkpoints failed (tolerable: {tolerable}); the last, \
                 checkpoint {id}: {reason}",
                self.failures
            ));
        }
    }
}
