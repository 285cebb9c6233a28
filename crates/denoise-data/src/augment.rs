//! Seeded data augmentation: shifts with fill modes, flips, the 8 dihedral transforms, zoom and
//! random crops, composed from a serde config ([`AugmentConfig`]).

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{DataError, Image, Result};

/// How shifts and zooms fill pixels that come from outside the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FillMode {
    /// Outside pixels take this value (serde: `{"constant": 0.0}`).
    Constant(f32),
    /// Mirror about the edge sample without repeating it, `d c b | a b c d | c b a` (NumPy's
    /// `reflect`, SciPy's `mirror`); the default, as it adds no artificial edges.
    #[default]
    Reflect,
    /// Repeat the edge sample, `a a a | a b c d | d d d`.
    Nearest,
}

/// Random shifts: `dx` is drawn uniformly from `-round(horizontal * width)..=round(horizontal *
/// width)` whole pixels (likewise `dy`), with probability `probability`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShiftConfig {
    /// Largest horizontal shift as a fraction of the width, in [0, 1].
    pub horizontal: f32,
    /// Largest vertical shift as a fraction of the height, in [0, 1].
    pub vertical: f32,
    /// Probability of shifting at all (default 1).
    pub probability: f32,
}

impl Default for ShiftConfig {
    fn default() -> Self {
        Self {
            horizontal: 0.0,
            vertical: 0.0,
            probability: 1.0,
        }
    }
}

/// Random zoom about the image centre with bilinear sampling: the scale is drawn log-uniformly
/// from `min..=max` (so 0.8-1.25 zooms out as often as in), with probability `probability`.
/// Scales above 1 zoom in (magnify); below 1 zoom out, filling the border with the fill mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZoomConfig {
    /// Smallest scale, > 0 (default 1).
    pub min: f32,
    /// Largest scale, >= `min` (default 1).
    pub max: f32,
    /// Probability of zooming at all (default 1).
    pub probability: f32,
}

impl Default for ZoomConfig {
    fn default() -> Self {
        Self {
            min: 1.0,
            max: 1.0,
            probability: 1.0,
        }
    }
}

/// Which augmentations to apply, in a fixed order: dihedral transform, horizontal flip, vertical
/// flip, shift, zoom. `Default` applies none. Every one keeps the image size (a non-square
/// image only gets the four dihedral transforms that keep its shape); random crops are separate
/// ([`random_crop`]).
///
/// As TOML: `dihedral = true`, `flip_horizontal = 0.5`, `shift = { horizontal = 0.1, vertical
/// = 0.1 }`, `zoom = { min = 0.8, max = 1.25, probability = 0.5 }`, `fill = "reflect"` (or
/// `"nearest"`, or `{ constant = 0.0 }`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// One of the 8 dihedral transforms (rotations by 90 degrees and flips), uniformly.
    pub dihedral: bool,
    /// Probability of a left-right flip.
    pub flip_horizontal: f32,
    /// Probability of an up-down flip.
    pub flip_vertical: f32,
    /// Random shifts; `None`: none.
    pub shift: Option<ShiftConfig>,
    /// Random zoom; `None`: none.
    pub zoom: Option<ZoomConfig>,
    /// How shifts and zooms fill what comes from outside the image.
    pub fill: FillMode,
}

