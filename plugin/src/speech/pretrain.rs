//! Supervised pre-training of the small speech LM the rest of leaf runs on.
//!
//! A Llama-family decoder (2 layers, d = 128 by default) is trained from scratch, every weight,
//! on the spoken-digit tasks ([`super::tasks`]): cross-entropy on the answer tokens only, Adam
//! with decoupled weight decay, a cosine learning rate with warm-up, gradient clipping. Every
//! training utterance is freshly augmented (speed and volume perturbation, noise, SpecAugment
//! masks; [`super::augment`]) for robustness to unheard voices, and by default one speaker is
//! left out of training entirely so the model card can state held-out-speaker accuracy.
//!
//! The budget is in steps, with a wall-clock cap; when the machine is too busy to finish the
//! steps in time, the learning-rate schedule follows the clock instead ([`schedule_position`]),
//! so the cosine decay still completes at the cap. Given the seed the run is deterministic: the
//! weights are seeded, examples and their augmentations are drawn from per-example seeds, batches
//! are consumed in a fixed order, so two runs that keep to the step budget (no clock-paced step)
//! write byte-identical weights.
//!
//! The output is a Hugging Face-style directory that mistral.rs 0.8.1 and
//! [`LlamaModel::load`] both read: `config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, the unit codebook `units.json`, a model card `README.md` and
//! `leaf_model.json` with the training figures.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use leaf_adapters::model::{Batch, LlamaModel, LoraOptions, ModelOptions, Pass, Trainable};
use leaf_adapters::LlamaConfig;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, Augmenter};
use super::eval::{candle, evaluate, Decoding, EvalConfig, EvalReport};
use super::prepare::{example_seed, EncodedExample, ExampleEncoder};
use super::tasks::{
    generate, Corpus, Example, Split, TaskConfig, TaskKind, DEFAULT_DATA_DIR, FIRST_TRAIN_TAKE,
};
use super::tokenizer::SpeechTokenizer;
use super::units::{fit_corpus, Codebook, KMeansConfig, UnitEncoder, CODEBOOK_FILE};
use super::SpeechError;
use crate::audio::{FrontEnd, FrontEndConfig};
use crate::trainer::optim::{clip_factor, global_norm, Adam};
use crate::trainer::{CosineSchedule, TrainError};
use crate::{Error, Result};

/// File with the machine-readable training figures, inside the model directory.
pub const MODEL_INFO_FILE: &str = "leaf_model.json";

/// File of the model card.
pub const MODEL_CARD_FILE: &str = "README.md";

/// Default step budget: sized so the default run (codebook, training, evaluation) ends within
/// ten minutes on two CPU cores (an estimated 0.27 s per step of 16 examples when both are free,
/// not measured: the machine was never idle; the
/// six-family mix averages 87 positions per example). On a busier machine the wall-clock cap
/// ends the run and the learning rate follows the clock ([`schedule_position`]): at a load
/// average of 4-6 the default run reached 730 steps in 500 s (0.69 s per step), 599 s in all.
pub const DEFAULT_STEPS: usize = 1800;

/// Default wall-clock cap of the training loop, in seconds: with the codebook (about 10 s) and
/// the model card's evaluation of six families (30-75 s), the whole run stays within ten
/// minutes even on a loaded machine (at a load average of 4-6, the former 520 s cap with 100
/// evaluation examples per family took 675 s in all, 145 s of it evaluating).
pub const DEFAULT_MAX_SECONDS: f64 = 500.0;

/// Default task mix of the training examples (a kind drawn uniformly from this list, so a kind
/// listed twice is drawn twice as often). Recognition of short and long digit strings gets the
/// most weight (it is the skill every task builds on, and the one the model card targets), the
/// arithmetic twice the weight of one QA question (its working has 10-20 tokens to learn), the
/// other kinds once each.
pub const DEFAULT_TRAIN_KINDS: [TaskKind; 11] = [
    TaskKind::Recognition,
    TaskKind::Recognition,
    TaskKind::Recognition,
    TaskKind::Translation,
    TaskKind::Sum,
    TaskKind::Largest,
    TaskKind::Count,
    TaskKind::CodeRecognition,
    TaskKind::CodeRecognition,
    TaskKind::CodeTranslation,
    TaskKind::Arithmetic,
];

/// Steps whose examples are grouped by length: the examples of this many consecutive batches
/// are sorted by digit count before being cut into batches (whose order is then shuffled), so a
/// batch rarely pads two-digit utterances to the length of a ten-digit code.
pub const LENGTH_BUCKET_STEPS: usize = 8;

/// Default examples per step. At this model size candle's CPU step costs grow faster than the
/// batch, and more, smaller steps learn faster per second than batches of 32.
pub const DEFAULT_BATCH_SIZE: usize = 16;

/// Default fraction of augmented training examples: full-strength augmentation on every
/// example slowed learning several-fold within the ten-minute budget.
pub const DEFAULT_AUGMENT_PROB: f64 = 0.15;

/// Default test examples per task family for the model card: 50 per family and speaker group
/// keeps the evaluation of six families (long answers included) near a minute on a loaded
/// machine (100 took 145 s at a load average of 5). `leaf eval` measures more.
pub const DEFAULT_EVAL_SAMPLES: usize = 50;

/// Name of the cached default model inside a cache directory (`-v2`: trained on the long
/// families too, so a model cached by an older build is not reused).
pub const DEFAULT_MODEL_NAME: &str = "leaf-digits-base-v2";

const FORMAT: &str = "leaf-model";
const VERSION: u32 = 1;

/// The decoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Decoder layers.
    pub layers: usize,
    /// Width d.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// SwiGLU inner width.
    pub intermediate: usize,
    /// Longest sequence.
    pub max_positions: usize,
}

impl Default for ModelShape {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 128,
            heads: 4,
            kv_heads: 4,
            intermediate: 384,
            max_positions: 1024,
        }
    }
}

/// Which speaker to leave out of training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holdout {
    /// The last speaker in sorted order, when the recordings have at least two speakers.
    Auto,
    /// Train on every speaker.
    None,
    /// This speaker.
    Speaker(String),
}

