//! Peak signal-to-noise ratio: plain, border-cropped, and on the BT.601 luma (Y) channel.

use rayon::prelude::*;

use crate::error::MetricsError;
use crate::pixel::{mse, sum_diff};
use crate::shape::{check_data_range, check_shaped, explain_non_finite};
use crate::{Result, Shape};

/// Weights of R, G, B in MATLAB's `rgb2ycbcr` (ITU-R BT.601, studio swing) for inputs in [0, 1]:
/// `Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`. The offset cancels in a difference.
const Y_WEIGHTS: [f64; 3] = [65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0];

/// PSNR in dB: `10 * log10(data_range^2 / mse(reference, test))`, with the MSE summed in f64.
///
/// `data_range` is the distance between the smallest and largest possible value: `1.0` for images
/// in [0, 1], `255.0` for 8-bit levels. Equals scikit-image's
/// `peak_signal_noise_ratio(reference, test, data_range=data_range)`.
///
/// Identical images give `f64::INFINITY` (never NaN); see [`crate::serde_db`] for writing that
/// to JSON.
///
/// # Errors
/// Those of [`mse`], and [`InvalidDataRange`](MetricsError::InvalidDataRange) unless
/// `data_range` is finite and positive.
pub fn psnr(reference: &[f32], test: &[f32], data_range: f64) -> Result<f64> {
    check_data_range(data_range)?;
    Ok(psnr_from_mse(mse(reference, test)?, data_range))
}

/// [`psnr`] ignoring `border` pixels on each of the four sides of every channel, as
/// super-resolution papers do (`border` = the scale factor). `border == 0` is plain [`psnr`].
///
/// # Errors
/// Those of [`psnr`], [`ShapeMismatch`](MetricsError::ShapeMismatch) when a buffer's length is
/// not `shape`'s, and [`BorderTooLarge`](MetricsError::BorderTooLarge) when nothing is left.
pub fn psnr_cropped(
    reference: &[f32],
    test: &[f32],
    shape: Shape,
    border: usize,
    data_range: f64,
) -> Result<f64> {
    check_shaped(reference, test, shape)?;
    check_data_range(data_range)?;
    let (rows, cols) = cropped_extent(shape, border)?;
    let (h, w) = (shape.height, shape.width);
    let partial: Vec<f64> = (0..shape.channels * rows)
        .into_par_iter()
        .map(|i| {
            let (c, y) = (i / rows, border + i % rows);
            let start = (c * h + y) * w + border;
            let range = start..start + cols;
            sum_diff(&reference[range.clone()], &test[range], |d| d * d)
        })
        .collect();
    let sum: f64 = partial.iter().sum();
    if !sum.is_finite() || (border > 0 && any_non_finite(reference, test)) {
        return Err(explain_non_finite(reference, test, "psnr"));
    }
    let count = (shape.channels * rows * cols) as f64;
    Ok(psnr_from_mse(sum / count, data_range))
}

/// PSNR on the luma channel that image-restoration papers report: each RGB image (values in
/// [0, 1], CHW with channels R, G, B) becomes
/// `Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255` (ITU-R BT.601 as MATLAB's `rgb2ycbcr`),
/// and PSNR is taken on Y with a data range of 1 (i.e. peak 255 on the 8-bit scale). Y is not
/// rounded to 8-bit levels.
///
/// # Errors
/// Those of [`psnr_cropped`], and [`Channels`](MetricsError::Channels) unless the shape has
/// exactly 3 channels.
pub fn psnr_y(reference: &[f32], test: &[f32], shape: Shape) -> Result<f64> {
    psnr_y_cropped(reference, test, shape, 0)
}

