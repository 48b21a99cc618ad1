//! `leaf reward`: scores hypotheses against references, one JSON object per line.
//!
//! In: `{"hyp": "...", "ref": "..."}` per line (other fields are ignored). Out:
//! `{"score": x}` per line, on the metric's own scale: BLEU and chrF 0-100 (sacreBLEU),
//! WER and CER as error rates (jiwer), exact as 0 or 1; `--as-reward` prints the [0, 1]
//! reward the trainer uses instead. A bad line is reported on stderr with its number, the
//! other lines are still scored, and the exit status is non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use leaf_plugin::reward::{Metric, RewardOptions};
use serde::Deserialize;

use super::jsonl;

/// Arguments of `leaf reward`.
#[derive(clap::Args)]
pub struct Args {
    /// The metric.
    #[arg(long, value_enum)]
    metric: Metric,
    /// Compare case-insensitively (sacreBLEU `-lc`; jiwer `ToLowerCase`).
    #[arg(long)]
    lowercase: bool,
    /// Print the [0, 1] reward (higher is better) instead of the raw score.
    #[arg(long)]
    as_reward: bool,
    /// JSON Lines input; stdin when absent.
    #[arg(long)]
    input: Option<PathBuf>,
}

/// One input line.
#[derive(Deserialize)]
struct Pair {
    hyp: String,
    #[serde(rename = "ref")]
    reference: String,
}

/// Runs `leaf reward`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = RewardOptions {
        lowercase: args.lowercase,
    };
    let reward = args.metric.reward(options);
    let input = jsonl::open_input(args.input.as_deref())?;
    jsonl::for_each_line(input, |line| {
        let pair: Pair =
            serde_json::from_str(line).context("expected {\"hyp\": string, \"ref\": string}")?;
        let score = if args.as_reward {
            reward.score(&pair.hyp, &pair.reference)
        } else {
            args.metric.raw_score(&pair.hyp, &pair.reference, options)
        };
        Ok(serde_json::json!({ "score": score }))
    })
}