impl AugmentConfig {
    /// Applies the configured augmentations to `img`, drawing from `rng`. Only enabled
    /// augmentations draw, so enabling one changes the stream of the ones after it. Values that
    /// [`AugmentConfig::validate`] rejects are clamped here rather than panicking.
    ///
    /// # Shapes
    /// C x H x W in, C x H x W out.
    pub fn apply<R: Rng + ?Sized>(&self, img: &Image, rng: &mut R) -> Image {
        let mut out = img.clone();
        if self.dihedral {
            let k = if img.height() == img.width() {
                rng.random_range(0..8u8)
            } else {
                // The transposing half of the group would swap H and W.
                2 * rng.random_range(0..4u8)
            };
            if k != 0 {
                out = dihedral(&out, k);
            }
        }
        if chance(self.flip_horizontal, rng) {
            out = flip_horizontal(&out);
        }
        if chance(self.flip_vertical, rng) {
            out = flip_vertical(&out);
        }
        if let Some(shift_cfg) = &self.shift {
            if chance(shift_cfg.probability, rng) {
                let max_dy = max_shift(shift_cfg.vertical, out.height());
                let max_dx = max_shift(shift_cfg.horizontal, out.width());
                // rand has no portable isize sampling; shifts fit i64 anyway.
                let dy = rng.random_range(-max_dy..=max_dy) as isize;
                let dx = rng.random_range(-max_dx..=max_dx) as isize;
                if dy != 0 || dx != 0 {
                    out = shift(&out, dy, dx, self.fill);
                }
            }
        }
        if let Some(zoom_cfg) = &self.zoom {
            if chance(zoom_cfg.probability, rng) {
                let clamp = |s: f32| {
                    if s.is_finite() {
                        s.clamp(1e-3, 1e3)
                    } else {
                        1.0
                    }
                };
                let (a, b) = (clamp(zoom_cfg.min).ln(), clamp(zoom_cfg.max).ln());
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                let scale = if lo == hi {
                    lo.exp()
                } else {
                    rng.random_range(lo..=hi).exp()
                };
                if scale != 1.0 {
                    out = zoom(&out, scale, self.fill);
                }
            }
        }
        out
    }

    /// Whether [`AugmentConfig::apply`] always returns its input unchanged.
    pub fn is_identity(&self) -> bool {
        let shifts = self
            .shift
            .as_ref()
            .is_some_and(|s| s.probability > 0.0 && (s.horizontal != 0.0 || s.vertical != 0.0));
        let zooms = self
            .zoom
            .as_ref()
            .is_some_and(|z| z.probability > 0.0 && (z.min != 1.0 || z.max != 1.0));
        let flips = self.flip_horizontal > 0.0 || self.flip_vertical > 0.0;
        !(self.dihedral || flips || shifts || zooms)
    }

