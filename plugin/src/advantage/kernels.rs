//! The inner loops of boundary selection, per instruction set.
//!
//! [`Portable`] is plain Rust that the compiler vectorises for the baseline target (SSE2 on
//! x86-64). On x86-64 CPUs with AVX2, [`Avx2`] does the same work four values per
//! instruction; it can only be constructed after the CPU was checked, so the selection that
//! runs on it is compiled for AVX2 and dispatched once per group. Both give equal results
//! (surprisals are never NaN: groups are validated), which a test checks.

use std::ops::Range;

/// Column maxima, range maxima and equality scans over `f64` surprisal arrays.
pub(super) trait Kernels: Copy {
    /// `best[k] = max(-a[k], -b[k], -c[k], -d[k])` for `k` in `range` when `first`, else the
    /// maximum of that and `best[k]`; every response covers the range. May also write up to
    /// three positions just below `range.start` (with the maximum over these responses), so
    /// that a range whose length is not a multiple of the vector width needs no scalar tail.
    fn fold4(self, best: &mut [f64], rs: [&[f64]; 4], range: Range<usize>, first: bool);
    /// The same for eight responses.
    fn fold8(self, best: &mut [f64], rs: [&[f64]; 8], range: Range<usize>, first: bool);
    /// The largest value of `xs`; `-inf` when empty.
    fn range_max(self, xs: &[f64]) -> f64;
    /// The first index of `xs` holding a value equal to `v`.
    fn position_of(self, xs: &[f64], v: f64) -> Option<usize>;
}

