//! LEAF vs GRPO advantage throughput, and LEAF vs the pure-Python reference of the spec.
//!
//! `cargo bench -p leaf-plugin --bench advantages` runs the criterion groups, then prints a
//! summary measured in the same run: tokens per second on one core, LEAF's time as a
//! multiple of GRPO's, and LEAF's speed-up over `benches/leaf_reference.py` on the same groups
//! (skipped with a note when `python3` is not installed).
//!
//! With glibc, heap trimming is turned off first: otherwise freeing a K = 64 x 1,000 group's
//! output (512 KB) can hand the top of the heap back to the OS and the next group page-faults
//! it in again, in LEAF and GRPO alike; whether that happens depends on the heap layout of the
//! build, and it then dominates both timings (measured: 160-250 us per group instead of
//! 10-35 us). A trainer that frees its advantages group by group can set
//! `MALLOC_TRIM_THRESHOLD_` the same way.

use std::hint::black_box;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use leaf_plugin::advantage::synthetic::{synthetic_group, SyntheticSpec};
use leaf_plugin::advantage::{AdvantageEstimator, Grpo, Leaf};
use leaf_plugin::rollout::Group;

const SHAPES: [(usize, usize); 2] = [(8, 200), (64, 1000)];

fn groups(k: usize, len: usize) -> Vec<Group> {
    let spec = SyntheticSpec {
        responses: k,
        mean_len: len,
        vocab: 8,
        reward_levels: 5,
    };
    (0..16)
        .map(|s| synthetic_group(format!("g{s}"), spec, s))
        .collect()
}

fn tokens(groups: &[Group]) -> u64 {
    groups
        .iter()
        .flat_map(|g| g.rollouts())
        .map(|r| r.len() as u64)
        .sum()
}

fn bench(c: &mut Criterion) {
    for (k, len) in SHAPES {
        let gs = groups(k, len);
        let mut group = c.benchmark_group(format!("advantages_k{k}_len{len}"));
        group.throughput(Throughput::Elements(tokens(&gs)));
        let leaf = Leaf::default();
        group.bench_function("leaf", |b| {
            b.iter(|| gs.iter().for_each(|g| drop(black_box(leaf.estimate(g)))))
        });
        group.bench_function("grpo", |b| {
            b.iter(|| gs.iter().for_each(|g| drop(black_box(Grpo.estimate(g)))))
        });
        group.finish();
    }
}

/// Median seconds per group of `est` over several timed batches.
fn seconds_per_group(est: &dyn AdvantageEstimator, gs: &[Group]) -> f64 {
    let mut samples = Vec::new();
    let budget = Instant::now();
    while samples.len() < 15
        || (budget.elapsed() < Duration::from_millis(500) && samples.len() < 200)
    {
        let t = Instant::now();
        for g in gs {
            black_box(est.estimate(black_box(g)));
        }
        samples.push(t.elapsed().as_secs_f64() / gs.len() as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Seconds per group of the Python reference, or why it could not run.
fn python_seconds_per_group(gs: &[Group]) -> Result<f64, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/leaf_reference.py");
    let repeat = if gs[0].len() > 8 { "1" } else { "20" };
    let mut child = Command::new("python3")
        .args([script, "--time", repeat])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3 not available ({e})"))?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for g in gs {
            let line = serde_json::json!({ "group_id": g.id(), "rollouts": g.rollouts() });
            writeln!(stdin, "{line}").map_err(|e| e.to_string())?;
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad output: {e}"))?;
    v["seconds_per_group"]
        .as_f64()
        .ok_or_else(|| "no seconds_per_group".to_string())
}

fn summary() {
    println!("\nsummary (one core, same run):");
    for (k, len) in SHAPES {
        let gs = groups(k, len);
        let tok_per_group = tokens(&gs) as f64 / gs.len() as f64;
        let leaf = seconds_per_group(&Leaf::default(), &gs);
        let grpo = seconds_per_group(&Grpo, &gs);
        print!(
            "  K={k:<3} len={len:<5} LEAF {:>8.2} us/group {:>7.1} M tok/s | GRPO {:>8.2} us/group {:>7.1} M tok/s | LEAF/GRPO time {:.2}x",
            leaf * 1e6,
            tok_per_group / leaf / 1e6,
            grpo * 1e6,
            tok_per_group / grpo / 1e6,
            leaf / grpo
        );
        match python_seconds_per_group(&gs) {
            Ok(py) => println!(
                " | Python {:>10.1} us/group, LEAF speed-up {:.0}x",
                py * 1e6,
                py / leaf
            ),
            Err(why) => println!(" | Python reference skipped: {why}"),
        }
    }
}

criterion_group!(benches, bench);

/// Keeps freed memory in the process (see the module docs).
fn no_heap_trimming() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any timing.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    no_heap_trimming();
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
