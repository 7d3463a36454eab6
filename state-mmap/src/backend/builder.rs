//! [`MmapBackendBuilder`]: configures and opens a [`MmapKeyedStateBackend`] (directory,
//! environment, key groups, serializer, clock) and reads back the registry of a reopened store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use state_api::*;

use crate::codec::*;
use crate::engine::{Db, EngineOptions};
use crate::environment::MmapEnvironment;
use crate::tempdir::TempDir;

use super::registry::decode_registry;
use super::timers;
use super::ttl::{TtlFilter, TtlTable};
use super::MmapKeyedStateBackend;

/// Builds a [`MmapKeyedStateBackend`].
pub struct MmapBackendBuilder<K> {
    max_parallelism: u32,
    range: Option<KeyGroupRange>,
    key_serializer: Arc<dyn StateSerializer<K>>,
    clock: Arc<dyn Clock>,
    location: Location,
    options: EngineOptions,
    environment: Option<MmapEnvironment>,
}

/// Where a backend keeps its files.
pub(super) enum Location {
    /// A fresh private directory under the system temporary directory.
    Temporary,
    /// A fresh private directory under this parent.
    FreshIn(PathBuf),
    /// Exactly this directory (an existing store there is reopened).
    Exactly(PathBuf),
}

impl<K: StateKey> MmapBackendBuilder<K> {
    /// Sets the number of key groups (default 128).
    pub fn max_parallelism(mut self, max_parallelism: u32) -> Self {
        self.max_parallelism = max_parallelism;
        self
    }

    /// Sets the key groups this backend owns (default: all of them).
    pub fn key_group_range(mut self, range: KeyGroupRange) -> Self {
        self.range = Some(range);
        self
    }

    /// Uses `serializer` for keys (default: postcard).
    pub fn key_serializer(mut self, serializer: impl StateSerializer<K> + 'static) -> Self {
        self.key_serializer = Arc::new(serializer);
        self
    }

    /// Uses `clock` for TTL (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Keeps the files in exactly `dir` (created if needed). An existing store there is
    /// reopened: its states come back as restored state, bound when they are registered. The
    /// directory is the caller's: it is never deleted, and two backends open at once must not
    /// share it (use [`working_directory_in`](Self::working_directory_in) for a folder of
    /// their own under a common parent).
    ///
    /// Without a directory the backend uses a fresh private directory under the system
    /// temporary directory, as [`working_directory_in`](Self::working_directory_in) does under
    /// its parent.
    pub fn directory(mut self, dir: impl AsRef<Path>) -> Self {
        self.location = Location::Exactly(dir.as_ref().to_path_buf());
        self
    }

    /// Keeps the files in a fresh private directory under `parent` (created if needed), named
    /// `flowstate-mmap-<pid>-<n>-<salt>`, that no other backend of this or any other process
    /// shares, and that is deleted when the backend is dropped. Each such directory holds an
    /// `owner.lock` file that its backend keeps locked for its whole life; the operating system
    /// releases the lock however the process ends (`kill -9` included), so the first backend a
    /// later process makes under the same parent deletes the directories whose lock is free:
    /// those of finished or crashed processes. Directories whose lock is held (live backends,
    /// of any process) and anything else under `parent` are left alone.
    ///
    /// The store always starts empty (restore it from a checkpoint); to reopen a store in
    /// place, use [`directory`](Self::directory). This is the default with the system
    /// temporary directory as the parent.
    pub fn working_directory_in(mut self, parent: impl AsRef<Path>) -> Self {
        self.location = Location::FreshIn(parent.as_ref().to_path_buf());
        self
    }

    /// Opens the backend in `env`, sharing its memory budget and background threads with
    /// every other backend built from it (one environment per process: see
    /// [`MmapEnvironment`]). The backend's budget is then its share of the environment's, and
    /// [`memory_budget`](Self::memory_budget) is ignored. Without an environment the backend
    /// starts one of its own with its memory budget.
    pub fn environment(mut self, env: MmapEnvironment) -> Self {
        self.environment = Some(env);
        self
    }