/// The kernels in portable Rust.
#[derive(Debug, Clone, Copy)]
pub(super) struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    fn fold4(self, best: &mut [f64], rs: [&[f64]; 4], range: Range<usize>, first: bool) {
        let [a, b, c, d] = rs.map(|r| &r[range.clone()]);
        for (k, out) in best[range].iter_mut().enumerate() {
            let (sa, sb, sc, sd) = (-a[k], -b[k], -c[k], -d[k]);
            let ab = if sb > sa { sb } else { sa };
            let cd = if sd > sc { sd } else { sc };
            let s = if cd > ab { cd } else { ab };
            *out = if first || s > *out { s } else { *out };
        }
    }

    #[inline(always)]
    fn fold8(self, best: &mut [f64], rs: [&[f64]; 8], range: Range<usize>, first: bool) {
        let [a, b, c, d, e, f, g, h] = rs;
        self.fold4(best, [a, b, c, d], range.clone(), first);
        self.fold4(best, [e, f, g, h], range, false);
    }

    /// Four independent accumulators, so the loop has no branch and no loop-carried
    /// compare chain.
    #[inline(always)]
    fn range_max(self, xs: &[f64]) -> f64 {
        let mut acc = [f64::NEG_INFINITY; 4];
        let chunks = xs.chunks_exact(4);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = if x > *a { x } else { *a };
            }
        }
        let mut m = acc
            .into_iter()
            .fold(f64::NEG_INFINITY, |m, a| if a > m { a } else { m });
        for &x in rest {
            m = if x > m { x } else { m };
        }
        m
    }

    /// Four compares per step, one branch.
    #[inline(always)]
    fn position_of(self, xs: &[f64], v: f64) -> Option<usize> {
        let mut chunks = xs.chunks_exact(4);
        let mut base = 0;
        for c in chunks.by_ref() {
            if (c[0] == v) | (c[1] == v) | (c[2] == v) | (c[3] == v) {
                return c.iter().position(|&x| x == v).map(|i| base + i);
            }
            base += 4;
        }
        chunks
            .remainder()
            .iter()
            .position(|&x| x == v)
            .map(|i| base + i)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256d, _mm256_castpd256_pd128, _mm256_cmp_pd, _mm256_extractf128_pd, _mm256_loadu_pd,
        _mm256_max_pd, _mm256_min_pd, _mm256_movemask_pd, _mm256_set1_pd, _mm256_storeu_pd,
        _mm256_xor_pd, _mm_cvtsd_f64, _mm_max_pd, _mm_unpackhi_pd, _CMP_EQ_OQ,
    };

    use std::ops::Range;

    use super::{Kernels, Portable};

    /// The kernels in AVX2; a value of this type proves the CPU has AVX2.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::advantage) struct Avx2(());

    impl Avx2 {
        /// `Some` when this CPU supports AVX2.
        pub(in crate::advantage) fn detect() -> Option<Avx2> {
            std::arch::is_x86_feature_detected!("avx2").then_some(Avx2(()))
        }
    }

    /// Four lanes of `xs` from `k` (`k + 4 <= xs.len()`, kept by the callers' loops).
    #[inline(always)]
    fn load(xs: &[f64], k: usize) -> __m256d {
        debug_assert!(k + 4 <= xs.len());
        // SAFETY: lanes k..k + 4 are in bounds (the callers' loops keep k + 4 <= len); AVX2
        // is present (every caller is compiled
        // for it and only reachable through an `Avx2` token).
        unsafe { _mm256_loadu_pd(xs.as_ptr().add(k)) }
    }

    #[inline(always)]
    fn store(xs: &mut [f64], k: usize, v: __m256d) {
        debug_assert!(k + 4 <= xs.len());
        // SAFETY: as in `load`.
        unsafe { _mm256_storeu_pd(xs.as_mut_ptr().add(k), v) }
    }

    /// `best[k] = -min(rs[..][k])` (first) or `max(best[k], -min(rs[..][k]))` over `range`,
    /// four positions at a time, the last four ending at `range.end` (overlapping the
    /// previous ones or reaching below the range: recomputing a position gives the same
    /// value). `max(-x) = -min(x)` exactly, so this equals the portable fold.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold<const N: usize>(best: &mut [f64], rs: [&[f64]; N], range: Range<usize>, first: bool) {
        let Range { start, end } = range;
        if end < 4 {
            // Too short for one vector.
            let mut s = [f64::NEG_INFINITY; 4];
            for (k, s) in (start..end).zip(&mut s) {
                *s = -rs
                    .iter()
                    .fold(f64::INFINITY, |m, x| if x[k] < m { x[k] } else { m });
            }
            for (k, s) in (start..end).zip(s) {
                best[k] = if first || s > best[k] { s } else { best[k] };
            }
            return;
        }
        // Every response covers `..end` and so does `best`: checked once here, so the loop
        // loads unchecked.
        let mut ptrs = [std::ptr::null::<f64>(); N];
        for (p, r) in ptrs.iter_mut().zip(rs) {
            *p = r[..end].as_ptr();
        }
        let out = &mut best[..end];
        let sign = _mm256_set1_pd(-0.0);
        #[inline]
        #[target_feature(enable = "avx2")]
        fn column<const N: usize>(ptrs: &[*const f64; N], k: usize, sign: __m256d) -> __m256d {
            let mut lanes = [sign; N];
            for (lane, p) in lanes.iter_mut().zip(ptrs) {
                // SAFETY: k + 4 <= end and every response holds `end` values (sliced above).
                *lane = unsafe { _mm256_loadu_pd(p.add(k)) };
            }
            // A pairwise tree of minima.
            let mut width = N;
            while width > 1 {
                let half = width / 2;
                for i in 0..half {
                    lanes[i] = _mm256_min_pd(lanes[i], lanes[i + half]);
                }
                width = half;
            }
            _mm256_xor_pd(lanes[0], sign)
        }
        let last = end - 4;
        let mut k = start;
        if first {
            loop {
                let at = k.min(last);
                store(out, at, column(&ptrs, at, sign));
                if at == last {
                    break;
                }
                k += 4;
            }
        } else {
            loop {
                let at = k.min(last);
                store(
                    out,
                    at,
                    _mm256_max_pd(load(out, at), column(&ptrs, at, sign)),
                );
                if at == last {
                    break;
                }
                k += 4;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn range_max(xs: &[f64]) -> f64 {
        let n = xs.len();
        let mut acc = [_mm256_set1_pd(f64::NEG_INFINITY); 2];
        let mut k = 0;
        while k + 8 <= n {
            acc[0] = _mm256_max_pd(acc[0], load(xs, k));
            acc[1] = _mm256_max_pd(acc[1], load(xs, k + 4));
            k += 8;
        }
        let v = _mm256_max_pd(acc[0], acc[1]);
        let h = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        let m = _mm_cvtsd_f64(_mm_max_pd(h, _mm_unpackhi_pd(h, h)));
        let rest = Portable.range_max(&xs[k..]);
        if rest > m {
            rest
        } else {
            m
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn position_of(xs: &[f64], v: f64) -> Option<usize> {
        let n = xs.len();
        let vv = _mm256_set1_pd(v);
        let mut k = 0;
        while k + 4 <= n {
            let mask = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(load(xs, k), vv));
            if mask != 0 {
                return Some(k + mask.trailing_zeros() as usize);
            }
            k += 4;
        }
        Portable.position_of(&xs[k..], v).map(|i| k + i)
    }

    // SAFETY (every method): an `Avx2` value exists only when `detect` found AVX2.
    impl Kernels for Avx2 {
        #[inline(always)]
        fn fold4(self, best: &mut [f64], rs: [&[f64]; 4], range: Range<usize>, first: bool) {
            unsafe { fold(best, rs, range, first) }
        }
        #[inline(always)]
        fn fold8(self, best: &mut [f64], rs: [&[f64]; 8], range: Range<usize>, first: bool) {
            unsafe { fold(best, rs, range, first) }
        }
        #[inline(always)]
        fn range_max(self, xs: &[f64]) -> f64 {
            unsafe { range_max(xs) }
        }
        #[inline(always)]
        fn position_of(self, xs: &[f64], v: f64) -> Option<usize> {
            unsafe { position_of(xs, v) }
        }
    }
}
