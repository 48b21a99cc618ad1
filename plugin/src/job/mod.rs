//! The main job: `leaf run` (continual post-training of a served speech model on replayed
//! traffic, end to end) and `leaf compare` (LEAF against GRPO on the same budget).
//!
//! [`run::run`] prepares the base model (the cached small speech LM of
//! [`crate::speech::pretrain`], trained on first use), starts a [`crate::serving::LeafServer`]
//! with an adapter store in the output directory, replays the spoken-digit training tasks as
//! live traffic through it ([`traffic`]), trains a LoRA adapter on the harvested groups on a
//! learner thread, gates every new adapter on a held-out check before promoting (hot-swapping)
//! it ([`held_out`]), and writes `report.json` ([`report`]) and `reward_curve.png` ([`plot`]).
//! [`compare::compare`] repeats runs for both estimators and several seeds and writes a table
//! and a figure.

pub mod ceiling;
pub mod compare;
pub mod eval_cache;
pub mod held_out;
pub mod plot;
pub mod report;
pub mod run;
pub mod traffic;

use std::path::PathBuf;

/// What can go wrong in the main job (wrapped by [`crate::Error::Job`]).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A setting is invalid; the message names it.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The output directory holds a run that cannot be continued or overwritten as asked.
    #[error("{path}: {reason}")]
    OutDir {
        /// The output directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A saved run state could not be read or does not match the settings.
    #[error("cannot resume from {path}: {reason}")]
    Resume {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A figure could not be drawn.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The run failed (the learner or the runtime).
    #[error("run failed: {0}")]
    Failed(String),
}
