//! Where rewards come from.
//!
//! A [`RewardSource`] is asked once per harvested sample, right after the final response (off
//! the client's path). It either returns the reward now, or `None`: the sample then waits in
//! its group for feedback through [`crate::serving::LeafServer::feedback`] with the request id,
//! until the group's timeout.
//!
//! [`ReferenceReward`] scores the completion text against the reference attached to the request
//! with one of the [`crate::reward`] metrics; requests without a reference wait for feedback.

use async_trait::async_trait;

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
    reward: Box<dyn Reward>,
}

impl std::fmt::Debug for ReferenceReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceReward")
            .field("metric", &self.metric)
            .finish()
    }
}

impl ReferenceReward {
    /// A reference reward with `metric` (e.g. [`Metric::Bleu`], the spec's default).
    pub fn new(metric: Metric, options: RewardOptions) -> Self {
        ReferenceReward {
            metric,
            reward: metric.reward(options),
        }
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
        ctx.reference.map(|r| self.reward.score(ctx.text, r))
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

    #[tokio::test]
    async fn reference_reward_scores_with_the_metric() {
        let r = ReferenceReward::new(Metric::Exact, RewardOptions::default());
        assert_eq!(r.score(ctx("seven", Some("Seven"))).await, Some(1.0));
        assert_eq!(r.score(ctx("six", Some("seven"))).await, Some(0.0));
        assert_eq!(r.score(ctx("six", None)).await, None);
        assert_eq!(FeedbackOnly.score(ctx("six", Some("six"))).await, None);
    }
}
