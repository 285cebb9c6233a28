//! Blind estimation of the level of additive white Gaussian noise in an image.
//!
//! [`estimate_sigma`] uses the eigenvalues of the covariance of the image's patches (Chen, Zhu
//! & Heng 2015) where the noise is white across channels, and Immerkær's filter
//! ([`immerkaer_sigma`]) elsewhere. In a numpy prototype of the same method on CBSD68 with
//! unclipped noise at sigma 15/25/50, the patch method's error was 0.07/0.10/0.18 (root mean
//! square over the 68 images) and Immerkær's 1.55/1.05/0.57, all of it overestimation on
//! texture.

use crate::Image;
use rayon::prelude::*;

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

/// A blind estimate of an image's noise: one level, or a level that varies with brightness.
#[derive(Clone, Debug, PartialEq)]
pub enum NoiseEstimate {
    /// One level for the whole image (0-255 scale).
    Uniform(f32),
    /// One level for a colour image whose channels share their noise, or whose noise is too
    /// faint beside its texture for the patch estimate's check: Immerkær's level times
    /// [`SHARED_NOISE_GAIN`] (0-255 scale). The least sure of the estimates: the filter reads
    /// texture as noise, so a clean, busy photo gets a level it does not have.
    Shared(f32),
    /// A level read from each pixel's neighbourhood brightness ([`NoiseLevelFunction::map`]).
    Brightness(NoiseLevelFunction),
}

/// The estimate blind denoising uses (`denoise_models::tile::NoiseLevel::Estimate`): for a colour image
/// whose patch estimate passes [`estimate_sigma`]'s check (noise independent across channels),
/// the level as a function of brightness ([`noise_level_function`], scaled to the whole
/// image's patch estimate: [`NoiseLevelFunction::with_mean_level`]); for other colour images,
/// whose channels share their noise (4:2:0 JPEGs) or whose noise is too faint for the check,
/// Immerkær's level times [`SHARED_NOISE_GAIN`]; for gray ones Immerkær's level.
///
/// Camera noise grows with the signal (shot noise), so one level over-smooths the shadows and
/// under-smooths the highlights; on white noise the map and one level agree.
///
/// # Shapes
/// C x H x W in.
pub fn estimate_noise(img: &Image) -> NoiseEstimate {
    if img.channels() < 2 {
        return NoiseEstimate::Uniform(immerkaer_sigma(img));
    }
    let filter = immerkaer_sigma(img);
    match patch_covariance_sigma(img) {
        Some(patch) if patch >= CONSISTENT_RATIO * filter => match noise_level_function(img) {
            Some(nlf) => NoiseEstimate::Brightness(nlf.with_mean_level(patch)),
            None => NoiseEstimate::Uniform(patch),
        },
        Some(_) => NoiseEstimate::Shared(filter * SHARED_NOISE_GAIN),
        // Too few patches (under about 27x27) or values that are not finite: the filter alone.
        None => NoiseEstimate::Uniform(filter),
    }
}

/// [`estimate_noise`]'s level-by-brightness or uniform estimate, only for noise that is white:
/// independent across the colour channels ([`estimate_sigma`]'s check) and from pixel to pixel
/// ([`whiteness`] at most [`SPATIALLY_WHITE_RATIO`]). `None` for a gray image, noise the
/// channels share, noise correlated between neighbouring pixels, or a colour image under about
/// 52x52 (its 2x2 averages have too few patches).
///
/// The patch estimate reads only the part of camera noise that is white, far below its
/// strength: such noise is better read by a model trained on it.
///
/// # Shapes
/// C x H x W in.
pub fn white_noise_estimate(img: &Image) -> Option<NoiseEstimate> {
    if img.channels() < 2 {
        return None;
    }
    let patch = patch_covariance_sigma(img)?;
    if patch < CONSISTENT_RATIO * immerkaer_sigma(img) {
        return None;
    }
    if whiteness_given(img, patch)? > SPATIALLY_WHITE_RATIO {
        return None;
    }
    Some(match noise_level_function(img) {
        Some(nlf) => NoiseEstimate::Brightness(nlf.with_mean_level(patch)),
        None => NoiseEstimate::Uniform(patch),
    })
}

/// How much of an image's noise survives averaging 2x2 blocks: the patch estimate of the
/// averages over that of the image (0.5 for white noise, up to 1 for noise that neighbouring
/// pixels share, as demosaicing, in-camera processing and JPEG leave it). `None` where either
/// estimate cannot be made, or the image's is 0.
///
/// # Shapes
/// C x H x W in.
pub fn whiteness(img: &Image) -> Option<f32> {
    whiteness_given(img, patch_covariance_sigma(img)?)
}

/// [`whiteness`] given the image's own patch estimate.
fn whiteness_given(img: &Image, patch: f32) -> Option<f32> {
    let averaged = patch_sigma_with(&average_2x2(img), AVERAGED_PATCHES)?;
    (patch > 0.0).then(|| averaged / patch)
}

/// The largest [`whiteness`] at which [`white_noise_estimate`] takes the noise as white: white
/// noise gives 0.5, camera noise about 1 or more (docs/benchmarks.md has the ratios measured on
/// photos).
pub const SPATIALLY_WHITE_RATIO: f32 = 0.75;

/// The patches [`white_noise_estimate`] reads of the 2x2 averages: a quarter of
/// [`MAX_PATCHES`], which keeps the check cheap and is far more than the ratio's margins need.
const AVERAGED_PATCHES: usize = MAX_PATCHES / 4;

