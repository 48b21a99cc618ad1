//! The differentiable ops agree with candle's fused kernels, their gradients agree with finite
//! differences, and the frozen-weight matmul equals the plain one.

use candle_core::{DType, Device, Tensor, Var, D};
use leaf_adapters::model::{frozen_linear, ops};

fn rand_t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    // A small deterministic LCG keeps the tests independent of candle's RNG.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .sub(&b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn rms_norm_matches_fused() {
    for seed in 0..4 {
        let x = rand_t(&[3, 5, 64], seed, DType::F32);
        let w = rand_t(&[64], seed + 100, DType::F32);
        let ours = ops::rms_norm(&x, &w, 1e-5).unwrap();
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(
            max_abs_diff(&ours, &fused) < 1e-5,
            "{}",
            max_abs_diff(&ours, &fused)
        );
    }
}

#[test]
fn half_precision_rms_norm_matches_fused() {
    for dtype in [DType::BF16, DType::F16] {
        let x = rand_t(&[4, 64], 21, dtype);
        let w = rand_t(&[64], 22, dtype);
        let ours = ops::rms_norm(&x, &w, 1e-5).unwrap();
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert_eq!(ours.dtype(), dtype);
        // Both round the f32 denominator to the half type, then divide and scale in it.
        assert!(
            max_abs_diff(&ours, &fused) < 2e-2,
            "{dtype:?}: {}",
            max_abs_diff(&ours, &fused)
        );
    }
}

#[test]
fn softmax_and_log_softmax_match_fused() {
    for seed in 0..4 {
        let x = (rand_t(&[4, 7, 33], seed, DType::F32) * 5.0).unwrap();
        let ours = ops::softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_abs_diff(&ours, &fused) < 1e-6);
        let ours = ops::log_softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        assert!(max_abs_diff(&ours, &fused) < 1e-5);
    }
}

#[test]
fn rope_matches_fused_kernel_exactly() {
    for (seed, (b, h, t, d)) in [(0, (2, 3, 7, 8)), (1, (1, 4, 16, 64)), (2, (3, 1, 1, 2))] {
        let x = rand_t(&[b, h, t, d], seed, DType::F32);
        let (cos, sin) = ops::rope_tables(10_000.0, d, t, DType::F32, &Device::Cpu).unwrap();
        let ours = ops::rope(&x, &cos, &sin).unwrap();
        let fused = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        let slow = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        assert_eq!(
            flat(&ours),
            flat(&fused),
            "rope differs from the fused kernel"
        );
        assert!(max_abs_diff(&ours, &slow) < 1e-6);
    }
}

#[test]
fn rope_tables_hand_computed() {
    // head_dim 4, theta 100: inverse frequencies 1 and 100^(-1/2) = 0.1.
    let (cos, sin) = ops::rope_tables(100.0, 4, 3, DType::F64, &Device::Cpu).unwrap();
    let cos: Vec<Vec<f64>> = cos.to_vec2().unwrap();
    let sin: Vec<Vec<f64>> = sin.to_vec2().unwrap();
    assert_eq!(cos[0], vec![1.0, 1.0]);
    assert_eq!(sin[0], vec![0.0, 0.0]);
    assert!((cos[2][0] - 2f64.cos()).abs() < 1e-6);
    assert!((sin[2][1] - 0.2f64.sin()).abs() < 1e-6);
    // Position 1, x = [1, 0, 0, 0]: first pair rotates by angle 1.
    let x = Tensor::from_vec(
        vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        (1, 1, 2, 4),
        &Device::Cpu,
    )
    .unwrap();
    let (cos, sin) = ops::rope_tables(100.0, 4, 2, DType::F64, &Device::Cpu).unwrap();
    let y = flat(&ops::rope(&x, &cos, &sin).unwrap());
    assert!((y[4] - 1f64.cos()).abs() < 1e-6);
    assert!((y[6] - 1f64.sin()).abs() < 1e-6);
    assert_eq!((y[5], y[7]), (0.0, 0.0));
}

#[test]
fn attention_mask_is_causal_and_hides_padding() {
    let m = ops::attention_mask(&[3, 1], 3, DType::F32, &Device::Cpu).unwrap();
    let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
    let ni = f32::NEG_INFINITY;
    // Row 0 (3 real tokens): lower-triangular.
    assert_eq!(&v[..9], &[0.0, ni, ni, 0.0, 0.0, ni, 0.0, 0.0, 0.0]);
    // Row 1 (1 real token): only key 0 is visible.
    assert_eq!(&v[9..], &[0.0, ni, ni, 0.0, ni, ni, 0.0, ni, ni]);
}

