//! Audio front-end: WAV decoding, resampling to 16 kHz, log-mel features and per-utterance
//! normalisation.
//!
//! The one object most callers need is [`FrontEnd`]: build it once (it plans the FFT and
//! precomputes the window and the mel filterbank), then call [`FrontEnd::features_from_wav`]
//! per request. It is `Send + Sync`, so one instance can serve every thread.
//!
//! ```no_run
//! use leaf_plugin::audio::{FrontEnd, FrontEndConfig};
//! let front = FrontEnd::new(FrontEndConfig::default())?;
//! let bytes = std::fs::read("7_george_3.wav").unwrap();
//! let features = front.features_from_wav(&bytes)?;
//! assert_eq!(features.dims(), 80);
//! # Ok::<(), leaf_plugin::audio::AudioError>(())
//! ```

mod features;
mod mel;
mod resample;
mod wav;

pub use features::{normalise, Features, Normalisation};
pub use mel::{hz_to_mel, mel_to_hz, FrontEnd, FrontEndConfig, MelFilterbank};
pub use resample::resample;
pub use wav::{decode_wav, read_wav, wav_seconds, write_wav_pcm16, Audio, DEFAULT_MAX_SECONDS};

/// The sample rate every feature is computed at.
pub const SAMPLE_RATE: u32 = 16_000;

pub use crate::wav_header::SAMPLE_RATE_RANGE;

/// Bad audio, or a front-end configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The bytes are not a WAV file hound can read (no RIFF/WAVE header, truncated chunks, ...).
    #[error("not a readable WAV file: {0}")]
    NotWav(String),
    /// A WAV encoding this front-end does not decode.
    #[error("unsupported WAV encoding: {0}")]
    Unsupported(String),
    /// The audio holds no samples.
    #[error("the audio is empty (zero samples)")]
    Empty,
    /// The audio is longer than the configured limit.
    #[error("the audio lasts {seconds:.2} s, longer than the limit of {limit:.2} s")]
    TooLong {
        /// Duration of the audio in seconds.
        seconds: f64,
        /// The configured limit in seconds.
        limit: f64,
    },
    /// A sample is NaN or infinite.
    #[error("sample {index} is not a finite number ({value})")]
    NonFinite {
        /// Index of the first bad sample (after down-mixing, in frames).
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// A sample rate outside [`SAMPLE_RATE_RANGE`].
    #[error("sample rate {0} Hz is outside the supported range 1000..=384000 Hz")]
    SampleRate(u32),
    /// The WAV data ended early or could not be read.
    #[error("reading WAV samples failed: {0}")]
    Truncated(String),
    /// Resampling failed inside rubato.
    #[error("resampling {from} Hz -> {to} Hz failed: {reason}")]
    Resample {
        /// Input rate.
        from: u32,
        /// Output rate.
        to: u32,
        /// What rubato reported.
        reason: String,
    },
    /// A front-end configuration value is invalid.
    #[error("invalid front-end configuration: {0}")]
    Config(String),
    /// Features have an unexpected shape (e.g. a codebook built for other features).
    #[error("feature shape mismatch: {0}")]
    Shape(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<crate::wav_header::WavHeaderError> for AudioError {
    fn from(e: crate::wav_header::WavHeaderError) -> Self {
        use crate::wav_header::WavHeaderError as H;
        match e {
            H::NotWav(m) => AudioError::NotWav(m),
            H::Unsupported(m) => AudioError::Unsupported(m),
            H::SampleRate(r) => AudioError::SampleRate(r),
        }
    }
}
