//! The learner and the background trainer of `leaf serve --online`.
//!
//! * [`Learner`] ([`learner`]): the one learner of `leaf run`, `leaf serve --online` and
//!   `leaf train`: groups -> advantages -> LoRA update -> a [`PromotionGate`] ([`gate`]:
//!   held-out check, NaN and regression rollback) -> publish and promote through a
//!   [`VersionSink`].
//! * [`GroupSource`] ([`source`]): where `leaf train` gets groups (a JSON-lines file, or a
//!   broker), with the ack contract that makes training exactly-once.
//! * [`train_from_source`] ([`train`]): the loop of `leaf train` over a source, and
//!   [`TrainerCheckpoint`] ([`checkpoint`]): what it resumes from.
//! * [`OnlineTrainer`]: the learner on its own thread behind a running server.
//!
//! [`OnlineTrainer::spawn`] starts one dedicated OS thread (training never runs on the async
//! runtime, and the serving path never waits for it: it only meets the trainer through the
//! bounded sealed-group queue of [`crate::harvest::GroupAssembler`], which drops and counts
//! when full). Each update takes `groups_per_update` sealed groups and runs the learner. Every
//! `publish_every` updates the candidate goes through the gate: with held-out data
//! (`gate.data`, or `leaf serve --gate-data`) it is measured and promoted only if it does not
//! regress; without, it is promoted **unchecked**, which the trainer logs loudly and the
//! server's status reports (`trainer.promotes_unchecked`).
//!
//! **Liveness.** The thread is supervised: an update that panics or fails fatally ends the
//! learner, the supervisor records the error ([`crate::harvest::TrainerLiveness`]: the
//! status's `trainer` field and the `leaf_trainer_up` gauge), counts the groups it held as
//! `trainer_down` drops, waits (exponential backoff) and rebuilds the learner from the store's
//! current version. After `restart.max_restarts` consecutive failures it gives up: the trainer
//! is `down` (status `ready: false`), and sealed groups are dropped as `trainer_down`.
//!
//! Shutdown ([`OnlineTrainer::shutdown`]) either **finishes** (trains on every group it holds
//! or finds queued, then checks, publishes and promotes the result) or **persists** (writes
//! the queued and partially batched groups to a JSON-lines file and publishes, without
//! promoting, any unpublished updates that pass the gate), as configured.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use crate::advantage::EstimatorConfig;
use crate::harvest::{SealedGroup, TrainerLiveness, TrainerState};
use crate::serving::{GroupPolicy, LeafServer, ServeError};
use crate::trainer::TrainConfig;

