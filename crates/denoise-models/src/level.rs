//! The noise-level policy: what level a model that takes one is told for an image (given,
//! estimated from the image, or a per-pixel map), scaled for a gray <-> colour conversion, and
//! what is reported of it.

use crate::{Model, ModelConfig, Result};
use denoise_data::Image;
use denoise_data::estimate::{self, NoiseEstimate};
use tch::{Kind, Tensor};

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
    /// The level given or estimated; for a map (estimated from brightness, or read by the
    /// model), its root mean square over the pixels.
    pub sigma: f32,
    /// The least and the greatest level of a map; `None` for one level.
    pub range: Option<(f32, f32)>,
    /// Estimated for noise the colour channels share (`NoiseEstimate::Shared`): Immerkær's
    /// filter, which also reads texture, so the level is least sure.
    pub shared: bool,
    /// Read by the model's own estimator, over the whole image in one reading (its map can
    /// follow anything the estimator learnt: brightness, texture, JPEG blocks), not by the
    /// classical estimators.
    pub by_model: bool,
    /// Blind, the noise was found white and the picture went to the white-noise model paired
    /// with this one ([`crate::Denoiser::with_white_noise_model`]), at this classical level.
    pub by_white_model: bool,
}

impl LevelUsed {
    pub(crate) fn uniform(sigma: f32) -> Self {
        Self {
            sigma,
            range: None,
            shared: false,
            by_model: false,
            by_white_model: false,
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
            by_model: false,
            by_white_model: false,
        }
    }
}

impl std::fmt::Display for LevelUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}", self.sigma)?;
        match (self.range, self.by_model) {
            (Some((lo, hi)), false) => write!(f, " (from {lo:.1} to {hi:.1} with brightness)"),
            (Some((lo, hi)), true) => {
                write!(
                    f,
                    ", read by the model (from {lo:.1} to {hi:.1} across the image)"
                )
            }
            (None, true) => write!(f, ", read by the model"),
            (None, false) => Ok(()),
        }
    }
}

/// A gray picture stored as RGB (a scan, a black-and-white photo) has its noise in every
/// channel alike, as a gray image shown to a colour model: its level is read as gray. Only a
/// model given a noise level needs to know (the scan is the image's size).
fn gray_rgb(config: &ModelConfig, image: &Image) -> bool {
    config.noise_map()
        && image.channels() == 3
        && config.channels() == 3
        && image.is_gray_within(GRAY_SPREAD)
}

/// What the image's own noise level (`channels` of them, `gray_rgb` as [`gray_rgb`] says) is
/// multiplied by in the map a model of `config` is given.
fn map_gain(config: &ModelConfig, channels: usize, gray_rgb: bool) -> f32 {
    if gray_rgb {
        conversion_noise_gain(1, 3)
    } else {
        conversion_noise_gain(channels, config.channels() as usize)
    }
}

/// The map a model of `config` is given for `image` (on the `[0, 1]` scale, `h x w`, as the
/// model sees the image once converted to its channels; `None` for a model that takes no level
/// or reads it itself), and the level used, when the model was not given a map.
///
/// Noise levels, given or estimated, are the image's own (per channel, as it comes in). The map
/// is that level times [`conversion_noise_gain`] when the image is converted: a colour model
/// shown a gray image sees the same noise in all three channels, which it reads as it would
/// independent noise sqrt(3) times stronger.
pub fn model_map(
    config: &ModelConfig,
    image: &Image,
    level: NoiseLevel<'_>,
) -> (Option<Vec<f32>>, Option<LevelUsed>) {
    let (_, h, w) = image.shape();
    let gray_rgb = gray_rgb(config, image);
    let gain = map_gain(config, image.channels(), gray_rgb);
    match (config.noise_map(), level) {
        (false, _) => (None, None),
        (true, NoiseLevel::Map(map)) => (Some(map.iter().map(|s| s * gain).collect()), None),
        (true, NoiseLevel::Uniform(s)) => (
            Some(vec![s / 255.0 * gain; h * w]),
            Some(LevelUsed::uniform(s)),
        ),
        // A model that reads the level itself is given a map only for noise white in space
        // and colour, which the classical estimate measures closely (the model's reader was
        // trained mostly on camera noise and reads low white noise as such).
        (true, NoiseLevel::Estimate) if config.estimates_level() => {
            match white_map(config, image, false) {
                Some((map, used)) => (Some(map), Some(used)),
                None => (None, None),
            }
        }
        (true, NoiseLevel::Estimate) => {
            // A colour picture shown to a gray model gets 0.669 times the estimate; for noise
            // the channels share (`NoiseEstimate::Shared`, already 1.4 times the filter) that
            // is about the filter's level, which is what fully shared noise keeps in gray.
            let estimate = if gray_rgb {
                NoiseEstimate::Uniform(estimate::estimate_sigma(&image.to_gray()))
            } else {
                estimate::estimate_noise(image)
            };
            given_estimate(image, estimate, gain)
        }
    }
}

