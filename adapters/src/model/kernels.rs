//! Fused CPU kernels with hand-written backward passes for the decoder's elementwise and
//! row-wise ops.
//!
//! Written with basic candle ops, RMSNorm, the attention softmax, RoPE and the loss head each
//! take five to ten passes over memory, every one single-threaded (candle's CPU back-end runs
//! elementwise and reduction ops on one thread; only matmuls use its thread pool). Each op here
//! is one pass over its rows, spread over rayon's pool (the pool `gemm` also uses), with a
//! backward pass that is one pass too.
//!
//! Every kernel does the arithmetic of the composite op it replaces, in the same order per
//! element, so the values agree to rounding of the row sums (see `ops::composite`). They run for
//! contiguous `f32` and `f64` CPU tensors; [`super::ops`] falls back to the composite ops for
//! other dtypes and devices.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

/// Element types the kernels run on.
pub(crate) trait Real: WithDType + Float + Send + Sync {}
impl Real for f32 {}
impl Real for f64 {}

/// Whether the fused kernels handle `t` (a CPU tensor of `f32` or `f64`).
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Minimum elements per parallel task: below this, rayon's scheduling costs more than it buys.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// Rows per parallel task for rows of `row` elements.
fn rows_per_task(row: usize) -> usize {
    (MIN_TASK_ELEMS / row.max(1)).max(1)
}

/// The contiguous data of a CPU tensor argument.
fn data<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: argument must be contiguous"),
    }
}

/// Runs `f` over matching rows of `src` (width `in_row`) and `dst` (width `out_row`) in
/// parallel.
fn map_rows<T: Real>(
    src: &[T],
    in_row: usize,
    out_row: usize,
    f: impl Fn(usize, &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let rows = src.len() / in_row.max(1);
    let mut dst = vec![T::zero(); rows * out_row];
    let per = rows_per_task(in_row.max(out_row));
    dst.par_chunks_mut(out_row * per)
        .zip(src.par_chunks(in_row * per))
        .enumerate()
        .for_each(|(task, (d, s))| {
            for (i, (dr, sr)) in d.chunks_mut(out_row).zip(s.chunks(in_row)).enumerate() {
                f(task * per + i, sr, dr);
            }
        });
    dst
}

/// A vector of `n` elements computed in parallel chunks of `chunk` elements, without zeroing
/// it first: `values(c, len)` yields the `len` elements of chunk `c`. A chunk that yields fewer
/// panics before the vector is used.
fn filled<T: Real, I: Iterator<Item = T>>(
    n: usize,
    chunk: usize,
    values: impl Fn(usize, usize) -> I + Sync,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(c, o)| {
            let mut written = 0;
            let len = o.len();
            for (slot, v) in o.iter_mut().zip(values(c, len)) {
                slot.write(v);
                written += 1;
            }
            assert_eq!(written, o.len(), "filled: chunk {c} yielded too few values");
        });
    // SAFETY: every chunk wrote all its elements (checked above), and the chunks cover `0..n`.
    unsafe { out.set_len(n) };
    out
}

macro_rules! dispatch {
    ($s:expr, $name:expr, $body:ident, $($arg:expr),*) => {
        match $s {
            CpuStorage::F32(_) => $body::<f32>($($arg),*),
            CpuStorage::F64(_) => $body::<f64>($($arg),*),
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $name),
        }
    };
}

/// The data of a CPU tensor held by an op (a table), as `T`.
fn with_table<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused kernel: table is not on the CPU");
    };
    f(data::<T>(cpu, layout, "table")?)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

fn rms_denom<T: Real>(x: &[T], eps: f64) -> T {
    let sum = x.iter().fold(T::zero(), |a, &v| a + v * v);
    (sum / T::from(x.len()).unwrap_or(T::one()) + T::from(eps).unwrap_or(T::zero())).sqrt()
}

