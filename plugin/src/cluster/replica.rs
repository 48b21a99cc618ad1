//! [`Replica`]: what `leaf serve --cluster nats://HOST:PORT` runs next to the server.
//!
//! * a pump thread moves every sealed group from the server's queue into the
//!   [`GroupPublisher`] (never blocking: a full buffer drops and counts);
//! * a [`VersionFollower`] keeps the server on the cluster's `current` version;
//! * a [`ClusterAdmin`] to hand to the HTTP API ([`crate::serving::http::HttpConfig::adapter_control`]).
//!
//! Nothing here waits for NATS: a replica starts and serves with the server down, and picks
//! the cluster up when it appears.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{
    Cluster, ClusterAdmin, ClusterConfig, ClusterError, FollowerStatus, GroupPublisher,
    PublisherStats, VersionFollower,
};
use crate::harvest::{PrivacyMode, SealedGroup};
use crate::serving::http::AdapterControl;
use crate::serving::LeafServer;

/// How long a starting replica waits for the cluster's current version.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A serving replica's cluster side.
#[derive(Debug)]
pub struct Replica {
    name: String,
    cluster: Cluster,
    publisher: Arc<GroupPublisher>,
    follower: Arc<VersionFollower>,
    admin: Arc<ClusterAdmin>,
}

impl Replica {
    /// Connects, comes up on the cluster's current version (waiting at most
    /// [`START_TIMEOUT`] for NATS) and starts publishing `groups` and following `current`.
    /// The server needs an adapter store.
    pub async fn start(
        server: Arc<LeafServer>,
        groups: Receiver<SealedGroup>,
        config: ClusterConfig,
    ) -> Result<Self, ClusterError> {
        Self::start_with_timeout(server, groups, config, START_TIMEOUT).await
    }

    /// [`Replica::start`] with another wait for the current version.
    pub async fn start_with_timeout(
        server: Arc<LeafServer>,
        groups: Receiver<SealedGroup>,
        config: ClusterConfig,
        start_timeout: Duration,
    ) -> Result<Self, ClusterError> {
        let store_root = server
            .store()
            .map(|s| s.root().to_path_buf())
            .ok_or_else(|| {
                ClusterError::Config("a cluster replica needs an adapter store (--store)".into())
            })?;
        let name = if config.replica_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            config.replica_id.clone()
        };
        let cluster = Cluster::connect(config, &format!("leaf-replica-{name}")).await?;
        let ids_only = server.config().assembler.privacy == PrivacyMode::IdsOnly;
        let publisher = Arc::new(GroupPublisher::spawn(cluster.clone(), &name, ids_only));
        let pump = publisher.clone();
        std::thread::Builder::new()
            .name("leaf-cluster-pump".into())
            .spawn(move || {
                while let Ok(g) = groups.recv() {
                    pump.offer(g);
                }
            })
            .map_err(|e| ClusterError::Config(format!("cannot spawn the pump thread: {e}")))?;
        let follower = Arc::new(
            VersionFollower::start(
                server.clone(),
                cluster.clone(),
                store_root.join("cluster-downloads"),
                start_timeout,
            )
            .await?,
        );
        let admin = Arc::new(ClusterAdmin::new(
            server,
            cluster.clone(),
            follower.clone(),
            Some(publisher.clone()),
            &name,
        ));
        tracing::info!(replica = %name, url = %cluster.config().url, "cluster replica started");
        Ok(Replica {
            name,
            cluster,
            publisher,
            follower,
            admin,
        })
    }

    /// This replica's name (in group message ids).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The adapter control for [`crate::serving::http::HttpConfig::adapter_control`].
    pub fn control(&self) -> Arc<dyn AdapterControl> {
        self.admin.clone()
    }

    /// The admin control itself.
    pub fn admin(&self) -> &Arc<ClusterAdmin> {
        &self.admin
    }

    /// The publisher's counters.
    pub fn publisher_stats(&self) -> PublisherStats {
        self.publisher.stats()
    }

    /// The follower's state.
    pub fn follower_status(&self) -> FollowerStatus {
        self.follower.status()
    }

    /// The follower.
    pub fn follower(&self) -> &Arc<VersionFollower> {
        &self.follower
    }
}

/// `leaf serve --cluster URL`: starts the replica side when `url` is given and returns the
/// queue the rest of `leaf serve` should drain (a closed one when the replica took it).
pub async fn from_flag(
    server: &Arc<LeafServer>,
    groups: Receiver<SealedGroup>,
    url: Option<&str>,
) -> Result<(Receiver<SealedGroup>, Option<Replica>), ClusterError> {
    let Some(url) = url else {
        return Ok((groups, None));
    };
    let replica = Replica::start(server.clone(), groups, ClusterConfig::new(url)).await?;
    eprintln!(
        "leaf: cluster replica {} on {} (version {})",
        replica.name(),
        url,
        server.current_version()
    );
    let (_, closed) = crossbeam_channel::bounded(0);
    Ok((closed, Some(replica)))
}