mod batch;
pub mod checkpoint;
mod diagnostics;
mod error;
pub mod gate;
pub mod learner;
pub mod source;
pub mod train;
pub use batch::{
    prepare_batch, BatchRule, BatchStats, PreparedBatch, ReferenceGuidance, ReferenceUse,
    SupervisedReference, ZERO_ADVANTAGE,
};
pub use checkpoint::TrainerCheckpoint;
pub use diagnostics::{
    Phase, PhaseTimes, TimedReward, UpdateRecord, UpdateSummary, VersionHistory,
};
pub use error::OnlineError;
pub use gate::{
    open_gate_data, GateConfig, HeldOutCheck, HeldOutScore, PromotionGate, RollbackReason,
    TaskScore, Verdict,
};
pub use learner::{
    CheckOutcome, Learner, LearnerConfig, ServerSink, StoreSink, UpdateOutcome, VersionSink,
};
pub use source::{GroupReceipt, GroupSource, JsonlGroupSource, JsonlSourceOptions, SourcedGroup};
pub use train::{
    open_job, train_from_source, OfflineTrainConfig, OpenedJob, SourceTrainOptions,
    SourceTrainReport, TrainJobConfig,
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

/// How a crashed trainer is restarted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// Consecutive failed runs after which the trainer stays down. Default 5.
    pub max_restarts: u32,
    /// First wait before a restart, in seconds; doubled after each failure. Default 1.
    pub backoff_initial_s: f64,
    /// Longest wait, in seconds. Default 60.
    pub backoff_max_s: f64,
    /// A run that lasted this long (seconds) before failing resets the count. Default 300.
    pub healthy_after_s: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            backoff_initial_s: 1.0,
            backoff_max_s: 60.0,
            healthy_after_s: 300.0,
        }
    }
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
    /// Check, publish and hot-swap every this many updates. Default 10.
    pub publish_every: u64,
    /// What shutdown does.
    pub shutdown: ShutdownMode,
    /// Written into the adapter's `base_model_name_or_path`.
    pub base_name: String,
    /// The promotion gate's settings.
    pub gate: GateConfig,
    /// The gate's held-out data: a JSON-lines file of prompts with references, or a directory
    /// that the registered directory check reads (in `leaf`: spoken-digit recordings; see
    /// [`open_gate_data`]). Without it candidates are promoted
    /// unchecked. `leaf serve --gate-data` overrides it.
    pub gate_data: Option<PathBuf>,
    /// How a crashed trainer is restarted.
    pub restart: RestartPolicy,
    /// Add each request's reference answer to its group as a member (see
    /// [`ReferenceGuidance`]); `{}` turns it on with reward 1. The server then harvests
    /// references as ids. Default off: only the sampled answers are compared.
    pub reference_guidance: Option<ReferenceGuidance>,
    /// Train on each request's reference answer as a supervised demonstration (see
    /// [`SupervisedReference`]); `{}` turns it on with weight 1. The server then harvests
    /// references as ids and seals each labelled request that was not forked at once as a
    /// one-response group (`GroupPolicy::labelled_singles`). Default off.
    pub supervised: Option<SupervisedReference>,
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
            gate: GateConfig::default(),
            gate_data: None,
            restart: RestartPolicy::default(),
            reference_guidance: None,
            supervised: None,
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
    /// Candidates the gate refused (NaN loss or reward, or a held-out regression); the
    /// trainer rolled back to the last good version each time.
    pub rollbacks: u64,
    /// The last held-out score the gate measured.
    pub last_heldout: Option<HeldOutScore>,
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
    /// References trained on as supervised demonstrations ([`SupervisedReference`]).
    pub references_supervised: u64,
    /// The diagnostics of the last update.
    pub last_update: Option<UpdateRecord>,
    /// Wall time of the trainer thread per phase.
    pub phases: PhaseTimes,
    /// Times the trainer was restarted after a crash.
    pub restarts: u64,
}

/// Where a [`FaultHook`] is called (tests inject crashes there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultPoint {
    /// Before update number `update` (1-based, counted per learner run) is trained.
    BeforeUpdate {
        /// The update about to run.
        update: u64,
    },
}

/// A fault-injection hook for tests: called at each [`FaultPoint`]; it may panic, or return an
/// error that ends the learner (as a fatal failure would).
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Result<(), String> + Send + Sync>;

/// Extra settings of [`OnlineTrainer::spawn_with`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct TrainerOptions {
    /// A fault-injection hook (tests).
    pub fault_hook: Option<FaultHook>,
}

impl std::fmt::Debug for TrainerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerOptions")
            .field("fault_hook", &self.fault_hook.is_some())
            .finish()
    }
}

/// The running trainer thread.
#[derive(Debug)]
pub struct OnlineTrainer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<OnlineReport, ServeError>>,
    liveness: Arc<TrainerLiveness>,
}

/// What one learner run needs, kept across restarts.
struct Context {
    server: Arc<LeafServer>,
    runtime: tokio::runtime::Handle,
    config: OnlineConfig,
    options: TrainerOptions,
}

struct Loop<'a> {
    ctx: &'a Context,
    learner: Learner,
    sink: ServerSink,
    report: &'a mut OnlineReport,
    harvested: u64,
    updates_this_run: u64,
}

