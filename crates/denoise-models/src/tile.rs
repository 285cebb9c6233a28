//! Tiled inference: a large image is denoised tile by tile (each with an overlap margin) and the
//! tiles are blended with linear ramps, so memory stays bounded and seams do not show. The full
//! image stays on the CPU; one tile at a time moves to the model's device.

use crate::{Model, ModelError, Result};
use denoise_data::Image;
use denoise_data::estimate::{self, NoiseEstimate};
use tch::Tensor;

/// The noise level given to a model that takes a noise-level map (others ignore it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseLevel<'a> {
    /// Estimate the level from the image (`denoise_data::estimate::estimate_noise`): blind use.
    /// A colour image whose noise reads as independent across channels gets a map that follows
    /// its brightness; others one level.
    Estimate,
    /// A uniform level on the 0-255 scale.
    Uniform(f32),
    /// A per-pixel map of standard deviations on the `[0, 1]` scale, `h x w`.
    Map(&'a [f32]),
}

/// The noise level a model that takes one was given, when it was not given a map (0-255 scale).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelUsed {
    /// The level given or estimated; for a map estimated from brightness, its root mean square
    /// over the pixels.
    pub sigma: f32,
    /// The least and the greatest level of a map estimated from brightness; `None` for one
    /// level.
    pub range: Option<(f32, f32)>,
    /// Estimated for noise the colour channels share (`NoiseEstimate::Shared`): Immerkær's
    /// filter, which also reads texture, so the level is least sure.
    pub shared: bool,
}

impl LevelUsed {
    fn uniform(sigma: f32) -> Self {
        Self {
            sigma,
            range: None,
            shared: false,
        }
    }

    /// The summary of a map on the [0, 1] scale.
    fn of_map(map: &[f32]) -> Self {
        let mean_square = map
            .iter()
            .map(|&s| f64::from(s) * f64::from(s))
            .sum::<f64>()
            / map.len().max(1) as f64;
        let (lo, hi) = map.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &s| {
            (lo.min(s), hi.max(s))
        });
        Self {
            sigma: (mean_square.sqrt() * 255.0) as f32,
            range: Some((lo.min(hi) * 255.0, hi * 255.0)),
            shared: false,
        }
    }
}

impl std::fmt::Display for LevelUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}", self.sigma)?;
        if let Some((lo, hi)) = self.range {
            write!(f, " (from {lo:.1} to {hi:.1} with brightness)")?;
        }
        Ok(())
    }
}

/// Denoises an image with `model`: converts gray <-> colour explicitly when the model wants the
/// other (and back), builds the noise-level map, and runs [`denoise_tiled`]. Returns the result
/// (not clipped) and the level used, for models that take one and were not given a map.
///
/// Noise levels, given or estimated, are the image's own (per channel, as it comes in). The map
/// a model gets is that level times [`conversion_noise_gain`] when the image is converted: a
/// colour model shown a gray image sees the same noise in all three channels, which it reads
/// as it would independent noise sqrt(3) times stronger.
///
/// # Shapes
/// `image`: C x H x W with C = 1 or 3; the result has the same shape.
pub fn denoise_image(
    model: &Model,
    image: &Image,
    level: NoiseLevel<'_>,
    cfg: TileConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Image, Option<LevelUsed>)> {
    denoise_image_cancellable(model, image, level, cfg, progress, &never)
}

