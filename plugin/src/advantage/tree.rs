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

/// A node while the tree is computed: what [`Node`] holds, without the member list.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawNode {
    pub position: usize,
    pub value: f64,
    pub size: usize,
    pub usable: bool,
    /// Span advantage (before normalisation) of the span that ends at this node.
    pub span_raw: f64,
}

/// A span while the tree is computed: `node` is `u32::MAX` for a tail or fallback span.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawSpan {
    pub start: usize,
    pub end: usize,
    pub node: u32,
    pub raw: f64,
}

/// Steps 2-3 in flat arrays (a handful of allocations per group, whatever K is).
#[derive(Debug, Default)]
pub(super) struct Forest {
    pub nodes: Vec<RawNode>,
    /// `paths[i * width + d]`: the d-th node on response i's path (`width` = boundaries).
    pub paths: Vec<u32>,
    pub path_len: Vec<usize>,
    /// All spans, response by response; response i owns `spans[span_ofs[i]..span_ofs[i + 1]]`.
    pub spans: Vec<RawSpan>,
    pub span_ofs: Vec<usize>,
    /// Working memory of [`build_nodes`].
    pub scratch: Vec<usize>,
    /// Response order of [`build_nodes`] when it buckets.
    pub order: Vec<usize>,
}

/// Up to this many responses, [`build_nodes`] compares each response with every earlier
/// class; above it, it buckets them first (measured at K = 64 x 1,000: about 1 us less per group).
const SCAN_LIMIT: usize = 16;

/// Groups responses by their key `tokens[..min(p, len)]` at each boundary (step 2) and
/// gives each node its span advantage (step 3).
///
/// Equal keys at a later boundary imply equal keys at an earlier one, so each boundary only
/// refines the classes of the previous one and compares the new segment of the key. A class
/// is named by its lowest member; classes of two or more become nodes, in boundary order and
/// then by lowest member. Members of a node share their previous node too, so the span that
/// ends at a node has one value for all its members, computed once here.
pub(super) fn build_nodes(
    rollouts: &[Rollout],
    boundaries: &[usize],
    root_value: f64,
    terms: Terms,
    forest: &mut Forest,
) {
    let k = rollouts.len();
    let width = boundaries.len();
    forest.nodes.clear();
    forest.scratch.clear();
    forest.scratch.resize(6 * k, 0);
    let (mut class, rest) = forest.scratch.split_at_mut(k);
    let (mut next, rest) = rest.split_at_mut(k);
    let (size, rest) = rest.split_at_mut(k);
    let (node_of, rest) = rest.split_at_mut(k);
    let (key_len, last) = rest.split_at_mut(k);
    let order = &mut forest.order;
    forest.paths.clear();
    forest.paths.resize(k * width, u32::MAX);
    forest.path_len.clear();
    forest.path_len.resize(k, 0);
    let mut prev = 0usize;
    for &p in boundaries {
        size.fill(0);
        // Each key's length and last token (`usize::MAX` for an empty key), gathered once:
        // keys that differ almost always differ there, which spares most slice comparisons.
        for (i, r) in rollouts.iter().enumerate() {
            key_len[i] = r.len().min(p);
            last[i] = key_len[i]
                .checked_sub(1)
                .map_or(usize::MAX, |t| r.tokens[t] as usize);
        }
        // Same key = same class at the previous boundary, same length, same last token and
        // the same new segment; `next[j] == j` marks j as the lowest member of its class.
        // Both callers below have checked the lengths first.
        let same_key = |next: &[usize], i: usize, j: usize| {
            next[j] == j && {
                let from = prev.min(key_len[i]);
                rollouts[j].tokens[from..key_len[j]] == rollouts[i].tokens[from..key_len[i]]
            }
        };
        if k <= SCAN_LIMIT {
            for i in 0..k {
                let rep = (0..i)
                    .find(|&j| {
                        class[j] == class[i]
                            && key_len[j] == key_len[i]
                            && last[j] == last[i]
                            && same_key(next, i, j)
                    })
                    .unwrap_or(i);
                next[i] = rep;
                size[rep] += 1;
            }
        } else {
            // Many responses: bucket them by (class, length, last token) with one sort, so
            // that only responses of one bucket are compared.
            order.clear();
            order.extend(0..k);
            order.sort_unstable_by_key(|&i| (class[i], key_len[i], last[i], i));
            let bucket = |&a: &usize, &b: &usize| {
                (class[a], key_len[a], last[a]) == (class[b], key_len[b], last[b])
            };
            for run in order.chunk_by(bucket) {
                for (n, &i) in run.iter().enumerate() {
                    let rep = run[..n]
                        .iter()
                        .copied()
                        .find(|&j| same_key(next, i, j))
                        .unwrap_or(i);
                    next[i] = rep;
                    size[rep] += 1;
                }
            }
        }
        std::mem::swap(&mut class, &mut next);
        for i in 0..k {
            let rep = class[i];
            if size[rep] < 2 {
                continue;
            }
            let depth = forest.path_len[i];
            if rep == i {
                node_of[rep] = forest.nodes.len();
                let first = rollouts[i].reward;
                let mut sum = 0.0;
                let mut usable = false;
                for m in (i..k).filter(|&m| class[m] == rep) {
                    sum += rollouts[m].reward - first;
                    usable |= rollouts[m].reward != first;
                }
                let value = first + sum / size[rep] as f64;
                let parent = match depth {
                    0 => root_value,
                    d => forest.nodes[forest.paths[i * width + d - 1] as usize].value,
                };
                forest.nodes.push(RawNode {
                    position: p,
                    value,
                    size: size[rep],
                    usable,
                    span_raw: terms.combine(value - root_value, value - parent)
                        / (size[rep] as f64).sqrt(),
                });
            }
            forest.paths[i * width + depth] = node_of[rep] as u32;
            forest.path_len[i] = depth + 1;
        }
        prev = p;
    }
}

