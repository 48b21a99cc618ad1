//! The spoken-digit front-end as the server's [`AudioEncoder`]: a WAV part becomes its
//! collapsed unit ids, which the model's chat template renders as unit tokens.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::units::{UnitEncoder, CODEBOOK_FILE};
use crate::serving::{AudioEncodeError, AudioEncoder, AudioPrompt};

impl AudioEncoder for UnitEncoder {
    fn encode(&self, audio: &[u8]) -> Result<AudioPrompt, AudioEncodeError> {
        Ok(AudioPrompt::Units(self.units_from_wav(audio)?))
    }
}

/// The audio encoder `leaf serve` uses (a [`crate::serving::cli::AudioEncoderLoader`]): the
/// codebook `units` when given, else the model directory's own `units.json` when present,
/// else none (audio parts are then refused with a 400).
pub fn serve_audio_encoder(
    model_dir: &Path,
    units: Option<&Path>,
) -> anyhow::Result<Option<Arc<dyn AudioEncoder>>> {
    let bundled = model_dir.join(CODEBOOK_FILE);
    let path = match units {
        Some(p) => p.to_path_buf(),
        None if bundled.is_file() => bundled,
        None => return Ok(None),
    };
    let encoder = UnitEncoder::load(&path)
        .with_context(|| format!("loading the unit codebook {}", path.display()))?;
    Ok(Some(Arc::new(encoder)))
}
