//! The helpers on [`Storage`]: puts with checksums, create-only puts, file uploads and
//! downloads, verified reads, listing and prefix deletion.

use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetResult, GetResultPayload, ListResult, ObjectMeta, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tokio::task::JoinSet;

use crate::checksum::{Checksum, CHECKSUM_METADATA_KEY};
use crate::error::{io_error, store_error, Error, Result};
use crate::storage::Storage;

/// Size of the buffers used to copy local files.
const COPY_BUFFER: usize = 4 * 1024 * 1024;

/// How [`Storage::download_file_as`](crate::Storage::download_file_as) leaves the local file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCopy {
    /// Fsynced, and its directory, before the download returns: it survives a power loss.
    Durable,
    /// Left in the page cache for the kernel to write back: for working copies of objects the
    /// store keeps (a restore's files), which their user makes durable, if ever, when it
    /// needs to. About as fast as the copy itself, where an fsync waits for the disk.
    Cached,
    /// From a `file://` store on the same filesystem, a hard link to the object's file (no
    /// copy; still read once to verify its size and checksum); otherwise as
    /// [`LocalCopy::Cached`]. The caller must never write to the file (reading, renaming and
    /// deleting it are fine: the store's objects are written once and replaced by renames), or
    /// it would change the stored object. What a restore of immutable files wants: state-mmap
    /// maps its sorted runs read-only.
    Linked,
}

/// What a successful put or upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Uploaded {
    /// The object's path.
    pub path: Path,
    /// CRC32C and length of exactly the bytes handed to the store. Record it (the checkpoint
    /// metadata does) and pass it to [`Storage::download_file`] / [`Storage::get_verified`] /
    /// [`Storage::verify`] to check reads end to end.
    pub checksum: Checksum,
    /// The object's entity tag, if the store returned one.
    pub e_tag: Option<String>,
    /// The object's version, if the store is versioned.
    pub version: Option<String>,
    /// The number of multipart parts; 0 when the object was written with a single put.
    pub parts: usize,
}

impl Uploaded {
    pub(crate) fn new(path: &Path, checksum: Checksum, result: PutResult, parts: usize) -> Self {
        Self {
            path: path.clone(),
            checksum,
            e_tag: result.e_tag,
            version: result.version,
            parts,
        }
    }
}

/// Why a multipart upload stopped.
enum Failure {
    Store(object_store::Error),
    Local(Error),
}

impl Storage {
    fn checksum_attributes(&self, checksum: Checksum) -> Attributes {
        let mut attributes = Attributes::new();
        if self.kind.keeps_user_metadata() {
            attributes.insert(
                Attribute::Metadata(CHECKSUM_METADATA_KEY.into()),
                checksum.crc_hex().into(),
            );
        }
        attributes
    }

    async fn put_with_mode(&self, path: &Path, bytes: Bytes, mode: PutMode) -> Result<Uploaded> {
        self.check_strictly_inside(path)?;
        let checksum = Checksum::of(&bytes);
        let opts = PutOptions {
            mode,
            attributes: self.checksum_attributes(checksum),
            ..PutOptions::default()
        };
        let result = self
            .store
            .put_opts(path, PutPayload::from_bytes(bytes), opts)
            .await
            .map_err(|e| store_error(&self.url, "put", path, e))?;
        Ok(Uploaded::new(path, checksum, result, 0))
    }

    /// Writes `bytes` to `path`, replacing any object there. On stores that keep user metadata
    /// the checksum is stored with the object too (see [`Checksum`]).
    pub async fn put(&self, path: &Path, bytes: impl Into<Bytes>) -> Result<Uploaded> {
        self.put_with_mode(path, bytes.into(), PutMode::Overwrite)
            .await
    }

