//! The background trainer: sealed groups -> advantages -> LoRA updates -> published versions
//! -> hot-swap.
//!
//! [`OnlineTrainer::spawn`] starts one dedicated OS thread (training never runs on the async
//! runtime, and the serving path never waits for it: it only meets the trainer through the
//! bounded sealed-group queue of [`crate::harvest::GroupAssembler`], which drops and counts
//! when full). Each update takes `groups_per_update` sealed groups, turns each into a validated
//! [`Group`](crate::rollout::Group), runs the configured estimator (LEAF or GRPO) and one [`Trainer::step`] over all
//! their samples (each sample keeps its behaviour log-probs and the version that served it, so
//! the trainer's truncated importance weighting can correct stale samples). Every
//! `publish_every` updates the adapter is exported, published to the store and promoted, which
//! hot-swaps the server onto it.
//!
//! Shutdown ([`OnlineTrainer::shutdown`]) either **finishes** (trains on every group it holds
//! or finds queued, then publishes and promotes the result) or **persists** (writes the queued
//! and partially batched groups to a JSON-lines file and publishes, without promoting, any
//! unpublished updates), as configured.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::DType;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use leaf_adapters::store::{VersionId, VersionMeta};
use serde::{Deserialize, Serialize};

use crate::advantage::EstimatorConfig;
use crate::harvest::SealedGroup;
use crate::serving::{GroupPolicy, LeafServer, ServeError, BASE_VERSION};
use crate::trainer::{TrainConfig, Trainer};

mod batch;
mod diagnostics;
pub use batch::{prepare_batch, BatchStats, PreparedBatch, ZERO_ADVANTAGE};
pub use diagnostics::{
    Phase, PhaseTimes, TimedReward, UpdateRecord, UpdateSummary, VersionHistory,
};

/// What shutdown does with what the trainer holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "path")]
pub enum ShutdownMode {
    /// Train on everything held and queued, then publish and promote.
    Finish,
    /// Write held and queued groups to this JSON-lines file; publish unpublished updates
    /// without promoting them.
    Persist(PathBuf),
}

/// Configuration of the online trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnlineConfig {
    /// LEAF or GRPO.
    pub estimator: EstimatorConfig,
    /// The LoRA update.
    pub train: TrainConfig,
    /// Sealed groups per update. Default 1.
    pub groups_per_update: usize,
    /// Publish and hot-swap every this many updates. Default 10.
    pub publish_every: u64,
    /// What shutdown does.
    pub shutdown: ShutdownMode,
    /// Written into the adapter's `base_model_name_or_path`.
    pub base_name: String,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig {
            estimator: EstimatorConfig::default(),
            train: TrainConfig::default(),
            groups_per_update: 1,
            publish_every: 10,
            shutdown: ShutdownMode::Finish,
            base_name: "leaf-base".into(),
        }
    }
}

/// The group policy `leaf serve --online` uses when its server config sets none: live prompts
/// are rarely repeated (every audio prompt is unique), so groups come from the server itself:
/// each client request gets K - 1 extra samples drawn in the background after its answer is
/// sent. The compute budget: at most `background_concurrency` extra samples generate at once
/// and at most that many groups wait for theirs (other requests are not forked:
/// `leaf_forks_skipped_total`), and none start while more than `max_foreground_inflight`
/// client requests are in flight (`leaf_forks_failed_total`).
pub fn training_group_policy() -> GroupPolicy {
    GroupPolicy {
        fork_fraction: 1.0,
        background_concurrency: 4,
        max_foreground_inflight: 8,
        ..GroupPolicy::default()
    }
}

/// What the trainer did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OnlineReport {
    /// Updates done.
    pub updates: u64,
    /// Groups trained on.
    pub groups_trained: u64,
    /// Groups refused by validation.
    pub groups_invalid: u64,
    /// Versions published (and promoted, in finish mode).
    pub published: Vec<String>,
    /// Publishes or swaps that failed (the served version stayed).
    pub publish_failures: u64,
    /// Groups written to the persistence file at shutdown.
    pub groups_persisted: u64,
    /// Mean loss of the last update.
    pub last_loss: Option<f64>,
    /// Updates that failed (the batch is dropped; the loop goes on).
    pub update_failures: u64,
    /// The last update error, if any.
    pub last_error: Option<String>,
    /// Groups left out because all their rewards were equal (no advantage to learn from).
    pub groups_uninformative: u64,
    /// The diagnostics of the last update.
    pub last_update: Option<UpdateRecord>,
    /// Wall time of the trainer thread per phase.
    pub phases: PhaseTimes,
}

