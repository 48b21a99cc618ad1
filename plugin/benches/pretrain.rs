//! Pre-training throughput: one supervised step (forward, cross-entropy on the answer tokens,
//! backward, clipping, Adam) of the default spoken-digit model (2 layers, d = 128, the task
//! tokenizer's vocabulary) on a batch of 16 sequences (the default) shaped like the training
//! data (about 60 prompt tokens, 5 answer tokens). Criterion reports input tokens per second;
//! a summary line prints tokens per second and seconds per step.
//!
//! The token ids are synthetic (the cost does not depend on them), so the bench runs without the
//! dataset. Short run: `cargo bench -p leaf-plugin --no-default-features --bench pretrain --
//! --warm-up-time 1 --measurement-time 5`.

use std::time::Instant;

use candle_core::{DType, Device};
use criterion::{Criterion, Throughput};
use leaf_adapters::model::{LlamaModel, ModelOptions, Trainable};
use leaf_plugin::speech::pretrain::{optimizer_for, train_step, PretrainConfig};
use leaf_plugin::speech::{EncodedExample, SpeechTokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn batch(tok: &SpeechTokenizer, n: usize) -> Vec<EncodedExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let vocab = tok.vocab_size() as u32;
    (0..n)
        .map(|_| {
            let prompt_len = rng.random_range(40..80);
            let answer_len = rng.random_range(2..9);
            EncodedExample {
                prompt: (0..prompt_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect(),
                answer: (0..answer_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect(),
                units: Vec::new(),
            }
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let config = PretrainConfig::default();
    let tok = SpeechTokenizer::for_tasks(config.units).expect("tokenizer");
    let llama = config.llama_config(&tok);
    let model = LlamaModel::random(
        &llama,
        0,
        &ModelOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::Full,
            frozen_matmul: true,
        },
    )
    .expect("model");
    let mut adam = optimizer_for(&model, &config).expect("optimizer");
    let data = batch(&tok, config.batch_size);
    let tokens: usize = data
        .iter()
        .map(|e| e.prompt.len() + e.answer.len() - 1)
        .sum();

    let mut group = c.benchmark_group("pretrain");
    group.throughput(Throughput::Elements(tokens as u64));
    group.sample_size(10);
    group.bench_function("train_step_b16_d128_l2", |b| {
        b.iter(|| train_step(&model, &mut adam, &data, 1e-4, 1.0).expect("step"))
    });
    group.finish();

    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        train_step(&model, &mut adam, &data, 1e-4, 1.0).expect("step");
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "pretrain step: {tokens} tokens in {:.3} s = {:.0} tokens/s ({} sequences)",
        secs,
        tokens as f64 / secs,
        data.len()
    );
    c.final_summary();
}
