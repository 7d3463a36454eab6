//! Replayable sources with splits: per-split offsets are operator state, so a restored job
//! resumes every split exactly where the checkpoint left it, and a job restored at another
//! worker count redistributes the splits evenly.

use std::time::{Duration, Instant};

use checkpoint::{SnapshotTarget, SubtaskSnapshot};
use state_api::{OperatorListStateDescriptor, OperatorStateStore, RedistributionMode};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::Stream;
use timely::order::Product;
use timely::progress::Antichain;
use timely::ExchangeData;

use crate::ack::{AckMessage, Completion, Uploader};
use crate::committer::Checkpointing;
use crate::error::{Error, Result};
use crate::Time;

/// What a read of a split returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The offset to read from next time (it is saved in checkpoints).
    pub next_offset: u64,
    /// True when the split has nothing more.
    pub finished: bool,
}

/// A replayable input made of numbered splits (`0..splits`), each read from an offset.
///
/// Reading split `s` from offset `o` must always give the same records: a restored job reads
/// again from the offsets of its checkpoint.
pub trait SplitReader: 'static {
    /// The records.
    type Item: ExchangeData;
    /// Appends up to `max` records of `split` from `offset` to `out`, each with its event
    /// time (milliseconds), in non-decreasing event time per split up to the
    /// out-of-orderness of the source.
    fn read(
        &mut self,
        split: u32,
        offset: u64,
        max: usize,
        out: &mut Vec<(Self::Item, i64)>,
    ) -> std::result::Result<ReadOutcome, String>;
}

/// Options of a split source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceOptions {
    /// The operator's stable id (names its state in checkpoints).
    pub name: String,
    /// Number of splits; fixed for the life of the job (it is what is redistributed).
    pub splits: u32,
    /// Records read from one split per step of the worker.
    pub batch: usize,
    /// Event-time watermark of a split: the highest event time read minus this.
    pub out_of_orderness: i64,
    /// Watermark of a split read to its end. `i64::MAX` (the default) fires every event-time
    /// timer once all input is read; a job that must stop at a given event time sets it.
    pub end_watermark: i64,
}

impl SourceOptions {
    /// A source named `name` with `splits` splits, batches of 1024, no out-of-orderness.
    pub fn new(name: &str, splits: u32) -> Self {
        SourceOptions {
            name: name.to_string(),
            splits,
            batch: 1024,
            out_of_orderness: 0,
            end_watermark: i64::MAX,
        }
    }
}

/// The state of one split: `(split, next offset, highest event time read, finished)`.
type SplitState = (u32, u64, i64, bool);

fn splits_desc() -> state_api::Result<OperatorListStateDescriptor<SplitState>> {
    OperatorListStateDescriptor::new("source-splits", RedistributionMode::EvenSplit)
}

impl<'scope> Checkpointing<'scope> {
    /// A source reading the splits owned by this worker with `reader`: on a fresh start worker
    /// `i` of `n` reads splits `i, i + n, …`; on restore, the split states of the checkpoint
    /// are redistributed evenly over the workers. The records are stamped with the worker's
    /// epoch and watermark; the source closes an epoch every checkpoint interval and once all
    /// its splits are read, and stops when the committer reports the last checkpoint.
    pub fn split_source<R: SplitReader>(
        &mut self,
        options: SourceOptions,
        mut reader: R,
    ) -> Result<Stream<'scope, Time, Vec<R::Item>>> {
        let scope = self.scope;
        let job = self.job.clone();
        let index = scope.index() as u32;
        let peers = scope.peers() as u32;
        let op = options.name.clone();
        let state_err = |e: state_api::Error| Error::State {
            operator: op.clone(),
            worker: index as usize,
            source: e,
        };
        if options.splits == 0 || options.batch == 0 {
            return Err(Error::Cluster(format!(
                "source '{op}' needs at least one split and a batch of at least one record"
            )));
        }
        let desc = splits_desc().map_err(state_err)?;
        let mut splits: Vec<SplitState> = match job.restored() {
            // A split read to its end may have more now (a longer input): the reader says.
            Some((_, c)) => c
                .operator_state(&op, index, peers)?
                .list_state(&desc)
                .and_then(|l| l.get())
                .map_err(state_err)?
                .into_iter()
                .map(|(s, o, t, _)| (s, o, t, false))
                .collect(),
            None => (0..options.splits)
                .filter(|s| s % peers == index)
                .map(|s| (s, 0, i64::MIN, false))
                .collect(),
        };
        if let Some(bad) = splits.iter().find(|s| s.0 >= options.splits) {
            return Err(Error::Cluster(format!(
                "source '{op}': the checkpoint holds split {} but the source has {} splits",
                bad.0, options.splits
            )));
        }
        splits.sort_unstable();

