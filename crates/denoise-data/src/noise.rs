//! Noise injection: additive Gaussian (fixed or blind range), a spatially varying Gaussian
//! field, located (regional) Gaussian, impulse, salt and pepper, Poisson-Gaussian, speckle, JPEG,
//! camera noise (see [`crate::camera`]), method 1 / method 2 of Siddiqui's "Image Denoise" (the
//! Keras article this project started from), explicit clipping and 8-bit rounding, choices and
//! compositions, all parsed from and printed as spec strings such as `gaussian:0-55+jpeg:30`.

use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageFormat};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::camera::{self, CameraSpec};
use crate::{DataError, Image, Result};

/// What `method1` stands for: blind additive white Gaussian noise with sigma drawn uniformly
/// per image from 0-55 (on 0-255), the DnCNN-B / FFDNet blind training range.
pub const METHOD1: &str = "gaussian:0-55";

/// What `method2` stands for: method 1, then located Gaussian noise on random rectangles covering
/// 30% of the image with each rectangle's sigma drawn from 0-55, then pixel modification of 2% of
/// the pixels (1% salt and pepper, then 1% random-valued impulses).
pub const METHOD2: &str = "gaussian:0-55+located:0-55:0.3+salt-pepper:0.01+impulse:0.01";

/// Every spec form, for `--help` texts.
pub const SPEC_HELP: &str = "\
Noise specs (sigma values are on the 0-255 scale; images are on [0, 1]; nothing is clipped
unless the spec says `+clip`):
  gaussian:S              additive white Gaussian noise, noisy = clean + N(0, (S/255)^2)
  gaussian:LO-HI          the same with sigma drawn uniformly from [LO, HI] per image (blind)
  gaussian-map:LO-HI      Gaussian noise whose sigma ramps linearly from LO to HI across the
                          image in a random direction (a spatially varying noise level)
  located:S:F             Gaussian noise of sigma S only inside random rectangles covering
                          about a fraction F (0-1) of the image
  located:LO-HI:F         the same with each rectangle's sigma drawn from [LO, HI]
  salt-pepper:F           a fraction F of the pixels set to 0 or 1 (all channels alike)
  impulse:F               a fraction F of the pixels set to uniform random values in [0, 1)
  poisson-gaussian:P:S    camera-like noise: Poisson shot noise with P photons at value 1
                          (clean * P photons, divided back by P), plus Gaussian read noise S
  speckle:V               multiplicative noise x + x * n with n ~ N(0, V^2) (V unitless)
  jpeg:Q                  JPEG compression at quality Q (1-100); clips its input to [0, 1]
  method1                 = gaussian:0-55
  method2                 = gaussian:0-55+located:0-55:0.3+salt-pepper:0.01+impulse:0.01
  camera                  camera noise: the clean photo taken back to a raw Bayer mosaic, shot and
                          read noise added there, then demosaiced, white-balanced, colour-
                          corrected, tone-mapped and saved as 8 bits; fields (any order):
                          iso=LO-HI (default 100-12800, drawn log-uniformly), jpeg=LO-HI (JPEG
                          at a quality drawn from the range; default none), chroma=420|444|any
                          (the JPEG's chroma subsampling; default any: drawn per image),
                          e.g. camera:iso=800-6400:jpeg=75-95
  clip                    clamps the image to [0, 1] at that point of a composition
  round                   clamps to [0, 1] and rounds to 8-bit levels, as saving an 8-bit file
                          does (e.g. gaussian:25+round)
  A+B                     applies A then B, e.g. gaussian:25+clip or poisson-gaussian:30:5+jpeg:50
  A|B                     one of A or B, drawn with equal odds per image (binds looser than +),
                          e.g. camera|gaussian:0-55+round";

const KINDS: &[&str] = &[
    "gaussian",
    "gaussian-map",
    "located",
    "salt-pepper",
    "impulse",
    "poisson-gaussian",
    "speckle",
    "jpeg",
    "method1",
    "method2",
    "camera",
    "clip",
    "round",
];

/// Beyond this many photons the Poisson draw is replaced by its normal approximation: the two
/// are indistinguishable there and `rand_distr`'s Poisson refuses very large rates.
const POISSON_NORMAL_ABOVE: f64 = 1e7;

/// Located noise stops adding rectangles after this many, so heavy overlap near a coverage
/// fraction of 1 cannot loop for long; the coverage then falls slightly short.
const MAX_REGIONS: usize = 256;

/// JPEG cannot hold more than 65535 pixels a side; larger images are compressed in tiles of this
/// size, a multiple of 16 so the tiles keep the 8x8 block grid (and chroma grid) of a single image.
const JPEG_TILE: usize = 32768;

/// A parsed noise recipe such as `gaussian:25`, `gaussian:0-55` or `method2` (see [`SPEC_HELP`]).
///
/// Parsed with [`FromStr`]; [`fmt::Display`] prints the spec string back, and parsing that string
/// gives an equal value. Serde reads and writes it as that string. Parsing validates the values;
/// a value built by hand with out-of-range numbers is sanitised when applied (negative sigmas
/// count as 0, fractions are clamped to [0, 1], quality to 1-100) rather than panicking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NoiseSpec {
    /// Additive white Gaussian noise; sigma on the 0-255 scale, fixed (`lo == hi`) or drawn
    /// uniformly per image from `lo..=hi`.
    Gaussian { lo: f32, hi: f32 },
    /// Additive Gaussian noise whose sigma (0-255 scale) ramps linearly from `lo` to `hi` across
    /// the image along a direction drawn uniformly per image.
    GaussianMap { lo: f32, hi: f32 },
    /// Additive Gaussian noise only inside random rectangles covering about `fraction` of the
    /// pixels; each rectangle draws its sigma (0-255 scale) from `lo..=hi`.
    Located { lo: f32, hi: f32, fraction: f32 },
    /// Each pixel, with probability `fraction`, gets independent uniform values in `[0, 1)` in
    /// every channel (random-valued impulse noise).
    Impulse { fraction: f32 },
    /// Each pixel, with probability `fraction`, becomes black (0) or white (1) in all channels.
    SaltPepper { fraction: f32 },
    /// `Poisson(peak * x) / peak + N(0, (sigma / 255)^2)`: shot noise with `peak` photons at
    /// value 1 (negative inputs count as 0 photons) plus Gaussian read noise.
    PoissonGaussian { peak: f32, sigma: f32 },
    /// Multiplicative noise `x + x * n`, `n ~ N(0, sigma^2)`; `sigma` is unitless.
    Speckle { sigma: f32 },
    /// JPEG compression at `quality` (1-100) with the `image` crate's encoder, then decoding.
    /// Clamps its input to [0, 1] and quantises it to 8 bits first, as any JPEG writer must.
    Jpeg { quality: u8 },
    /// Shorthand for [`METHOD1`].
    Method1,
    /// Shorthand for [`METHOD2`].
    Method2,
    /// Clamps the image to [0, 1] at this point of a composition (the sigma map is left as is,
    /// so after clipping it is the nominal, not the exact, noise level).
    Clip,
    /// Camera noise through an inverted and re-run camera pipeline (see [`crate::camera`]);
    /// always 8-bit output.
    Camera(CameraSpec),
    /// Clamps to [0, 1] and rounds to the 256 levels of an 8-bit file.
    Round,
    /// Applies each step in turn, left to right (`A+B`). Parsing produces only flat
    /// compositions of at least two steps.
    Compose(Vec<NoiseSpec>),
    /// One of the alternatives, drawn with equal odds each time (`A|B`); parsing produces at
    /// least two, none of them itself a choice.
    OneOf(Vec<NoiseSpec>),
}

/// The output of a noise model.
#[derive(Clone, Debug, PartialEq)]
pub struct Noisy {
    /// The noisy image (not clipped unless the spec says so).
    pub image: Image,
    /// Per-pixel standard deviation of the additive noise on the [0, 1] scale (1 x H x W), where
    /// that means something (Gaussian-like noise); `None` otherwise.
    ///
    /// In a composition the maps of the steps that have one are combined as the square root of
    /// the sum of their squares; steps without one (impulses, JPEG, clipping) leave it unchanged.
    /// For signal-dependent noise (Poisson-Gaussian, speckle) it is the standard deviation given
    /// the input of that step, averaged in variance over the channels.
    pub sigma_map: Option<Image>,
}

