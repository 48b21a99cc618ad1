//! The audio front-end against hand-checked values: WAV decoding of every PCM width and float,
//! stereo down-mix, typed errors for bad audio, resampling that keeps a tone's frequency, and a
//! sine wave's mel peak in the band the mel formula predicts.

use std::f64::consts::PI;
use std::io::Cursor;

use leaf_plugin::audio::{
    decode_wav, hz_to_mel, resample, Audio, AudioError, FrontEnd, FrontEndConfig, Normalisation,
};
use proptest::prelude::*;

fn sine(freq: f64, rate: u32, n: usize, amp: f64) -> Vec<f64> {
    (0..n)
        .map(|i| amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin())
        .collect()
}

/// Writes `frames` (each a slice of `channels` values in [-1, 1]) with hound.
fn wav_bytes(rate: u32, channels: u16, bits: u16, float: bool, frames: &[Vec<f64>]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: if float {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut cur = Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut cur, spec).unwrap();
        for frame in frames {
            for &v in frame {
                if float {
                    w.write_sample(v as f32).unwrap();
                } else {
                    // The decoder's convention: full scale is 2^(bits-1).
                    let full = (1i64 << (bits - 1)) as f64;
                    let q = (v * full).round().clamp(-full, full - 1.0) as i32;
                    match bits {
                        8 => w.write_sample(q as i8).unwrap(),
                        16 => w.write_sample(q as i16).unwrap(),
                        _ => w.write_sample(q).unwrap(),
                    }
                }
            }
        }
        w.finalize().unwrap();
    }
    cur.into_inner()
}

