//! `leaf train --cluster URL`: the one trainer of a cluster is `leaf train` with the group
//! stream as its [`GroupSource`] and the cluster's versions as its [`VersionSink`].
//!
//! Everything else is the learner every other path uses ([`crate::online::train`]): the same
//! update, the same [`PromotionGate`](crate::online::PromotionGate) (`--gate-data`), the same
//! checkpoint (`STORE/trainer/`: optimizer state, the version it belongs to, the ids of the
//! groups consumed last) and the same ack contract: a group is acked only after the update
//! that used it is applied **and** the checkpoint that holds it is saved, so a trainer killed
//! at any moment gets its unacked groups again and skips the ones the checkpoint holds.
//!
//! * [`StreamGroupSource`]: the durable pull consumer as a [`GroupSource`]; it waits for
//!   groups until stopped (or idle for `idle_exit_s`), and sets `leaf_cluster_lag_groups`
//!   after each ack.
//! * [`ClusterSink`]: publishing uploads the adapter to the object store; promoting moves
//!   `current` by compare-and-set (the replicas follow); a version's adapter is downloaded and
//!   checked against its content hash.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::Acker;
use leaf_adapters::store::VersionMeta;
use leaf_adapters::LoraAdapter;
use serde::{Deserialize, Serialize};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{Cluster, ClusterConfig, ClusterError, StreamSource, VersionBoard};
use crate::online::train::{open_job, SourceTrainReport, TrainJobConfig};
use crate::online::{GroupReceipt, GroupSource, SourcedGroup, VersionSink};
use crate::serving::BASE_VERSION;

/// Pause after a failed NATS call before the next try.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How the trainer reads the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Longest wait of one fetch for its first group, seconds. Default 1.
    pub fetch_wait_s: f64,
    /// End the session after this many seconds without a group (`None`: until stopped).
    pub idle_exit_s: Option<f64>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            fetch_wait_s: 1.0,
            idle_exit_s: None,
        }
    }
}

impl StreamOptions {
    fn check(&self) -> Result<(), ClusterError> {
        if !(self.fetch_wait_s.is_finite() && self.fetch_wait_s > 0.0) {
            return Err(ClusterError::Config(format!(
                "fetch_wait_s {} must be positive",
                self.fetch_wait_s
            )));
        }
        if let Some(s) = self.idle_exit_s {
            if !(s.is_finite() && s > 0.0) {
                return Err(ClusterError::Config(format!(
                    "idle_exit_s {s} must be positive"
                )));
            }
        }
        Ok(())
    }
}

/// What a [`StreamGroupSource`] receipt holds: the message's acker.
struct StreamReceipt {
    id: String,
    acker: Acker,
}

/// The cluster's group stream as a [`GroupSource`] (see the module docs).
pub struct StreamGroupSource {
    stream: StreamSource,
    url: String,
    stop: Arc<AtomicBool>,
    idle_exit: Option<Duration>,
    last_group: Instant,
}

impl std::fmt::Debug for StreamGroupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGroupSource")
            .field("url", &self.url)
            .field("idle_exit", &self.idle_exit)
            .finish_non_exhaustive()
    }
}

impl StreamGroupSource {
    /// Opens the durable consumer of `cluster` (waiting for NATS until `stop` is set).
    pub async fn open(
        cluster: &Cluster,
        options: &StreamOptions,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, ClusterError> {
        options.check()?;
        let wait = ClusterConfig::secs(options.fetch_wait_s);
        let stream = wait_for(&stop, || StreamSource::open(cluster, wait)).await?;
        Ok(StreamGroupSource {
            stream,
            url: cluster.config().url.clone(),
            stop,
            idle_exit: options.idle_exit_s.map(ClusterConfig::secs),
            last_group: Instant::now(),
        })
    }

    /// Messages terminated because they were not groups.
    pub fn invalid(&self) -> u64 {
        self.stream.invalid()
    }
}

#[async_trait::async_trait]
impl GroupSource for StreamGroupSource {
    /// Waits for at least one group; empty only when stopped or idle past `idle_exit_s`.
    async fn next_groups(&mut self, max: usize) -> crate::Result<Vec<SourcedGroup>> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let batch = match self.stream.next_groups(max).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching groups failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            if batch.is_empty() {
                if self
                    .idle_exit
                    .is_some_and(|idle| self.last_group.elapsed() >= idle)
                {
                    return Ok(Vec::new());
                }
                let _ = self.stream.lag().await;
                continue;
            }
            self.last_group = Instant::now();
            return Ok(batch
                .into_iter()
                .map(|g| {
                    let (id, wire, acker) = g.into_parts();
                    let receipt = GroupReceipt::new(StreamReceipt {
                        id: id.clone(),
                        acker,
                    });
                    let mut group = SourcedGroup::from_sealed(&wire.group, receipt);
                    group.id = id;
                    group
                })
                .collect());
        }
    }

    async fn ack(&mut self, receipts: Vec<GroupReceipt>) -> crate::Result<()> {
        let mut acks = Vec::with_capacity(receipts.len());
        for r in receipts {
            match r.downcast::<StreamReceipt>() {
                Ok(r) => acks.push((r.id, r.acker)),
                Err(_) => {
                    return Err(ClusterError::Config(
                        "a receipt that is not from the group stream".into(),
                    )
                    .into())
                }
            }
        }
        if let Err(e) = self.stream.ack_each(acks).await {
            // The groups come back and are skipped: the checkpoint holds their ids.
            tracing::warn!(error = %e, "acking failed; the groups will be redelivered and skipped");
        }
        if let Err(e) = self.stream.lag().await {
            tracing::debug!(error = %e, "reading the consumer's backlog failed");
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (stream)", self.url)
    }
}

