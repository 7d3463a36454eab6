//! The keyed stateful operator: records go to the worker owning their key group, the user's
//! function sees Flowstate keyed state with the current key set, timers fire as the input
//! frontier passes them, and the state is snapshotted at the end of every epoch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use checkpoint::{
    FileRef, KeyedSnapshot, KeyedStateHandle, SnapshotTarget, SubtaskSnapshot, SubtaskState,
};
use state_api::checkpointing::{BackendSnapshot, CheckpointableBackend, SnapshotRequest};
use state_api::{
    assign_to_key_group, operator_index_for_key_group, KeyGroupRange, Namespace, StateSerializer,
    TimeDomain, Timer, TimerServiceDescriptor, TimerServiceHandle,
};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::order::{PartialOrder, Product};
use timely::progress::Antichain;
use timely::ExchangeData;

use crate::ack::{AckMessage, Completion, Uploader};
use crate::committer::Checkpointing;
use crate::error::{Error, Result};
use crate::job::now_millis;
use crate::Time;

/// What the user's function of a keyed operator sees: the backend (current key set), its
/// states, timers, the watermark, and where outputs go.
pub struct KeyedContext<'a, B: CheckpointableBackend, S, N: Namespace, O> {
    backend: &'a mut B,
    states: &'a S,
    timers: &'a TimerServiceHandle<N>,
    watermark: i64,
    output: &'a mut Vec<O>,
}

impl<B: CheckpointableBackend, S, N: Namespace, O> KeyedContext<'_, B, S, N, O> {
    /// The keyed state backend; the current key is the record's (or the timer's).
    pub fn backend(&mut self) -> &mut B {
        self.backend
    }
    /// The states the function registered.
    pub fn states(&self) -> &S {
        self.states
    }
    /// The backend and the states at once.
    pub fn parts(&mut self) -> (&mut B, &S) {
        (self.backend, self.states)
    }
    /// Registers an event-time timer of the current key: it fires once the input frontier's
    /// watermark reaches `timestamp`.
    pub fn register_event_time_timer(
        &mut self,
        namespace: &N,
        timestamp: i64,
    ) -> state_api::Result<()> {
        use state_api::KeyedStateBackendExt;
        self.backend
            .timers(self.timers)
            .register_event_time_timer(namespace, timestamp)
    }
    /// Registers a processing-time timer of the current key (milliseconds since the Unix
    /// epoch by the wall clock).
    pub fn register_processing_time_timer(
        &mut self,
        namespace: &N,
        timestamp: i64,
    ) -> state_api::Result<()> {
        use state_api::KeyedStateBackendExt;
        self.backend
            .timers(self.timers)
            .register_processing_time_timer(namespace, timestamp)
    }
    /// The event-time watermark timers have fired up to.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }
    /// Emits a record on the operator's output.
    pub fn emit(&mut self, record: O) {
        self.output.push(record);
    }
}

/// A keyed operator's logic.
pub trait KeyedFunction<B: CheckpointableBackend>: 'static {
    /// Input records.
    type Input: ExchangeData;
    /// Output records.
    type Output: ExchangeData;
    /// The handles of the states the function registers.
    type States: 'static;
    /// The namespace of its timers.
    type Namespace: Namespace + serde::Serialize + serde::de::DeserializeOwned;
    /// Registers the states on a (possibly restored) backend.
    fn register(&mut self, backend: &mut B) -> state_api::Result<Self::States>;
    /// Handles one record; the current key is the record's.
    fn process(
        &mut self,
        ctx: &mut KeyedContext<'_, B, Self::States, Self::Namespace, Self::Output>,
        record: Self::Input,
    ) -> std::result::Result<(), String>;
    /// Handles a timer that fired; the current key is the timer's.
    fn on_timer(
        &mut self,
        _ctx: &mut KeyedContext<'_, B, Self::States, Self::Namespace, Self::Output>,
        _timer: Timer<B::Key, Self::Namespace>,
    ) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Called once when the input ended (after the last checkpoint): may read the final state
    /// and emit records.
    fn on_end(
        &mut self,
        _ctx: &mut KeyedContext<'_, B, Self::States, Self::Namespace, Self::Output>,
    ) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Options of a keyed operator.
