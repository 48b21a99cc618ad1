//! The LEAF/GRPO objective: token-level PPO-clip plus the k3 KL estimator to the reference,
//! averaged over the valid tokens of each sequence.
//!
//! Per token `t` of a sequence, with advantage `A_t` and importance weight `w_t` (1 unless
//! truncated importance weighting applies):
//!
//! ```text
//! ratio_t = exp(logp_new_t - logp_old_t)
//! pg_t    = -w_t * min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)
//! kl_t    = exp(logp_ref_t - logp_new_t) - (logp_ref_t - logp_new_t) - 1      (k3)
//! loss    = mean_t pg_t + beta * mean_t kl_t                                  (per sequence)
//! ```
//!
//! and the batch loss is the mean of the sequence losses (the spec's
//! [`LossAggregation::SequenceMean`]), or, with [`LossAggregation::TokenMean`], the mean over
//! every valid token of the batch (each sequence weighted by its length, as DAPO and verl's
//! `token-mean` do).

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// How the per-token terms of a batch become its loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// The spec's: the token mean of each sequence, then the mean over sequences. Every
    /// sequence weighs the same, however long.
    #[default]
    SequenceMean,
    /// The mean over every valid token of the batch: a sequence weighs as many tokens as it
    /// has (DAPO; verl's `token-mean`; what supervised fine-tuning's cross-entropy does).
    TokenMean,
}

impl LossAggregation {
    /// The CLI's and the config's name.
    pub fn name(self) -> &'static str {
        match self {
            LossAggregation::SequenceMean => "sequence_mean",
            LossAggregation::TokenMean => "token_mean",
        }
    }

    /// One micro-batch's share of the batch loss, from its per-sequence losses `[batch]`
    /// (token means) and valid-token counts `[batch]`: `sum_s loss_s / sequences` or
    /// `sum_s count_s loss_s / tokens`, where `sequences` and `tokens` count the whole batch,
    /// so that the shares of its micro-batches add up to the batch loss.
    pub fn micro_batch_loss(
        self,
        per_sequence: &Tensor,
        counts: &Tensor,
        sequences: usize,
        tokens: usize,
    ) -> Result<Tensor> {
        match self {
            LossAggregation::SequenceMean => per_sequence.sum_all()? / sequences as f64,
            LossAggregation::TokenMean => per_sequence.mul(counts)?.sum_all()? / tokens as f64,
        }
    }
}

impl std::fmt::Display for LossAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossAggregation {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.replace('-', "_").as_str() {
            "sequence_mean" => Ok(LossAggregation::SequenceMean),
            "token_mean" => Ok(LossAggregation::TokenMean),
            other => Err(format!(
                "unknown loss aggregation {other:?} (sequence_mean or token_mean)"
            )),
        }
    }
}

/// Per-sequence terms of the objective, differentiable with respect to `logp_new`.
#[derive(Debug, Clone)]
pub struct SequenceTerms {
    /// `mean_t pg_t` per sequence, `[batch]`.
    pub pg: Tensor,
    /// `mean_t kl_t` per sequence, `[batch]`.
    pub kl: Tensor,
    /// Valid tokens per sequence, `[batch]`.
    pub counts: Tensor,
}

/// Tensors of one micro-batch, all `[batch, max_completion]` in the model's dtype.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Log-probs under the policy being trained (carries the gradient).
    pub logp_new: &'a Tensor,
    /// Log-probs under the policy that produced the samples (no gradient).
    pub logp_old: &'a Tensor,
    /// Log-probs under the reference policy (no gradient).
    pub logp_ref: &'a Tensor,
    /// Per-token advantages.
    pub advantages: &'a Tensor,
    /// Per-token importance weights (ones when not weighting).
    pub weights: &'a Tensor,
    /// 1 on real tokens, 0 on padding.
    pub mask: &'a Tensor,
}

/// The per-sequence PPO-clip and k3 KL means of a micro-batch. Sequences must have at least one
/// real token each.
pub fn sequence_terms(x: LossInputs<'_>, clip_eps: f64) -> Result<SequenceTerms> {
    let ratio = x.logp_new.sub(x.logp_old)?.exp()?;
    let unclipped = ratio.mul(x.advantages)?;
    let clipped = ratio
        .clamp(1.0 - clip_eps, 1.0 + clip_eps)?
        .mul(x.advantages)?;
    let pg_tok = unclipped.minimum(&clipped)?.mul(x.weights)?.neg()?;
    let diff = x.logp_ref.sub(x.logp_new)?;
    let kl_tok = ((diff.exp()? - &diff)? - 1.0)?;
    let counts = x.mask.sum(D::Minus1)?;
    let pg = pg_tok.mul(x.mask)?.sum(D::Minus1)?.div(&counts)?;
    let kl = kl_tok.mul(x.mask)?.sum(D::Minus1)?.div(&counts)?;
    Ok(SequenceTerms { pg, kl, counts })
}