/// The cluster's versions as a [`VersionSink`] (see the module docs). Its calls block on the
/// async runtime it was made on, so it must be used from that runtime's worker threads (a
/// multi-threaded runtime) or from outside any runtime.
pub struct ClusterSink {
    board: VersionBoard,
    scratch: PathBuf,
    runtime: Handle,
}

impl std::fmt::Debug for ClusterSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSink")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl ClusterSink {
    /// A sink over `board`; downloads go through `scratch` (created when missing).
    pub fn new(board: VersionBoard, scratch: &Path, runtime: Handle) -> Self {
        ClusterSink {
            board,
            scratch: scratch.to_path_buf(),
            runtime,
        }
    }

    fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, ClusterError>>,
    ) -> crate::Result<T> {
        let r = match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::CurrentThread => {
                Err(ClusterError::Config(
                    "the cluster sink needs a multi-threaded async runtime".into(),
                ))
            }
            Ok(_) => tokio::task::block_in_place(|| self.runtime.block_on(f)),
            Err(_) => self.runtime.block_on(f),
        };
        Ok(r?)
    }
}

impl VersionSink for ClusterSink {
    fn publish(&mut self, adapter: &LoraAdapter, _meta: VersionMeta) -> crate::Result<String> {
        // The learner counts `leaf_versions_published_total`.
        self.block_on(self.board.upload(adapter))
    }

    fn promote(&mut self, version: &str) -> crate::Result<()> {
        self.block_on(self.board.promote(version, "trainer"))?;
        Ok(())
    }

    fn adapter(&self, version: &str) -> crate::Result<Option<LoraAdapter>> {
        if version == BASE_VERSION {
            return Ok(None);
        }
        let dir = self
            .scratch
            .join(format!("download-{}", uuid::Uuid::new_v4()));
        let adapter = self.block_on(self.board.download(version, &dir));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Some(adapter?))
    }
}

/// `leaf train --cluster`: trains on the cluster's group stream until `stop` is set (or the
/// stream is idle for `stream.idle_exit_s`), publishing versions to the cluster; resumes
/// from `job.store`'s checkpoint, or on a first start from the cluster's current version.
/// Needs a multi-threaded runtime.
pub async fn train_cluster(
    job: &TrainJobConfig,
    cluster: ClusterConfig,
    stream: &StreamOptions,
    stop: Arc<AtomicBool>,
) -> crate::Result<SourceTrainReport> {
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        return Err(ClusterError::Config(
            "the cluster trainer needs a multi-threaded async runtime".into(),
        )
        .into());
    }
    let cluster = wait_for(&stop, || Cluster::connect(cluster.clone(), "leaf-trainer")).await?;
    let board = wait_for(&stop, || VersionBoard::open(&cluster)).await?;
    let current = wait_for(&stop, || board.current())
        .await?
        .map(|(r, _)| r.version)
        .unwrap_or_else(|| BASE_VERSION.to_string());
    let mut sink = ClusterSink::new(board, &job.store.join("scratch"), Handle::current());
    let mut opened = tokio::task::block_in_place(|| open_job(job, &sink, &current))?;
    tracing::info!(version = %opened.state.version, "the cluster trainer starts");
    let mut source = StreamGroupSource::open(&cluster, stream, stop).await?;
    let mut report = opened.train(&mut sink, &mut source, &job.options()).await?;
    report.groups_invalid += source.invalid();
    Ok(report)
}

/// Runs [`train_cluster`] on its own runtime until Ctrl-C (or the idle limit).
pub fn run_until_interrupted(
    job: &TrainJobConfig,
    cluster: ClusterConfig,
    stream: &StreamOptions,
) -> crate::Result<SourceTrainReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ClusterError::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let on_signal = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("leaf: stopping the trainer after the current update");
                on_signal.store(true, Ordering::SeqCst);
            }
        });
        train_cluster(job, cluster, stream, stop).await
    })
}

/// Retries `f` every [`RETRY_PAUSE`] until it succeeds or `stop` is set.
async fn wait_for<T, F, Fut>(stop: &AtomicBool, mut f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if stop.load(Ordering::SeqCst) => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "waiting for the cluster");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}
