//! The passes over a row of logits: the maximum (with validation), and the unnormalised
//! weights `exp((l - max) / T)` summed per block.
//!
//! Each pass is plain Rust written over fixed lanes so that the compiler vectorises it; on
//! x86-64 CPUs with AVX2 the same code is also compiled for AVX2 and picked at run time. The
//! lanes fix the order of every floating-point operation, and Rust never contracts or
//! reorders them, so both builds give bit-identical results (a test checks it).

/// Ids per block of [`BlockMass`] sums (the inverse-CDF draw walks blocks, then one block).
pub(super) const BLOCK: usize = 256;
/// Independent accumulators per pass.
const LANES: usize = 8;

/// Arguments below this (in nats) give weight 0: `exp(-708)` is near the smallest normal
/// `f64`, and such a token weighs less than 1e-307 of the most likely one.
const X_MIN: f64 = -708.0;

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

/// `exp(x)` for `x = (l - max) * inv_t <= 0`, relative error below 1e-8; 0 below [`X_MIN`].
///
/// Range reduction in `f64` (`x = k ln 2 + r`, `|r| <= ln 2 / 2`, Cody-Waite), a degree-7
/// Taylor polynomial (truncation error `r^8 / 8! < 5.3e-9`) and `2^k` built from bits. No
/// branch and no call, so loops over it vectorise. `x = 0` gives exactly 1.
#[inline(always)]
pub(super) fn weight(l: f32, max: f64, inv_t: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    const MAGIC_BITS: u64 = 0x4338_0000_0000_0000;
    let x = (f64::from(l) - max) * inv_t;
    let xc = if x < X_MIN { X_MIN } else { x };
    let t = xc * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // k is in [-1021, 0]: 2^k is a normal f64 with biased exponent k + 1023.
    let scale = f64::from_bits(
        t.to_bits()
            .wrapping_sub(MAGIC_BITS)
            .wrapping_add(1023)
            .wrapping_shl(52),
    );
    // Zeroed by a mask, not a branch, so that the loops stay vectorised.
    let keep = 0u64.wrapping_sub(u64::from(x >= X_MIN));
    f64::from_bits((p * scale).to_bits() & keep)
}

/// The maximum of `logits`, its lowest id, and whether any logit is NaN or `+inf`.
pub(super) fn scan_max(logits: &[f32]) -> MaxScan {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
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
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        unsafe { weigh_avx2(logits, max, inv_t, blocks, store) };
        return;
    }
    weigh_portable(logits, max, inv_t, blocks, store);
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
    let mut acc = 0.0;
    let mut last = None;
    for i in ids {
        let w = weight(logits[i], max, inv_t);
        if w > 0.0 {
            acc += w;
            last = Some(i);
            if acc > target {
                return (Some(i), last);
            }
        }
    }
    (None, last)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_max_avx2(logits: &[f32]) -> MaxScan {
    scan_max_portable(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weigh_avx2(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    blocks: &mut [BlockMass],
    store: Option<&mut [f32]>,
) {
    weigh_portable(logits, max, inv_t, blocks, store)
}

#[inline(always)]
fn scan_max_portable(logits: &[f32]) -> MaxScan {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let (chunks, rest) = logits.as_chunks::<LANES>();
    for chunk in chunks {
        for j in 0..LANES {
            let x = chunk[j];
            bad[j] |= x.is_nan() | (x == f32::INFINITY);
            m[j] = if x > m[j] { x } else { m[j] };
        }
    }
    for (j, &x) in rest.iter().enumerate() {
        bad[j] |= x.is_nan() | (x == f32::INFINITY);
        m[j] = if x > m[j] { x } else { m[j] };
    }
    let max = m
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    // The lowest id holding it: a chunk-wise test, then the chunk.
    let mut arg = 0;
    for (c, chunk) in chunks.iter().enumerate() {
        if chunk.iter().fold(false, |a, &x| a | (x == max)) {
            arg = c * LANES + chunk.iter().position(|&x| x == max).unwrap_or(0);
            break;
        }
        arg = (c + 1) * LANES;
    }
    if arg >= chunks.len() * LANES {
        arg += rest.iter().position(|&x| x == max).unwrap_or(0);
    }
    MaxScan {
        max,
        arg,
        bad: bad.iter().any(|&b| b),
    }
}

#[inline(always)]
fn weigh_portable(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    blocks: &mut [BlockMass],
    store: Option<&mut [f32]>,
) {
    match store {
        Some(out) => {
            for ((block, mass), out) in logits
                .chunks(BLOCK)
                .zip(blocks.iter_mut())
                .zip(out.chunks_mut(BLOCK))
            {
                *mass = weigh_block::<true>(block, max, inv_t, out);
            }
        }
        None => {
            for (block, mass) in logits.chunks(BLOCK).zip(blocks.iter_mut()) {
                *mass = weigh_block::<false>(block, max, inv_t, &mut []);
            }
        }
    }
}

/// One block's [`BlockMass`]; with `STORE`, each weight as `f32` into `out` (same length).
/// Weights of exactly 1 are split from the others by bit masks, not selects: a select on an
/// accumulator makes LLVM emit masked stores or branches instead of vector adds.
#[inline(always)]
fn weigh_block<const STORE: bool>(
    block: &[f32],
    max: f64,
    inv_t: f64,
    out: &mut [f32],
) -> BlockMass {
    let mut ones = [0.0f64; LANES];
    let mut small = [0.0f64; LANES];
    let one_bits = 1.0f64.to_bits();
    let (chunks, rest) = block.as_chunks::<LANES>();
    let (outs, out_rest) = out.as_chunks_mut::<LANES>();
    for (c, chunk) in chunks.iter().enumerate() {
        let mut w = [0.0f64; LANES];
        for j in 0..LANES {
            w[j] = weight(chunk[j], max, inv_t);
            // All bits set when w < 1, none when w == 1 (weights never exceed 1).
            let below = 0u64.wrapping_sub(u64::from(w[j] != 1.0));
            ones[j] += f64::from_bits(one_bits & !below);
            small[j] += f64::from_bits(w[j].to_bits() & below);
        }
        if STORE {
            if let Some(o) = outs.get_mut(c) {
                for j in 0..LANES {
                    o[j] = w[j] as f32;
                }
            }
        }
    }
    for (j, &l) in rest.iter().enumerate() {
        let w = weight(l, max, inv_t);
        let below = 0u64.wrapping_sub(u64::from(w != 1.0));
        ones[j] += f64::from_bits(one_bits & !below);
        small[j] += f64::from_bits(w.to_bits() & below);
        if STORE {
            if let Some(o) = out_rest.get_mut(j) {
                *o = w as f32;
            }
        }
    }
    BlockMass {
        ones: lane_sum(ones),
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
    fn weight_is_exp_within_1e8() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -(i as f64) * 0.0035;
            let got = weight(x as f32, 0.0, 1.0);
            let want = f64::from(x as f32).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-8, "worst relative error {worst}");
        assert_eq!(weight(3.0, 3.0, 1.0), 1.0);
        assert_eq!(weight(f32::NEG_INFINITY, 3.0, 1.0), 0.0);
        assert_eq!(weight(-1e30, 0.0, 1.0), 0.0);
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
            weigh_portable(&logits, f64::from(a.max), inv_t, &mut ba, Some(&mut sa));
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
