//! A third backend, defined here and not in a backend crate, takes part in checkpoints through
//! the snapshot contract alone (`state_api::checkpointing`): it writes one immutable native
//! file per key group changed since its last snapshot, references the others, keeps its own
//! manifest, releases replaced files when told a later checkpoint completed, and restores at
//! another parallelism from only the files of its key groups. Nothing in `checkpoint` knows it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use checkpoint::{CheckpointConfig, CheckpointCoordinator, CompletedCheckpoint, SubtaskCommand};
use common::*;
use state_api::checkpointing::{
    BackendSnapshot, CheckpointableBackend, NativeFileSpec, NativeFormat, NativeRestoreSource,
    NativeSnapshot, NativeSource, SnapshotRequest,
};
use state_api::*;
use state_api::{Error, Result};
use state_heap::HeapKeyedStateBackend;

const WAIT: Duration = Duration::from_secs(60);
const KEYS: u64 = 2000;
const ID: &str = "kg-files";

/// Names unique across instances of this process (a real backend would use a UUID).
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Keyed state kept by a heap backend, checkpointed as one file per key group.
struct KgFileBackend {
    inner: HeapKeyedStateBackend<u64>,
    dir: PathBuf,
    instance: u64,
    /// Key groups written since the last snapshot.
    dirty: BTreeSet<u32>,
    /// The current file of each key group.
    files: BTreeMap<u32, (String, u64)>,
    /// Files replaced at a checkpoint: deleted once a later checkpoint completes.
    retired: Vec<(u64, String)>,
    /// Notifications received (completed, aborted).
    notified: (Vec<u64>, Vec<u64>),
}

impl KgFileBackend {
    fn new(p: u32, i: u32, dir: &Path) -> Self {
        let range = KeyGroupRange::for_operator(MAX_P, p, i).unwrap();
        KgFileBackend {
            inner: HeapKeyedStateBackend::<u64>::builder()
                .max_parallelism(MAX_P)
                .key_group_range(range)
                .build()
                .unwrap(),
            dir: dir.to_path_buf(),
            instance: INSTANCE.fetch_add(1, Ordering::Relaxed),
            dirty: range.iter().collect(),
            files: BTreeMap::new(),
            retired: Vec::new(),
            notified: (Vec::new(), Vec::new()),
        }
    }

    fn touch(&mut self) {
        if let Some(kg) = self.inner.current_key_group() {
            self.dirty.insert(kg);
        }
    }

    fn touch_all(&mut self) {
        self.dirty.extend(self.inner.key_group_range().iter());
    }

    fn io(e: std::io::Error) -> Error {
        Error::Io {
            context: "kg-files backend".into(),
            source: e,
        }
    }
}

