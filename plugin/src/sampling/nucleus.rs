//! The top-p nucleus of a row of weights, found by a threshold search on the mass.
//!
//! Order: weight descending, ties by lower id (every token has a distinct key). The nucleus
//! is mistral.rs's: in that order a token is kept while the mass before it is below
//! `top_p` times the total; tokens of weight 0 are never kept.
//!
//! 1. One branch-free pass collects the candidates: the ids whose weight reaches a cut below
//!    which no token can be in the nucleus ([`prefilter_cut`]).
//! 2. One pass over the candidates adds their weights into a histogram whose bins are the top
//!    bits of the `f32` weight (16 bins per octave; bin order is weight order, and the top bin
//!    holds exactly the weights equal to 1).
//! 3. Walking the bins from the top finds the boundary bin: every bin above it is in, every
//!    bin below it is out.
//! 4. One pass over the candidates collects the boundary bin's members, and a quickselect on
//!    the mass (expected linear, unique keys) finds the last kept key there.
//!
//! The vocabulary is touched once (the candidates); the histogram, the collection and the
//! draw walk only the candidates.

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

/// The candidates: the ids of the weights of at least `cut` and those weights, in id order.
/// The buffers only grow (to the vocabulary), so that no call clears them; `len` says how
/// many are current.
#[derive(Debug, Default)]
pub(super) struct Candidates {
    ids: Vec<u32>,
    weights: Vec<f32>,
    len: usize,
}

impl Candidates {
    /// Their ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    /// Their weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights[..self.len]
    }

    /// Collects the candidates of `weights` above `cut`.
    pub fn collect(&mut self, weights: &[f32], cut: f32) {
        if self.ids.len() < weights.len() {
            self.ids.resize(weights.len(), 0);
            self.weights.resize(weights.len(), 0.0);
        }
        let ids = &mut self.ids[..weights.len()];
        let ws = &mut self.weights[..weights.len()];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2.
            self.len = unsafe { compact_avx2(weights, cut, ids, ws) };
            return;
        }
        self.len = compact_portable(weights, cut, ids, ws);
    }
}

/// The candidates into `ids` and `ws` (as long as `weights`); returns their number.
/// Branch-free: every id is written and the count advances by the test, so a flat row of
/// logits (where about every other weight passes, at random) costs no mispredicted branch;
/// chunks without a candidate are skipped after one vectorised test (most of a peaked row).
#[inline(always)]
fn compact_portable(weights: &[f32], cut: f32, ids: &mut [u32], ws: &mut [f32]) -> usize {
    const CHUNK: usize = 16;
    let (chunks, rest) = weights.as_chunks::<CHUNK>();
    // `n` never passes the id being written, so `ids[n]` is in bounds.
    let mut n = 0usize;
    let mut base = 0u32;
    for chunk in chunks {
        if chunk.iter().fold(0u32, |a, &w| a | u32::from(w >= cut)) != 0 {
            for (j, &w) in chunk.iter().enumerate() {
                ids[n] = base.wrapping_add(j as u32);
                ws[n] = w;
                n += usize::from(w >= cut);
            }
        }
        base = base.wrapping_add(CHUNK as u32);
    }
    for (j, &w) in rest.iter().enumerate() {
        ids[n] = base.wrapping_add(j as u32);
        ws[n] = w;
        n += usize::from(w >= cut);
    }
    n
}

/// For each 8-bit mask, the positions of its set bits, packed to the front.
#[cfg(target_arch = "x86_64")]
static PACK: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut j, mut k) = (0, 0);
        while j < 8 {
            if m & (1 << j) != 0 {
                t[m][k] = j as u32;
                k += 1;
            }
            j += 1;
        }
        m += 1;
    }
    t
};

