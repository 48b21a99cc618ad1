//! `leaf units fit` and `leaf units encode`: the discrete-unit codebook from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use leaf_plugin::audio::{FrontEnd, FrontEndConfig};
use leaf_plugin::speech::tasks::{Corpus, Split, DEFAULT_DATA_DIR};
use leaf_plugin::speech::units::{corpus_frames, Codebook, KMeansConfig, DEFAULT_POOL};
use leaf_plugin::speech::{collapse, UnitEncoder};

/// `leaf units ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Fit a k-means unit codebook on the training takes (5 and up) of a recordings folder and
    /// print a JSON summary.
    Fit(FitArgs),
    /// Print the units of a WAV file as JSON.
    Encode(EncodeArgs),
}

/// Arguments of `leaf units fit`.
#[derive(clap::Args)]
pub struct FitArgs {
    /// Folder of recordings named `{digit}_{speaker}_{take}.wav`.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data: PathBuf,
    /// Where to write the codebook (JSON; put it next to the model as `units.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of units.
    #[arg(long, default_value_t = 128)]
    pub k: usize,
    /// Seed of the k-means++ initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most Lloyd iterations.
    #[arg(long, default_value_t = 50)]
    pub max_iters: usize,
    /// Log-mel frames averaged per unit frame.
    #[arg(long, default_value_t = DEFAULT_POOL)]
    pub pool: usize,
    /// Leave this speaker's recordings out of the fit.
    #[arg(long)]
    pub holdout_speaker: Option<String>,
    /// Worker threads (0 = all cores); the result does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Arguments of `leaf units encode`.
#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The WAV file.
    pub file: PathBuf,
    /// The codebook written by `leaf units fit`.
    #[arg(long)]
    pub codebook: PathBuf,
    /// Keep repeated units (one per pooled frame).
    #[arg(long)]
    pub no_collapse: bool,
}

/// Runs the subcommand.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Fit(a) => fit(a),
        Command::Encode(a) => encode(a),
    }
}

fn fit(a: FitArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let corpus = Corpus::open(&a.data)?;
    let mut train = corpus.split(Split::Train);
    if let Some(s) = &a.holdout_speaker {
        if !train.speakers().contains(s) {
            anyhow::bail!(
                "--holdout-speaker {s}: no such speaker in {}",
                a.data.display()
            );
        }
        train = train.filter(|c| &c.speaker != s);
    }
    if train.is_empty() {
        anyhow::bail!("{} has no training takes (5 and up)", a.data.display());
    }
    let frontend = FrontEnd::new(FrontEndConfig::default())?;
    let frames = corpus_frames(&train, &frontend, a.pool, a.threads)?;
    let featurised = started.elapsed().as_secs_f64();
    let config = KMeansConfig {
        k: a.k,
        seed: a.seed,
        max_iters: a.max_iters,
        threads: a.threads,
        ..KMeansConfig::default()
    };
    let codebook = Codebook::fit(&frames, frontend.config().clone(), a.pool, &config)?;
    codebook.save(&a.out)?;
    let report = codebook.report();
    let summary = serde_json::json!({
        "out": a.out,
        "k": codebook.k(),
        "dims": codebook.dims(),
        "pool": codebook.pool(),
        "seed": a.seed,
        "clips": train.len(),
        "speakers": train.speakers(),
        "frames": report.map(|r| r.frames),
        "iterations": report.map(|r| r.iterations),
        "converged": report.map(|r| r.converged),
        "inertia": report.map(|r| r.inertia),
        "featurise_seconds": featurised,
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn encode(a: EncodeArgs) -> anyhow::Result<ExitCode> {
    let encoder = UnitEncoder::load(&a.codebook)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let audio = encoder
        .frontend()
        .decode(&bytes)
        .with_context(|| a.file.display().to_string())?;
    let frames = encoder.frame_units(&audio)?;
    let units = if a.no_collapse {
        frames.clone()
    } else {
        collapse(&frames)
    };
    let out = serde_json::json!({
        "file": a.file,
        "seconds": audio.seconds(),
        "sample_rate": audio.sample_rate(),
        "frames": frames.len(),
        "collapsed": !a.no_collapse,
        "units": units,
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
