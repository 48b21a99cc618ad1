//! Differentiable building blocks of the decoder.
//!
//! candle's fused kernels (`candle_nn::ops::softmax_last_dim`, `rms_norm`, `log_softmax` on some
//! back-ends, `rotary_emb::rope`, `sdpa`) are registered with `apply_op*_no_bwd`: they run, but
//! the gradient stops at them without an error. Everything here is differentiable and
//! follows the arithmetic of the fused kernels (and of mistral.rs 0.8.1, which serves the same
//! weights) so the values agree.
//!
//! On the CPU in `f32` and `f64` the row-wise ops (RMSNorm, the attention softmax, head
//! split/merge with RoPE, SwiGLU, the loss head's log-softmax, LoRA dropout and the LoRA sum)
//! run as fused multi-threaded kernels with hand-written backward passes (`kernels.rs`); in
//! other dtypes and on other devices they are composed of basic candle ops ([`composite`]),
//! which is also the reference the kernels are tested against.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::kernels::{self, RopeTables};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
///
/// Same formula and order of operations as `candle_nn::ops::rms_norm` (which mistral.rs uses),
/// but differentiable with respect to `x` and `weight`. Fused on the CPU in `f32`/`f64`, else
/// [`composite::rms_norm`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::supported(x) && weight.dtype() == x.dtype() && weight.device().is_cpu() {
        kernels::rms_norm(x, weight, eps)
    } else {
        composite::rms_norm(x, weight, eps)
    }
}

/// `softmax(scores * scale + mask)` over the last dimension: the attention probabilities for
/// `scores: [b, h, t, s]` and an additive `mask: [b, 1, t, s]` (0 or `-inf`, broadcast over
/// heads; it gets no gradient). Fused on the CPU in `f32`/`f64`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if kernels::supported(scores) && mask.dtype() == scores.dtype() && mask.device().is_cpu() {
        kernels::masked_softmax(scores, mask, scale)
    } else {
        softmax_last_dim(&scores.affine(scale, 0.0)?.broadcast_add(mask)?)
    }
}

/// `log_softmax(logits)[i, targets[i]]` for `logits: [n, vocab]` and `targets: [n]` (u32):
/// each row's log-prob of its target. Fused on the CPU in `f32`/`f64` (no `[n, vocab]`
/// log-softmax is materialised), else [`log_softmax_last_dim`] and a gather.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if kernels::supported(logits) && targets.device().is_cpu() {
        kernels::target_logprobs(logits, targets)
    } else {
        let n = targets.dims1()?;
        log_softmax_last_dim(logits)?
            .gather(&targets.reshape((n, 1))?, 1)?
            .reshape(n)
    }
}

/// SwiGLU, `silu(gate) * up`. Fused on the CPU in `f32`/`f64`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::supported(gate) && up.dtype() == gate.dtype() && up.device().is_cpu() {
        kernels::swiglu(gate, up)
    } else {
        silu(gate)?.mul(up)
    }
}

/// Splits `x: [b, t, heads * head_dim]` into heads, `[b, heads, t, head_dim]` (contiguous),
/// applying [`rope`] with the tables `(cos, sin)` from [`rope_tables`] when given. Fused (one
/// pass, no separate transpose copy) on the CPU in `f32`/`f64`.
pub fn split_heads(
    x: &Tensor,
    heads: usize,
    rope_cos_sin: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("split heads: width {width} is not a multiple of {heads}");
    }
    let tables_fit = rope_cos_sin.is_none_or(|(cos, sin)| {
        cos.dtype() == x.dtype() && sin.dtype() == x.dtype() && cos.device().is_cpu()
    });
    if kernels::supported(x) && tables_fit {
        let tables = rope_cos_sin.map(|(cos, sin)| {
            Arc::new(RopeTables {
                cos: cos.clone(),
                sin: sin.clone(),
            })
        });
        return kernels::split_heads(x, heads, tables.as_ref());
    }
    let split = x
        .reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()?;
    match rope_cos_sin {
        Some((cos, sin)) => rope(&split, cos, sin),
        None => Ok(split),
    }
}

/// `a @ b` for attention's `[batch, heads, m, k] x [batch, heads, k, n]` (`b` may be a
/// transposed view). On the CPU in `f32`/`f64`, with enough batch entries to keep every
/// thread busy, one single-threaded product per entry, the entries in parallel.
pub fn attention_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let entries = a.dims().iter().rev().skip(2).product::<usize>();
    if kernels::supported(a)
        && b.dtype() == a.dtype()
        && b.device().is_cpu()
        && a.rank() == 4
        && entries >= 2 * rayon::current_num_threads()
    {
        kernels::batched_matmul(a, b)
    } else {
        a.matmul(b)
    }
}

