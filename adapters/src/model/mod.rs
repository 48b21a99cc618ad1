//! The trainable Llama-family decoder with LoRA (candle).
//!
//! * [`LlamaModel`]: loads Hugging Face `LlamaForCausalLM` checkpoints (or initialises one at
//!   random), computes teacher-forced log-probs of completions ([`LlamaModel::logprobs`]) and
//!   logits ([`LlamaModel::forward`]), with LoRA switched on (the policy) or off (the reference).
//! * [`KvCache`]: keys and values kept between generation steps ([`LlamaModel::prefill`],
//!   [`LlamaModel::decode_step`]), so each new token runs the decoder over one position.
//! * [`Batch`]: (prompt, completion) pairs padded on the right, with masks.
//! * [`LoraOptions`]: rank, alpha, dropout, target modules (spec defaults).
//! * [`ops`]: differentiable RMSNorm, softmax, log-softmax, RoPE, SiLU (candle's fused kernels
//!   silently drop gradients).
//! * [`frozen_linear`]: a matmul against a frozen weight that skips the weight gradient.
//! * Adapters: [`LlamaModel::export_adapter`] and [`LlamaModel::load_adapter`] convert the LoRA
//!   pairs to and from PEFT tensors ([`crate::peft`]).

mod adapter;
mod batch;
pub mod checkpoint;
mod frozen;
mod init;
mod kernels;
mod kv_cache;
mod llama;
mod lora;
pub mod ops;

pub use batch::Batch;
pub use frozen::{frozen_linear, FrozenMatmul};
pub use kv_cache::KvCache;
pub use llama::{LlamaModel, ModelOptions, Pass, Trainable, INIT_STD};
pub use lora::LoraOptions;
