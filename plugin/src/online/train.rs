//! Training from a [`GroupSource`]: the loop of `leaf train` (a JSON-lines file today, a
//! broker's durable consumer for a cluster trainer).
//!
//! The loop takes `groups_per_update` groups at a time, runs the [`Learner`] on them and, at
//! every point where the trainer's weights are a store version again (a promoted candidate, a
//! rollback, or a batch that made no update), saves the [`TrainerCheckpoint`] and only then
//! acks the groups consumed since the previous checkpoint ([`GroupSource::ack`]). A group
//! whose id the checkpoint remembers (a redelivery after a crash lost its ack) is acked
//! without being trained on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use leaf_adapters::store::AdapterStore;
use serde::Serialize;

use super::batch::{ReferenceGuidance, SupervisedReference};
use super::checkpoint::{CheckpointState, TrainerCheckpoint};
use super::gate::{open_gate_data, GateConfig, HeldOutScore, PromotionGate};
use super::learner::{CheckOutcome, Learner, LearnerConfig, StoreSink, UpdateOutcome, VersionSink};
use super::source::{
    GroupReceipt, GroupSource, JsonlGroupSource, JsonlSourceOptions, SourcedGroup,
};
use super::OnlineError;
use crate::advantage::EstimatorConfig;
use crate::serving::BASE_VERSION;
use crate::trainer::TrainConfig;

/// Settings of [`train_from_source`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SourceTrainOptions {
    /// Groups per update. Default 1.
    pub groups_per_update: usize,
    /// Stop after this many updates in this session (`None`: until the source is exhausted).
    pub max_updates: Option<u64>,
}

impl Default for SourceTrainOptions {
    fn default() -> Self {
        SourceTrainOptions {
            groups_per_update: 1,
            max_updates: None,
        }
    }
}

/// What [`train_from_source`] did in this session.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SourceTrainReport {
    /// The source.
    pub source: String,
    /// Updates applied this session (rolled-back ones included).
    pub updates: u64,
    /// Groups consumed this session.
    pub groups_consumed: u64,
    /// Groups that became training samples.
    pub groups_trained: u64,
    /// Groups refused by validation.
    pub groups_invalid: u64,
    /// Groups whose rewards were all equal.
    pub groups_uninformative: u64,
    /// Redelivered groups the checkpoint had already consumed (acked, not trained on).
    pub groups_duplicate: u64,
    /// Versions published and promoted.
    pub published: Vec<String>,
    /// Candidates the gate refused (the trainer rolled back each time).
    pub rollbacks: u64,
    /// Publishes that failed.
    pub publish_failures: u64,
    /// Updates that failed (batch dropped).
    pub update_failures: u64,
    /// Loss of the last update.
    pub last_loss: Option<f64>,
    /// The last held-out score the gate measured.
    pub last_heldout: Option<HeldOutScore>,
    /// Checkpoints saved.
    pub checkpoints: u64,
    /// The version the trainer ended at (the last good one).
    pub final_version: String,
    /// Whether the source was exhausted (else `max_updates` stopped the session).
    pub exhausted: bool,
}

struct Run<'a> {
    learner: &'a mut Learner,
    sink: &'a mut dyn VersionSink,
    source: &'a mut dyn GroupSource,
    checkpoint: &'a TrainerCheckpoint,
    state: &'a mut CheckpointState,
    report: SourceTrainReport,
    /// Receipts of groups consumed since the last checkpoint.
    pending: Vec<GroupReceipt>,
    /// Ids of those groups (a redelivery of one is held with them, not acked before the
    /// checkpoint that covers it).
    pending_ids: HashSet<String>,
    /// The weights differ from `state.version` (updates not yet published).
    dirty: bool,
    harvested: u64,
}

