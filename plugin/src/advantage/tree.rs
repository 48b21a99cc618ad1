//! Steps 2-4 of LEAF: the prefix tree recovered at the boundaries, its span advantages, and
//! the statistics online users count (fork-fire rate, usable forks, node size, depth).

use serde::{Deserialize, Serialize};

use super::leaf::Terms;
use crate::rollout::Rollout;

/// A tree node: two or more responses that share the prefix up to a boundary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// The boundary position p(v): members share `tokens[..p]` (clipped to their length).
    pub position: usize,
    /// Indices of the member responses, ascending.
    pub members: Vec<usize>,
    /// V(v): mean reward of the members.
    pub value: f64,
    /// n(v): number of members.
    pub size: usize,
}

/// One span of one response: tokens `[start, end)` (before clipping) share one advantage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// First position of the span.
    pub start: usize,
    /// One past the last position (may exceed the response length; clipped when broadcast).
    pub end: usize,
    /// Index into [`LeafTree::nodes`] of the node that closes an internal span; `None` for a
    /// tail span or the no-boundary fallback.
    pub node: Option<usize>,
    /// Span advantage before normalisation.
    pub raw: f64,
    /// Span advantage after the group-wide z-score.
    pub normalized: f64,
}

/// The prefix tree LEAF recovered from one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeafTree {
    /// Accepted fork boundaries, ascending.
    pub boundaries: Vec<usize>,
    /// The separation delta used (absent when every response is empty).
    pub delta: Option<usize>,
    /// V0: mean reward over all responses.
    pub root_value: f64,
    /// Nodes, in boundary order, then by first member.
    pub nodes: Vec<Node>,
    /// `spans[i]`: the spans of response `i`, ascending.
    pub spans: Vec<Vec<Span>>,
    /// Mean of the raw span values (the z-score's centre).
    pub span_mean: f64,
    /// Floored sample standard deviation of the raw span values (the z-score's scale).
    pub span_std: f64,
    /// Counts for fork statistics.
    pub stats: ForkStats,
}

/// Fork counts; add them up over many groups with [`ForkStats::merge`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkStats {
    /// Groups counted.
    pub groups: u64,
    /// Boundaries accepted.
    pub boundaries: u64,
    /// Boundaries that produced at least one node.
    pub fired_boundaries: u64,
    /// Nodes.
    pub nodes: u64,
    /// Nodes whose members' rewards differ.
    pub usable_nodes: u64,
    /// Sum of node sizes.
    pub node_members: u64,
    /// Deepest path (nodes on one response's path) over the groups counted.
    pub max_depth: u64,
    /// Sum over groups of the deepest path in the group.
    pub depth_sum: u64,
}

impl ForkStats {
    /// Adds another set of counts into this one.
    pub fn merge(&mut self, other: &ForkStats) {
        self.groups += other.groups;
        self.boundaries += other.boundaries;
        self.fired_boundaries += other.fired_boundaries;
        self.nodes += other.nodes;
        self.usable_nodes += other.usable_nodes;
        self.node_members += other.node_members;
        self.max_depth = self.max_depth.max(other.max_depth);
        self.depth_sum += other.depth_sum;
    }

    /// Fraction of boundaries that produced at least one node.
    pub fn fork_fire_rate(&self) -> Option<f64> {
        ratio(self.fired_boundaries, self.boundaries)
    }

    /// Fraction of nodes whose members' rewards differ.
    pub fn usable_fork_rate(&self) -> Option<f64> {
        ratio(self.usable_nodes, self.nodes)
    }

    /// Mean number of members per node.
    pub fn mean_node_size(&self) -> Option<f64> {
        ratio(self.node_members, self.nodes)
    }

    /// Mean over groups of the deepest path.
    pub fn mean_depth(&self) -> Option<f64> {
        ratio(self.depth_sum, self.groups)
    }

    /// The rates as a JSON object (null where undefined).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "groups": self.groups,
            "boundaries": self.boundaries,
            "nodes": self.nodes,
            "fork_fire_rate": self.fork_fire_rate(),
            "usable_fork_rate": self.usable_fork_rate(),
            "mean_node_size": self.mean_node_size(),
            "mean_depth": self.mean_depth(),
            "max_depth": self.max_depth,
        })
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Groups responses by their key `tokens[..min(p, len)]` at each boundary (step 2).
///
/// Returns the nodes and, per response, the indices of the nodes on its path. Equal keys at a
/// later boundary imply equal keys at an earlier one, so each boundary only refines the
/// classes of the previous one and compares the new segment of the key.
pub(super) fn build_nodes(
    rollouts: &[Rollout],
    boundaries: &[usize],
) -> (Vec<Node>, Vec<Vec<usize>>) {
    let k = rollouts.len();
    let mut class = vec![0usize; k];
    let mut next_class = vec![0usize; k];
    let mut reps: Vec<usize> = Vec::with_capacity(k);
    let mut nodes = Vec::new();
    let mut paths: Vec<Vec<usize>> = vec![Vec::new(); k];
    let mut members_of: Vec<Vec<usize>> = Vec::with_capacity(k);
    let mut prev = 0usize;
    for &p in boundaries {
        reps.clear();
        members_of.clear();
        for i in 0..k {
            let key_i = &rollouts[i].tokens[..rollouts[i].len().min(p)];
            let found = reps.iter().position(|&j| {
                let key_j = &rollouts[j].tokens[..rollouts[j].len().min(p)];
                class[j] == class[i]
                    && key_j.len() == key_i.len()
                    && key_j[prev.min(key_j.len())..] == key_i[prev.min(key_i.len())..]
            });
            let c = match found {
                Some(c) => c,
                None => {
                    reps.push(i);
                    members_of.push(Vec::new());
                    reps.len() - 1
                }
            };
            next_class[i] = c;
            members_of[c].push(i);
        }
        std::mem::swap(&mut class, &mut next_class);
        for members in members_of.iter().filter(|m| m.len() >= 2) {
            let value = super::mean(members.iter().map(|&m| rollouts[m].reward));
            for &m in members {
                paths[m].push(nodes.len());
            }
            nodes.push(Node { position: p, members: members.clone(), value, size: members.len() });
        }
        prev = p;
    }
    (nodes, paths)
}

/// Span advantages of one response (step 3), before normalisation.
pub(super) fn spans_of(
    rollout: &Rollout,
    path: &[usize],
    nodes: &[Node],
    root_value: f64,
    terms: Terms,
) -> Vec<Span> {
    let combine = |global: f64, local: f64| match terms {
        Terms::Both => global + local,
        Terms::Global => global,
        Terms::Local => local,
    };
    let mut spans = Vec::with_capacity(path.len() + 1);
    let (mut prev_pos, mut prev_v) = (0usize, root_value);
    for &v in path {
        let node = &nodes[v];
        if node.position > prev_pos {
            let raw =
                combine(node.value - root_value, node.value - prev_v) / (node.size as f64).sqrt();
            spans.push(Span { start: prev_pos, end: node.position, node: Some(v), raw, normalized: 0.0 });
            prev_pos = node.position;
            prev_v = node.value;
        }
    }
    let len = rollout.len();
    if prev_pos < len {
        let raw = combine(rollout.reward - root_value, rollout.reward - prev_v);
        spans.push(Span { start: prev_pos, end: len, node: None, raw, normalized: 0.0 });
    }
    spans
}
