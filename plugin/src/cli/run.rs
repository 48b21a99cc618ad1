//! `leaf run`: the main job (see [`leaf_plugin::job::run`]); prints a summary and writes
//! `report.json` and `reward_curve.png` to `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use leaf_plugin::job::run::{
    default_cache_dir, run as run_job, Estimator, EvalDecoding, RunConfig,
};
use leaf_plugin::speech::tasks::TaskKind;
use leaf_plugin::trainer::LossAggregation;

/// Arguments of `leaf run` (defaults: the tuned settings of [`RunConfig::default`]).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rollouts (harvested samples) to train on.
    #[arg(long, default_value_t = RunConfig::default().rollouts)]
    pub rollouts: u64,
    /// Advantage estimator.
    #[arg(long, value_enum, default_value = "leaf")]
    pub estimator: Estimator,
    /// Reward of the traffic: the completion scored against the request's reference
    /// (sentence BLEU / 100 as in the paper; exact match pays nothing for a partly right answer).
    #[arg(long, value_enum, default_value = "bleu")]
    pub metric: leaf_plugin::reward::Metric,
    /// Control run: score every answer with a seeded random number instead of --metric, to
    /// measure what the updates do to the model without any signal.
    #[arg(long)]
    pub placebo_reward: bool,
    /// Seed of the traffic, the sampling and the LoRA initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (adapter store, report.json, reward_curve.png, state.json).
    #[arg(long, default_value = "out/run")]
    pub out: PathBuf,
    /// Base model directory (skips preparing the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Cache of the default model [default: $HOME/.cache/leaf/models].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Folder of the spoken-digit recordings [default: ../shared/data/fsdd/recordings].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Continue the run saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Start afresh even when --out holds a run.
    #[arg(long)]
    pub overwrite: bool,
    /// Group size K (samples per prompt).
    #[arg(long, default_value_t = RunConfig::default().group_size)]
    pub group_size: usize,
    /// Groups per update B.
    #[arg(long, default_value_t = RunConfig::default().groups_per_update)]
    pub groups_per_update: usize,
    /// Held-out check, publish and hot-swap every this many updates.
    #[arg(long, default_value_t = RunConfig::default().publish_every)]
    pub publish_every: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = RunConfig::default().learning_rate)]
    pub lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = RunConfig::default().rank)]
    pub rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = RunConfig::default().alpha)]
    pub alpha: f64,
    /// KL penalty weight.
    #[arg(long, default_value_t = RunConfig::default().kl_beta)]
    pub kl_beta: f64,
    /// Adam's beta2, the decay of the squared-gradient average (0.95 in the LEAF spec).
    #[arg(long, default_value_t = RunConfig::default().adam_beta2)]
    pub adam_beta2: f64,
    /// LoRA+: the LoRA B matrices' learning rate is this multiple of `--lr` (1: plain LoRA).
    #[arg(long, default_value_t = RunConfig::default().lora_plus_ratio)]
    pub lora_plus_ratio: f64,
    /// PPO epochs (passes over each batch).
    #[arg(long, default_value_t = RunConfig::default().epochs)]
    pub epochs: usize,
    /// Multiplier of negative advantages in [0, 1] (1: the spec's objective; 0: only answers
    /// above their group's baseline are reinforced).
    #[arg(long, default_value_t = RunConfig::default().negative_weight)]
    pub negative_weight: f64,
    /// Sequences per forward/backward pass of an update (larger: less op overhead per
    /// sequence; smaller: less memory).
    #[arg(long, default_value_t = RunConfig::default().micro_batch)]
    pub micro_batch: usize,
    /// How token terms become the batch loss: sequence_mean (the LEAF spec's: every sequence
    /// weighs the same) or token_mean (every token weighs the same, as supervised
    /// fine-tuning's cross-entropy).
    #[arg(long, default_value_t = RunConfig::default().loss_aggregation)]
    pub loss_aggregation: LossAggregation,
    /// Reference guidance: each group also gets its request's reference answer as a member
    /// (reward 1, trained as a demonstration), so the update learns from the right answer
    /// and not only from the sampled ones.
    #[arg(long)]
    pub reference_guidance: bool,
    /// Weight of the supervised objective: every request's reference answer is also trained
    /// on as a demonstration (its log-likelihood times this weight); 0: reinforcement only.
    #[arg(long, default_value_t = RunConfig::default().supervised_weight)]
    pub supervised_weight: f64,
    /// Labelled one-response groups (requests that were not forked) per supervised update.
    #[arg(long, default_value_t = RunConfig::default().supervised_per_update)]
    pub supervised_per_update: usize,
    /// Fraction of requests that get K - 1 extra samples for reinforcement; below 1 needs
    /// the supervised objective (the others teach only it).
    #[arg(long, default_value_t = RunConfig::default().fork_fraction)]
    pub fork_fraction: f64,
    /// Distinct training prompts in the traffic, replayed cyclically (fewer prompts than
    /// rollouts / K replays each prompt more than once).
    #[arg(long, default_value_t = RunConfig::default().traffic_prompts)]
    pub prompts: usize,
    /// Task kinds of the traffic, comma-separated (recognition, translation, sum, largest,
    /// count, code_recognition, code_translation, arithmetic); repeat a kind to weight it
    /// [default: the short families, recognition, translation, sum and largest twice, count
    /// once; the pretraining's mix is recognition three times, translation, sum, largest and
    /// count once, code_recognition twice, code_translation and arithmetic once].
    #[arg(long, value_delimiter = ',')]
    pub traffic_kinds: Vec<TaskKind>,
    /// Augmented renderings (speed, gain, noise, masks) of each prompt's audio; replays after
    /// the first send them in turn, so a replayed recording sounds different (0: none).
    #[arg(long, default_value_t = RunConfig::default().traffic_augment)]
    pub augment_traffic: usize,
    /// Examples per task family of the base model's pass@K, on the families the traffic asks
    /// (cached per model).
    #[arg(long, default_value_t = RunConfig::default().ceiling_samples)]
    pub ceiling_samples: usize,
    /// Concurrent traffic clients.
    #[arg(long, default_value_t = RunConfig::default().clients)]
    pub clients: usize,
    /// Sampling temperature of the traffic.
    #[arg(long, default_value_t = RunConfig::default().temperature)]
    pub temperature: f64,
    /// Nucleus mass of the traffic.
    #[arg(long, default_value_t = RunConfig::default().top_p)]
    pub top_p: f64,
    /// How held-out checks and evaluations decode: as the server samples the traffic, or
    /// greedy (the report holds the final comparison under both).
    #[arg(long, value_enum, default_value = "serving")]
    pub eval_decoding: EvalDecoding,
    /// Examples per task family of each held-out check.
    #[arg(long, default_value_t = RunConfig::default().eval_samples)]
    pub eval_samples: usize,
    /// Examples per task family of the base and final evaluations.
    #[arg(long, default_value_t = RunConfig::default().final_eval_samples)]
    pub final_eval_samples: usize,
    /// Held-out drop (reward) that counts as a collapse and triggers a rollback.
    #[arg(long, default_value_t = RunConfig::default().collapse_drop)]
    pub collapse_drop: f64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Fault injection for tests: treat the loss of this update as NaN.
    #[arg(long, hide = true)]
    pub fault_nan_update: Option<u64>,
}