/// Trains `learner` on the groups of `source` (see the module docs); `state` is the
/// checkpoint's record (loaded on resume, fresh otherwise) and is kept up to date.
pub async fn train_from_source(
    learner: &mut Learner,
    sink: &mut dyn VersionSink,
    source: &mut dyn GroupSource,
    checkpoint: &TrainerCheckpoint,
    state: &mut CheckpointState,
    options: &SourceTrainOptions,
) -> crate::Result<SourceTrainReport> {
    if options.groups_per_update == 0 {
        return Err(super::OnlineError::Config("groups_per_update must be positive".into()).into());
    }
    let mut run = Run {
        report: SourceTrainReport {
            source: source.describe(),
            ..SourceTrainReport::default()
        },
        learner,
        sink,
        source,
        checkpoint,
        state,
        pending: Vec::new(),
        pending_ids: HashSet::new(),
        dirty: false,
        harvested: 0,
    };
    let mut batch: Vec<SourcedGroup> = Vec::new();
    let rule = run.learner.batch_rule(options.groups_per_update);
    loop {
        if options.max_updates.is_some_and(|m| run.report.updates >= m) {
            break;
        }
        let want = options.groups_per_update.saturating_sub(batch.len()).max(1);
        let got = run.source.next_groups(want).await?;
        if got.is_empty() {
            run.report.exhausted = true;
            break;
        }
        let mut duplicates = Vec::new();
        for g in got {
            if run.pending_ids.contains(&g.id) || batch.iter().any(|b| b.id == g.id) {
                // Redelivered while its first delivery waits for a checkpoint (a broker's ack
                // deadline passed): acked together with it, after the checkpoint.
                tracing::debug!(group = %g.id, "group redelivered before its checkpoint");
                run.report.groups_duplicate += 1;
                run.pending.push(g.receipt);
            } else if run.state.seen(&g.id) {
                tracing::info!(group = %g.id, "group already consumed before a restart; acked again");
                duplicates.push(g.receipt);
            } else {
                batch.push(g);
            }
        }
        if !duplicates.is_empty() {
            run.report.groups_duplicate += duplicates.len() as u64;
            metrics::counter!("leaf_train_groups_redelivered_total")
                .increment(duplicates.len() as u64);
            run.source.ack(duplicates).await?;
        }
        if rule.ready(batch.iter().map(|g| g.rollouts.len())) {
            let groups = std::mem::take(&mut batch);
            run.train(groups)?;
            run.checkpoint_if_clean().await?;
        }
    }
    // The source is exhausted: train on the last partial batch, as a finish would.
    if run.report.exhausted && !batch.is_empty() {
        let groups = std::mem::take(&mut batch);
        run.train(groups)?;
    }
    if run.learner.since_check() > 0 {
        run.check()?;
    }
    run.checkpoint_if_clean().await?;
    run.report.final_version = run.learner.good_version().to_string();
    Ok(run.report)
}

impl Run<'_> {
    fn train(&mut self, groups: Vec<SourcedGroup>) -> crate::Result<()> {
        let prepared = self.learner.prepare(&groups);
        self.report.groups_consumed += groups.len() as u64;
        self.report.groups_trained += prepared.groups;
        self.report.groups_invalid += prepared.invalid;
        self.report.groups_uninformative += prepared.uninformative;
        self.harvested += prepared.harvested;
        for g in groups {
            self.state.note_group(&g.id);
            self.pending_ids.insert(g.id);
            self.pending.push(g.receipt);
        }
        match self
            .learner
            .update(&prepared, self.harvested, &*self.sink)?
        {
            UpdateOutcome::Skipped => {}
            UpdateOutcome::Failed(e) => {
                tracing::warn!(error = %e, "update failed; batch dropped");
                self.report.update_failures += 1;
            }
            UpdateOutcome::RolledBack { record, reason } => {
                tracing::warn!(?reason, "update rolled back to the last good version");
                self.report.updates += 1;
                self.report.rollbacks += 1;
                self.report.last_loss = Some(record.loss);
                self.dirty = false;
            }
            UpdateOutcome::Applied(record) => {
                self.report.updates += 1;
                self.report.last_loss = Some(record.loss);
                self.dirty = true;
                if self.learner.check_due() {
                    self.check()?;
                }
            }
        }
        Ok(())
    }

    fn check(&mut self) -> crate::Result<()> {
        match self.learner.check(&mut *self.sink, true)? {
            CheckOutcome::Published { version, score, .. } => {
                tracing::info!(version, "published and promoted");
                if score.is_some() {
                    self.report.last_heldout = score;
                }
                self.report.published.push(version);
                self.dirty = false;
            }
            CheckOutcome::RolledBack { reason, score } => {
                tracing::warn!(?reason, "the gate refused the candidate; rolled back");
                self.report.rollbacks += 1;
                self.report.last_heldout = score;
                self.dirty = false;
            }
            CheckOutcome::PublishFailed { error, score } => {
                // The weights stay unpublished: nothing is acked until a later publish
                // succeeds.
                tracing::warn!(error = %error, "publishing failed; retried at the next check");
                self.report.publish_failures += 1;
                self.report.last_heldout = score;
            }
        }
        Ok(())
    }

    /// Saves the checkpoint and acks what it covers, when the weights are a store version.
    async fn checkpoint_if_clean(&mut self) -> crate::Result<()> {
        if self.dirty || self.learner.since_check() > 0 || self.pending.is_empty() {
            return Ok(());
        }
        self.state.version = self.learner.good_version().to_string();
        self.state.updates = self.learner.updates();
        self.state.good_reward = self.learner.gate().good_reward();
        self.checkpoint.save(self.learner.trainer(), self.state)?;
        self.report.checkpoints += 1;
        let receipts = std::mem::take(&mut self.pending);
        self.pending_ids.clear();
        self.source.ack(receipts).await
    }
}

