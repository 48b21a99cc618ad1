//! The one learner: groups -> advantages -> LoRA update -> gated publish, promote or rollback.
//!
//! `leaf run`, `leaf serve --online` and `leaf train` all train through [`Learner`]; they
//! differ only in where groups come from (the server's sealed-group queue or a
//! [`GroupSource`](super::GroupSource)), where versions go (a [`VersionSink`]: the server,
//! which hot-swaps, or the store alone) and what they report.
//!
//! One cycle: [`Learner::prepare`] turns groups into trainer samples (the configured
//! estimator, LEAF or GRPO); [`Learner::update`] runs one [`Trainer::step`] and rolls back at
//! once on a non-finite loss; every `publish_every` updates ([`Learner::check_due`])
//! [`Learner::check`] asks the [`PromotionGate`] about the candidate and publishes and promotes
//! it, or rolls the trainer back to the last good version (weights reloaded from the sink,
//! optimizer and schedule restarted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use leaf_adapters::store::{AdapterStore, VersionId, VersionMeta};
use leaf_adapters::LoraAdapter;

use super::batch::{
    prepare_batch, BatchRule, PreparedBatch, ReferenceGuidance, ReferenceUse, SupervisedReference,
};
use super::diagnostics::{Phase, PhaseTimes, UpdateRecord, VersionHistory};
use super::gate::{HeldOutScore, PromotionGate, RollbackReason, Verdict};
use super::source::SourcedGroup;
use crate::advantage::{AdvantageEstimator, EstimatorConfig};
use crate::serving::{LeafServer, ServeError, BASE_VERSION};
use crate::trainer::{TrainConfig, Trainer};

/// Where published versions go.
pub trait VersionSink: Send {
    /// Writes `adapter` as a new immutable version; returns its id.
    fn publish(&mut self, adapter: &LoraAdapter, meta: VersionMeta) -> crate::Result<String>;
    /// Makes `version` the one served (a hot swap, or the store's `current`).
    fn promote(&mut self, version: &str) -> crate::Result<()>;
    /// The adapter of `version`; `None` for the base model ([`BASE_VERSION`]).
    fn adapter(&self, version: &str) -> crate::Result<Option<LoraAdapter>>;
}

/// Versions go to an adapter store; promotion moves its `current` (what `leaf train` does;
/// servers pick the version up at their next start or `leaf adapter` load).
pub struct StoreSink {
    store: AdapterStore,
}

impl std::fmt::Debug for StoreSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSink")
            .field("root", &self.store.root())
            .finish()
    }
}

impl StoreSink {
    /// A sink over `store`.
    pub fn new(store: AdapterStore) -> Self {
        StoreSink { store }
    }

    /// The store.
    pub fn store(&self) -> &AdapterStore {
        &self.store
    }
}

fn store_adapter(store: &AdapterStore, version: &str) -> crate::Result<Option<LoraAdapter>> {
    if version == BASE_VERSION {
        return Ok(None);
    }
    Ok(Some(store.get(&VersionId::parse(version)?)?))
}

impl VersionSink for StoreSink {
    fn publish(&mut self, adapter: &LoraAdapter, meta: VersionMeta) -> crate::Result<String> {
        Ok(self.store.publish(adapter, meta)?.to_string())
    }

    fn promote(&mut self, version: &str) -> crate::Result<()> {
        Ok(self.store.promote(&VersionId::parse(version)?)?)
    }

    fn adapter(&self, version: &str) -> crate::Result<Option<LoraAdapter>> {
        store_adapter(&self.store, version)
    }
}

/// Versions go to the server's store; promotion hot-swaps the server onto them (driven
/// through `runtime`, from the learner's own thread).
#[derive(Clone)]
pub struct ServerSink {
    server: Arc<LeafServer>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for ServerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSink")
            .field("version", &self.server.current_version())
            .finish()
    }
}

impl ServerSink {
    /// A sink over `server`, whose async calls run on `runtime`.
    pub fn new(server: Arc<LeafServer>, runtime: tokio::runtime::Handle) -> Self {
        ServerSink { server, runtime }
    }

    fn store(&self) -> crate::Result<&AdapterStore> {
        Ok(self.server.store().ok_or(ServeError::NoStore)?)
    }
}

impl VersionSink for ServerSink {
    fn publish(&mut self, adapter: &LoraAdapter, meta: VersionMeta) -> crate::Result<String> {
        Ok(self.store()?.publish(adapter, meta)?.to_string())
    }

