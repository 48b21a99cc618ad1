//! Band-limited resampling of a whole mono signal with rubato's FFT resampler.
//!
//! Building a resampler designs its sinc filter and plans its FFTs, which costs more than
//! resampling a short clip. Resamplers are therefore kept in a small process-wide cache per
//! `(from, to)` pair and reset before each use; the cache is bounded in pairs and in idle
//! resamplers per pair, so clients sending many different rates cannot grow it.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use rubato::{FftFixedIn, Resampler};

use super::wav::check_rate;
use super::AudioError;

/// Input frames per rubato call.
const CHUNK: usize = 1024;
/// Most rate pairs kept in the cache (least recently added pairs are dropped first).
const MAX_CACHED_PAIRS: usize = 8;
/// Most idle resamplers kept per rate pair.
const MAX_IDLE_PER_PAIR: usize = 4;

/// Idle resamplers per `(from, to)`, and the order in which pairs were added.
#[derive(Default)]
struct Cache {
    idle: HashMap<(u32, u32), Vec<FftFixedIn<f32>>>,
    order: Vec<(u32, u32)>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Cache::default()))
}

/// A reset resampler for `from -> to`: a cached one, or a new one.
fn take(from: u32, to: u32) -> Result<FftFixedIn<f32>, AudioError> {
    let cached = cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .idle
        .get_mut(&(from, to))
        .and_then(Vec::pop);
    match cached {
        Some(r) => Ok(r),
        None => FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK, 2, 1).map_err(|e| {
            AudioError::Resample {
                from,
                to,
                reason: e.to_string(),
            }
        }),
    }
}

/// Returns a resampler to the cache (reset), within the cache's bounds.
fn give_back(from: u32, to: u32, mut r: FftFixedIn<f32>) {
    r.reset();
    let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
    if !c.idle.contains_key(&(from, to)) {
        if c.order.len() >= MAX_CACHED_PAIRS {
            let oldest = c.order.remove(0);
            c.idle.remove(&oldest);
        }
        c.order.push((from, to));
    }
    let idle = c.idle.entry((from, to)).or_default();
    if idle.len() < MAX_IDLE_PER_PAIR {
        idle.push(r);
    }
}

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
    let mut r = take(from, to)?;
    let out = resample_with(&mut r, samples, from, to);
    // Only a resampler that finished cleanly goes back; reset() clears its state either way.
    if out.is_ok() {
        give_back(from, to, r);
    }
    out
}

fn resample_with(
    r: &mut FftFixedIn<f32>,
    samples: &[f32],
    from: u32,
    to: u32,
) -> Result<Vec<f32>, AudioError> {
    let fail = |reason: String| AudioError::Resample { from, to, reason };
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
    fn a_cached_resampler_gives_the_same_output_as_a_new_one() {
        let x: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.05).sin()).collect();
        let y: Vec<f32> = (0..777).map(|i| (i as f32 * 0.3).cos()).collect();
        let first = resample(&x, 44_100, 16_000).unwrap();
        // A different signal in between leaves state in the resampler unless it is reset.
        resample(&y, 44_100, 16_000).unwrap();
        let again = resample(&x, 44_100, 16_000).unwrap();
        assert_eq!(first, again);
        let fresh = resample_with(
            &mut FftFixedIn::<f32>::new(44_100, 16_000, CHUNK, 2, 1).unwrap(),
            &x,
            44_100,
            16_000,
        )
        .unwrap();
        assert_eq!(first, fresh);
    }

    #[test]
    fn the_cache_stays_bounded() {
        for from in (0..3 * MAX_CACHED_PAIRS as u32).map(|i| 8000 + 100 * i) {
            for _ in 0..2 * MAX_IDLE_PER_PAIR {
                resample(&[0.5; 64], from, 16_000).unwrap();
            }
        }
        let c = cache().lock().unwrap();
        assert!(c.idle.len() <= MAX_CACHED_PAIRS);
        assert!(c.idle.values().all(|v| v.len() <= MAX_IDLE_PER_PAIR));
        assert_eq!(c.order.len(), c.idle.len());
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
