//! The State Processor on jobs it knows nothing about: bootstrap a savepoint from typed data
//! and restore it into both backends; transform one at another parallelism; read a real
//! checkpoint typed and count its entries; wrong serializers, kinds and names are clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use checkpoint::processor::{SavepointReader, SavepointWriter};
use checkpoint::*;
use common::*;
use state_api::{
    FixedWidthSerializer, KeyGroupRange, KeyedStateBackend, KeyedStateBackendExt,
    ListStateDescriptor, MapStateDescriptor, OperatorStateStore, PostcardSerializer, StateKind,
    ValueStateDescriptor,
};
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

const KEYS: u32 = 200;

fn counts() -> ValueStateDescriptor<u64, u32> {
    ValueStateDescriptor::new("counts").unwrap()
}
fn events() -> ListStateDescriptor<String> {
    ListStateDescriptor::new("events").unwrap()
}
fn tags() -> MapStateDescriptor<String, i64> {
    MapStateDescriptor::new("tags").unwrap()
}
fn keys() -> PostcardSerializer<String> {
    PostcardSerializer::new()
}
fn key(i: u32) -> String {
    format!("user-{i}")
}

/// What the bootstrap writes: value (key, window) -> count; list per key; map per key.
type Model = (
    BTreeMap<(String, u32), u64>,
    BTreeMap<String, Vec<String>>,
    BTreeMap<String, BTreeMap<String, i64>>,
);

fn model() -> Model {
    let mut values = BTreeMap::new();
    let mut lists = BTreeMap::new();
    let mut maps = BTreeMap::new();
    for i in 0..KEYS {
        values.insert((key(i), i % 3), u64::from(i) * 10);
        if i % 4 != 0 {
            lists.insert(key(i), (0..i % 4).map(|j| format!("e{i}-{j}")).collect());
        }
        maps.insert(
            key(i),
            BTreeMap::from([("a".to_string(), i64::from(i)), ("b".into(), -i64::from(i))]),
        );
    }
    (values, lists, maps)
}

fn bootstrap(storage: &CheckpointStorage, parallelism: u32) -> CompletedCheckpoint {
    let (values, lists, maps) = model();
    let mut w = SavepointWriter::new().with_checkpoint_id(7, 1_700_000_000_000);
    w.add_operator("sessions", MAX_P, parallelism).unwrap();
    let n = w
        .write_value(
            "sessions",
            &keys(),
            &counts(),
            values.iter().map(|((k, ns), v)| (k.clone(), *ns, *v)),
        )
        .unwrap();
    assert_eq!(n, u64::from(KEYS));
    w.write_list(
        "sessions",
        &keys(),
        &events(),
        lists.iter().map(|(k, l)| (k.clone(), (), l.clone())),
    )
    .unwrap();
    w.write_map(
        "sessions",
        &keys(),
        &tags(),
        maps.iter()
            .map(|(k, m)| (k.clone(), (), m.clone().into_iter().collect())),
    )
    .unwrap();
    // Operator (non-keyed) state of a source next to it.
    w.add_operator("source", MAX_P, 1).unwrap();
    let mut store = OperatorStateStore::new();
    store
        .list_state(&offsets_desc())
        .unwrap()
        .update(&[42])
        .unwrap();
    w.set_operator_state("source", vec![store]).unwrap();
    w.write(storage, "bootstrap").unwrap()
}

