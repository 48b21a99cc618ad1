//! Generation with the trainer's model (the policy, LoRA on, or the base model): what the
//! held-out checks and evaluations answer with. Tokens are picked exactly as the serving tap
//! picks them ([`crate::sampling`]).
//!
//! Generation runs prompts in batches without a KV cache: every new token re-runs the decoder
//! over the right-padded batch (the causal mask keeps real positions from seeing padding) and
//! reads each row's logits at its own last position. Rows that have produced a stop token are
//! dropped from the batch.

use candle_core::{DType, IndexOp, Tensor};
use leaf_adapters::model::{LlamaModel, Pass};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::sampling::{self, Pick, SamplingParams};
use crate::Result;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Decoding {
    /// The most likely token (ties to the lowest id).
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the smallest set of
    /// most likely tokens whose probability reaches `top_p` (as the server samples).
    Sample {
        /// Softmax temperature in [0, 100] (below 1e-7: greedy).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
    },
}

impl Decoding {
    /// The checked sampling settings ([`SamplingParams::new`]'s rules, shared with the
    /// serving tap; a temperature below [`crate::sampling::GREEDY_TEMPERATURE`] is greedy).
    pub fn params(&self) -> std::result::Result<SamplingParams, TrainError> {
        match *self {
            Decoding::Greedy => Ok(SamplingParams::GREEDY),
            Decoding::Sample { temperature, top_p } => SamplingParams::new(temperature, top_p)
                .map_err(|e| TrainError::Config(e.to_string())),
        }
    }

    /// Checks the sampling parameters.
    pub fn validate(&self) -> std::result::Result<(), TrainError> {
        self.params().map(|_| ())
    }
}

/// Picks one token id from a row of logits, exactly as the serving tap does
/// ([`crate::sampling`]): greedy takes the lowest id among the maximal logits; sampling draws
/// one uniform from `rng` and returns the id with its log-prob under the renormalised nucleus.
/// NaN or `+inf` logits, an empty row or one of only `-inf` are errors.
pub fn pick_token<R: Rng>(
    logits: &[f32],
    decoding: &Decoding,
    rng: &mut R,
) -> std::result::Result<Pick, TrainError> {
    sampling::sample(logits, &decoding.params()?, rng)
        .map_err(|e| TrainError::Config(e.to_string()))
}

/// Generates a completion for every prompt (with the policy, LoRA on, when the model carries
/// LoRA; else with the base model), `batch_size` prompts per decoder pass, until a stop
/// token (which is kept at the end of the returned ids) or `max_new_tokens`. Sampling draws from
/// `rng` in prompt order, so one seed gives one result whatever the batch size.
pub fn generate_completions<R: Rng>(
    model: &LlamaModel,
    prompts: &[Vec<u32>],
    stop: &[u32],
    decoding: &Decoding,
    max_new_tokens: usize,
    batch_size: usize,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    decoding.validate()?;
    if batch_size == 0 {
        return Err(TrainError::Config("batch size must be positive".into()).into());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(TrainError::Config(format!("prompt {i} is empty")).into());
    }
    // One RNG per prompt, seeded from the caller's stream in prompt order, so batching does not
    // change what is drawn.
    let mut rngs: Vec<ChaCha8Rng> = prompts
        .iter()
        .map(|_| ChaCha8Rng::seed_from_u64(rng.random::<u64>()))
        .collect();
    let max_len = model.config().max_position_embeddings;
    let pass = if model.lora_options().is_some() {
        Pass::POLICY
    } else {
        Pass::BASE
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for lo in (0..prompts.len()).step_by(batch_size) {
        let hi = (lo + batch_size).min(prompts.len());
        let mut active: Vec<usize> = (lo..hi).collect();
        for _ in 0..max_new_tokens {
            active.retain(|&i| prompts[i].len() + out[i].len() < max_len);
            if active.is_empty() {
                break;
            }
            let rows: Vec<Vec<u32>> = active
                .iter()
                .map(|&i| prompts[i].iter().chain(&out[i]).copied().collect())
                .collect();
            let t = rows.iter().map(Vec::len).max().unwrap_or(1);
            let mut ids = vec![0u32; rows.len() * t];
            for (r, row) in rows.iter().enumerate() {
                ids[r * t..r * t + row.len()].copy_from_slice(row);
            }
            let input = candle(Tensor::from_vec(ids, (rows.len(), t), model.device()))?;
            let logits = model.forward(&input, &pass)?;
            let mut next_active = Vec::with_capacity(active.len());
            for (r, &i) in active.iter().enumerate() {
                let last: Vec<f32> = candle(
                    logits
                        .i((r, rows[r].len() - 1))
                        .and_then(|l| l.to_dtype(DType::F32))
                        .and_then(|l| l.to_vec1()),
                )?;
                let tok = pick_token(&last, decoding, &mut rngs[i])
                    .map_err(|e| TrainError::Config(format!("prompt {i}: {e}")))?
                    .id;
                out[i].push(tok);
                if !stop.contains(&tok) {
                    next_active.push(i);
                }
            }
            active = next_active;
        }
    }
    Ok(out)
}

/// A candle result as this crate's error.
pub(crate) fn candle<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| crate::Error::Adapter(leaf_adapters::Error::Candle(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum_and_refuses_nan() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let pick = pick_token(&[0.0, 2.0, 2.0, 1.0], &Decoding::Greedy, &mut rng).unwrap();
        assert_eq!((pick.id, pick.logprob), (1, 0.0));
        // As in serving: NaN logits and empty rows are errors, not skipped.
        assert!(pick_token(&[f32::NAN, -1.0], &Decoding::Greedy, &mut rng).is_err());
        assert!(pick_token(&[], &Decoding::Greedy, &mut rng).is_err());
    }

    #[test]
    fn tiny_top_p_is_greedy_and_sampling_follows_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let near_greedy = Decoding::Sample {
            temperature: 1.0,
            top_p: 0.01,
        };
        for _ in 0..50 {
            let pick = pick_token(&logits, &near_greedy, &mut rng).unwrap();
            assert_eq!((pick.id, pick.logprob), (1, 0.0));
        }
        // Probabilities 1/4 and 3/4; the -inf token is never drawn.
        let full = Decoding::Sample {
            temperature: 1.0,
            top_p: 1.0,
        };
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| pick_token(&logits, &full, &mut rng).unwrap().id == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        // Temperature 2 flattens: p1 = sqrt(3) / (1 + sqrt(3)) = 0.634.
        let warm = Decoding::Sample {
            temperature: 2.0,
            top_p: 1.0,
        };
        let ones = (0..n)
            .filter(|_| pick_token(&logits, &warm, &mut rng).unwrap().id == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.634).abs() < 0.02, "{frac}");
    }

    #[test]
    fn bad_sampling_settings_are_refused_and_zero_temperature_is_greedy() {
        for (t, p) in [
            (-1.0, 0.9),
            (f64::NAN, 0.9),
            (1000.0, 0.9),
            (1.0, 0.0),
            (1.0, 1.5),
        ] {
            assert!(Decoding::Sample {
                temperature: t,
                top_p: p
            }
            .validate()
            .is_err());
        }
        // Temperature 0 is greedy, as the server treats it.
        let zero = Decoding::Sample {
            temperature: 0.0,
            top_p: 0.9,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let pick = pick_token(&[0.0, 1.0, 1.0], &zero, &mut rng).unwrap();
        assert_eq!((pick.id, pick.logprob), (1, 0.0));
    }
}
