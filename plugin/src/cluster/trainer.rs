//! [`ClusterTrainer`]: the one trainer of a cluster.
//!
//! Each round: take up to `groups_per_update` groups from the durable pull consumer; skip the
//! ones the last commit already holds (redeliveries after a kill); turn the rest into one
//! update exactly as `leaf serve --online` does ([`prepare_batch`] + [`Trainer::step`], one
//! [`UpdateRecord`] exported); every `publish_every` updates upload the adapter to the object
//! store and move `current` to it by compare-and-set (the replicas follow); commit the state
//! ([`super::progress`]); only then ack the round's groups. The `leaf_cluster_lag_groups`
//! gauge is the consumer's backlog after each round.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::progress::{self, TrainerProgress};
use super::{Cluster, ClusterConfig, ClusterError, StreamSource, StreamedGroup, VersionBoard};
use crate::advantage::AdvantageEstimator;
use crate::online::{
    prepare_batch, GroupReceipt, OnlineConfig, SourcedGroup, UpdateRecord, VersionHistory,
};
use crate::serving::BASE_VERSION;
use crate::trainer::Trainer;

/// Pause after a failed NATS call before the next round.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Settings of the cluster trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterTrainerConfig {
    /// The learner, as for `leaf serve --online` (its `shutdown` is not used: nothing is held
    /// that the stream does not keep).
    pub learner: OnlineConfig,
    /// Longest wait for the first group of a round, seconds. Default 1.
    pub fetch_wait_s: f64,
    /// Stop after this many seconds without a group (`None`: run until stopped).
    pub idle_exit_s: Option<f64>,
}

impl Default for ClusterTrainerConfig {
    fn default() -> Self {
        ClusterTrainerConfig {
            learner: OnlineConfig::default(),
            fetch_wait_s: 1.0,
            idle_exit_s: None,
        }
    }
}

impl ClusterTrainerConfig {
    /// A config around `learner` with the other defaults.
    pub fn new(learner: OnlineConfig) -> Self {
        ClusterTrainerConfig {
            learner,
            ..ClusterTrainerConfig::default()
        }
    }

    fn check(&self) -> Result<(), ClusterError> {
        let l = &self.learner;
        if l.groups_per_update == 0 || l.publish_every == 0 {
            return Err(ClusterError::Config(
                "learner.groups_per_update and learner.publish_every must be positive".into(),
            ));
        }
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

/// What a run of the trainer did (this process only; the totals are in the progress).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterTrainerReport {
    /// The committed totals when the run ended.
    pub progress_updates: u64,
    /// Groups consumed in total (every run of this state directory).
    pub groups_applied: u64,
    /// Groups consumed in this run.
    pub groups_this_run: u64,
    /// Redelivered groups skipped because the checkpoint already held them.
    pub groups_skipped: u64,
    /// Versions published in this run.
    pub published: Vec<String>,
    /// Loss of the last update.
    pub last_loss: Option<f64>,
    /// The consumer's backlog at the end.
    pub lag: Option<u64>,
    /// Wall seconds of the run.
    pub seconds: f64,
}

/// The trainer's model and estimator, moved onto a blocking thread for each update.
struct Learner {
    trainer: Trainer,
    estimator: Box<dyn AdvantageEstimator>,
}

/// The cluster trainer (see the module docs).
pub struct ClusterTrainer {
    cluster: Cluster,
    config: ClusterTrainerConfig,
    state_dir: PathBuf,
    learner: Option<Learner>,
    progress: TrainerProgress,
    history: VersionHistory,
    harvested: u64,
    report: ClusterTrainerReport,
}

impl std::fmt::Debug for ClusterTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTrainer")
            .field("state_dir", &self.state_dir)
            .field("progress_step", &self.progress.step)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static, R: Send + 'static>(
    value: T,
    f: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Result<(T, R), ClusterError> {
    tokio::task::spawn_blocking(move || {
        let mut value = value;
        let r = f(&mut value);
        (value, r)
    })
    .await
    .map_err(|e| ClusterError::Config(format!("a trainer task failed: {e}")))
}

impl ClusterTrainer {
    /// Loads the base model in `model_dir` with fresh LoRA, then restores the last commit of
    /// `state_dir`, or (first start) the cluster's current version. Waits for NATS when it
    /// needs it, until `stop` is set.
    pub async fn open(
        cluster_config: ClusterConfig,
        model_dir: &Path,
        state_dir: &Path,
        config: ClusterTrainerConfig,
        stop: &AtomicBool,
    ) -> Result<Self, ClusterError> {
        config.check()?;
        let cluster = Cluster::connect(cluster_config, "leaf-trainer").await?;
        let train = config.learner.train.clone();
        let dir = model_dir.to_path_buf();
        let mut trainer = tokio::task::spawn_blocking(move || {
            Trainer::from_base(&dir, train, DType::F32, &Device::Cpu)
        })
        .await
        .map_err(|e| ClusterError::Config(format!("loading the model failed: {e}")))??;
        let restored = progress::restore(state_dir, &mut trainer)?;
        let progress = match restored {
            Some(p) => {
                tracing::info!(
                    step = p.step,
                    groups = p.groups_applied,
                    "trainer resumed from its checkpoint"
                );
                p
            }
            None => {
                let board = wait_for(stop, || VersionBoard::open(&cluster)).await?;
                let current = wait_for(stop, || board.current()).await?;
                let version = current
                    .map(|(r, _)| r.version)
                    .unwrap_or_else(|| BASE_VERSION.to_string());
                if version != BASE_VERSION {
                    let scratch = state_dir.join(format!("initial-{}", uuid::Uuid::new_v4()));
                    let adapter = board.download(&version, &scratch).await;
                    let _ = std::fs::remove_dir_all(&scratch);
                    trainer.model_mut().load_adapter(&adapter?)?;
                }
                tracing::info!(%version, "trainer starts from the cluster's current version");
                TrainerProgress::new(&version)
            }
        };
        trainer.set_policy_version(progress.policy_version.clone());
        let estimator = config.learner.estimator.build();
        let history = VersionHistory::starting_at(progress.policy_version.clone());
        Ok(ClusterTrainer {
            cluster,
            config,
            state_dir: state_dir.to_path_buf(),
            learner: Some(Learner { trainer, estimator }),
            progress,
            history,
            harvested: 0,
            report: ClusterTrainerReport::default(),
        })
    }

