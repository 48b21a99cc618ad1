//! Every knob of the update, with the LEAF spec's defaults.

use leaf_adapters::model::LoraOptions;
use serde::{Deserialize, Serialize};

use super::loss::LossAggregation;
use super::TrainError;
use crate::device::ComputeDevice;

/// When to apply truncated importance weighting (TIS) against the behaviour log-probs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TisMode {
    /// Never: every sample is treated as drawn by the current policy.
    Off,
    /// Only for samples whose `behaviour_version` differs from the trainer's policy version
    /// (samples served by an older adapter). Default.
    Stale,
    /// For every sample (also corrects small serving/training numeric mismatches).
    Always,
}

/// Truncated importance weighting: per token,
/// `w = min(exp(logp_old - logp_behaviour), cap)`, multiplying the policy-gradient term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TisConfig {
    /// When to weight. Default [`TisMode::Stale`].
    pub mode: TisMode,
    /// Upper truncation of the weight. Default 2.0 (the TIS paper's C).
    pub cap: f64,
}

impl Default for TisConfig {
    fn default() -> Self {
        TisConfig {
            mode: TisMode::Stale,
            cap: 2.0,
        }
    }
}

/// Configuration of [`Trainer`](super::Trainer). Deserialises from JSON with every field
/// optional; missing fields take the spec's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// PPO clip range: the ratio is clipped to `[1 - clip_eps, 1 + clip_eps]`. Default 0.2.
    pub clip_eps: f64,
    /// Weight `beta` of the k3 KL penalty to the reference (LoRA off). Default 0.02.
    pub kl_beta: f64,
    /// Peak learning rate. Default 5e-6.
    pub learning_rate: f64,
    /// Adam beta1. Default 0.9.
    pub adam_beta1: f64,
    /// Adam beta2. Default 0.95.
    pub adam_beta2: f64,
    /// Adam epsilon. Default 1e-8.
    pub adam_eps: f64,
    /// Decoupled weight decay (AdamW style). Default 0.
    pub weight_decay: f64,
    /// Length of the cosine schedule in optimizer steps (warm-up included); after it the
    /// learning rate stays at the floor. Default 1000.
    pub total_steps: u64,
    /// Fraction of `total_steps` spent warming up linearly. Default 0.05.
    pub warmup_fraction: f64,
    /// Floor of the cosine decay as a fraction of the peak. Default 0.1.
    pub min_lr_fraction: f64,
    /// Global gradient-norm clip (L2 over every trainable tensor); 0 disables. Default 1.0.
    pub max_grad_norm: f64,
    /// Passes over each batch. With 1 (default) `logp_old` is the detached log-prob of the
    /// same forward pass (ratio 1); with more, `logp_old` comes from an evaluation pass before
    /// the first update.
    pub epochs: usize,
    /// Sequences per forward/backward pass (gradient accumulation across micro-batches).
    /// Default 1, the spec's micro-batch of one sequence.
    pub micro_batch_size: usize,
    /// Multiplier of negative per-token advantages, in `[0, 1]`. 1 (default) is the spec's
    /// objective. Below 1 the update pushes sampled answers that scored below their group's
    /// baseline down less than it pulls the better ones up; 0 is positive-sample
    /// reinforcement (Zhu et al. 2025, "The Surprising Effectiveness of Negative
    /// Reinforcement in LLM Reasoning"): negative samples spread probability over the other
    /// candidates, which lifts pass@k, while positive samples move the mode, which is what
    /// greedy decoding answers with.
    pub negative_weight: f64,
    /// How token terms become the batch loss. Default [`LossAggregation::SequenceMean`], the
    /// spec's.
    pub loss_aggregation: LossAggregation,
    /// Truncated importance weighting against behaviour log-probs.
    pub tis: TisConfig,
    /// LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): the
    /// learning rate of every LoRA B matrix is this multiple of the A matrices' (and of every
    /// other trainable tensor's). 1 (default) is plain LoRA; a larger ratio usually wants a
    /// lower learning rate (the README measures 4 at `leaf run`'s).
    pub lora_plus_ratio: f64,
    /// LoRA: rank 64, alpha 128, dropout 0.05 on q, k, v, o, gate, up, down.
    pub lora: LoraOptions,
    /// Seed of the dropout masks of training passes.
    pub seed: u64,
    /// Where the model trains ([`Trainer::load`](super::Trainer::load) opens it): `cpu`,
    /// `cuda:N` or `metal:N`, the same [`ComputeDevice`] as the server's. Default `cpu`;
    /// `leaf serve --online` trains on the server's device unless this is given.
    pub device: ComputeDevice,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            clip_eps: 0.2,
            kl_beta: 0.02,
            learning_rate: 5e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            total_steps: 1000,
            warmup_fraction: 0.05,
            min_lr_fraction: 0.1,
            max_grad_norm: 1.0,
            epochs: 1,
            micro_batch_size: 1,
            negative_weight: 1.0,
            loss_aggregation: LossAggregation::SequenceMean,
            tis: TisConfig::default(),
            lora_plus_ratio: 1.0,
            lora: LoraOptions::default(),
            seed: 0,
            device: ComputeDevice::Cpu,
        }
    }
}

