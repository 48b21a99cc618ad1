//! [`VersionBoard`]: adapter versions shared through JetStream.
//!
//! * Files: the object store bucket [`ClusterConfig::versions_bucket`] holds, per version,
//!   `<id>/adapter_model.safetensors` and then `<id>/adapter_config.json` (written last: a
//!   version whose config is present is complete). The id is the version's content hash
//!   (SHA-256, [`LoraAdapter::version_id`]); a download that does not hash to its id is refused.
//! * Pointer: the key `current` of the key-value bucket [`ClusterConfig::control_bucket`]
//!   holds a [`CurrentRecord`] (the version, and the versions before it for rollback). It only
//!   ever moves by compare-and-set on its revision, so concurrent promotions never interleave:
//!   one wins, the other re-reads and decides again.

use std::path::Path;

use async_nats::jetstream::{kv, object_store};
use leaf_adapters::peft::{
    LoraAdapter, CONFIG_FILE, MAX_CONFIG_FILE_BYTES, MAX_WEIGHTS_FILE_BYTES, WEIGHTS_FILE,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{now_ms, Cluster, ClusterError};
use crate::serving::BASE_VERSION;

/// The key every replica watches.
pub const CURRENT_KEY: &str = "current";

/// Versions kept in a [`CurrentRecord`]'s rollback history.
pub const HISTORY: usize = 32;

/// How often a promotion re-reads and retries after losing a compare-and-set.
const CAS_ATTEMPTS: usize = 8;

/// The value of the `current` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentRecord {
    /// The version every replica should serve ([`BASE_VERSION`] for no adapter).
    pub version: String,
    /// The versions current before it, oldest first (at most [`HISTORY`]).
    pub previous: Vec<String>,
    /// Who moved it (`trainer`, `admin@<replica>`).
    pub set_by: String,
    /// When, ms since the Unix epoch.
    pub set_unix_ms: u64,
}

impl CurrentRecord {
    /// Parses a value of the key; `revision` names it in errors.
    pub fn decode(revision: u64, bytes: &[u8]) -> Result<Self, ClusterError> {
        serde_json::from_slice(bytes).map_err(|e| ClusterError::Version {
            version: format!("`{CURRENT_KEY}` revision {revision}"),
            reason: format!("not a current record: {e}"),
        })
    }

    fn next(&self, version: &str, by: &str) -> CurrentRecord {
        let mut previous = self.previous.clone();
        previous.push(self.version.clone());
        let excess = previous.len().saturating_sub(HISTORY);
        previous.drain(..excess);
        CurrentRecord {
            version: version.to_string(),
            previous,
            set_by: by.to_string(),
            set_unix_ms: now_ms(),
        }
    }
}

/// Version files and the `current` pointer of one cluster.
#[derive(Clone)]
pub struct VersionBoard {
    kv: kv::Store,
    objects: object_store::ObjectStore,
}

impl std::fmt::Debug for VersionBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionBoard").finish_non_exhaustive()
    }
}

fn object_name(version: &str, file: &str) -> String {
    format!("{version}/{file}")
}

impl VersionBoard {
    /// Opens (creating if missing) the two buckets.
    pub async fn open(cluster: &Cluster) -> Result<Self, ClusterError> {
        Ok(VersionBoard {
            kv: cluster.control().await?,
            objects: cluster.versions().await?,
        })
    }

    /// The key-value bucket (for watching `current`).
    pub fn control(&self) -> &kv::Store {
        &self.kv
    }

    /// Uploads `adapter`'s files unless the version is already complete; returns its id.
    pub async fn upload(&self, adapter: &LoraAdapter) -> Result<String, ClusterError> {
        let id = adapter.version_id()?;
        if self.is_complete(&id).await {
            return Ok(id);
        }
        let weights = adapter.safetensors_bytes()?;
        let config = adapter.config.to_json_pretty()?;
        for (file, bytes) in [(WEIGHTS_FILE, weights), (CONFIG_FILE, config.into_bytes())] {
            let name = object_name(&id, file);
            self.objects
                .put(name.as_str(), &mut bytes.as_slice())
                .await
                .map_err(|e| ClusterError::nats(format!("uploading {name}"), e))?;
        }
        tracing::info!(version = %id, "uploaded adapter version");
        Ok(id)
    }

    /// Whether every file of `version` is in the object store.
    pub async fn is_complete(&self, version: &str) -> bool {
        self.objects
            .info(object_name(version, CONFIG_FILE))
            .await
            .is_ok()
    }