/// The image at half the resolution, each pixel the mean of a 2x2 block (an odd last row or
/// column is dropped).
fn average_2x2(img: &Image) -> Image {
    let (channels, h, w) = img.shape();
    let (h2, w2) = (h / 2, w / 2);
    let mut data = Vec::with_capacity(channels * h2 * w2);
    for c in 0..channels {
        let plane = img.plane(c);
        for y in 0..h2 {
            let (top, bottom) = (&plane[2 * y * w..][..w], &plane[(2 * y + 1) * w..][..w]);
            data.extend(
                (0..w2).map(|x| {
                    (top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1]) / 4.0
                }),
            );
        }
    }
    Image::new(channels, h2, w2, data).expect("the shape matches the data")
}

/// What [`estimate_noise`] multiplies Immerkær's level by where the channels share their noise.
///
/// Noise shared by the channels reads, to a model trained on independent noise, as stronger
/// noise: sqrt(3) times for noise identical in all three (a gray picture, see
/// `denoise_models::tile::conversion_noise_gain`). A JPEG with 4:2:0 chroma keeps the noise's
/// luma at full resolution and averages its colour over 2x2 pixels, which shares it in part.
/// The factor was chosen on training photos saved as 4:2:0 JPEGs with and without noise: it
/// helps noisy ones much more than it costs clean ones, whose texture the filter reads as noise.
pub const SHARED_NOISE_GAIN: f32 = 1.4;

/// The patch-covariance estimate (Chen, Zhu & Heng 2015), or `None` for an image with too few
/// patches for it or with values that are not finite.
///
/// # Shapes
/// C x H x W in.
pub fn patch_covariance_sigma(img: &Image) -> Option<f32> {
    patch_sigma_with(img, MAX_PATCHES)
}

/// [`patch_covariance_sigma`] from at most `max` patches.
fn patch_sigma_with(img: &Image, max: usize) -> Option<f32> {
    let origins = patch_grid(img, max)?;
    let dim = img.channels() * PATCH * PATCH;
    if origins.len() < MIN_PATCHES_PER_DIM * dim {
        return None;
    }
    let variance = patch_noise_variance(img, &origins)?;
    Some((variance.max(0.0).sqrt() * 255.0) as f32)
}

/// The noise variance (on the [0, 1] scale) of the patches at `origins` (top-left corners of
/// [`PATCH`]-sided patches, all channels together) by the smallest eigenvalues of their
/// covariance; `None` when it is not finite.
fn patch_noise_variance(img: &Image, origins: &[(usize, usize)]) -> Option<f64> {
    let dim = img.channels() * PATCH * PATCH;
    let (sum, gram) = moments(img, origins);
    let n = origins.len() as f64;
    let mut cov = vec![0.0f64; dim * dim];
    for i in 0..dim {
        for j in i..dim {
            let v = gram[i * dim + j] / n - (sum[i] / n) * (sum[j] / n);
            cov[i * dim + j] = v;
            cov[j * dim + i] = v;
        }
    }
    let mut eigenvalues = symmetric_eigenvalues(cov, dim);
    eigenvalues.sort_by(f64::total_cmp);
    let variance = noise_variance(&eigenvalues);
    variance.is_finite().then_some(variance)
}

/// The sums of x and of x x^T (f64, `dim` and `dim x dim`) over the patches at `origins`, each
/// x centred on its channel's mean. x x^T is summed in f32 over blocks of [`BLOCK`] patches,
/// then the blocks in f64; runs of blocks go to all cores and their sums are added in order
/// (the same result on any number of cores).
fn moments(img: &Image, origins: &[(usize, usize)]) -> (Vec<f64>, Vec<f64>) {
    let channels = img.channels();
    let dim = channels * PATCH * PATCH;
    let means: Vec<f32> = (0..channels)
        .map(|c| {
            let plane = img.plane(c);
            (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / plane.len() as f64) as f32
        })
        .collect();
    let parts: Vec<(Vec<f64>, Vec<f64>)> = origins
        .par_chunks(PARALLEL_BLOCKS * BLOCK)
        .map(|part| patch_moments(img, &means, part))
        .collect();
    let (mut sum, mut gram) = (vec![0.0f64; dim], vec![0.0f64; dim * dim]);
    for (s, g) in parts {
        sum.iter_mut().zip(&s).for_each(|(t, v)| *t += v);
        gram.iter_mut().zip(&g).for_each(|(t, v)| *t += v);
    }
    (sum, gram)
}

/// The sums of x and of x x^T (f64) over the patches at `origins`, each x centred on its
/// channel's mean in `means`.
fn patch_moments(img: &Image, means: &[f32], origins: &[(usize, usize)]) -> (Vec<f64>, Vec<f64>) {
    let w = img.width();
    let dim = means.len() * PATCH * PATCH;
    let mut sum = vec![0.0f64; dim];
    let mut gram = vec![0.0f64; dim * dim];
    let mut block = vec![0.0f32; dim * dim];
    // A chunk's patches as the columns of a `dim x BLOCK` matrix, so that the chunk's
    // second moments are one matrix product.
    let mut columns = vec![0.0f32; dim * BLOCK];
    for chunk in origins.chunks(BLOCK) {
        for (p, &(y0, x0)) in chunk.iter().enumerate() {
            let mut k = 0;
            for (c, &mean) in means.iter().enumerate() {
                let plane = img.plane(c);
                for dy in 0..PATCH {
                    for &v in &plane[(y0 + dy) * w + x0..][..PATCH] {
                        columns[k * BLOCK + p] = v - mean;
                        sum[k] += f64::from(v - mean);
                        k += 1;
                    }
                }
            }
        }
        // Columns past the chunk's end hold the previous chunk's patches: clear them.
        if chunk.len() < BLOCK {
            for row in columns.chunks_mut(BLOCK) {
                row[chunk.len()..].fill(0.0);
            }
        }
        second_moments(&columns, dim, &mut block);
        flush(&mut block, &mut gram);
    }
    (sum, gram)
}