impl TrainConfig {
    /// Checks every field; the error names the offending one.
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |field: &str, why: String| Err(TrainError::Config(format!("{field}: {why}")));
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !(self.clip_eps.is_finite() && self.clip_eps > 0.0 && self.clip_eps < 1.0) {
            return bad("clip_eps", format!("{} must be in (0, 1)", self.clip_eps));
        }
        if !finite_nonneg(self.kl_beta) {
            return bad(
                "kl_beta",
                format!("{} must be finite and >= 0", self.kl_beta),
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("{} must be positive", self.learning_rate),
            );
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, format!("{v} must be in [0, 1)"));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return bad("adam_eps", format!("{} must be positive", self.adam_eps));
        }
        if !finite_nonneg(self.weight_decay) {
            return bad(
                "weight_decay",
                format!("{} must be finite and >= 0", self.weight_decay),
            );
        }
        if self.total_steps == 0 {
            return bad("total_steps", "must be positive".into());
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return bad(
                "warmup_fraction",
                format!("{} must be in [0, 1)", self.warmup_fraction),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_fraction) {
            return bad(
                "min_lr_fraction",
                format!("{} must be in [0, 1]", self.min_lr_fraction),
            );
        }
        if !finite_nonneg(self.max_grad_norm) {
            return bad(
                "max_grad_norm",
                format!("{} must be finite and >= 0", self.max_grad_norm),
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be positive".into());
        }
        if self.micro_batch_size == 0 {
            return bad("micro_batch_size", "must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.negative_weight) {
            return bad(
                "negative_weight",
                format!("{} must be in [0, 1]", self.negative_weight),
            );
        }
        if !(self.lora_plus_ratio.is_finite() && self.lora_plus_ratio > 0.0) {
            return bad(
                "lora_plus_ratio",
                format!("{} must be positive and finite", self.lora_plus_ratio),
            );
        }
        if !(self.tis.cap.is_finite() && self.tis.cap > 0.0) {
            return bad("tis.cap", format!("{} must be positive", self.tis.cap));
        }
        self.lora
            .check()
            .map_err(|why| TrainError::Config(format!("lora: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_specs() {
        let c = TrainConfig::default();
        assert_eq!(c.clip_eps, 0.2);
        assert_eq!(c.kl_beta, 0.02);
        assert_eq!(c.learning_rate, 5e-6);
        assert_eq!((c.adam_beta1, c.adam_beta2), (0.9, 0.95));
        assert_eq!(c.weight_decay, 0.0);
        assert_eq!(c.warmup_fraction, 0.05);
        assert_eq!(c.min_lr_fraction, 0.1);
        assert_eq!(c.max_grad_norm, 1.0);
        assert_eq!(c.negative_weight, 1.0);
        assert_eq!(
            (c.lora.rank, c.lora.alpha, c.lora.dropout),
            (64, 128.0, 0.05)
        );
        assert_eq!(
            c.lora.target_modules,
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
        );
        c.check().unwrap();
    }

    #[test]
    fn empty_json_gives_defaults_and_fields_override() {
        let c: TrainConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, TrainConfig::default());
        let c: TrainConfig = serde_json::from_str(
            r#"{"kl_beta": 0.1, "lora": {"rank": 8}, "tis": {"mode": "always"}}"#,
        )
        .unwrap();
        assert_eq!(c.kl_beta, 0.1);
        assert_eq!(c.lora.rank, 8);
        assert_eq!(c.lora.alpha, 128.0);
        assert_eq!(c.tis.mode, TisMode::Always);
        assert_eq!(c.tis.cap, 2.0);
        let round: TrainConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn the_device_is_a_string_and_a_missing_back_end_is_a_config_error() {
        let c: TrainConfig = serde_json::from_str(r#"{"device": "cuda:3"}"#).unwrap();
        assert_eq!(c.device, ComputeDevice::Cuda(3));
        assert_eq!(
            serde_json::to_value(&c).unwrap()["device"],
            serde_json::json!("cuda:3")
        );
        assert!(serde_json::from_str::<TrainConfig>(r#"{"device": "tpu"}"#).is_err());
        let err = TrainError::from(crate::device::DeviceError::NotCompiled {
            device: ComputeDevice::Cuda(0),
            feature: "cuda",
        });
        assert!(matches!(err, TrainError::Config(_)), "{err}");
        assert!(err.to_string().contains("leaf-plugin/cuda"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<TrainConfig>(r#"{"kl_bta": 0.1}"#).is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        type Mutation = fn(&mut TrainConfig);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.clip_eps = 0.0, "clip_eps"),
            (|c| c.kl_beta = f64::NAN, "kl_beta"),
            (|c| c.learning_rate = -1.0, "learning_rate"),
            (|c| c.adam_beta2 = 1.0, "adam_beta2"),
            (|c| c.total_steps = 0, "total_steps"),
            (|c| c.warmup_fraction = 1.0, "warmup_fraction"),
            (|c| c.min_lr_fraction = 1.5, "min_lr_fraction"),
            (|c| c.max_grad_norm = -1.0, "max_grad_norm"),
            (|c| c.micro_batch_size = 0, "micro_batch_size"),
            (|c| c.tis.cap = 0.0, "tis.cap"),
            (|c| c.negative_weight = 1.5, "negative_weight"),
            (|c| c.negative_weight = f64::NAN, "negative_weight"),
            (|c| c.lora.rank = 0, "lora"),
        ];
        for (mutate, field) in cases {
            let mut c = TrainConfig::default();
            mutate(&mut c);
            let err = c.check().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
