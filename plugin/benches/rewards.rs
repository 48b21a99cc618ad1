//! Sentence BLEU and chrF throughput on 20-word sentences (pairs per second).
//!
//! `cargo bench -p leaf-plugin --no-default-features --bench rewards`; criterion reports
//! the time per batch and, through `Throughput::Elements`, pairs per second; a plain
//! pairs/second line per metric is printed first.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use leaf_plugin::reward::{Metric, RewardOptions};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "mat", "and", "we", "went", "to", "station", "at", "7", "pm,",
    "Haus", "über", "Straße", "große", "3.5", "km", "quickly.", "Hello,", "world!", "data",
    "model", "speech", "Köln", "(really)", "don't", "1,000", "euros",
];

/// 256 pairs of 20-word sentences; each hypothesis is its reference with ~4 words replaced.
fn pairs() -> Vec<(String, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    (0..256)
        .map(|_| {
            let reference: Vec<&str> = (0..20)
                .map(|_| *WORDS.choose(&mut rng).unwrap_or(&"x"))
                .collect();
            let hyp: Vec<&str> = reference
                .iter()
                .map(|&w| {
                    if rng.random_bool(0.2) {
                        *WORDS.choose(&mut rng).unwrap_or(&"y")
                    } else {
                        w
                    }
                })
                .collect();
            (hyp.join(" "), reference.join(" "))
        })
        .collect()
}

fn pairs_per_second(metric: Metric, pairs: &[(String, String)]) -> f64 {
    let reward = metric.reward(RewardOptions::default());
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_millis(500) {
        for (h, r) in pairs {
            black_box(reward.score(black_box(h), black_box(r)));
        }
        n += pairs.len();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn bench(c: &mut Criterion) {
    let pairs = pairs();
    for metric in [
        Metric::Bleu,
        Metric::Chrf,
        Metric::ChrfPlusPlus,
        Metric::Wer,
    ] {
        println!(
            "{metric}: {:.0} pairs/second (20-word sentences, one thread)",
            pairs_per_second(metric, &pairs)
        );
    }
    let mut group = c.benchmark_group("sentence_reward_20_words");
    group.throughput(Throughput::Elements(pairs.len() as u64));
    for metric in [Metric::Bleu, Metric::Chrf] {
        let reward = metric.reward(RewardOptions::default());
        group.bench_function(metric.name(), |b| {
            b.iter(|| {
                for (h, r) in &pairs {
                    black_box(reward.score(black_box(h), black_box(r)));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
