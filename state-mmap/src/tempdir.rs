//! The backend's default working directory: a fresh directory under the system temporary
//! directory, removed on drop, and swept up later should its process die without dropping it.
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

use state_api::{Error, Result};

/// Names of the backend's temporary directories start with this.
const PREFIX: &str = "flowstate-mmap-";
/// The lock file inside each directory.
const LOCK_FILE: &str = "owner.lock";
/// The suffix of a directory still being set up.
const CREATING: &str = ".creating";

/// A directory under the system temporary directory, removed on drop.
pub(crate) struct TempDir {
    path: PathBuf,
    /// Holds the exclusive lock on `owner.lock` until the directory is removed.
    _lock: File,
}

impl TempDir {
    /// Creates a fresh locked directory under [`std::env::temp_dir`]. The first call in a
    /// process first removes the directories that processes which died without dropping
    /// their backends left there (once: a process building many backends reads the
    /// temporary directory once).
    pub(crate) fn new() -> Result<TempDir> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let parent = std::env::temp_dir();
        SWEPT.call_once(|| sweep(&parent));
        TempDir::create_in(&parent)
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
            context: format!("{what} the temporary directory {}", p.display()),
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
}
