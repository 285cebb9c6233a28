//! Denoising an image with a saved model, the one way the CLI, the web app and a user's own
//! program do it: [`Denoiser`] loads a model from where it comes from ([`ModelSource`]) onto a
//! device at a precision ([`PrecisionPolicy`]) and with a way of cutting images
//! ([`Settings`]), and denoises an image at a noise level (blind, given or a map), with its
//! self-ensemble, progress and cancellation ([`Job`]). [`denoise_image`] is the same for a
//! model already built: the channel conversion, the noise level ([`crate::level`]) and the
//! tiler ([`crate::tile`]) put together.

use crate::artefact::Metadata;
use crate::config::ensure;
use crate::level::{LevelUsed, NoiseLevel, model_map};
use crate::source::ModelSource;
use crate::tile::{TileConfig, denoise_tiled_cancellable, never, tile_for_budget};
use crate::{Model, Precision, Result};
use denoise_data::Image;
use tch::Device;

/// The precision a [`Denoiser`] runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionPolicy {
    /// bf16 where the hardware does it natively and the model's recorded bf16 loss, shared
    /// over the self-ensemble's passes, is small ([`Metadata::auto_precision`]); else fp32.
    Auto,
    /// This precision whatever the model and the hardware.
    Fixed(Precision),
}

impl PrecisionPolicy {
    /// The precision for `metadata`'s model on `device` with `passes` per tile.
    pub fn resolve(self, metadata: &Metadata, device: Device, passes: usize) -> Precision {
        match self {
            PrecisionPolicy::Auto => metadata.auto_precision(device, passes),
            PrecisionPolicy::Fixed(precision) => precision,
        }
    }
}

/// How a [`Denoiser`] runs: where, at what precision, and how it cuts images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub device: Device,
    pub precision: PrecisionPolicy,
    /// Tile side in pixels, overlap included (0: whole images); `None` sizes it so that one
    /// tile's activations fit `max_mem_mb` ([`tile_for_budget`]).
    pub tile: Option<usize>,
    pub max_mem_mb: usize,
    /// Pixels shared by neighbouring tiles, blended.
    pub overlap: usize,
    /// Self-ensemble passes per tile (see [`TileConfig::ensemble`]) unless a [`Job`] asks for
    /// others; [`PrecisionPolicy::Auto`] decides with these.
    pub ensemble: usize,
}

impl Default for Settings {
    /// The CPU, automatic precision, tiles for 1 GB of activations over 32-pixel overlaps, one
    /// pass.
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: PrecisionPolicy::Auto,
            tile: None,
            max_mem_mb: 1024,
            overlap: 32,
            ensemble: 1,
        }
    }
}

/// What one call of [`Denoiser::denoise`] may add to the denoiser's settings.
#[derive(Default)]
pub struct Job<'a> {
    /// Self-ensemble passes for this image instead of the denoiser's (a server's requests
    /// choose theirs).
    pub ensemble: Option<usize>,
    /// Called with `(done, total)` after each pass over a tile.
    pub progress: Option<&'a mut dyn FnMut(usize, usize)>,
    /// Called before each pass over a tile; once it answers true, the call stops with
    /// [`crate::ModelError::Cancelled`].
    pub cancelled: Option<&'a dyn Fn() -> bool>,
}

/// A loaded model ready to denoise images: device, precision and tiling decided once.
#[derive(Debug)]
pub struct Denoiser {
    model: Model,
    metadata: Metadata,
    source: ModelSource,
    tiles: TileConfig,
    /// Blind, pictures whose noise is white go to this model ([`Self::with_white_noise_model`]).
    white: Option<Box<Denoiser>>,
}