/// [`denoise_image`] that calls `cancelled()` before each pass over a tile (so between tiles
/// and between self-ensemble passes) and stops with [`ModelError::Cancelled`] once it answers
/// true: a caller whose client has gone does not pay for the rest of the image.
///
/// # Shapes
/// `image`: C x H x W with C = 1 or 3; the result has the same shape.
pub fn denoise_image_cancellable(
    model: &Model,
    image: &Image,
    level: NoiseLevel<'_>,
    cfg: TileConfig,
    progress: &mut dyn FnMut(usize, usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<(Image, Option<LevelUsed>)> {
    let config = model.config();
    let input = image.to_channels(config.channels() as usize)?;
    let (c, h, w) = input.shape();
    // A gray picture stored as RGB (a scan, a black-and-white photo) has its noise in every
    // channel alike, as a gray image shown to a colour model: read it as gray.
    // Only a model given a noise level needs to know (the scan is the image's size).
    let gray_rgb =
        config.noise_map() && image.channels() == 3 && c == 3 && image.is_gray_within(GRAY_SPREAD);
    let gain = if gray_rgb {
        conversion_noise_gain(1, 3)
    } else {
        conversion_noise_gain(image.channels(), c)
    };
    let (map, used) = match (config.noise_map(), level) {
        (false, _) => (None, None),
        (true, NoiseLevel::Map(map)) => (Some(map.iter().map(|s| s * gain).collect()), None),
        (true, NoiseLevel::Uniform(s)) => (
            Some(vec![s / 255.0 * gain; h * w]),
            Some(LevelUsed::uniform(s)),
        ),
        // The model reads the level itself where it is given no map.
        (true, NoiseLevel::Estimate) if config.estimates_level() => (None, None),
        (true, NoiseLevel::Estimate) => {
            // A colour picture shown to a gray model gets 0.669 times the estimate; for noise
            // the channels share (`NoiseEstimate::Shared`, already 1.4 times the filter) that
            // is about the filter's level, which is what fully shared noise keeps in gray.
            let estimate = if gray_rgb {
                NoiseEstimate::Uniform(estimate::estimate_sigma(&image.to_gray()))
            } else {
                estimate::estimate_noise(image)
            };
            match estimate {
                NoiseEstimate::Uniform(s) => (
                    Some(vec![s / 255.0 * gain; h * w]),
                    Some(LevelUsed::uniform(s)),
                ),
                NoiseEstimate::Shared(s) => (
                    Some(vec![s / 255.0 * gain; h * w]),
                    Some(LevelUsed {
                        shared: true,
                        ..LevelUsed::uniform(s)
                    }),
                ),
                NoiseEstimate::Brightness(nlf) => {
                    let mut map = nlf.map(image);
                    let used = LevelUsed::of_map(&map);
                    map.iter_mut().for_each(|s| *s *= gain);
                    (Some(map), Some(used))
                }
            }
        }
    };
    let out = denoise_tiled_cancellable(
        model,
        input.data(),
        map.as_deref(),
        (c, h, w),
        cfg,
        progress,
        cancelled,
    )?;
    let out = Image::new(c, h, w, out)?;
    Ok((out.to_channels(image.channels())?, used))
}

/// An RGB image whose channels differ by at most this much anywhere (two 8-bit levels: what
/// JPEG's chroma rounding leaves of a gray picture) is taken to be gray for its noise level.
pub const GRAY_SPREAD: f32 = 2.0 / 255.0;

/// What a noise level of an image with `from` channels becomes, for a model trained on
/// independent Gaussian noise in each of its `to` channels, once the image is converted
/// ([`Image::to_channels`]).
///
/// - Gray to colour (the plane repeated): the noise is the same in every channel, so its
///   luminance part is as strong as independent noise sqrt(3) times larger would give, and the
///   model must be told that level (on gray test images sqrt(3) beat 1, 1.2, 1.5 and 2 times
///   the level, bar a near tie at sigma 50).
/// - Colour to gray (0.299 R + 0.587 G + 0.114 B): independent channel noise of std s becomes
///   s times the norm of those weights, 0.669.
/// - Otherwise 1.
pub fn conversion_noise_gain(from: usize, to: usize) -> f32 {
    match (from, to) {
        (1, 3) => 3f32.sqrt(),
        (3, 1) => denoise_data::image::LUMA
            .iter()
            .map(|w| w * w)
            .sum::<f32>()
            .sqrt(),
        _ => 1.0,
    }
}

/// How to cut the image, and how many times to run each tile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileConfig {
    /// Tile side in pixels, overlap included (0 = the whole image in one go).
    pub tile: usize,
    /// Pixels shared by neighbouring tiles, blended linearly.
    pub overlap: usize,
    /// Self-ensemble: each tile is denoised this many times (one of [`ENSEMBLE_SIZES`]), the
    /// first as it is and the others flipped or turned and on other phases of the model's 2x2
    /// grid (see [`VIEWS`]), and the results, put back, are averaged. 1 is a single pass; N
    /// passes cost N times the time.
    pub ensemble: usize,
}

/// The self-ensemble sizes [`TileConfig::ensemble`] takes: 1 (off), 2, 4 or 8, the first views
/// of [`VIEWS`].
pub const ENSEMBLE_SIZES: [usize; 4] = [1, 2, 4, 8];

/// Reads a self-ensemble size as a user writes it (surrounding blanks allowed); `None` unless it
/// is one of [`ENSEMBLE_SIZES`].
pub fn ensemble_size(text: &str) -> Option<usize> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| ENSEMBLE_SIZES.contains(n))
}

