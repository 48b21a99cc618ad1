//! leaf: continual LEAF post-training inside a mistral.rs speech-LLM server.
//!
//! Data flows one way: server -> [`harvest`] -> [`advantage`] (LEAF trees) -> [`trainer`]
//! -> adapter store (`leaf-adapters`) -> server. See `ARCHITECTURE.md` at the workspace root.
#![warn(missing_docs)]

pub mod advantage;
pub mod audio;
pub mod chat_format;
pub mod device;
pub mod error;
pub mod import;
pub mod malloc;
pub mod reward;
pub mod rollout;
pub mod sampling;
pub mod speech;
pub mod trainer;

#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "serve")]
pub mod harvest;
#[cfg(feature = "serve")]
pub mod job;
#[cfg(feature = "serve")]
pub mod online;
#[cfg(feature = "serve")]
pub mod serving;

pub use error::{Error, Result};