/// Reads every model key a backend owns, through the job's own descriptors.
fn read_back<B: KeyedStateBackend<Key = String>>(b: &mut B) -> Model {
    let (mv, ml, mm) = model();
    let c = b.register_value(counts()).unwrap();
    let e = b.register_list(events()).unwrap();
    let t = b.register_map(tags()).unwrap();
    let range = b.key_group_range();
    let mut out: Model = Default::default();
    for i in 0..KEYS {
        let k = key(i);
        let mut kb = Vec::new();
        state_api::StateSerializer::serialize(&keys(), &k, &mut kb).unwrap();
        if !range.contains(state_api::assign_to_key_group(&kb, MAX_P)) {
            continue;
        }
        b.set_current_key(k.clone()).unwrap();
        for ns in 0..3u32 {
            if let Some(v) = b.value_in(&c, &ns).get().unwrap() {
                out.0.insert((k.clone(), ns), v);
            }
        }
        if let Some(l) = b.list(&e).get().unwrap() {
            out.1.insert(k.clone(), l);
        }
        let mut m = BTreeMap::new();
        for uk in ["a", "b"] {
            if let Some(v) = b.map(&t).get(&uk.to_string()).unwrap() {
                m.insert(uk.to_string(), v);
            }
        }
        if !m.is_empty() {
            out.2.insert(k.clone(), m);
        }
    }
    // The model restricted to the range, for the caller to merge.
    let _ = (mv, ml, mm);
    out
}

fn merge(into: &mut Model, part: Model) {
    into.0.extend(part.0);
    into.1.extend(part.1);
    into.2.extend(part.2);
}

#[test]
fn bootstrap_restores_into_heap_and_mmap_backends() {
    let storage = memory_storage("bootstrapped");
    let sp = bootstrap(&storage, 2);
    assert_eq!(sp.metadata.kind, SnapshotKind::Savepoint);
    assert_eq!(sp.metadata.checkpoint_id, 7);

    // Heap at parallelism 3 (another than written).
    let mut heap: Model = Default::default();
    for i in 0..3 {
        let mut b = HeapKeyedStateBackend::<String>::builder()
            .key_group_range(KeyGroupRange::for_operator(MAX_P, 3, i).unwrap())
            .build()
            .unwrap();
        sp.restore_keyed(&storage, "sessions", i, &mut b).unwrap();
        merge(&mut heap, read_back(&mut b));
    }
    assert_eq!(heap, model());

    // mmap at parallelism 2.
    let dir = tempfile::tempdir().unwrap();
    let mut mmap: Model = Default::default();
    for i in 0..2 {
        let mut b = MmapKeyedStateBackend::<String>::builder()
            .key_group_range(KeyGroupRange::for_operator(MAX_P, 2, i).unwrap())
            .directory(dir.path().join(i.to_string()))
            .build()
            .unwrap();
        sp.restore_keyed(&storage, "sessions", i, &mut b).unwrap();
        merge(&mut mmap, read_back(&mut b));
    }
    assert_eq!(mmap, model());

    // The source's operator state.
    let mut ops = sp.operator_state("source", 0, 1).unwrap();
    assert_eq!(
        ops.list_state(&offsets_desc()).unwrap().get().unwrap(),
        [42]
    );
}

#[test]
fn lists_states_and_reads_them_typed() {
    let storage = memory_storage("bootstrapped");
    let sp = bootstrap(&storage, 2);
    let reader = SavepointReader::open(&storage, &sp.path).unwrap();
    let ops = reader.operators().unwrap();
    let ids: Vec<&str> = ops.iter().map(|o| o.operator_id.as_str()).collect();
    assert_eq!(ids, ["sessions", "source"]);
    let sessions = &ops[0];
    assert_eq!(sessions.parallelism, 2);
    let kinds: Vec<(String, StateKind)> = sessions
        .states
        .iter()
        .map(|s| (s.name.to_string(), s.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("counts".to_string(), StateKind::Value),
            ("events".to_string(), StateKind::List),
            ("tags".to_string(), StateKind::Map)
        ]
    );
    assert_eq!(ops[1].operator_states, ["offsets"]);

    let stats = reader.state_stats("sessions").unwrap();
    let (values, lists, maps) = model();
    assert_eq!(stats[0].entries(), values.len() as u64);
    assert_eq!(stats[1].entries(), lists.len() as u64);
    assert_eq!(stats[2].entries(), maps.len() as u64);
    assert!(stats[0].key_groups.len() > 50, "{:?}", stats[0].key_groups);
    assert!(stats[0].bytes() > stats[0].entries() * 16);

    let got: BTreeMap<(String, u32), u64> = reader
        .read_value("sessions", keys(), &counts())
        .unwrap()
        .map(|e| e.map(|e| ((e.key, e.namespace), e.value)))
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(got, values);
    let got: BTreeMap<String, Vec<String>> = reader
        .read_list("sessions", keys(), &events())
        .unwrap()
        .map(|e| e.map(|e| (e.key, e.elements)))
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(got, lists);
    let got: BTreeMap<String, BTreeMap<String, i64>> = reader
        .read_map("sessions", keys(), &tags())
        .unwrap()
        .map(|e| e.map(|e| (e.key, e.entries.into_iter().collect())))
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(got, maps);
}

