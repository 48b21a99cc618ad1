//! Importing a model from another format into a Hugging Face model directory that the rest of
//! leaf (and mistral.rs, and `transformers`) loads.
//!
//! Today one source format: GGUF (llama.cpp), see [`gguf`]. The directory written holds
//! `model.safetensors` (f32, dequantised), `config.json`, `tokenizer.json` (rebuilt from the
//! GGUF metadata, see [`tokenizer`]), `tokenizer_config.json` (chat template and special
//! tokens) and `generation_config.json`.

pub mod gguf;
pub mod tokenizer;

use std::path::PathBuf;

pub use gguf::{import_gguf, ImportSummary};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not a GGUF file leaf can read (bad magic or version, an unknown tensor type,
    /// a truncated header).
    #[error("{path}: not a readable GGUF v2/v3 file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },
    /// The model's architecture is not one leaf imports.
    #[error("{path}: architecture {architecture:?} is not supported (leaf imports: {supported})")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// `general.architecture`.
        architecture: String,
        /// What is supported.
        supported: &'static str,
    },
    /// A tensor is stored in a type leaf does not dequantise.
    #[error("{path}: tensor {tensor} has type {dtype}, which is not supported (leaf imports: {supported})")]
    TensorType {
        /// The file.
        path: PathBuf,
        /// The tensor's GGUF name.
        tensor: String,
        /// Its GGML type.
        dtype: String,
        /// What is supported.
        supported: &'static str,
    },
    /// A metadata key is missing or has the wrong type or value.
    #[error("{path}: metadata {key}: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is missing, unexpected or of the wrong shape.
    #[error("{path}: tensor {tensor}: {reason}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's GGUF name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be rebuilt from the metadata.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The output directory cannot be used.
    #[error("{path}: {reason}")]
    Output {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tensor operation failed (dequantisation, reshaping).
    #[error("{path}: {source}")]
    Tensors {
        /// The file being imported.
        path: PathBuf,
        /// The error.
        source: candle_core::Error,
    },
}
