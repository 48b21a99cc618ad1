//! `leaf bench-train`: times full LoRA training steps (forward, backward, Adam) on a random
//! Llama-family model and prints one JSON line with tokens per second; with `--compare-torch`
//! it also times the same step in PyTorch on the CPU (`examples/bench/torch_train_step.py`,
//! compiled into the binary) in the same run and reports the ratio.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use leaf_plugin::trainer::synthetic::{default_intermediate, BenchShape};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Model width d.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (prompt + completion).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// LoRA rank (alpha = 2 * rank) on all seven projections.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// MLP width [default: 8d/3 rounded up to a multiple of 64].
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads [default: d / 64, at least 1].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads [default: the number of heads].
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Prompt tokens per sequence (the rest is trained on).
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Sequences per forward/backward pass [default: the whole batch].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Compute dtype: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, or cuda / cuda:N (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also time the same steps with candle's plain matmul for frozen weights and report the
    /// frozen-matmul speed-up.
    #[arg(long)]
    pub compare_plain: bool,
    /// Also time the same step in PyTorch on the CPU (`examples/bench/torch_train_step.py`,
    /// run with `--torch-python`) and report `torch_tokens_per_second` and `speedup_vs_torch`.
    /// The two are timed alternately, `--rounds` times each, and the best round of each counts.
    #[arg(long)]
    pub compare_torch: bool,
    /// Python interpreter with `torch` installed, for `--compare-torch`.
    #[arg(long, default_value = "python3")]
    pub torch_python: String,
    /// Threads PyTorch may use (`torch.set_num_threads`), for `--compare-torch`
    /// [default: the number of CPUs, as candle uses].
    #[arg(long)]
    pub torch_threads: Option<usize>,
    /// Alternating rounds of leaf and PyTorch timings, for `--compare-torch`.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seed of the weights and samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The PyTorch baseline script, run from memory so the binary needs no source tree.
const TORCH_SCRIPT: &str = include_str!("../../../examples/bench/torch_train_step.py");

/// Seconds per step of the PyTorch baseline on `shape` (one run of the script).
fn torch_step_secs(args: &Args, shape: &BenchShape) -> anyhow::Result<f64> {
    let threads = args
        .torch_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let numbers = [
        ("--layers", shape.layers),
        ("--hidden", shape.hidden),
        ("--intermediate", shape.intermediate),
        ("--heads", shape.heads),
        ("--vocab", shape.vocab),
        ("--batch", shape.batch),
        ("--seq", shape.seq),
        ("--prompt-len", shape.prompt_len),
        ("--rank", shape.rank),
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--threads", threads),
    ];
    let mut cmd = Command::new(&args.torch_python);
    cmd.arg("-").arg("--dropout").arg(shape.dropout.to_string());
    for (flag, v) in numbers {
        cmd.arg(flag).arg(v.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?} for --compare-torch", args.torch_python))?;
    child
        .stdin
        .take()
        .context("no stdin for the PyTorch script")?
        .write_all(TORCH_SCRIPT.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "the PyTorch baseline failed ({}); is torch installed for {:?}? {}",
            out.status,
            args.torch_python,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the PyTorch baseline printed {line:?}, not JSON"))?;
    v["seconds_per_step"]
        .as_f64()
        .context("the PyTorch baseline printed no seconds_per_step")
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f64" => DType::F64,
        other => bail!("unknown dtype {other:?} (expected f32, f16, bf16 or f64)"),
    })
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("bad device {s:?} (expected cpu, cuda or cuda:N)"))?,
        None => bail!("unknown device {s:?} (expected cpu, cuda or cuda:N)"),
    };
    Device::new_cuda(ordinal).with_context(|| format!("cannot open {s}"))
}