        let mut builder = OperatorBuilder::new(format!("source-{op}"), scope);
        let info = builder.operator_info();
        let activator = scope.activator_for(info.address.clone());
        let sync_activator = scope.worker().sync_activator_for(info.address.to_vec());
        let mut completions = builder.new_input_connection(
            self.completions(),
            Exchange::new(|c: &Completion| u64::from(c.target)),
            Vec::<(usize, Antichain<_>)>::new(),
        );
        // The completions do not hold back either output (they come around a loop).
        let none = Vec::<(usize, Antichain<_>)>::new;
        let (data_out, data) = builder.new_output_connection::<Vec<R::Item>, _>(none());
        let (ack_out, acks) = builder.new_output_connection::<Vec<AckMessage>, _>(none());
        let mut data_out = OutputBuilder::from(data_out);
        let mut ack_out = OutputBuilder::from(ack_out);
        let storage = job.config().storage.clone();
        let interval = job.config().checkpoint.interval;
        let max_concurrent = job.config().checkpoint.max_concurrent.max(1);
        let min_pause = job.config().checkpoint.min_pause;
        let max_parallelism = job.config().max_parallelism;
        let mut uploader = Uploader::start(storage.clone(), sync_activator);

        builder.build(move |mut caps| {
            let mut ack_cap = caps.pop();
            let mut data_cap = caps.pop();
            let mut epoch: u64 = 0;
            let mut watermark = i64::MIN;
            let mut next_close = interval.map(|i| Instant::now() + i);
            let mut closed_done = false;
            // Checkpoints this source closed that are neither completed nor aborted yet: as
            // the coordinator of one process does, a new one starts only when fewer than
            // `max_concurrent` are pending and `min_pause` passed since the last one ended.
            let mut outstanding: std::collections::BTreeSet<u64> = Default::default();
            let mut finished_at: Option<Instant> = None;
            let mut last = false;
            let mut waiting: Vec<(u64, timely::dataflow::operators::Capability<Time>, bool)> =
                Vec::new();
            let mut buf = Vec::new();
            move |_frontiers| {
                completions.for_each(|_cap, data| {
                    for c in data.drain(..) {
                        let c: Completion = c;
                        if c.last && !c.aborted {
                            tracing::debug!(operator = %op, worker = index, "the last checkpoint completed: the source stops");
                            last = true;
                        }
                        if c.aborted {
                            outstanding.remove(&c.checkpoint_id);
                        } else {
                            outstanding.retain(|i| *i > c.checkpoint_id);
                        }
                        finished_at = Some(Instant::now());
                    }
                });
                // Finished uploads become acknowledgements.
                for (id, outcome, _) in uploader.finished() {
                    if let Some(pos) = waiting.iter().position(|(i, _, _)| *i == id) {
                        let (_, cap, done) = waiting.remove(pos);
                        ack_out.activate().session(&cap).give(AckMessage {
                            checkpoint_id: id,
                            operator: op.clone(),
                            subtask: index,
                            parallelism: peers,
                            max_parallelism,
                            source_done: Some(done),
                            outcome,
                        });
                    }
                }
                if last || job.failure().is_some() {
                    data_cap = None;
                    if uploader.pending() == 0 {
                        ack_cap = None;
                        waiting.clear();
                    }
                    return;
                }
                let (Some(dcap), Some(acap)) = (data_cap.as_mut(), ack_cap.as_mut()) else {
                    return;
                };
                // Read a batch of every unfinished split.
                let mut out = data_out.activate();
                for s in splits.iter_mut().filter(|s| !s.3) {
                    buf.clear();
                    match reader.read(s.0, s.1, options.batch, &mut buf) {
                        Ok(r) => {
                            let mut session = out.session(&*dcap);
                            for (item, ts) in buf.drain(..) {
                                s.2 = s.2.max(ts);
                                session.give(item);
                            }
                            s.1 = r.next_offset;
                            s.3 = r.finished;
                        }
                        Err(reason) => {
                            job.fail(
                                Error::Source {
                                    operator: op.clone(),
                                    worker: index as usize,
                                    split: s.0,
                                    reason,
                                }
                                .to_string(),
                            );
                            return;
                        }
                    }
                }
                drop(out);
                // The watermark: the least over unfinished splits.
                let all_done = splits.iter().all(|s| s.3);
                let w = splits
                    .iter()
                    .map(|s| {
                        if s.3 {
                            options.end_watermark
                        } else {
                            s.2.saturating_sub(options.out_of_orderness)
                        }
                    })
                    .min()
                    .unwrap_or(options.end_watermark);
                watermark = watermark.max(w);
                // Close the epoch at the interval, and once when every split is read.
                let due = next_close.is_some_and(|t| Instant::now() >= t);
                let free = outstanding.len() < max_concurrent
                    && finished_at.is_none_or(|t| t.elapsed() >= min_pause);
                if free && (due || (all_done && !closed_done)) {
                    if all_done {
                        closed_done = true;
                    }
                    let id = job.checkpoint_id(epoch);
                    tracing::debug!(operator = %op, worker = index, epoch, checkpoint = id, all_done, "source closes its epoch");
                    let mut store = OperatorStateStore::new();
                    let snapshot = store
                        .list_state(&desc)
                        .and_then(|mut l| l.update(&splits))
                        .map(|_| store);
                    let submitted = match snapshot {
                        Ok(store) => uploader.submit(
                            SnapshotTarget {
                                dir: storage.checkpoint_dir(id),
                                shared_dir: storage.shared_dir(),
                                checkpoint_id: id,
                                epoch: job.shared.file_epoch,
                            },
                            SubtaskSnapshot {
                                operator_id: op.clone(),
                                subtask: index,
                                keyed: None,
                                operator_state: Some(store),
                            },
                            peers,
                            max_parallelism,
                        ),
                        Err(e) => Err(e.to_string()),
                    };
                    let cap = acap.delayed(&Product::new(epoch, i64::MIN));
                    match submitted {
                        Ok(()) => {
                            waiting.push((id, cap, all_done));
                            outstanding.insert(id);
                        }
                        Err(reason) => {
                            ack_out.activate().session(&cap).give(AckMessage {
                                checkpoint_id: id,
                                operator: op.clone(),
                                subtask: index,
                                parallelism: peers,
                                max_parallelism,
                                source_done: Some(false),
                                outcome: Err(reason),
                            });
                        }
                    }
                    epoch += 1;
                    acap.downgrade(&Product::new(epoch, i64::MIN));
                    // Once everything is read, epochs keep closing (at least every second) until
                    // one of them is committed as the last checkpoint.
                    next_close = interval
                        .or(all_done.then_some(Duration::from_secs(1)))
                        .map(|i| Instant::now() + i);
                }
                dcap.downgrade(&Product::new(epoch, watermark));
                if all_done {
                    // Nothing to read: wake up for the next epoch or a completion.
                    activator.activate_after(
                        interval.unwrap_or(Duration::from_millis(100)).min(Duration::from_millis(100)),
                    );
                } else {
                    activator.activate();
                }
            }
        });
        self.register(&options.name, true, acks)?;
        Ok(data)
    }
}
