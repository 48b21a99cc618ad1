//! What each update did and where the time went: the numbers that explain whether learning
//! moves the served model. Both learners (`leaf serve --online` and `leaf run`) build one
//! [`UpdateRecord`] per update and export it as `leaf_*` gauges; `leaf run` also keeps them
//! in `report.json`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::batch::{BatchStats, PreparedBatch};
use crate::harvest::{RewardContext, RewardSource};
use crate::trainer::StepStats;

/// The adapter versions a learner has served, oldest first: how many versions stale a sample
/// is, is the distance between the version that served it and the one being trained.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionHistory {
    versions: Vec<String>,
}

impl VersionHistory {
    /// A history that starts at `version`.
    pub fn starting_at(version: impl Into<String>) -> Self {
        VersionHistory {
            versions: vec![version.into()],
        }
    }

    /// Records that `version` is served from now on.
    pub fn push(&mut self, version: impl Into<String>) {
        let v = version.into();
        if self.versions.last() != Some(&v) {
            self.versions.push(v);
        }
    }

    /// Versions between the one that served each sample and `current`: `(mean, max)` over the
    /// samples whose version the history knows (`(0, 0)` when none is known).
    pub fn staleness<'a>(
        &self,
        current: &str,
        served_by: impl Iterator<Item = &'a str>,
    ) -> (f64, u64) {
        let Some(now) = self.versions.iter().rposition(|v| v == current) else {
            return (0.0, 0);
        };
        let (mut sum, mut n, mut max) = (0u64, 0u64, 0u64);
        for v in served_by {
            if let Some(at) = self.versions[..=now].iter().rposition(|x| x == v) {
                let d = (now - at) as u64;
                sum += d;
                n += 1;
                max = max.max(d);
            }
        }
        if n == 0 {
            (0.0, 0)
        } else {
            (sum as f64 / n as f64, max)
        }
    }
}

/// One update's diagnostics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// 1-based update number.
    pub update: u64,
    /// Rollouts harvested up to and including this update's batch.
    pub rollouts: u64,
    /// Policy entropy per token (nats), from the trainer (see [`StepStats::entropy`]).
    pub entropy: f64,
    /// k3 KL to the base model, per token.
    pub kl: f64,
    /// Share of tokens whose PPO clip was active.
    pub clip_fraction: f64,
    /// Mean importance ratio of the policy against the distribution that sampled each token.
    pub ratio_mean: f64,
    /// Largest such ratio.
    pub ratio_max: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss.
    pub loss: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Advantage statistics of the batch.
    pub batch: BatchStats,
    /// Mean staleness of the samples, in adapter versions.
    pub staleness_mean: f64,
    /// Largest staleness.
    pub staleness_max: u64,
}

impl UpdateRecord {
    /// The record of an update that trained on `batch` with result `step`.
    pub fn new(
        update: u64,
        rollouts: u64,
        step: &StepStats,
        batch: &PreparedBatch,
        staleness: (f64, u64),
    ) -> Self {
        UpdateRecord {
            update,
            rollouts,
            entropy: step.entropy,
            kl: step.kl,
            clip_fraction: step.clip_fraction,
            ratio_mean: step.ratio_mean,
            ratio_max: step.ratio_max,
            grad_norm: step.grad_norm,
            loss: step.loss,
            learning_rate: step.learning_rate,
            batch: batch.stats,
            staleness_mean: staleness.0,
            staleness_max: staleness.1,
        }
    }