#[test]
fn transform_at_another_parallelism() {
    let storage = memory_storage("bootstrapped");
    let sp = bootstrap(&storage, 2);
    let reader = SavepointReader::open(&storage, &sp.path).unwrap();
    let mut w = SavepointWriter::from_reader(&reader).unwrap();
    // Double the counts of window 0, drop window 2, forget the event lists, go to 3 subtasks.
    let kept = w
        .map_values("sessions", keys(), &counts(), |_, ns, v| match ns {
            0 => Some(v * 2),
            2 => None,
            _ => Some(v),
        })
        .unwrap();
    w.remove_state("sessions", "events").unwrap();
    w.set_parallelism("sessions", 3).unwrap();
    let out = w.write(&storage, "transformed").unwrap();
    assert_eq!(out.metadata.operator("sessions").unwrap().parallelism, 3);
    assert_eq!(out.metadata.checkpoint_id, 7, "the source's id is kept");

    let (values, _, maps) = model();
    let expected: BTreeMap<(String, u32), u64> = values
        .into_iter()
        .filter(|((_, ns), _)| *ns != 2)
        .map(|((k, ns), v)| ((k, ns), if ns == 0 { v * 2 } else { v }))
        .collect();
    assert_eq!(kept, expected.len() as u64);

    let mut restored: Model = Default::default();
    for i in 0..3 {
        let mut b = HeapKeyedStateBackend::<String>::builder()
            .key_group_range(KeyGroupRange::for_operator(MAX_P, 3, i).unwrap())
            .build()
            .unwrap();
        out.restore_keyed(&storage, "sessions", i, &mut b).unwrap();
        merge(&mut restored, read_back(&mut b));
    }
    assert_eq!(restored.0, expected);
    assert!(restored.1.is_empty(), "the list state is gone");
    assert_eq!(restored.2, maps, "the map state is untouched");
    // The operator state came along.
    let mut ops = out.operator_state("source", 0, 1).unwrap();
    assert_eq!(
        ops.list_state(&offsets_desc()).unwrap().get().unwrap(),
        [42]
    );
    // The list state is not listed any more.
    let states: Vec<String> = SavepointReader::open(&storage, &out.path)
        .unwrap()
        .operator("sessions")
        .unwrap()
        .states
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(states, ["counts", "tags"]);
}

#[test]
fn reads_a_checkpoint_written_by_a_running_job() {
    let storage = memory_storage("job");
    let mut log = CommitLog::claim(&storage).unwrap();
    let mut subtasks: Vec<Subtask> = (0..2).map(|i| Subtask::new(i, 2)).collect();
    let mut expected = BTreeMap::new();
    for k in 0..500u64 {
        let s = subtasks.iter_mut().find(|s| s.owns(k)).unwrap();
        s.add(k, k + 1);
        s.add(k, 1);
        expected.insert(k, k + 2);
    }
    let c = common::checkpoint(&storage, &mut log, 1, &mut subtasks).unwrap();
    let reader = SavepointReader::from_checkpoint(&storage, c);
    let got: BTreeMap<u64, u64> = reader
        .read_value("agg", PostcardSerializer::<u64>::new(), &sum_desc())
        .unwrap()
        .map(|e| e.map(|e| (e.key, e.value)))
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(got, expected);
    let stats = reader.state_stats("agg").unwrap();
    let seen = stats
        .iter()
        .find(|s| s.meta.name.as_str() == "seen")
        .unwrap();
    assert_eq!(seen.entries(), 500);
    // Every entry is in the key group its key hashes to.
    let sum = stats
        .iter()
        .find(|s| s.meta.name.as_str() == "sum")
        .unwrap();
    let mut per_kg: BTreeMap<u32, u64> = BTreeMap::new();
    for k in 0..500u64 {
        *per_kg.entry(key_group_of(k)).or_default() += 1;
    }
    let counted: BTreeMap<u32, u64> = sum
        .key_groups
        .iter()
        .map(|(k, s)| (*k, s.entries))
        .collect();
    assert_eq!(counted, per_kg);
}

