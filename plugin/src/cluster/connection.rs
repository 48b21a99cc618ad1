//! [`Cluster`]: one NATS connection and the JetStream objects of a [`ClusterConfig`], created
//! on first use by whichever process gets there first (creating them is idempotent).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};

use super::{ClusterConfig, ClusterError};

/// History kept for the `current` key (what `rollback` and the audit trail read).
const CONTROL_HISTORY: i64 = 64;

/// A connection to the cluster's NATS server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Cluster {
    /// Checks `config` and connects. Returns at once even when the server is down: the client
    /// keeps trying in the background (first attempt included) with a delay capped at 1 s,
    /// so a replica can serve before NATS is up.
    pub async fn connect(config: ClusterConfig, name: &str) -> Result<Self, ClusterError> {
        config.check()?;
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50u64 << attempts.min(5)).min(1000))
            })
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| ClusterError::nats(format!("connecting to {}", config.url), e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ClusterConfig::secs(config.publish_timeout_s));
        Ok(Cluster { config, client, js })
    }

    /// The configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The raw client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The groups stream (file storage, deduplicated by `Nats-Msg-Id`), created if missing.
    pub async fn groups_stream(&self) -> Result<stream::Stream, ClusterError> {
        let c = &self.config;
        self.js
            .get_or_create_stream(stream::Config {
                name: c.stream.clone(),
                subjects: vec![c.subject.clone()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                duplicate_window: ClusterConfig::secs(c.duplicate_window_s),
                max_age: ClusterConfig::secs(c.max_age_s),
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::nats(format!("creating stream {}", c.stream), e))
    }

    /// The trainer's durable pull consumer (explicit acks, redelivery after `ack_wait_s`,
    /// unlimited redeliveries), created if missing.
    pub async fn groups_consumer(&self) -> Result<consumer::PullConsumer, ClusterError> {
        let c = &self.config;
        let stream = self.groups_stream().await?;
        stream
            .get_or_create_consumer(
                &c.consumer,
                consumer::pull::Config {
                    durable_name: Some(c.consumer.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_wait: ClusterConfig::secs(c.ack_wait_s),
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ClusterError::nats(format!("creating consumer {}", c.consumer), e))
    }

    /// The key-value bucket holding `current`, created if missing.
    pub async fn control(&self) -> Result<kv::Store, ClusterError> {
        let c = &self.config;
        if let Ok(store) = self.js.get_key_value(&c.control_bucket).await {
            return Ok(store);
        }
        // The stream a key-value bucket is, created directly: the client's
        // `create_key_value` first reads the account info, whose 2.9 form (Debian's server)
        // it cannot parse. The fields are the ones `create_key_value` sets.
        let created = self
            .js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{}", c.control_bucket),
                subjects: vec![format!("$KV.{}.>", c.control_bucket)],
                max_messages_per_subject: CONTROL_HISTORY,
                storage: stream::StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                num_replicas: 1,
                max_message_size: -1,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                self.js.get_key_value(&c.control_bucket).await.map_err(|e| {
                    ClusterError::nats(format!("opening bucket {}", c.control_bucket), e)
                })
            }
            // Another process created it between the two calls.
            Err(e) => self.js.get_key_value(&c.control_bucket).await.map_err(|_| {
                ClusterError::nats(format!("creating bucket {}", c.control_bucket), e)
            }),
        }
    }

    /// The object store bucket of version files, created if missing.
    pub async fn versions(&self) -> Result<object_store::ObjectStore, ClusterError> {
        let c = &self.config;
        if let Ok(store) = self.js.get_object_store(&c.versions_bucket).await {
            return Ok(store);
        }
        let created = self
            .js
            .create_object_store(object_store::Config {
                bucket: c.versions_bucket.clone(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match created {
            Ok(store) => Ok(store),
            Err(e) => self
                .js
                .get_object_store(&c.versions_bucket)
                .await
                .map_err(|_| {
                    ClusterError::nats(format!("creating bucket {}", c.versions_bucket), e)
                }),
        }
    }
}
