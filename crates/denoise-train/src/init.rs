//! Fine-tuning: a run that starts from a trained model (the config's `init` artefact) instead of
//! random weights. [`prepare`] completes such a run's config from the model as a caller asks
//! (a gray twin, the model's own noise and a gentler learning rate); the trainer then loads the
//! model, checks that it fits the run, and copies its weights in.

use crate::config::TrainConfig;
use crate::weights;
use crate::{Result, TrainError};
use denoise_models::{Model, ModelConfig, artefact};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What a caller asked of a fine-tune besides its starting model, for [`prepare`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FineTune {
    /// Image channels asked for without an architecture of the run's own: the model's own
    /// count changes nothing, 1 turns a colour FFDNet into its gray twin, anything else is
    /// refused.
    pub channels: Option<i64>,
    /// Asked for by naming the model alone, with no config: the run takes the model's noise and
    /// a tenth of the from-scratch learning rate, unless `noise_given` and `lr_given` say the
    /// caller chose them.
    pub model_alone: bool,
    pub noise_given: bool,
    pub lr_given: bool,
}

/// Completes `cfg` for a new run that starts from the artefact file at `path`, as `asked`, and
/// sets `cfg.init` to the file's absolute path (so the run's saved config resumes from any
/// directory). Returns a note for the user when the model's defaults were taken.
pub fn prepare(cfg: &mut TrainConfig, path: &Path, asked: &FineTune) -> Result<Option<String>> {
    let meta = artefact::read_metadata(path)?;
    if let Some(channels) = asked.channels {
        let own = meta.model.channels();
        match (meta.model.gray_twin(), channels) {
            (_, c) if c == own => {}
            (Some(gray), 1) => cfg.model = Some(gray),
            _ => {
                return Err(TrainError::FineTune(format!(
                    "--channels {channels} with --init: '{}' is a {}-channel {}, and only a \
                     colour ffdnet or drunet turns into a gray one (--channels 1)",
                    path.display(),
                    own,
                    meta.model.kind()
                )));
            }
        }
    }
    let mut note = None;
    if asked.model_alone {
        if let (false, Some(noise)) = (asked.noise_given, meta.noise) {
            cfg.noise = noise;
        }
        if !asked.lr_given {
            cfg.optimizer.lr /= 10.0;
        }
        note = Some(format!(
            "fine-tuning on {} at a peak learning rate of {:.0e} (--noise and --lr change them)",
            cfg.noise, cfg.optimizer.lr
        ));
    }
    cfg.init = Some(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
    Ok(note)
}

/// A new run's starting model, loaded and checked against the run's by [`load`].
#[derive(Debug)]
pub(crate) struct Start {
    /// The artefact file it came from.
    path: PathBuf,
    /// Its weights as the run's architecture has them (a colour model turned into its gray
    /// twin), on the CPU.
    model: Model,
}

/// Loads the `init` artefact at `path` (a file or a run directory; on the CPU) and checks that
/// it fits the run: a config without `[model]` takes the artefact's architecture; one whose
/// `[model]` the weights do not fit (other than by an added estimator, a gray twin or left-out
/// DRUNet blocks) is refused, before any work.
pub(crate) fn load(cfg: &mut TrainConfig, path: &Path) -> Result<Start> {
    // The run's own architecture is checked first, so that its error is the one reported.
    if let Some(want) = &cfg.model {
        want.validate()?;
    }
    let art = artefact::load(path, Device::Cpu)?;
    let theirs = &art.metadata.model;
    let model = match &cfg.model {
        None => {
            cfg.model = Some(theirs.clone());
            art.model
        }
        // A gray model started from a colour one of the same architecture.
        Some(want) if theirs.gray_twin().as_ref() == Some(want) => {
            denoise_models::gray::gray_from_colour(&art.model)?
        }
        // An estimator added to a model: the body starts from the artefact, the estimator fresh.
        Some(want) if want.without_estimator() == *theirs && want.estimates_level() => art.model,
        // A DRUNet with blocks left out: the blocks it keeps start from the artefact's.
        Some(want) if want.prunes(theirs) => art.model,
        Some(want) if want != theirs => {
            let show = |m: &ModelConfig| serde_json::to_string(m).unwrap_or_default();
            return Err(TrainError::Config(format!(
                "init '{}' is a {} model that does not match the run's [model] {}: leave out \
                 [model] and --model to fine-tune the artefact's own architecture",
                art.path.display(),
                show(theirs),
                show(want)
            )));
        }
        Some(_) => art.model,
    };
    Ok(Start {
        path: art.path,
        model,
    })
}

/// Copies the starting model's weights into the run's `model`; an added estimator keeps its
/// own initialisation, and weights the run's model has no place for (left-out blocks) are not
/// copied.
pub(crate) fn start_from(start: &Start, model: &Model) -> Result<()> {
    let mut named: BTreeMap<String, Tensor> =
        start.model.var_store().variables().into_iter().collect();
    if !start.model.config().estimates_level() {
        for (name, var) in model.var_store().variables() {
            if name.starts_with("estimator.") {
                named.insert(name, var.detach().copy());
            }
        }
    }
    weights::restore(model, &named, "").map_err(|message| {
        TrainError::Config(format!("init '{}': {message}", start.path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small colour FFDNet artefact whose metadata says it was trained on `noise`.
    fn colour_ffdnet(dir: &Path, noise: &str) -> PathBuf {
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"kind":"ffdnet","depth":3,"features":8}"#).unwrap();
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        let mut meta = artefact::Metadata::new(model.config());
        meta.noise = Some(noise.into());
        let path = dir.join("colour.safetensors");
        artefact::save(&model, &meta, &path).unwrap();
        path
    }

    #[test]
    fn a_model_named_alone_gives_its_noise_and_a_tenth_of_the_learning_rate() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = colour_ffdnet(dir.path(), "camera");
        let mut cfg = TrainConfig::default();
        let asked = FineTune {
            model_alone: true,
            ..Default::default()
        };
        let note = prepare(&mut cfg, &path, &asked).unwrap();
        assert_eq!(cfg.noise, "camera");
        assert_eq!(cfg.optimizer.lr, 1e-4);
        assert_eq!(
            note.as_deref(),
            Some(
                "fine-tuning on camera at a peak learning rate of 1e-4 (--noise and --lr change \
                 them)"
            )
        );
        assert_eq!(cfg.init, Some(path.canonicalize().unwrap()));
        assert_eq!(
            cfg.model, None,
            "the architecture is the artefact's, taken later"
        );

        // What the caller chose stays; with a config, nothing is taken and nothing said.
        let mut chosen = TrainConfig {
            noise: "gaussian:15".into(),
            ..TrainConfig::default()
        };
        let asked = FineTune {
            model_alone: true,
            noise_given: true,
            lr_given: true,
            ..Default::default()
        };
        prepare(&mut chosen, &path, &asked).unwrap();
        assert_eq!(
            (chosen.noise.as_str(), chosen.optimizer.lr),
            ("gaussian:15", 1e-3)
        );
        let mut configured = TrainConfig::default();
        let note = prepare(&mut configured, &path, &FineTune::default()).unwrap();
        assert_eq!(note, None);
        assert_eq!(configured.noise, TrainConfig::default().noise);
    }

    #[test]
    fn one_channel_asks_for_the_gray_twin_and_the_colour_model_loads_as_one() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = colour_ffdnet(dir.path(), "gaussian:0-55");
        let mut cfg = TrainConfig::default();
        let gray = FineTune {
            channels: Some(1),
            ..Default::default()
        };
        prepare(&mut cfg, &path, &gray).unwrap();
        let model = cfg.model.clone().expect("the gray twin");
        assert_eq!(
            (model.kind().to_string(), model.channels()),
            ("ffdnet".into(), 1)
        );
        let start = load(&mut cfg, &path).unwrap();
        assert_eq!(start.model.config(), &model, "the colour model turned gray");
        // Its own count changes nothing; two channels are no model's.
        let mut same = TrainConfig::default();
        let three = FineTune {
            channels: Some(3),
            ..Default::default()
        };
        prepare(&mut same, &path, &three).unwrap();
        assert_eq!(same.model, None);
        let two = FineTune {
            channels: Some(2),
            ..Default::default()
        };
        let err = prepare(&mut TrainConfig::default(), &path, &two)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "is a 3-channel ffdnet, and only a colour ffdnet or drunet turns into a gray one"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_run_takes_the_artefacts_architecture_or_refuses_another() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = colour_ffdnet(dir.path(), "gaussian:0-55");
        let mut cfg = TrainConfig::default();
        // A run directory names its best model.
        std::fs::create_dir(dir.path().join("run")).unwrap();
        std::fs::copy(&path, dir.path().join("run").join(artefact::FILE_NAME)).unwrap();
        let start = load(&mut cfg, &dir.path().join("run")).unwrap();
        assert_eq!(start.path, dir.path().join("run").join(artefact::FILE_NAME));
        assert_eq!(cfg.model.as_ref(), Some(start.model.config()));
        assert_eq!(start.model.config().kind().to_string(), "ffdnet");
        let mut other = TrainConfig {
            model: Some(denoise_models::ModelKind::Dncnn.default_config(3)),
            ..TrainConfig::default()
        };
        let err = load(&mut other, &path).unwrap_err().to_string();
        assert!(err.contains("does not match the run's [model]"), "{err}");
    }

    #[test]
    fn a_drunet_with_blocks_left_out_starts_from_the_blocks_it_keeps() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let dir = tempfile::tempdir().unwrap();
        let drunet = |blocks: &str| -> ModelConfig {
            serde_json::from_str(&format!(
                r#"{{"kind":"drunet","widths":[4,8,8],"blocks":{blocks}}}"#
            ))
            .unwrap()
        };
        let full = Model::new(&drunet("2"), Device::Cpu).unwrap();
        let path = dir.path().join("full.safetensors");
        artefact::save(&full, &artefact::Metadata::new(full.config()), &path).unwrap();
        let pruned = drunet(r#"{"down":[2,1],"bottom":0,"up":[2,0]}"#);
        assert!(pruned.prunes(full.config()) && !full.config().prunes(&pruned));
        assert!(
            !drunet("2").prunes(full.config()),
            "the same model is not a pruned one"
        );
        let mut cfg = TrainConfig {
            model: Some(pruned.clone()),
            ..TrainConfig::default()
        };
        let start = load(&mut cfg, &path).unwrap();
        let run = Model::new(&pruned, Device::Cpu).unwrap();
        start_from(&start, &run).unwrap();
        let theirs = full.var_store().variables();
        let ours = run.var_store().variables();
        assert_eq!(theirs.len() - ours.len(), 10);
        for (name, v) in &ours {
            assert!(v.equal(&theirs[name]), "{name} was not copied");
        }
        // A table of the wrong length is named as such, not taken for another model.
        let mut bad = TrainConfig {
            model: Some(drunet(r#"{"down":[2],"bottom":0,"up":[2,0]}"#)),
            ..TrainConfig::default()
        };
        let err = load(&mut bad, &path).unwrap_err().to_string();
        assert!(
            err.contains("blocks.down needs a count for each of the 2"),
            "{err}"
        );
        assert!(!drunet(r#"{"down":[2],"bottom":0,"up":[2,0]}"#).prunes(full.config()));
        // More blocks than the artefact has cannot start from it.
        let mut more = TrainConfig {
            model: Some(drunet("3")),
            ..TrainConfig::default()
        };
        let err = load(&mut more, &path).unwrap_err().to_string();
        assert!(err.contains("does not match the run's [model]"), "{err}");
    }
}