pub struct KeyedOptions<K> {
    /// The operator's stable id (names its state in checkpoints).
    pub name: String,
    /// The serializer whose bytes the backend hashes into key groups (must be the backend's
    /// key serializer: the operator checks that both agree).
    pub key_serializer: Arc<dyn StateSerializer<K>>,
    /// How often processing-time timers are looked at while the input lasts (default
    /// 100 ms); `None`: never (an operator without processing-time timers saves the wake-ups).
    pub processing_time_interval: Option<Duration>,
}

impl<K> std::fmt::Debug for KeyedOptions<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedOptions")
            .field("name", &self.name)
            .field("processing_time_interval", &self.processing_time_interval)
            .finish_non_exhaustive()
    }
}

impl<K> KeyedOptions<K> {
    /// Options for operator `name` hashing keys by `key_serializer`'s bytes; processing-time
    /// timers are looked at every 100 ms.
    pub fn new(name: &str, key_serializer: impl StateSerializer<K>) -> Self {
        KeyedOptions {
            name: name.to_string(),
            key_serializer: Arc::new(key_serializer),
            processing_time_interval: Some(Duration::from_millis(100)),
        }
    }
}

fn key_group_of<K: 'static>(ser: &dyn StateSerializer<K>, key: &K, max_parallelism: u32) -> u32 {
    let mut bytes = Vec::new();
    // A key that does not serialize goes to key group 0; setting it as the current key then
    // reports the serializer's error.
    if ser.serialize(key, &mut bytes).is_err() {
        return 0;
    }
    assign_to_key_group(&bytes, max_parallelism)
}