/// Everything a training job needs but its source of groups: the learner, the gate, and the
/// directory of its checkpoint. `leaf train --groups` ([`train_offline`]) and
/// `leaf train --cluster` (`cluster::train`) differ only in the source and the sink.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrainJobConfig {
    /// The base model directory.
    pub model_dir: PathBuf,
    /// The local state directory: its `trainer/` holds the checkpoint; for the file source it
    /// is also the adapter store every version is published to (created when missing).
    pub store: PathBuf,
    /// LEAF or GRPO.
    pub estimator: EstimatorConfig,
    /// The LoRA update.
    pub train: TrainConfig,
    /// Groups per update.
    pub groups_per_update: usize,
    /// Check, publish and promote every this many updates.
    pub publish_every: u64,
    /// Stop after this many updates in this session.
    pub max_updates: Option<u64>,
    /// The gate's settings.
    pub gate: GateConfig,
    /// The gate's held-out data (a prompts file, or a directory for the registered directory
    /// check: recordings in `leaf`; see [`super::gate::open_gate_data`]); `None`: unchecked.
    pub gate_data: Option<PathBuf>,
    /// Written into the adapter's `base_model_name_or_path`.
    pub base_name: String,
    /// Add each group's reference to it, when the group carries one. Default off.
    pub reference_guidance: Option<ReferenceGuidance>,
    /// Train on each group's reference as a supervised demonstration, when the group carries
    /// one. Default off.
    pub supervised: Option<SupervisedReference>,
}

impl TrainJobConfig {
    /// Defaults: LEAF, the default update, one group per update, a version per update.
    pub fn new(model_dir: &Path, store: &Path) -> Self {
        TrainJobConfig {
            model_dir: model_dir.to_path_buf(),
            store: store.to_path_buf(),
            estimator: EstimatorConfig::default(),
            train: TrainConfig::default(),
            groups_per_update: 1,
            publish_every: 1,
            max_updates: None,
            gate: GateConfig::default(),
            gate_data: None,
            base_name: "leaf-base".into(),
            reference_guidance: None,
            supervised: None,
        }
    }

    /// The job's trainer checkpoint (`STORE/trainer/`).
    pub fn checkpoint(&self) -> TrainerCheckpoint {
        TrainerCheckpoint::in_store(&self.store)
    }

    /// The loop's options.
    pub fn options(&self) -> SourceTrainOptions {
        SourceTrainOptions {
            groups_per_update: self.groups_per_update,
            max_updates: self.max_updates,
        }
    }
}

/// `leaf train --groups FILE`: a [`TrainJobConfig`] and the JSON-lines file it reads.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OfflineTrainConfig {
    /// The job.
    pub job: TrainJobConfig,
    /// The JSON-lines groups file.
    pub groups: PathBuf,
    /// Log and skip malformed lines instead of stopping at the first.
    pub skip_malformed: bool,
}

impl OfflineTrainConfig {
    /// The default job on `model_dir` and `store`, reading `groups`.
    pub fn new(model_dir: &Path, groups: &Path, store: &Path) -> Self {
        OfflineTrainConfig {
            job: TrainJobConfig::new(model_dir, store),
            groups: groups.to_path_buf(),
            skip_malformed: false,
        }
    }
}

/// A job's learner at the version it resumes from, and the checkpoint record it keeps.
pub struct OpenedJob {
    /// The learner (weights of `state.version`, optimizer restored when the checkpoint had it).
    pub learner: Learner,
    /// The checkpoint record (loaded on resume, fresh otherwise).
    pub state: CheckpointState,
    /// Where the record is saved.
    pub checkpoint: TrainerCheckpoint,
}

impl std::fmt::Debug for OpenedJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedJob")
            .field("version", &self.state.version)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl OpenedJob {
    /// Trains the opened learner on the groups of `source`, publishing through `sink`, with its
    /// checkpoint kept up to date ([`train_from_source`] on this job's parts).
    pub async fn train(
        &mut self,
        sink: &mut dyn VersionSink,
        source: &mut dyn GroupSource,
        options: &SourceTrainOptions,
    ) -> crate::Result<SourceTrainReport> {
        train_from_source(
            &mut self.learner,
            sink,
            source,
            &self.checkpoint,
            &mut self.state,
            options,
        )
        .await
    }
}

