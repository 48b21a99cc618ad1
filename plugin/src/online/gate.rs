//! The promotion gate: which candidate adapters may be served.
//!
//! Every `publish_every` updates the learner asks its [`PromotionGate`] about the candidate:
//!
//! * a non-finite loss (checked at every update) or a non-finite held-out reward rolls the
//!   trainer back to the last good version;
//! * with a [`HeldOutCheck`], the candidate's held-out reward is measured; one more than
//!   [`GateConfig::max_drop`] below the last good version's is a **regression**: not promoted,
//!   and the trainer rolls back;
//! * without a check, the candidate is promoted **unchecked** (counted in
//!   `leaf_promotions_unchecked_total`; `leaf serve --online` warns about it at start).
//!
//! Held-out checks: [`PromptsCheck`] (a JSON-lines file of prompt ids with reference answers,
//! scored with a [`Metric`]) here, and a workload's own check of a directory, registered with
//! [`set_directory_check`] (the spoken-digit recordings check of the `speech` feature, what
//! `leaf run` uses, is `job::held_out::RecordingsCheck`). [`open_gate_data`] picks one from a
//! path.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use leaf_adapters::model::LlamaModel;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::OnlineError;
use crate::reward::{Metric, RewardOptions};
use crate::trainer::generate::{generate_completions, Decoding};

/// Reward and exact match of one task family (or one slice of the held-out set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    /// Mean reward.
    pub reward: f64,
    /// Exact-match rate.
    pub exact_match: f64,
}

/// What a held-out check measured on a candidate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScore {
    /// The reward the gate compares (higher is better): the mean over `tasks`.
    pub reward: f64,
    /// Mean exact-match rate over `tasks`.
    pub exact_match: f64,
    /// Per task family (or slice).
    pub tasks: BTreeMap<String, TaskScore>,
    /// Examples scored.
    pub examples: usize,
    /// Seconds the check took.
    pub seconds: f64,
}

/// A held-out evaluation of a candidate model.
pub trait HeldOutCheck: Send {
    /// Scores `model` (the trainer's model, LoRA on).
    fn evaluate(&mut self, model: &LlamaModel) -> crate::Result<HeldOutScore>;
    /// What is checked, for logs and the status (`recordings DIR (48 examples)`).
    fn describe(&self) -> String;
}

/// Default of [`GateConfig::max_new_tokens`]: the spoken-digit tasks' answer cap (their
/// longest reference and its stop token fit).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;

/// Settings of the gate (the `gate` object of the online config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GateConfig {
    /// A candidate whose held-out reward is more than this below the last good version's is
    /// a regression: not promoted, and the trainer rolls back. Default 0.15.
    pub max_drop: f64,
    /// Held-out examples per task family (recordings) or prompts (a JSON-lines file) per
    /// check. Default 8.
    pub samples: usize,
    /// Most new tokens per held-out answer. Default [`DEFAULT_MAX_NEW_TOKENS`].
    pub max_new_tokens: usize,
    /// Seed of the held-out examples. Default 0.
    pub seed: u64,
    /// Metric of a prompts file's references. Default BLEU.
    pub metric: Metric,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            max_drop: 0.15,
            samples: 8,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            seed: 0,
            metric: Metric::Bleu,
        }
    }
}

