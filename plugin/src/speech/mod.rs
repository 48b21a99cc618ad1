//! The speech workload: unit codebook, tokenizer, spoken-digit tasks (being written).

/// The speech workload failed.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// Placeholder until the workload lands.
    #[error("speech: {0}")]
    Other(String),
}