/// The manifest: `"KGF1"`, then per file `key group u32 | name length u32 | name`.
fn manifest(files: &BTreeMap<u32, (String, u64)>) -> Vec<u8> {
    let mut m = b"KGF1".to_vec();
    for (kg, (name, _)) in files {
        m.extend_from_slice(&kg.to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
    }
    m
}

fn parse(m: &[u8]) -> Result<Vec<(u32, String)>> {
    let bad = || Error::Corrupt {
        stream: "kg-files manifest".into(),
        offset: 0,
        reason: "malformed".into(),
    };
    if m.get(..4) != Some(b"KGF1") {
        return Err(bad());
    }
    let mut out = Vec::new();
    let mut p = 4;
    while p < m.len() {
        let kg = u32::from_be_bytes(m.get(p..p + 4).ok_or_else(bad)?.try_into().unwrap());
        let n = u32::from_be_bytes(m.get(p + 4..p + 8).ok_or_else(bad)?.try_into().unwrap());
        let name = m.get(p + 8..p + 8 + n as usize).ok_or_else(bad)?;
        out.push((kg, String::from_utf8(name.to_vec()).map_err(|_| bad())?));
        p += 8 + n as usize;
    }
    Ok(out)
}

struct KgFileFormat;

impl NativeFormat for KgFileFormat {
    fn backend_id(&self) -> &str {
        ID
    }

    fn check(&self, source: &NativeSource, _max_parallelism: u32) -> Result<Vec<StateMeta>> {
        for (kg, name) in parse(&source.manifest)? {
            let listed = source.files.iter().find(|f| f.name == name);
            if listed.is_none_or(|f| f.key_groups != KeyGroupRange::new(kg, kg + 1)) {
                return Err(Error::Corrupt {
                    stream: "kg-files manifest".into(),
                    offset: 0,
                    reason: format!("'{name}' is not listed for key group {kg}"),
                });
            }
        }
        Ok(Vec::new())
    }
}

impl CheckpointableBackend for KgFileBackend {
    fn snapshot_for_checkpoint(&mut self, request: &SnapshotRequest) -> Result<BackendSnapshot> {
        if request.canonical_only {
            return Ok(BackendSnapshot::Canonical(vec![self.inner.snapshot()?]));
        }
        for kg in std::mem::take(&mut self.dirty) {
            let name = format!(
                "kgf-{}-{}-kg{kg}-c{}",
                std::process::id(),
                self.instance,
                request.checkpoint_id
            );
            let path = self.dir.join(&name);
            let mut f = std::fs::File::create(&path).map_err(Self::io)?;
            self.inner
                .snapshot_heap()
                .restrict_to(vec![kg])
                .write_to(&mut f)?;
            let size = f.metadata().map_err(Self::io)?.len();
            if let Some((old, _)) = self.files.insert(kg, (name, size)) {
                self.retired.push((request.checkpoint_id, old));
            }
        }
        let files = self
            .files
            .iter()
            .map(|(kg, (name, size))| NativeFileSpec {
                name: name.clone(),
                path: self.dir.join(name),
                size: *size,
                key_groups: KeyGroupRange::new(*kg, kg + 1),
            })
            .collect();
        Ok(BackendSnapshot::Native(NativeSnapshot {
            backend: ID.into(),
            key_group_range: self.inner.key_group_range(),
            manifest: manifest(&self.files),
            files,
            keep_alive: Box::new(()),
        }))
    }

    fn notify_checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.notified.0.push(checkpoint_id);
        self.retired.retain(|(at, name)| {
            let keep = *at > checkpoint_id;
            if !keep {
                std::fs::remove_file(self.dir.join(name)).unwrap();
            }
            keep
        });
    }

    fn notify_checkpoint_aborted(&mut self, checkpoint_id: u64) {
        self.notified.1.push(checkpoint_id);
    }

    fn native_format(&self) -> Option<&dyn NativeFormat> {
        Some(&KgFileFormat)
    }

    fn restore_from_native(&mut self, sources: Vec<NativeRestoreSource>) -> Result<()> {
        let range = self.inner.key_group_range();
        let mut streams = Vec::new();
        for s in sources {
            for (kg, name) in parse(&s.source.manifest)? {
                if range.contains(kg) {
                    let f = std::fs::File::open(s.dir.join(&name)).map_err(Self::io)?;
                    streams.push((name, f));
                }
            }
        }
        self.inner.restore(streams)
    }
}

impl KeyedStateBackend for KgFileBackend {
    type Key = u64;

    fn max_parallelism(&self) -> u32 {
        self.inner.max_parallelism()
    }

    fn key_group_range(&self) -> KeyGroupRange {
        self.inner.key_group_range()
    }

    fn set_current_key(&mut self, key: Self::Key) -> Result<()> {
        self.inner.set_current_key(key)
    }

    fn current_key(&self) -> Option<&Self::Key> {
        self.inner.current_key()
    }

    fn current_key_group(&self) -> Option<u32> {
        self.inner.current_key_group()
    }

    fn register_value<V: StateType, N: Namespace>(
        &mut self,
        descriptor: ValueStateDescriptor<V, N>,
    ) -> Result<ValueStateHandle<V, N>> {
        self.inner.register_value(descriptor)
    }

    fn register_list<T: StateType, N: Namespace>(
        &mut self,
        descriptor: ListStateDescriptor<T, N>,
    ) -> Result<ListStateHandle<T, N>> {
        self.inner.register_list(descriptor)
    }

