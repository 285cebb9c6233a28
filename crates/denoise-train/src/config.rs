//! [`TrainConfig`]: everything a training run needs, read from TOML (flags override fields), saved
//! in the run directory, and checked once before any work starts.

use crate::loss::Loss;
use crate::optim::{OptimizerConfig, Schedule};
use crate::{Result, TrainError};
use denoise_data::augment::AugmentConfig;
use denoise_data::image::Image;
use denoise_data::noise::NoiseSpec;
use denoise_models::{Layout, ModelConfig, Precision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The `manifest.json` written by `prepare-data`.
    pub data: PathBuf,
    /// Start from this model artefact's weights (fine-tuning) instead of a random
    /// initialisation; the optimizer, schedule and step count start afresh. Without a
    /// `[model]` table the run takes the artefact's architecture; with one, they must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// The architecture: a `[model]` table with `kind = "ffdnet"` and that kind's fields.
    pub model: Option<ModelConfig>,
    /// Training noise, a `denoise-data` spec (`gaussian:0-55` for a blind model, `method2`, ...).
    pub noise: String,
    pub patch_size: usize,
    pub patches_per_image: usize,
    pub batch_size: usize,
    pub augment: AugmentConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub loss: Loss,
    /// Validate and ship an exponential moving average of the weights with this decay (0: the
    /// raw weights). Step `t` uses `min(decay, (1 + t) / (10 + t))`, so the average does not
    /// start from the random initialisation. Default 0.999: averaging the last ~1,000 steps of
    /// the shipped FFDNet run gave +0.08-0.12 dB on CBSD68 over its last raw weights.
    pub ema_decay: f64,
    pub steps: u64,
    /// Validate (and keep the best model) every this many steps.
    pub val_every: u64,
    /// Validation images taken from the manifest's validation split (centre crops).
    pub val_images: usize,
    /// Centre-crop validation images to at most this side (keeps validation cheap on a CPU).
    pub val_crop: usize,
    /// Validation noise; default: the training noise, or `gaussian:25` when that is a Gaussian
    /// range.
    pub val_noise: Option<String>,
    /// Write the resumable checkpoint every this many steps (and at every validation).
    pub checkpoint_every: u64,
    pub seed: u64,
    /// `auto` (CUDA when available), `cpu` or `cuda` / `cuda:N`.
    pub device: String,
    /// `fp32`, or `bf16` mixed precision (bf16 compute, fp32 master weights and optimizer).
    pub precision: Precision,
    /// Memory layout while training: `channels-last` or `nchw`; unset, the faster one measured
    /// for the model and device ([`Layout::for_training`]).
    pub layout: Option<Layout>,
    /// libtorch threads (0 = all cores on a CPU; on a GPU one, unless `--threads` set others:
    /// the host there only fills and copies batches).
    pub threads: usize,
    /// Patch loader threads (0 = one per core).
    pub workers: usize,
    /// Weights kept as the starting model has them, by name prefix (`body` freezes every
    /// `body.*` weight): to teach a new part, such as a level estimator, to serve a trained
    /// body without changing what the body does for a hand-set level.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            init: None,
            model: None,
            noise: "gaussian:0-55".into(),
            patch_size: 64,
            patches_per_image: 8,
            batch_size: 16,
            augment: AugmentConfig {
                dihedral: true,
                ..Default::default()
            },
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            loss: Loss::default(),
            ema_decay: 0.999,
            steps: 10_000,
            val_every: 500,
            val_images: 8,
            val_crop: 256,
            val_noise: None,
            checkpoint_every: 100,
            seed: 0,
            device: "auto".into(),
            precision: Precision::Fp32,
            layout: None,
            threads: 0,
            workers: 0,
            freeze: Vec::new(),
        }
    }
}

/// The parts of a config that `validate` turns into checked values.
#[derive(Debug)]
pub struct Checked {
    pub model: ModelConfig,
    pub noise: NoiseSpec,
    pub val_noise: NoiseSpec,
    pub device: tch::Device,
    pub layout: Layout,
}