/// Blocks of patches one core sums at a time: 10 runs for the 20,000 patches of the whole
/// image's estimate, which share 2 to 8 cores out evenly enough.
const PARALLEL_BLOCKS: usize = 8;

/// Patches summed in f32 before the sums move to f64: the noise variance is down to about 1e-5
/// of the second moments, and a block's f32 rounding stays near 1e-7 of them.
const BLOCK: usize = 256;

/// `block = X X^T` for the `dim x BLOCK` row-major `columns` X: the patch estimate's inner
/// loop, about 12,000 multiply-adds a patch for 6x6 colour patches (the whole square, though
/// it is symmetric: a packed matrix product keeps its operands in cache, which a loop over the
/// upper triangle does not; docs/benchmarks.md has the `estimate` bench's timings).
fn second_moments(columns: &[f32], dim: usize, block: &mut [f32]) {
    assert!(columns.len() == dim * BLOCK && block.len() == dim * dim);
    // SAFETY: `columns` holds `dim x BLOCK` values read with row stride BLOCK (as X) and
    // column stride BLOCK (as X^T, BLOCK x dim), and `block` `dim x dim` written with row
    // stride `dim`: every index the product touches is inside the slices, checked above.
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            dim,
            BLOCK,
            dim,
            1.0,
            columns.as_ptr(),
            BLOCK as isize,
            1,
            columns.as_ptr(),
            1,
            BLOCK as isize,
            0.0,
            block.as_mut_ptr(),
            dim as isize,
            1,
        );
    }
}

/// Adds `block` into `total` and zeroes it.
fn flush(block: &mut [f32], total: &mut [f64]) {
    for (t, b) in total.iter_mut().zip(block.iter_mut()) {
        *t += f64::from(*b);
        *b = 0.0;
    }
}

/// How the noise level varies with brightness: standard deviations (0-255 scale) at a few
/// mean intensities (on [0, 1]), read between them by linear interpolation and held beyond the
/// ends.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseLevelFunction {
    points: Vec<(f32, f32)>,
}

/// Most brightness groups a [`noise_level_function`] splits the patches into.
const NLF_GROUPS: usize = 8;

/// The patches a [`noise_level_function`] reads at most (a grid over the image).
const NLF_MAX_PATCHES: usize = 60_000;

/// Each brightness group of a [`noise_level_function`] has at least this many patches per
/// dimension of a patch (3,456 for 6x6 colour patches). With 1,268 (12 per dimension), the
/// two groups of a 48x64 picture read 20.7 and 21.9 for white noise of sigma 25: too few
/// patches spread the sample eigenvalues, and the smallest part is then taken for the noise.
/// Groups of 4,700 (43 per dimension) on CBSD68's 481x321 photos were within a few percent.
const NLF_MIN_PATCHES_PER_DIM: usize = 32;

impl NoiseLevelFunction {
    /// The (mean intensity, sigma) points, by increasing intensity.
    pub fn points(&self) -> &[(f32, f32)] {
        &self.points
    }

    /// The same shape, scaled so that the root mean square of its points (the groups hold
    /// equal numbers of patches, so about that of the image's levels) is `sigma`.
    ///
    /// The whole image's patch estimate reads the mean noise variance over its pixels, and its
    /// groups' estimates, from fewer patches each, read a little low (most on noise with
    /// impulses), so the groups give the shape and the whole image the level.
    pub fn with_mean_level(mut self, sigma: f32) -> Self {
        let mean_square =
            self.points.iter().map(|p| p.1 * p.1).sum::<f32>() / self.points.len() as f32;
        if mean_square > 0.0 && sigma.is_finite() {
            let scale = sigma / mean_square.sqrt();
            self.points.iter_mut().for_each(|p| p.1 *= scale);
        }
        self
    }

    /// The same with each level raised to the highest at any darker intensity, so that it
    /// never falls toward white. Clipping at white takes noise away there, and a network trained
    /// on clipped noise at its level before clipping wants that level; noise that grows with the
    /// light (shot noise) already rises and is kept as it is.
    pub fn rising(mut self) -> Self {
        let mut highest = 0.0f32;
        for p in &mut self.points {
            highest = highest.max(p.1);
            p.1 = highest;
        }
        self
    }

    /// The level (0-255 scale) at mean intensity `m`.
    pub fn sigma_at(&self, m: f32) -> f32 {
        let p = &self.points;
        if m <= p[0].0 {
            return p[0].1;
        }
        for pair in p.windows(2) {
            let ((m0, s0), (m1, s1)) = (pair[0], pair[1]);
            if m <= m1 {
                let t = if m1 > m0 { (m - m0) / (m1 - m0) } else { 1.0 };
                return s0 + t * (s1 - s0);
            }
        }
        p[p.len() - 1].1
    }

