//! Pixel-wise error metrics: mean squared error and mean absolute error, plus the f64 summing
//! they and PSNR share.

use rayon::prelude::*;

use crate::Result;
use crate::shape::{check_pair, explain_non_finite};

/// Values per parallel chunk. Fixed, so the summation order (and thus the result) does not depend
/// on the number of threads.
const CHUNK: usize = 1 << 16;

/// Mean squared error `mean((reference - test)^2)` over every value, accumulated in f64.
///
/// Matches scikit-image's `mean_squared_error`. Layout does not matter, only that both buffers
/// hold the same number of values.
///
/// # Errors
/// [`LengthMismatch`](crate::MetricsError::LengthMismatch), [`Empty`](crate::MetricsError::Empty),
/// or [`NonFinite`](crate::MetricsError::NonFinite) for NaN or infinity in either buffer.
pub fn mse(reference: &[f32], test: &[f32]) -> Result<f64> {
    check_pair(reference, test)?;
    let sum = par_sum(reference, test, |d| d * d);
    if !sum.is_finite() {
        return Err(explain_non_finite(reference, test, "mse"));
    }
    Ok(sum / reference.len() as f64)
}

/// Mean absolute error `mean(|reference - test|)` over every value, accumulated in f64.
///
/// # Errors
/// As [`mse`].
pub fn mae(reference: &[f32], test: &[f32]) -> Result<f64> {
    check_pair(reference, test)?;
    let sum = par_sum(reference, test, f64::abs);
    if !sum.is_finite() {
        return Err(explain_non_finite(reference, test, "mae"));
    }
    Ok(sum / reference.len() as f64)
}

/// `sum(f(a - b))` with the difference taken in f64, in parallel over fixed chunks.
pub(crate) fn par_sum(a: &[f32], b: &[f32], f: impl Fn(f64) -> f64 + Sync) -> f64 {
    let partial: Vec<f64> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| sum_diff(a, b, &f))
        .collect();
    partial.iter().sum()
}

/// `sum(f(a - b))` in f64 with four independent accumulators, which lets the compiler vectorise
/// (a single accumulator pins the order of additions) and halves the rounding error growth.
pub(crate) fn sum_diff(a: &[f32], b: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let (a_rest, b_rest) = (a4.remainder(), b4.remainder());
    for (a, b) in a4.zip(b4) {
        for k in 0..4 {
            acc[k] += f(f64::from(a[k]) - f64::from(b[k]));
        }
    }
    let tail: f64 = a_rest
        .iter()
        .zip(b_rest)
        .map(|(&a, &b)| f(f64::from(a) - f64::from(b)))
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Shape;
    use crate::error::{MetricsError, Operand};
    use crate::fixtures::{noise, pattern_pair};

    /// Values in f64 carry ~1e-16 relative error; 1e-12 leaves room for summation order.
    const TOL: f64 = 1e-12;

    #[test]
    fn reference_values() {
        // numpy, with `a`, `b` from `fixtures::pattern_pair` as float64:
        //   np.mean((a - b) ** 2), np.mean(np.abs(a - b))
        let cases = [
            (
                Shape::new(3, 24, 20),
                0.004842206319351549,
                0.059619775466207,
            ),
            (
                Shape::new(1, 17, 23),
                0.00486303399829015,
                0.059915607390196426,
            ),
        ];
        for (shape, want_mse, want_mae) in cases {
            let (a, b) = pattern_pair(shape);
            let got = mse(&a, &b).unwrap();
            assert!(
                (got - want_mse).abs() < TOL,
                "{shape}: mse {got} vs {want_mse}"
            );
            let got = mae(&a, &b).unwrap();
            assert!(
                (got - want_mae).abs() < TOL,
                "{shape}: mae {got} vs {want_mae}"
            );
        }
    }

    #[test]
    fn chunking_does_not_change_the_sum() {
        // Over several chunks, against a plain sequential f64 sum.
        let a = noise(3 * CHUNK + 5, 1);
        let b = noise(3 * CHUNK + 5, 2);
        let plain: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!((mse(&a, &b).unwrap() - plain).abs() < TOL);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            mse(&[1.0, 2.0], &[1.0]),
            Err(MetricsError::LengthMismatch {
                reference: 2,
                test: 1
            })
        );
        assert_eq!(mae(&[], &[]), Err(MetricsError::Empty));
        let err = mse(&[0.0, f32::INFINITY], &[0.0, 1.0]).unwrap_err();
        assert_eq!(
            err,
            MetricsError::NonFinite {
                operand: Operand::Reference,
                index: 1,
                value: f32::INFINITY
            }
        );
        assert_eq!(
            err.to_string(),
            "non-finite value inf at index 1 of the reference image"
        );
        // Infinity on both sides at the same place must not cancel out to a finite answer.
        assert!(mae(&[f32::INFINITY], &[f32::INFINITY]).is_err());
        assert!(mae(&[0.5], &[f32::NAN]).is_err());
        // Extreme but finite values are fine: the difference is taken in f64.
        let big = mse(&[f32::MAX], &[-f32::MAX]).unwrap();
        assert!(big.is_finite() && big > 1e77);
    }

    proptest! {
        #[test]
        fn mse_and_mae_are_symmetric_and_non_negative(
            len in 1usize..300, s1 in any::<u64>(), s2 in any::<u64>()
        ) {
            let (a, b) = (noise(len, s1), noise(len, s2));
            let (m, n) = (mse(&a, &b).unwrap(), mae(&a, &b).unwrap());
            prop_assert!(m >= 0.0 && n >= 0.0);
            // The squared and absolute differences are exactly symmetric, so no tolerance.
            prop_assert_eq!(m, mse(&b, &a).unwrap());
            prop_assert_eq!(n, mae(&b, &a).unwrap());
            // MSE <= MAE when every |difference| <= 1.
            prop_assert!(m <= n + TOL);
            prop_assert_eq!(mse(&a, &a).unwrap(), 0.0);
        }
    }
}
