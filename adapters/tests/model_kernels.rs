//! The fused CPU kernels behind `ops` (RMSNorm, masked softmax, head split/merge with RoPE,
//! SwiGLU, target log-probs, LoRA dropout, the LoRA sum, attention's batched matmul) agree with the composite ops they
//! replace, in values (f32 and f64) and gradients, and their gradients match finite
//! differences.

use candle_core::{DType, Device, Tensor, Var, D};
use leaf_adapters::model::ops;

fn rand_t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
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

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Values of `fused` and `composite` on `inputs`, and the gradients of `sum(out * probe)` with
/// respect to every input, agree within `tol`.
fn agree(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    composite: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused(&ts);
    let b = composite(&ts);
    let d = max_abs_diff(&a, &b);
    assert!(d <= tol, "values differ by {d}");
    let probe = rand_t(a.dims(), 77, a.dtype());
    let ga = a
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = b
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let x = ga
            .get(v.as_tensor())
            .expect("fused gradient reaches the input");
        let y = gb
            .get(v.as_tensor())
            .expect("composite gradient reaches the input");
        let d = max_abs_diff(x, y);
        let scale = flat(y).iter().fold(1.0f64, |m, v| m.max(v.abs()));
        assert!(d <= tol * scale, "gradient of input {i} differs by {d}");
    }
}

/// Central finite differences of `f` (a scalar) at every entry of `x`, against autograd.
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
        let at = |v: Vec<f64>| {
            f(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (at(plus) - at(minus)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "entry {i}: finite difference {fd}, autograd {}",
            g[i]
        );
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        _ => 1e-5,
    }
}

#[test]
fn rms_norm_kernel_matches_composite() {
    for dtype in [DType::F32, DType::F64] {
        let x = rand_t(&[3, 5, 64], 1, dtype);
        let w = rand_t(&[64], 2, dtype);
        agree(
            &[x, w],
            |t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| ops::composite::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            tolerance(dtype),
        );
    }
}

#[test]
fn masked_softmax_kernel_matches_composite() {
    for dtype in [DType::F32, DType::F64] {
        let (b, h, t) = (2, 3, 7);
        let scores = rand_t(&[b, h, t, t], 3, dtype);
        let mask = ops::attention_mask(&[7, 4], t, dtype, &Device::Cpu).unwrap();
        agree(
            &[scores],
            |s| ops::masked_softmax(&s[0], &mask, 0.125).unwrap(),
            |s| {
                ops::softmax_last_dim(
                    &s[0]
                        .affine(0.125, 0.0)
                        .unwrap()
                        .broadcast_add(&mask)
                        .unwrap(),
                )
                .unwrap()
            },
            tolerance(dtype),
        );
    }
}

#[test]
fn split_and_merge_heads_match_transposes_and_rope() {
    for dtype in [DType::F32, DType::F64] {
        let (b, t, heads, hd) = (2, 5, 3, 8);
        let x = rand_t(&[b, t, heads * hd], 4, dtype);
        let (cos, sin) = ops::rope_tables(10_000.0, hd, t + 2, dtype, &Device::Cpu).unwrap();
        let composite_split = |x: &Tensor| {
            x.reshape((b, t, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        agree(
            std::slice::from_ref(&x),
            |x| ops::split_heads(&x[0], heads, Some((&cos, &sin))).unwrap(),
            |x| ops::rope(&composite_split(&x[0]), &cos, &sin).unwrap(),
            tolerance(dtype),
        );
        agree(
            std::slice::from_ref(&x),
            |x| ops::split_heads(&x[0], heads, None).unwrap(),
            |x| composite_split(&x[0]),
            0.0,
        );
        let y = rand_t(&[b, heads, t, hd], 5, dtype);
        agree(
            &[y],
            |y| ops::merge_heads(&y[0]).unwrap(),
            |y| {
                y[0].transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, heads * hd))
                    .unwrap()
            },
            0.0,
        );
    }
}

#[test]
fn target_logprobs_kernel_matches_log_softmax_and_gather() {
    for dtype in [DType::F32, DType::F64] {
        let logits = rand_t(&[6, 11], 6, dtype);
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu).unwrap();
        agree(
            &[logits],
            |l| ops::target_logprobs(&l[0], &targets).unwrap(),
            |l| {
                ops::log_softmax_last_dim(&l[0])
                    .unwrap()
                    .gather(&targets.reshape((6, 1)).unwrap(), 1)
                    .unwrap()
                    .reshape(6)
                    .unwrap()
            },
            tolerance(dtype),
        );
    }
}

#[test]
fn target_logprobs_rejects_targets_outside_the_vocabulary() {
    let logits = rand_t(&[2, 4], 1, DType::F32);
    let targets = Tensor::new(&[0u32, 4], &Device::Cpu).unwrap();
    let err = ops::target_logprobs(&logits, &targets).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let short = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    assert!(ops::target_logprobs(&logits, &short).is_err());
}

#[test]
fn swiglu_and_add_scaled_kernels_match_composites() {
    for dtype in [DType::F32, DType::F64] {
        let a = rand_t(&[4, 9, 33], 7, dtype);
        let b = rand_t(&[4, 9, 33], 8, dtype);
        agree(
            &[a.clone(), b.clone()],
            |t| ops::swiglu(&t[0], &t[1]).unwrap(),
            |t| ops::silu(&t[0]).unwrap().mul(&t[1]).unwrap(),
            tolerance(dtype),
        );
        for scale in [2.5, 1.0] {
            agree(
                &[a.clone(), b.clone()],
                |t| ops::add_scaled(&t[0], &t[1], scale).unwrap(),
                |t| t[0].add(&t[1].affine(scale, 0.0).unwrap()).unwrap(),
                0.0,
            );
        }
    }
}

