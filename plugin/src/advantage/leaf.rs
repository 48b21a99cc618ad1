//! LEAF: span-level advantages read off a prefix tree recovered after sampling.
//!
//! Implements `LEAF-SPEC.md` step by step: boundaries ([`super::boundaries`]), grouping by
//! exact prefix and span values ([`super::tree`]), then a group-wide z-score broadcast to
//! tokens (here).

use serde::{Deserialize, Serialize};

use super::boundaries::select_boundaries;
use super::tree::{build_nodes, spans_of, ForkStats, LeafTree, Span};
use super::{AdvantageEstimator, Advantages};
use crate::rollout::Group;

/// Which terms a span advantage uses (the spec's ablation switch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Terms {
    /// Global + local (default).
    #[default]
    Both,
    /// `V(v) - V0` only.
    Global,
    /// `V(v) - V(parent)` only.
    Local,
}

impl std::str::FromStr for Terms {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "both" => Ok(Terms::Both),
            "global" => Ok(Terms::Global),
            "local" => Ok(Terms::Local),
            other => Err(format!("unknown terms {other:?} (expected both, global or local)")),
        }
    }
}

/// LEAF's knobs; defaults are the paper's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeafConfig {
    /// B: at most this many fork boundaries per group (default 2).
    pub fork_budget: usize,
    /// No boundary before this position (default 1; position 0 is never a boundary).
    pub min_prefix: usize,
    /// Which advantage terms to use (default both).
    pub terms: Terms,
}

impl Default for LeafConfig {
    fn default() -> Self {
        LeafConfig { fork_budget: 2, min_prefix: 1, terms: Terms::Both }
    }
}

/// The LEAF estimator.
#[derive(Debug, Clone, Default)]
pub struct Leaf {
    config: LeafConfig,
}

/// Floor of the span standard deviation in the z-score.
const STD_FLOOR: f64 = 1e-6;

impl Leaf {
    /// A LEAF estimator with the given configuration.
    pub fn new(config: LeafConfig) -> Self {
        Leaf { config }
    }

    /// The configuration.
    pub fn config(&self) -> &LeafConfig {
        &self.config
    }

    /// Recovers the tree and the normalised span values of `group`.
    pub fn tree(&self, group: &Group) -> LeafTree {
        let rollouts = group.rollouts();
        let root_value = super::mean(rollouts.iter().map(|r| r.reward));
        let (boundaries, delta) =
            select_boundaries(rollouts, self.config.fork_budget, self.config.min_prefix);
        let (nodes, mut spans): (_, Vec<Vec<Span>>) = if boundaries.is_empty() {
            // Fallback: one span per non-empty response, advantage reward - V0.
            let spans = rollouts
                .iter()
                .map(|r| {
                    if r.is_empty() {
                        Vec::new()
                    } else {
                        vec![Span { start: 0, end: r.len(), node: None, raw: r.reward - root_value, normalized: 0.0 }]
                    }
                })
                .collect();
            (Vec::new(), spans)
        } else {
            let (nodes, paths) = build_nodes(rollouts, &boundaries);
            let spans = rollouts
                .iter()
                .zip(&paths)
                .map(|(r, path)| spans_of(r, path, &nodes, root_value, self.config.terms))
                .collect();
            (nodes, spans)
        };

        // Step 4: z-score every span of every response together.
        let raw: Vec<f64> = spans.iter().flatten().map(|s| s.raw).collect();
        let (span_mean, span_std) = if raw.is_empty() {
            (0.0, STD_FLOOR)
        } else {
            let m = super::mean(raw.iter().copied());
            (m, super::sample_std(&raw, m).max(STD_FLOOR))
        };
        for span in spans.iter_mut().flatten() {
            span.normalized = (span.raw - span_mean) / span_std;
        }

        let fired = boundaries
            .iter()
            .filter(|&&p| nodes.iter().any(|n| n.position == p))
            .count();
        let depth = spans.iter().map(|s| s.iter().filter(|s| s.node.is_some()).count()).max();
        let stats = ForkStats {
            groups: 1,
            boundaries: boundaries.len() as u64,
            fired_boundaries: fired as u64,
            nodes: nodes.len() as u64,
            usable_nodes: nodes
                .iter()
                .filter(|n| {
                    let first = rollouts[n.members[0]].reward;
                    n.members.iter().any(|&m| rollouts[m].reward != first)
                })
                .count() as u64,
            node_members: nodes.iter().map(|n| n.size as u64).sum(),
            max_depth: depth.unwrap_or(0) as u64,
            depth_sum: depth.unwrap_or(0) as u64,
        };
        LeafTree { boundaries, delta, root_value, nodes, spans, span_mean, span_std, stats }
    }
}

impl AdvantageEstimator for Leaf {
    fn name(&self) -> &'static str {
        "leaf"
    }

    fn estimate(&self, group: &Group) -> Advantages {
        let tree = self.tree(group);
        let per_token = group
            .rollouts()
            .iter()
            .zip(&tree.spans)
            .map(|(r, spans)| {
                let mut adv = vec![0.0; r.len()];
                for span in spans {
                    let end = span.end.min(r.len());
                    if span.start < end {
                        adv[span.start..end].fill(span.normalized);
                    }
                }
                adv
            })
            .collect();
        Advantages { per_token, tree: Some(tree) }
    }
}
