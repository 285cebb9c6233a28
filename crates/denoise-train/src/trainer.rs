//! The training loop: patches from the data crate's loader, forward/backward in fp32 or bf16
//! mixed precision (bf16 compute on a shadow copy, fp32 master weights and Adam), periodic
//! validation keeping the best model, atomic checkpoints, exact resume, and a clean stop on
//! request (Ctrl-C).

use crate::checkpoint::{self, CheckpointMeta, TrainCost};
use crate::config::{Checked, TrainConfig};
use crate::loss::Loss;
use crate::optim::Adam;
use crate::plot::{self, History, ValPoint};
use crate::staging::{Prefetcher, Staged};
use crate::timing::{PhaseTimer, StepTimes};
use crate::validate::{ValScores, ValidationSet};
use crate::{Result, TrainError};
use denoise_data::loader::{LoaderConfig, PatchLoader};
use denoise_models::artefact::{self, Metadata};
use denoise_models::{Layout, Model, ModelConfig, Precision};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The JSONL log of a run directory: one line per step, one per validation.
pub const LOG_FILE: &str = "train.jsonl";

/// The latest validated weights of a run directory, a model artefact like `model.safetensors`
/// (the best): for a run whose validation does not measure what it trains for (a bf16
/// fine-tune for bf16 inference, say), or to compare the two.
pub const LAST_MODEL_FILE: &str = "last.safetensors";

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub step: u64,
    pub finished: bool,
    pub best_val_psnr: Option<f64>,
    pub last_loss: f64,
    pub patches_per_s: f64,
    /// Where this call's time went: waiting for patches, the steps, CPU (and phases when
    /// profiled, see [`Trainer::profile`]).
    pub times: StepTimes,
}

/// A training run in a run directory: `config.toml`, `train.jsonl`, `checkpoint.safetensors`
/// (latest, resumable), `model.safetensors` (best validation PSNR, a model artefact) and
/// [`LAST_MODEL_FILE`] (the latest validated weights, also an artefact).
pub struct Trainer {
    cfg: TrainConfig,
    checked: Checked,
    run_dir: PathBuf,
    master: Model,
    shadow: Option<Model>,
    /// The moving average of the master weights (`ema_decay` > 0): validated and shipped.
    ema: Option<Model>,
    adam: Adam,
    step: u64,
    best_val_psnr: Option<f64>,
    cost: TrainCost,
    history: History,
    train_files: Vec<PathBuf>,
    val: ValidationSet,
    quiet: bool,
    profile: bool,
    cpu_budget: Option<f64>,
    /// What [`Trainer::new`] noticed and went on past, for the caller to show.
    warnings: Vec<String>,
    /// The step of the checkpoint on disk: saving the same step again would only push the
    /// previous checkpoint out.
    saved_step: Option<u64>,
    /// The run directory's lock, held while this trainer lives: two processes training one run
    /// would write over each other's log and checkpoints.
    _lock: std::fs::File,
}

/// The lock file in a run directory (an advisory lock; the file itself stays).
pub const LOCK_FILE: &str = "run.lock";

/// Takes the run directory's lock, or says which process's run this is.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(LOCK_FILE);
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
        Ok(()) => Ok(file),
        Err(fs4::TryLockError::WouldBlock) => Err(TrainError::RunDir(format!(
            "another process is training the run in '{}' (it holds '{}'): wait for it to \
             finish or stop it (Ctrl-C saves a checkpoint), then --resume",
            run_dir.display(),
            path.display()
        ))),
        Err(fs4::TryLockError::Error(e)) => Err(io(e)),
    }
}