impl GateConfig {
    /// Checks every field; the error names the bad one.
    pub fn check(&self) -> Result<(), OnlineError> {
        if !(self.max_drop.is_finite() && self.max_drop >= 0.0) {
            return Err(OnlineError::Config(format!(
                "gate.max_drop {} must be finite and >= 0",
                self.max_drop
            )));
        }
        if self.samples == 0 || self.max_new_tokens == 0 {
            return Err(OnlineError::Config(
                "gate.samples and gate.max_new_tokens must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Why a candidate was not promoted.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RollbackReason {
    /// An update's loss was NaN or infinite.
    NanLoss {
        /// The update (1-based).
        update: u64,
        /// The loss.
        loss: f64,
    },
    /// The held-out reward was NaN or infinite.
    NanReward,
    /// The held-out reward fell more than `max_drop` below the last good version's.
    Regression {
        /// The candidate's held-out reward.
        reward: f64,
        /// The last good version's.
        good_reward: f64,
        /// The allowed drop.
        max_drop: f64,
    },
}

impl RollbackReason {
    /// `"nan_loss"`, `"nan_reward"` or `"reward_collapse"` (the event kinds of `leaf run`).
    pub fn kind(&self) -> &'static str {
        match self {
            RollbackReason::NanLoss { .. } => "nan_loss",
            RollbackReason::NanReward => "nan_reward",
            RollbackReason::Regression { .. } => "reward_collapse",
        }
    }
}

/// What the gate decided about a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish and promote. `score` is `None` when the gate has no held-out check.
    Promote {
        /// The held-out score, when measured.
        score: Option<HeldOutScore>,
    },
    /// Do not promote; roll the trainer back to the last good version.
    RollBack {
        /// Why.
        reason: RollbackReason,
        /// The held-out score, when measured.
        score: Option<HeldOutScore>,
    },
}

/// The held-out check, the NaN rule and the regression rule (see the module docs).
pub struct PromotionGate {
    check: Option<Box<dyn HeldOutCheck>>,
    max_drop: f64,
    good_reward: Option<f64>,
}

impl std::fmt::Debug for PromotionGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromotionGate")
            .field("check", &self.check.as_ref().map(|c| c.describe()))
            .field("max_drop", &self.max_drop)
            .field("good_reward", &self.good_reward)
            .finish()
    }
}

impl PromotionGate {
    /// A gate with a held-out check. `good_reward` is the last good version's held-out
    /// reward, when known (else the first check sets it).
    pub fn new(check: Box<dyn HeldOutCheck>, max_drop: f64, good_reward: Option<f64>) -> Self {
        PromotionGate {
            check: Some(check),
            max_drop,
            good_reward,
        }
    }

    /// A gate without a held-out check: only a non-finite loss stops a candidate.
    pub fn unchecked() -> Self {
        PromotionGate {
            check: None,
            max_drop: 0.0,
            good_reward: None,
        }
    }

    /// Whether candidates are measured before promotion.
    pub fn is_checked(&self) -> bool {
        self.check.is_some()
    }

    /// What the check measures, or `None`.
    pub fn describe(&self) -> Option<String> {
        self.check.as_ref().map(|c| c.describe())
    }

    /// The last good version's held-out reward.
    pub fn good_reward(&self) -> Option<f64> {
        self.good_reward
    }

    /// Sets the last good version's held-out reward (a measured base model, a resume).
    pub fn set_good_reward(&mut self, reward: Option<f64>) {
        self.good_reward = reward;
    }

    /// Measures `model` (when the gate has a check) without judging it.
    pub fn measure(&mut self, model: &LlamaModel) -> crate::Result<Option<HeldOutScore>> {
        match self.check.as_mut() {
            Some(c) => c.evaluate(model).map(Some),
            None => Ok(None),
        }
    }

    /// The verdict on an update's loss: `Some(reason)` when it must be rolled back.
    pub fn judge_loss(&self, update: u64, loss: f64) -> Option<RollbackReason> {
        (!loss.is_finite()).then_some(RollbackReason::NanLoss { update, loss })
    }

    /// Measures and judges a candidate. A promoted candidate's reward becomes the good one
    /// once [`PromotionGate::accept`] is called (after the promotion succeeded).
    pub fn judge(&mut self, model: &LlamaModel) -> crate::Result<Verdict> {
        let Some(score) = self.measure(model)? else {
            metrics::counter!("leaf_promotions_unchecked_total").increment(1);
            return Ok(Verdict::Promote { score: None });
        };
        metrics::gauge!("leaf_gate_heldout_reward").set(score.reward);
        if !score.reward.is_finite() {
            return Ok(Verdict::RollBack {
                reason: RollbackReason::NanReward,
                score: Some(score),
            });
        }
        if let Some(good) = self.good_reward {
            if score.reward < good - self.max_drop {
                return Ok(Verdict::RollBack {
                    reason: RollbackReason::Regression {
                        reward: score.reward,
                        good_reward: good,
                        max_drop: self.max_drop,
                    },
                    score: Some(score),
                });
            }
        }
        Ok(Verdict::Promote { score: Some(score) })
    }

    /// Records that a candidate with this score was promoted.
    pub fn accept(&mut self, score: Option<&HeldOutScore>) {
        if let Some(s) = score {
            self.good_reward = Some(s.reward);
        }
    }
}

