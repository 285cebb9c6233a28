//! Everything between image files on disk and training batches: loading,
//! augmentation, noise injection and patch streaming. Pure Rust: no libtorch here.

pub mod augment;
pub mod camera;
pub mod dataset;
pub mod error;
pub mod estimate;
pub mod image;
pub mod io;
pub mod loader;
pub mod manifest;
pub mod metadata;
pub mod noise;

pub use crate::error::DataError;
pub use crate::image::Image;

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
