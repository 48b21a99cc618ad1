//! [`GroupPublisher`]: the replica side of the group stream. Serving never waits for it.
//!
//! [`GroupPublisher::offer`] is a `try_send` onto a bounded buffer ([`ClusterConfig::buffer`]
//! groups): when the buffer is full (NATS down or slow) the group is dropped and counted in
//! `leaf_groups_dropped_total{reason="cluster"}`. A background task publishes what the buffer
//! holds in batches of up to [`IN_FLIGHT`] (and at most `buffer`; so at most twice `buffer`
//! groups are held in all), each with `Nats-Msg-Id` = [`WireGroup::message_id`],
//! and keeps a group until the server acknowledged it: a failed or timed-out publish is
//! retried after a short pause, so publishing resumes by itself once the client reconnected
//! (a retry of a publish that did land is deduplicated by the server).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Cluster, ClusterConfig, WireGroup};
use crate::harvest::SealedGroup;

/// Most publishes awaiting their acknowledgement at once.
pub const IN_FLIGHT: usize = 64;

/// Pause after a failed publish before the next attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Counters of a publisher (also exported as `leaf_cluster_*` metrics).
#[derive(Debug, Default)]
pub struct PublisherCounters {
    offered: AtomicU64,
    published: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

/// A snapshot of a publisher's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PublisherStats {
    /// Groups offered by the server.
    pub offered: u64,
    /// Groups the stream acknowledged (each is in the stream once).
    pub published: u64,
    /// Of those, the ones acknowledged as duplicates: a retry of a publish whose first
    /// acknowledgement was lost (the server kept the first copy).
    pub duplicates: u64,
    /// Groups dropped because the buffer was full (or a group could not be encoded).
    pub dropped: u64,
    /// Publish attempts that failed (each is retried).
    pub failures: u64,
    /// Groups waiting in the buffer or in flight.
    pub buffered: u64,
}

/// Publishes sealed groups to the cluster's stream (see the module docs).
#[derive(Debug)]
pub struct GroupPublisher {
    tx: mpsc::Sender<WireGroup>,
    replica: String,
    ids_only: bool,
    counters: Arc<PublisherCounters>,
    task: tokio::task::JoinHandle<()>,
}

impl GroupPublisher {
    /// Starts the publishing task on the current runtime. `replica` names this process in
    /// message ids; `ids_only` strips every text field before a group leaves.
    pub fn spawn(cluster: Cluster, replica: &str, ids_only: bool) -> Self {
        let (tx, rx) = mpsc::channel(cluster.config().buffer);
        let counters = Arc::new(PublisherCounters::default());
        let task = tokio::spawn(run(cluster, rx, counters.clone()));
        GroupPublisher {
            tx,
            replica: replica.to_string(),
            ids_only,
            counters,
            task,
        }
    }