fn gate_for(ctx: &Context) -> crate::Result<PromotionGate> {
    match &ctx.config.gate_data {
        Some(path) => {
            let check = open_gate_data(path, ctx.server.model().dir(), &ctx.config.gate)?;
            Ok(PromotionGate::new(check, ctx.config.gate.max_drop, None))
        }
        None => Ok(PromotionGate::unchecked()),
    }
}

fn learner_for(ctx: &Context) -> crate::Result<(Learner, ServerSink)> {
    let sink = ServerSink::new(ctx.server.clone(), ctx.runtime.clone());
    let mut config = LearnerConfig::new(
        ctx.config.estimator.clone(),
        ctx.config.train.clone(),
        ctx.config.publish_every,
    );
    config.base_name = ctx.config.base_name.clone();
    config.reference_guidance = ctx.config.reference_guidance.clone();
    config.supervised = ctx.config.supervised.clone();
    let gate = gate_for(ctx)?;
    let version = ctx.server.current_version();
    let mut learner = Learner::new(ctx.server.model().dir(), config, gate, &sink, &version)?;
    // The version served now is the last good one: its held-out reward is the bar.
    if let Some(s) = learner.measure_baseline()? {
        tracing::info!(version = %version, reward = s.reward, "gate: the served version's held-out reward");
    }
    Ok((learner, sink))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
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
        Self::spawn_with(server, groups, config, runtime, TrainerOptions::default())
    }

    /// [`OnlineTrainer::spawn`] with extra options.
    pub fn spawn_with(
        server: Arc<LeafServer>,
        groups: Receiver<SealedGroup>,
        config: OnlineConfig,
        runtime: tokio::runtime::Handle,
        options: TrainerOptions,
    ) -> Result<Self, ServeError> {
        if config.groups_per_update == 0 || config.publish_every == 0 {
            return Err(ServeError::Config(
                "online: groups_per_update and publish_every must be positive".into(),
            ));
        }
        if let Some(s) = &config.supervised {
            s.check()
                .map_err(|e| ServeError::Config(format!("online: {e}")))?;
        }
        let r = &config.restart;
        if !(r.backoff_initial_s.is_finite()
            && r.backoff_initial_s >= 0.0
            && r.backoff_max_s.is_finite()
            && r.backoff_max_s >= r.backoff_initial_s
            && r.healthy_after_s.is_finite())
        {
            return Err(ServeError::Config(
                "online: restart.backoff_initial_s <= backoff_max_s must be finite and >= 0".into(),
            ));
        }
        config
            .gate
            .check()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        server.store().ok_or(ServeError::NoStore)?;
        let liveness = server.assembler().trainer().clone();
        let ctx = Context {
            server,
            runtime,
            config,
            options,
        };
        // The first learner is built here, so a bad model, store or gate fails the start.
        let first = learner_for(&ctx).map_err(|e| ServeError::Config(e.to_string()))?;
        let gate = first.0.gate().describe();
        if gate.is_none() {
            tracing::warn!(
                "online training WITHOUT a promotion gate: every candidate adapter is promoted \
                 unchecked (no held-out check); give held-out data with --gate-data or \
                 `gate_data` in the online config"
            );
        }
        liveness.set_gate(gate);
        liveness.set_state(TrainerState::Up);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let live2 = liveness.clone();
        let handle = std::thread::Builder::new()
            .name("leaf-online".into())
            .spawn(move || supervise(ctx, first, groups, &stop2, &live2))
            .map_err(|e| ServeError::Config(format!("cannot spawn the trainer thread: {e}")))?;
        Ok(OnlineTrainer {
            stop,
            handle,
            liveness,
        })
    }

    /// Whether the thread is still running (restarting counts as running).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// The liveness record (also in the server's status).
    pub fn liveness(&self) -> &Arc<TrainerLiveness> {
        &self.liveness
    }

    /// Stops the loop, finishes or persists what it holds (see the module docs) and returns
    /// the report. Blocks: call it from a plain thread or `spawn_blocking`. A trainer that
    /// went down for good returns its last error.
    pub fn shutdown(self) -> Result<OnlineReport, ServeError> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| ServeError::Config("the trainer supervisor panicked".into()))?
    }
}