#[test]
fn attention_matmul_matches_candle_matmul() {
    // 32 batch entries: enough for the parallel kernel on up to 16 threads; the right operand
    // a transposed view (as `k.t()`), and the batch dimensions split three ways.
    for dtype in [DType::F32, DType::F64] {
        for (batch, heads) in [(4, 8), (1, 32), (32, 1)] {
            let a = rand_t(&[batch, heads, 5, 3], 11, dtype);
            let b = rand_t(&[batch, heads, 6, 3], 12, dtype);
            agree(
                &[a, b],
                |t| ops::attention_matmul(&t[0], &t[1].t().unwrap()).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
                tolerance(dtype),
            );
        }
        // Sums over nothing give zeros, as candle's matmul does.
        let empty = ops::attention_matmul(
            &rand_t(&[4, 8, 5, 0], 15, dtype),
            &rand_t(&[4, 8, 0, 3], 16, dtype),
        )
        .unwrap();
        assert_eq!(empty.dims(), &[4, 8, 5, 3]);
        assert!(flat(&empty).iter().all(|v| *v == 0.0));
        let p = rand_t(&[4, 8, 5, 5], 13, dtype);
        let v = rand_t(&[4, 8, 5, 3], 14, dtype);
        agree(
            &[p, v],
            |t| ops::attention_matmul(&t[0], &t[1]).unwrap(),
            |t| t[0].matmul(&t[1]).unwrap(),
            tolerance(dtype),
        );
    }
}

#[test]
fn lora_dropout_kernel_drops_the_same_entries_as_the_stored_mask() {
    // f16 goes through the composite path (a stored mask from the same counter-based hash);
    // f32 and f64 through the kernel. They must drop exactly the same entries, also across the
    // kernel's parallel chunks (60,000 entries: four chunks, the last one partial).
    let x = Tensor::ones((300, 200), DType::F32, &Device::Cpu).unwrap();
    let p = 0.25;
    let stored = flat(&ops::lora_dropout(&x.to_dtype(DType::F16).unwrap(), p, 3, 9).unwrap());
    for dtype in [DType::F32, DType::F64] {
        let fused = flat(&ops::lora_dropout(&x.to_dtype(dtype).unwrap(), p, 3, 9).unwrap());
        for (i, (a, b)) in fused.iter().zip(&stored).enumerate() {
            assert_eq!(*a == 0.0, *b == 0.0, "entry {i}");
            if *a != 0.0 {
                assert!((a - 1.0 / (1.0 - p)).abs() < 1e-6, "entry {i}: {a}");
            }
        }
    }
    let zeros = stored.iter().filter(|v| **v == 0.0).count() as f64 / stored.len() as f64;
    assert!((zeros - p).abs() < 0.05, "drop rate {zeros}");
    let other = flat(&ops::lora_dropout(&x, p, 4, 9).unwrap());
    assert_ne!(other, stored, "another seed draws another mask");
}

#[test]
fn kernel_gradients_match_finite_differences() {
    let x = rand_t(&[2, 3, 6], 1, DType::F64);
    let w = rand_t(&[6], 2, DType::F64);
    let probe = rand_t(&[2, 3, 6], 3, DType::F64);
    let weigh = |y: Tensor, p: &Tensor| y.mul(p).unwrap().sum_all().unwrap();
    check_grad(&x, |x| weigh(ops::rms_norm(x, &w, 1e-5).unwrap(), &probe));
    check_grad(&w, |w| weigh(ops::rms_norm(&x, w, 1e-5).unwrap(), &probe));
    check_grad(&x, |x| {
        weigh(
            ops::swiglu(x, &w.broadcast_as(x.shape()).unwrap()).unwrap(),
            &probe,
        )
    });
    check_grad(&x, |x| {
        weigh(ops::lora_dropout(x, 0.3, 1, 2).unwrap(), &probe)
    });
    let scores = rand_t(&[1, 2, 4, 4], 4, DType::F64);
    let mask = ops::attention_mask(&[3], 4, DType::F64, &Device::Cpu).unwrap();
    let probe4 = rand_t(&[1, 2, 4, 4], 5, DType::F64);
    check_grad(&scores, |s| {
        weigh(ops::masked_softmax(s, &mask, 0.5).unwrap(), &probe4)
    });
    let (cos, sin) = ops::rope_tables(10_000.0, 4, 3, DType::F64, &Device::Cpu).unwrap();
    let xh = rand_t(&[2, 3, 8], 6, DType::F64);
    let probe_h = rand_t(&[2, 2, 3, 4], 7, DType::F64);
    check_grad(&xh, |x| {
        weigh(
            ops::split_heads(x, 2, Some((&cos, &sin))).unwrap(),
            &probe_h,
        )
    });
    let logits = rand_t(&[3, 5], 8, DType::F64);
    let targets = Tensor::new(&[4u32, 0, 2], &Device::Cpu).unwrap();
    let probe_t = rand_t(&[3], 9, DType::F64);
    check_grad(&logits, |l| {
        weigh(ops::target_logprobs(l, &targets).unwrap(), &probe_t)
    });
    // The softmax rows still sum to one under the mask.
    let probs = ops::masked_softmax(&scores, &mask, 0.5).unwrap();
    let sums = flat(&probs.sum(D::Minus1).unwrap());
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12));
}