impl Args {
    /// The run configuration these arguments describe.
    pub fn config(&self) -> RunConfig {
        RunConfig {
            model: self.model.clone(),
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
            data_dir: self.data.clone(),
            out: self.out.clone(),
            estimator: self.estimator,
            metric: self.metric,
            placebo_reward: self.placebo_reward,
            rollouts: self.rollouts,
            seed: self.seed,
            group_size: self.group_size,
            groups_per_update: self.groups_per_update,
            publish_every: self.publish_every,
            learning_rate: self.lr,
            rank: self.rank,
            alpha: self.alpha,
            kl_beta: self.kl_beta,
            adam_beta2: self.adam_beta2,
            lora_plus_ratio: self.lora_plus_ratio,
            epochs: self.epochs,
            negative_weight: self.negative_weight,
            micro_batch: self.micro_batch,
            loss_aggregation: self.loss_aggregation,
            reference_guidance: self.reference_guidance,
            supervised_weight: self.supervised_weight,
            supervised_per_update: self.supervised_per_update,
            fork_fraction: self.fork_fraction,
            traffic_prompts: self.prompts,
            traffic_kinds: if self.traffic_kinds.is_empty() {
                RunConfig::default().traffic_kinds
            } else {
                self.traffic_kinds.clone()
            },
            traffic_augment: self.augment_traffic,
            ceiling_samples: self.ceiling_samples,
            clients: self.clients,
            temperature: self.temperature,
            top_p: self.top_p,
            eval_decoding: self.eval_decoding,
            eval_samples: self.eval_samples,
            final_eval_samples: self.final_eval_samples,
            collapse_drop: self.collapse_drop,
            resume: self.resume,
            overwrite: self.overwrite,
            progress: !self.quiet,
            fault_nan_update: self.fault_nan_update,
            ..RunConfig::default()
        }
    }
}

/// Runs `leaf run`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let config = a.config();
    let report = run_job(&config)?;
    eprintln!(
        "leaf run: {} rollouts ({}), {} updates, {} swaps, {} rollbacks in {:.0} s",
        report.rollouts,
        report.estimator,
        report.updates,
        report.swaps,
        report.rollbacks,
        report.wall_seconds
    );
    // Base -> final under the decoding the run gated on, then under the other one.
    let line = |decoding: EvalDecoding, reward: (f64, f64), exact: (f64, f64)| {
        eprintln!(
            "leaf run: held-out reward {:.3} -> {:.3}, exact match {:.3} -> {:.3} (base -> final, \
             {} decoding)",
            reward.0,
            reward.1,
            exact.0,
            exact.1,
            decoding.name()
        )
    };
    line(
        report.eval_decoding,
        (report.base_reward, report.final_reward),
        (report.base_exact_match, report.final_exact_match),
    );
    let o = &report.other_decoding;
    line(
        o.decoding,
        (o.base_reward, o.final_reward),
        (o.base_exact_match, o.final_exact_match),
    );
    eprintln!("leaf run: what learning did (greedy on held-out test takes):");
    for line in report.diagnostics_lines() {
        eprintln!("  {line}");
    }
    eprintln!(
        "leaf run: wrote {} and {}",
        config.out.join("report.json").display(),
        config.out.join("reward_curve.png").display()
    );
    eprintln!("leaf run: re-evaluate with: {}", report.reproduce);
    Ok(ExitCode::SUCCESS)
}