impl Holdout {
    /// Parses a command-line value: `auto`, `none`, or a speaker name.
    pub fn parse(s: &str) -> Holdout {
        match s {
            "auto" => Holdout::Auto,
            "none" => Holdout::None,
            other => Holdout::Speaker(other.to_string()),
        }
    }

    /// The speaker left out of a corpus with `speakers` (sorted).
    pub fn resolve(&self, speakers: &[String]) -> std::result::Result<Option<String>, SpeechError> {
        match self {
            Holdout::None => Ok(None),
            Holdout::Auto => Ok(if speakers.len() >= 2 {
                speakers.last().cloned()
            } else {
                None
            }),
            Holdout::Speaker(s) => {
                if !speakers.contains(s) {
                    return Err(SpeechError::Config(format!(
                        "holdout speaker {s:?} is not in the recordings (speakers: {})",
                        speakers.join(", ")
                    )));
                }
                if speakers.len() < 2 {
                    return Err(SpeechError::Config(format!(
                        "cannot hold out {s:?}: it is the only speaker"
                    )));
                }
                Ok(Some(s.clone()))
            }
        }
    }
}

/// Every setting of a pre-training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Wall-clock cap of the training loop, seconds (0 = none).
    pub max_seconds: f64,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the steps spent warming up.
    pub warmup_fraction: f64,
    /// Final learning rate as a fraction of the peak.
    pub lr_floor: f64,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    pub grad_clip: f64,
    /// Seed of everything (weights, codebook, examples, augmentation).
    pub seed: u64,
    /// The speaker left out of training.
    pub holdout: Holdout,
    /// Training takes kept for the live traffic and never pretrained on (the first N takes
    /// after the test split, [`super::tasks::is_traffic_take`]); 0 pretrains on all of them.
    /// Reports written before this setting existed read as 0.
    #[serde(default)]
    pub traffic_takes: u32,
    /// The decoder's shape.
    pub shape: ModelShape,
    /// Number of units in the codebook.
    pub units: usize,
    /// Most k-means iterations.
    pub kmeans_iters: usize,
    /// Augmentation of training audio (`None` trains on clean audio).
    pub augment: Option<AugmentConfig>,
    /// Fraction of training examples that are augmented (a seeded coin per example).
    pub augment_prob: f64,
    /// Task kinds of the training examples, drawn uniformly from this list (repeat a kind to
    /// weight it).
    pub train_kinds: Vec<TaskKind>,
    /// Test examples per task family for the model card (0 skips the evaluation).
    pub eval_samples: usize,
    /// Worker threads for audio work (0 = all cores); does not change the result.
    pub threads: usize,
    /// Continue from this model directory (written by `leaf pretrain`): its weights and its
    /// unit codebook instead of random weights and a new codebook. Its shape and unit count
    /// must be this config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Train on the takes kept for the traffic ([`Self::traffic_takes`]) instead of the
    /// pretraining takes: with [`Self::init_from`] the served model, this is supervised
    /// continued training on the traffic's audio and its reference answers.
    #[serde(default)]
    pub train_on_traffic: bool,
    /// Train a LoRA adapter of this rank (alpha = 2 x rank, all seven projections, no dropout)
    /// on top of [`Self::init_from`] instead of every weight, and write it as a PEFT adapter to
    /// `OUT/adapter` ([`ADAPTER_DIR`]), which `leaf eval --adapter`, the adapter store and the
    /// server take. The model directory itself keeps the starting weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_rank: Option<usize>,
}

/// Where a run with [`PretrainConfig::adapter_rank`] writes its PEFT adapter, inside `OUT`.
pub const ADAPTER_DIR: &str = "adapter";

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: DEFAULT_STEPS,
            max_seconds: DEFAULT_MAX_SECONDS,
            batch_size: DEFAULT_BATCH_SIZE,
            lr: 2e-3,
            warmup_fraction: 0.03,
            lr_floor: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.01,
            grad_clip: 1.0,
            seed: 0,
            holdout: Holdout::Auto,
            traffic_takes: super::tasks::DEFAULT_TRAFFIC_TAKES,
            shape: ModelShape::default(),
            units: super::units::DEFAULT_UNITS,
            kmeans_iters: 30,
            augment: Some(AugmentConfig::default()),
            augment_prob: DEFAULT_AUGMENT_PROB,
            train_kinds: DEFAULT_TRAIN_KINDS.to_vec(),
            eval_samples: DEFAULT_EVAL_SAMPLES,
            threads: 0,
            init_from: None,
            train_on_traffic: false,
            adapter_rank: None,
        }
    }
}

