//! The passes over a row of logits: the maximum (with validation), and the unnormalised
//! weights `exp((l - max) / T)` summed per block.
//!
//! Each pass is plain Rust written over fixed lanes so that the compiler vectorises it; on
//! x86-64 CPUs with AVX2 and FMA the same code is also compiled for AVX2 + FMA and picked at
//! run time (the maximum's pass there is written with intrinsics: the compiler shuffled its
//! flag lanes). The lanes fix the order of every floating-point operation, Rust never
//! contracts or reorders them, and the weights' fused multiply-adds are explicit
//! (`mul_add`, exactly rounded in both builds: an instruction, or libm's `fmaf` on an x86-64
//! CPU without FMA, which is slower), so both builds give bit-identical results (a test
//! checks it).

/// Ids per block of [`BlockMass`] sums (the inverse-CDF draw walks blocks, then one block).
pub(super) const BLOCK: usize = 256;
/// Independent accumulators per pass.
const LANES: usize = 8;

/// Arguments below this (in nats) give weight 0: `exp(-86)` is about 4.5e-38, near the
/// smallest normal `f32`, and such a token weighs less than 1e-37 of the most likely one.
const X_MIN: f32 = -86.0;

/// The result of [`scan_max`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct MaxScan {
    /// The largest logit (`-inf` when every logit is `-inf`).
    pub max: f32,
    /// The lowest id holding it.
    pub arg: usize,
    /// Whether some logit is NaN or `+inf`.
    pub bad: bool,
}

/// The weight of one block: tokens of weight exactly 1 (the most likely ones) counted apart
/// from the sum of the others, so that `ln(ones + small)` keeps full relative precision
/// through `ln_1p` when one token dominates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct BlockMass {
    /// Number of weights equal to 1, as a float (exact).
    pub ones: f64,
    /// Sum of the weights below 1.
    pub small: f64,
}

impl BlockMass {
    /// The block's total weight.
    pub fn total(self) -> f64 {
        self.ones + self.small
    }
}

/// The constants of one row's weights: the maximum and `1 / T` split into two `f32`s.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scale {
    max: f32,
    inv_t_hi: f32,
    inv_t_lo: f32,
}

impl Scale {
    /// For the row maximum `max` (an `f32` logit widened) and `inv_t = 1 / T`.
    pub fn new(max: f64, inv_t: f64) -> Self {
        let inv_t_hi = inv_t as f32;
        Scale {
            max: max as f32,
            inv_t_hi,
            inv_t_lo: (inv_t - f64::from(inv_t_hi)) as f32,
        }
    }
}

/// `exp(x)` as `f32` for `x = (l - max) * inv_t <= 0`, relative error below 2e-7 (a few
/// `f32` ulps, whatever `x`); 0 below [`X_MIN`].
///
/// `x` is carried as an unevaluated sum `hi + lo` (the subtraction and the product by `1 / T`
/// with their exact rounding errors, by TwoSum and fused multiply-adds), so that its error
/// stays near 1e-14 even where `|x|` is large; then range reduction (`x = k ln 2 + r`,
/// `|r| <= ln 2 / 2`, Cody-Waite with a fused multiply-add), a degree-7 Taylor polynomial
/// (truncation error `r^8 / 8! < 5.3e-9`) and `2^k` built from bits. No branch and no call
/// where FMA is a CPU instruction, so loops over it vectorise eight lanes wide. `x = 0` gives
/// exactly 1, and no weight exceeds 1.
#[inline(always)]
pub(super) fn weight(l: f32, s: Scale) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = std::f32::consts::LN_2;
    // ln 2 - LN2_HI, rounded.
    const LN2_LO: f32 = -1.904_654_3e-9;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: u32 = 0x4B40_0000;
    // d = l - max exactly as d + e (TwoSum).
    let b = -s.max;
    let d = l + b;
    let a1 = d - b;
    let b1 = d - a1;
    let e = (l - a1) + (b - b1);
    // x = d * inv_t as hi + lo.
    let hi = d * s.inv_t_hi;
    let lo = d.mul_add(s.inv_t_hi, -hi);
    let lo = e.mul_add(s.inv_t_hi, lo);
    let lo = d.mul_add(s.inv_t_lo, lo);
    let xc = if hi < X_MIN { X_MIN } else { hi };
    let t = xc.mul_add(LOG2E, MAGIC);
    let k = t - MAGIC;
    let r = (-k).mul_add(LN2_HI, xc);
    let r = (-k).mul_add(LN2_LO, r) + lo;
    let p = r.mul_add(1.0 / 5040.0, 1.0 / 720.0);
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // k is in [-125, 0]: 2^k is a normal f32 with biased exponent k + 127.
    let scale = f32::from_bits(
        t.to_bits()
            .wrapping_sub(MAGIC_BITS)
            .wrapping_add(127)
            .wrapping_shl(23),
    );
    // Zeroed by a mask, not a branch, so that the loops stay vectorised (this also clears the
    // NaN that an infinite `d` leaves in `lo`).
    let keep = 0u32.wrapping_sub(u32::from(hi >= X_MIN));
    f32::from_bits((p * scale).to_bits() & keep)
}

