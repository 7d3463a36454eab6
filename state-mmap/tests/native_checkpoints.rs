//! Native incremental checkpoints: only new files per checkpoint, restore at another
//! parallelism by clipping files, and crash safety under SIGKILL during flush and compaction.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use state_api::*;
use state_mmap::{MmapKeyedStateBackend, NativeCheckpoint, NativeCheckpointMeta, NativeRestore};

struct H {
    v: ValueStateHandle<u64, ()>,
    l: ListStateHandle<u64, u32>,
    m: MapStateHandle<u32, u64, ()>,
}

fn register<B: KeyedStateBackend>(b: &mut B) -> H {
    H {
        v: b.register_value(ValueStateDescriptor::new("v").unwrap())
            .unwrap(),
        l: b.register_list(ListStateDescriptor::new("l").unwrap())
            .unwrap(),
        m: b.register_map(MapStateDescriptor::new("m").unwrap())
            .unwrap(),
    }
}

/// A stand-in for the checkpoint layer: uploads files it has not seen into `shared`.
fn upload(chk: &NativeCheckpoint, shared: &Path, uploaded: &mut HashSet<String>) -> usize {
    let new: Vec<_> = chk.new_files(uploaded).cloned().collect();
    for f in &new {
        fs::copy(f.path(), shared.join(f.name())).unwrap();
    }
    uploaded.extend(new.iter().map(|f| f.name().to_string()));
    new.len()
}

fn backend(range: KeyGroupRange) -> MmapKeyedStateBackend<u64> {
    MmapKeyedStateBackend::<u64>::builder()
        .key_group_range(range)
        .memory_budget(256 << 10)
        .build()
        .unwrap()
}

/// Restore sources: checkpoint metadata `metas`, their files all in `dir`.
fn sources(metas: &[Vec<u8>], dir: &std::path::Path) -> Vec<NativeRestore> {
    metas
        .iter()
        .map(|m| NativeRestore {
            metadata: m.clone(),
            files_dir: dir.to_path_buf(),
        })
        .collect()
}

fn write_round(b: &mut MmapKeyedStateBackend<u64>, h: &H, round: u64, keys: std::ops::Range<u64>) {
    for k in keys {
        if b.set_current_key(k).is_err() {
            continue;
        }
        b.value(&h.v).update(round).unwrap();
        b.list_in(&h.l, &1).add(round).unwrap();
        b.map(&h.m).put((round % 3) as u32, k + round).unwrap();
    }
}

fn check_round(
    b: &mut MmapKeyedStateBackend<u64>,
    h: &H,
    rounds: u64,
    keys: std::ops::Range<u64>,
) -> usize {
    let mut n = 0;
    for k in keys {
        if b.set_current_key(k).is_err() {
            continue;
        }
        n += 1;
        assert_eq!(b.value(&h.v).get().unwrap(), Some(rounds - 1), "key {k}");
        assert_eq!(
            b.list_in(&h.l, &1).get().unwrap(),
            Some((0..rounds).collect::<Vec<_>>()),
            "key {k}"
        );
        assert_eq!(
            b.map(&h.m)
                .iter()
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .len(),
            rounds.min(3) as usize
        );
    }
    n
}

