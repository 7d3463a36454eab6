//! Restore: snapshot streams read block by block (a block holds one key group's records of
//! every state), records of registered states decoded straight into their tables — on several
//! threads, each owning a disjoint share of the key groups — and the blocks of states not
//! registered yet kept whole until their registration decodes them (in parallel as well).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use state_api::snapshot::{record_state, KeyGroupBlock, RawRecord, RestoreVisitor, SnapshotHeader};
use state_api::*;

use crate::table::{ErasedTable, PartSink};

/// The blocks of one restored stream, kept for the states that were not registered when it was
/// read (and for timer services): checksum verified and their records checked, in key-group
/// order. They hold the stream's bytes as read: no copy per record.
pub(crate) struct StreamBlocks {
    stream: String,
    max_parallelism: u32,
    /// States in the stream's header.
    states: usize,
    blocks: Vec<Arc<KeyGroupBlock>>,
}

/// The restored records of one state from one stream, waiting for the state's registration (or
/// carried into snapshots while it is not registered).
pub(crate) struct PendingChunk {
    pub stream: String,
    pub meta: StateMeta,
    pub key_serializer: SerializerSnapshot,
    /// The state's index in its stream's header (records name their state by it).
    state_index: u32,
    blocks: Arc<StreamBlocks>,
}

impl PendingChunk {
    /// The records with their key groups, in the order they were read.
    pub(crate) fn records(&self) -> impl Iterator<Item = Result<(u32, RawRecord<'_>)>> {
        self.blocks
            .blocks
            .iter()
            .flat_map(move |b| self.records_in(b).map(move |r| r.map(|r| (b.key_group, r))))
    }

    /// The records of key group `kg`.
    pub(crate) fn records_of(&self, kg: u32) -> impl Iterator<Item = Result<RawRecord<'_>>> {
        let blocks = &self.blocks.blocks;
        let from = blocks.partition_point(|b| b.key_group < kg);
        blocks[from..]
            .iter()
            .take_while(move |b| b.key_group == kg)
            .flat_map(move |b| self.records_in(b))
    }

    fn records_in<'a>(
        &'a self,
        b: &'a KeyGroupBlock,
    ) -> impl Iterator<Item = Result<RawRecord<'a>>> + 'a {
        let idx = self.state_index;
        b.records(&self.blocks.stream, self.blocks.max_parallelism)
            .filter(move |r| r.as_ref().map_or(true, |r| r.state_index == idx))
    }
}

/// Collects the blocks of the states a visitor does not decode directly.
pub(crate) struct Collect {
    pub range: KeyGroupRange,
    /// Pending chunks of the streams read so far, by state name.
    pub chunks: Vec<(StateName, PendingChunk)>,
    /// The current stream: its header, which states are collected, and its blocks so far.
    current: Option<Current>,
}

struct Current {
    stream: String,
    header: SnapshotHeader,
    collected: Vec<bool>,
    blocks: Vec<Arc<KeyGroupBlock>>,
}

impl Collect {
    pub fn new(range: KeyGroupRange) -> Self {
        Collect {
            range,
            chunks: Vec::new(),
            current: None,
        }
    }

    /// Starts a stream whose states with `collected[i]` true are kept.
    fn begin(&mut self, stream: &str, header: &SnapshotHeader, collected: Vec<bool>) {
        self.finish_stream();
        self.current = Some(Current {
            stream: stream.to_string(),
            header: header.clone(),
            collected,
            blocks: Vec::new(),
        });
    }

