//! Scale-out over NATS JetStream: many serving replicas feed one trainer, and every replica
//! follows the same adapter version.
//!
//! ```text
//!  leaf serve --cluster ──groups──▶ stream LEAF_GROUPS ──pull consumer──▶ cluster trainer
//!        ▲                          (durable, dedup by group id)            │ update, checkpoint, ack
//!        │ watch `current`, download, check hash, hot-swap                 ▼
//!        └──────────── KV bucket leaf-control (`current`, CAS) ◀── object store leaf-versions
//! ```
//!
//! One concept per file:
//!
//! * [`config`]: [`ClusterConfig`], the names of the stream, consumer and buckets.
//! * [`connection`]: [`Cluster`], the NATS client and the JetStream objects created on demand.
//! * [`wire`]: [`WireGroup`], a sealed group as it travels (ids, log-probs, rewards, versions).
//! * [`publisher`]: [`GroupPublisher`], the replica side: a bounded buffer that never makes
//!   serving wait, drops and counts overflow, and resumes after a reconnect.
//! * [`versions`]: [`VersionBoard`], version files in the object store and the `current` key
//!   moved by compare-and-set.
//! * [`follower`]: [`VersionFollower`], the replica side of versions: watch `current`, download,
//!   verify the content hash, hot-swap; a version that fails leaves the last good one serving.
//! * [`admin`]: [`ClusterAdmin`], promote and rollback of a replica's admin API as a CAS.
//! * [`consumer`]: [`StreamSource`], the trainer's durable pull consumer.
//! * [`train`]: `leaf train --cluster`: the one learner of `leaf train` with the stream as its
//!   group source ([`StreamGroupSource`]) and the cluster's versions as its sink
//!   ([`ClusterSink`]).
//! * [`replica`]: [`Replica`], what `leaf serve --cluster` starts next to the server.
//! * [`local_server`]: [`LocalNatsServer`], a `nats-server -js` child process for tests and benches.
//!
//! Exactly once: a group is acked only after the update that used it is applied and the
//! trainer checkpoint holding its id is saved; a trainer killed in between gets the group
//! again and skips it because its id is in the checkpoint.

pub mod admin;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod follower;
pub mod local_server;
pub mod publisher;
pub mod replica;
pub mod train;
pub mod versions;
pub mod wire;

pub use admin::ClusterAdmin;
pub use config::ClusterConfig;
pub use connection::Cluster;
pub use consumer::{StreamSource, StreamedGroup};
pub use follower::{FollowerStatus, VersionFollower};
pub use local_server::LocalNatsServer;
pub use publisher::{GroupPublisher, PublisherStats};
pub use replica::Replica;
pub use train::{ClusterSink, StreamGroupSource, StreamOptions};
pub use versions::{CurrentRecord, VersionBoard};
pub use wire::WireGroup;

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The NATS server could not be reached or refused the request.
    #[error("nats {what}: {reason}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's error.
        reason: String,
    },
    /// A configuration value is invalid; the message names it.
    #[error("cluster config: {0}")]
    Config(String),
    /// A message on the stream is not a group this version understands.
    #[error("group message {id}: {reason}")]
    BadMessage {
        /// The message id (or stream sequence).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A version in the object store is missing, corrupt or does not hash to its id.
    #[error("version {version}: {reason}")]
    Version {
        /// The version id.
        version: String,
        /// What is wrong.
        reason: String,
    },
    /// Someone else moved `current` first; the caller may re-read and retry.
    #[error("the `current` key moved (expected revision {expected})")]
    Conflict {
        /// The revision the update expected.
        expected: u64,
    },
    /// An adapter was refused.
    #[error(transparent)]
    Adapter(#[from] leaf_adapters::Error),
    /// Serving failed (a swap, the store).
    #[error(transparent)]
    Serve(#[from] crate::serving::ServeError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    /// `nats-server` could not be started.
    #[error("nats-server: {0}")]
    Server(String),
}

impl ClusterError {
    /// A NATS failure while doing `what`.
    pub(crate) fn nats(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        ClusterError::Nats {
            what: what.into(),
            reason: e.to_string(),
        }
    }
}

impl From<ClusterError> for crate::serving::ServeError {
    fn from(e: ClusterError) -> Self {
        use crate::serving::ServeError;
        match e {
            ClusterError::Serve(s) => s,
            ClusterError::Adapter(a) => ServeError::Adapter(a),
            ClusterError::Train(t) => ServeError::Train(t),
            ClusterError::Config(m) => ServeError::Config(m),
            ClusterError::Version { version, reason } if reason.contains("not in the store") => {
                ServeError::Adapter(leaf_adapters::Error::UnknownVersion(format!(
                    "{version} ({reason})"
                )))
            }
            other => ServeError::Engine(format!("cluster: {other}")),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