impl PretrainConfig {
    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> std::result::Result<(), SpeechError> {
        let bad = |m: String| Err(SpeechError::Config(m));
        if self.steps == 0 {
            return bad("steps must be positive".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        if !(self.max_seconds.is_finite() && self.max_seconds >= 0.0) {
            return bad(format!("max_seconds {} must be >= 0", self.max_seconds));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if !(0.0..=1.0).contains(&self.warmup_fraction) || !(0.0..=1.0).contains(&self.lr_floor) {
            return bad("warmup_fraction and lr_floor must be in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("Adam betas must be in [0, 1)".into());
        }
        if !(self.weight_decay >= 0.0 && self.grad_clip >= 0.0) {
            return bad("weight_decay and grad_clip must be >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.augment_prob) {
            return bad(format!(
                "augment_prob {} must be in [0, 1]",
                self.augment_prob
            ));
        }
        if self.train_kinds.is_empty() {
            return bad("train_kinds must name at least one task kind".into());
        }
        if self.units == 0 {
            return bad("units must be positive".into());
        }
        if let Some(a) = &self.augment {
            a.validate()?;
        }
        match (self.adapter_rank, &self.init_from) {
            (Some(0), _) => return bad("adapter_rank must be positive".into()),
            (Some(_), None) => {
                return bad("adapter_rank needs init_from (the model the adapter sits on)".into())
            }
            _ => {}
        }
        if self.train_on_traffic && self.traffic_takes == 0 {
            return bad("train_on_traffic needs traffic_takes > 0 (the takes to train on)".into());
        }
        Ok(())
    }

    /// The model's `config.json` for a tokenizer.
    pub fn llama_config(&self, tokenizer: &SpeechTokenizer) -> LlamaConfig {
        let s = &self.shape;
        LlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            hidden_act: "silu".into(),
            hidden_size: s.hidden,
            intermediate_size: s.intermediate,
            vocab_size: tokenizer.vocab_size(),
            num_hidden_layers: s.layers,
            num_attention_heads: s.heads,
            num_key_value_heads: Some(s.kv_heads),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: s.max_positions,
            tie_word_embeddings: false,
            bos_token_id: Some(tokenizer.ids().bos),
            eos_token_id: Some(tokenizer.ids().eos),
            rope_scaling: None,
            model_type: "llama".into(),
            torch_dtype: "float32".into(),
            ..LlamaConfig::default()
        }
    }
}

/// What a run reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// A stage began ("fitting the unit codebook", "evaluating", ...).
    Stage(String),
    /// Training is about to start.
    Start {
        /// Planned steps.
        steps: usize,
        /// Wall-clock cap of the training loop in seconds (0 = none).
        max_seconds: f64,
    },
    /// One optimizer step finished.
    Step {
        /// 1-based step number.
        step: usize,
        /// The step's loss (mean cross-entropy per answer token).
        loss: f64,
        /// Seconds since training began.
        seconds: f64,
    },
}

/// Statistics of one training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Mean cross-entropy per answer token.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Answer tokens trained on.
    pub answer_tokens: usize,
    /// Input positions processed (prompt + answer - 1 per example).
    pub tokens: usize,
}

/// One supervised step: cross-entropy on the answer tokens (a token mean over the batch), the
/// gradient of every trainable weight, clipping to `grad_clip`, an Adam update at `lr`.
pub fn train_step(
    model: &LlamaModel,
    optimizer: &mut Adam,
    batch: &[EncodedExample],
    lr: f64,
    grad_clip: f64,
) -> Result<StepStats> {
    let pairs: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|e| (e.prompt.as_slice(), e.answer.as_slice()))
        .collect();
    let b = Batch::new(&pairs, model.device())?;
    let answer_tokens = b.num_tokens();
    let tokens: usize = b.lens().iter().sum();
    // The policy pass: with LoRA (`adapter_rank`) the adapter is on; in full mode the same.
    let logp = model.logprobs_with(&b, &Pass::POLICY)?;
    let loss = candle(
        logp.sum_all()
            .and_then(|s| s.affine(-1.0 / answer_tokens as f64, 0.0)),
    )?;
    let value = candle(loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()))?;
    if !value.is_finite() {
        return Err(TrainError::NonFinite {
            what: format!("pre-training loss {value}"),
        }
        .into());
    }
    let grads = candle(loss.backward())?;
    let grads = optimizer
        .vars()
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.zeros_like(),
        })
        .collect::<candle_core::Result<Vec<Tensor>>>();
    let grads = candle(grads)?;
    let norm = candle(global_norm(&grads))?;
    if !norm.is_finite() {
        return Err(TrainError::NonFinite {
            what: format!("gradient norm {norm}"),
        }
        .into());
    }
    let factor = clip_factor(norm, grad_clip);
    let grads = if factor < 1.0 {
        candle(
            grads
                .iter()
                .map(|g| g * factor)
                .collect::<candle_core::Result<Vec<_>>>(),
        )?
    } else {
        grads
    };
    candle(optimizer.step(&grads, lr))?;
    Ok(StepStats {
        loss: value,
        grad_norm: norm,
        answer_tokens,
        tokens,
    })
}

/// A fresh Adam over every weight of a full-parameter model.
pub fn optimizer_for(model: &LlamaModel, config: &PretrainConfig) -> Result<Adam> {
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    candle(Adam::new(
        vars,
        config.beta1,
        config.beta2,
        1e-8,
        config.weight_decay,
    ))
}

/// Figures of a finished run, as written to `leaf_model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    /// `"leaf-model"`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// The settings.
    pub config: PretrainConfig,
    /// Steps planned.
    pub steps_planned: usize,
    /// Steps run.
    pub steps: usize,
    /// `"steps"` when the step budget ended the run, `"time"` when the wall-clock cap did.
    pub stopped_by: String,
    /// Steps whose learning rate was paced by the wall-clock cap rather than the step count
    /// (see [`schedule_position`]); 0 means the run is reproducible byte for byte.
    #[serde(default)]
    pub time_paced_steps: usize,
    /// Seconds in the training loop.
    pub train_seconds: f64,
    /// Seconds for the whole run (codebook, training, evaluation, writing).
    pub total_seconds: f64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Mean loss of the last 20 steps (or fewer).
    pub final_loss: f64,
    /// Answer tokens trained on.
    pub answer_tokens: usize,
    /// Input positions processed.
    pub tokens: usize,
    /// Input positions per second of training.
    pub tokens_per_second: f64,
    /// Number of parameters.
    pub parameters: usize,
    /// Speakers trained on.
    pub train_speakers: Vec<String>,
    /// The speaker left out of training.
    pub holdout_speaker: Option<String>,
    /// Training clips (takes 5 and up of the training speakers, less the ones kept for the
    /// traffic: [`PretrainConfig::traffic_takes`]).
    pub train_clips: usize,
    /// Test-split evaluation (greedy), when it ran.
    pub eval: Option<EvalReport>,
}

impl PretrainReport {
    /// Test-split recognition exact match of the training speakers.
    pub fn recognition_accuracy(&self) -> Option<f64> {
        self.eval
            .as_ref()
            .and_then(|e| e.in_speaker.tasks.get("asr"))
            .map(|s| s.exact_match)
    }

