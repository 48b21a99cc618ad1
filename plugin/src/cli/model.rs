//! `leaf model`: bring a model into leaf.
//!
//! `leaf model import-gguf FILE --out DIR` turns a llama.cpp GGUF file (Llama architecture,
//! F32/F16/BF16 or quantised tensors) into a Hugging Face model directory that `leaf serve`,
//! the trainer and `transformers` load; it prints a JSON summary on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use leaf_plugin::import::import_gguf;

/// `leaf model ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Import a GGUF file (llama.cpp) as a Hugging Face model directory: dequantised f32
    /// model.safetensors, config.json, tokenizer.json, tokenizer_config.json (with the chat
    /// template) and generation_config.json.
    ImportGguf(ImportArgs),
}

/// Arguments of `leaf model import-gguf`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The GGUF file.
    file: PathBuf,
    /// The model directory to write (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `leaf model ...`.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::ImportGguf(a) => {
            let summary = import_gguf(&a.file, &a.out)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
