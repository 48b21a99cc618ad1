//! LEAF: span-level advantages read off a prefix tree recovered after sampling.
//!
//! Implements `LEAF-SPEC.md` step by step: boundaries ([`super::boundaries`]), grouping by
//! exact prefix and span values ([`super::tree`]), then a group-wide z-score broadcast to
//! tokens (here).

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use super::boundaries::{select_into, BoundaryScratch};
use super::tree::{
    build_nodes, build_spans, fallback_spans, Forest, ForkStats, LeafTree, Node, Span,
};
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

impl Terms {
    /// The span advantage from its global (`V - V0`) and local (`V - V(parent)`) terms.
    pub(super) fn combine(self, global: f64, local: f64) -> f64 {
        match self {
            Terms::Both => global + local,
            Terms::Global => global,
            Terms::Local => local,
        }
    }
}

impl std::str::FromStr for Terms {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "both" => Ok(Terms::Both),
            "global" => Ok(Terms::Global),
            "local" => Ok(Terms::Local),
            other => Err(format!(
                "unknown terms {other:?} (expected both, global or local)"
            )),
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
        LeafConfig {
            fork_budget: 2,
            min_prefix: 1,
            terms: Terms::Both,
        }
    }
}

/// The LEAF estimator.
#[derive(Debug, Clone, Default)]
pub struct Leaf {
    config: LeafConfig,
}

/// Floor of the span standard deviation in the z-score.
const STD_FLOOR: f64 = 1e-6;

/// The buffers LEAF computes in, reused from group to group (one set per thread), so the
/// hot path allocates little more than its output.
#[derive(Debug, Default)]
struct Workspace {
    scratch: BoundaryScratch,
    boundaries: Vec<usize>,
    forest: Forest,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::default();
}

/// Runs `f` with this thread's workspace (a fresh one if it is already in use).
fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|w| match w.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Workspace::default()),
    })
}

/// Everything LEAF computes for one group, in flat arrays (borrowed from the workspace).
struct Computed<'w> {
    boundaries: &'w [usize],
    delta: Option<usize>,
    root_value: f64,
    forest: &'w Forest,
    span_mean: f64,
    span_std: f64,
    stats: ForkStats,
}

impl Leaf {
    /// A LEAF estimator with the given configuration.
    pub fn new(config: LeafConfig) -> Self {
        Leaf { config }
    }

    /// The configuration.
    pub fn config(&self) -> &LeafConfig {
        &self.config
    }