impl Trainer {
    /// Checks the config, prepares the run directory and builds (or, with `resume`, restores)
    /// the model and optimizer. Everything that can be refused is refused here, before training.
    pub fn new(mut cfg: TrainConfig, run_dir: &Path, resume: bool) -> Result<Self> {
        // A resumed run's weights come from its checkpoint, whatever it started from.
        let init = match cfg.init.clone() {
            Some(path) if !resume => Some(load_init(&mut cfg, &path)?),
            Some(_) if cfg.model.is_none() => {
                // A fine-tune's config without [model], resumed: the run's saved config has it.
                cfg.model = TrainConfig::from_file(&run_dir.join("config.toml"))
                    .ok()
                    .and_then(|saved| saved.model);
                None
            }
            _ => None,
        };
        if resume && cfg.val_noise.is_none() {
            // A resumed run validates on what it always has: the noise saved in its config or,
            // for a run from before that was saved, what the rule of its time resolved to.
            match TrainConfig::from_file(&run_dir.join("config.toml"))
                .ok()
                .and_then(|saved| saved.val_noise)
            {
                Some(saved) => cfg.val_noise = Some(saved),
                None => cfg.pin_legacy_val_noise(),
            }
        }
        let checked = cfg.validate()?;
        let mut warnings = Vec::new();
        let (train_files, val_files) = manifest_split(&cfg.data)?;
        if train_files.is_empty() {
            return Err(TrainError::Config(format!(
                "manifest '{}' has no training images",
                cfg.data.display()
            )));
        }
        let ck_path = run_dir.join(checkpoint::FILE_NAME);
        let prev_path = run_dir.join(checkpoint::PREVIOUS_FILE_NAME);
        let restored = if resume {
            if !ck_path.is_file() && !prev_path.is_file() {
                return Err(TrainError::RunDir(format!(
                    "--resume: no checkpoint in '{}'",
                    run_dir.display()
                )));
            }
            let latest = checkpoint::load_latest(run_dir)?;
            let ck = latest.checkpoint;
            let changed = identity_changes(&ck.meta.config, &cfg);
            if !changed.is_empty() {
                return Err(TrainError::RunDir(format!(
                    "--resume: the run in '{}' was trained with a different {}; resume it with \
                     its own config (a resume may change only {}, and data), or start a new run \
                     with another --out",
                    run_dir.display(),
                    changed.join(", "),
                    RESUMABLE_FIELDS.join(", ")
                )));
            }
            let (was, now) = (ck.meta.config.steps, cfg.steps);
            if was != now && ck.meta.step < now {
                let lr = |steps| cfg.optimizer.lr * cfg.schedule.factor(ck.meta.step, steps);
                warnings.push(format!(
                    "the run was planned for {was} steps and now for {now}: the schedule is \
                     rescaled, so the learning rate at step {} goes from {:.3e} to {:.3e}",
                    ck.meta.step,
                    lr(was),
                    lr(now)
                ));
            }
            if let Some(mut why) = latest.fallback {
                // Only now that the resume is accepted: a refused one changes nothing.
                if let Some(aside) = checkpoint::set_aside_damaged(run_dir) {
                    why.push_str(&format!(" (the damaged one is now '{}')", aside.display()));
                }
                warnings.push(why);
            }
            Some((ck, latest.path))
        } else {
            let existing: Vec<&str> = [
                checkpoint::FILE_NAME,
                checkpoint::PREVIOUS_FILE_NAME,
                artefact::FILE_NAME,
                LAST_MODEL_FILE,
                LOG_FILE,
            ]
            .into_iter()
            .filter(|name| run_dir.join(name).exists())
            .collect();
            if !existing.is_empty() {
                return Err(TrainError::RunDir(format!(
                    "'{}' already holds a run ({}): pass --resume to continue it, or choose \
                     another --out (nothing was changed)",
                    run_dir.display(),
                    existing.join(", ")
                )));
            }
            None
        };
        // The training images are checked before any work, as the loader will check them.
        let (usable, skipped) = denoise_data::loader::usable_files(
            train_files.clone(),
            &loader_config(&cfg, &checked),
        )?;
        let reasons = |skipped: &[denoise_data::dataset::Skipped]| {
            let mut text: Vec<String> = skipped
                .iter()
                .take(3)
                .map(|s| s.error.to_string())
                .collect();
            if skipped.len() > 3 {
                text.push(format!("and {} more", skipped.len() - 3));
            }
            text.join("; ")
        };
        if usable.is_empty() {
            return Err(TrainError::Config(format!(
                "none of the {} training image(s) of '{}' can be used: {} (re-run prepare-data, \
                 or lower patch_size)",
                train_files.len(),
                cfg.data.display(),
                reasons(&skipped)
            )));
        }
        if !skipped.is_empty() {
            warnings.push(format!(
                "{} of {} training image(s) left out: {}",
                skipped.len(),
                train_files.len(),
                reasons(&skipped)
            ));
        }
        // Said only when asked for: the default is an upper bound, not a request.
        if !val_files.is_empty()
            && val_files.len() < cfg.val_images
            && cfg.val_images != TrainConfig::default().val_images
        {
            warnings.push(format!(
                "val_images = {} but '{}' has {} validation image(s): validating on those",
                cfg.val_images,
                cfg.data.display(),
                val_files.len()
            ));
        }
        if val_files.is_empty() {
            warnings.push(format!(
                "'{}' has no validation images: validating on training images, which \
                 overstates the PSNR (prepare-data --val-fraction sets a split)",
                cfg.data.display()
            ));
        }
        std::fs::create_dir_all(run_dir).map_err(|source| TrainError::Io {
            path: run_dir.to_path_buf(),
            source,
        })?;
        let lock = lock_run_dir(run_dir)?;
        if cfg.threads > 0 {
            tch::set_num_threads(cfg.threads as i32);
        } else if checked.device.is_cuda()
            && cpu_cores().is_some_and(|n| tch::get_num_threads() == n)
        {
            // On a GPU the host only fills and copies the batches; idle libtorch threads would
            // spin after each parallel fill instead (most of a 16-core host stayed busy),
            // beside the loader's workers and the thread that launches the kernels.
            tch::set_num_threads(1);
        }
        tch::manual_seed(cfg.seed as i64);
        let (master, shadow) = master_and_shadow(
            &checked.model,
            checked.device,
            cfg.precision,
            checked.layout,
        )?;
        let ema = if cfg.ema_decay > 0.0 {
            Some(ema_model(&checked.model, checked.device, checked.layout)?)
        } else {
            None
        };
        let mut adam = Adam::new(cfg.optimizer.clone(), trainable(&master));
        let (mut step, mut best_val_psnr, mut cost) = (0, None, TrainCost::default());
        let mut ema_restored = false;
        if let Some((ck, ck_file)) = restored {
            let bad = |message| TrainError::Checkpoint {
                path: ck_file.clone(),
                message,
            };
            restore_model(&master, &ck.tensors, "model.").map_err(bad)?;
            if let Some(ema) = &ema {
                // A checkpoint written without the average (or before it was turned on) starts
                // it from the restored weights.
                if ck.tensors.keys().any(|k| k.starts_with(EMA_PREFIX)) {
                    restore_model(ema, &ck.tensors, EMA_PREFIX).map_err(bad)?;
                    ema_restored = true;
                }
            }
            let optim: BTreeMap<String, Tensor> = ck
                .tensors
                .iter()
                .filter_map(|(k, t)| {
                    k.strip_prefix("optim.")
                        .map(|k| (k.to_owned(), t.to_device(checked.device)))
                })
                .collect();
            adam.load_state(&optim, ck.meta.optimizer_step)
                .map_err(bad)?;
            step = ck.meta.step;
            best_val_psnr = ck.meta.best_val_psnr;
            cost = ck.meta.cost;
        }
        if let Some(init) = &init {
            let mut weights: BTreeMap<String, Tensor> =
                init.var_store().variables().into_iter().collect();
            if !init.config().estimates_level() {
                // A fresh estimator keeps its own start (see `load_init`).
                for (name, var) in master.var_store().variables() {
                    if name.starts_with("estimator.") {
                        weights.insert(name, var.detach().copy());
                    }
                }
            }
            restore_model(&master, &weights, "").map_err(|message| {
                TrainError::Config(format!(
                    "init '{}': {message}",
                    cfg.init.as_deref().unwrap_or(Path::new("")).display()
                ))
            })?;
        }
        if let (Some(ema), false) = (&ema, ema_restored) {
            update_ema(&master, ema, 0.0);
        }
        if let Some(shadow) = &shadow {
            // Steps refresh only the shadow's weights from the master; its batch-norm running
            // statistics must start as the (restored) master's, not fresh.
            copy_vars(&master, shadow, false);
        }
        let val = ValidationSet::new(
            if val_files.is_empty() {
                &train_files
            } else {
                &val_files
            },
            cfg.val_images,
            cfg.val_crop,
            checked.model.multiple() as usize,
            checked.model.channels() as usize,
            &checked.val_noise,
            cfg.seed ^ 0x5eed_0000,
        )?;
        let history = start_log(&run_dir.join(LOG_FILE), resume.then_some(step))?;
        if !resume && cfg.val_noise.is_none() {
            // Saved resolved, so a later change of the default cannot change a run's validation.
            cfg.val_noise = Some(checked.val_noise.to_string());
        }
        denoise_data::io::write_atomic(run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
        Ok(Self {
            cfg,
            checked,
            run_dir: run_dir.to_path_buf(),
            master,
            shadow,
            ema,
            adam,
            step,
            best_val_psnr,
            cost,
            history,
            train_files,
            val,
            quiet: false,
            profile: false,
            cpu_budget: None,
            warnings,
            saved_step: resume.then_some(step),
            _lock: lock,
        })
    }

    /// Stop (with a checkpoint, resumable) once the run's training steps have used this many
    /// CPU seconds in total, over every resume: equal budgets make models comparable by PSNR
    /// per CPU second.
    pub fn cpu_budget(mut self, seconds: Option<f64>) -> Self {
        self.cpu_budget = seconds;
        self
    }

    /// Hide the progress bar and validation lines (tests, scripts).
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// Time each phase of every step (copy, forward, backward, loss read, update, average),
    /// waiting for the device at the end of each: `train.jsonl` then has the phases of each
    /// step and [`TrainOutcome::times`] their totals. On a GPU the waits cost some speed; use it
    /// to find what bounds a run, not for a long one.
    pub fn profile(mut self, profile: bool) -> Self {
        self.profile = profile;
        self
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// What setting up the run noticed and went on past: training images left out, no
    /// validation split, a rescaled schedule, a resume from the previous checkpoint.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The number of steps the run is planned for.
    pub fn planned_steps(&self) -> u64 {
        self.cfg.steps
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Time spent training so far, over every resume.
    pub fn cost(&self) -> TrainCost {
        self.cost
    }

    /// The run's config, as saved in its directory (with the `init` artefact's architecture
    /// filled in).
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn model(&self) -> &Model {
        &self.master
    }

    /// Trains until `config.steps` (or `stop_at`, if smaller) or until `stop` is raised; then
    /// writes a checkpoint so nothing is lost.
    pub fn run(&mut self, stop: &AtomicBool, stop_at: Option<u64>) -> Result<TrainOutcome> {
        let end = stop_at.map_or(self.cfg.steps, |s| s.min(self.cfg.steps));
        let mut batches = Prefetcher::start(
            PatchLoader::resume(self.train_files.clone(), self.loader_config(), self.step)?,
            self.checked.device,
            self.checked.model.noise_map(),
        )?;
        let bar = self.progress_bar(end);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join(LOG_FILE))
            .map_err(|source| TrainError::Io {
                path: self.run_dir.join(LOG_FILE),
                source,
            })?;
        if self.step == 0 && self.cfg.init.is_some() {
            // A fine-tune's starting point: the model it begins from is kept unless beaten.
            self.validate_and_log(&bar, &mut log)?;
        }
        let start = Instant::now();
        let first_step = self.step;
        let mut last_loss = f64::NAN;
        // The first plain progress line comes after the first step, then one a minute.
        let mut last_line: Option<Instant> = None;
        let mut times = StepTimes::default();
        let mut timer = if self.profile {
            PhaseTimer::on(self.checked.device)
        } else {
            PhaseTimer::off()
        };
        while self.step < end
            && !stop.load(Ordering::SeqCst)
            && self
                .cpu_budget
                .is_none_or(|budget| self.cost.cpu_seconds < budget)
        {
            let (step_start, step_cpu) = (Instant::now(), cpu_seconds());
            let batch = batches.next()?;
            let loaded = step_start.elapsed().as_secs_f64();
            let lr = self.cfg.optimizer.lr * self.cfg.schedule.factor(self.step, self.cfg.steps);
            let loss = self.train_step(&batch, lr, &mut timer)?;
            let wall = step_start.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - step_cpu;
            self.cost.seconds += wall;
            self.cost.cpu_seconds += cpu;
            times.add(loaded, wall - loaded, cpu, timer.phases());
            if !loss.is_finite() {
                // The step was not applied, so the weights are still step `self.step`'s.
                self.save_checkpoint()?;
                return Err(TrainError::Config(format!(
                    "loss became {loss} at step {}: lower the learning rate (the weights before \
                     that step are checkpointed; --resume would meet the same batch)",
                    self.step + 1
                )));
            }
            last_loss = loss;
            self.step += 1;
            self.history.push_loss(self.step, loss);
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            let rate = (self.step - first_step) as f64 * self.cfg.batch_size as f64 / elapsed;
            let mut line = serde_json::json!({
                "step": self.step, "loss": loss, "lr": lr, "patches_per_s": rate,
                "load_s": loaded, "step_s": wall - loaded, "cpu_s": cpu,
            });
            if !timer.phases().is_empty() {
                let phases: serde_json::Map<String, serde_json::Value> = timer
                    .phases()
                    .iter()
                    .map(|&(name, secs)| (name.to_owned(), secs.into()))
                    .collect();
                line["phases"] = phases.into();
            }
            writeln!(log, "{line}").map_err(|source| TrainError::Io {
                path: self.run_dir.join(LOG_FILE),
                source,
            })?;
            bar.set_position(self.step);
            bar.set_message(format!("loss {loss:.5}  {rate:.0} patches/s"));
            if !self.quiet
                && bar.is_hidden()
                && last_line.is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY)
            {
                // Output redirected (nohup, a log file): no bar is drawn, so say where we are.
                last_line = Some(Instant::now());
                eprintln!(
                    "step {}/{end}: loss {loss:.5}, {rate:.1} patches/s, {:.0} s elapsed",
                    self.step,
                    start.elapsed().as_secs_f64()
                );
            }
            if self.step % self.cfg.val_every == 0 || self.step == self.cfg.steps {
                self.validate_and_log(&bar, &mut log)?;
                self.save_checkpoint()?;
            } else if self.step % self.cfg.checkpoint_every == 0 {
                self.save_checkpoint()?;
            }
        }
        self.save_checkpoint()?;
        bar.finish_and_clear();
        let elapsed = start.elapsed().as_secs_f64().max(1e-9);
        Ok(TrainOutcome {
            step: self.step,
            finished: self.step >= self.cfg.steps,
            best_val_psnr: self.best_val_psnr,
            last_loss,
            patches_per_s: (self.step - first_step) as f64 * self.cfg.batch_size as f64 / elapsed,
            times,
        })
    }

    fn loader_config(&self) -> LoaderConfig {
        loader_config(&self.cfg, &self.checked)
    }

    /// One optimisation step on `batch` at learning rate `lr`; returns the loss.
    fn train_step(&mut self, batch: &Staged, lr: f64, timer: &mut PhaseTimer) -> Result<f64> {
        let device = self.checked.device;
        timer.start();
        // Queued without waiting where the batch is page-locked (CUDA); the same tensor on a CPU.
        let to_device = |t: &Tensor| t.f_to_device_(device, Kind::Float, true, false);
        let clean = to_device(&batch.clean)?;
        let noisy = to_device(&batch.noisy)?;
        let sigma = match (&batch.sigma, self.checked.model.noise_map()) {
            // A model that reads the level itself trains blind: its estimator learns from the
            // loss what level the body needs.
            _ if self.checked.model.estimates_level() => None,
            (Some(s), true) => Some(to_device(s)?),
            (None, true) => {
                return Err(TrainError::Config(format!(
                    "the {} model needs a noise-level map but noise '{}' gives none",
                    self.checked.model.kind(),
                    self.cfg.noise
                )));
            }
            (_, false) => None,
        };
        timer.mark("copy");
        optimisation_step(
            &self.master,
            self.shadow.as_ref(),
            self.ema.as_ref().map(|ema| (ema, self.cfg.ema_decay)),
            &mut self.adam,
            self.cfg.loss,
            &noisy,
            sigma.as_ref(),
            &clean,
            lr,
            self.checked.layout,
            timer,
        )
    }

    /// The weights that are validated and shipped: the moving average when there is one.
    fn shipped(&self) -> &Model {
        self.ema.as_ref().unwrap_or(&self.master)
    }

    /// Validates (keeping the best model), logs the scores and redraws the plots.
    fn validate_and_log(
        &mut self,
        bar: &indicatif::ProgressBar,
        log: &mut std::fs::File,
    ) -> Result<()> {
        let scores = self.validate_and_keep_best()?;
        self.history.push_val(ValPoint {
            step: self.step,
            psnr: scores.psnr,
            noisy_psnr: scores.noisy_psnr,
            cpu_s: Some(self.cost.cpu_seconds),
        });
        let title = plot::run_title(&self.cfg);
        if let Err(e) = plot::write_plots(&self.history, &self.run_dir, &title) {
            // A plot is a convenience: training goes on without it.
            say(bar, format!("warning: {e}"));
        }
        writeln!(log, "{}", serde_json::json!({"step": self.step, "val_psnr": scores.psnr, "val_ssim": scores.ssim, "noisy_psnr": scores.noisy_psnr, "train_s": self.cost.seconds, "train_cpu_s": self.cost.cpu_seconds}))
                .map_err(|source| TrainError::Io { path: self.run_dir.join(LOG_FILE), source })?;
        if !self.quiet {
            say(
                bar,
                format!(
                    "step {:>7}: val PSNR {:.2} dB (noisy {:.2}), SSIM {:.4}, best {:.2}, {:.1} CPU-min",
                    self.step,
                    scores.psnr,
                    scores.noisy_psnr,
                    scores.ssim,
                    self.best_val_psnr.unwrap_or(f64::NAN),
                    self.cost.cpu_seconds / 60.0
                ),
            );
        }
        Ok(())
    }

    /// Validates the shipped weights, writes them as [`LAST_MODEL_FILE`], and as
    /// `model.safetensors` too when they score best so far.
    fn validate_and_keep_best(&mut self) -> Result<ValScores> {
        let scores = self.val.score(self.shipped())?;
        let best = self.best_val_psnr.is_none_or(|best| scores.psnr > best);
        if best {
            self.best_val_psnr = Some(scores.psnr);
        }
        let mut meta = Metadata::new(self.shipped().config());
        meta.noise = Some(self.cfg.noise.clone());
        meta.val_psnr = Some(scores.psnr);
        meta.training = Some(serde_json::json!({
            "manifest": self.cfg.data,
            "train_images": self.train_files.len(),
            "steps": self.step,
            "batch_size": self.cfg.batch_size,
            "patch_size": self.cfg.patch_size,
            "val_noise": self.checked.val_noise.to_string(),
            "precision": self.cfg.precision,
            "train_seconds": self.cost.seconds,
            "train_cpu_seconds": self.cost.cpu_seconds,
            "ema_decay": self.cfg.ema_decay,
            "loss": self.cfg.loss,
        }));
        if let (Some(init), Some(serde_json::Value::Object(training))) =
            (&self.cfg.init, meta.training.as_mut())
        {
            training.insert("init".into(), serde_json::json!(init));
        }
        artefact::save(self.shipped(), &meta, &self.run_dir.join(LAST_MODEL_FILE))?;
        if best {
            artefact::save(
                self.shipped(),
                &meta,
                &self.run_dir.join(artefact::FILE_NAME),
            )?;
        }
        Ok(scores)
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        if self.saved_step == Some(self.step) {
            return Ok(());
        }
        let mut tensors: Vec<(String, Tensor)> = self
            .master
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t))
            .collect();
        tensors.extend(
            self.adam
                .state()
                .into_iter()
                .map(|(k, t)| (format!("optim.{k}"), t)),
        );
        if let Some(ema) = &self.ema {
            tensors.extend(
                ema.var_store()
                    .variables()
                    .into_iter()
                    .map(|(k, t)| (format!("{EMA_PREFIX}{k}"), t)),
            );
        }
        let meta = CheckpointMeta::new(
            self.step,
            self.adam.step,
            self.best_val_psnr,
            self.cost,
            &self.cfg,
        );
        checkpoint::save_keeping_previous(&self.run_dir, &meta, &tensors)?;
        self.saved_step = Some(self.step);
        Ok(())
    }

    fn progress_bar(&self, end: u64) -> indicatif::ProgressBar {
        if self.quiet {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(end);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(self.step);
        bar
    }
}

