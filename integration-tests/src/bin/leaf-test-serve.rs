//! `leaf serve` as a binary of the test package, so that the soak and fault-point tests can
//! spawn it (cargo builds a package's binaries for its tests). It runs the same
//! `serving::cli::run` with the same arguments as `leaf serve`.

use clap::Parser;

/// The `leaf serve` arguments.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    serve: leaf_plugin::serving::cli::ServeArgs,
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    // As `leaf` does.
    leaf_plugin::malloc::keep_freed_memory();
    leaf_plugin::online::gate::set_directory_check(leaf_plugin::job::held_out::open_recordings);
    leaf_plugin::serving::cli::run(Cli::parse().serve, leaf_plugin::speech::serve_audio_encoder)
}
