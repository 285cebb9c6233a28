//! [`RunDir`]: a training run's directory. It names the run's files, refuses to start a run over
//! another or to resume one as a different run, reconciles a resumed config with the one the run
//! saved, and holds the lock that keeps a second process out.

use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::config::TrainConfig;
use crate::{Result, TrainError};
use denoise_models::artefact;
use std::path::{Path, PathBuf};

/// The run's whole config, with what was resolved when it started (the `init` artefact's
/// architecture, the validation noise), so that `--resume` alone knows what the run trains.
pub const CONFIG_FILE: &str = "config.toml";

/// The JSONL log of a run directory: one line per step, one per validation.
pub const LOG_FILE: &str = "train.jsonl";

/// The latest validated weights of a run directory, a model artefact like `model.safetensors`
/// (the best): for a run whose validation does not measure what it trains for (a bf16
/// fine-tune for bf16 inference, say), or to compare the two.
pub const LAST_MODEL_FILE: &str = "last.safetensors";

/// The lock file in a run directory (an advisory lock; the file itself stays).
pub const LOCK_FILE: &str = "run.lock";

/// The files that make a directory hold a run: a new run refuses to start where one of them is.
const RUN_FILES: [&str; 5] = [
    checkpoint::FILE_NAME,
    checkpoint::PREVIOUS_FILE_NAME,
    artefact::FILE_NAME,
    LAST_MODEL_FILE,
    LOG_FILE,
];

/// The config fields a resumed run may change: when to stop and validate, where and how fast
/// it runs, and where the (moved) data is. Every other field decides what the weights, the
/// optimizer state or the validation score mean, so a change there makes a different run.
const RESUMABLE_FIELDS: [&str; 9] = [
    "steps",
    "val_every",
    "checkpoint_every",
    "ema_decay",
    "device",
    "precision",
    "layout",
    "threads",
    "workers",
];

/// A training run's directory: `config.toml`, `train.jsonl`, `checkpoint.safetensors` (latest,
/// resumable) and the one before it, `model.safetensors` (the best validation PSNR) and
/// [`LAST_MODEL_FILE`].
#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
}

/// A resume that [`RunDir::resume`] accepted.
#[derive(Debug)]
pub struct Resume {
    pub checkpoint: Checkpoint,
    /// The file it came from: the previous checkpoint when the latest was damaged.
    pub path: PathBuf,
    /// What the resume changes that the user should hear of: a rescaled schedule, a fallback
    /// to the previous checkpoint.
    pub warnings: Vec<String>,
}