#[test]
fn incremental_checkpoints_upload_only_new_files_and_restore_rescaled() {
    let shared = tempfile::tempdir().unwrap();
    let mut uploaded = HashSet::new();
    let mut b = backend(KeyGroupRange::all(128));
    let h = register(&mut b);
    write_round(&mut b, &h, 0, 0..3000);
    // Settled first: a compaction finishing after `c1` would replace files `c2` then lists.
    drop(b.checkpoint().unwrap());
    b.wait_for_background_work().unwrap();
    let c1 = b.checkpoint().unwrap();
    let first = upload(&c1, shared.path(), &mut uploaded);
    assert!(first >= 1);
    // A small change: the next checkpoint uploads only the new file(s).
    b.set_current_key(7).unwrap();
    b.value(&h.v).update(0).unwrap();
    let c2 = b.checkpoint().unwrap();
    let second = upload(&c2, shared.path(), &mut uploaded);
    assert!(
        second >= 1 && second < c2.files().len(),
        "{second} of {}",
        c2.files().len()
    );
    for round in 1..3 {
        write_round(&mut b, &h, round, 0..3000);
    }
    let c3 = b.checkpoint().unwrap();
    upload(&c3, shared.path(), &mut uploaded);
    let meta = c3.metadata().to_vec();
    drop((c1, c2, c3));

    // Same parallelism.
    let mut r = backend(KeyGroupRange::all(128));
    r.restore_native(vec![NativeRestore {
        metadata: meta.clone(),
        files_dir: shared.path().to_path_buf(),
    }])
    .unwrap();
    let hr = register(&mut r);
    assert_eq!(check_round(&mut r, &hr, 3, 0..3000), 3000);

    // 1 -> 2: each half opens only files with its key groups, clipped.
    let decoded = NativeCheckpointMeta::decode(&meta).unwrap();
    let mut halves = Vec::new();
    let mut total = 0;
    for i in 0..2 {
        let range = KeyGroupRange::for_operator(128, 2, i).unwrap();
        assert!(!decoded.files_for(range).is_empty());
        let mut half = backend(range);
        half.restore_native(vec![NativeRestore {
            metadata: meta.clone(),
            files_dir: shared.path().to_path_buf(),
        }])
        .unwrap();
        let hh = register(&mut half);
        total += check_round(&mut half, &hh, 3, 0..3000);
        // Writes after the restore, then a checkpoint of the half.
        write_round(&mut half, &hh, 3, 0..3000);
        let c = half.checkpoint().unwrap();
        upload(&c, shared.path(), &mut uploaded);
        halves.push(c.metadata().to_vec());
    }
    assert_eq!(total, 3000, "every key in exactly one half");

    // 2 -> 1: both halves' checkpoints into one backend; clipped files of one half never
    // shadow the other half's newer data.
    let mut one = backend(KeyGroupRange::all(128));
    one.restore_native(sources(&halves, shared.path())).unwrap();
    let ho = register(&mut one);
    assert_eq!(check_round(&mut one, &ho, 4, 0..3000), 3000);
    // Compaction rewrites clipped files without their foreign key groups; state is unchanged.
    one.compact().unwrap();
    assert_eq!(check_round(&mut one, &ho, 4, 0..3000), 3000);

    // Damaged metadata is an error, not a panic.
    let mut bad = meta.clone();
    bad[20] ^= 1;
    assert!(NativeCheckpointMeta::decode(&bad).is_err());
}

/// A restore at another parallelism downloads the files of its key groups and little more:
/// flushes and compactions cut their files at key-group boundaries once they reach the target
/// size, so of each sorted run only the file straddling a boundary of the new range holds key
/// groups the restoring subtask does not own. Rescaled 2 -> 3 and the three back to 2, every
/// key reads back.
#[test]
fn a_rescaled_restore_downloads_about_its_share() {
    const TARGET: u64 = 16 << 10;
    const KEYS: u64 = 6000;
    let shared = tempfile::tempdir().unwrap();
    let mut uploaded = HashSet::new();
    let build = |range: KeyGroupRange| {
        MmapKeyedStateBackend::<u64>::builder()
            .key_group_range(range)
            .engine_options(state_mmap::engine::EngineOptions {
                // Write buffers of about 20 target files: flushes and compactions cut files.
                memory_budget: 1 << 20,
                target_file_bytes: TARGET,
                ..state_mmap::engine::EngineOptions::default()
            })
            .build()
            .unwrap()
    };
    // Checkpoints of `backends` (each after `rounds` rounds), uploaded; their metadata.
    let checkpoint_all = |backends: &mut Vec<(MmapKeyedStateBackend<u64>, H)>,
                          uploaded: &mut HashSet<String>| {
        backends
            .iter_mut()
            .map(|(b, _)| {
                let c = b.checkpoint().unwrap();
                upload(&c, shared.path(), uploaded);
                c.metadata().to_vec()
            })
            .collect::<Vec<_>>()
    };
    // Restores `metas` at `parallelism`; checks each subtask's download against its share.
    let rescale = |metas: &[Vec<u8>], parallelism: u32, rounds: u64| {
        let decoded: Vec<_> = metas
            .iter()
            .map(|m| NativeCheckpointMeta::decode(m).unwrap())
            .collect();
        let total: u64 = decoded
            .iter()
            .flat_map(|d| d.runs.iter().flatten())
            .map(|f| f.size)
            .sum();
        let runs: usize = decoded.iter().map(|d| d.runs.len()).sum();
        let mut backends = Vec::new();
        let mut keys = 0;
        for i in 0..parallelism {
            let range = KeyGroupRange::for_operator(128, parallelism, i).unwrap();
            let files: Vec<_> = decoded.iter().flat_map(|d| d.files_for(range)).collect();
            let downloaded: u64 = files.iter().map(|f| f.size).sum();
            // Files that hold key groups of another owner too: at most one a run at each
            // end of the range, each of about the target size (cut at the first key-group
            // boundary past it; a key group here is smaller than the target).
            let straddling: Vec<u64> = files
                .iter()
                .filter(|f| f.key_groups.intersect(&range) != f.key_groups)
                .map(|f| f.size)
                .collect();
            assert!(
                straddling.iter().all(|&s| s <= 2 * TARGET),
                "subtask {i} of {parallelism}: files of {straddling:?} bytes straddle its \
                 range, the target is {TARGET}"
            );
            let share = total * u64::from(range.len()) / 128;
            let overhang = 2 * runs as u64 * 2 * TARGET;
            assert!(
                downloaded <= share + share / 10 + overhang,
                "subtask {i} of {parallelism} downloads {downloaded} bytes of {total}: its \
                 share is about {share}"
            );
            let mut b = build(range);
            b.restore_native(sources(metas, shared.path())).unwrap();
            let h = register(&mut b);
            keys += check_round(&mut b, &h, rounds, 0..KEYS);
            backends.push((b, h));
        }
        assert_eq!(keys, KEYS as usize, "every key in exactly one subtask");
        backends
    };

    let mut two: Vec<_> = (0..2)
        .map(|i| {
            let mut b = build(KeyGroupRange::for_operator(128, 2, i).unwrap());
            let h = register(&mut b);
            (b, h)
        })
        .collect();
    for round in 0..3 {
        for (b, h) in &mut two {
            write_round(b, h, round, 0..KEYS);
        }
    }
    let metas = checkpoint_all(&mut two, &mut uploaded);
    drop(two);
    let mut three = rescale(&metas, 3, 3);
    for (b, h) in &mut three {
        write_round(b, h, 3, 0..KEYS);
    }
    let metas = checkpoint_all(&mut three, &mut uploaded);
    drop(three);
    rescale(&metas, 2, 4);
}

