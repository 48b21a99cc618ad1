//! `leaf run`: the whole continual post-training run.
//!
//! 1. **Model**: `--model DIR`, or the cached default speech LM (trained by
//!    [`ensure_default_model`] on first use, with a progress bar).
//! 2. **Server**: a [`LeafServer`] on mistral.rs with its adapter store in `OUT/store`; the
//!    reward is cased sentence BLEU / 100 against the reference each request carries; the
//!    group policy draws K - 1 extra samples of one client prompt in 32 (`fork_fraction`),
//!    and seals every other labelled request at once as a one-response group.
//! 3. **Traffic**: the spoken-digit training tasks, replayed by concurrent clients
//!    ([`super::traffic`]).
//! 4. **Learner** (this thread): B compared groups or 8 labelled singles -> advantages
//!    (LEAF or GRPO) on the groups, plus every request's reference as a supervised
//!    demonstration ([`SupervisedReference`]) -> one LoRA update. Every `publish_every`
//!    updates the candidate adapter is checked on the held-out test takes (`eval_samples` per
//!    family, decoded as the server samples the traffic, or greedy with
//!    `--eval-decoding greedy`). A finite loss and a held-out reward no
//!    more than `collapse_drop` below the last good version's get it published and promoted
//!    (hot-swapped). A NaN loss or a collapse does not: the trainer rolls back to the last good
//!    version (weights reloaded from the store, optimizer restarted), and the run says so.
//!    The update, the gate and the rollback are the shared [`crate::online::Learner`]'s
//!    (the one `leaf serve --online` and `leaf train` use).
//! 5. **Report**: `report.json`, `reward_curve.png`, `state.json` (counters, curve, traffic
//!    cursor) and `optimizer.safetensors` (Adam's moments and the schedule's step, marked with
//!    the adapter version they belong to) after every check, from which `--resume` continues:
//!    the store's current version is served and trained on, the optimizer and the counters go
//!    on. Nothing published is lost.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use leaf_adapters::model::{LlamaModel, LoraOptions, ModelOptions, Trainable};
use leaf_adapters::store::{AdapterStore, VersionId};
use serde::{Deserialize, Serialize};

use super::ceiling::{pass_at_k, Ceiling};
use super::eval_cache::EvalCache;
use super::held_out::RecordingsCheck;
use super::report::{
    heldout_exact, heldout_reward, mean, write_json, CurvePoint, Diagnostics, FamilyPoint,
    ForkSummary, GroupPolicyStats, OtherDecoding, RunEvent, RunReport,
};
use super::traffic::{self, TrafficConfig};
use super::JobError;
use crate::advantage::ForkStats;
use crate::harvest::{AssemblerConfig, ReferenceReward, SealedGroup};
use crate::online::{
    CheckOutcome, GroupReceipt, Learner, LearnerConfig, Phase, PhaseTimes, PromotionGate,
    ReferenceGuidance, RollbackReason, ServerSink, SourcedGroup, SupervisedReference, TimedReward,
    UpdateOutcome, UpdateRecord, UpdateSummary, VersionHistory,
};
use crate::reward::{Metric, RewardOptions};
use crate::serving::{GroupPolicy, LeafServer, ServerConfig, BASE_VERSION};
use crate::speech::eval::{evaluate, Decoding, EvalConfig, EvalReport};
use crate::speech::prepare::ExampleEncoder;
use crate::speech::pretrain::{
    default_data_dir, ensure_default_model, load_encoder, DEFAULT_TRAIN_KINDS,
};
use crate::speech::tasks::{
    is_traffic_take, Corpus, Split, TaskFamily, TaskKind, MAX_ANSWER_TOKENS,
};
use crate::trainer::{LossAggregation, TrainConfig};

/// File of the saved run state inside the output directory.
pub const STATE_FILE: &str = "state.json";
/// File of the report inside the output directory.
pub const REPORT_FILE: &str = "report.json";
/// File of the reward curve inside the output directory.
pub const CURVE_FILE: &str = "reward_curve.png";
/// File of the per-update diagnostics figure inside the output directory.
pub const DIAGNOSTICS_FILE: &str = "diagnostics.png";
/// File of the optimizer state (Adam's moments, step counters) inside the output directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Directory of the adapter store inside the output directory.
pub const STORE_DIR: &str = "store";

/// The advantage estimator of a run (defined with the estimators; `leaf train` uses it too).
pub use crate::advantage::Estimator;

/// How the held-out checks and the base/final evaluations decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalDecoding {
    /// The way the server answers the traffic: sampling at the traffic's temperature and
    /// top-p (the same random numbers for every model compared, so differences are paired).
    Serving,
    /// The most likely token at every step.
    Greedy,
}

impl EvalDecoding {
    /// `"serving"` or `"greedy"`.
    pub fn name(self) -> &'static str {
        match self {
            EvalDecoding::Serving => "serving",
            EvalDecoding::Greedy => "greedy",
        }
    }
}

