//! [`StreamSource`]: the trainer's end of the group stream, a durable pull consumer.
//!
//! Groups come in batches of at most `max`, each with an [`Acker`](async_nats::jetstream::message::Acker) the trainer uses
//! only after the update that used the group is applied and checkpointed
//! ([`StreamSource::ack`] waits for the server to confirm each ack). An unacked group is
//! redelivered after [`ClusterConfig::ack_wait_s`](super::ClusterConfig::ack_wait_s) (a killed
//! trainer's groups come back to the next one). A message that is not a group is terminated
//! (never redelivered) and counted in `leaf_cluster_groups_invalid_total`.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::{AckKind, Acker};
use futures::StreamExt;

use super::{Cluster, ClusterError, WireGroup};

/// One group taken from the stream, not yet acked.
pub struct StreamedGroup {
    /// [`WireGroup::message_id`]: what the trainer records as applied.
    pub id: String,
    /// The group.
    pub wire: WireGroup,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// How often it was delivered (2 or more after a trainer was killed holding it).
    pub delivered: i64,
    acker: Acker,
}

impl StreamedGroup {
    /// The id, the group, and the acker that acks it later.
    pub fn into_parts(self) -> (String, WireGroup, Acker) {
        (self.id, self.wire, self.acker)
    }
}

impl std::fmt::Debug for StreamedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedGroup")
            .field("id", &self.id)
            .field("stream_sequence", &self.stream_sequence)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

/// The durable pull consumer of the cluster's group stream.
#[derive(Debug)]
pub struct StreamSource {
    consumer: PullConsumer,
    wait: Duration,
    invalid: u64,
}

impl StreamSource {
    /// Opens (creating if missing) the durable consumer. A fetch waits up to `wait` for the
    /// first group.
    pub async fn open(cluster: &Cluster, wait: Duration) -> Result<Self, ClusterError> {
        Ok(StreamSource {
            consumer: cluster.groups_consumer().await?,
            wait,
            invalid: 0,
        })
    }

    /// Messages terminated because they were not groups.
    pub fn invalid(&self) -> u64 {
        self.invalid
    }

    /// Up to `max` groups (fewer when the stream holds fewer; empty when none arrived within
    /// the wait).
    pub async fn next_groups(&mut self, max: usize) -> Result<Vec<StreamedGroup>, ClusterError> {
        let mut batch = self
            .consumer
            .batch()
            .max_messages(max.max(1))
            .expires(self.wait)
            .messages()
            .await
            .map_err(|e| ClusterError::nats("fetching groups", e))?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(m) => m,
                // A timeout or a status at the end of a batch: deliver what arrived.
                Err(e) if !out.is_empty() => {
                    tracing::debug!(error = %e, "group batch ended early");
                    break;
                }
                Err(e) => return Err(ClusterError::nats("fetching groups", e)),
            };
            let (seq, delivered) = match msg.info() {
                Ok(i) => (i.stream_sequence, i.delivered),
                Err(e) => {
                    tracing::warn!(error = %e, "group message without JetStream metadata");
                    (0, 0)
                }
            };
            let header_id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string());
            let name = header_id.clone().unwrap_or_else(|| format!("seq {seq}"));
            let (message, acker) = msg.split();
            match WireGroup::decode(&name, &message.payload) {
                Ok(wire) => out.push(StreamedGroup {
                    id: wire.message_id(),
                    wire,
                    stream_sequence: seq,
                    delivered,
                    acker,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "terminating a message that is not a group");
                    self.invalid += 1;
                    metrics::counter!("leaf_cluster_groups_invalid_total").increment(1);
                    acker
                        .ack_with(AckKind::Term)
                        .await
                        .map_err(|e| ClusterError::nats("terminating a bad message", e))?;
                }
            }
        }
        Ok(out)
    }

    /// Acks `groups` and waits for the server to confirm each.
    pub async fn ack(&mut self, groups: Vec<StreamedGroup>) -> Result<(), ClusterError> {
        self.ack_each(groups.into_iter().map(|g| (g.id, g.acker)).collect())
            .await
    }

    /// Acks messages by their ackers (`(group id, acker)`, the id names a failure).
    pub(crate) async fn ack_each(
        &mut self,
        acks: Vec<(String, Acker)>,
    ) -> Result<(), ClusterError> {
        let results = futures::future::join_all(acks.iter().map(|(_, a)| a.double_ack())).await;
        for ((id, _), r) in acks.iter().zip(results) {
            r.map_err(|e| ClusterError::nats(format!("acking group {id}"), e))?;
        }
        Ok(())
    }

    /// Groups in the stream the trainer has not acked yet (undelivered plus delivered and
    /// unacked); also set as the `leaf_cluster_lag_groups` gauge.
    pub async fn lag(&mut self) -> Result<u64, ClusterError> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| ClusterError::nats("reading the consumer's state", e))?;
        let lag = info.num_pending + info.num_ack_pending as u64;
        metrics::gauge!("leaf_cluster_lag_groups").set(lag as f64);
        Ok(lag)
    }
}