/// One token's `(pg_t, kl_t, clipped)` in `f64`, the reference the tensor code is tested
/// against. `clipped` is true when the clipped branch is the active minimum and differs from
/// the unclipped one (the gradient of that token is zero).
pub fn token_terms(
    logp_new: f64,
    logp_old: f64,
    logp_ref: f64,
    advantage: f64,
    weight: f64,
    clip_eps: f64,
) -> (f64, f64, bool) {
    let ratio = (logp_new - logp_old).exp();
    let unclipped = ratio * advantage;
    let clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage;
    let pg = -weight * unclipped.min(clipped);
    let d = logp_ref - logp_new;
    let kl = d.exp() - d - 1.0;
    (pg, kl, is_clipped(ratio, advantage, clip_eps))
}

/// Whether PPO's clip is active for a token: the ratio left the trust region in the direction
/// the advantage pushes it (`ratio > 1 + eps` with `A > 0`, or `ratio < 1 - eps` with `A < 0`).
pub fn is_clipped(ratio: f64, advantage: f64, clip_eps: f64) -> bool {
    (ratio > 1.0 + clip_eps && advantage > 0.0) || (ratio < 1.0 - clip_eps && advantage < 0.0)
}

/// Truncated importance weight `min(exp(logp_old - logp_behaviour), cap)`.
pub fn tis_weight(logp_old: f64, logp_behaviour: f64, cap: f64) -> f64 {
    (logp_old - logp_behaviour).exp().min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use proptest::prelude::*;

    fn t(rows: &[&[f64]]) -> Tensor {
        let c = rows[0].len();
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), c), &Device::Cpu).unwrap()
    }

    #[test]
    fn hand_computed_tokens() {
        // ratio = e^0.5 = 1.6487 > 1.2 with A = 1: clipped, pg = -1.2.
        let (pg, kl, c) = token_terms(-0.5, -1.0, -0.5, 1.0, 1.0, 0.2);
        assert!((pg + 1.2).abs() < 1e-12);
        assert_eq!(kl, 0.0);
        assert!(c);
        // Same ratio with A = -1: min(-1.6487, -1.2) = -1.6487, pg = 1.6487, not clipped.
        let (pg, _, c) = token_terms(-0.5, -1.0, -0.5, -1.0, 1.0, 0.2);
        assert!((pg - 0.5f64.exp()).abs() < 1e-12);
        assert!(!c);
        // ratio = 1: pg = -w A.
        let (pg, _, _) = token_terms(-2.0, -2.0, -2.0, 0.7, 0.5, 0.2);
        assert!((pg + 0.35).abs() < 1e-12);
        // k3 with ref - new = 1: e - 1 - 1 = 0.71828.
        let (_, kl, _) = token_terms(-2.0, -2.0, -1.0, 0.0, 1.0, 0.2);
        assert!((kl - (std::f64::consts::E - 2.0)).abs() < 1e-12);
        // TIS weight: exp(0.1) and the cap.
        assert!((tis_weight(-1.0, -1.1, 2.0) - 0.1f64.exp()).abs() < 1e-12);
        assert_eq!(tis_weight(0.0, -5.0, 2.0), 2.0);
    }

    #[test]
    fn sequence_means_ignore_padding() {
        let new = t(&[&[-0.5, -1.0, 0.0], &[-2.0, 0.0, 0.0]]);
        let old = t(&[&[-1.0, -1.0, 0.0], &[-2.0, 0.0, 0.0]]);
        let reference = t(&[&[-0.5, -2.0, 0.0], &[-1.0, 0.0, 0.0]]);
        let adv = t(&[&[1.0, -1.0, 9.0], &[0.7, 9.0, 9.0]]);
        let w = t(&[&[1.0, 1.0, 1.0], &[0.5, 1.0, 1.0]]);
        let mask = t(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0]]);
        let terms = sequence_terms(
            LossInputs {
                logp_new: &new,
                logp_old: &old,
                logp_ref: &reference,
                advantages: &adv,
                weights: &w,
                mask: &mask,
            },
            0.2,
        )
        .unwrap();
        let pg: Vec<f64> = terms.pg.to_vec1().unwrap();
        let kl: Vec<f64> = terms.kl.to_vec1().unwrap();
        let a = token_terms(-0.5, -1.0, -0.5, 1.0, 1.0, 0.2);
        let b = token_terms(-1.0, -1.0, -2.0, -1.0, 1.0, 0.2);
        let c = token_terms(-2.0, -2.0, -1.0, 0.7, 0.5, 0.2);
        assert!((pg[0] - (a.0 + b.0) / 2.0).abs() < 1e-12);
        assert!((kl[0] - (a.1 + b.1) / 2.0).abs() < 1e-12);
        assert!((pg[1] - c.0).abs() < 1e-12);
        assert!((kl[1] - c.1).abs() < 1e-12);
    }

    #[test]
    fn gradient_matches_the_closed_form() {
        // d pg / d new = -w A ratio when the unclipped branch is active, 0 when clipped;
        // d kl / d new = 1 - exp(ref - new).
        let new = Var::from_tensor(&t(&[&[-0.9, -0.5, -1.3]])).unwrap();
        let old = t(&[&[-1.0, -1.0, -1.0]]);
        let reference = t(&[&[-1.2, -0.4, -1.0]]);
        let adv = t(&[&[2.0, 1.0, -0.5]]);
        let w = t(&[&[1.0, 1.0, 1.5]]);
        let mask = t(&[&[1.0, 1.0, 1.0]]);
        let terms = sequence_terms(
            LossInputs {
                logp_new: new.as_tensor(),
                logp_old: &old,
                logp_ref: &reference,
                advantages: &adv,
                weights: &w,
                mask: &mask,
            },
            0.2,
        )
        .unwrap();
        let beta = 0.1;
        let loss = (terms.pg + (terms.kl * beta).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f64> = grads
            .get(new.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = [-0.9f64, -0.5, -1.3];
        let o = [-1.0f64; 3];
        let r = [-1.2f64, -0.4, -1.0];
        let a = [2.0f64, 1.0, -0.5];
        let ww = [1.0f64, 1.0, 1.5];
        for i in 0..3 {
            let ratio = (n[i] - o[i]).exp();
            let pg_grad = if is_clipped(ratio, a[i], 0.2) {
                0.0
            } else {
                -ww[i] * a[i] * ratio
            };
            let kl_grad = 1.0 - (r[i] - n[i]).exp();
            let expect = (pg_grad + beta * kl_grad) / 3.0;
            assert!(
                (g[i] - expect).abs() < 1e-12,
                "token {i}: {} vs {expect}",
                g[i]
            );
        }
        // Token 1 (ratio e^0.5 > 1.2, A > 0) is clipped: only the KL term remains.
        assert!(is_clipped((0.5f64).exp(), 1.0, 0.2));
    }

    proptest! {
        #[test]
        fn tensor_matches_scalar(
            rows in proptest::collection::vec(
                (-3.0f64..0.0, -3.0f64..0.0, -3.0f64..0.0, -2.0f64..2.0, 0.0f64..2.0), 1..12),
            eps in 0.05f64..0.5,
        ) {
            let n = rows.len();
            let col = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| {
                Tensor::from_vec(rows.iter().map(f).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap()
            };
            let new = col(|r| r.0);
            let old = col(|r| r.1);
            let reference = col(|r| r.2);
            let adv = col(|r| r.3);
            let w = col(|r| r.4);
            let mask = Tensor::ones((1, n), DType::F64, &Device::Cpu).unwrap();
            let terms = sequence_terms(LossInputs {
                logp_new: &new, logp_old: &old, logp_ref: &reference,
                advantages: &adv, weights: &w, mask: &mask,
            }, eps).unwrap();
            let (mut pg, mut kl) = (0.0, 0.0);
            for r in &rows {
                let (p, k, _) = token_terms(r.0, r.1, r.2, r.3, r.4, eps);
                pg += p;
                kl += k;
                prop_assert!(k >= -1e-12, "k3 is non-negative");
            }
            let got_pg: Vec<f64> = terms.pg.to_vec1().unwrap();
            let got_kl: Vec<f64> = terms.kl.to_vec1().unwrap();
            prop_assert!((got_pg[0] - pg / n as f64).abs() < 1e-9);
            prop_assert!((got_kl[0] - kl / n as f64).abs() < 1e-9);
        }
    }
}
