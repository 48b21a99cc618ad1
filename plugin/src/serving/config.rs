//! [`ServerConfig`]: everything [`LeafServer::start`] needs, and the sampling defaults.

use std::path::PathBuf;

use leaf_adapters::validate::Limits;
use serde::{Deserialize, Serialize};

use super::group_policy::GroupPolicy;
use super::limits::RequestLimits;
#[cfg(doc)]
use super::server::LeafServer;
use super::ServeError;
use crate::harvest::reward::RewardRange;
use crate::harvest::AssemblerConfig;

/// Sampling used when a request does not say (the spec's: temperature 1, top-p 0.9, 200 new
/// tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

/// Everything [`LeafServer::start`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The base model directory.
    pub model_dir: PathBuf,
    /// The versioned adapter store; its current version is served at start.
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// A unit codebook (for audio prompts), as written by the speech front-end.
    #[serde(default)]
    pub unit_codebook: Option<PathBuf>,
    /// Most sequences the scheduler batches. Default 16.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
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
    /// Most swaps in one process (each leaks one idle engine thread). Default 4096.
    #[serde(default = "default_max_swaps")]
    pub max_swaps: u64,
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

impl ServerConfig {
    /// A configuration with every default for the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            model_dir: model_dir.into(),
            store_dir: None,
            unit_codebook: None,
            max_batch: default_batch(),
            sampling: SamplingDefaults::default(),
            assembler: AssemblerConfig::default(),
            group_policy: GroupPolicy::default(),
            drain_timeout_s: default_drain(),
            max_swaps: default_max_swaps(),
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
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ServeError::Request(format!(
            "temperature {temperature} must be in [0, 100]"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServeError::Request(format!(
            "top_p {top_p} must be in (0, 1]"
        )));
    }
    Ok(())
}
