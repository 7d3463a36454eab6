//! A native restore streams files to disk: its peak memory is bounded by the storage layer's
//! buffers, not by the size of the files. A backend with one 96 MiB native file is
//! checkpointed to a local-directory store and restored while the global allocator refuses
//! more than [`BOUND`] bytes on top of what was live before (a restore that held the file in
//! memory would fail its allocation and abort this test).
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use checkpoint::{
    CheckpointConfig, CheckpointCoordinator, CheckpointStorage, RetentionOnShutdown, SubtaskCommand,
};
use state_api::checkpointing::{
    BackendSnapshot, CheckpointableBackend, NativeFileSpec, NativeFormat, NativeRestoreSource,
    NativeSnapshot, NativeSource, SnapshotRequest,
};
use state_api::*;
use state_api::{Error, Result};
use state_heap::HeapKeyedStateBackend;

#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Most bytes a restore may allocate on top of what was live before it.
const BOUND: usize = 24 << 20;
/// The size of the native file.
const FILE: u64 = 96 << 20;
const WAIT: Duration = Duration::from_secs(120);

/// Keyed state in a heap backend, checkpointed as one big opaque native file.
struct BlobBackend {
    inner: HeapKeyedStateBackend<u64>,
    dir: PathBuf,
    /// Bytes and CRC32C of the native files restored.
    restored: Vec<(u64, u32)>,
}

impl BlobBackend {
    fn touch(&mut self) {}
    fn touch_all(&mut self) {}
}

fn io(e: std::io::Error) -> Error {
    Error::Io {
        context: "blob backend".into(),
        source: e,
    }
}

/// Pseudo-random bytes (xorshift), so no layer can compress them away.
fn write_blob(path: &std::path::Path, len: u64) -> u32 {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    crc
}

struct BlobFormat;

impl NativeFormat for BlobFormat {
    fn backend_id(&self) -> &str {
        "blob"
    }
    fn check(&self, _source: &NativeSource, _max_parallelism: u32) -> Result<Vec<StateMeta>> {
        Ok(Vec::new())
    }
}

impl CheckpointableBackend for BlobBackend {
    fn snapshot_for_checkpoint(&mut self, request: &SnapshotRequest) -> Result<BackendSnapshot> {
        let name = format!("blob-{}-c{}", std::process::id(), request.checkpoint_id);
        let path = self.dir.join(&name);
        write_blob(&path, FILE);
        Ok(BackendSnapshot::Native(NativeSnapshot {
            backend: "blob".into(),
            key_group_range: self.inner.key_group_range(),
            manifest: name.clone().into_bytes(),
            files: vec![NativeFileSpec {
                name,
                path,
                size: FILE,
                key_groups: self.inner.key_group_range(),
            }],
            keep_alive: Box::new(()),
        }))
    }

    fn native_format(&self) -> Option<&dyn NativeFormat> {
        Some(&BlobFormat)
    }

    /// Reads each file through a small buffer (the backend's own restore is not what this
    /// test measures, so it must not hold the file either).
    fn restore_from_native(&mut self, sources: Vec<NativeRestoreSource>) -> Result<()> {
        for s in sources {
            let name = String::from_utf8(s.source.manifest.clone()).unwrap();
            let mut f = std::fs::File::open(s.dir.join(name)).map_err(io)?;
            let mut buf = vec![0u8; 64 << 10];
            let (mut len, mut crc) = (0u64, 0u32);
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                len += n as u64;
                crc = crc32c::crc32c_append(crc, &buf[..n]);
            }
            self.restored.push((len, crc));
        }
        Ok(())
    }
}

impl KeyedStateBackend for BlobBackend {
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

fn blob_backend(dir: &std::path::Path) -> BlobBackend {
    BlobBackend {
        inner: HeapKeyedStateBackend::<u64>::builder().build().unwrap(),
        dir: dir.to_path_buf(),
        restored: Vec::new(),
    }
}

#[test]
fn a_native_restore_streams_files_in_bounded_memory() {
    let store_dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(store_dir.path()).unwrap());
    let storage = CheckpointStorage::new(store, "ck", "job-blob").unwrap();
    let config = CheckpointConfig {
        incremental: true,
        retention_on_shutdown: RetentionOnShutdown::Retain,
        ..Default::default()
    };
    let mut builder = CheckpointCoordinator::builder(storage.clone(), config);
    let mut ep = builder.register_subtask("blobs", 0, 1, 128).unwrap();
    let coord = builder.start().unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut backend = blob_backend(local.path());
    let pending = coord.trigger_checkpoint().unwrap();
    let SubtaskCommand::Barrier(barrier) = ep.recv_timeout(WAIT).unwrap() else {
        panic!("a barrier")
    };
    ep.snapshot_backend(&barrier, &mut backend, None).unwrap();
    let done = pending.wait(WAIT).unwrap();
    coord.shutdown().unwrap();
    let native = done.metadata.operators[0].subtasks[0]
        .native
        .as_ref()
        .unwrap();
    assert_eq!(native.files[0].file.size, FILE);
    let expected_crc = native.files[0].file.crc32c;

    let own = tempfile::tempdir().unwrap();
    let download = tempfile::tempdir().unwrap();
    let mut restored = blob_backend(own.path());
    let before = ALLOCATOR.allocated();
    ALLOCATOR
        .set_limit(before + BOUND)
        .expect("the limit is above what is allocated");
    let r = done.restore_backend(&storage, "blobs", 0, &mut restored, download.path());
    ALLOCATOR
        .set_limit(usize::MAX)
        .expect("no limit is below what is allocated");
    r.unwrap();
    // The whole file arrived, verified, through buffers far smaller than it.
    assert_eq!(restored.restored, vec![(FILE, expected_crc)]);
    assert!(FILE as usize > 3 * BOUND);
}
