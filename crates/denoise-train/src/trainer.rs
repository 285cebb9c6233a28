//! The training loop: patches from the data crate's loader, forward/backward in fp32 or bf16
//! mixed precision ([`crate::weights`]), periodic validation keeping the best model, atomic
//! checkpoints, exact resume, and a clean stop on request (Ctrl-C). [`Trainer::new`] assembles a
//! run from its parts: the run directory's checks ([`crate::run_dir`]), the starting model of a
//! fine-tune ([`crate::init`]), the weights and their moving average ([`crate::ema`]), the
//! checkpoint to resume from, and the log ([`crate::log`]).

use crate::checkpoint::{self, Checkpoint, CheckpointMeta, TrainCost};
use crate::config::{Checked, TrainConfig};
use crate::ema::MovingAverage;
use crate::init;
use crate::log::{self, Progress, RunLog};
use crate::loss::Loss;
use crate::optim::Adam;
use crate::plot::{self, History, ValPoint};
use crate::run_dir::{RunDir, RunLock};
use crate::staging::{Prefetcher, Staged};
use crate::timing::{PhaseTimer, StepTimes};
use crate::validate::{ValScores, ValidationSet};
use crate::weights::{self, Weights};
use crate::{Result, TrainError};
use denoise_data::loader::{LoaderConfig, PatchLoader};
use denoise_models::artefact::{self, Metadata};
use denoise_models::{Layout, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use crate::run_dir::{LAST_MODEL_FILE, LOCK_FILE, LOG_FILE};

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

/// A training run in its [`RunDir`].
pub struct Trainer {
    cfg: TrainConfig,
    checked: Checked,
    run: RunDir,
    weights: Weights,
    /// The moving average of the master weights (`ema_decay` > 0): validated and shipped.
    ema: Option<MovingAverage>,
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
    _lock: RunLock,
}

/// Sets libtorch's process-wide state for training with `cfg`: the seed of its global random
/// generator, from which a new model's initial weights are drawn, and its thread count
/// ([`TrainConfig::threads`]; on a GPU one thread unless the process already chose a count,
/// since the host there only fills and copies batches). Call it before [`Trainer::new`], which
/// leaves global state alone.
pub fn set_up_libtorch(cfg: &TrainConfig) -> Result<()> {
    let device = crate::config::parse_device(&cfg.device)?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    } else if device.is_cuda() && cpu_cores().is_some_and(|n| tch::get_num_threads() == n) {
        // Idle libtorch threads would spin after each parallel fill instead (most of a 16-core
        // host stayed busy), beside the loader's workers and the thread that launches kernels.
        tch::set_num_threads(1);
    }
    tch::manual_seed(cfg.seed as i64);
    Ok(())
}