impl TrainConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: toml_message(&text, &e),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a train config serialises to TOML")
    }

    /// The training and validation noise, parsed: validation defaults to the training noise
    /// (seeded per image, so every validation sees the same noisy images), or Gaussian sigma 25
    /// when that is a Gaussian range such as `gaussian:0-55`.
    pub fn noise_specs(&self) -> Result<(NoiseSpec, NoiseSpec)> {
        let noise: NoiseSpec = self.noise.parse()?;
        let val_noise: NoiseSpec = match &self.val_noise {
            Some(spec) => spec.parse()?,
            None if matches!(noise, NoiseSpec::Gaussian { lo, hi } if lo != hi) => {
                "gaussian:25".parse()?
            }
            None => noise.clone(),
        };
        Ok((noise, val_noise))
    }

    /// Sets an unset `val_noise` to what runs started before it was saved in their config
    /// resolved it to: the training noise when that has a single level, `gaussian:25` otherwise
    /// (their best validation score was measured on it).
    pub fn pin_legacy_val_noise(&mut self) {
        if self.val_noise.is_some() {
            return;
        }
        if let Ok(noise) = self.noise.parse::<NoiseSpec>() {
            self.val_noise = Some(match noise.nominal_sigma() {
                Some(_) => self.noise.clone(),
                None => "gaussian:25".into(),
            });
        }
    }

    /// Checks every field and resolves the model, noise and device, before any work starts.
    pub fn validate(&self) -> Result<Checked> {
        let bad = |m: String| Err(TrainError::Config(m));
        let Some(model) = self.model.clone() else {
            return bad(
                "no model: give --model NAME or a [model] table with kind = \"...\"".into(),
            );
        };
        model.validate()?;
        if self.data.as_os_str().is_empty() {
            return bad("no data: give --data MANIFEST (written by `prepare-data`)".into());
        }
        if !self.data.is_file() {
            return bad(format!(
                "manifest '{}' does not exist (run prepare-data first)",
                self.data.display()
            ));
        }
        let (noise, val_noise) = self.noise_specs()?;
        if model.noise_map() {
            // Refused here rather than at the first validation, with the reason.
            let probe = Image::from_fn(model.channels() as usize, 8, 8, |_, _, _| 0.5);
            for (field, spec) in [("noise", &noise), ("val_noise", &val_noise)] {
                if spec.apply(&probe, 0).sigma_map.is_none() {
                    return bad(format!(
                        "the {} model takes a noise-level map, but {field} '{spec}' gives none \
                         (Gaussian-like noise has one; impulses, JPEG or clipping alone do not)",
                        model.kind()
                    ));
                }
            }
        }
        if let Loss::MseLevel { floor } = self.loss {
            if model.estimates_level() {
                return bad(
                    "the mse-level loss weighs patches by the given noise-level map, which a \
                     model with an estimator trains without (use mse)"
                        .into(),
                );
            }
            if !model.noise_map() {
                return bad(format!(
                    "the mse-level loss weighs patches by the noise-level map, which the {} \
                     model does not take (use it with ffdnet)",
                    model.kind()
                ));
            }
            if !(floor > 0.0 && floor.is_finite()) {
                return bad(format!("the mse-level loss needs floor > 0, got {floor}"));
            }
        }
        if let Loss::Psnr { max_db } = self.loss
            && !(max_db > 0.0 && max_db.is_finite())
        {
            return bad(format!("the psnr loss needs max_db > 0, got {max_db}"));
        }
        if self.patch_size < 8 || self.patch_size % model.multiple() as usize != 0 {
            return bad(format!(
                "patch_size {} must be at least 8 and a multiple of {} for {}",
                self.patch_size,
                model.multiple(),
                model.kind()
            ));
        }
        for (name, value) in [
            ("batch_size", self.batch_size as u64),
            ("patches_per_image", self.patches_per_image as u64),
            ("steps", self.steps),
            ("val_every", self.val_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1, got 0"));
            }
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return bad(format!(
                "learning rate must be positive, got {}",
                self.optimizer.lr
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!(
                "ema_decay must be in [0, 1), got {}",
                self.ema_decay
            ));
        }
        let device = parse_device(&self.device)?;
        let layout = self
            .layout
            .unwrap_or_else(|| Layout::for_training(model.kind(), device));
        Ok(Checked {
            model,
            noise,
            val_noise,
            device,
            layout,
        })
    }
}

/// The config's `device` ([`denoise_models::parse_device`]), refused as a config error.
pub fn parse_device(s: &str) -> Result<tch::Device> {
    denoise_models::parse_device(s).map_err(|err| match err {
        denoise_models::ModelError::Input(message) => TrainError::Config(message),
        other => other.into(),
    })
}

