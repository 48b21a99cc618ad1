//! Keys and values kept between generation steps, so that each new token runs the decoder over
//! one position instead of the whole sequence ([`super::LlamaModel::prefill`],
//! [`super::LlamaModel::decode_step`]).

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Every decoder layer's keys (after RoPE) and values, `[rows, kv_heads, columns, head_dim]`,
/// for a batch of rows being generated. Inference only: nothing flows back through it.
///
/// Row `r`'s prompt fills columns `0..lens[r]` of the `prompt_columns` prefilled ones (right
/// padding); the token fed at step `s` sits in column `prompt_columns + s` at position
/// `lens[r] + s`. A step's mask ([`super::ops::step_mask`]) hides each row's padding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    lens: Vec<usize>,
    prompt_columns: usize,
    steps: usize,
    cos: Tensor,
    sin: Tensor,
}

impl KvCache {
    pub(crate) fn new(
        layers: Vec<(Tensor, Tensor)>,
        lens: Vec<usize>,
        prompt_columns: usize,
        cos: Tensor,
        sin: Tensor,
    ) -> Self {
        KvCache {
            layers,
            lens,
            prompt_columns,
            steps: 0,
            cos,
            sin,
        }
    }

    /// Rows still being generated.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Each row's prompt length.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The position the next token of each row takes.
    pub fn positions(&self) -> Vec<usize> {
        self.lens.iter().map(|l| l + self.steps).collect()
    }

    /// Columns filled so far (prompt columns, padding included, plus one per step).
    pub fn columns(&self) -> usize {
        self.prompt_columns + self.steps
    }

    /// The positions the RoPE tables cover (prompt columns plus the steps asked for).
    pub fn capacity(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }

    pub(crate) fn prompt_columns(&self) -> usize {
        self.prompt_columns
    }

    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Appends one column of keys and values (`[rows, kv_heads, 1, head_dim]`) to layer
    /// `layer` and returns the layer's whole keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (keys, values) = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Model(format!("the cache has no layer {layer}")))?;
        *keys = Tensor::cat(&[&*keys, &k.detach()], D::Minus2)?;
        *values = Tensor::cat(&[&*values, &v.detach()], D::Minus2)?;
        Ok((keys.clone(), values.clone()))
    }

    /// Marks the step's column as filled (after every layer appended to it).
    pub(crate) fn advance(&mut self) {
        self.steps += 1;
    }

    /// Keeps only the rows `keep` (indices into the current rows, in increasing order), e.g.
    /// when the others have produced their stop token.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&r| r >= self.rows()) {
            return Err(Error::Model(format!(
                "cannot keep rows {keep:?} of a cache of {} rows",
                self.rows()
            )));
        }
        if keep.len() == self.rows() {
            return Ok(());
        }
        let index: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, keep.len(), self.cos.device())?;
        for (k, v) in &mut self.layers {
            *k = k.index_select(&index, 0)?;
            *v = v.index_select(&index, 0)?;
        }
        self.lens = keep.iter().map(|&r| self.lens[r]).collect();
        Ok(())
    }
}
