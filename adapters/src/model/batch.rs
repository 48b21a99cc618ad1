//! A batch of (prompt, completion) pairs laid out for teacher-forced log-probs.
//!
//! Row `i` holds `prompt ++ completion[..len - 1]`, right-padded to the longest row: the
//! log-prob of completion token `j` is read at position `prompt_len - 1 + j`, so the last
//! completion token is never fed in. Every row starts at position 0, so RoPE positions are the
//! same as in serving.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Token ids of one batch, padded and indexed for [`LlamaModel::logprobs`].
///
/// [`LlamaModel::logprobs`]: super::LlamaModel::logprobs
#[derive(Debug, Clone)]
pub struct Batch {
    input_ids: Tensor,
    lens: Vec<usize>,
    prompt_lens: Vec<usize>,
    completion_lens: Vec<usize>,
    max_completion: usize,
    gather_index: Tensor,
    targets: Tensor,
    mask: Tensor,
    max_token: u32,
}

impl Batch {
    /// Lays out `(prompt, completion)` pairs. Every prompt needs at least one token (the first
    /// completion token is predicted from it) and every completion at least one token.
    pub fn new(sequences: &[(&[u32], &[u32])], device: &Device) -> Result<Self> {
        if sequences.is_empty() {
            return Err(Error::Model("a batch needs at least one sequence".into()));
        }
        for (i, (p, c)) in sequences.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::Model(format!("sequence {i}: the prompt is empty")));
            }
            if c.is_empty() {
                return Err(Error::Model(format!(
                    "sequence {i}: the completion is empty"
                )));
            }
        }
        let b = sequences.len();
        let lens: Vec<usize> = sequences
            .iter()
            .map(|(p, c)| p.len() + c.len() - 1)
            .collect();
        let seq = lens.iter().copied().max().unwrap_or(1);
        let max_completion = sequences.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
        let mut ids = vec![0u32; b * seq];
        let mut gather = vec![0u32; b * max_completion];
        let mut targets = vec![0u32; b * max_completion];
        let mut mask = vec![0f32; b * max_completion];
        let mut max_token = 0u32;
        for (i, (p, c)) in sequences.iter().enumerate() {
            let row = &mut ids[i * seq..(i + 1) * seq];
            for (dst, &t) in row.iter_mut().zip(p.iter().chain(&c[..c.len() - 1])) {
                *dst = t;
            }
            for (j, &t) in c.iter().enumerate() {
                let flat = i * seq + p.len() - 1 + j;
                gather[i * max_completion + j] = u32::try_from(flat)
                    .map_err(|_| Error::Model("batch too large to index".into()))?;
                targets[i * max_completion + j] = t;
                mask[i * max_completion + j] = 1.0;
            }
            // Padded slots point at the row's first position; their values are masked out.
            for j in c.len()..max_completion {
                gather[i * max_completion + j] = u32::try_from(i * seq)
                    .map_err(|_| Error::Model("batch too large to index".into()))?;
            }
            max_token = p.iter().chain(c.iter()).copied().fold(max_token, u32::max);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, seq), device)?,
            lens,
            prompt_lens: sequences.iter().map(|(p, _)| p.len()).collect(),
            completion_lens: sequences.iter().map(|(_, c)| c.len()).collect(),
            max_completion,
            gather_index: Tensor::from_vec(gather, b * max_completion, device)?,
            targets: Tensor::from_vec(targets, (b, max_completion), device)?,
            mask: Tensor::from_vec(mask, (b, max_completion), device)?,
            max_token,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Always false: a batch holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Padded input ids `[batch, seq]` (u32).
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    /// Number of real input positions of each row (`prompt + completion - 1`).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Prompt length of each row.
    pub fn prompt_lens(&self) -> &[usize] {
        &self.prompt_lens
    }

    /// Completion length of each row.
    pub fn completion_lens(&self) -> &[usize] {
        &self.completion_lens
    }

    /// Longest completion: the second dimension of log-probs and masks.
    pub fn max_completion(&self) -> usize {
        self.max_completion
    }

    /// Padded input length.
    pub fn seq_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Total number of completion tokens.
    pub fn num_tokens(&self) -> usize {
        self.completion_lens.iter().sum()
    }

    /// Completion tokens `[batch, max_completion]` (u32, zero-padded).
    pub fn targets(&self) -> &Tensor {
        &self.targets
    }

    /// `1` on real completion tokens, `0` on padding, `[batch, max_completion]`, in `dtype`.
    pub fn mask(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.mask.to_dtype(dtype)?)
    }

    /// Flat `batch * seq` positions whose hidden states predict each completion slot.
    pub(crate) fn gather_index(&self) -> &Tensor {
        &self.gather_index
    }

    /// Largest token id in the batch.
    pub fn max_token(&self) -> u32 {
        self.max_token
    }
}
