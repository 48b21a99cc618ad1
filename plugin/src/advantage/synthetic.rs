//! Deterministic synthetic groups for tests, benchmarks and demos.
//!
//! Responses share prefixes the way sampled responses do: each one copies a prefix of an
//! earlier response and then diverges, with a surprising token where it diverges.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::rollout::{Group, Rollout};

/// Shape of a synthetic group.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticSpec {
    /// Responses per group (K).
    pub responses: usize,
    /// Mean response length in tokens; lengths vary by up to a quarter either side.
    pub mean_len: usize,
    /// Vocabulary size of the token ids.
    pub vocab: u32,
    /// Distinct reward levels (rewards are `level / (levels - 1)`); 0 for continuous rewards.
    pub reward_levels: u32,
}

/// A group drawn from `spec` with `seed`; the same arguments always give the same group.
pub fn synthetic_group(id: impl Into<String>, spec: SyntheticSpec, seed: u64) -> Group {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rollouts: Vec<Rollout> = Vec::with_capacity(spec.responses);
    for i in 0..spec.responses {
        let spread = spec.mean_len / 4;
        let len = if spread > 0 {
            rng.random_range(spec.mean_len - spread..=spec.mean_len + spread)
        } else {
            spec.mean_len
        };
        let mut tokens = Vec::with_capacity(len);
        let mut logprobs = Vec::with_capacity(len);
        if i > 0 && rng.random_bool(0.8) {
            let parent = &rollouts[rng.random_range(0..i)];
            let shared = rng.random_range(0..=parent.len().min(len));
            tokens.extend_from_slice(&parent.tokens[..shared]);
            logprobs.extend_from_slice(&parent.logprobs[..shared]);
        }
        let diverge = tokens.len();
        while tokens.len() < len {
            tokens.push(rng.random_range(0..spec.vocab.max(1)));
            let lp = if tokens.len() - 1 == diverge {
                -rng.random_range(2.0..8.0)
            } else {
                -rng.random_range(0.0..1.5)
            };
            logprobs.push(lp);
        }
        let reward = if spec.reward_levels >= 2 {
            f64::from(rng.random_range(0..spec.reward_levels)) / f64::from(spec.reward_levels - 1)
        } else {
            rng.random_range(0.0..1.0)
        };
        rollouts.push(Rollout::new(tokens, logprobs, reward));
    }
    Group::new(id, rollouts).expect("synthetic rollouts are valid by construction")
}
