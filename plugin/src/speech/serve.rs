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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::{write_wav_pcm16, Audio, FrontEndConfig};
    use crate::speech::Codebook;

    fn codebook(path: &Path) {
        let fe = FrontEndConfig::default();
        let k = 4;
        let centroids = (0..k * fe.n_mels).map(|i| (i % 7) as f32 - 3.0).collect();
        Codebook::from_centroids(centroids, k, fe, 2)
            .unwrap()
            .save(path)
            .unwrap();
    }

    #[test]
    fn the_model_directory_codebook_is_used_unless_one_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        // No codebook anywhere: no encoder (audio parts get a 400).
        assert!(serve_audio_encoder(&model, None).unwrap().is_none());
        // The bundled one.
        codebook(&model.join(CODEBOOK_FILE));
        let enc = serve_audio_encoder(&model, None).unwrap().expect("bundled");
        let audio = Audio::new(
            (0..16_000)
                .map(|i| ((i as f32) * 0.05).sin() * 0.3)
                .collect(),
            16_000,
        )
        .unwrap();
        let wav = write_wav_pcm16(&audio).unwrap();
        let expect = UnitEncoder::load(&model.join(CODEBOOK_FILE))
            .unwrap()
            .units_from_wav(&wav)
            .unwrap();
        assert!(!expect.is_empty());
        assert_eq!(enc.encode(&wav).unwrap(), AudioPrompt::Units(expect));
        // Bad audio is an error, not a panic.
        assert!(enc.encode(b"not a wav").is_err());
        // An explicit codebook wins; a missing one is an error naming it.
        let missing = dir.path().join("missing.json");
        let e = serve_audio_encoder(&model, Some(&missing)).unwrap_err();
        assert!(format!("{e:#}").contains("missing.json"), "{e:#}");
    }
}