    /// Writes `bytes` to `path` only if no object exists there (`PutMode::Create`): of several
    /// writers racing for the same path exactly one succeeds; the others get
    /// [`Error::AlreadyExists`]. This is how a checkpoint's `_metadata` is committed.
    ///
    /// S3 answers `409 Conflict` to a conditional write racing another one still in progress,
    /// which object_store reports as "already exists" although the other write may yet fail.
    /// So a loss is confirmed by checking that the object exists; if it does not, the put is
    /// tried again (up to three times).
    pub async fn put_if_absent(&self, path: &Path, bytes: impl Into<Bytes>) -> Result<Uploaded> {
        let bytes = bytes.into();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .put_with_mode(path, bytes.clone(), PutMode::Create)
                .await
            {
                Err(Error::AlreadyExists { url, path: p }) => match self.store.head(path).await {
                    Err(object_store::Error::NotFound { .. }) if attempt < 3 => {
                        tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                    }
                    _ => return Err(Error::AlreadyExists { url, path: p }),
                },
                other => return other,
            }
        }
    }

    /// Uploads the local file `file` to `path`, replacing any object there.
    ///
    /// Files up to [`TransferOptions::part_size`](crate::TransferOptions::part_size) go in one
    /// put; larger ones are streamed with a multipart upload, reading one part at a time and
    /// keeping at most [`TransferOptions::max_concurrency`](crate::TransferOptions::max_concurrency)
    /// parts in flight, so memory use stays bounded whatever the file size. Transient request
    /// failures are retried by object_store (see [`RetryOptions`](crate::RetryOptions)). If the
    /// upload still fails it is aborted and [`Error::UploadFailed`] is returned: no object (and no
    /// partial object) appears at `path`, and calling `upload_file` again starts afresh.
    ///
    /// The CRC32C of the bytes sent is computed on the way and returned; after a multipart
    /// upload the object's size is checked against the bytes sent.
    ///
    /// If the returned future is dropped before it finishes, no object appears either; on S3 the
    /// parts already sent stay as an incomplete multipart upload (invisible; a bucket lifecycle
    /// rule for incomplete uploads removes them).
    pub async fn upload_file(&self, file: impl AsRef<FsPath>, path: &Path) -> Result<Uploaded> {
        self.check_strictly_inside(path)?;
        let file_path = file.as_ref().to_owned();
        let part_size = self.config.transfer.part_size;
        let (file, len) = {
            let p = file_path.clone();
            blocking(&self.url, "open", path, move || {
                let f = std::fs::File::open(&p).map_err(|e| io_error("open", &p, e))?;
                let len = f.metadata().map_err(|e| io_error("stat", &p, e))?.len();
                Ok((f, len))
            })
            .await?
        };
        if len <= part_size as u64 {
            let p = file_path.clone();
            let bytes = blocking(&self.url, "read", path, move || {
                let mut buf = Vec::with_capacity(len as usize);
                let mut file = file;
                file.read_to_end(&mut buf)
                    .map_err(|e| io_error("read", &p, e))?;
                Ok(Bytes::from(buf))
            })
            .await?;
            if bytes.len() <= part_size {
                return self.put(path, bytes).await;
            }
            // The file grew past the part size since it was opened: fall through to multipart.
        }
        self.upload_multipart(&file_path, path).await
    }

    async fn upload_multipart(&self, file_path: &FsPath, path: &Path) -> Result<Uploaded> {
        let part_size = self.config.transfer.part_size;
        let concurrency = self.config.transfer.max_concurrency;
        let mut upload = self
            .store
            .put_multipart_opts(path, PutMultipartOptions::default())
            .await
            .map_err(|e| store_error(&self.url, "start multipart upload of", path, e))?;

        // A blocking reader fills one part at a time; the channel holds one more part.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let reader_path = file_path.to_owned();
        let reader = tokio::task::spawn_blocking(move || read_parts(&reader_path, part_size, tx));

        let mut in_flight: JoinSet<object_store::Result<()>> = JoinSet::new();
        let mut parts = 0usize;
        let outcome: std::result::Result<Checksum, Failure> = async {
            while let Some(part) = rx.recv().await {
                while in_flight.len() >= concurrency {
                    join_one(&mut in_flight, self, path).await?;
                }
                in_flight.spawn(upload.put_part(PutPayload::from_bytes(part)));
                parts += 1;
            }
            while !in_flight.is_empty() {
                join_one(&mut in_flight, self, path).await?;
            }
            // The channel closed: the reader finished or failed.
            match reader.await {
                Ok(Ok(checksum)) => Ok(checksum),
                Ok(Err(e)) => Err(Failure::Local(e)),
                Err(e) => Err(Failure::Local(self.task_error("read", path, &e))),
            }
        }
        .await;

        let checksum = match outcome {
            Ok(checksum) => checksum,
            Err(failure) => {
                drop(rx); // stops the reader if it is still running
                in_flight.shutdown().await;
                let abort = upload.abort().await.err().map(|e| e.to_string());
                return Err(match failure {
                    Failure::Store(source) => Error::UploadFailed {
                        url: self.url.clone(),
                        path: path.to_string(),
                        file: file_path.to_owned(),
                        source: Box::new(source),
                        abort_error: abort,
                    },
                    Failure::Local(e) => e,
                });
            }
        };
        let result = match upload.complete().await {
            Ok(result) => result,
            Err(source) => {
                let abort = upload.abort().await.err().map(|e| e.to_string());
                return Err(Error::UploadFailed {
                    url: self.url.clone(),
                    path: path.to_string(),
                    file: file_path.to_owned(),
                    source: Box::new(source),
                    abort_error: abort,
                });
            }
        };
        let meta = self
            .store
            .head(path)
            .await
            .map_err(|e| store_error(&self.url, "head", path, e))?;
        if meta.size != checksum.len {
            return Err(Error::SizeMismatch {
                url: self.url.clone(),
                path: path.to_string(),
                expected: checksum.len,
                actual: meta.size,
            });
        }
        Ok(Uploaded::new(path, checksum, result, parts))
    }

    fn task_error(
        &self,
        operation: &'static str,
        path: &Path,
        e: &tokio::task::JoinError,
    ) -> Error {
        Error::Task {
            url: self.url.clone(),
            operation,
            path: path.to_string(),
            reason: e.to_string(),
        }
    }

    async fn get(&self, path: &Path) -> Result<GetResult> {
        self.check_inside(path)?;
        self.store
            .get(path)
            .await
            .map_err(|e| store_error(&self.url, "get", path, e))
    }

    /// Downloads the object at `path` into the local file `file`, streaming (the object is never
    /// held in memory whole). Objects larger than
    /// [`TransferOptions::part_size`](crate::TransferOptions::part_size) on HTTP and memory stores
    /// are fetched with up to `max_concurrency` parallel range requests, all pinned with
    /// `If-Match` to the entity tag of the first response, so an object replaced during the
    /// download is an error, never a mix of two versions.
    ///
    /// The data goes to a temporary file next to `file`, which is fsynced and renamed over `file`
    /// only once every byte arrived and the checksum matched, so `file` is either the complete
    /// verified object or untouched. The checksum compared against is `expected` if given, else
    /// the one stored with the object (stores that keep user metadata, single-put objects); with
    /// neither, the computed checksum is only returned. Returns the checksum of the bytes read.
    pub async fn download_file(
        &self,
        path: &Path,
        file: impl AsRef<FsPath>,
        expected: Option<Checksum>,
    ) -> Result<Checksum> {
        self.download_file_as(path, file, expected, LocalCopy::Durable)
            .await
    }

    /// [`Self::download_file`], leaving the file as `copy` says: fsynced (with its directory)
    /// before this returns, in the page cache for the kernel to write back, or a hard link to
    /// a local store's file. Either way `file` appears only complete and verified; a file not
    /// [`LocalCopy::Durable`] may be lost or incomplete after a power loss (not after a
    /// process crash), so its user must make it durable before anything durable names it.
    pub async fn download_file_as(
        &self,
        path: &Path,
        file: impl AsRef<FsPath>,
        expected: Option<Checksum>,
        copy: LocalCopy,
    ) -> Result<Checksum> {
        let sync = copy == LocalCopy::Durable;
        let dest = file.as_ref().to_owned();
        let result = self.get(path).await?;
        let expected = expected.or_else(|| stored_checksum(&result));
        let size = result.meta.size;
        let tmp = temp_sibling(&dest)?;
        // Removes the temporary file on every path but success, including when this future is
        // dropped half-way.
        let mut guard = RemoveOnDrop(Some(tmp.clone()));

        let parallel = cfg!(unix)
            && matches!(result.payload, GetResultPayload::Stream(_))
            && self.config.transfer.max_concurrency > 1
            && size > self.config.transfer.part_size as u64;
        // A link where allowed and possible (same filesystem, permissions); a copy otherwise.
        let linked = match (&result.payload, copy) {
            (GetResultPayload::File(_, src), LocalCopy::Linked) => {
                let (src, tmp) = (src.clone(), tmp.clone());
                blocking(&self.url, "link", path, move || {
                    Ok(std::fs::hard_link(&src, &tmp).is_ok())
                })
                .await?
            }
            _ => false,
        };
        let copied = if linked {
            // What was linked is read back: the object may have been replaced since the get
            // opened it.
            drop(result);
            self.checksum_file(path, &tmp).await
        } else if parallel {
            self.copy_ranges_to_file(path, result, &tmp, sync).await
        } else {
            self.copy_to_file(path, result, &tmp, sync).await
        };
        let checked = copied.and_then(|actual| {
            self.check_checksum(path, size, expected, actual)?;
            Ok(actual)
        });
        let finished = match checked {
            Ok(actual) => {
                let (tmp2, dest2) = (tmp.clone(), dest.clone());
                blocking(&self.url, "rename", path, move || {
                    std::fs::rename(&tmp2, &dest2).map_err(|e| io_error("rename", &tmp2, e))?;
                    if sync {
                        sync_parent(&dest2);
                    }
                    Ok(())
                })
                .await
                .map(|()| actual)
            }
            Err(e) => Err(e),
        };
        if finished.is_ok() {
            guard.0 = None;
        }
        finished
    }

    /// The checksum of the local file `file` (read in one blocking task).
    async fn checksum_file(&self, path: &Path, file: &FsPath) -> Result<Checksum> {
        let file = file.to_owned();
        blocking(&self.url, "verify", path, move || {
            let mut f = std::fs::File::open(&file).map_err(|e| io_error("open", &file, e))?;
            let mut buf = vec![0u8; COPY_BUFFER];
            let mut sum = Checksum::EMPTY;
            loop {
                let n = read_full(&mut f, &mut buf).map_err(|e| io_error("read", &file, e))?;
                if n == 0 {
                    return Ok(sum);
                }
                sum = sum.append(&buf[..n]);
            }
        })
        .await
    }

    /// Streams `result` into a new file `tmp`, fsyncs it if `sync`, and returns the checksum
    /// written.
    async fn copy_to_file(
        &self,
        path: &Path,
        result: GetResult,
        tmp: &FsPath,
        sync: bool,
    ) -> Result<Checksum> {
        let tmp = tmp.to_owned();
        match result.payload {
            // A local file: copy it in one blocking task rather than in small async chunks.
            GetResultPayload::File(mut src, src_path) => {
                let range = result.range;
                blocking(&self.url, "download", path, move || {
                    use std::io::Seek;
                    src.seek(std::io::SeekFrom::Start(range.start))
                        .map_err(|e| io_error("seek", &src_path, e))?;
                    let mut src = src.take(range.end - range.start);
                    let mut out = create_file(&tmp)?;
                    let mut buf = vec![0u8; COPY_BUFFER];
                    let mut sum = Checksum::EMPTY;
                    loop {
                        let n = read_full(&mut src, &mut buf)
                            .map_err(|e| io_error("read", &src_path, e))?;
                        if n == 0 {
                            break;
                        }
                        sum = sum.append(&buf[..n]);
                        out.write_all(&buf[..n])
                            .map_err(|e| io_error("write", &tmp, e))?;
                    }
                    finish_file(out, &tmp, sync)?;
                    Ok(sum)
                })
                .await
            }
            GetResultPayload::Stream(mut stream) => {
                // Network chunks are small; they are gathered into batches of about
                // COPY_BUFFER bytes for a blocking writer, so receiving and writing overlap
                // without a thread wake-up per chunk.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(2);
                let writer = tokio::task::spawn_blocking(move || -> Result<Checksum> {
                    let mut out = create_file(&tmp)?;
                    let mut sum = Checksum::EMPTY;
                    while let Some(batch) = rx.blocking_recv() {
                        for chunk in batch {
                            sum = sum.append(&chunk);
                            out.write_all(&chunk)
                                .map_err(|e| io_error("write", &tmp, e))?;
                        }
                    }
                    finish_file(out, &tmp, sync)?;
                    Ok(sum)
                });
                let mut failure = None;
                let mut batch = Vec::new();
                let mut batched = 0;
                loop {
                    let next = stream.next().await;
                    let done = match next {
                        Some(Ok(chunk)) => {
                            batched += chunk.len();
                            batch.push(chunk);
                            false
                        }
                        Some(Err(e)) => {
                            failure = Some(e);
                            true
                        }
                        None => true,
                    };
                    if (done || batched >= COPY_BUFFER) && !batch.is_empty() {
                        batched = 0;
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    if done {
                        break;
                    }
                }
                drop(tx);
                let written = writer
                    .await
                    .map_err(|e| self.task_error("download", path, &e))?;
                if let Some(e) = failure {
                    return Err(store_error(&self.url, "download", path, e));
                }
                written
            }
        }
    }

    /// Downloads a large object with parallel range requests: the first part comes from the
    /// response already open, the others from up to `max_concurrency` ranged GETs pinned to the
    /// same object version with `If-Match` on its entity tag, each written at its offset. The
    /// parts' CRCs are combined in order, so the result is the checksum of the whole object.
    #[cfg(unix)]
    async fn copy_ranges_to_file(
        &self,
        path: &Path,
        first: GetResult,
        tmp: &FsPath,
        sync: bool,
    ) -> Result<Checksum> {
        use std::sync::Arc;

        let part = self.config.transfer.part_size as u64;
        let concurrency = self.config.transfer.max_concurrency;
        let size = first.meta.size;
        let e_tag = first.meta.e_tag.clone();
        let file = {
            let tmp = tmp.to_owned();
            Arc::new(blocking(&self.url, "create", path, move || create_file(&tmp)).await?)
        };

        // Part 0: the beginning of the response already open; the rest of it is not read.
        let mut head = Vec::with_capacity(part as usize);
        let mut stream = first.into_stream();
        while (head.len() as u64) < part {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    let want = (part as usize - head.len()).min(chunk.len());
                    head.extend_from_slice(&chunk[..want]);
                }
                Some(Err(e)) => return Err(store_error(&self.url, "download", path, e)),
                None => break,
            }
        }
        drop(stream);

        let mut tasks: JoinSet<Result<(usize, Checksum)>> = JoinSet::new();
        let spawn_write = |tasks: &mut JoinSet<Result<(usize, Checksum)>>,
                           index: usize,
                           offset: u64,
                           fetch: Option<std::ops::Range<u64>>,
                           data: Option<Bytes>| {
            let store = Arc::clone(&self.store);
            let file = Arc::clone(&file);
            let (url, path, tmp) = (self.url.clone(), path.clone(), tmp.to_owned());
            let e_tag = e_tag.clone();
            tasks.spawn(async move {
                let bytes = match (data, fetch) {
                    (Some(data), _) => data,
                    (None, Some(range)) => {
                        let options = object_store::GetOptions::new()
                            .with_range(Some(range))
                            .with_if_match(e_tag);
                        store
                            .get_opts(&path, options)
                            .await
                            .map_err(|e| store_error(&url, "download", &path, e))?
                            .bytes()
                            .await
                            .map_err(|e| store_error(&url, "download", &path, e))?
                    }
                    (None, None) => Bytes::new(),
                };
                let sum = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&bytes, offset)
                        .map_err(|e| io_error("write", &tmp, e))?;
                    Ok(Checksum::of(&bytes))
                })
                .await
                .map_err(|e| Error::Task {
                    url: url.clone(),
                    operation: "download",
                    path: path.to_string(),
                    reason: e.to_string(),
                })??;
                Ok((index, sum))
            });
        };

        let parts = size.div_ceil(part) as usize;
        let mut sums = vec![Checksum::EMPTY; parts];
        spawn_write(&mut tasks, 0, 0, None, Some(Bytes::from(head)));
        let mut outcome = Ok(());
        for index in 1..parts {
            while tasks.len() >= concurrency {
                outcome = self.join_range(&mut tasks, &mut sums, path).await;
                if outcome.is_err() {
                    break;
                }
            }
            if outcome.is_err() {
                break;
            }
            let start = index as u64 * part;
            let end = (start + part).min(size);
            spawn_write(&mut tasks, index, start, Some(start..end), None);
        }
        while outcome.is_ok() && !tasks.is_empty() {
            outcome = self.join_range(&mut tasks, &mut sums, path).await;
        }
        tasks.shutdown().await;
        outcome?;

        let file = Arc::try_unwrap(file).map_err(|_| Error::Task {
            url: self.url.clone(),
            operation: "download",
            path: path.to_string(),
            reason: "file still shared after all parts finished".into(),
        })?;
        let tmp = tmp.to_owned();
        blocking(&self.url, "fsync", path, move || {
            finish_file(file, &tmp, sync)
        })
        .await?;
        Ok(sums.iter().fold(Checksum::EMPTY, |acc, s| Checksum {
            crc32c: crc32c::crc32c_combine(acc.crc32c, s.crc32c, s.len as usize),
            len: acc.len + s.len,
        }))
    }

    #[cfg(not(unix))]
    async fn copy_ranges_to_file(
        &self,
        path: &Path,
        first: GetResult,
        tmp: &FsPath,
        sync: bool,
    ) -> Result<Checksum> {
        self.copy_to_file(path, first, tmp, sync).await
    }

    #[cfg(unix)]
    async fn join_range(
        &self,
        tasks: &mut JoinSet<Result<(usize, Checksum)>>,
        sums: &mut [Checksum],
        path: &Path,
    ) -> Result<()> {
        match tasks.join_next().await {
            None => Ok(()),
            Some(Ok(Ok((index, sum)))) => {
                sums[index] = sum;
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(self.task_error("download", path, &e)),
        }
    }

    fn check_checksum(
        &self,
        path: &Path,
        size: u64,
        expected: Option<Checksum>,
        actual: Checksum,
    ) -> Result<()> {
        if let Some(expected) = expected {
            if expected != actual {
                return Err(Error::ChecksumMismatch {
                    url: self.url.clone(),
                    path: path.to_string(),
                    expected,
                    actual,
                });
            }
        }
        if actual.len != size {
            return Err(Error::SizeMismatch {
                url: self.url.clone(),
                path: path.to_string(),
                expected: size,
                actual: actual.len,
            });
        }
        Ok(())
    }

    /// Reads a whole object into memory, refusing objects larger than `max_len` bytes before
    /// reading them, and verifies it against `expected` (or the checksum stored with it, see
    /// [`Storage::download_file`]).
    pub async fn get_verified(
        &self,
        path: &Path,
        expected: Option<Checksum>,
        max_len: u64,
    ) -> Result<Bytes> {
        let result = self.get(path).await?;
        let size = result.meta.size;
        if size > max_len {
            return Err(Error::TooLarge {
                url: self.url.clone(),
                path: path.to_string(),
                size,
                limit: max_len,
            });
        }
        let expected = expected.or_else(|| stored_checksum(&result));
        let bytes = result
            .bytes()
            .await
            .map_err(|e| store_error(&self.url, "get", path, e))?;
        self.check_checksum(path, size, expected, Checksum::of(&bytes))?;
        Ok(bytes)
    }

    /// Reads the object at `path` back (streaming, nothing kept) and checks it against
    /// `expected`.
    pub async fn verify(&self, path: &Path, expected: Checksum) -> Result<()> {
        let result = self.get(path).await?;
        let size = result.meta.size;
        let mut stream = result.into_stream();
        let mut actual = Checksum::EMPTY;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| store_error(&self.url, "get", path, e))?
        {
            actual = actual.append(&chunk);
        }
        self.check_checksum(path, size, Some(expected), actual)
    }

    /// Lists every object under `prefix` (recursively), sorted by path.
    ///
    /// Prefixes match whole segments: `job/chk-1` matches `job/chk-1/x`, not `job/chk-10/x`.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.check_inside(prefix)?;
        let mut objects: Vec<ObjectMeta> = self
            .store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| store_error(&self.url, "list", prefix, e))?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// Lists the direct children of `prefix`: objects and "directories" (common prefixes).
    pub async fn list_children(&self, prefix: &Path) -> Result<ListResult> {
        self.check_inside(prefix)?;
        let mut result = self
            .store
            .list_with_delimiter(Some(prefix))
            .await
            .map_err(|e| store_error(&self.url, "list", prefix, e))?;
        result.common_prefixes.sort();
        result.objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(result)
    }

    /// Deletes every object under `prefix` (recursively, e.g. a discarded checkpoint directory)
    /// and returns how many were deleted. Objects that vanish concurrently are not an error.
    /// `prefix` must lie below the root; the root itself is refused.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<usize> {
        self.check_strictly_inside(prefix)?;
        let locations = self
            .store
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut deleted = self.store.delete_stream(locations);
        let mut count = 0;
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) => count += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(&self.url, "delete prefix", prefix, e)),
            }
        }
        Ok(count)
    }
}