    /// The committed progress (as of the last commit of this process, or the one restored).
    pub fn progress(&self) -> &TrainerProgress {
        &self.progress
    }

    /// Consumes until `stop` is set (or the idle limit passes); returns what it did.
    pub async fn run(
        mut self,
        stop: Arc<AtomicBool>,
    ) -> Result<ClusterTrainerReport, ClusterError> {
        let t0 = Instant::now();
        let wait = ClusterConfig::secs(self.config.fetch_wait_s);
        let mut source = wait_for(&stop, || StreamSource::open(&self.cluster, wait)).await?;
        let board = wait_for(&stop, || VersionBoard::open(&self.cluster)).await?;
        let mut last_group = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let batch = match source
                .next_groups(self.config.learner.groups_per_update)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching groups failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            if batch.is_empty() {
                if let Some(idle) = self.config.idle_exit_s {
                    if last_group.elapsed().as_secs_f64() >= idle {
                        break;
                    }
                }
                let _ = source.lag().await;
                continue;
            }
            last_group = Instant::now();
            self.round(&board, &batch).await?;
            if let Err(e) = source.ack(batch).await {
                // The groups come back and are skipped: the commit holds them.
                tracing::warn!(error = %e, "acking failed; the groups will be redelivered and skipped");
            }
            if let Ok(lag) = source.lag().await {
                self.report.lag = Some(lag);
            }
        }
        self.report.progress_updates = self.progress.updates;
        self.report.groups_applied = self.progress.groups_applied;
        self.report.seconds = t0.elapsed().as_secs_f64();
        Ok(self.report)
    }

