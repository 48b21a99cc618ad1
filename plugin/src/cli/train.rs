//! `leaf train`: training from logged groups (`--groups FILE`, see
//! [`leaf_plugin::online::train::train_offline`]) or from a cluster's group stream
//! (`--cluster URL`, see [`leaf_plugin::cluster::train`]); prints the report as one JSON
//! object.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use leaf_plugin::advantage::Estimator;
use leaf_plugin::online::train::{
    train_offline, OfflineTrainConfig, SourceTrainReport, TrainJobConfig,
};
use leaf_plugin::online::GateConfig;
use leaf_plugin::reward::Metric;
use leaf_plugin::trainer::TrainConfig;

/// Arguments of `leaf train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON-lines groups, one per line:
    /// {"group_id", "prompt_ids": [...], "rollouts": [{"tokens", "logprobs", "reward"}]}.
    #[arg(long)]
    pub groups: Option<PathBuf>,
    /// Train on a cluster's group stream instead (NATS JetStream, `nats://HOST:PORT`): the
    /// replicas of `leaf serve --cluster` feed it, and every version goes to the cluster's
    /// object store and becomes `current` (the replicas follow). Runs until Ctrl-C.
    #[cfg(feature = "cluster")]
    #[arg(long, conflicts_with = "groups")]
    pub cluster: Option<String>,
    /// With --cluster: end after this many seconds without a group (default: until Ctrl-C).
    #[cfg(feature = "cluster")]
    #[arg(long, requires = "cluster")]
    pub idle_exit_s: Option<f64>,
    /// The local state directory (created when missing): its `trainer/` holds the checkpoint
    /// a later `leaf train` resumes from. With --groups it is also the adapter store every
    /// version is published to.
    #[arg(long)]
    pub store: PathBuf,
    /// Advantage estimator.
    #[arg(long, value_enum, default_value = "leaf")]
    pub estimator: Estimator,
    /// Stop after this many updates (default: when the file is exhausted).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Groups per update.
    #[arg(long, default_value_t = 1)]
    pub groups_per_update: usize,
    /// Check, publish and promote every this many updates.
    #[arg(long, default_value_t = 1)]
    pub publish_every: u64,
    /// A JSON `TrainConfig` (every field optional) for the update's finer settings.
    #[arg(long)]
    pub train_config: Option<PathBuf>,
    /// Peak learning rate (overrides the train config).
    #[arg(long)]
    pub lr: Option<f64>,
    /// LoRA rank (overrides the train config).
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (overrides the train config).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// KL penalty weight (overrides the train config).
    #[arg(long)]
    pub kl_beta: Option<f64>,
    /// Seed of the LoRA initialisation (overrides the train config).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Held-out data for the promotion gate: a directory of recordings or a JSON-lines file
    /// of {"prompt_ids", "reference"}. Without it candidates are promoted unchecked.
    #[arg(long)]
    pub gate_data: Option<PathBuf>,
    /// Largest held-out reward drop below the last good version that still promotes.
    #[arg(long, default_value_t = GateConfig::default().max_drop)]
    pub gate_max_drop: f64,
    /// Held-out examples per family (recordings) or prompts (file) per check.
    #[arg(long, default_value_t = GateConfig::default().samples)]
    pub gate_samples: usize,
    /// Metric of a prompts file's references.
    #[arg(long, value_enum, default_value = "bleu")]
    pub gate_metric: Metric,
    /// Log and skip malformed lines (counted as invalid) instead of stopping at the first.
    #[arg(long)]
    pub skip_malformed: bool,
    /// Reference guidance: a group that carries its reference's ids (`reference_ids` in a
    /// groups file; harvested by servers whose assembler sets `reference_ids`) gets the
    /// reference as one more member, reward 1, trained as a demonstration.
    #[arg(long)]
    pub reference_guidance: bool,
    /// Supervised objective: a group that carries its reference's ids also trains on the
    /// reference as a demonstration of constant advantage (its log-likelihood, weight 1),
    /// whatever its rewards; one-response groups then make an update every 16.
    #[arg(long)]
    pub supervised: bool,
}

/// Runs `leaf train`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut train: TrainConfig = match &a.train_config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => TrainConfig::default(),
    };
    if let Some(v) = a.lr {
        train.learning_rate = v;
    }
    if let Some(v) = a.rank {
        train.lora.rank = v;
    }
    if let Some(v) = a.alpha {
        train.lora.alpha = v;
    }
    if let Some(v) = a.kl_beta {
        train.kl_beta = v;
    }
    if let Some(v) = a.seed {
        train.seed = v;
        train.lora.seed = v;
    }
    if let Some(steps) = a.steps {
        if a.train_config.is_none() {
            // The schedule spans the run asked for.
            train.total_steps = steps.max(1);
        }
    }
    let mut job = TrainJobConfig::new(&a.model, &a.store);
    job.estimator = a.estimator.config();
    job.train = train;
    job.groups_per_update = a.groups_per_update;
    job.publish_every = a.publish_every;
    job.max_updates = a.steps;
    job.gate.max_drop = a.gate_max_drop;
    job.gate.samples = a.gate_samples;
    job.gate.metric = a.gate_metric;
    job.gate_data = a.gate_data;
    job.reference_guidance = a
        .reference_guidance
        .then(leaf_plugin::online::ReferenceGuidance::default);
    job.supervised = a
        .supervised
        .then(leaf_plugin::online::SupervisedReference::default);
    #[cfg(feature = "cluster")]
    let report = match (&a.cluster, &a.groups) {
        (Some(url), _) => {
            let cluster = leaf_plugin::cluster::ClusterConfig::new(url);
            let mut stream = leaf_plugin::cluster::StreamOptions::default();
            stream.idle_exit_s = a.idle_exit_s;
            leaf_plugin::cluster::train::run_until_interrupted(&job, cluster, &stream)?
        }
        (None, Some(groups)) => train_file(job, groups, a.skip_malformed)?,
        (None, None) => anyhow::bail!("give --groups FILE or --cluster URL"),
    };
    #[cfg(not(feature = "cluster"))]
    let report = match &a.groups {
        Some(groups) => train_file(job, groups, a.skip_malformed)?,
        None => anyhow::bail!("give --groups FILE"),
    };
    eprintln!(
        "leaf train: {} updates on {} groups ({} trained, {} invalid, {} all-equal, {} \
         already applied), {} versions published, now at {}",
        report.updates,
        report.groups_consumed,
        report.groups_trained,
        report.groups_invalid,
        report.groups_uninformative,
        report.groups_duplicate,
        report.published.len(),
        report.final_version
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

fn train_file(
    job: TrainJobConfig,
    groups: &std::path::Path,
    skip_malformed: bool,
) -> anyhow::Result<SourceTrainReport> {
    let mut config = OfflineTrainConfig::new(&job.model_dir, groups, &job.store);
    config.job = job;
    config.skip_malformed = skip_malformed;
    Ok(train_offline(&config)?)
}