impl NoiseSpec {
    /// Applies the noise with a fresh ChaCha8 RNG seeded by `seed`: the same seed gives the same
    /// bytes.
    ///
    /// # Shapes
    /// `clean` is C x H x W; `image` in the result has the same shape and `sigma_map` is
    /// 1 x H x W.
    pub fn apply(&self, clean: &Image, seed: u64) -> Noisy {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.apply_rng(clean, &mut rng)
    }

    /// Applies the noise drawing from `rng`.
    ///
    /// # Shapes
    /// `clean` is C x H x W; `image` in the result has the same shape and `sigma_map` is
    /// 1 x H x W.
    pub fn apply_rng<R: Rng + ?Sized>(&self, clean: &Image, rng: &mut R) -> Noisy {
        let mut image = clean.clone();
        let sigma_map = self.apply_in_place(&mut image, rng);
        Noisy { image, sigma_map }
    }

    /// The fixed Gaussian sigma (0-255 scale) of this spec, if it has one: `gaussian:S`, or a
    /// composition of fixed Gaussians and `clip` steps (their sigmas add in quadrature). Ranges,
    /// maps, located noise and every other kind give `None`.
    pub fn nominal_sigma(&self) -> Option<f32> {
        match self {
            NoiseSpec::Gaussian { lo, hi } if lo == hi => Some(lo.max(0.0)),
            NoiseSpec::Compose(steps) => {
                let mut variance = None;
                for step in steps {
                    match step {
                        NoiseSpec::Clip | NoiseSpec::Round => {}
                        other => {
                            let s = other.nominal_sigma()?;
                            variance = Some(variance.unwrap_or(0.0) + s * s);
                        }
                    }
                }
                variance.map(f32::sqrt)
            }
            _ => None,
        }
    }

    /// The spec with the `method1` / `method2` shorthands replaced by what they stand for
    /// (compositions are flattened).
    pub fn expanded(&self) -> NoiseSpec {
        match self {
            NoiseSpec::Method1 => method1(),
            NoiseSpec::Method2 => method2(),
            NoiseSpec::Compose(steps) => {
                let mut flat = Vec::with_capacity(steps.len());
                for step in steps {
                    match step.expanded() {
                        NoiseSpec::Compose(inner) => flat.extend(inner),
                        other => flat.push(other),
                    }
                }
                NoiseSpec::Compose(flat)
            }
            NoiseSpec::OneOf(options) => {
                NoiseSpec::OneOf(options.iter().map(NoiseSpec::expanded).collect())
            }
            other => other.clone(),
        }
    }

    /// Checks the values a parsed spec would be checked for (a hand-built spec may skip this).
    pub fn validate(&self) -> Result<()> {
        let spec = self.to_string();
        let err = |message: String| DataError::NoiseSpec {
            spec: spec.clone(),
            message,
        };
        let sigma = |s: f32| check_sigma(s).map_err(err);
        let range = |lo: f32, hi: f32| check_range(lo, hi).map_err(err);
        let fraction = |f: f32| check_fraction(f).map_err(err);
        match self {
            NoiseSpec::Gaussian { lo, hi } | NoiseSpec::GaussianMap { lo, hi } => range(*lo, *hi),
            NoiseSpec::Located {
                lo,
                hi,
                fraction: f,
            } => {
                range(*lo, *hi)?;
                fraction(*f)
            }
            NoiseSpec::Impulse { fraction: f } | NoiseSpec::SaltPepper { fraction: f } => {
                fraction(*f)
            }
            NoiseSpec::PoissonGaussian { peak, sigma: s } => {
                check_peak(*peak).map_err(err)?;
                sigma(*s)
            }
            NoiseSpec::Speckle { sigma: s } => sigma(*s),
            NoiseSpec::Jpeg { quality } => check_quality(i64::from(*quality)).map_err(err),
            NoiseSpec::Camera(c) => c.check().map_err(err),
            NoiseSpec::Method1 | NoiseSpec::Method2 | NoiseSpec::Clip | NoiseSpec::Round => Ok(()),
            NoiseSpec::Compose(steps) | NoiseSpec::OneOf(steps) => {
                steps.iter().try_for_each(NoiseSpec::validate)
            }
        }
    }

    /// Adds this noise to `img` and returns the sigma map where there is one.
    fn apply_in_place<R: Rng + ?Sized>(&self, img: &mut Image, rng: &mut R) -> Option<Image> {
        match *self {
            NoiseSpec::Gaussian { lo, hi } => {
                let sigma = draw_sigma(lo, hi, rng) / 255.0;
                add_gaussian(img.data_mut(), sigma, rng);
                Some(constant_map(img, sigma))
            }
            NoiseSpec::GaussianMap { lo, hi } => {
                let map = ramp_map(img.height(), img.width(), lo, hi, rng);
                add_gaussian_map(img, map.data(), rng);
                Some(map)
            }
            NoiseSpec::Located { lo, hi, fraction } => {
                Some(add_located(img, lo, hi, fraction, rng))
            }
            NoiseSpec::Impulse { fraction } => {
                modify_pixels(img, fraction, PixelModification::Impulse, rng);
                None
            }
            NoiseSpec::SaltPepper { fraction } => {
                modify_pixels(img, fraction, PixelModification::SaltPepper, rng);
                None
            }
            NoiseSpec::PoissonGaussian { peak, sigma } => {
                Some(add_poisson_gaussian(img, peak, sigma, rng))
            }
            NoiseSpec::Speckle { sigma } => Some(add_speckle(img, sigma, rng)),
            NoiseSpec::Jpeg { quality } => {
                jpeg_round_trip(img, quality);
                None
            }
            NoiseSpec::Method1 => method1().apply_in_place(img, rng),
            NoiseSpec::Method2 => method2().apply_in_place(img, rng),
            NoiseSpec::Clip => {
                img.clamp01();
                None
            }
            NoiseSpec::Camera(ref spec) => {
                let params = spec.draw(rng);
                let clean = img.clone();
                *img = params.apply(&clean, rng);
                Some(camera::local_rms(img, &clean))
            }
            NoiseSpec::Round => {
                camera::round_to_8_bits(img.data_mut());
                None
            }
            NoiseSpec::Compose(ref steps) => {
                let mut map = None;
                for step in steps {
                    map = combine_maps(map, step.apply_in_place(img, rng));
                }
                map
            }
            NoiseSpec::OneOf(ref options) => {
                if options.is_empty() {
                    return None;
                }
                let pick = rng.random_range(0..options.len());
                options[pick].apply_in_place(img, rng)
            }
        }
    }
}

/// [`METHOD1`] as a value.
fn method1() -> NoiseSpec {
    NoiseSpec::Gaussian { lo: 0.0, hi: 55.0 }
}

/// [`METHOD2`] as a value.
fn method2() -> NoiseSpec {
    NoiseSpec::Compose(vec![
        method1(),
        NoiseSpec::Located {
            lo: 0.0,
            hi: 55.0,
            fraction: 0.3,
        },
        NoiseSpec::SaltPepper { fraction: 0.01 },
        NoiseSpec::Impulse { fraction: 0.01 },
    ])
}

// ---------------------------------------------------------------------------------------------
// Noise models

/// A sigma from `lo..=hi`, without touching the RNG when the range is a single value so that a
/// fixed sigma is a pure function of the noise draws.
fn draw_sigma<R: Rng + ?Sized>(lo: f32, hi: f32, rng: &mut R) -> f32 {
    let (lo, hi) = sane_range(lo, hi);
    if lo == hi {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

/// Non-negative, finite, ordered: hand-built specs must not make `random_range` panic.
fn sane_range(lo: f32, hi: f32) -> (f32, f32) {
    let fix = |v: f32| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let (lo, hi) = (fix(lo), fix(hi));
    if lo <= hi { (lo, hi) } else { (hi, lo) }
}

fn sane_sigma(v: f32) -> f32 {
    sane_range(v, v).0
}

fn sane_fraction(f: f32) -> f32 {
    if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) }
}

