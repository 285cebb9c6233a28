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

/// Output columns per strip. Each task walks its rows in strips this wide so that the ring of the
/// last 11 horizontally filtered rows (4 maps x 11 rows x 128 columns x 4 bytes = 22.5 KiB)
/// stays in L1: the vertical pass reads it 11 times over, and from L2 that was the bottleneck.
/// A compile-time constant so every row is a fixed-size array and the inner loops carry no bounds
/// checks and few base pointers.
const STRIP: usize = 128;
/// Input columns a strip reads: the output columns plus the window radius on either side.
const STRIP_IN: usize = STRIP + 2 * RADIUS;

/// Output rows per parallel task (one channel each). Each task refilters 10 halo rows per strip,
/// so larger is cheaper; 256 still gives 48 tasks for a 4000-row RGB image.
#[derive(Debug, Clone, Copy)]
struct Tiling {
    rows: usize,
}

const TILING: Tiling = Tiling { rows: 256 };

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
/// [`NonFinite`](MetricsError::NonFinite), [`InvalidDataRange`](MetricsError::InvalidDataRange)
/// (also for ranges outside about 1e-17..1e21, where `C1`, `C2` do not fit an f32),
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
    let params = Params {
        weights: gaussian_weights(),
        c1: ((K1 * data_range) * (K1 * data_range)) as f32,
        c2: ((K2 * data_range) * (K2 * data_range)) as f32,
        width,
    };
    // The constants keep every per-pixel denominator positive; a range so extreme that they round
    // to 0 or infinity in f32 would turn flat regions into 0/0.
    if !(params.c1.is_normal() && params.c2.is_normal()) {
        return Err(MetricsError::InvalidDataRange(data_range));
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
}

/// The window as scipy builds it: `exp(-x^2 / (2 sigma^2))` for `x` in `-5..=5`, normalised in
/// f64 to sum 1, then rounded to f32 once.
fn gaussian_weights() -> [f32; RADIUS + 1] {
    let raw: [f64; RADIUS + 1] =
        std::array::from_fn(|k| (-0.5 * (k * k) as f64 / (SIGMA * SIGMA)).exp());
    let total = raw[0] + 2.0 * raw[1..].iter().sum::<f64>();
    raw.map(|w| (w / total) as f32)
}

/// The filtered statistics. SSIM only ever uses `vx + vy`, so `dx^2 + dy^2` is filtered as one
/// map instead of two, which saves a fifth of the filtering.
const MAPS: usize = 4;
const X: usize = 0;
const Y: usize = 1;
const SQ: usize = 2;
const XY: usize = 3;

/// The four maps of one input row of a strip, before (`STRIP_IN` wide) and after (`STRIP` wide)
/// horizontal filtering.
type Unfiltered = [[f32; STRIP_IN]; MAPS];
type Filtered = [[f32; STRIP]; MAPS];

/// Sum of per-pixel SSIM over output rows `rows` (image coordinates) of one channel.
///
/// For each strip, input rows are read top to bottom once: each is centred on the channel mean,
/// squared/multiplied, filtered horizontally into a ring of the last 11 rows, and as soon as the
/// ring holds a full window the vertical filter and the SSIM formula yield one output row.
fn block_sum(
    x: &[f32],
    y: &[f32],
    means: (f32, f32),
    rows: std::ops::Range<usize>,
    p: &Params,
) -> f64 {
    let w = p.width;
    let out_cols = w - 2 * RADIUS;
    let mut src: Box<Unfiltered> = Box::new([[0.0; STRIP_IN]; MAPS]);
    let mut ring: Vec<Filtered> = vec![[[0.0; STRIP]; MAPS]; SSIM_WINDOW];
    let mut s_row = [0.0f32; STRIP];
    let mut total = 0.0f64;

    // `start` is both the strip's first input column and (offset by RADIUS) its first output one.
    let mut start = 0;
    while start < out_cols {
        let n = STRIP.min(out_cols - start);
        for r in rows.start - RADIUS..rows.end + RADIUS {
            let offset = r * w + start;
            let n_in = n + 2 * RADIUS;
            prepare(
                &x[offset..offset + n_in],
                &y[offset..offset + n_in],
                means,
                &mut src,
            );
            horizontal(&src, &mut ring[r % SSIM_WINDOW], &p.weights);
            // Output row `r - RADIUS` needs input rows `r - 2 RADIUS ..= r`.
            if r < rows.start + RADIUS {
                continue;
            }
            let top = r + 1 - SSIM_WINDOW;
            let taps: [&Filtered; SSIM_WINDOW] =
                std::array::from_fn(|k| &ring[(top + k) % SSIM_WINDOW]);
            vertical_ssim(&taps, means, p, &mut s_row);
            // A narrow last strip computes garbage (but finite) columns past `n`; skip them.
            total += sum_f64(&s_row[..n]);
        }
        start += n;
    }
    total
}