    /// Sets the `leaf_*` gauges of the last update.
    pub fn export(&self) {
        let g = |name: &'static str, v: f64| metrics::gauge!(name).set(v);
        g("leaf_policy_entropy_nats", self.entropy);
        g("leaf_kl_to_base", self.kl);
        g("leaf_clip_fraction", self.clip_fraction);
        g("leaf_importance_ratio_mean", self.ratio_mean);
        g("leaf_importance_ratio_max", self.ratio_max);
        g("leaf_grad_norm", self.grad_norm);
        g("leaf_loss", self.loss);
        g("leaf_learning_rate", self.learning_rate);
        g("leaf_advantage_mean", self.batch.advantage_mean);
        g("leaf_advantage_std", self.batch.advantage_std);
        g(
            "leaf_zero_advantage_token_share",
            self.batch.zero_advantage_share,
        );
        g(
            "leaf_informative_group_share",
            self.batch.informative_group_share,
        );
        g("leaf_guided_group_share", self.batch.guided_group_share);
        g("leaf_staleness_versions", self.staleness_mean);
        g("leaf_staleness_versions_max", self.staleness_max as f64);
    }
}

/// Means of the records (the summary `leaf run` prints and writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateSummary {
    /// Updates summarised.
    pub updates: u64,
    /// Mean entropy per token (nats), first and last quarter of the run.
    pub entropy_first: f64,
    /// See `entropy_first`.
    pub entropy_last: f64,
    /// Mean KL to the base model over the last quarter.
    pub kl_last: f64,
    /// Mean clip fraction.
    pub clip_fraction: f64,
    /// Mean importance ratio.
    pub ratio_mean: f64,
    /// Largest importance ratio seen.
    pub ratio_max: f64,
    /// Mean gradient norm.
    pub grad_norm: f64,
    /// Mean advantage standard deviation.
    pub advantage_std: f64,
    /// Mean share of zero-advantage tokens.
    pub zero_advantage_share: f64,
    /// Mean share of informative groups.
    pub informative_group_share: f64,
    /// Mean share of groups that got their reference as a member (reference guidance).
    #[serde(default)]
    pub guided_group_share: f64,
    /// References trained on as supervised demonstrations, summed over the updates.
    #[serde(default)]
    pub supervised: u64,
    /// Mean staleness (versions).
    pub staleness_mean: f64,
    /// Largest staleness.
    pub staleness_max: u64,
}

impl UpdateSummary {
    /// The summary of `records` (all zero when there are none).
    pub fn of(records: &[UpdateRecord]) -> Self {
        let n = records.len();
        if n == 0 {
            return UpdateSummary::default();
        }
        let mean = |rs: &[UpdateRecord], f: &dyn Fn(&UpdateRecord) -> f64| {
            rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
        };
        let q = n.div_ceil(4);
        let (head, tail) = (&records[..q], &records[n - q..]);
        UpdateSummary {
            updates: n as u64,
            entropy_first: mean(head, &|r| r.entropy),
            entropy_last: mean(tail, &|r| r.entropy),
            kl_last: mean(tail, &|r| r.kl),
            clip_fraction: mean(records, &|r| r.clip_fraction),
            ratio_mean: mean(records, &|r| r.ratio_mean),
            ratio_max: records.iter().map(|r| r.ratio_max).fold(0.0, f64::max),
            grad_norm: mean(records, &|r| r.grad_norm),
            advantage_std: mean(records, &|r| r.batch.advantage_std),
            zero_advantage_share: mean(records, &|r| r.batch.zero_advantage_share),
            informative_group_share: mean(records, &|r| r.batch.informative_group_share),
            guided_group_share: mean(records, &|r| r.batch.guided_group_share),
            supervised: records.iter().map(|r| r.batch.supervised).sum(),
            staleness_mean: mean(records, &|r| r.staleness_mean),
            staleness_max: records.iter().map(|r| r.staleness_max).max().unwrap_or(0),
        }
    }
}

/// A phase of a learner's wall time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for sealed groups: the server generating samples (and scoring them).
    Generation,
    /// Reward scoring, measured inside the reward source (overlaps generation).
    Rewards,
    /// Advantage estimation (LEAF trees or GRPO) and batch preparation.
    Advantages,
    /// LoRA updates.
    Training,
    /// Held-out checks of candidate adapters.
    HeldoutChecks,
    /// Publishing to the store and hot-swapping.
    Swaps,
}