    /// True when the current stream has states to keep.
    fn collects(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.collected.iter().any(|&c| c))
    }

    /// Keeps `block` for the current stream's collected states after checking its records.
    fn keep(&mut self, stream: &str, block: Arc<KeyGroupBlock>) -> Result<()> {
        let Some(cur) = &mut self.current else {
            return Ok(());
        };
        if cur.collected.iter().all(|&c| c) {
            // Everything is kept: the framing and keys are checked when the records are
            // decoded (at registration), not scanned twice.
            cur.blocks.push(block);
            return Ok(());
        }
        // The framing is checked here; keys are checked when the records are decoded.
        let counts = block.record_counts(stream, cur.header.states.len())?;
        if counts.iter().zip(&cur.collected).any(|(&n, &c)| c && n > 0) {
            cur.blocks.push(block);
        }
        Ok(())
    }

    /// Turns the current stream's blocks into pending chunks, one per collected state.
    pub fn finish_stream(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let blocks = Arc::new(StreamBlocks {
            stream: cur.stream.clone(),
            max_parallelism: cur.header.max_parallelism,
            states: cur.header.states.len(),
            blocks: cur.blocks,
        });
        for (i, meta) in cur.header.states.iter().enumerate() {
            if cur.collected[i] {
                self.chunks.push((
                    meta.name.clone(),
                    PendingChunk {
                        stream: cur.stream.clone(),
                        meta: meta.clone(),
                        key_serializer: cur.header.key_serializer.clone(),
                        state_index: i as u32,
                        blocks: Arc::clone(&blocks),
                    },
                ));
            }
        }
    }
}

impl RestoreVisitor for Collect {
    fn on_header(&mut self, stream: &str, header: &SnapshotHeader) -> Result<()> {
        self.begin(stream, header, vec![true; header.states.len()]);
        Ok(())
    }

    fn on_record(&mut self, _: &str, _: &StateMeta, _: u32, _: RawRecord<'_>) -> Result<()> {
        // Blocks are taken whole (`on_block`).
        Ok(())
    }

    fn on_block(&mut self, stream: &str, _: &SnapshotHeader, block: KeyGroupBlock) -> Result<()> {
        self.keep(stream, Arc::new(block))
    }
}

/// Restored keys must be readable as they are: their bytes decide their key group.
pub(crate) fn check_key_serializer<K: 'static>(
    key_serializer: &Arc<dyn StateSerializer<K>>,
    state: &StateName,
    recorded: &SerializerSnapshot,
) -> Result<()> {
    let state = state.to_string();
    match key_serializer.compatibility(recorded) {
        Compatibility::CompatibleAsIs => Ok(()),
        Compatibility::CompatibleAfterMigration(_) => Err(Error::IncompatibleSerializer {
            state,
            what: "key",
            reason: "keys cannot be migrated: their bytes decide their key group".into(),
        }),
        Compatibility::Incompatible(reason) => Err(Error::IncompatibleSerializer {
            state,
            what: "key",
            reason,
        }),
    }
}

fn key_error(state: &StateName, e: SerdeError) -> Error {
    Error::Deserialize {
        state: state.to_string(),
        what: "key",
        reason: e.0,
    }
}

/// What the restore threads know of a stream: its name, header, and for each of its states the
/// registered table that takes its records (`None`: collected or a timer service).
struct StreamInfo {
    name: String,
    header: SnapshotHeader,
    direct: Vec<Option<usize>>,
}

enum Msg {
    Header(Arc<StreamInfo>),
    Block(Arc<StreamInfo>, Arc<KeyGroupBlock>),
}

/// One restore thread: decodes the records of registered states in the blocks it is sent (the
/// key groups at positions `p % workers == its index`) into its sinks, one per table.
fn work<K: StateKey>(
    rx: Receiver<Msg>,
    mut sinks: Vec<Box<dyn PartSink<K> + '_>>,
    key_serializer: &dyn StateSerializer<K>,
    range: KeyGroupRange,
    now: i64,
) -> Result<()> {
    for msg in rx {
        match msg {
            Msg::Header(info) => {
                for (i, t) in info.direct.iter().enumerate() {
                    if let (Some(t), Some(meta)) = (t, info.header.states.get(i)) {
                        if let Some(sink) = sinks.get_mut(*t) {
                            sink.prepare(meta)?;
                        }
                    }
                }
            }
            Msg::Block(info, block) => {
                let part = (block.key_group - range.start()) as usize;
                let counts = block.record_counts(&info.name, info.direct.len())?;
                for (i, t) in info.direct.iter().enumerate() {
                    if let (Some(t), Some(&n)) = (t, counts.get(i)) {
                        if n > 0 {
                            if let Some(sink) = sinks.get_mut(*t) {
                                sink.reserve(part, n);
                            }
                        }
                    }
                }
                for rec in block.records(&info.name, info.header.max_parallelism) {
                    let rec = rec?;
                    let state = record_state(&info.name, &info.header, &rec)?;
                    let Some(Some(t)) = info.direct.get(rec.state_index as usize) else {
                        continue;
                    };
                    let Some(sink) = sinks.get_mut(*t) else {
                        continue;
                    };
                    let key = key_serializer
                        .deserialize(rec.key)
                        .map_err(|e| key_error(&state.name, e))?;
                    sink.restore(part, key, &rec, &info.name, now)?;
                }
            }
        }
    }
    Ok(())
}

