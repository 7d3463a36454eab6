//! Tests against the local filesystem and the in-memory store: object_store's conformance suite
//! on the stores `Storage` builds, and the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::integration::*;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use storage_s3::{
    Checksum, Error, ErrorKind, LocalCopy, Storage, StorageConfig, StoreKind, TransferOptions,
};

use common::{assert_same_file, random_file};

fn local(dir: &std::path::Path) -> Storage {
    let url = format!("file://{}", dir.display());
    Storage::from_url(&url).unwrap()
}

/// Small parts so multipart code paths run on small files.
fn small_parts(storage: Storage) -> Storage {
    let mut t = TransferOptions::default();
    t.part_size = 1024 * 1024;
    t.max_concurrency = 3;
    storage.with_transfer_options(t).unwrap()
}

#[tokio::test]
async fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    let storage = local(&dir.path().join("root"));
    assert_eq!(storage.kind(), StoreKind::Local);
    let store = storage.scoped_store();
    put_get_delete_list(store.as_ref()).await;
    list_with_offset_exclusivity(store.as_ref()).await;
    get_opts(store.as_ref()).await;
    list_uses_directories_correctly(store.as_ref()).await;
    list_with_delimiter(store.as_ref()).await;
    rename_and_copy(store.as_ref()).await;
    copy_if_not_exists(store.as_ref()).await;
    copy_rename_nonexistent_object(store.as_ref()).await;
    stream_get(store.as_ref()).await;
    put_opts(store.as_ref(), false).await;
}

#[tokio::test]
async fn conformance_memory() {
    for url in ["memory://", "memory:///with/a/root"] {
        let storage = Storage::from_url(url).unwrap();
        let store = storage.scoped_store();
        put_get_delete_list(store.as_ref()).await;
        list_with_offset_exclusivity(store.as_ref()).await;
        get_opts(store.as_ref()).await;
        list_uses_directories_correctly(store.as_ref()).await;
        list_with_delimiter(store.as_ref()).await;
        rename_and_copy(store.as_ref()).await;
        copy_if_not_exists(store.as_ref()).await;
        stream_get(store.as_ref()).await;
        put_opts(store.as_ref(), true).await;
        put_get_attributes(store.as_ref()).await;
    }
}

/// Both kinds of store, each with a root prefix where the kind allows one.
fn storages(dir: &std::path::Path) -> Vec<Storage> {
    vec![
        small_parts(local(&dir.join("store"))),
        small_parts(Storage::from_url("memory:///ckpt").unwrap()),
    ]
}

/// A restore's downloads: `Linked` from a `file://` store is a hard link to the object's file
/// (no copy), still verified, and never a link to a replaced object's old bytes; elsewhere
/// (and `Cached` everywhere) a verified copy.
#[cfg(unix)]
#[tokio::test]
async fn linked_and_cached_downloads_are_verified_and_link_only_local_files() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    for storage in storages(dir.path()) {
        let local = storage.kind() == StoreKind::Local;
        let src = random_file(dir.path(), "run", 3 * 1024 * 1024 + 5, 7);
        let path = storage.path("job/shared/run-1").unwrap();
        let up = storage.upload_file(&src, &path).await.unwrap();
        for (i, copy) in [LocalCopy::Linked, LocalCopy::Cached]
            .into_iter()
            .enumerate()
        {
            let dst = dir.path().join(format!("run-{i}.down"));
            let got = storage
                .download_file_as(&path, &dst, Some(up.checksum), copy)
                .await
                .unwrap();
            assert_eq!(got, up.checksum, "{storage:?} {copy:?}");
            assert_same_file(&src, &dst);
            let links = std::fs::metadata(&dst).unwrap().nlink();
            let want = if local && copy == LocalCopy::Linked {
                2
            } else {
                1
            };
            assert_eq!(links, want, "{storage:?} {copy:?}: links of the download");
        }
        // A wrong expected checksum fails a linked download too, and leaves nothing behind.
        let dst = dir.path().join("run-bad.down");
        let wrong = Checksum {
            crc32c: up.checksum.crc32c ^ 1,
            len: up.checksum.len,
        };
        let err = storage
            .download_file_as(&path, &dst, Some(wrong), LocalCopy::Linked)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        assert!(!dst.exists(), "{storage:?}: a failed download left a file");
        // The link keeps the bytes it verified when the object is replaced.
        let first = dir.path().join("run-0.down");
        let src2 = random_file(dir.path(), "run2", 1000, 8);
        storage.upload_file(&src2, &path).await.unwrap();
        assert_same_file(&src, &first);
        std::fs::remove_file(&first).unwrap();
        let _ = std::fs::remove_file(dir.path().join("run-1.down"));
    }
}

