//! Structural similarity (SSIM, Wang et al. 2004) with a Gaussian window, computed the way
//! scikit-image does, tiled and parallel so a 24-megapixel RGB pair takes well under a second.

use rayon::prelude::*;

use crate::shape::{check_data_range, check_shaped, explain_non_finite};
use crate::{MetricsError, Result, Shape};

/// Standard deviation of the Gaussian window (Wang et al. 2004).
const SIGMA: f64 = 1.5;
/// Stabiliser constants: `C1 = (K1 * data_range)^2`, `C2 = (K2 * data_range)^2`.
const K1: f64 = 0.01;
const K2: f64 = 0.03;
/// scikit-image truncates the Gaussian at 3.5 sigma; scipy's radius is `int(3.5 * 1.5 + 0.5)`.
const RADIUS: usize = 5;
/// Side of the square window, and the smallest height and width SSIM accepts.
pub const SSIM_WINDOW: usize = 2 * RADIUS + 1;

/// Work split: each parallel task covers up to `rows` output rows of one channel, and walks them
/// in vertical strips `cols` output columns wide so its working set (5 maps x 11 filtered rows of
/// a strip, ~230 KB at 1024 columns) stays in a core's L2 cache.
#[derive(Debug, Clone, Copy)]
struct Tiling {
    rows: usize,
    cols: usize,
}

const TILING: Tiling = Tiling {
    rows: 256,
    cols: 1024,
};

/// Mean structural similarity of `test` against `reference`, both CHW with `shape`, in [-1, 1].
///
/// Defined as scikit-image's
/// `structural_similarity(ref, test, gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, channel_axis=-1, data_range=data_range)` (Wang et al. 2004):
///
/// * local means, variances and covariance are taken under an 11x11 Gaussian window with
///   sigma 1.5 (truncated at 3.5 sigma and normalised to sum 1), as population statistics;
/// * per pixel, `S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))` with
///   `C1 = (0.01 R)^2`, `C2 = (0.03 R)^2`, `R = data_range`;
/// * S is averaged over the pixels at least 5 (the window radius) from every edge, which is the
///   part scikit-image keeps after its crop, so its filter's boundary mode never matters;
/// * the result is the mean over channels (all channels have the same weight).
///
/// Filtering is done in f32 (on values minus the channel mean, which keeps the variance
/// cancellation error far below the 1e-4 agreement the tests demand); per-pixel S is clamped to
/// [-1, 1], its mathematical range, so rounding can never report SSIM above 1; sums are f64.
/// Identical images give exactly 1.0, and the metric is exactly symmetric in its arguments.
///
/// # Errors
/// [`ShapeMismatch`](MetricsError::ShapeMismatch), [`Empty`](MetricsError::Empty),
/// [`NonFinite`](MetricsError::NonFinite), [`InvalidDataRange`](MetricsError::InvalidDataRange),
/// [`TooSmall`](MetricsError::TooSmall) when height or width is below [`SSIM_WINDOW`], and
/// [`Overflow`](MetricsError::Overflow) for finite values too large to square in f32.
pub fn ssim(reference: &[f32], test: &[f32], shape: Shape, data_range: f64) -> Result<f64> {
    ssim_tiled(reference, test, shape, data_range, TILING)
}

fn ssim_tiled(
    reference: &[f32],
    test: &[f32],
    shape: Shape,
    data_range: f64,
    tiling: Tiling,
) -> Result<f64> {
    check_shaped(reference, test, shape)?;
    check_data_range(data_range)?;
    let Shape {
        channels,
        height,
        width,
    } = shape;
    if height < SSIM_WINDOW || width < SSIM_WINDOW {
        return Err(MetricsError::TooSmall {
            height,
            width,
            window: SSIM_WINDOW,
        });
    }
    let plane = height * width;

    // One pass for the per-channel means that also doubles as the finiteness check: an f64 sum
    // of finite f32 values cannot overflow, so a non-finite sum means a NaN or infinity.
    let mut means = Vec::with_capacity(channels);
    for c in 0..channels {
        let range = c * plane..(c + 1) * plane;
        let (sx, sy) = (par_sum(&reference[range.clone()]), par_sum(&test[range]));
        if !(sx.is_finite() && sy.is_finite()) {
            return Err(explain_non_finite(reference, test, "ssim"));
        }
        means.push(((sx / plane as f64) as f32, (sy / plane as f64) as f32));
    }

    let params = Params {
        weights: gaussian_weights(),
        c1: ((K1 * data_range) * (K1 * data_range)) as f32,
        c2: ((K2 * data_range) * (K2 * data_range)) as f32,
        width,
        cols: tiling.cols,
    };
    // Output rows are RADIUS..height - RADIUS; split them into blocks per channel.
    let out_rows = height - 2 * RADIUS;
    let blocks = out_rows.div_ceil(tiling.rows);
    let partial: Vec<f64> = (0..channels * blocks)
        .into_par_iter()
        .map(|task| {
            let (c, b) = (task / blocks, task % blocks);
            let first = RADIUS + b * tiling.rows;
            let last = (first + tiling.rows).min(height - RADIUS);
            let range = c * plane..(c + 1) * plane;
            let (mean_x, mean_y) = means[c];
            block_sum(
                &reference[range.clone()],
                &test[range],
                (mean_x, mean_y),
                first..last,
                &params,
            )
        })
        .collect();
    let count = (channels * out_rows * (width - 2 * RADIUS)) as f64;
    let mean = partial.iter().sum::<f64>() / count;
    if !mean.is_finite() {
        return Err(MetricsError::Overflow { metric: "ssim" });
    }
    Ok(mean)
}