impl<'scope> Checkpointing<'scope> {
    /// A keyed stateful operator over `input`: each record goes to the worker owning the key
    /// group of `key(record)` (worker `i` of `n` owns `KeyGroupRange::for_operator(max, n, i)`);
    /// `create` makes the worker's backend for its key groups (restored from the job's
    /// checkpoint, reading only those key groups), then `function` registers its states and
    /// handles records and timers.
    pub fn keyed<B, F>(
        &mut self,
        input: Stream<'scope, Time, Vec<F::Input>>,
        options: KeyedOptions<B::Key>,
        key: impl Fn(&F::Input) -> B::Key + Clone + 'static,
        create: impl FnOnce(KeyGroupRange, u32) -> std::result::Result<B, String>,
        mut function: F,
    ) -> Result<Stream<'scope, Time, Vec<F::Output>>>
    where
        B: CheckpointableBackend + 'static,
        F: KeyedFunction<B>,
    {
        let scope = self.scope;
        let job = self.job.clone();
        let index = scope.index() as u32;
        let peers = scope.peers() as u32;
        let op = options.name.clone();
        checkpoint::validate_name("operator id", &op)?;
        let max_parallelism = job.config().max_parallelism;
        state_api::validate_parallelism(max_parallelism, peers)
            .map_err(|e| Error::Cluster(format!("operator '{op}': {e}")))?;
        let range = KeyGroupRange::for_operator(max_parallelism, peers, index)
            .map_err(|e| Error::Cluster(format!("operator '{op}': {e}")))?;
        let user = |reason: String| Error::User {
            operator: op.clone(),
            worker: index as usize,
            reason,
        };
        let state_err = |e: state_api::Error| Error::State {
            operator: op.clone(),
            worker: index as usize,
            source: e,
        };
        let mut backend = create(range, max_parallelism).map_err(user)?;
        if backend.key_group_range() != range || backend.max_parallelism() != max_parallelism {
            return Err(user(format!(
                "the backend owns key groups {} of {}, the operator's worker {index} of {peers} \
                 owns {range} of {max_parallelism}",
                backend.key_group_range(),
                backend.max_parallelism()
            )));
        }
        let incremental = job.config().checkpoint.incremental;
        let mut chain = Chain::default();
        let restored = job.restored();
        // Canonical state is restored into the registered states (its records decoded straight
        // into them, in one pass); native files need a fresh backend, so they come first.
        let register_first = restored.is_none_or(|(_, c)| !c.has_native_state(&op));
        let mut registered = None;
        if register_first {
            registered = Some(register(&mut backend, &mut function).map_err(state_err)?);
        }
        if let Some((storage, c)) = restored {
            let download =
                tempfile::tempdir().map_err(|e| user(format!("temporary directory: {e}")))?;
            c.restore_backend(storage, &op, index, &mut backend, download.path())?;
            // Native files of the restored checkpoint (of this job: in its `shared/`) are
            // referenced by the next checkpoint instead of uploaded again.
            if storage.shared_dir() == job.config().storage.shared_dir() {
                chain.seed_native(c, &op, range);
            }
        }
        let (states, timers) = match registered {
            Some(r) => r,
            None => register(&mut backend, &mut function).map_err(state_err)?,
        };

        let ser = Arc::clone(&options.key_serializer);
        let route_key = key.clone();
        let pact = Exchange::new(move |r: &F::Input| {
            let kg = key_group_of(&*ser, &route_key(r), max_parallelism);
            u64::from(operator_index_for_key_group(max_parallelism, peers, kg))
        });
        let mut builder = OperatorBuilder::new(format!("keyed-{op}"), scope);
        let info = builder.operator_info();
        let activator = scope.activator_for(info.address.clone());
        let sync_activator = scope.worker().sync_activator_for(info.address.to_vec());
        let mut data_in = builder.new_input(input, pact);
        let mut completions = builder.new_input_connection(
            self.completions(),
            Exchange::new(|c: &Completion| u64::from(c.target)),
            Vec::<(usize, Antichain<_>)>::new(),
        );
        // Outputs depend on the records (input 0), never on the completions (input 1), which
        // come around a loop.
        let from_data = || vec![(0usize, Antichain::from_elem(Product::new(0u64, 0i64)))];
        let (data_out, data) = builder.new_output_connection::<Vec<F::Output>, _>(from_data());
        let (ack_out, acks) = builder.new_output_connection::<Vec<AckMessage>, _>(from_data());
        let mut data_out = OutputBuilder::from(data_out);
        let mut ack_out = OutputBuilder::from(ack_out);
        let storage = job.config().storage.clone();
        let mut uploader = Uploader::start(storage.clone(), sync_activator);
        let ser = Arc::clone(&options.key_serializer);
        let processing = options.processing_time_interval;

        builder.build(move |mut caps| {
            let mut ack_cap = caps.pop();
            let mut data_cap = caps.pop();
            let mut next_epoch: u64 = 0;
            let mut stash: BTreeMap<u64, Vec<(i64, F::Input)>> = BTreeMap::new();
            let mut watermark = i64::MIN;
            let mut waiting: Vec<(u64, Capability<Time>)> = Vec::new();
            let mut ended = false;
            let mut out: Vec<F::Output> = Vec::new();
            let mut failed = false;
            move |frontiers| {
                let fail = |reason: String| {
                    job.fail(format!("operator '{op}' worker {index}: {reason}"));
                };
                completions.for_each(|_cap, data| {
                    for c in data.drain(..) {
                        if c.aborted {
                            chain.aborted(c.checkpoint_id);
                            backend.notify_checkpoint_aborted(c.checkpoint_id);
                        } else {
                            chain.completed(c.checkpoint_id);
                            backend.notify_checkpoint_complete(c.checkpoint_id);
                        }
                    }
                });
                for (id, outcome, written) in uploader.finished() {
                    if let Some(state) = written {
                        chain.written(id, state);
                    }
                    if let Some(pos) = waiting.iter().position(|(i, _)| *i == id) {
                        let (_, cap) = waiting.remove(pos);
                        ack_out.activate().session(&cap).give(AckMessage {
                            checkpoint_id: id,
                            operator: op.clone(),
                            subtask: index,
                            parallelism: peers,
                            max_parallelism,
                            source_done: None,
                            outcome,
                        });
                    }
                }
                if failed || job.failure().is_some() {
                    failed = true;
                    data_in.for_each(|_, d| d.clear());
                    data_cap = None;
                    if uploader.pending() == 0 {
                        ack_cap = None;
                        waiting.clear();
                    }
                    return;
                }
                let mut ctx = KeyedContext {
                    backend: &mut backend,
                    states: &states,
                    timers: &timers,
                    watermark,
                    output: &mut out,
                };
                let mut result: std::result::Result<(), String> = Ok(());
                // Records of the open epoch are processed now; later epochs wait for theirs.
                data_in.for_each(|cap, data| {
                    let Some(t) = cap.stamp().elements().first().cloned() else {
                        return;
                    };
                    for r in data.drain(..) {
                        if t.outer <= next_epoch {
                            if result.is_ok() {
                                result = process(&mut function, &mut ctx, &*ser, &key, r);
                            }
                        } else {
                            stash.entry(t.outer).or_default().push((t.inner, r));
                        }
                    }
                });
                let frontier = frontiers[0].frontier();
                let min_epoch = frontier.iter().map(|t| t.outer).min();
                let open = min_epoch.is_some();
                // Every epoch the frontier passed is complete: snapshot it, then open the next.
                while result.is_ok() && min_epoch.is_some_and(|m| next_epoch < m) {
                    let id = job.checkpoint_id(next_epoch);
                    match snapshot(ctx.backend, id, incremental.then_some(&chain)) {
                        Ok(keyed) => {
                            let cap = ack_cap
                                .as_ref()
                                .map(|c| c.delayed(&Product::new(next_epoch, i64::MIN)));
                            let submitted = uploader.submit(
                                SnapshotTarget {
                                    dir: storage.checkpoint_dir(id),
                                    shared_dir: storage.shared_dir(),
                                    checkpoint_id: id,
                                    epoch: job.shared.file_epoch,
                                },
                                SubtaskSnapshot {
                                    operator_id: op.clone(),
                                    subtask: index,
                                    keyed: Some(keyed),
                                    operator_state: None,
                                },
                                peers,
                                max_parallelism,
                            );
                            if let Some(cap) = cap {
                                match submitted {
                                    Ok(()) => waiting.push((id, cap)),
                                    Err(reason) => decline(
                                        &mut ack_out,
                                        &cap,
                                        id,
                                        &op,
                                        index,
                                        peers,
                                        max_parallelism,
                                        reason,
                                    ),
                                }
                            }
                        }
                        Err(reason) => {
                            if let Some(cap) = ack_cap
                                .as_ref()
                                .map(|c| c.delayed(&Product::new(next_epoch, i64::MIN)))
                            {
                                decline(
                                    &mut ack_out,
                                    &cap,
                                    id,
                                    &op,
                                    index,
                                    peers,
                                    max_parallelism,
                                    reason,
                                );
                            }
                        }
                    }
                    next_epoch += 1;
                    if let Some(c) = ack_cap.as_mut() {
                        c.downgrade(&Product::new(next_epoch, i64::MIN));
                    }
                    if let Some(records) = stash.remove(&next_epoch) {
                        for (_, r) in records {
                            if result.is_ok() {
                                result = process(&mut function, &mut ctx, &*ser, &key, r);
                            }
                        }
                    }
                }
                if !open {
                    // The input ended: whatever waits is processed (no epoch closes any more).
                    let rest = std::mem::take(&mut stash);
                    for (_, records) in rest {
                        for (_, r) in records {
                            if result.is_ok() {
                                result = process(&mut function, &mut ctx, &*ser, &key, r);
                            }
                        }
                    }
                }
                // The watermark: the least over the frontier and what waits in the stash.
                let stash_wm = stash.values().flatten().map(|(w, _)| *w).min();
                let frontier_wm = frontier.iter().map(|t| t.inner).min();
                let target = match (frontier_wm, stash_wm) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(w) = target.filter(|w| *w > watermark) {
                    if result.is_ok() {
                        result = fire(&mut function, &mut ctx, w, false);
                    }
                    watermark = w;
                    ctx.watermark = w;
                }
                if let Some(interval) = processing.filter(|_| open) {
                    if result.is_ok() {
                        result = fire(&mut function, &mut ctx, now_millis(), true);
                    }
                    activator.activate_after(interval);
                }
                let end = !open && stash.is_empty() && !ended;
                if end && result.is_ok() {
                    result = function.on_end(&mut ctx);
                    ended = true;
                }
                if let Err(reason) = result {
                    fail(reason);
                    failed = true;
                    activator.activate();
                }
                // Outputs at the least time still possible, then hold only that.
                if let Some(cap) = data_cap.as_mut() {
                    if !out.is_empty() {
                        data_out
                            .activate()
                            .session(&*cap)
                            .give_iterator(out.drain(..));
                    }
                    let eff_epoch = min_epoch.into_iter().chain(stash.keys().copied()).min();
                    if let (Some(e), Some(w)) = (eff_epoch, target) {
                        let t = Product::new(e, w);
                        if cap.time().less_equal(&t) {
                            cap.downgrade(&t);
                        }
                    }
                }
                if ended {
                    data_cap = None;
                    if uploader.pending() == 0 {
                        ack_cap = None;
                    }
                }
            }
        });
        self.register(&options.name, false, acks)?;
        Ok(data)
    }
}

