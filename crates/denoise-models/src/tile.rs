//! Tiled inference: a large image is denoised tile by tile (each with an overlap margin) and the
//! tiles are blended with linear ramps, so memory stays bounded and seams do not show. The full
//! image stays on the CPU; one tile at a time moves to the model's device, where it is run over
//! the self-ensemble's views.

use crate::ensemble::average_views;
use crate::{Model, ModelError, Result};
use tch::Tensor;

// The names callers have imported from here.
pub use crate::denoiser::{denoise_image, denoise_image_cancellable};
pub use crate::ensemble::{ENSEMBLE_SIZES, VIEWS, View, ensemble_size};
pub use crate::level::{GRAY_SPREAD, LevelUsed, NoiseLevel, conversion_noise_gain};

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
pub(crate) fn never() -> bool {
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
    let align = model.config().multiple() as usize;
    let ys = starts(h, tile, overlap, align);
    let xs = starts(w, tile, overlap, align);
    // One step per pass over a tile: a one-tile image with 8 passes still moves.
    let total = ys.len() * xs.len() * cfg.ensemble;
    let mut done = 0;
    for &y in &ys {
        for &x in &xs {
            let (th, tw) = (extent(y, &ys, h, tile), extent(x, &xs, w, tile));
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

/// Tile origins along one axis: multiples of `align` (the model's grid, so that every tile
/// sees the image on the whole image's grid; a network that downsamples is not shift
/// invariant), at most `tile - overlap` apart, the last as close to the end as alignment lets it
/// be. Every tile but the last is `tile` long; the last runs to the end (up to `align - 1`
/// longer).
fn starts(len: usize, tile: usize, overlap: usize, align: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let align = align.max(1);
    let step = ((tile - overlap) / align * align).max(align);
    let mut v: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|&s| s + tile < len)
        .collect();
    v.push((len - tile) / align * align);
    v.dedup();
    v
}

/// The extent of the tile at `start` (one of `starts`) along an axis of `len`.
fn extent(start: usize, starts: &[usize], len: usize, tile: usize) -> usize {
    if starts.last() == Some(&start) {
        len - start
    } else {
        tile
    }
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

/// The model's self-ensemble over one tile ([`average_views`]), stopping before a pass once
/// `cancelled()` says so.
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
    use tch::{Device, Kind};

    use crate::tiny_ffdnet;

    /// The largest absolute difference between two outputs.
    fn max_gap(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn starts_cover_the_axis() {
        let _rng = crate::test_rng_lock();
        assert_eq!(starts(100, 128, 16, 1), vec![0]);
        assert_eq!(starts(300, 128, 32, 1), vec![0, 96, 172]);
        assert_eq!(starts(256, 128, 0, 1), vec![0, 128]);
        // On a model's grid of 8: the last tile starts at 168 and runs 132 pixels to the end.
        assert_eq!(starts(300, 128, 32, 8), vec![0, 96, 168]);
        assert_eq!(extent(168, &[0, 96, 168], 300, 128), 132);
        assert_eq!(extent(96, &[0, 96, 168], 300, 128), 128);
        // A step that is not on the grid is shortened to it.
        assert_eq!(starts(300, 128, 30, 8), vec![0, 96, 168]);
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
        let max = max_gap(&whole, &tiled);
        assert!(max < 1e-4, "max difference {max}");
    }

    #[test]
    fn tiles_keep_a_downsampling_models_grid() {
        let _rng = crate::test_rng_lock();
        // FFDNet works on the 2x2 sub-images: a tile starting on an odd row would see other
        // sub-images than the whole image does. 75 rows in tiles of 48 would end flush at 27.
        let model = tiny_ffdnet();
        let (c, h, w) = (3usize, 75usize, 61usize);
        let img = Tensor::rand([(c * h * w) as i64], (Kind::Float, Device::Cpu));
        let img: Vec<f32> = Vec::try_from(&img).unwrap();
        let sigma = vec![25.0f32 / 255.0; h * w];
        let run = |tile| {
            let cfg = TileConfig {
                tile,
                overlap: 32,
                ensemble: 1,
            };
            denoise_tiled(&model, &img, Some(&sigma), (c, h, w), cfg, &mut |_, _| {}).unwrap()
        };
        let (whole, tiled) = (run(0), run(48));
        // Three layers at half resolution reach 6 pixels, inside the 8 pixels next to a
        // tile's inner edge that blending ignores.
        let max = max_gap(&whole, &tiled);
        assert!(max < 1e-4, "max difference {max}");
    }
}
