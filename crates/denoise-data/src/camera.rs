//! Camera noise: a clean sRGB image is taken back to a raw Bayer mosaic by inverting a camera's
//! processing (Brooks et al., "Unprocessing Images for Learned Raw Denoising", CVPR 2019), given
//! shot and read noise there (the Poisson-Gaussian raw model of Foi et al., IEEE TIP 2008, with
//! the read noise tied to the shot noise by the log-linear relation that Wang et al., "Practical
//! Deep Raw Image Denoising on Mobile Devices", ECCV 2020, measured across ISO settings), and
//! processed forward again: demosaicing, white balance, colour matrix, gamma and tone curve,
//! 8-bit rounding, and optionally JPEG with 4:2:0 or 4:4:4 chroma.
//!
//! The noise, not the image, goes through the demosaicing: demosaicing is linear, so
//! `demosaic(mosaic + noise) = demosaic(mosaic) + demosaic(noise)`, and replacing the first term
//! by the full-colour image the mosaic was cut from keeps the clean picture exact (no
//! interpolation blur for a network to learn to undo) while the noise gets the spatial and
//! cross-channel correlation that demosaicing gives real photos.

use std::fmt;

use rand::Rng;
use rand_distr::{Distribution, Normal, StandardNormal};

use crate::Image;

/// Shot-noise variance per unit of raw signal at ISO 100 (signal on [0, 1]); it grows in
/// proportion to the ISO setting (the analogue gain). With ISO 100-12800 this spans
/// 1e-4 to 1.28e-2, the range Brooks et al. drew from for consumer cameras.
pub const SHOT_AT_ISO_100: f64 = 1e-4;

/// Brooks et al.'s fit of log read-noise variance against log shot noise:
/// `ln(read) = SLOPE * ln(shot) + INTERCEPT + N(0, SPREAD^2)`.
const READ_SLOPE: f64 = 2.18;
const READ_INTERCEPT: f64 = 1.20;
const READ_SPREAD: f64 = 0.26;

/// XYZ -> camera matrices of four cameras (Brooks et al.'s choice, from dcraw's table): a
/// random convex combination of them stands for an unknown camera.
const XYZ_TO_CAMS: [[[f64; 3]; 3]; 4] = [
    [
        [1.0234, -0.2969, -0.2266],
        [-0.5625, 1.6328, -0.0469],
        [-0.0703, 0.2188, 0.6406],
    ],
    [
        [0.4913, -0.0541, -0.0202],
        [-0.613, 1.3513, 0.2906],
        [-0.1564, 0.2151, 0.7183],
    ],
    [
        [0.838, -0.263, -0.0639],
        [-0.2887, 1.0725, 0.2496],
        [-0.0627, 0.1427, 0.5438],
    ],
    [
        [0.6596, -0.2079, -0.0562],
        [-0.4782, 1.3016, 0.1933],
        [-0.097, 0.1581, 0.5181],
    ],
];

/// Linear sRGB (D65) -> XYZ.
const RGB_TO_XYZ: [[f64; 3]; 3] = [
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
];

/// The camera's gamma; Brooks et al. use a plain power law with the smoothstep tone curve.
const GAMMA: f64 = 2.2;

/// Chroma subsampling of the optional JPEG step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chroma {
    /// 4:2:0 or 4:4:4, drawn per image (phones and most cameras write 4:2:0, some 4:4:4).
    Any,
    /// Chroma at half resolution in both directions.
    Sub420,
    /// Chroma at full resolution.
    Full444,
}

/// The `camera` noise spec: ISO range, optional JPEG quality range and chroma.
#[derive(Clone, Debug, PartialEq)]
pub struct CameraSpec {
    /// ISO drawn log-uniformly from `iso.0..=iso.1`.
    pub iso: (f32, f32),
    /// JPEG quality drawn uniformly from this range; `None`: no JPEG (an 8-bit lossless file).
    pub jpeg: Option<(u8, u8)>,
    /// Chroma subsampling of the JPEG.
    pub chroma: Chroma,
}