/// The restore visitor: registered states' records go to the restore threads (by key group),
/// everything else is collected.
pub(crate) struct Parallel<'a, K> {
    pub ids: &'a HashMap<StateName, StateId>,
    pub timer_ids: &'a HashMap<StateName, usize>,
    pub key_serializer: &'a Arc<dyn StateSerializer<K>>,
    /// Registered tables' kinds, by table index (checked against each stream's states).
    pub kinds: Vec<StateKind>,
    pub collect: Collect,
    senders: Vec<SyncSender<Msg>>,
    current: Option<Arc<StreamInfo>>,
}

/// Blocks in flight per restore thread: enough to keep it busy, few enough to bound memory (a
/// block is one key group of a stream).
const IN_FLIGHT: usize = 2;

impl<K: StateKey> Parallel<'_, K> {
    fn send(&mut self, w: usize, msg: Msg) -> Result<()> {
        self.senders[w]
            .send(msg)
            .map_err(|_| Error::RestoreMismatch {
                reason: "a restore thread stopped".into(),
            })
    }
}

impl<K: StateKey> RestoreVisitor for Parallel<'_, K> {
    fn on_header(&mut self, stream: &str, header: &SnapshotHeader) -> Result<()> {
        let mut direct = Vec::with_capacity(header.states.len());
        let mut collected = Vec::with_capacity(header.states.len());
        for meta in &header.states {
            let table = match self.ids.get(&meta.name) {
                Some(id) if !self.timer_ids.contains_key(&meta.name) => {
                    let i = id.0 as usize;
                    check_key_serializer(self.key_serializer, &meta.name, &header.key_serializer)?;
                    if let Some(&kind) = self.kinds.get(i) {
                        if kind != meta.kind {
                            return Err(Error::StateKindMismatch {
                                state: meta.name.to_string(),
                                existing: meta.kind,
                                requested: kind,
                            });
                        }
                    }
                    Some(i)
                }
                _ => None,
            };
            collected.push(table.is_none());
            direct.push(table);
        }
        self.collect.begin(stream, header, collected);
        let info = Arc::new(StreamInfo {
            name: stream.to_string(),
            header: header.clone(),
            direct,
        });
        for w in 0..self.senders.len() {
            self.send(w, Msg::Header(Arc::clone(&info)))?;
        }
        self.current = Some(info);
        Ok(())
    }

    fn on_record(&mut self, _: &str, _: &StateMeta, _: u32, _: RawRecord<'_>) -> Result<()> {
        // Blocks are taken whole (`on_block`).
        Ok(())
    }

    fn on_block(&mut self, stream: &str, _: &SnapshotHeader, block: KeyGroupBlock) -> Result<()> {
        let Some(info) = self.current.clone() else {
            return Ok(());
        };
        let block = Arc::new(block);
        if self.collect.collects() {
            self.collect.keep(stream, Arc::clone(&block))?;
        }
        if info.direct.iter().any(Option::is_some) {
            let w = (block.key_group - self.collect.range.start()) as usize % self.senders.len();
            self.send(w, Msg::Block(info, block))?;
        }
        Ok(())
    }
}

