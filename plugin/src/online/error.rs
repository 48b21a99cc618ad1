//! What can go wrong in the learner, its group sources, its gate and its checkpoint.

use std::path::PathBuf;

/// An error of the learner, a [`GroupSource`](super::GroupSource), the
/// [`PromotionGate`](super::PromotionGate) or the trainer checkpoint. Every message names the
/// file, line or setting that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnlineError {
    /// A line of a JSON-lines groups file is malformed; names the line and the field.
    #[error("{path} line {line}: {field}: {reason}")]
    GroupLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The field (a path such as `rollouts[2].logprobs`), or `(line)` for the whole line.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A line of a gate's JSON-lines prompts file is malformed; names the line and the field.
    #[error("{path} line {line}: {field}: {reason}")]
    GateLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The field, or `(line)` for the whole line.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A group source failed (a broker, a network); the message names the source.
    #[error("group source {source_name}: {reason}")]
    Source {
        /// Which source.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// The gate's held-out data or settings are unusable.
    #[error("promotion gate: {0}")]
    Gate(String),
    /// A setting is out of range; the message names it.
    #[error("learner config: {0}")]
    Config(String),
    /// The trainer checkpoint is unreadable or belongs to something else.
    #[error("trainer checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl OnlineError {
    /// An [`OnlineError::Io`] for `path`.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> OnlineError {
        let path = path.to_path_buf();
        move |source| OnlineError::Io { path, source }
    }
}
