//! The top-p nucleus of a row of weights, found by a threshold search on the mass.
//!
//! Order: weight descending, ties by lower id (every token has a distinct key). The nucleus
//! is mistral.rs's: in that order a token is kept while the mass before it is below
//! `top_p` times the total; tokens of weight 0 are never kept.
//!
//! 1. One pass adds every weight into a histogram whose bins are the top bits of the `f32`
//!    weight (16 bins per octave; bin order is weight order, and the top bin holds exactly
//!    the weights equal to 1).
//! 2. Walking the bins from the top finds the boundary bin: every bin above it is in, every
//!    bin below it is out.
//! 3. One pass collects the boundary bin's members, and a quickselect on the mass (expected
//!    linear, unique keys) finds the last kept key there.
//!
//! The vocabulary is touched twice (histogram, collection); the draw walks it once more.

use super::kernels::BlockMass;

/// Bins of the weight histogram: `f32` bits shifted right by [`SHIFT`]. Weights are in
/// [0, 1], so bins run from 0 (weight 0) to [`TOP_BIN`] (weight 1).
pub(super) const BINS: usize = 2048;
/// Bits dropped from an `f32` weight to give its bin (23 - 19 = 4 mantissa bits kept).
const SHIFT: u32 = 19;
/// The bin of weight 1.0: it holds exactly the weights equal to 1.
pub(super) const TOP_BIN: usize = (0x3F80_0000u32 >> SHIFT) as usize;

/// The bin of a weight in [0, 1].
#[inline(always)]
pub(super) fn bin_of(w: f32) -> usize {
    (w.to_bits() >> SHIFT) as usize
}

/// The lowest weight of bin `b`.
fn bin_floor(b: usize) -> f32 {
    f32::from_bits((b as u32) << SHIFT)
}

/// A token of the boundary bin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Member {
    /// Its weight.
    pub w: f32,
    /// Its id.
    pub id: u32,
}

impl Member {
    /// Whether `self` comes before `other` (higher weight, then lower id).
    #[inline(always)]
    fn before(self, other: Member) -> bool {
        self.w > other.w || (self.w == other.w && self.id < other.id)
    }
}

/// The nucleus, as a cut in the (weight, id) order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Nucleus {
    /// The boundary bin (at least 1); bins above it are wholly in, bins below it out.
    pub bin: usize,
    /// The last kept key of the boundary bin (every member up to it is in).
    pub last: Member,
    /// Mass kept from the boundary bin.
    pub bin_mass: f64,
    /// The kept mass, tokens of weight exactly 1 counted apart (see [`BlockMass`]).
    pub mass: BlockMass,
}

impl Nucleus {
    /// Whether the token `id` of weight `w` is in the nucleus.
    #[inline]
    pub fn contains(&self, w: f32, id: u32) -> bool {
        let b = bin_of(w);
        // Keys are unique: a member of the boundary bin is in unless it comes after `last`.
        w > 0.0 && (b > self.bin || (b == self.bin && !self.last.before(Member { w, id })))
    }

    /// The mass the nucleus keeps from bin `b`.
    pub fn kept_in(&self, b: usize, hist: &[f64]) -> f64 {
        if b > self.bin {
            hist[b]
        } else if b == self.bin {
            self.bin_mass
        } else {
            0.0
        }
    }
}

/// The prefilter: tokens lighter than this can never be in the nucleus of `top_p` over
/// `vocab` tokens of total weight `total`. All of them together weigh less than half the
/// mass `(1 - top_p) * total` that the nucleus leaves out, and every token after one of them
/// (in key order) is one of them, so the mass before any of them exceeds the target.
pub(super) fn prefilter_cut(total: f64, top_p: f64, vocab: usize) -> f32 {
    ((1.0 - top_p) * total / (2.0 * vocab as f64)) as f32
}