/// Waits for every restore thread; the first error (in thread order) is the result.
fn join_all(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    let mut out = Ok(());
    for h in handles {
        let r = h.join().unwrap_or_else(|_| {
            Err(Error::RestoreMismatch {
                reason: "a restore thread panicked".into(),
            })
        });
        if out.is_ok() {
            out = r;
        }
    }
    out
}

/// Reads `streams` with `workers` restore threads decoding into `tables` (the registered
/// states); returns what was collected for the rest.
#[allow(clippy::too_many_arguments)]
pub(crate) fn restore_parallel<K: StateKey, R: std::io::Read>(
    streams: Vec<(String, R)>,
    workers: usize,
    tables: &mut [Box<dyn ErasedTable<K>>],
    ids: &HashMap<StateName, StateId>,
    timer_ids: &HashMap<StateName, usize>,
    key_serializer: &Arc<dyn StateSerializer<K>>,
    max_parallelism: u32,
    range: KeyGroupRange,
    now: i64,
) -> Result<Collect> {
    let kinds: Vec<StateKind> = tables.iter().map(|t| t.state_kind()).collect();
    let mut per_worker: Vec<Vec<Box<dyn PartSink<K> + '_>>> =
        (0..workers).map(|_| Vec::new()).collect();
    for t in tables.iter_mut() {
        for (w, sink) in t.split_restore(workers).into_iter().enumerate() {
            per_worker[w].push(sink);
        }
    }
    let result = std::thread::scope(|scope| {
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for sinks in per_worker {
            let (tx, rx) = sync_channel::<Msg>(IN_FLIGHT);
            senders.push(tx);
            let key_ser = &**key_serializer;
            handles.push(scope.spawn(move || work(rx, sinks, key_ser, range, now)));
        }
        let mut visitor = Parallel {
            ids,
            timer_ids,
            key_serializer,
            kinds,
            collect: Collect::new(range),
            senders,
            current: None,
        };
        let read =
            state_api::snapshot::restore_streams(streams, max_parallelism, range, &mut visitor);
        let Parallel {
            mut collect,
            senders,
            ..
        } = visitor;
        drop(senders);
        let worked = join_all(handles);
        collect.finish_stream();
        // A thread's own error explains a stop of the reading ("a restore thread stopped").
        worked.and(read).map(|()| collect)
    });
    for t in tables.iter_mut() {
        t.log_written_parts();
    }
    result
}

/// Decodes a pending chunk into a freshly registered table with `workers` threads (each owning
/// the key groups at positions `p % workers == its index`), making room in each key group first.
pub(crate) fn apply_chunk_parallel<K: StateKey>(
    table: &mut dyn ErasedTable<K>,
    chunk: &PendingChunk,
    key_serializer: &dyn StateSerializer<K>,
    range: KeyGroupRange,
    now: i64,
    workers: usize,
) -> Result<()> {
    let sinks = table.split_restore(workers);
    let result = std::thread::scope(|scope| {
        let handles: Vec<_> = sinks
            .into_iter()
            .enumerate()
            .map(|(w, mut sink)| {
                scope.spawn(move || -> Result<()> {
                    sink.prepare(&chunk.meta)?;
                    let idx = chunk.state_index as usize;
                    for b in &chunk.blocks.blocks {
                        let part = (b.key_group - range.start()) as usize;
                        if part % workers != w {
                            continue;
                        }
                        let n = b
                            .record_counts(&chunk.stream, chunk.blocks.states)?
                            .get(idx)
                            .copied()
                            .unwrap_or(0);
                        if n == 0 {
                            continue;
                        }
                        sink.reserve(part, n);
                        for rec in chunk.records_in(b) {
                            let rec = rec?;
                            let key = key_serializer
                                .deserialize(rec.key)
                                .map_err(|e| key_error(&chunk.meta.name, e))?;
                            sink.restore(part, key, &rec, &chunk.stream, now)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(handles)
    });
    table.log_written_parts();
    result
}