    /// A per-pixel map of levels on the [0, 1] scale (H x W): each pixel's level at the mean
    /// intensity of the 7x7 box around it (all channels; cut at the borders), about the 6x6
    /// patches the groups were sorted by.
    pub fn map(&self, img: &Image) -> Vec<f32> {
        let (channels, h, w) = img.shape();
        let mut mean = vec![0.0f32; h * w];
        for c in 0..channels {
            for (m, v) in mean.iter_mut().zip(img.plane(c)) {
                *m += v / channels as f32;
            }
        }
        let blurred = box_blur(&mean, h, w, PATCH / 2);
        blurred.iter().map(|&m| self.sigma_at(m) / 255.0).collect()
    }
}

/// The mean over the (2r+1)-sided square around each pixel, cut at the borders.
fn box_blur(v: &[f32], h: usize, w: usize, r: usize) -> Vec<f32> {
    let blur_rows = |src: &[f32], h: usize, w: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; h * w];
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            let mut prefix = vec![0.0f64; w + 1];
            for x in 0..w {
                prefix[x + 1] = prefix[x] + f64::from(row[x]);
            }
            for x in 0..w {
                let (a, b) = (x.saturating_sub(r), (x + r + 1).min(w));
                out[y * w + x] = ((prefix[b] - prefix[a]) / (b - a) as f64) as f32;
            }
        }
        out
    };
    let transpose = |src: &[f32], h: usize, w: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; h * w];
        for y in 0..h {
            for x in 0..w {
                out[x * h + y] = src[y * w + x];
            }
        }
        out
    };
    let rows = blur_rows(v, h, w);
    let cols = blur_rows(&transpose(&rows, h, w), w, h);
    transpose(&cols, w, h)
}

/// The noise level as a function of brightness: the patches of a grid are sorted by their
/// mean intensity and split into equal groups, and each group gets the patch-covariance
/// estimate of [`patch_covariance_sigma`]. `None` where there are too few patches for two
/// groups or an estimate is not finite.
///
/// # Shapes
/// C x H x W in.
pub fn noise_level_function(img: &Image) -> Option<NoiseLevelFunction> {
    let (channels, _, w) = img.shape();
    let dim = channels * PATCH * PATCH;
    let mut origins: Vec<(f32, (usize, usize))> = patch_grid(img, NLF_MAX_PATCHES)?
        .into_iter()
        .map(|(y, x)| {
            let s: f32 = (0..channels)
                .map(|c| {
                    let plane = img.plane(c);
                    (0..PATCH)
                        .map(|dy| plane[(y + dy) * w + x..][..PATCH].iter().sum::<f32>())
                        .sum::<f32>()
                })
                .sum();
            (s / dim as f32, (y, x))
        })
        .collect();
    let groups = (origins.len() / (NLF_MIN_PATCHES_PER_DIM * dim)).min(NLF_GROUPS);
    if groups < 2 {
        return None;
    }
    origins.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The groups are independent: one per core.
    let mut points = (0..groups)
        .into_par_iter()
        .map(|g| {
            let part = &origins[g * origins.len() / groups..(g + 1) * origins.len() / groups];
            let m = part.iter().map(|p| f64::from(p.0)).sum::<f64>() / part.len() as f64;
            let at: Vec<(usize, usize)> = part.iter().map(|p| p.1).collect();
            let variance = patch_noise_variance(img, &at)?;
            Some((m as f32, (variance.max(0.0).sqrt() * 255.0) as f32))
        })
        .collect::<Option<Vec<_>>>()?;
    let raw: Vec<f32> = points.iter().map(|p| p.1).collect();
    for (k, point) in points.iter_mut().enumerate() {
        point.1 = median_of_neighbours(&raw, k);
    }
    Some(NoiseLevelFunction { points })
}

/// The median of `v[k]` and its two neighbours, or `v[k]` at an end: removes a single group's
/// outlier inside the range (on 12 CBSD68 photos with shot noise one group in 96 read half its
/// neighbours). The ends are kept: the level's curve bends there (shot noise grows as the square
/// root of brightness), and a median with an extrapolated neighbour moved them by up to 10%.
fn median_of_neighbours(v: &[f32], k: usize) -> f32 {
    if k == 0 || k + 1 >= v.len() {
        return v[k];
    }
    let mut three = [v[k - 1], v[k], v[k + 1]];
    three.sort_by(f32::total_cmp);
    three[1]
}

