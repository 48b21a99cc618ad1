//! WAV decoding with `hound`: PCM 8/16/24/32-bit and 32-bit float, any channel count
//! down-mixed to mono, samples scaled to [-1, 1].

use std::io::Cursor;
use std::path::Path;

use super::AudioError;

/// Default limit on the duration of decoded audio, in seconds.
pub const DEFAULT_MAX_SECONDS: f64 = 30.0;

/// Mono audio: samples in [-1, 1] at `sample_rate` Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    samples: Vec<f32>,
    sample_rate: u32,
}

impl Audio {
    /// Wraps mono samples, checking that there is at least one, that all are finite and that
    /// the rate is within [`super::SAMPLE_RATE_RANGE`].
    pub fn new(samples: Vec<f32>, sample_rate: u32) -> Result<Self, AudioError> {
        check_rate(sample_rate)?;
        if samples.is_empty() {
            return Err(AudioError::Empty);
        }
        if let Some((index, &value)) = samples.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(AudioError::NonFinite { index, value });
        }
        Ok(Self {
            samples,
            sample_rate,
        })
    }

    /// The samples (mono).
    pub fn samples(&self) -> &[f32] {
        &self.samples
    }

    /// Consumes the audio, returning its samples.
    pub fn into_samples(self) -> Vec<f32> {
        self.samples
    }

    /// Sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Always false: an [`Audio`] holds at least one sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Fails with [`AudioError::TooLong`] when longer than `max_seconds`.
    pub fn check_duration(&self, max_seconds: f64) -> Result<(), AudioError> {
        let seconds = self.seconds();
        if seconds > max_seconds {
            return Err(AudioError::TooLong {
                seconds,
                limit: max_seconds,
            });
        }
        Ok(())
    }
}

pub(crate) fn check_rate(rate: u32) -> Result<(), AudioError> {
    Ok(crate::wav_header::check_rate(rate)?)
}

fn hound_error(e: hound::Error) -> AudioError {
    crate::wav_header::hound_error(e).into()
}

/// Duration in seconds of a WAV file held in memory, read from its header only (no sample is
/// decoded); [`crate::wav_header::wav_seconds`] with this module's error.
pub fn wav_seconds(bytes: &[u8]) -> Result<f64, AudioError> {
    Ok(crate::wav_header::wav_seconds(bytes)?)
}

/// Decodes a WAV file held in memory to mono `f32` audio.
///
/// Integer PCM of 8, 16, 24 or 32 bits is scaled by `2^(bits-1)`; 32-bit float is taken as is.
/// Several channels are averaged. The duration is checked against `max_seconds` from the header
/// before any sample is decoded, so a huge file costs nothing.
pub fn decode_wav(bytes: &[u8], max_seconds: f64) -> Result<Audio, AudioError> {
    let mut reader = hound::WavReader::new(Cursor::new(bytes)).map_err(hound_error)?;
    let spec = reader.spec();
    check_rate(spec.sample_rate)?;
    let channels = usize::from(spec.channels);
    if channels == 0 {
        return Err(AudioError::Unsupported("zero channels".into()));
    }
    let frames = reader.duration() as usize;
    if frames == 0 {
        return Err(AudioError::Empty);
    }
    let seconds = frames as f64 / f64::from(spec.sample_rate);
    if seconds > max_seconds {
        return Err(AudioError::TooLong {
            seconds,
            limit: max_seconds,
        });
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(read_error)?,
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f64;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| (f64::from(v) * scale) as f32))
                .collect::<Result<_, _>>()
                .map_err(read_error)?
        }
        (format, bits) => {
            return Err(AudioError::Unsupported(format!(
                "{bits}-bit {}",
                match format {
                    hound::SampleFormat::Float => "float",
                    hound::SampleFormat::Int => "integer PCM",
                }
            )))
        }
    };
    if interleaved.len() < frames * channels {
        return Err(AudioError::Truncated(format!(
            "header promises {} samples, data holds {}",
            frames * channels,
            interleaved.len()
        )));
    }
    let mono: Vec<f32> = if channels == 1 {
        interleaved
    } else {
        let inv = 1.0 / channels as f32;
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * inv)
            .collect()
    };
    Audio::new(mono, spec.sample_rate)
}

fn read_error(e: hound::Error) -> AudioError {
    match e {
        hound::Error::IoError(io) => AudioError::Truncated(io.to_string()),
        other => hound_error(other),
    }
}

/// Reads and decodes a WAV file from disk (see [`decode_wav`]).
pub fn read_wav(path: &Path, max_seconds: f64) -> Result<Audio, AudioError> {
    let bytes = std::fs::read(path).map_err(|source| AudioError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_wav(&bytes, max_seconds)
}

/// Encodes mono audio as a 16-bit PCM WAV file in memory: `round(s * 32768)` clipped to the
/// 16-bit range, the inverse of the decoder's scaling.
pub fn write_wav_pcm16(audio: &Audio) -> Result<Vec<u8>, AudioError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: audio.sample_rate(),
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cursor = Cursor::new(Vec::with_capacity(44 + 2 * audio.len()));
    {
        let mut writer = hound::WavWriter::new(&mut cursor, spec).map_err(hound_error)?;
        for &s in audio.samples() {
            let v = (f64::from(s) * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
            writer.write_sample(v).map_err(hound_error)?;
        }
        writer.finalize().map_err(hound_error)?;
    }
    Ok(cursor.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm16_round_trip_is_within_one_step() {
        let samples: Vec<f32> = (0..100).map(|i| (i as f32 / 50.0) - 1.0).collect();
        let audio = Audio::new(samples.clone(), 8000).unwrap();
        let bytes = write_wav_pcm16(&audio).unwrap();
        let back = decode_wav(&bytes, 10.0).unwrap();
        assert_eq!(back.sample_rate(), 8000);
        assert_eq!(back.len(), 100);
        for (a, b) in samples.iter().zip(back.samples()) {
            assert!((a - b).abs() <= 0.5 / 32768.0 + 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn wav_seconds_reads_the_header_only() {
        let audio = Audio::new(vec![0.25; 12_000], 8000).unwrap();
        let bytes = write_wav_pcm16(&audio).unwrap();
        assert_eq!(wav_seconds(&bytes).unwrap(), 1.5);
        assert!(matches!(wav_seconds(b"RIFF"), Err(AudioError::NotWav(_))));
    }

    #[test]
    fn audio_new_rejects_bad_input() {
        assert!(matches!(Audio::new(vec![], 8000), Err(AudioError::Empty)));
        assert!(matches!(
            Audio::new(vec![0.0, f32::NAN], 8000),
            Err(AudioError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            Audio::new(vec![0.0], 10),
            Err(AudioError::SampleRate(10))
        ));
    }
}