/// Every setting of a run. [`RunConfig::default`] holds the defaults of `leaf run`: the
/// supervised objective on every request's reference (weight 1) beside LEAF reinforcement on
/// one request in 32 (K = 8 samples, B = 4 groups per update; an update also closes at 8
/// labelled singles), LoRA rank 32 / alpha 64, learning rate 1.5e-3, check + hot-swap every 224
/// updates, 80,000 rollouts (about 65,640 requests, one in 32 forked into a group) over 65,664
/// distinct training prompts of the short families, weighted toward translation and spoken QA
/// ([`DEFAULT_TRAFFIC_KINDS`]), held-out checks decoded as the server samples. The supervised
/// objective and its volume of distinct labelled requests are what move greedy answers on
/// this workload; a long family's prompt costs about three short ones in training and those
/// families showed no exact answer to gain, so the default traffic spends the budget on the
/// short ones (the README measures both). The evaluation sizes (8 examples per family per
/// check: with 16 every 4 updates the checks took 90 % of the learning phase) keep the
/// learning phase cheap; the base and final evaluations and the base model's pass@K (only on
/// the traffic's families) take 400 examples per family, so that the printed share of the gap
/// closed is a measurement (at 100 examples a family's exact match has a standard error of
/// about 0.05, most of a gap of 0.1-0.25; at 400 about 0.025) for about a minute more on a
/// fresh cache (the base model's figures are cached). The README holds the tuning figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The base model directory; `None` uses (and on first use trains) the cached default.
    pub model: Option<PathBuf>,
    /// Where the default model is cached.
    pub cache_dir: PathBuf,
    /// The spoken-digit recordings; `None` finds the default.
    pub data_dir: Option<PathBuf>,
    /// The output directory (store, report, figure, state).
    pub out: PathBuf,
    /// LEAF or GRPO.
    pub estimator: Estimator,
    /// The reward of the traffic: a metric of the completion against the request's reference
    /// (sentence BLEU, the spec's default; exact match pays nothing for a partly right answer).
    #[serde(default = "default_metric")]
    pub metric: Metric,
    /// A control run: the traffic's rewards are seeded random numbers with no link to the
    /// answers ([`ReferenceReward::placebo`]), to measure what training does without signal.
    #[serde(default)]
    pub placebo_reward: bool,
    /// Rollouts (harvested samples) to train on.
    pub rollouts: u64,
    /// Seed of the traffic, the sampling and the LoRA initialisation.
    pub seed: u64,
    /// Group size K (samples per prompt).
    pub group_size: usize,
    /// Groups per update B.
    pub groups_per_update: usize,
    /// Held-out check (and publish + hot-swap when it passes) every this many updates.
    pub publish_every: u64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Weight of the KL penalty to the base model.
    pub kl_beta: f64,
    /// Adam's beta2 ([`TrainConfig::adam_beta2`]): the decay of the squared-gradient average
    /// (0.95 in the LEAF spec; supervised fine-tuning usually runs 0.99-0.999).
    #[serde(default = "spec_beta2")]
    pub adam_beta2: f64,
    /// LoRA+ ([`TrainConfig::lora_plus_ratio`]): the B matrices' learning rate is this multiple
    /// of `learning_rate`; 1 is plain LoRA.
    #[serde(default = "unit_weight")]
    pub lora_plus_ratio: f64,
    /// PPO epochs: passes over each batch of rollouts (the ratio and clip act from the
    /// second pass on).
    #[serde(default = "one")]
    pub epochs: usize,
    /// Multiplier of negative advantages ([`TrainConfig::negative_weight`]).
    #[serde(default = "unit_weight")]
    pub negative_weight: f64,
    /// Sequences per forward/backward pass of an update ([`TrainConfig::micro_batch_size`]):
    /// larger passes spend less time per sequence on op overhead, smaller ones less memory.
    #[serde(default = "eight")]
    pub micro_batch: usize,
    /// How token terms become the batch loss ([`TrainConfig::loss_aggregation`]).
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// Reference guidance: each group also gets its request's reference answer as a member
    /// ([`ReferenceGuidance`], reward 1).
    #[serde(default)]
    pub reference_guidance: bool,
    /// The supervised objective: every request's reference answer is also trained on as a
    /// demonstration of this weight ([`SupervisedReference`]); 0 turns it off (reinforcement
    /// only).
    #[serde(default)]
    pub supervised_weight: f64,
    /// One-response groups (labelled requests that were not forked) per update of the
    /// supervised objective.
    #[serde(default = "sixteen")]
    pub supervised_per_update: usize,
    /// Fraction of the traffic's requests that get K - 1 extra samples (a group that
    /// reinforcement learns from); with the supervised objective the others are labelled
    /// one-response groups.
    #[serde(default = "unit_weight")]
    pub fork_fraction: f64,
    /// Concurrent traffic clients.
    pub clients: usize,
    /// Most new tokens per answer.
    pub max_tokens: usize,
    /// Sampling temperature of the traffic.
    pub temperature: f64,
    /// Nucleus mass of the traffic.
    pub top_p: f64,
    /// Distinct training prompts in the traffic (replayed cyclically).
    pub traffic_prompts: usize,
    /// Task kinds of the traffic's prompts, drawn uniformly (repeat a kind to weight it);
    /// by default [`DEFAULT_TRAFFIC_KINDS`]. Settings saved without it read as the
    /// pretraining's mix ([`DEFAULT_TRAIN_KINDS`]), the traffic of every earlier run.
    #[serde(default = "pretraining_mix")]
    pub traffic_kinds: Vec<TaskKind>,
    /// Augmented renderings of each traffic prompt's audio: replays after the first send
    /// them in turn (0: every replay sends the same audio).
    #[serde(default)]
    pub traffic_augment: usize,
    /// How held-out checks and the base/final evaluations decode (the report also holds the
    /// base and final evaluations under the other decoding).
    pub eval_decoding: EvalDecoding,
    /// Examples per task family of each held-out check.
    pub eval_samples: usize,
    /// Examples per task family of the base and final evaluations.
    pub final_eval_samples: usize,
    /// Seed of the held-out examples.
    pub eval_seed: u64,
    /// Examples per task family of the base model's pass@K (K = `group_size`, the serving
    /// decoding), on the families the traffic asks: the ceiling of what learning from the
    /// model's own samples can reach.
    pub ceiling_samples: usize,
    /// A candidate whose held-out reward is more than this below the last good version's is
    /// a collapse: not promoted, and the trainer rolls back.
    pub collapse_drop: f64,
    /// Continue the run saved in `out`.
    pub resume: bool,
    /// Start afresh even when `out` holds a run (its store and state are removed).
    pub overwrite: bool,
    /// Show progress bars.
    pub progress: bool,
    /// Fault injection (tests): treat the loss of this update (1-based) as NaN.
    pub fault_nan_update: Option<u64>,
}

fn one() -> usize {
    1
}

fn sixteen() -> usize {
    16
}

fn eight() -> usize {
    8
}

fn spec_beta2() -> f64 {
    TrainConfig::default().adam_beta2
}

fn unit_weight() -> f64 {
    1.0
}

fn pretraining_mix() -> Vec<TaskKind> {
    DEFAULT_TRAIN_KINDS.to_vec()
}

/// The default traffic's task kinds, each drawn with the weight of its repeats: recognition,
/// translation, sum and largest twice, count once. The short families only (a long family's
/// prompt costs about three short ones in training and its exact answers stay at 0), weighted
/// where greedy answers trail their pass@8 most: count is nearly always right already (the
/// base answers 87 % of it), while translation and the two spoken-QA questions that need every
/// digit heard gain the most per request (the README measures this mix against the
/// pretraining's short part, recognition three times and the rest once).
pub const DEFAULT_TRAFFIC_KINDS: [TaskKind; 9] = [
    TaskKind::Recognition,
    TaskKind::Recognition,
    TaskKind::Translation,
    TaskKind::Translation,
    TaskKind::Sum,
    TaskKind::Sum,
    TaskKind::Largest,
    TaskKind::Largest,
    TaskKind::Count,
];

