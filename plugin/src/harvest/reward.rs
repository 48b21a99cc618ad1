//! Where rewards come from.
//!
//! A [`RewardSource`] is asked once per harvested sample, right after the final response (off
//! the client's path). It either returns the reward now, or `None`: the sample then waits in
//! its group for feedback through [`crate::serving::LeafServer::feedback`] with the request id,
//! until the group's timeout.
//!
//! [`ReferenceReward`] scores the completion text against the reference attached to the request
//! with one of the [`crate::reward`] metrics, on the blocking pool (the metrics are plain CPU
//! work); requests without a reference wait for feedback.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::reward::{Metric, Reward, RewardOptions};

/// What a reward source may look at.
#[derive(Debug, Clone, Copy)]
pub struct RewardContext<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The completion text as the client received it.
    pub text: &'a str,
    /// The reference answer attached to the request, if any.
    pub reference: Option<&'a str>,
    /// The task name attached to the request, if any.
    pub task: Option<&'a str>,
    /// The generated ids.
    pub completion_ids: &'a [u32],
}

/// A source of rewards for harvested samples.
#[async_trait]
pub trait RewardSource: Send + Sync {
    /// Short name for logs and status.
    fn name(&self) -> &str;

    /// The reward of this completion now (finite, normally in [0, 1]), or `None` to wait for
    /// feedback by request id.
    async fn score(&self, ctx: RewardContext<'_>) -> Option<f64>;
}

/// Scores the completion against the request's reference with a metric from
/// [`crate::reward`]; `None` (wait for feedback) when the request has no reference.
pub struct ReferenceReward {
    metric: Metric,
    reward: Arc<dyn Reward>,
    placebo: Option<u64>,
}

impl std::fmt::Debug for ReferenceReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceReward")
            .field("metric", &self.metric)
            .field("placebo", &self.placebo)
            .finish()
    }
}

impl ReferenceReward {
    /// A reference reward with `metric` (e.g. [`Metric::Bleu`], the spec's default).
    pub fn new(metric: Metric, options: RewardOptions) -> Self {
        ReferenceReward {
            metric,
            reward: Arc::from(metric.reward(options)),
            placebo: None,
        }
    }

    /// A control run's reward: every completion that has a reference still gets a reward, but
    /// it is a number in [0, 1) drawn from `seed`, the request id and the generated ids, with
    /// no link to the answer's quality. Training on it shows what the updates do without
    /// signal (drift from optimiser noise), the baseline a real reward must beat.
    pub fn placebo(mut self, seed: u64) -> Self {
        self.placebo = Some(seed);
        self
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }
}

#[async_trait]
impl RewardSource for ReferenceReward {
    fn name(&self) -> &str {
        self.reward.name()
    }

    async fn score(&self, ctx: RewardContext<'_>) -> Option<f64> {
        let reference = ctx.reference?;
        if let Some(seed) = self.placebo {
            return Some(placebo_draw(seed, ctx.request_id, ctx.completion_ids));
        }
        // Off the async workers when there is a runtime: BLEU of a long text is CPU work.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Some(self.reward.score(ctx.text, reference));
        };
        let (reward, text, reference) = (
            self.reward.clone(),
            ctx.text.to_string(),
            reference.to_string(),
        );
        match runtime
            .spawn_blocking(move || reward.score(&text, &reference))
            .await
        {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(request_id = ctx.request_id, error = %e,
                    "reward scoring failed; the sample waits for feedback");
                None
            }
        }
    }
}

/// A uniform number in [0, 1) from FNV-1a over the request id and the ids, finished with
/// splitmix64: the same inputs give the same number on every platform.
fn placebo_draw(seed: u64, request_id: &str, ids: &[u32]) -> f64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let bytes = request_id
        .bytes()
        .chain([0xff])
        .chain(ids.iter().flat_map(|t| t.to_le_bytes()));
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The rewards a client may send as feedback: finite and within `[min, max]`.
///
/// The default, [0, 1], is the range every [`crate::reward`] metric produces, so feedback and
/// reference rewards of one group are on the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RewardRange {
    /// Lowest accepted reward. Default 0.
    pub min: f64,
    /// Highest accepted reward. Default 1.
    pub max: f64,
}