/// One pass of the self-ensemble: the tile flipped left-right (`flip`), then turned `turns`
/// quarter turns, and cut by the model's 2x2 grid (pixel-unshuffle, stride-2 layers) on
/// `phase`: the blocks pair the tile's rows `2k + phase.0, 2k + 1 + phase.0` and its columns
/// `2k + phase.1, 2k + 1 + phase.1`. Phase 1 on an axis takes a one-pixel pad at the start of
/// that axis as the model sees it (mirrored in, or repeated for a 1-pixel tile) and cropped
/// off the output; a flip or turn that reverses an odd-length axis moves its phase by itself,
/// which the pad accounts for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub turns: i64,
    pub flip: bool,
    pub phase: (i64, i64),
}

const fn view(turns: i64, flip: bool, phase: (i64, i64)) -> View {
    View { turns, flip, phase }
}

/// The self-ensemble's passes, in the order the sizes take them: all eight flips and quarter
/// turns of the square, with each phase of the 2x2 grid used twice and the first 2 and the
/// first 4 views on different phases, so that the passes' errors are less alike than with
/// turns alone. Measured on the 22 validation photos of BSD432 (481x321) with the shipped
/// default, sigma 15: see the README's quality section.
pub const VIEWS: [View; 8] = [
    view(0, false, (0, 0)),
    view(0, true, (1, 1)),
    view(1, false, (1, 0)),
    view(3, true, (0, 1)),
    view(2, false, (0, 1)),
    view(2, true, (1, 0)),
    view(1, true, (0, 0)),
    view(3, false, (1, 1)),
];

impl View {
    /// Which axis of the tile (0 rows, 1 columns) each axis of the turned tile runs along,
    /// and whether reversed: `[rows, columns]` as the model sees them.
    fn axes(self) -> [(usize, bool); 2] {
        let mut axes = [(0, false), (1, self.flip)];
        for _ in 0..self.turns.rem_euclid(4) {
            // A quarter turn (torch.rot90): new rows run along the old columns, reversed; new
            // columns along the old rows.
            let [rows, cols] = axes;
            axes = [(cols.0, !cols.1), rows];
        }
        axes
    }

    /// The (top, left) pad, in the turned frame, that puts an `h x w` tile on `phase`.
    fn pads(self, (h, w): (i64, i64)) -> (i64, i64) {
        let len = [h, w];
        let phase = [self.phase.0, self.phase.1];
        let [top, left] = self.axes().map(|(axis, reversed)| {
            // Reversing an axis of length L moves row r to L - 1 - r: a pad d then pairs the
            // rows from (L + d) mod 2 on.
            if reversed {
                (phase[axis] + len[axis]).rem_euclid(2)
            } else {
                phase[axis]
            }
        });
        (top, left)
    }

    /// `t` (N x C x H x W) as this pass sees it.
    fn apply(self, t: &Tensor) -> Result<Tensor> {
        let (dy, dx) = self.pads((t.size()[2], t.size()[3]));
        let t = if self.flip {
            t.f_flip([3])?
        } else {
            t.shallow_clone()
        };
        let t = t.f_rot90(self.turns, [2, 3])?;
        let (h, w) = (t.size()[2], t.size()[3]);
        if dy == 0 && dx == 0 {
            return Ok(t);
        }
        // Mirroring needs a row or column to spare: repeat the edge of a 1-pixel tile.
        Ok(if h > dy && w > dx {
            t.f_reflection_pad2d([dx, 0, dy, 0])?
        } else {
            t.f_replication_pad2d([dx, 0, dy, 0])?
        })
    }

    /// The output of a pass over [`View::apply`]'s tensor, put back where an `h x w` input was.
    fn undo(self, t: &Tensor, (h, w): (i64, i64)) -> Result<Tensor> {
        let (dy, dx) = self.pads((h, w));
        let (th, tw) = (t.size()[2], t.size()[3]);
        let t = t.f_narrow(2, dy, th - dy)?.f_narrow(3, dx, tw - dx)?;
        let t = t.f_rot90(-self.turns, [2, 3])?;
        Ok(if self.flip { t.f_flip([3])? } else { t })
    }
}

/// Picks a tile side whose activations fit `max_mem_mb`, from the model's widest layer
/// (about 6 live feature maps of that width, 4 bytes each, at full resolution).
pub fn tile_for_budget(model: &Model, max_mem_mb: usize) -> usize {
    let bytes_per_pixel = 6 * 4 * model.widest_features().max(16) as usize;
    let pixels = (max_mem_mb << 20) / bytes_per_pixel;
    ((pixels as f64).sqrt() as usize / 16 * 16).clamp(64, 4096)
}