    /// Test-split recognition exact match of the held-out speaker.
    pub fn holdout_recognition_accuracy(&self) -> Option<f64> {
        self.eval
            .as_ref()
            .and_then(|e| e.holdout.as_ref())
            .and_then(|h| h.tasks.get("asr"))
            .map(|s| s.exact_match)
    }

    /// Reads `leaf_model.json` from a model directory.
    pub fn load(dir: &Path) -> Result<PretrainReport> {
        let path = dir.join(MODEL_INFO_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| SpeechError::Config(format!("{}: malformed: {e}", path.display())).into())
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default recordings folder: [`DEFAULT_DATA_DIR`] resolved against the workspace this
/// crate was built in (its manifest directory's parent), then against the current directory.
/// Fails with both places named when neither holds it.
pub fn default_data_dir() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        workspace.join(DEFAULT_DATA_DIR),
        PathBuf::from(DEFAULT_DATA_DIR),
    ];
    for c in &candidates {
        if c.is_dir() {
            return Ok(c.clone());
        }
    }
    Err(SpeechError::Data {
        path: candidates[0].clone(),
        reason: format!(
            "the spoken-digit recordings are missing (also looked in {}); fetch the Free Spoken \
             Digit Dataset recordings there or pass --data DIR",
            candidates[1].display()
        ),
    }
    .into())
}

/// Everything a model directory holds besides the weights: loads the tokenizer and codebook and
/// builds the example encoder (no augmentation).
pub fn load_encoder(dir: &Path) -> Result<ExampleEncoder> {
    let tokenizer = SpeechTokenizer::load(dir)?;
    let units = UnitEncoder::load(&dir.join(CODEBOOK_FILE))?;
    Ok(ExampleEncoder::new(units, tokenizer, None)?)
}