impl Trainer {
    /// Checks the config, the starting model of a fine-tune, the run directory and the data,
    /// takes the run directory (created if need be, and locked), builds the model and optimizer
    /// (or, with `resume`, restores them from the run's checkpoint) and saves the run's config.
    /// Everything that can be refused is refused before training. The initial weights come
    /// from libtorch's global generator: call [`set_up_libtorch`] first for a seeded run.
    pub fn new(mut cfg: TrainConfig, run_dir: &Path, resume: bool) -> Result<Self> {
        let run = RunDir::new(run_dir);
        // A resumed run's weights come from its checkpoint, whatever it started from.
        let start = match cfg.init.clone() {
            Some(path) if !resume => Some(init::load(&mut cfg, &path)?),
            _ => None,
        };
        if !cfg.freeze.is_empty() && !resume && start.is_none() {
            return Err(TrainError::Config(
                "freeze keeps weights as the starting model has them: give --init MODEL".into(),
            ));
        }
        if resume {
            run.reconcile(&mut cfg);
        }
        let checked = cfg.validate()?;
        let (train_files, val_files) = manifest_split(&cfg.data)?;
        if train_files.is_empty() {
            return Err(TrainError::Config(format!(
                "manifest '{}' has no training images",
                cfg.data.display()
            )));
        }
        let mut warnings = Vec::new();
        let resumed = if resume {
            let accepted = run.resume(&cfg)?;
            warnings.extend(accepted.warnings);
            Some((accepted.checkpoint, accepted.path))
        } else {
            run.refuse_existing_run()?;
            None
        };
        warnings.extend(check_training_images(&cfg, &checked, &train_files)?);
        warnings.extend(validation_split_warnings(&cfg, &val_files));
        let lock = run.lock()?;
        let mut weights = Weights::new(
            &checked.model,
            checked.device,
            cfg.precision,
            checked.layout,
        )?;
        weights.freeze(&cfg.freeze)?;
        let ema = if cfg.ema_decay > 0.0 {
            Some(MovingAverage::new(
                &checked.model,
                checked.device,
                checked.layout,
                cfg.ema_decay,
            )?)
        } else {
            None
        };
        let mut adam = Adam::new(cfg.optimizer.clone(), weights::trainable(&weights.master));
        let (mut step, mut best_val_psnr, mut cost) = (0, None, TrainCost::default());
        let mut ema_restored = false;
        if let Some((ck, file)) = resumed {
            let (meta, with_average) =
                restore_checkpoint(ck, &file, &weights, ema.as_ref(), &mut adam, checked.device)?;
            (step, best_val_psnr, cost) = (meta.step, meta.best_val_psnr, meta.cost);
            ema_restored = with_average;
        }
        if let Some(start) = &start {
            init::start_from(start, &weights.master)?;
        }
        if let (Some(ema), false) = (&ema, ema_restored) {
            ema.reset_to(&weights.master);
        }
        weights.sync_shadow();
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
        let history = log::start(&run.file(LOG_FILE), resume.then_some(step))?;
        if !resume && cfg.val_noise.is_none() {
            // Saved resolved, so a later change of the default cannot change a run's validation.
            cfg.val_noise = Some(checked.val_noise.to_string());
        }
        run.save_config(&cfg)?;
        Ok(Self {
            cfg,
            checked,
            run,
            weights,
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
        self.run.path()
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
        &self.weights.master
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
        let mut progress = Progress::new(self.quiet, self.step, end);
        let mut log = RunLog::append(self.run.file(LOG_FILE))?;
        if self.step == 0 && self.cfg.init.is_some() {
            // A fine-tune's starting point: the model it begins from is kept unless beaten.
            self.validate_and_log(&progress, &mut log)?;
        }
        let start = Instant::now();
        let first_step = self.step;
        let mut last_loss = f64::NAN;
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
                return Err(TrainError::Diverged {
                    step: self.step + 1,
                    loss,
                });
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
            log.write(&line)?;
            progress.step(self.step, end, loss, rate, start.elapsed().as_secs_f64());
            if self.step % self.cfg.val_every == 0 || self.step == self.cfg.steps {
                self.validate_and_log(&progress, &mut log)?;
                self.save_checkpoint()?;
            } else if self.step % self.cfg.checkpoint_every == 0 {
                self.save_checkpoint()?;
            }
        }
        self.save_checkpoint()?;
        progress.finish();
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
            &self.weights,
            self.ema.as_ref(),
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
        self.ema
            .as_ref()
            .map_or(&self.weights.master, |ema| &ema.model)
    }

    /// Validates (keeping the best model), logs the scores and redraws the plots.
    fn validate_and_log(&mut self, progress: &Progress, log: &mut RunLog) -> Result<()> {
        let scores = self.validate_and_keep_best()?;
        self.history.push_val(ValPoint {
            step: self.step,
            psnr: scores.psnr,
            noisy_psnr: scores.noisy_psnr,
            cpu_s: Some(self.cost.cpu_seconds),
        });
        let title = plot::run_title(&self.cfg);
        if let Err(e) = plot::write_plots(&self.history, self.run.path(), &title) {
            // A plot is a convenience: training goes on without it.
            progress.warn(format!("warning: {e}"));
        }
        log.write(&serde_json::json!({
            "step": self.step, "val_psnr": scores.psnr, "val_ssim": scores.ssim,
            "noisy_psnr": scores.noisy_psnr, "train_s": self.cost.seconds,
            "train_cpu_s": self.cost.cpu_seconds,
        }))?;
        progress.report(format!(
            "step {:>7}: val PSNR {:.2} dB (noisy {:.2}), SSIM {:.4}, best {:.2}, {:.1} CPU-min",
            self.step,
            scores.psnr,
            scores.noisy_psnr,
            scores.ssim,
            self.best_val_psnr.unwrap_or(f64::NAN),
            self.cost.cpu_seconds / 60.0
        ));
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
        if let (false, Some(serde_json::Value::Object(training))) =
            (self.cfg.freeze.is_empty(), meta.training.as_mut())
        {
            training.insert("freeze".into(), serde_json::json!(self.cfg.freeze));
        }
        artefact::save(self.shipped(), &meta, &self.run.file(LAST_MODEL_FILE))?;
        if best {
            artefact::save(self.shipped(), &meta, &self.run.file(artefact::FILE_NAME))?;
        }
        Ok(scores)
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        if self.saved_step == Some(self.step) {
            return Ok(());
        }
        let mut tensors: Vec<(String, Tensor)> = self
            .weights
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
            tensors.extend(ema.named_tensors());
        }
        let meta = CheckpointMeta::new(
            self.step,
            self.adam.step,
            self.best_val_psnr,
            self.cost,
            &self.cfg,
        );
        checkpoint::save_keeping_previous(self.run.path(), &meta, &tensors)?;
        self.saved_step = Some(self.step);
        Ok(())
    }
}