/// Registers the function's states and the operator's timer service on `backend`.
#[allow(clippy::type_complexity)]
fn register<B: CheckpointableBackend, F: KeyedFunction<B>>(
    backend: &mut B,
    function: &mut F,
) -> state_api::Result<(F::States, TimerServiceHandle<F::Namespace>)> {
    let states = function.register(backend)?;
    let timers = backend.register_timer_service(TimerServiceDescriptor::<F::Namespace>::new(
        "flowstate-timers",
    )?)?;
    Ok((states, timers))
}

#[allow(clippy::too_many_arguments)]
fn decline(
    ack_out: &mut OutputBuilder<Time, timely::container::CapacityContainerBuilder<Vec<AckMessage>>>,
    cap: &Capability<Time>,
    id: u64,
    op: &str,
    index: u32,
    peers: u32,
    max_parallelism: u32,
    reason: String,
) {
    ack_out.activate().session(cap).give(AckMessage {
        checkpoint_id: id,
        operator: op.to_string(),
        subtask: index,
        parallelism: peers,
        max_parallelism,
        source_done: None,
        outcome: Err(reason),
    });
}

/// What an operator instance remembers for incremental snapshots: the state handle of the last
/// checkpoint it heard completed (deltas build on it), the backend-native files such
/// checkpoints uploaded (referenced instead of uploaded again), and what it wrote for
/// checkpoints not known complete yet.
#[derive(Default)]
struct Chain {
    base: Option<(u64, KeyedStateHandle)>,
    confirmed: HashMap<String, FileRef>,
    written: BTreeMap<u64, SubtaskState>,
}

