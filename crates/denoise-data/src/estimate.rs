//! Blind estimation of the level of additive white Gaussian noise in an image.
//!
//! [`estimate_sigma`] uses the eigenvalues of the covariance of the image's patches (Chen, Zhu
//! & Heng 2015) where the noise is white across channels, and Immerkær's filter
//! ([`immerkaer_sigma`]) elsewhere. In a numpy prototype of the same method on CBSD68 with
//! unclipped noise at sigma 15/25/50, the patch method's error was 0.07/0.10/0.18 (root mean
//! square over the 68 images) and Immerkær's 1.55/1.05/0.57, all of it overestimation on
//! texture.

use crate::Image;

/// Side of the square patches of the covariance estimate.
const PATCH: usize = 6;

/// The covariance estimate uses at most this many patches: a larger image is sampled on a
/// regular grid of patch positions (deterministic, spread over the whole image).
const MAX_PATCHES: usize = 20_000;

/// The covariance estimate needs at least this many patches per dimension of a patch; with
/// fewer the sample eigenvalues spread too far and Immerkær's filter is used instead.
const MIN_PATCHES_PER_DIM: usize = 4;

/// Below this fraction of Immerkær's estimate, the patch estimate is taken to have found
/// directions without noise (noise not white across channels) and is not used. In a numpy
/// prototype on 34 CBSD68 images the patch/filter ratio was at least 0.37 for white noise of
/// sigma 5 and up (0.73 from 15), and at most 0.23 for the cases below.
const CONSISTENT_RATIO: f32 = 0.3;

/// `sqrt(pi / 2) / 6`: turns the mean absolute mask response into a standard deviation. The
/// mask's squared weights sum to 36, so its response to white noise of std s is normal with
/// std 6 s, whose mean absolute value is 6 s sqrt(2 / pi).
const SCALE: f64 = 0.208_885_689_552_583_35;

/// The standard deviation of additive white Gaussian noise in `img`, on the 0-255 scale (for
/// an image on [0, 1]), one value for all channels: for a colour image
/// [`patch_covariance_sigma`] when it is consistent with [`immerkaer_sigma`] (at least 0.3 of
/// it), else the latter; for a gray one the latter.
///
/// The patch estimate is far closer on textured photos with white noise, but it reads noise
/// that is shared by the channels as no noise at all: a gray image repeated into RGB (a gray
/// upload to a colour model) gave 0, and a noisy photo saved as a JPEG with 4:2:0 chroma (most
/// camera and web JPEGs) about 1 at sigma 25, where Immerkær's filter gave 26 and 18. Those
/// cases fall back to the filter. So does a nearly noise-free photo (0.5 against the filter's
/// 2-6 on texture), which then gets the filter's small overestimate, as before this estimator.
///
/// Method: G. Chen, F. Zhu and P. A. Heng, "An Efficient Statistical Method for Image Noise
/// Level Estimation", ICCV 2015. Clean patches lie close to a low-dimensional subspace, so the
/// smallest eigenvalues of the patch covariance (6x6 patches, all channels together) are the
/// noise variance alone. Their set is found as the largest lower part of the sorted eigenvalues
/// whose mean equals its median (as many above the mean as below), and its mean is the
/// variance. Texture raises only the large eigenvalues, which is why this holds on busy photos
/// where a filter response overestimates. Noise that is not white (demosaicked camera noise,
/// JPEG) or clipped at 0 and 1 is not what this measures.
///
/// A one-channel image gets the filter alone. Its 6x6 patches (36 values) are too few for
/// texture to stay out of the smallest eigenvalues: on 12 gray BSD68 images the patch estimate
/// read 8.45 on the clean images (the filter 4.97), 10.11 at sigma 5 (7.73) and 17.44 at sigma
/// 15 (16.20); 7x7 and 8x8 patches did little better (9.76 and 9.41 at sigma 5).
///
/// Falls back to [`immerkaer_sigma`] when the image has fewer than 4 patches per patch
/// dimension (under about 27x27 in colour). An image smaller than 3x3, or with no channels,
/// gives 0.
///
/// # Shapes
/// C x H x W in.
pub fn estimate_sigma(img: &Image) -> f32 {
    let filter = immerkaer_sigma(img);
    if img.channels() < 2 {
        return filter;
    }
    match patch_covariance_sigma(img) {
        Some(patch) if patch >= CONSISTENT_RATIO * filter => patch,
        _ => filter,
    }
}