impl Default for RewardRange {
    fn default() -> Self {
        RewardRange { min: 0.0, max: 1.0 }
    }
}

impl RewardRange {
    /// Checks the range itself: finite bounds with `min < max`.
    pub fn check(&self) -> Result<(), String> {
        if self.min.is_finite() && self.max.is_finite() && self.min < self.max {
            Ok(())
        } else {
            Err(format!(
                "feedback_reward_range [{}, {}] needs finite bounds with min < max",
                self.min, self.max
            ))
        }
    }

    /// Checks one reward: finite and within the range; the error names the range.
    pub fn accept(&self, reward: f64) -> Result<f64, String> {
        if reward.is_finite() && (self.min..=self.max).contains(&reward) {
            Ok(reward)
        } else {
            Err(format!(
                "reward {reward} is outside the accepted range [{}, {}] (feedback_reward_range)",
                self.min, self.max
            ))
        }
    }
}

/// Never scores by itself: every sample waits for feedback.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeedbackOnly;

#[async_trait]
impl RewardSource for FeedbackOnly {
    fn name(&self) -> &str {
        "feedback"
    }

    async fn score(&self, _ctx: RewardContext<'_>) -> Option<f64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(text: &'a str, reference: Option<&'a str>) -> RewardContext<'a> {
        RewardContext {
            request_id: "r",
            text,
            reference,
            task: None,
            completion_ids: &[],
        }
    }

    #[test]
    fn reward_ranges_refuse_non_finite_and_out_of_range_values() {
        let r = RewardRange::default();
        assert_eq!(r.accept(0.0), Ok(0.0));
        assert_eq!(r.accept(1.0), Ok(1.0));
        for bad in [f64::NAN, f64::INFINITY, -0.01, 1.5, 1e300] {
            let e = r.accept(bad).unwrap_err();
            assert!(e.contains("[0, 1]"), "{e}");
        }
        assert!(RewardRange {
            min: -1.0,
            max: 1.0
        }
        .check()
        .is_ok());
        for (min, max) in [
            (1.0, 1.0),
            (2.0, 1.0),
            (f64::NAN, 1.0),
            (0.0, f64::INFINITY),
        ] {
            assert!(RewardRange { min, max }.check().is_err(), "{min} {max}");
        }
    }

    #[tokio::test]
    async fn reference_reward_scores_with_the_metric() {
        let r = ReferenceReward::new(Metric::Exact, RewardOptions::default());
        assert_eq!(r.score(ctx("seven", Some("Seven"))).await, Some(1.0));
        assert_eq!(r.score(ctx("six", Some("seven"))).await, Some(0.0));
        assert_eq!(r.score(ctx("six", None)).await, None);
        assert_eq!(FeedbackOnly.score(ctx("six", Some("six"))).await, None);
    }

    #[tokio::test]
    async fn placebo_reward_ignores_the_answer() {
        let r = ReferenceReward::new(Metric::Exact, RewardOptions::default()).placebo(7);
        // No reference: still waits for feedback.
        assert_eq!(r.score(ctx("six", None)).await, None);
        let right = r.score(ctx("seven", Some("seven"))).await.unwrap();
        assert!((0.0..1.0).contains(&right));
        // Deterministic per seed, request and ids; another seed or other ids give another draw.
        assert_eq!(
            placebo_draw(7, "r1", &[1, 2]),
            placebo_draw(7, "r1", &[1, 2])
        );
        assert_ne!(
            placebo_draw(7, "r1", &[1, 2]),
            placebo_draw(8, "r1", &[1, 2])
        );
        assert_ne!(
            placebo_draw(7, "r1", &[1, 2]),
            placebo_draw(7, "r1", &[1, 3])
        );
        // Roughly uniform: the mean of 4,000 draws is within 0.02 of 1/2, every quarter is hit.
        let draws: Vec<f64> = (0..4000u32).map(|i| placebo_draw(1, "r", &[i])).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        for q in 0..4 {
            let lo = q as f64 / 4.0;
            let n = draws.iter().filter(|&&d| d >= lo && d < lo + 0.25).count();
            assert!((850..1150).contains(&n), "quarter {q}: {n}");
        }
    }
}