/// Runs `test` of this binary again as a child process with `env` set (which makes it the
/// child), waits until `progressed` (or the child ended; polling every `poll`), then `delay`
/// more, and kills it with SIGKILL.
fn kill_after(
    test: &str,
    env: (&str, &Path),
    progressed: impl Fn() -> bool,
    poll: Duration,
    delay: Duration,
) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", test, "--nocapture"])
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..60_000 {
        if progressed() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(poll);
    }
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

const CHILD_ENV: &str = "STATE_MMAP_CRASH_CHILD";
const KEYS: u64 = 400;

fn crash_backend(dir: &Path) -> MmapKeyedStateBackend<u64> {
    MmapKeyedStateBackend::<u64>::builder()
        .directory(dir)
        .memory_budget(64 << 10)
        .build()
        .unwrap()
}

/// The child: rounds of writes, each ended by a flush (a completed checkpoint) recorded in the
/// progress file, with compactions in between, until it is killed.
fn child(dir: &Path, progress: &Path) {
    let done = read_progress(progress);
    // Each child run is an epoch of its own (recorded before it writes anything), writing its
    // list elements in a namespace of its own.
    let epoch = fs::read_to_string(progress)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('E'))
        .count() as u64;
    let mut round = done.iter().map(|(_, r)| r + 1).max().unwrap_or(0);
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(progress)
        .unwrap();
    writeln!(log, "E").unwrap();
    log.sync_all().unwrap();
    let mut b = crash_backend(dir);
    let h = register(&mut b);
    loop {
        for k in 0..KEYS {
            b.set_current_key(k).unwrap();
            b.value(&h.v).update(round).unwrap();
            b.list_in(&h.l, &(epoch as u32)).add(round).unwrap();
        }
        b.flush().unwrap();
        writeln!(log, "{epoch} {round}").unwrap();
        log.sync_all().unwrap();
        if round % 3 == 0 {
            b.compact().unwrap();
        }
        round += 1;
    }
}

