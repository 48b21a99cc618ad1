//! The LoRA update of `../shared/LEAF-SPEC.md` ("The update").
//!
//! * [`config`]: [`TrainConfig`], every knob with the spec's default.
//! * [`loss`]: token-level PPO-clip (symmetric eps) plus k3 KL to the reference, per-sequence
//!   token mean.
//! * [`optim`]: Adam (betas 0.9, 0.95, weight decay 0) and global gradient-norm clipping.
//! * [`schedule`]: cosine learning rate with 5 % warm-up and a floor of 0.1 of the peak.
//! * [`update`]: [`Trainer::step`] over a batch of [`TrainSample`]s, with truncated importance
//!   weighting for samples served by an older adapter version.
//! * [`checkpoint`]: Adam's moments and the step counters on disk, for resuming a run.
//! * [`generate`]: answers from the trainer's model, tokens picked as the serving tap picks
//!   them (held-out checks, evaluation).
//! * [`synthetic`]: random models and samples of a given shape, for benchmarks.
//!
//! The reference policy is the same [`LlamaModel`](leaf_adapters::model::LlamaModel) with LoRA
//! switched off.

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod synthetic;
pub mod update;

pub use config::{TisConfig, TisMode, TrainConfig};
pub use loss::LossAggregation;
pub use schedule::CosineSchedule;
pub use update::{StepStats, TrainSample, Trainer};

/// Training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is invalid; the message names the field.
    #[error("train config: {0}")]
    Config(String),
    /// A sample is unusable.
    #[error("train sample {index}: {reason}")]
    Sample {
        /// Position of the sample in the batch.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Every sample had an empty completion.
    #[error("nothing to train on: every completion is empty")]
    EmptyBatch,
    /// The loss or the gradient was NaN or infinite; the update was not applied.
    #[error("non-finite {what}; update not applied")]
    NonFinite {
        /// Which quantity.
        what: String,
    },
    /// A checkpoint of the optimizer state could not be written or read back.
    #[error("trainer checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model failed (loading, bad input).
    #[error(transparent)]
    Model(#[from] leaf_adapters::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<crate::device::DeviceError> for TrainError {
    fn from(e: crate::device::DeviceError) -> Self {
        TrainError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests;