/// The default model cache: `$HOME/.cache/leaf/models`, or `out/cache` without a home.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".cache/leaf/models"),
        _ => PathBuf::from("out/cache"),
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model: None,
            cache_dir: default_cache_dir(),
            data_dir: None,
            out: PathBuf::from("out/run"),
            estimator: Estimator::Leaf,
            metric: default_metric(),
            placebo_reward: false,
            rollouts: 80_000,
            seed: 0,
            group_size: 8,
            groups_per_update: 4,
            publish_every: 224,
            learning_rate: 1.5e-3,
            rank: 32,
            alpha: 64.0,
            kl_beta: 0.02,
            adam_beta2: spec_beta2(),
            lora_plus_ratio: 1.0,
            epochs: 1,
            negative_weight: 1.0,
            micro_batch: 8,
            loss_aggregation: LossAggregation::SequenceMean,
            reference_guidance: false,
            supervised_weight: 1.0,
            supervised_per_update: 8,
            fork_fraction: 0.03125,
            clients: 4,
            max_tokens: MAX_ANSWER_TOKENS,
            temperature: 1.0,
            top_p: 1.0,
            traffic_prompts: 65_664,
            traffic_kinds: DEFAULT_TRAFFIC_KINDS.to_vec(),
            traffic_augment: 0,
            eval_decoding: EvalDecoding::Serving,
            eval_samples: 8,
            final_eval_samples: 400,
            eval_seed: 0,
            ceiling_samples: 400,
            collapse_drop: 0.15,
            resume: false,
            overwrite: false,
            progress: true,
            fault_nan_update: None,
        }
    }
}

impl RunConfig {
    /// Reinforcement alone, as `leaf run` learned before the supervised objective (and as
    /// `leaf compare` compares estimators, so that the estimator is all that differs): every
    /// request forked into a group of K, 8,192 rollouts over 512 distinct prompts (each
    /// replayed twice) in the pretraining's task mix (long families included), LoRA rank 8 /
    /// alpha 16, learning rate 2e-3, a check every 8 updates, final evaluations on 100
    /// examples per family and pass@K on 50.
    pub fn reinforcement_only() -> Self {
        RunConfig {
            rollouts: 8192,
            publish_every: 8,
            learning_rate: 2e-3,
            rank: 8,
            alpha: 16.0,
            supervised_weight: 0.0,
            fork_fraction: 1.0,
            traffic_prompts: 512,
            traffic_kinds: pretraining_mix(),
            final_eval_samples: 100,
            ceiling_samples: 50,
            ..RunConfig::default()
        }
    }

    /// Checks every setting; the error names the bad one.
    pub fn validate(&self) -> Result<(), JobError> {
        let bad = |m: &str| Err(JobError::Config(m.to_string()));
        if self.rollouts == 0 {
            return bad("rollouts must be positive");
        }
        if self.group_size < 2 {
            return bad("group_size must be at least 2 (advantages compare samples)");
        }
        if self.groups_per_update == 0 || self.publish_every == 0 {
            return bad("groups_per_update and publish_every must be positive");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate must be positive");
        }
        if self.rank == 0 || !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("rank and alpha must be positive");
        }
        if !(self.kl_beta.is_finite() && self.kl_beta >= 0.0) {
            return bad("kl_beta must be >= 0");
        }
        if !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta2 must be in [0, 1)");
        }
        if !(self.lora_plus_ratio.is_finite() && self.lora_plus_ratio > 0.0) {
            return bad("lora_plus_ratio must be positive");
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if self.micro_batch == 0 {
            return bad("micro_batch must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.negative_weight) {
            return bad("negative_weight must be in [0, 1]");
        }
        if !(self.supervised_weight.is_finite() && self.supervised_weight >= 0.0) {
            return bad("supervised_weight must be finite and >= 0 (0 turns it off)");
        }
        if self.supervised_per_update == 0 {
            return bad("supervised_per_update must be positive");
        }
        if !(0.0..=1.0).contains(&self.fork_fraction) {
            return bad("fork_fraction must be in [0, 1]");
        }
        if self.fork_fraction < 1.0 && self.supervised_weight == 0.0 {
            return bad(
                "fork_fraction below 1 needs the supervised objective (supervised_weight > 0): \
                 requests that are not forked teach nothing else",
            );
        }
        if self.clients == 0 || self.max_tokens == 0 || self.traffic_prompts == 0 {
            return bad("clients, max_tokens and traffic_prompts must be positive");
        }
        if self.traffic_kinds.is_empty() {
            return bad("traffic_kinds must name at least one task kind");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature must be positive");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if self.eval_samples == 0 || self.final_eval_samples == 0 || self.ceiling_samples == 0 {
            return bad("eval_samples, final_eval_samples and ceiling_samples must be positive");
        }
        if !(self.collapse_drop.is_finite() && self.collapse_drop >= 0.0) {
            return bad("collapse_drop must be >= 0");
        }
        if self.resume && self.overwrite {
            return bad("resume and overwrite exclude each other");
        }
        Ok(())
    }

    /// Rollouts per update (B groups of K).
    pub fn rollouts_per_update(&self) -> u64 {
        (self.group_size * self.groups_per_update) as u64
    }

    /// Updates planned for the budget (the length of the learning-rate schedule). With a
    /// fork fraction f below 1, an update of B forked groups also holds about
    /// B (1 - f) / f labelled singles, and an update closes at `supervised_per_update` singles
    /// if those come first.
    pub fn planned_updates(&self) -> u64 {
        let f = self.fork_fraction;
        let per_update = if f >= 1.0 {
            self.rollouts_per_update() as f64
        } else {
            // Requests per update: B / f when forked groups close it, S / (1 - f) when
            // singles do; each forked request costs K rollouts, each single one.
            let b = self.groups_per_update as f64;
            let requests = (b / f.max(1e-9)).min(self.supervised_per_update as f64 / (1.0 - f));
            requests * (f * self.group_size as f64 + (1.0 - f))
        };
        ((self.rollouts as f64 / per_update).ceil() as u64).max(1)
    }

    /// The supervised objective, when on.
    pub fn supervised(&self) -> Option<SupervisedReference> {
        (self.supervised_weight > 0.0).then_some(SupervisedReference {
            weight: self.supervised_weight,
            singles_per_update: self.supervised_per_update,
        })
    }

    fn train_config(&self) -> TrainConfig {
        TrainConfig {
            learning_rate: self.learning_rate,
            kl_beta: self.kl_beta,
            adam_beta2: self.adam_beta2,
            lora_plus_ratio: self.lora_plus_ratio,
            total_steps: self.planned_updates(),
            warmup_fraction: 0.05,
            micro_batch_size: self.micro_batch,
            epochs: self.epochs,
            negative_weight: self.negative_weight,
            loss_aggregation: self.loss_aggregation,
            lora: LoraOptions {
                rank: self.rank,
                alpha: self.alpha,
                dropout: 0.0,
                seed: self.seed,
                ..LoraOptions::default()
            },
            seed: self.seed,
            ..TrainConfig::default()
        }
    }

    fn eval_config(&self, samples: usize) -> EvalConfig {
        self.eval_config_with(samples, self.eval_decoding, None)
    }

    /// The evaluation of `samples` examples per family under `decoding`; with `holdout`, that
    /// speaker is also evaluated on its own (and left out of the in-speaker figures).
    fn eval_config_with(
        &self,
        samples: usize,
        decoding: EvalDecoding,
        holdout: Option<&str>,
    ) -> EvalConfig {
        EvalConfig {
            families: TaskFamily::ALL.to_vec(),
            split: Split::Test,
            samples,
            seed: self.eval_seed,
            decoding: match decoding {
                EvalDecoding::Greedy => Decoding::Greedy,
                EvalDecoding::Serving => Decoding::Sample {
                    temperature: self.temperature,
                    top_p: self.top_p,
                },
            },
            max_new_tokens: self.max_tokens,
            holdout_speaker: holdout.map(str::to_string),
            ..EvalConfig::default()
        }
    }

    /// The task families of the traffic's kinds, in [`TaskFamily::ALL`]'s order.
    pub fn traffic_families(&self) -> Vec<TaskFamily> {
        TaskFamily::ALL
            .into_iter()
            .filter(|f| self.traffic_kinds.iter().any(|k| k.family() == *f))
            .collect()
    }

    /// The decoding the report shows next to the main one.
    fn other_decoding(&self) -> EvalDecoding {
        match self.eval_decoding {
            EvalDecoding::Serving => EvalDecoding::Greedy,
            EvalDecoding::Greedy => EvalDecoding::Serving,
        }
    }
}

