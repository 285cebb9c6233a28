//! The flags that load and run a model (`--precision`, `--ensemble`, `--sigma`) and
//! [`Runner`], the model they load: the inference façade of `denoise-models` under the CLI's
//! model lookup, with the line `infer` and `eval` print about it.

use crate::lookup::{resolve_model, white_noise_model};
use anyhow::Result;
use denoise_models::tile::TileConfig;
use denoise_models::{
    Denoiser, Job, LevelUsed, ModelSource, NoiseLevel, Precision, PrecisionPolicy, Settings,
};

/// `--precision`. `auto` runs bf16 only where the hardware does bf16 natively and the model's
/// metadata records a bf16 PSNR loss (`eval --record-bf16` measures it) that, divided by the
/// self-ensemble's passes, is under 0.05 dB; see
/// `denoise_models::artefact::Metadata::auto_precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Auto,
    Fp32,
    Bf16,
}

impl PrecisionArg {
    pub fn policy(self) -> PrecisionPolicy {
        match self {
            PrecisionArg::Auto => PrecisionPolicy::Auto,
            PrecisionArg::Fp32 => PrecisionPolicy::Fixed(Precision::Fp32),
            PrecisionArg::Bf16 => PrecisionPolicy::Fixed(Precision::Bf16),
        }
    }
}

/// A model loaded from `--model` as the flags say, ready to denoise images.
pub struct Runner {
    denoiser: Denoiser,
}

/// `--ensemble`: one of the sizes the tiler takes.
pub fn parse_ensemble(s: &str) -> Result<usize, String> {
    denoise_models::ensemble::ensemble_size(s).ok_or_else(|| {
        format!(
            "'{s}' is not one of {:?}",
            denoise_models::ensemble::ENSEMBLE_SIZES
        )
    })
}

/// How the noise level reaches models that take one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sigma {
    /// Not given, or `--sigma auto`: estimated for models that take a level (blind use).
    Blind,
    /// A fixed level on the 0-255 scale.
    Fixed(f32),
}

impl Sigma {
    /// The level the model is told.
    pub fn level(self) -> NoiseLevel<'static> {
        match self {
            Sigma::Fixed(s) => NoiseLevel::Uniform(s),
            Sigma::Blind => NoiseLevel::Estimate,
        }
    }
}

impl std::str::FromStr for Sigma {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Sigma::Blind);
        }
        let v: f32 = s
            .parse()
            .map_err(|_| format!("'{s}' is not a number or 'auto'"))?;
        if !(0.0..=255.0).contains(&v) {
            return Err(format!("sigma must be in 0-255, got {v}"));
        }
        Ok(Sigma::Fixed(v))
    }
}

impl Runner {
    /// Loads `--model` (`spec`; the default when `None`) as `settings` say, with the
    /// white-noise model it pairs with, if any ([`white_noise_model`]).
    pub fn load(spec: Option<&str>, settings: &Settings) -> Result<Self> {
        Self::load_as(spec, settings, true)
    }

    /// [`Self::load`], without the white-noise model when `paired` is false (what is measured
    /// is then this one model).
    pub fn load_as(spec: Option<&str>, settings: &Settings, paired: bool) -> Result<Self> {
        let path = resolve_model(spec)?;
        let mut denoiser = Denoiser::load(&ModelSource::Path(path), settings)?;
        let white = if paired {
            white_noise_model(spec)?
        } else {
            None
        };
        if let Some(white) = white {
            denoiser = denoiser
                .with_white_noise_model(Denoiser::load(&ModelSource::Path(white), settings)?)?;
        }
        Ok(Self { denoiser })
    }

    pub fn model(&self) -> &denoise_models::Model {
        self.denoiser.model()
    }

    pub fn metadata(&self) -> &denoise_models::Metadata {
        self.denoiser.metadata()
    }

    /// The model's file (a run directory's `model.safetensors`).
    pub fn source(&self) -> &ModelSource {
        self.denoiser.source()
    }

    pub fn tiles(&self) -> TileConfig {
        self.denoiser.tiles()
    }

    /// One line describing the model and what it was trained on.
    pub fn describe(&self) -> String {
        let m = self.metadata();
        format!(
            "model {} ({}, {} channel(s), {}), trained on {}{}",
            self.source(),
            m.model.kind(),
            m.model.channels(),
            self.model().precision(),
            m.noise.as_deref().unwrap_or("unknown noise"),
            m.val_psnr
                .map(|p| format!(", validation PSNR {p:.2} dB"))
                .unwrap_or_default()
        ) + &self
            .denoiser
            .white_noise_model()
            .map(|w| {
                format!(
                    "; blind, white noise goes to {} ({})",
                    w.source(),
                    w.metadata().model.kind()
                )
            })
            .unwrap_or_default()
            + &match self.tiles().ensemble {
                1 => String::new(),
                n => format!("; self-ensemble of {n} passes"),
            }
            + self.bf16_note()
    }

    /// A warning when bf16 was asked for where it is emulated (slower than fp32).
    fn bf16_note(&self) -> &'static str {
        let emulated = self.model().precision() == Precision::Bf16
            && !self.model().device().is_cuda()
            && !denoise_models::perf::CpuFeatures::detect().fast_bf16();
        if emulated {
            "\nnote: this CPU has no native bf16 (see `denoise-cli doctor`): bf16 runs emulated, \
             slower than fp32"
        } else {
            ""
        }
    }

    /// Denoises `image`, converting gray <-> colour explicitly when the model wants the other
    /// (and back). Returns the result and the level used, if any.
    pub fn denoise(
        &self,
        image: &denoise_data::Image,
        level: NoiseLevel<'_>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(denoise_data::Image, Option<LevelUsed>)> {
        let job = Job {
            progress: Some(progress),
            ..Job::default()
        };
        Ok(self.denoiser.denoise(image, level, job)?)
    }
}