/// The patch-covariance estimate (Chen, Zhu & Heng 2015), or `None` for an image with too few
/// patches for it or with values that are not finite.
///
/// # Shapes
/// C x H x W in.
pub fn patch_covariance_sigma(img: &Image) -> Option<f32> {
    let (channels, h, w) = img.shape();
    if channels == 0 || h < PATCH || w < PATCH {
        return None;
    }
    let dim = channels * PATCH * PATCH;
    let (ny, nx) = (h - PATCH + 1, w - PATCH + 1);
    let stride = grid_stride(ny, nx, MAX_PATCHES);
    let count = ny.div_ceil(stride) * nx.div_ceil(stride);
    if count < MIN_PATCHES_PER_DIM * dim {
        return None;
    }
    // Sums of x and of x x^T (upper triangle) over the patches. Values are centred on their
    // channel's mean and summed in f32 over blocks of 256 patches (twice the SIMD width of
    // f64), then the blocks in f64: the noise variance is down to about 1e-5 of the second
    // moments, and a block's f32 rounding stays near 1e-7 of them.
    let means: Vec<f32> = (0..channels)
        .map(|c| {
            let plane = img.plane(c);
            (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / plane.len() as f64) as f32
        })
        .collect();
    let mut sum = vec![0.0f64; dim];
    let mut gram = vec![0.0f64; dim * dim];
    let mut block = vec![0.0f32; dim * dim];
    let mut in_block = 0;
    let mut x = vec![0.0f32; dim];
    for y0 in (0..ny).step_by(stride) {
        for x0 in (0..nx).step_by(stride) {
            let mut k = 0;
            for (c, &mean) in means.iter().enumerate() {
                let plane = img.plane(c);
                for dy in 0..PATCH {
                    let row = &plane[(y0 + dy) * w + x0..][..PATCH];
                    for &v in row {
                        x[k] = v - mean;
                        k += 1;
                    }
                }
            }
            for i in 0..dim {
                let xi = x[i];
                sum[i] += f64::from(xi);
                for (g, &xj) in block[i * dim + i..(i + 1) * dim].iter_mut().zip(&x[i..]) {
                    *g += xi * xj;
                }
            }
            in_block += 1;
            if in_block == 256 {
                flush(&mut block, &mut gram);
                in_block = 0;
            }
        }
    }
    flush(&mut block, &mut gram);
    let n = count as f64;
    let mut cov = vec![0.0f64; dim * dim];
    for i in 0..dim {
        for j in i..dim {
            let v = gram[i * dim + j] / n - (sum[i] / n) * (sum[j] / n);
            cov[i * dim + j] = v;
            cov[j * dim + i] = v;
        }
    }
    let (mut eigenvalues, _sweeps) = symmetric_eigenvalues(cov, dim);
    eigenvalues.sort_by(f64::total_cmp);
    let variance = noise_variance(&eigenvalues);
    if !variance.is_finite() {
        return None;
    }
    Some((variance.max(0.0).sqrt() * 255.0) as f32)
}

/// Adds `block` into `total` and zeroes it.
fn flush(block: &mut [f32], total: &mut [f64]) {
    for (t, b) in total.iter_mut().zip(block.iter_mut()) {
        *t += f64::from(*b);
        *b = 0.0;
    }
}

/// The smallest stride whose grid over `ny` x `nx` positions has at most `max` points.
fn grid_stride(ny: usize, nx: usize, max: usize) -> usize {
    let mut stride = 1;
    while ny.div_ceil(stride) * nx.div_ceil(stride) > max {
        stride += 1;
    }
    stride
}

/// The noise variance from ascending eigenvalues: the mean of the longest prefix whose mean
/// has as many values above it as below (mean equal to median).
fn noise_variance(ascending: &[f64]) -> f64 {
    for k in (1..=ascending.len()).rev() {
        let part = &ascending[..k];
        let mean = part.iter().sum::<f64>() / k as f64;
        let above = part.iter().filter(|&&v| v > mean).count();
        let below = part.iter().filter(|&&v| v < mean).count();
        if above == below {
            return mean;
        }
    }
    0.0
}

