//! One token drawn from one row of logits: the shared sampler (`leaf_plugin::sampling`)
//! against the algorithm the serving tap used before it (kept below as `old`: log-softmax in
//! `f64` into a buffer, a prefiltered quickselect nucleus over `f64` weights, a linear draw),
//! at vocabularies of 300, 49k, 152k and 262k, top-p 1 and 0.9, on one core.
//!
//! Logits are those of the serving bench's tap measurement: uniform in [-10, 10] (a flat
//! distribution, the hard case for a nucleus: at top-p 0.9 it keeps 11 % of the vocabulary).
//!
//! `cargo bench --workspace --bench sampling`; a table of
//! microseconds per token and the old/new ratio is printed first, then criterion's figures.
//!
//! The device sampler (`leaf_plugin::sampling::device`, what the tap runs for logits on a
//! GPU) is also timed here on the CPU device at 152k, next to the host kernel in the same
//! run: a CPU figure of the device code (candle's CPU ops, one thread), not a GPU figure. It
//! prints the search rounds and host copies per token, which are what a GPU pays for in
//! synchronisations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use leaf_plugin::sampling::device::{self, DeviceDistribution};
use leaf_plugin::sampling::{Sampler, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const VOCABS: [usize; 4] = [300, 49_152, 152_064, 262_144];
const TOP_PS: [f64; 2] = [1.0, 0.9];

/// The serving bench's logits: uniform in [-10, 10) from the same fixed seed.
fn logits(vocab: usize) -> Vec<f32> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..vocab).map(|_| rng.random_range(-10.0..10.0)).collect()
}

/// The tap's sampling before the shared module, minus the recording (a private copy).
mod old {
    use rand::Rng;

    /// Reusable buffers, as the old tap kept them.
    #[derive(Default)]
    pub struct Old {
        z: Vec<f64>,
        idx: Vec<u32>,
    }

    impl Old {
        /// One draw: the id and its log-prob.
        pub fn sample<R: Rng>(
            &mut self,
            logits: &[f32],
            t: f64,
            top_p: f64,
            rng: &mut R,
        ) -> (u32, f64) {
            let v = logits.len();
            let inv_t = 1.0 / t;
            let mut max = f64::NEG_INFINITY;
            for (i, &l) in logits.iter().enumerate() {
                assert!(!(l.is_nan() || l == f32::INFINITY), "logit {i}");
                let z = l as f64 * inv_t;
                if z > max {
                    max = z;
                }
            }
            let z_of = |i: usize| logits[i] as f64 * inv_t;
            self.z.clear();
            self.z
                .extend(logits.iter().map(|&l| (l as f64 * inv_t - max).exp()));
            let sum: f64 = self.z.iter().sum();
            let lse = max + sum.ln();
            let u: f64 = rng.random();
            let (chosen, mass) = if top_p >= 1.0 {
                (draw(&self.z, 0..v, u * sum), sum)
            } else {
                let mass = top_p_nucleus(&self.z, top_p, sum, &mut self.idx);
                let members = self.idx.iter().map(|&i| i as usize);
                (draw(&self.z, members, u * mass), mass)
            };
            let renorm = if top_p >= 1.0 { 0.0 } else { (mass / sum).ln() };
            (chosen as u32, (z_of(chosen) - lse - renorm).min(0.0))
        }
    }

    fn top_p_nucleus(w: &[f64], top_p: f64, sum: f64, idx: &mut Vec<u32>) -> f64 {
        let cut = (1.0 - top_p).max(0.0) * sum / w.len() as f64;
        idx.clear();
        idx.extend(
            w.iter()
                .enumerate()
                .filter(|(_, &x)| x >= cut && x > 0.0)
                .map(|(i, _)| i as u32),
        );
        nucleus(w, top_p * sum, idx)
    }

    fn draw(probs: &[f64], members: impl Iterator<Item = usize>, target: f64) -> usize {
        let mut acc = 0.0;
        let mut last = 0;
        for i in members {
            if probs[i] <= 0.0 {
                continue;
            }
            acc += probs[i];
            last = i;
            if acc > target {
                return i;
            }
        }
        last
    }

