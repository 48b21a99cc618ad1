//! The speech workload: discrete units, the text tokenizer, spoken-digit tasks, augmentation.
//!
//! Audio becomes unit tokens that sit in the prompt of an ordinary Llama-family model:
//! [`units::UnitEncoder`] turns a WAV file into unit ids, [`tokenizer::SpeechTokenizer`] turns
//! an instruction plus units into the prompt ids mistral.rs computes for the same chat request,
//! [`tasks`] generates the recognition, translation and spoken-QA examples from recordings, and
//! [`prepare::ExampleEncoder`] turns examples into prompt and answer ids (with augmentation).

pub mod augment;
pub mod eval;
pub mod numbers;
pub mod prepare;
pub mod pretrain;
#[cfg(feature = "serve")]
pub mod serve;
pub mod tasks;
pub mod tokenizer;
pub mod units;

pub use augment::{AugmentConfig, Augmenter};
pub use prepare::{EncodedExample, ExampleEncoder};
#[cfg(feature = "serve")]
pub use serve::serve_audio_encoder;
pub use tasks::{Clip, Corpus, Example, Split, TaskConfig, TaskFamily, TaskKind};
pub use tokenizer::{ChatMessage, ContentPart, SpecialIds, SpeechTokenizer};
pub use units::{collapse, Codebook, KMeansConfig, UnitEncoder};

use std::path::PathBuf;

use crate::audio::AudioError;

/// The speech workload failed.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// The recordings directory is missing, empty or inconsistent.
    #[error("recordings in {path}: {reason}")]
    Data {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An example names a recording the corpus does not have.
    #[error("no recording of digit {digit} by {speaker}, take {take}")]
    MissingClip {
        /// The digit.
        digit: u8,
        /// The speaker.
        speaker: String,
        /// The take.
        take: u32,
    },
    /// One recording could not be decoded or featurised.
    #[error("{path}: {source}")]
    ClipAudio {
        /// The recording.
        path: PathBuf,
        /// Why.
        source: AudioError,
    },
    /// Audio failed (decoding, resampling, features).
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// The unit codebook could not be fitted, read or applied.
    #[error("unit codebook: {0}")]
    Codebook(String),
    /// The text tokenizer or its configuration is invalid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
