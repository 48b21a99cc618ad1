//! One LoRA training step (forward, backward, Adam) and the frozen-weight matmul.
//!
//! `cargo bench -p leaf-plugin --no-default-features --bench train_step` runs the criterion
//! groups on the reference shape (4 layers, d = 256, vocab 1,024, 8 sequences of 128
//! tokens, LoRA rank 16 on all seven targets, f32 on the CPU), then prints a summary measured
//! in the same run: tokens per second, and the frozen-weight matmul's speed-up over candle's
//! plain matmul, both for a whole training step and for one linear layer's forward + backward.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, Criterion, Throughput};
use leaf_adapters::model::frozen_linear;
use leaf_plugin::trainer::synthetic::BenchShape;
use leaf_plugin::trainer::Trainer;

fn shape(frozen_matmul: bool) -> BenchShape {
    BenchShape {
        frozen_matmul,
        ..BenchShape::reference()
    }
}

fn setup(frozen_matmul: bool) -> (Trainer, Vec<leaf_plugin::trainer::TrainSample>) {
    let s = shape(frozen_matmul);
    let mut trainer = s.trainer().expect("reference trainer builds");
    let samples = s.samples(1);
    trainer.step(&samples).expect("warm-up step");
    (trainer, samples)
}

/// The linear layer of the MLP (`[1024, 256] x [704, 256]^T`) with its backward pass.
struct Linear {
    x: Var,
    w: Tensor,
    probe: Tensor,
}

impl Linear {
    fn new() -> Self {
        let s = BenchShape::reference();
        let rows = s.batch * s.seq;
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, s.hidden), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 0.02, (s.intermediate, s.hidden), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (rows, s.intermediate), &dev).unwrap();
        Linear { x, w, probe }
    }

    fn run(&self, frozen: bool) {
        let y = if frozen {
            frozen_linear(self.x.as_tensor(), &self.w).unwrap()
        } else {
            self.x.as_tensor().matmul(&self.w.t().unwrap()).unwrap()
        };
        let grads = y
            .mul(&self.probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        black_box(grads);
    }
}

fn bench(c: &mut Criterion) {
    let tokens = BenchShape::reference().tokens_per_step() as u64;
    let mut group = c.benchmark_group("train_step_l4_d256_v1024_b8x128_r16");
    group.throughput(Throughput::Elements(tokens));
    group.sample_size(10);
    for (name, frozen) in [("frozen_matmul", true), ("plain_matmul", false)] {
        let (mut trainer, samples) = setup(frozen);
        group.bench_function(name, |b| {
            b.iter(|| black_box(trainer.step(&samples).unwrap()));
        });
    }
    group.finish();

    let linear = Linear::new();
    let mut group = c.benchmark_group("linear_fwd_bwd_1024x256x704");
    for (name, frozen) in [("frozen_matmul", true), ("plain_matmul", false)] {
        group.bench_function(name, |b| b.iter(|| linear.run(frozen)));
    }
    group.finish();
}

/// Median seconds of `f` over at least `min` runs (and up to `budget`).
fn median_secs(min: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < min || (start.elapsed() < budget && samples.len() < 200) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn summary() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let tokens = BenchShape::reference().tokens_per_step() as f64;
    let (mut frozen, samples) = setup(true);
    let (mut plain, _) = setup(false);
    // Interleave the two so load changes on the machine hit both alike.
    let mut f_times = Vec::new();
    let mut p_times = Vec::new();
    for _ in 0..5 {
        f_times.push(median_secs(1, Duration::ZERO, || {
            black_box(frozen.step(&samples).unwrap());
        }));
        p_times.push(median_secs(1, Duration::ZERO, || {
            black_box(plain.step(&samples).unwrap());
        }));
    }
    f_times.sort_by(f64::total_cmp);
    p_times.sort_by(f64::total_cmp);
    let (f_step, p_step) = (f_times[2], p_times[2]);
    let linear = Linear::new();
    let f_lin = median_secs(20, Duration::from_millis(500), || linear.run(true));
    let p_lin = median_secs(20, Duration::from_millis(500), || linear.run(false));
    println!(
        "train step (4 layers, d=256, vocab 1024, 8x128 tokens, LoRA r=16 x 7 targets, f32, CPU):"
    );
    println!(
        "  frozen matmul: {:.1} ms/step, {:.0} tokens/s | plain matmul: {:.1} ms/step, {:.0} tokens/s | frozen-matmul speed-up x{:.2}",
        f_step * 1e3,
        tokens / f_step,
        p_step * 1e3,
        tokens / p_step,
        p_step / f_step
    );
    println!(
        "  one linear layer fwd+bwd (1024x256 -> 704): frozen {:.2} ms, plain {:.2} ms, speed-up x{:.2}",
        f_lin * 1e3,
        p_lin * 1e3,
        p_lin / f_lin
    );
}

criterion_group!(benches, bench);

fn main() {
    leaf_plugin::malloc::keep_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