fn rms_norm_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "rms-norm")?;
    let w = data::<T>(s2, l2, "rms-norm")?;
    let d = w.len();
    if l1.dims().last() != Some(&d) {
        candle_core::bail!("rms-norm: x {:?} vs weight [{d}]", l1.dims());
    }
    let out = map_rows(x, d, d, |_, xr, yr| {
        let denom = rms_denom(xr, eps);
        for ((y, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *y = v / denom * wv;
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), rms_norm_fwd, s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormBackward { eps: self.eps })?;
        let dw = if w.track_op() {
            let normed = x.apply_op2_no_bwd(w, &RmsNormScaled { eps: self.eps })?;
            let d = w.dims1()?;
            let rows = x.elem_count() / d;
            Some(
                normed
                    .mul(&grad)?
                    .reshape((rows, d))?
                    .sum(0)?
                    .reshape(w.shape())?,
            )
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// `x / sqrt(mean(x^2) + eps)` (the normalised input, before the weight), for the weight's
/// gradient.
struct RmsNormScaled {
    eps: f64,
}

fn rms_scaled<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "rms-norm")?;
    let d = data::<T>(s2, l2, "rms-norm")?.len();
    let out = map_rows(x, d, d, |_, xr, yr| {
        let denom = rms_denom(xr, eps);
        for (y, &v) in yr.iter_mut().zip(xr) {
            *y = v / denom;
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for RmsNormScaled {
    fn name(&self) -> &'static str {
        "fused-rms-norm-scaled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), rms_scaled, s1, l1, s2, l2, self.eps)
    }
}

/// `dx` of RMSNorm: with `r = 1 / sqrt(mean(x^2) + eps)` and `u = g * w`,
/// `dx = r * u - x * r^3 * sum(u * x) / d`.
struct RmsNormBackward {
    eps: f64,
}

fn rms_norm_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "rms-norm-bwd")?;
    let w = data::<T>(s2, l2, "rms-norm-bwd")?;
    let g = data::<T>(s3, l3, "rms-norm-bwd")?;
    let d = w.len();
    if g.len() != x.len() {
        candle_core::bail!("rms-norm-bwd: gradient and input sizes differ");
    }
    let dn = T::from(d).unwrap_or(T::one());
    let out = map_rows(x, d, d, |row, xr, dxr| {
        let gr = &g[row * d..(row + 1) * d];
        let r = T::one() / rms_denom(xr, eps);
        let dot = xr
            .iter()
            .zip(gr)
            .zip(w)
            .fold(T::zero(), |a, ((&xv, &gv), &wv)| a + gv * wv * xv);
        let c = r * r * r * dot / dn;
        for (((o, &xv), &gv), &wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = r * gv * wv - xv * c;
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            self.name(),
            rms_norm_bwd,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            self.eps
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Attention softmax: softmax(scores * scale + mask) over the last dimension
// ---------------------------------------------------------------------------------------------

/// `softmax(scores * scale + mask)` over the last dimension, for `scores: [b, h, t, s]` and an
/// additive `mask: [b, 1, t, s]` (broadcast over heads). The mask receives no gradient.
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, s) = scores.dims4()?;
    if mask.dims4()? != (b, 1, t, s) {
        candle_core::bail!(
            "masked softmax: mask {:?} does not match scores {:?}",
            mask.shape(),
            scores.shape()
        );
    }
    scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale, heads: h })
}

struct MaskedSoftmax {
    scale: f64,
    heads: usize,
}

fn masked_softmax_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
    heads: usize,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "masked-softmax")?;
    let mask = data::<T>(s2, l2, "masked-softmax")?;
    let (_, _, t, s) = l1.shape().dims4()?;
    let scale = T::from(scale).unwrap_or(T::one());
    let out = map_rows(x, s, s, |row, xr, yr| {
        // row = ((bi * heads + hi) * t + ti); the mask row is (bi * t + ti).
        let (bi, ti) = (row / (heads * t), row % t);
        let mr = &mask[(bi * t + ti) * s..(bi * t + ti + 1) * s];
        let mut max = T::neg_infinity();
        for ((y, &v), &m) in yr.iter_mut().zip(xr).zip(mr) {
            *y = v * scale + T::zero() + m;
            max = Float::max(max, *y);
        }
        let mut sum = T::zero();
        for y in yr.iter_mut() {
            *y = (*y - max).exp();
            sum += *y;
        }
        for y in yr.iter_mut() {
            *y /= sum;
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            self.name(),
            masked_softmax_fwd,
            s1,
            l1,
            s2,
            l2,
            self.scale,
            self.heads
        )
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds =
            probs.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `scale * y * (g - sum(g * y))` row by row: the gradient of a (scaled) softmax.
struct SoftmaxBackward {
    scale: f64,
}

fn softmax_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let y = data::<T>(s1, l1, "softmax-bwd")?;
    let g = data::<T>(s2, l2, "softmax-bwd")?;
    let s = *l1.dims().last().unwrap_or(&1);
    if g.len() != y.len() {
        candle_core::bail!("softmax-bwd: gradient and output sizes differ");
    }
    let scale = T::from(scale).unwrap_or(T::one());
    let out = map_rows(y, s, s, |row, yr, dr| {
        let gr = &g[row * s..(row + 1) * s];
        let dot = yr
            .iter()
            .zip(gr)
            .fold(T::zero(), |a, (&yv, &gv)| a + yv * gv);
        for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
            *o = scale * yv * (gv - dot);
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), softmax_bwd, s1, l1, s2, l2, self.scale)
    }
}

// ---------------------------------------------------------------------------------------------
// Head layout and RoPE: [b, t, heads * hd] <-> [b, heads, t, hd], rotating on the way
// ---------------------------------------------------------------------------------------------

/// The RoPE tables, `[seq, head_dim / 2]` each, in the model's dtype.
#[derive(Clone)]
pub(crate) struct RopeTables {
    /// `cos(pos * inv_freq)`.
    pub cos: Tensor,
    /// `sin(pos * inv_freq)`.
    pub sin: Tensor,
}

/// `[b, t, heads * hd]` to `[b, heads, t, hd]` (`split`), or back (`merge`), optionally
/// applying RoPE (`rotate_half`) on the head side: `split` rotates by `+theta` after the
/// split, `merge` rotates by `-theta` before the merge when `inverse`, so a merge with
/// `inverse` is the exact adjoint of a split with RoPE.
#[derive(Clone)]
struct HeadLayout {
    heads: usize,
    split: bool,
    rope: Option<Arc<RopeTables>>,
    /// Rotate by `-theta` (the adjoint of the rotation).
    inverse: bool,
}

/// Splits `x: [b, t, heads * hd]` into heads `[b, heads, t, hd]` and applies RoPE from
/// `tables` (positions `0..t`) when given. Differentiable.
pub(crate) fn split_heads(
    x: &Tensor,
    heads: usize,
    tables: Option<&Arc<RopeTables>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1(HeadLayout {
        heads,
        split: true,
        rope: tables.cloned(),
        inverse: false,
    })
}

/// Merges heads `[b, heads, t, hd]` into `[b, t, heads * hd]`. Differentiable.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (_, heads, _, _) = x.dims4()?;
    x.contiguous()?.apply_op1(HeadLayout {
        heads,
        split: false,
        rope: None,
        inverse: false,
    })
}

