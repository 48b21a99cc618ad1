//! Synthetic training setups for benchmarks (`leaf bench-train`, `benches/train_step.rs`): a
//! randomly initialised Llama-family model of a given shape and random samples for it.

use candle_core::{DType, Device};
use leaf_adapters::model::{LlamaModel, LoraOptions, ModelOptions, Trainable};
use leaf_adapters::LlamaConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{TrainConfig, TrainError, TrainSample, Trainer};

/// The shape of a synthetic training step.
#[derive(Debug, Clone)]
pub struct BenchShape {
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (prompt + completion).
    pub seq: usize,
    /// Prompt tokens per sequence (the rest is the completion that is trained on).
    pub prompt_len: usize,
    /// LoRA rank (alpha is twice the rank, as in the spec's 64/128).
    pub rank: usize,
    /// LoRA dropout.
    pub dropout: f64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Use the frozen-weight matmul (`false`: candle's plain matmul).
    pub frozen_matmul: bool,
    /// Compute dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// Seed of the weights and the samples.
    pub seed: u64,
}

impl BenchShape {
    /// The reference step: 4 layers, d = 256, vocab 1,024, 8 sequences of 128 tokens,
    /// LoRA rank 16 on all seven targets, f32 on the CPU.
    pub fn reference() -> Self {
        BenchShape {
            layers: 4,
            hidden: 256,
            intermediate: default_intermediate(256),
            heads: 4,
            kv_heads: 4,
            vocab: 1024,
            batch: 8,
            seq: 128,
            prompt_len: 16,
            rank: 16,
            dropout: 0.05,
            micro_batch: 8,
            frozen_matmul: true,
            dtype: DType::F32,
            device: Device::Cpu,
            seed: 0,
        }
    }

    /// The model's `config.json`.
    pub fn model_config(&self) -> LlamaConfig {
        LlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            hidden_act: "silu".into(),
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            vocab_size: self.vocab,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: self.seq.max(2048),
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            model_type: "llama".into(),
            torch_dtype: "float32".into(),
            ..LlamaConfig::default()
        }
    }

    /// The trainer's configuration: spec defaults, LoRA rank/alpha/dropout and micro-batch
    /// from the shape.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            lora: LoraOptions {
                rank: self.rank,
                alpha: 2.0 * self.rank as f64,
                dropout: self.dropout,
                seed: self.seed,
                ..LoraOptions::default()
            },
            micro_batch_size: self.micro_batch,
            ..TrainConfig::default()
        }
    }

    /// A trainer over a randomly initialised model of this shape.
    pub fn trainer(&self) -> Result<Trainer, TrainError> {
        let config = self.train_config();
        let options = ModelOptions {
            dtype: self.dtype,
            device: self.device.clone(),
            trainable: Trainable::Lora(config.lora.clone()),
            frozen_matmul: self.frozen_matmul,
        };
        let model = LlamaModel::random(&self.model_config(), self.seed, &options)?;
        Trainer::new(model, config)
    }

    /// `batch` random samples: uniform token ids, advantages of +-1 per sequence, behaviour
    /// log-probs of a uniform distribution.
    pub fn samples(&self, seed: u64) -> Vec<TrainSample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let prompt_len = self.prompt_len.clamp(1, self.seq.saturating_sub(1).max(1));
        let completion_len = self.seq.saturating_sub(prompt_len).max(1);
        let vocab = u32::try_from(self.vocab).unwrap_or(u32::MAX).max(1);
        (0..self.batch)
            .map(|i| {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                TrainSample {
                    prompt: (0..prompt_len)
                        .map(|_| rng.random_range(0..vocab))
                        .collect(),
                    completion: (0..completion_len)
                        .map(|_| rng.random_range(0..vocab))
                        .collect(),
                    advantages: vec![sign; completion_len],
                    behaviour_logprobs: vec![-(self.vocab as f64).ln(); completion_len],
                    behaviour_version: String::new(),
                    demonstration: false,
                }
            })
            .collect()
    }

    /// Tokens fed per step (`batch * seq`).
    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.seq
    }
}

/// A Llama-style MLP width for model width `d`: `8d/3` rounded up to a multiple of 64.
pub fn default_intermediate(d: usize) -> usize {
    (8 * d / 3).div_ceil(64) * 64
}