/// Everything a tile needs besides its own pixels.
struct Params {
    /// Folded Gaussian: `weights[k]` for offsets `+k` and `-k`.
    weights: [f32; RADIUS + 1],
    c1: f32,
    c2: f32,
    width: usize,
    cols: usize,
}

/// The window as scipy builds it: `exp(-x^2 / (2 sigma^2))` for `x` in `-5..=5`, normalised in
/// f64 to sum 1, then rounded to f32 once.
fn gaussian_weights() -> [f32; RADIUS + 1] {
    let raw: [f64; RADIUS + 1] =
        std::array::from_fn(|k| (-0.5 * (k * k) as f64 / (SIGMA * SIGMA)).exp());
    let total = raw[0] + 2.0 * raw[1..].iter().sum::<f64>();
    raw.map(|w| (w / total) as f32)
}

/// The five local statistics, each filtered by the window. Index with the constants below.
const MAPS: usize = 5;
const X: usize = 0;
const Y: usize = 1;
const XX: usize = 2;
const YY: usize = 3;
const XY: usize = 4;

/// Sum of per-pixel SSIM over output rows `rows` (image coordinates) of one channel.
///
/// For each vertical strip, input rows are read top to bottom once: each is centred on the
/// channel mean, squared/multiplied, filtered horizontally into a ring of the last 11 rows, and
/// as soon as the ring holds a full window the vertical filter yields one output row.
fn block_sum(
    x: &[f32],
    y: &[f32],
    (mean_x, mean_y): (f32, f32),
    rows: std::ops::Range<usize>,
    p: &Params,
) -> f64 {
    let w = p.width;
    let cap = p.cols.min(w - 2 * RADIUS);
    let mut src: [Vec<f32>; MAPS] = std::array::from_fn(|_| vec![0.0; cap + 2 * RADIUS]);
    let mut ring = vec![0.0f32; MAPS * SSIM_WINDOW * cap];
    let mut mu: [Vec<f32>; MAPS] = std::array::from_fn(|_| vec![0.0; cap]);
    let mut s_row = vec![0.0f32; cap];
    let mut total = 0.0f64;

    let mut start = RADIUS;
    while start < w - RADIUS {
        let n = cap.min(w - RADIUS - start);
        let n_in = n + 2 * RADIUS;
        for r in rows.start - RADIUS..rows.end + RADIUS {
            let offset = r * w + start - RADIUS;
            let (row_x, row_y) = (&x[offset..offset + n_in], &y[offset..offset + n_in]);
            prepare(row_x, row_y, mean_x, mean_y, &mut src, n_in);
            let slot = r % SSIM_WINDOW;
            for (m, src) in src.iter().enumerate() {
                let dst = &mut ring[(m * SSIM_WINDOW + slot) * cap..][..n];
                let taps: [&[f32]; SSIM_WINDOW] = std::array::from_fn(|k| &src[k..k + n]);
                filter(taps, dst, &p.weights);
            }
            // Output row `r - RADIUS` needs input rows `r - 2 RADIUS ..= r`.
            if r < rows.start + RADIUS {
                continue;
            }
            let top = r + 1 - SSIM_WINDOW;
            for (m, out) in mu.iter_mut().enumerate() {
                let taps: [&[f32]; SSIM_WINDOW] = std::array::from_fn(|k| {
                    let slot = (top + k) % SSIM_WINDOW;
                    &ring[(m * SSIM_WINDOW + slot) * cap..][..n]
                });
                filter(taps, &mut out[..n], &p.weights);
            }
            ssim_row(&mu, mean_x, mean_y, p.c1, p.c2, &mut s_row[..n]);
            total += sum_f64(&s_row[..n]);
        }
        start += n;
    }
    total
}

