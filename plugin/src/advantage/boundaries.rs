//! Step 1 of LEAF: pick at most B fork boundaries from the group's surprisals.
//!
//! The spec walks every candidate `(i, p)` in order of decreasing surprisal (ties: lower
//! response index, then lower position) and accepts a position when it is at least `delta`
//! away from every accepted one. Acceptance depends only on the position, so the k-th
//! accepted position is the first candidate in that order that is compatible with the k - 1
//! accepted before it. So instead of sorting we keep, per position, the highest surprisal
//! over responses (one vectorised pass over all tokens) and take B arg-maxes over the allowed
//! positions (a branch-free maximum, then one equality scan of the gap that holds it); only
//! when several allowed positions tie on surprisal do we look up which response holds each,
//! to apply the tie-break exactly. O(total tokens + B * longest response).

use super::kernels::{Kernels, Portable};
use crate::rollout::Rollout;

/// `delta = max(2, floor(l_min / (B + 1)))`, with `l_min` the shortest non-empty length;
/// `None` when every response is empty.
pub fn separation(rollouts: &[Rollout], fork_budget: usize) -> Option<usize> {
    let l_min = rollouts.iter().map(Rollout::len).filter(|&l| l > 0).min()?;
    Some((l_min / (fork_budget + 1)).max(2))
}

/// The allowed gaps, as ranges of `0..len` (index `k` is position `start + k`), once the
/// absolute positions `blocked` (ascending) are accepted: every position at least `delta`
/// away from each of them.
fn gaps(
    blocked: &[usize],
    start: usize,
    delta: usize,
    len: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut lo = 0usize;
    blocked
        .iter()
        .map(Some)
        .chain(std::iter::once(None))
        .map(move |bound| {
            let hi = bound.map_or(len, |&q| (q - start).saturating_sub(delta - 1).min(len));
            let gap = (lo, hi.max(lo));
            if let Some(&q) = bound {
                lo = lo.max((q - start + delta).min(len));
            }
            gap
        })
}

/// `best[k] = max over the responses of -r[k]` for `k` in `range` (every response covers it;
/// at most eight), or the maximum of that and `best[k]` when not `first`; a short batch
/// repeats its first response (the maximum is idempotent). Up to three positions below the
/// range may be written too (see [`Kernels::fold4`]), with values of responses that reach
/// them: the caller folds from the end down, so a later fold of the same batch rewrites them.
#[inline(always)]
fn fold_batch<'a>(
    kernels: impl Kernels,
    best: &mut [f64],
    range: std::ops::Range<usize>,
    first: bool,
    mut responses: impl ExactSizeIterator<Item = &'a [f64]>,
) {
    debug_assert!((1..=8).contains(&responses.len()));
    if responses.len() > 4 {
        kernels.fold8(best, padded(&mut responses), range, first);
    } else {
        kernels.fold4(best, padded(&mut responses), range, first);
    }
}

/// The next `N` responses, the first one repeated where fewer remain.
#[inline(always)]
fn padded<'a, const N: usize>(responses: &mut impl Iterator<Item = &'a [f64]>) -> [&'a [f64]; N] {
    let mut batch: [&[f64]; N] = [&[]; N];
    for s in 0..N {
        batch[s] = responses.next().unwrap_or(batch[0]);
    }
    batch
}

/// Buffers of boundary selection, reused from group to group by the estimator.
#[derive(Debug, Default)]
pub(super) struct BoundaryScratch {
    /// Highest surprisal per position.
    best: Vec<f64>,
    /// (lo, hi, max) of each allowed gap.
    gap_max: Vec<(usize, usize, f64)>,
    /// (length past the start, index) of each response that reaches past the start,
    /// longest first.
    reach: Vec<(usize, usize)>,
}

/// The accepted boundary positions, ascending, and the separation used.
///
/// Returns no boundary when `fork_budget` is 0 or there is no candidate.
pub fn select_boundaries(
    rollouts: &[Rollout],
    fork_budget: usize,
    min_prefix: usize,
) -> (Vec<usize>, Option<usize>) {
    let mut accepted = Vec::with_capacity(fork_budget);
    let delta = select_into(
        rollouts,
        fork_budget,
        min_prefix,
        &mut BoundaryScratch::default(),
        &mut accepted,
    );
    (accepted, delta)
}

