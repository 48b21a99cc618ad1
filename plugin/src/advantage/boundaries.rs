//! Step 1 of LEAF: pick at most B fork boundaries from the group's surprisals.
//!
//! The spec walks every candidate `(i, p)` in order of decreasing surprisal (ties: lower
//! response index, then lower position) and accepts a position when it is at least `delta`
//! away from every accepted one. Acceptance depends only on the position, so the k-th
//! accepted position is the first candidate in that order that is compatible with the
//! k - 1 accepted before it. That lets us keep, per position, only its best candidate
//! (highest surprisal, lowest response index) and take B arg-maxes over positions:
//! O(total tokens + B * longest response) instead of a sort.

use crate::rollout::Rollout;

/// `delta = max(2, floor(l_min / (B + 1)))`, with `l_min` the shortest non-empty length;
/// `None` when every response is empty.
pub fn separation(rollouts: &[Rollout], fork_budget: usize) -> Option<usize> {
    let l_min = rollouts.iter().map(Rollout::len).filter(|&l| l > 0).min()?;
    Some((l_min / (fork_budget + 1)).max(2))
}

/// The accepted boundary positions, ascending, and the separation used.
///
/// Returns no boundary when `fork_budget` is 0 or there is no candidate.
pub fn select_boundaries(
    rollouts: &[Rollout],
    fork_budget: usize,
    min_prefix: usize,
) -> (Vec<usize>, Option<usize>) {
    let delta = separation(rollouts, fork_budget);
    let (Some(delta), true) = (delta, fork_budget > 0) else {
        return (Vec::new(), delta);
    };
    let start = min_prefix.max(1);
    let max_len = rollouts.iter().map(Rollout::len).max().unwrap_or(0);
    if max_len <= start {
        return (Vec::new(), Some(delta));
    }
    // best[p - start] = (surprisal, response) of the first candidate at p in sorted order.
    let width = max_len - start;
    let mut best_s = vec![f64::NEG_INFINITY; width];
    let mut best_i = vec![usize::MAX; width];
    for (i, r) in rollouts.iter().enumerate() {
        if r.len() <= start {
            continue;
        }
        let lp = &r.logprobs[start..];
        for ((s_best, i_best), &l) in best_s.iter_mut().zip(best_i.iter_mut()).zip(lp) {
            let s = -l;
            // Strictly greater: on equal surprisal the lower response index (seen first) stays.
            if s > *s_best || *i_best == usize::MAX {
                *s_best = s;
                *i_best = i;
            }
        }
    }
    let mut accepted: Vec<usize> = Vec::with_capacity(fork_budget);
    while accepted.len() < fork_budget {
        let mut pick: Option<usize> = None;
        for (k, (&s, &i)) in best_s.iter().zip(&best_i).enumerate() {
            if i == usize::MAX {
                continue;
            }
            let p = start + k;
            if accepted.iter().any(|&q| p.abs_diff(q) < delta) {
                continue;
            }
            // Order: higher surprisal, then lower response index, then lower position
            // (positions are scanned ascending, so keeping the first one settles the last).
            let better = match pick {
                None => true,
                Some(kb) => s > best_s[kb] || (s == best_s[kb] && i < best_i[kb]),
            };
            if better {
                pick = Some(k);
            }
        }
        match pick {
            Some(k) => accepted.push(start + k),
            None => break,
        }
    }
    accepted.sort_unstable();
    (accepted, Some(delta))
}