fn default_metric() -> Metric {
    Metric::Bleu
}

/// What `state.json` holds: enough to continue a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The estimator.
    pub estimator: Estimator,
    /// The base model directory.
    pub base_model: PathBuf,
    /// Rollouts trained on.
    pub rollouts: u64,
    /// Updates done.
    pub updates: u64,
    /// Held-out checks so far.
    pub curve: Vec<CurvePoint>,
    /// Swaps done by earlier sessions and this one up to the last save.
    pub swaps: u64,
    /// Rollbacks.
    pub rollbacks: u64,
    /// Events.
    pub events: Vec<RunEvent>,
    /// LEAF fork counts.
    pub fork_counts: ForkStats,
    /// Prompts sent by the traffic.
    pub cursor: u64,
    /// The base model's evaluation.
    pub base_eval: EvalReport,
    /// The last good (promoted) version.
    pub good_version: String,
    /// Its held-out reward.
    pub good_reward: f64,
    /// Sessions so far.
    pub sessions: u64,
    /// The diagnostics of every update.
    #[serde(default)]
    pub update_log: Vec<UpdateRecord>,
    /// The learner's wall time per phase.
    #[serde(default)]
    pub phases: PhaseTimes,
    /// Versions served, oldest first (for staleness).
    #[serde(default)]
    pub history: VersionHistory,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> crate::Error + '_ {
    move |source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads `state.json`.