/// Trains a model on the recordings in `data` and writes its directory to `out` (created; it
/// must not exist or be empty). `progress` hears about stages and steps.
pub fn pretrain(
    config: &PretrainConfig,
    data: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<PretrainReport> {
    let started = Instant::now();
    config.validate()?;
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io(out))?;
        if entries.next().is_some() {
            return Err(SpeechError::Config(format!(
                "output directory {} is not empty",
                out.display()
            ))
            .into());
        }
    }
    progress(&ProgressEvent::Stage("reading recordings".into()));
    let mut corpus = Corpus::open(data)?;
    corpus.preload()?;
    let speakers = corpus.speakers();
    let holdout = config.holdout.resolve(&speakers)?;
    let train = corpus.filter(|c| {
        c.split() == Split::Train
            && super::tasks::is_traffic_take(c.take, config.traffic_takes)
                == config.train_on_traffic
            && Some(c.speaker.as_str()) != holdout.as_deref()
    });
    if train.is_empty() {
        return Err(SpeechError::Data {
            path: data.to_path_buf(),
            reason: format!(
                "no training takes ({}) outside the held-out speaker",
                takes_trained(config)
            ),
        }
        .into());
    }

    let codebook: Codebook = match &config.init_from {
        Some(dir) => {
            progress(&ProgressEvent::Stage(format!(
                "continuing from {}",
                dir.display()
            )));
            Codebook::load(&dir.join(CODEBOOK_FILE))?
        }
        None => {
            progress(&ProgressEvent::Stage("fitting the unit codebook".into()));
            let frontend = FrontEnd::new(FrontEndConfig::default())?;
            fit_corpus(
                &train,
                &frontend,
                super::units::DEFAULT_POOL,
                &KMeansConfig {
                    k: config.units,
                    seed: config.seed,
                    max_iters: config.kmeans_iters,
                    threads: config.threads,
                    ..KMeansConfig::default()
                },
            )?
        }
    };
    let units = UnitEncoder::new(codebook.clone())?;
    let tokenizer = SpeechTokenizer::for_tasks(config.units)?;
    let llama = config.llama_config(&tokenizer);
    let options = ModelOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: match config.adapter_rank {
            Some(rank) => Trainable::Lora(LoraOptions {
                rank,
                alpha: 2.0 * rank as f64,
                dropout: 0.0,
                seed: config.seed,
                ..LoraOptions::default()
            }),
            None => Trainable::Full,
        },
        frozen_matmul: true,
    };
    let model = match &config.init_from {
        Some(dir) => {
            check_init(dir, &llama, codebook.k(), config.units)?;
            LlamaModel::load(dir, &options)?
        }
        None => LlamaModel::random(&llama, config.seed, &options)?,
    };
    let parameters: usize = model
        .base_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let mut optimizer = optimizer_for(&model, config)?;
    let schedule = CosineSchedule::new(
        config.lr,
        config.steps as u64,
        config.warmup_fraction,
        config.lr_floor,
    );
    let augmenter = config.augment.clone().map(Augmenter::new).transpose()?;
    let train_encoder = ExampleEncoder::new(units.clone(), tokenizer.clone(), augmenter)?;
    let clean_encoder = ExampleEncoder::new(units.clone(), tokenizer.clone(), None)?;
    let examples = training_examples(config, &train)?;

    progress(&ProgressEvent::Start {
        steps: config.steps,
        max_seconds: config.max_seconds,
    });
    let loop_started = Instant::now();
    let mut losses = Vec::with_capacity(config.steps);
    let (mut answer_tokens, mut tokens) = (0usize, 0usize);
    let mut stopped_by = "steps";
    let mut time_paced_steps = 0usize;
    let aug_seed = example_seed(config.seed, 0xA0D1_0000);
    std::thread::scope(|scope| -> Result<()> {
        // Batches are encoded one step ahead on a second thread; each example's augmentation
        // draws from its own seed, so what the model sees does not depend on timing.
        let (tx, rx) = mpsc::sync_channel::<Result<Vec<EncodedExample>>>(2);
        let examples = &examples;
        let train_encoder = &train_encoder;
        let clean_encoder = &clean_encoder;
        let augment_prob = config.augment_prob;
        let train = &train;
        let batch_size = config.batch_size;
        let max_positions = config.shape.max_positions;
        scope.spawn(move || {
            for chunk_start in (0..examples.len()).step_by(batch_size) {
                let batch: Result<Vec<EncodedExample>> = (chunk_start
                    ..(chunk_start + batch_size).min(examples.len()))
                    .map(|i| {
                        let seed = example_seed(aug_seed, i as u64);
                        // The coin comes from the example's own seed, so it is fixed too.
                        let coin = (example_seed(seed, 1) >> 11) as f64 / (1u64 << 53) as f64;
                        let encoder = if coin < augment_prob {
                            train_encoder
                        } else {
                            clean_encoder
                        };
                        let e = encoder.encode(train, &examples[i], seed)?;
                        let len = e.prompt.len() + e.answer.len();
                        if len > max_positions {
                            return Err(SpeechError::Config(format!(
                                "training example {i} ({} digits) needs {len} positions, the \
                                 model has {max_positions}",
                                examples[i].digits.len()
                            ))
                            .into());
                        }
                        Ok(e)
                    })
                    .collect();
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        for step in 0..config.steps {
            if config.max_seconds > 0.0 && loop_started.elapsed().as_secs_f64() > config.max_seconds
            {
                stopped_by = "time";
                break;
            }
            let batch = rx.recv().map_err(|_| {
                SpeechError::Config("the batch encoder stopped unexpectedly".into())
            })??;
            let elapsed = loop_started.elapsed().as_secs_f64();
            let position = schedule_position(step, config.steps, elapsed, config.max_seconds);
            if position > step {
                time_paced_steps += 1;
            }
            let stats = train_step(
                &model,
                &mut optimizer,
                &batch,
                schedule.lr(position as u64),
                config.grad_clip,
            )?;
            losses.push(stats.loss);
            answer_tokens += stats.answer_tokens;
            tokens += stats.tokens;
            progress(&ProgressEvent::Step {
                step: step + 1,
                loss: stats.loss,
                seconds: loop_started.elapsed().as_secs_f64(),
            });
        }
        // Dropping the receiver stops the encoder thread at its next send.
        drop(rx);
        Ok(())
    })?;
    let train_seconds = loop_started.elapsed().as_secs_f64();

    progress(&ProgressEvent::Stage("writing the model".into()));
    std::fs::create_dir_all(out).map_err(io(out))?;
    model.save(out)?;
    if let (Some(_), Some(init)) = (config.adapter_rank, &config.init_from) {
        model
            .export_adapter(&init.display().to_string())?
            .save(&out.join(ADAPTER_DIR))?;
    }
    tokenizer.save(out)?;
    codebook.save(&out.join(CODEBOOK_FILE))?;

    let eval = if config.eval_samples > 0 {
        progress(&ProgressEvent::Stage("evaluating on the test takes".into()));
        let encoder = ExampleEncoder::new(units, tokenizer, None)?;
        Some(evaluate(
            &model,
            &encoder,
            &corpus,
            &EvalConfig {
                samples: config.eval_samples,
                seed: config.seed,
                decoding: Decoding::Greedy,
                holdout_speaker: holdout.clone(),
                threads: config.threads,
                ..EvalConfig::default()
            },
        )?)
    } else {
        None
    };
    let tail = &losses[losses.len().saturating_sub(20)..];
    let report = PretrainReport {
        format: FORMAT.into(),
        version: VERSION,
        config: config.clone(),
        steps_planned: config.steps,
        steps: losses.len(),
        stopped_by: stopped_by.into(),
        time_paced_steps,
        train_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: if tail.is_empty() {
            f64::NAN
        } else {
            tail.iter().sum::<f64>() / tail.len() as f64
        },
        answer_tokens,
        tokens,
        tokens_per_second: tokens as f64 / train_seconds.max(1e-9),
        parameters,
        train_speakers: train.speakers(),
        holdout_speaker: holdout,
        train_clips: train.len(),
        eval,
    };
    let info = out.join(MODEL_INFO_FILE);
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| SpeechError::Config(format!("serialising the report: {e}")))?;
    std::fs::write(&info, json).map_err(io(&info))?;
    let card = out.join(MODEL_CARD_FILE);
    std::fs::write(&card, model_card(&report)).map_err(io(&card))?;
    Ok(report)
}

/// The takes a run trains on, for messages and the model card: `"15+"` when pretraining,
/// `"5-14, the traffic's"` when training on the traffic.
fn takes_trained(c: &PretrainConfig) -> String {
    let first_after = FIRST_TRAIN_TAKE + c.traffic_takes;
    if c.train_on_traffic {
        format!("{FIRST_TRAIN_TAKE}-{}, the traffic's", first_after - 1)
    } else {
        format!("{first_after}+")
    }
}

/// Checks that the model in `dir` can be continued with this run's settings: the same
/// decoder config and unit count. The error names the directory and what differs.
fn check_init(dir: &Path, llama: &LlamaConfig, k: usize, units: usize) -> Result<()> {
    let bad = |reason: String| -> Error {
        SpeechError::Config(format!("init_from {}: {reason}", dir.display())).into()
    };
    if k != units {
        return Err(bad(format!(
            "its codebook has {k} units, this run has {units}"
        )));
    }
    let theirs = LlamaConfig::from_path(dir)?.normalized();
    let ours = llama.normalized();
    if theirs != ours {
        return Err(bad(format!(
            "its decoder ({}) differs from this run's ({}, or another setting of config.json)",
            decoder_summary(&theirs),
            decoder_summary(&ours)
        )));
    }
    Ok(())
}

/// A decoder's shape in words, for messages.
fn decoder_summary(c: &LlamaConfig) -> String {
    format!(
        "{} layers, d = {}, {} heads, {} kv heads, MLP {}, vocabulary {}, {} positions",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings
    )
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |v| format!("{:.1} %", 100.0 * v))
}