    /// One round: update on the fresh groups, maybe publish, commit. Acking is the caller's.
    async fn round(
        &mut self,
        board: &VersionBoard,
        batch: &[StreamedGroup],
    ) -> Result<(), ClusterError> {
        let (fresh, seen): (Vec<&StreamedGroup>, Vec<&StreamedGroup>) =
            batch.iter().partition(|g| !self.progress.is_applied(&g.id));
        if !seen.is_empty() {
            self.report.groups_skipped += seen.len() as u64;
            metrics::counter!("leaf_cluster_groups_redelivered_skipped_total")
                .increment(seen.len() as u64);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let groups: Vec<SourcedGroup> = fresh
            .iter()
            .map(|g| SourcedGroup::from_sealed(&g.wire.group, GroupReceipt::none()))
            .collect();
        let learner = self.take_learner()?;
        let (learner, outcome) = blocking(learner, move |l| {
            let prepared = prepare_batch(&groups, l.estimator.as_ref());
            if prepared.is_empty() {
                return Ok((prepared, None));
            }
            let t = Instant::now();
            let stats = l.trainer.step(&prepared.samples)?;
            metrics::histogram!("leaf_update_seconds").record(t.elapsed().as_secs_f64());
            Ok::<_, crate::trainer::TrainError>((prepared, Some(stats)))
        })
        .await?;
        self.learner = Some(learner);
        let (prepared, stats) = match outcome {
            Ok(x) => x,
            Err(e) => {
                // As `leaf serve --online`: the batch is dropped (consumed, counted), not
                // retried forever.
                tracing::warn!(error = %e, "update failed; batch dropped");
                metrics::counter!("leaf_update_failures_total").increment(1);
                (Default::default(), None)
            }
        };
        let p = &mut self.progress;
        p.groups_trained += prepared.groups;
        p.groups_invalid += prepared.invalid;
        p.groups_uninformative += prepared.uninformative;
        self.harvested += prepared.harvested;
        if let Some(stats) = stats {
            p.updates += 1;
            p.since_publish += 1;
            self.report.last_loss = Some(stats.loss);
            let learner = self.learner.as_ref().ok_or_else(missing)?;
            let staleness = self.history.staleness(
                learner.trainer.policy_version().unwrap_or(BASE_VERSION),
                prepared
                    .samples
                    .iter()
                    .map(|s| s.behaviour_version.as_str()),
            );
            UpdateRecord::new(p.updates, self.harvested, &stats, &prepared, staleness).export();
        }
        for g in &fresh {
            self.progress.record_applied(&g.id);
        }
        self.report.groups_this_run += fresh.len() as u64;
        metrics::counter!("leaf_cluster_groups_applied_total").increment(fresh.len() as u64);
        if self.progress.since_publish >= self.config.learner.publish_every {
            self.publish(board).await;
        }
        self.commit().await
    }

    /// Uploads the adapter and moves `current` to it. A failure is logged and counted; the
    /// next round tries again.
    async fn publish(&mut self, board: &VersionBoard) {
        let result = async {
            let learner = self.learner.as_ref().ok_or_else(missing)?;
            let adapter = learner
                .trainer
                .model()
                .export_adapter(&self.config.learner.base_name)?;
            let id = board.upload(&adapter).await?;
            board.promote(&id, "trainer").await?;
            Ok::<_, ClusterError>(id)
        }
        .await;
        match result {
            Ok(id) => {
                tracing::info!(version = %id, "trainer published and promoted a version");
                metrics::counter!("leaf_versions_published_total").increment(1);
                if let Some(l) = self.learner.as_mut() {
                    l.trainer.set_policy_version(id.clone());
                }
                self.history.push(id.clone());
                self.progress.policy_version = id.clone();
                self.progress.published.push(id.clone());
                self.progress.since_publish = 0;
                self.report.published.push(id);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing the version failed; retrying next round");
                metrics::counter!("leaf_publish_failures_total").increment(1);
            }
        }
    }

    async fn commit(&mut self) -> Result<(), ClusterError> {
        let learner = self.take_learner()?;
        let state_dir = self.state_dir.clone();
        let base_name = self.config.learner.base_name.clone();
        let mut progress = std::mem::take(&mut self.progress);
        let (learner, (progress, r)) = blocking(learner, move |l| {
            let r = progress::commit(&state_dir, &l.trainer, &base_name, &mut progress);
            (progress, r)
        })
        .await?;
        self.learner = Some(learner);
        self.progress = progress;
        r
    }

    fn take_learner(&mut self) -> Result<Learner, ClusterError> {
        self.learner.take().ok_or_else(missing)
    }
}

fn missing() -> ClusterError {
    ClusterError::Config("the trainer's model was lost by an earlier failure".into())
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

/// `leaf train --cluster URL`: runs the cluster trainer on its own runtime until Ctrl-C (or
/// the idle limit), resuming from `state_dir`; returns the report.
pub fn run_until_interrupted(
    cluster: ClusterConfig,
    model_dir: &Path,
    state_dir: &Path,
    config: ClusterTrainerConfig,
) -> Result<ClusterTrainerReport, ClusterError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ClusterError::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let on_signal = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("leaf: stopping the trainer after the current round");
                on_signal.store(true, Ordering::SeqCst);
            }
        });
        let trainer = ClusterTrainer::open(cluster, model_dir, state_dir, config, &stop).await?;
        trainer.run(stop).await
    })
}
