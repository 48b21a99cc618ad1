//! Generation with the trainer's model (`leaf_plugin::trainer::generate::generate_completions`,
//! what `leaf eval`, the held-out checks and the pass@K ceiling decode with): the prompts once
//! and one position per new token over a `KvCache`, against re-running the decoder over the
//! whole right-padded batch for every new token (what it did before, kept below as `rerun`).
//!
//! The model has the embedded default's shape (2 layers, d = 128, 4 heads, vocabulary 694),
//! random weights; 16 prompts per call, decoded greedily with no stop token, so every row
//! produces all its tokens in both. Two workloads: short answers (prompts of 60-100 tokens, 6
//! new tokens) and long ones (prompts of 200-280 tokens, 20 new tokens), each on one batch
//! (one core busy) as the evaluations' batches are.
//!
//! `cargo bench --workspace --bench generate`; a table of milliseconds per call and the
//! rerun/cached ratio is printed first (both measured in the same run), then criterion's
//! figures.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use leaf_adapters::model::{LlamaModel, ModelOptions, Pass, Trainable};
use leaf_adapters::LlamaConfig;
use leaf_plugin::trainer::generate::{generate_completions, Decoding};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// (name, prompt lengths from, to, new tokens)
const WORKLOADS: [(&str, usize, usize, usize); 2] = [("short", 60, 100, 6), ("long", 200, 280, 20)];
const PROMPTS: usize = 16;

fn model() -> LlamaModel {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 128,
        "intermediate_size": 384,
        "vocab_size": 694,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    }))
    .expect("config");
    let options = ModelOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: Trainable::Nothing,
        frozen_matmul: true,
    };
    LlamaModel::random(&config, 3, &options).expect("model")
}

fn prompts(from: usize, to: usize) -> Vec<Vec<u32>> {
    (0..PROMPTS)
        .map(|i| {
            let len = from + (to - from) * i / (PROMPTS - 1);
            (0..len)
                .map(|j| ((i * 31 + j * 7) % 690) as u32 + 1)
                .collect()
        })
        .collect()
}

/// The previous generation: every new token re-runs the decoder over the whole right-padded
/// batch and reads each row's logits at its last position.
fn rerun(model: &LlamaModel, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for _ in 0..new_tokens {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&out)
            .map(|(p, o)| p.iter().chain(o).copied().collect())
            .collect();
        let t = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = vec![0u32; rows.len() * t];
        for (r, row) in rows.iter().enumerate() {
            ids[r * t..r * t + row.len()].copy_from_slice(row);
        }
        let input = Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).expect("ids");
        let logits = model.forward(&input, &Pass::BASE).expect("forward");
        for (r, row) in rows.iter().enumerate() {
            let last: Vec<f32> = logits
                .i((r, row.len() - 1))
                .and_then(|l| l.to_vec1())
                .expect("row");
            let best = last
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            out[r].push(best.0 as u32);
        }
    }
    out
}

fn cached(model: &LlamaModel, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    generate_completions(
        model,
        prompts,
        &[],
        &Decoding::Greedy,
        new_tokens,
        PROMPTS,
        &mut rng,
    )
    .expect("generate")
}

fn millis_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn bench(c: &mut Criterion) {
    let model = model();
    // One batch runs on one thread, as each of the evaluations' parallel batches does.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    println!("workload  rerun_ms  cached_ms  rerun/cached");
    for &(name, from, to, new_tokens) in &WORKLOADS {
        let prompts = prompts(from, to);
        let (a, b) = one.install(|| {
            (
                rerun(&model, &prompts, new_tokens),
                cached(&model, &prompts, new_tokens),
            )
        });
        assert_eq!(a, b, "{name}: the two decodings disagree");
        let budget = Duration::from_secs(3);
        let t_rerun = one.install(|| {
            millis_per_call(budget, || {
                black_box(rerun(&model, black_box(&prompts), new_tokens));
            })
        });
        let t_cached = one.install(|| {
            millis_per_call(budget, || {
                black_box(cached(&model, black_box(&prompts), new_tokens));
            })
        });
        println!(
            "{name:<9} {t_rerun:>8.1}  {t_cached:>9.1}  {:>11.2}",
            t_rerun / t_cached
        );
    }
    let mut group = c.benchmark_group("generate");
    group.sample_size(10);
    for &(name, from, to, new_tokens) in &WORKLOADS {
        let prompts = prompts(from, to);
        group.bench_with_input(BenchmarkId::new("rerun", name), &prompts, |b, p| {
            b.iter(|| one.install(|| rerun(&model, p, new_tokens)))
        });
        group.bench_with_input(BenchmarkId::new("cached", name), &prompts, |b, p| {
            b.iter(|| one.install(|| cached(&model, p, new_tokens)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