/// Adds the weights of at least `cut` into `hist` (cleared first; [`BINS`] bins). Chunks
/// without one are skipped after one vectorised test; two interleaved histograms halve the
/// dependency chains when many weights share a bin.
pub(super) fn histogram(weights: &[f32], cut: f32, hist: &mut Vec<f64>, spare: &mut Vec<f64>) {
    hist.clear();
    hist.resize(BINS, 0.0);
    spare.clear();
    spare.resize(BINS, 0.0);
    const CHUNK: usize = 16;
    let (chunks, rest) = weights.as_chunks::<CHUNK>();
    for chunk in chunks {
        if !chunk.iter().fold(false, |a, &w| a | (w >= cut)) {
            continue;
        }
        for pair in chunk.as_chunks::<2>().0 {
            let [a, b] = *pair;
            if a >= cut {
                hist[bin_of(a) & (BINS - 1)] += f64::from(a);
            }
            if b >= cut {
                spare[bin_of(b) & (BINS - 1)] += f64::from(b);
            }
        }
    }
    for &w in rest {
        if w >= cut {
            hist[bin_of(w) & (BINS - 1)] += f64::from(w);
        }
    }
    for (h, s) in hist.iter_mut().zip(spare.iter()) {
        *h += *s;
    }
}

/// The nucleus at `top_p` of `weights` of total `total`, from their histogram `hist` above
/// `cut` ([`histogram`]), using `members` as scratch.
pub(super) fn find(
    weights: &[f32],
    cut: f32,
    hist: &[f64],
    total: f64,
    top_p: f64,
    members: &mut Vec<Member>,
) -> Nucleus {
    let target = top_p * total;
    let mut before = 0.0;
    let mut boundary = None;
    let mut lowest = None;
    for b in (1..=TOP_BIN).rev() {
        if hist[b] <= 0.0 {
            continue;
        }
        lowest = Some((b, before));
        if before + hist[b] >= target {
            boundary = Some((b, target - before));
            break;
        }
        before += hist[b];
    }
    // Rounding left the target unreached: the lowest bin is the boundary, taken whole.
    let Some((boundary, remaining)) = boundary.or(lowest.map(|(b, _)| (b, f64::INFINITY))) else {
        return Nucleus {
            bin: TOP_BIN + 1,
            last: Member { w: 0.0, id: 0 },
            bin_mass: 0.0,
            mass: BlockMass::default(),
        };
    };
    collect_bin(weights, boundary, cut, members);
    let (kept, bin_mass) = select(members, remaining);
    let last = members[..kept]
        .iter()
        .copied()
        .reduce(|a, b| if b.before(a) { a } else { b })
        .unwrap_or(Member { w: 0.0, id: 0 });
    let mass = if boundary == TOP_BIN {
        BlockMass {
            ones: bin_mass,
            small: 0.0,
        }
    } else {
        let small_above: f64 = hist[boundary + 1..TOP_BIN].iter().rev().sum();
        BlockMass {
            ones: hist[TOP_BIN],
            small: small_above + bin_mass,
        }
    };
    Nucleus {
        bin: boundary,
        last,
        bin_mass,
        mass,
    }
}

/// The tokens of bin `b` of weight at least `cut`, in id order, into `members` (cleared
/// first).
pub(super) fn collect_bin(weights: &[f32], b: usize, cut: f32, members: &mut Vec<Member>) {
    members.clear();
    for_each_in_bin(weights, b, cut, |id, w| {
        members.push(Member { w, id });
        true
    });
}

/// Calls `f(id, w)` for every token of bin `b` of weight at least `cut`, in id order, until
/// it returns false. Chunks without one are skipped after one vectorised range test.
#[inline]
pub(super) fn for_each_in_bin(
    weights: &[f32],
    b: usize,
    cut: f32,
    mut f: impl FnMut(u32, f32) -> bool,
) {
    let lo = if bin_floor(b) > cut {
        bin_floor(b)
    } else {
        cut
    };
    let hi = bin_floor(b + 1);
    const CHUNK: usize = 16;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let any = chunk.iter().fold(false, |a, &w| a | (w >= lo && w < hi));
        if !any {
            continue;
        }
        for (j, &w) in chunk.iter().enumerate() {
            if w >= lo && w < hi && !f((c * CHUNK + j) as u32, w) {
                return;
            }
        }
    }
}