/// Denoises a CHW image (`c x h x w` f32, noise may leave [0, 1]) in tiles, calling `progress(done,
/// total)` after each pass over a tile (`total` = tiles x `cfg.ensemble`). `sigma` is the 1 x h x w noise-level map for models that take one.
/// A tile that fails with out-of-memory is retried in quarters.
///
/// # Shapes
/// `image`: c*h*w samples; `sigma`: h*w samples. Returns c*h*w samples.
pub fn denoise_tiled(
    model: &Model,
    image: &[f32],
    sigma: Option<&[f32]>,
    shape: (usize, usize, usize),
    cfg: TileConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    denoise_tiled_cancellable(model, image, sigma, shape, cfg, progress, &never)
}

/// The cancellation check of the calls that take none.
fn never() -> bool {
    false
}

/// [`denoise_tiled`] that calls `cancelled()` before each pass over a tile and stops with
/// [`ModelError::Cancelled`] once it answers true.
///
/// # Shapes
/// `image`: c*h*w samples; `sigma`: h*w samples. Returns c*h*w samples.
pub fn denoise_tiled_cancellable(
    model: &Model,
    image: &[f32],
    sigma: Option<&[f32]>,
    (c, h, w): (usize, usize, usize),
    cfg: TileConfig,
    progress: &mut dyn FnMut(usize, usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<f32>> {
    if image.len() != c * h * w || sigma.is_some_and(|s| s.len() != h * w) {
        return Err(ModelError::Input(format!(
            "buffer sizes do not match {c}x{h}x{w}"
        )));
    }
    if !ENSEMBLE_SIZES.contains(&cfg.ensemble) {
        return Err(ModelError::Input(format!(
            "self-ensemble size {} is not one of {ENSEMBLE_SIZES:?}",
            cfg.ensemble
        )));
    }
    let tile = if cfg.tile == 0 { h.max(w) } else { cfg.tile };
    let overlap = cfg.overlap.min(tile / 2);
    let mut out = vec![0f32; c * h * w];
    let mut weight = vec![0f32; h * w];
    let ys = starts(h, tile, overlap);
    let xs = starts(w, tile, overlap);
    // One step per pass over a tile: a one-tile image with 8 passes still moves.
    let total = ys.len() * xs.len() * cfg.ensemble;
    let mut done = 0;
    for &y in &ys {
        for &x in &xs {
            let (th, tw) = (tile.min(h - y), tile.min(w - x));
            let before = done;
            let planes = Planes {
                image,
                sigma,
                shape: (c, h, w),
            };
            let result = denoise_window(
                model,
                planes,
                (y, x, th, tw),
                cfg.ensemble,
                &mut || {
                    done += 1;
                    progress(done, total);
                },
                cancelled,
            )?;
            accumulate(
                &mut out,
                &mut weight,
                &result,
                (c, h, w),
                (y, x, th, tw),
                overlap,
                (&ys, &xs),
            );
            if done < before + cfg.ensemble {
                // An out-of-memory retry denoises its quarters without reporting passes.
                done = before + cfg.ensemble;
                progress(done, total);
            }
        }
    }
    for ch in 0..c {
        for (o, wt) in out[ch * h * w..(ch + 1) * h * w].iter_mut().zip(&weight) {
            *o /= *wt;
        }
    }
    Ok(out)
}

/// Tile origins along one axis: step `tile - overlap`, the last tile flush with the end.
fn starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let step = tile - overlap;
    let mut v: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|&s| s + tile < len)
        .collect();
    v.push(len - tile);
    v.dedup();
    v
}

/// The image a tiled run reads: `c x h x w` samples and the `h x w` noise-level map, if any.
#[derive(Clone, Copy)]
struct Planes<'a> {
    image: &'a [f32],
    sigma: Option<&'a [f32]>,
    shape: (usize, usize, usize),
}

