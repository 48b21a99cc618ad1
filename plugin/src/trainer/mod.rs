//! The LoRA update: PPO-clip + k3 KL loss, Adam, schedule (being written).

/// Training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Placeholder until the trainer lands.
    #[error("train: {0}")]
    Other(String),
}
