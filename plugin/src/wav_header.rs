//! What a WAV file's header says, read without decoding a sample: the sample-rate range leaf
//! accepts and the duration. The server bounds audio seconds with it before it spends any work
//! on a request; the speech workload's decoder (`audio`, feature `speech`) builds on it.

use std::io::Cursor;

/// The lowest and highest input sample rates accepted (Hz).
pub const SAMPLE_RATE_RANGE: (u32, u32) = (1_000, 384_000);

/// A WAV header that cannot be read or holds a rate outside [`SAMPLE_RATE_RANGE`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WavHeaderError {
    /// The bytes are not a WAV file hound can read (no RIFF/WAVE header, truncated chunks, ...).
    #[error("not a readable WAV file: {0}")]
    NotWav(String),
    /// A WAV encoding hound does not read.
    #[error("unsupported WAV encoding: {0}")]
    Unsupported(String),
    /// A sample rate outside [`SAMPLE_RATE_RANGE`].
    #[error("sample rate {0} Hz is outside the supported range 1000..=384000 Hz")]
    SampleRate(u32),
}

/// Fails with [`WavHeaderError::SampleRate`] outside [`SAMPLE_RATE_RANGE`].
pub fn check_rate(rate: u32) -> Result<(), WavHeaderError> {
    if rate < SAMPLE_RATE_RANGE.0 || rate > SAMPLE_RATE_RANGE.1 {
        return Err(WavHeaderError::SampleRate(rate));
    }
    Ok(())
}

/// Duration in seconds of a WAV file held in memory, read from its header only (no sample is
/// decoded): what a server checks before it spends any work on the audio.
pub fn wav_seconds(bytes: &[u8]) -> Result<f64, WavHeaderError> {
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(hound_error)?;
    let spec = reader.spec();
    check_rate(spec.sample_rate)?;
    Ok(f64::from(reader.duration()) / f64::from(spec.sample_rate))
}

/// A hound error as a header error (a truncated header is not a WAV file).
pub(crate) fn hound_error(e: hound::Error) -> WavHeaderError {
    match e {
        hound::Error::FormatError(msg) => WavHeaderError::NotWav(msg.to_string()),
        hound::Error::Unsupported => WavHeaderError::Unsupported("hound does not decode it".into()),
        hound::Error::TooWide => WavHeaderError::Unsupported("sample wider than 32 bits".into()),
        hound::Error::InvalidSampleFormat => {
            WavHeaderError::Unsupported("sample format does not match the header".into())
        }
        hound::Error::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            WavHeaderError::NotWav(format!("truncated header: {io}"))
        }
        other => WavHeaderError::NotWav(other.to_string()),
    }
}

/// A PCM16 mono WAV of `frames` zero samples at `rate` Hz, written with hound (test input).
#[cfg(test)]
pub(crate) fn pcm16_silence(frames: usize, rate: u32) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for _ in 0..frames {
        w.write_sample(0i16).unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duration_comes_from_the_header() {
        assert_eq!(wav_seconds(&pcm16_silence(4000, 8000)).unwrap(), 0.5);
        assert_eq!(wav_seconds(&pcm16_silence(0, 16000)).unwrap(), 0.0);
    }

    #[test]
    fn bad_headers_and_rates_are_named() {
        assert!(matches!(
            wav_seconds(b"RIFF...."),
            Err(WavHeaderError::NotWav(_))
        ));
        assert_eq!(
            wav_seconds(&pcm16_silence(10, 500)),
            Err(WavHeaderError::SampleRate(500))
        );
        assert!(check_rate(1_000).is_ok() && check_rate(384_000).is_ok());
        assert!(check_rate(384_001).is_err());
    }
}