/// Fills the five filter inputs for one strip row. Centring first makes `E[d^2] - E[d]^2` (the
/// variance) a difference of small numbers instead of two nearly equal ones near 1.
fn prepare(
    row_x: &[f32],
    row_y: &[f32],
    mean_x: f32,
    mean_y: f32,
    src: &mut [Vec<f32>; MAPS],
    n: usize,
) {
    let [sx, sy, sxx, syy, sxy] = src;
    let (sx, sy, sxx, syy, sxy) = (
        &mut sx[..n],
        &mut sy[..n],
        &mut sxx[..n],
        &mut syy[..n],
        &mut sxy[..n],
    );
    let (row_x, row_y) = (&row_x[..n], &row_y[..n]);
    for j in 0..n {
        let dx = row_x[j] - mean_x;
        let dy = row_y[j] - mean_y;
        sx[j] = dx;
        sy[j] = dy;
        sxx[j] = dx * dx;
        syy[j] = dy * dy;
        sxy[j] = dx * dy;
    }
}

/// `out[j] = sum_k w[|k - 5|] * taps[k][j]`: the symmetric 11-tap window folded so each weight
/// multiplies a pair sum (6 multiplies instead of 11). Used for both passes: horizontally the taps
/// are shifted views of one row, vertically they are 11 rows of the ring.
#[inline]
fn filter(taps: [&[f32]; SSIM_WINDOW], out: &mut [f32], w: &[f32; RADIUS + 1]) {
    let n = out.len();
    // Re-slicing every tap to exactly `n` lets the compiler drop bounds checks and vectorise.
    let [t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10] = taps.map(|t| &t[..n]);
    for j in 0..n {
        out[j] = w[0] * t5[j]
            + w[1] * (t4[j] + t6[j])
            + w[2] * (t3[j] + t7[j])
            + w[3] * (t2[j] + t8[j])
            + w[4] * (t1[j] + t9[j])
            + w[5] * (t0[j] + t10[j]);
    }
}

/// Per-pixel SSIM from the filtered maps of centred values.
///
/// Every product is written so that swapping x and y gives bit-identical results (`2 * (a * b)`,
/// not `(2 * a) * b`), which makes the metric exactly symmetric and exactly 1 for equal images.
fn ssim_row(mu: &[Vec<f32>; MAPS], mean_x: f32, mean_y: f32, c1: f32, c2: f32, out: &mut [f32]) {
    let n = out.len();
    let (mx, my) = (&mu[X][..n], &mu[Y][..n]);
    let (exx, eyy, exy) = (&mu[XX][..n], &mu[YY][..n], &mu[XY][..n]);
    for j in 0..n {
        let vx = exx[j] - mx[j] * mx[j];
        let vy = eyy[j] - my[j] * my[j];
        let vxy = exy[j] - mx[j] * my[j];
        let ux = mx[j] + mean_x;
        let uy = my[j] + mean_y;
        let a1 = 2.0 * (ux * uy) + c1;
        let b1 = ux * ux + uy * uy + c1;
        let a2 = 2.0 * vxy + c2;
        let b2 = vx + vy + c2;
        // `clamp` keeps NaN (from overflow), which then surfaces as an error.
        out[j] = ((a1 * a2) / (b1 * b2)).clamp(-1.0, 1.0);
    }
}