/// The run directory's lock, held while a process trains the run: two processes training one
/// run would write over each other's log and checkpoints.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the run's file `name` (one of this module's `*_FILE` names, say).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The run files (checkpoints, best and last model, log) the directory holds.
    pub fn run_files(&self) -> Vec<&'static str> {
        RUN_FILES
            .into_iter()
            .filter(|name| self.file(name).exists())
            .collect()
    }

    /// Refuses a directory that already holds a run, for a new run (nothing of it is changed).
    pub fn refuse_existing_run(&self) -> Result<()> {
        let existing = self.run_files();
        if existing.is_empty() {
            return Ok(());
        }
        Err(TrainError::RunDir(format!(
            "'{}' already holds a run ({}): pass --resume to continue it, or choose another \
             --out (nothing was changed)",
            self.path.display(),
            existing.join(", ")
        )))
    }

    /// The config the run saved, which `--resume` trains on unless given another; refused when
    /// it cannot be read or holds only defaults (a run writes its whole config, so such a file
    /// was emptied or replaced and no longer says what the run trains).
    pub fn saved_config(&self) -> Result<TrainConfig> {
        let path = self.file(CONFIG_FILE);
        let cfg = TrainConfig::from_file(&path).map_err(|err| {
            TrainError::RunDir(format!("--resume needs '{}': {err}", path.display()))
        })?;
        if cfg == TrainConfig::default() {
            return Err(TrainError::RunDir(format!(
                "the run's config '{}' is empty (or holds only defaults): it no longer says \
                 what the run trains; restore it, or start a new run",
                path.display()
            )));
        }
        Ok(cfg)
    }

    /// Fills in what a resumed run's `cfg` leaves to the run: the architecture of a fine-tune
    /// whose config has no `[model]`, and the validation noise (the saved one or, for a run
    /// from before it was saved, what the rule of its time resolved to), so that the run goes on
    /// validating on what it always has.
    pub fn reconcile(&self, cfg: &mut TrainConfig) {
        let saved = TrainConfig::from_file(&self.file(CONFIG_FILE)).ok();
        if cfg.init.is_some() && cfg.model.is_none() {
            cfg.model = saved.as_ref().and_then(|saved| saved.model.clone());
        }
        if cfg.val_noise.is_none() {
            match saved.and_then(|saved| saved.val_noise) {
                Some(val_noise) => cfg.val_noise = Some(val_noise),
                None => cfg.pin_legacy_val_noise(),
            }
        }
    }

    /// The checkpoint that resuming the run under `now` starts from: the latest, or the previous
    /// one when the latest is damaged (then set aside as `checkpoint.damaged.safetensors`).
    /// Refused when there is none, or when `now` trains something else than the checkpoint's
    /// config (see [`RunDir::check_resumable`]).
    pub fn resume(&self, now: &TrainConfig) -> Result<Resume> {
        if !self.file(checkpoint::FILE_NAME).is_file()
            && !self.file(checkpoint::PREVIOUS_FILE_NAME).is_file()
        {
            return Err(TrainError::RunDir(format!(
                "--resume: no checkpoint in '{}'",
                self.path.display()
            )));
        }
        let latest = checkpoint::load_latest(&self.path)?;
        let mut warnings = self.check_resumable(&latest.checkpoint.meta, now)?;
        if let Some(mut why) = latest.fallback {
            // Only now that the resume is accepted: a refused one changes nothing.
            if let Some(aside) = checkpoint::set_aside_damaged(&self.path) {
                why.push_str(&format!(" (the damaged one is now '{}')", aside.display()));
            }
            warnings.push(why);
        }
        Ok(Resume {
            checkpoint: latest.checkpoint,
            path: latest.path,
            warnings,
        })
    }

    /// Refuses resuming the run checkpointed with `ck` under `now` when `now` changes anything
    /// but [`RESUMABLE_FIELDS`] and the manifest's path, naming the fields; returns what the
    /// accepted changes do that the user should hear of.
    pub fn check_resumable(&self, ck: &CheckpointMeta, now: &TrainConfig) -> Result<Vec<String>> {
        let changed = identity_changes(&ck.config, now);
        if !changed.is_empty() {
            return Err(TrainError::RunDir(format!(
                "--resume: the run in '{}' was trained with a different {}; resume it with its \
                 own config (a resume may change only {}, and data), or start a new run with \
                 another --out",
                self.path.display(),
                changed.join(", "),
                RESUMABLE_FIELDS.join(", ")
            )));
        }
        let mut warnings = Vec::new();
        let (was, planned) = (ck.config.steps, now.steps);
        if was != planned && ck.step < planned {
            let lr = |steps| now.optimizer.lr * now.schedule.factor(ck.step, steps);
            warnings.push(format!(
                "the run was planned for {was} steps and now for {planned}: the schedule is \
                 rescaled, so the learning rate at step {} goes from {:.3e} to {:.3e}",
                ck.step,
                lr(was),
                lr(planned)
            ));
        }
        Ok(warnings)
    }

    /// Creates the directory if need be and takes its lock, or says that another process is
    /// training the run.
    pub fn lock(&self) -> Result<RunLock> {
        std::fs::create_dir_all(&self.path).map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })?;
        let path = self.file(LOCK_FILE);
        let io = |source| TrainError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(fs4::TryLockError::WouldBlock) => Err(TrainError::RunDir(format!(
                "another process is training the run in '{}' (it holds '{}'): wait for it to \
                 finish or stop it (Ctrl-C saves a checkpoint), then --resume",
                self.path.display(),
                path.display()
            ))),
            Err(fs4::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Saves the run's config (atomically, as every file the run writes).
    pub fn save_config(&self, cfg: &TrainConfig) -> Result<()> {
        denoise_data::io::write_atomic(self.file(CONFIG_FILE), cfg.to_toml().as_bytes())?;
        Ok(())
    }
}