impl Denoiser {
    /// Loads `source` (a run directory as its `model.safetensors`) and sets it up as
    /// `settings` say.
    pub fn load(source: &ModelSource, settings: &Settings) -> Result<Self> {
        let source = source.resolved()?;
        let (mut model, metadata) = source.load(settings.device)?;
        model.set_precision(settings.precision.resolve(
            &metadata,
            settings.device,
            settings.ensemble,
        ));
        let tile = settings
            .tile
            .unwrap_or_else(|| tile_for_budget(&model, settings.max_mem_mb));
        Ok(Self {
            model,
            metadata,
            source,
            tiles: TileConfig {
                tile,
                overlap: settings.overlap,
                ensemble: settings.ensemble,
            },
            white: None,
        })
    }

    /// Pairs this model, one that reads the noise level itself, with `white`, a model given
    /// the level: blind, a picture whose noise is white in space and colour (the classical
    /// estimate's check, [`denoise_data::estimate::white_noise_estimate`]) goes to `white` at
    /// the classical level, and any other to this model, which reads the level itself. A
    /// network trained on synthetic white noise in 8-bit files learns to undo its clipping,
    /// which darkens real camera files' shadows: the two kinds of noise want two networks.
    /// `white` is taken to be such a network: its level by brightness never falls toward white,
    /// where clipping took noise away ([`denoise_data::estimate::NoiseLevelFunction::rising`]).
    /// Refused where [`crate::ModelConfig::white_noise_pair_problem`] names a problem.
    pub fn with_white_noise_model(mut self, white: Denoiser) -> Result<Self> {
        let problem = self
            .model
            .config()
            .white_noise_pair_problem(white.model.config());
        ensure(problem.is_none(), || {
            format!(
                "'{}' with '{}' as its white-noise model: {}",
                self.source,
                white.source,
                problem.unwrap_or_default()
            )
        })?;
        self.white = Some(Box::new(white));
        Ok(self)
    }

    /// The model paired for white noise, if any.
    pub fn white_noise_model(&self) -> Option<&Denoiser> {
        self.white.as_deref()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Where the model came from (a run directory is its `model.safetensors`).
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// How images are cut, and the passes per tile unless a [`Job`] asks for others.
    pub fn tiles(&self) -> TileConfig {
        self.tiles
    }

    /// Denoises `image` at `level` ([`denoise_image`], with the job's progress, cancellation
    /// and self-ensemble). Returns the result (not clipped) and the level used, for models that
    /// take one and were not given a map.
    ///
    /// # Shapes
    /// `image`: C x H x W with C = 1 or 3; the result has the same shape. A
    /// [`NoiseLevel::Map`] holds H x W values.
    pub fn denoise(
        &self,
        image: &Image,
        level: NoiseLevel<'_>,
        job: Job<'_>,
    ) -> Result<(Image, Option<LevelUsed>)> {
        let passes = job.ensemble.unwrap_or(self.tiles.ensemble);
        let tiles = TileConfig {
            ensemble: passes,
            ..self.tiles
        };
        let mut quiet = |_, _| {};
        let progress = job.progress.unwrap_or(&mut quiet);
        let cancelled = job.cancelled.unwrap_or(&never);
        let Some(white) = self
            .white
            .as_deref()
            .filter(|_| level == NoiseLevel::Estimate)
        else {
            return denoise_image_cancellable(
                &self.model,
                image,
                level,
                tiles,
                progress,
                cancelled,
            );
        };
        match crate::level::white_map(white.model.config(), image, true) {
            Some((map, used)) => {
                let tiles = TileConfig {
                    ensemble: passes,
                    ..white.tiles
                };
                let used = LevelUsed {
                    by_white_model: true,
                    ..used
                };
                let prepared = (Some(map), Some(used));
                denoise_prepared(&white.model, image, prepared, tiles, progress, cancelled)
            }
            // Not white: this model reads the level, as `model_map` leaves it to.
            None => denoise_prepared(&self.model, image, (None, None), tiles, progress, cancelled),
        }
    }
}

/// Denoises an image with `model`: converts gray <-> colour explicitly when the model wants the
/// other (and back), builds the noise-level map ([`model_map`]), and runs the tiler
/// ([`crate::tile::denoise_tiled`]). Returns the result (not clipped) and the level used, for
/// models that take one and were not given a map.
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
    let prepared = model_map(model.config(), image, level);
    denoise_prepared(model, image, prepared, cfg, progress, cancelled)
}