fn read_progress(progress: &Path) -> Vec<(u64, u64)> {
    fs::read_to_string(progress)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn sigkill_during_flush_and_compaction_loses_nothing_completed() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let dir = PathBuf::from(dir);
        child(&dir.join("db"), &dir.join("progress"));
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let progress = root.path().join("progress");
    // Each child is killed a fixed delay after it completed a round of its own (so every run
    // makes progress however slow the machine is); the delays land in flushes, compactions
    // and writes alike.
    let delays = [15u64, 4, 26, 9, 33, 1, 20, 12];
    for (i, delay) in delays.iter().enumerate() {
        let before = read_progress(&progress).len();
        kill_after(
            "sigkill_during_flush_and_compaction_loses_nothing_completed",
            (CHILD_ENV, root.path()),
            || read_progress(&progress).len() > before,
            Duration::from_millis(2),
            Duration::from_millis(*delay),
        );

        let done = read_progress(&progress);
        let Some(&(_, last)) = done.last() else {
            continue;
        };
        let mut b = crash_backend(&root.path().join("db"));
        let h = register(&mut b);
        for k in 0..KEYS {
            b.set_current_key(k).unwrap();
            let v = b.value(&h.v).get().unwrap().unwrap();
            assert!(
                v == last || v == last + 1,
                "kill {i}: key {k} has {v}, last completed round {last}"
            );
            // Every epoch's list holds all its completed rounds (and maybe the next, if a
            // background flush persisted part of it).
            let epochs: HashSet<u64> = done.iter().map(|(e, _)| *e).collect();
            for e in epochs {
                let rounds: Vec<u64> = done
                    .iter()
                    .filter(|(x, _)| *x == e)
                    .map(|(_, r)| *r)
                    .collect();
                let got = b
                    .list_in(&h.l, &(e as u32))
                    .get()
                    .unwrap()
                    .unwrap_or_default();
                assert!(
                    got.starts_with(&rounds) && got.len() <= rounds.len() + 1,
                    "kill {i}: key {k} epoch {e}: {got:?} vs completed {rounds:?}"
                );
            }
        }
    }
    assert!(
        read_progress(&progress).len() >= 3,
        "the child made progress"
    );
}

/// The metadata of a native checkpoint with the first file's key groups replaced by
/// `[start, end)` and the checksum recomputed (as a buggy or hostile writer would leave it).
fn with_file_key_groups(meta: &[u8], start: u32, end: u32) -> Vec<u8> {
    let u32_at = |b: &[u8], p: usize| u32::from_be_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    let mut b = meta.to_vec();
    // magic, version, max parallelism, range | registry | run count | file count | name
    let registry = u32_at(&b, 18);
    let name_at = 22 + registry + 4 + 4;
    let at = name_at + 4 + u32_at(&b, name_at);
    b[at..at + 4].copy_from_slice(&start.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&end.to_be_bytes());
    let n = b.len() - 4;
    let crc = crc32c::crc32c(&b[..n]);
    b[n..].copy_from_slice(&crc.to_be_bytes());
    b
}

/// A file recorded with key groups outside the writer's range (or a reversed range) is
/// corrupt metadata: restored, it would be skipped or clipped away and its state silently
/// lost. Found by the mutation test (integration-tests/tests/mutation.rs).
#[test]
fn file_key_groups_outside_the_writers_range_are_corrupt() {
    let range = KeyGroupRange::new(0, 64);
    let mut b = backend(range);
    let h = register(&mut b);
    write_round(&mut b, &h, 1, 0..200);
    let chk = b.checkpoint().unwrap();
    let meta = chk.metadata().to_vec();
    let first = &NativeCheckpointMeta::decode(&meta).unwrap().runs[0][0];
    let kgs = first.key_groups;
    assert_eq!(
        NativeCheckpointMeta::decode(&with_file_key_groups(&meta, kgs.start(), kgs.end()))
            .unwrap()
            .runs[0][0],
        *first,
        "the walk finds the field"
    );
    for (s, e) in [
        (u32::MAX - 7, kgs.end()),
        (0, u32::MAX - 7),
        (10, 5),
        (0, 65),
    ] {
        let err = NativeCheckpointMeta::decode(&with_file_key_groups(&meta, s, e));
        assert!(err.is_err(), "[{s}, {e}) accepted");
        assert!(
            err.unwrap_err().to_string().contains("outside"),
            "[{s}, {e})"
        );
    }
}

const RESTORE_CHILD_ENV: &str = "STATE_MMAP_RESTORE_CRASH_CHILD";
const RESTORED_ROUNDS: u64 = 3;

/// `S <n>` when the restoring child starts restoring into `r<n>`, `F <n>` once it flushed a
/// write on top of the restored state.
fn restore_progress(root: &Path) -> Vec<(char, u64)> {
    fs::read_to_string(root.join("restore-progress"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (step, n) = l.split_once(' ')?;
            Some((step.chars().next()?, n.parse().ok()?))
        })
        .collect()
}

