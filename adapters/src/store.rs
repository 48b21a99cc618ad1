//! The versioned adapter store on disk.
//!
//! Layout under the store root:
//!
//! ```text
//! versions/<version id>/adapter_config.json      one immutable directory per version,
//! versions/<version id>/adapter_model.safetensors named by its content hash
//! versions/<version id>/leaf_version.json         created time, parent, step, notes
//! current.json                                    {"current": id, "previous": [older, ..., newest]}
//! store.lock                                      the writers' lock (an advisory flock)
//! .tmp-*                                          work in progress
//! ```
//!
//! A version is written into a temporary directory inside the root, its files and the directory
//! are fsynced, and it is renamed into `versions/` (then `versions/` is fsynced): a reader sees
//! the whole version or none of it. `current.json` is replaced the same way (temporary file,
//! fsync, rename, fsync of the root). A crash at any point therefore leaves either the old or the
//! new version current, and every listed version complete. [`AdapterStore::set_fault_hook`]
//! injects failures at each of these steps ([`FailPoint`]) to test exactly that.
//!
//! Every mutating operation (publish, promote, rollback, retain) holds an exclusive advisory
//! lock on `store.lock` (`flock`), so writers in different processes (a trainer, a server, an
//! operator's `leaf adapter promote`) are serialised; readers take no lock. [`AdapterStore::open`]
//! removes a leftover `.tmp-*` entry only when it can take that lock without waiting (no writer
//! is active) and the entry is older than [`STALE_TEMP_AGE`], so it never deletes another
//! process's work in progress.
//!
//! Nothing read from disk is trusted: version ids in `current.json` and `leaf_version.json` must
//! be 64 lowercase hex digits, and every file is read with [`read_regular_file`] (no symbolic
//! links, FIFOs or devices; bounded size).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::peft::{
    read_regular_file, sync_dir, write_synced, LoraAdapter, CONFIG_FILE, WEIGHTS_FILE,
};

/// File with a version's metadata inside its directory.
pub const META_FILE: &str = "leaf_version.json";
/// File holding the current version and the rollback history.
pub const CURRENT_FILE: &str = "current.json";
/// Directory holding the versions.
pub const VERSIONS_DIR: &str = "versions";
/// File whose advisory lock serialises the writers of all processes.
pub const LOCK_FILE: &str = "store.lock";
const TMP_PREFIX: &str = ".tmp-";
/// A temporary entry younger than this is never removed by [`AdapterStore::open`].
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(600);
/// Largest `current.json` or `leaf_version.json` read.
const MAX_RECORD_BYTES: u64 = 1 << 20;
/// Most rollback steps remembered in `current.json`.
pub const MAX_HISTORY: usize = 64;

/// An adapter version id: the lowercase hex SHA-256 content hash of the adapter. Deserialising
/// one checks it like [`VersionId::parse`], so an id read from disk can never name a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct VersionId(String);

impl<'de> Deserialize<'de> for VersionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VersionId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl VersionId {
    /// Checks that `s` is a full version id (64 lowercase hex digits).
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(VersionId(s.to_string()))
        } else {
            Err(Error::Store(format!(
                "{s:?} is not a version id (64 lowercase hex digits)"
            )))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Caller-supplied metadata recorded with a version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionMeta {
    /// The version this one was trained from, if any.
    pub parent: Option<VersionId>,
    /// The trainer's step counter when the version was written.
    pub step: Option<u64>,
    /// Free-form notes (metrics, run name, ...).
    pub notes: serde_json::Map<String, serde_json::Value>,
}

/// A version as listed by the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version id.
    pub id: VersionId,
    /// When the version was first published, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// LoRA rank.
    pub rank: usize,
    /// Total LoRA parameters.
    pub num_parameters: usize,
    /// The caller's metadata.
    pub meta: VersionMeta,
    /// Whether this is the current version.
    pub is_current: bool,
}

/// `leaf_version.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredMeta {
    id: VersionId,
    created_unix_ms: u64,
    rank: usize,
    num_parameters: usize,
    #[serde(default)]
    meta: VersionMeta,
}

/// `current.json`: the current version and the versions before it (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CurrentRecord {
    /// The version servers should load.
    pub current: Option<VersionId>,
    /// Earlier current versions, oldest first; the last one is the rollback target.
    #[serde(default)]
    pub previous: Vec<VersionId>,
}