fn add_gaussian<R: Rng + ?Sized>(data: &mut [f32], sigma: f32, rng: &mut R) {
    if sigma == 0.0 {
        return;
    }
    for v in data {
        let n: f32 = StandardNormal.sample(rng);
        *v += sigma * n;
    }
}

/// Adds noise of per-pixel std `map` (H * W, [0, 1] scale) to every channel.
fn add_gaussian_map<R: Rng + ?Sized>(img: &mut Image, map: &[f32], rng: &mut R) {
    for c in 0..img.channels() {
        for (v, &s) in img.plane_mut(c).iter_mut().zip(map) {
            let n: f32 = StandardNormal.sample(rng);
            *v += s * n;
        }
    }
}

fn constant_map(img: &Image, sigma: f32) -> Image {
    Image::from_fn(1, img.height(), img.width(), |_, _, _| sigma)
}

/// A linear sigma ramp (0-255 in, [0, 1] scale out) from `lo` at one end of the image to `hi`
/// at the other, along a uniformly random direction.
fn ramp_map<R: Rng + ?Sized>(h: usize, w: usize, lo: f32, hi: f32, rng: &mut R) -> Image {
    let (lo, hi) = sane_range(lo, hi);
    let angle = rng.random::<f32>() * std::f32::consts::TAU;
    let (dy, dx) = angle.sin_cos();
    let project = |y: f32, x: f32| y * dy + x * dx;
    let (ymax, xmax) = (h.saturating_sub(1) as f32, w.saturating_sub(1) as f32);
    let corners = [
        project(0.0, 0.0),
        project(0.0, xmax),
        project(ymax, 0.0),
        project(ymax, xmax),
    ];
    let min = corners.iter().copied().fold(f32::INFINITY, f32::min);
    let max = corners.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = max - min;
    Image::from_fn(1, h, w, |_, y, x| {
        // A 1-pixel-wide image has no direction to ramp along: its middle sigma stands for all.
        let t = if span > 0.0 {
            (project(y as f32, x as f32) - min) / span
        } else {
            0.5
        };
        (lo + (hi - lo) * t) / 255.0
    })
}

/// Gaussian noise inside random rectangles; returns the sigma map (0 outside the rectangles).
fn add_located<R: Rng + ?Sized>(
    img: &mut Image,
    lo: f32,
    hi: f32,
    fraction: f32,
    rng: &mut R,
) -> Image {
    let (h, w) = (img.height(), img.width());
    let mut map = Image::zeros(1, h, w);
    let fraction = sane_fraction(fraction);
    let total = h * w;
    if total == 0 {
        return map;
    }
    let target = ((fraction as f64) * total as f64).round() as usize;
    let sigmas = map.data_mut();
    if target >= total {
        // Full coverage by random rectangles would take many draws; it is one region anyway.
        sigmas.fill(draw_sigma(lo, hi, rng) / 255.0);
    } else {
        // Whether a pixel is taken is tracked apart from its sigma, because a region's sigma may
        // be drawn as 0 and its pixels must still not be handed to a later region.
        let mut taken = vec![false; total];
        let mut covered = 0;
        // Rectangles of 1/8 to 1/2 of each side: blotches, neither speckles nor whole halves.
        let (hmin, hmax) = ((h / 8).max(1), (h / 2).max(1));
        let (wmin, wmax) = ((w / 8).max(1), (w / 2).max(1));
        for _ in 0..MAX_REGIONS {
            if covered >= target {
                break;
            }
            let rh = rng.random_range(hmin..=hmax);
            let mut rw = rng.random_range(wmin..=wmax);
            let remaining = target - covered;
            if rh * rw > remaining {
                // Narrower last rectangles keep the overshoot below one column of the rectangle.
                rw = remaining.div_ceil(rh).clamp(1, w);
            }
            let y0 = rng.random_range(0..=h - rh);
            let x0 = rng.random_range(0..=w - rw);
            let sigma = draw_sigma(lo, hi, rng) / 255.0;
            for y in y0..y0 + rh {
                for x in x0..x0 + rw {
                    let p = y * w + x;
                    if !taken[p] {
                        taken[p] = true;
                        sigmas[p] = sigma;
                        covered += 1;
                    }
                }
            }
        }
    }
    for c in 0..img.channels() {
        for (v, &s) in img.plane_mut(c).iter_mut().zip(map.data()) {
            if s > 0.0 {
                let n: f32 = StandardNormal.sample(rng);
                *v += s * n;
            }
        }
    }
    map
}

#[derive(Clone, Copy)]
enum PixelModification {
    SaltPepper,
    Impulse,
}

/// Replaces a random `fraction` of the pixels (each pixel independently), all channels at once.
fn modify_pixels<R: Rng + ?Sized>(
    img: &mut Image,
    fraction: f32,
    kind: PixelModification,
    rng: &mut R,
) {
    let fraction = sane_fraction(fraction);
    if fraction == 0.0 {
        return;
    }
    let (channels, n) = (img.channels(), img.pixels());
    let data = img.data_mut();
    for p in 0..n {
        if rng.random::<f32>() >= fraction {
            continue;
        }
        match kind {
            PixelModification::SaltPepper => {
                let v = if rng.random::<bool>() { 1.0 } else { 0.0 };
                for c in 0..channels {
                    data[c * n + p] = v;
                }
            }
            PixelModification::Impulse => {
                for c in 0..channels {
                    data[c * n + p] = rng.random::<f32>();
                }
            }
        }
    }
}

/// Shot noise plus read noise; returns the per-pixel std given the input.
fn add_poisson_gaussian<R: Rng + ?Sized>(
    img: &mut Image,
    peak: f32,
    sigma: f32,
    rng: &mut R,
) -> Image {
    let peak = if peak.is_finite() && peak > 0.0 {
        f64::from(peak)
    } else {
        1.0
    };
    let read = f64::from(sane_sigma(sigma)) / 255.0;
    let map = variance_map(img, |x| x.max(0.0) / peak + read * read);
    for v in img.data_mut() {
        // f32::max drops NaN, so a NaN input counts as 0 photons instead of poisoning the draw.
        let lambda = f64::from(*v).max(0.0) * peak;
        let photons = if lambda <= 0.0 {
            0.0
        } else if lambda > POISSON_NORMAL_ABOVE {
            let n: f64 = StandardNormal.sample(rng);
            (lambda + lambda.sqrt() * n).round()
        } else {
            match Poisson::new(lambda) {
                Ok(poisson) => poisson.sample(rng),
                Err(_) => lambda,
            }
        };
        let n: f64 = StandardNormal.sample(rng);
        *v = (photons / peak + read * n) as f32;
    }
    map
}

/// `x + x * n`; returns `|x| * sigma` averaged in variance over channels.
fn add_speckle<R: Rng + ?Sized>(img: &mut Image, sigma: f32, rng: &mut R) -> Image {
    let s = f64::from(sane_sigma(sigma));
    let map = variance_map(img, |x| x * x * s * s);
    let s = s as f32;
    if s > 0.0 {
        for v in img.data_mut() {
            let n: f32 = StandardNormal.sample(rng);
            *v += *v * s * n;
        }
    }
    map
}

/// `sqrt(mean over channels of variance(x))` per pixel, as a 1 x H x W image.
fn variance_map(img: &Image, variance: impl Fn(f64) -> f64) -> Image {
    let (channels, n) = (img.channels(), img.pixels());
    let mut sum = vec![0.0f64; n];
    for c in 0..channels {
        for (acc, &x) in sum.iter_mut().zip(img.plane(c)) {
            *acc += variance(f64::from(x));
        }
    }
    let data = sum
        .into_iter()
        .map(|v| (v / channels.max(1) as f64).sqrt() as f32)
        .collect();
    Image::new(1, img.height(), img.width(), data).expect("the map has one sample per pixel")
}

/// sqrt(a^2 + b^2) where both exist (independent noises add in variance), else whichever does.
fn combine_maps(a: Option<Image>, b: Option<Image>) -> Option<Image> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            for (x, y) in a.data_mut().iter_mut().zip(b.data()) {
                *x = x.hypot(*y);
            }
            Some(a)
        }
        (a, None) => a,
        (None, b) => b,
    }
}