#[test]
fn decodes_every_pcm_width_and_float() {
    let x = sine(440.0, 8000, 800, 0.8);
    let frames: Vec<Vec<f64>> = x.iter().map(|&v| vec![v]).collect();
    for (bits, float) in [
        (8, false),
        (16, false),
        (24, false),
        (32, false),
        (32, true),
    ] {
        let audio = decode_wav(&wav_bytes(8000, 1, bits, float, &frames), 10.0).unwrap();
        assert_eq!(audio.sample_rate(), 8000);
        assert_eq!(audio.len(), 800);
        // Half a quantisation step of the format, plus f32 rounding.
        let step = if float {
            0.0
        } else {
            0.5 / (1u64 << (bits - 1)) as f64
        };
        for (a, b) in x.iter().zip(audio.samples()) {
            assert!(
                (a - f64::from(*b)).abs() <= step + 1e-7,
                "{bits}-bit float={float}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn eight_bit_is_unsigned_on_disk_and_centred_after_decoding() {
    // Hand-made 8-bit file: bytes 128 (silence), 255 (max), 0 (min).
    let mut bytes = wav_bytes(8000, 1, 8, false, &[vec![0.0], vec![0.0], vec![0.0]]);
    let n = bytes.len();
    bytes[n - 3..].copy_from_slice(&[128, 255, 0]);
    let a = decode_wav(&bytes, 1.0).unwrap();
    assert_eq!(a.samples(), &[0.0, 127.0 / 128.0, -1.0]);
}

#[test]
fn stereo_is_down_mixed_to_the_mean() {
    let frames = vec![vec![0.5, 0.25], vec![-1.0, 0.0], vec![0.125, 0.125]];
    let a = decode_wav(&wav_bytes(16000, 2, 32, true, &frames), 1.0).unwrap();
    assert_eq!(a.samples(), &[0.375, -0.5, 0.125]);
    let frames3 = vec![vec![0.3, 0.3, 0.3], vec![0.9, 0.0, 0.0]];
    let a = decode_wav(&wav_bytes(16000, 3, 32, true, &frames3), 1.0).unwrap();
    assert!((a.samples()[0] - 0.3).abs() < 1e-7 && (a.samples()[1] - 0.3).abs() < 1e-7);
}

#[test]
fn bad_audio_is_a_typed_error() {
    // Not a WAV at all.
    assert!(matches!(
        decode_wav(b"ID3\x03 this is an mp3, honest", 10.0),
        Err(AudioError::NotWav(_))
    ));
    assert!(matches!(decode_wav(&[], 10.0), Err(AudioError::NotWav(_))));
    // A valid header with no samples.
    assert!(matches!(
        decode_wav(&wav_bytes(8000, 1, 16, false, &[]), 10.0),
        Err(AudioError::Empty)
    ));
    // Longer than the limit: 1 s of audio against a 0.5 s limit, caught from the header.
    let frames: Vec<Vec<f64>> = vec![vec![0.0]; 8000];
    match decode_wav(&wav_bytes(8000, 1, 16, false, &frames), 0.5) {
        Err(AudioError::TooLong { seconds, limit }) => {
            assert_eq!(seconds, 1.0);
            assert_eq!(limit, 0.5);
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    // NaN and infinite float samples.
    let frames = vec![vec![0.0], vec![f64::NAN], vec![0.0]];
    assert!(matches!(
        decode_wav(&wav_bytes(8000, 1, 32, true, &frames), 1.0),
        Err(AudioError::NonFinite { index: 1, .. })
    ));
    let frames = vec![vec![f64::INFINITY]];
    assert!(matches!(
        decode_wav(&wav_bytes(8000, 1, 32, true, &frames), 1.0),
        Err(AudioError::NonFinite { index: 0, .. })
    ));
    // A file cut short in its data.
    let full = wav_bytes(8000, 1, 16, false, &vec![vec![0.1]; 100]);
    let cut = &full[..full.len() - 51];
    assert!(matches!(
        decode_wav(cut, 1.0),
        Err(AudioError::Truncated(_))
    ));
    // The front-end applies its configured limit too.
    let fe = FrontEnd::new(FrontEndConfig {
        max_seconds: 0.01,
        ..FrontEndConfig::default()
    })
    .unwrap();
    let frames: Vec<Vec<f64>> = vec![vec![0.0]; 800];
    assert!(matches!(
        fe.features_from_wav(&wav_bytes(8000, 1, 16, false, &frames)),
        Err(AudioError::TooLong { .. })
    ));
    // Every error message names the problem.
    let msg = decode_wav(b"nope", 1.0).unwrap_err().to_string();
    assert!(msg.contains("WAV"), "{msg}");
}

#[test]
fn resampling_8k_to_16k_keeps_a_tone() {
    let x: Vec<f32> = sine(1000.0, 8000, 8000, 0.5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let y = resample(&x, 8000, 16000).unwrap();
    assert_eq!(y.len(), 16000);
    // Aligned with the ideal 16 kHz tone (same frequency and phase) away from the edges.
    let ideal = sine(1000.0, 16000, 16000, 0.5);
    let err = y[2000..14000]
        .iter()
        .zip(&ideal[2000..14000])
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 0.01, "max error {err}");
    // Zero crossings: 1000 Hz = 2000 sign changes per second.
    let crossings = y[1000..15000]
        .windows(2)
        .filter(|w| (w[0] >= 0.0) != (w[1] >= 0.0))
        .count();
    assert!(
        (1748..=1752).contains(&crossings),
        "{crossings} crossings in 0.875 s"
    );
}

#[test]
fn resampling_down_keeps_a_tone() {
    let x: Vec<f32> = sine(440.0, 44100, 44100, 0.5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let y = resample(&x, 44100, 16000).unwrap();
    assert_eq!(y.len(), 16000);
    let ideal = sine(440.0, 16000, 16000, 0.5);
    let err = y[2000..14000]
        .iter()
        .zip(&ideal[2000..14000])
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 0.01, "max error {err}");
}

fn peak_band(fe: &FrontEnd, samples: &[f32]) -> usize {
    let f = fe.log_mel(samples).unwrap();
    let mut mean = vec![0f64; f.dims()];
    for row in f.rows() {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v);
        }
    }
    (0..mean.len())
        .max_by(|&a, &b| mean[a].total_cmp(&mean[b]))
        .unwrap()
}

#[test]
fn sine_mel_peak_lands_in_the_predicted_band() {
    // Edges: 82 points equally spaced in mel between mel(20) = 31.75 and mel(8000) = 2840.02,
    // step 34.670. Band m is centred on edge m + 1. A tone at f peaks in the band whose centre
    // is nearest mel(f): 440 Hz -> mel 549.64 -> (549.64 - 31.75) / 34.670 = 14.94 -> band 14;
    // 1000 Hz -> 999.99 -> 27.93 -> band 27; 3000 Hz -> 1876.45 -> 53.21 -> band 52.
    assert!((hz_to_mel(3000.0) - 1876.454).abs() < 1e-2);
    let fe = FrontEnd::new(FrontEndConfig::default()).unwrap();
    for (freq, band) in [(440.0, 14), (1000.0, 27), (3000.0, 52)] {
        let x: Vec<f32> = sine(freq, 16000, 16000, 0.5)
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(peak_band(&fe, &x), band, "{freq} Hz");
        let centre = fe.filterbank().centers_hz()[band];
        assert!(
            (centre - freq).abs() < 60.0,
            "centre {centre} Hz for {freq} Hz"
        );
    }
    // Through the whole path: an 8 kHz recording of 1 kHz is resampled and still peaks there.
    let x8: Vec<f32> = sine(1000.0, 8000, 8000, 0.5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let at16 = fe.to_model_rate(&Audio::new(x8, 8000).unwrap()).unwrap();
    assert_eq!(peak_band(&fe, &at16), 27);
}

#[test]
fn log_mel_matches_a_naive_dft_and_the_hand_value() {
    // Without pre-emphasis or range clamp. A 1 kHz tone at 16 kHz sits exactly on bin 32 of the
    // 512-point FFT; with a periodic Hann window of 400 (sum 200) its bin holds
    // |X|^2 = (A * 200 / 2)^2 = 1e4 for A = 1 (the mirrored term vanishes: 50 whole cycles).
    let fe = FrontEnd::new(FrontEndConfig {
        preemphasis: 0.0,
        dynamic_range_db: None,
        ..FrontEndConfig::default()
    })
    .unwrap();
    let x = sine(1000.0, 16000, 400, 1.0);
    let f = fe
        .log_mel(&x.iter().map(|&v| v as f32).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(f.frames(), 1);
    let framed: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(n, v)| v * (0.5 - 0.5 * (2.0 * PI * n as f64 / 400.0).cos()))
        .collect();
    let power: Vec<f64> = (0..257)
        .map(|k| {
            let (mut re, mut im) = (0.0, 0.0);
            for (n, v) in framed.iter().enumerate() {
                let a = -2.0 * PI * (k * n) as f64 / 512.0;
                re += v * a.cos();
                im += v * a.sin();
            }
            re * re + im * im
        })
        .collect();
    assert!((power[32] - 1e4).abs() < 1e-6, "{}", power[32]);
    for band in 0..80 {
        let e: f64 = (0..257)
            .map(|k| f64::from(fe.filterbank().weight(band, k)) * power[k])
            .sum();
        if e < 1e-2 {
            // Far side lobes: below the f32 FFT's rounding noise, not comparable.
            continue;
        }
        let expect = e.ln();
        let got = f64::from(f.row(0)[band]);
        assert!(
            (got - expect).abs() < 1e-3,
            "band {band}: {got} vs {expect}"
        );
    }
    // Digital silence sits on the floor ln(1e-10).
    let z = fe.log_mel(&[0.0; 800]).unwrap();
    assert!(z
        .as_slice()
        .iter()
        .all(|&v| (v - 1e-10f32.ln()).abs() < 1e-4));
}

#[test]
fn features_are_normalised_per_utterance() {
    let fe = FrontEnd::new(FrontEndConfig {
        normalisation: Normalisation::MeanVariance { std_floor: 0.0 },
        ..FrontEndConfig::default()
    })
    .unwrap();
    let x: Vec<f32> = (0..16000)
        .map(|i| {
            let t = i as f64 / 16000.0;
            ((2.0 * PI * 300.0 * t).sin() * (2.0 * PI * 3.0 * t).sin()
                + 0.3 * (2.0 * PI * 2500.0 * t * (1.0 + t)).sin()) as f32
        })
        .collect();
    let f = fe.features(&Audio::new(x, 16000).unwrap()).unwrap();
    assert_eq!(f.dims(), 80);
    assert_eq!(f.frames(), 99);
    for d in 0..80 {
        let col: Vec<f64> = f.rows().map(|r| f64::from(r[d])).collect();
        let mean = col.iter().sum::<f64>() / col.len() as f64;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64;
        assert!(mean.abs() < 1e-4, "band {d} mean {mean}");
        assert!(var < 1e-9 || (var - 1.0).abs() < 1e-3, "band {d} var {var}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn resampled_length_and_finite_features(
        n in 1usize..6000,
        rate in prop::sample::select(vec![8000u32, 11025, 16000, 22050, 44100, 48000]),
        seed in 0u64..1000,
    ) {
        let x: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let y = resample(&x, rate, 16000).unwrap();
        prop_assert_eq!(y.len() as u64, (n as u64 * 16000).div_ceil(u64::from(rate)));
        prop_assert!(y.iter().all(|v| v.is_finite()));
        let fe = FrontEnd::new(FrontEndConfig::default()).unwrap();
        let f = fe.features(&Audio::new(x, rate).unwrap()).unwrap();
        prop_assert_eq!(f.frames(), fe.frames_for(y.len()));
        prop_assert!(f.as_slice().iter().all(|v| v.is_finite()));
    }
}
