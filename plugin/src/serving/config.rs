//! [`ServerConfig`]: everything [`LeafServer::start`] needs, the sampling defaults and the
//! device (a [`ComputeDevice`], the trainer's type).

use std::path::PathBuf;
use std::sync::Arc;

use leaf_adapters::validate::Limits;
use serde::{Deserialize, Serialize};

use super::audio::AudioEncoder;
use super::group_policy::GroupPolicy;
use super::limits::RequestLimits;
#[cfg(doc)]
use super::server::LeafServer;
use super::ServeError;
use crate::device::ComputeDevice;
use crate::harvest::reward::RewardRange;
use crate::harvest::AssemblerConfig;

/// Sampling used when a request does not say (the spec's: temperature 1, top-p 0.9, 200 new
/// tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SamplingDefaults {
    /// Temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Most new tokens.
    pub max_tokens: usize,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults {
            temperature: 1.0,
            top_p: 0.9,
            max_tokens: 200,
        }
    }
}

/// How requests enter a mistral.rs engine.
///
/// mistral.rs 0.8.1 decodes with the wrong KV cache when a prompt step runs between two
/// decoding steps of the same set of sequences: its engine loop only reloads the sequences'
/// caches when that set changes (`engine/mod.rs`, `last_completion_ids`), and a prompt step
/// overwrites the pipeline's cache in between. A request that arrives while others decode
/// therefore corrupts their next tokens. Measured on the tiny test model
/// (`integration-tests/tests/tap_concurrency.rs`): the served log-probs differ from the model's
/// by up to 3-5 nats per token with 4 overlapping clients, and by 6e-6 one request at a time.
/// The answers people get are drawn from that corrupted distribution, and a learner trained
/// on them learns from samples whose recorded log-probs are wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineAdmission {
    /// One request in an engine at a time (the default): every served token comes from the
    /// model itself, at the cost of batching.
    #[default]
    Serial,
    /// Requests overlap and batch (mistral.rs's own behaviour): more throughput, but overlapping
    /// requests decode with the wrong KV cache (see above). Only for engines known to be free
    /// of this bug.
    Concurrent,
}

/// Everything [`LeafServer::start`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The base model directory.
    pub model_dir: PathBuf,
    /// The versioned adapter store; its current version is served at start.
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// What turns audio parts into prompt content (for example the spoken-digit unit
    /// codebook of the `speech` feature, `UnitEncoder`). Not part of the JSON form: set it in code
    /// (`leaf serve` uses the model directory's `units.json`, or `--units`). Without one, audio
    /// parts are refused.
    #[serde(skip)]
    pub audio_encoder: Option<Arc<dyn AudioEncoder>>,
    /// Where the model runs: `cpu` (the default), `cuda:N` (a build with the `cuda`
    /// feature) or `metal:N` (the `metal` feature). [`LeafServer::start`] opens it first and
    /// refuses a device this build cannot use; every version is loaded onto it.
    #[serde(default)]
    pub device: ComputeDevice,
    /// Most sequences the scheduler batches. Default 16.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Whether requests may overlap inside one engine; see [`EngineAdmission`]. Default
    /// `serial`.
    #[serde(default)]
    pub engine_admission: EngineAdmission,
    /// Default sampling.
    #[serde(default)]
    pub sampling: SamplingDefaults,
    /// Group assembly.
    #[serde(default)]
    pub assembler: AssemblerConfig,
    /// Extra samples of live prompts.
    #[serde(default)]
    pub group_policy: GroupPolicy,
    /// Longest wait for a retired engine's in-flight requests, in seconds. Default 600.
    #[serde(default = "default_drain")]
    pub drain_timeout_s: f64,
    /// Most engines added in one process beyond the first (each leaks one idle thread; see
    /// [`super::restart`]); past it forward swaps are refused, rollbacks never. Default 4096.
    #[serde(default = "default_max_swaps")]
    pub max_swaps: u64,
    /// After this many engines, [`LeafServer::recycle_requested`] fires and `leaf serve`
    /// restarts itself in place (see [`super::restart`]), which bounds what swaps leak. 0:
    /// never. Default 64.
    #[serde(default = "default_recycle")]
    pub recycle_after_engines: u64,
    /// Adapter size limits.
    #[serde(default)]
    pub limits: Limits,
    /// The rewards [`LeafServer::feedback`] accepts. Default [0, 1].
    #[serde(default)]
    pub feedback_reward_range: RewardRange,
    /// Caps the HTTP layer applies to chat requests (see [`super::limits`]).
    #[serde(default)]
    pub request_limits: RequestLimits,
}