/// The top-left corners of at most `max` [`PATCH`]-sided patches on a regular grid over the
/// image, or `None` for an image with no channels or smaller than a patch.
fn patch_grid(img: &Image, max: usize) -> Option<Vec<(usize, usize)>> {
    let (channels, h, w) = img.shape();
    if channels == 0 || h < PATCH || w < PATCH {
        return None;
    }
    let (ny, nx) = (h - PATCH + 1, w - PATCH + 1);
    let stride = grid_stride(ny, nx, max);
    Some(
        (0..ny)
            .step_by(stride)
            .flat_map(|y| (0..nx).step_by(stride).map(move |x| (y, x)))
            .collect(),
    )
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

/// The eigenvalues of the symmetric `n` x `n` matrix `a` (row-major), in no particular order.
///
/// Householder reflections bring `a` to a tridiagonal matrix with the same eigenvalues (about
/// 4/3 n^3 operations), whose eigenvalues [`tridiagonal_eigenvalues`] finds by QL sweeps (a few
/// times n^2 more), several times faster than cyclic Jacobi rotations: it runs once per
/// brightness group of [`noise_level_function`].
fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    debug_assert_eq!(a.len(), n * n);
    if n == 0 {
        return Vec::new();
    }
    let mut diag = vec![0.0f64; n];
    let mut off = vec![0.0f64; n.saturating_sub(1)];
    let mut v = vec![0.0f64; n];
    let mut p = vec![0.0f64; n];
    for k in 0..n.saturating_sub(2) {
        // Reflect rows and columns k+1.. so that column k is zero below its subdiagonal.
        let m = n - k - 1;
        let norm = (k + 1..n).map(|i| a[i * n + k].powi(2)).sum::<f64>().sqrt();
        diag[k] = a[k * n + k];
        let x0 = a[(k + 1) * n + k];
        let alpha = if x0 > 0.0 { -norm } else { norm };
        off[k] = alpha;
        for (j, i) in (k + 1..n).enumerate() {
            v[j] = a[i * n + k];
        }
        v[0] -= alpha;
        let vnorm = v[..m].iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm == 0.0 {
            off[k] = x0;
            continue;
        }
        v[..m].iter_mut().for_each(|x| *x /= vnorm);
        // With H = I - 2 v v^T: H B H = B - 2 (v q^T + q v^T), p = B v, q = p - (v^T p) v.
        for (j, i) in (k + 1..n).enumerate() {
            p[j] = (k + 1..n)
                .zip(&v[..m])
                .map(|(l, vl)| a[i * n + l] * vl)
                .sum();
        }
        let vp: f64 = v[..m].iter().zip(&p[..m]).map(|(x, y)| x * y).sum();
        for j in 0..m {
            p[j] -= vp * v[j];
        }
        for (j, i) in (k + 1..n).enumerate() {
            for (l, c) in (k + 1..n).enumerate() {
                a[i * n + c] -= 2.0 * (v[j] * p[l] + p[j] * v[l]);
            }
        }
    }
    if n >= 2 {
        diag[n - 2] = a[(n - 2) * n + n - 2];
        off[n - 2] = a[(n - 1) * n + n - 2];
    }
    diag[n - 1] = a[(n - 1) * n + n - 1];
    tridiagonal_eigenvalues(&diag, &off)
}

/// The eigenvalues of the symmetric tridiagonal matrix with diagonal `diag` and subdiagonal
/// `off`, in no particular order: [`ql_eigenvalues`], or bisection should that not converge.
/// Bisection costs several times the Householder reduction before it; QL a fraction of it.
fn tridiagonal_eigenvalues(diag: &[f64], off: &[f64]) -> Vec<f64> {
    ql_eigenvalues(diag, off).unwrap_or_else(|| tridiagonal_eigenvalues_by_bisection(diag, off))
}

/// [`tridiagonal_eigenvalues`] by implicit QL sweeps with a shift from the leading 2x2 block
/// (a few sweeps of O(n) plane rotations per eigenvalue), or `None` where a block has not
/// converged in 60 sweeps or a value is not finite.
fn ql_eigenvalues(diag: &[f64], off: &[f64]) -> Option<Vec<f64>> {
    let n = diag.len();
    let mut d = diag.to_vec();
    // e[i] couples rows i and i+1; the last is a zero sentinel.
    let mut e = off.to_vec();
    e.resize(n, 0.0);
    for l in 0..n {
        let mut sweeps = 0;
        loop {
            // The block l..=m ends where a coupling is negligible beside its two diagonals.
            let m = (l..n)
                .find(|&m| m + 1 == n || e[m].abs() <= f64::EPSILON * (d[m].abs() + d[m + 1].abs()))
                .unwrap_or(n - 1);
            if m == l {
                break; // d[l] is an eigenvalue.
            }
            sweeps += 1;
            if sweeps > 60 {
                return None;
            }
            // The shift: the eigenvalue of the leading 2x2 block nearer d[l], written as the
            // first rotation's input g = d[m] - shift.
            let t = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let root = t.hypot(1.0);
            let mut g = d[m] - d[l] + e[l] / (t + root.copysign(t));
            // Chase the bulge up from row m to row l with plane rotations (cos c, sin s); p is
            // what each rotation has taken off the diagonal below it.
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut deflated = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                let r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    // The coupling vanished mid-sweep: the block splits here; start again.
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                let h = d[i + 1] - p;
                let q = (d[i] - h) * s + 2.0 * c * b;
                p = s * q;
                d[i + 1] = h + p;
                g = c * q - b;
            }
            if !deflated {
                d[l] -= p;
                e[l] = g;
                e[m] = 0.0;
            }
        }
    }
    d.iter().all(|v| v.is_finite()).then_some(d)
}

