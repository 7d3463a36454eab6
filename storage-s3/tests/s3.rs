//! Tests against a real S3-compatible server (SeaweedFS, started by `scripts/test`), plus the
//! bounded-failure tests for unreachable endpoints, which need no server.
//!
//! Without `FLOWSTATE_S3_TEST_ENDPOINT` the server tests print a notice and pass, unless
//! `FLOWSTATE_REQUIRE_S3=1` or `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::integration::*;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use storage_s3::{Error, ErrorKind, Storage, StorageConfig, StoreKind};

use common::{assert_same_file, random_file, s3_env, unique, S3Env, WeedServer};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn s3_conformance() {
    let Some(env) = s3_env("s3_conformance") else {
        return;
    };
    let storage = env.storage(&unique("conformance"));
    assert_eq!(storage.kind(), StoreKind::S3);
    let store = storage.scoped_store();
    // SeaweedFS 4.48 answers a list with start-after `p/a` without the keys under `p/a/` (it
    // treats the offset as a directory to skip); object_store's suite checks exactly that case,
    // so run it with `list_with_offset` done client-side (the trait's default) ...
    put_get_delete_list(&OffsetViaList(store.clone())).await;
    // ... and check the server's own offset listing on the cases it gets right.
    list_with_offset_exclusivity(store.as_ref()).await;
    get_opts(store.as_ref()).await;
    list_uses_directories_correctly(store.as_ref()).await;
    list_with_delimiter(store.as_ref()).await;
    rename_and_copy(store.as_ref()).await;
    stream_get(store.as_ref()).await;
    put_opts(store.as_ref(), true).await;
    multipart_race_condition(store.as_ref(), true).await;
    multipart_out_of_order(store.as_ref()).await;
    put_get_attributes(store.as_ref()).await;
    storage
        .delete_prefix(&storage.path("test_dir").unwrap())
        .await
        .ok();
}

/// Delegates everything but `list_with_offset`, which falls back to the trait's default (list
/// and filter on the client).
#[derive(Debug)]
struct OffsetViaList(Arc<dyn ObjectStore>);

impl std::fmt::Display for OffsetViaList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OffsetViaList({})", self.0)
    }
}

