//! Step 1 of LEAF: pick at most B fork boundaries from the group's surprisals.
//!
//! The spec walks every candidate `(i, p)` in order of decreasing surprisal (ties: lower
//! response index, then lower position) and accepts a position when it is at least `delta`
//! away from every accepted one. Acceptance depends only on the position, so the k-th
//! accepted position is the first candidate in that order that is compatible with the k - 1
//! accepted before it. So instead of sorting we keep, per position, the highest surprisal
//! over responses (one vectorisable pass over all tokens) and take B arg-maxes over
//! positions; only when several positions tie on surprisal do we look up which response
//! holds each, to apply the tie-break exactly. O(total tokens + B * longest response).

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
    // best[k] = highest surprisal at position start + k over the responses that reach it;
    // -inf where none does (surprisals are finite: the group is validated).
    let mut best = vec![f64::NEG_INFINITY; max_len - start];
    for r in rollouts.iter().filter(|r| r.len() > start) {
        for (b, &l) in best.iter_mut().zip(&r.logprobs[start..]) {
            let s = -l;
            *b = if s > *b { s } else { *b };
        }
    }
    // The lowest response index holding surprisal `s` at position `p` (tie-break key).
    let holder = |p: usize, s: f64| {
        rollouts
            .iter()
            .position(|r| r.logprobs.get(p).is_some_and(|&l| -l == s))
            .unwrap_or(usize::MAX)
    };
    let mut accepted: Vec<usize> = Vec::with_capacity(fork_budget);
    // `blocked` holds the accepted positions, ascending; the allowed positions are the gaps
    // between their exclusion windows (q - delta, q + delta).
    let mut blocked: Vec<usize> = Vec::with_capacity(fork_budget);
    while accepted.len() < fork_budget {
        let mut top = f64::NEG_INFINITY;
        let mut at = usize::MAX;
        let mut tied = false;
        let mut lo = 0usize;
        for bound in blocked
            .iter()
            .map(|&q| Some(q))
            .chain(std::iter::once(None))
        {
            let hi = bound.map_or(best.len(), |q| {
                (q - start).saturating_sub(delta - 1).min(best.len())
            });
            for (k, &s) in best.iter().enumerate().take(hi).skip(lo) {
                if s > top {
                    (top, at, tied) = (s, k, false);
                } else if s == top {
                    tied = true;
                }
            }
            if let Some(q) = bound {
                lo = (q - start + delta).min(best.len());
            }
        }
        if top == f64::NEG_INFINITY {
            break;
        }
        if tied {
            // Several allowed positions share the top surprisal: lower response index first,
            // then lower position (`at` is the lowest position so far).
            let mut at_holder = holder(start + at, top);
            for (k, &s) in best.iter().enumerate().skip(at + 1) {
                let p = start + k;
                if s == top && blocked.iter().all(|&q| p.abs_diff(q) >= delta) {
                    let h = holder(p, top);
                    if h < at_holder {
                        (at, at_holder) = (k, h);
                    }
                }
            }
        }
        let p = start + at;
        accepted.push(p);
        let slot = blocked.partition_point(|&q| q < p);
        blocked.insert(slot, p);
    }
    accepted.sort_unstable();
    (accepted, Some(delta))
}