/// The model card (`README.md`) of a run.
pub fn model_card(r: &PretrainReport) -> String {
    let c = &r.config;
    let s = &c.shape;
    let mut out = String::new();
    out.push_str("---\nlibrary_name: leaf\nlicense: cc-by-sa-4.0\ntags:\n- speech\n- discrete-units\n- spoken-digits\n---\n\n");
    out.push_str("# leaf spoken-digit base model\n\n");
    out.push_str(&format!(
        "A small Llama-family decoder ({} layers, d = {}, {} heads, {} parameters) {} on \
         spoken-digit tasks built from Free Spoken Digit Dataset \
         recordings. Audio enters the prompt as discrete units (`units.json`: {} k-means \
         centroids over pooled log-mel frames) between `<|audio_start|>` and `<|audio_end|>`; \
         the chat template in `tokenizer_config.json` places them where the audio content part \
         was. mistral.rs 0.8.1 serves this directory as a plain Llama model.\n\n",
        s.layers,
        s.hidden,
        s.heads,
        r.parameters,
        match &c.init_from {
            Some(d) => format!(
                "trained by `leaf pretrain`, continued from `{}`{}{}",
                d.display(),
                if c.train_on_traffic {
                    " on the traffic's takes"
                } else {
                    ""
                },
                match c.adapter_rank {
                    Some(r) => format!(
                        " as a rank-{r} LoRA adapter in `{ADAPTER_DIR}/` (the weights here are \
                         the starting ones)"
                    ),
                    None => String::new(),
                }
            ),
            None => "trained from scratch by `leaf pretrain`".to_string(),
        },
        c.units
    ));
    out.push_str("## Training\n\n| figure | value |\n|---|---|\n");
    for (k, v) in [
        (
            "steps (run / planned)",
            format!("{} / {}", r.steps, r.steps_planned),
        ),
        ("stopped by", r.stopped_by.clone()),
        (
            "steps with a clock-paced learning rate",
            r.time_paced_steps.to_string(),
        ),
        ("training seconds", format!("{:.1}", r.train_seconds)),
        ("total seconds", format!("{:.1}", r.total_seconds)),
        ("batch size", c.batch_size.to_string()),
        ("peak learning rate", format!("{}", c.lr)),
        ("first loss", format!("{:.4}", r.first_loss)),
        (
            "final loss (mean of last 20 steps)",
            format!("{:.4}", r.final_loss),
        ),
        ("tokens per second", format!("{:.0}", r.tokens_per_second)),
        ("seed", c.seed.to_string()),
        (
            "augmentation",
            if c.augment.is_some() {
                format!(
                    "speed, volume, noise, SpecAugment on {:.0} % of examples",
                    100.0 * c.augment_prob
                )
            } else {
                "none".to_string()
            },
        ),
        ("training speakers", r.train_speakers.join(", ")),
        (
            "held-out speaker",
            r.holdout_speaker.clone().unwrap_or_else(|| "none".into()),
        ),
        (
            "training clips",
            format!("{} (takes {})", r.train_clips, takes_trained(&r.config)),
        ),
        (
            "takes kept for the traffic",
            if r.config.traffic_takes == 0 {
                "none".into()
            } else {
                format!(
                    "{}-{}",
                    FIRST_TRAIN_TAKE,
                    FIRST_TRAIN_TAKE + r.config.traffic_takes - 1
                )
            },
        ),
    ] {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    out.push_str("\n## Test-split accuracy (takes 0-4, greedy decoding)\n\n");
    match &r.eval {
        None => out.push_str("Not evaluated.\n"),
        Some(e) => {
            out.push_str("| speakers | task | examples | exact match | BLEU | chrF | WER |\n");
            out.push_str("|---|---|---|---|---|---|---|\n");
            let mut groups = vec![("in-speaker", &e.in_speaker)];
            if let Some(h) = &e.holdout {
                groups.push(("held-out speaker", h));
            }
            for (name, g) in groups {
                for (task, sc) in &g.tasks {
                    out.push_str(&format!(
                        "| {name} ({}) | {task} | {} | {:.1} % | {:.1} | {:.1} | {:.3} |\n",
                        g.speakers.join(", "),
                        sc.examples,
                        100.0 * sc.exact_match,
                        sc.bleu,
                        sc.chrf,
                        sc.wer
                    ));
                }
            }
            out.push_str(&format!(
                "\nRecognition exact match: {} in-speaker, {} on the held-out speaker.\n",
                pct(r.recognition_accuracy()),
                pct(r.holdout_recognition_accuracy())
            ));
        }
    }
    out.push_str(&format!(
        "\nThe same figures are in `{MODEL_INFO_FILE}`. Re-running `leaf pretrain` with the same \
         seed and data reproduces the weights byte for byte when the step budget (not the \
         wall-clock cap) paces the run (no step with a clock-paced learning rate).\n"
    ));
    out
}

/// The directory of the default model in `cache_dir`; trains it with the default settings on
/// the recordings in `data_dir` when it is not there yet.
///
/// Training goes to a temporary directory inside `cache_dir` that is renamed into place when
/// complete, so a crash never leaves a half-written model behind, and two processes racing each
/// other both end up with one complete model. With `progress` it reports on stderr (see
/// [`ProgressBar`]: a bar on a terminal, a plain line every few percent otherwise).
pub fn ensure_default_model(cache_dir: &Path, data_dir: &Path, progress: bool) -> Result<PathBuf> {
    let target = cache_dir.join(DEFAULT_MODEL_NAME);
    let config = PretrainConfig::default();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    if target.join(MODEL_INFO_FILE).is_file() {
        // Reuse the cached model only if it was trained with today's defaults; a model cached
        // by an older build (other steps, shape or mix) is moved aside and retrained.
        match PretrainReport::load(&target) {
            Ok(report) if report.config == config => return Ok(target),
            _ => {
                let stale = cache_dir.join(format!(".{DEFAULT_MODEL_NAME}.stale-{nonce}"));
                tracing::warn!(
                    "cached model {} was trained with other settings; retraining",
                    target.display()
                );
                std::fs::rename(&target, &stale).map_err(io(&target))?;
                let _ = std::fs::remove_dir_all(&stale);
            }
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let tmp = cache_dir.join(format!(
        ".{DEFAULT_MODEL_NAME}.tmp-{}-{nonce}",
        std::process::id()
    ));
    let result = if progress {
        let mut bar = ProgressBar::new();
        pretrain(&config, data_dir, &tmp, &mut |e| bar.handle(e))
    } else {
        pretrain(&config, data_dir, &tmp, &mut |_| {})
    };
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, &target) {
        Ok(()) => Ok(target),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            if target.join(MODEL_INFO_FILE).is_file() {
                // Another process finished first.
                Ok(target)
            } else {
                Err(io(&target)(e))
            }
        }
    }
}

/// The step of the learning-rate schedule that 0-based `step` trains at: the step itself, or,
/// when the wall-clock cap is nearer than the step budget (`elapsed / max_seconds` ahead of
/// `step / steps`), the step at that fraction of the time, so the cosine decay still ends when
/// the cap stops a run on a slow or busy machine instead of leaving it at a high learning rate.
/// A run that never falls behind its budget uses the step count only (and stays deterministic).
pub fn schedule_position(step: usize, steps: usize, elapsed: f64, max_seconds: f64) -> usize {
    if !(max_seconds > 0.0 && elapsed.is_finite() && elapsed > 0.0) {
        return step;
    }
    let by_time = ((elapsed / max_seconds).min(1.0) * steps as f64).floor() as usize;
    step.max(by_time)
}

/// Default spacing of the plain progress lines printed when stderr is not a terminal, in
/// percent of the planned steps.
pub const DEFAULT_LINE_PERCENT: usize = 5;

/// When a plain progress line is due: after every `percent` % of the `steps` planned (every
/// `ceil(steps * percent / 100)` steps, at least every step) and after the last step.
pub fn progress_line_due(step: usize, steps: usize, percent: usize) -> bool {
    if step == 0 || steps == 0 {
        return false;
    }
    let every = (steps * percent.clamp(1, 100)).div_ceil(100).max(1);
    step.is_multiple_of(every) || step == steps
}

/// Seconds as "1m 05s" (or "42s").
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// One plain progress line: step, percent, loss, elapsed time and an estimate of the time left:
/// from the mean step time so far, or the time to the wall-clock cap `max_seconds` (0 = none)
/// when that comes first (then marked "at the time cap").
pub fn progress_line(
    step: usize,
    steps: usize,
    loss: f64,
    seconds: f64,
    max_seconds: f64,
) -> String {
    let pct = 100 * step / steps.max(1);
    let by_steps = seconds / step.max(1) as f64 * steps.saturating_sub(step) as f64;
    let to_cap = max_seconds - seconds;
    let eta = if max_seconds > 0.0 && to_cap < by_steps {
        format!("{} (at the time cap)", clock(to_cap))
    } else {
        clock(by_steps)
    };
    format!(
        "pretrain: step {step}/{steps} ({pct} %), loss {loss:.3}, elapsed {}, eta {eta}",
        clock(seconds)
    )
}

/// Progress of a pre-training run on stderr: an `indicatif` bar on a terminal; otherwise (stderr
/// piped or redirected, where the bar would stay hidden) a plain line per stage and one every
/// [`DEFAULT_LINE_PERCENT`] % of the steps with loss, elapsed time and ETA.
#[derive(Debug)]
pub struct ProgressBar {
    bar: Option<indicatif::ProgressBar>,
    steps: usize,
    max_seconds: f64,
}

impl Default for ProgressBar {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressBar {
    /// A bar when stderr is a terminal (a spinner until training starts, then a bar over the
    /// steps), plain lines otherwise.
    pub fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            steps: 0,
            max_seconds: 0.0,
        }
    }

    /// Updates the bar or prints a line.
    pub fn handle(&mut self, event: &ProgressEvent) {
        match (event, &self.bar) {
            (ProgressEvent::Stage(s), Some(bar)) => bar.set_message(s.clone()),
            (ProgressEvent::Stage(s), None) => eprintln!("pretrain: {s}"),
            (ProgressEvent::Start { steps, max_seconds }, bar) => {
                self.steps = *steps;
                self.max_seconds = *max_seconds;
                match bar {
                    Some(bar) => {
                        bar.set_length(*steps as u64);
                        bar.set_position(0);
                        if let Ok(style) = indicatif::ProgressStyle::with_template(
                            "{spinner} pretrain [{elapsed_precise}] {bar:30} {pos}/{len} steps, eta {eta} {msg}",
                        ) {
                            bar.set_style(style);
                        }
                        bar.set_message("");
                    }
                    None => eprintln!("pretrain: training, {steps} steps"),
                }
            }
            (ProgressEvent::Step { step, loss, .. }, Some(bar)) => {
                bar.set_position(*step as u64);
                if step % 10 == 0 {
                    bar.set_message(format!("loss {loss:.3}"));
                }
            }
            (
                ProgressEvent::Step {
                    step,
                    loss,
                    seconds,
                },
                None,
            ) => {
                if progress_line_due(*step, self.steps, DEFAULT_LINE_PERCENT) {
                    let line = progress_line(*step, self.steps, *loss, *seconds, self.max_seconds);
                    eprintln!("{line}");
                }
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The training examples of a run, in the order they are used (step `s` trains on
/// `[s * batch_size, (s + 1) * batch_size)`): generated from the seed, then grouped by length
/// within every [`LENGTH_BUCKET_STEPS`] batches (sorted by digit count, cut into batches, the
/// batches shuffled with a seeded generator), so padding stays small. Deterministic given the
/// configuration.
pub fn training_examples(config: &PretrainConfig, train: &Corpus) -> Result<Vec<Example>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut examples = generate(
        train,
        Split::Train,
        &config.train_kinds,
        config.steps * config.batch_size,
        config.seed,
        &TaskConfig::default(),
    )?;
    let batch = config.batch_size.max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(example_seed(config.seed, 0xB0C4_E700));
    for window in examples.chunks_mut(LENGTH_BUCKET_STEPS * batch) {
        window.sort_by_key(|e| e.digits.len());
        let mut batches: Vec<Vec<Example>> = window.chunks(batch).map(<[_]>::to_vec).collect();
        batches.shuffle(&mut rng);
        for (slot, e) in window.iter_mut().zip(batches.into_iter().flatten()) {
            *slot = e;
        }
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_follows_the_clock_only_when_it_is_ahead() {
        // On time: the step itself.
        assert_eq!(schedule_position(100, 1000, 10.0, 520.0), 100);
        assert_eq!(schedule_position(0, 1000, 0.0, 520.0), 0);
        // Behind: half the time gone at step 100 of 1000 trains at step 500.
        assert_eq!(schedule_position(100, 1000, 260.0, 520.0), 500);
        // Past the cap, the end of the schedule; never beyond it.
        assert_eq!(schedule_position(100, 1000, 600.0, 520.0), 1000);
        // No cap, or a clock that makes no sense: the step.
        assert_eq!(schedule_position(100, 1000, 600.0, 0.0), 100);
        assert_eq!(schedule_position(100, 1000, f64::NAN, 520.0), 100);
    }

    #[test]
    fn plain_progress_lines_every_five_percent() {
        let due: Vec<usize> = (1..=2500)
            .filter(|&s| progress_line_due(s, 2500, 5))
            .collect();
        assert_eq!(due.len(), 20);
        assert_eq!(due[0], 125);
        assert_eq!(*due.last().unwrap(), 2500);
        assert!(due.windows(2).all(|w| w[1] - w[0] == 125));
        // Steps that do not divide evenly still end with the last step.
        let due: Vec<usize> = (1..=30).filter(|&s| progress_line_due(s, 30, 5)).collect();
        assert_eq!(due, (2..=30).step_by(2).collect::<Vec<_>>());
        let due: Vec<usize> = (1..=7).filter(|&s| progress_line_due(s, 7, 50)).collect();
        assert_eq!(due, [4, 7]);
        assert!(!progress_line_due(0, 10, 5));
        assert!(!progress_line_due(1, 0, 5));
        // A zero percentage still prints (every 1 %), never divides by zero.
        assert!(progress_line_due(1, 100, 0));
        assert_eq!(
            progress_line(125, 2500, 1.23456, 30.0, 600.0),
            "pretrain: step 125/2500 (5 %), loss 1.235, elapsed 30s, eta 9m 30s"
        );
        // Too slow for the step budget: the cap decides the end.
        assert_eq!(
            progress_line(90, 1800, 2.0, 74.0, 520.0),
            "pretrain: step 90/1800 (5 %), loss 2.000, elapsed 1m 14s, eta 7m 26s (at the time cap)"
        );
        assert_eq!(
            progress_line(90, 1800, 2.0, 74.0, 0.0),
            "pretrain: step 90/1800 (5 %), loss 2.000, elapsed 1m 14s, eta 23m 26s"
        );
    }

    #[test]
    fn training_batches_group_examples_by_length() {
        let clips = (0..10u8)
            .flat_map(|digit| {
                [("ann", 5u32), ("ann", 6), ("bo", 7)].map(|(s, take)| crate::speech::Clip {
                    digit,
                    speaker: s.into(),
                    take,
                    path: format!("{digit}_{s}_{take}.wav").into(),
                })
            })
            .collect();
        let corpus = Corpus::from_clips(clips).unwrap();
        let config = PretrainConfig {
            steps: 40,
            batch_size: 16,
            ..PretrainConfig::default()
        };
        let ordered = training_examples(&config, &corpus).unwrap();
        assert_eq!(ordered, training_examples(&config, &corpus).unwrap());
        // A permutation of the generated examples, within windows of LENGTH_BUCKET_STEPS batches.
        let drawn = generate(
            &corpus,
            Split::Train,
            &config.train_kinds,
            40 * 16,
            config.seed,
            &TaskConfig::default(),
        )
        .unwrap();
        let window = LENGTH_BUCKET_STEPS * 16;
        for (a, b) in ordered.chunks(window).zip(drawn.chunks(window)) {
            let key = |e: &Example| serde_json::to_string(e).unwrap();
            let mut a: Vec<String> = a.iter().map(key).collect();
            let mut b: Vec<String> = b.iter().map(key).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b);
        }
        // Padding: the longest utterance per batch, summed over batches, drops well below the
        // unsorted order's.
        let padded = |ex: &[Example]| -> usize {
            ex.chunks(16)
                .map(|b| b.iter().map(|e| e.digits.len()).max().unwrap_or(0) * b.len())
                .sum()
        };
        let (sorted, unsorted) = (padded(&ordered), padded(&drawn));
        assert!(sorted * 10 < unsorted * 7, "{sorted} vs {unsorted}");
        // The batches are not simply ordered short to long within a window.
        let maxima: Vec<usize> = ordered[..window]
            .chunks(16)
            .map(|b| b.iter().map(|e| e.digits.len()).max().unwrap())
            .collect();
        assert!(maxima.windows(2).any(|w| w[0] > w[1]), "{maxima:?}");
    }

    #[test]
    fn holdout_resolution() {
        let sp: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(Holdout::Auto.resolve(&sp).unwrap(), Some("c".into()));
        assert_eq!(Holdout::None.resolve(&sp).unwrap(), None);
        assert_eq!(Holdout::parse("b").resolve(&sp).unwrap(), Some("b".into()));
        assert!(Holdout::parse("zed").resolve(&sp).is_err());
        assert_eq!(Holdout::Auto.resolve(&sp[..1]).unwrap(), None);
        assert!(Holdout::parse("a").resolve(&sp[..1]).is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(PretrainConfig::default().validate().is_ok());
        for (c, word) in [
            (
                PretrainConfig {
                    steps: 0,
                    ..Default::default()
                },
                "steps",
            ),
            (
                PretrainConfig {
                    lr: -1.0,
                    ..Default::default()
                },
                "lr",
            ),
            (
                PretrainConfig {
                    batch_size: 0,
                    ..Default::default()
                },
                "batch_size",
            ),
            (
                PretrainConfig {
                    beta2: 1.0,
                    ..Default::default()
                },
                "betas",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
