//! Front-end throughput, in seconds of audio processed per second of one core:
//! - `wav8k_to_features`: an 8 kHz 16-bit WAV (the spoken-digit recordings' format) decoded,
//!   resampled to 16 kHz, log-mel, normalised — the per-request serving path;
//! - `features16k`: log-mel and normalisation of audio already at 16 kHz;
//! - `resample8k_to_16k`: resampling alone;
//! - `wav8k_to_units`: the whole path to collapsed units with a 128-unit codebook.
//!
//! Criterion reports input samples per second; a summary line per case gives seconds of audio
//! per second. The audio is a synthetic 3 s utterance (harmonic chirps and noise), so the bench
//! runs without the dataset. Short run: `cargo bench -p leaf-plugin --no-default-features
//! --bench frontend -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use leaf_plugin::audio::{resample, write_wav_pcm16, Audio, Features, FrontEnd, FrontEndConfig};
use leaf_plugin::speech::units::{Codebook, KMeansConfig};
use leaf_plugin::speech::UnitEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SECONDS: f64 = 3.0;

fn utterance(rate: u32) -> Audio {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = (f64::from(rate) * SECONDS) as usize;
    let samples = (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let f0 = 120.0 + 40.0 * (2.0 * std::f64::consts::PI * 0.7 * t).sin();
            let voiced: f64 = (1..8)
                .map(|h| (2.0 * std::f64::consts::PI * f0 * h as f64 * t).sin() / h as f64)
                .sum();
            (0.2 * voiced + 0.02 * (rng.random::<f64>() - 0.5)) as f32
        })
        .collect();
    Audio::new(samples, rate).expect("synthetic audio is valid")
}

fn encoder(fe: &FrontEnd) -> UnitEncoder {
    // A codebook fitted on jittered features of synthetic audio: the cost of assignment does not
    // depend on where the centroids are.
    let pooled = fe.features(&utterance(16000)).expect("features").pooled(2);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data: Vec<f32> = (0..4)
        .flat_map(|_| pooled.as_slice().to_vec())
        .map(|v| v + rng.random_range(-0.5f32..0.5))
        .collect();
    let frames = Features::new(data, fe.dims()).expect("shape");
    let cb = Codebook::fit(
        &frames,
        fe.config().clone(),
        2,
        &KMeansConfig {
            k: 128,
            max_iters: 5,
            ..KMeansConfig::default()
        },
    )
    .expect("fit");
    UnitEncoder::new(cb).expect("encoder")
}

/// Seconds of audio per second of compute, timed over `reps` runs.
fn audio_seconds_per_second(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    SECONDS * reps as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let fe = FrontEnd::new(FrontEndConfig::default()).expect("front-end");
    let a8 = utterance(8000);
    let a16 = utterance(16000);
    let wav8 = write_wav_pcm16(&a8).expect("wav");
    let enc = encoder(&fe);

    let mut g = c.benchmark_group("frontend");
    g.throughput(Throughput::Elements(a8.len() as u64));
    g.bench_function("wav8k_to_features", |b| {
        b.iter(|| fe.features_from_wav(black_box(&wav8)).expect("features"))
    });
    g.bench_function("resample8k_to_16k", |b| {
        b.iter(|| resample(black_box(a8.samples()), 8000, 16000).expect("resample"))
    });
    g.bench_function("wav8k_to_units", |b| {
        b.iter(|| enc.units_from_wav(black_box(&wav8)).expect("units"))
    });
    g.throughput(Throughput::Elements(a16.len() as u64));
    g.bench_function("features16k", |b| {
        b.iter(|| fe.features(black_box(&a16)).expect("features"))
    });
    g.finish();
    c.final_summary();

    // Skipped under `cargo test --benches` (criterion's test mode), which only smoke-tests.
    if std::env::args().any(|a| a == "--bench") {
        let reps = 20;
        let cases: [(&str, f64); 4] = [
            (
                "wav8k_to_features",
                audio_seconds_per_second(reps, || {
                    black_box(fe.features_from_wav(&wav8).expect("features"));
                }),
            ),
            (
                "resample8k_to_16k",
                audio_seconds_per_second(reps, || {
                    black_box(resample(a8.samples(), 8000, 16000).expect("resample"));
                }),
            ),
            (
                "features16k",
                audio_seconds_per_second(reps, || {
                    black_box(fe.features(&a16).expect("features"));
                }),
            ),
            (
                "wav8k_to_units",
                audio_seconds_per_second(reps, || {
                    black_box(enc.units_from_wav(&wav8).expect("units"));
                }),
            ),
        ];
        for (name, rate) in cases {
            println!("frontend/{name}: {rate:.0} s of audio per second (one core)");
        }
    }
}
