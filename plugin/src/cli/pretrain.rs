//! `leaf pretrain`: trains the small spoken-digit speech LM from scratch and writes a Hugging
//! Face-style model directory (see [`leaf_plugin::speech::pretrain`]).

use std::path::PathBuf;
use std::process::ExitCode;

use leaf_plugin::speech::pretrain::{
    default_data_dir, pretrain, Holdout, PretrainConfig, ProgressBar, DEFAULT_AUGMENT_PROB,
    DEFAULT_BATCH_SIZE, DEFAULT_EVAL_SAMPLES, DEFAULT_MAX_SECONDS, DEFAULT_STEPS, MODEL_INFO_FILE,
};
use leaf_plugin::speech::tasks::{TaskKind, DEFAULT_TRAFFIC_TAKES};

/// Arguments of `leaf pretrain`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the model directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of recordings named `{digit}_{speaker}_{take}.wav` [default:
    /// ../shared/data/fsdd/recordings next to the workspace, then in the current directory].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,
    /// Wall-clock cap of the training loop in seconds (0 = none).
    #[arg(long, default_value_t = DEFAULT_MAX_SECONDS)]
    pub max_seconds: f64,
    /// Seed of the weights, codebook, examples and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Speaker left out of training: a name, `auto` (the last speaker in sorted order) or
    /// `none`.
    #[arg(long, default_value = "auto")]
    pub holdout_speaker: String,
    /// Training takes kept for the live traffic of `leaf run` and never pretrained on (takes
    /// 5 to 5+N-1); 0 pretrains on every training take.
    #[arg(long, default_value_t = DEFAULT_TRAFFIC_TAKES)]
    pub traffic_takes: u32,
    /// Examples per step.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Train on clean audio (no speed, volume, noise or SpecAugment perturbation).
    #[arg(long)]
    pub no_augment: bool,
    /// Fraction of training examples that are augmented.
    #[arg(long, default_value_t = DEFAULT_AUGMENT_PROB)]
    pub augment_prob: f64,
    /// Task kinds to train on, comma-separated (recognition, translation, sum, largest, count,
    /// code_recognition, code_translation, arithmetic); repeat a kind to weight it [default:
    /// recognition three times, code_recognition twice, the others once].
    #[arg(long, value_delimiter = ',')]
    pub train_kinds: Vec<TaskKind>,
    /// Test examples per task family for the model card (0 skips the evaluation).
    #[arg(long, default_value_t = DEFAULT_EVAL_SAMPLES)]
    pub eval_samples: usize,
    /// Continue from this model directory (written by `leaf pretrain`: its weights and unit
    /// codebook; same shape and unit count) instead of starting from random weights.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Train on the takes kept for the traffic (5 to 5+N-1) instead of the pretraining takes.
    /// With `--init-from` the served model: supervised continued training on the traffic's
    /// audio and reference answers.
    #[arg(long)]
    pub train_on_traffic: bool,
    /// With `--init-from`: train a LoRA adapter of this rank (alpha = 2 x rank, all seven
    /// projections) instead of every weight, written as a PEFT adapter to `OUT/adapter` for
    /// `leaf eval --adapter`, the adapter store and the server.
    #[arg(long)]
    pub adapter_rank: Option<usize>,
    /// Print no progress (by default a bar on a terminal, otherwise a plain line every 5 % of
    /// the steps).
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `leaf pretrain` and prints the report (`leaf_model.json`) as one JSON line.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let data = match a.data {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let defaults = PretrainConfig::default();
    let train_kinds = if a.train_kinds.is_empty() {
        defaults.train_kinds.clone()
    } else {
        a.train_kinds
    };
    let config = PretrainConfig {
        steps: a.steps,
        max_seconds: a.max_seconds,
        seed: a.seed,
        holdout: Holdout::parse(&a.holdout_speaker),
        traffic_takes: a.traffic_takes,
        batch_size: a.batch_size,
        lr: a.lr,
        augment: if a.no_augment {
            None
        } else {
            defaults.augment.clone()
        },
        eval_samples: a.eval_samples,
        augment_prob: a.augment_prob,
        train_kinds,
        init_from: a.init_from,
        train_on_traffic: a.train_on_traffic,
        adapter_rank: a.adapter_rank,
        ..defaults
    };
    let report = if a.quiet {
        pretrain(&config, &data, &a.out, &mut |_| {})?
    } else {
        let mut bar = ProgressBar::new();
        let r = pretrain(&config, &data, &a.out, &mut |e| bar.handle(e));
        bar.finish();
        r?
    };
    let mut summary = serde_json::to_value(&report)?;
    if let Some(obj) = summary.as_object_mut() {
        obj.insert("out".into(), serde_json::json!(a.out));
        obj.insert(
            "recognition_exact_match".into(),
            serde_json::json!(report.recognition_accuracy()),
        );
        obj.insert(
            "holdout_recognition_exact_match".into(),
            serde_json::json!(report.holdout_recognition_accuracy()),
        );
        obj.insert("info_file".into(), serde_json::json!(MODEL_INFO_FILE));
    }
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
