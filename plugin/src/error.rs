//! The one error type of `leaf-plugin`.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A group of rollouts failed validation.
    #[error(transparent)]
    Group(#[from] crate::rollout::GroupError),
    /// A reward could not be computed.
    #[error(transparent)]
    Reward(#[from] crate::reward::RewardError),
    /// Audio could not be decoded or featurised.
    #[cfg(feature = "speech")]
    #[error(transparent)]
    Audio(#[from] crate::audio::AudioError),
    /// The speech workload (units, tokenizer, tasks) failed.
    #[cfg(feature = "speech")]
    #[error(transparent)]
    Speech(#[from] crate::speech::SpeechError),
    /// Importing a model (GGUF) failed.
    #[error(transparent)]
    Import(#[from] crate::import::ImportError),
    /// A model's chat format (template, stop tokens) could not be read or rendered.
    #[error(transparent)]
    ChatFormat(#[from] crate::chat_format::ChatFormatError),
    /// A device cannot be named or used (see [`crate::device`]).
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    /// An adapter, the store or the trainable model failed.
    #[error(transparent)]
    Adapter(#[from] leaf_adapters::Error),
    /// Serving, hot-swap or the online trainer failed.
    #[cfg(feature = "serve")]
    #[error(transparent)]
    Serve(#[from] crate::serving::ServeError),
    /// Harvesting (groups, rewards, feedback) failed.
    #[cfg(feature = "serve")]
    #[error(transparent)]
    Harvest(#[from] crate::harvest::HarvestError),
    /// The learner, a group source, the promotion gate or the trainer checkpoint failed.
    #[cfg(feature = "serve")]
    #[error(transparent)]
    Online(#[from] crate::online::OnlineError),
    /// The main job (`leaf run`, `leaf compare`) failed.
    #[cfg(all(feature = "serve", feature = "speech"))]
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    /// The NATS JetStream cluster (stream, versions, `current`) failed.
    #[cfg(feature = "cluster")]
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