/// Replaces `img` by its JPEG-compressed version at `quality` (the `image` crate's encoder).
fn jpeg_round_trip(img: &mut Image, quality: u8) {
    jpeg_tiled(img, quality, None);
}

/// `img` (gray or RGB) through a JPEG at `quality` with chroma subsampled 4:2:0 or kept 4:4:4.
pub(crate) fn jpeg_with_chroma(img: &Image, quality: u8, sub420: bool) -> Image {
    let mut out = img.clone();
    jpeg_tiled(&mut out, quality, Some(sub420));
    out
}

/// JPEG round trip in tiles JPEG can hold; `chroma`: `None` for the `image` crate's encoder,
/// `Some(4:2:0?)` for one whose subsampling is chosen.
fn jpeg_tiled(img: &mut Image, quality: u8, chroma: Option<bool>) {
    let quality = quality.clamp(1, 100);
    let (channels, h, w) = img.shape();
    if h == 0 || w == 0 {
        return;
    }
    let one = |tile: &Image| match chroma {
        None => jpeg_tile(tile, quality),
        Some(sub420) => jpeg_tile_chroma(tile, quality, sub420),
    };
    if h <= JPEG_TILE && w <= JPEG_TILE {
        *img = one(img);
        return;
    }
    let mut out = img.clone();
    for y0 in (0..h).step_by(JPEG_TILE) {
        for x0 in (0..w).step_by(JPEG_TILE) {
            let (th, tw) = (JPEG_TILE.min(h - y0), JPEG_TILE.min(w - x0));
            let tile = img
                .crop(y0, x0, th, tw)
                .expect("tiles lie inside the image");
            let tile = one(&tile);
            for c in 0..channels {
                for y in 0..th {
                    for x in 0..tw {
                        out.set(c, y0 + y, x0 + x, tile.get(c, y, x));
                    }
                }
            }
        }
    }
    *img = out;
}

/// [`jpeg_tile`] with the `jpeg-encoder` crate, whose chroma subsampling can be set (the `image`
/// crate's encoder always subsamples 4:2:0).
fn jpeg_tile_chroma(img: &Image, quality: u8, sub420: bool) -> Image {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    let (channels, h, w) = img.shape();
    let (bytes, color) = interleave_u8(img);
    let mut encoded = Vec::new();
    let mut encoder = Encoder::new(&mut encoded, quality.clamp(1, 100));
    encoder.set_sampling_factor(if sub420 {
        SamplingFactor::R_4_2_0
    } else {
        SamplingFactor::R_4_4_4
    });
    let color = match color {
        ExtendedColorType::L8 => ColorType::Luma,
        _ => ColorType::Rgb,
    };
    encoder
        .encode(&bytes, w as u16, h as u16, color)
        .expect("jpeg encoding of an in-memory tile within the size limits cannot fail");
    decode_jpeg(encoded, channels, h, w)
}

/// 8-bit samples of a gray or RGB image, interleaved as a JPEG encoder takes them.
fn interleave_u8(img: &Image) -> (Vec<u8>, ExtendedColorType) {
    let (channels, _, _) = img.shape();
    let n = img.pixels();
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    if channels == 1 {
        (
            img.data().iter().map(|&v| to_u8(v)).collect(),
            ExtendedColorType::L8,
        )
    } else {
        let mut bytes = Vec::with_capacity(3 * n);
        for p in 0..n {
            for c in 0..3 {
                bytes.push(to_u8(img.data()[c.min(channels - 1) * n + p]));
            }
        }
        (bytes, ExtendedColorType::Rgb8)
    }
}

/// Decodes JPEG bytes back into an image of the given shape.
fn decode_jpeg(encoded: Vec<u8>, channels: usize, h: usize, w: usize) -> Image {
    let decoded = image::load(Cursor::new(encoded), ImageFormat::Jpeg)
        .expect("the jpeg just encoded decodes");
    if channels == 1 {
        let luma = decoded.to_luma8();
        let data = luma
            .as_raw()
            .iter()
            .map(|&b| f32::from(b) / 255.0)
            .collect();
        Image::new(1, h, w, data).expect("the decoded jpeg has the encoded size")
    } else {
        let rgb = decoded.to_rgb8();
        let raw = rgb.as_raw();
        Image::from_fn(channels, h, w, |c, y, x| {
            f32::from(raw[(y * w + x) * 3 + c.min(2)]) / 255.0
        })
    }
}

/// JPEG round trip of an image small enough for one JPEG (gray stays gray, RGB stays RGB).
fn jpeg_tile(img: &Image, quality: u8) -> Image {
    let (channels, h, w) = img.shape();
    let (bytes, color) = interleave_u8(img);
    let mut encoded = Vec::new();
    JpegEncoder::new_with_quality(&mut encoded, quality)
        .encode(&bytes, w as u32, h as u32, color)
        .expect("jpeg encoding of an in-memory tile within the size limits cannot fail");
    decode_jpeg(encoded, channels, h, w)
}

// ---------------------------------------------------------------------------------------------
// Spec strings

impl FromStr for NoiseSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        let err = |message: String| DataError::NoiseSpec {
            spec: s.to_owned(),
            message,
        };
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(err(format!(
                "empty noise spec; known kinds: {}",
                KINDS.join(", ")
            )));
        }
        if trimmed.contains('|') {
            let mut options = Vec::new();
            for option in trimmed.split('|') {
                if option.trim().is_empty() {
                    return Err(err("empty alternative (a stray '|')".into()));
                }
                options.push(option.parse::<NoiseSpec>().map_err(|e| match e {
                    DataError::NoiseSpec { message, .. } => {
                        err(format!("in '{}': {message}", option.trim()))
                    }
                    other => other,
                })?);
            }
            return Ok(NoiseSpec::OneOf(options));
        }
        let parts: Vec<&str> = trimmed.split('+').map(str::trim).collect();
        let several = parts.len() > 1;
        let mut steps = Vec::with_capacity(parts.len());
        for part in parts {
            let step = parse_step(part).map_err(|message| {
                err(if several {
                    format!("in '{part}': {message}")
                } else {
                    message
                })
            })?;
            steps.push(step);
        }
        if steps.len() == 1 {
            Ok(steps.swap_remove(0))
        } else {
            Ok(NoiseSpec::Compose(steps))
        }
    }
}

impl TryFrom<String> for NoiseSpec {
    type Error = DataError;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<NoiseSpec> for String {
    fn from(spec: NoiseSpec) -> String {
        spec.to_string()
    }
}

/// One step of a composition; the error message names what is wrong, not the spec.
fn parse_step(part: &str) -> std::result::Result<NoiseSpec, String> {
    if part.is_empty() {
        return Err("empty step (a stray '+')".into());
    }
    let mut fields = part.split(':');
    let kind = fields.next().unwrap_or_default();
    let args: Vec<&str> = fields.collect();
    if args.len() > 1 && args.last() == Some(&"clip") {
        let without = &part[..part.len() - ":clip".len()];
        return Err(format!(
            "clipping is a step of its own: write '{without}+clip'"
        ));
    }
    let expect = |count: usize, usage: &str| {
        if args.len() == count {
            Ok(())
        } else {
            Err(format!(
                "'{kind}' takes {count} argument(s) ({usage}), got {}",
                args.len()
            ))
        }
    };
    let spec = match kind {
        "gaussian" => {
            expect(1, "gaussian:S or gaussian:LO-HI")?;
            let (lo, hi) = parse_sigma_range(args[0])?;
            NoiseSpec::Gaussian { lo, hi }
        }
        "gaussian-map" => {
            expect(1, "gaussian-map:LO-HI")?;
            let (lo, hi) = parse_sigma_range(args[0])?;
            NoiseSpec::GaussianMap { lo, hi }
        }
        "located" => {
            expect(2, "located:S:F or located:LO-HI:F")?;
            let (lo, hi) = parse_sigma_range(args[0])?;
            NoiseSpec::Located {
                lo,
                hi,
                fraction: parse_fraction(args[1])?,
            }
        }
        "impulse" => {
            expect(1, "impulse:F")?;
            NoiseSpec::Impulse {
                fraction: parse_fraction(args[0])?,
            }
        }
        "salt-pepper" => {
            expect(1, "salt-pepper:F")?;
            NoiseSpec::SaltPepper {
                fraction: parse_fraction(args[0])?,
            }
        }
        "poisson-gaussian" => {
            expect(2, "poisson-gaussian:PEAK:SIGMA")?;
            let peak = parse_number("peak", args[0])?;
            check_peak(peak)?;
            NoiseSpec::PoissonGaussian {
                peak,
                sigma: parse_sigma(args[1])?,
            }
        }
        "speckle" => {
            expect(1, "speckle:V")?;
            NoiseSpec::Speckle {
                sigma: parse_sigma(args[0])?,
            }
        }
        "jpeg" => {
            expect(1, "jpeg:Q")?;
            let quality: i64 = args[0]
                .parse()
                .map_err(|_| format!("quality '{}' is not an integer (1-100)", args[0]))?;
            check_quality(quality)?;
            NoiseSpec::Jpeg {
                quality: quality as u8,
            }
        }
        "camera" => NoiseSpec::Camera(CameraSpec::parse(&args)?),
        "method1" | "method2" | "clip" | "round" => {
            expect(0, kind)?;
            match kind {
                "method1" => NoiseSpec::Method1,
                "method2" => NoiseSpec::Method2,
                "round" => NoiseSpec::Round,
                _ => NoiseSpec::Clip,
            }
        }
        other => {
            return Err(format!(
                "unknown kind '{other}'; known kinds: {}",
                KINDS.join(", ")
            ));
        }
    };
    Ok(spec)
}

fn parse_number(what: &str, s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what} '{s}' is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{what} must be finite, got '{s}'"));
    }
    // `-0` parses to -0.0, which prints as "-0"; one zero keeps Display canonical.
    Ok(v + 0.0)
}

