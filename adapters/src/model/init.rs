//! Deterministic random numbers for weight initialisation and dropout masks.
//!
//! Every random tensor is derived from a user seed and a stable *stream* id (a hash of the
//! tensor's name, or of layer and module), so the same seed gives the same values on every
//! platform and whatever the order in which tensors are created.

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64: a fast, well-mixed 64-bit hash step.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over a name: a platform-independent stream id.
pub(crate) fn name_stream(name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// A seed for one stream of one run.
pub(crate) fn stream_seed(seed: u64, stream: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ stream)
}

/// `N(0, std^2)` samples (Box-Muller over ChaCha8), as a tensor of `dtype`.
pub(crate) fn normal(
    shape: &[usize],
    std: f64,
    seed: u64,
    stream: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, stream));
    let mut data = Vec::with_capacity(n + 1);
    while data.len() < n {
        // u1 in (0, 1] so the log is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        data.push(std * r * theta.cos());
        data.push(std * r * theta.sin());
    }
    data.truncate(n);
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// `U(-bound, bound)` samples over ChaCha8, as a tensor of `dtype`.
pub(crate) fn uniform(
    shape: &[usize],
    bound: f64,
    seed: u64,
    stream: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, stream));
    let data: Vec<f64> = (0..n)
        .map(|_| (2.0 * rng.random::<f64>() - 1.0) * bound)
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// An inverted-dropout mask: each entry is `0` with probability `p`, else `1 / (1 - p)`.
/// Entry `i` depends only on `(seed, stream, i)` (counter-based, [`dropped`]), so masks are
/// reproducible and the fused kernel can recompute them instead of storing them.
pub(crate) fn dropout_mask(
    shape: &[usize],
    p: f64,
    seed: u64,
    stream: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let key = stream_seed(seed, stream);
    let keep = (1.0 / (1.0 - p)) as f32;
    let threshold = dropout_threshold(p);
    let data: Vec<f32> = (0..n as u64)
        .map(|i| {
            let keys = dropout_keys(key, i >> 32);
            if dropped(keys, i as u32, threshold) {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// The hash threshold of drop rate `p` in `[0, 1)`: an entry is dropped when its 32-bit hash
/// falls below it (`p` rounded down to a multiple of `2^-32`).
pub(crate) fn dropout_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(u32::MAX as f64) as u32
}

/// The two 32-bit keys of a dropout stream's `key` for entries `block * 2^32 ..
/// (block + 1) * 2^32` (block 0 uses the key's own halves).
pub(crate) fn dropout_keys(key: u64, block: u64) -> (u32, u32) {
    let k = if block == 0 {
        key
    } else {
        splitmix64(key ^ splitmix64(block))
    };
    (k as u32, (k >> 32) as u32)
}

/// Whether entry `i` of a block with `keys` is dropped.
///
/// Two rounds of a 32-bit integer hash (Wellons' `lowbias32` constants), each after mixing in
/// one key: only 32-bit shifts, xors and multiplies, so a loop over consecutive `i`
/// vectorises (the 64-bit SplitMix chain it replaces did not, and took an eighth of a
/// training step).
#[inline(always)]
pub(crate) fn dropped(keys: (u32, u32), i: u32, threshold: u32) -> bool {
    fn round(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x21F0_AAAD);
        x ^= x >> 15;
        x = x.wrapping_mul(0x735A_2D97);
        x ^ (x >> 15)
    }
    round(round(i ^ keys.0) ^ keys.1) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let dev = Device::Cpu;
        let a = normal(&[64], 1.0, 7, 1, DType::F64, &dev).unwrap();
        let b = normal(&[64], 1.0, 7, 1, DType::F64, &dev).unwrap();
        let c = normal(&[64], 1.0, 7, 2, DType::F64, &dev).unwrap();
        let (a, b, c): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            a.to_vec1().unwrap(),
            b.to_vec1().unwrap(),
            c.to_vec1().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_has_requested_moments() {
        let t = normal(&[20_000], 0.5, 3, 9, DType::F64, &Device::Cpu).unwrap();
        let v: Vec<f64> = t.to_vec1().unwrap();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());
    }

    #[test]
    fn uniform_stays_in_bounds() {
        let t = uniform(&[5_000], 0.25, 1, 1, DType::F64, &Device::Cpu).unwrap();
        let v: Vec<f64> = t.to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() <= 0.25));
        assert!(v.iter().any(|x| *x > 0.2) && v.iter().any(|x| *x < -0.2));
    }

    #[test]
    fn dropout_mask_rate_and_scale() {
        let t = dropout_mask(&[100, 100], 0.2, 5, 11, DType::F64, &Device::Cpu).unwrap();
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = v.iter().filter(|x| **x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.2).abs() < 0.02, "drop rate {zeros}");
        assert!(v.iter().all(|x| *x == 0.0 || (*x - 1.25).abs() < 1e-6));
        let none = dropout_mask(&[10], 0.0, 5, 11, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(none.to_vec1::<f64>().unwrap(), vec![1.0; 10]);
    }

    #[test]
    fn dropout_masks_look_independent_across_entries_and_streams() {
        let n = 200_000;
        let mask = |stream| -> Vec<bool> {
            let t = dropout_mask(&[n], 0.5, 5, stream, DType::F32, &Device::Cpu).unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| *v == 0.0)
                .collect()
        };
        let (a, b) = (mask(1), mask(2));
        let rate = |hits: usize, of: usize| hits as f64 / of as f64;
        // Drop rate p, neighbours dropped together p^2, two streams agreeing half the time:
        // each within about five standard deviations of n = 200,000 draws.
        assert!((rate(a.iter().filter(|d| **d).count(), n) - 0.5).abs() < 0.006);
        let pairs = a.windows(2).filter(|w| w[0] && w[1]).count();
        assert!((rate(pairs, n - 1) - 0.25).abs() < 0.005, "pairs {pairs}");
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!((rate(agree, n) - 0.5).abs() < 0.006, "agree {agree}");
    }
}