/// [`psnr_y`] ignoring `border` pixels on each side.
///
/// # Errors
/// As [`psnr_y`], plus [`BorderTooLarge`](MetricsError::BorderTooLarge).
pub fn psnr_y_cropped(reference: &[f32], test: &[f32], shape: Shape, border: usize) -> Result<f64> {
    if shape.channels != 3 {
        return Err(MetricsError::Channels {
            expected: 3,
            got: shape.channels,
        });
    }
    check_shaped(reference, test, shape)?;
    let (rows, cols) = cropped_extent(shape, border)?;
    let plane = shape.height * shape.width;
    let partial: Vec<f64> = (border..border + rows)
        .into_par_iter()
        .map(|y| {
            let start = y * shape.width + border;
            let mut sum = 0.0;
            for i in start..start + cols {
                let d: f64 = (0..3)
                    .map(|c| {
                        let j = c * plane + i;
                        Y_WEIGHTS[c] * (f64::from(reference[j]) - f64::from(test[j]))
                    })
                    .sum();
                sum += d * d;
            }
            sum
        })
        .collect();
    let sum: f64 = partial.iter().sum();
    if !sum.is_finite() || (border > 0 && any_non_finite(reference, test)) {
        return Err(explain_non_finite(reference, test, "psnr_y"));
    }
    Ok(psnr_from_mse(sum / (rows * cols) as f64, 1.0))
}

/// The cropped sum never reads the border, but NaN or infinity anywhere in the input still means
/// something upstream went wrong, so it is refused like everywhere else.
fn any_non_finite(reference: &[f32], test: &[f32]) -> bool {
    reference.par_iter().chain(test).any(|v| !v.is_finite())
}

/// Rows and columns left after cropping `border` from each side.
fn cropped_extent(shape: Shape, border: usize) -> Result<(usize, usize)> {
    let too_large = || MetricsError::BorderTooLarge {
        border,
        height: shape.height,
        width: shape.width,
    };
    let twice = border.checked_mul(2).ok_or_else(too_large)?;
    if twice >= shape.height || twice >= shape.width {
        return Err(too_large());
    }
    Ok((shape.height - twice, shape.width - twice))
}

