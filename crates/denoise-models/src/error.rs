//! The error type of `denoise-models`.

use std::path::PathBuf;

/// Everything that can go wrong building, running, saving or loading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("unknown model '{name}' (known: {known})")]
    UnknownKind { name: String, known: String },
    /// A model named by the user that is neither a file nor a name the program knows.
    #[error(
        "no model '{spec}': not a file or directory, and not a shipped model (shipped: {known})"
    )]
    UnknownModel { spec: String, known: String },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Data(#[from] denoise_data::DataError),
    #[error("failed to read '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}' is not a valid model artefact: {message}")]
    Artefact { path: PathBuf, message: String },
    /// The caller's cancellation check said stop (between tiles or self-ensemble passes).
    #[error("denoising was cancelled")]
    Cancelled,
}

impl ModelError {
    pub(crate) fn artefact(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Artefact {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