/// Whether this CPU runs the AVX2 + FMA builds of the passes.
#[cfg(target_arch = "x86_64")]
#[inline]
fn fast_cpu() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// The maximum of `logits`, its lowest id, and whether any logit is NaN or `+inf`.
pub(super) fn scan_max(logits: &[f32]) -> MaxScan {
    #[cfg(target_arch = "x86_64")]
    if fast_cpu() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { scan_max_avx2(logits) };
    }
    scan_max_portable(logits)
}

/// [`weigh`]'s work: the block masses of `logits` into `blocks` (one per [`BLOCK`] ids) and,
/// when `store` is given, every weight as `f32` into it (same length as `logits`).
pub(super) fn weigh(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    blocks: &mut Vec<BlockMass>,
    store: Option<&mut [f32]>,
) {
    blocks.clear();
    blocks.resize(logits.len().div_ceil(BLOCK), BlockMass::default());
    let s = Scale::new(max, inv_t);
    #[cfg(target_arch = "x86_64")]
    if fast_cpu() {
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { weigh_avx2(logits, s, blocks, store) };
        return;
    }
    weigh_portable(logits, s, blocks, store);
}

/// The first id in `ids` (a range of the vocabulary) whose weight pushes the running sum
/// past `target`, and the last positive-weight id seen (the fallback when rounding leaves the
/// target unreached).
pub(super) fn walk(
    logits: &[f32],
    ids: std::ops::Range<usize>,
    max: f64,
    inv_t: f64,
    target: f64,
) -> (Option<usize>, Option<usize>) {
    let s = Scale::new(max, inv_t);
    #[cfg(target_arch = "x86_64")]
    if fast_cpu() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { walk_avx2(logits, ids, s, target) };
    }
    walk_portable(logits, ids, s, target)
}

#[inline(always)]
fn walk_portable(
    logits: &[f32],
    ids: std::ops::Range<usize>,
    s: Scale,
    target: f64,
) -> (Option<usize>, Option<usize>) {
    let mut acc = 0.0;
    let mut last = None;
    for i in ids {
        let w = weight(logits[i], s);
        if w > 0.0 {
            acc += f64::from(w);
            last = Some(i);
            if acc > target {
                return (Some(i), last);
            }
        }
    }
    (None, last)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn walk_avx2(
    logits: &[f32],
    ids: std::ops::Range<usize>,
    s: Scale,
    target: f64,
) -> (Option<usize>, Option<usize>) {
    walk_portable(logits, ids, s, target)
}

/// [`scan_max_portable`] with AVX intrinsics (the compiler's own vectorisation of the flag
/// shuffles lanes). `max_ps(x, m)` is `if x > m { x } else { m }`, exactly the portable
/// select, and the flag `!(x < inf)` is true exactly for NaN or `+inf`, the portable test, so
/// the results are identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_max_avx2(logits: &[f32]) -> MaxScan {
    use std::arch::x86_64::{
        _mm256_cmp_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_or_ps, _mm256_set1_ps,
        _mm256_setzero_ps, _mm256_storeu_ps, _CMP_NLT_UQ,
    };
    let (chunks, rest) = logits.as_chunks::<LANES>();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut flag = _mm256_setzero_ps();
    let inf = _mm256_set1_ps(f32::INFINITY);
    for chunk in chunks {
        // SAFETY: `chunk` holds LANES = 8 floats.
        let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        flag = _mm256_or_ps(flag, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, inf));
        m = _mm256_max_ps(x, m);
    }
    let mut lanes = [0.0f32; LANES];
    let mut flags = [0.0f32; LANES];
    // SAFETY: both arrays hold LANES = 8 floats.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        _mm256_storeu_ps(flags.as_mut_ptr(), flag);
    }
    let bad = flags.iter().any(|f| f.to_bits() != 0);
    finish_max_scan(logits, rest, lanes, bad)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_avx2(
    logits: &[f32],
    s: Scale,
    blocks: &mut [BlockMass],
    store: Option<&mut [f32]>,
) {
    weigh_portable(logits, s, blocks, store)
}