pub(crate) fn psnr_from_mse(mse: f64, data_range: f64) -> f64 {
    if mse == 0.0 {
        // Written out rather than left to the division so that no build or lint setting can turn
        // the "no error at all" case into NaN or a panic.
        f64::INFINITY
    } else {
        10.0 * (data_range * data_range / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fixtures::{noise, pattern_pair};

    /// The tolerance against scikit-image. The differences are all f64 rounding, ~1e-12.
    const TOL_DB: f64 = 1e-4;

    #[test]
    fn matches_scikit_image() {
        // With `a`, `b` from `fixtures::pattern_pair` as float64 CHW arrays,
        // `from skimage.metrics import peak_signal_noise_ratio as psnr`,
        // `ha, hb = a.transpose(1, 2, 0), b.transpose(1, 2, 0)`:
        //   psnr(ha, hb, data_range=1), psnr(ha, hb, data_range=2),
        //   psnr(ha[4:-4, 4:-4], hb[4:-4, 4:-4], data_range=1)
        // (scikit-image 0.26.0, numpy 2.4.6).
        let cases = [
            (
                Shape::new(3, 24, 20),
                [23.149567098453545, 29.17016701173317, 23.196080616816104],
            ),
            (
                Shape::new(1, 17, 23),
                [23.13092694195303, 29.151526855232657, 23.220924406047317],
            ),
        ];
        for (shape, [r1, r2, crop4]) in cases {
            let (a, b) = pattern_pair(shape);
            let got = [
                psnr(&a, &b, 1.0).unwrap(),
                psnr(&a, &b, 2.0).unwrap(),
                psnr_cropped(&a, &b, shape, 4, 1.0).unwrap(),
                psnr_cropped(&a, &b, shape, 0, 1.0).unwrap(),
            ];
            for (got, want) in got.into_iter().zip([r1, r2, crop4, r1]) {
                assert!((got - want).abs() < TOL_DB, "{shape}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn y_channel_matches_numpy() {
        // As above, with `y601 = lambda t: (16 + 65.481 * t[0] + 128.553 * t[1] + 24.966 * t[2]) / 255`
        // on the CHW float64 arrays:
        //   psnr(y601(a), y601(b), data_range=1)                    -> 27.718440874110946
        //   psnr(y601(a)[4:-4, 4:-4], y601(b)[4:-4, 4:-4], data_range=1) -> 27.853912332268045
        let shape = Shape::new(3, 24, 20);
        let (a, b) = pattern_pair(shape);
        let got = psnr_y(&a, &b, shape).unwrap();
        assert!((got - 27.718440874110946).abs() < TOL_DB, "{got}");
        let got = psnr_y_cropped(&a, &b, shape, 4).unwrap();
        assert!((got - 27.853912332268045).abs() < TOL_DB, "{got}");
    }

    #[test]
    fn identical_images_are_infinitely_good() {
        let (a, _) = pattern_pair(Shape::new(3, 8, 8));
        assert_eq!(psnr(&a, &a, 1.0), Ok(f64::INFINITY));
        assert_eq!(
            psnr_cropped(&a, &a, Shape::new(3, 8, 8), 2, 1.0),
            Ok(f64::INFINITY)
        );
        assert_eq!(psnr_y(&a, &a, Shape::new(3, 8, 8)), Ok(f64::INFINITY));
    }

    #[test]
    fn bad_input_is_an_error() {
        let shape = Shape::new(3, 4, 4);
        let (a, b) = pattern_pair(shape);
        for range in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                psnr(&a, &b, range),
                Err(MetricsError::InvalidDataRange(_))
            ));
        }
        assert_eq!(
            psnr_cropped(&a, &b, shape, 2, 1.0),
            Err(MetricsError::BorderTooLarge {
                border: 2,
                height: 4,
                width: 4
            })
        );
        assert!(psnr_cropped(&a, &b, shape, usize::MAX, 1.0).is_err());
        assert_eq!(
            psnr_y(&a[..16], &b[..16], Shape::new(1, 4, 4)),
            Err(MetricsError::Channels {
                expected: 3,
                got: 1
            })
        );
        assert!(matches!(
            psnr_y(&a[..47], &b[..47], shape),
            Err(MetricsError::ShapeMismatch { .. })
        ));
        let mut nan = b.clone();
        nan[40] = f32::NAN;
        for r in [
            psnr(&a, &nan, 1.0),
            psnr_cropped(&a, &nan, shape, 1, 1.0),
            psnr_y(&a, &nan, shape),
        ] {
            assert!(matches!(r, Err(MetricsError::NonFinite { index: 40, .. })));
        }
    }

    proptest! {
        #[test]
        fn symmetric(len in 1usize..200, s1 in any::<u64>(), s2 in any::<u64>()) {
            let (a, b) = (noise(len, s1), noise(len, s2));
            prop_assert_eq!(psnr(&a, &b, 1.0).unwrap(), psnr(&b, &a, 1.0).unwrap());
        }

        #[test]
        fn falls_as_noise_grows(
            h in 1usize..16, w in 1usize..16, seed in any::<u64>(),
            sigma in 0.001f32..0.2, factor in 1.1f32..4.0,
        ) {
            let shape = Shape::new(3, h, w);
            let len = 3 * h * w;
            let clean = noise(len, seed);
            // Zero-mean noise that is never all zero, so the MSE is positive and scales as sigma^2.
            let n: Vec<f32> = noise(len, seed ^ 0x9e37_79b9)
                .iter()
                .enumerate()
                .map(|(i, &u)| if i == 0 { 1.0 } else { u - 0.5 })
                .collect();
            let noisy = |s: f32| -> Vec<f32> { clean.iter().zip(&n).map(|(&c, &e)| c + s * e).collect() };
            let (low, high) = (noisy(sigma), noisy(sigma * factor));
            let (p_low, p_high) = (psnr(&clean, &low, 1.0).unwrap(), psnr(&clean, &high, 1.0).unwrap());
            prop_assert!(p_low > p_high, "{} vs {}", p_low, p_high);
            let (y_low, y_high) = (psnr_y(&clean, &low, shape).unwrap(), psnr_y(&clean, &high, shape).unwrap());
            prop_assert!(y_low > y_high, "{} vs {}", y_low, y_high);
        }
    }
}