/// Seconds per step of `steps` timed steps after `warmup` untimed ones.
fn time_steps(shape: &BenchShape, warmup: usize, steps: usize) -> anyhow::Result<(f64, usize)> {
    let mut trainer = shape.trainer()?;
    let samples = shape.samples(shape.seed.wrapping_add(1));
    for _ in 0..warmup {
        trainer.step(&samples)?;
    }
    shape.device.synchronize()?;
    let start = Instant::now();
    let mut trained = 0;
    for _ in 0..steps {
        trained = trainer.step(&samples)?.tokens;
    }
    shape.device.synchronize()?;
    Ok((start.elapsed().as_secs_f64() / steps as f64, trained))
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    for (name, v) in [
        ("--layers", args.layers),
        ("--hidden", args.hidden),
        ("--vocab", args.vocab),
        ("--batch", args.batch),
        ("--rank", args.rank),
        ("--steps", args.steps),
        ("--rounds", args.rounds),
    ] {
        if v == 0 {
            bail!("{name} must be positive");
        }
    }
    if args.seq < 2 {
        bail!("--seq must be at least 2 (one prompt and one completion token)");
    }
    let heads = args.heads.unwrap_or((args.hidden / 64).max(1));
    let shape = BenchShape {
        layers: args.layers,
        hidden: args.hidden,
        intermediate: args
            .intermediate
            .unwrap_or_else(|| default_intermediate(args.hidden)),
        heads,
        kv_heads: args.kv_heads.unwrap_or(heads),
        vocab: args.vocab,
        batch: args.batch,
        seq: args.seq,
        prompt_len: args.prompt_len,
        rank: args.rank,
        dropout: args.dropout,
        micro_batch: args.micro_batch.unwrap_or(args.batch),
        frozen_matmul: true,
        dtype: parse_dtype(&args.dtype)?,
        device: parse_device(&args.device)?,
        seed: args.seed,
    };
    shape
        .model_config()
        .check()
        .map_err(|e| anyhow::anyhow!("model shape: {e}"))?;
    let trainable: usize = shape
        .trainer()?
        .model()
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    if args.compare_torch
        && (shape.kv_heads != shape.heads || args.dtype != "f32" || args.device != "cpu")
    {
        bail!("--compare-torch times f32 on the CPU without grouped-query attention: use --dtype f32 --device cpu and no --kv-heads");
    }
    let (mut secs, trained) = time_steps(&shape, args.warmup, args.steps)?;
    let mut torch_secs = None;
    if args.compare_torch {
        // Alternate so that load from other processes hits both alike; keep the best of each.
        let mut best = torch_step_secs(&args, &shape)?;
        for _ in 1..args.rounds {
            secs = secs.min(time_steps(&shape, args.warmup, args.steps)?.0);
            best = best.min(torch_step_secs(&args, &shape)?);
        }
        torch_secs = Some(best);
    }
    let tokens = shape.tokens_per_step() as f64;
    let mut out = serde_json::json!({
        "tokens_per_second": tokens / secs,
        "completion_tokens_per_second": trained as f64 / secs,
        "seconds_per_step": secs,
        "steps": args.steps,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "vocab": shape.vocab,
        "batch": shape.batch,
        "seq": shape.seq,
        "prompt_len": shape.prompt_len,
        "rank": shape.rank,
        "micro_batch": shape.micro_batch,
        "dropout": shape.dropout,
        "trainable_parameters": trainable,
        "dtype": args.dtype,
        "device": args.device,
    });
    if args.compare_plain {
        let plain = BenchShape {
            frozen_matmul: false,
            ..shape.clone()
        };
        let (plain_secs, _) = time_steps(&plain, args.warmup, args.steps)?;
        out["plain_matmul_tokens_per_second"] = serde_json::json!(tokens / plain_secs);
        out["frozen_matmul_speedup"] = serde_json::json!(plain_secs / secs);
    }
    if let Some(t) = torch_secs {
        out["torch_tokens_per_second"] = serde_json::json!(tokens / t);
        out["speedup_vs_torch"] = serde_json::json!(t / secs);
        out["rounds"] = serde_json::json!(args.rounds);
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