/// Sweeps stop once the off-diagonal mass is under this fraction of the total (the relative
/// size of what is left is its square root, 1e-12): far below the noise eigenvalues' share of
/// a covariance (above 1e-8 for sigma 1), and above where rounding would stall it.
const JACOBI_TOLERANCE: f64 = 1e-24;

/// The eigenvalues of the symmetric `n` x `n` matrix `a` (row-major), and the sweeps they
/// took, by cyclic Jacobi rotations: each rotation zeroes one off-diagonal pair, and sweeps
/// repeat until the off-diagonal mass is under [`JACOBI_TOLERANCE`] of the total (quadratic
/// convergence: a handful of sweeps).
fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> (Vec<f64>, usize) {
    debug_assert_eq!(a.len(), n * n);
    let mut sweeps = 0;
    for _ in 0..64 {
        let mut off = 0.0;
        let mut total = 0.0;
        for i in 0..n {
            for j in 0..n {
                let v = a[i * n + j] * a[i * n + j];
                total += v;
                if i != j {
                    off += v;
                }
            }
        }
        if off <= JACOBI_TOLERANCE * total || off == 0.0 {
            break;
        }
        sweeps += 1;
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), sweeps)
}

/// Immerkær's estimate, averaged over channels (0-255 scale).
///
/// Method: J. Immerkær, "Fast Noise Variance Estimation", Computer Vision and Image
/// Understanding 64(2):300-302, 1996. The 3x3 mask `[1 -2 1; -2 4 -2; 1 -2 1]` (the difference
/// of two Laplacians) annihilates every polynomial of degree 2, so on smooth content only the
/// noise responds; `sigma = sqrt(pi/2) / (6 (W-2) (H-2)) * sum |I * N|` over the interior.
/// Edges and texture respond too, so on busy images it overestimates; clipped noise (values
/// piled at 0 or 1) is underestimated.
///
/// An image smaller than 3x3 has no interior and gives 0.
///
/// # Shapes
/// C x H x W in.
pub fn immerkaer_sigma(img: &Image) -> f32 {
    let per_channel = immerkaer_sigma_channels(img);
    if per_channel.is_empty() {
        return 0.0;
    }
    per_channel.iter().sum::<f32>() / per_channel.len() as f32
}

