//! The serving plugin: the one door requests go through on their way into mistral.rs.
//!
//! [`LeafServer`] wraps an `Arc<MistralRs>` and owns everything the engine's sharp edges
//! (`../shared/MISTRALRS-0.8.1-NOTES.md`) would otherwise expose:
//!
//! * every request carries its own [`crate::harvest::SamplingTap`] and is pinned to the engine
//!   of one adapter version (`policy@k`), so each harvested sample records the version that
//!   produced it; the engine runs greedy on the tap's one-hot logits;
//! * the response receiver is moved into a task that drains it to the end, so a client that
//!   goes away (its future dropped) can never drop the receiver early; it cancels through the
//!   tap, which forces the stop token;
//! * engines run without the prefix cache, so the tap's first context is the whole prompt;
//! * versions are loaded on a brand-new thread with the thread-local LoRA list cleared
//!   ([`model::load_pipeline`]), validated, probed, added, made the default; the old engine
//!   is drained and removed on the blocking pool (`remove_model` is never reachable from async
//!   code), then `malloc_trim(0)` hands its memory back;
//! * a version that fails to load, validate or answer the probe is removed again and the
//!   current version keeps serving.
//!
//! Embedding it in your own server takes a few lines:
//!
//! ```no_run
//! # async fn demo() -> Result<(), leaf_plugin::serving::ServeError> {
//! use std::sync::Arc;
//! use leaf_plugin::harvest::ReferenceReward;
//! use leaf_plugin::online::{OnlineConfig, OnlineTrainer};
//! use leaf_plugin::reward::{Metric, RewardOptions};
//! use leaf_plugin::serving::{ChatRequest, LeafServer, Message, ServerConfig};
//!
//! let mut config = ServerConfig::new("model-dir");
//! config.store_dir = Some("adapter-store".into());
//! let reward = Arc::new(ReferenceReward::new(Metric::Bleu, RewardOptions::default()));
//! let (server, groups) = LeafServer::start(config, reward).await?;
//! let trainer = OnlineTrainer::spawn(
//!     server.clone(),
//!     groups,
//!     OnlineConfig::default(),
//!     tokio::runtime::Handle::current(),
//! )?;
//! let reply = server
//!     .chat(ChatRequest {
//!         messages: vec![Message::text("user", "What is seven plus one?")],
//!         reference: Some("eight".into()),
//!         ..ChatRequest::default()
//!     })
//!     .await?;
//! println!("{:?} from {}", reply.response.choices[0].message.content, reply.adapter_version);
//! // Serve HTTP too: leaf_plugin::serving::http::serve(server, http_config, addr).await
//! # drop(trainer);
//! # Ok(())
//! # }
//! ```
//!
//! **The leaked thread.** Each engine mistral.rs creates starts an interval-logger thread that
//! never exits (it sleeps 5 s in a loop; about 8 KiB resident, 2 MiB virtual stack), and a swap
//! leaves about 2 MiB more resident besides (measured by the soak test). Neither can be handed
//! back inside the process, so `leaf serve` restarts itself in place after
//! [`ServerConfig::recycle_after_engines`] engines (default 64): it stops accepting, finishes
//! the open requests, and `exec`s itself with the listening socket handed over
//! ([`restart`]); clients only see a pause. Every `add_model` counts
//! ([`ServerStatus::leaked_threads`]). An embedding that does not restart is bounded by
//! [`ServerConfig::max_swaps`] instead: past it forward swaps are refused with
//! [`ServeError::SwapLimit`]; rollbacks never are.
//!
//! **Swaps run to completion.** [`LeafServer::promote`], [`LeafServer::rollback`],
//! [`LeafServer::load_adapter_dir`] and [`LeafServer::activate_base`] run on a task of their
//! own, one at a time: a caller that goes away cannot stop one half-way. The store's `current`
//! is switched after the new engine answered its probe and just before it takes traffic, so
//! serving and the store agree, across crashes too (a restart serves the store's `current`).

pub mod audio;
pub mod auth;
pub mod cli;
mod config;
mod engine;
pub mod fault;
mod group_policy;
pub mod http;
pub mod limits;
pub mod model;
mod request;
pub mod restart;
pub mod server;
mod status;
mod swap;

pub use audio::{AudioEncodeError, AudioEncoder, AudioPrompt};
pub use model::{load_pipeline, load_pipeline_on, ModelDir};
pub use server::{
    ChatReply, ChatRequest, EngineAdmission, GroupPolicy, LeafServer, Message, Part,
    SamplingDefaults, ServerConfig, ServerStatus, SwapReport, BASE_VERSION,
};

use std::path::PathBuf;

/// Serving, hot-swap or the online trainer failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model directory is unusable.
    #[error("model {path}: {reason}")]
    Model {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An adapter was refused (invalid, corrupt, unknown version, store failure).
    #[error("adapter refused: {0}")]
    Adapter(#[source] leaf_adapters::Error),
    /// mistral.rs could not load a version; the current one keeps serving.
    #[error("load failed: {0}")]
    Load(String),
    /// The new engine did not answer the probe request; the current one keeps serving.
    #[error("version {version} failed its probe: {reason}")]
    Probe {
        /// The version.
        version: String,
        /// What went wrong.
        reason: String,
    },
    /// The engine refused or failed the request.
    #[error("engine: {0}")]
    Engine(String),
    /// The request is invalid; the message names the field.
    #[error("invalid request: {0}")]
    Request(String),
    /// The request ended without a final response (its engine went away).
    #[error("request {0} was aborted by the engine")]
    Aborted(String),
    /// No adapter store is configured.
    #[error("no adapter store is configured")]
    NoStore,
    /// The configured number of swaps is used up (see the module docs on leaked threads).
    #[error(
        "swap limit of {0} reached (each swap leaks one idle engine thread); restart to reset"
    )]
    SwapLimit(u64),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A configuration value is invalid; the message names it.
    #[error("config: {0}")]
    Config(String),
    /// An audio part could not be encoded (see [`AudioEncoder`]).
    #[error("audio: {0}")]
    Audio(#[source] AudioEncodeError),
    /// Harvesting failed.
    #[error(transparent)]
    Harvest(#[from] crate::harvest::HarvestError),
    /// The online trainer failed.
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<crate::device::DeviceError> for ServeError {
    fn from(e: crate::device::DeviceError) -> Self {
        ServeError::Config(e.to_string())
    }
}