/// Fills the filter inputs for one strip row. Centring on the channel mean first makes
/// `E[d^2] - E[d]^2` (the variance) a difference of small numbers instead of two nearly equal
/// ones near 1, which is what keeps f32 filtering within reach of scikit-image's f64.
fn prepare(row_x: &[f32], row_y: &[f32], (mean_x, mean_y): (f32, f32), src: &mut Unfiltered) {
    let n = row_x.len();
    let [sx, sy, ssq, sxy] = src;
    let (row_x, row_y) = (&row_x[..n], &row_y[..n]);
    for j in 0..n {
        let dx = row_x[j] - mean_x;
        let dy = row_y[j] - mean_y;
        sx[j] = dx;
        sy[j] = dy;
        ssq[j] = dx * dx + dy * dy;
        sxy[j] = dx * dy;
    }
    if n < STRIP_IN {
        // Only in a narrow last strip; zeros keep the unused columns finite.
        for map in [sx, sy, ssq, sxy] {
            map[n..].fill(0.0);
        }
    }
}

/// `sum_k w[|k - 5|] * t[k]`: the symmetric 11-tap window folded so each weight multiplies a
/// pair sum (6 multiplies instead of 11). The same expression serves both passes, so that a map
/// of x and the matching map of y are always rounded identically.
#[inline(always)]
fn fold(w: &[f32; RADIUS + 1], t: impl Fn(usize) -> f32) -> f32 {
    w[0] * t(5)
        + w[1] * (t(4) + t(6))
        + w[2] * (t(3) + t(7))
        + w[3] * (t(2) + t(8))
        + w[4] * (t(1) + t(9))
        + w[5] * (t(0) + t(10))
}

fn horizontal(src: &Unfiltered, out: &mut Filtered, w: &[f32; RADIUS + 1]) {
    for (src, out) in src.iter().zip(out.iter_mut()) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = fold(w, |k| src[j + k]);
        }
    }
}

/// Vertical pass over the ring plus the per-pixel SSIM, fused so the filtered means and moments
/// never leave registers.
///
/// Every product is written so that swapping x and y gives bit-identical results (`2 * (a * b)`,
/// not `(2 * a) * b`), which makes the metric exactly symmetric and exactly 1 for equal images.
fn vertical_ssim(
    taps: &[&Filtered; SSIM_WINDOW],
    (mean_x, mean_y): (f32, f32),
    p: &Params,
    out: &mut [f32; STRIP],
) {
    let w = &p.weights;
    for (j, o) in out.iter_mut().enumerate() {
        let mx = fold(w, |k| taps[k][X][j]);
        let my = fold(w, |k| taps[k][Y][j]);
        let esq = fold(w, |k| taps[k][SQ][j]);
        let exy = fold(w, |k| taps[k][XY][j]);
        // vx + vy, grouped so that for x == y it is exactly twice vxy.
        let v_sum = esq - (mx * mx + my * my);
        let vxy = exy - mx * my;
        let ux = mx + mean_x;
        let uy = my + mean_y;
        let a1 = 2.0 * (ux * uy) + p.c1;
        let b1 = ux * ux + uy * uy + p.c1;
        let a2 = 2.0 * vxy + p.c2;
        let b2 = v_sum + p.c2;
        // `clamp` keeps NaN (from overflow), which then surfaces as an error.
        *o = ((a1 * a2) / (b1 * b2)).clamp(-1.0, 1.0);
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
                    let (mut ux, mut uy, mut uxx, mut uyy, mut uxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                    for (i, gi) in g.iter().enumerate() {
                        for (j, gj) in g.iter().enumerate() {
                            let (a, b) = (
                                at(x, r + i - RADIUS, q + j - RADIUS),
                                at(y, r + i - RADIUS, q + j - RADIUS),
                            );
                            let wt = gi * gj;
                            ux += wt * a;
                            uy += wt * b;
                            uxx += wt * a * a;
                            uyy += wt * b * b;
                            uxy += wt * a * b;
                        }
                    }
                    let (vx, vy, vxy) = (uxx - ux * ux, uyy - uy * uy, uxy - ux * uy);
                    sum += (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
                        / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
                }
            }
            per_channel.push(sum / ((h - 2 * RADIUS) * (w - 2 * RADIUS)) as f64);
        }
        per_channel.iter().sum::<f64>() / shape.channels as f64
    }

    #[test]
    fn tiling_matches_naive() {
        // 300 columns: two full strips and a narrow one (290 = 128 + 128 + 34 output columns).
        let shape = Shape::new(2, 37, 300);
        let n = shape.checked_len().unwrap();
        let x = noise(n, 7);
        // Correlated with x, so the SSIM is mid-range rather than near 0.
        let y: Vec<f32> = x
            .iter()
            .zip(noise(n, 8))
            .map(|(&a, b)| (0.8 * a + 0.2 * b).min(1.0))
            .collect();
        let want = naive(&x, &y, shape, 1.0);
        for rows in [256, 1, 3, 26, 27] {
            let got = ssim_tiled(&x, &y, shape, 1.0, Tiling { rows }).unwrap();
            // f32 filtering against f64: observed ~1e-7, 1e-6 still catches any indexing slip.
            assert!((got - want).abs() < 1e-6, "rows {rows}: {got} vs {want}");
        }
        // And on a narrow image, where the only strip is a narrow one.
        let shape = Shape::new(1, 15, 12);
        let (x, y) = (&x[..180], &y[..180]);
        let got = ssim(x, y, shape, 1.0).unwrap();
        let want = naive(x, y, shape, 1.0);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
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
        for range in [f64::NAN, 0.0, 1e-30, 1e30] {
            assert!(matches!(
                ssim(&a, &a, shape, range),
                Err(MetricsError::InvalidDataRange(_))
            ));
        }
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