/// Sum in f64 with four accumulators, so a long row of f32 values loses no precision.
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = v.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&a| f64::from(a)).sum();
    for c in chunks {
        for k in 0..4 {
            acc[k] += f64::from(c[k]);
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// [`sum_f64`] in parallel over fixed-size chunks (fixed so the result is thread-count
/// independent).
fn par_sum(v: &[f32]) -> f64 {
    let partial: Vec<f64> = v.par_chunks(1 << 16).map(sum_f64).collect();
    partial.iter().sum()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::error::Operand;
    use crate::fixtures::{noise, pattern_pair};

    /// The tolerance against scikit-image (float64 throughout).
    const TOL: f64 = 1e-4;

    #[test]
    fn matches_scikit_image() {
        // With `a`, `b` from `fixtures::pattern_pair` as float64 CHW arrays and
        //   from skimage.metrics import structural_similarity as ssim
        //   kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)
        //   ssim(a.transpose(1, 2, 0), b.transpose(1, 2, 0), data_range=1, **kw)
        // and the same with data_range=2 (scikit-image 0.26.0, scipy 1.17.1, numpy 2.4.6):
        let cases = [
            (
                Shape::new(3, 24, 20),
                0.9718531412009453,
                0.9722980980123562,
            ),
            (
                Shape::new(1, 17, 23),
                0.9727322826386977,
                0.9731568838721908,
            ),
        ];
        for (shape, range1, range2) in cases {
            let (a, b) = pattern_pair(shape);
            let got = ssim(&a, &b, shape, 1.0).unwrap();
            assert!((got - range1).abs() < TOL, "{shape}: {got} vs {range1}");
            let got = ssim(&a, &b, shape, 2.0).unwrap();
            assert!((got - range2).abs() < TOL, "{shape}: {got} vs {range2}");
        }
    }

    #[test]
    fn matches_scikit_image_on_edge_cases() {
        // Same `kw`, data_range=1, `a, b = pattern_pair(3, 24, 20)` (float64, CHW):
        //   inv = (np.float32(1) - a.astype(np.float32)).astype(np.float64)
        //   ssim(a.transpose(1, 2, 0), inv.transpose(1, 2, 0), **kw)          -> -0.9819463736054007
        //   ssim(np.full((16, 16, 1), 0.25), np.full((16, 16, 1), 0.75), **kw) -> 0.600063989761638
        //   ssim(np.full((24, 20, 3), 0.5), a.transpose(1, 2, 0), **kw)       -> 0.01077873380093733
        //   ssim(a[:, :11, :11].transpose(1, 2, 0), b[:, :11, :11].transpose(1, 2, 0), **kw)
        //                                                                      -> 0.9695325982607689
        let shape = Shape::new(3, 24, 20);
        let (a, b) = pattern_pair(shape);
        let inv: Vec<f32> = a.iter().map(|v| 1.0 - v).collect();
        let got = ssim(&a, &inv, shape, 1.0).unwrap();
        assert!((got - -0.9819463736054007).abs() < TOL, "inverted: {got}");

        let flat = Shape::new(1, 16, 16);
        let got = ssim(&[0.25; 256], &[0.75; 256], flat, 1.0).unwrap();
        assert!((got - 0.600063989761638).abs() < TOL, "constant: {got}");

        let got = ssim(&vec![0.5; a.len()], &a, shape, 1.0).unwrap();
        assert!(
            (got - 0.01077873380093733).abs() < TOL,
            "constant vs pattern: {got}"
        );

        let crop = |v: &[f32]| -> Vec<f32> {
            (0..3)
                .flat_map(|c| (0..11).flat_map(move |y| (0..11).map(move |x| (c, y, x))))
                .map(|(c, y, x)| v[(c * 24 + y) * 20 + x])
                .collect()
        };
        let got = ssim(&crop(&a), &crop(&b), Shape::new(3, 11, 11), 1.0).unwrap();
        assert!((got - 0.9695325982607689).abs() < TOL, "11x11: {got}");
    }

    /// Straightforward f64 SSIM over the valid region, as scikit-image computes it (uncentred
    /// `E[x^2] - E[x]^2`), to check the tiled f32 path on shapes and tilings the reference values
    /// do not reach.
    fn naive(x: &[f32], y: &[f32], shape: Shape, data_range: f64) -> f64 {
        let raw: Vec<f64> = (0..SSIM_WINDOW)
            .map(|i| {
                let d = i as f64 - RADIUS as f64;
                (-0.5 * d * d / (SIGMA * SIGMA)).exp()
            })
            .collect();
        let total: f64 = raw.iter().sum();
        let g: Vec<f64> = raw.iter().map(|v| v / total).collect();
        let (c1, c2) = ((K1 * data_range).powi(2), (K2 * data_range).powi(2));
        let (h, w) = (shape.height, shape.width);
        let mut per_channel = Vec::new();
        for c in 0..shape.channels {
            let at = |v: &[f32], r: usize, q: usize| f64::from(v[(c * h + r) * w + q]);
            let mut sum = 0.0;
            for r in RADIUS..h - RADIUS {
                for q in RADIUS..w - RADIUS {
                    let mut m = [0.0f64; MAPS];
                    for (i, gi) in g.iter().enumerate() {
                        for (j, gj) in g.iter().enumerate() {
                            let (a, b) = (
                                at(x, r + i - RADIUS, q + j - RADIUS),
                                at(y, r + i - RADIUS, q + j - RADIUS),
                            );
                            let wt = gi * gj;
                            m[X] += wt * a;
                            m[Y] += wt * b;
                            m[XX] += wt * a * a;
                            m[YY] += wt * b * b;
                            m[XY] += wt * a * b;
                        }
                    }
                    let (vx, vy, vxy) = (
                        m[XX] - m[X] * m[X],
                        m[YY] - m[Y] * m[Y],
                        m[XY] - m[X] * m[Y],
                    );
                    sum += (2.0 * m[X] * m[Y] + c1) * (2.0 * vxy + c2)
                        / ((m[X] * m[X] + m[Y] * m[Y] + c1) * (vx + vy + c2));
                }
            }
            per_channel.push(sum / ((h - 2 * RADIUS) * (w - 2 * RADIUS)) as f64);
        }
        per_channel.iter().sum::<f64>() / shape.channels as f64
    }

    #[test]
    fn tiling_matches_naive() {
        let shape = Shape::new(2, 37, 41);
        let n = shape.checked_len().unwrap();
        let x = noise(n, 7);
        // A structured, correlated test image: x smoothed a little plus fresh noise.
        let y: Vec<f32> = x
            .iter()
            .zip(noise(n, 8))
            .map(|(&a, b)| (0.8 * a + 0.2 * b).min(1.0))
            .collect();
        let want = naive(&x, &y, shape, 1.0);
        for tiling in [
            TILING,
            Tiling { rows: 1, cols: 1 },
            Tiling { rows: 3, cols: 7 },
            Tiling { rows: 26, cols: 30 },
            Tiling { rows: 5, cols: 31 },
        ] {
            let got = ssim_tiled(&x, &y, shape, 1.0, tiling).unwrap();
            // f32 filtering against f64: observed ~1e-7, 1e-6 still catches any indexing slip.
            assert!((got - want).abs() < 1e-6, "{tiling:?}: {got} vs {want}");
        }
    }

    #[test]
    fn window_is_scipys() {
        // scipy.ndimage._filters._gaussian_kernel1d(1.5, 0, 5)[5:]
        //   -> [0.2660117249 0.2130055377 0.1093606895 0.0360007721 0.0075987581 0.0010283801]
        let want = [
            0.2660117249,
            0.2130055377,
            0.1093606895,
            0.0360007721,
            0.0075987581,
            0.0010283801,
        ];
        for (got, want) in gaussian_weights().iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 5e-8, "{got} vs {want}");
        }
        // The scipy radius rule `int(truncate * sigma + 0.5)` that gives the 11-tap window.
        assert_eq!((3.5 * SIGMA + 0.5) as usize, RADIUS);
    }

    #[test]
    fn bad_input_is_an_error() {
        let shape = Shape::new(1, 11, 11);
        let a = noise(121, 1);
        assert_eq!(
            ssim(&a[..110], &a[..110], Shape::new(1, 10, 11), 1.0),
            Err(MetricsError::TooSmall {
                height: 10,
                width: 11,
                window: 11
            })
        );
        assert_eq!(
            ssim(&a, &a, Shape::new(1, 11, 10), 1.0)
                .unwrap_err()
                .to_string(),
            "shape mismatch: shape 1x11x10 needs 110 values, the reference image has 121"
        );
        assert_eq!(
            ssim(&[], &[], Shape::new(0, 11, 11), 1.0),
            Err(MetricsError::Empty)
        );
        assert!(matches!(
            ssim(&a, &a, shape, f64::NAN),
            Err(MetricsError::InvalidDataRange(_))
        ));
        let mut bad = a.clone();
        bad[60] = f32::NEG_INFINITY;
        assert_eq!(
            ssim(&a, &bad, shape, 1.0),
            Err(MetricsError::NonFinite {
                operand: Operand::Test,
                index: 60,
                value: f32::NEG_INFINITY
            })
        );
        // Finite but too large to square in f32: an error, not NaN.
        let huge: Vec<f32> = (0..121)
            .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
            .collect();
        assert_eq!(
            ssim(&huge, &a, shape, 1.0),
            Err(MetricsError::Overflow { metric: "ssim" })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn symmetric_bounded_and_one_on_equal(
            c in 1usize..4, h in 11usize..30, w in 11usize..30,
            s1 in any::<u64>(), s2 in any::<u64>(), mix in 0.0f32..1.0,
        ) {
            let shape = Shape::new(c, h, w);
            let x = noise(c * h * w, s1);
            let y: Vec<f32> = x.iter().zip(noise(c * h * w, s2)).map(|(&a, b)| a * mix + b * (1.0 - mix)).collect();
            let s = ssim(&x, &y, shape, 1.0).unwrap();
            // Swapping x and y permutes only commutative operations: bit-identical.
            prop_assert_eq!(s, ssim(&y, &x, shape, 1.0).unwrap());
            prop_assert!((-1.0..=1.0).contains(&s), "{}", s);
            prop_assert_eq!(ssim(&x, &x, shape, 1.0).unwrap(), 1.0);
        }
    }
}