/// Moves the shortest prefix (in key order) of `m` whose mass reaches `target` to the front,
/// keeping a token while the mass before it is below `target`; returns its length and
/// mass. Quickselect on the mass with a deterministic pivot stream: expected O(len).
fn select(m: &mut [Member], target: f64) -> (usize, f64) {
    let (mut lo, mut hi) = (0usize, m.len());
    let mut remaining = target;
    let mut mass = 0.0;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ (m.len() as u64);
    while lo < hi && remaining > 0.0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let p = lo + (state % (hi - lo) as u64) as usize;
        m.swap(lo, p);
        let pivot = m[lo];
        // m[lo + 1..g] come before the pivot, m[g..hi] after it.
        let mut g = lo + 1;
        let mut g_mass = 0.0;
        for i in lo + 1..hi {
            if m[i].before(pivot) {
                g_mass += f64::from(m[i].w);
                m.swap(i, g);
                g += 1;
            }
        }
        m.swap(lo, g - 1);
        // Now m[lo..g - 1] come before the pivot, which sits at g - 1.
        if g_mass >= remaining {
            // The mass before the pivot reaches the target: the nucleus ends before it.
            hi = g - 1;
            continue;
        }
        mass += g_mass + f64::from(pivot.w);
        remaining -= g_mass + f64::from(pivot.w);
        lo = g;
    }
    (lo, mass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The nucleus by a full sort.
    fn by_sort(w: &[f32], top_p: f64) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..w.len() as u32).collect();
        ids.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let mut out = Vec::new();
        let mut cum = 0.0;
        for id in ids {
            if cum >= top_p * total || w[id as usize] <= 0.0 {
                break;
            }
            cum += f64::from(w[id as usize]);
            out.push(id);
        }
        out.sort_unstable();
        out
    }

    fn nucleus_of(w: &[f32], top_p: f64) -> (Nucleus, Vec<u32>) {
        let (mut h, mut s, mut m) = (Vec::new(), Vec::new(), Vec::new());
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let cut = prefilter_cut(total, top_p, w.len());
        histogram(w, cut, &mut h, &mut s);
        let n = find(w, cut, &h, total, top_p, &mut m);
        let ids = (0..w.len() as u32)
            .filter(|&i| n.contains(w[i as usize], i))
            .collect();
        (n, ids)
    }

    #[test]
    fn hand_checked() {
        // Sorted: 1 (id 2), 0.75 (id 0), 0.5 (id 3), 0.25 (id 1); total 2.5.
        let w = [0.75f32, 0.25, 1.0, 0.5];
        for (top_p, expect) in [
            (0.35, vec![2]),
            (0.4, vec![2]),
            (0.41, vec![0, 2]),
            (0.7, vec![0, 2]),
            (0.75, vec![0, 2, 3]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            let (n, ids) = nucleus_of(&w, top_p);
            assert_eq!(ids, expect, "top_p {top_p}");
            let want: f64 = expect.iter().map(|&i| f64::from(w[i as usize])).sum();
            assert_eq!(n.mass.total(), want);
        }
    }

    #[test]
    fn ties_take_lower_ids() {
        let (n, ids) = nucleus_of(&[1.0, 1.0, 1.0, 1.0], 0.5);
        assert_eq!(ids, vec![0, 1]);
        assert_eq!(n.mass.ones, 2.0);
        // Total 2.5: at 0.6 the mass before id 2 is 1.5, the target; at 0.61 it is below.
        let (_, ids) = nucleus_of(&[0.5, 1.0, 0.5, 0.5, 0.0], 0.6);
        assert_eq!(ids, vec![0, 1]);
        let (_, ids) = nucleus_of(&[0.5, 1.0, 0.5, 0.5, 0.0], 0.61);
        assert_eq!(ids, vec![0, 1, 2]);
    }

    proptest! {
        #[test]
        fn matches_a_sort(raw in proptest::collection::vec(0u32..1000, 1..400), top_p in 0.01f64..1.0) {
            let top = *raw.iter().max().unwrap();
            prop_assume!(top > 0);
            // Weights in [0, 1] with the largest exactly 1, as the sampler makes them.
            let w: Vec<f32> = raw.iter().map(|&r| r as f32 / top as f32).collect();
            let (n, ids) = nucleus_of(&w, top_p);
            let want = by_sort(&w, top_p);
            let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
            let want_mass: f64 = want.iter().map(|&i| f64::from(w[i as usize])).sum();
            if ids != want {
                // Only when a float sum lands within rounding of the target.
                prop_assert!((want_mass - top_p * total).abs() < 1e-9 * total);
            } else {
                prop_assert!((n.mass.total() - want_mass).abs() < 1e-9 * total);
            }
        }
    }
}
