//! Image-quality metrics (PSNR, SSIM, MSE, MAE, KLD) on plain f32 buffers.
//!
//! Pure Rust, no libtorch: every metric takes two slices (the reference, i.e. ground truth, then
//! the image under test) and returns [`Result<f64>`](Result). Bad input (mismatched lengths or
//! shapes, empty buffers, NaN or infinity, a non-positive data range, images smaller than the
//! SSIM window) is a typed [`MetricsError`], never a NaN result or a panic.
//!
//! * [`mse`], [`mae`]: any layout, f64 accumulation.
//! * [`psnr`] with a data range (1.0 for images in [0, 1]); [`psnr_cropped`] ignores a border;
//!   [`psnr_y`] / [`psnr_y_cropped`] use the BT.601 luma that restoration papers report.
//! * [`ssim`]: Wang et al. 2004, Gaussian window (sigma 1.5), mean over channels.
//! * [`kld`]: KL divergence with each image normalised to a distribution (definition on the
//!   function).
//! * [`Report`]: PSNR, SSIM, MSE and MAE together, serialisable for `--json` output.
//!
//! Functions with spatial structure take a [`Shape`] and expect planar CHW layout.
//!
//! PSNR and SSIM agree with scikit-image's `peak_signal_noise_ratio` and `structural_similarity`
//! (with `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`) to within 1e-4; the
//! unit tests hold the reference values and the Python that produced them.
//!
//! # Infinite PSNR
//!
//! Two identical images have zero error, so their PSNR is `f64::INFINITY`. JSON has no
//! infinity (serde_json would write `null`), so [`Report`] serialises an infinite PSNR as the
//! string `"inf"` (and `-inf`, NaN as `"-inf"`, `"nan"`). Use [`serde_db`] with
//! `#[serde(with = "denoise_metrics::serde_db")]` on your own fields, or [`db_to_json`] when
//! building a `serde_json::Value` by hand.
//!
//! ```
//! use denoise_metrics::{Report, Shape};
//!
//! let shape = Shape::new(1, 16, 16);
//! let clean = vec![0.5f32; 256];
//! let report = Report::compute(&clean, &clean, shape)?;
//! assert_eq!(report.psnr, f64::INFINITY);
//! assert_eq!(
//!     serde_json::to_string(&report)?,
//!     r#"{"psnr":"inf","ssim":1.0,"mse":0.0,"mae":0.0}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
#[cfg(test)]
mod fixtures;
mod kld;
mod pixel;
mod psnr;
mod report;
pub mod serde_db;
mod shape;
mod ssim;

pub use crate::error::{MetricsError, Operand};
pub use crate::kld::{KLD_EPSILON, kld};
pub use crate::pixel::{mae, mse};
pub use crate::psnr::{psnr, psnr_cropped, psnr_y, psnr_y_cropped};
pub use crate::report::Report;
pub use crate::serde_db::db_to_json;
pub use crate::shape::Shape;
pub use crate::ssim::{SSIM_WINDOW, ssim};

/// Result alias for this crate.
pub type Result<T, E = MetricsError> = std::result::Result<T, E>;
