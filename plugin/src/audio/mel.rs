//! Log-mel features: pre-emphasis, Hann-windowed frames, real FFT, triangular mel filterbank
//! (HTK mel scale), natural log with a dynamic-range floor, then per-utterance normalisation.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

use super::features::{normalise, Features, Normalisation};
use super::resample::resample;
use super::wav::{decode_wav, Audio, DEFAULT_MAX_SECONDS};
use super::{AudioError, SAMPLE_RATE};

/// Mel value of a frequency, HTK formula: `2595 * log10(1 + hz / 700)`.
pub fn hz_to_mel(hz: f64) -> f64 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

/// Frequency of a mel value (inverse of [`hz_to_mel`]).
pub fn mel_to_hz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

/// Everything that defines the features. Stored with a unit codebook so encoding uses the
/// features the codebook was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontEndConfig {
    /// Rate the audio is resampled to before featurisation (Hz).
    pub sample_rate: u32,
    /// FFT size (samples); at least `win_length`.
    pub n_fft: usize,
    /// Window length in samples (400 = 25 ms at 16 kHz).
    pub win_length: usize,
    /// Hop in samples (160 = 10 ms at 16 kHz).
    pub hop_length: usize,
    /// Number of mel bands.
    pub n_mels: usize,
    /// Lower edge of the filterbank (Hz).
    pub f_min: f32,
    /// Upper edge of the filterbank (Hz), at most `sample_rate / 2`.
    pub f_max: f32,
    /// Pre-emphasis coefficient (0 disables): `y[n] = x[n] - c * x[n-1]`.
    pub preemphasis: f32,
    /// Log-mel values are floored at the utterance maximum minus this many dB (power); `None`
    /// keeps only the absolute floor of 1e-10.
    pub dynamic_range_db: Option<f32>,
    /// Per-utterance normalisation.
    pub normalisation: Normalisation,
    /// Longest audio accepted, in seconds.
    pub max_seconds: f64,
}

impl Default for FrontEndConfig {
    fn default() -> Self {
        Self {
            sample_rate: SAMPLE_RATE,
            n_fft: 512,
            win_length: 400,
            hop_length: 160,
            n_mels: 80,
            f_min: 20.0,
            f_max: 8000.0,
            preemphasis: 0.97,
            dynamic_range_db: Some(80.0),
            normalisation: Normalisation::MeanVariance { std_floor: 1.0 },
            max_seconds: DEFAULT_MAX_SECONDS,
        }
    }
}

impl FrontEndConfig {
    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> Result<(), AudioError> {
        let bad = |msg: String| Err(AudioError::Config(msg));
        super::wav::check_rate(self.sample_rate)?;
        if self.win_length == 0 || self.hop_length == 0 || self.n_mels == 0 {
            return bad("win_length, hop_length and n_mels must be positive".into());
        }
        if self.n_fft < self.win_length {
            return bad(format!(
                "n_fft {} is shorter than win_length {}",
                self.n_fft, self.win_length
            ));
        }
        let nyquist = self.sample_rate as f32 / 2.0;
        if !(self.f_min >= 0.0 && self.f_min < self.f_max && self.f_max <= nyquist) {
            return bad(format!(
                "need 0 <= f_min < f_max <= {nyquist} Hz, got {}..{}",
                self.f_min, self.f_max
            ));
        }
        if !(0.0..1.0).contains(&self.preemphasis) {
            return bad(format!("preemphasis {} not in [0, 1)", self.preemphasis));
        }
        if let Some(db) = self.dynamic_range_db {
            if !(db.is_finite() && db > 0.0) {
                return bad(format!("dynamic_range_db {db} must be positive"));
            }
        }
        if let Normalisation::MeanVariance { std_floor } = self.normalisation {
            if !(std_floor.is_finite() && std_floor >= 0.0) {
                return bad(format!("std_floor {std_floor} must be >= 0"));
            }
        }
        if !(self.max_seconds.is_finite() && self.max_seconds > 0.0) {
            return bad(format!("max_seconds {} must be positive", self.max_seconds));
        }
        Ok(())
    }
}

/// Triangular mel filters over the bins of a real FFT, stored sparsely.
#[derive(Debug, Clone)]
pub struct MelFilterbank {
    /// Per band: first FFT bin with a non-zero weight, and the weights from there.
    bands: Vec<(usize, Vec<f32>)>,
    centers_hz: Vec<f64>,
    n_bins: usize,
}

