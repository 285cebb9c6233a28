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
    /// A fine-tune's starting model that cannot become what the caller asked for.
    #[error("{0}")]
    FineTune(String),
    /// The loss stopped being a finite number; the weights from before `step` are checkpointed.
    #[error(
        "training diverged: the loss became {loss} at step {step}; lower the learning rate (the \
         weights before that step are checkpointed, and --resume would meet the same batch)"
    )]
    Diverged { step: u64, loss: f64 },
    #[error("invalid checkpoint '{path}': {message}")]
    Checkpoint { path: PathBuf, message: String },
}
