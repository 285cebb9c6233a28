//! The denoising networks on libtorch (`tch`): autoencoder, UNet, RIDNet, DnCNN and FFDNet, the
//! [`Model`] wrapper that pads, casts and runs them, and the saved [`artefact`] format.
//!
//! Models know nothing of training: losses, optimisers and checkpoints live in `denoise-train`.

pub mod artefact;
pub mod autoencoder;
pub mod config;
pub mod denoiser;
pub mod device;
pub mod dncnn;
pub mod drunet;
pub mod ensemble;
pub mod error;
pub mod estimator;
pub mod export;
pub mod ffdnet;
pub mod gray;
pub mod layers;
pub mod level;
pub mod model;
pub mod perf;
pub mod ridnet;
pub mod source;
pub mod sys;
pub mod tile;
pub mod unet;

pub use crate::artefact::{Artefact, Metadata};
pub use crate::config::{ModelConfig, ModelKind};
pub use crate::denoiser::{Denoiser, Job, PrecisionPolicy, Settings};
pub use crate::device::parse_device;
pub use crate::error::ModelError;
pub use crate::level::{LevelUsed, NoiseLevel};
pub use crate::model::Model;
pub use crate::perf::{Layout, Precision};
pub use crate::source::{Catalog, ModelSource};

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// libtorch's RNG is global: tests that seed it and build models take this lock, so tests
/// running in parallel threads cannot draw from it in between.
#[cfg(test)]
pub(crate) fn test_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 3-layer FFDNet with seeded random weights (seed it under [`test_rng_lock`]).
#[cfg(test)]
pub(crate) fn tiny_ffdnet() -> Model {
    tch::manual_seed(0);
    let cfg: ModelConfig =
        serde_json::from_str(r#"{"kind":"ffdnet","depth":3,"features":8}"#).unwrap();
    Model::new(&cfg, tch::Device::Cpu).unwrap()
}