/// [`immerkaer_sigma`] of each channel separately (0-255 scale).
///
/// # Shapes
/// C x H x W in; C values out.
pub fn immerkaer_sigma_channels(img: &Image) -> Vec<f32> {
    let (channels, h, w) = img.shape();
    if h < 3 || w < 3 {
        return vec![0.0; channels];
    }
    (0..channels)
        .map(|c| {
            let p = img.plane(c);
            let mut sum = 0.0f64;
            for y in 1..h - 1 {
                let (up, mid, down) = (
                    &p[(y - 1) * w..y * w],
                    &p[y * w..(y + 1) * w],
                    &p[(y + 1) * w..(y + 2) * w],
                );
                for x in 1..w - 1 {
                    let corners = up[x - 1] + up[x + 1] + down[x - 1] + down[x + 1];
                    let edges = up[x] + down[x] + mid[x - 1] + mid[x + 1];
                    let r = corners - 2.0 * edges + 4.0 * mid[x];
                    sum += f64::from(r.abs());
                }
            }
            let interior = ((h - 2) * (w - 2)) as f64;
            (SCALE * sum / interior * 255.0) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseSpec;

    fn smooth(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            let (y, x) = (y as f32 / h as f32, x as f32 / w as f32);
            0.5 + 0.3 * (3.0 * y + c as f32).sin() * (2.0 * x).cos()
        })
    }

    #[test]
    fn scale_constant_is_sqrt_half_pi_over_6() {
        assert!((SCALE - (std::f64::consts::FRAC_PI_2).sqrt() / 6.0).abs() < 1e-15);
    }

    #[test]
    fn estimates_sigma_25_within_10_percent_on_a_smooth_image() {
        let clean = smooth(1, 256, 256);
        for seed in 0..3 {
            let noisy = NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 }
                .apply(&clean, seed)
                .image;
            let est = estimate_sigma(&noisy);
            assert!((est / 25.0 - 1.0).abs() < 0.1, "seed {seed}: {est}");
        }
    }

    #[test]
    fn tracks_other_levels_and_immerkaer_averages_rgb_channels() {
        let clean = smooth(3, 128, 128);
        for sigma in [5.0f32, 15.0, 50.0] {
            let noisy = NoiseSpec::Gaussian {
                lo: sigma,
                hi: sigma,
            }
            .apply(&clean, 1)
            .image;
            let est = estimate_sigma(&noisy);
            assert!((est / sigma - 1.0).abs() < 0.1, "sigma {sigma}: {est}");
            let channels = immerkaer_sigma_channels(&noisy);
            assert_eq!(channels.len(), 3);
            assert!(
                channels.iter().all(|c| (c / sigma - 1.0).abs() < 0.1),
                "{channels:?}"
            );
        }
    }

    #[test]
    fn quadratic_images_read_as_noise_free() {
        let quad = Image::from_fn(1, 32, 40, |_, y, x| {
            let (y, x) = (y as f32 / 32.0, x as f32 / 40.0);
            0.1 + 0.3 * x + 0.2 * y + 0.2 * x * x - 0.1 * x * y + 0.15 * y * y
        });
        assert!(estimate_sigma(&quad) < 0.01, "{}", estimate_sigma(&quad));
        assert_eq!(estimate_sigma(&Image::zeros(3, 2, 10)), 0.0);
        assert_eq!(estimate_sigma(&Image::zeros(0, 5, 5)), 0.0);
    }

    /// Three sinusoids per channel, correlated across channels: busy, with much energy at high
    /// frequencies, but in a low-dimensional subspace of patch space (as real texture nearly is).
    fn texture(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            let (y, x, c) = (y as f32, x as f32, c as f32);
            0.5 + 0.2 * (1.9 * x + 0.4 * y).sin()
                + 0.1 * (0.7 * x - 2.3 * y + c).cos()
                + 0.08 * (1.1 * x + 1.3 * y + 0.5 * c).sin()
        })
    }

    #[test]
    fn texture_raises_immerkaer_but_not_the_patch_estimate() {
        let clean = texture(3, 96, 128);
        for sigma in [5.0f32, 10.0, 30.0] {
            let noisy = NoiseSpec::Gaussian {
                lo: sigma,
                hi: sigma,
            }
            .apply(&clean, 7)
            .image;
            let patch = patch_covariance_sigma(&noisy).unwrap();
            assert!((patch / sigma - 1.0).abs() < 0.05, "sigma {sigma}: {patch}");
            assert_eq!(estimate_sigma(&noisy), patch);
            // What the patch method is for: the filter reads the texture as noise (about 6 more
            // in quadrature, which matters most at low levels).
            let filter = immerkaer_sigma(&noisy);
            if sigma <= 10.0 {
                assert!(filter > 1.15 * sigma, "sigma {sigma}: Immerkaer {filter}");
            }
        }
        assert!(patch_covariance_sigma(&clean).unwrap() < 0.05);
    }

    #[test]
    fn noise_shared_by_the_channels_falls_back_to_immerkaer() {
        // A gray image repeated into RGB, and a colour image whose channels got one noise
        // field: the patch covariance has noise-free directions and reads about 0.
        let gray = NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
            .apply(&texture(1, 96, 128), 5)
            .image
            .to_channels(3)
            .unwrap();
        let colour = texture(3, 96, 128);
        let field = NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
            .apply(&Image::zeros(1, 96, 128), 6)
            .image;
        let shared = Image::from_fn(3, 96, 128, |c, y, x| {
            colour.plane(c)[y * 128 + x] + field.plane(0)[y * 128 + x]
        });
        for noisy in [gray, shared] {
            assert!(patch_covariance_sigma(&noisy).unwrap() < 1.0);
            let est = estimate_sigma(&noisy);
            assert_eq!(est, immerkaer_sigma(&noisy));
            assert!((est / 20.0 - 1.0).abs() < 0.25, "{est}");
        }
    }

    #[test]
    fn a_gray_image_gets_the_filter() {
        let noisy = NoiseSpec::Gaussian { lo: 10.0, hi: 10.0 }
            .apply(&texture(1, 96, 128), 8)
            .image;
        assert!(patch_covariance_sigma(&noisy).is_some());
        assert_eq!(estimate_sigma(&noisy), immerkaer_sigma(&noisy));
    }

    #[test]
    fn small_images_fall_back_to_immerkaer() {
        let clean = smooth(3, 20, 20);
        let noisy = NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
            .apply(&clean, 3)
            .image;
        // 15 x 15 = 225 patches of 108 values: fewer than 4 per dimension.
        assert_eq!(patch_covariance_sigma(&noisy), None);
        assert_eq!(estimate_sigma(&noisy), immerkaer_sigma(&noisy));
        assert_eq!(patch_covariance_sigma(&Image::zeros(3, 5, 100)), None);
        assert_eq!(patch_covariance_sigma(&Image::zeros(0, 50, 50)), None);
    }

    #[test]
    fn large_images_are_sampled_on_a_grid() {
        assert_eq!(grid_stride(100, 100, 20_000), 1);
        for (ny, nx) in [(1000, 1000), (4000, 6000), (141, 142), (1, 50_000)] {
            let s = grid_stride(ny, nx, 20_000);
            assert!(ny.div_ceil(s) * nx.div_ceil(s) <= 20_000, "{ny}x{nx}: {s}");
            assert!(
                ny.div_ceil(s - 1) * nx.div_ceil(s - 1) > 20_000,
                "{ny}x{nx}: {s}"
            );
        }
        let clean = smooth(1, 400, 500);
        let noisy = NoiseSpec::Gaussian { lo: 12.0, hi: 12.0 }
            .apply(&clean, 4)
            .image;
        let est = estimate_sigma(&noisy);
        assert!((est / 12.0 - 1.0).abs() < 0.03, "{est}");
    }

    #[test]
    fn noise_variance_is_the_mean_of_the_largest_part_whose_mean_is_its_median() {
        // All six: mean 10.67 has 1 above, 5 below; five: 2.8, 1 above, 4 below; four: 1.
        assert_eq!(noise_variance(&[1.0, 1.0, 1.0, 1.0, 10.0, 50.0]), 1.0);
        let v = noise_variance(&[0.9, 1.0, 1.1, 5.0]);
        assert!((v - 1.0).abs() < 1e-12, "{v}");
        assert_eq!(noise_variance(&[2.0]), 2.0);
        assert_eq!(noise_variance(&[]), 0.0);
    }

    /// `Q diag(values) Q^T` for the Householder reflection `Q = I - 2 v v^T / (v^T v)`.
    fn rotated_diagonal(values: &[f64], v: &[f64]) -> Vec<f64> {
        let n = values.len();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        let q = |i: usize, j: usize| f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| q(i, k) * values[k] * q(j, k)).sum();
            }
        }
        a
    }

    #[test]
    fn jacobi_recovers_the_eigenvalues_of_a_rotated_diagonal() {
        let values = [3.0, -1.0, 0.5, 2.0, 1e-6, 7.0];
        let a = rotated_diagonal(&values, &[0.3, -1.2, 0.8, 0.1, 2.0, -0.4]);
        let (mut got, _) = symmetric_eigenvalues(a, values.len());
        got.sort_by(f64::total_cmp);
        let mut want = values.to_vec();
        want.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // A covariance-like size, with a repeated eigenvalue (the noise floor).
        let n = 108;
        let values: Vec<f64> = (0..n)
            .map(|i| if i < 90 { 1e-3 } else { (i - 89) as f64 * 0.37 })
            .collect();
        let v: Vec<f64> = (0..n).map(|i| ((i * 7919) % 23) as f64 - 11.0).collect();
        let (mut got, sweeps) = symmetric_eigenvalues(rotated_diagonal(&values, &v), n);
        assert!(sweeps <= 12, "{sweeps} sweeps");
        got.sort_by(f64::total_cmp);
        let mut want = values.clone();
        want.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-10, "{g} vs {w}");
        }
    }
}