/// The running trainer thread.
#[derive(Debug)]
pub struct OnlineTrainer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<OnlineReport, ServeError>>,
}

struct Loop {
    server: Arc<LeafServer>,
    runtime: tokio::runtime::Handle,
    config: OnlineConfig,
    trainer: Trainer,
    estimator: Box<dyn crate::advantage::AdvantageEstimator>,
    report: OnlineReport,
    since_publish: u64,
    history: VersionHistory,
    harvested: u64,
}

impl OnlineTrainer {
    /// Starts the trainer on its own thread. The trainer's model is the server's base model
    /// with fresh LoRA per `config.train.lora`, or the store's current version when one is
    /// served. `runtime` is the runtime the server runs on (swaps are driven through it).
    pub fn spawn(
        server: Arc<LeafServer>,
        groups: Receiver<SealedGroup>,
        config: OnlineConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, ServeError> {
        if config.groups_per_update == 0 || config.publish_every == 0 {
            return Err(ServeError::Config(
                "online: groups_per_update and publish_every must be positive".into(),
            ));
        }
        let store = server.store().ok_or(ServeError::NoStore)?;
        let mut trainer = Trainer::load(server.model().dir(), config.train.clone(), DType::F32)?;
        let current = server.current_version();
        if current != BASE_VERSION {
            let id = VersionId::parse(&current).map_err(ServeError::Adapter)?;
            let adapter = store.get(&id).map_err(ServeError::Adapter)?;
            trainer
                .model_mut()
                .load_adapter(&adapter)
                .map_err(ServeError::Adapter)?;
        }
        let history = VersionHistory::starting_at(current.clone());
        trainer.set_policy_version(current);
        let estimator = config.estimator.build();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let mut state = Loop {
            server,
            runtime,
            config,
            trainer,
            estimator,
            report: OnlineReport::default(),
            since_publish: 0,
            history,
            harvested: 0,
        };
        let handle = std::thread::Builder::new()
            .name("leaf-online".into())
            .spawn(move || state.run(groups, &stop2))
            .map_err(|e| ServeError::Config(format!("cannot spawn the trainer thread: {e}")))?;
        Ok(OnlineTrainer { stop, handle })
    }

    /// Whether the thread is still running.
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Stops the loop, finishes or persists what it holds (see the module docs) and returns
    /// the report. Blocks: call it from a plain thread or `spawn_blocking`.
    pub fn shutdown(self) -> Result<OnlineReport, ServeError> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| ServeError::Config("the trainer thread panicked".into()))?
    }
}

impl Loop {
    fn run(
        &mut self,
        rx: Receiver<SealedGroup>,
        stop: &AtomicBool,
    ) -> Result<OnlineReport, ServeError> {
        let mut held: Vec<SealedGroup> = Vec::new();
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let waited = std::time::Instant::now();
            let got = rx.recv_timeout(Duration::from_millis(50));
            self.report
                .phases
                .add(Phase::Generation, waited.elapsed().as_secs_f64());
            match got {
                Ok(g) => held.push(g),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if held.len() >= self.config.groups_per_update {
                let batch = std::mem::take(&mut held);
                self.update_or_count(&batch);
            }
        }
        // Shutdown: what is held plus what is queued.
        held.extend(rx.try_iter());
        match self.config.shutdown.clone() {
            ShutdownMode::Finish => {
                for batch in held.chunks(self.config.groups_per_update) {
                    self.update_or_count(batch);
                }
                if self.since_publish > 0 {
                    self.publish(true);
                }
            }
            ShutdownMode::Persist(path) => {
                self.persist(&path, &held)?;
                if self.since_publish > 0 {
                    self.publish(false);
                }
            }
        }
        Ok(std::mem::take(&mut self.report))
    }