/// `dst = rope(src)` for one head row of `hd` values at position `pos`.
#[inline]
fn rotate<T: Real>(src: &[T], dst: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
    let (x1, x2) = src.split_at(cos.len());
    let (y1, y2) = dst.split_at_mut(cos.len());
    let outs = y1.iter_mut().zip(y2.iter_mut());
    let ins = x1.iter().zip(x2).zip(cos.iter().zip(sin));
    for ((o1, o2), ((&a, &b), (&c, &s))) in outs.zip(ins) {
        if inverse {
            *o1 = a * c + b * s;
            *o2 = b * c - a * s;
        } else {
            // Same rounding as the composite `x * [cos, cos] + [-x2, x1] * [sin, sin]`.
            *o1 = a * c + (-b) * s;
            *o2 = b * c + a * s;
        }
    }
}

fn head_layout_fwd<T: Real>(
    s: &CpuStorage,
    l: &Layout,
    op: &HeadLayout,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "head-layout")?;
    let (t, hd, heads, out_shape) = if op.split {
        let (b, t, width) = l.shape().dims3()?;
        if op.heads == 0 || width % op.heads != 0 {
            candle_core::bail!(
                "split heads: width {width} is not a multiple of {}",
                op.heads
            );
        }
        let hd = width / op.heads;
        (t, hd, op.heads, Shape::from((b, op.heads, t, hd)))
    } else {
        let (b, heads, t, hd) = l.shape().dims4()?;
        (t, hd, heads, Shape::from((b, t, heads * hd)))
    };
    let half = hd / 2;
    let width = heads * hd;
    let run = |cos: &[T], sin: &[T]| -> Result<Vec<T>> {
        if op.rope.is_some() && (hd % 2 != 0 || cos.len() < t * half || sin.len() < t * half) {
            candle_core::bail!("rope: tables too small for {t} positions of head dim {hd}");
        }
        let mut out = vec![T::zero(); x.len()];
        // Each output row of one head at one position comes from one input row.
        let put = |bi: usize, hi: usize, ti: usize, dst: &mut [T]| {
            let merged = (bi * t + ti) * width + hi * hd;
            let split = ((bi * heads + hi) * t + ti) * hd;
            let src = if op.split {
                &x[merged..merged + hd]
            } else {
                &x[split..split + hd]
            };
            if op.rope.is_some() {
                let c = &cos[ti * half..(ti + 1) * half];
                let sn = &sin[ti * half..(ti + 1) * half];
                rotate(src, dst, c, sn, op.inverse);
            } else {
                dst.copy_from_slice(src);
            }
        };
        if op.split {
            // Output chunk (bi, hi) holds t rows of hd.
            out.par_chunks_mut(t * hd)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let (bi, hi) = (c / heads, c % heads);
                    for (ti, dst) in chunk.chunks_mut(hd).enumerate() {
                        put(bi, hi, ti, dst);
                    }
                });
        } else {
            // Output row (bi, ti) holds the heads side by side.
            out.par_chunks_mut(width)
                .enumerate()
                .with_min_len(rows_per_task(width))
                .for_each(|(r, row)| {
                    let (bi, ti) = (r / t, r % t);
                    for (hi, dst) in row.chunks_mut(hd).enumerate() {
                        put(bi, hi, ti, dst);
                    }
                });
        }
        Ok(out)
    };
    let out = match &op.rope {
        Some(tables) => with_table::<T, _>(&tables.cos, |cos| {
            with_table::<T, _>(&tables.sin, |sin| run(cos, sin))
        })?,
        None => run(&[], &[])?,
    };
    Ok((T::to_cpu_storage_owned(out), out_shape))
}

