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
    #[cfg(feature = "speech")]
    #[command(subcommand)]
    Units(cli::units::Command),
    /// Bring a model into leaf: import a GGUF file as a Hugging Face model directory.
    #[command(subcommand)]
    Model(cli::model::Command),
    /// Train the small spoken-digit speech LM from scratch and write its model directory.
    #[cfg(feature = "speech")]
    Pretrain(cli::pretrain::Args),
    /// Evaluate a model directory on the spoken-digit tasks; prints one JSON object.
    #[cfg(feature = "speech")]
    Eval(cli::eval::Args),
    /// Serve a model through mistral.rs with harvesting, online training, hot-swap and an
    /// OpenAI-compatible HTTP API.
    #[cfg(feature = "serve")]
    Serve(leaf_plugin::serving::cli::ServeArgs),
    /// The main job: serve, replay traffic, train continually, hot-swap, evaluate, report.
    #[cfg(all(feature = "serve", feature = "speech"))]
    Run(cli::run::Args),
    /// Offline training from logged groups (JSON Lines): the learner of `leaf serve
    /// --online`, publishing every version to a store; resumes from the store's checkpoint.
    #[cfg(feature = "serve")]
    Train(cli::train::Args),
    /// LEAF against GRPO on the same budget over several seeds: table and figure.
    #[cfg(all(feature = "serve", feature = "speech"))]
    Compare(cli::compare::Args),
}

fn main() -> ExitCode {
    cli::init_tracing();
    leaf_plugin::malloc::keep_freed_memory();
    // `--gate-data DIR` (leaf serve --online, leaf train) means spoken-digit recordings.
    #[cfg(all(feature = "serve", feature = "speech"))]
    leaf_plugin::online::gate::set_directory_check(leaf_plugin::job::held_out::open_recordings);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Advantages(args) => cli::advantages::run(args),
        Command::Reward(args) => cli::reward::run(args),
        Command::Adapter(cmd) => cli::adapter::run(cmd),
        Command::BenchTrain(args) => cli::bench_train::run(args),
        #[cfg(feature = "speech")]
        Command::Units(cmd) => cli::units::run(cmd),
        Command::Model(cmd) => cli::model::run(cmd),
        #[cfg(feature = "speech")]
        Command::Pretrain(args) => cli::pretrain::run(args),
        #[cfg(feature = "speech")]
        Command::Eval(args) => cli::eval::run(args),
        #[cfg(all(feature = "serve", feature = "speech"))]
        Command::Serve(args) => {
            leaf_plugin::serving::cli::run(args, leaf_plugin::speech::serve_audio_encoder)
        }
        #[cfg(all(feature = "serve", not(feature = "speech")))]
        Command::Serve(args) => leaf_plugin::serving::cli::run(args, no_audio_encoder),
        #[cfg(all(feature = "serve", feature = "speech"))]
        Command::Run(args) => cli::run::run(args),
        #[cfg(feature = "serve")]
        Command::Train(args) => cli::train::run(args),
        #[cfg(all(feature = "serve", feature = "speech"))]
        Command::Compare(args) => cli::compare::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leaf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `leaf serve` without the `speech` feature: no audio front-end, so audio parts are refused
/// (400) and `--units` is an error.
#[cfg(all(feature = "serve", not(feature = "speech")))]
fn no_audio_encoder(
    _model_dir: &std::path::Path,
    units: Option<&std::path::Path>,
) -> anyhow::Result<Option<std::sync::Arc<dyn leaf_plugin::serving::AudioEncoder>>> {
    match units {
        Some(p) => anyhow::bail!(
            "--units {}: this leaf is built without the `speech` feature (the unit codebook)",
            p.display()
        ),
        None => Ok(None),
    }
}