    /// An update whose failure is logged and counted instead of ending the loop.
    fn update_or_count(&mut self, batch: &[SealedGroup]) {
        if let Err(e) = self.update(batch) {
            tracing::warn!(error = %e, "online update failed; batch dropped");
            self.report.update_failures += 1;
            self.report.last_error = Some(e.to_string());
            metrics::counter!("leaf_update_failures_total").increment(1);
        }
    }

    fn update(&mut self, batch: &[SealedGroup]) -> Result<(), ServeError> {
        let estimator = self.estimator.as_ref();
        let prepared = self
            .report
            .phases
            .time(Phase::Advantages, || prepare_batch(batch, estimator));
        self.report.groups_trained += prepared.groups;
        self.report.groups_invalid += prepared.invalid;
        self.report.groups_uninformative += prepared.uninformative;
        self.harvested += prepared.harvested;
        if prepared.is_empty() {
            // Every group's rewards were equal (or invalid): no update comes from them.
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let stats = self.trainer.step(&prepared.samples)?;
        let seconds = t0.elapsed().as_secs_f64();
        self.report.phases.add(Phase::Training, seconds);
        metrics::histogram!("leaf_update_seconds").record(seconds);
        self.report.updates += 1;
        self.report.last_loss = Some(stats.loss);
        let staleness = self.history.staleness(
            self.trainer.policy_version().unwrap_or(BASE_VERSION),
            prepared
                .samples
                .iter()
                .map(|s| s.behaviour_version.as_str()),
        );
        let record = UpdateRecord::new(
            self.report.updates,
            self.harvested,
            &stats,
            &prepared,
            staleness,
        );
        record.export();
        self.report.last_update = Some(record);
        self.since_publish += 1;
        self.server.note_update();
        if self.since_publish >= self.config.publish_every {
            self.publish(true);
        }
        Ok(())
    }

    /// Exports, publishes and (with `promote`) hot-swaps the adapter. A failure is logged and
    /// counted; the served version stays.
    fn publish(&mut self, promote: bool) {
        let t0 = std::time::Instant::now();
        let result = (|| -> Result<String, ServeError> {
            let store = self.server.store().ok_or(ServeError::NoStore)?;
            let adapter = self
                .trainer
                .model()
                .export_adapter(&self.config.base_name)
                .map_err(ServeError::Adapter)?;
            let parent = VersionId::parse(&self.server.current_version()).ok();
            let mut notes = serde_json::Map::new();
            notes.insert("estimator".into(), self.config.estimator.name().into());
            let id = store
                .publish(
                    &adapter,
                    VersionMeta {
                        parent,
                        step: Some(self.trainer.steps()),
                        notes,
                    },
                )
                .map_err(ServeError::Adapter)?;
            if promote {
                let server = self.server.clone();
                let v = id.to_string();
                self.runtime
                    .block_on(async move { server.promote(&v).await })?;
            }
            Ok(id.to_string())
        })();
        self.report
            .phases
            .add(Phase::Swaps, t0.elapsed().as_secs_f64());
        match result {
            Ok(id) => {
                if promote {
                    self.history.push(id.clone());
                }
                self.trainer.set_policy_version(id.clone());
                self.report.published.push(id);
                self.since_publish = 0;
                metrics::counter!("leaf_versions_published_total").increment(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing the adapter failed; the served version stays");
                self.report.publish_failures += 1;
                metrics::counter!("leaf_publish_failures_total").increment(1);
            }
        }
    }

    fn persist(
        &mut self,
        path: &std::path::Path,
        groups: &[SealedGroup],
    ) -> Result<(), ServeError> {
        let io = |e| ServeError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        for g in groups {
            let line = serde_json::to_string(g)
                .map_err(|e| ServeError::Config(format!("cannot serialise group {}: {e}", g.id)))?;
            writeln!(f, "{line}").map_err(io)?;
            self.report.groups_persisted += 1;
        }
        f.sync_all().map_err(io)
    }
}
