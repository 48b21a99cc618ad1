//! LoRA adapters for leaf.
//!
//! * [`config`]: the base model's Hugging Face `config.json` (Llama, Qwen2, Mistral, Phi-3).
//! * [`peft`]: PEFT-format adapters (`adapter_config.json` + `adapter_model.safetensors`).
//! * [`validate`]: checks an adapter against a base model before anything serves it.
//! * [`store`]: the versioned on-disk store with atomic publish, promote and roll back.
//! * [`merge`]: base weights + scale * B A, for servers that need merged weights.
//! * [`model`]: the trainable Llama-family decoder with LoRA layers (candle).
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod merge;
pub mod model;
pub mod peft;
pub mod store;
pub mod validate;

pub use config::{Family, LlamaConfig, ModelConfig};
pub use error::{Error, Result};
pub use peft::{LoraAdapter, LoraPart, PeftConfig};