fn parse_sigma(s: &str) -> std::result::Result<f32, String> {
    let v = parse_number("sigma", s)?;
    check_sigma(v)?;
    Ok(v)
}

/// `S` or `LO-HI`; the dash of a range is the first `-` that neither leads the string (a minus
/// sign, rejected as a negative sigma) nor follows an exponent marker (`1e-3`).
fn parse_sigma_range(s: &str) -> std::result::Result<(f32, f32), String> {
    let mut prev = None;
    let mut dash = None;
    for (i, ch) in s.char_indices() {
        if ch == '-' && i > 0 && !matches!(prev, Some('e' | 'E')) {
            dash = Some(i);
            break;
        }
        prev = Some(ch);
    }
    match dash {
        None => parse_sigma(s).map(|v| (v, v)),
        Some(i) => {
            let (lo, hi) = (parse_sigma(&s[..i])?, parse_sigma(&s[i + 1..])?);
            check_range(lo, hi)?;
            Ok((lo, hi))
        }
    }
}

fn parse_fraction(s: &str) -> std::result::Result<f32, String> {
    let v = parse_number("fraction", s)?;
    check_fraction(v)?;
    Ok(v)
}

fn check_sigma(v: f32) -> std::result::Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("sigma must be a non-negative number, got {v}"))
    }
}

fn check_range(lo: f32, hi: f32) -> std::result::Result<(), String> {
    check_sigma(lo)?;
    check_sigma(hi)?;
    if lo > hi {
        return Err(format!(
            "sigma range {lo}-{hi} is reversed (low must not exceed high)"
        ));
    }
    Ok(())
}

fn check_fraction(v: f32) -> std::result::Result<(), String> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("fraction must be in [0, 1], got {v}"))
    }
}

fn check_peak(v: f32) -> std::result::Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "peak (photons at value 1) must be positive, got {v}"
        ))
    }
}

fn check_quality(q: i64) -> std::result::Result<(), String> {
    if (1..=100).contains(&q) {
        Ok(())
    } else {
        Err(format!("jpeg quality must be in 1-100, got {q}"))
    }
}

struct Range(f32, f32);

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