impl Default for CameraSpec {
    fn default() -> Self {
        Self {
            iso: (100.0, 12800.0),
            jpeg: None,
            chroma: Chroma::Any,
        }
    }
}

/// How the mosaic is filled back to three channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demosaic {
    /// Each missing sample is the mean of its nearest neighbours of that colour.
    Bilinear,
    /// Malvar, He & Cutler (ICASSP 2004): bilinear corrected by the local gradient of the
    /// sampled colour, the sharper linear method many camera pipelines start from.
    Malvar,
}

/// One image's drawn camera: what [`CameraSpec::draw`] picks, and what [`CameraParams::apply`]
/// runs.
#[derive(Clone, Debug, PartialEq)]
pub struct CameraParams {
    pub iso: f64,
    /// Shot-noise variance per unit of raw signal.
    pub shot: f64,
    /// Read-noise variance (raw signal on [0, 1]).
    pub read: f64,
    /// Linear sRGB -> camera RGB, rows summing to 1 (white stays white).
    pub rgb_to_cam: [[f64; 3]; 3],
    /// White-balance gains of red and blue (green is 1), and an overall brightness gain.
    pub red_gain: f64,
    pub blue_gain: f64,
    pub brightness_gain: f64,
    /// Offset of the RGGB pattern: (row, column) parity of the red sample.
    pub bayer: (usize, usize),
    pub demosaic: Demosaic,
    /// JPEG quality and whether chroma is subsampled 4:2:0.
    pub jpeg: Option<(u8, bool)>,
}

impl CameraSpec {
    /// Draws one camera and capture.
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> CameraParams {
        let (lo, hi) = sane_iso(self.iso);
        let iso = if lo == hi {
            lo
        } else {
            (rng.random_range(lo.ln()..=hi.ln())).exp()
        };
        let shot = SHOT_AT_ISO_100 * iso / 100.0;
        let spread: f64 = StandardNormal.sample(rng);
        let read = (READ_SLOPE * shot.ln() + READ_INTERCEPT + READ_SPREAD * spread).exp();
        let mut weights = [0.0f64; 4];
        for w in &mut weights {
            *w = rng.random_range(1e-3..1.0);
        }
        let total: f64 = weights.iter().sum();
        let mut xyz_to_cam = [[0.0f64; 3]; 3];
        for (w, m) in weights.iter().zip(&XYZ_TO_CAMS) {
            for r in 0..3 {
                for c in 0..3 {
                    xyz_to_cam[r][c] += w / total * m[r][c];
                }
            }
        }
        let mut rgb_to_cam = matmul(&xyz_to_cam, &RGB_TO_XYZ);
        for row in &mut rgb_to_cam {
            let sum: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
        // Brooks et al.'s ranges: red 1.9-2.4, blue 1.5-1.9, and a brightness gain 1 / N(0.8, 0.1)
        // that darkens the raw as an exposure would.
        let red_gain = rng.random_range(1.9..=2.4);
        let blue_gain = rng.random_range(1.5..=1.9);
        let normal = Normal::new(0.8, 0.1).expect("a positive spread");
        let brightness_gain = 1.0 / f64::clamp(normal.sample(rng), 0.5, 1.1);
        let bayer = (rng.random_range(0..2), rng.random_range(0..2));
        let demosaic = if rng.random::<bool>() {
            Demosaic::Bilinear
        } else {
            Demosaic::Malvar
        };
        let jpeg = self.jpeg.map(|(qlo, qhi)| {
            let (qlo, qhi) = (qlo.clamp(1, 100), qhi.clamp(1, 100));
            let quality = rng.random_range(qlo.min(qhi)..=qhi.max(qlo));
            let sub420 = match self.chroma {
                Chroma::Sub420 => true,
                Chroma::Full444 => false,
                Chroma::Any => rng.random::<bool>(),
            };
            (quality, sub420)
        });
        CameraParams {
            iso,
            shot,
            read,
            rgb_to_cam,
            red_gain,
            blue_gain,
            brightness_gain,
            bayer,
            demosaic,
            jpeg,
        }
    }

    /// Checks the ranges; the message names what is wrong.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let (lo, hi) = self.iso;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > 0.0) {
            return Err(format!("iso must be positive, got {lo}-{hi}"));
        }
        if lo > hi {
            return Err(format!("iso range {lo}-{hi} is reversed"));
        }
        if let Some((qlo, qhi)) = self.jpeg {
            if !(1..=100).contains(&qlo) || !(1..=100).contains(&qhi) || qlo > qhi {
                return Err(format!(
                    "jpeg quality range must be within 1-100 and ordered, got {qlo}-{qhi}"
                ));
            }
        }
        Ok(())
    }

    /// Parses the fields after `camera:` (`iso=LO-HI`, `jpeg=LO-HI`, `chroma=420|444|any`).
    pub(crate) fn parse(args: &[&str]) -> std::result::Result<Self, String> {
        let mut spec = CameraSpec::default();
        let mut seen = Vec::new();
        for arg in args {
            let (key, value) = arg.split_once('=').ok_or_else(|| {
                format!("camera fields are KEY=VALUE (iso, jpeg, chroma), got '{arg}'")
            })?;
            if seen.contains(&key) {
                return Err(format!("camera field '{key}' is given twice"));
            }
            seen.push(key);
            match key {
                "iso" => {
                    let (lo, hi) = split_range(value, "iso")?;
                    spec.iso = (lo, hi);
                }
                "jpeg" => {
                    let (lo, hi) = split_range(value, "jpeg quality")?;
                    let int = |v: f32| -> std::result::Result<u8, String> {
                        if v.fract() == 0.0 && (1.0..=100.0).contains(&v) {
                            Ok(v as u8)
                        } else {
                            Err(format!("jpeg quality must be an integer in 1-100, got {v}"))
                        }
                    };
                    spec.jpeg = Some((int(lo)?, int(hi)?));
                }
                "chroma" => {
                    spec.chroma = match value {
                        "420" => Chroma::Sub420,
                        "444" => Chroma::Full444,
                        "any" => Chroma::Any,
                        other => {
                            return Err(format!("chroma is 420, 444 or any, got '{other}'"));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown camera field '{other}' (known: iso, jpeg, chroma)"
                    ));
                }
            }
        }
        if spec.jpeg.is_none() && seen.contains(&"chroma") {
            return Err("chroma applies to the JPEG step: give jpeg=LO-HI too".into());
        }
        spec.check()?;
        Ok(spec)
    }
}