#[test]
fn wrong_serializers_kinds_and_names_are_clear_errors() {
    let storage = memory_storage("bootstrapped");
    let sp = bootstrap(&storage, 2);
    let reader = SavepointReader::open(&storage, &sp.path).unwrap();

    // The values are u64: reading them as String is refused before anything is read.
    let wrong = ValueStateDescriptor::<String, u32>::new("counts").unwrap();
    let err = reader.read_value("sessions", keys(), &wrong).unwrap_err();
    assert!(
        matches!(&err, Error::IncompatibleSerializer { state, .. } if state == "counts"),
        "{err}"
    );
    assert!(err.to_string().contains("'counts'"), "{err}");
    // Keys are postcard Strings, not fixed-width u64.
    let err = reader
        .read_value("sessions", FixedWidthSerializer::<u64>::new(), &counts())
        .unwrap_err();
    assert!(
        matches!(&err, Error::IncompatibleSerializer { what, .. } if what == "key"),
        "{err}"
    );
    // The namespace is a u32, not ().
    let no_ns = ValueStateDescriptor::<u64>::new("counts").unwrap();
    let err = reader.read_value("sessions", keys(), &no_ns).unwrap_err();
    assert!(err.to_string().contains("namespace"), "{err}");
    // A value state read as a list.
    let as_list = ListStateDescriptor::<String>::new("counts").unwrap();
    let err = reader.read_list("sessions", keys(), &as_list).unwrap_err();
    assert!(matches!(err, Error::WrongStateKind { .. }), "{err}");
    assert!(
        err.to_string().contains("is value state, not list"),
        "{err}"
    );
    // Unknown names say what there is.
    let missing = ValueStateDescriptor::<u64, u32>::new("nope").unwrap();
    let err = reader.read_value("sessions", keys(), &missing).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("'nope'") && msg.contains("counts, events, tags"),
        "{msg}"
    );
    let err = reader.read_value("other", keys(), &counts()).unwrap_err();
    assert!(err.to_string().contains("sessions, source"), "{err}");

    // Writing: a state declared again with another type, keys of another serializer.
    let mut w = SavepointWriter::from_reader(&reader).unwrap();
    let err = w
        .write_value(
            "sessions",
            &keys(),
            &wrong,
            [("x".to_string(), 0, "y".to_string())],
        )
        .unwrap_err();
    assert!(matches!(err, Error::IncompatibleSerializer { .. }), "{err}");
    let err = w
        .write_value(
            "sessions",
            &FixedWidthSerializer::<u64>::new(),
            &counts(),
            [(1u64, 0, 1)],
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::IncompatibleSerializer { what, .. } if what == "key"),
        "{err}"
    );
    // A TTL state needs the entries' timestamp.
    let ttl =
        ValueStateDescriptor::<u64>::new("ttl")
            .unwrap()
            .with_ttl(state_api::StateTtlConfig::new(
                std::time::Duration::from_secs(60),
            ));
    let err = w
        .write_value("sessions", &keys(), &ttl, [("x".to_string(), (), 1)])
        .unwrap_err();
    assert!(err.to_string().contains("with_entry_timestamp"), "{err}");
}