impl CustomOp1 for HeadLayout {
    fn name(&self) -> &'static str {
        if self.split {
            "fused-split-heads"
        } else {
            "fused-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, self.name(), head_layout_fwd, s, l, self)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The adjoint of a split with rotation R is R^T (the inverse rotation) then a merge,
        // and the other way round; a merge applies its rotation before merging, a split after
        // splitting, so swapping the direction and inverting the rotation is the adjoint.
        let adjoint = HeadLayout {
            heads: self.heads,
            split: !self.split,
            rope: self.rope.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1(adjoint)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Loss head: log-softmax of each row, read at the target
// ---------------------------------------------------------------------------------------------

/// `log_softmax(logits)[i, targets[i]]` for `logits: [n, vocab]` and `targets: [n]` (u32):
/// the log-prob of each row's target, without materialising the `[n, vocab]` log-softmax.
pub(crate) fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims1()? != n || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "target log-probs: targets {:?} {:?} do not match logits {:?}",
            targets.shape(),
            targets.dtype(),
            logits.shape()
        );
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TargetLogprobs)
}

struct TargetLogprobs;

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, vocab: usize) -> Result<&'a [u32]> {
    let all = s.as_slice::<u32>()?;
    let t = match l.contiguous_offsets() {
        Some((a, b)) => &all[a..b],
        None => candle_core::bail!("target log-probs: targets must be contiguous"),
    };
    if let Some(bad) = t.iter().find(|&&v| v as usize >= vocab) {
        candle_core::bail!("target log-probs: target {bad} outside the vocabulary of {vocab}");
    }
    Ok(t)
}

/// `(max, ln(sum(exp(x - max))))` of a row.
fn row_lse<T: Real>(x: &[T]) -> (T, T) {
    let max = x.iter().fold(T::neg_infinity(), |a, &v| Float::max(a, v));
    let sum = x.iter().fold(T::zero(), |a, &v| a + (v - max).exp());
    (max, sum.ln())
}

fn target_logprobs_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "target-logprobs")?;
    let (n, v) = l1.shape().dims2()?;
    let targets = targets_of(s2, l2, v)?;
    let out = map_rows(x, v, 1, |row, xr, o| {
        let (max, lse) = row_lse(xr);
        // The composite: shifted = x - max; logp = shifted - lse; gather.
        o[0] = (xr[targets[row] as usize] - max) - lse;
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp2 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "fused-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), target_logprobs_fwd, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TargetLogprobsBackward)?;
        Ok((Some(d), None))
    }
}

/// `g[i] * (onehot(target[i]) - softmax(logits[i]))`.
struct TargetLogprobsBackward;