fn default_batch() -> usize {
    16
}

fn default_drain() -> f64 {
    600.0
}

fn default_max_swaps() -> u64 {
    4096
}
fn default_recycle() -> u64 {
    64
}

impl ServerConfig {
    /// A configuration with every default for the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            model_dir: model_dir.into(),
            store_dir: None,
            audio_encoder: None,
            device: ComputeDevice::Cpu,
            max_batch: default_batch(),
            engine_admission: EngineAdmission::default(),
            sampling: SamplingDefaults::default(),
            assembler: AssemblerConfig::default(),
            group_policy: GroupPolicy::default(),
            drain_timeout_s: default_drain(),
            max_swaps: default_max_swaps(),
            recycle_after_engines: default_recycle(),
            limits: Limits::default(),
            feedback_reward_range: RewardRange::default(),
            request_limits: RequestLimits::default(),
        }
    }

    pub(super) fn check(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.max_batch == 0 {
            return bad("max_batch must be positive".into());
        }
        check_sampling(self.sampling.temperature, self.sampling.top_p)?;
        if self.sampling.max_tokens == 0 {
            return bad("sampling.max_tokens must be positive".into());
        }
        let p = &self.group_policy;
        if !(0.0..=1.0).contains(&p.fork_fraction) {
            return bad(format!(
                "group_policy.fork_fraction {} must be in [0, 1]",
                p.fork_fraction
            ));
        }
        if p.background_concurrency == 0 {
            return bad("group_policy.background_concurrency must be positive".into());
        }
        if !(self.drain_timeout_s.is_finite() && self.drain_timeout_s >= 0.0) {
            return bad(format!(
                "drain_timeout_s {} is invalid",
                self.drain_timeout_s
            ));
        }
        self.assembler.check()?;
        self.feedback_reward_range
            .check()
            .map_err(ServeError::Config)?;
        self.request_limits.check().map_err(ServeError::Config)?;
        if self.sampling.max_tokens > self.request_limits.max_tokens {
            return bad(format!(
                "sampling.max_tokens {} is above request_limits.max_tokens {}",
                self.sampling.max_tokens, self.request_limits.max_tokens
            ));
        }
        Ok(())
    }
}

pub(super) fn check_sampling(temperature: f64, top_p: f64) -> Result<(), ServeError> {
    crate::sampling::SamplingParams::new(temperature, top_p)
        .map(|_| ())
        .map_err(|e| ServeError::Request(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_comes_from_json_and_defaults_to_the_cpu() {
        let c: ServerConfig =
            serde_json::from_str(r#"{"model_dir": "m", "device": "cuda:2"}"#).unwrap();
        assert_eq!(c.device, ComputeDevice::Cuda(2));
        let c: ServerConfig =
            serde_json::from_str(r#"{"model_dir": "m", "device": "metal"}"#).unwrap();
        assert_eq!(c.device, ComputeDevice::Metal(0));
        let e = serde_json::from_str::<ServerConfig>(r#"{"model_dir": "m", "device": "tpu"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("tpu"), "{e}");
        assert_eq!(ServerConfig::new("m").device, ComputeDevice::Cpu);
        let c: ServerConfig = serde_json::from_str(r#"{"model_dir": "m"}"#).unwrap();
        assert_eq!(c.device, ComputeDevice::Cpu);
    }
}
