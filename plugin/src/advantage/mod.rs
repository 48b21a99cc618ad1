//! Advantage estimators: LEAF span advantages and the GRPO baseline behind one seam.
//!
//! Both turn a validated [`Group`] into one advantage per generated token. Which one runs is
//! configuration ([`EstimatorConfig`]); everything downstream only sees
//! [`AdvantageEstimator`]. Every estimator is deterministic: the same group gives the same
//! advantages to the last bit.

mod boundaries;
mod grpo;
mod kernels;
mod leaf;
pub mod synthetic;
mod tree;

pub use boundaries::{select_boundaries, separation};
pub use grpo::Grpo;
pub use leaf::{Leaf, LeafConfig, Terms};
pub use tree::{ForkStats, LeafTree, Node, Span};

use serde::{Deserialize, Serialize};

use crate::rollout::Group;

/// Per-token advantages of one group, plus LEAF's fork counts and, on request, its tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advantages {
    /// `per_token[i][t]` is the advantage of token `t` of response `i`.
    pub per_token: Vec<Vec<f64>>,
    /// Fork counts of this group (LEAF only); add them up with [`ForkStats::merge`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<ForkStats>,
    /// The recovered prefix tree (LEAF, from [`AdvantageEstimator::estimate_with_tree`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<LeafTree>,
}

/// The seam every trainer uses: a group in, per-token advantages out.
pub trait AdvantageEstimator: Send + Sync {
    /// Short name (`"leaf"`, `"grpo"`), used in logs, metrics and reports.
    fn name(&self) -> &'static str;

    /// Advantages for every token of every response of `group` (the training hot path).
    fn estimate(&self, group: &Group) -> Advantages;

    /// Like [`estimate`](Self::estimate), with the estimator's tree for inspection where it
    /// has one.
    fn estimate_with_tree(&self, group: &Group) -> Advantages {
        self.estimate(group)
    }
}

/// Which estimator to run, as it appears in configuration files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "estimator", rename_all = "lowercase")]
pub enum EstimatorConfig {
    /// LEAF span advantages.
    Leaf(LeafConfig),
    /// GRPO's per-response advantage.
    Grpo,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig::Leaf(LeafConfig::default())
    }
}

impl EstimatorConfig {
    /// Builds the configured estimator.
    pub fn build(&self) -> Box<dyn AdvantageEstimator> {
        match self {
            EstimatorConfig::Leaf(cfg) => Box::new(Leaf::new(cfg.clone())),
            EstimatorConfig::Grpo => Box::new(Grpo),
        }
    }

    /// The estimator's short name.
    pub fn name(&self) -> &'static str {
        match self {
            EstimatorConfig::Leaf(_) => "leaf",
            EstimatorConfig::Grpo => "grpo",
        }
    }
}

/// The advantage estimator by name, as the command line picks it (`--estimator leaf|grpo`),
/// with each one's default settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// LEAF span advantages (the paper's defaults: fork budget 2, both terms).
    Leaf,
    /// GRPO's per-response advantage.
    Grpo,
}

impl Estimator {
    /// `"leaf"` or `"grpo"`.
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Leaf => "leaf",
            Estimator::Grpo => "grpo",
        }
    }

    /// The estimator's configuration.
    pub fn config(self) -> EstimatorConfig {
        match self {
            Estimator::Leaf => EstimatorConfig::Leaf(LeafConfig::default()),
            Estimator::Grpo => EstimatorConfig::Grpo,
        }
    }
}

/// Mean of `values`, summed in order (deterministic) as offsets from the first value, so
/// that equal values give exactly that value (and equal rewards exactly zero advantages).
pub(crate) fn mean(mut values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = values.len();
    let Some(first) = values.next() else {
        return 0.0;
    };
    first + values.map(|v| v - first).sum::<f64>() / n as f64
}

/// Sample standard deviation (divides by `n - 1`; a single value divides by 1).
pub(crate) fn sample_std(values: &[f64], mean: f64) -> f64 {
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    let denom = if values.len() > 1 {
        values.len() - 1
    } else {
        1
    };
    (ss / denom as f64).sqrt()
}