fn target_logprobs_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "target-logprobs-bwd")?;
    let (n, v) = l1.shape().dims2()?;
    let targets = targets_of(s2, l2, v)?;
    let g = data::<T>(s3, l3, "target-logprobs-bwd")?;
    if g.len() != n {
        candle_core::bail!(
            "target-logprobs-bwd: gradient has {} rows, not {n}",
            g.len()
        );
    }
    let out = map_rows(x, v, v, |row, xr, dr| {
        let (max, lse) = row_lse(xr);
        let gv = g[row];
        for (o, &xv) in dr.iter_mut().zip(xr) {
            *o = -gv * ((xv - max) - lse).exp();
        }
        dr[targets[row] as usize] += gv;
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp3 for TargetLogprobsBackward {
    fn name(&self) -> &'static str {
        "fused-target-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), target_logprobs_bwd, s1, l1, s2, l2, s3, l3)
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up
// ---------------------------------------------------------------------------------------------

/// `silu(gate) * up` with `silu(x) = x / (1 + exp(-x))` (candle's formula).
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

struct Swiglu;

fn silu<T: Real>(v: T) -> T {
    v / (T::one() + (-v).exp())
}

fn swiglu_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let a = data::<T>(s1, l1, "swiglu")?;
    let b = data::<T>(s2, l2, "swiglu")?;
    let w = *l1.dims().last().unwrap_or(&1);
    let out = map_rows(a, w, w, |row, ar, o| {
        let br = &b[row * w..(row + 1) * w];
        for ((o, &av), &bv) in o.iter_mut().zip(ar).zip(br) {
            *o = silu(av) * bv;
        }
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), swiglu_fwd, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `[d_gate, d_up]` stacked on a new leading axis: `d_gate = g * up * s * (1 + x * (1 - s))`
/// with `s = sigmoid(x)`, `d_up = g * silu(x)`.
struct SwigluBackward;

fn swiglu_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let a = data::<T>(s1, l1, "swiglu-bwd")?;
    let b = data::<T>(s2, l2, "swiglu-bwd")?;
    let g = data::<T>(s3, l3, "swiglu-bwd")?;
    let n = a.len();
    if b.len() != n || g.len() != n {
        candle_core::bail!("swiglu-bwd: argument sizes differ");
    }
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    let chunk = MIN_TASK_ELEMS;
    dg.par_chunks_mut(chunk)
        .zip(du.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(c, (dgc, duc))| {
            let at = c * chunk;
            let end = at + dgc.len();
            let args = a[at..end].iter().zip(&b[at..end]).zip(&g[at..end]);
            for ((dgv, duv), ((&x, &bv), &gv)) in dgc.iter_mut().zip(duc.iter_mut()).zip(args) {
                let s = T::one() / (T::one() + (-x).exp());
                *dgv = gv * bv * s * (T::one() + x * (T::one() - s));
                *duv = gv * silu(x);
            }
        });
    let mut dims = vec![2];
    dims.extend_from_slice(l1.dims());
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), swiglu_bwd, s1, l1, s2, l2, s3, l3)
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA: inverted dropout with a counter-based mask, and `base + scale * update`
// ---------------------------------------------------------------------------------------------

/// `x * mask` with the mask of `init::dropout_mask(x.dims(), p, seed, stream)`, computed on
/// the fly (entry `i` is `0` or `1 / (1 - p)` from a hash of `(seed, stream, i)`), so the mask
/// is never stored and the backward pass recomputes it.
pub(crate) fn dropout(x: &Tensor, p: f64, seed: u64, stream: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout {
        key: super::init::stream_seed(seed, stream),
        p,
    })
}

#[derive(Clone, Copy)]
struct Dropout {
    key: u64,
    p: f64,
}

/// The mask entries `start .. start + len` of `d` (`0` where dropped, else `1 / (1 - p)`,
/// exactly `init::dropout_mask`'s values). `start` must be a multiple of [`MIN_TASK_ELEMS`] so
/// the range never straddles a 2^32-entry block of the mask. The buffer is chunk-sized (in
/// cache) and zeroed by the allocator: measured faster than writing the output uninitialised
/// through a zeroed activation-sized buffer.
fn mask_chunk<T: Real>(d: &Dropout, start: u64, len: usize) -> Vec<T> {
    use super::init::{dropout_keys, dropout_threshold};
    // The keep value rounded to f32, then to T, as `init::dropout_mask` stores it.
    let keep = T::from((1.0 / (1.0 - d.p)) as f32).unwrap_or(T::one());
    let keys = dropout_keys(d.key, start >> 32);
    let mut out = vec![T::zero(); len];
    write_mask(keys, start as u32, dropout_threshold(d.p), keep, &mut out);
    out
}

/// Writes mask entries into `out`: `0` where dropped, else `keep`, entry `i` being entry
/// `base + i` of its mask block.
fn write_mask<T: Real>(keys: (u32, u32), base: u32, threshold: u32, keep: T, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        unsafe { write_mask_avx2(keys, base, threshold, keep, out) };
        return;
    }
    write_mask_portable(keys, base, threshold, keep, out);
}