/// Span advantages of every response (step 3), before normalisation: the internal spans
/// carry their node's value, the tail span `combine(r - V0, r - V(last node))`.
pub(super) fn build_spans(
    rollouts: &[Rollout],
    width: usize,
    root_value: f64,
    terms: Terms,
    forest: &mut Forest,
) {
    forest.spans.clear();
    forest.span_ofs.clear();
    forest.span_ofs.push(0);
    for (i, r) in rollouts.iter().enumerate() {
        let (mut prev_pos, mut prev_v) = (0usize, root_value);
        let depth = forest.path_len.get(i).copied().unwrap_or(0);
        for &v in forest
            .paths
            .get(i * width..i * width + depth)
            .unwrap_or(&[])
        {
            let node = forest.nodes[v as usize];
            if node.position > prev_pos {
                forest.spans.push(RawSpan {
                    start: prev_pos,
                    end: node.position,
                    node: v,
                    raw: node.span_raw,
                });
                prev_pos = node.position;
                prev_v = node.value;
            }
        }
        if prev_pos < r.len() {
            forest.spans.push(RawSpan {
                start: prev_pos,
                end: r.len(),
                node: u32::MAX,
                raw: terms.combine(r.reward - root_value, r.reward - prev_v),
            });
        }
        forest.span_ofs.push(forest.spans.len());
    }
}

/// The no-boundary fallback: one span per non-empty response, advantage `reward - V0`.
pub(super) fn fallback_spans(rollouts: &[Rollout], root_value: f64, forest: &mut Forest) {
    forest.nodes.clear();
    forest.paths.clear();
    forest.path_len.clear();
    forest.spans.clear();
    forest.span_ofs.clear();
    forest.span_ofs.push(0);
    for r in rollouts {
        if !r.is_empty() {
            forest.spans.push(RawSpan {
                start: 0,
                end: r.len(),
                node: u32::MAX,
                raw: r.reward - root_value,
            });
        }
        forest.span_ofs.push(forest.spans.len());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The nodes are exactly the classes of two or more responses with equal keys
        /// `tokens[..min(p, len)]`, in boundary order then by lowest member, with the right
        /// paths - on both the scanning (K <= 16) and the bucketing path.
        #[test]
        fn nodes_are_the_classes_of_equal_keys(
            rows in proptest::collection::vec(
                (proptest::collection::vec(0u32..3, 0..12), 0usize..8), 1..40),
            cuts in proptest::collection::btree_set(1usize..14, 1..4),
        ) {
            // Short token strings over 3 symbols, each response extending an earlier one's
            // prefix (by index `parent % i`), so keys collide often.
            let mut rollouts: Vec<Rollout> = Vec::new();
            for (i, (tail, parent)) in rows.iter().enumerate() {
                let mut tokens: Vec<u32> = match i {
                    0 => Vec::new(),
                    _ => {
                        let p = &rollouts[parent % i].tokens;
                        p[..p.len().min(parent * 2)].to_vec()
                    }
                };
                tokens.extend(tail);
                let n = tokens.len();
                rollouts.push(Rollout::new(tokens, vec![-0.5; n], (i % 3) as f64));
            }
            let boundaries: Vec<usize> = cuts.into_iter().collect();
            let mut forest = Forest::default();
            build_nodes(&rollouts, &boundaries, 0.5, Terms::Both, &mut forest);

            let mut want = Vec::new();
            for &p in &boundaries {
                let mut classes: BTreeMap<&[u32], Vec<usize>> = BTreeMap::new();
                for (i, r) in rollouts.iter().enumerate() {
                    classes.entry(&r.tokens[..r.len().min(p)]).or_default().push(i);
                }
                let mut nodes: Vec<Vec<usize>> =
                    classes.into_values().filter(|m| m.len() >= 2).collect();
                nodes.sort();
                want.extend(nodes.into_iter().map(|m| (p, m)));
            }
            let width = boundaries.len();
            let mut got: Vec<(usize, Vec<usize>)> =
                forest.nodes.iter().map(|n| (n.position, Vec::new())).collect();
            for i in 0..rollouts.len() {
                for d in 0..forest.path_len[i] {
                    got[forest.paths[i * width + d] as usize].1.push(i);
                }
            }
            prop_assert_eq!(&got, &want);
            for (n, (_, members)) in forest.nodes.iter().zip(&want) {
                prop_assert_eq!(n.size, members.len());
            }
        }
    }
}
