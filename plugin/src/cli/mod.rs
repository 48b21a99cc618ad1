//! One module per `leaf` subcommand; each exposes `Args` (clap) and `run`. Those of the
//! spoken-digit workload (units, pretrain, eval, run, compare) need the `speech` feature.

pub mod adapter;
pub mod advantages;
pub mod bench_train;
#[cfg(all(feature = "serve", feature = "speech"))]
pub mod compare;
#[cfg(feature = "speech")]
pub mod eval;
pub mod jsonl;
pub mod model;
#[cfg(feature = "speech")]
pub mod pretrain;
pub mod reward;
#[cfg(all(feature = "serve", feature = "speech"))]
pub mod run;
#[cfg(feature = "serve")]
pub mod train;
#[cfg(feature = "speech")]
pub mod units;

/// Logs go to stderr (stdout carries the JSON results); `RUST_LOG` filters them.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
