//! Harvesting live traffic: the sampling tap, harvested samples, rewards and group assembly.
//!
//! * [`tap`]: the per-request sampling tap (exact ids and natural-log probs, cancellation).
//! * [`HarvestedSample`]: what one served completion leaves behind for training.
//! * [`reward`]: where rewards come from ([`RewardSource`]: a reference scored with a
//!   [`crate::reward::Metric`], or later feedback by request id).
//! * [`groups`]: [`GroupAssembler`] collects samples of the same prompt into groups and seals
//!   them onto a bounded channel for the online trainer, never blocking the serving path.

pub mod groups;
pub mod liveness;
pub mod reward;
pub mod tap;

pub use groups::{AssemblerConfig, AssemblerStats, GroupAssembler, SealedGroup};
pub use liveness::{TrainerLiveness, TrainerState, TrainerStatus};
pub use reward::{ReferenceReward, RewardContext, RewardSource};
pub use tap::{SamplerPlacement, SamplingTap, TapConfig, TapRecord};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Harvesting failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HarvestError {
    /// Feedback named a request the harvester does not hold (never seen, already sealed into
    /// a group, or expired).
    #[error("unknown request id {request_id:?} (never served, already sealed, or expired)")]
    UnknownRequest {
        /// The id that was given.
        request_id: String,
    },
    /// A reward is NaN or infinite.
    #[error("reward {value} for request {request_id:?} is not finite")]
    BadReward {
        /// The request.
        request_id: String,
        /// The value.
        value: f64,
    },
    /// A configuration value is out of range; the message names it.
    #[error("harvest config: {0}")]
    Config(String),
}

/// Why a sample was drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleOrigin {
    /// A client's request.
    User,
    /// An extra sample of a client's prompt drawn in the background by the group policy.
    Fork,
}

/// What to keep of each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Keep the completion text and the reference with the sample.
    #[default]
    Full,
    /// Keep only token ids, log-probs and rewards: the text and the reference are dropped as
    /// soon as the reward is computed, and no audio is ever stored.
    IdsOnly,
}

/// One served completion, as training needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarvestedSample {
    /// The request id (what feedback refers to).
    pub request_id: String,
    /// Hash of the prompt ids: samples with the same key answer the same prompt.
    pub prompt_key: String,
    /// The prompt ids the model saw.
    pub prompt_ids: Vec<u32>,
    /// The generated ids, cut at the response's `usage.completion_tokens`.
    pub completion_ids: Vec<u32>,
    /// Natural-log probability of each generated id under the distribution it was drawn from.
    pub logprobs: Vec<f64>,
    /// The adapter version that produced it.
    pub adapter_version: String,
    /// The engine (`policy@k`) that served it.
    pub engine_id: String,
    /// Why it was drawn.
    pub origin: SampleOrigin,
    /// The finish reason reported to the client.
    pub finish_reason: String,
    /// When the request was accepted, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// When the final response arrived, ms since the Unix epoch.
    pub finished_unix_ms: u64,
    /// The completion text ([`PrivacyMode::Full`] only).
    pub text: Option<String>,
    /// The reference answer attached to the request ([`PrivacyMode::Full`] only).
    pub reference: Option<String>,
    /// The reference answer as the ids the model would generate for it (the answer's tokens,
    /// then the end of the turn), harvested when the assembler's `reference_ids` is on: what
    /// reference guidance trains on, so it is kept under [`PrivacyMode::IdsOnly`] too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_ids: Option<Vec<u32>>,
    /// The task name attached to the request, if any.
    pub task: Option<String>,
}

/// The key of a prompt: the first 16 bytes of SHA-256 over the ids (little-endian), in hex.
pub fn prompt_key(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    let d = h.finalize();
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_key_depends_on_ids_only() {
        assert_eq!(prompt_key(&[1, 2, 3]), prompt_key(&[1, 2, 3]));
        assert_ne!(prompt_key(&[1, 2, 3]), prompt_key(&[1, 2, 4]));
        assert_ne!(prompt_key(&[1, 2]), prompt_key(&[1, 2, 0]));
        assert_eq!(prompt_key(&[]).len(), 32);
    }
}