#[inline(always)]
fn write_mask_portable<T: Real>(
    keys: (u32, u32),
    base: u32,
    threshold: u32,
    keep: T,
    out: &mut [T],
) {
    for (i, o) in out.iter_mut().enumerate() {
        let dropped = super::init::dropped(keys, base.wrapping_add(i as u32), threshold);
        *o = if dropped { T::zero() } else { keep };
    }
}

/// [`write_mask_portable`] compiled for AVX2: the hash's 32-bit multiplies eight lanes at a time
/// (SSE2 has no 32-bit lane multiply and the baseline build vectorises it two lanes wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn write_mask_avx2<T: Real>(
    keys: (u32, u32),
    base: u32,
    threshold: u32,
    keep: T,
    out: &mut [T],
) {
    write_mask_portable(keys, base, threshold, keep, out);
}

fn dropout_fwd<T: Real>(s: &CpuStorage, l: &Layout, op: &Dropout) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "dropout")?;
    let chunk = MIN_TASK_ELEMS;
    let out = filled(x.len(), chunk, |c, len| {
        let at = c * chunk;
        x[at..at + len]
            .iter()
            .zip(mask_chunk::<T>(op, at as u64, len))
            .map(|(&v, m)| v * m)
    });
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, self.name(), dropout_fwd, s, l, self)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The mask is its own adjoint: multiply the gradient by the same mask.
        Ok(Some(grad.contiguous()?.apply_op1(*self)?))
    }
}

/// `base + (update * scale + 0)`: the LoRA update added to the base projection, rounding as
/// the composite `base.add(&update.affine(scale, 0.0))`.
pub(crate) fn add_scaled(base: &Tensor, update: &Tensor, scale: f64) -> Result<Tensor> {
    if base.shape() != update.shape() {
        candle_core::bail!(
            "add scaled: base {:?} and update {:?} differ",
            base.shape(),
            update.shape()
        );
    }
    base.contiguous()?
        .apply_op2(&update.contiguous()?, AddScaled { scale })
}

#[derive(Clone, Copy)]
struct AddScaled {
    scale: f64,
}

fn add_scaled_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let a = data::<T>(s1, l1, "add-scaled")?;
    let b = data::<T>(s2, l2, "add-scaled")?;
    if a.len() != b.len() {
        candle_core::bail!("add-scaled: argument sizes differ");
    }
    Ok((
        T::to_cpu_storage_owned(add_scaled_slices(a, b, scale)),
        l1.shape().clone(),
    ))
}

/// `base + (update * scale + 0)` entry by entry, in parallel chunks: the rounding of the
/// composite `base.add(&update.affine(scale, 0.0))`.
fn add_scaled_slices<T: Real>(base: &[T], update: &[T], scale: f64) -> Vec<T> {
    let scale = T::from(scale).unwrap_or(T::one());
    let chunk = MIN_TASK_ELEMS;
    filled(base.len(), chunk, |c, len| {
        let at = c * chunk;
        base[at..at + len]
            .iter()
            .zip(&update[at..at + len])
            .map(move |(&bv, &uv)| bv + (uv * scale + T::zero()))
    })
}

impl CustomOp2 for AddScaled {
    fn name(&self) -> &'static str {
        "fused-add-scaled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), add_scaled_fwd, s1, l1, s2, l2, self.scale)
    }

    fn bwd(
        &self,
        _base: &Tensor,
        _update: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let update = if self.scale == 1.0 {
            grad.clone()
        } else {
            grad.affine(self.scale, 0.0)?
        };
        Ok((Some(grad.clone()), Some(update)))
    }
}

// ---------------------------------------------------------------------------------------------
// A whole LoRA projection as one graph node
// ---------------------------------------------------------------------------------------------