/// Runs learners until a clean stop, restarting crashed ones (see the module docs).
fn supervise(
    ctx: Context,
    first: (Learner, ServerSink),
    rx: Receiver<SealedGroup>,
    stop: &AtomicBool,
    liveness: &TrainerLiveness,
) -> Result<OnlineReport, ServeError> {
    let mut report = OnlineReport::default();
    let mut next = Some(first);
    let mut failures = 0u32;
    let mut backoff = ctx.config.restart.backoff_initial_s;
    loop {
        let started = Instant::now();
        let mut held: Vec<SealedGroup> = Vec::new();
        let outcome = catch_unwind(AssertUnwindSafe(|| -> crate::Result<()> {
            let (learner, sink) = match next.take() {
                Some(l) => l,
                None => learner_for(&ctx)?,
            };
            liveness.set_state(TrainerState::Up);
            let mut lp = Loop {
                ctx: &ctx,
                learner,
                sink,
                report: &mut report,
                harvested: 0,
                updates_this_run: 0,
            };
            lp.run(&rx, stop, &mut held)
        }));
        let message = match outcome {
            Ok(Ok(())) => {
                liveness.set_state(TrainerState::Stopped);
                return Ok(report);
            }
            Ok(Err(e)) => e.to_string(),
            Err(p) => panic_message(p.as_ref()),
        };
        // The groups the dead learner held are lost with it.
        ctx.server.assembler().count_trainer_down(held.len() as u64);
        if started.elapsed().as_secs_f64() >= ctx.config.restart.healthy_after_s {
            failures = 0;
            backoff = ctx.config.restart.backoff_initial_s;
        }
        failures += 1;
        let give_up = failures > ctx.config.restart.max_restarts || stop.load(Ordering::SeqCst);
        tracing::error!(
            error = %message,
            failures,
            "the online trainer died{}",
            if give_up { "; it stays down" } else { "; restarting" }
        );
        report.last_error = Some(message.clone());
        liveness.record_failure(message.clone(), !give_up);
        if give_up {
            // Dropping the queue's receiver makes every later sealed group a trainer_down drop.
            drop(rx);
            return Err(ServeError::Config(format!(
                "the online trainer is down after {failures} failed runs: {message}"
            )));
        }
        let until = Instant::now() + Duration::from_secs_f64(backoff);
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2.0).min(ctx.config.restart.backoff_max_s);
        report.restarts += 1;
    }
}

