//! Data augmentation for speaker robustness: speed and volume perturbation, additive noise on the
//! waveform, SpecAugment-style time and frequency masks on the features. Everything draws from a
//! caller-supplied RNG, so a seeded `ChaCha8Rng` makes it deterministic.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::SpeechError;
use crate::audio::{resample, Audio, Features};

/// What to perturb and by how much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AugmentConfig {
    /// Probability of a speed change.
    pub speed_prob: f64,
    /// Speed factors are drawn uniformly from this range (1.1 = 10 % faster), in 0.01 steps.
    pub speed_range: (f64, f64),
    /// Gain in dB, drawn uniformly from this range for every utterance.
    pub volume_db_range: (f64, f64),
    /// Probability of adding white noise.
    pub noise_prob: f64,
    /// Signal-to-noise ratio in dB, drawn uniformly from this range.
    pub snr_db_range: (f64, f64),
    /// Number of time masks.
    pub time_masks: usize,
    /// Widest time mask, in frames (width drawn uniformly from 0 to this).
    pub max_time_mask: usize,
    /// Number of frequency masks.
    pub freq_masks: usize,
    /// Widest frequency mask, in bands.
    pub max_freq_mask: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            speed_prob: 0.6,
            speed_range: (0.9, 1.1),
            volume_db_range: (-6.0, 6.0),
            noise_prob: 0.5,
            snr_db_range: (15.0, 40.0),
            time_masks: 2,
            max_time_mask: 8,
            freq_masks: 2,
            max_freq_mask: 10,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all.
    pub fn none() -> Self {
        Self {
            speed_prob: 0.0,
            speed_range: (1.0, 1.0),
            volume_db_range: (0.0, 0.0),
            noise_prob: 0.0,
            snr_db_range: (0.0, 0.0),
            time_masks: 0,
            max_time_mask: 0,
            freq_masks: 0,
            max_freq_mask: 0,
        }
    }

    /// Checks ranges and probabilities.
    pub fn validate(&self) -> Result<(), SpeechError> {
        let range_ok = |(a, b): (f64, f64)| a.is_finite() && b.is_finite() && a <= b;
        let prob_ok = |p: f64| (0.0..=1.0).contains(&p);
        if !prob_ok(self.speed_prob) || !prob_ok(self.noise_prob) {
            return Err(SpeechError::Config(
                "augmentation probabilities must be in [0, 1]".into(),
            ));
        }
        if !range_ok(self.speed_range)
            || !range_ok(self.volume_db_range)
            || !range_ok(self.snr_db_range)
        {
            return Err(SpeechError::Config(format!(
                "augmentation ranges must be finite and ordered: {self:?}"
            )));
        }
        if self.speed_range.0 < 0.5 || self.speed_range.1 > 2.0 {
            return Err(SpeechError::Config(format!(
                "speed factors {:?} outside 0.5..=2.0",
                self.speed_range
            )));
        }
        Ok(())
    }
}

/// Applies an [`AugmentConfig`].
#[derive(Debug, Clone)]
pub struct Augmenter {
    config: AugmentConfig,
}

fn uniform<R: Rng>(rng: &mut R, (a, b): (f64, f64)) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

impl Augmenter {
    /// Validates the configuration.
    pub fn new(config: AugmentConfig) -> Result<Self, SpeechError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &AugmentConfig {
        &self.config
    }

    /// Speed change (with probability `speed_prob`), gain, then noise (with probability
    /// `noise_prob`). Draws happen in a fixed order, so one seed gives one result.
    pub fn perturb_audio<R: Rng>(&self, audio: &Audio, rng: &mut R) -> Result<Audio, SpeechError> {
        let c = &self.config;
        let do_speed = rng.random::<f64>() < c.speed_prob;
        let speed = uniform(rng, c.speed_range);
        let gain_db = uniform(rng, c.volume_db_range);
        let do_noise = rng.random::<f64>() < c.noise_prob;
        let snr_db = uniform(rng, c.snr_db_range);
        let mut out = if do_speed {
            speed_perturb(audio, speed)?
        } else {
            audio.clone()
        };
        if gain_db != 0.0 {
            out = apply_gain_db(&out, gain_db)?;
        }
        if do_noise {
            out = add_noise(&out, snr_db, rng)?;
        }
        Ok(out)
    }

    /// SpecAugment masks: `time_masks` runs of frames and `freq_masks` runs of bands set to 0
    /// (the mean of normalised features).
    pub fn mask_features<R: Rng>(&self, features: &mut Features, rng: &mut R) {
        let c = &self.config;
        for _ in 0..c.time_masks {
            let w = rng.random_range(0..=c.max_time_mask);
            let start = rng.random_range(0..=features.frames().saturating_sub(w));
            time_mask(features, start, w);
        }
        for _ in 0..c.freq_masks {
            let w = rng.random_range(0..=c.max_freq_mask);
            let start = rng.random_range(0..=features.dims().saturating_sub(w));
            freq_mask(features, start, w);
        }
    }
}

/// Plays the audio `factor` times faster (tempo and pitch together, as in Kaldi's speed
/// perturbation): resampled from `rate * factor` to `rate`. The factor is rounded to 0.01.
pub fn speed_perturb(audio: &Audio, factor: f64) -> Result<Audio, SpeechError> {
    let q = (factor * 100.0).round() / 100.0;
    if !(0.5..=2.0).contains(&q) {
        return Err(SpeechError::Config(format!(
            "speed factor {factor} outside 0.5..=2.0"
        )));
    }
    let rate = audio.sample_rate();
    let from = (f64::from(rate) * q).round() as u32;
    if from == rate {
        return Ok(audio.clone());
    }
    let samples = resample(audio.samples(), from, rate)?;
    Ok(Audio::new(samples, rate)?)
}