impl Chain {
    fn written(&mut self, id: u64, state: SubtaskState) {
        self.written.insert(id, state);
    }

    fn completed(&mut self, id: u64) {
        if let Some(state) = self.written.remove(&id) {
            if let Some(k) = state.keyed {
                self.base = Some((id, k));
            }
            if let Some(n) = state.native {
                for f in n.files {
                    self.confirmed
                        .insert(f.file.location.name().to_string(), f.file);
                }
            }
        }
        self.written.retain(|w, _| *w > id);
    }

    fn aborted(&mut self, id: u64) {
        self.written.remove(&id);
    }

    /// The native files of `operator` in a restored checkpoint that cover key groups of
    /// `range`: they are in the job's `shared/` already.
    fn seed_native(
        &mut self,
        c: &checkpoint::CompletedCheckpoint,
        operator: &str,
        range: KeyGroupRange,
    ) {
        let Some(op) = c.metadata.operator(operator) else {
            return;
        };
        for f in op.native_files_meeting(range) {
            self.confirmed
                .insert(f.file.location.name().to_string(), f.file.clone());
        }
    }
}

/// The synchronous part of a snapshot: a canonical view of every owned key group, or with
/// incremental checkpoints (`chain`) whatever the backend answers to an incremental request —
/// a delta on the last checkpoint this instance heard completed (unless restoring its chain
/// would apply too many deltas), native files (those of completed checkpoints referenced,
/// not uploaded), or canonical streams into `shared/` that start a new chain.
fn snapshot<B: CheckpointableBackend>(
    backend: &mut B,
    id: u64,
    chain: Option<&Chain>,
) -> std::result::Result<KeyedSnapshot, String> {
    let Some(chain) = chain else {
        return match backend.snapshot_for_checkpoint(&SnapshotRequest::canonical(id, 1)) {
            Ok(BackendSnapshot::Canonical(parts)) => Ok(KeyedSnapshot::Full(parts)),
            Ok(other) => Err(format!(
                "the backend answered a canonical snapshot request with a {} snapshot",
                other.kind_name()
            )),
            Err(e) => Err(e.to_string()),
        };
    };
    let base = chain
        .base
        .clone()
        .filter(|(_, h)| !checkpoint::chain_too_long(h));
    let request = SnapshotRequest::incremental(id, base.as_ref().map(|(b, _)| *b), 1);
    match backend.snapshot_for_checkpoint(&request) {
        Ok(BackendSnapshot::Canonical(parts)) => Ok(KeyedSnapshot::Incremental {
            parts,
            changed: backend.key_group_range().iter().collect(),
            base: None,
        }),
        Ok(BackendSnapshot::Delta { parts, replaced }) => match base {
            Some((_, base)) => Ok(KeyedSnapshot::Delta {
                parts,
                replaced,
                base,
            }),
            None => Err("the backend answered with a delta where no base was offered".into()),
        },
        Ok(BackendSnapshot::Native(n)) => {
            if n.backend.is_empty()
                || n.backend.len() > 32
                || !n.backend.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!("invalid native backend id {:?}", n.backend));
            }
            let live: std::collections::BTreeSet<&str> =
                n.files.iter().map(|f| f.name.as_str()).collect();
            let known = chain
                .confirmed
                .iter()
                .filter(|(name, _)| live.contains(name.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(KeyedSnapshot::Native { snapshot: n, known })
        }
        Err(e) => Err(e.to_string()),
    }
}