/// [`select_boundaries`] into `accepted` (cleared first), with reusable buffers; returns the
/// separation.
pub(super) fn select_into(
    rollouts: &[Rollout],
    fork_budget: usize,
    min_prefix: usize,
    scratch: &mut BoundaryScratch,
    accepted: &mut Vec<usize>,
) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = super::kernels::Avx2::detect() {
        // SAFETY: the `Avx2` token proves the CPU supports AVX2.
        return unsafe { select_avx2(avx2, rollouts, fork_budget, min_prefix, scratch, accepted) };
    }
    select_with(
        Portable,
        rollouts,
        fork_budget,
        min_prefix,
        scratch,
        accepted,
    )
}

/// [`select_with`] compiled for AVX2, so that its kernels inline.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn select_avx2(
    kernels: super::kernels::Avx2,
    rollouts: &[Rollout],
    fork_budget: usize,
    min_prefix: usize,
    scratch: &mut BoundaryScratch,
    accepted: &mut Vec<usize>,
) -> Option<usize> {
    select_with(
        kernels,
        rollouts,
        fork_budget,
        min_prefix,
        scratch,
        accepted,
    )
}

/// The selection on the given kernels.
#[inline(always)]
fn select_with(
    kernels: impl Kernels,
    rollouts: &[Rollout],
    fork_budget: usize,
    min_prefix: usize,
    scratch: &mut BoundaryScratch,
    accepted: &mut Vec<usize>,
) -> Option<usize> {
    accepted.clear();
    let delta = separation(rollouts, fork_budget);
    let (Some(delta), true) = (delta, fork_budget > 0) else {
        return delta;
    };
    let start = min_prefix.max(1);
    let max_len = rollouts.iter().map(Rollout::len).max().unwrap_or(0);
    if max_len <= start {
        return Some(delta);
    }
    // best[k] = highest surprisal at position start + k over the responses that reach it
    // (surprisals are finite: the group is validated). The responses, longest first, go in
    // batches of eight; within a batch, positions `len(j + 1)..len(j)` are reached by exactly
    // its first j + 1 members, so each such segment is one column-wise fold. The first batch
    // writes every position (its last member is at least as long as any later response), the
    // others take the maximum with it.
    let BoundaryScratch {
        best,
        gap_max,
        reach,
    } = scratch;
    reach.clear();
    reach.extend(
        rollouts
            .iter()
            .enumerate()
            .filter(|(_, r)| r.len() > start)
            .map(|(i, r)| (r.len() - start, i)),
    );
    reach.sort_unstable_by_key(|&(len, _)| std::cmp::Reverse(len));
    best.resize(max_len - start, 0.0);
    let column = |&(_, i): &(usize, usize)| &rollouts[i].logprobs[start..];
    for (b, batch) in reach.chunks(8).enumerate() {
        for j in 0..batch.len() {
            let (lo, hi) = (batch.get(j + 1).map_or(0, |r| r.0), batch[j].0);
            if lo < hi {
                fold_batch(
                    kernels,
                    best,
                    lo..hi,
                    b == 0,
                    batch[..=j].iter().map(column),
                );
            }
        }
    }
    // The lowest response index holding surprisal `s` at position `p` (tie-break key).
    let holder = |p: usize, s: f64| {
        rollouts
            .iter()
            .position(|r| r.logprobs.get(p).is_some_and(|&l| -l == s))
            .unwrap_or(usize::MAX)
    };
    // The accepted positions, kept ascending: the allowed positions are the gaps between
    // their exclusion windows (q - delta, q + delta).
    while accepted.len() < fork_budget {
        gap_max.clear();
        gap_max.extend(
            gaps(accepted, start, delta, best.len())
                .map(|(lo, hi)| (lo, hi, kernels.range_max(&best[lo..hi]))),
        );
        let top = gap_max
            .iter()
            .fold(f64::NEG_INFINITY, |m, g| if g.2 > m { g.2 } else { m });
        if top == f64::NEG_INFINITY {
            break;
        }
        // Every allowed position holding `top`, lowest first: usually exactly one.
        let mut at = usize::MAX;
        let mut at_holder = usize::MAX;
        for &(lo, hi, _) in gap_max.iter().filter(|g| g.2 == top) {
            let mut k = lo;
            while let Some(found) = kernels.position_of(&best[k..hi], top) {
                let found = k + found;
                if at == usize::MAX {
                    at = found;
                } else {
                    // A tie: lower response index first, then lower position (`at` is the
                    // lowest position so far, so only a strictly lower holder wins).
                    if at_holder == usize::MAX {
                        at_holder = holder(start + at, top);
                    }
                    let h = holder(start + found, top);
                    if h < at_holder {
                        (at, at_holder) = (found, h);
                    }
                }
                k = found + 1;
            }
        }
        let p = start + at;
        let slot = accepted.partition_point(|&q| q < p);
        accepted.insert(slot, p);
    }
    Some(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The spec's step 1 literally: enumerate, stable-sort by surprisal, walk.
    fn by_sorting(rollouts: &[Rollout], b: usize, min_prefix: usize) -> Vec<usize> {
        let Some(delta) = separation(rollouts, b) else {
            return Vec::new();
        };
        let mut cands: Vec<(f64, usize)> = Vec::new();
        for r in rollouts {
            for p in min_prefix.max(1)..r.len() {
                cands.push((-r.logprobs[p], p));
            }
        }
        // A stable sort, highest surprisal first; equal values (0.0 and -0.0 included) keep
        // enumeration order.
        cands.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap());
        let mut acc: Vec<usize> = Vec::new();
        for (_, p) in cands {
            if acc.len() == b {
                break;
            }
            if acc.iter().all(|&q| p.abs_diff(q) >= delta) {
                acc.push(p);
            }
        }
        acc.sort_unstable();
        acc
    }

    fn rollouts(rows: &[(usize, Vec<u8>)]) -> Vec<Rollout> {
        rows.iter()
            .map(|(len, levels)| {
                let lp: Vec<f64> = (0..*len)
                    .map(|t| -f64::from(levels[t % levels.len()]) * 0.5)
                    .collect();
                Rollout::new(vec![1; *len], lp, 0.0)
            })
            .collect()
    }

    proptest! {
        /// Surprisals from a handful of levels, so ties are everywhere: the arg-max
        /// selection equals the literal stable sort of the spec.
        #[test]
        fn equals_the_sorted_walk(
            rows in proptest::collection::vec(
                (0usize..40, proptest::collection::vec(0u8..4, 1..7)), 1..20),
            b in 0usize..5,
            min_prefix in 0usize..4,
        ) {
            let rs = rollouts(&rows);
            let want = by_sorting(&rs, b, min_prefix);
            let (got, _) = select_boundaries(&rs, b, min_prefix);
            prop_assert_eq!(&got, &want);
            // The portable kernels too, wherever the dispatch above took the AVX2 ones.
            let mut portable = Vec::new();
            let mut scratch = BoundaryScratch::default();
            select_with(Portable, &rs, b, min_prefix, &mut scratch, &mut portable);
            prop_assert_eq!(&portable, &want);
        }
    }

    #[test]
    fn gaps_leave_out_the_exclusion_windows() {
        // Accepted 5 and 12 with delta 3 in 0..20 (start 0): allowed 0..=2, 8..=9, 15..20.
        let g: Vec<_> = gaps(&[5, 12], 0, 3, 20).collect();
        assert_eq!(g, vec![(0, 3), (8, 10), (15, 20)]);
        // Windows that touch the ends leave empty gaps, never reversed ones.
        let g: Vec<_> = gaps(&[1, 18], 1, 3, 19).collect();
        assert_eq!(g, vec![(0, 0), (3, 15), (19, 19)]);
    }
}