    fn promote(&mut self, version: &str) -> crate::Result<()> {
        let server = self.server.clone();
        let v = version.to_string();
        self.runtime
            .block_on(async move { server.promote(&v).await })?;
        Ok(())
    }

    fn adapter(&self, version: &str) -> crate::Result<Option<LoraAdapter>> {
        store_adapter(self.store()?, version)
    }
}

/// Settings of the learner.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LearnerConfig {
    /// LEAF or GRPO.
    pub estimator: EstimatorConfig,
    /// The LoRA update.
    pub train: TrainConfig,
    /// Check (and publish) every this many updates.
    pub publish_every: u64,
    /// Written into the adapter's `base_model_name_or_path`.
    pub base_name: String,
    /// Fault injection (tests): treat the loss of this update (1-based) as NaN.
    pub fault_nan_update: Option<u64>,
    /// Add each group's reference answer as a member, when it carries one. Default off.
    pub reference_guidance: Option<ReferenceGuidance>,
    /// Train on each group's reference answer as a supervised demonstration, when it carries
    /// one. Default off.
    pub supervised: Option<SupervisedReference>,
}

impl LearnerConfig {
    /// A config with the given estimator and update, checking every `publish_every` updates.
    pub fn new(estimator: EstimatorConfig, train: TrainConfig, publish_every: u64) -> Self {
        LearnerConfig {
            estimator,
            train,
            publish_every,
            base_name: "leaf-base".into(),
            fault_nan_update: None,
            reference_guidance: None,
            supervised: None,
        }
    }
}

/// What [`Learner::update`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    /// Nothing to learn from (every group invalid or with equal rewards): no step.
    Skipped,
    /// The step failed; the batch is dropped and the weights are unchanged.
    Failed(String),
    /// The step was applied.
    Applied(UpdateRecord),
    /// The step's loss was not finite: the trainer was rolled back to the last good version.
    RolledBack {
        /// The update's diagnostics.
        record: UpdateRecord,
        /// Why.
        reason: RollbackReason,
    },
}

/// What [`Learner::check`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckOutcome {
    /// The candidate passed the gate and was published (and promoted when asked).
    Published {
        /// Its version id.
        version: String,
        /// Whether it was promoted.
        promoted: bool,
        /// Its held-out score, when the gate measured one.
        score: Option<HeldOutScore>,
    },
    /// The gate refused the candidate; the trainer is back at the last good version.
    RolledBack {
        /// Why.
        reason: RollbackReason,
        /// The candidate's held-out score, when measured.
        score: Option<HeldOutScore>,
    },
    /// Publishing or promoting failed; the served version stays, the trainer goes on.
    PublishFailed {
        /// The error.
        error: String,
        /// The candidate's held-out score, when measured.
        score: Option<HeldOutScore>,
    },
}

/// The learner (see the module docs).
pub struct Learner {
    model_dir: PathBuf,
    config: LearnerConfig,
    trainer: Trainer,
    estimator: Box<dyn AdvantageEstimator>,
    gate: PromotionGate,
    good_version: String,
    since_check: u64,
    updates: u64,
    rollbacks: u64,
    history: VersionHistory,
    phases: PhaseTimes,
    notes: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("model_dir", &self.model_dir)
            .field("good_version", &self.good_version)
            .field("updates", &self.updates)
            .field("gate", &self.gate)
            .finish()
    }
}

/// A fresh trainer on the base model in `model_dir`, carrying `adapter` (fresh LoRA without),
/// declared to be at `version`.
pub fn trainer_at(
    model_dir: &Path,
    config: TrainConfig,
    adapter: Option<&LoraAdapter>,
    version: &str,
) -> crate::Result<Trainer> {
    let mut trainer = Trainer::load(model_dir, config, DType::F32)?;
    if let Some(a) = adapter {
        trainer.model_mut().load_adapter(a)?;
    }
    trainer.set_policy_version(version.to_string());
    Ok(trainer)
}