    /// Downloads `version` into `dir` (created), loads it and checks that it hashes to its id.
    pub async fn download(&self, version: &str, dir: &Path) -> Result<LoraAdapter, ClusterError> {
        let bad = |reason: String| ClusterError::Version {
            version: version.to_string(),
            reason,
        };
        if leaf_adapters::store::VersionId::parse(version).is_err() {
            return Err(bad("not a version id".into()));
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
        for (file, max) in [
            (CONFIG_FILE, MAX_CONFIG_FILE_BYTES),
            (WEIGHTS_FILE, MAX_WEIGHTS_FILE_BYTES),
        ] {
            let name = object_name(version, file);
            let info = self
                .objects
                .info(&name)
                .await
                .map_err(|e| bad(format!("{file} is not in the store ({e})")))?;
            if info.size as u64 > max {
                return Err(bad(format!(
                    "{file} is {} bytes, above the {max}-byte limit",
                    info.size
                )));
            }
            let mut object = self
                .objects
                .get(&name)
                .await
                .map_err(|e| bad(format!("{file} is not in the store ({e})")))?;
            let mut bytes = Vec::with_capacity(info.size);
            // The client checks the object's SHA-256 digest at its end.
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| bad(format!("reading {file}: {e}")))?;
            tokio::fs::write(dir.join(file), &bytes)
                .await
                .map_err(|e| bad(format!("writing {file}: {e}")))?;
        }
        let dir2 = dir.to_path_buf();
        let adapter = tokio::task::spawn_blocking(move || LoraAdapter::load(&dir2))
            .await
            .map_err(|e| bad(format!("load task failed: {e}")))??;
        let actual = adapter.version_id()?;
        if actual != version {
            return Err(bad(format!("its files hash to {actual}")));
        }
        Ok(adapter)
    }

    /// The `current` record and its revision; `None` before anything was promoted.
    pub async fn current(&self) -> Result<Option<(CurrentRecord, u64)>, ClusterError> {
        let entry = self
            .kv
            .entry(CURRENT_KEY)
            .await
            .map_err(|e| ClusterError::nats("reading `current`", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((
                CurrentRecord::decode(e.revision, &e.value)?,
                e.revision,
            ))),
            _ => Ok(None),
        }
    }

    /// Moves `current` to `record` if it is still at `expected` (`None`: not yet set).
    /// Returns the new revision, or [`ClusterError::Conflict`].
    pub async fn compare_and_set(
        &self,
        record: &CurrentRecord,
        expected: Option<u64>,
    ) -> Result<u64, ClusterError> {
        let value = bytes::Bytes::from(serde_json::to_vec(record).map_err(|e| {
            ClusterError::Config(format!("cannot serialise the current record: {e}"))
        })?);
        match expected {
            Some(rev) => {
                self.kv
                    .update(CURRENT_KEY, value, rev)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => {
                            ClusterError::Conflict { expected: rev }
                        }
                        _ => ClusterError::nats("updating `current`", e),
                    })
            }
            None => self
                .kv
                .create(CURRENT_KEY, value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => ClusterError::Conflict { expected: 0 },
                    _ => ClusterError::nats("creating `current`", e),
                }),
        }
    }

    /// Makes `version` current (a complete version in the store, or [`BASE_VERSION`]),
    /// re-reading and retrying when another writer moved the key first. Returns the record
    /// and its revision.
    pub async fn promote(
        &self,
        version: &str,
        by: &str,
    ) -> Result<(CurrentRecord, u64), ClusterError> {
        if version != BASE_VERSION && !self.is_complete(version).await {
            return Err(ClusterError::Version {
                version: version.to_string(),
                reason: "not in the store (never uploaded, or the upload is incomplete)".into(),
            });
        }
        self.move_current(by, |cur| Ok(cur.next(version, by))).await
    }

    /// Makes the previous version current again (the newest one of the history).
    pub async fn rollback(&self, by: &str) -> Result<(CurrentRecord, u64), ClusterError> {
        self.move_current(by, |cur| {
            let mut previous = cur.previous.clone();
            let target = previous.pop().ok_or_else(|| {
                ClusterError::Serve(crate::serving::ServeError::Adapter(
                    leaf_adapters::Error::NoRollbackTarget,
                ))
            })?;
            Ok(CurrentRecord {
                version: target,
                previous,
                set_by: by.to_string(),
                set_unix_ms: now_ms(),
            })
        })
        .await
    }

    async fn move_current(
        &self,
        by: &str,
        next: impl Fn(&CurrentRecord) -> Result<CurrentRecord, ClusterError>,
    ) -> Result<(CurrentRecord, u64), ClusterError> {
        let mut last = None;
        for _ in 0..CAS_ATTEMPTS {
            let (cur, rev) = match self.current().await? {
                Some((c, r)) => (c, Some(r)),
                None => (
                    CurrentRecord {
                        version: BASE_VERSION.to_string(),
                        previous: Vec::new(),
                        set_by: by.to_string(),
                        set_unix_ms: 0,
                    },
                    None,
                ),
            };
            let record = next(&cur)?;
            match self.compare_and_set(&record, rev).await {
                Ok(new_rev) => {
                    tracing::info!(version = %record.version, revision = new_rev, by, "moved `current`");
                    return Ok((record, new_rev));
                }
                Err(e @ ClusterError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClusterError::Conflict { expected: 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_ordered() {
        let mut r = CurrentRecord {
            version: "base".into(),
            previous: vec![],
            set_by: "t".into(),
            set_unix_ms: 0,
        };
        for i in 0..(HISTORY + 5) {
            r = r.next(&format!("v{i}"), "t");
        }
        assert_eq!(r.previous.len(), HISTORY);
        assert_eq!(r.previous.last().unwrap(), &format!("v{}", HISTORY + 3));
        assert_eq!(r.version, format!("v{}", HISTORY + 4));
        let e = CurrentRecord::decode(3, b"nope").unwrap_err().to_string();
        assert!(e.contains("revision 3"), "{e}");
    }
}
