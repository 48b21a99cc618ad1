//! Sealed groups -> validated groups -> advantages -> trainer samples: the one conversion
//! both the online trainer and the main job's learner run before an update.

use crate::advantage::{AdvantageEstimator, ForkStats};
use crate::harvest::SealedGroup;
use crate::trainer::TrainSample;

/// A batch of sealed groups, ready for [`Trainer::step`](crate::trainer::Trainer::step).
#[derive(Debug, Default)]
pub struct PreparedBatch {
    /// One sample per harvested response, with its per-token advantages, behaviour
    /// log-probs and the adapter version that served it.
    pub samples: Vec<TrainSample>,
    /// The reward of each sample, in the same order.
    pub rewards: Vec<f64>,
    /// Fork counts of the estimator over the batch (zero for GRPO).
    pub forks: ForkStats,
    /// Groups that became samples.
    pub groups: u64,
    /// Groups skipped because they did not validate (logged and counted in
    /// `leaf_groups_invalid_total`).
    pub invalid: u64,
}

impl PreparedBatch {
    /// True when no sample has a token to train on.
    pub fn is_empty(&self) -> bool {
        self.samples.iter().all(|s| s.completion.is_empty())
    }
}

/// Runs `estimator` on every group of `batch` and builds the trainer samples.
pub fn prepare_batch(batch: &[SealedGroup], estimator: &dyn AdvantageEstimator) -> PreparedBatch {
    let mut out = PreparedBatch::default();
    for sealed in batch {
        let group = match sealed.to_group() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(group = %sealed.id, error = %e, "invalid group skipped");
                metrics::counter!("leaf_groups_invalid_total").increment(1);
                out.invalid += 1;
                continue;
            }
        };
        let adv = estimator.estimate(&group);
        if let Some(s) = &adv.stats {
            out.forks.merge(s);
        }
        for ((s, r), a) in sealed.members.iter().zip(adv.per_token) {
            out.rewards.push(*r);
            out.samples.push(TrainSample {
                prompt: s.prompt_ids.clone(),
                completion: s.completion_ids.clone(),
                advantages: a,
                behaviour_logprobs: s.logprobs.clone(),
                behaviour_version: s.adapter_version.clone(),
            });
        }
        out.groups += 1;
    }
    out
}