/// Puts a checkpoint (read from `file`) into a new run's weights, moving average and Adam
/// state; returns its metadata, and whether it held the average.
fn restore_checkpoint(
    ck: Checkpoint,
    file: &Path,
    weights: &Weights,
    ema: Option<&MovingAverage>,
    adam: &mut Adam,
    device: Device,
) -> Result<(CheckpointMeta, bool)> {
    let bad = |message| TrainError::Checkpoint {
        path: file.to_path_buf(),
        message,
    };
    weights::restore(&weights.master, &ck.tensors, "model.").map_err(bad)?;
    let ema_restored = match ema {
        Some(ema) => ema.restore(&ck.tensors).map_err(bad)?,
        None => false,
    };
    let optim: BTreeMap<String, Tensor> = ck
        .tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("optim.")
                .map(|k| (k.to_owned(), t.to_device(device)))
        })
        .collect();
    adam.load_state(&optim, ck.meta.optimizer_step)
        .map_err(bad)?;
    Ok((ck.meta, ema_restored))
}

/// Checks the training images before any work, as the loader will check them: refuses a set
/// of which none can be used; returns a warning naming those left out.
fn check_training_images(
    cfg: &TrainConfig,
    checked: &Checked,
    train_files: &[PathBuf],
) -> Result<Option<String>> {
    let (usable, skipped) =
        denoise_data::loader::usable_files(train_files.to_vec(), &loader_config(cfg, checked))?;
    let mut reasons: Vec<String> = skipped
        .iter()
        .take(3)
        .map(|s| s.error.to_string())
        .collect();
    if skipped.len() > 3 {
        reasons.push(format!("and {} more", skipped.len() - 3));
    }
    let reasons = reasons.join("; ");
    if usable.is_empty() {
        return Err(TrainError::Config(format!(
            "none of the {} training image(s) of '{}' can be used: {reasons} (re-run \
             prepare-data, or lower patch_size)",
            train_files.len(),
            cfg.data.display(),
        )));
    }
    Ok((!skipped.is_empty()).then(|| {
        format!(
            "{} of {} training image(s) left out: {reasons}",
            skipped.len(),
            train_files.len(),
        )
    }))
}

/// What the user should hear of the manifest's validation split: fewer images than asked for,
/// or none at all.
fn validation_split_warnings(cfg: &TrainConfig, val_files: &[PathBuf]) -> Vec<String> {
    let mut warnings = Vec::new();
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
    warnings
}

/// The number of cores libtorch uses by default, if the platform says.
fn cpu_cores() -> Option<i32> {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| i32::try_from(n.get()).ok())
}

/// Process CPU seconds so far, 0 where the platform cannot say (the cost then records 0).
fn cpu_seconds() -> f64 {
    denoise_models::sys::process_cpu_seconds().unwrap_or(0.0)
}

