//! [`ClusterAdmin`]: a replica's promote and rollback routes as a compare-and-set on the
//! cluster's `current` key, so every replica converges on the result.
//!
//! Promote first makes sure the version is usable here (downloaded, hash checked, validated
//! against the base model), then moves `current`, then waits (up to [`SETTLE`]) for this
//! replica's follower to apply it and answers with the record, the revision and the follower's
//! state. Rollback moves `current` to the newest version of its history.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::versions::CurrentRecord;
use super::{Cluster, GroupPublisher, VersionBoard, VersionFollower};
use crate::serving::http::AdapterControl;
use crate::serving::{LeafServer, ServeError, BASE_VERSION};

/// Longest wait for this replica to apply a version it promoted.
pub const SETTLE: Duration = Duration::from_secs(120);

/// The cluster's adapter control for one replica's admin API.
#[derive(Debug)]
pub struct ClusterAdmin {
    server: Arc<LeafServer>,
    cluster: Cluster,
    follower: Arc<VersionFollower>,
    publisher: Option<Arc<GroupPublisher>>,
    name: String,
}

impl ClusterAdmin {
    /// The control of replica `name`.
    pub fn new(
        server: Arc<LeafServer>,
        cluster: Cluster,
        follower: Arc<VersionFollower>,
        publisher: Option<Arc<GroupPublisher>>,
        name: &str,
    ) -> Self {
        ClusterAdmin {
            server,
            cluster,
            follower,
            publisher,
            name: name.to_string(),
        }
    }

    async fn settle(&self, record: CurrentRecord, revision: u64) -> Result<Value, ServeError> {
        let applied = self.follower.wait_handled(revision, SETTLE).await;
        let st = self.follower.status();
        if let Some(f) = &st.failed {
            if f.revision == revision {
                return Err(ServeError::Load(format!(
                    "`current` moved to {} (revision {revision}) but this replica could not \
                     load it: {}",
                    f.version, f.reason
                )));
            }
        }
        Ok(json!({
            "cluster": {"current": record, "revision": revision},
            "applied_here": applied,
            "serving": self.server.current_version(),
            "follower": st,
        }))
    }
}

#[async_trait::async_trait]
impl AdapterControl for ClusterAdmin {
    async fn promote(&self, version: &str) -> Result<Value, ServeError> {
        // A unique prefix of a version this replica knows resolves to its full id.
        let version = match self.server.store() {
            Some(store) if version != BASE_VERSION => store
                .resolve(version)
                .map(|id| id.to_string())
                .unwrap_or_else(|_| version.to_string()),
            _ => version.to_string(),
        };
        self.follower.prefetch(&version).await?;
        let by = format!("admin@{}", self.name);
        let board = VersionBoard::open(&self.cluster).await?;
        let (record, revision) = board.promote(&version, &by).await?;
        self.settle(record, revision).await
    }

    async fn rollback(&self) -> Result<Value, ServeError> {
        let by = format!("admin@{}", self.name);
        let board = VersionBoard::open(&self.cluster).await?;
        let (record, revision) = board.rollback(&by).await?;
        self.settle(record, revision).await
    }

    fn status(&self) -> Value {
        json!({
            "replica": self.name,
            "follower": self.follower.status(),
            "publisher": self.publisher.as_ref().map(|p| p.stats()),
        })
    }
}