/// One held-out prompt of a [`PromptsCheck`] file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt_ids: Vec<u32>,
    reference: String,
    #[serde(default)]
    task: Option<String>,
}

/// Held-out prompts with reference answers (one JSON object per line:
/// `{"prompt_ids": [...], "reference": "...", "task": "optional slice name"}`): the candidate
/// answers each greedily, and its answer (decoded with the model's `tokenizer.json`, stop
/// token removed) is scored against the reference with the configured [`Metric`].
pub struct PromptsCheck {
    prompts: Vec<PromptLine>,
    tokenizer: tokenizers::Tokenizer,
    stop: Vec<u32>,
    metric: Metric,
    max_new_tokens: usize,
    path: PathBuf,
}

/// Tokens that end an answer when the tokenizer has them.
const STOP_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "</s>",
    "<|end|>",
];

impl PromptsCheck {
    /// Reads the prompts file (at most `samples` prompts, from the top) and the model's
    /// tokenizer. A malformed line is an error naming its line and field.
    pub fn open(path: &Path, model_dir: &Path, config: &GateConfig) -> crate::Result<Self> {
        let file = std::fs::File::open(path).map_err(OnlineError::io(path))?;
        let mut prompts = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line_no = i as u64 + 1;
            let bad = |field: &str, reason: String| OnlineError::GateLine {
                path: path.to_path_buf(),
                line: line_no,
                field: field.into(),
                reason,
            };
            let text = line.map_err(|e| bad("(line)", e.to_string()))?;
            if text.trim().is_empty() {
                continue;
            }
            let de = &mut serde_json::Deserializer::from_str(&text);
            let p: PromptLine = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
                let field = e.path().to_string();
                let field = if field == "." { "(line)".into() } else { field };
                bad(&field, e.into_inner().to_string())
            })?;
            de.end().map_err(|e| bad("(line)", e.to_string()))?;
            if p.prompt_ids.is_empty() {
                return Err(bad("prompt_ids", "is empty".into()).into());
            }
            prompts.push(p);
            if prompts.len() >= config.samples {
                break;
            }
        }
        if prompts.is_empty() {
            return Err(OnlineError::Gate(format!("{} holds no prompts", path.display())).into());
        }
        let tok_path = model_dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| OnlineError::Gate(format!("cannot load {}: {e}", tok_path.display())))?;
        let stop: Vec<u32> = STOP_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        Ok(PromptsCheck {
            prompts,
            tokenizer,
            stop,
            metric: config.metric,
            max_new_tokens: config.max_new_tokens,
            path: path.to_path_buf(),
        })
    }
}

impl HeldOutCheck for PromptsCheck {
    fn evaluate(&mut self, model: &LlamaModel) -> crate::Result<HeldOutScore> {
        let started = std::time::Instant::now();
        let vocab = model.config().vocab_size;
        if let Some((i, t)) = self.prompts.iter().enumerate().find_map(|(i, p)| {
            p.prompt_ids
                .iter()
                .find(|&&t| t as usize >= vocab)
                .map(|t| (i, *t))
        }) {
            return Err(OnlineError::Gate(format!(
                "{}: prompt {} has token id {t}, outside the vocabulary of {vocab}",
                self.path.display(),
                i + 1
            ))
            .into());
        }
        let prompts: Vec<Vec<u32>> = self.prompts.iter().map(|p| p.prompt_ids.clone()).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let answers = generate_completions(
            model,
            &prompts,
            &self.stop,
            &Decoding::Greedy,
            self.max_new_tokens,
            8,
            &mut rng,
        )?;
        let scorer = self.metric.reward(RewardOptions::default());
        let mut per_task: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
        for (p, ids) in self.prompts.iter().zip(&answers) {
            let ids: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|t| !self.stop.contains(t))
                .collect();
            let text = self
                .tokenizer
                .decode(&ids, true)
                .map_err(|e| OnlineError::Gate(format!("cannot decode an answer: {e}")))?;
            let reward = scorer.score(text.trim(), &p.reference);
            let exact = f64::from(u8::from(text.trim() == p.reference.trim()));
            let e = per_task
                .entry(p.task.clone().unwrap_or_else(|| "all".into()))
                .or_default();
            e.0 += reward;
            e.1 += exact;
            e.2 += 1;
        }
        let tasks: BTreeMap<String, TaskScore> = per_task
            .into_iter()
            .map(|(k, (r, x, n))| {
                let n = n.max(1) as f64;
                (
                    k,
                    TaskScore {
                        reward: r / n,
                        exact_match: x / n,
                    },
                )
            })
            .collect();
        let n = tasks.len().max(1) as f64;
        Ok(HeldOutScore {
            reward: tasks.values().map(|t| t.reward).sum::<f64>() / n,
            exact_match: tasks.values().map(|t| t.exact_match).sum::<f64>() / n,
            tasks,
            examples: self.prompts.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "prompts {} ({} prompts, {:?})",
            self.path.display(),
            self.prompts.len(),
            self.metric
        )
    }
}