/// Merges heads `[b, heads, t, head_dim]` into `[b, t, heads * head_dim]` (contiguous).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    if kernels::supported(x) {
        return kernels::merge_heads(x);
    }
    let (b, heads, t, hd) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, heads * hd))
}

/// LoRA's inverted dropout: `x * mask` with `mask[i]` `0` with probability `p`, else
/// `1 / (1 - p)`, entry `i` a function of `(seed, stream, i)` only. Fused on the CPU in
/// `f32`/`f64` (the mask is computed on the fly and never stored).
pub fn lora_dropout(x: &Tensor, p: f64, seed: u64, stream: u64) -> Result<Tensor> {
    if kernels::supported(x) {
        kernels::dropout(x, p, seed, stream)
    } else {
        let mask = super::init::dropout_mask(x.dims(), p, seed, stream, x.dtype(), x.device())?;
        x.mul(&mask)
    }
}

/// `base + update * scale`, rounding as `base.add(&update.affine(scale, 0.0))`. Fused on the
/// CPU in `f32`/`f64`.
pub fn add_scaled(base: &Tensor, update: &Tensor, scale: f64) -> Result<Tensor> {
    if kernels::supported(base) && update.dtype() == base.dtype() && update.device().is_cpu() {
        kernels::add_scaled(base, update, scale)
    } else {
        base.add(&update.affine(scale, 0.0)?)
    }
}

/// Softmax over the last dimension, `exp(x - max) / sum(exp(x - max))`.
///
/// The maximum is detached: softmax is shift-invariant, so its true gradient through the
/// maximum is zero, and detaching saves the work. Rows that are all `-inf` give NaN, as the fused
/// kernel does; masks built by [`attention_mask`] always leave one finite entry per row.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// SiLU, `x * sigmoid(x)`.
///
/// candle's unary `silu` op has a backward rule (unlike `candle_nn::ops::sigmoid`'s fused
/// kernel), and it is the op mistral.rs applies, so it is used as is for identical values.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// The RoPE tables `cos` and `sin`, each `[seq_len, head_dim / 2]`, computed exactly as
/// mistral.rs 0.8.1 computes them (`RotaryEmbedding::new`): inverse frequencies
/// `1 / theta^(i / head_dim)` for even `i` in `f32`, positions as `f32`, the outer product as a
/// matmul in `f32`, then `sin`/`cos` in `f32` and a cast to `dtype`.
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    seq_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let base = theta as f32;
    let inv_freq: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .collect();
    rope_tables_from(&inv_freq, seq_len, dtype, device)
}

/// [`rope_tables`] from given inverse frequencies (e.g. Llama 3's scaled ones,
/// [`crate::config::LlamaConfig::rope_inv_freq`]): positions as `f32`, the outer product as a
/// matmul in `f32`, then `sin`/`cos` in `f32` and a cast to `dtype`.
pub fn rope_tables_from(
    inv_freq: &[f32],
    seq_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq.to_vec(), (1, half), device)?;
    let positions = u32::try_from(seq_len)
        .map_err(|_| candle_core::Error::Msg(format!("sequence length {seq_len} too long")))?;
    let t = Tensor::arange(0u32, positions, device)?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    let sin = freqs.sin()?.to_dtype(dtype)?;
    let cos = freqs.cos()?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary position embedding in Hugging Face's `rotate_half` convention (GPT-NeoX style, the