    fn register_map<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        descriptor: MapStateDescriptor<UK, UV, N>,
    ) -> Result<MapStateHandle<UK, UV, N>> {
        self.inner.register_map(descriptor)
    }

    fn register_reducing<T: StateType, N: Namespace>(
        &mut self,
        descriptor: ReducingStateDescriptor<T, N>,
    ) -> Result<ReducingStateHandle<T, N>> {
        self.inner.register_reducing(descriptor)
    }

    fn register_aggregating<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace>(
        &mut self,
        descriptor: AggregatingStateDescriptor<IN, ACC, OUT, N>,
    ) -> Result<AggregatingStateHandle<IN, OUT, N>> {
        self.inner.register_aggregating(descriptor)
    }

    state_api::generic_bound_value!();

    fn value_get<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
    ) -> Result<Option<V>> {
        self.inner.value_get(h, ns)
    }

    fn value_update<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
        value: V,
    ) -> Result<()> {
        self.touch();
        self.inner.value_update(h, ns, value)
    }

    fn list_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<Vec<T>>> {
        self.inner.list_get(h, ns)
    }

    fn list_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        self.touch();
        self.inner.list_add(h, ns, value)
    }

    fn list_add_all<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()> {
        self.touch();
        self.inner.list_add_all(h, ns, values)
    }

    fn list_update<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()> {
        self.touch();
        self.inner.list_update(h, ns, values)
    }

    fn map_get<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<Option<UV>> {
        self.inner.map_get(h, ns, user_key)
    }

    fn map_put<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: UK,
        value: UV,
    ) -> Result<()> {
        self.touch();
        self.inner.map_put(h, ns, user_key, value)
    }

    fn map_put_all<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        entries: Vec<(UK, UV)>,
    ) -> Result<()> {
        self.touch();
        self.inner.map_put_all(h, ns, entries)
    }

    fn map_remove<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<()> {
        self.touch();
        self.inner.map_remove(h, ns, user_key)
    }

    fn map_contains<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<bool> {
        self.inner.map_contains(h, ns, user_key)
    }

    fn map_entries<'a, UK: MapKey, UV: StateType, N: Namespace>(
        &'a mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<MapIter<'a, UK, UV>> {
        self.inner.map_entries(h, ns)
    }

    fn map_is_empty<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<bool> {
        self.inner.map_is_empty(h, ns)
    }

    fn reducing_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<T>> {
        self.inner.reducing_get(h, ns)
    }

    fn reducing_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()> {
        self.touch();
        self.inner.reducing_add(h, ns, value)
    }

    fn aggregating_get<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
    ) -> Result<Option<OUT>> {
        self.inner.aggregating_get(h, ns)
    }

    fn aggregating_add<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
        value: IN,
    ) -> Result<()> {
        self.touch();
        self.inner.aggregating_add(h, ns, value)
    }

    fn clear<N: Namespace>(&mut self, h: &dyn StateHandle<N>, ns: &N) -> Result<()> {
        self.touch();
        self.inner.clear(h, ns)
    }

    fn merge_namespaces<N: Namespace>(
        &mut self,
        h: &dyn MergeableHandle<N>,
        target: &N,
        sources: &[N],
    ) -> Result<()> {
        self.touch();
        self.inner.merge_namespaces(h, target, sources)
    }

    fn keys<'a, N: Namespace>(
        &'a mut self,
        h: &dyn StateHandle<N>,
        ns: &N,
    ) -> Result<KeyIter<'a, Self::Key>> {
        self.inner.keys(h, ns)
    }

    fn register_timer_service<N: Namespace>(
        &mut self,
        descriptor: TimerServiceDescriptor<N>,
    ) -> Result<TimerServiceHandle<N>> {
        self.inner.register_timer_service(descriptor)
    }

    fn register_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        self.touch();
        self.inner.register_timer(h, domain, ns, timestamp)
    }

    fn delete_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()> {
        self.touch();
        self.inner.delete_timer(h, domain, ns, timestamp)
    }

    fn advance_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Vec<Timer<Self::Key, N>>> {
        self.touch_all();
        self.inner.advance_time(h, domain, time)
    }

    fn next_due_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Option<Timer<Self::Key, N>>> {
        self.touch_all();
        self.inner.next_due_timer(h, domain, time)
    }

    fn snapshot(&mut self) -> Result<Box<dyn KeyedStateSnapshot>> {
        self.inner.snapshot()
    }

    fn restore<R: Read>(&mut self, streams: Vec<(String, R)>) -> Result<()> {
        self.inner.restore(streams)
    }
}

fn add(b: &mut KgFileBackend, key: u64, v: u64) {
    let h = b.register_value(sum_desc()).unwrap();
    b.set_current_key(key).unwrap();
    let n = b.value(&h).get().unwrap().unwrap_or(0);
    b.value(&h).update(n + v).unwrap();
}