/// `x W^T + scale * dropout(x) A^T B^T` for a frozen `w: [out, in]` and trainable
/// `a: [r, in]`, `b: [out, r]`, as one node of the autograd graph.
///
/// candle's backward pass allocates a zero gradient and adds into it for every edge of the
/// graph, and an unfused LoRA projection has six edges the size of the activations (the base
/// matmul, the dropout, the two LoRA matmuls, the scale, the sum). As one node it has one such
/// edge (`x`) plus `a` and `b`. The forward pass runs the same matmul calls as the unfused ops
/// and the same sum, so the values are the same.
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<(f64, u64, u64)>,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    if a_in != in_f || b.dims2()? != (out_f, r) {
        candle_core::bail!(
            "lora linear: A {:?} and B {:?} do not fit W [{out_f}, {in_f}]",
            a.shape(),
            b.shape()
        );
    }
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("lora linear: input must have at least one dimension");
    };
    if last != in_f {
        candle_core::bail!(
            "lora linear: input {:?} does not match W [{out_f}, {in_f}]",
            x.shape()
        );
    }
    let rows: usize = lead.iter().product();
    let op = LoraLinear {
        w: w.contiguous()?,
        scale,
        dropout: dropout.map(|(p, seed, stream)| Dropout {
            key: super::init::stream_seed(seed, stream),
            p,
        }),
    };
    let y =
        x.contiguous()?
            .reshape((rows, in_f))?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_f);
    y.reshape(out_dims)
}

struct LoraLinear {
    w: Tensor,
    scale: f64,
    dropout: Option<Dropout>,
}

fn lora_linear_fwd<T: Real>(
    op: &LoraLinear,
    sx: &CpuStorage,
    lx: &Layout,
    sa: &CpuStorage,
    la: &Layout,
    sb: &CpuStorage,
    lb: &Layout,
) -> Result<(CpuStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (m, k) = lx.shape().dims2()?;
    let (r, _) = la.shape().dims2()?;
    let (n, _) = lb.shape().dims2()?;
    let (w_storage, wl) = op.w.storage_and_layout();
    let Storage::Cpu(ws) = &*w_storage else {
        candle_core::bail!("lora linear: the weight is not on the CPU");
    };
    let base = sx.matmul(ws, (1, m, n, k), lx, &wl.transpose(0, 1)?)?;
    let dropped;
    let (xd, lxd) = match &op.dropout {
        Some(d) => {
            dropped = dropout_fwd::<T>(sx, lx, d)?.0;
            (&dropped, Layout::contiguous((m, k)))
        }
        None => (sx, lx.clone()),
    };
    let down = xd.matmul(sa, (1, m, r, k), &lxd, &la.transpose(0, 1)?)?;
    let up = down.matmul(
        sb,
        (1, m, n, r),
        &Layout::contiguous((m, r)),
        &lb.transpose(0, 1)?,
    )?;
    let out = add_scaled_slices(base.as_slice::<T>()?, up.as_slice::<T>()?, op.scale);
    Ok((T::to_cpu_storage_owned(out), Shape::from((m, n))))
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            self.name(),
            lora_linear_fwd,
            self,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached copies: the gradient computation itself is not differentiated.
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let grad = grad.contiguous()?;
        // The mask is recomputed here and again in `AddMasked` below: one hash per entry, cheaper
        // than storing an activation-sized mask between the two.
        let xd = match &self.dropout {
            Some(d) => x.apply_op1_no_bwd(d)?,
            None => x,
        };
        // The scale goes on the rank-r products, not on the activation-sized gradient.
        let down = xd.matmul(&a.t()?)?;
        let db = grad.t()?.matmul(&down)?.affine(self.scale, 0.0)?;
        let d_down = grad.matmul(&b)?.affine(self.scale, 0.0)?;
        let da = d_down.t()?.matmul(&xd)?;
        let dxd = d_down.matmul(&a)?;
        // `x W^T`'s gradient plus the LoRA path's, through the same dropout mask, in one pass.
        let dx = grad.matmul(&self.w)?.apply_op2_no_bwd(
            &dxd,
            &AddMasked {
                dropout: self.dropout,
            },
        )?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `base + mask * update` with the mask of a LoRA dropout (all ones without one): the input
/// gradient of [`lora_linear`], its frozen path and its LoRA path summed in one pass. Used on
/// gradients only, so it has no backward pass of its own.
#[derive(Clone, Copy)]
struct AddMasked {
    dropout: Option<Dropout>,
}

fn add_masked_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &AddMasked,
) -> Result<(CpuStorage, Shape)> {
    let a = data::<T>(s1, l1, "add-masked")?;
    let b = data::<T>(s2, l2, "add-masked")?;
    if a.len() != b.len() {
        candle_core::bail!("add-masked: argument sizes differ");
    }
    let chunk = MIN_TASK_ELEMS;
    let out = match &op.dropout {
        Some(d) => filled(a.len(), chunk, |c, len| {
            let at = c * chunk;
            a[at..at + len]
                .iter()
                .zip(&b[at..at + len])
                .zip(mask_chunk::<T>(d, at as u64, len))
                .map(|((&av, &bv), m)| av + bv * m)
        }),
        // Without dropout the mask is all ones: `bv * 1` is `bv` exactly.
        None => filled(a.len(), chunk, |c, len| {
            let at = c * chunk;
            a[at..at + len]
                .iter()
                .zip(&b[at..at + len])
                .map(|(&av, &bv)| av + bv)
        }),
    };
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for AddMasked {
    fn name(&self) -> &'static str {
        "fused-add-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), add_masked_fwd, s1, l1, s2, l2, self)
    }
}