/// The number of cores libtorch uses by default, if the platform says.
fn cpu_cores() -> Option<i32> {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| i32::try_from(n.get()).ok())
}

/// Process CPU seconds so far, 0 where the platform cannot say (the cost then records 0).
fn cpu_seconds() -> f64 {
    denoise_models::perf::process_cpu_seconds().unwrap_or(0.0)
}

/// How often a run whose output is not a terminal prints a progress line.
const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Prints a line above the bar, or to stderr when the bar is hidden because the output is not a
/// terminal (indicatif drops `println` on a hidden bar, which would lose validation lines in logs).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The fp32 master model and, for bf16 training, its bf16 shadow, weights in `layout`.
pub(crate) fn master_and_shadow(
    config: &ModelConfig,
    device: Device,
    precision: Precision,
    layout: Layout,
) -> Result<(Model, Option<Model>)> {
    let mut master = Model::new(config, device)?;
    master.set_layout(layout);
    let shadow = match precision {
        Precision::Fp32 => None,
        Precision::Bf16 => {
            let mut m = Model::new(config, device)?;
            m.set_precision(Precision::Bf16);
            m.set_layout(layout);
            Some(m)
        }
    };
    Ok((master, shadow))
}

/// An fp32 model in `layout` to hold the moving average of a master's weights.
pub(crate) fn ema_model(config: &ModelConfig, device: Device, layout: Layout) -> Result<Model> {
    let mut ema = Model::new(config, device)?;
    ema.set_layout(layout);
    Ok(ema)
}

