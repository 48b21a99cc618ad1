//! `leaf advantages`: JSON Lines groups in, per-token advantages out.
//!
//! Input, one group per line:
//! `{"group_id": "...", "rollouts": [{"tokens": [int...], "logprobs": [float...], "reward": float}, ...]}`.
//! Output, one line per group: `{"group_id": "...", "advantages": [[...], ...], "tree": {...}}`
//! (`tree` for LEAF only). Floats are printed with full f64 round-trip precision.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use leaf_plugin::advantage::{EstimatorConfig, LeafConfig, Terms};
use leaf_plugin::rollout::{Group, Rollout};
use serde::Deserialize;

use super::jsonl;

/// Which estimator `leaf advantages` runs.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Estimator {
    /// LEAF span advantages.
    Leaf,
    /// GRPO per-response advantages.
    Grpo,
}

/// Arguments of `leaf advantages`.
#[derive(clap::Args)]
pub struct Args {
    /// Read groups from this file instead of stdin.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The advantage estimator.
    #[arg(long, value_enum, default_value = "leaf")]
    estimator: Estimator,
    /// B: at most this many fork boundaries per group (LEAF).
    #[arg(long, default_value_t = 2)]
    fork_budget: usize,
    /// No fork boundary before this position (LEAF).
    #[arg(long, default_value_t = 1)]
    min_prefix: usize,
    /// Advantage terms: both, global or local (LEAF).
    #[arg(long, default_value = "both")]
    terms: Terms,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupLine {
    group_id: String,
    rollouts: Vec<Rollout>,
}

/// Runs `leaf advantages`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = match args.estimator {
        Estimator::Leaf => EstimatorConfig::Leaf(LeafConfig {
            fork_budget: args.fork_budget,
            min_prefix: args.min_prefix,
            terms: args.terms,
        }),
        Estimator::Grpo => EstimatorConfig::Grpo,
    };
    let estimator = config.build();
    let input = jsonl::open_input(args.input.as_deref())?;
    jsonl::for_each_line(input, |line| {
        let parsed: GroupLine = serde_json::from_str(line).context("malformed group")?;
        let group = Group::new(parsed.group_id, parsed.rollouts)?;
        let adv = estimator.estimate_with_tree(&group);
        let mut out = serde_json::json!({ "group_id": group.id(), "advantages": adv.per_token });
        if let Some(tree) = adv.tree {
            let mut tree_json = serde_json::to_value(&tree)?;
            tree_json["stats"] = tree.stats.summary();
            out["tree"] = tree_json;
        }
        Ok(out)
    })
}