/// one `candle_nn::rotary_emb::rope` and mistral.rs's Llama use):
/// `out[..h] = x1 * cos - x2 * sin`, `out[h..] = x1 * sin + x2 * cos` with `x1 = x[..h]`,
/// `x2 = x[h..]`, `h = head_dim / 2`.
///
/// `x` is `[batch, heads, seq, head_dim]`; `cos` and `sin` are `[seq, head_dim / 2]` (from
/// [`rope_tables`]). Written as `x * [cos, cos] + rotate_half(x) * [sin, sin]`, which rounds
/// exactly like the fused kernel.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, seq, dim) = x.dims4()?;
    let (cos_seq, half) = cos.dims2()?;
    if half * 2 != dim || cos_seq < seq || sin.dims2()? != (cos_seq, half) {
        candle_core::bail!(
            "rope: x {:?} does not match cos {:?} / sin {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    let cos = cos.narrow(0, 0, seq)?;
    let sin = sin.narrow(0, 0, seq)?;
    let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
    let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
    rotate_half_rope(x, &cos, &sin)
}

/// The RoPE angles of one position per row, as generation with a [`super::KvCache`] needs:
/// `(cos, sin)`, each `[batch, 1, 1, head_dim]`, row `r` holding position `positions[r]` of the
/// tables from [`rope_tables`] (both halves, as [`rope`] lays them out). Computed once per step
/// and applied to every layer's queries and keys by [`rope_rows`].
pub fn rope_tables_at(cos: &Tensor, sin: &Tensor, positions: &[usize]) -> Result<(Tensor, Tensor)> {
    let (table, half) = cos.dims2()?;
    if sin.dims2()? != (table, half) {
        candle_core::bail!("rope tables: cos {:?} / sin {:?}", cos.shape(), sin.shape());
    }
    if let Some(p) = positions.iter().find(|&&p| p >= table) {
        candle_core::bail!(
            "rope tables at: position {p} is beyond the {table} positions of the tables"
        );
    }
    let b = positions.len();
    let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let index = Tensor::from_vec(index, b, cos.device())?;
    let rows = |t: &Tensor| -> Result<Tensor> {
        let t = t.index_select(&index, 0)?;
        Tensor::cat(&[&t, &t], D::Minus1)?.reshape((b, 1, 1, 2 * half))
    };
    Ok((rows(cos)?, rows(sin)?))
}

/// [`rope`] for one new position per row: `x` is `[batch, heads, 1, head_dim]`, rotated by the
/// row angles `(cos, sin)` of [`rope_tables_at`]; the arithmetic of [`rope`].
pub fn rope_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, one, dim) = x.dims4()?;
    if one != 1 || cos.dims4()? != (b, 1, 1, dim) || sin.dims4()? != (b, 1, 1, dim) {
        candle_core::bail!(
            "rope rows: x {:?} does not match cos {:?} / sin {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    rotate_half_rope(x, cos, sin)
}

/// `x * cos + rotate_half(x) * sin` for `cos`, `sin` holding both halves and broadcasting
/// against `x`: the arithmetic [`rope`] and [`rope_rows`] share.
fn rotate_half_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// Repeats each key/value head `n_rep` times along the head axis (grouped-query attention):
/// `[b, kv_heads, t, d] -> [b, kv_heads * n_rep, t, d]`, query head `i` reading kv head
/// `i / n_rep`, as in Hugging Face and mistral.rs.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

/// The additive attention mask `[batch, 1, seq, seq]`: `0` where query `i` may attend key `j`
/// (`j <= i` and key `j` is a real token of that row), `-inf` elsewhere.
///
/// `lens[b]` is the number of real tokens of row `b` (right padding). A padded query row still
/// sees key 0, so no row is all `-inf`; its outputs are never read.
pub fn attention_mask(lens: &[usize], seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(lens.len() * seq * seq);
    for &len in lens {
        for i in 0..seq {
            for j in 0..seq {
                let visible = j <= i && (j < len || j == 0);
                data.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(data, (lens.len(), 1, seq, seq), device)?.to_dtype(dtype)
}

/// The additive mask `[batch, 1, 1, cols]` of one generation step over a [`super::KvCache`]:
/// row `r` sees its prompt's columns `0..lens[r]` and every column from `prompt_cols` on (the
/// tokens it generated, the new one included), not the padding between them.
pub fn step_mask(
    lens: &[usize],
    prompt_cols: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(lens.len() * cols);
    for &len in lens {
        data.extend((0..cols).map(|j| {
            if j < len || j >= prompt_cols {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    Tensor::from_vec(data, (lens.len(), 1, 1, cols), device)?.to_dtype(dtype)
}

/// The ops composed of basic candle ops: the reference the fused kernels are tested against,
/// and the implementation on devices and dtypes the kernels do not cover.
pub mod composite {
    use candle_core::{DType, Result, Tensor, D};

    /// RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) * weight`, from basic ops.
    ///
    /// For half-precision inputs the mean of squares and its square root are computed in `f32`
    /// and rounded back, as the fused kernel does.
    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let wide = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean_sq = wide.sqr()?.mean_keepdim(D::Minus1)?;
        let denom = (mean_sq + eps)?.sqrt()?.to_dtype(dtype)?;
        x.broadcast_div(&denom)?.broadcast_mul(weight)
    }
}
