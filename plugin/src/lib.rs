//! leaf: continual LEAF post-training inside a mistral.rs speech-LLM server.
//!
//! Data flows one way: server -> [`harvest`] -> [`advantage`] (LEAF trees) -> [`trainer`]
//! -> adapter store (`leaf-adapters`) -> server. See `ARCHITECTURE.md` at the workspace root.
//!
//! The spoken-digit workload (`audio`, `speech` and the main job `job`) is the `speech`
//! feature (on by default); the serving, harvesting, online and training modules import
//! nothing from it, so `default-features = false, features = ["serve"]` embeds leaf for
//! another model without compiling it.
#![warn(missing_docs)]

pub mod advantage;
#[cfg(feature = "speech")]
pub mod audio;
pub mod chat_format;
pub mod device;
pub mod error;
pub mod import;
pub mod malloc;
pub mod reward;
pub mod rollout;
pub mod sampling;
#[cfg(feature = "speech")]
pub mod speech;
pub mod trainer;
pub mod wav_header;

#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "serve")]
pub mod harvest;
#[cfg(all(feature = "serve", feature = "speech"))]
pub mod job;
#[cfg(feature = "serve")]
pub mod online;
#[cfg(feature = "serve")]
pub mod serving;

pub use error::{Error, Result};
