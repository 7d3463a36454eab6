//! Upload/download throughput of `Storage::upload_file` / `Storage::download_file` next to raw
//! object_store calls on the same bytes, in the same run.
//!
//! ```text
//! cargo bench -p storage-s3 --bench transfer                  # local disk; S3 too if configured
//! FLOWSTATE_BENCH_MIB=64 FLOWSTATE_BENCH_ROUNDS=5 cargo bench -p storage-s3 --bench transfer
//! ```
//!
//! S3 runs when `FLOWSTATE_S3_TEST_ENDPOINT`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are
//! set (e.g. `eval "$(scripts/s3-server start)"`), against bucket `FLOWSTATE_S3_TEST_BUCKET`.
//!
//! Rows, each the median of the rounds:
//! - `raw put`: `ObjectStore::put` of the bytes held in memory (one request);
//! - `raw multipart`: object_store's `WriteMultipart` from memory, same part size/concurrency;
//! - `upload_file`: this crate, streaming from the file on disk with CRC32C;
//! - `raw get`: `ObjectStore::get(..).bytes()` into memory;
//! - `raw get + write file + fsync`: the same, then written to a local file and fsynced (what
//!   any download to disk costs at least);
//! - `download_file`: this crate, streaming into a file (fsynced, renamed) with CRC32C check.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use storage_s3::{Storage, StorageConfig};

fn main() {
    let mib: usize = env_or("FLOWSTATE_BENCH_MIB", 256);
    let rounds: usize = env_or("FLOWSTATE_BENCH_ROUNDS", 3);
    let part_mib: usize = env_or("FLOWSTATE_BENCH_PART_MIB", 16);
    let concurrency: usize = env_or("FLOWSTATE_BENCH_CONCURRENCY", 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let data = random_bytes(mib << 20);
    std::fs::write(&src, &data).unwrap();
    println!(
        "transfer benchmark: {mib} MiB object, parts of {part_mib} MiB, {concurrency} in flight, \
         median of {rounds} rounds"
    );

    let local = {
        let mut c = StorageConfig::new(format!("file://{}", dir.path().join("store").display()));
        c.transfer.part_size = part_mib << 20;
        c.transfer.max_concurrency = concurrency;
        c
    };
    let mut targets = vec![("local disk (fsync)", local)];
    if std::env::var("FLOWSTATE_BENCH_ONLY").is_ok_and(|v| v == "s3") {
        targets.clear();
    }
    if let (Ok(endpoint), Ok(key), Ok(secret)) = (
        std::env::var("FLOWSTATE_S3_TEST_ENDPOINT"),
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        let bucket =
            std::env::var("FLOWSTATE_S3_TEST_BUCKET").unwrap_or_else(|_| "flowstate-test".into());
        let mut c = StorageConfig::new(format!("s3://{bucket}/bench-{}", std::process::id()));
        c.s3.endpoint = Some(endpoint);
        c.s3.region = Some("us-east-1".into());
        c.s3.access_key_id = Some(key.into());
        c.s3.secret_access_key = Some(secret.into());
        c.s3.allow_http = Some(true);
        c.s3.from_env = Some(false);
        c.transfer.part_size = part_mib << 20;
        c.transfer.max_concurrency = concurrency;
        targets.push(("SeaweedFS loopback", c));
    } else {
        println!("(S3 skipped: FLOWSTATE_S3_TEST_ENDPOINT / AWS_* not set)");
    }

    for (name, config) in targets {
        let storage = Storage::from_config(&config).unwrap();
        rt.block_on(run(name, &storage, &src, &data, rounds, dir.path()));
        rt.block_on(storage.delete_prefix(&storage.path("bench").unwrap()))
            .unwrap();
    }
}

async fn run(
    name: &str,
    storage: &Storage,
    src: &std::path::Path,
    data: &Bytes,
    rounds: usize,
    dir: &std::path::Path,
) {
    let store = storage.store().clone();
    let path = storage.path("bench/object").unwrap();
    let dst = dir.join("dst");
    let part_size = storage.config().transfer.part_size;
    let concurrency = storage.config().transfer.max_concurrency;
    let len = data.len();
    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();

    let mut raw_put = Vec::new();
    let mut raw_multipart = Vec::new();
    let mut upload = Vec::new();
    let mut raw_get = Vec::new();
    let mut download = Vec::new();
    let mut raw_get_file = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        store
            .put(&path, PutPayload::from_bytes(data.clone()))
            .await
            .unwrap();
        raw_put.push(t.elapsed());

        let t = Instant::now();
        let mut w = WriteMultipart::new_with_chunk_size(
            store.put_multipart(&path).await.unwrap(),
            part_size,
        );
        let mut rest = data.clone();
        while !rest.is_empty() {
            w.wait_for_capacity(concurrency).await.unwrap();
            let n = rest.len().min(part_size);
            w.put(rest.split_to(n));
        }
        w.finish().await.unwrap();
        raw_multipart.push(t.elapsed());

        let t = Instant::now();
        let up = storage.upload_file(src, &path).await.unwrap();
        upload.push(t.elapsed());

        let t = Instant::now();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        raw_get.push(t.elapsed());
        assert_eq!(got.len(), len);
        drop(got);

        let t = Instant::now();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        let d = dst.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&d).unwrap();
            f.write_all(&got).unwrap();
            f.sync_all().unwrap();
        })
        .await
        .unwrap();
        raw_get_file.push(t.elapsed());
        std::fs::remove_file(&dst).unwrap();

        let t = Instant::now();
        storage
            .download_file(&path, &dst, Some(up.checksum))
            .await
            .unwrap();
        download.push(t.elapsed());
        std::fs::remove_file(&dst).unwrap();
    }
    rows.push(("raw put (1 request, from memory)", raw_put));
    rows.push(("raw multipart (WriteMultipart, from memory)", raw_multipart));
    rows.push(("upload_file (streamed from disk, crc32c)", upload));
    rows.push(("raw get (.bytes() into memory)", raw_get));
    rows.push(("raw get + write file + fsync", raw_get_file));
    rows.push(("download_file (to disk, crc32c, fsync)", download));

    println!("\n{name}");
    let mbps = |d: Duration| (len as f64 / (1 << 20) as f64) / d.as_secs_f64();
    for (label, mut times) in rows {
        times.sort();
        let median = times[times.len() / 2];
        let all: Vec<String> = times.iter().map(|d| format!("{:.0}", mbps(*d))).collect();
        println!(
            "  {label:<45} {:>7.0} MiB/s   (rounds: {})",
            mbps(median),
            all.join(", ")
        );
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random_bytes(len: usize) -> Bytes {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}