/// [`compact_portable`] with AVX2: eight weights at a time, compared with `cut`, the passing
/// lanes (ids and weights) packed to the front by a permutation from [`PACK`] and stored
/// eight wide at the count. The same candidates in the same order; only the slots past the
/// count differ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compact_avx2(weights: &[f32], cut: f32, ids: &mut [u32], ws: &mut [f32]) -> usize {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmp_ps,
        _mm256_loadu_ps, _mm256_loadu_si256, _mm256_movemask_ps, _mm256_permutevar8x32_epi32,
        _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32, _mm256_storeu_ps,
        _mm256_storeu_si256, _CMP_GE_OQ,
    };
    let (chunks, rest) = weights.as_chunks::<8>();
    let cutv = _mm256_set1_ps(cut);
    let mut idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let eight = _mm256_set1_epi32(8);
    let mut n = 0usize;
    for chunk in chunks {
        // SAFETY: `chunk` holds 8 floats.
        let w = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(w, cutv)) as usize & 0xFF;
        // SAFETY: a PACK row holds 8 u32.
        let perm = unsafe { _mm256_loadu_si256(PACK[m].as_ptr().cast::<__m256i>()) };
        // `n` is at most this chunk's first id, and the chunk is whole: 8 slots from `n` exist.
        let (id_out, w_out) = (&mut ids[n..n + 8], &mut ws[n..n + 8]);
        // SAFETY: both slices hold 8 elements.
        unsafe {
            _mm256_storeu_si256(
                id_out.as_mut_ptr().cast::<__m256i>(),
                _mm256_permutevar8x32_epi32(idx, perm),
            );
            _mm256_storeu_ps(
                w_out.as_mut_ptr(),
                _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_castps_si256(w), perm)),
            );
        }
        n += m.count_ones() as usize;
        idx = _mm256_add_epi32(idx, eight);
    }
    let base = chunks.len() * 8;
    for (j, &w) in rest.iter().enumerate() {
        ids[n] = (base + j) as u32;
        ws[n] = w;
        n += usize::from(w >= cut);
    }
    n
}

/// Adds the weights of the candidates into `hist` (cleared first; [`BINS`] bins).
/// Branch-free; two interleaved histograms halve the dependency chains when many weights
/// share a bin.
pub(super) fn histogram(cands: &Candidates, hist: &mut Vec<f64>, spare: &mut Vec<f64>) {
    hist.clear();
    hist.resize(BINS, 0.0);
    spare.clear();
    spare.resize(BINS, 0.0);
    let (pairs, rest) = cands.weights().as_chunks::<2>();
    for &[a, b] in pairs {
        hist[bin_of(a) & (BINS - 1)] += f64::from(a);
        spare[bin_of(b) & (BINS - 1)] += f64::from(b);
    }
    for &w in rest {
        hist[bin_of(w) & (BINS - 1)] += f64::from(w);
    }
    for (h, s) in hist.iter_mut().zip(spare.iter()) {
        *h += *s;
    }
}

/// The nucleus at `top_p` of `weights` of total `total`, from the histogram `hist` of the
/// candidates `cands` ([`candidates`] above the [`prefilter_cut`], [`histogram`]), using
/// `members` as scratch.
pub(super) fn find(
    cands: &Candidates,
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
    collect_bin(cands, boundary, members);
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

/// The candidates of bin `b`, in id order, into `members` (cleared first).
pub(super) fn collect_bin(cands: &Candidates, b: usize, members: &mut Vec<Member>) {
    members.clear();
    for_each_in_bin(cands, b, |id, w| {
        members.push(Member { w, id });
        true
    });
}

/// Calls `f(id, w)` for every candidate of bin `b`, in id order, until it returns false.
/// Chunks without one are skipped after one vectorised test.
#[inline]
pub(super) fn for_each_in_bin(cands: &Candidates, b: usize, mut f: impl FnMut(u32, f32) -> bool) {
    const CHUNK: usize = 16;
    let b = b as u32;
    let ids = cands.ids();
    for (c, chunk) in cands.weights().chunks(CHUNK).enumerate() {
        let any = chunk
            .iter()
            .fold(0u32, |a, &w| a | u32::from((w.to_bits() >> SHIFT) == b));
        if any == 0 {
            continue;
        }
        for (j, &w) in chunk.iter().enumerate() {
            if (w.to_bits() >> SHIFT) == b && !f(ids[c * CHUNK + j], w) {
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
        let mut c = Candidates::default();
        c.collect(w, cut);
        // The dispatched packing and the portable one agree.
        let (mut ids, mut ws) = (vec![0; w.len()], vec![0.0; w.len()]);
        let k = compact_portable(w, cut, &mut ids, &mut ws);
        assert_eq!(c.ids(), &ids[..k]);
        assert_eq!(c.weights(), &ws[..k]);
        histogram(&c, &mut h, &mut s);
        let n = find(&c, &h, total, top_p, &mut m);
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
