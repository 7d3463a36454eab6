//! A streaming upload behind `std::io::Write`, for writers that produce bytes synchronously
//! (a snapshot stream). It waits with [`block_on_io`], so it works on any thread, also one
//! that drives an async runtime.

use std::io::Write;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use tokio::runtime::Handle;

use crate::blocking::block_on_io;
use crate::error::{store_error, Result};
use crate::transfer::Uploaded;
use crate::{Checksum, Storage};

/// A streaming upload behind `std::io::Write` ([`Storage::blocking_writer`]): objects up to
/// one part ([`TransferOptions::part_size`](crate::TransferOptions::part_size)) go in one put,
/// larger ones as a multipart upload with at most
/// [`TransferOptions::max_concurrency`](crate::TransferOptions::max_concurrency) parts in
/// flight, so its memory is about `part_size * (max_concurrency + 1)` whatever the size of the
/// object. The CRC32C and length of what is written are computed on the way. Nothing appears
/// at the path until [`BlockingWriter::finish`] succeeds; [`BlockingWriter::abort`] (or a
/// failure) leaves no object.
pub struct BlockingWriter {
    storage: Storage,
    handle: Handle,
    path: Path,
    buf: Vec<u8>,
    upload: Option<WriteMultipart>,
    sum: Checksum,
    failed: Option<object_store::Error>,
}

impl std::fmt::Debug for BlockingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingWriter")
            .field("path", &self.path.as_ref())
            .field("written", &self.sum.len)
            .finish()
    }
}

impl Storage {
    /// A blocking, streaming upload to `path` whose I/O runs on the runtime of `handle` (a
    /// multi-thread runtime). Its methods never start a runtime ([`block_on_io`]): they may be
    /// called from a plain thread or from inside another async runtime (blocking that thread
    /// while they wait).
    pub fn blocking_writer(&self, path: &Path, handle: Handle) -> Result<BlockingWriter> {
        self.check_strictly_inside(path)?;
        Ok(BlockingWriter {
            storage: self.clone(),
            handle,
            path: path.clone(),
            buf: Vec::new(),
            upload: None,
            sum: Checksum::EMPTY,
            failed: None,
        })
    }
}

impl BlockingWriter {
    fn part_size(&self) -> usize {
        self.storage.config.transfer.part_size
    }

    fn flush_parts(&mut self) -> std::io::Result<()> {
        let part_size = self.part_size();
        if self.upload.is_none() {
            let upload = block_on_io(&self.handle, self.storage.store.put_multipart(&self.path))
                .map_err(|e| self.fail(e))?;
            self.upload = Some(WriteMultipart::new_with_chunk_size(upload, part_size));
        }
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(part_size + (1 << 20)));
        let concurrency = self.storage.config.transfer.max_concurrency;
        let res = match self.upload.as_mut() {
            Some(up) => {
                let _enter = self.handle.enter();
                up.put(Bytes::from(buf));
                block_on_io(&self.handle, up.wait_for_capacity(concurrency))
            }
            None => Ok(()),
        };
        res.map_err(|e| self.fail(e))
    }

    fn fail(&mut self, e: object_store::Error) -> std::io::Error {
        let msg = e.to_string();
        self.failed = Some(e);
        std::io::Error::other(msg)
    }

    /// Completes the upload; returns what was written (its checksum covers every byte).
    pub fn finish(mut self) -> Result<Uploaded> {
        if let Some(e) = self.failed.take() {
            let err = store_error(&self.storage.url, "upload", &self.path, e);
            self.abort();
            return Err(err);
        }
        let buf = std::mem::take(&mut self.buf);
        match self.upload.take() {
            None => block_on_io(&self.handle, self.storage.put(&self.path, buf)),
            Some(mut up) => {
                // WriteMultipart sends full parts and the rest as the last one.
                let parts = usize::try_from(self.sum.len.div_ceil(self.part_size() as u64))
                    .unwrap_or(usize::MAX);
                let result = {
                    let _enter = self.handle.enter();
                    up.put(Bytes::from(buf));
                    block_on_io(&self.handle, up.finish())
                }
                .map_err(|e| store_error(&self.storage.url, "upload", &self.path, e))?;
                Ok(Uploaded::new(&self.path, self.sum, result, parts))
            }
        }
    }

    /// Abandons the upload (best effort): no object appears.
    pub fn abort(mut self) {
        if let Some(up) = self.upload.take() {
            let _enter = self.handle.enter();
            let _ = block_on_io(&self.handle, up.abort());
        }
    }
}

impl Write for BlockingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Err(std::io::Error::other("the upload already failed"));
        }
        let part_size = self.part_size();
        self.sum = self.sum.append(data);
        if self.buf.capacity() == 0 {
            self.buf.reserve(part_size + (1 << 20));
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= part_size {
            self.flush_parts()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::TransferOptions;
    use object_store::ObjectStoreExt;

    fn storage() -> (Storage, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let options = TransferOptions {
            part_size: 1 << 20,
            max_concurrency: 2,
        };
        let s = Storage::from_store(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            Path::from("root"),
            "memory",
        )
        .with_transfer_options(options)
        .unwrap();
        (s, rt)
    }

    #[test]
    fn streams_small_and_multipart_objects_with_their_checksum() {
        let (s, rt) = storage();
        for (len, parts) in [(1000usize, 0usize), ((7 << 19) + 5, 4)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = Path::from(format!("root/obj-{len}"));
            let mut w = s.blocking_writer(&path, rt.handle().clone()).unwrap();
            for c in data.chunks(100_000) {
                w.write_all(c).unwrap();
            }
            let up = w.finish().unwrap();
            assert_eq!(up.checksum, Checksum::of(&data));
            assert_eq!(up.parts, parts);
            let got = rt
                .block_on(async { s.store().get(&path).await.unwrap().bytes().await })
                .unwrap();
            assert_eq!(&got[..], &data[..]);
        }
    }

    #[test]
    fn an_aborted_upload_leaves_no_object_and_paths_stay_inside_the_root() {
        let (s, rt) = storage();
        let path = Path::from("root/aborted");
        let mut w = s.blocking_writer(&path, rt.handle().clone()).unwrap();
        w.write_all(&vec![7u8; 3 << 20]).unwrap();
        w.abort();
        assert!(rt.block_on(s.store().head(&path)).is_err());
        assert!(s
            .blocking_writer(&Path::from("elsewhere/x"), rt.handle().clone())
            .is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn streams_from_a_thread_that_drives_an_async_runtime() {
        let (s, rt) = storage();
        let data = vec![3u8; (3 << 19) + 7];
        let path = Path::from("root/from-async");
        let mut w = s.blocking_writer(&path, rt.handle().clone()).unwrap();
        w.write_all(&data).unwrap();
        assert_eq!(w.finish().unwrap().checksum, Checksum::of(&data));
        let mut w = s.blocking_writer(&path, rt.handle().clone()).unwrap();
        w.write_all(&data).unwrap();
        w.abort();
        let got = s.store().get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], &data[..]);
        // Dropping a runtime inside async code panics; this one shuts down in the background.
        rt.shutdown_background();
    }
}