/// Opens a job: refuses a checkpoint made with another estimator or base model, loads the
/// checkpoint's version (or `fresh_version` on a first start) through `sink`, restores the
/// optimizer, and sets up the gate (measuring the starting version when it is checked and
/// has no score yet).
pub fn open_job(
    job: &TrainJobConfig,
    sink: &dyn VersionSink,
    fresh_version: &str,
) -> crate::Result<OpenedJob> {
    let checkpoint = job.checkpoint();
    let saved = checkpoint.load()?;
    let estimator = job.estimator.name().to_string();
    if let Some(s) = &saved {
        let bad = |reason: String| OnlineError::Checkpoint {
            path: checkpoint.dir().to_path_buf(),
            reason,
        };
        if s.estimator != estimator {
            return Err(bad(format!(
                "was trained with --estimator {}, not {estimator}",
                s.estimator
            ))
            .into());
        }
        if s.base_model != job.model_dir {
            return Err(bad(format!(
                "was trained on the base model {}, not {}",
                s.base_model.display(),
                job.model_dir.display()
            ))
            .into());
        }
        if s.version != fresh_version {
            tracing::warn!(
                checkpoint = %s.version,
                current = %fresh_version,
                "the current version is not the trainer's; training goes on from the \
                 trainer's checkpoint"
            );
        }
    }
    let version = saved
        .as_ref()
        .map(|s| s.version.clone())
        .unwrap_or_else(|| fresh_version.to_string());
    let gate = match &job.gate_data {
        Some(path) => PromotionGate::new(
            open_gate_data(path, &job.model_dir, &job.gate)?,
            job.gate.max_drop,
            saved.as_ref().and_then(|s| s.good_reward),
        ),
        None => {
            tracing::warn!(
                "no --gate-data: every candidate is published and promoted unchecked (only a \
                 non-finite loss rolls back)"
            );
            PromotionGate::unchecked()
        }
    };
    let mut learner_cfg =
        LearnerConfig::new(job.estimator.clone(), job.train.clone(), job.publish_every);
    learner_cfg.base_name = job.base_name.clone();
    learner_cfg.reference_guidance = job.reference_guidance.clone();
    learner_cfg.supervised = job.supervised.clone();
    let mut learner = Learner::new(&job.model_dir, learner_cfg, gate, sink, &version)?;
    if learner.gate().is_checked() && learner.gate().good_reward().is_none() {
        if let Some(s) = learner.measure_baseline()? {
            tracing::info!(version = %version, reward = s.reward, "gate: the starting version's held-out reward");
        }
    }
    let state = match saved {
        Some(mut s) => {
            learner.set_updates(s.updates);
            match checkpoint.restore_optimizer(learner.trainer_mut(), &s.version) {
                Ok(()) => tracing::info!(
                    version = %s.version,
                    step = learner.trainer().steps(),
                    "optimizer state restored"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "optimizer state not restored; Adam and the schedule restart"
                ),
            }
            s.sessions += 1;
            s
        }
        None => CheckpointState {
            version,
            updates: 0,
            groups_consumed: 0,
            recent_groups: Default::default(),
            good_reward: None,
            estimator,
            base_model: job.model_dir.clone(),
            sessions: 1,
        },
    };
    Ok(OpenedJob {
        learner,
        state,
        checkpoint,
    })
}

/// `leaf train --groups FILE`: trains on the groups file, publishing and promoting versions in
/// the store, resuming from the store's trainer checkpoint (and the file's acked position)
/// when there is one. Blocks (runs its own async runtime).
pub fn train_offline(config: &OfflineTrainConfig) -> crate::Result<SourceTrainReport> {
    let job = &config.job;
    let store = AdapterStore::open(&job.store)?;
    let current = store
        .current()?
        .map(|v| v.to_string())
        .unwrap_or_else(|| BASE_VERSION.to_string());
    let mut sink = StoreSink::new(store);
    let mut opened = open_job(job, &sink, &current)?;
    let mut source = JsonlGroupSource::open(
        &config.groups,
        JsonlSourceOptions {
            skip_malformed: config.skip_malformed,
            vocab_size: Some(opened.learner.trainer().model().config().vocab_size),
            cursor_file: Some(opened.checkpoint.cursor_file("jsonl")),
            ..JsonlSourceOptions::default()
        },
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OnlineError::Config(format!("cannot start the async runtime: {e}")))?;
    let mut report = runtime.block_on(opened.train(&mut sink, &mut source, &job.options()))?;
    report.groups_invalid += source.skipped();
    Ok(report)
}
