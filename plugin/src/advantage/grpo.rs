//! GRPO's baseline: one advantage per response, broadcast to its tokens.

use super::{AdvantageEstimator, Advantages};
use crate::rollout::Group;

/// Floor of GRPO's reward standard deviation.
const STD_FLOOR: f64 = 1.0 / 3.0;
/// Added to the floored standard deviation.
const EPS: f64 = 1e-6;

/// `A_i = (r_i - mean) / (max(std, 1/3) + 1e-6)` with the sample standard deviation; a group
/// of one gets 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grpo;

impl Grpo {
    /// The per-response advantages of `group`.
    pub fn response_advantages(group: &Group) -> Vec<f64> {
        let rewards: Vec<f64> = group.rollouts().iter().map(|r| r.reward).collect();
        if rewards.len() < 2 {
            return vec![0.0; rewards.len()];
        }
        let m = super::mean(rewards.iter().copied());
        let scale = super::sample_std(&rewards, m).max(STD_FLOOR) + EPS;
        rewards.iter().map(|r| (r - m) / scale).collect()
    }
}

impl AdvantageEstimator for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }

    fn estimate(&self, group: &Group) -> Advantages {
        let per_token = Grpo::response_advantages(group)
            .into_iter()
            .zip(group.rollouts())
            .map(|(a, r)| vec![a; r.len()])
            .collect();
        Advantages {
            per_token,
            stats: None,
            tree: None,
        }
    }
}