/// Central finite differences of `f` at every entry of `x`, compared with candle's gradient.
fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let g = flat(
        grads
            .get(var.as_tensor())
            .expect("gradient reaches the input"),
    );
    let base = flat(x);
    let h = 1e-6;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let fp = f(&Tensor::from_vec(plus, x.shape(), &Device::Cpu).unwrap())
            .to_scalar::<f64>()
            .unwrap();
        let fm = f(&Tensor::from_vec(minus, x.shape(), &Device::Cpu).unwrap())
            .to_scalar::<f64>()
            .unwrap();
        let fd = (fp - fm) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "entry {i}: finite difference {fd}, autograd {}",
            g[i]
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let x = rand_t(&[2, 3, 6], 1, DType::F64);
    let w = rand_t(&[6], 2, DType::F64);
    let probe = rand_t(&[2, 3, 6], 3, DType::F64);
    let weigh = |y: Tensor| y.mul(&probe).unwrap().sum_all().unwrap();
    check_grad(&x, |x| weigh(ops::rms_norm(x, &w, 1e-5).unwrap()));
    check_grad(&w, |w| weigh(ops::rms_norm(&x, w, 1e-5).unwrap()));
    check_grad(&x, |x| weigh(ops::softmax_last_dim(x).unwrap()));
    check_grad(&x, |x| weigh(ops::log_softmax_last_dim(x).unwrap()));
    check_grad(&x, |x| weigh(ops::silu(x).unwrap()));
    let x4 = rand_t(&[1, 2, 3, 4], 4, DType::F64);
    let probe4 = rand_t(&[1, 2, 3, 4], 5, DType::F64);
    let (cos, sin) = ops::rope_tables(10_000.0, 4, 3, DType::F64, &Device::Cpu).unwrap();
    check_grad(&x4, |x| {
        ops::rope(x, &cos, &sin)
            .unwrap()
            .mul(&probe4)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    let kv = rand_t(&[1, 2, 3, 4], 6, DType::F64);
    let probe_kv = rand_t(&[1, 6, 3, 4], 7, DType::F64);
    check_grad(&kv, |x| {
        ops::repeat_kv(x, 3)
            .unwrap()
            .mul(&probe_kv)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}

#[test]
fn repeat_kv_maps_query_head_to_kv_head_div_n_rep() {
    let kv = Tensor::arange(0f64, 2.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 1, 1))
        .unwrap();
    let rep = flat(&ops::repeat_kv(&kv, 3).unwrap());
    assert_eq!(rep, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
}

#[test]
fn fused_kernels_drop_gradients_ours_do_not() {
    // Why ops.rs exists: the fused softmax is registered without a backward pass, so the
    // gradient silently never reaches its input.
    let x = Var::from_tensor(&rand_t(&[2, 5], 9, DType::F32)).unwrap();
    let probe = rand_t(&[2, 5], 10, DType::F32);
    let fused = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    let grads = fused
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_none());
    let ours = ops::softmax_last_dim(x.as_tensor()).unwrap();
    let grads = ours
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
}

#[test]
fn frozen_linear_equals_plain_matmul_and_skips_the_weight_gradient() {
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&rand_t(&[3, 4, 16], 11, dtype)).unwrap();
        let w = rand_t(&[24, 16], 12, dtype);
        let probe = rand_t(&[3, 4, 24], 13, dtype);

        let frozen = frozen_linear(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(frozen.dims(), &[3, 4, 24]);
        assert_eq!(
            flat(&frozen),
            flat(&plain),
            "forward values must be identical"
        );

        let g_frozen = frozen
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_plain = plain
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx_f = g_frozen.get(x.as_tensor()).unwrap();
        let gx_p = g_plain.get(x.as_tensor()).unwrap();
        assert!(
            max_abs_diff(gx_f, gx_p) < 1e-5,
            "activation gradients differ"
        );
        assert!(
            g_frozen.get(&w).is_none(),
            "no gradient for the frozen weight"
        );
        // The plain matmul's graph does compute a weight gradient (the work the op saves).
        assert_eq!(g_plain.get_ids().count(), g_frozen.get_ids().count() + 1);
    }
}

#[test]
fn frozen_linear_rejects_mismatched_shapes() {
    let x = rand_t(&[2, 5], 1, DType::F32);
    let w = rand_t(&[3, 4], 2, DType::F32);
    assert!(frozen_linear(&x, &w).is_err());
}
