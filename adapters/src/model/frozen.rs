//! A matmul against a frozen weight whose backward pass computes only the activation gradient.
//!
//! With candle's plain `x.matmul(&w.t())`, backpropagation computes `x^T @ grad` for the weight
//! as well, even when the weight is not a variable: one extra matmul as large as the forward one
//! per linear layer, and a weight-sized gradient buffer kept until the [`GradStore`] is dropped.
//! For LoRA training every base weight is frozen, so that work is pure waste.
//! [`frozen_linear`] registers a [`CustomOp2`] whose backward returns `grad @ w` for the
//! activation and nothing for the weight.
//!
//! [`GradStore`]: candle_core::backprop::GradStore

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

/// `y = x @ w^T` for `x: [.., in]` and a frozen `w: [out, in]`; gradients flow to `x` only.
///
/// `w` must not be a variable (it would receive no gradient). The forward result is the same
/// matmul candle runs for `x.matmul(&w.t())` (same kernel, same layouts), so the values are
/// identical.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = w.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("frozen_linear: input must have at least one dimension");
    };
    if last != in_features {
        candle_core::bail!(
            "frozen_linear: input {:?} does not match weight [{out_features}, {in_features}]",
            x.shape()
        );
    }
    let rows: usize = lead.iter().product();
    let x2 = x.contiguous()?.reshape((rows, in_features))?;
    let y = x2.apply_op2(&w.contiguous()?, FrozenMatmul)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    y.reshape(out_dims)
}

/// The custom op behind [`frozen_linear`]: `arg1 = x [m, k]`, `arg2 = w [n, k]` (frozen),
/// result `[m, n]`.
#[derive(Debug, Clone, Copy)]
pub struct FrozenMatmul;

fn forward<S: BackendStorage>(
    x: &S,
    x_layout: &Layout,
    w: &S,
    w_layout: &Layout,
) -> Result<(S, Shape)> {
    let (m, k) = x_layout.shape().dims2()?;
    let (n, k2) = w_layout.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: x [{m}, {k}] vs w [{n}, {k2}]");
    }
    let wt = w_layout.transpose(0, 1)?;
    let out = x.matmul(w, (1, m, n, k), x_layout, &wt)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d(x w^T)/dx = grad @ w; the weight's gradient is deliberately not computed.
        Ok((Some(grad_res.contiguous()?.matmul(w)?), None))
    }
}