fn dump(b: &mut KgFileBackend) -> BTreeMap<u64, u64> {
    let h = b.register_value(sum_desc()).unwrap();
    let r = b.key_group_range();
    let mut out = BTreeMap::new();
    for k in (0..KEYS).filter(|k| r.contains(key_group_of(*k))) {
        b.set_current_key(k).unwrap();
        if let Some(v) = b.value(&h).get().unwrap() {
            out.insert(k, v);
        }
    }
    out
}

fn native_files(c: &CompletedCheckpoint) -> BTreeSet<String> {
    c.metadata.operators[0]
        .subtasks
        .iter()
        .flat_map(|s| s.native.as_ref().unwrap().files.iter())
        .map(|f| f.file.location.name().to_string())
        .collect()
}

#[test]
fn a_backend_outside_the_backend_crates_checkpoints_incrementally_and_restores_rescaled() {
    let storage = memory_storage("job-third-party");
    let config = CheckpointConfig {
        incremental: true,
        retained: 2,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let mut eps: Vec<_> = (0..2)
        .map(|i| builder.register_subtask("agg", i, 2, MAX_P).unwrap())
        .collect();
    let coord = builder.start().unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut backends: Vec<_> = (0..2u32)
        .map(|i| KgFileBackend::new(2, i, dirs[i as usize].path()))
        .collect();
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut previous: Option<BTreeSet<String>> = None;
    let mut last = None;
    for round in 1..=3u64 {
        // Round 1 writes every key; later rounds a few keys, so few key groups change.
        let keys: Vec<u64> = if round == 1 {
            (0..KEYS).collect()
        } else {
            vec![round, round + 100, round + 200]
        };
        let mut changed = BTreeSet::new();
        for k in keys {
            let b = backends
                .iter_mut()
                .find(|b| b.key_group_range().contains(key_group_of(k)))
                .unwrap();
            add(b, k, round);
            changed.insert(key_group_of(k));
            *model.entry(k).or_insert(0) += round;
        }
        let p = coord.trigger_checkpoint().unwrap();
        for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
            let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
                panic!("a barrier")
            };
            ep.snapshot_backend(&barrier, b, None).unwrap();
        }
        let done = p.wait(WAIT).unwrap();
        for ep in eps.iter_mut() {
            loop {
                if let SubtaskCommand::CheckpointComplete { .. } = ep.recv_timeout(WAIT).unwrap() {
                    break;
                }
            }
        }
        let now = native_files(&done);
        if let Some(prev) = &previous {
            // Incremental: only the files of changed key groups are new, the rest referenced.
            let new: BTreeSet<_> = now.difference(prev).collect();
            assert_eq!(new.len(), changed.len(), "round {round}: {new:?}");
            assert_eq!(now.len(), prev.len());
        } else {
            assert_eq!(now.len(), MAX_P as usize);
        }
        previous = Some(now);
        last = Some(done);
    }
    // Notifications reach the backend before its next snapshot (or when delivered).
    for (ep, b) in eps.iter_mut().zip(backends.iter_mut()) {
        ep.deliver_notifications(b);
        assert_eq!(b.notified.0, vec![1, 2, 3]);
        assert!(
            b.retired.is_empty(),
            "replaced files are released after completion"
        );
    }
    // Restore at parallelism 3: each new subtask downloads only its key groups' files.
    let latest = last.unwrap();
    let mut restored = BTreeMap::new();
    for i in 0..3u32 {
        let own = tempfile::tempdir().unwrap();
        let download = tempfile::tempdir().unwrap();
        let mut b = KgFileBackend::new(3, i, own.path());
        latest
            .restore_backend(&storage, "agg", i, &mut b, download.path())
            .unwrap();
        let range = b.key_group_range();
        let downloaded: usize = std::fs::read_dir(download.path())
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(downloaded, range.len() as usize);
        restored.extend(dump(&mut b));
    }
    assert_eq!(restored, model);

    // A backend that does not read this format refuses the state with a clear error.
    let mut heap = HeapKeyedStateBackend::<u64>::builder()
        .max_parallelism(MAX_P)
        .build()
        .unwrap();
    let err = latest
        .restore_backend(
            &storage,
            "agg",
            0,
            &mut heap,
            tempfile::tempdir().unwrap().path(),
        )
        .unwrap_err();
    assert!(err.to_string().contains(ID), "{err}");
    coord.shutdown().unwrap();
}
