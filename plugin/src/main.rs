//! `leaf`: the command-line front of the leaf plugin.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Continual LEAF post-training for speech LLMs served by mistral.rs.
#[derive(Parser)]
#[command(name = "leaf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token advantages (LEAF or GRPO) for groups read as JSON Lines.
    Advantages(cli::advantages::Args),
    /// Score hypotheses against references (BLEU, chrF, WER, CER, exact match).
    Reward(cli::reward::Args),
    /// Validate or inspect a PEFT LoRA adapter.
    #[command(subcommand)]
    Adapter(cli::adapter::Command),
    /// Time one LoRA training step and print tokens per second as JSON.
    BenchTrain(cli::bench_train::Args),
    /// Fit the discrete-unit codebook, or print the units of a WAV file.
    #[command(subcommand)]
    Units(cli::units::Command),
    /// Train the small spoken-digit speech LM from scratch and write its model directory.
    Pretrain(cli::pretrain::Args),
    /// Evaluate a model directory on the spoken-digit tasks; prints one JSON object.
    Eval(cli::eval::Args),
}

fn main() -> ExitCode {
    cli::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Advantages(args) => cli::advantages::run(args),
        Command::Reward(args) => cli::reward::run(args),
        Command::Adapter(cmd) => cli::adapter::run(cmd),
        Command::BenchTrain(args) => cli::bench_train::run(args),
        Command::Units(cmd) => cli::units::run(cmd),
        Command::Pretrain(args) => cli::pretrain::run(args),
        Command::Eval(args) => cli::eval::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leaf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
