//! Embedding leaf in your own mistral.rs server: start the plugin on a model directory, send a
//! spoken-digit request with its reference, and let the online trainer learn from the traffic.
//!
//! ```sh
//! cargo run --release -p leaf-examples --bin embed -- [MODEL_DIR] [REQUESTS]
//! ```
//!
//! Without `MODEL_DIR` it uses (and, the first time, trains) the cached default speech LM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use leaf_plugin::harvest::ReferenceReward;
use leaf_plugin::online::{OnlineConfig, OnlineTrainer};
use leaf_plugin::reward::{Metric, RewardOptions};
use leaf_plugin::serving::{ChatRequest, LeafServer, Message, Part, ServerConfig};
use leaf_plugin::speech::numbers::english;
use leaf_plugin::speech::pretrain::{default_data_dir, ensure_default_model};
use leaf_plugin::trainer::TrainConfig;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data = default_data_dir()?;
    let model = match args.next() {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::temp_dir().join("leaf-example-cache");
            ensure_default_model(&cache, &data, true)?
        }
    };
    let requests: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(16);
    let store = std::env::temp_dir().join("leaf-example-store");

    // 1. The plugin: the one door requests go through. It owns the engine.
    let mut config = ServerConfig::new(&model);
    config.store_dir = Some(store);
    config.audio_encoder = leaf_plugin::speech::serve_audio_encoder(&model, None)?;
    config.assembler.group_size = 4;
    config.group_policy.fork_fraction = 1.0; // draw K - 1 extra samples for every request
    let reward = Arc::new(ReferenceReward::new(Metric::Bleu, RewardOptions::default()));
    let (server, sealed_groups) = LeafServer::start(config, reward).await?;

    // 2. The online trainer: sealed groups -> LEAF advantages -> LoRA updates -> hot-swap.
    let online = OnlineConfig {
        publish_every: 2,
        train: TrainConfig {
            learning_rate: 2e-3,
            ..TrainConfig::default()
        },
        ..OnlineConfig::default()
    };
    let trainer = OnlineTrainer::spawn(
        server.clone(),
        sealed_groups,
        online,
        tokio::runtime::Handle::current(),
    )?;

    // 3. Traffic: audio in, text out; the reference becomes the reward.
    for i in 0..requests {
        let digit = i % 10;
        let word = english(digit as u32).expect("a digit has a word");
        let wav = std::fs::read(data.join(format!("{digit}_jackson_{}.wav", 5 + i / 10)))
            .context("reading a recording")?;
        let reply = server
            .chat(ChatRequest {
                messages: vec![Message {
                    role: "user".into(),
                    content: vec![Part::Wav(wav), Part::Text("Transcribe the audio.".into())],
                }],
                reference: Some(word.into()),
                ..ChatRequest::default()
            })
            .await?;
        let text = reply.response.choices[0]
            .message
            .content
            .clone()
            .unwrap_or_default();
        println!(
            "{:>3}  ref {:<6} got {:<24} adapter {}",
            i,
            word,
            format!("{text:?}"),
            reply.adapter_version
        );
    }

    let status = server.status();
    println!("{}", serde_json::to_string_pretty(&status)?);
    let report = tokio::task::spawn_blocking(move || trainer.shutdown()).await??;
    println!("trainer: {}", serde_json::to_string(&report)?);
    server.shutdown(std::time::Duration::from_secs(30)).await;
    Ok(())
}
