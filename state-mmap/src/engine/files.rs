//! The engine's files: names of sorted runs, the manifest that names the live ones, and
//! ingesting files from a checkpoint.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::manifest::{FileEntry, Manifest};
use crate::run::RunFile;

use super::service::{wait_for, Garbage};
use super::{Db, SortedRun};

/// A file handed to [`Db::ingest`].
#[derive(Clone, Debug)]
pub struct IngestFile {
    /// Where the file is now.
    pub path: PathBuf,
    /// Its checkpoint name (kept).
    pub name: String,
    /// Only keys in `[lo, hi)` are visible (`None`: all).
    pub clip: Option<(Vec<u8>, Vec<u8>)>,
}

/// The file name of sorted run `number`.
pub fn run_file_name(number: u64) -> String {
    format!("{number:012}.run")
}

/// The checkpoint name of file `number` of store `db_id`.
pub(super) fn shared_name(db_id: u64, number: u64) -> String {
    format!("{db_id:016x}-{number:012}.run")
}

pub(super) fn parse_run_name(name: &str) -> Option<u64> {
    name.strip_suffix(".run")?.parse().ok()
}

impl Db {
    /// Writes the manifest of the current runs: queued for the manifest thread (in order with
    /// the replaced runs it frees), or written now without that thread. Durable only after
    /// [`Db::sync_manifest`].
    pub(super) fn store_manifest(&mut self) -> Result<()> {
        self.update_buffer_bytes();
        let m = Manifest {
            db_id: self.db_id,
            next_file: self.next_file.load(Ordering::SeqCst),
            runs: self
                .runs
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|f| FileEntry {
                            number: f.number(),
                            name: f.name().to_string(),
                            clip: f.clip().cloned(),
                        })
                        .collect()
                })
                .collect(),
            user_meta: self.user_meta.clone(),
        };
        match &self.manifest {
            Some(q) => match q.send(Garbage::Manifest(
                Box::new(m),
                self.dir.clone(),
                Arc::clone(&self.manifest_failed),
            )) {
                Ok(()) => Ok(()),
                // The thread is gone: write it here.
                Err(e) => match e.into_inner() {
                    Garbage::Manifest(m, ..) => m.store(&self.dir),
                    _ => Ok(()),
                },
            },
            None => m.store(&self.dir),
        }
    }

    /// [`Db::sync_before_manifest`] for the files a flush or compaction wrote (none: nothing).
    pub(super) fn sync_runs_before_manifest(&mut self, files: &[Arc<RunFile>]) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        self.sync_before_manifest(files.iter().map(|f| f.path().to_path_buf()).collect())
    }

    /// Makes `files` (and their names in the directory) durable before the manifests stored
    /// after this call: on the manifest thread (in order with the manifests), or here without
    /// one. Flushes, compactions and ingests write their files without waiting for the disk;
    /// a crash before the fsync loses nothing a durable manifest names (files no manifest
    /// names are deleted on open).
    fn sync_before_manifest(&mut self, files: Vec<std::path::PathBuf>) -> Result<()> {
        match &self.manifest {
            Some(q) => match q.send(Garbage::Sync(
                files,
                self.dir.clone(),
                Arc::clone(&self.manifest_failed),
            )) {
                Ok(()) => Ok(()),
                Err(e) => match e.into_inner() {
                    Garbage::Sync(files, dir, _) => super::service::sync_files(&files, &dir),
                    _ => Ok(()),
                },
            },
            None => super::service::sync_files(&files, &self.dir),
        }
    }

    /// Waits until every manifest queued so far is durable (or its write failed).
    pub(super) fn sync_manifest(&mut self) -> Result<()> {
        if let Some(q) = &self.manifest {
            wait_for(q);
        }
        self.check()
    }

    /// The live sorted runs, newest first (flush first to include recent writes).
    pub fn sorted_runs(&self) -> Vec<SortedRun> {
        self.runs.clone()
    }

    /// Adds sorted runs (newest run first) as the *oldest* data: each file is hard-linked (or
    /// copied) into the directory under a new number, verified and mapped; it keeps its
    /// checkpoint name, and only keys in its clip range are visible.
    ///
    /// The files need not be durable (a restore does not wait for the disk): the manifest
    /// thread fsyncs them before it writes the manifest that names them, in the background;
    /// the next [`Db::flush`] (or checkpoint) waits for both.
    pub fn ingest(&mut self, runs: Vec<Vec<IngestFile>>) -> Result<()> {
        self.drain()?;
        let started = std::time::Instant::now();
        let (mut count, mut bytes) = (0usize, 0u64);
        let mut linked = Vec::new();
        for r in runs {
            let mut files = Vec::new();
            for src in r {
                let n = self.next_file.fetch_add(1, Ordering::SeqCst);
                let dst = self.dir.join(run_file_name(n));
                if fs::hard_link(&src.path, &dst).is_err() {
                    fs::copy(&src.path, &dst)
                        .map_err(|e| Error::io("copying a sorted run in", &src.path, e))?;
                }
                linked.push(dst.clone());
                files.push(Arc::new(
                    RunFile::open(
                        &dst,
                        n,
                        self.opts.verify_on_open,
                        self.opts.verify_blocks_on_read,
                    )?
                    .with_origin(src.name, src.clip),
                ));
            }
            count += files.len();
            bytes += files.iter().map(|f| f.size()).sum::<u64>();
            files.sort_by(|a, b| a.first_key().cmp(b.first_key()));
            if files
                .windows(2)
                .any(|w| w[0].last_key() >= w[1].first_key())
            {
                return Err(Error::Config {
                    reason: "files of one sorted run overlap".into(),
                });
            }
            if !files.is_empty() {
                self.runs.push(Arc::new(files));
            }
        }
        let opened = started.elapsed();
        self.sync_before_manifest(linked)?;
        self.store_manifest()?;
        tracing::debug!(
            dir = %self.dir.display(),
            files = count,
            bytes,
            verified = self.opts.verify_on_open,
            open_millis = opened.as_millis() as u64,
            millis = started.elapsed().as_millis() as u64,
            "state-mmap ingested checkpoint files"
        );
        self.maybe_compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{all, small};
    use std::collections::BTreeMap;

    /// A manifest the manifest thread cannot write is reported by the next flush and every
    /// write after it; nothing the last durable manifest names is deleted, so reopening
    /// finds everything flushed before.
    #[test]
    fn a_failed_manifest_write_is_reported_and_loses_nothing_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        {
            let mut db = Db::open(dir.path(), small()).unwrap();
            for i in 0u32..3000 {
                db.put(&i.to_be_bytes(), &[1; 30]).unwrap();
                model.insert(i.to_be_bytes().to_vec(), vec![1u8; 30]);
            }
            db.flush().unwrap();
            db.drain().unwrap();
            assert!(
                db.stats().1 > 0,
                "compactions replaced files: {:?}",
                db.stats()
            );
            // A directory where the manifest's temporary file goes: its creation fails.
            fs::create_dir(dir.path().join("MANIFEST.tmp")).unwrap();
            let mut failed = None;
            for i in 0u32..3000 {
                if let Err(e) = db.put(&i.to_be_bytes(), &[2; 30]) {
                    failed = Some(e.to_string());
                    break;
                }
            }
            let err = match failed {
                Some(e) => e,
                None => db.flush().unwrap_err().to_string(),
            };
            assert!(err.contains("manifest"), "{err}");
            // Every later write fails too.
            assert!(db.put(b"x", b"y").is_err());
        }
        fs::remove_dir(dir.path().join("MANIFEST.tmp")).unwrap();
        let db = Db::open(dir.path(), small()).unwrap();
        assert_eq!(all(&db), model);
    }
}