/// The eigenvalues of the symmetric tridiagonal matrix with diagonal `diag` and subdiagonal
/// `off`, by bisection: the number of eigenvalues below `x` is the number of negative pivots
/// of `T - x I` (Sturm), so each eigenvalue's interval within Gershgorin's bounds halves until
/// f64 cannot split it. Slow (64 Sturm counts of O(n) divisions per eigenvalue) but sure: the
/// fallback of [`tridiagonal_eigenvalues`] and its tests' reference.
fn tridiagonal_eigenvalues_by_bisection(diag: &[f64], off: &[f64]) -> Vec<f64> {
    let n = diag.len();
    let radius = |i: usize| {
        let left = if i > 0 { off[i - 1].abs() } else { 0.0 };
        let right = if i + 1 < n { off[i].abs() } else { 0.0 };
        left + right
    };
    let lo = (0..n)
        .map(|i| diag[i] - radius(i))
        .fold(f64::INFINITY, f64::min);
    let hi = (0..n)
        .map(|i| diag[i] + radius(i))
        .fold(f64::NEG_INFINITY, f64::max);
    let scale = lo.abs().max(hi.abs()).max(f64::MIN_POSITIVE);
    let below = |x: f64| {
        let mut count = 0;
        let mut q = 1.0f64;
        for i in 0..n {
            let e2 = if i > 0 { off[i - 1] * off[i - 1] } else { 0.0 };
            q = diag[i] - x - if i > 0 { e2 / q } else { 0.0 };
            if q == 0.0 {
                q = -f64::EPSILON * scale;
            }
            if q < 0.0 {
                count += 1;
            }
        }
        count
    };
    (0..n)
        .map(|k| {
            // The (k+1)-th smallest: below(x) <= k at lo, > k at hi.
            let (mut a, mut b) = (lo, hi);
            for _ in 0..200 {
                let mid = 0.5 * (a + b);
                if mid <= a || mid >= b {
                    break;
                }
                if below(mid) > k {
                    b = mid;
                } else {
                    a = mid;
                }
            }
            0.5 * (a + b)
        })
        .collect()
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

    /// Texture over a left-to-right ramp of brightness from about 0.1 to 0.85.
    fn ramp(channels: usize, h: usize, w: usize) -> Image {
        let t = texture(channels, h, w);
        Image::from_fn(channels, h, w, |c, y, x| {
            0.1 + 0.75 * x as f32 / w as f32 + 0.25 * (t.plane(c)[y * w + x] - 0.5)
        })
    }

    #[test]
    fn only_noise_white_in_space_and_colour_gets_a_white_noise_estimate() {
        let clean = ramp(3, 128, 160);
        let noisy = |spec: &str, seed| spec.parse::<NoiseSpec>().unwrap().apply(&clean, seed).image;
        for sigma in [5.0f32, 25.0] {
            let white = noisy(&format!("gaussian:{sigma}+round"), 3);
            let Some(NoiseEstimate::Brightness(nlf)) = white_noise_estimate(&white) else {
                panic!("white noise of sigma {sigma} should get a level by brightness");
            };
            let mean = nlf.map(&white).iter().sum::<f32>() / clean.pixels() as f32 * 255.0;
            assert!((mean - sigma).abs() < 0.15 * sigma, "sigma {sigma}: {mean}");
        }
        // Simulated camera noise: demosaicing spreads it over neighbouring pixels.
        for iso in [800, 6400] {
            let camera = noisy(&format!("camera:iso={iso}"), 3);
            assert_eq!(white_noise_estimate(&camera), None, "iso {iso}");
        }
        // White noise blurred over 2x2 pixels, channel by channel: white across channels only.
        let white = noisy("gaussian:25", 3);
        let (c, h, w) = white.shape();
        let blurred = Image::from_fn(c, h - 1, w - 1, |c, y, x| {
            let n = |y, x| white.get(c, y, x) - clean.get(c, y, x);
            clean.get(c, y, x) + (n(y, x) + n(y + 1, x) + n(y, x + 1) + n(y + 1, x + 1)) / 2.0
        });
        assert!(matches!(
            estimate_noise(&blurred),
            NoiseEstimate::Brightness(_)
        ));
        assert_eq!(white_noise_estimate(&blurred), None);
        // Gray, or noise the channels share.
        let gray = NoiseSpec::Gaussian { lo: 15.0, hi: 15.0 }
            .apply(&ramp(1, 96, 128), 6)
            .image;
        assert_eq!(white_noise_estimate(&gray), None);
        assert_eq!(white_noise_estimate(&gray.to_channels(3).unwrap()), None);
    }

    #[test]
    fn the_noise_level_function_follows_shot_noise() {
        let (peak, read) = (40.0f32, 2.0f32);
        let noisy = NoiseSpec::PoissonGaussian { peak, sigma: read }
            .apply(&ramp(3, 256, 384), 4)
            .image;
        let nlf = noise_level_function(&noisy).unwrap();
        let points = nlf.points();
        assert!(points.len() >= 6, "{points:?}");
        // Each channel's variance is its value / peak plus the read noise's; the groups hold
        // patches of about one mean brightness m, so the level there is sqrt(m / peak + read^2).
        for &(m, sigma) in points {
            let truth = (m / peak + (read / 255.0).powi(2)).sqrt() * 255.0;
            assert!((sigma / truth - 1.0).abs() < 0.1, "{points:?}");
        }
        assert!(points.windows(2).all(|p| p[0].0 < p[1].0), "{points:?}");
        assert!(points[points.len() - 1].1 > 2.0 * points[0].1, "{points:?}");
    }

    #[test]
    fn white_noise_gives_a_flat_function() {
        let noisy = NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
            .apply(&ramp(3, 128, 192), 5)
            .image;
        let nlf = noise_level_function(&noisy).unwrap();
        for &(_, sigma) in nlf.points() {
            assert!((sigma / 20.0 - 1.0).abs() < 0.08, "{:?}", nlf.points());
        }
        let map = nlf.map(&noisy);
        assert_eq!(map.len(), 128 * 192);
        assert!(map.iter().all(|s| (s * 255.0 / 20.0 - 1.0).abs() < 0.08));
    }

    #[test]
    fn estimate_noise_follows_brightness_only_for_white_colour_noise() {
        let white = NoiseSpec::Gaussian { lo: 15.0, hi: 15.0 }
            .apply(&ramp(3, 96, 128), 6)
            .image;
        assert!(matches!(
            estimate_noise(&white),
            NoiseEstimate::Brightness(_)
        ));
        // Gray: the filter's one level, as estimate_sigma.
        let gray = NoiseSpec::Gaussian { lo: 15.0, hi: 15.0 }
            .apply(&ramp(1, 96, 128), 6)
            .image;
        assert_eq!(
            estimate_noise(&gray),
            NoiseEstimate::Uniform(immerkaer_sigma(&gray))
        );
        // Noise the channels share fails the patch check: the filter's one level, raised as
        // such noise needs.
        let shared = gray.to_channels(3).unwrap();
        assert_eq!(
            estimate_noise(&shared),
            NoiseEstimate::Shared(immerkaer_sigma(&shared) * SHARED_NOISE_GAIN)
        );
        // Too few patches for the patch estimate at all: the filter's level, not raised.
        let tiny = NoiseSpec::Gaussian { lo: 15.0, hi: 15.0 }
            .apply(&ramp(3, 20, 20), 6)
            .image;
        assert!(patch_covariance_sigma(&tiny).is_none());
        assert_eq!(
            estimate_noise(&tiny),
            NoiseEstimate::Uniform(immerkaer_sigma(&tiny))
        );
        // Too few patches for two groups of brightness: the one patch estimate.
        let small = NoiseSpec::Gaussian { lo: 15.0, hi: 15.0 }
            .apply(&ramp(3, 64, 64), 6)
            .image;
        assert!(noise_level_function(&small).is_none());
        assert_eq!(
            estimate_noise(&small),
            NoiseEstimate::Uniform(patch_covariance_sigma(&small).unwrap())
        );
    }

    #[test]
    fn a_rising_function_keeps_its_rise_and_holds_its_peak_toward_white() {
        let nlf = NoiseLevelFunction {
            points: vec![
                (0.1, 6.0),
                (0.3, 12.0),
                (0.5, 11.0),
                (0.7, 14.0),
                (0.9, 8.0),
            ],
        };
        let levels: Vec<f32> = nlf.rising().points().iter().map(|p| p.1).collect();
        assert_eq!(levels, [6.0, 12.0, 12.0, 14.0, 14.0]);
    }

    #[test]
    fn the_function_interpolates_between_its_points_and_holds_its_ends() {
        let nlf = NoiseLevelFunction {
            points: vec![(0.2, 10.0), (0.4, 20.0), (0.8, 20.0)],
        };
        assert_eq!(nlf.sigma_at(0.0), 10.0);
        assert_eq!(nlf.sigma_at(0.3), 15.0);
        assert_eq!(nlf.sigma_at(0.6), 20.0);
        assert_eq!(nlf.sigma_at(1.0), 20.0);
        // Scaled to a root mean square of 10 over its points: the shape is kept.
        let scaled = nlf.clone().with_mean_level(10.0);
        let rms = (scaled.points().iter().map(|p| p.1 * p.1).sum::<f32>() / 3.0).sqrt();
        assert!((rms - 10.0).abs() < 1e-4, "{scaled:?}");
        let ratio = 10.0 / (900.0f32 / 3.0).sqrt();
        for (a, b) in scaled.points().iter().zip(nlf.points()) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1 * ratio).abs() < 1e-4, "{scaled:?}");
        }
        // A flat image reads its brightness everywhere, borders included.
        let flat = Image::from_fn(3, 9, 11, |_, _, _| 0.25);
        let map = nlf.map(&flat);
        assert!(
            map.iter().all(|&s| (s * 255.0 - 12.5).abs() < 1e-3),
            "{map:?}"
        );
    }

    #[test]
    fn one_groups_outlier_is_replaced_by_its_neighbours() {
        let v = [10.0, 11.0, 2.0, 13.0, 14.0];
        let smoothed: Vec<f32> = (0..v.len()).map(|k| median_of_neighbours(&v, k)).collect();
        assert_eq!(smoothed, [10.0, 10.0, 11.0, 13.0, 14.0]);
        assert_eq!(median_of_neighbours(&[5.0, 7.0], 1), 7.0);
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

    /// `Q a Q^T` for the reflection `Q = I - 2 v v^T / (v^T v)` of the `n` x `n` matrix `a`.
    fn reflect(a: &[f64], v: &[f64]) -> Vec<f64> {
        let n = v.len();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        let q = |i: usize, j: usize| f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv;
        let qa: Vec<f64> = (0..n * n)
            .map(|ij| (0..n).map(|k| q(ij / n, k) * a[k * n + ij % n]).sum())
            .collect();
        (0..n * n)
            .map(|ij| (0..n).map(|k| qa[ij / n * n + k] * q(ij % n, k)).sum())
            .collect()
    }

    /// `diag(values)` turned by two reflections: full, with the given eigenvalues.
    fn rotated_diagonal(values: &[f64], v: &[f64]) -> Vec<f64> {
        let n = values.len();
        let mut a = vec![0.0; n * n];
        for (i, &x) in values.iter().enumerate() {
            a[i * n + i] = x;
        }
        let w: Vec<f64> = v
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 3) as f64)
            .collect();
        reflect(&reflect(&a, v), &w)
    }

    #[test]
    fn the_patch_moments_match_a_plain_f64_sum() {
        // More patches than one run of blocks, and not a whole number of blocks: a short last
        // block in the last of several runs.
        let img = NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
            .apply(&ramp(3, 64, 64), 2)
            .image;
        let origins: Vec<(usize, usize)> = (0..59)
            .flat_map(|y| (0..59).map(move |x| (y, x)))
            .take(PARALLEL_BLOCKS * BLOCK + 300)
            .collect();
        let (sum, gram) = moments(&img, &origins);
        let dim = 3 * PATCH * PATCH;
        let means: Vec<f64> = (0..3)
            .map(|c| img.plane(c).iter().map(|&v| f64::from(v)).sum::<f64>() / 4096.0)
            .collect();
        let patch = |(y0, x0): (usize, usize)| -> Vec<f64> {
            (0..3)
                .flat_map(|c| (0..PATCH * PATCH).map(move |k| (c, k / PATCH, k % PATCH)))
                .map(|(c, dy, dx)| f64::from(img.get(c, y0 + dy, x0 + dx)) - means[c])
                .collect()
        };
        let (mut exact_sum, mut exact_gram) = (vec![0.0; dim], vec![0.0; dim * dim]);
        for &o in &origins {
            let x = patch(o);
            for i in 0..dim {
                exact_sum[i] += x[i];
                for j in 0..dim {
                    exact_gram[i * dim + j] += x[i] * x[j];
                }
            }
        }
        for i in 0..dim {
            assert!(
                (sum[i] - exact_sum[i]).abs() < 1e-3,
                "sum {i}: {} vs {}",
                sum[i],
                exact_sum[i]
            );
        }
        // Second moments near 0.01-0.1 per patch over 2,348 patches; f32 blocks keep about
        // 1e-6 of that.
        for (k, (g, e)) in gram.iter().zip(&exact_gram).enumerate() {
            assert!((g - e).abs() < 1e-4 * (1.0 + e.abs()), "{k}: {g} vs {e}");
        }
    }

    #[test]
    fn a_noiseless_picture_has_no_whiteness() {
        // Both estimates read nothing: no ratio, and no white-noise estimate.
        let flat = Image::from_fn(3, 64, 80, |c, _, _| 0.2 + 0.1 * c as f32);
        assert_eq!(whiteness(&flat), None);
        assert_eq!(white_noise_estimate(&flat), None);
    }

    #[test]
    fn the_second_moments_are_the_product_of_the_patches() {
        // A short chunk (zeros past its end, as `patch_moments` leaves them), and a block
        // holding other values, which the product replaces.
        let dim = 108;
        let n = 100;
        let mut columns = vec![0.0f32; dim * BLOCK];
        for (k, row) in columns.chunks_mut(BLOCK).enumerate() {
            for (p, v) in row[..n].iter_mut().enumerate() {
                *v = (((p * 31 + k * 7) % 19) as f32 - 9.0) * 0.01;
            }
        }
        let mut block = vec![1.0f32; dim * dim];
        second_moments(&columns, dim, &mut block);
        for i in 0..dim {
            for j in 0..dim {
                let exact: f64 = (0..n)
                    .map(|p| f64::from(columns[i * BLOCK + p]) * f64::from(columns[j * BLOCK + p]))
                    .sum();
                // Sums of 100 products of up to 0.09^2 with mixed signs: f32 rounding is
                // about 1e-8 here.
                let got = f64::from(block[i * dim + j]);
                assert!((got - exact).abs() <= 1e-6, "{i},{j}: {got} vs {exact}");
            }
        }
        assert!(block[dim + 1] > 0.0, "a sum of squares");
    }

    #[test]
    fn tridiagonal_eigenvalues_match_the_closed_form_and_bisection() {
        // Constant diagonal a and coupling b: a + 2 b cos(k pi / (n + 1)), k = 1..=n.
        for (n, a, b) in [
            (1, 2.0, 0.0),
            (2, 0.5, -0.25),
            (7, 1.0, 0.3),
            (108, 1e-3, 4e-4),
        ] {
            let mut got = ql_eigenvalues(&vec![a; n], &vec![b; n - 1]).expect("converges");
            got.sort_by(f64::total_cmp);
            let mut want: Vec<f64> = (1..=n)
                .map(|k| a + 2.0 * b * (k as f64 * std::f64::consts::PI / (n + 1) as f64).cos())
                .collect();
            want.sort_by(f64::total_cmp);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-14 + 1e-12 * w.abs(), "n {n}: {g} vs {w}");
            }
        }
        // Uneven entries with a split (a zero coupling) and couplings far below the diagonal.
        let diag: Vec<f64> = (0..40)
            .map(|i| ((i * 37) % 11) as f64 * 0.1 + 1e-4)
            .collect();
        let off: Vec<f64> = (0..39)
            .map(|i| match i {
                17 => 0.0,
                i if i % 5 == 0 => 1e-12,
                i => ((i * 13) % 7) as f64 * 0.05 - 0.15,
            })
            .collect();
        let mut got = ql_eigenvalues(&diag, &off).expect("converges");
        let mut want = tridiagonal_eigenvalues_by_bisection(&diag, &off);
        got.sort_by(f64::total_cmp);
        want.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-13, "{g} vs {w}");
        }
    }

    #[test]
    fn eigenvalues_of_a_rotated_diagonal_are_recovered() {
        let values = [3.0, -1.0, 0.5, 2.0, 1e-6, 7.0];
        let a = rotated_diagonal(&values, &[0.3, -1.2, 0.8, 0.1, 2.0, -0.4]);
        assert!(a[1] != 0.0 && a[5] != 0.0, "a full matrix");
        let mut got = symmetric_eigenvalues(a, values.len());
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
        let mut got = symmetric_eigenvalues(rotated_diagonal(&values, &v), n);
        got.sort_by(f64::total_cmp);
        let mut want = values.clone();
        want.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-10, "{g} vs {w}");
        }
    }
}
