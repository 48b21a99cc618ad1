//! [`AudioEncoder`]: the seam between serving and a speech front-end. Serving hands it the
//! bytes of an audio part (a WAV file) and puts what comes back into the prompt; it knows
//! nothing else about audio. The unit codebook of the spoken-digit workload (the `speech`
//! feature's `UnitEncoder`) is one implementation; a model that reads audio another way brings
//! its own.

use std::fmt;

/// What an audio part becomes in the prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioPrompt {
    /// Unit ids, rendered by the model's chat template (an `audio` part with `units`).
    Units(Vec<u32>),
    /// Text put in place of the audio (a transcript, or the model's own audio tokens spelled
    /// out).
    Text(String),
}

/// Why an audio part could not be encoded (shown to the client as a 400).
pub type AudioEncodeError = Box<dyn std::error::Error + Send + Sync>;

/// Turns one audio part into prompt content. Called on the blocking pool (it may take
/// milliseconds to seconds of CPU), from several threads at once.
pub trait AudioEncoder: Send + Sync + fmt::Debug {
    /// Encodes the audio file `audio` (the bytes a client sent; WAV for the built-in
    /// front-end). Bad input is an error naming what was wrong, never a panic.
    fn encode(&self, audio: &[u8]) -> Result<AudioPrompt, AudioEncodeError>;
}