/// The maximum per lane and a flag for NaN or `+inf`, then the lowest id
/// holding the maximum ([`first_of`]).
#[inline(always)]
fn scan_max_portable(logits: &[f32]) -> MaxScan {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = false;
    let (chunks, rest) = logits.as_chunks::<LANES>();
    for chunk in chunks {
        for j in 0..LANES {
            let x = chunk[j];
            bad |= x.is_nan() | (x == f32::INFINITY);
            m[j] = if x > m[j] { x } else { m[j] };
        }
    }
    finish_max_scan(logits, rest, m, bad)
}

/// The end of both max scans: folds the tail `rest` (fewer than [`LANES`] values) into the
/// per-lane maxima `lanes` and the NaN/`+inf` flag `bad`, then reduces the lanes with the
/// same select and finds the lowest id holding the maximum ([`first_of`]).
#[inline(always)]
fn finish_max_scan(
    logits: &[f32],
    rest: &[f32],
    mut lanes: [f32; LANES],
    mut bad: bool,
) -> MaxScan {
    for (j, &x) in rest.iter().enumerate() {
        bad |= x.is_nan() | (x == f32::INFINITY);
        lanes[j] = if x > lanes[j] { x } else { lanes[j] };
    }
    let max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    MaxScan {
        max,
        arg: first_of(logits, max),
        bad,
    }
}

/// The lowest id holding `max` (0 if none): a chunk at a time by a vectorised test, then the
/// position inside the chunk.
#[inline(always)]
fn first_of(logits: &[f32], max: f32) -> usize {
    const SEARCH: usize = 64;
    for (c, chunk) in logits.chunks(SEARCH).enumerate() {
        if chunk.iter().fold(0u32, |a, &x| a | u32::from(x == max)) != 0 {
            return c * SEARCH + chunk.iter().position(|&x| x == max).unwrap_or(0);
        }
    }
    0
}

#[inline(always)]
fn weigh_portable(logits: &[f32], s: Scale, blocks: &mut [BlockMass], store: Option<&mut [f32]>) {
    match store {
        Some(out) => {
            for ((block, mass), out) in logits
                .chunks(BLOCK)
                .zip(blocks.iter_mut())
                .zip(out.chunks_mut(BLOCK))
            {
                *mass = weigh_block(block, s, out);
            }
        }
        None => {
            // The weights of one block at a time, dropped after their sums.
            let mut local = [0.0f32; BLOCK];
            for (block, mass) in logits.chunks(BLOCK).zip(blocks.iter_mut()) {
                *mass = weigh_block(block, s, &mut local);
            }
        }
    }
}