#[async_trait::async_trait]
impl ObjectStore for OffsetViaList {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

#[tokio::test]
async fn s3_multipart_upload_64_mib_byte_for_byte() {
    let Some(env) = s3_env("s3_multipart_upload_64_mib_byte_for_byte") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let storage = env.storage(&unique("big"));
    let len = 64 * MIB + 12345;
    let src = random_file(dir.path(), "src", len, 64);
    let path = storage.path("job/chk-1/state-0").unwrap();
    let up = storage.upload_file(&src, &path).await.unwrap();
    assert_eq!(up.parts, len.div_ceil(5 * MIB));
    assert_eq!(up.checksum.len, len as u64);
    assert_eq!(storage.store().head(&path).await.unwrap().size, len as u64);

    let dst = dir.path().join("dst");
    let got = storage
        .download_file(&path, &dst, Some(up.checksum))
        .await
        .unwrap();
    assert_eq!(got, up.checksum);
    assert_same_file(&src, &dst);
    storage.verify(&path, up.checksum).await.unwrap();
    assert_eq!(
        storage
            .delete_prefix(&storage.path("job").unwrap())
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn s3_small_files_carry_their_checksum() {
    let Some(env) = s3_env("s3_small_files_carry_their_checksum") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let storage = env.storage(&unique("small"));
    let src = random_file(dir.path(), "src", 100_000, 7);
    let path = storage.path("job/chk-1/small").unwrap();
    let up = storage.upload_file(&src, &path).await.unwrap();
    assert_eq!(up.parts, 0);
    // The checksum travels with the object: a read without an expected value is still verified.
    let dst = dir.path().join("dst");
    assert_eq!(
        storage.download_file(&path, &dst, None).await.unwrap(),
        up.checksum
    );
    assert_same_file(&src, &dst);

    // Same bytes length, other contents, stale checksum metadata: detected.
    let mut attributes = Attributes::new();
    attributes.insert(
        Attribute::Metadata(storage_s3::CHECKSUM_METADATA_KEY.into()),
        format!("{:08x}", up.checksum.crc32c).into(),
    );
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    storage
        .store()
        .put_opts(&path, Bytes::from(vec![0u8; 100_000]).into(), opts)
        .await
        .unwrap();
    let err = storage.download_file(&path, &dst, None).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_same_file(&src, &dst); // untouched
    let err = storage
        .get_verified(&path, None, u64::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_create_only_race_has_exactly_one_winner() {
    let Some(env) = s3_env("s3_create_only_race_has_exactly_one_winner") else {
        return;
    };
    let storage = env.storage(&unique("race"));
    for round in 0..10 {
        let path = storage.path(&format!("job/chk-{round}/_metadata")).unwrap();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = (0..2u8)
            .map(|i| {
                let (storage, path, barrier) = (storage.clone(), path.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    storage.put_if_absent(&path, vec![i; 1000]).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(_) => winners.push(i as u8),
                Err(e) => assert!(
                    matches!(e, Error::AlreadyExists { .. }),
                    "round {round}: {e}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let stored = storage.get_verified(&path, None, 10_000).await.unwrap();
        assert_eq!(&stored[..], &[winners[0]; 1000][..]);
    }
}

#[tokio::test]
async fn s3_list_and_delete_prefix() {
    let Some(env) = s3_env("s3_list_and_delete_prefix") else {
        return;
    };
    let storage = env.storage(&unique("list"));
    let names = [
        "job/chk-1/_metadata",
        "job/chk-1/a",
        "job/chk-1/sub/b",
        "job/chk-10/_metadata",
        "job/shared/x",
    ];
    for p in names {
        storage
            .put(&storage.path(p).unwrap(), p.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let root = storage.root().to_string();
    let chk1 = storage.path("job/chk-1").unwrap();
    let listed: Vec<String> = storage
        .list(&chk1)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    assert_eq!(
        listed,
        ["job/chk-1/_metadata", "job/chk-1/a", "job/chk-1/sub/b"]
            .map(|p| format!("{root}/{p}"))
            .to_vec()
    );
    let children = storage
        .list_children(&storage.path("job").unwrap())
        .await
        .unwrap();
    let dirs: Vec<String> = children
        .common_prefixes
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(
        dirs,
        ["job/chk-1", "job/chk-10", "job/shared"]
            .map(|p| format!("{root}/{p}"))
            .to_vec()
    );
    assert_eq!(storage.delete_prefix(&chk1).await.unwrap(), 3);
    assert!(storage.list(&chk1).await.unwrap().is_empty());
    assert_eq!(
        storage
            .list(&storage.path("job").unwrap())
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        storage
            .delete_prefix(&storage.path("job").unwrap())
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn s3_bad_credentials_fail_fast_without_leaking_them() {
    let Some(env) = s3_env("s3_bad_credentials_fail_fast_without_leaking_them") else {
        return;
    };
    let secret = "wrong-secret-4f1d2c";
    let bad = S3Env {
        secret_key: secret.into(),
        ..env.clone()
    };
    let config = bad.config(&unique("badcreds"));
    assert!(!format!("{config:?}").contains(secret));
    let storage = Storage::from_config(&config).unwrap();
    assert!(!format!("{storage:?}").contains(secret));
    let start = Instant::now();
    let err = storage
        .put(&storage.path("x").unwrap(), vec![1, 2, 3])
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let shown = format!("{err} / {err:?}");
    assert!(!shown.contains(secret), "secret leaked: {shown}");
    assert!(
        shown.contains(&env.bucket) && shown.contains("put"),
        "{shown}"
    );
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    // One line a person reads: the status and the server's code and message, no XML.
    let line = err.to_string();
    assert!(!line.contains('<') && !line.contains('\n'), "{line}");
    assert!(
        line.contains("403 Forbidden: SignatureDoesNotMatch: "),
        "{line}"
    );

    // A bucket that does not exist is a clear error too.
    let mut config = env.config("x");
    config.url = "s3://no-such-bucket-flowstate/x".into();
    config.retry.max_retries = 1;
    let storage = Storage::from_config(&config).unwrap();
    let err = storage
        .get_verified(&storage.path("y").unwrap(), None, 10)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no-such-bucket-flowstate"),
        "{err}"
    );
    let line = err.to_string();
    assert!(!line.contains('<') && !line.contains('\n'), "{line}");
}

/// An endpoint where nothing listens: connection refused, retried briefly, then a clear error.
#[tokio::test]
async fn unreachable_endpoint_fails_in_bounded_time() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there now
    let mut config = StorageConfig::new("s3://bucket/prefix");
    config.s3.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.s3.allow_http = Some(true);
    config.s3.from_env = Some(false);
    config.s3.region = Some("us-east-1".into());
    config.s3.access_key_id = Some("key".into());
    config.s3.secret_access_key = Some("secret-value-xyz".into());
    config.retry.max_retries = 2;
    config.retry.init_backoff = Duration::from_millis(50);
    config.retry.retry_timeout = Duration::from_secs(5);
    let storage = Storage::from_config(&config).unwrap();
    let start = Instant::now();
    let err = storage
        .put(&storage.path("a").unwrap(), vec![1])
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("s3://bucket/prefix") && msg.contains("prefix/a"),
        "{msg}"
    );
    assert!(!msg.contains("secret-value-xyz"));
    assert_eq!(err.kind(), ErrorKind::Unavailable);
}

/// An endpoint that accepts connections but never answers: the request timeout ends it.
#[tokio::test]
async fn silent_endpoint_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // accept and never answer
        }
    });
    let mut config = StorageConfig::new("s3://bucket");
    config.s3.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.s3.allow_http = Some(true);
    config.s3.from_env = Some(false);
    config.s3.region = Some("us-east-1".into());
    config.s3.access_key_id = Some("key".into());
    config.s3.secret_access_key = Some("secret".into());
    config.http.request_timeout = Duration::from_secs(1);
    config.retry.max_retries = 1;
    config.retry.init_backoff = Duration::from_millis(50);
    config.retry.retry_timeout = Duration::from_secs(3);
    let storage = Storage::from_config(&config).unwrap();
    let start = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        storage.get_verified(&storage.path("a").unwrap(), None, 10),
    )
    .await
    .expect("the request hung: no timeout fired");
    let err = result.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    hold.abort();
}

/// A private SeaweedFS for the tests that kill the server, or `None` when the `weed` binary is
/// not available (then the S3 rules of `s3_env` decide between skip and failure).
fn private_server(test: &str) -> Option<WeedServer> {
    let env = s3_env(test)?;
    let weed = WeedServer::binary();
    if weed.is_none() {
        let required = std::env::var("FLOWSTATE_REQUIRE_S3").is_ok_and(|v| v != "0");
        assert!(
            !required,
            "{test}: FLOWSTATE_WEED_BIN is not set or missing; scripts/test exports it"
        );
        common::notice(&format!(
            "NOTICE: skipping {test}: FLOWSTATE_WEED_BIN not set (S3 endpoint {})",
            env.endpoint
        ));
    }
    Some(WeedServer::start(weed?))
}

fn fault_config(server: &WeedServer, prefix: &str) -> StorageConfig {
    let mut config = server.env().config(prefix);
    config.transfer.part_size = 5 * MIB;
    config.transfer.max_concurrency = 1;
    config.http.connect_timeout = Duration::from_secs(1);
    config.http.request_timeout = Duration::from_secs(10);
    config.retry.max_retries = 3;
    config.retry.init_backoff = Duration::from_millis(100);
    config.retry.max_backoff = Duration::from_millis(500);
    config.retry.retry_timeout = Duration::from_secs(3);
    config
}

/// Kills the server in the middle of a multipart upload: the upload fails with a clear error in
/// bounded time, and after a restart no object is visible at the path and a retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_upload_then_retry_succeeds() {
    let Some(mut server) = private_server("s3_server_killed_mid_upload_then_retry_succeeds") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = random_file(dir.path(), "src", 80 * MIB, 80);
    let storage = Storage::from_config(&fault_config(&server, "fault")).unwrap();
    let path = storage.path("job/chk-1/big").unwrap();

    let upload = {
        let (storage, src, path) = (storage.clone(), src.clone(), path.clone());
        tokio::spawn(async move { storage.upload_file(&src, &path).await })
    };
    // Kill it once the upload is under way (its first parts are on the server).
    server.wait_for_multipart_upload(Duration::from_secs(30));
    assert!(
        !upload.is_finished(),
        "the upload finished before the server was killed"
    );
    server.kill();
    let killed = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("upload hung after the server died")
        .unwrap()
        .unwrap_err();
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    assert!(matches!(err, Error::UploadFailed { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("job/chk-1/big") && msg.contains("multipart upload"),
        "{msg}"
    );

    server.restart();
    // What follows checks correctness after the restart, not bounded failure: a restarted
    // server can take seconds to allocate its first volume again, so the fault config's tight
    // timeouts (a 10 s request, 3 s of retries) would make the retry fail on a slow start.
    let mut relaxed = fault_config(&server, "fault");
    relaxed.http.request_timeout = Duration::from_secs(120);
    relaxed.retry.retry_timeout = Duration::from_secs(120);
    let storage = Storage::from_config(&relaxed).unwrap();
    let err = storage.store().head(&path).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
    assert!(storage
        .list(&storage.path("job").unwrap())
        .await
        .unwrap()
        .is_empty());

    let up = storage.upload_file(&src, &path).await.unwrap();
    let dst = dir.path().join("dst");
    storage
        .download_file(&path, &dst, Some(up.checksum))
        .await
        .unwrap();
    assert_same_file(&src, &dst);
}

/// A restart of the server within the retry window is ridden out by object_store's retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_restart_within_retry_window_is_transparent() {
    let Some(mut server) = private_server("s3_server_restart_within_retry_window_is_transparent")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = random_file(dir.path(), "src", 40 * MIB, 40);
    let mut config = fault_config(&server, "restart");
    config.retry.max_retries = 20;
    config.retry.retry_timeout = Duration::from_secs(60);
    let storage = Storage::from_config(&config).unwrap();
    let path = storage.path("job/chk-1/big").unwrap();
    let upload = {
        let (storage, src, path) = (storage.clone(), src.clone(), path.clone());
        tokio::spawn(async move { storage.upload_file(&src, &path).await })
    };
    server.wait_for_multipart_upload(Duration::from_secs(30));
    server.kill();
    server.restart();
    let up = tokio::time::timeout(Duration::from_secs(120), upload)
        .await
        .expect("upload hung")
        .unwrap()
        .unwrap();
    let dst = dir.path().join("dst");
    storage
        .download_file(&path, &dst, Some(up.checksum))
        .await
        .unwrap();
    assert_same_file(&src, &dst);
}