    /// Sets the memory budget of the engine's own buffers (see [`EngineOptions::memory_budget`])
    /// when the backend has no [`environment`](Self::environment).
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.options.memory_budget = bytes;
        self
    }

    /// Sets every engine option.
    pub fn engine_options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Checks the settings, opens the store and builds the backend.
    pub fn build(self) -> Result<MmapKeyedStateBackend<K>> {
        validate_max_parallelism(self.max_parallelism)?;
        let range = self
            .range
            .unwrap_or_else(|| KeyGroupRange::all(self.max_parallelism));
        if range.end() > self.max_parallelism {
            return Err(Error::InvalidParallelism {
                reason: format!(
                    "key group range {range} exceeds max parallelism {}",
                    self.max_parallelism
                ),
            });
        }
        let (dir, temp) = match self.location {
            Location::Exactly(d) => (d, None),
            Location::Temporary => {
                let t = TempDir::new()?;
                (t.path().to_path_buf(), Some(t))
            }
            Location::FreshIn(parent) => {
                let t = TempDir::new_in(&parent)?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut options = self.options;
        // One map's entries share the prefix `kg | id | key | namespace`.
        options.prefix_extractor = Some(Arc::new(prefix_len));
        let mut db = match &self.environment {
            Some(env) => Db::open_in(&dir, options, env)?,
            None => Db::open(&dir, options)?,
        };
        let ttl_table: TtlTable = Arc::default();
        db.set_compaction_filter(Some(Arc::new(TtlFilter {
            table: Arc::clone(&ttl_table),
            clock: Arc::clone(&self.clock),
        })));
        db.set_keep_range(Some(keep_range(range)));
        db.set_file_boundary(Arc::new(|a: &[u8], b: &[u8]| a.get(..2) != b.get(..2)))?;
        let mut backend = MmapKeyedStateBackend {
            db,
            max_parallelism: self.max_parallelism,
            range,
            key_serializer: self.key_serializer,
            clock: self.clock,
            current: None,
            states: Vec::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            kbuf: Vec::with_capacity(64),
            vbuf: Vec::with_capacity(64),
            tbuf: Vec::new(),
            ends: Vec::new(),
            map_len_hint: 0,
            list_len_hint: 0,
            key_switches: 0,
            per_record_cleanup: Vec::new(),
            ttl_table,
            timers: HashMap::new(),
            _temp: temp,
        };
        let meta = backend.db.user_meta().to_vec();
        if !meta.is_empty() {
            let (max_parallelism, groups) = decode_registry(&meta, &dir)?;
            if max_parallelism != backend.max_parallelism {
                return Err(Error::RestoreMismatch {
                    reason: format!(
                        "the store in {} was written with max parallelism {max_parallelism}, \
                         the backend has {}",
                        dir.display(),
                        backend.max_parallelism
                    ),
                });
            }
            let mut timer_services = Vec::new();
            for (name, p) in groups {
                backend.next_id = backend.next_id.max(u32::from(p.id) + 1);
                if p.meta.kind == StateKind::Timers {
                    timer_services.push((p.id, name.clone()));
                }
                backend.pending.entry(name).or_default().push(p);
            }
            // Timers a version-1 store (or an interrupted rewrite) left in the old layout are
            // rewritten now (a seek per key group when there are none).
            for (id, name) in &timer_services {
                timers::migrate_v1(&mut backend.db, range, *id, name)?;
            }
        }
        Ok(backend)
    }
}

pub(super) fn keep_range(range: KeyGroupRange) -> (Vec<u8>, Vec<u8>) {
    (
        kg_prefix(range.start()).to_vec(),
        kg_prefix(range.end()).to_vec(),
    )
}

impl<K: StateKey + Serialize + DeserializeOwned> MmapKeyedStateBackend<K> {
    /// A builder with postcard keys, 128 key groups, all of them owned, the system clock, a
    /// temporary directory and a 256 MiB memory budget.
    pub fn builder() -> MmapBackendBuilder<K> {
        MmapBackendBuilder {
            max_parallelism: DEFAULT_LOWER_BOUND_MAX_PARALLELISM,
            range: None,
            key_serializer: Arc::new(PostcardSerializer::<K>::new()),
            clock: Arc::new(SystemClock),
            location: Location::Temporary,
            options: EngineOptions::default(),
            environment: None,
        }
    }
}