/// The trainable variables of `model`, by name (what Adam optimises).
pub(crate) fn trainable(model: &Model) -> BTreeMap<String, Tensor> {
    model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// One Adam step of `master` on (`noisy`, `sigma`) -> `clean` at rate `lr`; returns the loss.
/// With a bf16 `shadow`, the forward and backward passes run on the shadow (refreshed from the
/// fp32 master weights first) and Adam updates the fp32 master. Inputs are laid out in
/// `layout` here (the weights' layout, see [`master_and_shadow`]). With `ema` = (model, decay),
/// the moving average is updated after the step ([`ema_decay_at`]). A non-finite loss is returned
/// without touching the weights, the average or Adam's state. `timer` marks the phases (see
/// [`crate::timing`]). The training loop and the training bench both call this.
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimisation_step(
    master: &Model,
    shadow: Option<&Model>,
    ema: Option<(&Model, f64)>,
    adam: &mut Adam,
    loss: Loss,
    noisy: &Tensor,
    sigma: Option<&Tensor>,
    clean: &Tensor,
    lr: f64,
    layout: Layout,
    timer: &mut PhaseTimer,
) -> Result<f64> {
    let net = match shadow {
        Some(shadow) => {
            copy_vars(master, shadow, true);
            shadow
        }
        None => master,
    };
    let kind = net.precision().kind();
    let x = layout.apply(&noisy.to_kind(kind));
    let map = sigma.map(|s| s.to_kind(kind));
    for mut var in net.var_store().trainable_variables() {
        var.zero_grad();
    }
    // The forward pass updates batch-norm running statistics in place; keep a copy to put back
    // if the step is refused (a bf16 shadow's statistics reach the master only after the step).
    let buffers: Vec<(Tensor, Tensor)> = match shadow {
        Some(_) => Vec::new(),
        None => master
            .var_store()
            .variables()
            .into_values()
            .filter(|t| !t.requires_grad())
            .map(|t| {
                let saved = t.copy();
                (t, saved)
            })
            .collect(),
    };
    timer.mark("prepare");
    let out = net.forward_t(&x, map.as_ref(), true);
    // The loss weighs with the fp32 map (the model's copy may be bf16).
    let loss = loss.compute(&out, clean, sigma);
    timer.mark("forward");
    loss.f_backward()?;
    timer.mark("backward");
    // Read after the backward pass is queued, so a GPU is not left idle waiting for this read;
    // NaN gradients touch no weight until Adam's update below.
    let value = loss.f_double_value(&[])?;
    timer.mark("read");
    if !value.is_finite() {
        // Applying this step would turn every weight into NaN, and the caller's checkpoint
        // would then overwrite the last good one: leave the weights and moments as they are.
        tch::no_grad(|| {
            for (mut t, saved) in buffers {
                t.copy_(&saved);
            }
        });
        return Ok(value);
    }
    let grads: BTreeMap<String, Tensor> = net
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.grad()))
        .filter(|(_, g)| g.defined())
        .collect();
    // The gradient norm it returns stays unread: reading it would wait for a GPU.
    let _norm = adam.step(&grads, lr);
    timer.mark("update");
    if let Some(shadow) = shadow {
        // Batch-norm running statistics are updated in the shadow's forward pass.
        copy_vars(shadow, master, false);
    }
    if let Some((ema, decay)) = ema {
        update_ema(master, ema, ema_decay_at(decay, adam.step));
    }
    timer.mark("average");
    Ok(value)
}