/// A TOML error on one line, "line L, column C: what": toml's own text draws the line with a
/// caret under it over several lines.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(span) = e.span() else {
        return what;
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    format!("line {line}, column {column}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_is_not_toml_is_one_line_naming_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "steps = 3\nnoise = [\"gaussian:25\"\nbatch_size = 4\n",
        )
        .unwrap();
        let e = TrainConfig::from_file(&path).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("config.toml") && e.contains("line 3, column 1"),
            "{e}"
        );
    }

    #[test]
    fn toml_round_trips_and_partial_files_take_defaults() {
        let text = "data = \"m.json\"\nnoise = \"gaussian:25\"\nsteps = 7\n[model]\nkind = \"dncnn\"\ndepth = 5\n";
        let cfg: TrainConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.steps, 7);
        assert_eq!(cfg.batch_size, 16);
        assert_eq!(
            cfg.model.as_ref().unwrap().kind(),
            denoise_models::ModelKind::Dncnn
        );
        let again: TrainConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(again, cfg);
        assert_eq!(cfg.layout, None, "unset: picked per model and device");
        let nchw: TrainConfig = toml::from_str(&format!("layout = \"nchw\"\n{text}")).unwrap();
        assert_eq!(nchw.layout, Some(Layout::Nchw));
        assert!(toml::from_str::<TrainConfig>(&format!("layout = \"nhwc8\"\n{text}")).is_err());
    }

    #[test]
    fn the_shipped_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = TrainConfig::from_file(&path).unwrap();
                cfg.model
                    .as_ref()
                    .expect("a [model] table")
                    .validate()
                    .unwrap();
                let noise: NoiseSpec = cfg.noise.parse().unwrap();
                assert!(noise.validate().is_ok(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(
            seen >= 5,
            "expected an example config per model, found {seen}"
        );
    }

    #[test]
    fn validation_noise_defaults_to_the_training_noise_unless_a_gaussian_range() {
        let val = |noise: &str| {
            let cfg = TrainConfig {
                noise: noise.into(),
                ..TrainConfig::default()
            };
            cfg.noise_specs().unwrap().1.to_string()
        };
        assert_eq!(val("gaussian:0-55"), "gaussian:25");
        assert_eq!(val("gaussian:15"), "gaussian:15");
        // A fine-tune on method 2 must be judged on method 2, not on plain Gaussian noise.
        assert_eq!(val("method2"), "method2");
        assert_eq!(val("located:25:0.3"), "located:25:0.3");
        let explicit = TrainConfig {
            noise: "method2".into(),
            val_noise: Some("gaussian:50".into()),
            ..TrainConfig::default()
        };
        assert_eq!(explicit.noise_specs().unwrap().1.to_string(), "gaussian:50");
    }

    #[test]
    fn bad_configs_fail_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifest.json");
        std::fs::write(&manifest, "{}").unwrap();
        let good = TrainConfig {
            data: manifest.clone(),
            model: Some(denoise_models::ModelKind::Dncnn.default_config(3)),
            ..Default::default()
        };
        assert!(good.validate().is_ok());
        let err = |cfg: TrainConfig| cfg.validate().unwrap_err().to_string();
        assert!(
            err(TrainConfig {
                model: None,
                ..good.clone()
            })
            .contains("no model")
        );
        let e = err(TrainConfig {
            noise: "gaussian:-5".into(),
            ..good.clone()
        });
        assert!(e.contains("gaussian:-5"), "{e}");
        let e = err(TrainConfig {
            data: dir.path().join("missing.json"),
            ..good.clone()
        });
        assert!(e.contains("does not exist"), "{e}");
        for ema_decay in [1.0, -0.1, f64::NAN] {
            let e = err(TrainConfig {
                ema_decay,
                ..good.clone()
            });
            assert!(e.contains("ema_decay"), "{e}");
        }
        // A model that takes a noise-level map, with noise that gives none: refused up front.
        let ffdnet = TrainConfig {
            model: Some(denoise_models::ModelKind::Ffdnet.default_config(3)),
            ..good.clone()
        };
        assert!(ffdnet.validate().is_ok());
        let e = err(TrainConfig {
            noise: "jpeg:30".into(),
            ..ffdnet.clone()
        });
        assert!(e.contains("noise 'jpeg:30' gives none"), "{e}");
        let e = err(TrainConfig {
            val_noise: Some("salt-pepper:0.1".into()),
            ..ffdnet.clone()
        });
        assert!(e.contains("val_noise"), "{e}");
        // The level-balanced loss reads the noise-level map: only for models that take one.
        let level = Loss::MseLevel { floor: 5.0 };
        assert!(
            TrainConfig {
                loss: level,
                ..ffdnet.clone()
            }
            .validate()
            .is_ok()
        );
        let e = err(TrainConfig {
            loss: level,
            ..good.clone()
        });
        assert!(e.contains("mse-level") && e.contains("dncnn"), "{e}");
        let e = err(TrainConfig {
            loss: Loss::MseLevel { floor: 0.0 },
            ..ffdnet.clone()
        });
        assert!(e.contains("floor"), "{e}");
        let e = err(TrainConfig {
            loss: Loss::Psnr { max_db: -1.0 },
            ..good.clone()
        });
        assert!(e.contains("max_db"), "{e}");
        assert!(toml::from_str::<TrainConfig>("[model]\nkind = \"resnet\"\n").is_err());
        assert_eq!(
            err(TrainConfig {
                device: "tpu".into(),
                ..good
            }),
            "invalid training config: unknown device 'tpu' (auto, cpu, cuda, cuda:N)"
        );
    }
}