/// One block's [`BlockMass`], each weight into `out` (at least as long). Two loops:
/// the weights (`f32`, eight lanes wide), then their sums in `f64`, where weights of exactly 1
/// are split from the others by bit masks, not selects: a select on an accumulator makes LLVM
/// emit masked stores or branches instead of vector adds.
#[inline(always)]
fn weigh_block(block: &[f32], s: Scale, out: &mut [f32]) -> BlockMass {
    let w = &mut out[..block.len()];
    for (w, &l) in w.iter_mut().zip(block) {
        *w = weight(l, s);
    }
    let mut ones = [0u32; LANES];
    let mut small = [0.0f64; LANES];
    let (chunks, rest) = w.as_chunks::<LANES>();
    for chunk in chunks {
        for j in 0..LANES {
            let w = chunk[j];
            // Weights never exceed 1; the select is on the value, not the accumulator.
            ones[j] = ones[j].wrapping_add(u32::from(w == 1.0));
            small[j] += f64::from(if w == 1.0 { 0.0 } else { w });
        }
    }
    for (j, &w) in rest.iter().enumerate() {
        ones[j] = ones[j].wrapping_add(u32::from(w == 1.0));
        small[j] += f64::from(if w == 1.0 { 0.0 } else { w });
    }
    BlockMass {
        ones: f64::from(ones.iter().fold(0u32, |a, &n| a.wrapping_add(n))),
        small: lane_sum(small),
    }
}

/// The lanes added pairwise (a fixed order).
#[inline(always)]
fn lane_sum(x: [f64; LANES]) -> f64 {
    ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weight_is_exp_within_2e7() {
        // Against exp in f64 of the exact (l - max) / T, over the whole range, at several
        // temperatures and maxima (so that the subtraction and the product round in f32).
        for (max, inv_t) in [
            (0.0f32, 1.0f64),
            (7.3, 1.0),
            (-3.1, 1.0 / 0.7),
            (11.9, 1.0 / 3.3),
        ] {
            let s = Scale::new(f64::from(max), inv_t);
            let mut worst: f64 = 0.0;
            for i in 0..200_000 {
                let l = max - (i as f32) * 0.0021;
                let x = (f64::from(l) - f64::from(max)) * inv_t;
                if x < f64::from(X_MIN) {
                    assert_eq!(weight(l, s), 0.0);
                    continue;
                }
                let got = f64::from(weight(l, s));
                let want = x.exp();
                worst = worst.max(((got - want) / want).abs());
                assert!(got <= 1.0);
            }
            assert!(
                worst < 2e-7,
                "max {max} 1/T {inv_t}: worst relative error {worst}"
            );
        }
        let s = Scale::new(3.0, 1.0);
        assert_eq!(weight(3.0, s), 1.0);
        assert_eq!(weight(f32::NEG_INFINITY, s), 0.0);
        assert_eq!(weight(-1e30, s), 0.0);
        assert_eq!(weight(-f32::MAX, Scale::new(f64::from(f32::MAX), 1.0)), 0.0);
        assert_eq!(weight(-1.0, Scale::new(1.0, 1e7)), 0.0);
    }

    proptest! {
        #[test]
        fn portable_and_dispatched_passes_agree(
            logits in proptest::collection::vec(-30.0f32..30.0, 1..700),
            inv_t in 0.01f64..10.0,
        ) {
            let a = scan_max_portable(&logits);
            let b = scan_max(&logits);
            prop_assert_eq!(a, b);
            let want = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            prop_assert_eq!(a.max, want);
            prop_assert_eq!(a.arg, logits.iter().position(|&l| l == want).unwrap());
            let mut ba = vec![BlockMass::default(); logits.len().div_ceil(BLOCK)];
            let mut sa = vec![0.0f32; logits.len()];
            weigh_portable(&logits, Scale::new(f64::from(a.max), inv_t), &mut ba, Some(&mut sa));
            let mut bb = Vec::new();
            let mut sb = vec![0.0f32; logits.len()];
            weigh(&logits, f64::from(a.max), inv_t, &mut bb, Some(&mut sb));
            prop_assert_eq!(&ba, &bb);
            prop_assert_eq!(sa, sb);
            let mut bc = Vec::new();
            weigh(&logits, f64::from(a.max), inv_t, &mut bc, None);
            prop_assert_eq!(ba, bc);
        }
    }

    #[test]
    fn scan_flags_nan_and_inf_and_takes_the_lowest_id() {
        let s = scan_max(&[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0]);
        assert_eq!((s.max, s.arg, s.bad), (3.0, 1, false));
        assert!(scan_max(&[0.0, f32::NAN]).bad);
        assert!(scan_max(&[0.0, f32::INFINITY]).bad);
        let s = scan_max(&[f32::NEG_INFINITY; 11]);
        assert_eq!(s.max, f32::NEG_INFINITY);
        assert!(!s.bad);
    }
}
