//! Audio front-end: WAV decoding, resampling, log-mel features (being written).

/// Bad audio.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// Placeholder until the front-end lands.
    #[error("audio: {0}")]
    Other(String),
}