impl Phase {
    /// The `phase` label value.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Generation => "generation",
            Phase::Rewards => "rewards",
            Phase::Advantages => "advantages",
            Phase::Training => "training",
            Phase::HeldoutChecks => "heldout_checks",
            Phase::Swaps => "swaps",
        }
    }
}

/// Seconds per [`Phase`], also exported as the gauge `leaf_learner_phase_seconds{phase=...}`
/// (cumulative seconds of the learner thread).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Seconds per phase name.
    pub seconds: BTreeMap<Phase, f64>,
}

impl PhaseTimes {
    /// Adds `seconds` to `phase`.
    pub fn add(&mut self, phase: Phase, seconds: f64) {
        *self.seconds.entry(phase).or_default() += seconds;
        metrics::gauge!("leaf_learner_phase_seconds", "phase" => phase.name())
            .set(self.seconds[&phase]);
    }

    /// Runs `f`, adding its wall time to `phase`.
    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.add(phase, t0.elapsed().as_secs_f64());
        out
    }

    /// Seconds of `phase` (0 when never timed).
    pub fn get(&self, phase: Phase) -> f64 {
        self.seconds.get(&phase).copied().unwrap_or(0.0)
    }
}

/// A reward source that counts the wall time its inner source spends scoring (the
/// [`Phase::Rewards`] share of a run), also as `leaf_reward_seconds` observations.
#[derive(Debug)]
pub struct TimedReward<R> {
    inner: R,
    nanos: std::sync::atomic::AtomicU64,
}

impl<R> TimedReward<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        TimedReward {
            inner,
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Seconds spent scoring so far.
    pub fn seconds(&self) -> f64 {
        self.nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }
}

#[async_trait::async_trait]
impl<R: RewardSource> RewardSource for TimedReward<R> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn score(&self, ctx: RewardContext<'_>) -> Option<f64> {
        let t0 = Instant::now();
        let r = self.inner.score(ctx).await;
        let dt = t0.elapsed();
        self.nanos.fetch_add(
            u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        metrics::histogram!("leaf_reward_seconds").record(dt.as_secs_f64());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_counts_versions_between_server_and_trainer() {
        let mut h = VersionHistory::starting_at("base");
        h.push("v1");
        h.push("v1");
        h.push("v2");
        let served = ["v2", "v1", "base", "unknown"];
        let (mean, max) = h.staleness("v2", served.iter().copied());
        assert_eq!(max, 2);
        assert!((mean - 1.0).abs() < 1e-12);
        // The trainer at an older version than a sample (a rollback) counts no staleness for
        // versions after it, which the history up to `current` does not hold.
        assert_eq!(h.staleness("v1", ["v2"].into_iter()), (0.0, 0));
        assert_eq!(h.staleness("nope", ["v2"].into_iter()), (0.0, 0));
    }

    #[test]
    fn summary_of_nothing_is_zero_and_quarters_split_the_run() {
        assert_eq!(UpdateSummary::of(&[]), UpdateSummary::default());
        let rec = |u: u64, entropy: f64| UpdateRecord {
            update: u,
            rollouts: u * 32,
            entropy,
            kl: 0.01 * u as f64,
            clip_fraction: 0.0,
            ratio_mean: 1.0,
            ratio_max: 1.0 + u as f64,
            grad_norm: 1.0,
            loss: 0.0,
            learning_rate: 1e-3,
            batch: BatchStats::default(),
            staleness_mean: 0.5,
            staleness_max: u,
        };
        let rs: Vec<UpdateRecord> = (1..=8).map(|u| rec(u, u as f64)).collect();
        let s = UpdateSummary::of(&rs);
        assert_eq!(s.updates, 8);
        assert!((s.entropy_first - 1.5).abs() < 1e-12);
        assert!((s.entropy_last - 7.5).abs() < 1e-12);
        assert!((s.kl_last - 0.075).abs() < 1e-12);
        assert_eq!((s.ratio_max, s.staleness_max), (9.0, 8));
    }
}