/// A step of a store operation at which a failure can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailPoint {
    /// Publish: creating the temporary directory.
    PublishCreateTemp,
    /// Publish: writing `adapter_config.json`.
    PublishWriteConfig,
    /// Publish: writing `adapter_model.safetensors`.
    PublishWriteWeights,
    /// Publish: writing `leaf_version.json`.
    PublishWriteMeta,
    /// Publish: fsyncing the temporary directory.
    PublishSyncTemp,
    /// Publish: renaming the temporary directory into `versions/`.
    PublishRename,
    /// Publish: fsyncing `versions/` after the rename.
    PublishSyncVersions,
    /// Switching `current.json`: writing and fsyncing the temporary file.
    RecordWriteTemp,
    /// Switching `current.json`: renaming the temporary file over it.
    RecordRename,
    /// Switching `current.json`: fsyncing the root after the rename.
    RecordSyncRoot,
    /// Retention: removing one old version.
    RetainRemove,
}

impl FailPoint {
    /// Every step of publishing a version.
    pub const PUBLISH: [FailPoint; 7] = [
        FailPoint::PublishCreateTemp,
        FailPoint::PublishWriteConfig,
        FailPoint::PublishWriteWeights,
        FailPoint::PublishWriteMeta,
        FailPoint::PublishSyncTemp,
        FailPoint::PublishRename,
        FailPoint::PublishSyncVersions,
    ];
    /// Every step of switching `current.json` (promote, rollback, retain).
    pub const RECORD: [FailPoint; 3] = [
        FailPoint::RecordWriteTemp,
        FailPoint::RecordRename,
        FailPoint::RecordSyncRoot,
    ];
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The step fails with an I/O error; the operation cleans up what it can and returns it.
    Error,
    /// The process "dies" at this step: the operation returns at once, leaving everything on
    /// disk as it is (temporary files included), as a crash would.
    Crash,
}

/// A fault-injection hook: called before each [`FailPoint`]; `Some(fault)` injects it.
pub type FaultHook = Arc<dyn Fn(FailPoint) -> Option<Fault> + Send + Sync>;

/// The on-disk versioned adapter store; see the module docs.
pub struct AdapterStore {
    root: PathBuf,
    write_lock: Mutex<()>,
    hook: Option<FaultHook>,
}

impl fmt::Debug for AdapterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterStore")
            .field("root", &self.root)
            .finish()
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How a step ended when a fault was injected.
enum Injected {
    Error(Error),
    Crash(Error),
}

