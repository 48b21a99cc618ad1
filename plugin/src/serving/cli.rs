//! `leaf serve`: the plugin, its HTTP API and (optionally) the online trainer in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::http::{serve, HttpConfig};
use super::server::{LeafServer, ServerConfig};
use crate::harvest::ReferenceReward;
use crate::online::{OnlineConfig, OnlineTrainer};
use crate::reward::{Metric, RewardOptions};

/// Arguments of `leaf serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The base model directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// The versioned adapter store; its current version is served at start.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The only directory `POST /v1/load_lora_adapter` may read from (disabled without it).
    #[arg(long)]
    pub adapter_root: Option<PathBuf>,
    /// Address to listen on. Without --admin-token only loopback addresses are accepted.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer token required by the mutating endpoints.
    #[arg(long)]
    pub admin_token: Option<String>,
    /// A JSON `ServerConfig` (every field but `model_dir` optional) for the finer settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unit codebook for audio prompts.
    #[arg(long)]
    pub units: Option<PathBuf>,
    /// Reward metric against the `leaf.reference` of a request.
    #[arg(long, value_enum, default_value = "bleu")]
    pub metric: Metric,
    /// Run the online trainer with this JSON `OnlineConfig` (needs --store).
    #[arg(long)]
    pub online: Option<PathBuf>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs the server until Ctrl-C, then shuts the trainer and the server down cleanly.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(p) => {
            let mut v: serde_json::Value = read_json(p)?;
            if let Some(map) = v.as_object_mut() {
                map.insert(
                    "model_dir".into(),
                    serde_json::Value::String(args.model.to_string_lossy().into_owned()),
                );
            }
            serde_json::from_value(v).context("server config")?
        }
        None => ServerConfig::new(&args.model),
    };
    if args.store.is_some() {
        config.store_dir = args.store.clone();
    }
    if args.units.is_some() {
        config.unit_codebook = args.units.clone();
    }
    let online: Option<OnlineConfig> = args.online.as_ref().map(read_json).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let reward = Arc::new(ReferenceReward::new(args.metric, RewardOptions::default()));
        let (server, groups) = LeafServer::start(config, reward).await?;
        let trainer = match online {
            Some(cfg) => Some(OnlineTrainer::spawn(
                server.clone(),
                groups,
                cfg,
                tokio::runtime::Handle::current(),
            )?),
            None => {
                // Nobody trains: keep the queue drained so sealed groups are not counted as
                // drops forever.
                std::thread::spawn(move || while groups.recv().is_ok() {});
                None
            }
        };
        let http = HttpConfig {
            admin_token: args.admin_token.clone(),
            adapter_root: args.adapter_root.clone(),
            max_body_bytes: 0,
        };
        eprintln!(
            "leaf: serving {} on http://{} (version {})",
            server.model().dir().display(),
            args.listen,
            server.current_version()
        );
        tokio::select! {
            r = serve(server.clone(), http, args.listen) => r?,
            _ = tokio::signal::ctrl_c() => eprintln!("leaf: shutting down"),
        }
        server.shutdown(Duration::from_secs(30)).await;
        if let Some(t) = trainer {
            let report = tokio::task::spawn_blocking(move || t.shutdown()).await??;
            eprintln!(
                "leaf: trainer stopped after {} updates, {} versions published",
                report.updates,
                report.published.len()
            );
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
