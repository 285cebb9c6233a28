//! The [`Shape`] of a planar CHW image buffer, and the input checks every metric shares.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::error::{MetricsError, Operand};

/// Dimensions of an image stored planar, channel-major (CHW): value `(c, y, x)` lives at
/// index `(c * height + y) * width + x`.
///
/// Any channel count is allowed; Y-PSNR additionally needs exactly 3 (R, G, B in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// Number of planes (1 for grey, 3 for RGB).
    pub channels: usize,
    /// Rows per plane.
    pub height: usize,
    /// Columns per row.
    pub width: usize,
}

impl Shape {
    /// A CHW shape.
    pub const fn new(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
        }
    }

    /// Values in one plane (`height * width`), or `None` on overflow.
    pub const fn checked_plane_len(&self) -> Option<usize> {
        self.height.checked_mul(self.width)
    }

    /// Values in the whole buffer (`channels * height * width`), or `None` on overflow.
    pub const fn checked_len(&self) -> Option<usize> {
        match self.checked_plane_len() {
            Some(plane) => plane.checked_mul(self.channels),
            None => None,
        }
    }

    /// True when any dimension is zero.
    pub const fn is_empty(&self) -> bool {
        self.channels == 0 || self.height == 0 || self.width == 0
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// Checks two flat buffers for a pixel-wise metric: same length, not empty.
pub(crate) fn check_pair(reference: &[f32], test: &[f32]) -> Result<()> {
    if reference.len() != test.len() {
        return Err(MetricsError::LengthMismatch {
            reference: reference.len(),
            test: test.len(),
        });
    }
    if reference.is_empty() {
        return Err(MetricsError::Empty);
    }
    Ok(())
}

/// Checks two buffers against a declared shape: both exactly `shape`'s length, not empty.
pub(crate) fn check_shaped(reference: &[f32], test: &[f32], shape: Shape) -> Result<()> {
    let expected = shape.checked_len().unwrap_or(usize::MAX);
    for (operand, buf) in [(Operand::Reference, reference), (Operand::Test, test)] {
        if buf.len() != expected {
            return Err(MetricsError::ShapeMismatch {
                shape,
                expected,
                got: buf.len(),
                operand,
            });
        }
    }
    if shape.is_empty() {
        return Err(MetricsError::Empty);
    }
    Ok(())
}

/// Checks that the data range is usable as a peak value.
pub(crate) fn check_data_range(data_range: f64) -> Result<()> {
    if data_range.is_finite() && data_range > 0.0 {
        Ok(())
    } else {
        Err(MetricsError::InvalidDataRange(data_range))
    }
}

/// Explains a non-finite accumulator. Metrics sum in f64 and only scan for the culprit when the
/// sum is not finite, so the common path costs no extra pass; a finite f32 input cannot overflow
/// an f64 sum of squares, so finding nothing means an f32 intermediate overflowed.
pub(crate) fn explain_non_finite(
    reference: &[f32],
    test: &[f32],
    metric: &'static str,
) -> MetricsError {
    first_non_finite(reference, Operand::Reference)
        .or_else(|| first_non_finite(test, Operand::Test))
        .unwrap_or(MetricsError::Overflow { metric })
}

pub(crate) fn first_non_finite(buf: &[f32], operand: Operand) -> Option<MetricsError> {
    buf.iter()
        .position(|v| !v.is_finite())
        .map(|index| MetricsError::NonFinite {
            operand,
            index,
            value: buf[index],
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_and_display() {
        let s = Shape::new(3, 4, 5);
        assert_eq!(s.checked_len(), Some(60));
        assert_eq!(s.checked_plane_len(), Some(20));
        assert_eq!(s.to_string(), "3x4x5");
        assert_eq!(Shape::new(2, usize::MAX, 2).checked_len(), None);
    }

    #[test]
    fn shaped_check_names_the_wrong_buffer() {
        let s = Shape::new(1, 2, 2);
        let err = check_shaped(&[0.0; 4], &[0.0; 3], s).unwrap_err();
        assert_eq!(
            err,
            MetricsError::ShapeMismatch {
                shape: s,
                expected: 4,
                got: 3,
                operand: Operand::Test
            }
        );
        assert_eq!(
            err.to_string(),
            "shape mismatch: shape 1x2x2 needs 4 values, the test image has 3"
        );
        assert_eq!(
            check_shaped(&[], &[], Shape::new(0, 2, 2)),
            Err(MetricsError::Empty)
        );
    }

    #[test]
    fn non_finite_is_located() {
        let err = explain_non_finite(&[0.0, 1.0], &[0.0, f32::NAN], "mse");
        assert!(matches!(
            err,
            MetricsError::NonFinite {
                operand: Operand::Test,
                index: 1,
                ..
            }
        ));
        assert_eq!(
            explain_non_finite(&[0.0], &[1.0], "ssim"),
            MetricsError::Overflow { metric: "ssim" }
        );
    }
}