/// Multiplies every sample by `10^(db / 20)`.
pub fn apply_gain_db(audio: &Audio, db: f64) -> Result<Audio, SpeechError> {
    let g = 10f64.powf(db / 20.0) as f32;
    Ok(Audio::new(
        audio.samples().iter().map(|s| s * g).collect(),
        audio.sample_rate(),
    )?)
}

/// Adds white Gaussian noise at `snr_db` below the signal's mean power (silent audio is
/// returned unchanged).
pub fn add_noise<R: Rng>(audio: &Audio, snr_db: f64, rng: &mut R) -> Result<Audio, SpeechError> {
    let n = audio.len() as f64;
    let power = audio
        .samples()
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / n;
    if power <= 0.0 {
        return Ok(audio.clone());
    }
    let sigma = (power / 10f64.powf(snr_db / 10.0)).sqrt();
    let mut out = Vec::with_capacity(audio.len());
    let mut spare: Option<f64> = None;
    for &s in audio.samples() {
        let z = match spare.take() {
            Some(z) => z,
            None => {
                // Box-Muller: two independent standard normals from two uniforms.
                let u1 = 1.0 - rng.random::<f64>(); // (0, 1]
                let u2 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let t = 2.0 * std::f64::consts::PI * u2;
                spare = Some(r * t.sin());
                r * t.cos()
            }
        };
        out.push(s + (sigma * z) as f32);
    }
    Ok(Audio::new(out, audio.sample_rate())?)
}

/// Sets frames `start..start + width` (clamped to the matrix) to 0.
pub fn time_mask(features: &mut Features, start: usize, width: usize) {
    let end = (start + width).min(features.frames());
    for t in start.min(end)..end {
        features.row_mut(t).iter_mut().for_each(|v| *v = 0.0);
    }
}

/// Sets bands `start..start + width` (clamped) of every frame to 0.
pub fn freq_mask(features: &mut Features, start: usize, width: usize) {
    let end = (start + width).min(features.dims());
    let start = start.min(end);
    let dims = features.dims();
    for row in features.as_mut_slice().chunks_exact_mut(dims) {
        row[start..end].iter_mut().for_each(|v| *v = 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn tone(rate: u32, seconds: f64) -> Audio {
        let n = (f64::from(rate) * seconds) as usize;
        Audio::new(
            (0..n)
                .map(|i| {
                    (0.5 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / f64::from(rate)).sin())
                        as f32
                })
                .collect(),
            rate,
        )
        .unwrap()
    }

    #[test]
    fn speed_changes_length_by_the_factor() {
        let a = tone(8000, 1.0);
        assert_eq!(speed_perturb(&a, 1.1).unwrap().len(), 7273); // ceil(8000 * 8000 / 8800)
        assert_eq!(speed_perturb(&a, 0.9).unwrap().len(), 8889); // ceil(8000 * 8000 / 7200)
        assert_eq!(speed_perturb(&a, 1.0).unwrap(), a);
        assert!(speed_perturb(&a, 3.0).is_err());
    }

    #[test]
    fn gain_hand_checked() {
        let a = Audio::new(vec![0.1, -0.2], 8000).unwrap();
        let b = apply_gain_db(&a, 20.0).unwrap();
        assert!((b.samples()[0] - 1.0).abs() < 1e-6);
        assert!((b.samples()[1] + 2.0).abs() < 1e-6);
    }

    #[test]
    fn noise_hits_the_snr() {
        let a = tone(16000, 2.0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let b = add_noise(&a, 10.0, &mut rng).unwrap();
        let p_sig: f64 = a.samples().iter().map(|&s| f64::from(s).powi(2)).sum();
        let p_noise: f64 = a
            .samples()
            .iter()
            .zip(b.samples())
            .map(|(&x, &y)| f64::from(y - x).powi(2))
            .sum();
        let snr = 10.0 * (p_sig / p_noise).log10();
        assert!((snr - 10.0).abs() < 0.2, "snr {snr}");
    }

    #[test]
    fn masks_zero_the_right_cells() {
        let mut f = Features::new(vec![1.0; 5 * 4], 4).unwrap();
        time_mask(&mut f, 1, 2);
        freq_mask(&mut f, 3, 5);
        let expect: Vec<f32> = (0..5)
            .flat_map(|t| {
                (0..4).map(move |d| {
                    if (1..3).contains(&t) || d == 3 {
                        0.0
                    } else {
                        1.0
                    }
                })
            })
            .collect();
        assert_eq!(f.as_slice(), &expect[..]);
    }

    #[test]
    fn same_seed_same_augmentation() {
        let a = tone(8000, 0.5);
        let aug = Augmenter::new(AugmentConfig {
            speed_prob: 1.0,
            noise_prob: 1.0,
            ..AugmentConfig::default()
        })
        .unwrap();
        let x = aug
            .perturb_audio(&a, &mut ChaCha8Rng::seed_from_u64(7))
            .unwrap();
        let y = aug
            .perturb_audio(&a, &mut ChaCha8Rng::seed_from_u64(7))
            .unwrap();
        let z = aug
            .perturb_audio(&a, &mut ChaCha8Rng::seed_from_u64(8))
            .unwrap();
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert!(Augmenter::new(AugmentConfig {
            speed_prob: 1.5,
            ..AugmentConfig::default()
        })
        .is_err());
    }
}