impl Learner {
    /// A learner on the base model in `model_dir`, starting at `version` (its adapter read
    /// from `sink`; fresh LoRA for [`BASE_VERSION`]).
    pub fn new(
        model_dir: &Path,
        config: LearnerConfig,
        gate: PromotionGate,
        sink: &dyn VersionSink,
        version: &str,
    ) -> crate::Result<Self> {
        if config.publish_every == 0 {
            return Err(super::OnlineError::Config("publish_every must be positive".into()).into());
        }
        if let Some(s) = &config.supervised {
            s.check().map_err(super::OnlineError::Config)?;
        }
        let adapter = sink.adapter(version)?;
        let trainer = trainer_at(model_dir, config.train.clone(), adapter.as_ref(), version)?;
        Ok(Learner {
            model_dir: model_dir.to_path_buf(),
            estimator: config.estimator.build(),
            config,
            trainer,
            gate,
            good_version: version.to_string(),
            since_check: 0,
            updates: 0,
            rollbacks: 0,
            history: VersionHistory::starting_at(version.to_string()),
            phases: PhaseTimes::default(),
            notes: serde_json::Map::new(),
        })
    }

    /// The trainer.
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The trainer, mutably (optimizer state restore).
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// The gate.
    pub fn gate(&self) -> &PromotionGate {
        &self.gate
    }

    /// The gate, mutably (to set the good reward of a measured base model).
    pub fn gate_mut(&mut self) -> &mut PromotionGate {
        &mut self.gate
    }

    /// The settings.
    pub fn config(&self) -> &LearnerConfig {
        &self.config
    }

    /// The last good (promoted, or started from) version: where a rollback returns.
    pub fn good_version(&self) -> &str {
        &self.good_version
    }

