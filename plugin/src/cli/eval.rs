//! `leaf eval`: generates answers with a model directory (optionally with a LoRA adapter) on the
//! spoken-digit tasks and prints one JSON object with exact match, BLEU, chrF and WER per task.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use leaf_adapters::model::{LlamaModel, LoraOptions, ModelOptions, Trainable};
use leaf_adapters::LoraAdapter;
use leaf_plugin::speech::eval::{evaluate_with_answers, Decoding, EvalConfig, Scored};
use leaf_plugin::speech::pretrain::{default_data_dir, load_encoder};
use leaf_plugin::speech::tasks::Example;
use leaf_plugin::speech::tasks::{Corpus, Split, TaskFamily, MAX_ANSWER_TOKENS};

/// Arguments of `leaf eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model directory written by `leaf pretrain`.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Task family: asr, ast, sqa (short answers), asr_long, ast_long, arith (long answers),
    /// short, long, or all.
    #[arg(long, default_value = "all")]
    pub task: String,
    /// Which takes: test (0-4) or train (5 and up).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Examples per task family.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Folder of recordings named `{digit}_{speaker}_{take}.wav` [default: as for pretrain].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Report this speaker separately (the in-speaker figures leave it out).
    #[arg(long)]
    pub holdout_speaker: Option<String>,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub sample: bool,
    /// Sampling temperature (with --sample).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus mass (with --sample).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the examples and of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per decoder pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Longest answer in tokens (the stop token included).
    #[arg(long, default_value_t = MAX_ANSWER_TOKENS)]
    pub max_new_tokens: usize,
    /// Also write every example with its answer to this JSON Lines file (`group`, `family`,
    /// `example` with its speaker, digits and takes, `reference`, `hypothesis`, `exact`), for
    /// error analysis.
    #[arg(long)]
    pub answers: Option<PathBuf>,
}

/// One line of `--answers`.
#[derive(serde::Serialize)]
struct AnswerLine<'a> {
    group: &'static str,
    family: &'static str,
    example: &'a Example,
    reference: &'a str,
    hypothesis: &'a str,
    exact: bool,
}

fn write_answers(
    path: &std::path::Path,
    groups: [(&'static str, &[Scored]); 2],
) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the answers file {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (group, scored) in groups {
        for s in scored {
            let line = AnswerLine {
                group,
                family: s.example.kind.family().name(),
                example: &s.example,
                reference: &s.example.reference,
                hypothesis: &s.hypothesis,
                exact: leaf_plugin::reward::exact_match(&s.hypothesis, &s.example.reference),
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()
        .with_context(|| format!("writing the answers file {}", path.display()))?;
    Ok(())
}

/// Runs `leaf eval`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let families: Vec<TaskFamily> = match a.task.as_str() {
        "all" => TaskFamily::ALL.to_vec(),
        "short" => TaskFamily::SHORT.to_vec(),
        "long" => TaskFamily::LONG.to_vec(),
        one => vec![one.parse()?],
    };
    let split: Split = a.split.parse()?;
    if !a.sample && (a.temperature != 1.0 || a.top_p != 1.0) {
        bail!("--temperature and --top-p need --sample");
    }
    let decoding = if a.sample {
        Decoding::Sample {
            temperature: a.temperature,
            top_p: a.top_p,
        }
    } else {
        Decoding::Greedy
    };
    let data = match a.data {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let encoder = load_encoder(&a.model).with_context(|| {
        format!(
            "loading the tokenizer and codebook of {}",
            a.model.display()
        )
    })?;
    let adapter = match &a.adapter {
        Some(dir) => Some(
            LoraAdapter::load(dir)
                .with_context(|| format!("loading the adapter {}", dir.display()))?,
        ),
        None => None,
    };
    // With an adapter the model carries LoRA pairs of the adapter's shape, and evaluation runs
    // the policy (LoRA on); without one it is the plain base model.
    let trainable = match &adapter {
        Some(ad) => Trainable::Lora(LoraOptions {
            rank: ad.config.r,
            alpha: ad.config.lora_alpha,
            dropout: 0.0,
            target_modules: ad.config.target_modules.clone(),
            ..LoraOptions::default()
        }),
        None => Trainable::Nothing,
    };
    let mut model = LlamaModel::load(
        &a.model,
        &ModelOptions {
            trainable,
            ..ModelOptions::default()
        },
    )
    .with_context(|| format!("loading the model {}", a.model.display()))?;
    if let (Some(ad), Some(dir)) = (&adapter, &a.adapter) {
        model
            .load_adapter(ad)
            .with_context(|| format!("applying the adapter {}", dir.display()))?;
    }
    let mut corpus = Corpus::open(&data)?;
    corpus.preload()?;
    let (report, answers) = evaluate_with_answers(
        &model,
        &encoder,
        &corpus,
        &EvalConfig {
            families,
            split,
            samples: a.samples,
            seed: a.seed,
            decoding,
            max_new_tokens: a.max_new_tokens,
            batch_size: a.batch_size,
            holdout_speaker: a.holdout_speaker,
            threads: 0,
        },
    )?;
    if let Some(path) = &a.answers {
        write_answers(
            path,
            [
                ("in_speaker", &answers.in_speaker),
                ("holdout", &answers.holdout),
            ],
        )?;
    }
    let mut out = serde_json::to_value(&report)?;
    if let Some(obj) = out.as_object_mut() {
        obj.insert("model".into(), serde_json::json!(a.model));
        obj.insert("adapter".into(), serde_json::json!(a.adapter));
        obj.insert("data".into(), serde_json::json!(data));
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
