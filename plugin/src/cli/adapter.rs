//! (being written)

use std::process::ExitCode;

/// `leaf adapter ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Placeholder.
    Inspect,
}

/// Runs the subcommand.
pub fn run(_cmd: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