pub fn load_state(path: &Path) -> crate::Result<RunState> {
    let text = std::fs::read_to_string(path).map_err(|e| JobError::Resume {
        path: path.to_path_buf(),
        reason: format!("{e} (is there a run to resume in this directory?)"),
    })?;
    Ok(serde_json::from_str(&text).map_err(|e| JobError::Resume {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?)
}

/// Evaluates the store's `version` loaded the way `leaf eval --adapter` loads it.
fn evaluate_version(
    model_dir: &Path,
    store: &AdapterStore,
    version: &str,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
) -> crate::Result<(EvalReport, Option<PathBuf>)> {
    if version == BASE_VERSION {
        let model = LlamaModel::load(model_dir, &ModelOptions::default())?;
        return Ok((evaluate(&model, encoder, corpus, config)?, None));
    }
    let id = VersionId::parse(version)?;
    let dir = store.path(&id)?;
    let adapter = leaf_adapters::LoraAdapter::load(&dir)?;
    let mut model = LlamaModel::load(
        model_dir,
        &ModelOptions {
            trainable: Trainable::Lora(LoraOptions {
                rank: adapter.config.r,
                alpha: adapter.config.lora_alpha,
                dropout: 0.0,
                target_modules: adapter.config.target_modules.clone(),
                ..LoraOptions::default()
            }),
            ..ModelOptions::default()
        },
    )?;
    model.load_adapter(&adapter)?;
    Ok((evaluate(&model, encoder, corpus, config)?, Some(dir)))
}

/// The learner of a run: the shared [`Learner`] (update, gate, publish, rollback) plus the
/// run's own bookkeeping (state, curve, events, progress).
struct RunLearner<'a> {
    config: &'a RunConfig,
    server: Arc<LeafServer>,
    learner: Learner,
    sink: ServerSink,
    state: RunState,
    swaps_before: u64,
    cursor: Arc<AtomicU64>,
    train_rewards: Vec<f64>,
    started: Instant,
    bar: indicatif::ProgressBar,
    /// Print plain progress lines (progress is on and stderr is not a terminal).
    plain_progress: bool,
    /// 5 % steps already printed.
    printed_steps: u64,
    state_path: PathBuf,
}

impl RunLearner<'_> {
    fn swaps(&self) -> u64 {
        self.swaps_before + self.server.status().swaps
    }

    fn say(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("leaf run: {msg}");
        } else {
            self.bar.println(format!("leaf run: {msg}"));
        }
    }

    fn event(&mut self, kind: &str, message: String) {
        self.say(&message);
        tracing::warn!(kind, "{message}");
        self.state.events.push(RunEvent {
            rollouts: self.state.rollouts,
            kind: kind.into(),
            message,
        });
    }

    fn refresh_bar(&mut self) {
        let last = self.state.curve.last();
        self.bar
            .set_position(self.state.rollouts.min(self.config.rollouts));
        let message = format!(
            "reward {:.3} | held-out {:.3} (base {:.3}) | exact {:.3} | adapter {} | swaps {}",
            mean(self.train_rewards.iter().copied()),
            last.map_or(0.0, |p| p.reward),
            self.state.curve.first().map_or(0.0, |p| p.reward),
            last.map_or(0.0, |p| p.exact_match),
            short(&self.state.good_version),
            self.swaps(),
        );
        // Without a terminal the bar is not drawn: a plain line every 5 % instead.
        if self.plain_progress {
            let step = (self.config.rollouts / 20).max(1);
            let reached = self.state.rollouts.min(self.config.rollouts) / step;
            if reached > self.printed_steps {
                self.printed_steps = reached;
                eprintln!(
                    "leaf run: {:>3} % {}/{} rollouts, {:.0} s | {message}",
                    100 * self.state.rollouts.min(self.config.rollouts) / self.config.rollouts,
                    self.state.rollouts.min(self.config.rollouts),
                    self.config.rollouts,
                    self.started.elapsed().as_secs_f64(),
                );
            }
        }
        self.bar.set_message(message);
    }

    fn run(
        &mut self,
        rx: &Receiver<SealedGroup>,
        traffic_done: &dyn Fn() -> bool,
    ) -> crate::Result<()> {
        let mut held: Vec<SealedGroup> = Vec::new();
        let rule = self.learner.batch_rule(self.config.groups_per_update);
        let mut idle = Instant::now();
        while self.state.rollouts < self.config.rollouts {
            let waited = Instant::now();
            let got = rx.recv_timeout(Duration::from_millis(100));
            self.learner
                .phases_mut()
                .add(Phase::Generation, waited.elapsed().as_secs_f64());
            match got {
                Ok(g) => {
                    held.push(g);
                    idle = Instant::now();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if traffic_done() {
                        return Err(JobError::Failed("the traffic stopped early".into()).into());
                    }
                    if idle.elapsed() > Duration::from_secs(300) {
                        return Err(JobError::Failed(format!(
                            "no group was sealed for 300 s (server status: {:?})",
                            self.server.status()
                        ))
                        .into());
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(JobError::Failed("the sealed-group queue closed".into()).into())
                }
            }
            if rule.ready(held.iter().map(|g| g.members.len())) {
                let batch = std::mem::take(&mut held);
                self.update(&batch)?;
                self.refresh_bar();
            }
        }
        Ok(())
    }

    fn update(&mut self, batch: &[SealedGroup]) -> crate::Result<()> {
        let groups: Vec<SourcedGroup> = batch
            .iter()
            .map(|g| SourcedGroup::from_sealed(g, GroupReceipt::none()))
            .collect();
        let prepared = self.learner.prepare(&groups);
        // The budget counts every harvested rollout, trained on or not.
        self.state.rollouts += prepared.harvested;
        self.train_rewards.extend(&prepared.all_rewards);
        match self
            .learner
            .update(&prepared, self.state.rollouts, &self.sink)?
        {
            // Every group's rewards were equal: no update comes from them.
            UpdateOutcome::Skipped => Ok(()),
            UpdateOutcome::Failed(e) => {
                self.event(
                    "update_failed",
                    format!("update failed ({e}); batch dropped"),
                );
                Ok(())
            }
            UpdateOutcome::RolledBack { record, reason } => {
                let number = record.update;
                self.state.updates = number;
                self.server.note_update();
                self.state.update_log.push(record);
                let loss = match reason {
                    RollbackReason::NanLoss { loss, .. } => loss,
                    _ => f64::NAN,
                };
                let msg = format!(
                    "update {number}: loss is {loss}; promotion stopped, rolled back to the last \
                     good version {}",
                    self.state.good_version
                );
                self.event(reason.kind(), msg);
                self.state.rollbacks += 1;
                self.train_rewards.clear();
                Ok(())
            }
            UpdateOutcome::Applied(record) => {
                self.state.updates = record.update;
                self.server.note_update();
                self.state.update_log.push(record);
                self.state.fork_counts.merge(&prepared.forks);
                if self.learner.check_due() || self.state.rollouts >= self.config.rollouts {
                    self.check()?;
                }
                Ok(())
            }
        }
    }

    /// The held-out check of the candidate, then promotion or rollback; saves the state.
    fn check(&mut self) -> crate::Result<()> {
        self.learner
            .set_note("rollouts", self.state.rollouts.into());
        let (score, promoted) = match self.learner.check(&mut self.sink, true)? {
            CheckOutcome::Published { version, score, .. } => {
                self.state.good_version = version;
                if let Some(s) = &score {
                    self.state.good_reward = s.reward;
                }
                (score, true)
            }
            CheckOutcome::RolledBack { reason, score } => {
                let msg = match &reason {
                    RollbackReason::Regression {
                        reward,
                        good_reward,
                        ..
                    } => format!(
                        "held-out reward collapsed to {reward:.3} (last good {good_reward:.3}); \
                         promotion stopped, rolled back to the last good version {}",
                        self.state.good_version
                    ),
                    other => format!(
                        "the gate refused the candidate ({other:?}); rolled back to the last \
                         good version {}",
                        self.state.good_version
                    ),
                };
                self.event(reason.kind(), msg);
                self.state.rollbacks += 1;
                (score, false)
            }
            CheckOutcome::PublishFailed { error, score } => {
                let msg = format!("publishing failed ({error}); the served version stays");
                self.event("publish_failed", msg);
                (score, false)
            }
        };
        let score = score.unwrap_or_default();
        self.state.curve.push(CurvePoint {
            rollouts: self.state.rollouts,
            reward: score.reward,
            exact_match: score.exact_match,
            adapter_version: self.state.good_version.clone(),
            promoted,
            train_reward: mean(self.train_rewards.iter().copied()),
            tasks: score
                .tasks
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        FamilyPoint {
                            reward: t.reward,
                            exact_match: t.exact_match,
                        },
                    )
                })
                .collect(),
            seconds: self.started.elapsed().as_secs_f64(),
        });
        self.train_rewards.clear();
        self.save()
    }

    fn save(&mut self) -> crate::Result<()> {
        // The optimizer first: a kill between the two files leaves a checkpoint newer than
        // state.json, which resume detects by its version and then restarts Adam.
        self.learner.trainer().save_state(
            &self.state_path.with_file_name(OPTIMIZER_FILE),
            &self.state.good_version,
        )?;
        self.state.cursor = self.cursor.load(Ordering::SeqCst);
        self.state.phases = self.learner.phases().clone();
        self.state.history = self.learner.history().clone();
        let mut s = self.state.clone();
        s.swaps = self.swaps();
        write_json(&self.state_path, &s)
    }
}

/// What the pretraining of the model in `dir` left out (from its `leaf_model.json`): the
/// speaker it never heard, when the recordings hold that speaker, and the training takes it
/// kept for the traffic. Nothing for other models.
fn left_out_of_pretraining(dir: &Path, corpus: &Corpus) -> (Option<String>, u32) {
    match crate::speech::pretrain::PretrainReport::load(dir) {
        Ok(report) => (
            report
                .holdout_speaker
                .filter(|s| corpus.speakers().iter().any(|x| x == s)),
            // A model continued on the traffic's takes has heard them: nothing is left out.
            if report.config.train_on_traffic {
                0
            } else {
                report.config.traffic_takes
            },
        ),
        Err(_) => (None, 0),
    }
}

/// User + system CPU seconds of this process so far (`None` where it cannot be read).
fn process_cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0, so the struct was filled.
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

fn short(v: &str) -> &str {
    v.get(..12).unwrap_or(v)
}

