//! The backend's private working directory: a fresh directory under the system temporary
//! directory (the default) or under a parent the user names
//! ([`MmapBackendBuilder::working_directory_in`](crate::MmapBackendBuilder::working_directory_in)),
//! removed on drop, and swept up later should its process die without dropping it.
//!
//! Each directory holds an `owner.lock` file on which its backend keeps an exclusive lock for
//! its whole life. The operating system releases the lock when the process ends however it
//! ends (`kill -9` included), so a later process (its first such backend) that can take the lock
//! of such a directory knows no one uses it any more and removes it. A directory whose lock is
//! held is left alone, whatever process (container, PID namespace) holds it; so is anything
//! without a lock file. Directories are created under a `.creating` name and renamed once
//! locked, so a sweep never sees one half made.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use state_api::{Error, Result};

/// Names of the backend's temporary directories start with this.
const PREFIX: &str = "flowstate-mmap-";
/// The lock file inside each directory.
const LOCK_FILE: &str = "owner.lock";
/// The suffix of a directory still being set up.
const CREATING: &str = ".creating";

/// A fresh directory of one backend, removed on drop.
pub(crate) struct TempDir {
    path: PathBuf,
    /// Holds the exclusive lock on `owner.lock` until the directory is removed.
    _lock: File,
}

impl TempDir {
    /// Creates a fresh locked directory under [`std::env::temp_dir`] (see [`TempDir::new_in`]).
    pub(crate) fn new() -> Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir())
    }

    /// Creates a fresh locked directory under `parent` (created if needed). The first call in
    /// a process for a given parent first removes the directories there that processes which
    /// died without dropping their backends left behind (once per parent: a process building
    /// many backends reads each parent once).
    pub(crate) fn new_in(parent: &Path) -> Result<TempDir> {
        /// The parents swept by this process (canonical paths where they resolve).
        static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        std::fs::create_dir_all(parent).map_err(|e| Error::Io {
            context: format!("creating the parent directory {}", parent.display()),
            source: e,
        })?;
        let key = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
        {
            // A poisoned list only means a sweep panicked; the list itself is intact.
            let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
            if !swept.contains(&key) {
                sweep(parent);
                swept.push(key);
            }
        }
        TempDir::create_in(parent)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn create_in(parent: &Path) -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let salt = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(n);
            h.finish()
        };
        let name = format!("{PREFIX}{}-{n}-{salt:016x}", std::process::id());
        let path = parent.join(&name);
        let creating = parent.join(format!("{name}{CREATING}"));
        let io = |what: &str, p: &Path, e: std::io::Error| Error::Io {
            context: format!("{what} the working directory {}", p.display()),
            source: e,
        };
        std::fs::create_dir_all(&creating).map_err(|e| io("creating", &creating, e))?;
        let locked = (|| {
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(creating.join(LOCK_FILE))?;
            lock.lock()?;
            std::fs::rename(&creating, &path)?;
            Ok(lock)
        })();
        match locked {
            Ok(lock) => Ok(TempDir { path, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&creating);
                Err(io("locking", &creating, e))
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the backend directories under `parent` whose owner is gone (their lock is free).
/// Best effort: whatever cannot be read, locked or removed is left as it is.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(PREFIX) || name.ends_with(CREATING) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        // Opened without `create`: a directory without a lock file is not ours to judge.
        let Ok(lock) = OpenOptions::new().write(true).open(dir.join(LOCK_FILE)) else {
            continue;
        };
        match lock.try_lock() {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(TryLockError::WouldBlock) | Err(TryLockError::Error(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "flowstate-tempdir-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    #[test]
    fn a_directory_is_locked_while_its_owner_lives_and_removed_on_drop() {
        let parent = scratch("live");
        let t = TempDir::create_in(&parent).expect("create");
        assert!(t.path().starts_with(&parent));
        assert!(t.path().join(LOCK_FILE).is_file());
        sweep(&parent);
        assert!(t.path().is_dir(), "a sweep leaves a live directory alone");
        let path = t.path().to_path_buf();
        drop(t);
        assert!(!path.exists(), "dropping removes the directory");
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn a_sweep_removes_unlocked_directories_only() {
        let parent = scratch("sweep");
        // Left by a dead owner: the lock file exists, nobody holds it.
        let dead = parent.join(format!("{PREFIX}1-0-00"));
        std::fs::create_dir_all(&dead).expect("dir");
        std::fs::write(dead.join(LOCK_FILE), b"").expect("lock file");
        std::fs::write(dead.join("run-000001.sst"), b"data").expect("data");
        // Not ours to judge: no lock file, still being created, someone else's name.
        let no_lock = parent.join(format!("{PREFIX}2-0-00"));
        std::fs::create_dir_all(&no_lock).expect("dir");
        let creating = parent.join(format!("{PREFIX}3-0-00{CREATING}"));
        std::fs::create_dir_all(&creating).expect("dir");
        std::fs::write(creating.join(LOCK_FILE), b"").expect("lock file");
        let other = parent.join("other-dir");
        std::fs::create_dir_all(&other).expect("dir");
        std::fs::write(other.join(LOCK_FILE), b"").expect("lock file");
        // Held: a live owner in this process (another open file description: flock semantics).
        let live = TempDir::create_in(&parent).expect("create");

        sweep(&parent);
        assert!(!dead.exists(), "the dead owner's directory is removed");
        assert!(no_lock.is_dir());
        assert!(creating.is_dir());
        assert!(other.is_dir());
        assert!(live.path().is_dir());
        drop(live);
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn the_first_directory_under_each_parent_sweeps_that_parent() {
        let dead_in = |parent: &Path| {
            let dead = parent.join(format!("{PREFIX}1-0-00"));
            std::fs::create_dir_all(&dead).expect("dir");
            std::fs::write(dead.join(LOCK_FILE), b"").expect("lock file");
            dead
        };
        // Two parents, each with a folder a dead process left (a sweep of one parent per
        // process, as for the temporary directory, would miss the second).
        let (p1, p2) = (scratch("parent-1"), scratch("parent-2"));
        let (d1, d2) = (dead_in(&p1), dead_in(&p2));
        let t1 = TempDir::new_in(&p1).expect("create");
        assert!(!d1.exists(), "swept on the first directory under p1");
        assert!(d2.is_dir(), "p2 is not touched");
        let t2 = TempDir::new_in(&p2).expect("create");
        assert!(!d2.exists(), "swept on the first directory under p2");
        let t3 = TempDir::new_in(&p1).expect("create");
        assert_ne!(t1.path(), t3.path(), "fresh names under one parent");
        drop((t1, t2, t3));
        for p in [p1, p2] {
            assert_eq!(std::fs::read_dir(&p).expect("list").count(), 0);
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}
