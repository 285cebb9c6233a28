//! The error type of `denoise-train`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("failed to read config '{path}': {message}")]
    ConfigFile { path: PathBuf, message: String },
    #[error(transparent)]
    Data(#[from] denoise_data::DataError),
    #[error(transparent)]
    Model(#[from] denoise_models::ModelError),
    #[error(transparent)]
    Metrics(#[from] denoise_metrics::MetricsError),
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("i/o error on '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw the training plots: {0}")]
    Plot(String),
    /// A run directory that cannot be used as asked (a run already there, no checkpoint, a
    /// changed config on resume).
    #[error("{0}")]
    RunDir(String),
    #[error("invalid checkpoint '{path}': {message}")]
    Checkpoint { path: PathBuf, message: String },
}