/// One Adam step of the master weights on (`noisy`, `sigma`) -> `clean` at rate `lr`; returns
/// the loss. With a bf16 shadow, the forward and backward passes run on the shadow and Adam
/// updates the fp32 master (see [`Weights`]). Inputs are laid out in `layout` here (the
/// weights' layout). With a moving average, it is updated after the step
/// ([`crate::ema::decay_at`]). A non-finite loss is returned without touching the weights, the
/// average or Adam's state. `timer` marks the phases (see [`crate::timing`]). The training loop
/// and the training bench both call this.
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimisation_step(
    weights: &Weights,
    ema: Option<&MovingAverage>,
    adam: &mut Adam,
    loss: Loss,
    noisy: &Tensor,
    sigma: Option<&Tensor>,
    clean: &Tensor,
    lr: f64,
    layout: Layout,
    timer: &mut PhaseTimer,
) -> Result<f64> {
    let net = weights.for_step();
    let kind = net.precision().kind();
    let x = layout.apply(&noisy.to_kind(kind));
    let map = sigma.map(|s| s.to_kind(kind));
    for mut var in net.var_store().trainable_variables() {
        var.zero_grad();
    }
    // The forward pass updates batch-norm running statistics in place; keep a copy to put back
    // if the step is refused (a bf16 shadow's statistics reach the master only after the step).
    let buffers: Vec<(Tensor, Tensor)> = match weights.shadow {
        Some(_) => Vec::new(),
        None => weights
            .statistics()
            .into_iter()
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
    weights.after_step();
    if let Some(ema) = ema {
        ema.update(&weights.master, adam.step);
    }
    timer.mark("average");
    Ok(value)
}

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
    use denoise_models::{ModelConfig, Precision};
    use std::io::Write;

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

    /// [`Trainer::new`] after [`set_up_libtorch`], as the CLI builds one: seeded weights.
    fn new_trainer(cfg: TrainConfig, run: &Path, resume: bool) -> Result<Trainer> {
        set_up_libtorch(&cfg)?;
        Trainer::new(cfg, run, resume)
    }

    fn named(model: &Model) -> BTreeMap<String, Tensor> {
        model.var_store().variables().into_iter().collect()
    }

    /// Detached copies, unlike [`named`] (whose tensors share storage with the model's, so
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
            let weights = Weights::new(&model, Device::Cpu, Precision::Fp32, layout).unwrap();
            let mut adam = Adam::new(
                crate::optim::OptimizerConfig::default(),
                weights::trainable(&weights.master),
            );
            let mut step = || {
                optimisation_step(
                    &weights,
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
            after.push((first, second, named(&weights.master)));
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
        let mut trainer = new_trainer(config(data, 200), &run, false)
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
        assert!(new_trainer(config(trainer.cfg.data.clone(), 60), &run, false).is_err());
    }

    #[test]
    fn a_non_finite_loss_leaves_the_weights_and_moments_alone() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(false);
        let weights = Weights::new(&cfg, Device::Cpu, Precision::Fp32, Layout::Nchw).unwrap();
        let model = &weights.master;
        let ema = MovingAverage::new(&cfg, Device::Cpu, Layout::Nchw, 0.5).unwrap();
        let mut adam = Adam::new(
            crate::optim::OptimizerConfig::default(),
            weights::trainable(model),
        );
        let clean = Tensor::rand([2, 1, 8, 8], (tch::Kind::Float, Device::Cpu));
        // Profiled, so the phases show where a refused step stops.
        let mut timer = PhaseTimer::on(Device::Cpu);
        let mut step = |adam: &mut Adam, noisy: &Tensor| {
            timer.start();
            let loss = optimisation_step(
                &weights,
                Some(&ema),
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
        let before = frozen(named(model));
        let average = frozen(named(&ema.model));
        let moments = frozen(adam.state());
        let bad = &clean + 0.1;
        let _ = bad.get(0).get(0).get(3).get(3).fill_(f64::NAN);
        let (loss, phases) = step(&mut adam, &bad);
        assert!(loss.is_nan());
        assert_eq!(phases, ["prepare", "forward", "backward", "read"]);
        for (name, w) in named(model) {
            assert!(w.equal(&before[&name]), "{name} changed");
        }
        assert_eq!(adam.step, 1, "the skipped step is not counted");
        for (name, t) in named(&ema.model) {
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
        let mut trainer = new_trainer(config(data, 10), &run, false)
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
        let mut first = new_trainer(config(data.clone(), 2), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        let err = new_trainer(config(data.clone(), 4), &run, true)
            .err()
            .expect("the run is in use");
        assert!(err.to_string().contains("another process"), "{err}");
        drop(first);
        assert!(new_trainer(config(data, 4), &run, true).is_ok());
    }

    #[test]
    fn a_cpu_budget_stops_the_run_resumably() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let run = dir.path().join("run");
        let mut trainer = new_trainer(config(data.clone(), 20), &run, false)
            .unwrap()
            .quiet(true)
            .cpu_budget(Some(1e-9));
        let outcome = trainer.run(&stop, None).unwrap();
        assert_eq!(outcome.step, 1, "one step spends any positive budget");
        assert!(!outcome.finished);
        let spent = trainer.cost().cpu_seconds;
        drop(trainer);
        let mut more = new_trainer(config(data, 20), &run, true)
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
        let mut straight = new_trainer(config(data.clone(), 20), &dir.path().join("a"), false)
            .unwrap()
            .quiet(true);
        straight.run(&stop, None).unwrap();

        let run_b = dir.path().join("b");
        let mut first = new_trainer(config(data.clone(), 20), &run_b, false)
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
        let mut resumed = new_trainer(config(data, 20), &run_b, true)
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
            let (a, b) = (named(a), named(b));
            for (name, wa) in &a {
                let diff = (wa - &b[name]).abs().max().double_value(&[]);
                // Same data, same Adam state: identical up to non-associative float reductions.
                assert!(diff < 1e-5, "{name} differs by {diff}");
            }
        }
        let (raw, average) = (named(resumed.model()), named(resumed.shipped()));
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
        let mut first = new_trainer(config(data.clone(), 12), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        drop(first);
        let best = std::fs::read(run.join(artefact::FILE_NAME)).unwrap();

        // Without its checkpoints, the best model and the log still make it a run.
        for name in [checkpoint::FILE_NAME, checkpoint::PREVIOUS_FILE_NAME] {
            std::fs::remove_file(run.join(name)).unwrap();
        }
        let err = new_trainer(config(data.clone(), 12), &run, false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("already holds a run"), "{err}");
        assert_eq!(std::fs::read(run.join(artefact::FILE_NAME)).unwrap(), best);
        assert!(run.join(LOG_FILE).is_file(), "the log is kept");

        // A resume under a config that trains something else is refused, naming the field.
        let run = dir.path().join("run2");
        let mut first = new_trainer(config(data.clone(), 10), &run, false)
            .unwrap()
            .quiet(true);
        first.run(&stop, None).unwrap();
        drop(first);
        // The validation noise is saved resolved, so a later default cannot change it.
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(saved.contains("val_noise = \"gaussian:25\""), "{saved}");
        let mut other = config(data.clone(), 10);
        other.noise = "gaussian:50".into();
        let err = new_trainer(other, &run, true).err().expect("refused");
        assert!(err.to_string().contains("noise"), "{err}");
        // A default made explicit is the same run.
        let mut explicit = config(data.clone(), 10);
        explicit.val_noise = Some("gaussian:25".into());
        assert!(new_trainer(explicit, &run, true).is_ok());
        // Extending it is allowed, and says what happens to the schedule.
        let longer = new_trainer(config(data.clone(), 20), &run, true).unwrap();
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
        let resumed = new_trainer(config(data.clone(), 10), &run, true).unwrap();
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
        let err = new_trainer(big, &fresh, false).err().expect("refused");
        assert!(err.to_string().contains("can be used"), "{err}");
        assert!(!fresh.exists());
    }

    #[test]
    fn a_run_can_start_from_a_trained_model() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let data = manifest(dir.path());
        let stop = AtomicBool::new(false);
        let base = dir.path().join("base");
        let mut first = new_trainer(config(data.clone(), 10), &base, false)
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
        let mut tuned = new_trainer(tune.clone(), &run, false).unwrap().quiet(true);
        assert_eq!(tuned.step(), 0);
        let (start, reference) = (named(tuned.model()), named(&trained.model));
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
        let resumed = new_trainer(tune.clone(), &run, true).unwrap();
        assert_eq!(resumed.step(), 10);
        let now = named(resumed.model());
        assert!(reference.iter().any(|(name, t)| !t.equal(&now[name])));

        // Frozen weights stay exactly the artefact's while the rest train; freezing needs a
        // starting model.
        let first = reference.keys().next().unwrap().rsplit_once('.').unwrap().0;
        let mut frozen = tune.clone();
        frozen.freeze = vec![first.to_string()];
        let run = dir.path().join("frozen");
        let mut part = new_trainer(frozen.clone(), &run, false)
            .unwrap()
            .quiet(true);
        part.run(&stop, None).unwrap();
        let now = named(part.model());
        drop(part);
        for (name, t) in &reference {
            let kept = name.starts_with(&format!("{first}."));
            assert_eq!(t.equal(&now[name]), kept, "{name}");
        }
        let meta = artefact::read_metadata(&run).unwrap();
        assert_eq!(meta.training.unwrap()["freeze"], serde_json::json!([first]));
        frozen.init = None;
        let err = new_trainer(frozen, &dir.path().join("z"), false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("freeze"), "{err}");

        // Another architecture is refused, and so is a path that is not a model.
        let mut other = config(data.clone(), 10);
        other.model = Some(
            serde_json::from_str(r#"{"kind":"dncnn","depth":5,"features":16,"batch_norm":false}"#)
                .unwrap(),
        );
        other.init = tune.init.clone();
        let err = new_trainer(other, &dir.path().join("x"), false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not match"), "{err}");
        let mut missing = tune;
        missing.init = Some(dir.path().join("nope.safetensors"));
        let err = new_trainer(missing, &dir.path().join("y"), false)
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
        let mut trainer = new_trainer(cfg, &dir.path().join("run"), false)
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