    /// Updates applied by this learner (rolled-back ones included).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Sets the update counter (a resumed run continues its numbering).
    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
    }

    /// Rollbacks so far.
    pub fn rollbacks(&self) -> u64 {
        self.rollbacks
    }

    /// Updates since the last check.
    pub fn since_check(&self) -> u64 {
        self.since_check
    }

    /// Versions served, oldest first.
    pub fn history(&self) -> &VersionHistory {
        &self.history
    }

    /// Replaces the history (a resumed run).
    pub fn set_history(&mut self, history: VersionHistory) {
        self.history = history;
    }

    /// Wall time per phase.
    pub fn phases(&self) -> &PhaseTimes {
        &self.phases
    }

    /// Wall time per phase, mutably (callers add the phases they run themselves).
    pub fn phases_mut(&mut self) -> &mut PhaseTimes {
        &mut self.phases
    }

    /// Sets a note recorded with every version published from now on.
    pub fn set_note(&mut self, key: &str, value: serde_json::Value) {
        self.notes.insert(key.to_string(), value);
    }

    /// Measures the trainer's weights (the last good version) with the gate's check and
    /// makes their held-out reward the bar a candidate must not fall below; `None` without a
    /// check. Timed as [`Phase::HeldoutChecks`].
    pub fn measure_baseline(&mut self) -> crate::Result<Option<HeldOutScore>> {
        let t0 = Instant::now();
        let score = self.gate.measure(self.trainer.model());
        self.phases
            .add(Phase::HeldoutChecks, t0.elapsed().as_secs_f64());
        let score = score?;
        if let Some(s) = &score {
            self.gate.set_good_reward(Some(s.reward));
        }
        Ok(score)
    }

    /// Whether a check is due (`publish_every` updates since the last one).
    pub fn check_due(&self) -> bool {
        self.since_check >= self.config.publish_every
    }

    /// Runs the estimator over `groups` and builds the trainer samples (timed as
    /// [`Phase::Advantages`]).
    pub fn prepare(&mut self, groups: &[SourcedGroup]) -> PreparedBatch {
        let estimator = self.estimator.as_ref();
        let references = ReferenceUse {
            guidance: self.config.reference_guidance.as_ref(),
            supervised: self.config.supervised.as_ref(),
        };
        self.phases.time(Phase::Advantages, || {
            prepare_batch(groups, estimator, references)
        })
    }

    /// When held groups make an update, for a caller that takes `groups_per_update` compared
    /// groups at a time ([`BatchRule`]: one-response groups count apart when the supervised
    /// objective is on).
    pub fn batch_rule(&self, groups_per_update: usize) -> BatchRule {
        BatchRule::new(groups_per_update, self.config.supervised.as_ref())
    }

    /// One update on a prepared batch. `harvested` is the caller's count of rollouts so far
    /// (recorded in the diagnostics). A non-finite loss rolls back at once.
    pub fn update(
        &mut self,
        prepared: &PreparedBatch,
        harvested: u64,
        sink: &dyn VersionSink,
    ) -> crate::Result<UpdateOutcome> {
        if prepared.is_empty() {
            return Ok(UpdateOutcome::Skipped);
        }
        let t0 = Instant::now();
        let result = self.trainer.step(&prepared.samples);
        let seconds = t0.elapsed().as_secs_f64();
        self.phases.add(Phase::Training, seconds);
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                metrics::counter!("leaf_update_failures_total").increment(1);
                return Ok(UpdateOutcome::Failed(e.to_string()));
            }
        };
        metrics::histogram!("leaf_update_seconds").record(seconds);
        let number = self.updates + 1;
        self.updates = number;
        let loss = if self.config.fault_nan_update == Some(number) {
            f64::NAN
        } else {
            stats.loss
        };
        let staleness = self.history.staleness(
            self.trainer.policy_version().unwrap_or(BASE_VERSION),
            prepared
                .samples
                .iter()
                .filter(|s| !s.demonstration)
                .map(|s| s.behaviour_version.as_str()),
        );
        // The record keeps the step's own loss (a NaN would not survive a JSON round trip).
        let record = UpdateRecord::new(number, harvested, &stats, prepared, staleness);
        record.export();
        if let Some(reason) = self.gate.judge_loss(number, loss) {
            self.roll_back(sink)?;
            return Ok(UpdateOutcome::RolledBack { record, reason });
        }
        self.since_check += 1;
        Ok(UpdateOutcome::Applied(record))
    }

    /// Rebuilds the trainer at the last good version (weights from `sink`, optimizer and
    /// schedule restarted).
    pub fn roll_back(&mut self, sink: &dyn VersionSink) -> crate::Result<()> {
        let adapter = sink.adapter(&self.good_version)?;
        self.trainer = trainer_at(
            &self.model_dir,
            self.config.train.clone(),
            adapter.as_ref(),
            &self.good_version,
        )?;
        self.rollbacks += 1;
        self.since_check = 0;
        metrics::counter!("leaf_rollbacks_total").increment(1);
        Ok(())
    }

    /// The gate's verdict on the candidate, then publish (and, with `promote`, promote) or
    /// roll back. The held-out check is timed as [`Phase::HeldoutChecks`], publishing as
    /// [`Phase::Swaps`]. An error of the held-out check itself is returned.
    pub fn check(
        &mut self,
        sink: &mut dyn VersionSink,
        promote: bool,
    ) -> crate::Result<CheckOutcome> {
        self.since_check = 0;
        let t0 = Instant::now();
        let verdict = self.gate.judge(self.trainer.model());
        self.phases
            .add(Phase::HeldoutChecks, t0.elapsed().as_secs_f64());
        let score = match verdict? {
            Verdict::RollBack { reason, score } => {
                self.roll_back(sink)?;
                return Ok(CheckOutcome::RolledBack { reason, score });
            }
            Verdict::Promote { score } => score,
        };
        let t0 = Instant::now();
        let published = self.publish(sink, promote, score.as_ref());
        self.phases.add(Phase::Swaps, t0.elapsed().as_secs_f64());
        match published {
            Ok(version) => {
                self.trainer.set_policy_version(version.clone());
                if promote {
                    self.history.push(version.clone());
                    self.good_version = version.clone();
                    self.gate.accept(score.as_ref());
                }
                metrics::counter!("leaf_versions_published_total").increment(1);
                Ok(CheckOutcome::Published {
                    version,
                    promoted: promote,
                    score,
                })
            }
            Err(e) => {
                metrics::counter!("leaf_publish_failures_total").increment(1);
                Ok(CheckOutcome::PublishFailed {
                    error: e.to_string(),
                    score,
                })
            }
        }
    }

    fn publish(
        &mut self,
        sink: &mut dyn VersionSink,
        promote: bool,
        score: Option<&HeldOutScore>,
    ) -> crate::Result<String> {
        let adapter = self
            .trainer
            .model()
            .export_adapter(&self.config.base_name)?;
        let mut notes = self.notes.clone();
        notes.insert("estimator".into(), self.config.estimator.name().into());
        notes.insert("updates".into(), self.updates.into());
        if let Some(s) = score {
            notes.insert("heldout_reward".into(), s.reward.into());
        }
        let id = sink.publish(
            &adapter,
            VersionMeta {
                parent: VersionId::parse(&self.good_version).ok(),
                step: Some(self.updates),
                notes,
            },
        )?;
        if promote {
            sink.promote(&id)?;
        }
        Ok(id)
    }
}