/// Opens the history of a run: a fresh run starts an empty log; a run resumed from the
/// checkpoint of `resumed_at` keeps the lines up to that step (later ones are redone).
fn loader_config(cfg: &TrainConfig, checked: &Checked) -> LoaderConfig {
    let mut lc = LoaderConfig::new(checked.noise.clone());
    lc.patch_size = cfg.patch_size;
    lc.patches_per_image = cfg.patches_per_image;
    lc.batch_size = cfg.batch_size;
    lc.channels = checked.model.channels() as usize;
    lc.augment = cfg.augment.clone();
    lc.seed = cfg.seed;
    lc.workers = cfg.workers;
    lc
}

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

fn start_log(path: &Path, resumed_at: Option<u64>) -> Result<History> {
    let io_err = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let Some(step) = resumed_at else {
        if path.exists() {
            std::fs::remove_file(path).map_err(io_err)?;
        }
        return Ok(History::default());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(e)),
    };
    let kept = plot::log_up_to(&text, step);
    if kept != text {
        denoise_data::io::write_atomic(path, kept.as_bytes())?;
    }
    Ok(History::parse(&kept))
}

fn copy_vars(from: &Model, to: &Model, trainable: bool) {
    let src = from.var_store().variables();
    tch::no_grad(|| {
        for (name, mut dst) in to.var_store().variables() {
            if dst.requires_grad() == trainable {
                if let Some(s) = src.get(&name) {
                    dst.copy_(s);
                }
            }
        }
    });
}

/// The checkpoint's prefix for the moving average's tensors (the master's is `model.`).
const EMA_PREFIX: &str = "ema.";

/// The decay of the moving average after optimizer step `t`: `decay`, lowered in the first
/// steps so that the random initialisation is forgotten quickly.
fn ema_decay_at(decay: f64, t: u64) -> f64 {
    decay.min((1 + t) as f64 / (10 + t) as f64)
}

/// `ema = decay * ema + (1 - decay) * master` for the trainable weights; buffers (batch-norm
/// running statistics) are copied as they are.
fn update_ema(master: &Model, ema: &Model, decay: f64) {
    let src = master.var_store().variables();
    tch::no_grad(|| {
        for (name, mut dst) in ema.var_store().variables() {
            let Some(s) = src.get(&name) else { continue };
            if s.requires_grad() && decay > 0.0 {
                let _ = dst.lerp_(s, 1.0 - decay);
            } else {
                dst.copy_(s);
            }
        }
    });
}

/// Loads the `PREFIXNAME` tensors of a checkpoint into `model`.
fn restore_model(
    model: &Model,
    tensors: &BTreeMap<String, Tensor>,
    prefix: &str,
) -> std::result::Result<(), String> {
    tch::no_grad(|| {
        for (name, mut var) in model.var_store().variables() {
            let key = format!("{prefix}{name}");
            let src = tensors
                .get(&key)
                .ok_or_else(|| format!("missing tensor '{key}'"))?;
            if src.size() != var.size() {
                return Err(format!(
                    "tensor '{key}' has shape {:?}, the model needs {:?}",
                    src.size(),
                    var.size()
                ));
            }
            var.copy_(src);
        }
        Ok(())
    })
}

/// `model` with its level-estimation branch taken off.
fn without_estimator(model: &ModelConfig) -> ModelConfig {
    match model {
        ModelConfig::Ffdnet(c) => ModelConfig::Ffdnet(denoise_models::ffdnet::FfdnetConfig {
            estimator: None,
            ..c.clone()
        }),
        other => other.clone(),
    }
}

/// Loads the `init` artefact (on the CPU; its weights are copied into the run's model). A config
/// without `[model]` takes the artefact's architecture; one with a different `[model]` is refused,
/// since the weights would not fit it.
fn load_init(cfg: &mut TrainConfig, path: &Path) -> Result<Model> {
    let art = artefact::load(path, Device::Cpu)?;
    match &cfg.model {
        None => cfg.model = Some(art.metadata.model.clone()),
        // A gray model started from a colour one of the same architecture.
        Some(want) if art.metadata.model.gray_twin().as_ref() == Some(want) => {
            return Ok(denoise_models::ffdnet::gray_from_colour(&art.model)?);
        }
        // An estimator added to a model: the body starts from the artefact, the estimator fresh.
        Some(want) if without_estimator(want) == art.metadata.model && want.estimates_level() => {}
        Some(model) if *model != art.metadata.model => {
            let show = |m: &ModelConfig| serde_json::to_string(m).unwrap_or_default();
            return Err(TrainError::Config(format!(
                "init '{}' is a {} model that does not match the run's [model] {}: leave out \
                 [model] and --model to fine-tune the artefact's own architecture",
                art.path.display(),
                show(&art.metadata.model),
                show(model)
            )));
        }
        Some(_) => {}
    }
    Ok(art.model)
}

