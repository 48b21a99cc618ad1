//! [`VersionFollower`]: a replica follows the cluster's `current` version.
//!
//! A watch on the `current` key (its latest value first, then every change, re-established
//! after a disconnect) feeds the newest record to an apply task, which skips any record
//! superseded while it was busy. Applying a version: download it from the object store into
//! the replica's own adapter store (the hash is checked on download and again by the store),
//! then [`LeafServer::promote`], which validates, loads, probes and hot-swaps. A version that
//! fails leaves the replica on its last good version; the failure is kept in
//! [`FollowerStatus`] and counted in `leaf_cluster_version_failures_total`, and
//! `leaf_cluster_version_failed` is 1 until a later version applies. A failed download (NATS
//! unreachable) is retried; a version that fails to load is not retried until `current` moves.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use leaf_adapters::store::{VersionId, VersionMeta};
use serde::Serialize;
use tokio::sync::watch;

use super::versions::{CurrentRecord, CURRENT_KEY};
use super::{Cluster, ClusterError, VersionBoard};
use crate::serving::{LeafServer, BASE_VERSION};

/// Pause before re-establishing a broken watch or retrying a failed download.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What the follower did last.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FollowerStatus {
    /// The revision of `current` last seen.
    pub seen_revision: u64,
    /// The version `current` names.
    pub cluster_version: Option<String>,
    /// The revision last dealt with (applied, or failed for good).
    pub handled_revision: u64,
    /// The version this replica serves.
    pub serving: String,
    /// Versions applied by following.
    pub applied: u64,
    /// Versions that failed to download, validate or load.
    pub failures: u64,
    /// The last version that failed, and why (cleared when a later one applies).
    pub failed: Option<FailedVersion>,
}

/// A version this replica could not load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedVersion {
    /// The version.
    pub version: String,
    /// The `current` revision that named it.
    pub revision: u64,
    /// Why.
    pub reason: String,
}

/// The running follower (its tasks end when it is dropped).
pub struct VersionFollower {
    applier: Arc<Applier>,
    status: Arc<Mutex<FollowerStatus>>,
    handled: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for VersionFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionFollower")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Drop for VersionFollower {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Applier {
    server: Arc<LeafServer>,
    cluster: Cluster,
    board: tokio::sync::OnceCell<VersionBoard>,
    downloads: PathBuf,
    status: Arc<Mutex<FollowerStatus>>,
    handled: watch::Sender<u64>,
}

impl VersionFollower {
    /// Applies the cluster's current version (waiting at most `start_timeout`: with NATS down
    /// the replica comes up on its own store's current version), then follows every change.
    /// `downloads` is a scratch directory for downloads. The server needs an adapter store.
    pub async fn start(
        server: Arc<LeafServer>,
        cluster: Cluster,
        downloads: PathBuf,
        start_timeout: Duration,
    ) -> Result<Self, ClusterError> {
        if server.store().is_none() {
            return Err(ClusterError::Config(
                "a cluster replica needs an adapter store (--store)".into(),
            ));
        }
        let status = Arc::new(Mutex::new(FollowerStatus {
            serving: server.current_version(),
            ..FollowerStatus::default()
        }));
        let (handled_tx, handled) = watch::channel(0u64);
        let applier = Arc::new(Applier {
            server,
            cluster,
            board: tokio::sync::OnceCell::new(),
            downloads,
            status: status.clone(),
            handled: handled_tx,
        });
        // Come up on the current version.
        let initial = async {
            let board = applier.board().await?;
            board.current().await
        };
        match tokio::time::timeout(start_timeout, initial).await {
            Ok(Ok(Some((record, rev)))) => {
                applier.note_seen(&record, rev);
                applier.apply(&record, rev).await;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read `current`; serving the local version")
            }
            Err(_) => tracing::warn!("NATS did not answer in time; serving the local version"),
        }
        let (latest_tx, latest_rx) = watch::channel::<Option<(CurrentRecord, u64)>>(None);
        let watcher = tokio::spawn(watch_current(applier.clone(), latest_tx));
        let apply = tokio::spawn(apply_latest(applier.clone(), latest_rx));
        Ok(VersionFollower {
            applier,
            status,
            handled,
            tasks: vec![watcher, apply],
        })
    }

    /// What the follower did last.
    pub fn status(&self) -> FollowerStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Downloads `version` into this replica's store (hash checked) and validates it against
    /// the base model, without serving it: what an admin promotion checks before it moves
    /// `current` for every replica.
    pub async fn prefetch(&self, version: &str) -> Result<(), ClusterError> {
        if version == BASE_VERSION {
            return Ok(());
        }
        let dir = self.applier.ensure_local(version).await?;
        let server = &self.applier.server;
        server
            .model()
            .validate_adapter(&dir, &server.config().limits)?;
        Ok(())
    }