/// Opens a directory of held-out data for the model in `model_dir` (`--gate-data DIR`).
pub type DirectoryCheckOpener =
    fn(dir: &Path, model_dir: &Path, config: &GateConfig) -> crate::Result<Box<dyn HeldOutCheck>>;

static DIRECTORY_CHECK: OnceLock<DirectoryCheckOpener> = OnceLock::new();

/// Registers what a directory given as `--gate-data` (or `gate_data`) is: a workload's own
/// held-out data. Once per process: false (and nothing changed) when one is already set.
/// `leaf` registers the spoken-digit recordings check (`job::held_out::open_recordings`,
/// feature `speech`); without one, a directory is refused and only prompts files work.
pub fn set_directory_check(open: DirectoryCheckOpener) -> bool {
    DIRECTORY_CHECK.set(open).is_ok()
}

/// Opens `--gate-data PATH` for the model in `model_dir`: a file is a [`PromptsCheck`]
/// JSON-lines file, a directory goes to the opener registered with [`set_directory_check`]
/// (in `leaf`: recordings for the spoken-digit check; the model directory must then hold the
/// unit codebook and speech tokenizer).
pub fn open_gate_data(
    path: &Path,
    model_dir: &Path,
    config: &GateConfig,
) -> crate::Result<Box<dyn HeldOutCheck>> {
    config.check()?;
    let meta = std::fs::metadata(path).map_err(OnlineError::io(path))?;
    if meta.is_file() {
        return Ok(Box::new(PromptsCheck::open(path, model_dir, config)?));
    }
    match DIRECTORY_CHECK.get() {
        Some(open) => open(path, model_dir, config),
        None => Err(OnlineError::Gate(format!(
            "{} is a directory, and this program knows no held-out check of a directory \
             (leaf's spoken-digit recordings check needs the `speech` feature); give a \
             JSON-lines file of prompts with references",
            path.display()
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<f64>);

    impl HeldOutCheck for Fixed {
        fn evaluate(&mut self, _model: &LlamaModel) -> crate::Result<HeldOutScore> {
            Ok(HeldOutScore {
                reward: self.0.remove(0),
                ..HeldOutScore::default()
            })
        }
        fn describe(&self) -> String {
            "fixed".into()
        }
    }

    #[test]
    fn nan_loss_rolls_back_and_finite_does_not() {
        let g = PromotionGate::unchecked();
        assert!(g.judge_loss(1, 0.5).is_none());
        assert_eq!(g.judge_loss(2, f64::NAN).unwrap().kind(), "nan_loss");
        assert_eq!(g.judge_loss(3, f64::INFINITY).unwrap().kind(), "nan_loss");
    }

    #[test]
    fn gate_config_names_its_bad_field() {
        let c = GateConfig {
            max_drop: -1.0,
            ..GateConfig::default()
        };
        assert!(c.check().unwrap_err().to_string().contains("max_drop"));
        let c: Result<GateConfig, _> = serde_json::from_str(r#"{"max_dorp": 1}"#);
        assert!(c.unwrap_err().to_string().contains("max_dorp"));
    }

    #[test]
    fn a_directory_needs_a_registered_directory_check() {
        // No lib test registers one (the `leaf` binary does).
        let dir = tempfile::tempdir().unwrap();
        let e = open_gate_data(dir.path(), dir.path(), &GateConfig::default())
            .err()
            .expect("a directory without a directory check")
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        assert!(e.contains("JSON-lines file"), "{e}");
    }

    #[test]
    fn a_fixed_check_is_described() {
        let g = PromotionGate::new(Box::new(Fixed(vec![0.5])), 0.1, None);
        assert!(g.is_checked());
        assert_eq!(g.describe().as_deref(), Some("fixed"));
    }
}