impl MelFilterbank {
    /// Builds `n_mels` triangles with edges equally spaced on the mel scale between `f_min`
    /// and `f_max`, evaluated at the `n_fft / 2 + 1` bin frequencies `k * sample_rate / n_fft`.
    /// Peak weight 1 (no area normalisation). Fails if a band covers no bin.
    pub fn new(
        sample_rate: u32,
        n_fft: usize,
        n_mels: usize,
        f_min: f32,
        f_max: f32,
    ) -> Result<Self, AudioError> {
        let n_bins = n_fft / 2 + 1;
        let (lo, hi) = (hz_to_mel(f64::from(f_min)), hz_to_mel(f64::from(f_max)));
        let edges: Vec<f64> = (0..n_mels + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
            .collect();
        let bin_hz = f64::from(sample_rate) / n_fft as f64;
        let mut bands = Vec::with_capacity(n_mels);
        for m in 0..n_mels {
            let (left, center, right) = (edges[m], edges[m + 1], edges[m + 2]);
            let mut first = None;
            let mut weights = Vec::new();
            for k in 0..n_bins {
                let f = k as f64 * bin_hz;
                let w = if f > left && f <= center {
                    (f - left) / (center - left)
                } else if f > center && f < right {
                    (right - f) / (right - center)
                } else {
                    0.0
                };
                if w > 0.0 {
                    first.get_or_insert(k);
                    weights.push(w as f32);
                } else if first.is_some() {
                    break;
                }
            }
            match first {
                Some(k) => bands.push((k, weights)),
                None => {
                    return Err(AudioError::Config(format!(
                        "mel band {m} ({left:.1}-{right:.1} Hz) covers no FFT bin: \
                         use fewer bands or a larger n_fft"
                    )))
                }
            }
        }
        Ok(Self {
            bands,
            centers_hz: edges[1..=n_mels].to_vec(),
            n_bins,
        })
    }

    /// Number of bands.
    pub fn n_mels(&self) -> usize {
        self.bands.len()
    }

    /// Centre frequency of each band (Hz).
    pub fn centers_hz(&self) -> &[f64] {
        &self.centers_hz
    }

    /// Weight of FFT bin `bin` in band `band` (0 outside the triangle).
    pub fn weight(&self, band: usize, bin: usize) -> f32 {
        let (first, w) = &self.bands[band];
        if bin < *first {
            0.0
        } else {
            w.get(bin - first).copied().unwrap_or(0.0)
        }
    }

    /// Mel energies of one power spectrum (`n_fft / 2 + 1` bins) into `out` (`n_mels`).
    ///
    /// # Panics
    /// When the slices have other lengths.
    pub fn apply(&self, power: &[f32], out: &mut [f32]) {
        assert_eq!(power.len(), self.n_bins, "power spectrum length");
        assert_eq!(out.len(), self.bands.len(), "mel output length");
        for ((first, w), o) in self.bands.iter().zip(out.iter_mut()) {
            *o = w.iter().zip(&power[*first..]).map(|(a, b)| a * b).sum();
        }
    }
}

/// The reusable front-end: window, filterbank and FFT plan are computed once. `Send + Sync`.
#[derive(Clone)]
pub struct FrontEnd {
    config: FrontEndConfig,
    window: Vec<f32>,
    filterbank: MelFilterbank,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEnd")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Floor on mel energies before the log.
const ENERGY_FLOOR: f32 = 1e-10;

impl FrontEnd {
    /// Validates the configuration and precomputes window, filterbank and FFT plan.
    pub fn new(config: FrontEndConfig) -> Result<Self, AudioError> {
        config.validate()?;
        let n = config.win_length;
        // Periodic Hann window.
        let window = (0..n)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
            .collect();
        let filterbank = MelFilterbank::new(
            config.sample_rate,
            config.n_fft,
            config.n_mels,
            config.f_min,
            config.f_max,
        )?;
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(config.n_fft);
        Ok(Self {
            config,
            window,
            filterbank,
            fft,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FrontEndConfig {
        &self.config
    }

    /// The mel filterbank.
    pub fn filterbank(&self) -> &MelFilterbank {
        &self.filterbank
    }

    /// Values per feature frame (`n_mels`).
    pub fn dims(&self) -> usize {
        self.config.n_mels
    }

    /// Frames produced for `n` samples at the model rate: `1 + ceil((n - win) / hop)`, at least 1
    /// (the last frame is zero-padded, so no sample is dropped).
    pub fn frames_for(&self, n: usize) -> usize {
        1 + n
            .saturating_sub(self.config.win_length)
            .div_ceil(self.config.hop_length)
    }

    /// Decodes a WAV file, enforcing the configured duration limit.
    pub fn decode(&self, wav: &[u8]) -> Result<Audio, AudioError> {
        decode_wav(wav, self.config.max_seconds)
    }

    /// Checks the duration limit and resamples to the model rate.
    pub fn to_model_rate(&self, audio: &Audio) -> Result<Vec<f32>, AudioError> {
        audio.check_duration(self.config.max_seconds)?;
        resample(
            audio.samples(),
            audio.sample_rate(),
            self.config.sample_rate,
        )
    }

    /// Log-mel features of samples already at the model rate, before normalisation.
    ///
    /// Fails on an empty or non-finite signal.
    pub fn log_mel(&self, samples: &[f32]) -> Result<Features, AudioError> {
        if samples.is_empty() {
            return Err(AudioError::Empty);
        }
        if let Some((index, &value)) = samples.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(AudioError::NonFinite { index, value });
        }
        let c = &self.config;
        let emphasised: Vec<f32>;
        let signal: &[f32] = if c.preemphasis > 0.0 {
            let mut y = Vec::with_capacity(samples.len());
            y.push(samples[0] * (1.0 - c.preemphasis));
            y.extend(samples.windows(2).map(|w| w[1] - c.preemphasis * w[0]));
            emphasised = y;
            &emphasised
        } else {
            samples
        };

        let frames = self.frames_for(signal.len());
        let mut out = vec![0f32; frames * c.n_mels];
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; spectrum.len()];
        for (t, row) in out.chunks_exact_mut(c.n_mels).enumerate() {
            let start = t * c.hop_length;
            let end = (start + c.win_length).min(signal.len());
            input.iter_mut().for_each(|v| *v = 0.0);
            for ((dst, &x), &w) in input.iter_mut().zip(&signal[start..end]).zip(&self.window) {
                *dst = x * w;
            }
            // Lengths come from the plan itself, so this cannot fail.
            if self
                .fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .is_err()
            {
                return Err(AudioError::Config("FFT buffer sizes".into()));
            }
            for (p, z) in power.iter_mut().zip(&spectrum) {
                *p = z.re * z.re + z.im * z.im;
            }
            self.filterbank.apply(&power, row);
            for v in row.iter_mut() {
                *v = v.max(ENERGY_FLOOR).ln();
            }
        }
        if let Some(db) = c.dynamic_range_db {
            let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let floor = max - db / 10.0 * std::f32::consts::LN_10;
            out.iter_mut().for_each(|v| *v = v.max(floor));
        }
        Features::new(out, c.n_mels)
    }

    /// Normalised log-mel features of any mono audio (resampled to the model rate first).
    pub fn features(&self, audio: &Audio) -> Result<Features, AudioError> {
        let samples = self.to_model_rate(audio)?;
        let mut f = self.log_mel(&samples)?;
        normalise(&mut f, self.config.normalisation);
        Ok(f)
    }

    /// Decodes a WAV file and returns its normalised log-mel features.
    pub fn features_from_wav(&self, wav: &[u8]) -> Result<Features, AudioError> {
        self.features(&self.decode(wav)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mel_scale_hand_checked() {
        // 2595 * log10(2) = 781.1728; 2595 * log10(1 + 1000/700) = 999.99.
        assert!((hz_to_mel(700.0) - 781.1728).abs() < 1e-3);
        assert!((hz_to_mel(1000.0) - 999.9855).abs() < 1e-3);
        assert!((mel_to_hz(hz_to_mel(3456.0)) - 3456.0).abs() < 1e-9);
    }

    #[test]
    fn every_band_is_non_empty_and_peaks_at_most_one() {
        let fb = MelFilterbank::new(16000, 512, 80, 20.0, 8000.0).unwrap();
        assert_eq!(fb.n_mels(), 80);
        for m in 0..80 {
            let w: Vec<f32> = (0..257).map(|k| fb.weight(m, k)).collect();
            let peak = w.iter().copied().fold(0.0, f32::max);
            assert!(peak > 0.0 && peak <= 1.0, "band {m} peak {peak}");
        }
        // Too many bands for the FFT size is a typed error, not a silent empty filter.
        assert!(matches!(
            MelFilterbank::new(16000, 64, 80, 0.0, 8000.0),
            Err(AudioError::Config(_))
        ));
    }

    #[test]
    fn frame_count() {
        let fe = FrontEnd::new(FrontEndConfig::default()).unwrap();
        assert_eq!(fe.frames_for(1), 1);
        assert_eq!(fe.frames_for(400), 1);
        assert_eq!(fe.frames_for(401), 2);
        assert_eq!(fe.frames_for(16000), 99); // 1 + ceil(15600 / 160)
    }

    #[test]
    fn config_validation_names_the_problem() {
        let bad = FrontEndConfig {
            f_max: 9000.0,
            ..FrontEndConfig::default()
        };
        let err = FrontEnd::new(bad).unwrap_err().to_string();
        assert!(err.contains("f_max") || err.contains("8000"), "{err}");
        let bad = FrontEndConfig {
            n_fft: 256,
            ..FrontEndConfig::default()
        };
        assert!(FrontEnd::new(bad).is_err());
    }
}