/// Runs `leaf run` with `config`; returns the report (also written to `OUT/report.json`,
/// with the figure `OUT/reward_curve.png`).
pub fn run(config: &RunConfig) -> crate::Result<RunReport> {
    config.validate()?;
    let started = Instant::now();
    let out = config.out.clone();
    let state_path = out.join(STATE_FILE);
    let store_dir = out.join(STORE_DIR);
    let saved = if config.resume {
        Some(load_state(&state_path)?)
    } else {
        if state_path.exists() || store_dir.exists() {
            if !config.overwrite {
                return Err(JobError::OutDir {
                    path: out.clone(),
                    reason: "holds an earlier run; pass --resume to continue it, --overwrite to \
                             start afresh, or another --out"
                        .into(),
                }
                .into());
            }
            if store_dir.exists() {
                std::fs::remove_dir_all(&store_dir).map_err(io_err(&store_dir))?;
            }
            for f in [
                STATE_FILE,
                REPORT_FILE,
                CURVE_FILE,
                DIAGNOSTICS_FILE,
                OPTIMIZER_FILE,
            ] {
                let p = out.join(f);
                if p.exists() {
                    std::fs::remove_file(&p).map_err(io_err(&p))?;
                }
            }
        }
        None
    };
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    if let Some(s) = &saved {
        if s.estimator != config.estimator {
            return Err(JobError::Resume {
                path: state_path.clone(),
                reason: format!(
                    "the run used --estimator {}, not {}",
                    s.estimator.name(),
                    config.estimator.name()
                ),
            }
            .into());
        }
    }

    // 1. The model and the data.
    let data_dir = match &config.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    let model_dir = match (&config.model, &saved) {
        (Some(m), _) => m.clone(),
        (None, Some(s)) => s.base_model.clone(),
        (None, None) => {
            if config.progress {
                eprintln!(
                    "leaf run: base model: {} (trained on first use)",
                    config
                        .cache_dir
                        .join(crate::speech::pretrain::DEFAULT_MODEL_NAME)
                        .display()
                );
            }
            ensure_default_model(&config.cache_dir, &data_dir, config.progress)?
        }
    };
    if let Some(s) = &saved {
        if s.base_model != model_dir {
            return Err(JobError::Resume {
                path: state_path.clone(),
                reason: format!(
                    "the run's base model is {}, not {}",
                    s.base_model.display(),
                    model_dir.display()
                ),
            }
            .into());
        }
    }
    let prepare_seconds = started.elapsed().as_secs_f64();
    let mut corpus = Corpus::open(&data_dir)?;
    corpus.preload()?;
    let encoder = load_encoder(&model_dir)?;
    // The speaker the base model never heard in pretraining hears nothing in the traffic
    // either; the base and final evaluations report it on its own. A model that kept training
    // takes out of pretraining for the traffic gets exactly those: audio it never trained on.
    let (holdout, traffic_takes) = left_out_of_pretraining(&model_dir, &corpus);
    let heard = corpus.filter(|c| Some(c.speaker.as_str()) != holdout.as_deref());
    let traffic_corpus =
        heard.filter(|c| traffic_takes == 0 || is_traffic_take(c.take, traffic_takes));
    let note = |msg: &str| {
        if config.progress {
            eprintln!("leaf run: {msg}");
        }
    };
    let prepared_at = Instant::now();
    // The traffic asks what the model was trained to answer, by default in the same mix.
    let items = Arc::new(traffic::prepare(
        &model_dir,
        &traffic_corpus,
        &config.traffic_kinds,
        config.traffic_prompts,
        config.seed,
        config.traffic_augment,
    )?);
    note(&format!(
        "traffic: {} distinct prompts from {} recordings, encoded in {:.1} s",
        items.len(),
        traffic_corpus.len(),
        prepared_at.elapsed().as_secs_f64()
    ));

    // 2. The base model's evaluation.
    let final_cfg = config.eval_config_with(
        config.final_eval_samples,
        config.eval_decoding,
        holdout.as_deref(),
    );
    // The base model's evaluations are cached per model and settings (they do not change
    // between runs); the key names the recordings too.
    let cache = EvalCache::new(config.cache_dir.join("evals"));
    let base_model = std::cell::OnceCell::new();
    let evaluate_base = |cfg: &EvalConfig, corpus: &Corpus| {
        let settings = (cfg, &data_dir, corpus.len());
        cache.get_or_compute(&model_dir, "eval", &settings, || {
            let model = match base_model.get() {
                Some(m) => m,
                None => {
                    let m = LlamaModel::load(&model_dir, &ModelOptions::default())?;
                    base_model.get_or_init(|| m)
                }
            };
            evaluate(model, &encoder, corpus, cfg)
        })
    };
    let (base_eval, base_point) = match &saved {
        Some(s) => (s.base_eval.clone(), None),
        None => {
            note("evaluating the base model (cached per model and settings)");
            let base_eval = evaluate_base(&final_cfg, &corpus)?;
            let check = if config.eval_samples == config.final_eval_samples {
                base_eval.clone()
            } else {
                evaluate_base(&config.eval_config(config.eval_samples), &heard)?
            };
            (base_eval, Some(check))
        }
    };

    // 3. The server.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("leaf-run")
        .build()
        .map_err(|e| JobError::Failed(format!("cannot start the async runtime: {e}")))?;
    let supervised = config.supervised();
    let mut server_cfg = ServerConfig::new(&model_dir);
    server_cfg.store_dir = Some(store_dir.clone());
    server_cfg.assembler = AssemblerConfig {
        group_size: config.group_size,
        min_group_size: 2,
        seal_timeout_s: 60.0,
        reference_ids: config.reference_guidance || supervised.is_some(),
        ..AssemblerConfig::default()
    };
    server_cfg.group_policy = GroupPolicy {
        fork_fraction: config.fork_fraction,
        background_concurrency: config.group_size,
        max_foreground_inflight: config.clients * 2,
        seed: config.seed,
        labelled_singles: supervised.is_some(),
    };
    let mut reference_reward = ReferenceReward::new(config.metric, RewardOptions::default());
    if config.placebo_reward {
        reference_reward = reference_reward.placebo(config.seed);
    }
    let reward = Arc::new(TimedReward::new(reference_reward));
    let (server, rx) = runtime.block_on(LeafServer::start(server_cfg, reward.clone()))?;
    let current = server.current_version();
    let store = server.store().ok_or(crate::serving::ServeError::NoStore)?;
    // The learner's gate: the held-out test takes of the heard speakers, decoded as
    // configured; a drop of more than collapse_drop below the last good version rolls back.
    let sink = ServerSink::new(server.clone(), runtime.handle().clone());
    let check = RecordingsCheck::new(
        encoder.clone(),
        heard.clone(),
        config.eval_config(config.eval_samples),
        "held-out test takes".into(),
    );
    let mut learner_cfg = LearnerConfig::new(
        config.estimator.config(),
        config.train_config(),
        config.publish_every,
    );
    learner_cfg.base_name = "leaf-digits-base".into();
    learner_cfg.fault_nan_update = config.fault_nan_update;
    learner_cfg.reference_guidance = config.reference_guidance.then(ReferenceGuidance::default);
    learner_cfg.supervised = supervised.clone();
    let mut learner = Learner::new(
        &model_dir,
        learner_cfg,
        PromotionGate::new(Box::new(check), config.collapse_drop, None),
        &sink,
        &current,
    )?;

    let mut state = match saved {
        Some(mut s) => {
            s.sessions += 1;
            s.good_version = current.clone();
            s
        }
        None => RunState {
            estimator: config.estimator,
            base_model: model_dir.clone(),
            rollouts: 0,
            updates: 0,
            curve: Vec::new(),
            swaps: 0,
            rollbacks: 0,
            events: Vec::new(),
            fork_counts: ForkStats::default(),
            cursor: 0,
            base_eval: base_eval.clone(),
            good_version: current.clone(),
            good_reward: 0.0,
            sessions: 1,
            update_log: Vec::new(),
            phases: PhaseTimes::default(),
            history: VersionHistory::starting_at(current.clone()),
        },
    };
    if let Some(check) = &base_point {
        state.good_reward = heldout_reward(check);
        state.curve.push(CurvePoint {
            rollouts: 0,
            reward: heldout_reward(check),
            exact_match: heldout_exact(check),
            adapter_version: BASE_VERSION.into(),
            promoted: false,
            train_reward: 0.0,
            tasks: CurvePoint::families(check),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    learner.gate_mut().set_good_reward(Some(state.good_reward));
    learner.set_updates(state.updates);
    learner.set_history(state.history.clone());
    *learner.phases_mut() = state.phases.clone();
    let optimizer_path = out.join(OPTIMIZER_FILE);
    if config.resume {
        let restored = learner.trainer_mut().load_state(&optimizer_path, &current);
        let (kind, message) = match restored {
            Ok(()) => (
                "optimizer_restored",
                format!(
                    "optimizer state restored (Adam moments, schedule at step {})",
                    learner.trainer().steps()
                ),
            ),
            Err(e) => (
                "optimizer_restarted",
                format!("optimizer state not restored ({e}); Adam and the schedule restart"),
            ),
        };
        eprintln!("leaf run: {message}");
        state.events.push(RunEvent {
            rollouts: state.rollouts,
            kind: kind.into(),
            message,
        });
    }
    let swaps_before = state.swaps;
    let rollouts_before = state.rollouts;

    // 4. Traffic and the learner.
    let bar = if config.progress {
        let b = indicatif::ProgressBar::new(config.rollouts);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} rollouts  {msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let cursor = Arc::new(AtomicU64::new(state.cursor));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic_cfg = TrafficConfig {
        clients: config.clients,
        max_tokens: config.max_tokens,
        temperature: config.temperature,
        top_p: config.top_p,
        // Labelled singles seal at once: room for a supervised batch of them too.
        max_pending_groups: 2 * config.groups_per_update
            + supervised.as_ref().map_or(0, |s| s.singles_per_update),
        seed: config.seed,
    };
    let traffic = runtime.spawn(traffic::replay(
        server.clone(),
        items,
        traffic_cfg.clone(),
        cursor.clone(),
        stop.clone(),
    ));
    let mut learner = RunLearner {
        config,
        server: server.clone(),
        learner,
        sink,
        state,
        swaps_before,
        cursor: cursor.clone(),
        train_rewards: Vec::new(),
        started,
        bar,
        plain_progress: config.progress && !std::io::stderr().is_terminal(),
        printed_steps: 0,
        state_path: state_path.clone(),
    };
    learner.refresh_bar();
    let rl_started = Instant::now();
    let cpu_before = process_cpu_seconds();
    let learned = learner.run(&rx, &|| traffic.is_finished());
    let rl_seconds = rl_started.elapsed().as_secs_f64();
    let cpu_cores_busy = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) if rl_seconds > 0.0 => Some((b - a) / rl_seconds),
        _ => None,
    };
    stop.store(true, Ordering::SeqCst);
    let traffic_stats = runtime
        .block_on(traffic)
        .map_err(|e| JobError::Failed(format!("the traffic task failed: {e}")))??;
    runtime.block_on(server.shutdown(Duration::from_secs(60)));
    learned?;
    learner.save()?;
    learner.bar.finish();
    let status = server.status();
    let swaps = learner.swaps();
    let state = learner.state.clone();
    drop(learner);

    // 5. The final evaluation and the report.
    let final_version = store
        .current()?
        .map(|v| v.to_string())
        .unwrap_or_else(|| BASE_VERSION.to_string());
    // The final adapter (the base model when none was promoted) under a decoding.
    let final_under = |cfg: &EvalConfig, base: &EvalReport| {
        if final_version == BASE_VERSION {
            Ok((base.clone(), None))
        } else {
            evaluate_version(&model_dir, store, &final_version, &encoder, &corpus, cfg)
        }
    };
    note("final evaluation of the served adapter");
    let (final_eval, final_adapter) = final_under(&final_cfg, &base_eval)?;
    // The same comparison under the other decoding.
    let other_cfg = config.eval_config_with(
        config.final_eval_samples,
        config.other_decoding(),
        holdout.as_deref(),
    );
    let other_base = evaluate_base(&other_cfg, &corpus)?;
    let (other_final, _) = final_under(&other_cfg, &other_base)?;
    let mut settings = serde_json::to_value(config)
        .map_err(|e| JobError::Failed(format!("cannot serialise the settings: {e}")))?;
    if let Some(obj) = settings.as_object_mut() {
        obj.insert("model".into(), serde_json::json!(model_dir));
        obj.insert("data_dir".into(), serde_json::json!(data_dir));
        obj.insert(
            "reward".into(),
            if config.placebo_reward {
                "placebo (seeded uniform numbers, no link to the answers)".into()
            } else {
                config.metric.name().into()
            },
        );
        obj.insert("traffic".into(), serde_json::json!(traffic_cfg));
        obj.insert(
            "train".into(),
            serde_json::to_value(config.train_config()).unwrap_or_default(),
        );
        obj.insert(
            "estimator_config".into(),
            serde_json::to_value(config.estimator.config()).unwrap_or_default(),
        );
    }
    let decoding_flags = match config.eval_decoding {
        EvalDecoding::Greedy => String::new(),
        EvalDecoding::Serving => format!(
            " --sample --temperature {} --top-p {}",
            config.temperature, config.top_p
        ),
    };
    let adapter_flag = final_adapter
        .as_ref()
        .map(|a| format!(" --adapter {}", a.display()))
        .unwrap_or_default();
    let reproduce = format!(
        "leaf eval --model {}{adapter_flag} --samples {} --seed {}{decoding_flags}",
        model_dir.display(),
        config.final_eval_samples,
        config.eval_seed
    );
    // The ceiling: the base model's pass@K under the serving decoding, against greedy.
    note("the base model's pass@K (cached per model and settings)");
    // Only the families the traffic asks: the ceiling is what learning from this traffic can
    // reach (a family keeps its examples whatever else is evaluated: `family_examples`).
    let ceiling_cfg = EvalConfig {
        families: config.traffic_families(),
        ..config.eval_config_with(config.ceiling_samples, EvalDecoding::Serving, None)
    };
    let k = config.group_size;
    let pass = cache.get_or_compute(
        &model_dir,
        "pass_at_k",
        &(&ceiling_cfg, k, &data_dir, heard.len()),
        || {
            let model = LlamaModel::load(&model_dir, &ModelOptions::default())?;
            pass_at_k(&model, &encoder, &heard, &ceiling_cfg, k)
        },
    )?;
    let (greedy_base, greedy_final) = match config.eval_decoding {
        EvalDecoding::Greedy => (&base_eval, &final_eval),
        EvalDecoding::Serving => (&other_base, &other_final),
    };
    let ceiling = Ceiling::new(k, &pass, greedy_base, greedy_final);
    let mut phases = state.phases.clone();
    phases.add(Phase::Rewards, reward.seconds());
    let diagnostics = Diagnostics {
        summary: UpdateSummary::of(&state.update_log),
        phases,
        rl_seconds,
        rollouts_per_second: if rl_seconds > 0.0 {
            (state.rollouts - rollouts_before) as f64 / rl_seconds
        } else {
            0.0
        },
        cpu_cores_busy,
        updates: state.update_log.clone(),
    };
    let report = RunReport {
        estimator: config.estimator.name().into(),
        rollouts: state.rollouts,
        rollout_budget: config.rollouts,
        updates: state.updates,
        base_reward: heldout_reward(&base_eval),
        final_reward: heldout_reward(&final_eval),
        base_exact_match: heldout_exact(&base_eval),
        final_exact_match: heldout_exact(&final_eval),
        eval_decoding: config.eval_decoding,
        base_eval,
        final_eval,
        other_decoding: OtherDecoding {
            decoding: config.other_decoding(),
            base_reward: heldout_reward(&other_base),
            final_reward: heldout_reward(&other_final),
            base_exact_match: heldout_exact(&other_base),
            final_exact_match: heldout_exact(&other_final),
            base_eval: other_base,
            final_eval: other_final,
        },
        curve: state.curve.clone(),
        swaps,
        rollbacks: state.rollbacks,
        events: state.events.clone(),
        fork_stats: ForkSummary::from_counts(state.fork_counts),
        group_policy: GroupPolicyStats {
            candidates: status.fork_candidates,
            fired: status.forks_fired,
            usable: status.forks_usable,
            failed: status.forks_failed,
            groups_sealed: status.groups_sealed,
            groups_dropped: status.groups_dropped,
        },
        base_model: model_dir.clone(),
        final_adapter,
        final_version,
        store: store_dir,
        requests: traffic_stats.requests,
        requests_failed: traffic_stats.failed,
        wall_seconds: started.elapsed().as_secs_f64(),
        prepare_seconds,
        sessions: state.sessions,
        settings,
        reproduce,
        ceiling,
        diagnostics,
    };
    report.write(&out.join(REPORT_FILE))?;
    let curve_path = out.join(CURVE_FILE);
    super::plot::reward_curve(&curve_path, &report)?;
    if !report.diagnostics.updates.is_empty() {
        super::plot::diagnostics(&out.join(DIAGNOSTICS_FILE), &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_traffic_is_short_weighted_and_needs_a_kind() {
        let defaults = RunConfig::default();
        assert_eq!(defaults.traffic_kinds, DEFAULT_TRAFFIC_KINDS.to_vec());
        // Only the short families, each of them, and only kinds the pretraining taught.
        let share = |family: TaskFamily| {
            let n = DEFAULT_TRAFFIC_KINDS
                .iter()
                .filter(|k| k.family() == family)
                .count();
            n as f64 / DEFAULT_TRAFFIC_KINDS.len() as f64
        };
        assert!(DEFAULT_TRAFFIC_KINDS.iter().all(|k| !k.family().is_long()));
        assert!(DEFAULT_TRAFFIC_KINDS
            .iter()
            .all(|k| DEFAULT_TRAIN_KINDS.contains(k)));
        for family in [TaskFamily::Asr, TaskFamily::Ast, TaskFamily::Sqa] {
            assert!(share(family) > 0.0, "{family:?}");
        }
        assert!((share(TaskFamily::Sqa) - 5.0 / 9.0).abs() < 1e-12);
        assert!(defaults.validate().is_ok());
        // Every forked or single request of the default budget gets its own prompt.
        let requests = defaults.rollouts as f64
            / (defaults.fork_fraction * defaults.group_size as f64 + 1.0 - defaults.fork_fraction);
        assert!(requests <= defaults.traffic_prompts as f64, "{requests}");
        // Reinforcement alone (leaf compare) keeps the long families.
        assert_eq!(
            RunConfig::reinforcement_only().traffic_kinds,
            DEFAULT_TRAIN_KINDS.to_vec()
        );
        // Settings written before the field existed read as the mix every earlier run had.
        let mut json = serde_json::to_value(&defaults).unwrap();
        json.as_object_mut().unwrap().remove("traffic_kinds");
        let read: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(read.traffic_kinds, DEFAULT_TRAIN_KINDS.to_vec());
        let none = RunConfig {
            traffic_kinds: Vec::new(),
            ..RunConfig::default()
        };
        let err = none.validate().unwrap_err().to_string();
        assert!(err.contains("traffic_kinds"), "{err}");
    }

    #[test]
    fn lora_plus_reaches_the_trainer_and_is_validated() {
        let plus = RunConfig {
            lora_plus_ratio: 4.0,
            ..RunConfig::default()
        };
        assert_eq!(plus.train_config().lora_plus_ratio, 4.0);
        for bad in [0.0, -2.0, f64::NAN] {
            let cfg = RunConfig {
                lora_plus_ratio: bad,
                ..RunConfig::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("lora_plus_ratio"), "{err}");
        }
        // Settings written before the field existed read as plain LoRA.
        let mut json = serde_json::to_value(&plus).unwrap();
        json.as_object_mut().unwrap().remove("lora_plus_ratio");
        let read: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(read.lora_plus_ratio, 1.0);
    }
}