impl Loop<'_> {
    fn run(
        &mut self,
        rx: &Receiver<SealedGroup>,
        stop: &AtomicBool,
        held: &mut Vec<SealedGroup>,
    ) -> crate::Result<()> {
        let per_update = self.ctx.config.groups_per_update;
        let rule = self.learner.batch_rule(per_update);
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let waited = Instant::now();
            let got = rx.recv_timeout(Duration::from_millis(50));
            self.report
                .phases
                .add(Phase::Generation, waited.elapsed().as_secs_f64());
            match got {
                Ok(g) => held.push(g),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if rule.ready(held.iter().map(|g| g.members.len())) {
                // Cleared only after the update: a crash in it counts the batch as lost.
                self.update_or_count(&held[..])?;
                held.clear();
            }
        }
        // Shutdown: what is held plus what is queued.
        held.extend(rx.try_iter());
        let held = std::mem::take(held);
        match self.ctx.config.shutdown.clone() {
            ShutdownMode::Finish => {
                for batch in rule.batches(held, |g| g.members.len()) {
                    self.update_or_count(&batch)?;
                }
                if self.learner.since_check() > 0 {
                    self.check(true)?;
                }
            }
            ShutdownMode::Persist(path) => {
                self.persist(&path, &held)?;
                if self.learner.since_check() > 0 {
                    self.check(false)?;
                }
            }
        }
        self.merge_phases();
        Ok(())
    }

    fn merge_phases(&mut self) {
        let phases = std::mem::take(self.learner.phases_mut());
        for (p, s) in phases.seconds {
            self.report.phases.add(p, s);
        }
    }

    /// An update whose failure is logged and counted instead of ending the loop. Errors that
    /// leave the learner unusable (a failed rollback) end it.
    fn update_or_count(&mut self, batch: &[SealedGroup]) -> crate::Result<()> {
        self.updates_this_run += 1;
        if let Some(hook) = &self.ctx.options.fault_hook {
            hook(FaultPoint::BeforeUpdate {
                update: self.updates_this_run,
            })
            .map_err(|e| OnlineError::Config(format!("injected fault: {e}")))?;
        }
        let groups: Vec<SourcedGroup> = batch
            .iter()
            .map(|g| SourcedGroup::from_sealed(g, GroupReceipt::none()))
            .collect();
        let prepared = self.learner.prepare(&groups);
        self.report.groups_trained += prepared.groups;
        self.report.groups_invalid += prepared.invalid;
        self.report.groups_uninformative += prepared.uninformative;
        self.report.references_supervised += prepared.stats.supervised;
        self.harvested += prepared.harvested;
        let outcome = self.learner.update(&prepared, self.harvested, &self.sink)?;
        self.merge_phases();
        match outcome {
            UpdateOutcome::Skipped => {}
            UpdateOutcome::Failed(e) => {
                tracing::warn!(error = %e, "online update failed; batch dropped");
                self.report.update_failures += 1;
                self.report.last_error = Some(e);
            }
            UpdateOutcome::RolledBack { record, reason } => {
                tracing::warn!(
                    ?reason,
                    "online update rolled back to the last good version"
                );
                self.report.updates += 1;
                self.report.rollbacks += 1;
                self.report.last_loss = Some(record.loss);
                self.report.last_update = Some(record);
                self.ctx.server.note_update();
            }
            UpdateOutcome::Applied(record) => {
                self.report.updates += 1;
                self.report.last_loss = Some(record.loss);
                self.report.last_update = Some(record);
                self.ctx.server.note_update();
                if self.learner.check_due() {
                    self.check(true)?;
                }
            }
        }
        Ok(())
    }

    /// The gate, then publish (and promote) or roll back; outcomes are logged and counted.
    fn check(&mut self, promote: bool) -> crate::Result<()> {
        let outcome = self.learner.check(&mut self.sink, promote);
        self.merge_phases();
        match outcome? {
            CheckOutcome::Published { version, score, .. } => {
                if score.is_some() {
                    self.report.last_heldout = score;
                }
                self.report.published.push(version);
            }
            CheckOutcome::RolledBack { reason, score } => {
                tracing::warn!(
                    ?reason,
                    "the gate refused the candidate; rolled back to {}",
                    self.learner.good_version()
                );
                self.report.rollbacks += 1;
                self.report.last_heldout = score;
            }
            CheckOutcome::PublishFailed { error, score } => {
                tracing::warn!(error = %error, "publishing the adapter failed; the served version stays");
                self.report.publish_failures += 1;
                self.report.last_heldout = score;
            }
        }
        Ok(())
    }

    fn persist(&mut self, path: &std::path::Path, groups: &[SealedGroup]) -> crate::Result<()> {
        let io = OnlineError::io(path);
        let mut f = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => return Err(io(e).into()),
        };
        for g in groups {
            let line = serde_json::to_string(g).map_err(|e| {
                OnlineError::Config(format!("cannot serialise group {}: {e}", g.id))
            })?;
            writeln!(f, "{line}").map_err(OnlineError::io(path))?;
            self.report.groups_persisted += 1;
        }
        f.sync_all().map_err(OnlineError::io(path))?;
        Ok(())
    }
}
