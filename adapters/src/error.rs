//! The one error type of `leaf-adapters`.

use std::path::{Path, PathBuf};

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong with adapters, stores and the trainable model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The base model's `config.json` is not a supported Llama-family config.
    #[error("{path}: unsupported base model config: {reason}")]
    BaseConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor-level problem with a tensor the error names.
    #[error("tensor {tensor}: {reason}")]
    Tensor {
        /// The tensor's full name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The adapter is invalid for a reason not tied to one tensor.
    #[error("invalid adapter: {0}")]
    Adapter(String),
    /// The versioned store refused an operation.
    #[error("adapter store: {0}")]
    Store(String),
    /// The store has no version with this id.
    #[error("adapter store: unknown version {0}")]
    UnknownVersion(String),
    /// A rollback was asked for but no earlier current version exists.
    #[error("adapter store: no previous version to roll back to")]
    NoRollbackTarget,
    /// The trainable model refused its input (bad token ids, lengths, options).
    #[error("model: {0}")]
    Model(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the safetensors reader.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A problem with one named tensor.
    pub fn tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
}