impl fmt::Display for CameraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |f: &mut fmt::Formatter<'_>, lo: f32, hi: f32| {
            if lo == hi {
                write!(f, "{lo}")
            } else {
                write!(f, "{lo}-{hi}")
            }
        };
        f.write_str("camera:iso=")?;
        range(f, self.iso.0, self.iso.1)?;
        if let Some((lo, hi)) = self.jpeg {
            f.write_str(":jpeg=")?;
            range(f, f32::from(lo), f32::from(hi))?;
            match self.chroma {
                Chroma::Any => {}
                Chroma::Sub420 => f.write_str(":chroma=420")?,
                Chroma::Full444 => f.write_str(":chroma=444")?,
            }
        }
        Ok(())
    }
}

fn split_range(s: &str, what: &str) -> std::result::Result<(f32, f32), String> {
    let number = |t: &str| -> std::result::Result<f32, String> {
        let v: f32 = t
            .trim()
            .parse()
            .map_err(|_| format!("{what} '{t}' is not a number"))?;
        if v.is_finite() {
            Ok(v + 0.0)
        } else {
            Err(format!("{what} must be finite, got '{t}'"))
        }
    };
    match s.split_once('-') {
        Some((lo, hi)) => Ok((number(lo)?, number(hi)?)),
        None => number(s).map(|v| (v, v)),
    }
}

fn sane_iso((lo, hi): (f32, f32)) -> (f64, f64) {
    let fix = |v: f32| {
        if v.is_finite() && v > 0.0 {
            f64::from(v)
        } else {
            100.0
        }
    };
    let (lo, hi) = (fix(lo), fix(hi));
    if lo <= hi { (lo, hi) } else { (hi, lo) }
}