impl fmt::Display for NoiseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoiseSpec::Gaussian { lo, hi } => write!(f, "gaussian:{}", Range(*lo, *hi)),
            NoiseSpec::GaussianMap { lo, hi } => write!(f, "gaussian-map:{}", Range(*lo, *hi)),
            NoiseSpec::Located { lo, hi, fraction } => {
                write!(f, "located:{}:{fraction}", Range(*lo, *hi))
            }
            NoiseSpec::Impulse { fraction } => write!(f, "impulse:{fraction}"),
            NoiseSpec::SaltPepper { fraction } => write!(f, "salt-pepper:{fraction}"),
            NoiseSpec::PoissonGaussian { peak, sigma } => {
                write!(f, "poisson-gaussian:{peak}:{sigma}")
            }
            NoiseSpec::Speckle { sigma } => write!(f, "speckle:{sigma}"),
            NoiseSpec::Jpeg { quality } => write!(f, "jpeg:{quality}"),
            NoiseSpec::Method1 => f.write_str("method1"),
            NoiseSpec::Method2 => f.write_str("method2"),
            NoiseSpec::Clip => f.write_str("clip"),
            NoiseSpec::Round => f.write_str("round"),
            NoiseSpec::Camera(spec) => write!(f, "{spec}"),
            NoiseSpec::OneOf(options) => {
                for (i, option) in options.iter().enumerate() {
                    if i > 0 {
                        f.write_str("|")?;
                    }
                    write!(f, "{option}")?;
                }
                Ok(())
            }
            NoiseSpec::Compose(steps) => {
                for (i, step) in steps.iter().enumerate() {
                    if i > 0 {
                        f.write_str("+")?;
                    }
                    write!(f, "{step}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn constant(channels: usize, h: usize, w: usize, v: f32) -> Image {
        Image::from_fn(channels, h, w, |_, _, _| v)
    }

    /// A smooth test picture with every channel different, inside (0, 1).
    fn smooth(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            0.5 + 0.3 * ((y as f32 / 17.0 + c as f32).sin() * (x as f32 / 23.0).cos())
        })
    }

    fn spec(s: &str) -> NoiseSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// Mean and population std of `noisy - clean`, on the 0-255 scale.
    fn residual_stats(noisy: &Image, clean: &Image) -> (f64, f64) {
        let n = noisy.data().len() as f64;
        let diffs: Vec<f64> = noisy
            .data()
            .iter()
            .zip(clean.data())
            .map(|(a, b)| f64::from(a - b) * 255.0)
            .collect();
        let mean = diffs.iter().sum::<f64>() / n;
        let var = diffs.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn gaussian_std_matches_sigma_within_2_percent() {
        let clean = constant(1, 256, 256, 0.5);
        for sigma in [5.0, 25.0, 50.0] {
            let noisy = NoiseSpec::Gaussian {
                lo: sigma,
                hi: sigma,
            }
            .apply(&clean, 7);
            let (mean, std) = residual_stats(&noisy.image, &clean);
            assert!(
                (std / f64::from(sigma) - 1.0).abs() < 0.02,
                "sigma {sigma}: std {std}"
            );
            // The mean of 65536 draws has std sigma / 256: 5 of those is a generous bound.
            assert!(
                mean.abs() < 5.0 * f64::from(sigma) / 256.0,
                "sigma {sigma}: mean {mean}"
            );
            let map = noisy.sigma_map.unwrap();
            assert_eq!(map.shape(), (1, 256, 256));
            assert!(map.data().iter().all(|&s| s == sigma / 255.0));
        }
    }

    #[test]
    fn gaussian_is_clean_plus_sigma_over_255_times_standard_normal_unclipped() {
        let clean = smooth(3, 16, 16);
        let noisy = spec("gaussian:25").apply(&clean, 42).image;
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        for (i, (&y, &x)) in noisy.data().iter().zip(clean.data()).enumerate() {
            let n: f32 = StandardNormal.sample(&mut rng);
            assert_eq!(y, x + 25.0 / 255.0 * n, "sample {i}");
        }
        // Unclipped, as in the DnCNN/FFDNet evaluation: a bright image plus noise leaves [0, 1].
        let noisy = spec("gaussian:75")
            .apply(&constant(1, 64, 64, 0.9), 1)
            .image;
        assert!(noisy.data().iter().any(|&v| v > 1.0));
    }

    #[test]
    fn blind_range_draws_one_sigma_per_image_inside_the_range() {
        let clean = constant(1, 128, 128, 0.5);
        let stds: Vec<f64> = (0..20)
            .map(|seed| residual_stats(&spec("gaussian:10-40").apply(&clean, seed).image, &clean).1)
            .collect();
        // 16384 samples: the std estimate is within ~1.1% (2 sigma); 3% leaves room at the ends.
        assert!(
            stds.iter()
                .all(|&s| (10.0 * 0.97..=40.0 * 1.03).contains(&s)),
            "{stds:?}"
        );
        let (min, max) = stds
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &s| (a.min(s), b.max(s)));
        assert!(
            max - min > 10.0,
            "sigmas should vary between images: {stds:?}"
        );
        let noisy = spec("gaussian:10-40").apply(&clean, 3);
        let map = noisy.sigma_map.unwrap();
        let drawn = map.data()[0] * 255.0;
        assert!(map.data().iter().all(|&s| s == map.data()[0]));
        let std = residual_stats(&noisy.image, &clean).1;
        assert!(
            (std / f64::from(drawn) - 1.0).abs() < 0.03,
            "{std} vs {drawn}"
        );
    }

    #[test]
    fn method1_and_method2_are_their_documented_expansions() {
        let clean = smooth(3, 40, 48);
        for (short, long) in [("method1", METHOD1), ("method2", METHOD2)] {
            assert_eq!(spec(short).expanded(), spec(long).expanded());
            for seed in 0..3 {
                assert_eq!(
                    spec(short).apply(&clean, seed),
                    spec(long).apply(&clean, seed)
                );
            }
        }
        assert_eq!(
            spec("method2+jpeg:30").expanded().to_string(),
            format!("{METHOD2}+jpeg:30")
        );
    }

    #[test]
    fn gaussian_map_ramps_between_its_ends_and_sets_the_noise_level() {
        let clean = constant(1, 200, 200, 0.5);
        for seed in 0..4 {
            let noisy = spec("gaussian-map:5-50").apply(&clean, seed);
            let map = noisy.sigma_map.unwrap();
            let (min, max) = map
                .data()
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &s| (a.min(s), b.max(s)));
            assert!((min * 255.0 - 5.0).abs() < 1e-3 && (max * 255.0 - 50.0).abs() < 1e-3);
            // Noise divided by its own sigma is standard normal: std 1 within 2% over 40000.
            let z: Vec<f64> = noisy
                .image
                .data()
                .iter()
                .zip(clean.data())
                .zip(map.data())
                .map(|((y, x), s)| f64::from((y - x) / s))
                .collect();
            let std = (z.iter().map(|v| v * v).sum::<f64>() / z.len() as f64).sqrt();
            assert!((std - 1.0).abs() < 0.02, "seed {seed}: {std}");
        }
    }

    #[test]
    fn located_noise_covers_the_requested_fraction_and_only_there() {
        let clean = constant(3, 128, 128, 0.5);
        for seed in 0..10 {
            let noisy = spec("located:25:0.3").apply(&clean, seed);
            let map = noisy.sigma_map.unwrap();
            let inside = map.data().iter().filter(|&&s| s > 0.0).count();
            let fraction = inside as f64 / map.data().len() as f64;
            // Overshoot is below one rectangle column (64 px of 16384).
            assert!((0.3..0.31).contains(&fraction), "seed {seed}: {fraction}");
            for c in 0..3 {
                for (p, &s) in map.data().iter().enumerate() {
                    let changed = noisy.image.plane(c)[p] != 0.5;
                    assert_eq!(changed, s > 0.0, "seed {seed} pixel {p}");
                    assert!(s == 0.0 || s == 25.0 / 255.0);
                }
            }
        }
        let map = spec("located:0-55:0.5").apply(&clean, 5).sigma_map.unwrap();
        let mut levels: Vec<u32> = map
            .data()
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|s| s.to_bits())
            .collect();
        levels.sort_unstable();
        levels.dedup();
        assert!(levels.len() > 1, "each region draws its own sigma");
        assert!(map.data().iter().all(|&s| s <= 55.0 / 255.0));
        let full = spec("located:10:1").apply(&clean, 1).sigma_map.unwrap();
        assert!(full.data().iter().all(|&s| s == 10.0 / 255.0));
        assert_eq!(spec("located:10:0").apply(&clean, 1).image, clean);
    }

    #[test]
    fn salt_pepper_fraction_is_close_to_requested() {
        let clean = constant(3, 256, 256, 0.5);
        let noisy = spec("salt-pepper:0.05").apply(&clean, 11).image;
        let n = noisy.pixels();
        let (mut salt, mut pepper) = (0usize, 0usize);
        for p in 0..n {
            let px: Vec<f32> = (0..3).map(|c| noisy.plane(c)[p]).collect();
            match px[..] {
                [1.0, 1.0, 1.0] => salt += 1,
                [0.0, 0.0, 0.0] => pepper += 1,
                [0.5, 0.5, 0.5] => {}
                _ => panic!("pixel {p} is neither clean nor salt nor pepper: {px:?}"),
            }
        }
        // Binomial(65536, 0.05) has std 56 pixels: 0.005 (328 pixels) is ~6 std.
        let fraction = (salt + pepper) as f64 / n as f64;
        assert!((fraction - 0.05).abs() < 0.005, "{fraction}");
        assert!(
            (salt as f64 / (salt + pepper) as f64 - 0.5).abs() < 0.05,
            "{salt} vs {pepper}"
        );
    }

    #[test]
    fn impulse_fraction_is_close_to_requested_and_values_lie_in_0_1() {
        let clean = constant(1, 256, 256, 2.0);
        let noisy = spec("impulse:0.1").apply(&clean, 3);
        assert!(noisy.sigma_map.is_none());
        let changed: Vec<f32> = noisy
            .image
            .data()
            .iter()
            .copied()
            .filter(|&v| v != 2.0)
            .collect();
        let fraction = changed.len() as f64 / 65536.0;
        assert!((fraction - 0.1).abs() < 0.006, "{fraction}");
        assert!(changed.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = changed.iter().map(|&v| f64::from(v)).sum::<f64>() / changed.len() as f64;
        assert!(
            (mean - 0.5).abs() < 0.02,
            "uniform values average 1/2: {mean}"
        );
    }

    #[test]
    fn poisson_gaussian_has_shot_plus_read_variance() {
        let clean = constant(1, 256, 256, 0.5);
        let noisy = spec("poisson-gaussian:30:0").apply(&clean, 9);
        let data = noisy.image.data();
        // Pure shot noise: whole photon counts, mean x, variance x / peak.
        assert!(
            data.iter()
                .all(|&v| ((v * 30.0) - (v * 30.0).round()).abs() < 1e-3)
        );
        let (mean, std) = residual_stats(&noisy.image, &clean);
        let expected = (0.5f64 / 30.0).sqrt() * 255.0;
        assert!((std / expected - 1.0).abs() < 0.02, "{std} vs {expected}");
        assert!(mean.abs() < 0.5, "{mean}");
        let map = noisy.sigma_map.unwrap();
        assert!((f64::from(map.data()[0]) * 255.0 / expected - 1.0).abs() < 1e-5);

        let noisy = spec("poisson-gaussian:30:20").apply(&clean, 9);
        let expected = (0.5f64 / 30.0 + (20.0f64 / 255.0).powi(2)).sqrt() * 255.0;
        let std = residual_stats(&noisy.image, &clean).1;
        assert!((std / expected - 1.0).abs() < 0.02, "{std} vs {expected}");
        // Negative inputs (after other noise) are 0 photons, not a panic.
        let dark = spec("poisson-gaussian:30:0")
            .apply(&constant(1, 8, 8, -0.5), 1)
            .image;
        assert!(dark.data().iter().all(|&v| v == 0.0));
        let bright = spec("poisson-gaussian:1000000000:0").apply(&clean, 1).image;
        assert!(bright.data().iter().all(|&v| (v - 0.5).abs() < 1e-3));
    }

    #[test]
    fn speckle_is_multiplicative() {
        let clean = constant(1, 256, 256, 0.5);
        let noisy = spec("speckle:0.1").apply(&clean, 4);
        let (_, std) = residual_stats(&noisy.image, &clean);
        assert!((std / (0.05 * 255.0) - 1.0).abs() < 0.02, "{std}");
        let black = spec("speckle:0.5").apply(&constant(1, 16, 16, 0.0), 4);
        assert!(
            black.image.data().iter().all(|&v| v == 0.0),
            "no signal, no speckle"
        );
        assert!(black.sigma_map.unwrap().data().iter().all(|&s| s == 0.0));
    }

    #[test]
    fn jpeg_keeps_gray_gray_clips_and_loses_more_at_low_quality() {
        let clean = smooth(1, 64, 64);
        let noisy = spec("gaussian:30").apply(&clean, 2).image;
        let err = |q: u8| {
            let out = NoiseSpec::Jpeg { quality: q }.apply(&noisy, 0);
            assert_eq!(out.image.shape(), (1, 64, 64));
            assert!(out.sigma_map.is_none());
            assert!(out.image.data().iter().all(|v| (0.0..=1.0).contains(v)));
            let mut clipped = noisy.clone();
            clipped.clamp01();
            residual_stats(&out.image, &clipped).1
        };
        let (e10, e50, e100) = (err(10), err(50), err(100));
        assert!(e10 > e50 && e50 > e100, "{e10} {e50} {e100}");
        // Quality 100 is close to lossless: under 2 gray levels rms on a noisy image.
        assert!(e100 < 2.0, "{e100}");

        let rgb = smooth(3, 33, 47);
        let out = spec("jpeg:90").apply(&rgb, 0).image;
        assert_eq!(out.shape(), (3, 33, 47));
        assert!(residual_stats(&out, &rgb).1 < 3.0);
        assert_eq!(
            spec("jpeg:30")
                .apply(&Image::zeros(3, 0, 5), 0)
                .image
                .shape(),
            (3, 0, 5)
        );
    }

    #[test]
    fn clip_is_explicit() {
        let clean = constant(1, 64, 64, 0.95);
        let unclipped = spec("gaussian:50").apply(&clean, 1).image;
        assert!(unclipped.data().iter().any(|&v| !(0.0..=1.0).contains(&v)));
        let clipped = spec("gaussian:50+clip").apply(&clean, 1);
        assert!(clipped.image.data().iter().all(|v| (0.0..=1.0).contains(v)));
        let mut expected = unclipped;
        expected.clamp01();
        assert_eq!(clipped.image, expected);
        assert!(
            clipped.sigma_map.is_some(),
            "clipping keeps the nominal sigma map"
        );
    }

    #[test]
    fn composition_applies_left_to_right_and_adds_sigma_maps_in_quadrature() {
        let clean = smooth(3, 32, 32);
        let noisy = spec("gaussian:3+gaussian:4").apply(&clean, 8);
        assert!(
            noisy
                .sigma_map
                .unwrap()
                .data()
                .iter()
                .all(|&s| (s * 255.0 - 5.0).abs() < 1e-4)
        );
        // Left to right on one RNG: the second step continues the first one's stream.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let first = spec("gaussian:3").apply_rng(&clean, &mut rng).image;
        let second = spec("gaussian:4").apply_rng(&first, &mut rng).image;
        assert_eq!(spec("gaussian:3+gaussian:4").apply(&clean, 8).image, second);
        let with_jpeg = spec("gaussian:10+jpeg:50").apply(&clean, 8);
        assert!(
            with_jpeg
                .sigma_map
                .unwrap()
                .data()
                .iter()
                .all(|&s| s == 10.0 / 255.0)
        );
        assert!(
            spec("jpeg:50+salt-pepper:0.1")
                .apply(&clean, 8)
                .sigma_map
                .is_none()
        );
    }

    #[test]
    fn nominal_sigma() {
        let cases = [
            ("gaussian:25", Some(25.0)),
            ("gaussian:25+clip", Some(25.0)),
            ("gaussian:3+gaussian:4", Some(5.0)),
            ("gaussian:0", Some(0.0)),
            ("gaussian:0-55", None),
            ("method1", None),
            ("located:25:0.3", None),
            ("gaussian:25+jpeg:30", None),
            ("poisson-gaussian:30:5", None),
        ];
        for (s, expected) in cases {
            assert_eq!(spec(s).nominal_sigma(), expected, "{s}");
        }
    }

    #[test]
    fn bad_specs_are_errors_that_say_what_is_wrong() {
        let cases = [
            ("", "empty noise spec"),
            ("gaussian:-5", "non-negative"),
            ("gaussian:5--3", "non-negative"),
            ("gaussian:40-10", "reversed"),
            ("gaussian:abc", "'abc' is not a number"),
            ("gaussian:nan", "finite"),
            ("gaussian:inf", "finite"),
            ("gaussian", "takes 1 argument"),
            ("gaussian:1:2", "takes 1 argument"),
            ("gaussian:25:clip", "'gaussian:25+clip'"),
            ("located:25:1.5", "fraction must be in [0, 1]"),
            ("located:25:-0.1", "fraction must be in [0, 1]"),
            ("salt-pepper:2", "fraction must be in [0, 1]"),
            ("impulse:-1", "fraction must be in [0, 1]"),
            ("jpeg:0", "quality must be in 1-100"),
            ("jpeg:101", "quality must be in 1-100"),
            ("jpeg:30.5", "not an integer"),
            ("poisson-gaussian:0:5", "peak"),
            ("poisson-gaussian:30:-5", "non-negative"),
            ("speckle:-0.1", "non-negative"),
            ("method1:5", "takes 0 argument"),
            (
                "gauss:25",
                "unknown kind 'gauss'; known kinds: gaussian, gaussian-map, located",
            ),
            ("gaussian:25+", "empty step"),
            (
                "gaussian:25+jpeg:0",
                "in 'jpeg:0': jpeg quality must be in 1-100",
            ),
        ];
        for (s, needle) in cases {
            let err = s.parse::<NoiseSpec>().expect_err(s).to_string();
            assert!(
                err.starts_with(&format!("invalid noise spec '{s}'")),
                "{s}: {err}"
            );
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn reference_forms_parse_to_the_documented_values() {
        let cases = [
            ("gaussian:25", NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 }),
            ("gaussian:0-55", NoiseSpec::Gaussian { lo: 0.0, hi: 55.0 }),
            ("gaussian:1e-1", NoiseSpec::Gaussian { lo: 0.1, hi: 0.1 }),
            (
                "gaussian-map:5-50",
                NoiseSpec::GaussianMap { lo: 5.0, hi: 50.0 },
            ),
            (
                "located:25:0.3",
                NoiseSpec::Located {
                    lo: 25.0,
                    hi: 25.0,
                    fraction: 0.3,
                },
            ),
            ("impulse:0.05", NoiseSpec::Impulse { fraction: 0.05 }),
            ("salt-pepper:0.05", NoiseSpec::SaltPepper { fraction: 0.05 }),
            (
                "poisson-gaussian:30:5",
                NoiseSpec::PoissonGaussian {
                    peak: 30.0,
                    sigma: 5.0,
                },
            ),
            ("speckle:0.1", NoiseSpec::Speckle { sigma: 0.1 }),
            ("jpeg:30", NoiseSpec::Jpeg { quality: 30 }),
            ("method1", NoiseSpec::Method1),
            ("method2", NoiseSpec::Method2),
            (
                " gaussian:25 + clip ",
                NoiseSpec::Compose(vec![
                    NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 },
                    NoiseSpec::Clip,
                ]),
            ),
        ];
        for (s, expected) in cases {
            assert_eq!(spec(s), expected, "{s}");
        }
        assert_eq!(spec("gaussian:-0").to_string(), "gaussian:0");
        assert_eq!(
            spec("poisson-gaussian:30:5+jpeg:50").to_string(),
            "poisson-gaussian:30:5+jpeg:50"
        );
    }

    #[test]
    fn help_documents_every_kind() {
        for kind in KINDS {
            assert!(SPEC_HELP.contains(&format!("\n  {kind}")), "{kind}");
        }
        assert!(SPEC_HELP.contains(METHOD1) && SPEC_HELP.contains(METHOD2));
    }

    #[test]
    fn serde_uses_the_spec_string() {
        let s = spec("gaussian:0-55+jpeg:30");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"gaussian:0-55+jpeg:30\"");
        assert_eq!(serde_json::from_str::<NoiseSpec>(&json).unwrap(), s);
        let err = serde_json::from_str::<NoiseSpec>("\"jpeg:0\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("quality must be in 1-100"), "{err}");
    }

    #[test]
    fn hand_built_out_of_range_specs_do_not_panic() {
        let clean = smooth(3, 16, 16);
        let weird = [
            NoiseSpec::Gaussian { lo: 40.0, hi: -3.0 },
            NoiseSpec::GaussianMap {
                lo: f32::NAN,
                hi: 10.0,
            },
            NoiseSpec::Located {
                lo: 5.0,
                hi: 1.0,
                fraction: 7.0,
            },
            NoiseSpec::Impulse { fraction: -1.0 },
            NoiseSpec::SaltPepper { fraction: f32::NAN },
            NoiseSpec::PoissonGaussian {
                peak: 0.0,
                sigma: -1.0,
            },
            NoiseSpec::Speckle {
                sigma: f32::INFINITY,
            },
            NoiseSpec::Jpeg { quality: 0 },
            NoiseSpec::Compose(vec![]),
        ];
        for w in weird {
            let out = w.apply(&clean, 1);
            assert_eq!(out.image.shape(), clean.shape(), "{w:?}");
            let valid = w.validate().is_ok();
            assert!(
                !valid || matches!(w, NoiseSpec::Compose(_)),
                "{w:?} should not validate"
            );
        }
        for tiny in [
            Image::zeros(1, 1, 1),
            Image::zeros(3, 1, 7),
            Image::zeros(1, 0, 0),
        ] {
            for s in ["gaussian-map:0-50", "located:25:0.5", "method2", "jpeg:50"] {
                assert_eq!(spec(s).apply(&tiny, 0).image.shape(), tiny.shape(), "{s}");
            }
        }
    }

    fn sigma() -> impl Strategy<Value = f32> {
        prop_oneof![(0u32..100).prop_map(|v| v as f32), 0.0f32..300.0]
    }

    fn sigma_range() -> impl Strategy<Value = (f32, f32)> {
        (sigma(), sigma()).prop_map(|(a, b)| (a.min(b), a.max(b)))
    }

    fn simple_spec() -> impl Strategy<Value = NoiseSpec> {
        prop_oneof![
            sigma_range().prop_map(|(lo, hi)| NoiseSpec::Gaussian { lo, hi }),
            sigma_range().prop_map(|(lo, hi)| NoiseSpec::GaussianMap { lo, hi }),
            (sigma_range(), 0.0f32..=1.0).prop_map(|((lo, hi), fraction)| NoiseSpec::Located {
                lo,
                hi,
                fraction
            }),
            (0.0f32..=1.0).prop_map(|fraction| NoiseSpec::Impulse { fraction }),
            (0.0f32..=1.0).prop_map(|fraction| NoiseSpec::SaltPepper { fraction }),
            (0.01f32..1000.0, sigma())
                .prop_map(|(peak, sigma)| NoiseSpec::PoissonGaussian { peak, sigma }),
            (0.0f32..2.0).prop_map(|sigma| NoiseSpec::Speckle { sigma }),
            (1u8..=100).prop_map(|quality| NoiseSpec::Jpeg { quality }),
            Just(NoiseSpec::Method1),
            Just(NoiseSpec::Method2),
            Just(NoiseSpec::Clip),
        ]
    }

    fn any_spec() -> impl Strategy<Value = NoiseSpec> {
        prop_oneof![
            simple_spec(),
            proptest::collection::vec(simple_spec(), 2..5).prop_map(NoiseSpec::Compose),
        ]
    }

    /// Specs whose output changes with the seed on any non-empty image.
    fn random_spec() -> impl Strategy<Value = NoiseSpec> {
        prop_oneof![
            (1.0f32..100.0).prop_map(|s| NoiseSpec::Gaussian { lo: s, hi: s }),
            (1.0f32..50.0).prop_map(|s| NoiseSpec::GaussianMap {
                lo: s,
                hi: s + 10.0
            }),
            (0.5f32..=1.0).prop_map(|fraction| NoiseSpec::Located {
                lo: 20.0,
                hi: 30.0,
                fraction
            }),
            (0.5f32..=1.0).prop_map(|fraction| NoiseSpec::Impulse { fraction }),
            (5.0f32..100.0).prop_map(|peak| NoiseSpec::PoissonGaussian { peak, sigma: 1.0 }),
            Just(NoiseSpec::Method2),
        ]
    }

    fn image() -> impl Strategy<Value = Image> {
        (1usize..=3, 1usize..20, 1usize..20)
            .prop_filter("gray or rgb", |(c, _, _)| *c != 2)
            .prop_flat_map(|(c, h, w)| {
                proptest::collection::vec(0.0f32..=1.0, c * h * w)
                    .prop_map(move |data| Image::new(c, h, w, data).unwrap())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn display_from_str_round_trip(s in any_spec()) {
            let text = s.to_string();
            let parsed: NoiseSpec = text.parse().unwrap();
            prop_assert_eq!(&parsed, &s);
            prop_assert_eq!(parsed.to_string(), text);
            prop_assert!(s.validate().is_ok());
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "[a-z0-9:.+ e-]{0,30}") {
            if let Ok(spec) = s.parse::<NoiseSpec>() {
                prop_assert_eq!(spec.to_string().parse::<NoiseSpec>().unwrap(), spec);
            }
        }

        #[test]
        fn sigma_zero_changes_nothing(img in image(), seed in any::<u64>()) {
            for s in ["gaussian:0", "gaussian-map:0-0", "located:0:0.5", "speckle:0",
                      "salt-pepper:0", "impulse:0", "gaussian:0+gaussian:0"] {
                prop_assert_eq!(&spec(s).apply(&img, seed).image, &img, "{}", s);
            }
        }

        #[test]
        fn same_seed_same_bytes(s in any_spec(), img in image(), seed in any::<u64>()) {
            let (a, b) = (s.apply(&img, seed), s.apply(&img, seed));
            prop_assert_eq!(a.image.data().len(), img.data().len());
            let bits = |i: &Image| i.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&a.image), bits(&b.image));
            prop_assert_eq!(a.sigma_map.as_ref().map(bits), b.sigma_map.as_ref().map(bits));
        }

        #[test]
        fn different_seeds_differ(s in random_spec(), seed in any::<u64>()) {
            let img = smooth(3, 16, 16);
            prop_assert_ne!(s.apply(&img, seed).image, s.apply(&img, seed ^ 1).image);
        }
    }

    #[test]
    fn a_choice_parses_prints_and_draws_each_alternative() {
        let s = spec("camera:iso=800 | gaussian:0-55+round");
        assert_eq!(s.to_string(), "camera:iso=800|gaussian:0-55+round");
        assert_eq!(spec(&s.to_string()), s);
        let NoiseSpec::OneOf(options) = &s else {
            panic!("{s:?}")
        };
        assert!(matches!(options[0], NoiseSpec::Camera(_)));
        assert!(matches!(&options[1], NoiseSpec::Compose(steps) if steps[1] == NoiseSpec::Round));
        // Over a few seeds both alternatives are drawn: camera noise ends in 8-bit levels and
        // has no level of its own; the Gaussian map is constant.
        let clean = smooth(3, 16, 16);
        let constant_maps = (0..40)
            .filter(|&seed| {
                let map = s.apply(&clean, seed).sigma_map.unwrap();
                map.data().iter().all(|&v| v == map.data()[0])
            })
            .count();
        assert!((5..35).contains(&constant_maps), "{constant_maps}");
        for bad in [
            "camera||gaussian:5",
            "|gaussian:5",
            "gaussian:5|",
            "gaussian:5|nope",
        ] {
            assert!(bad.parse::<NoiseSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn round_leaves_8_bit_levels_and_keeps_the_nominal_sigma() {
        let s = spec("gaussian:25+round");
        assert_eq!(s.nominal_sigma(), Some(25.0));
        let out = s.apply(&smooth(3, 8, 8), 1).image;
        for &v in out.data() {
            assert!((0.0..=1.0).contains(&v));
            assert_eq!((v * 255.0).round() / 255.0, v);
        }
    }
}
