//! Kullback-Leibler divergence between two images, each read as a probability distribution over
//! its values.

use rayon::prelude::*;

use crate::Result;
use crate::shape::{check_pair, explain_non_finite};

/// Added to every (clipped) value before normalising, so that zeros never reach `ln(0)` or a
/// division by zero. Same magnitude as Keras's `epsilon()`; for images in [0, 1] it only matters
/// where a value is (near) zero.
pub const KLD_EPSILON: f64 = 1e-7;

/// Values per parallel chunk; fixed so the result does not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// Kullback-Leibler divergence `KL(P || Q)` in nats, where P comes from `reference` and Q from
/// `test`.
///
/// Each image (all values, any layout, both buffers the same length) becomes a distribution over
/// value positions:
///
/// ```text
/// p_i = (max(reference_i, 0) + eps) / sum_j (max(reference_j, 0) + eps)
/// q_i = (max(test_i, 0)      + eps) / sum_j (max(test_j, 0)      + eps)
/// KL  = sum_i p_i * ln(p_i / q_i)
/// ```
///
/// with `eps` = [`KLD_EPSILON`]. Negative values (a network's undershoot) are clipped to 0 because
/// a probability cannot be negative; the epsilon then handles zeros explicitly: a position where
/// the test image is 0 but the reference is not costs a large but finite amount, and an all-zero
/// image becomes the uniform distribution. This equals
/// `scipy.stats.entropy(np.clip(ref, 0, None).ravel() + eps, np.clip(test, 0, None).ravel() + eps)`.
/// Sums are in f64.
///
/// Unlike a bare `sum(y_true * log(y_true / y_pred))` on unnormalised values (Keras's
/// `KLDivergence`), this is a true divergence: it is never negative (tiny negative rounding
/// residue is returned as 0), and it is 0 for identical images. It is not symmetric.
///
/// # Errors
/// [`LengthMismatch`](crate::MetricsError::LengthMismatch), [`Empty`](crate::MetricsError::Empty),
/// or [`NonFinite`](crate::MetricsError::NonFinite).
pub fn kld(reference: &[f32], test: &[f32]) -> Result<f64> {
    check_pair(reference, test)?;
    let mass = |v: f32| f64::from(v).max(0.0) + KLD_EPSILON;
    // Clipping would quietly turn NaN and -inf into 0, so a chunk holding either poisons its
    // total instead.
    let total = |buf: &[f32]| -> f64 {
        let partial: Vec<f64> = buf
            .par_chunks(CHUNK)
            .map(|c| {
                if c.iter().all(|v| v.is_finite()) {
                    c.iter().map(|&v| mass(v)).sum::<f64>()
                } else {
                    f64::NAN
                }
            })
            .collect();
        partial.iter().sum()
    };
    let (sum_p, sum_q) = (total(reference), total(test));
    if !(sum_p.is_finite() && sum_q.is_finite()) {
        return Err(explain_non_finite(reference, test, "kld"));
    }
    let partial: Vec<f64> = reference
        .par_chunks(CHUNK)
        .zip(test.par_chunks(CHUNK))
        .map(|(r, t)| {
            r.iter()
                .zip(t)
                .map(|(&r, &t)| {
                    let p = mass(r) / sum_p;
                    let q = mass(t) / sum_q;
                    p * (p / q).ln()
                })
                .sum::<f64>()
        })
        .collect();
    Ok(partial.iter().sum::<f64>().max(0.0))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Shape;
    use crate::error::{MetricsError, Operand};
    use crate::fixtures::{noise, pattern_pair};

    /// Everything is f64 with ~1e-16 rounding per term; 1e-10 allows for summation order.
    const TOL: f64 = 1e-10;

    #[test]
    fn matches_scipy() {
        // With `a`, `b` from `fixtures::pattern_pair` as float64 and
        //   from scipy.stats import entropy; eps = 1e-7
        //   entropy(np.clip(a, 0, None).ravel() + eps, np.clip(b, 0, None).ravel() + eps)
        // (scipy 1.17.1). The pattern contains exact zeros in both images.
        let cases = [
            (Shape::new(3, 24, 20), 0.05318663839617279),
            (Shape::new(1, 17, 23), 0.049566493174358905),
        ];
        for (shape, want) in cases {
            let (a, b) = pattern_pair(shape);
            let got = kld(&a, &b).unwrap();
            assert!((got - want).abs() < TOL, "{shape}: {got} vs {want}");
        }
    }

    #[test]
    fn zeros_and_negatives() {
        // entropy(np.array([1, 0, 0.5]) + eps, np.array([0, 1, 0.5]) + eps)       -> 10.74539501822654
        // entropy(np.clip([-0.5, 0.2, 0.3], 0, None) + eps, np.array([0.1, 0.2, 0.3]) + eps)
        //                                                                          -> 0.18231869369335604
        // entropy(np.zeros(4) + eps, np.array([0, 0, 0, 1.0]) + eps)              -> 10.70227775209877
        let cases: [(&[f32], &[f32], f64); 3] = [
            (&[1.0, 0.0, 0.5], &[0.0, 1.0, 0.5], 10.74539501822654),
            (&[-0.5, 0.2, 0.3], &[0.1, 0.2, 0.3], 0.18231869369335604),
            (&[0.0; 4], &[0.0, 0.0, 0.0, 1.0], 10.70227775209877),
        ];
        for (p, q, want) in cases {
            let got = kld(p, q).unwrap();
            // f32 inputs like 0.2 are not the f64 0.2 scipy saw: allow for that.
            assert!((got - want).abs() < 1e-6, "{p:?} {q:?}: {got} vs {want}");
        }
        assert_eq!(kld(&[0.0; 4], &[0.0; 4]), Ok(0.0));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            kld(&[1.0], &[1.0, 2.0]),
            Err(MetricsError::LengthMismatch {
                reference: 1,
                test: 2
            })
        );
        assert_eq!(kld(&[], &[]), Err(MetricsError::Empty));
        // NaN must not be clipped away to 0, nor -inf to 0.
        for bad in [f32::NAN, f32::NEG_INFINITY, f32::INFINITY] {
            let err = kld(&[0.5, 0.5], &[0.5, bad]).unwrap_err();
            assert!(
                matches!(
                    err,
                    MetricsError::NonFinite {
                        operand: Operand::Test,
                        index: 1,
                        value,
                    } if value.to_bits() == bad.to_bits()
                ),
                "{bad}: {err}"
            );
        }
    }

    proptest! {
        #[test]
        fn non_negative_and_zero_on_equal(
            len in 1usize..300, s1 in any::<u64>(), s2 in any::<u64>(), shift in -0.5f32..0.5,
        ) {
            // The shift pushes some values below zero to exercise the clipping.
            let a: Vec<f32> = noise(len, s1).iter().map(|v| v + shift).collect();
            let b = noise(len, s2);
            prop_assert!(kld(&a, &b).unwrap() >= 0.0);
            prop_assert!(kld(&b, &a).unwrap() >= 0.0);
            prop_assert_eq!(kld(&a, &a).unwrap(), 0.0);
        }
    }
}