/// The restoring child: restores the checkpoint in `root` (`meta`, files in `shared`) into
/// fresh directories `r<n>` one after the other, writes on top, flushes, and records each
/// step, until it is killed.
fn restore_child(root: &Path) {
    let meta = fs::read(root.join("meta")).unwrap();
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("restore-progress"))
        .unwrap();
    loop {
        let n = restore_progress(root)
            .iter()
            .filter(|(s, _)| *s == 'S')
            .count() as u64;
        writeln!(log, "S {n}").unwrap();
        log.sync_all().unwrap();
        let mut b = crash_backend(&root.join(format!("r{n}")));
        b.restore_native(sources(std::slice::from_ref(&meta), &root.join("shared")))
            .unwrap();
        let h = register(&mut b);
        b.set_current_key(0).unwrap();
        b.value(&h.v).update(1000).unwrap();
        b.flush().unwrap();
        writeln!(log, "F {n}").unwrap();
        log.sync_all().unwrap();
    }
}

/// A restore links the checkpoint's files into the store and returns before they are synced
/// (the manifest thread syncs them before the manifest that names them). Killed at any point
/// of restores, writes and flushes, a store reopens without error to either nothing (the
/// restore's manifest was not written yet) or the whole restored state, plus the write on top
/// once its flush returned; the checkpoint's files are never damaged.
#[test]
fn sigkill_during_restores_leaves_stores_that_reopen_empty_or_whole() {
    if let Ok(dir) = std::env::var(RESTORE_CHILD_ENV) {
        restore_child(Path::new(&dir));
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("shared");
    fs::create_dir(&shared).unwrap();
    {
        let mut b = crash_backend(&root.path().join("source"));
        let h = register(&mut b);
        for round in 0..RESTORED_ROUNDS {
            write_round(&mut b, &h, round, 0..KEYS);
            b.flush().unwrap();
        }
        let chk = b.checkpoint().unwrap();
        assert!(chk.files().len() > 1, "{} files", chk.files().len());
        upload(&chk, &shared, &mut HashSet::new());
        fs::write(root.path().join("meta"), chk.metadata()).unwrap();
    }
    // Each child is killed a delay after it recorded 1-4 steps of its own: the kills land in
    // restores, writes and flushes, after some restores finished.
    let delays = [3u64, 0, 11, 1, 7, 2, 15, 5];
    for (i, delay) in delays.into_iter().enumerate() {
        let before = restore_progress(root.path()).len() + i % 4;
        kill_after(
            "sigkill_during_restores_leaves_stores_that_reopen_empty_or_whole",
            (RESTORE_CHILD_ENV, root.path()),
            || restore_progress(root.path()).len() > before,
            Duration::from_millis(1),
            Duration::from_millis(delay),
        );
    }
    let progress = restore_progress(root.path());
    let started: Vec<u64> = progress
        .iter()
        .filter(|(s, _)| *s == 'S')
        .map(|(_, n)| *n)
        .collect();
    let flushed: HashSet<u64> = progress
        .iter()
        .filter(|(s, _)| *s == 'F')
        .map(|(_, n)| *n)
        .collect();
    assert!(!flushed.is_empty(), "no restore finished: {progress:?}");
    let (mut empty, mut whole) = (0, 0);
    for n in started {
        let dir = root.path().join(format!("r{n}"));
        let mut b = crash_backend(&dir);
        let h = register(&mut b);
        b.set_current_key(1).unwrap();
        if b.value(&h.v).get().unwrap().is_none() {
            assert!(!flushed.contains(&n), "r{n}: flushed, reopened empty");
            empty += 1;
            continue;
        }
        whole += 1;
        assert_eq!(
            check_round(&mut b, &h, RESTORED_ROUNDS, 1..KEYS),
            KEYS as usize - 1
        );
        b.set_current_key(0).unwrap();
        let v = b.value(&h.v).get().unwrap();
        if flushed.contains(&n) {
            assert_eq!(v, Some(1000), "r{n}: the flushed write on top");
        } else {
            assert!(
                v == Some(1000) || v == Some(RESTORED_ROUNDS - 1),
                "r{n}: key 0 has {v:?}"
            );
        }
    }
    assert!(whole > 0, "{empty} empty, {whole} whole");
    // The checkpoint still restores whole.
    let meta = fs::read(root.path().join("meta")).unwrap();
    let mut b = crash_backend(&root.path().join("last"));
    b.restore_native(sources(&[meta], &shared)).unwrap();
    let h = register(&mut b);
    assert_eq!(
        check_round(&mut b, &h, RESTORED_ROUNDS, 0..KEYS),
        KEYS as usize
    );
}
