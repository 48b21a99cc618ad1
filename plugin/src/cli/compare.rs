//! `leaf compare`: LEAF against GRPO on the same budget, several seeds (see
//! [`leaf_plugin::job::compare`]); writes compare.md, compare.json and compare.png.

use std::path::PathBuf;
use std::process::ExitCode;

use leaf_plugin::job::compare::{compare, CompareConfig};
use leaf_plugin::job::run::{Estimator, EvalDecoding, RunConfig};

/// Arguments of `leaf compare`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seeds per estimator (0..N).
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Rollouts per run (reinforcement only: [`RunConfig::reinforcement_only`]).
    #[arg(long, default_value_t = RunConfig::reinforcement_only().rollouts)]
    pub rollouts: u64,
    /// Output directory.
    #[arg(long, default_value = "out/compare")]
    pub out: PathBuf,
    /// The shared run settings (K, B, learning rate, rank, ...); their --out, --seed,
    /// --estimator, --resume and --overwrite are ignored.
    #[command(flatten)]
    pub run: CompareRunArgs,
}

/// Settings shared by every run of the comparison.
#[derive(clap::Args, Debug)]
pub struct CompareRunArgs {
    /// Base model directory (skips preparing the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Cache of the default model [default: $HOME/.cache/leaf/models].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Folder of the spoken-digit recordings.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Reward of the traffic (sentence BLEU / 100 as in the paper, or exact match, chrF, ...).
    #[arg(long, value_enum, default_value = "bleu")]
    pub metric: leaf_plugin::reward::Metric,
    /// Group size K.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().group_size)]
    pub group_size: usize,
    /// Groups per update B.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().groups_per_update)]
    pub groups_per_update: usize,
    /// Held-out check every this many updates.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().publish_every)]
    pub publish_every: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().learning_rate)]
    pub lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().rank)]
    pub rank: usize,
    /// Multiplier of negative advantages in [0, 1] (1: the spec's objective).
    #[arg(long, default_value_t = RunConfig::reinforcement_only().negative_weight)]
    pub negative_weight: f64,
    /// Examples per task family of each held-out check.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().eval_samples)]
    pub eval_samples: usize,
    /// How held-out checks and evaluations decode: as the server samples, or greedy.
    #[arg(long, value_enum, default_value = "serving")]
    pub eval_decoding: EvalDecoding,
    /// Examples per task family of the final evaluations.
    #[arg(long, default_value_t = RunConfig::reinforcement_only().final_eval_samples)]
    pub final_eval_samples: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `leaf compare`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let d = RunConfig::reinforcement_only();
    let run = RunConfig {
        model: a.run.model,
        cache_dir: a.run.cache_dir.unwrap_or(d.cache_dir.clone()),
        data_dir: a.run.data,
        rollouts: a.rollouts,
        metric: a.run.metric,
        group_size: a.run.group_size,
        groups_per_update: a.run.groups_per_update,
        publish_every: a.run.publish_every,
        learning_rate: a.run.lr,
        rank: a.run.rank,
        alpha: 2.0 * a.run.rank as f64,
        negative_weight: a.run.negative_weight,
        eval_samples: a.run.eval_samples,
        eval_decoding: a.run.eval_decoding,
        final_eval_samples: a.run.final_eval_samples,
        progress: !a.run.quiet,
        ..d
    };
    let config = CompareConfig {
        run,
        seeds: a.seeds,
        estimators: vec![Estimator::Leaf, Estimator::Grpo],
        out: a.out.clone(),
    };
    let report = compare(&config)?;
    for s in &report.summary {
        eprintln!(
            "leaf compare: {}: held-out reward {:.3} -> {:.3} ± {:.3}, exact match {:.3} -> {:.3} ± {:.3}",
            s.estimator,
            s.base_reward,
            s.final_reward.mean,
            s.final_reward.std,
            s.base_exact_match,
            s.final_exact_match.mean,
            s.final_exact_match.std
        );
    }
    eprintln!(
        "leaf compare: wrote {}, {} and {}",
        a.out.join("compare.md").display(),
        a.out.join("compare.json").display(),
        a.out.join("compare.png").display()
    );
    Ok(ExitCode::SUCCESS)
}