/// The classical map a model of `config` is given for `image` (as [`model_map`]), and the level
/// used, when the noise is white in space and colour ([`estimate::white_noise_estimate`]);
/// `None` for other noise and for a gray picture stored as RGB. `before_clipping`: a level by
/// brightness never falls toward white ([`estimate::NoiseLevelFunction::rising`]), for a model
/// trained on clipped noise at its level before clipping.
pub(crate) fn white_map(
    config: &ModelConfig,
    image: &Image,
    before_clipping: bool,
) -> Option<(Vec<f32>, LevelUsed)> {
    if gray_rgb(config, image) {
        return None;
    }
    let estimate = match estimate::white_noise_estimate(image)? {
        NoiseEstimate::Brightness(nlf) if before_clipping => {
            NoiseEstimate::Brightness(nlf.rising())
        }
        other => other,
    };
    let gain = map_gain(config, image.channels(), false);
    match given_estimate(image, estimate, gain) {
        (Some(map), Some(used)) => Some((map, used)),
        _ => None,
    }
}

/// The map (times `gain`) and the level used for a classical `estimate` of `image`'s noise.
fn given_estimate(
    image: &Image,
    estimate: NoiseEstimate,
    gain: f32,
) -> (Option<Vec<f32>>, Option<LevelUsed>) {
    let (_, h, w) = image.shape();
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

/// Rows of an image a model's estimator reads at once (rounded up to its alignment): a
/// 24-megapixel photo's level costs a strip's memory, not the whole image's.
const READ_ROWS: usize = 512;

/// What a model with its own estimator reads from `image` (`input`: the image in the model's
/// channels, as it denoises it), summarised: the root mean square, least and greatest of its
/// map, on the 0-255 scale and in the image's own terms, as `--sigma` takes a level (the
/// reading of a gray picture shown to a colour model is divided by the gain [`model_map`]
/// would apply). `None` for other models.
pub(crate) fn read_by_model(
    model: &Model,
    image: &Image,
    input: &Image,
) -> Result<Option<LevelUsed>> {
    read_in_strips(model, image, input, READ_ROWS)
}

fn read_in_strips(
    model: &Model,
    image: &Image,
    input: &Image,
    rows: usize,
) -> Result<Option<LevelUsed>> {
    let config = model.config();
    let Some((context, align)) = config.estimator_view() else {
        return Ok(None);
    };
    let gain = f64::from(map_gain(config, image.channels(), gray_rgb(config, image)));
    let rows = rows.div_ceil(align) * align;
    let (c, h, w) = input.shape();
    let (mut sum_sq, mut count) = (0f64, 0f64);
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for start in (0..h).step_by(rows) {
        // Beyond the estimator's view each side, so the strips join as one pass would.
        let from = start.saturating_sub(context);
        let to = (start + rows + context).min(h);
        let strip: Vec<f32> = (0..c)
            .flat_map(|ch| &input.data()[(ch * h + from) * w..(ch * h + to) * w])
            .copied()
            .collect();
        let strip = Tensor::from_slice(&strip).view([1, c as i64, (to - from) as i64, w as i64]);
        let Some(level) = model.read_level(&strip)? else {
            return Ok(None);
        };
        // The strip's own rows, at the level's resolution.
        let k = (to - from).div_ceil(level.size()[2].max(1) as usize).max(1);
        let first = ((start - from) / k) as i64;
        let own = (rows.min(h - start).div_ceil(k) as i64).min(level.size()[2] - first);
        let own = level.narrow(2, first, own);
        sum_sq += own.square().sum(Kind::Double).double_value(&[]);
        count += own.numel() as f64;
        lo = lo.min(own.min().double_value(&[]));
        hi = hi.max(own.max().double_value(&[]));
    }
    if count == 0.0 {
        return Ok(None);
    }
    let scale = 255.0 / gain;
    Ok(Some(LevelUsed {
        sigma: ((sum_sq / count).sqrt() * scale) as f32,
        range: Some(((lo.min(hi) * scale) as f32, (hi * scale) as f32)),
        shared: false,
        by_model: true,
        by_white_model: false,
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A small FFDNet whose estimator (of `estimator`'s JSON) has random weights, so that its
    /// reading varies across the image (a fresh estimator reads one level everywhere).
    fn reader_with(estimator: &str) -> Model {
        tch::manual_seed(5);
        let json = format!(r#"{{"kind":"ffdnet","depth":3,"features":8,"estimator":{estimator}}}"#);
        let cfg: ModelConfig = serde_json::from_str(&json).unwrap();
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        tch::no_grad(|| {
            for (name, mut var) in model.var_store().variables() {
                if name.starts_with("estimator") {
                    var.copy_(&(var.randn_like() * 0.5));
                }
            }
        });
        model
    }

    fn reader() -> Model {
        reader_with(r#"{"depth":2,"features":4,"smooth":3}"#)
    }

    fn picture(h: usize, w: usize) -> Image {
        let data = (0..3 * h * w)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 + (i / w % 17) as f32 / 40.0).min(1.0))
            .collect();
        Image::new(3, h, w, data).unwrap()
    }

    #[test]
    fn strips_read_what_one_pass_reads() {
        let _rng = crate::test_rng_lock();
        // Odd height: the last strip is short and ends in a padded row.
        let image = picture(203, 30);
        for estimator in [
            r#"{"depth":2,"features":4,"smooth":3}"#,
            r#"{"depth":3,"features":4,"smooth":5,"fold":2}"#,
            r#"{"depth":2,"features":4,"smooth":7,"fold":3}"#,
        ] {
            let model = reader_with(estimator);
            let read = |rows| {
                read_in_strips(&model, &image, &image, rows)
                    .unwrap()
                    .unwrap()
            };
            let whole = read(1 << 20);
            let strips = read(32);
            let (lo, hi) = whole.range.unwrap();
            assert!(
                hi - lo > 0.5,
                "{estimator}: the reading should vary: {whole:?}"
            );
            assert!(
                (whole.sigma - strips.sigma).abs() < 1e-3,
                "{estimator}: {whole:?} vs {strips:?}"
            );
            let (slo, shi) = strips.range.unwrap();
            assert!(
                (lo - slo).abs() < 1e-3 && (hi - shi).abs() < 1e-3,
                "{estimator}: {whole:?} vs {strips:?}"
            );
            assert!(strips.by_model);
        }
    }

    #[test]
    fn a_gray_pictures_reading_is_given_in_its_own_terms() {
        let _rng = crate::test_rng_lock();
        let model = reader();
        let colour = picture(40, 36);
        let gray = colour.to_gray();
        let rgb = gray.to_channels(3).unwrap();
        let raw = model
            .read_level(&Tensor::from_slice(rgb.data()).view([1, 3, 40, 36]))
            .unwrap()
            .unwrap();
        let raw = raw.square().mean(Kind::Double).sqrt().double_value(&[]) * 255.0;
        // Gray, or gray stored as RGB: what the model read over sqrt(3), as --sigma takes it.
        for image in [&gray, &rgb] {
            let used = read_by_model(&model, image, &rgb).unwrap().unwrap();
            let expected = raw / 3f64.sqrt();
            assert!(
                (f64::from(used.sigma) - expected).abs() < 1e-3,
                "{} vs {expected}",
                used.sigma
            );
        }
    }

    #[test]
    fn blind_denoising_reports_the_models_own_reading() {
        let _rng = crate::test_rng_lock();
        let model = reader();
        let image = picture(40, 36);
        let tiles = crate::tile::TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let (_, used) = crate::denoiser::denoise_image(
            &model,
            &image,
            NoiseLevel::Estimate,
            tiles,
            &mut |_, _| {},
        )
        .unwrap();
        let used = used.expect("a blind estimator model reports what it read");
        assert_eq!(Some(used), read_by_model(&model, &image, &image).unwrap());
        assert!(
            used.to_string().contains("read by the model (from"),
            "{used}"
        );
        // Given a level, it reports that level, not its reading.
        let (_, given) = crate::denoiser::denoise_image(
            &model,
            &image,
            NoiseLevel::Uniform(12.0),
            tiles,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(given, Some(LevelUsed::uniform(12.0)));
    }

    #[test]
    fn a_reader_is_given_the_classical_level_only_for_white_noise() {
        let _rng = crate::test_rng_lock();
        let model = reader();
        let config = model.config();
        let clean = Image::from_fn(3, 96, 128, |c, y, x| {
            0.2 + 0.5 * x as f32 / 128.0 + 0.1 * ((y / 8 + c) % 3) as f32
        });
        let noisy = |spec: &str| {
            let spec: denoise_data::noise::NoiseSpec = spec.parse().unwrap();
            spec.apply(&clean, 7).image
        };
        let white = noisy("gaussian:25+round");
        let (map, used) = model_map(config, &white, NoiseLevel::Estimate);
        let used = used.expect("white noise: the classical level is used");
        assert!(map.is_some() && !used.by_model, "{used:?}");
        assert!((used.sigma - 25.0).abs() < 2.5, "{used:?}");
        // Camera noise, and a gray picture stored as RGB: the model reads the level itself.
        for image in [noisy("camera:iso=3200"), white.to_gray().to_rgb()] {
            assert_eq!(
                model_map(config, &image, NoiseLevel::Estimate),
                (None, None)
            );
        }
    }

    #[test]
    fn a_model_without_an_estimator_reads_nothing() {
        let _rng = crate::test_rng_lock();
        let model = crate::tiny_ffdnet();
        let image = picture(8, 8);
        assert_eq!(read_by_model(&model, &image, &image).unwrap(), None);
    }
}