    fn compute<'w>(&self, group: &Group, ws: &'w mut Workspace) -> Computed<'w> {
        let rollouts = group.rollouts();
        let root_value = super::mean(rollouts.iter().map(|r| r.reward));
        let delta = select_into(
            rollouts,
            self.config.fork_budget,
            self.config.min_prefix,
            &mut ws.scratch,
            &mut ws.boundaries,
        );
        if ws.boundaries.is_empty() {
            fallback_spans(rollouts, root_value, &mut ws.forest);
        } else {
            build_nodes(
                rollouts,
                &ws.boundaries,
                root_value,
                self.config.terms,
                &mut ws.forest,
            );
            build_spans(
                rollouts,
                ws.boundaries.len(),
                root_value,
                self.config.terms,
                &mut ws.forest,
            );
        }
        let (boundaries, forest): (&'w [usize], &'w Forest) = (&ws.boundaries, &ws.forest);
        // Step 4's scale: mean and floored sample std over every span of every response.
        let (span_mean, span_std) = match forest.spans.first() {
            None => (0.0, STD_FLOOR),
            Some(_) => {
                let m = super::mean(forest.spans.iter().map(|s| s.raw));
                let ss: f64 = forest.spans.iter().map(|s| (s.raw - m) * (s.raw - m)).sum();
                let n = forest.spans.len();
                let sd = (ss / if n > 1 { (n - 1) as f64 } else { 1.0 }).sqrt();
                (m, sd.max(STD_FLOOR))
            }
        };
        let fired = boundaries
            .iter()
            .filter(|&&p| forest.nodes.iter().any(|n| n.position == p))
            .count();
        let depth = forest.path_len.iter().copied().max().unwrap_or(0) as u64;
        let stats = ForkStats {
            groups: 1,
            boundaries: boundaries.len() as u64,
            fired_boundaries: fired as u64,
            nodes: forest.nodes.len() as u64,
            usable_nodes: forest.nodes.iter().filter(|n| n.usable).count() as u64,
            node_members: forest.nodes.iter().map(|n| n.size as u64).sum(),
            max_depth: depth,
            depth_sum: depth,
        };
        Computed {
            boundaries,
            delta,
            root_value,
            forest,
            span_mean,
            span_std,
            stats,
        }
    }

    /// Per-token advantages: each token gets the normalised value of the span holding it.
    /// A response's spans tile `[0, len)` in order (the last one clipped), so each output is
    /// written once, front to back, with no zeroing pass.
    fn broadcast(group: &Group, c: &Computed) -> Vec<Vec<f64>> {
        let spans = &c.forest.spans;
        group
            .rollouts()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut adv = Vec::with_capacity(r.len());
                for span in &spans[c.forest.span_ofs[i]..c.forest.span_ofs[i + 1]] {
                    let end = span.end.min(r.len());
                    debug_assert_eq!(span.start.min(end), adv.len().min(end), "spans tile");
                    if adv.len() < end {
                        adv.resize(end, (span.raw - c.span_mean) / c.span_std);
                    }
                }
                debug_assert_eq!(adv.len(), r.len(), "spans cover the response");
                adv
            })
            .collect()
    }

    /// Recovers the tree of `group` in readable form (nodes with members, spans per response).
    pub fn tree(&self, group: &Group) -> LeafTree {
        with_workspace(|ws| Self::readable(group, &self.compute(group, ws)))
    }

    /// The per-token advantages and fork counts of `group`, with its tree when `with_tree`.
    fn advantages(&self, group: &Group, with_tree: bool) -> Advantages {
        with_workspace(|ws| {
            let c = self.compute(group, ws);
            Advantages {
                per_token: Self::broadcast(group, &c),
                stats: Some(c.stats),
                tree: with_tree.then(|| Self::readable(group, &c)),
            }
        })
    }

    fn readable(group: &Group, c: &Computed) -> LeafTree {
        let f = &c.forest;
        let width = c.boundaries.len();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); f.nodes.len()];
        for i in 0..group.len() {
            for d in 0..f.path_len.get(i).copied().unwrap_or(0) {
                members[f.paths[i * width + d] as usize].push(i);
            }
        }
        let nodes = f
            .nodes
            .iter()
            .zip(members)
            .map(|(n, members)| Node {
                position: n.position,
                members,
                value: n.value,
                size: n.size,
            })
            .collect();
        let spans = (0..group.len())
            .map(|i| {
                f.spans[f.span_ofs[i]..f.span_ofs[i + 1]]
                    .iter()
                    .map(|s| Span {
                        start: s.start,
                        end: s.end,
                        node: (s.node != u32::MAX).then_some(s.node as usize),
                        raw: s.raw,
                        normalized: (s.raw - c.span_mean) / c.span_std,
                    })
                    .collect()
            })
            .collect();
        LeafTree {
            boundaries: c.boundaries.to_vec(),
            delta: c.delta,
            root_value: c.root_value,
            nodes,
            spans,
            span_mean: c.span_mean,
            span_std: c.span_std,
            stats: c.stats,
        }
    }
}

impl AdvantageEstimator for Leaf {
    fn name(&self) -> &'static str {
        "leaf"
    }

    fn estimate(&self, group: &Group) -> Advantages {
        self.advantages(group, false)
    }

    fn estimate_with_tree(&self, group: &Group) -> Advantages {
        self.advantages(group, true)
    }
}