/// Waits for one in-flight part upload.
async fn join_one(
    in_flight: &mut JoinSet<object_store::Result<()>>,
    storage: &Storage,
    path: &Path,
) -> std::result::Result<(), Failure> {
    match in_flight.join_next().await {
        None | Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(Failure::Store(e)),
        Some(Err(e)) => Err(Failure::Local(storage.task_error(
            "upload part of",
            path,
            &e,
        ))),
    }
}

/// Reads `file` in parts of `part_size` bytes and sends them to `tx`; returns the checksum of
/// everything sent. Stops early (without error) if the receiver is gone.
fn read_parts(
    file: &FsPath,
    part_size: usize,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) -> Result<Checksum> {
    let mut f = std::fs::File::open(file).map_err(|e| io_error("open", file, e))?;
    let mut sum = Checksum::EMPTY;
    loop {
        let mut buf = Vec::with_capacity(part_size);
        let n = (&mut f)
            .take(part_size as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io_error("read", file, e))?;
        if n == 0 {
            break;
        }
        sum = sum.append(&buf);
        if tx.blocking_send(Bytes::from(buf)).is_err() {
            break;
        }
        if n < part_size {
            break;
        }
    }
    Ok(sum)
}

/// Reads until `buf` is full or the end of input; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn create_file(path: &FsPath) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))
}