    fn nucleus(probs: &[f64], top_p: f64, idx: &mut Vec<u32>) -> f64 {
        let mut taken = 0usize;
        let mut lo = 0usize;
        let mut hi = idx.len();
        let mut remaining = top_p;
        let mut mass = 0.0;
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ (idx.len() as u64);
        while lo < hi && remaining > 0.0 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let pivot = probs[idx[lo + (state % (hi - lo) as u64) as usize] as usize];
            if pivot <= 0.0 {
                let (g_end, _) = three_way(probs, &mut idx[lo..hi], 0.0);
                let g_mass: f64 = idx[lo..lo + g_end].iter().map(|&i| probs[i as usize]).sum();
                if g_end == 0 {
                    break;
                }
                if g_mass < remaining {
                    idx.copy_within(lo..lo + g_end, taken);
                    taken += g_end;
                    mass += g_mass;
                    break;
                }
                hi = lo + g_end;
                continue;
            }
            let (g_end, e_end) = three_way(probs, &mut idx[lo..hi], pivot);
            let g_mass: f64 = idx[lo..lo + g_end].iter().map(|&i| probs[i as usize]).sum();
            if g_mass >= remaining && g_end > 0 {
                hi = lo + g_end;
                continue;
            }
            idx.copy_within(lo..lo + g_end, taken);
            taken += g_end;
            mass += g_mass;
            remaining -= g_mass;
            let eq = &mut idx[lo + g_end..lo + e_end];
            eq.sort_unstable();
            let eq: Vec<u32> = eq.to_vec();
            let mut done = false;
            for id in eq {
                if remaining <= 0.0 {
                    done = true;
                    break;
                }
                idx[taken] = id;
                taken += 1;
                mass += pivot;
                remaining -= pivot;
            }
            if done || remaining <= 0.0 {
                break;
            }
            lo += e_end;
        }
        idx.truncate(taken);
        mass
    }

    fn three_way(probs: &[f64], ids: &mut [u32], pivot: f64) -> (usize, usize) {
        let (mut lt, mut i, mut gt) = (0usize, 0usize, ids.len());
        while i < gt {
            let p = probs[ids[i] as usize];
            if p > pivot {
                ids.swap(lt, i);
                lt += 1;
                i += 1;
            } else if p < pivot {
                gt -= 1;
                ids.swap(i, gt);
            } else {
                i += 1;
            }
        }
        (lt, gt)
    }
}

/// Microseconds per call of `f`, over about `budget`.
fn micros_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn bench(c: &mut Criterion) {
    println!("vocab    top_p  old_us   new_us   old/new");
    for &v in &VOCABS {
        let row = logits(v);
        for &top_p in &TOP_PS {
            let params = SamplingParams::new(1.0, top_p).expect("params");
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut old = old::Old::default();
            let t_old = micros_per_call(Duration::from_millis(400), || {
                black_box(old.sample(black_box(&row), 1.0, top_p, &mut rng));
            });
            let mut sampler = Sampler::new();
            let t_new = micros_per_call(Duration::from_millis(400), || {
                black_box(
                    sampler
                        .sample(black_box(&row), &params, &mut rng)
                        .expect("sample"),
                );
            });
            println!(
                "{v:<8} {top_p:<5}  {t_old:<8.1} {t_new:<8.1} {:.1}x",
                t_old / t_new
            );
        }
    }
    println!("device code on the CPU device (not a GPU figure), vocab 152064:");
    println!("top_p  host_us  device_us  device/host  rounds  copies");
    let v = 152_064;
    let row = logits(v);
    let tensor = Tensor::new(row.as_slice(), &Device::Cpu).expect("tensor");
    for &top_p in &TOP_PS {
        let params = SamplingParams::new(1.0, top_p).expect("params");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut sampler = Sampler::new();
        let t_host = micros_per_call(Duration::from_millis(400), || {
            black_box(
                sampler
                    .sample(black_box(&row), &params, &mut rng)
                    .expect("sample"),
            );
        });
        let mut work = Default::default();
        let t_dev = micros_per_call(Duration::from_millis(2000), || {
            let mut d = DeviceDistribution::new(black_box(&tensor), &params).expect("device");
            let pick = d.draw(&mut rng).expect("draw");
            black_box(device::one_hot(pick.id, &tensor).expect("one-hot"));
            work = d.work();
        });
        println!(
            "{top_p:<5}  {t_host:<8.1} {t_dev:<10.1} {:<11.1}  {:<6}  {}",
            t_dev / t_host,
            work.rounds,
            work.copies
        );
    }
    let mut group = c.benchmark_group("sampling");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for &v in &VOCABS {
        let row = logits(v);
        group.throughput(Throughput::Elements(1));
        for &top_p in &TOP_PS {
            let params = SamplingParams::new(1.0, top_p).expect("params");
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut sampler = Sampler::new();
            group.bench_function(BenchmarkId::new(format!("new/top_p={top_p}"), v), |b| {
                b.iter(|| {
                    sampler
                        .sample(black_box(&row), &params, &mut rng)
                        .expect("sample")
                })
            });
            let mut old = old::Old::default();
            group.bench_function(BenchmarkId::new(format!("old/top_p={top_p}"), v), |b| {
                b.iter(|| old.sample(black_box(&row), 1.0, top_p, &mut rng))
            });
        }
    }
    let row = logits(152_064);
    let tensor = Tensor::new(row.as_slice(), &Device::Cpu).expect("tensor");
    for &top_p in &TOP_PS {
        let params = SamplingParams::new(1.0, top_p).expect("params");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        group.bench_function(
            BenchmarkId::new(format!("device_code_on_cpu/top_p={top_p}"), 152_064),
            |b| {
                b.iter(|| {
                    let mut d =
                        DeviceDistribution::new(black_box(&tensor), &params).expect("device");
                    let pick = d.draw(&mut rng).expect("draw");
                    device::one_hot(pick.id, &tensor).expect("one-hot")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
