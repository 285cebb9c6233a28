//! Deterministic test images shared by the unit tests, reproducible bit-for-bit in numpy.

use crate::Shape;

/// The pair every reference value in this crate's tests was computed on. In numpy (float32
/// arithmetic throughout, so the values are bit-identical):
///
/// ```python
/// C, Y, X = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
/// a = ((C * 7 + Y * 13 + X * 17) % 31).astype(np.float32) / np.float32(31)
/// q = ((C * 5 + Y * 11 + X * 3 + (X * Y) % 7) % 29).astype(np.float32) / np.float32(29)
/// b = np.clip(a + (q - np.float32(0.5)) * np.float32(0.25), 0, 1).astype(np.float32)
/// ```
///
/// Both are CHW; the Python snippets pass them to scikit-image as `a.transpose(1, 2, 0)`.
pub(crate) fn pattern_pair(shape: Shape) -> (Vec<f32>, Vec<f32>) {
    let n = shape.checked_len().expect("test shape fits in usize");
    let mut a = Vec::with_capacity(n);
    let mut b = Vec::with_capacity(n);
    for c in 0..shape.channels {
        for y in 0..shape.height {
            for x in 0..shape.width {
                let av = ((c * 7 + y * 13 + x * 17) % 31) as f32 / 31.0;
                let q = ((c * 5 + y * 11 + x * 3 + (x * y) % 7) % 29) as f32 / 29.0;
                a.push(av);
                b.push((av + (q - 0.5) * 0.25).clamp(0.0, 1.0));
            }
        }
    }
    (a, b)
}

/// Pseudo-random values in [0, 1) from a 64-bit LCG, for tests that want texture without
/// reference values (proptest supplies the seed).
pub(crate) fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}