/// Fsyncs a downloaded file when `sync`; otherwise only closes it.
fn finish_file(file: std::fs::File, path: &FsPath, sync: bool) -> Result<()> {
    if sync {
        file.sync_all().map_err(|e| io_error("fsync", path, e))?;
    }
    Ok(())
}

/// Best-effort fsync of a file's directory, so a rename is durable.
fn sync_parent(path: &FsPath) {
    if let Some(parent) = path.parent() {
        let dir = if parent.as_os_str().is_empty() {
            FsPath::new(".")
        } else {
            parent
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Removes a file when dropped, unless disarmed by taking the path out.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A unique temporary file name in the same directory as `dest`.
fn temp_sibling(dest: &FsPath) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().ok_or_else(|| {
        io_error(
            "download to",
            dest,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{n}.download", std::process::id()));
    Ok(dest.with_file_name(tmp_name))
}

/// The checksum stored with an object as user metadata, if any.
fn stored_checksum(result: &GetResult) -> Option<Checksum> {
    let value = result
        .attributes
        .get(&Attribute::Metadata(CHECKSUM_METADATA_KEY.into()))?;
    let crc = u32::from_str_radix(value.as_ref(), 16).ok()?;
    Some(Checksum {
        crc32c: crc,
        len: result.meta.size,
    })
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    url: &str,
    operation: &'static str,
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task {
            url: url.to_owned(),
            operation,
            path: path.to_string(),
            reason: e.to_string(),
        })?
}