    /// Checks that probabilities and fractions lie in [0, 1], zoom scales are positive and
    /// ordered, and the fill value is finite.
    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(DataError::Config(format!(
                    "augment.{name} must be in [0, 1], got {v}"
                )))
            }
        };
        unit("flip_horizontal", self.flip_horizontal)?;
        unit("flip_vertical", self.flip_vertical)?;
        if let Some(s) = &self.shift {
            unit("shift.horizontal", s.horizontal)?;
            unit("shift.vertical", s.vertical)?;
            unit("shift.probability", s.probability)?;
        }
        if let Some(z) = &self.zoom {
            unit("zoom.probability", z.probability)?;
            if !(z.min.is_finite() && z.max.is_finite() && z.min > 0.0 && z.min <= z.max) {
                return Err(DataError::Config(format!(
                    "augment.zoom needs 0 < min <= max (finite), got min {} and max {}",
                    z.min, z.max
                )));
            }
        }
        if let FillMode::Constant(v) = self.fill {
            if !v.is_finite() {
                return Err(DataError::Config(format!(
                    "augment.fill constant must be finite, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// True with probability `p`; `p <= 0` or NaN never, `p >= 1` always (no panic, unlike
/// `random_bool`, on hand-built out-of-range values).
fn chance<R: Rng + ?Sized>(p: f32, rng: &mut R) -> bool {
    p > 0.0 && rng.random::<f32>() < p
}

fn max_shift(fraction: f32, size: usize) -> i64 {
    let f = if fraction.is_finite() {
        fraction.abs().min(1.0)
    } else {
        0.0
    };
    (f * size as f32).round() as i64
}

/// Dihedral transform `k` (taken modulo 8): rotation counter-clockwise by `k % 4` quarter
/// turns (NumPy's `rot90(x, k)`), applied after a left-right flip when `k >= 4`.
///
/// So 0 is the identity, 1-3 rotate by 90, 180 and 270 degrees, 4 is the left-right flip,
/// 5 the transpose, 6 the up-down flip and 7 the anti-transpose.
///
/// # Shapes
/// C x H x W in; C x W x H out for odd `k % 4`, else C x H x W.
pub fn dihedral(img: &Image, k: u8) -> Image {
    // Every element is "maybe transpose, then maybe flip each output axis"; the table lists
    // (transpose, flip rows, flip columns) for rot90^(k%4) after an optional left-right flip.
    const TABLE: [(bool, bool, bool); 8] = [
        (false, false, false),
        (true, false, true),
        (false, true, true),
        (true, true, false),
        (false, false, true),
        (true, false, false),
        (false, true, false),
        (true, true, true),
    ];
    let (transpose, flip_rows, flip_cols) = TABLE[usize::from(k % 8)];
    let (channels, h, w) = img.shape();
    let (oh, ow) = if transpose { (w, h) } else { (h, w) };
    let mut data = Vec::with_capacity(img.data().len());
    for c in 0..channels {
        let plane = img.plane(c);
        for y in 0..oh {
            if transpose {
                // Output row y is source column y (flipped as asked), read down the rows.
                let sx = if flip_cols { w - 1 - y } else { y };
                for x in 0..ow {
                    let sy = if flip_rows { h - 1 - x } else { x };
                    data.push(plane[sy * w + sx]);
                }
            } else {
                let sy = if flip_rows { h - 1 - y } else { y };
                let row = &plane[sy * w..(sy + 1) * w];
                if flip_cols {
                    data.extend(row.iter().rev());
                } else {
                    data.extend_from_slice(row);
                }
            }
        }
    }
    Image::new(channels, oh, ow, data).expect("a dihedral transform keeps the sample count")
}

/// The inverse of [`dihedral`]: `dihedral_inverse(&dihedral(x, k), k) == x`.
///
/// # Shapes
/// As [`dihedral`] (the inverse of a quarter turn swaps H and W back).
pub fn dihedral_inverse(img: &Image, k: u8) -> Image {
    let k = k % 8;
    // Rotations invert to the opposite rotation; the four reflections are involutions.
    let inverse = if k < 4 { (4 - k) % 4 } else { k };
    dihedral(img, inverse)
}

/// Left-right mirror.
///
/// # Shapes
/// C x H x W in and out.
pub fn flip_horizontal(img: &Image) -> Image {
    dihedral(img, 4)
}

/// Up-down mirror.
///
/// # Shapes
/// C x H x W in and out.
pub fn flip_vertical(img: &Image) -> Image {
    dihedral(img, 6)
}

/// Moves the content `dy` pixels down and `dx` right (negative: up, left); what enters from
/// outside is filled by `fill`. Shifts larger than the image are allowed.
///
/// # Shapes
/// C x H x W in and out.
pub fn shift(img: &Image, dy: isize, dx: isize, fill: FillMode) -> Image {
    let (_, h, w) = img.shape();
    let rows: Vec<Option<usize>> = (0..h).map(|y| source(y as isize - dy, h, fill)).collect();
    let cols: Vec<Option<usize>> = (0..w).map(|x| source(x as isize - dx, w, fill)).collect();
    let value = fill_value(fill);
    let mut out = Image::zeros(img.channels(), h, w);
    for c in 0..img.channels() {
        let src = img.plane(c);
        let dst = out.plane_mut(c);
        for (y, row) in rows.iter().enumerate() {
            let dst_row = &mut dst[y * w..(y + 1) * w];
            match row {
                None => dst_row.fill(value),
                Some(sy) => {
                    let src_row = &src[sy * w..(sy + 1) * w];
                    for (d, col) in dst_row.iter_mut().zip(&cols) {
                        *d = col.map_or(value, |sx| src_row[sx]);
                    }
                }
            }
        }
    }
    out
}

/// Zooms about the image centre by `scale` (> 1 magnifies) with bilinear interpolation, keeping
/// the size; samples from outside the image are filled by `fill`. Pixel centres are at half
/// integers, so output pixel `y` samples input row `(y + 0.5 - H/2) / scale + H/2 - 0.5`.
/// A non-positive or non-finite scale returns the image unchanged.
///
/// # Shapes
/// C x H x W in and out.
pub fn zoom(img: &Image, scale: f32, fill: FillMode) -> Image {
    if !(scale.is_finite() && scale > 0.0) || scale == 1.0 {
        return img.clone();
    }
    let (_, h, w) = img.shape();
    let rows = bilinear_taps(h, scale, fill);
    let cols = bilinear_taps(w, scale, fill);
    let value = fill_value(fill);
    let mut out = Image::zeros(img.channels(), h, w);
    // Separable: interpolating every source row along x first, then those rows along y, does
    // the same arithmetic as the 2-D formula with half the taps, and the y pass vectorises.
    let mut across = vec![0.0f32; h * w];
    let fill_row = vec![value; w];
    for c in 0..img.channels() {
        let src = img.plane(c);
        for (src_row, tmp_row) in src.chunks_exact(w).zip(across.chunks_exact_mut(w)) {
            for (t, &(x0, x1, tx)) in tmp_row.iter_mut().zip(&cols) {
                let a = x0.map_or(value, |x| src_row[x]);
                let b = x1.map_or(value, |x| src_row[x]);
                *t = a + tx * (b - a);
            }
        }
        let dst = out.plane_mut(c);
        for (dst_row, &(y0, y1, ty)) in dst.chunks_exact_mut(w).zip(&rows) {
            let top = y0.map_or(&fill_row[..], |y| &across[y * w..(y + 1) * w]);
            let bottom = y1.map_or(&fill_row[..], |y| &across[y * w..(y + 1) * w]);
            for ((d, &t), &b) in dst_row.iter_mut().zip(top).zip(bottom) {
                *d = t + ty * (b - t);
            }
        }
    }
    out
}

/// An `h x w` window at a uniformly random position.
///
/// # Shapes
/// C x H x W in, C x h x w out; fails unless `0 < h <= H` and `0 < w <= W`.
pub fn random_crop<R: Rng + ?Sized>(img: &Image, h: usize, w: usize, rng: &mut R) -> Result<Image> {
    if h == 0 || w == 0 || h > img.height() || w > img.width() {
        return Err(DataError::Shape(format!(
            "cannot crop {h}x{w} from a {}x{} image",
            img.height(),
            img.width()
        )));
    }
    let y = rng.random_range(0..=img.height() - h);
    let x = rng.random_range(0..=img.width() - w);
    img.crop(y, x, h, w)
}

fn fill_value(fill: FillMode) -> f32 {
    match fill {
        FillMode::Constant(v) => v,
        FillMode::Reflect | FillMode::Nearest => 0.0,
    }
}

/// Where sample `i` of an axis of length `n` comes from; `None` means the constant fill.
fn source(i: isize, n: usize, fill: FillMode) -> Option<usize> {
    if n == 0 {
        return None;
    }
    if (0..n as isize).contains(&i) {
        return Some(i as usize);
    }
    match fill {
        FillMode::Constant(_) => None,
        FillMode::Nearest => Some(i.clamp(0, n as isize - 1) as usize),
        FillMode::Reflect => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n as isize - 1);
            let m = i.rem_euclid(period);
            Some(if m >= n as isize { period - m } else { m } as usize)
        }
    }
}

/// For each output position along an axis: the two source taps and the weight of the second.
fn bilinear_taps(n: usize, scale: f32, fill: FillMode) -> Vec<(Option<usize>, Option<usize>, f32)> {
    let centre = n as f32 / 2.0;
    (0..n)
        .map(|i| {
            let pos = (i as f32 + 0.5 - centre) / scale + centre - 0.5;
            let floor = pos.floor();
            let i0 = floor as isize;
            (source(i0, n, fill), source(i0 + 1, n, fill), pos - floor)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn numbered(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| (c * 100 + y * 10 + x) as f32)
    }

    fn rows(img: &Image, c: usize) -> Vec<Vec<f32>> {
        img.plane(c)
            .chunks(img.width())
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// NumPy's `rot90(x, 1)` written the obvious way, as a reference for the table.
    fn rot90_reference(img: &Image) -> Image {
        let (c, h, w) = img.shape();
        Image::from_fn(c, w, h, |c, i, j| img.get(c, j, w - 1 - i))
    }

    fn flip_reference(img: &Image) -> Image {
        let (c, h, w) = img.shape();
        Image::from_fn(c, h, w, |c, y, x| img.get(c, y, w - 1 - x))
    }

    #[test]
    fn dihedral_matches_rotations_after_an_optional_flip() {
        let img = numbered(2, 3, 4);
        for k in 0..8u8 {
            let mut expected = if k >= 4 {
                flip_reference(&img)
            } else {
                img.clone()
            };
            for _ in 0..k % 4 {
                expected = rot90_reference(&expected);
            }
            assert_eq!(dihedral(&img, k), expected, "k = {k}");
        }
        assert_eq!(dihedral(&img, 9), dihedral(&img, 1));
    }

    #[test]
    fn dihedral_reference_values() {
        let img = Image::new(1, 2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let expected: [[f32; 4]; 8] = [
            [1.0, 2.0, 3.0, 4.0], // identity
            [2.0, 4.0, 1.0, 3.0], // np.rot90
            [4.0, 3.0, 2.0, 1.0], // 180 degrees
            [3.0, 1.0, 4.0, 2.0], // 270 degrees
            [2.0, 1.0, 4.0, 3.0], // left-right flip
            [1.0, 3.0, 2.0, 4.0], // transpose
            [3.0, 4.0, 1.0, 2.0], // up-down flip
            [4.0, 2.0, 3.0, 1.0], // anti-transpose
        ];
        for (k, e) in expected.iter().enumerate() {
            assert_eq!(dihedral(&img, k as u8).data(), e, "k = {k}");
        }
        let wide = numbered(1, 2, 3);
        assert_eq!(dihedral(&wide, 1).shape(), (1, 3, 2));
        assert_eq!(
            rows(&dihedral(&wide, 1), 0),
            [[2.0, 12.0], [1.0, 11.0], [0.0, 10.0]]
        );
    }

    #[test]
    fn flips_and_shift_reference_values() {
        let img = numbered(1, 2, 3);
        assert_eq!(
            rows(&flip_horizontal(&img), 0),
            [[2.0, 1.0, 0.0], [12.0, 11.0, 10.0]]
        );
        assert_eq!(
            rows(&flip_vertical(&img), 0),
            [[10.0, 11.0, 12.0], [0.0, 1.0, 2.0]]
        );

        let line = Image::new(1, 1, 4, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let sh = |dx, fill| shift(&line, 0, dx, fill).into_data();
        assert_eq!(sh(2, FillMode::Constant(-1.0)), [-1.0, -1.0, 1.0, 2.0]);
        assert_eq!(sh(2, FillMode::Nearest), [1.0, 1.0, 1.0, 2.0]);
        assert_eq!(sh(2, FillMode::Reflect), [3.0, 2.0, 1.0, 2.0]);
        assert_eq!(sh(-3, FillMode::Reflect), [4.0, 3.0, 2.0, 1.0]);
        assert_eq!(sh(-7, FillMode::Reflect), [2.0, 3.0, 4.0, 3.0]);
        assert_eq!(sh(0, FillMode::Reflect), [1.0, 2.0, 3.0, 4.0]);
        let img = numbered(2, 3, 3);
        let down = shift(&img, 1, 0, FillMode::Constant(0.5));
        assert_eq!(
            rows(&down, 1),
            [
                [0.5, 0.5, 0.5],
                [100.0, 101.0, 102.0],
                [110.0, 111.0, 112.0]
            ]
        );
    }

    #[test]
    fn zoom_reference_values() {
        let line = Image::new(1, 1, 4, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        // x2 about the centre 1.5: output x samples (x + 0.5 - 2) / 2 + 1.5.
        let zoomed = zoom(&line, 2.0, FillMode::Nearest);
        let expected = [0.75, 1.25, 1.75, 2.25];
        for (z, e) in zoomed.data().iter().zip(expected) {
            assert!((z - e).abs() < 1e-6, "{zoomed:?}");
        }
        // Zooming out by 2 samples at 2x - 1.5: -1.5, 0.5, 2.5, 4.5; the ends lie outside.
        let out = zoom(&line, 0.5, FillMode::Constant(9.0)).into_data();
        assert_eq!(out, [9.0, 0.5, 2.5, 9.0]);
        assert_eq!(
            zoom(&line, 0.5, FillMode::Nearest).into_data(),
            [0.0, 0.5, 2.5, 3.0]
        );
        // A linear ramp zoomed with bilinear taps inside the image stays a linear ramp.
        let ramp = Image::from_fn(1, 16, 16, |_, y, x| y as f32 + 2.0 * x as f32);
        let z = zoom(&ramp, 1.3, FillMode::Reflect);
        for y in 4..12 {
            for x in 4..12 {
                let sy = (y as f32 + 0.5 - 8.0) / 1.3 + 7.5;
                let sx = (x as f32 + 0.5 - 8.0) / 1.3 + 7.5;
                assert!((z.get(0, y, x) - (sy + 2.0 * sx)).abs() < 1e-4);
            }
        }
        assert_eq!(zoom(&ramp, 1.0, FillMode::Reflect), ramp);
        assert_eq!(zoom(&ramp, -1.0, FillMode::Reflect), ramp);
    }

    #[test]
    fn random_crop_checks_sizes_and_stays_inside() {
        let img = Image::from_fn(3, 10, 12, |c, y, x| (c * 10000 + y * 100 + x) as f32);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let crop = random_crop(&img, 4, 5, &mut rng).unwrap();
            assert_eq!(crop.shape(), (3, 4, 5));
            let corner = crop.get(0, 0, 0) as usize;
            let (y, x) = (corner / 100, corner % 100);
            assert_eq!(crop, img.crop(y, x, 4, 5).unwrap());
        }
        assert_eq!(random_crop(&img, 10, 12, &mut rng).unwrap(), img);
        for (h, w) in [(11, 5), (4, 13), (0, 5), (4, 0)] {
            let err = random_crop(&img, h, w, &mut rng).unwrap_err().to_string();
            assert!(
                err.contains(&format!("cannot crop {h}x{w} from a 10x12 image")),
                "{err}"
            );
        }
    }

    #[test]
    fn default_config_is_the_identity_and_round_trips_through_serde() {
        let cfg = AugmentConfig::default();
        assert!(cfg.is_identity());
        assert!(cfg.validate().is_ok());
        let img = numbered(3, 8, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(cfg.apply(&img, &mut rng), img);
        let parsed: AugmentConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, cfg);

        let json = r#"{"dihedral": true, "flip_horizontal": 0.5,
            "shift": {"horizontal": 0.1}, "zoom": {"min": 0.8, "max": 1.25},
            "fill": {"constant": 0.0}}"#;
        let cfg: AugmentConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            cfg.shift,
            Some(ShiftConfig {
                horizontal: 0.1,
                vertical: 0.0,
                probability: 1.0
            })
        );
        assert_eq!(
            cfg.zoom,
            Some(ZoomConfig {
                min: 0.8,
                max: 1.25,
                probability: 1.0
            })
        );
        assert_eq!(cfg.fill, FillMode::Constant(0.0));
        assert!(!cfg.is_identity());
        let back: AugmentConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<AugmentConfig>(r#"{"flip": 0.5}"#).is_err());
        assert_eq!(
            serde_json::from_str::<FillMode>("\"nearest\"").unwrap(),
            FillMode::Nearest
        );
    }

    #[test]
    fn validate_names_the_bad_field() {
        let bad = [
            (
                AugmentConfig {
                    flip_horizontal: 1.5,
                    ..Default::default()
                },
                "flip_horizontal",
            ),
            (
                AugmentConfig {
                    shift: Some(ShiftConfig {
                        vertical: -0.1,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "shift.vertical",
            ),
            (
                AugmentConfig {
                    zoom: Some(ZoomConfig {
                        min: 0.0,
                        max: 1.0,
                        probability: 1.0,
                    }),
                    ..Default::default()
                },
                "zoom",
            ),
            (
                AugmentConfig {
                    zoom: Some(ZoomConfig {
                        min: 2.0,
                        max: 1.0,
                        probability: 1.0,
                    }),
                    ..Default::default()
                },
                "zoom",
            ),
            (
                AugmentConfig {
                    fill: FillMode::Constant(f32::NAN),
                    ..Default::default()
                },
                "fill",
            ),
        ];
        for (cfg, field) in bad {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("augment.{field}")), "{err}");
            // apply must still not panic on what validate rejects.
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            assert_eq!(cfg.apply(&numbered(1, 5, 5), &mut rng).shape(), (1, 5, 5));
        }
    }

    fn everything(fill: FillMode) -> AugmentConfig {
        AugmentConfig {
            dihedral: true,
            flip_horizontal: 0.5,
            flip_vertical: 0.5,
            shift: Some(ShiftConfig {
                horizontal: 0.2,
                vertical: 0.2,
                probability: 0.8,
            }),
            zoom: Some(ZoomConfig {
                min: 0.8,
                max: 1.25,
                probability: 0.8,
            }),
            fill,
        }
    }

    #[test]
    fn full_config_keeps_size_and_uses_the_whole_group() {
        let square = numbered(3, 6, 6);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let cfg = AugmentConfig {
            dihedral: true,
            ..Default::default()
        };
        let mut seen: Vec<Image> = Vec::new();
        for _ in 0..200 {
            let out = cfg.apply(&square, &mut rng);
            if !seen.contains(&out) {
                seen.push(out);
            }
        }
        assert_eq!(seen.len(), 8, "all 8 dihedral transforms occur");
        let wide = numbered(1, 4, 7);
        for fill in [
            FillMode::Reflect,
            FillMode::Nearest,
            FillMode::Constant(0.0),
        ] {
            for _ in 0..50 {
                assert_eq!(everything(fill).apply(&wide, &mut rng).shape(), (1, 4, 7));
            }
        }
    }

    fn image() -> impl Strategy<Value = Image> {
        (1usize..=3, 1usize..12, 1usize..12).prop_flat_map(|(c, h, w)| {
            proptest::collection::vec(-1.0f32..2.0, c * h * w)
                .prop_map(move |data| Image::new(c, h, w, data).unwrap())
        })
    }

    proptest! {
        #[test]
        fn flips_twice_are_the_identity(img in image()) {
            prop_assert_eq!(flip_horizontal(&flip_horizontal(&img)), img.clone());
            prop_assert_eq!(flip_vertical(&flip_vertical(&img)), img);
        }

        #[test]
        fn dihedral_inverse_undoes_dihedral(img in image()) {
            for k in 0..8u8 {
                prop_assert_eq!(dihedral_inverse(&dihedral(&img, k), k), img.clone(), "k = {}", k);
                prop_assert_eq!(dihedral(&dihedral_inverse(&img, k), k), img.clone(), "k = {}", k);
            }
        }

        #[test]
        fn shift_there_and_back_restores_the_overlap(
            img in image(), dy in -5isize..5, dx in -5isize..5,
        ) {
            let back = shift(&shift(&img, dy, dx, FillMode::Nearest), -dy, -dx, FillMode::Nearest);
            let (c, h, w) = img.shape();
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        // The way back reads (y + dy, x + dx) of the shifted image.
                        let inside = (0..h as isize).contains(&(y as isize + dy))
                            && (0..w as isize).contains(&(x as isize + dx));
                        if inside {
                            prop_assert_eq!(back.get(ch, y, x), img.get(ch, y, x));
                        }
                    }
                }
            }
        }

        #[test]
        fn same_seed_same_augmentation(img in image(), seed in any::<u64>()) {
            let cfg = everything(FillMode::Reflect);
            let a = cfg.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
            let b = cfg.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.shape(), img.shape());
        }
    }
}
