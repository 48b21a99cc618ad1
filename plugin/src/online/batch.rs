//! Sourced groups -> validated groups -> advantages -> trainer samples: the one conversion
//! both the online trainer and the main job's learner run before an update.

use serde::{Deserialize, Serialize};

use super::source::SourcedGroup;
use crate::advantage::{AdvantageEstimator, ForkStats};
use crate::trainer::TrainSample;

/// An advantage whose magnitude is below this counts as zero (z-scoring equal span values
/// leaves rounding residue of about 1e-10 rather than exact zeros).
pub const ZERO_ADVANTAGE: f64 = 1e-9;

/// A batch of groups, ready for [`Trainer::step`](crate::trainer::Trainer::step).
#[derive(Debug, Default)]
pub struct PreparedBatch {
    /// One sample per harvested response of an informative group, with its per-token
    /// advantages, behaviour log-probs and the adapter version that served it.
    pub samples: Vec<TrainSample>,
    /// Fork counts of the estimator over the batch (zero for GRPO).
    pub forks: ForkStats,
    /// Groups that became samples.
    pub groups: u64,
    /// Groups skipped because they did not validate (logged and counted in
    /// `leaf_groups_invalid_total`).
    pub invalid: u64,
    /// Groups left out because every advantage was zero (all rewards equal: nothing to learn;
    /// counted in `leaf_groups_uninformative_total`).
    pub uninformative: u64,
    /// Responses harvested in the batch, trained on or not (what a rollout budget counts).
    pub harvested: u64,
    /// Rewards of every valid group's responses, informative or not.
    pub all_rewards: Vec<f64>,
    /// Advantage statistics over the valid groups, before the uninformative ones are left out.
    pub stats: BatchStats,
}

impl PreparedBatch {
    /// True when no sample has a token to train on.
    pub fn is_empty(&self) -> bool {
        self.samples.iter().all(|s| s.completion.is_empty())
    }
}

/// What the advantages of a batch looked like (the diagnostics of why an update moves the
/// policy or does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Valid groups.
    pub groups: u64,
    /// Share of valid groups whose rewards are not all equal (the only ones with signal).
    pub informative_group_share: f64,
    /// Mean per-token advantage over every response token of the valid groups.
    pub advantage_mean: f64,
    /// Its standard deviation (population).
    pub advantage_std: f64,
    /// Share of those tokens whose advantage is zero (below [`ZERO_ADVANTAGE`]).
    pub zero_advantage_share: f64,
    /// Mean reward of the valid groups' responses.
    pub reward_mean: f64,
}

#[derive(Default)]
struct Moments {
    n: u64,
    zero: u64,
    sum: f64,
    sum_sq: f64,
}

impl Moments {
    fn add(&mut self, a: f64) {
        self.n += 1;
        self.sum += a;
        self.sum_sq += a * a;
        if a.abs() < ZERO_ADVANTAGE {
            self.zero += 1;
        }
    }

    fn stats(&self, groups: u64, informative: u64, rewards: &[f64]) -> BatchStats {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mean = ratio(self.sum, self.n as f64);
        let var = (ratio(self.sum_sq, self.n as f64) - mean * mean).max(0.0);
        BatchStats {
            groups,
            informative_group_share: ratio(informative as f64, groups as f64),
            advantage_mean: mean,
            advantage_std: var.sqrt(),
            zero_advantage_share: ratio(self.zero as f64, self.n as f64),
            reward_mean: ratio(rewards.iter().sum(), rewards.len() as f64),
        }
    }
}

/// Runs `estimator` on every group of `batch` and builds the trainer samples. Groups whose
/// advantages are all zero are left out (an update never comes from them) but counted, and
/// they take part in [`PreparedBatch::stats`].
pub fn prepare_batch(batch: &[SourcedGroup], estimator: &dyn AdvantageEstimator) -> PreparedBatch {
    let mut out = PreparedBatch::default();
    let mut moments = Moments::default();
    let mut valid = 0u64;
    for sourced in batch {
        out.harvested += sourced.rollouts.len() as u64;
        if sourced.prompt_ids.is_empty() {
            tracing::warn!(group = %sourced.id, "group without prompt ids skipped");
            metrics::counter!("leaf_groups_invalid_total").increment(1);
            out.invalid += 1;
            continue;
        }
        let group = match sourced.to_group() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(group = %sourced.id, error = %e, "invalid group skipped");
                metrics::counter!("leaf_groups_invalid_total").increment(1);
                out.invalid += 1;
                continue;
            }
        };
        valid += 1;
        let adv = estimator.estimate(&group);
        if let Some(s) = &adv.stats {
            out.forks.merge(s);
        }
        adv.per_token.iter().flatten().for_each(|a| moments.add(*a));
        out.all_rewards
            .extend(sourced.rollouts.iter().map(|r| r.reward));
        let informative = adv
            .per_token
            .iter()
            .flatten()
            .any(|a| a.abs() >= ZERO_ADVANTAGE);
        if !informative {
            metrics::counter!("leaf_groups_uninformative_total").increment(1);
            out.uninformative += 1;
            continue;
        }
        for (i, (r, a)) in sourced.rollouts.iter().zip(adv.per_token).enumerate() {
            out.samples.push(TrainSample {
                prompt: sourced.prompt_ids.clone(),
                completion: r.tokens.clone(),
                advantages: a,
                behaviour_logprobs: r.logprobs.clone(),
                behaviour_version: sourced.behaviour_version(i).to_string(),
            });
        }
        out.groups += 1;
    }
    out.stats = moments.stats(valid, out.groups, &out.all_rewards);
    out
}
