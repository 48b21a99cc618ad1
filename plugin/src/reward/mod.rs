//! Rewards: sentence BLEU, chrF, WER/CER and exact match (being written).

/// A reward could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// Placeholder until the metrics land.
    #[error("reward: {0}")]
    Other(String),
}
