//! The models a server offers: their public description ([`ModelInfo`], read from artefact
//! headers without loading weights) and [`Denoiser`], a loaded model that denoises one image.

use crate::config::{ModelEntry, Strength};
use crate::{Result, ServeError};
use denoise_data::Image;
use denoise_models::denoiser::{Job, PrecisionPolicy, Settings};
use denoise_models::tile::{LevelUsed, NoiseLevel};
use denoise_models::{ModelSource, Precision, artefact};
use serde::Serialize;

/// What `GET /api/models` says about a model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// Network kind (`ffdnet`, `dncnn`, ...).
    pub kind: String,
    /// 1 (gray) or 3 (colour); other images are converted and back.
    pub channels: i64,
    /// Whether `sigma` changes the result (the model takes a noise-level map).
    pub takes_sigma: bool,
    /// Whether, blind, the model reads the level itself (all but white noise, which gets the
    /// classical estimate).
    pub reads_level: bool,
    /// The noise it was trained on, as a `denoise-data` spec.
    pub trained_on: Option<String>,
    /// Its best validation PSNR in dB, if recorded.
    pub val_psnr: Option<f64>,
}

impl ModelInfo {
    /// Reads the artefact header of `entry` (no weights).
    pub fn read(entry: &ModelEntry) -> Result<Self> {
        let meta = artefact::read_metadata(&entry.path).map_err(|cause| ServeError::LoadModel {
            name: entry.name.clone(),
            path: entry.path.clone(),
            cause,
        })?;
        Ok(Self {
            name: entry.name.clone(),
            kind: meta.model.kind().to_string(),
            channels: meta.model.channels(),
            takes_sigma: meta.model.noise_map(),
            reads_level: meta.model.estimates_level(),
            trained_on: meta.noise,
            val_psnr: meta.val_psnr,
        })
    }
}

/// Blend width between tiles, in pixels.
const OVERLAP: usize = 32;

/// A loaded model, owned by one worker thread: the library's [`denoise_models::Denoiser`] at
/// fp32, since each request picks its own number of passes and an answer should not depend on
/// which worker loaded the model.
pub struct Denoiser {
    inner: denoise_models::Denoiser,
}

impl Denoiser {
    /// Loads `entry` onto `device` at fp32. `tile` is the tile side (0: whole images).
    pub fn load(entry: &ModelEntry, device: tch::Device, tile: usize) -> Result<Self> {
        let settings = Settings {
            device,
            precision: PrecisionPolicy::Fixed(Precision::Fp32),
            tile: Some(tile),
            overlap: OVERLAP,
            ..Settings::default()
        };
        let failed = |path: &std::path::Path| {
            let (name, path) = (entry.name.clone(), path.to_path_buf());
            move |cause| ServeError::LoadModel { name, path, cause }
        };
        let load = |path: &std::path::Path| {
            denoise_models::Denoiser::load(&ModelSource::Path(path.to_path_buf()), &settings)
                .map_err(failed(path))
        };
        let mut inner = load(&entry.path)?;
        if let Some(white) = &entry.white {
            inner = inner
                .with_white_noise_model(load(white)?)
                .map_err(failed(white))?;
        }
        Ok(Self { inner })
    }

    /// Denoises `image`, converting gray <-> colour when the model wants the other (and back),
    /// averaging `ensemble` passes per tile (flipped, turned and shifted; see
    /// `denoise_models::tile::VIEWS`), and calling
    /// `progress(tiles_done, tiles_total)` as it goes, and stopping with
    /// [`ServeError::Cancelled`] once `cancelled()` answers true before a pass. Returns the
    /// result (not clipped) and the level used (estimated when `strength` is blind) for models
    /// that take one.
    ///
    /// # Shapes
    /// `image`: C x H x W with C = 1 or 3; the result has the same shape.
    pub fn denoise(
        &self,
        image: &Image,
        strength: Strength,
        ensemble: usize,
        progress: &mut dyn FnMut(usize, usize),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Image, Option<LevelUsed>)> {
        let level = match strength {
            Strength::Fixed(s) => NoiseLevel::Uniform(s),
            Strength::Blind => NoiseLevel::Estimate,
        };
        let job = Job {
            ensemble: Some(ensemble),
            progress: Some(progress),
            cancelled: Some(cancelled),
        };
        Ok(self.inner.denoise(image, level, job)?)
    }
}