// ---------------------------------------------------------------------------------------------
// Batched matmul for attention: one single-threaded gemm per batch entry, entries in parallel
// ---------------------------------------------------------------------------------------------

/// `a @ b` over `[batch, heads, m, k] x [batch, heads, k, n]` (either operand may be a
/// transposed view, as `k.t()` is).
///
/// candle runs a batched matmul as one gemm per batch entry, one after the other, each split
/// over the threads: for attention's 32 products of 128 x 64 x 128 most of the time goes to
/// splitting and joining. Here each entry is one single-threaded gemm and the entries run in
/// parallel; the backward pass is two more such products.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2(b, BatchedMatmul)
}

#[derive(Clone, Copy)]
struct BatchedMatmul;

/// The batch count and batch stride of a rank-4 layout, and its row and column strides, when
/// its two batch dimensions collapse into one.
fn batch_strides(l: &Layout) -> Option<(usize, usize, isize, isize)> {
    let (dims, strides) = (l.dims(), l.stride());
    if dims.len() != 4 || (dims[0] > 1 && dims[1] > 1 && strides[0] != strides[1] * dims[1]) {
        return None;
    }
    let skip = if dims[1] > 1 { strides[1] } else { strides[0] };
    Some((
        dims[0] * dims[1],
        skip,
        strides[2] as isize,
        strides[3] as isize,
    ))
}

fn batched_matmul_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (da, db) = (l1.dims(), l2.dims());
    let (Some((batch, a_skip, a_rs, a_cs)), Some((b_batch, b_skip, b_rs, b_cs))) =
        (batch_strides(l1), batch_strides(l2))
    else {
        candle_core::bail!("batched matmul: {da:?} x {db:?} are not [b, h, m, k] x [b, h, k, n]");
    };
    let (m, k, n) = (da[2], da[3], db[3]);
    if da[..2] != db[..2] || db[2] != k || b_batch != batch {
        candle_core::bail!("batched matmul: {da:?} and {db:?} do not fit");
    }
    let (a, b) = (s1.as_slice::<T>()?, s2.as_slice::<T>()?);
    let span = |skip: usize, rs: isize, cs: isize, rows: usize, cols: usize| {
        (batch - 1) * skip + (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1
    };
    let shape = Shape::from((da[0], da[1], m, n));
    let mut out = vec![T::zero(); batch * m * n];
    if batch * m * n * k == 0 {
        // An empty product, or sums over nothing: zeros.
        return Ok((T::to_cpu_storage_owned(out), shape));
    }
    if l1.start_offset() + span(a_skip, a_rs, a_cs, m, k) > a.len()
        || l2.start_offset() + span(b_skip, b_rs, b_cs, k, n) > b.len()
    {
        candle_core::bail!("batched matmul: a layout reaches outside its storage");
    }
    let (a, b) = (&a[l1.start_offset()..], &b[l2.start_offset()..]);
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
        // SAFETY: the operands of entry `i` lie inside `a` and `b` (checked above through the
        // last entry's span), `dst` holds `m * n` elements written with row stride `n`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                a[i * a_skip..].as_ptr(),
                a_cs,
                a_rs,
                b[i * b_skip..].as_ptr(),
                b_cs,
                b_rs,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    Ok((T::to_cpu_storage_owned(out), shape))
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), batched_matmul_fwd, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let da = grad.apply_op2_no_bwd(&b.detach().t()?, self)?;
        let db = a.detach().t()?.apply_op2_no_bwd(&grad, self)?;
        Ok((Some(da), Some(db)))
    }
}
