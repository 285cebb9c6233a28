//! The error type of `denoise-metrics`: every way a metric can refuse its input.

use std::fmt;

use crate::Shape;

/// Which of the two images an error is about.
///
/// For the symmetric metrics (MSE, MAE) "reference" is simply the first argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    /// The first argument (ground truth).
    Reference,
    /// The second argument (the image being judged).
    Test,
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operand::Reference => "reference",
            Operand::Test => "test",
        })
    }
}

/// Everything that can go wrong in this crate. Messages are lower-case.
///
/// Metrics check their input up front and return one of these instead of producing NaN or
/// panicking.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The two buffers differ in length.
    #[error("length mismatch: reference has {reference} values, test has {test}")]
    LengthMismatch {
        /// Length of the reference buffer.
        reference: usize,
        /// Length of the test buffer.
        test: usize,
    },
    /// A buffer's length does not match the declared [`Shape`].
    #[error("shape mismatch: shape {shape} needs {expected} values, the {operand} image has {got}")]
    ShapeMismatch {
        /// The declared shape.
        shape: Shape,
        /// `shape.len()`, or `usize::MAX` if that overflows.
        expected: usize,
        /// The buffer's actual length.
        got: usize,
        /// Which buffer is wrong.
        operand: Operand,
    },
    /// There is nothing to measure: zero values, or a shape with a zero dimension.
    #[error("empty input: nothing to measure")]
    Empty,
    /// A NaN or infinity in the input.
    #[error("non-finite value {value} at index {index} of the {operand} image")]
    NonFinite {
        /// Which buffer holds it.
        operand: Operand,
        /// Its index in the flat buffer.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// The data range (peak-to-peak value) is not a finite positive number.
    #[error("invalid data range {0}: must be finite and positive")]
    InvalidDataRange(f64),
    /// The metric needs a specific number of channels (e.g. Y-PSNR needs RGB).
    #[error("wrong channel count: expected {expected}, got {got}")]
    Channels {
        /// Channels the metric needs.
        expected: usize,
        /// Channels in the given shape.
        got: usize,
    },
    /// The image is smaller than the SSIM window in height or width.
    #[error("image {height}x{width} is smaller than the {window}x{window} ssim window")]
    TooSmall {
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
        /// Side of the square window.
        window: usize,
    },
    /// Cropping the border would leave no pixels.
    #[error("border of {border} pixels leaves nothing of a {height}x{width} image")]
    BorderTooLarge {
        /// Pixels cropped from each side.
        border: usize,
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
    },
    /// Finite input whose intermediate values overflow (e.g. pixel values near `f32::MAX`).
    #[error("values too large: {metric} overflowed")]
    Overflow {
        /// The metric that overflowed.
        metric: &'static str,
    },
}