fn matmul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            out[r][c] = (0..3).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

/// Inverse of a 3x3 matrix by cofactors; the colour matrices here are well conditioned.
fn invert(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let cof =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let det = m[0][0] * cof(1, 2, 1, 2) - m[0][1] * cof(1, 2, 0, 2) + m[0][2] * cof(1, 2, 0, 1);
    let inv = [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ];
    inv.map(|row| row.map(|v| v / det))
}

// ---------------------------------------------------------------------------------------------
// Stages

/// The tone curve Brooks et al. fit to camera JPEGs: `3x^2 - 2x^3` on [0, 1].
pub fn smoothstep(x: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// The inverse of [`smoothstep`] on [0, 1].
pub fn inverse_smoothstep(y: f64) -> f64 {
    let y = y.clamp(0.0, 1.0);
    0.5 - ((1.0 - 2.0 * y).asin() / 3.0).sin()
}

/// Display sRGB (on [0, 1]) to linear camera-referred light: the tone curve undone, then the
/// gamma.
pub fn to_linear(v: f64) -> f64 {
    inverse_smoothstep(v).max(1e-8).powf(GAMMA)
}

/// Linear light back to display sRGB: gamma, then the tone curve (clipped to [0, 1] first, as
/// a camera clips its raw to the white level).
pub fn from_linear(v: f64) -> f64 {
    smoothstep(v.clamp(0.0, 1.0).max(1e-8).powf(1.0 / GAMMA))
}

/// The colour of the Bayer sample at (y, x): 0 red, 1 green, 2 blue.
pub fn bayer_colour(bayer: (usize, usize), y: usize, x: usize) -> usize {
    match ((y + bayer.0) % 2, (x + bayer.1) % 2) {
        (0, 0) => 0,
        (1, 1) => 2,
        _ => 1,
    }
}

/// Heteroscedastic raw noise: each sample of `mosaic` gets N(0, max(v, 0) * shot + read), the
/// Gaussian form of Poisson shot noise plus Gaussian read noise. Returns the noise alone.
pub fn raw_noise<R: Rng + ?Sized>(mosaic: &[f64], shot: f64, read: f64, rng: &mut R) -> Vec<f64> {
    mosaic
        .iter()
        .map(|&v| {
            let n: f64 = StandardNormal.sample(rng);
            (v.max(0.0) * shot + read).max(0.0).sqrt() * n
        })
        .collect()
}

/// Reflects an index into 0..len without repeating the edge (-1 -> 1), which keeps the Bayer
/// parity of the sample it lands on.
fn reflect(i: isize, len: usize) -> usize {
    let n = len as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// Fills a Bayer mosaic (h x w) back to three planes (3 x h x w).
pub fn demosaic(
    mosaic: &[f64],
    h: usize,
    w: usize,
    bayer: (usize, usize),
    method: Demosaic,
) -> Vec<f64> {
    let at = |y: isize, x: isize| mosaic[reflect(y, h) * w + reflect(x, w)];
    // The filters each colour's missing samples take: the cross for green at red or blue, the
    // row's and the column's neighbours for red and blue at green, the diagonals for red at blue
    // and blue at red. Each pixel runs only the two it needs.
    type Taps = &'static [(isize, isize, f64)];
    let (cross, row, col, diag): (Taps, Taps, Taps, Taps) = match method {
        Demosaic::Bilinear => (&CROSS_4, &ROW_2, &COL_2, &DIAG_4),
        Demosaic::Malvar => (&MHC_G_AT_RB, &MHC_ROW, &MHC_COL, &MHC_RB_AT_BR),
    };
    let mut out = vec![0.0; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            let (yi, xi) = (y as isize, x as isize);
            let own = bayer_colour(bayer, y, x);
            let p = y * w + x;
            let conv = |k: &[(isize, isize, f64)]| -> f64 {
                k.iter().map(|&(dy, dx, c)| c * at(yi + dy, xi + dx)).sum()
            };
            let v = mosaic[p];
            let rgb = match own {
                // Red sample: green from the cross, blue from the diagonals.
                0 => [v, conv(cross), conv(diag)],
                2 => [conv(diag), conv(cross), v],
                // Green sample: the row holds red or blue.
                _ if bayer_colour(bayer, y, x + 1) == 0 => [conv(row), v, conv(col)],
                _ => [conv(col), v, conv(row)],
            };
            for (ch, value) in rgb.into_iter().enumerate() {
                out[ch * h * w + p] = value;
            }
        }
    }
    out
}

const CROSS_4: [(isize, isize, f64); 4] =
    [(-1, 0, 0.25), (1, 0, 0.25), (0, -1, 0.25), (0, 1, 0.25)];
const ROW_2: [(isize, isize, f64); 2] = [(0, -1, 0.5), (0, 1, 0.5)];
const COL_2: [(isize, isize, f64); 2] = [(-1, 0, 0.5), (1, 0, 0.5)];
const DIAG_4: [(isize, isize, f64); 4] =
    [(-1, -1, 0.25), (-1, 1, 0.25), (1, -1, 0.25), (1, 1, 0.25)];

/// Malvar-He-Cutler's 5x5 filters (weights / 8): green at a red or blue sample.
const MHC_G_AT_RB: [(isize, isize, f64); 9] = [
    (0, 0, 4.0 / 8.0),
    (-1, 0, 2.0 / 8.0),
    (1, 0, 2.0 / 8.0),
    (0, -1, 2.0 / 8.0),
    (0, 1, 2.0 / 8.0),
    (-2, 0, -1.0 / 8.0),
    (2, 0, -1.0 / 8.0),
    (0, -2, -1.0 / 8.0),
    (0, 2, -1.0 / 8.0),
];

/// The colour whose samples lie left and right of a green sample.
const MHC_ROW: [(isize, isize, f64); 11] = [
    (0, 0, 5.0 / 8.0),
    (0, -1, 4.0 / 8.0),
    (0, 1, 4.0 / 8.0),
    (0, -2, -1.0 / 8.0),
    (0, 2, -1.0 / 8.0),
    (-1, -1, -1.0 / 8.0),
    (-1, 1, -1.0 / 8.0),
    (1, -1, -1.0 / 8.0),
    (1, 1, -1.0 / 8.0),
    (-2, 0, 0.5 / 8.0),
    (2, 0, 0.5 / 8.0),
];

/// The colour whose samples lie above and below a green sample (the transpose of [`MHC_ROW`]).
const MHC_COL: [(isize, isize, f64); 11] = [
    (0, 0, 5.0 / 8.0),
    (-1, 0, 4.0 / 8.0),
    (1, 0, 4.0 / 8.0),
    (-2, 0, -1.0 / 8.0),
    (2, 0, -1.0 / 8.0),
    (-1, -1, -1.0 / 8.0),
    (1, -1, -1.0 / 8.0),
    (-1, 1, -1.0 / 8.0),
    (1, 1, -1.0 / 8.0),
    (0, -2, 0.5 / 8.0),
    (0, 2, 0.5 / 8.0),
];

/// Red at a blue sample, or blue at a red one.
const MHC_RB_AT_BR: [(isize, isize, f64); 9] = [
    (0, 0, 6.0 / 8.0),
    (-1, -1, 2.0 / 8.0),
    (-1, 1, 2.0 / 8.0),
    (1, -1, 2.0 / 8.0),
    (1, 1, 2.0 / 8.0),
    (-2, 0, -1.5 / 8.0),
    (2, 0, -1.5 / 8.0),
    (0, -2, -1.5 / 8.0),
    (0, 2, -1.5 / 8.0),
];

impl CameraParams {
    /// The white-balance and brightness gains the camera applies (red, green, blue).
    fn gains(&self) -> [f64; 3] {
        [
            self.red_gain * self.brightness_gain,
            self.brightness_gain,
            self.blue_gain * self.brightness_gain,
        ]
    }

    /// Camera raw RGB (3 x h x w, linear, before white balance) of a clean sRGB image.
    pub fn unprocess(&self, rgb: &Image) -> Vec<f64> {
        let n = rgb.pixels();
        let gains = self.gains();
        let lin: Vec<[f64; 3]> = (0..n)
            .map(|p| [0, 1, 2].map(|c| to_linear(f64::from(rgb.plane(c)[p]))))
            .collect();
        let mut raw = vec![0.0; 3 * n];
        for (p, l) in lin.iter().enumerate() {
            for c in 0..3 {
                let cam: f64 = (0..3).map(|k| self.rgb_to_cam[c][k] * l[k]).sum();
                raw[c * n + p] = cam / gains[c];
            }
        }
        raw
    }

    /// Display sRGB (3 x h x w on [0, 1], not yet rounded) of camera raw RGB.
    pub fn process(&self, raw: &[f64], h: usize, w: usize) -> Image {
        let n = h * w;
        let gains = self.gains();
        let cam_to_rgb = invert(&self.rgb_to_cam);
        let mut data = vec![0f32; 3 * n];
        for p in 0..n {
            let balanced = [0, 1, 2].map(|c| raw[c * n + p] * gains[c]);
            for c in 0..3 {
                let lin: f64 = (0..3).map(|k| cam_to_rgb[c][k] * balanced[k]).sum();
                data[c * n + p] = from_linear(lin) as f32;
            }
        }
        Image::new(3, h, w, data).expect("three planes of h x w")
    }

    /// Runs the whole pipeline on a clean image (gray images pass as RGB and come back gray).
    /// Returns the noisy image: 8-bit levels, in [0, 1].
    pub fn apply<R: Rng + ?Sized>(&self, clean: &Image, rng: &mut R) -> Image {
        let (channels, h, w) = clean.shape();
        if h == 0 || w == 0 {
            return clean.clone();
        }
        let mut rgb = clean.to_rgb();
        rgb.clamp01();
        let n = h * w;
        let mut raw = self.unprocess(&rgb);
        let mosaic: Vec<f64> = (0..n)
            .map(|p| raw[bayer_colour(self.bayer, p / w, p % w) * n + p])
            .collect();
        let noise = raw_noise(&mosaic, self.shot, self.read, rng);
        let noise = demosaic(&noise, h, w, self.bayer, self.demosaic);
        raw.iter_mut().zip(&noise).for_each(|(r, n)| *r += n);
        let mut out = self.process(&raw, h, w);
        round_to_8_bits(out.data_mut());
        if let Some((quality, sub420)) = self.jpeg {
            out = crate::noise::jpeg_with_chroma(&out, quality, sub420);
        }
        if channels == 1 { out.to_gray() } else { out }
    }
}

/// Clamps to [0, 1] and rounds to the nearest of the 256 levels of an 8-bit file.
pub fn round_to_8_bits(data: &mut [f32]) {
    for v in data {
        // f32::clamp keeps NaN; a NaN sample saves as 0 in an 8-bit file.
        let c = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        *v = (c * 255.0).round() / 255.0;
    }
}

/// The local root-mean-square of `noisy - clean` over the channels and a 7x7 window: the noise
/// level map of noise whose level is not known in closed form (1 x h x w, [0, 1] scale).
pub fn local_rms(noisy: &Image, clean: &Image) -> Image {
    let (channels, h, w) = clean.shape();
    let n = h * w;
    let mut sq = vec![0.0f64; n];
    for c in 0..channels {
        for ((s, a), b) in sq.iter_mut().zip(noisy.plane(c)).zip(clean.plane(c)) {
            let d = f64::from(a - b);
            *s += d * d / channels as f64;
        }
    }
    const R: usize = 3;
    // Separable box sums, clamped at the borders.
    let mut rows = vec![0.0f64; n];
    for y in 0..h {
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(R), (x + R).min(w - 1));
            rows[y * w + x] =
                sq[y * w + x0..=y * w + x1].iter().sum::<f64>() / (x1 - x0 + 1) as f64;
        }
    }
    let data = (0..n)
        .map(|p| {
            let (y, x) = (p / w, p % w);
            let (y0, y1) = (y.saturating_sub(R), (y + R).min(h - 1));
            let mean = (y0..=y1).map(|yy| rows[yy * w + x]).sum::<f64>() / (y1 - y0 + 1) as f64;
            mean.sqrt() as f32
        })
        .collect();
    Image::new(1, h, w, data).expect("one sample per pixel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn photo(h: usize, w: usize) -> Image {
        Image::from_fn(3, h, w, |c, y, x| {
            let v =
                0.5 + 0.35 * ((y as f32 / 7.0 + c as f32).sin() * (x as f32 / 11.0 + 0.3).cos());
            (v * 255.0).round() / 255.0
        })
    }

    fn quiet(mut p: CameraParams) -> CameraParams {
        p.shot = 0.0;
        p.read = 0.0;
        p
    }

    #[test]
    fn the_tone_curve_and_its_inverse_undo_each_other() {
        for i in 0..=1000 {
            let y = f64::from(i) / 1000.0;
            assert!((smoothstep(inverse_smoothstep(y)) - y).abs() < 1e-9, "{y}");
            assert!((from_linear(to_linear(y)) - y).abs() < 1e-6, "{y}");
        }
        assert_eq!(smoothstep(0.5), 0.5);
    }

    #[test]
    fn a_colour_matrix_and_its_inverse_undo_each_other() {
        let p = CameraSpec::default().draw(&mut ChaCha8Rng::seed_from_u64(4));
        let id = matmul(&p.rgb_to_cam, &invert(&p.rgb_to_cam));
        for (r, row) in id.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9);
            }
        }
        for row in p.rgb_to_cam {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Without noise or JPEG the inverted pipeline and the forward one give back every
        /// pixel within one 8-bit level.
        #[test]
        fn without_noise_the_round_trip_is_within_one_level(seed in 0u64..1000, h in 1usize..20, w in 1usize..20) {
            let clean = Image::from_fn(3, h, w, |c, y, x| {
                let v = ((seed as usize * 31 + c * 7 + y * 13 + x * 5) % 256) as f32;
                v / 255.0
            });
            let p = quiet(CameraSpec::default().draw(&mut ChaCha8Rng::seed_from_u64(seed)));
            let out = p.apply(&clean, &mut ChaCha8Rng::seed_from_u64(0));
            for (a, b) in out.data().iter().zip(clean.data()) {
                prop_assert!((a - b).abs() <= 1.0 / 255.0 + 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn raw_noise_variance_follows_brightness_as_drawn() {
        let p = CameraSpec {
            iso: (3200.0, 3200.0),
            ..Default::default()
        }
        .draw(&mut ChaCha8Rng::seed_from_u64(9));
        assert!((p.shot - 3.2e-3).abs() < 1e-12);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for level in [0.0, 0.05, 0.2, 0.6] {
            let flat = vec![level; 200_000];
            let noise = raw_noise(&flat, p.shot, p.read, &mut rng);
            let var = noise.iter().map(|n| n * n).sum::<f64>() / noise.len() as f64;
            let want = level * p.shot + p.read;
            assert!((var / want - 1.0).abs() < 0.02, "{level}: {var} vs {want}");
        }
    }

    #[test]
    fn read_noise_follows_the_log_linear_relation_to_shot_noise() {
        let spec = CameraSpec::default();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut residuals = Vec::new();
        for _ in 0..2000 {
            let p = spec.draw(&mut rng);
            assert!((100.0..=12800.0).contains(&p.iso));
            residuals.push(p.read.ln() - (READ_SLOPE * p.shot.ln() + READ_INTERCEPT));
        }
        let mean = residuals.iter().sum::<f64>() / residuals.len() as f64;
        let sd = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>()
            / residuals.len() as f64)
            .sqrt();
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((sd - READ_SPREAD).abs() < 0.02, "{sd}");
    }

    #[test]
    fn demosaicing_keeps_flat_planes_and_linear_ramps() {
        let (h, w) = (12, 14);
        for method in [Demosaic::Bilinear, Demosaic::Malvar] {
            for bayer in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                // A grey ramp: every colour equal, linear in x and y.
                let ramp = |y: usize, x: usize| 0.1 + 0.01 * y as f64 + 0.02 * x as f64;
                let mosaic: Vec<f64> = (0..h * w).map(|p| ramp(p / w, p % w)).collect();
                let out = demosaic(&mosaic, h, w, bayer, method);
                for c in 0..3 {
                    for y in 2..h - 2 {
                        for x in 2..w - 2 {
                            let got = out[c * h * w + y * w + x];
                            assert!((got - ramp(y, x)).abs() < 1e-12, "{method:?} {bayer:?}");
                        }
                    }
                }
                // Each sample keeps its own value in its own channel.
                for p in 0..h * w {
                    let c = bayer_colour(bayer, p / w, p % w);
                    assert_eq!(out[c * h * w + p], mosaic[p]);
                }
            }
        }
    }

    #[test]
    fn demosaiced_noise_is_correlated_between_neighbours() {
        let (h, w) = (64, 64);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let noise = raw_noise(&vec![0.0; h * w], 0.0, 1.0, &mut rng);
        let out = demosaic(&noise, h, w, (0, 0), Demosaic::Bilinear);
        // Green: horizontal neighbours share samples where one of them is interpolated.
        let g = &out[h * w..2 * h * w];
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for y in 0..h {
            for x in 0..w - 1 {
                sxy += g[y * w + x] * g[y * w + x + 1];
                sxx += g[y * w + x] * g[y * w + x];
            }
        }
        let corr = sxy / sxx;
        assert!(corr > 0.2, "{corr}");
    }

    #[test]
    fn the_same_seed_gives_the_same_noise_and_iso_raises_it() {
        let clean = photo(32, 40);
        let noisy = |iso: f32, seed: u64| {
            let spec = CameraSpec {
                iso: (iso, iso),
                ..Default::default()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let p = spec.draw(&mut rng);
            p.apply(&clean, &mut rng)
        };
        assert_eq!(noisy(800.0, 3), noisy(800.0, 3));
        assert_ne!(noisy(800.0, 3), noisy(800.0, 4));
        let rms = |iso| {
            let out = noisy(iso, 3);
            let map = local_rms(&out, &clean);
            map.data().iter().map(|&v| f64::from(v)).sum::<f64>() / map.pixels() as f64
        };
        assert!(rms(6400.0) > 2.0 * rms(400.0));
        for v in noisy(800.0, 3).data() {
            assert_eq!((v * 255.0).round() / 255.0, *v);
        }
    }

    #[test]
    fn jpeg_settings_are_drawn_within_the_spec() {
        let spec: CameraSpec =
            CameraSpec::parse(&["iso=400-1600", "jpeg=70-90", "chroma=420"]).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..50 {
            let (q, sub) = spec.draw(&mut rng).jpeg.unwrap();
            assert!((70..=90).contains(&q));
            assert!(sub);
        }
        let out = spec.draw(&mut rng).apply(&photo(24, 24), &mut rng);
        assert_eq!(out.shape(), (3, 24, 24));
    }

    #[test]
    fn fields_parse_print_and_refuse() {
        let ok = |args: &[&str], shown: &str| {
            let spec = CameraSpec::parse(args).unwrap();
            assert_eq!(spec.to_string(), shown);
        };
        ok(&[], "camera:iso=100-12800");
        ok(&["iso=1600"], "camera:iso=1600");
        ok(
            &["jpeg=80-95", "iso=200-400"],
            "camera:iso=200-400:jpeg=80-95",
        );
        ok(
            &["jpeg=90", "chroma=444"],
            "camera:iso=100-12800:jpeg=90:chroma=444",
        );
        for bad in [
            &["iso=0-100"][..],
            &["iso=800-100"],
            &["jpeg=0-90"],
            &["jpeg=90.5"],
            &["chroma=422", "jpeg=90"],
            &["chroma=420"],
            &["iso"],
            &["gain=2"],
            &["iso=100", "iso=200"],
        ] {
            assert!(CameraSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn gray_images_come_back_gray() {
        let clean = photo(16, 16).to_gray();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = CameraSpec::default().draw(&mut rng);
        assert_eq!(p.apply(&clean, &mut rng).shape(), (1, 16, 16));
    }
}