impl AdapterStore {
    /// Opens (creating if needed) the store at `root` and removes stale temporary entries (see
    /// the module docs). A corrupt `current.json` is an error here.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with_stale_age(root, STALE_TEMP_AGE)
    }

    /// [`AdapterStore::open`], removing temporary entries older than `stale_temp_age` (still
    /// only while no writer holds the store). `Duration::ZERO` suits a recovery after every
    /// writer is known to be gone.
    pub fn open_with_stale_age(root: &Path, stale_temp_age: Duration) -> Result<Self> {
        let versions = root.join(VERSIONS_DIR);
        std::fs::create_dir_all(&versions).map_err(|e| Error::io(&versions, e))?;
        let store = AdapterStore {
            root: root.to_path_buf(),
            write_lock: Mutex::new(()),
            hook: None,
        };
        store.clean_temporaries(stale_temp_age)?;
        // A corrupt current.json is reported now rather than at the first promote.
        store.read_record()?;
        Ok(store)
    }

    /// Installs a fault-injection hook (for crash-safety tests).
    pub fn set_fault_hook(&mut self, hook: Option<FaultHook>) {
        self.hook = hook;
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of version `id` (an error if the store has no such version). Servers hand
    /// this directory to mistral.rs as the adapter path.
    pub fn path(&self, id: &VersionId) -> Result<PathBuf> {
        let dir = self.version_dir(id);
        if dir.join(META_FILE).is_file() {
            Ok(dir)
        } else {
            Err(Error::UnknownVersion(id.to_string()))
        }
    }

    /// Publishes `adapter` as a new immutable version and returns its id. Publishing an adapter
    /// already in the store changes nothing and returns the same id. Does not make it current.
    pub fn publish(&self, adapter: &LoraAdapter, meta: VersionMeta) -> Result<VersionId> {
        let _guard = self.lock()?;
        let id = VersionId::parse(&adapter.version_id()?)?;
        let dest = self.version_dir(&id);
        if dest.join(META_FILE).is_file() {
            return Ok(id);
        }
        let weights = adapter.safetensors_bytes()?;
        let config = adapter.config.to_json_pretty()?;
        let stored = StoredMeta {
            id: id.clone(),
            created_unix_ms: now_ms(),
            rank: adapter.config.r,
            num_parameters: adapter.num_parameters(),
            meta,
        };
        let meta_json = serde_json::to_string_pretty(&stored)
            .map_err(|e| Error::Store(format!("cannot serialise version metadata: {e}")))?;

        let tmp = self.tmp_path("publish");
        let result = (|| -> std::result::Result<(), Injected> {
            self.step(FailPoint::PublishCreateTemp)?;
            std::fs::create_dir(&tmp).map_err(|e| Injected::Error(Error::io(&tmp, e)))?;
            self.step(FailPoint::PublishWriteConfig)?;
            write_synced(&tmp.join(CONFIG_FILE), config.as_bytes()).map_err(Injected::Error)?;
            self.step(FailPoint::PublishWriteWeights)?;
            write_synced(&tmp.join(WEIGHTS_FILE), &weights).map_err(Injected::Error)?;
            self.step(FailPoint::PublishWriteMeta)?;
            write_synced(&tmp.join(META_FILE), meta_json.as_bytes()).map_err(Injected::Error)?;
            self.step(FailPoint::PublishSyncTemp)?;
            sync_dir(&tmp).map_err(Injected::Error)?;
            self.step(FailPoint::PublishRename)?;
            std::fs::rename(&tmp, &dest).map_err(|e| Injected::Error(Error::io(&dest, e)))?;
            self.step(FailPoint::PublishSyncVersions)?;
            sync_dir(&self.root.join(VERSIONS_DIR)).map_err(Injected::Error)?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                tracing::info!(version = %id, "published adapter version");
                Ok(id)
            }
            Err(Injected::Crash(e)) => Err(e),
            Err(Injected::Error(e)) => {
                if tmp.exists() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                Err(e)
            }
        }
    }

    /// Loads version `id`, checking that its content still hashes to `id`.
    pub fn get(&self, id: &VersionId) -> Result<LoraAdapter> {
        let dir = self.path(id)?;
        let adapter = LoraAdapter::load(&dir)?;
        let actual = adapter.version_id()?;
        if actual != id.as_str() {
            return Err(Error::Store(format!(
                "version {id} is corrupt: its content hashes to {actual}"
            )));
        }
        Ok(adapter)
    }

    /// Metadata of version `id`.
    pub fn info(&self, id: &VersionId) -> Result<VersionInfo> {
        let record = self.read_record()?;
        self.read_info(id, record.current.as_ref())
    }

    /// The current version, if one was promoted.
    pub fn current(&self) -> Result<Option<VersionId>> {
        Ok(self.read_record()?.current)
    }

    /// The whole `current.json` record (current version and rollback history).
    pub fn record(&self) -> Result<CurrentRecord> {
        self.read_record()
    }

    /// Every version in the store, oldest first (by creation time, then id).
    pub fn list(&self) -> Result<Vec<VersionInfo>> {
        let record = self.read_record()?;
        let dir = self.root.join(VERSIONS_DIR);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(id) = VersionId::parse(name) else {
                continue;
            };
            out.push(self.read_info(&id, record.current.as_ref())?);
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    /// Resolves a full id or a unique prefix (at least 4 hex digits) to a version in the store.
    pub fn resolve(&self, prefix: &str) -> Result<VersionId> {
        if let Ok(id) = VersionId::parse(prefix) {
            self.path(&id)?;
            return Ok(id);
        }
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::UnknownVersion(prefix.to_string()));
        }
        let prefix_lc = prefix.to_ascii_lowercase();
        let matches: Vec<VersionId> = self
            .list()?
            .into_iter()
            .map(|v| v.id)
            .filter(|id| id.as_str().starts_with(&prefix_lc))
            .collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(Error::UnknownVersion(prefix.to_string())),
            n => Err(Error::Store(format!(
                "version prefix {prefix:?} is ambiguous ({n} versions match)"
            ))),
        }
    }

    /// Makes `id` the current version; the old current one becomes the rollback target.
    /// Promoting the current version changes nothing. The version is read and its content hash
    /// checked first, so a damaged version never becomes current.
    pub fn promote(&self, id: &VersionId) -> Result<()> {
        let _guard = self.lock()?;
        self.get(id)?;
        let mut record = self.read_record()?;
        if record.current.as_ref() == Some(id) {
            return Ok(());
        }
        if let Some(old) = record.current.take() {
            record.previous.push(old);
        }
        if record.previous.len() > MAX_HISTORY {
            let excess = record.previous.len() - MAX_HISTORY;
            record.previous.drain(..excess);
        }
        record.current = Some(id.clone());
        self.write_record(&record)?;
        tracing::info!(version = %id, "promoted adapter version");
        Ok(())
    }

    /// Makes the previous current version current again and returns it; an error if there is
    /// none, or if it is damaged (its content no longer matches its id). Versions in the history
    /// that no longer exist are skipped.
    pub fn rollback(&self) -> Result<VersionId> {
        let _guard = self.lock()?;
        let mut record = self.read_record()?;
        while let Some(candidate) = record.previous.pop() {
            if self.version_dir(&candidate).join(META_FILE).is_file() {
                self.get(&candidate)?;
                record.current = Some(candidate.clone());
                self.write_record(&record)?;
                tracing::info!(version = %candidate, "rolled back adapter version");
                return Ok(candidate);
            }
        }
        Err(Error::NoRollbackTarget)
    }

    /// Deletes all but the newest `keep` versions, never the current version nor the rollback
    /// target (the newest existing entry of the history). Returns the deleted ids.
    pub fn retain(&self, keep: usize) -> Result<Vec<VersionId>> {
        let _guard = self.lock()?;
        let versions = self.list()?;
        let mut record = self.read_record()?;
        let mut kept: BTreeSet<VersionId> = versions
            .iter()
            .rev()
            .take(keep)
            .map(|v| v.id.clone())
            .collect();
        if let Some(cur) = &record.current {
            kept.insert(cur.clone());
        }
        let existing: BTreeSet<&VersionId> = versions.iter().map(|v| &v.id).collect();
        if let Some(target) = record.previous.iter().rev().find(|p| existing.contains(p)) {
            kept.insert(target.clone());
        }
        let doomed: Vec<VersionId> = versions
            .iter()
            .map(|v| v.id.clone())
            .filter(|id| !kept.contains(id))
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        // Forget deleted versions in the history first, so the record never names a
        // version that is being removed.
        let pruned: Vec<VersionId> = record
            .previous
            .iter()
            .filter(|p| kept.contains(*p))
            .cloned()
            .collect();
        if pruned != record.previous {
            record.previous = pruned;
            self.write_record(&record)?;
        }
        for id in &doomed {
            self.remove_version(id)?;
        }
        tracing::info!(
            deleted = doomed.len(),
            "retention removed old adapter versions"
        );
        Ok(doomed)
    }

    fn remove_version(&self, id: &VersionId) -> Result<()> {
        // Move it out of versions/ atomically first: a half-deleted directory is never listed.
        let trash = self.tmp_path("trash");
        self.step(FailPoint::RetainRemove).map_err(|e| match e {
            Injected::Error(e) | Injected::Crash(e) => e,
        })?;
        let dir = self.version_dir(id);
        std::fs::rename(&dir, &trash).map_err(|e| Error::io(&dir, e))?;
        sync_dir(&self.root.join(VERSIONS_DIR))?;
        std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))
    }

    /// The writers' lock: this process's mutex, then the cross-process `flock` (waiting for it).
    fn lock(&self) -> Result<WriteGuard<'_>> {
        let inner = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let file = self.lock_file()?;
        flock(&file, &self.root.join(LOCK_FILE), true)?;
        Ok(WriteGuard {
            _file: file,
            _inner: inner,
        })
    }

    /// The writers' lock if no writer holds it now; `None` when one does (or the lock file
    /// cannot be opened, e.g. on a read-only store).
    fn try_lock(&self) -> Option<WriteGuard<'_>> {
        let inner = self.write_lock.try_lock().ok()?;
        let file = self.lock_file().ok()?;
        match flock(&file, &self.root.join(LOCK_FILE), false) {
            Ok(true) => Some(WriteGuard {
                _file: file,
                _inner: inner,
            }),
            _ => None,
        }
    }

    fn lock_file(&self) -> Result<std::fs::File> {
        let path = self.root.join(LOCK_FILE);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))
    }

    fn version_dir(&self, id: &VersionId) -> PathBuf {
        self.root.join(VERSIONS_DIR).join(id.as_str())
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!(
            "{TMP_PREFIX}{what}-{}-{}-{n}",
            std::process::id(),
            now_ms()
        ))
    }

    fn step(&self, point: FailPoint) -> std::result::Result<(), Injected> {
        match self.hook.as_ref().and_then(|h| h(point)) {
            None => Ok(()),
            Some(Fault::Error) => Err(Injected::Error(Error::io(
                &self.root,
                std::io::Error::other(format!("injected failure at {point:?}")),
            ))),
            Some(Fault::Crash) => Err(Injected::Crash(Error::Store(format!(
                "simulated crash at {point:?}"
            )))),
        }
    }

    /// Removes `.tmp-*` entries older than `stale_age`, only while holding the writers' lock
    /// taken without waiting: with a writer active nothing is removed.
    fn clean_temporaries(&self, stale_age: Duration) -> Result<()> {
        let Some(_guard) = self.try_lock() else {
            tracing::debug!(root = %self.root.display(), "a writer holds the store; temporaries left alone");
            return Ok(());
        };
        let entries = std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let age = meta
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or(Duration::ZERO);
            if age < stale_age {
                tracing::debug!(path = %path.display(), "temporary entry is recent; kept");
                continue;
            }
            let ft = meta.file_type();
            let r = if ft.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(|e| Error::io(&path, e))?;
            tracing::info!(path = %path.display(), "removed a stale temporary entry");
        }
        Ok(())
    }

    fn read_record(&self) -> Result<CurrentRecord> {
        let path = self.root.join(CURRENT_FILE);
        match read_regular_file(&path, MAX_RECORD_BYTES) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| Error::Json { path, source: e })
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(CurrentRecord::default())
            }
            Err(e) => Err(e),
        }
    }

    fn write_record(&self, record: &CurrentRecord) -> Result<()> {
        let text = serde_json::to_string_pretty(record)
            .map_err(|e| Error::Store(format!("cannot serialise current.json: {e}")))?;
        let tmp = self.tmp_path("current");
        let dest = self.root.join(CURRENT_FILE);
        let result = (|| -> std::result::Result<(), Injected> {
            self.step(FailPoint::RecordWriteTemp)?;
            write_synced(&tmp, text.as_bytes()).map_err(Injected::Error)?;
            self.step(FailPoint::RecordRename)?;
            std::fs::rename(&tmp, &dest).map_err(|e| Injected::Error(Error::io(&dest, e)))?;
            self.step(FailPoint::RecordSyncRoot)?;
            sync_dir(&self.root).map_err(Injected::Error)?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(Injected::Crash(e)) => Err(e),
            Err(Injected::Error(e)) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn read_info(&self, id: &VersionId, current: Option<&VersionId>) -> Result<VersionInfo> {
        let dir = self.version_dir(id);
        let path = dir.join(META_FILE);
        let text = match read_regular_file(&path, MAX_RECORD_BYTES) {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::UnknownVersion(id.to_string()))
            }
            Err(e) => return Err(e),
        };
        let stored: StoredMeta = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        if &stored.id != id {
            return Err(Error::Store(format!(
                "{} names version {}, not {id}",
                path.display(),
                stored.id
            )));
        }
        Ok(VersionInfo {
            is_current: current == Some(id),
            id: stored.id,
            created_unix_ms: stored.created_unix_ms,
            rank: stored.rank,
            num_parameters: stored.num_parameters,
            meta: stored.meta,
        })
    }
}

/// Both halves of the writers' lock; the `flock` is released when the file closes (first).
struct WriteGuard<'a> {
    _file: std::fs::File,
    _inner: MutexGuard<'a, ()>,
}

/// Takes an exclusive `flock` on `file`, waiting for it when `wait`; `Ok(false)` when `wait`
/// is false and another descriptor holds it.
#[cfg(unix)]
fn flock(file: &std::fs::File, path: &Path, wait: bool) -> Result<bool> {
    use std::os::unix::io::AsRawFd as _;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock only acts on the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(Error::io(path, e)),
        }
    }
}

/// No cross-process lock off Unix: writers are serialised inside one process only.
#[cfg(not(unix))]
fn flock(_file: &std::fs::File, _path: &Path, _wait: bool) -> Result<bool> {
    Ok(true)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
