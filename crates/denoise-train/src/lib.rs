//! Training for denoise models: the TOML/serde [`TrainConfig`], losses, an Adam/AdamW whose
//! state we own (so checkpoints really hold it), atomic checkpoints with exact resume, validation
//! the training loop and its PNG plots. Uses `denoise-data` (patches), `denoise-models` (networks) and
//! `denoise-metrics` (validation numbers).

pub mod bench;
pub mod checkpoint;
pub mod config;
mod ema;
pub mod error;
pub mod init;
mod log;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod run_dir;
mod staging;
pub mod timing;
pub mod trainer;
pub mod validate;
mod weights;

pub use crate::config::TrainConfig;
pub use crate::error::TrainError;
pub use crate::run_dir::RunDir;
pub use crate::trainer::{TrainOutcome, Trainer, set_up_libtorch};

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// libtorch's RNG is global: tests that build models take this lock (see denoise-models).
#[cfg(test)]
pub(crate) fn test_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 3-layer, 4-feature gray DnCNN: the smallest model with every kind of tensor training
/// keeps (weights, biases and, with `batch_norm`, running statistics).
#[cfg(test)]
pub(crate) fn tiny_dncnn(batch_norm: bool) -> denoise_models::ModelConfig {
    denoise_models::ModelConfig::Dncnn(denoise_models::config::DncnnConfig {
        channels: 1,
        depth: 3,
        features: 4,
        batch_norm,
        ..Default::default()
    })
}