/// The training and validation files of a manifest, as absolute paths.
fn manifest_split(path: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let manifest = denoise_data::manifest::Manifest::load(path)?;
    Ok((manifest.train_paths(), manifest.validation_paths()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use denoise_data::Image;
    use denoise_data::manifest::{PrepareConfig, prepare};

    /// A manifest over 6 generated 48x48 RGB images (smooth gradients and stripes).
    fn manifest(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..6 {
            let img = Image::from_fn(3, 48, 48, |c, y, x| {
                let f = (i + 1) as f32;
                (0.5 + 0.4 * ((x as f32 * f * 0.07 + c as f32).sin() * (y as f32 * 0.05 * f).cos()))
                    .clamp(0.0, 1.0)
            });
            denoise_data::io::save(
                src.join(format!("{i}.png")),
                &img,
                None,
                denoise_data::io::BitDepth::Eight,
            )
            .unwrap();
        }
        let mut cfg = PrepareConfig::new(&src, dir.join("data"));
        cfg.val_fraction = 0.34;
        prepare(&cfg, &|_| {}).unwrap().manifest_path
    }

    fn config(data: PathBuf, steps: u64) -> TrainConfig {
        TrainConfig {
            data,
            model: Some(
                serde_json::from_str(
                    r#"{"kind":"dncnn","depth":4,"features":16,"batch_norm":false}"#,
                )
                .unwrap(),
            ),
            noise: "gaussian:25".into(),
            patch_size: 16,
            patches_per_image: 4,
            batch_size: 8,
            steps,
            val_every: 10,
            val_images: 2,
            checkpoint_every: 5,
            device: "cpu".into(),
            workers: 1,
            optimizer: crate::optim::OptimizerConfig {
                lr: 2e-3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn weights(model: &Model) -> BTreeMap<String, Tensor> {
        model.var_store().variables().into_iter().collect()
    }

    /// Detached copies, unlike [`weights`] (whose tensors share storage with the model's, so
    /// they follow every in-place update).
    fn frozen(named: impl IntoIterator<Item = (String, Tensor)>) -> BTreeMap<String, Tensor> {
        named
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect()
    }

    #[test]
    fn the_training_layout_changes_speed_not_the_step() {
        let _rng = crate::test_rng_lock();
        // RIDNet has both kinds of layer the layouts treat differently: dilated 3x3 convs and
        // the attention's 1x1 convs on pooled features.
        let model = ModelConfig::Ridnet(denoise_models::config::RidnetConfig {
            features: 8,
            blocks: 1,
            reduction: 4,
            ..Default::default()
        });
        let opts = (tch::Kind::Float, Device::Cpu);
        tch::manual_seed(7);
        let clean = Tensor::rand([2, 3, 16, 16], opts);
        let noisy = &clean + Tensor::randn([2, 3, 16, 16], opts) * 0.1;
        let mut after = Vec::new();
        for layout in [Layout::ChannelsLast, Layout::Nchw] {
            tch::manual_seed(0);
            let (master, _) =
                master_and_shadow(&model, Device::Cpu, Precision::Fp32, layout).unwrap();
            let mut adam = Adam::new(crate::optim::OptimizerConfig::default(), trainable(&master));
            let mut step = || {
                optimisation_step(
                    &master,
                    None,
                    None,
                    &mut adam,
                    Loss::Mse,
                    &noisy,
                    None,
                    &clean,
                    1e-3,
                    layout,
                    &mut PhaseTimer::off(),
                )
                .unwrap()
            };
            let (first, second) = (step(), step());
            after.push((first, second, weights(&master)));
        }
        let (cl, nchw) = (&after[0], &after[1]);
        assert!(
            (cl.0 - nchw.0).abs() < 1e-6 * cl.0.max(1e-3),
            "{} vs {}",
            cl.0,
            nchw.0
        );
        assert!(
            (cl.1 - nchw.1).abs() < 1e-5 * cl.1.max(1e-3),
            "{} vs {}",
            cl.1,
            nchw.1
        );
        assert!(cl.1 < cl.0, "a step lowers the loss: {} -> {}", cl.0, cl.1);
        for (name, w) in &cl.2 {
            let diff = (w - &nchw.2[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
    }

    #[test]
    fn a_tiny_model_learns_and_keeps_its_best() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let run = dir.path().join("run");
        let mut trainer = Trainer::new(config(data, 200), &run, false)
            .unwrap()
            .quiet(true)
            .profile(true);
        let before = trainer.val.score(trainer.model()).unwrap();
        let outcome = trainer.run(&AtomicBool::new(false), None).unwrap();
        assert!(outcome.finished);
        assert_eq!(outcome.times.steps, 200);
        let phases: Vec<&str> = outcome.times.phases.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            phases,
            [
                "copy", "prepare", "forward", "backward", "read", "update", "average"
            ]
        );
        let after = trainer.val.score(trainer.model()).unwrap();
        assert!(
            after.psnr > before.psnr + 1.0,
            "val PSNR {:.2} -> {:.2}",
            before.psnr,
            after.psnr
        );
        assert!(
            after.psnr > after.noisy_psnr,
            "denoised {:.2} vs noisy {:.2}",
            after.psnr,
            after.noisy_psnr
        );
        let log = std::fs::read_to_string(run.join("train.jsonl")).unwrap();
        assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 200);
        let step: serde_json::Value =
            serde_json::from_str(log.lines().find(|l| l.contains("\"loss\"")).unwrap()).unwrap();
        for key in ["load_s", "step_s", "cpu_s"] {
            assert!(
                step[key].as_f64().is_some_and(|s| s >= 0.0),
                "{key} in {step}"
            );
        }
        assert!(step["phases"]["backward"].as_f64().is_some(), "{step}");
        for name in [plot::LOSS_PLOT, plot::PSNR_PLOT] {
            assert!(run.join(name).is_file(), "{name} missing");
        }
        let best = artefact::load(&run, tch::Device::Cpu).unwrap();
        assert_eq!(best.metadata.val_psnr, outcome.best_val_psnr);
        // The last validation's weights are kept as well, with its score and step.
        let last = artefact::load(&run.join(LAST_MODEL_FILE), tch::Device::Cpu).unwrap();
        let val_lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| l.contains("\"val_psnr\""))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let final_val = val_lines.last().expect("validated");
        assert_eq!(last.metadata.val_psnr, final_val["val_psnr"].as_f64());
        assert_eq!(
            last.metadata.training.as_ref().unwrap()["steps"],
            final_val["step"]
        );
        // A second run into the same directory must not clobber it.
        assert!(Trainer::new(config(trainer.cfg.data.clone(), 60), &run, false).is_err());
    }

    #[test]
    fn a_non_finite_loss_leaves_the_weights_and_moments_alone() {
        let _rng = crate::test_rng_lock();
        let model = Model::new(
            &ModelConfig::Dncnn(denoise_models::config::DncnnConfig {
                channels: 1,
                depth: 3,
                features: 4,
                ..Default::default()
            }),
            Device::Cpu,
        )
        .unwrap();
        let ema = ema_model(model.config(), Device::Cpu, Layout::Nchw).unwrap();
        let mut adam = Adam::new(crate::optim::OptimizerConfig::default(), trainable(&model));
        let clean = Tensor::rand([2, 1, 8, 8], (tch::Kind::Float, Device::Cpu));
        // Profiled, so the phases show where a refused step stops.
        let mut timer = PhaseTimer::on(Device::Cpu);
        let mut step = |adam: &mut Adam, noisy: &Tensor| {
            timer.start();
            let loss = optimisation_step(
                &model,
                None,
                Some((&ema, 0.5)),
                adam,
                Loss::Mse,
                noisy,
                None,
                &clean,
                1e-3,
                Layout::Nchw,
                &mut timer,
            )
            .unwrap();
            let phases: Vec<_> = timer.phases().iter().map(|p| p.0).collect();
            (loss, phases)
        };
        let (loss, phases) = step(&mut adam, &(&clean + 0.1));
        assert!(loss.is_finite());
        assert_eq!(
            phases,
            [
                "prepare", "forward", "backward", "read", "update", "average"
            ]
        );
        let before = frozen(weights(&model));
        let average = frozen(weights(&ema));
        let moments = frozen(adam.state());
        let bad = &clean + 0.1;
        let _ = bad.get(0).get(0).get(3).get(3).fill_(f64::NAN);
        let (loss, phases) = step(&mut adam, &bad);
        assert!(loss.is_nan());
        assert_eq!(phases, ["prepare", "forward", "backward", "read"]);
        for (name, w) in weights(&model) {
            assert!(w.equal(&before[&name]), "{name} changed");
        }
        assert_eq!(adam.step, 1, "the skipped step is not counted");
        for (name, t) in weights(&ema) {
            assert!(t.equal(&average[&name]), "average {name} changed");
        }
        for (name, m) in adam.state() {
            assert!(m.equal(&moments[&name]), "moment {name} changed");
        }
    }

    #[test]
    fn a_model_file_that_cannot_be_written_stops_the_run_naming_it_as_a_write() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let run = dir.path().join("run");
        let mut trainer = Trainer::new(config(data, 10), &run, false)
            .unwrap()
            .quiet(true);
        // A folder in its place makes the first validation's write fail, as a full disk would.
        let blocked = run.join(LAST_MODEL_FILE);
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("kept"), b"").unwrap();
        let err = trainer
            .run(&AtomicBool::new(false), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("failed to write '{}': ", blocked.display())),
            "{err}"
        );
        let left: Vec<String> = std::fs::read_dir(&run)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_second_trainer_on_a_run_in_use_is_refused_until_the_first_ends() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let run = dir.path().join("run");
        let mut first = Trainer::new(config(data.clone(), 2), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        let err = Trainer::new(config(data.clone(), 4), &run, true)
            .err()
            .expect("the run is in use");
        assert!(err.to_string().contains("another process"), "{err}");
        drop(first);
        assert!(Trainer::new(config(data, 4), &run, true).is_ok());
    }

    #[test]
    fn a_cpu_budget_stops_the_run_resumably() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let run = dir.path().join("run");
        let mut trainer = Trainer::new(config(data.clone(), 20), &run, false)
            .unwrap()
            .quiet(true)
            .cpu_budget(Some(1e-9));
        let outcome = trainer.run(&stop, None).unwrap();
        assert_eq!(outcome.step, 1, "one step spends any positive budget");
        assert!(!outcome.finished);
        let spent = trainer.cost().cpu_seconds;
        drop(trainer);
        let mut more = Trainer::new(config(data, 20), &run, true)
            .unwrap()
            .quiet(true)
            .cpu_budget(Some(spent + 1e-9));
        assert_eq!(
            more.run(&stop, None).unwrap().step,
            2,
            "the budget counts over resumes"
        );
    }

    #[test]
    fn the_moving_average_follows_its_formula() {
        let _rng = crate::test_rng_lock();
        let cfg = ModelConfig::Dncnn(denoise_models::config::DncnnConfig {
            channels: 1,
            depth: 3,
            features: 4,
            batch_norm: true,
            ..Default::default()
        });
        let (master, ema) = (
            Model::new(&cfg, Device::Cpu).unwrap(),
            Model::new(&cfg, Device::Cpu).unwrap(),
        );
        let learnt = trainable(&master);
        tch::no_grad(|| {
            for (name, mut t) in weights(&master) {
                if !learnt.contains_key(&name) {
                    // Fresh statistics are equal in both models: make the master's differ.
                    let _ = t.fill_(0.5);
                }
            }
        });
        let (w, e) = (frozen(weights(&master)), frozen(weights(&ema)));
        update_ema(&master, &ema, 0.75);
        let mut buffers = 0;
        for (name, got) in weights(&ema) {
            let want = if learnt.contains_key(&name) {
                &e[&name] * 0.75 + &w[&name] * 0.25
            } else {
                buffers += 1;
                w[&name].copy()
            };
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name} differs by {diff}");
        }
        assert!(buffers > 0, "batch-norm statistics are copied");
        update_ema(&master, &ema, 0.0);
        for (name, t) in weights(&ema) {
            assert!(t.equal(&w[&name]), "decay 0 copies {name}");
        }
        assert_eq!(ema_decay_at(0.999, 0), 0.1);
        assert_eq!(ema_decay_at(0.999, 90), 0.91);
        assert_eq!(ema_decay_at(0.999, 1_000_000), 0.999);
    }

    #[test]
    fn resume_gives_the_weights_of_an_uninterrupted_run() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        // With a moving average, which the checkpoint must carry too.
        let config = |data: PathBuf, steps| TrainConfig {
            ema_decay: 0.9,
            ..config(data, steps)
        };
        let mut straight = Trainer::new(config(data.clone(), 20), &dir.path().join("a"), false)
            .unwrap()
            .quiet(true);
        straight.run(&stop, None).unwrap();

        let run_b = dir.path().join("b");
        let mut first = Trainer::new(config(data.clone(), 20), &run_b, false)
            .unwrap()
            .quiet(true);
        assert_eq!(first.run(&stop, Some(10)).unwrap().step, 10);
        let first_cost = first.cost();
        assert!(first_cost.seconds > 0.0 && first_cost.cpu_seconds > 0.0);
        drop(first); // as if the process had been killed after its step-10 checkpoint...
        // ...having logged two more steps that the resumed run must redo, not duplicate.
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(run_b.join(LOG_FILE))
            .unwrap();
        writeln!(log, "{{\"step\":11,\"loss\":0.5}}\n{{\"step\":12,\"lo").unwrap();
        let mut resumed = Trainer::new(config(data, 20), &run_b, true)
            .unwrap()
            .quiet(true);
        assert_eq!(resumed.step(), 10);
        assert_eq!(
            resumed.cost(),
            first_cost,
            "the cost resumes from the checkpoint"
        );
        resumed.run(&stop, None).unwrap();
        assert!(resumed.cost().seconds > first_cost.seconds);

        let log = std::fs::read_to_string(run_b.join(LOG_FILE)).unwrap();
        let steps: Vec<u64> = log
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, (1..=20).collect::<Vec<_>>());

        for (a, b) in [
            (straight.model(), resumed.model()),
            (straight.shipped(), resumed.shipped()),
        ] {
            let (a, b) = (weights(a), weights(b));
            for (name, wa) in &a {
                let diff = (wa - &b[name]).abs().max().double_value(&[]);
                // Same data, same Adam state: identical up to non-associative float reductions.
                assert!(diff < 1e-5, "{name} differs by {diff}");
            }
        }
        let (raw, average) = (weights(resumed.model()), weights(resumed.shipped()));
        assert!(
            raw.iter().any(|(name, w)| !w.equal(&average[name])),
            "the average is not the raw weights"
        );
    }

    #[test]
    fn a_run_directory_is_never_overwritten_or_resumed_as_another_run() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let run = dir.path().join("run");
        let mut first = Trainer::new(config(data.clone(), 12), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        drop(first);
        let best = std::fs::read(run.join(artefact::FILE_NAME)).unwrap();

        // Without its checkpoints, the best model and the log still make it a run.
        for name in [checkpoint::FILE_NAME, checkpoint::PREVIOUS_FILE_NAME] {
            std::fs::remove_file(run.join(name)).unwrap();
        }
        let err = Trainer::new(config(data.clone(), 12), &run, false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("already holds a run"), "{err}");
        assert_eq!(std::fs::read(run.join(artefact::FILE_NAME)).unwrap(), best);
        assert!(run.join(LOG_FILE).is_file(), "the log is kept");

        // A resume under a config that trains something else is refused, naming the field.
        let run = dir.path().join("run2");
        let mut first = Trainer::new(config(data.clone(), 10), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        drop(first);
        // The validation noise is saved resolved, so a later default cannot change it.
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(saved.contains("val_noise = \"gaussian:25\""), "{saved}");
        let mut other = config(data.clone(), 10);
        other.noise = "gaussian:50".into();
        let err = Trainer::new(other, &run, true).err().expect("refused");
        assert!(err.to_string().contains("noise"), "{err}");
        // A default made explicit is the same run.
        let mut explicit = config(data.clone(), 10);
        explicit.val_noise = Some("gaussian:25".into());
        assert!(Trainer::new(explicit, &run, true).is_ok());
        // Extending it is allowed, and says what happens to the schedule.
        let longer = Trainer::new(config(data.clone(), 20), &run, true).unwrap();
        assert_eq!(longer.step(), 10);
        assert!(
            longer
                .warnings()
                .iter()
                .any(|w| w.contains("planned for 10 steps and now for 20")),
            "{:?}",
            longer.warnings()
        );

        // A damaged latest checkpoint falls back to the previous one, and says so.
        drop(longer);
        let latest = run.join(checkpoint::FILE_NAME);
        let bytes = std::fs::read(&latest).unwrap();
        std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
        let resumed = Trainer::new(config(data.clone(), 10), &run, true).unwrap();
        assert_eq!(resumed.step(), 5, "the previous checkpoint (every 5 steps)");
        assert!(
            resumed
                .warnings()
                .iter()
                .any(|w| w.contains("previous checkpoint")),
            "{:?}",
            resumed.warnings()
        );
        assert!(!latest.exists() && run.join("checkpoint.damaged.safetensors").is_file());

        // Images smaller than a patch are refused before the run directory is made.
        let mut big = config(data, 10);
        big.patch_size = 64;
        let fresh = dir.path().join("run3");
        let err = Trainer::new(big, &fresh, false).err().expect("refused");
        assert!(err.to_string().contains("can be used"), "{err}");
        assert!(!fresh.exists());
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

    #[test]
    fn a_run_can_start_from_a_trained_model() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let base = dir.path().join("base");
        let mut first = Trainer::new(config(data.clone(), 10), &base, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        drop(first);
        let trained = artefact::load(&base, Device::Cpu).unwrap();

        // Without [model], the run takes the artefact's architecture and weights, from step 0.
        let mut tune = config(data.clone(), 10);
        tune.model = None;
        tune.noise = "gaussian:0-55".into();
        tune.init = Some(base.join(artefact::FILE_NAME));
        let run = dir.path().join("tune");
        let mut tuned = Trainer::new(tune.clone(), &run, false).unwrap().quiet(true);
        assert_eq!(tuned.step(), 0);
        let (start, reference) = (weights(tuned.model()), weights(&trained.model));
        assert_eq!(
            start.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        );
        for (name, t) in &start {
            assert!(t.equal(&reference[name]), "{name} is not the artefact's");
        }
        let saved = TrainConfig::from_file(&run.join("config.toml")).unwrap();
        assert_eq!(saved.model.as_ref(), Some(&trained.metadata.model));
        assert_eq!(saved.init, tune.init);
        tuned.run(&stop, None).unwrap();
        drop(tuned);
        // The starting point is validated first, so the fine-tune keeps it unless beaten.
        let log = std::fs::read_to_string(run.join(LOG_FILE)).unwrap();
        let first_val = History::parse(&log).val_points().next().copied().unwrap();
        assert_eq!(first_val.step, 0);
        let meta = artefact::read_metadata(&run).unwrap();
        assert_eq!(
            meta.training.unwrap()["init"],
            serde_json::json!(base.join(artefact::FILE_NAME))
        );
        // A resume continues from its own checkpoint (step 10), not from the artefact again,
        // also from the fine-tune's own config, which has no [model].
        let resumed = Trainer::new(tune.clone(), &run, true).unwrap();
        assert_eq!(resumed.step(), 10);
        let now = weights(resumed.model());
        assert!(reference.iter().any(|(name, t)| !t.equal(&now[name])));

        // Another architecture is refused, and so is a path that is not a model.
        let mut other = config(data.clone(), 10);
        other.model = Some(
            serde_json::from_str(r#"{"kind":"dncnn","depth":5,"features":16,"batch_norm":false}"#)
                .unwrap(),
        );
        other.init = tune.init.clone();
        let err = Trainer::new(other, &dir.path().join("x"), false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not match"), "{err}");
        let mut missing = tune;
        missing.init = Some(dir.path().join("nope.safetensors"));
        let err = Trainer::new(missing, &dir.path().join("y"), false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("nope.safetensors"), "{err}");
        assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
    }

    #[test]
    fn bf16_mixed_precision_trains() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let mut cfg = config(data, 30);
        cfg.precision = Precision::Bf16;
        let mut trainer = Trainer::new(cfg, &dir.path().join("run"), false)
            .unwrap()
            .quiet(true);
        let before = trainer.val.score(trainer.model()).unwrap();
        trainer.run(&AtomicBool::new(false), None).unwrap();
        let after = trainer.val.score(trainer.model()).unwrap();
        assert!(
            after.psnr > before.psnr + 1.0,
            "val PSNR {:.2} -> {:.2}",
            before.psnr,
            after.psnr
        );
    }
}