#[tokio::test]
async fn upload_and_download_files() {
    let dir = tempfile::tempdir().unwrap();
    for storage in storages(dir.path()) {
        for (name, len, parts) in [
            ("empty", 0usize, 0usize),
            ("small", 1000, 0),
            ("exactly-one-part", 1024 * 1024, 0),
            ("multi", 5 * 1024 * 1024 + 123, 6),
        ] {
            let src = random_file(dir.path(), name, len, len as u64);
            let path = storage.path(&format!("job/chk-1/{name}")).unwrap();
            let up = storage.upload_file(&src, &path).await.unwrap();
            let expected = Checksum::of(&std::fs::read(&src).unwrap());
            assert_eq!(up.checksum, expected, "{storage:?} {name}");
            assert_eq!(up.parts, parts, "{storage:?} {name}");
            assert_eq!(storage.store().head(&path).await.unwrap().size, len as u64);

            let dst = dir.path().join(format!("{name}.down"));
            let got = storage
                .download_file(&path, &dst, Some(up.checksum))
                .await
                .unwrap();
            assert_eq!(got, expected);
            assert_same_file(&src, &dst);
            storage.verify(&path, expected).await.unwrap();

            // Overwrite with other contents.
            let src2 = random_file(dir.path(), &format!("{name}-2"), len + 7, 99);
            let up2 = storage.upload_file(&src2, &path).await.unwrap();
            let got2 = storage.download_file(&path, &dst, None).await.unwrap();
            assert_eq!(got2, up2.checksum);
            assert_same_file(&src2, &dst);
        }
        // Nothing but the downloads is left next to them (no temporary files).
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[tokio::test]
async fn corrupt_reads_are_detected_and_leave_the_destination_alone() {
    let dir = tempfile::tempdir().unwrap();
    let storage = local(&dir.path().join("store"));
    let src = random_file(dir.path(), "src", 3 * 1024 * 1024, 1);
    let path = storage.path("job/chk-1/file").unwrap();
    let up = storage.upload_file(&src, &path).await.unwrap();

    // Flip one byte of the stored object on disk.
    let on_disk = dir.path().join("store/job/chk-1/file");
    let mut data = std::fs::read(&on_disk).unwrap();
    data[1_000_000] ^= 0x40;
    std::fs::write(&on_disk, &data).unwrap();

    let dst = dir.path().join("dst");
    std::fs::write(&dst, b"previous contents").unwrap();
    let err = storage
        .download_file(&path, &dst, Some(up.checksum))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let msg = err.to_string();
    assert!(
        msg.contains("job/chk-1/file") && msg.contains("checksum mismatch"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous contents");
    assert!(matches!(
        storage.verify(&path, up.checksum).await,
        Err(Error::ChecksumMismatch { .. })
    ));
    assert!(matches!(
        storage
            .get_verified(&path, Some(up.checksum), u64::MAX)
            .await,
        Err(Error::ChecksumMismatch { .. })
    ));
    // A truncated object is caught by its length too.
    std::fs::write(&on_disk, &data[..1000]).unwrap();
    let err = storage
        .download_file(&path, &dst, Some(up.checksum))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[tokio::test]
async fn stored_checksum_metadata_is_verified_on_memory() {
    let storage = Storage::from_url("memory://").unwrap();
    let path = storage.path("a/b").unwrap();
    storage
        .put(&path, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    // No expected checksum given: the one stored with the object is used.
    assert_eq!(
        &storage.get_verified(&path, None, 100).await.unwrap()[..],
        b"hello"
    );
    // Replace the bytes behind its back, keeping the old checksum metadata.
    let mut attributes = Attributes::new();
    attributes.insert(
        Attribute::Metadata(storage_s3::CHECKSUM_METADATA_KEY.into()),
        format!("{:08x}", Checksum::of(b"hello").crc32c).into(),
    );
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    storage
        .store()
        .put_opts(&path, Bytes::from_static(b"jello").into(), opts)
        .await
        .unwrap();
    let err = storage.get_verified(&path, None, 100).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[tokio::test]
async fn create_only_put_race_has_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    for storage in storages(dir.path()) {
        for round in 0..20 {
            let path = storage.path(&format!("job/chk-{round}/_metadata")).unwrap();
            let tasks: Vec<_> = (0..2u8)
                .map(|i| {
                    let storage = storage.clone();
                    let path = path.clone();
                    tokio::spawn(async move { storage.put_if_absent(&path, vec![i; 100]).await })
                })
                .collect();
            let mut wins = Vec::new();
            for (i, task) in tasks.into_iter().enumerate() {
                match task.await.unwrap() {
                    Ok(_) => wins.push(i as u8),
                    Err(e) => {
                        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
                        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
                        assert!(e.to_string().contains("already exists"), "{e}");
                    }
                }
            }
            assert_eq!(wins.len(), 1, "{storage:?} round {round}: {wins:?}");
            let stored = storage.get_verified(&path, None, 1000).await.unwrap();
            assert_eq!(&stored[..], &[wins[0]; 100][..]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_put_race_multi_threaded() {
    let dir = tempfile::tempdir().unwrap();
    for storage in storages(dir.path()) {
        for round in 0..20 {
            let path = storage.path(&format!("race/{round}")).unwrap();
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let tasks: Vec<_> = (0..2u8)
                .map(|i| {
                    let (storage, path, barrier) = (storage.clone(), path.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        storage.put_if_absent(&path, vec![i; 10]).await.is_ok()
                    })
                })
                .collect();
            let mut wins = 0;
            for task in tasks {
                wins += usize::from(task.await.unwrap());
            }
            assert_eq!(wins, 1, "{storage:?} round {round}");
        }
    }
}

#[tokio::test]
async fn list_and_delete_prefix() {
    let dir = tempfile::tempdir().unwrap();
    for storage in storages(dir.path()) {
        for p in [
            "job/chk-1/_metadata",
            "job/chk-1/a",
            "job/chk-1/sub/b",
            "job/chk-10/_metadata",
            "job/shared/x",
            "other/y",
        ] {
            storage
                .put(&storage.path(p).unwrap(), p.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let chk1 = storage.path("job/chk-1").unwrap();
        let listed: Vec<String> = storage
            .list(&chk1)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        let root = storage.root().to_string();
        let full = |p: &str| {
            if root.is_empty() {
                p.to_owned()
            } else {
                format!("{root}/{p}")
            }
        };
        assert_eq!(
            listed,
            vec![
                full("job/chk-1/_metadata"),
                full("job/chk-1/a"),
                full("job/chk-1/sub/b")
            ]
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
            vec![full("job/chk-1"), full("job/chk-10"), full("job/shared")]
        );

        assert_eq!(storage.delete_prefix(&chk1).await.unwrap(), 3);
        assert!(storage.list(&chk1).await.unwrap().is_empty());
        // Segment-wise prefixes: chk-10 survives deleting chk-1.
        assert_eq!(
            storage
                .list(&storage.path("job").unwrap())
                .await
                .unwrap()
                .len(),
            2
        );
        // Deleting again, or a prefix that never existed, deletes nothing.
        assert_eq!(storage.delete_prefix(&chk1).await.unwrap(), 0);
        assert_eq!(
            storage
                .delete_prefix(&storage.path("nope").unwrap())
                .await
                .unwrap(),
            0
        );
        // The root itself and paths outside it are refused.
        let err = storage.delete_prefix(storage.root()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        if storage.kind() == StoreKind::Memory {
            let outside = Path::from("elsewhere/x");
            let err = storage.delete_prefix(&outside).await.unwrap_err();
            assert!(matches!(err, Error::OutsideRoot { .. }), "{err}");
            let err = storage.put(&outside, vec![1]).await.unwrap_err();
            assert!(matches!(err, Error::OutsideRoot { .. }), "{err}");
        }
    }
}

#[tokio::test]
async fn errors_name_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let storage = local(&dir.path().join("store"));
    let missing = storage.path("job/missing").unwrap();
    let err = storage.get_verified(&missing, None, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("job/missing"), "{err}");
    let err = storage
        .download_file(&missing, dir.path().join("x"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    let nofile = dir.path().join("does-not-exist");
    let err = storage
        .upload_file(&nofile, &storage.path("x").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist"), "{err}");

    let path = storage.path("big").unwrap();
    storage.put(&path, vec![0u8; 1000]).await.unwrap();
    let err = storage.get_verified(&path, None, 999).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                size: 1000,
                limit: 999,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn local_root_is_created_and_fsync_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a/b/c");
    let mut config = StorageConfig::new(root.to_str().unwrap());
    config.local.fsync = false;
    let storage = Storage::from_config(&config).unwrap();
    assert!(root.is_dir());
    storage
        .put(&storage.path("x/y").unwrap(), vec![1, 2, 3])
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("x/y")).unwrap(), vec![1, 2, 3]);

    let mut config = StorageConfig::new(format!("file://{}", dir.path().join("nope").display()));
    config.local.create_root = false;
    let err = Storage::from_config(&config).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn wraps_a_store_built_elsewhere() {
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let storage = Storage::from_store(store.clone(), Path::from("base"), "my-store");
    let path = storage.child(&["job", "state"]).unwrap();
    let up = storage.put(&path, vec![7; 10]).await.unwrap();
    assert_eq!(up.checksum, Checksum::of(&[7; 10]));
    assert_eq!(
        store
            .head(&Path::from("base/job/state"))
            .await
            .unwrap()
            .size,
        10
    );
    assert_eq!(
        storage
            .scoped_store()
            .head(&Path::from("job/state"))
            .await
            .unwrap()
            .size,
        10
    );
}

/// Replaces the object the first time a ranged GET arrives, i.e. in the middle of a parallel
/// download.
#[derive(Debug)]
struct ReplaceOnRangedGet {
    inner: object_store::memory::InMemory,
    replaced: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for ReplaceOnRangedGet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplaceOnRangedGet")
    }
}

#[async_trait::async_trait]
impl ObjectStore for ReplaceOnRangedGet {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.range.is_some()
            && !self
                .replaced
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let other = Bytes::from(vec![0xAB; 3 * 1024 * 1024]);
            self.inner.put(location, other.into()).await?;
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[tokio::test]
async fn object_replaced_during_parallel_download_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ReplaceOnRangedGet {
        inner: object_store::memory::InMemory::new(),
        replaced: false.into(),
    });
    let storage = small_parts(Storage::from_store(store, Path::from("r"), "replacing"));
    let src = random_file(dir.path(), "src", 3 * 1024 * 1024, 5);
    let path = storage.path("obj").unwrap();
    storage.upload_file(&src, &path).await.unwrap();
    let dst = dir.path().join("dst");
    std::fs::write(&dst, b"old").unwrap();
    let err = storage.download_file(&path, &dst, None).await.unwrap_err();
    assert!(err.to_string().contains("r/obj"), "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0);
}

/// Files (not directories) under `dir`, as paths relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_killed_upload_leaves_a_staging_file_that_the_sweep_removes() {
    if let Some(dir) = std::env::var_os("FLOWSTATE_STAGING_CHILD") {
        // The child process: upload a large file again and again until killed.
        let dir = std::path::PathBuf::from(dir);
        let storage = local(&dir.join("root"));
        let src = dir.join("big.bin");
        loop {
            storage
                .upload_file(&src, &storage.path("job/chk-3/data").unwrap())
                .await
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 64 << 20]).unwrap();
    let storage = local(&dir.path().join("root"));
    storage
        .put(&storage.path("job/chk-2/_metadata").unwrap(), b"m".to_vec())
        .await
        .unwrap();
    let root = dir.path().join("root");
    // A child process uploads until it is killed with SIGKILL while a staging file exists.
    let staging = || -> Vec<String> {
        files_under(&root)
            .into_iter()
            .filter(|f| f.contains('#'))
            .collect()
    };
    // Kill the child while a staging file exists. A kill can land just after an upload's
    // rename and before the next one starts: then nothing is staged, and it goes again.
    let mut staged = Vec::new();
    for _attempt in 0..5 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_killed_upload_leaves_a_staging_file_that_the_sweep_removes",
                "--nocapture",
            ])
            .env("FLOWSTATE_STAGING_CHILD", dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while staging().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no staging file appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        staged = staging();
        if !staged.is_empty() {
            break;
        }
    }
    assert!(
        !staged.is_empty(),
        "no kill left a staging file in 5 attempts"
    );
    assert!(staged[0].starts_with("job/chk-3/data#"), "{staged:?}");
    // Listings never show it, so deleting the prefix leaves it behind.
    let listed = storage.list(&storage.path("job").unwrap()).await.unwrap();
    assert!(listed.iter().all(|m| !m.location.as_ref().contains('#')));
    storage
        .delete_prefix(&storage.path("job/chk-3").unwrap())
        .await
        .unwrap();
    assert!(files_under(&root).iter().any(|f| f.contains('#')));
    // The sweep removes staging files only, and only under the prefix it is given.
    std::fs::write(root.join("job/chk-2/notes#draft"), b"kept").unwrap();
    std::fs::create_dir_all(root.join("other")).unwrap();
    std::fs::write(root.join("other/x#1"), b"other job").unwrap();
    // Empty folders (a checkpoint folder a kill left with no file) go too, nested ones first.
    std::fs::create_dir_all(root.join("job/chk-9/empty")).unwrap();
    std::fs::create_dir_all(root.join("other/empty")).unwrap();
    let removed = storage
        .remove_staging_files(&storage.path("job").unwrap())
        .unwrap();
    assert!(removed >= 1, "{removed}");
    let left = files_under(&root);
    assert!(
        left.iter()
            .all(|f| !f.starts_with("job/") || !f.contains('#') || f.ends_with("#draft")),
        "{left:?}"
    );
    assert!(
        left.contains(&"job/chk-2/_metadata".to_string()),
        "{left:?}"
    );
    assert!(
        left.contains(&"job/chk-2/notes#draft".to_string()),
        "{left:?}"
    );
    assert!(left.contains(&"other/x#1".to_string()), "{left:?}");
    assert!(
        !root.join("job/chk-3").exists(),
        "the killed upload's folder"
    );
    assert!(!root.join("job/chk-9").exists(), "an empty folder");
    assert!(root.join("job/chk-2").is_dir() && root.join("job").is_dir());
    assert!(root.join("other/empty").is_dir(), "outside the prefix");
    // A prefix with nothing under it, and stores without staging files, remove nothing.
    assert_eq!(
        storage
            .remove_staging_files(&storage.path("nothing/here").unwrap())
            .unwrap(),
        0
    );
    let mem = Storage::from_url("memory:///x").unwrap();
    assert_eq!(
        mem.remove_staging_files(&mem.path("job").unwrap()).unwrap(),
        0
    );
}