/// The fields (by their config name) that differ between a run's config and `now`, leaving out
/// [`RESUMABLE_FIELDS`] and `data` (a manifest may move). The noise fields are compared as
/// parsed specs, so spellings of one noise (spaces, a default made explicit) are equal.
fn identity_changes(run: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    // A checkpoint from before the validation noise was saved holds it unset.
    let mut run = run.clone();
    run.pin_legacy_val_noise();
    let run = &run;
    let same_noise = match (run.noise_specs(), now.noise_specs()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let as_map = |cfg: &TrainConfig| match serde_json::to_value(cfg) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (as_map(run), as_map(now));
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| k.as_str() != "data" && !RESUMABLE_FIELDS.contains(&k.as_str()))
        .filter(|k| !(same_noise && matches!(k.as_str(), "noise" | "val_noise")))
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            format!(
                "{k} ({} now, {} before)",
                show(after.get(k)),
                show(before.get(k))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TrainCost;
    use tch::Tensor;

    /// A config as a run saves it: every field written, data and model set.
    fn saved(noise: &str) -> TrainConfig {
        TrainConfig {
            data: "/data/manifest.json".into(),
            model: Some(denoise_models::ModelKind::Dncnn.default_config(3)),
            noise: noise.into(),
            val_noise: Some("gaussian:25".into()),
            steps: 10,
            optimizer: crate::optim::OptimizerConfig {
                lr: 2e-3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn save_checkpoint(dir: &Path, name: &str, step: u64, cfg: &TrainConfig) {
        let meta = CheckpointMeta::new(step, step, Some(30.0), TrainCost::default(), cfg);
        let tensors = vec![("model.w".to_owned(), Tensor::from_slice(&[step as f32]))];
        checkpoint::save(&dir.join(name), &meta, &tensors).unwrap();
    }

    #[test]
    fn a_new_run_is_refused_where_a_run_already_is_naming_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path().join("run"));
        // Not there yet, or there with only a config and a lock: not a run.
        run.refuse_existing_run().unwrap();
        std::fs::create_dir(run.path()).unwrap();
        for name in [CONFIG_FILE, LOCK_FILE] {
            std::fs::write(run.file(name), b"").unwrap();
        }
        run.refuse_existing_run().unwrap();
        for name in [LOG_FILE, artefact::FILE_NAME] {
            std::fs::write(run.file(name), b"x").unwrap();
        }
        assert_eq!(run.run_files(), ["model.safetensors", "train.jsonl"]);
        let err = run.refuse_existing_run().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "'{}' already holds a run (model.safetensors, train.jsonl): pass --resume to \
                 continue it, or choose another --out (nothing was changed)",
                run.path().display()
            )
        );
        assert_eq!(std::fs::read(run.file(LOG_FILE)).unwrap(), b"x");
    }

    #[test]
    fn resume_finds_the_latest_checkpoint_or_the_previous_one_when_the_latest_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let cfg = saved("gaussian:25");
        let err = run.resume(&cfg).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("--resume: no checkpoint in '{}'", dir.path().display())
        );

        save_checkpoint(dir.path(), checkpoint::PREVIOUS_FILE_NAME, 5, &cfg);
        save_checkpoint(dir.path(), checkpoint::FILE_NAME, 10, &cfg);
        let resume = run.resume(&cfg).unwrap();
        assert_eq!(resume.checkpoint.meta.step, 10);
        assert_eq!(resume.checkpoint.meta.best_val_psnr, Some(30.0));
        assert_eq!(resume.path, run.file(checkpoint::FILE_NAME));
        assert!(resume.warnings.is_empty(), "{:?}", resume.warnings);

        let latest = run.file(checkpoint::FILE_NAME);
        let bytes = std::fs::read(&latest).unwrap();
        std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
        let resume = run.resume(&cfg).unwrap();
        assert_eq!(resume.checkpoint.meta.step, 5);
        assert_eq!(resume.path, run.file(checkpoint::PREVIOUS_FILE_NAME));
        assert_eq!(resume.warnings.len(), 1);
        assert!(
            resume.warnings[0].contains("resuming from the previous checkpoint, at step 5"),
            "{:?}",
            resume.warnings
        );
        assert!(!latest.exists() && run.file("checkpoint.damaged.safetensors").is_file());
    }

    #[test]
    fn a_resume_that_trains_something_else_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let cfg = saved("gaussian:25");
        save_checkpoint(dir.path(), checkpoint::FILE_NAME, 10, &cfg);
        let other = saved("gaussian:50");
        let err = run.resume(&other).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "--resume: the run in '{}' was trained with a different noise (\"gaussian:50\" \
                 now, \"gaussian:25\" before); resume it with its own config (a resume may \
                 change only steps, val_every,",
                dir.path().display()
            )),
            "{err}"
        );
        // A refused resume leaves the checkpoint where it was.
        assert!(run.file(checkpoint::FILE_NAME).is_file());
        // One noise spelt two ways, a moved manifest and a new device are the same run.
        let same = TrainConfig {
            noise: "gaussian: 25".into(),
            data: "/elsewhere/manifest.json".into(),
            device: "cuda".into(),
            ..cfg.clone()
        };
        assert!(run.resume(&same).unwrap().warnings.is_empty());
    }

    #[test]
    fn extending_a_run_says_how_its_learning_rate_moves() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let cfg = saved("gaussian:25");
        let meta = CheckpointMeta::new(10, 10, None, TrainCost::default(), &cfg);
        let longer = TrainConfig {
            steps: 20,
            ..cfg.clone()
        };
        // Cosine to 1% of 2e-3: step 10 is the end of 10 steps and half of 20 (0.505).
        assert_eq!(
            run.check_resumable(&meta, &longer).unwrap(),
            [
                "the run was planned for 10 steps and now for 20: the schedule is rescaled, so \
              the learning rate at step 10 goes from 2.000e-5 to 1.010e-3"
            ]
        );
        // Shortened below the step reached: nothing left to rescale.
        let shorter = TrainConfig { steps: 8, ..cfg };
        assert!(run.check_resumable(&meta, &shorter).unwrap().is_empty());
    }

    #[test]
    fn the_saved_config_is_what_a_bare_resume_trains_on_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let err = run.saved_config().unwrap_err().to_string();
        let path = run.file(CONFIG_FILE);
        assert!(
            err.starts_with(&format!(
                "--resume needs '{}': failed to read config '{}': ",
                path.display(),
                path.display()
            )),
            "{err}"
        );
        std::fs::write(&path, "").unwrap();
        let err = run.saved_config().unwrap_err().to_string();
        assert!(err.contains("is empty (or holds only defaults)"), "{err}");
        let cfg = saved("gaussian:25");
        run.save_config(&cfg).unwrap();
        assert_eq!(run.saved_config().unwrap(), cfg);
    }

    #[test]
    fn reconcile_takes_the_model_and_validation_noise_a_resumed_config_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let mut saved = saved("gaussian:0-55");
        saved.init = Some("/models/base.safetensors".into());
        saved.val_noise = Some("gaussian:15".into());
        run.save_config(&saved).unwrap();
        // A fine-tune's own config, without [model] or val_noise.
        let mut cfg = TrainConfig {
            model: None,
            val_noise: None,
            ..saved.clone()
        };
        run.reconcile(&mut cfg);
        assert_eq!(cfg, saved);
        // A config's own [model] and val_noise are kept.
        let mut own = TrainConfig {
            model: Some(denoise_models::ModelKind::Ffdnet.default_config(3)),
            val_noise: Some("gaussian:50".into()),
            ..saved.clone()
        };
        let before = own.clone();
        run.reconcile(&mut own);
        assert_eq!(own, before);
        // A run from before the validation noise was saved: a Gaussian range validated on 25.
        saved.val_noise = None;
        run.save_config(&saved).unwrap();
        let mut cfg = TrainConfig {
            val_noise: None,
            ..saved.clone()
        };
        run.reconcile(&mut cfg);
        assert_eq!(cfg.val_noise.as_deref(), Some("gaussian:25"));
    }

    #[test]
    fn a_run_from_before_the_saved_validation_noise_keeps_its_own() {
        // Such a run validated method-2 training on gaussian:25; its checkpoint says nothing.
        let old = TrainConfig {
            noise: "method2".into(),
            ..TrainConfig::default()
        };
        let mut resumed = old.clone();
        resumed.pin_legacy_val_noise();
        assert_eq!(resumed.val_noise.as_deref(), Some("gaussian:25"));
        assert!(identity_changes(&old, &resumed).is_empty());
        // Validating it on another noise now would compare scores of two noises: refused.
        let other = TrainConfig {
            val_noise: Some("method2".into()),
            ..old.clone()
        };
        assert_eq!(identity_changes(&old, &other).len(), 1);
        let mut single = TrainConfig {
            noise: "gaussian:15".into(),
            ..TrainConfig::default()
        };
        single.pin_legacy_val_noise();
        assert_eq!(single.val_noise.as_deref(), Some("gaussian:15"));
    }
}