    /// Hands `group` to the publisher without waiting; false (and counted) when it was dropped.
    pub fn offer(&self, group: SealedGroup) -> bool {
        self.counters.offered.fetch_add(1, Ordering::Relaxed);
        let wire = WireGroup::new(&self.replica, group, self.ids_only);
        match self.tx.try_send(wire) {
            Ok(()) => {
                metrics::gauge!("leaf_cluster_buffered_groups").increment(1.0);
                true
            }
            Err(e) => {
                let id = match &e {
                    mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w) => {
                        w.message_id()
                    }
                };
                tracing::debug!(group = %id, "cluster buffer full; group dropped");
                drop_one(&self.counters);
                false
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> PublisherStats {
        snapshot(&self.counters)
    }

    /// Stops taking groups and waits up to `timeout` for the buffered ones to be published;
    /// returns the counters (what was still buffered is lost, and counted in `buffered`).
    pub async fn close(self, timeout: Duration) -> PublisherStats {
        let GroupPublisher {
            tx,
            counters,
            mut task,
            ..
        } = self;
        drop(tx);
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
        }
        snapshot(&counters)
    }
}

fn snapshot(c: &PublisherCounters) -> PublisherStats {
    let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let (offered, published, dropped) = (get(&c.offered), get(&c.published), get(&c.dropped));
    PublisherStats {
        offered,
        published,
        duplicates: get(&c.duplicates),
        dropped,
        failures: get(&c.failures),
        buffered: offered.saturating_sub(published + dropped),
    }
}

fn drop_one(counters: &PublisherCounters) {
    counters.dropped.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("leaf_groups_dropped_total", "reason" => "cluster").increment(1);
}

/// The publishing task: batches of up to [`IN_FLIGHT`] groups, each kept until acknowledged.
async fn run(
    cluster: Cluster,
    mut rx: mpsc::Receiver<WireGroup>,
    counters: Arc<PublisherCounters>,
) {
    let subject = cluster.config().subject.clone();
    let timeout = ClusterConfig::secs(cluster.config().publish_timeout_s);
    let batch = IN_FLIGHT.min(cluster.config().buffer);
    let mut stream_ready = false;
    let mut pending: VecDeque<(String, bytes::Bytes)> = VecDeque::new();
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match rx.recv().await {
                Some(w) => push(&mut pending, w, &counters),
                None => break,
            }
        }
        while open && pending.len() < batch {
            match rx.try_recv() {
                Ok(w) => push(&mut pending, w, &counters),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if pending.is_empty() {
            continue;
        }
        if !stream_ready {
            match cluster.groups_stream().await {
                Ok(_) => stream_ready = true,
                Err(e) => {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("leaf_cluster_publish_failures_total").increment(1);
                    tracing::warn!(error = %e, "cluster stream unavailable; groups stay buffered");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
        }
        // Send the batch, then collect the acknowledgements.
        let js = cluster.jetstream();
        let mut acks = Vec::with_capacity(pending.len());
        for (id, payload) in &pending {
            let msg = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            acks.push(tokio::time::timeout(timeout, js.send_publish(subject.clone(), msg)).await);
        }
        let mut waits = Vec::with_capacity(acks.len());
        for sent in acks {
            waits.push(async move {
                match sent {
                    Ok(Ok(fut)) => match tokio::time::timeout(timeout, fut).await {
                        Ok(Ok(ack)) => Ok(ack.duplicate),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("acknowledgement timed out".to_string()),
                    },
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("send timed out".to_string()),
                }
            });
        }
        let results = futures::future::join_all(waits).await;
        let mut failed = VecDeque::new();
        let mut last_error = None;
        for ((id, payload), r) in pending.drain(..).zip(results) {
            match r {
                Ok(duplicate) => {
                    metrics::gauge!("leaf_cluster_buffered_groups").decrement(1.0);
                    counters.published.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("leaf_cluster_groups_published_total").increment(1);
                    if duplicate {
                        counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("leaf_cluster_groups_duplicate_total").increment(1);
                    }
                }
                Err(e) => {
                    last_error = Some(e);
                    failed.push_back((id, payload));
                }
            }
        }
        if !failed.is_empty() {
            counters
                .failures
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            metrics::counter!("leaf_cluster_publish_failures_total").increment(failed.len() as u64);
            tracing::warn!(
                groups = failed.len(),
                error = last_error.as_deref().unwrap_or(""),
                "publishing groups failed; retrying"
            );
            pending = failed;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

fn push(
    pending: &mut VecDeque<(String, bytes::Bytes)>,
    wire: WireGroup,
    counters: &PublisherCounters,
) {
    match wire.encode() {
        Ok(bytes) => pending.push_back((wire.message_id(), bytes::Bytes::from(bytes))),
        Err(e) => {
            tracing::warn!(error = %e, "group not published");
            metrics::gauge!("leaf_cluster_buffered_groups").decrement(1.0);
            drop_one(counters);
        }
    }
}
