//! Generation with the trainer's model (the policy, LoRA on, or the base model): what the
//! held-out checks and evaluations answer with. Tokens are picked exactly as the serving tap
//! picks them ([`crate::sampling`]).
//!
//! Generation runs prompts in batches: the right-padded prompts once through the decoder
//! ([`LlamaModel::prefill`], which keeps every layer's keys and values in a
//! [`leaf_adapters::model::KvCache`]), then one position per row and new token
//! ([`LlamaModel::decode_step`]). Rows that have produced a stop token are dropped from the
//! batch and the cache. Batches run in parallel on rayon's pool (every prompt draws from its
//! own RNG, so the result is the same as one batch after another).

use candle_core::{DType, Tensor};
use leaf_adapters::model::{LlamaModel, Pass};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
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
    let batch = BatchGeneration {
        model,
        pass: if model.lora_options().is_some() {
            Pass::POLICY
        } else {
            Pass::BASE
        },
        stop,
        decoding,
        max_new_tokens,
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    // Batches are independent (each prompt draws from its own RNG, and a batch is padded only
    // to its own longest row), so they run in parallel on rayon's pool and give what one after
    // another would; the first failing batch, in prompt order, is the error returned.
    let outcomes: Vec<Result<()>> = prompts
        .par_chunks(batch_size)
        .zip(out.par_chunks_mut(batch_size))
        .zip(rngs.par_chunks_mut(batch_size))
        .enumerate()
        .map(|(b, ((prompts, out), rngs))| batch.run(prompts, b * batch_size, out, rngs))
        .collect();
    outcomes.into_iter().collect::<Result<()>>()?;
    Ok(out)
}

/// What every batch of one [`generate_completions`] call shares.
struct BatchGeneration<'a> {
    model: &'a LlamaModel,
    pass: Pass,
    stop: &'a [u32],
    decoding: &'a Decoding,
    max_new_tokens: usize,
}