    /// Waits until revision `revision` of `current` (or a later one) was dealt with, up to
    /// `timeout`; true when it was.
    pub async fn wait_handled(&self, revision: u64, timeout: Duration) -> bool {
        let mut rx = self.handled.clone();
        tokio::time::timeout(timeout, rx.wait_for(|&h| h >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Watches `current` (latest value first) and publishes the newest record; re-watches after
/// any break.
async fn watch_current(applier: Arc<Applier>, latest: watch::Sender<Option<(CurrentRecord, u64)>>) {
    loop {
        let board = match applier.board().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "cluster buckets unavailable yet");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        match board.control().watch_with_history(CURRENT_KEY).await {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(error = %e, "watch on `current` broke");
                            break;
                        }
                    };
                    if entry.operation != async_nats::jetstream::kv::Operation::Put {
                        continue;
                    }
                    match CurrentRecord::decode(entry.revision, &entry.value) {
                        Ok(record) => {
                            applier.note_seen(&record, entry.revision);
                            latest.send_replace(Some((record, entry.revision)));
                        }
                        Err(e) => tracing::warn!(error = %e, "ignoring a bad `current` value"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch `current` yet"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Applies the newest record each time it changes.
async fn apply_latest(
    applier: Arc<Applier>,
    mut latest: watch::Receiver<Option<(CurrentRecord, u64)>>,
) {
    while latest.changed().await.is_ok() {
        let Some((record, rev)) = latest.borrow_and_update().clone() else {
            continue;
        };
        if rev <= *applier.handled.borrow() {
            continue;
        }
        applier.apply(&record, rev).await;
    }
}

impl Applier {
    fn lock(&self) -> std::sync::MutexGuard<'_, FollowerStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The buckets, opened on first success.
    async fn board(&self) -> Result<&VersionBoard, ClusterError> {
        self.board
            .get_or_try_init(|| VersionBoard::open(&self.cluster))
            .await
    }

    fn note_seen(&self, record: &CurrentRecord, rev: u64) {
        let mut st = self.lock();
        if rev > st.seen_revision {
            st.seen_revision = rev;
            st.cluster_version = Some(record.version.clone());
        }
    }

    /// Applies one record, retrying downloads while it is still the newest.
    async fn apply(&self, record: &CurrentRecord, rev: u64) {
        let version = record.version.clone();
        let mut attempt = 0u32;
        loop {
            let result = self.try_apply(&version).await;
            match result {
                Ok(()) => {
                    let mut st = self.lock();
                    st.serving = self.server.current_version();
                    st.applied += 1;
                    st.failed = None;
                    st.handled_revision = rev;
                    metrics::gauge!("leaf_cluster_version_failed").set(0.0);
                    metrics::counter!("leaf_cluster_versions_applied_total").increment(1);
                    break;
                }
                Err(e) => {
                    let retry = matches!(e, ClusterError::Nats { .. })
                        && self.lock().seen_revision == rev
                        && attempt < 20;
                    if retry {
                        attempt += 1;
                        tracing::debug!(error = %e, %version, "download failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    tracing::warn!(error = %e, %version, "cluster version failed; the last good version keeps serving");
                    let mut st = self.lock();
                    st.serving = self.server.current_version();
                    st.failures += 1;
                    st.failed = Some(FailedVersion {
                        version: version.clone(),
                        revision: rev,
                        reason: e.to_string(),
                    });
                    st.handled_revision = rev;
                    metrics::gauge!("leaf_cluster_version_failed").set(1.0);
                    metrics::counter!("leaf_cluster_version_failures_total").increment(1);
                    break;
                }
            }
        }
        self.handled.send_replace(rev);
    }

    async fn try_apply(&self, version: &str) -> Result<(), ClusterError> {
        if self.server.current_version() == version {
            return Ok(());
        }
        if version == BASE_VERSION {
            self.server.activate_base().await?;
            return Ok(());
        }
        let id = VersionId::parse(version).map_err(|e| ClusterError::Version {
            version: version.to_string(),
            reason: e.to_string(),
        })?;
        self.ensure_local(version).await?;
        self.server.promote(id.as_str()).await?;
        Ok(())
    }

    /// The directory of `version` in the replica's store, downloaded first if missing.
    async fn ensure_local(&self, version: &str) -> Result<PathBuf, ClusterError> {
        let id = VersionId::parse(version).map_err(|e| ClusterError::Version {
            version: version.to_string(),
            reason: e.to_string(),
        })?;
        let store = self
            .server
            .store()
            .ok_or_else(|| ClusterError::Config("the replica has no adapter store".into()))?;
        if store.path(&id).is_err() {
            let dir = self
                .downloads
                .join(format!("{version}.{}", uuid::Uuid::new_v4()));
            let downloaded = match self.board().await {
                Ok(board) => board.download(version, &dir).await,
                Err(e) => Err(e),
            };
            let published = downloaded.and_then(|adapter| {
                let mut notes = serde_json::Map::new();
                notes.insert("source".into(), "cluster".into());
                let id = store.publish(
                    &adapter,
                    VersionMeta {
                        parent: None,
                        step: None,
                        notes,
                    },
                )?;
                Ok(id)
            });
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let stored = published?;
            if stored != id {
                return Err(ClusterError::Version {
                    version: version.to_string(),
                    reason: format!("stored as {stored}"),
                });
            }
        }
        Ok(store.path(&id)?)
    }
}