/// Runs one window, splitting it in four on out-of-memory (down to 64 pixels).
fn denoise_window(
    model: &Model,
    Planes {
        image,
        sigma,
        shape: (c, h, w),
    }: Planes<'_>,
    (y, x, th, tw): (usize, usize, usize, usize),
    ensemble: usize,
    on_pass: &mut dyn FnMut(),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<f32>> {
    let crop = |src: &[f32], planes: usize| {
        let mut v = Vec::with_capacity(planes * th * tw);
        for p in 0..planes {
            for row in y..y + th {
                let s = (p * h + row) * w + x;
                v.extend_from_slice(&src[s..s + tw]);
            }
        }
        v
    };
    let t = Tensor::from_slice(&crop(image, c)).view([1, c as i64, th as i64, tw as i64]);
    let map = sigma.map(|s| Tensor::from_slice(&crop(s, 1)).view([1, 1, th as i64, tw as i64]));
    match denoise_views(model, &t, map.as_ref(), ensemble, on_pass, cancelled) {
        Ok(out) => Ok(Vec::try_from(out.view([-1]))?),
        Err(err) if is_oom(&err) && th.max(tw) > 64 => {
            // Halve the window: the quarters are denoised separately with their own margins.
            let sub = TileConfig {
                tile: th.max(tw).div_ceil(2),
                overlap: 16,
                ensemble,
            };
            let window = crop(image, c);
            let window_sigma = sigma.map(|s| crop(s, 1));
            denoise_tiled_cancellable(
                model,
                &window,
                window_sigma.as_deref(),
                (c, th, tw),
                sub,
                &mut |_, _| {},
                cancelled,
            )
        }
        Err(err) => Err(err),
    }
}

/// The mean of the model's outputs over the first `n` [`VIEWS`], each put back:
/// `mean_k V_k^-1(model(V_k x, V_k map))`. Fallible ops throughout (`f_`): the sum lives on the
/// model's device, where it can run out of memory like the model.
fn denoise_views(
    model: &Model,
    x: &Tensor,
    map: Option<&Tensor>,
    n: usize,
    on_pass: &mut dyn FnMut(),
    cancelled: &dyn Fn() -> bool,
) -> Result<Tensor> {
    let mut run = |x: &Tensor, map: Option<&Tensor>| {
        if cancelled() {
            return Err(ModelError::Cancelled);
        }
        model.denoise(x, map)
    };
    average_views(&mut run, x, map, n, on_pass)
}

/// [`denoise_views`] for any `run` (the tests give it functions whose result is known).
fn average_views(
    run: &mut dyn FnMut(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    x: &Tensor,
    map: Option<&Tensor>,
    n: usize,
    on_pass: &mut dyn FnMut(),
) -> Result<Tensor> {
    if n == 1 {
        let out = run(x, map)?;
        on_pass();
        return Ok(out);
    }
    let size = (x.size()[2], x.size()[3]);
    let mut sum: Option<Tensor> = None;
    for &view in &VIEWS[..n] {
        let map = map.map(|m| view.apply(m)).transpose()?;
        let out = view.undo(&run(&view.apply(x)?, map.as_ref())?, size)?;
        on_pass();
        sum = Some(match sum {
            Some(s) => s.f_add(&out)?,
            None => out,
        });
    }
    let sum = sum.expect("n >= 2 views were run");
    Ok(sum.f_div_scalar(n as f64)?.f_contiguous()?)
}

fn is_oom(err: &ModelError) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    text.contains("out of memory")
        || text.contains("not enough memory")
        || text.contains("can't allocate")
}

/// Adds a tile's output into the accumulator with weights ramping across overlaps shared with a
/// neighbour (never at the image border).
fn accumulate(
    out: &mut [f32],
    weight: &mut [f32],
    tile: &[f32],
    (c, h, w): (usize, usize, usize),
    (y, x, th, tw): (usize, usize, usize, usize),
    overlap: usize,
    (ys, xs): (&[usize], &[usize]),
) {
    // Within a quarter of the overlap from an interior edge a tile's output is unreliable (the
    // network saw padding there): weight 0, then a linear ramp to 1 that its neighbour mirrors.
    let margin = overlap / 4;
    let span = (overlap - 2 * margin).max(1) as f32;
    let edge = |d: usize| -> f32 {
        if d >= overlap {
            1.0
        } else {
            ((d as f32 - margin as f32 + 0.5) / span).clamp(0.0, 1.0)
        }
    };
    let ramp = |i: usize, len: usize, has_before: bool, has_after: bool| -> f32 {
        let mut r = 1.0f32;
        if has_before {
            r = r.min(edge(i));
        }
        if has_after {
            r = r.min(edge(len - 1 - i));
        }
        r
    };
    let (up, down) = (y > 0, ys.last().is_some_and(|&l| y < l));
    let (left, right) = (x > 0, xs.last().is_some_and(|&l| x < l));
    for ty in 0..th {
        let wy = ramp(ty, th, up, down);
        for tx in 0..tw {
            let wt = wy * ramp(tx, tw, left, right);
            let idx = (y + ty) * w + x + tx;
            weight[idx] += wt;
            for ch in 0..c {
                out[ch * h * w + idx] += wt * tile[(ch * th + ty) * tw + tx];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;
    use tch::{Device, Kind};

    /// A 3-layer FFDNet with seeded random weights.
    fn tiny_ffdnet() -> Model {
        tch::manual_seed(0);
        let cfg: crate::ModelConfig =
            serde_json::from_str(r#"{"kind":"ffdnet","depth":3,"features":8}"#).unwrap();
        Model::new(&cfg, Device::Cpu).unwrap()
    }

    #[test]
    fn starts_cover_the_axis() {
        let _rng = crate::test_rng_lock();
        assert_eq!(starts(100, 128, 16), vec![0]);
        assert_eq!(starts(300, 128, 32), vec![0, 96, 172]);
        assert_eq!(starts(256, 128, 0), vec![0, 128]);
    }

    #[test]
    fn denoise_image_converts_channels_and_reports_the_level_used() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        let gray = Image::new(1, 20, 30, (0..600).map(|i| (i % 7) as f32 / 7.0).collect()).unwrap();
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let run = |level| denoise_image(&model, &gray, level, whole, &mut |_, _| {}).unwrap();
        let (out, used) = run(NoiseLevel::Uniform(25.0));
        assert_eq!(
            out.shape(),
            (1, 20, 30),
            "gray in, gray out from a colour model"
        );
        assert_eq!(used, Some(LevelUsed::uniform(25.0)));
        let map = vec![25.0 / 255.0; 600];
        let (from_map, used) = run(NoiseLevel::Map(&map));
        assert_eq!(used, None, "a map is not a uniform level");
        assert_eq!(
            from_map.data(),
            out.data(),
            "a constant map is the uniform level"
        );
        let (_, used) = run(NoiseLevel::Estimate);
        assert!(
            used.is_some_and(|u| u.sigma > 0.0 && u.range.is_none()),
            "{used:?}"
        );
        // The colour model is told the gray level times sqrt(3) (the noise is alike in its
        // three channels), and so is a gray picture stored as RGB, which is read as gray.
        let rgb_with_map = |img: &Image, level: f32| {
            let map = vec![level; 600];
            let out = denoise_tiled(
                &model,
                img.data(),
                Some(&map),
                (3, 20, 30),
                whole,
                &mut |_, _| {},
            );
            Image::new(3, 20, 30, out.unwrap()).unwrap()
        };
        let told = rgb_with_map(&gray.to_rgb(), 25.0 / 255.0 * 3f32.sqrt());
        assert_eq!(out.data(), told.to_gray().data());
        let unscaled = rgb_with_map(&gray.to_rgb(), 25.0 / 255.0);
        assert_ne!(
            out.data(),
            unscaled.to_gray().data(),
            "the map reaches the model"
        );
        let as_rgb = |level| denoise_image(&model, &gray.to_rgb(), level, whole, &mut |_, _| {});
        let (as_rgb, used) = as_rgb(NoiseLevel::Uniform(25.0)).unwrap();
        assert_eq!(used, Some(LevelUsed::uniform(25.0)));
        assert_eq!(as_rgb.to_gray().data(), out.data());
        // A colour picture is not: its map is the level as given.
        let colour = Image::from_fn(3, 20, 30, |c, y, x| ((c + 2 * y + x) % 5) as f32 / 5.0);
        let level = NoiseLevel::Uniform(25.0);
        let (tinted, _) = denoise_image(&model, &colour, level, whole, &mut |_, _| {}).unwrap();
        assert_eq!(tinted.data(), rgb_with_map(&colour, 25.0 / 255.0).data());
        assert!((conversion_noise_gain(3, 1) - 0.6686).abs() < 1e-4);
        assert_eq!(conversion_noise_gain(3, 3), 1.0);

        let plain: crate::ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8}"#).unwrap();
        let plain = Model::new(&plain, Device::Cpu).unwrap();
        let (_, used) =
            denoise_image(&plain, &gray, NoiseLevel::Estimate, whole, &mut |_, _| {}).unwrap();
        assert_eq!(used, None, "dncnn takes no noise level");
    }

    #[test]
    fn a_blind_colour_picture_gets_a_map_that_follows_its_brightness() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        // Texture over a left-to-right ramp, with Poisson-Gaussian noise: the level grows with
        // brightness, which the estimate must give the model pixel by pixel.
        let (h, w) = (96, 160);
        let clean = Image::from_fn(3, h, w, |c, y, x| {
            let (yf, xf) = (y as f32, x as f32);
            0.1 + 0.75 * xf / w as f32
                + 0.05 * (1.9 * xf + 0.4 * yf + c as f32).sin()
                + 0.03 * (0.7 * xf - 2.3 * yf).cos()
        });
        let noisy = denoise_data::noise::NoiseSpec::PoissonGaussian {
            peak: 40.0,
            sigma: 2.0,
        }
        .apply(&clean, 3)
        .image;
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let (out, used) =
            denoise_image(&model, &noisy, NoiseLevel::Estimate, whole, &mut |_, _| {}).unwrap();
        let used = used.unwrap();
        let (lo, hi) = used.range.expect("a map that follows brightness");
        // sqrt(m / 40 + (2/255)^2) * 255 is 13 at m = 0.1 and 37 at m = 0.85.
        assert!(
            lo < 20.0 && hi > 30.0 && (lo..hi).contains(&used.sigma),
            "{used:?}"
        );
        assert!(used.to_string().contains("with brightness"), "{used}");
        // The model got exactly the estimated map.
        let NoiseEstimate::Brightness(nlf) = estimate::estimate_noise(&noisy) else {
            panic!("white noise in colour: a brightness estimate");
        };
        let direct = denoise_tiled(
            &model,
            noisy.data(),
            Some(&nlf.map(&noisy)),
            (3, h, w),
            whole,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out.data(), direct.as_slice());
    }

    #[test]
    fn every_view_is_put_back_where_it_came_from() {
        let opts = (Kind::Float, Device::Cpu);
        // All eight flips and turns, each phase of the 2x2 grid twice, and the first 2 and 4
        // views on different phases.
        let turns: std::collections::BTreeSet<_> =
            VIEWS.iter().map(|v| (v.turns, v.flip)).collect();
        assert_eq!(turns.len(), 8);
        for phase in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert_eq!(VIEWS.iter().filter(|v| v.phase == phase).count(), 2);
        }
        let phases = |n: usize| {
            VIEWS[..n]
                .iter()
                .map(|v| v.phase)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!((phases(2), phases(4)), (2, 4));
        // The phase the model really cuts, read off a tile whose pixels hold their own row and
        // column: rows 2 and 3 (and columns 2 and 3) of what the model sees share a 2x2 block,
        // whatever the flip, turn and tile size (odd sides move the phase of a reversed axis).
        for (h, w) in [(6, 8), (7, 5), (5, 9), (9, 9), (8, 7)] {
            let rows = Tensor::arange(h, opts)
                .view([1, 1, h, 1])
                .expand([1, 1, h, w], false);
            let cols = Tensor::arange(w, opts)
                .view([1, 1, 1, w])
                .expand([1, 1, h, w], false);
            let coords = Tensor::cat(&[rows, cols], 1);
            for view in VIEWS {
                let seen = view.apply(&coords).unwrap();
                let at = |y: i64, x: i64| -> [i64; 2] {
                    [0, 1].map(|c| seen.double_value(&[0, c, y, x]) as i64)
                };
                let mut cut = [None, None];
                for (a, b) in [(at(2, 2), at(3, 2)), (at(2, 2), at(2, 3))] {
                    let axis = if a[0] != b[0] { 0 } else { 1 };
                    assert_eq!((a[axis] - b[axis]).abs(), 1, "{view:?} on {h}x{w}");
                    cut[axis] = Some(a[axis].min(b[axis]) % 2);
                }
                assert_eq!(
                    cut,
                    [Some(view.phase.0), Some(view.phase.1)],
                    "{view:?} on {h}x{w}"
                );
            }
        }
        for (h, w) in [(12, 16), (7, 5), (1, 1), (1, 4)] {
            let x = Tensor::rand([1, 3, h, w], opts);
            let map = Tensor::rand([1, 1, h, w], opts);
            for view in VIEWS {
                let seen = view.apply(&x).unwrap();
                // A quarter turn swaps the sides; the pad adds at most a row and a column.
                let (sh, sw) = if view.turns % 2 == 1 { (w, h) } else { (h, w) };
                let (dy, dx) = view.pads((h, w));
                assert_eq!(seen.size(), [1, 3, sh + dy, sw + dx], "{view:?}");
                assert_eq!(view.undo(&seen, (h, w)).unwrap(), x, "{view:?} on {h}x{w}");
            }
            // A per-pixel function of the image and map gives the same result through any views
            // when each is put back rightly, the map moved with the image.
            let mut pointwise = |x: &Tensor, map: Option<&Tensor>| Ok(x * 2.0 + map.unwrap());
            let direct = pointwise(&x, Some(&map)).unwrap();
            for n in [2, 4, 8] {
                let mut passes = 0;
                let out =
                    average_views(&mut pointwise, &x, Some(&map), n, &mut || passes += 1).unwrap();
                assert_eq!(passes, n);
                let gap = (&out - &direct).abs().max().double_value(&[]);
                assert!(gap < 1e-6, "{n} views on {h}x{w}: {gap}");
            }
        }
        // The same check fails for a function that depends on where a pixel is (it has teeth).
        let x = Tensor::rand([1, 3, 12, 16], opts);
        let mut positional = |x: &Tensor, _: Option<&Tensor>| {
            let w = x.size()[3];
            Ok(x + Tensor::arange(w, opts).view([1, 1, 1, w]) / 16.0)
        };
        let direct = positional(&x, None).unwrap();
        let out = average_views(&mut positional, &x, None, 2, &mut || {}).unwrap();
        assert!((&out - &direct).abs().max().double_value(&[]) > 1e-3);
    }

    #[test]
    fn the_ensemble_reports_every_pass_and_refuses_other_sizes() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::rand([1, 3, 12, 16], opts);
        let map = Tensor::rand([1, 1, 12, 16], opts) * 0.2;
        let whole = denoise_views(&model, &x, Some(&map), 8, &mut || {}, &never).unwrap();
        assert_eq!(whole.size(), [1, 3, 12, 16]);
        // Progress moves once per pass, so one tile with 8 passes reports 8 steps.
        let flat: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
        let flat_map: Vec<f32> = Vec::try_from(map.view([-1])).unwrap();
        let mut steps = Vec::new();
        let whole_cfg = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 8,
        };
        let tiled = denoise_tiled(
            &model,
            &flat,
            Some(&flat_map),
            (3, 12, 16),
            whole_cfg,
            &mut |done, total| steps.push((done, total)),
        )
        .unwrap();
        assert_eq!(steps, (1..=8).map(|d| (d, 8)).collect::<Vec<_>>());
        let expected: Vec<f32> = Vec::try_from(whole.view([-1])).unwrap();
        assert_eq!(tiled, expected);
        // Sizes other than 1, 2, 4 and 8 are refused.
        let bad = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 3,
        };
        let err = denoise_tiled(&model, &flat, None, (3, 12, 16), bad, &mut |_, _| {});
        assert!(err.unwrap_err().to_string().contains("self-ensemble"));
    }

    #[test]
    fn a_cancellation_check_stops_between_tiles_and_between_passes() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        let (c, h, w) = (3, 40, 40);
        let image: Vec<f32> = (0..c * h * w).map(|i| (i % 11) as f32 / 11.0).collect();
        let map = vec![0.1; h * w];
        // Four tiles of two passes: stopping after three passes stops inside the second tile,
        // between its passes; stopping after four, between the second tile and the third.
        let cfg = TileConfig {
            tile: 24,
            overlap: 8,
            ensemble: 2,
        };
        for stop_after in [0, 3, 4] {
            let done = std::cell::Cell::new(0);
            let result = denoise_tiled_cancellable(
                &model,
                &image,
                Some(&map),
                (c, h, w),
                cfg,
                &mut |d, _| done.set(d),
                &|| done.get() >= stop_after,
            );
            assert!(
                matches!(result, Err(ModelError::Cancelled)),
                "stop after {stop_after}: {result:?}"
            );
            assert_eq!(done.get(), stop_after, "passes run before stopping");
        }
        // A check that never says stop changes nothing.
        let run = |cancelled: &dyn Fn() -> bool| {
            denoise_tiled_cancellable(
                &model,
                &image,
                Some(&map),
                (c, h, w),
                cfg,
                &mut |_, _| {},
                cancelled,
            )
            .unwrap()
        };
        assert_eq!(run(&|| false), run(&never));
        // The image-level entry passes the check on.
        let img = Image::new(c, h, w, image.clone()).unwrap();
        let level = NoiseLevel::Uniform(20.0);
        let stopped = denoise_image_cancellable(&model, &img, level, cfg, &mut |_, _| {}, &|| true);
        assert!(matches!(stopped, Err(ModelError::Cancelled)));
    }

    #[test]
    fn tiled_output_matches_untiled() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let cfg: crate::ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":4,"features":8}"#).unwrap();
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        let (c, h, w) = (3usize, 75usize, 90usize);
        let img = Tensor::rand([c as i64 * h as i64 * w as i64], (Kind::Float, Device::Cpu));
        let img: Vec<f32> = Vec::try_from(&img).unwrap();
        let whole = denoise_tiled(
            &model,
            &img,
            None,
            (c, h, w),
            TileConfig {
                tile: 0,
                overlap: 0,
                ensemble: 1,
            },
            &mut |_, _| {},
        )
        .unwrap();
        let mut calls = 0;
        let tiled = denoise_tiled(
            &model,
            &img,
            None,
            (c, h, w),
            TileConfig {
                tile: 40,
                overlap: 16,
                ensemble: 1,
            },
            &mut |_, _| calls += 1,
        )
        .unwrap();
        assert_eq!(calls, 12);
        // The receptive field (4 layers of 3x3: radius 4) fits in the 8-pixel half-overlap, so
        // tiles agree with the whole image up to float rounding.
        let max = whole
            .iter()
            .zip(&tiled)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "max difference {max}");
        let _ = ModelKind::Dncnn;
    }
}