/// [`denoise_image_cancellable`] with the map and the level used already made.
fn denoise_prepared(
    model: &Model,
    image: &Image,
    (map, used): (Option<Vec<f32>>, Option<LevelUsed>),
    cfg: TileConfig,
    progress: &mut dyn FnMut(usize, usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<(Image, Option<LevelUsed>)> {
    let input = image.to_channels(model.config().channels() as usize)?;
    let (c, h, w) = input.shape();
    // Blind, a model with its own estimator reads the level as it denoises: report that read.
    let used = match used {
        None if map.is_none() => crate::level::read_by_model(model, image, &input)?,
        given => given,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelError;
    use crate::level::conversion_noise_gain;
    use crate::tile::denoise_tiled;
    use denoise_data::estimate::{self, NoiseEstimate};
    use tch::Device;

    use crate::tiny_ffdnet;

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
    fn the_image_level_entry_passes_the_cancellation_check_on() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        let img = Image::from_fn(3, 20, 30, |c, y, x| ((c + y + x) % 5) as f32 / 5.0);
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let level = NoiseLevel::Uniform(20.0);
        let stopped =
            denoise_image_cancellable(&model, &img, level, whole, &mut |_, _| {}, &|| true);
        assert!(matches!(stopped, Err(ModelError::Cancelled)), "{stopped:?}");
        let run = denoise_image_cancellable(&model, &img, level, whole, &mut |_, _| {}, &|| false);
        assert!(run.is_ok());
    }

    #[test]
    fn a_denoiser_runs_as_its_settings_and_jobs_say() {
        let _rng = crate::test_rng_lock();
        let model = tiny_ffdnet();
        let bytes = crate::artefact::to_bytes(&model, &Metadata::new(model.config())).unwrap();
        let source = ModelSource::BuiltIn {
            name: "tiny".into(),
            bytes: Box::leak(bytes.into_boxed_slice()),
        };
        let settings = Settings {
            tile: Some(24),
            overlap: 8,
            ensemble: 2,
            precision: PrecisionPolicy::Fixed(Precision::Fp32),
            ..Settings::default()
        };
        let denoiser = Denoiser::load(&source, &settings).unwrap();
        assert_eq!(denoiser.source(), &source);
        let expected = TileConfig {
            tile: 24,
            overlap: 8,
            ensemble: 2,
        };
        assert_eq!(denoiser.tiles(), expected);
        let img = Image::from_fn(3, 40, 40, |c, y, x| ((c + 2 * y + x) % 7) as f32 / 7.0);
        let level = NoiseLevel::Uniform(20.0);
        // The same as the image-level call with the same tiles, passes reported.
        let mut steps = Vec::new();
        let job = Job {
            progress: Some(&mut |done, total| steps.push((done, total))),
            ..Job::default()
        };
        let (out, used) = denoiser.denoise(&img, level, job).unwrap();
        let quiet = &mut |_, _| {};
        let (direct, _) = denoise_image(denoiser.model(), &img, level, expected, quiet).unwrap();
        assert!(out.data() == direct.data());
        assert_eq!(used, Some(LevelUsed::uniform(20.0)));
        assert_eq!(steps.last(), Some(&(8, 8)), "four tiles of two passes");
        // A job's self-ensemble replaces the settings', and its check can stop the run.
        let mut total = 0;
        let job = Job {
            ensemble: Some(4),
            progress: Some(&mut |_, t| total = t),
            ..Job::default()
        };
        denoiser.denoise(&img, level, job).unwrap();
        assert_eq!(total, 16);
        let job = Job {
            cancelled: Some(&|| true),
            ..Job::default()
        };
        let stopped = denoiser.denoise(&img, level, job);
        assert!(matches!(stopped, Err(ModelError::Cancelled)), "{stopped:?}");
        // Automatic precision is fp32 for a model with no recorded bf16 loss.
        let auto = Denoiser::load(&source, &Settings::default()).unwrap();
        assert_eq!(auto.model().precision(), Precision::Fp32);
        assert_eq!(auto.tiles().tile, tile_for_budget(auto.model(), 1024));
    }

    /// `model` as a [`Denoiser`] built into the program, fp32, untiled.
    fn loaded(model: &Model, name: &str) -> Denoiser {
        let bytes = crate::artefact::to_bytes(model, &Metadata::new(model.config())).unwrap();
        let source = ModelSource::BuiltIn {
            name: name.into(),
            bytes: Box::leak(bytes.into_boxed_slice()),
        };
        let settings = Settings {
            tile: Some(0),
            precision: PrecisionPolicy::Fixed(Precision::Fp32),
            ..Settings::default()
        };
        Denoiser::load(&source, &settings).unwrap()
    }

    #[test]
    fn blind_white_noise_goes_to_the_paired_model_and_other_noise_to_the_reader() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(5);
        let cfg: crate::ModelConfig = serde_json::from_str(
            r#"{"kind":"ffdnet","depth":3,"features":8,"estimator":{"depth":2,"features":4}}"#,
        )
        .unwrap();
        let reader = Model::new(&cfg, Device::Cpu).unwrap();
        let plain = tiny_ffdnet();
        let clean = Image::from_fn(3, 96, 128, |c, y, x| {
            0.2 + 0.5 * x as f32 / 128.0 + 0.1 * ((y / 8 + c) % 3) as f32
        });
        let noisy = |spec: &str| {
            let spec: denoise_data::noise::NoiseSpec = spec.parse().unwrap();
            spec.apply(&clean, 7).image
        };
        let (white, camera) = (noisy("gaussian:25+round"), noisy("camera:iso=3200"));
        let paired = loaded(&reader, "reader")
            .with_white_noise_model(loaded(&plain, "plain"))
            .unwrap();
        assert!(paired.white_noise_model().is_some());
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let quiet = &mut |_, _| {};
        let run = |image: &Image, level| paired.denoise(image, level, Job::default()).unwrap();
        // White noise: the paired model at the classical level, and the level says so.
        let (out, used) = run(&white, NoiseLevel::Estimate);
        let (map, level) = crate::level::white_map(plain.config(), &white, true).unwrap();
        let (direct, _) =
            denoise_image(&plain, &white, NoiseLevel::Map(&map), whole, quiet).unwrap();
        assert!(out.data() == direct.data());
        let used = used.unwrap();
        assert!(used.by_white_model && !used.by_model, "{used:?}");
        assert_eq!(used.sigma, level.sigma);
        // Camera noise, a gray picture stored as RGB, or a level given: the reader, as alone.
        let gray = white.to_gray().to_rgb();
        for (image, level) in [
            (&camera, NoiseLevel::Estimate),
            (&gray, NoiseLevel::Estimate),
            (&white, NoiseLevel::Uniform(25.0)),
        ] {
            let (out, used) = run(image, level);
            let (alone, alone_used) = denoise_image(&reader, image, level, whole, quiet).unwrap();
            assert!(out.data() == alone.data());
            assert_eq!(used, alone_used);
            assert!(!used.is_some_and(|u| u.by_white_model));
        }
        // Pairings that cannot work are refused.
        let refused = |a: &Model, b: &Model| {
            loaded(a, "a")
                .with_white_noise_model(loaded(b, "b"))
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&plain, &plain).contains("reads the noise level itself"));
        assert!(refused(&reader, &reader).contains("must take one, and not read its own"));
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
}