fn process<B: CheckpointableBackend, F: KeyedFunction<B>>(
    function: &mut F,
    ctx: &mut KeyedContext<'_, B, F::States, F::Namespace, F::Output>,
    ser: &dyn StateSerializer<B::Key>,
    key: &impl Fn(&F::Input) -> B::Key,
    record: F::Input,
) -> std::result::Result<(), String> {
    let k = key(&record);
    let expected = key_group_of(ser, &k, ctx.backend.max_parallelism());
    ctx.backend.set_current_key(k).map_err(|e| e.to_string())?;
    if ctx.backend.current_key_group() != Some(expected) {
        return Err(format!(
            "the operator's key serializer puts a key in key group {expected}, the backend in \
             {:?}: give the operator the backend's key serializer",
            ctx.backend.current_key_group()
        ));
    }
    function.process(ctx, record)
}

fn fire<B: CheckpointableBackend, F: KeyedFunction<B>>(
    function: &mut F,
    ctx: &mut KeyedContext<'_, B, F::States, F::Namespace, F::Output>,
    time: i64,
    processing: bool,
) -> std::result::Result<(), String> {
    let domain = if processing {
        TimeDomain::ProcessingTime
    } else {
        TimeDomain::EventTime
    };
    // One timer at a time (constant memory); timers a firing registers at or before `time`
    // fire in the same round.
    while let Some(t) = ctx
        .backend
        .next_due_timer(ctx.timers, domain, time)
        .map_err(|e| e.to_string())?
    {
        ctx.backend
            .set_current_key(t.key.clone())
            .map_err(|e| e.to_string())?;
        function.on_timer(ctx, t)?;
    }
    Ok(())
}