impl BatchGeneration<'_> {
    /// Generates one batch in place: `prompts[j]`'s completion grows in `out[j]`, drawing from
    /// `rngs[j]`; `first` is the batch's offset in the caller's prompts (for error messages).
    fn run(
        &self,
        prompts: &[Vec<u32>],
        first: usize,
        out: &mut [Vec<u32>],
        rngs: &mut [ChaCha8Rng],
    ) -> Result<()> {
        let (model, decoding, stop) = (self.model, self.decoding, self.stop);
        let max_len = model.config().max_position_embeddings;
        // Rows that can still grow; row r of the logits (and of the cache) is active[r].
        let mut active: Vec<usize> = (0..prompts.len())
            .filter(|&i| prompts[i].len() < max_len)
            .collect();
        if active.is_empty() || self.max_new_tokens == 0 {
            return Ok(());
        }
        let t = active.iter().map(|&i| prompts[i].len()).max().unwrap_or(1);
        let mut ids = vec![0u32; active.len() * t];
        for (r, &i) in active.iter().enumerate() {
            ids[r * t..r * t + prompts[i].len()].copy_from_slice(&prompts[i]);
        }
        let lens: Vec<usize> = active.iter().map(|&i| prompts[i].len()).collect();
        let input = candle(Tensor::from_vec(ids, (active.len(), t), model.device()))?;
        let (mut logits, mut cache) =
            model.prefill(&input, &lens, self.max_new_tokens, &self.pass)?;
        for step in 0..self.max_new_tokens {
            let rows: Vec<Vec<f32>> =
                candle(logits.to_dtype(DType::F32).and_then(|l| l.to_vec2()))?;
            let mut keep = Vec::with_capacity(active.len());
            for (r, &i) in active.iter().enumerate() {
                let tok = pick_token(&rows[r], decoding, &mut rngs[i])
                    .map_err(|e| TrainError::Config(format!("prompt {}: {e}", first + i)))?
                    .id;
                out[i].push(tok);
                if !stop.contains(&tok) && prompts[i].len() + out[i].len() < max_len {
                    keep.push(r);
                }
            }
            if keep.is_empty() || step + 1 == self.max_new_tokens {
                break;
            }
            cache.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
            let tokens: Vec<u32> = active.iter().map(|&i| out[i][out[i].len() - 1]).collect();
            logits = model.decode_step(&mut cache, &tokens, &self.pass)?;
        }
        Ok(())
    }
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

    /// The trainer tests' tiny decoder with random weights from `seed`.
    fn tiny_model(seed: u64) -> LlamaModel {
        use leaf_adapters::model::{ModelOptions, Trainable};
        let options = ModelOptions {
            dtype: DType::F32,
            device: candle_core::Device::Cpu,
            trainable: Trainable::Full,
            frozen_matmul: false,
        };
        LlamaModel::random(&crate::trainer::tests::tiny(), seed, &options).unwrap()
    }

    #[test]
    fn parallel_batches_give_what_one_after_another_would() {
        let model = tiny_model(7);
        // Eleven prompts of different lengths: batches of 3 are padded differently.
        let prompts: Vec<Vec<u32>> = (0..11u32)
            .map(|i| (0..1 + i % 5).map(|j| (i * 7 + j * 3) % 20 + 1).collect())
            .collect();
        let sample = Decoding::Sample {
            temperature: 1.5,
            top_p: 0.9,
        };
        for decoding in [Decoding::Greedy, sample] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let together =
                generate_completions(&model, &prompts, &[0], &decoding, 12, 3, &mut rng).unwrap();
            // The same seed stream, each batch in its own call (one batch, nothing parallel).
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let apart: Vec<Vec<u32>> = prompts
                .chunks(3)
                .flat_map(|chunk| {
                    generate_completions(&model, chunk, &[0], &decoding, 12, 3, &mut rng).unwrap()
                })
                .collect();
            assert_eq!(together, apart, "{decoding:?}");
            assert!(together.iter().all(|c| !c.is_empty()));
        }
        // A failing batch (an id outside the vocabulary) is an error, not a panic.
        let mut bad = prompts.clone();
        bad[7] = vec![100];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let err = generate_completions(&model, &bad, &[0], &Decoding::Greedy, 4, 3, &mut rng);
        assert!(err.is_err());
    }

    /// Generation over the cache gives what re-running the decoder over the whole sequence for
    /// every new token gives (the reference below, one prompt at a time), greedy and sampled,
    /// including rows that stop early and a row that reaches `max_position_embeddings`.
    #[test]
    fn cached_generation_gives_what_rerunning_the_whole_sequence_would() {
        use candle_core::{Device, IndexOp};
        let model = tiny_model(11);
        let mut prompts: Vec<Vec<u32>> = (0..9u32)
            .map(|i| (0..1 + i % 6).map(|j| (i * 5 + j * 7) % 22 + 1).collect())
            .collect();
        // 60 of the 64 positions: only 4 new tokens fit.
        prompts.push((0..60u32).map(|j| j % 22 + 1).collect());
        let stop = [0u32, 2, 4, 6, 8, 10];
        let reference = |decoding: &Decoding, seed: u64| -> Vec<Vec<u32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let seeds: Vec<u64> = prompts.iter().map(|_| rng.random::<u64>()).collect();
            prompts
                .iter()
                .zip(seeds)
                .map(|(p, s)| {
                    let mut rng = ChaCha8Rng::seed_from_u64(s);
                    let mut out: Vec<u32> = Vec::new();
                    while out.len() < 12 && p.len() + out.len() < 64 {
                        let seq: Vec<u32> = p.iter().chain(&out).copied().collect();
                        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap();
                        let logits = model.forward(&ids, &Pass::BASE).unwrap();
                        let last: Vec<f32> =
                            logits.i((0, seq.len() - 1)).unwrap().to_vec1().unwrap();
                        let tok = pick_token(&last, decoding, &mut rng).unwrap().id;
                        out.push(tok);
                        if stop.contains(&tok) {
                            break;
                        }
                    }
                    out
                })
                .collect()
        };
        let sample = Decoding::Sample {
            temperature: 1.2,
            top_p: 0.95,
        };
        for decoding in [Decoding::Greedy, sample] {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let got =
                generate_completions(&model, &prompts, &stop, &decoding, 12, 4, &mut rng).unwrap();
            assert_eq!(got, reference(&decoding, 9), "{decoding:?}");
            assert!(got[9].len() <= 4, "the long prompt fills the positions");
            assert!(
                got.iter()
                    .any(|c| c.len() < 12 && stop.contains(c.last().unwrap())),
                "some rows stop early"
            );
        }
    }
}
