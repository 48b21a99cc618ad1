//! Band-limited resampling of a whole mono signal with rubato's FFT resampler.

use rubato::{FftFixedIn, Resampler};

use super::wav::check_rate;
use super::AudioError;

/// Input frames per rubato call.
const CHUNK: usize = 1024;

/// Resamples a mono signal from `from` Hz to `to` Hz.
///
/// The output has `ceil(len * to / from)` samples and is aligned with the input: rubato's
/// filter delay is removed, so a tone keeps its frequency and phase. Equal rates return a copy.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, AudioError> {
    check_rate(from)?;
    check_rate(to)?;
    if from == to {
        return Ok(samples.to_vec());
    }
    if samples.is_empty() {
        return Err(AudioError::Empty);
    }
    let fail = |reason: String| AudioError::Resample { from, to, reason };
    let mut r = FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK, 2, 1)
        .map_err(|e| fail(e.to_string()))?;
    let delay = r.output_delay();
    let expected = (samples.len() as u64 * u64::from(to)).div_ceil(u64::from(from)) as usize;
    let mut out: Vec<f32> = Vec::with_capacity(expected + delay + 2 * r.output_frames_max());
    let mut buf = r.output_buffer_allocate(true);

    let mut pos = 0;
    while samples.len() - pos >= r.input_frames_next() {
        let n = r.input_frames_next();
        let (_, written) = r
            .process_into_buffer(&[&samples[pos..pos + n]], &mut buf, None)
            .map_err(|e| fail(e.to_string()))?;
        out.extend_from_slice(&buf[0][..written]);
        pos += n;
    }
    // The tail, zero-padded, then zeros until the delayed output is complete. Each call yields
    // about CHUNK * to / from frames, so a handful of calls always suffices.
    let max_flushes = 4 + (delay + expected) / r.output_frames_max().max(1);
    let mut flushes = 0;
    while out.len() < delay + expected {
        let rest = &samples[pos..];
        let (_, written) = if rest.is_empty() {
            r.process_partial_into_buffer(None::<&[&[f32]]>, &mut buf, None)
        } else {
            r.process_partial_into_buffer(Some(&[rest]), &mut buf, None)
        }
        .map_err(|e| fail(e.to_string()))?;
        pos = samples.len();
        out.extend_from_slice(&buf[0][..written]);
        flushes += 1;
        if flushes > max_flushes {
            return Err(fail("resampler produced too little output".into()));
        }
    }
    out.drain(..delay);
    out.truncate(expected);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_is_ceil_of_ratio() {
        let x = vec![0.1f32; 1001];
        assert_eq!(resample(&x, 8000, 16000).unwrap().len(), 2002);
        assert_eq!(resample(&x, 16000, 8000).unwrap().len(), 501);
        assert_eq!(resample(&x, 44100, 16000).unwrap().len(), 364); // 1001*160/441 = 363.2
        assert_eq!(resample(&x, 16000, 16000).unwrap(), x);
    }

    #[test]
    fn bad_rates_are_errors() {
        assert!(matches!(
            resample(&[0.0], 0, 16000),
            Err(AudioError::SampleRate(0))
        ));
        assert!(matches!(resample(&[], 8000, 16000), Err(AudioError::Empty)));
    }
}
