//! `denoise-cli train`: run or resume a training run (`cargo xtask train` calls this).

use anyhow::{Context, Result};
use denoise_models::{ModelKind, Precision};
use denoise_train::init::FineTune;
use denoise_train::{RunDir, TrainConfig, Trainer};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args)]
pub struct Args {
    /// TOML config (see configs/); the flags below override its fields. A new run needs a model
    /// (here or --model) and data (here or --data); --resume reads the run's own config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// manifest.json from prepare-data (relative paths are taken from the current directory and
    /// saved absolute in the run's config).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model kind with its default config (autoencoder, unet, ridnet, dncnn, ffdnet, drunet), instead of
    /// the config's [model].
    #[arg(long)]
    model: Option<String>,
    /// Fine-tune: start from this model's weights (a shipped name such as `default`, an artefact
    /// file or a run directory) instead of a random initialisation, taking its architecture.
    /// The step count, optimizer and schedule start afresh. Without --config, the noise is the
    /// artefact's and the learning rate a tenth of a run from scratch's, unless --noise or --lr
    /// say otherwise. The starting model is validated first and kept unless beaten.
    #[arg(long, value_name = "MODEL", conflicts_with = "resume")]
    init: Option<String>,
    /// Image channels for --model (3 colour, the default; 1 gray). With --init, 1 turns a
    /// colour FFDNet or DRUNet into a gray one that starts out computing what the colour one
    /// does on a gray picture, leaving any level-estimation branch behind (a gray model
    /// trained from the default's FFDNet: --init default --channels 1).
    #[arg(long)]
    channels: Option<i64>,
    /// Training noise spec (e.g. gaussian:0-55, method2).
    #[arg(long)]
    noise: Option<String>,
    /// Total training steps; on --resume, a new total extends (or shortens) the run and rescales
    /// its learning-rate schedule.
    #[arg(long)]
    steps: Option<u64>,
    /// Patches per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Patch side in pixels (every training image must be at least this large).
    #[arg(long)]
    patch: Option<usize>,
    /// Peak learning rate (after warm-up).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Validate and ship a moving average of the weights with this decay (e.g. 0.999; 0: off).
    /// Turned on when resuming, the average starts from the checkpoint's weights.
    #[arg(long, value_name = "DECAY")]
    ema_decay: Option<f64>,
    /// Run directory (config, log, checkpoints, best model).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// fp32 or bf16 (mixed precision: bf16 compute, fp32 master weights).
    #[arg(long)]
    precision: Option<Precision>,
    /// Validate every N steps.
    #[arg(long)]
    val_every: Option<u64>,
    /// Seed of the weights' initialisation and of the patch stream.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop (resumably) once training steps have used this many CPU minutes in total, over every
    /// resume: equal budgets compare models by PSNR per CPU second (see `denoise-cli runs`).
    #[arg(long, value_name = "MINUTES")]
    cpu_budget: Option<f64>,
    /// Time each phase of every step (copy to the device, forward, backward, loss read, update,
    /// moving average), waiting for the device after each: train.jsonl gets the phases and the
    /// closing line their means. Costs some speed on a GPU; for finding what bounds a run.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let mut cfg = if args.resume && args.config.is_none() {
        // A resumed run keeps its own config unless told otherwise.
        RunDir::new(&args.out).saved_config()?
    } else if let Some(path) = &args.config {
        TrainConfig::from_file(path)?
    } else {
        TrainConfig::default()
    };
    if let Some(d) = &args.data {
        cfg.data = d.clone();
    }
    // No data at all is said by the config's check ("give --data").
    if cfg.data.is_relative() && !cfg.data.as_os_str().is_empty() {
        match cfg.data.canonicalize() {
            // Saved absolute, so the run resumes from any directory.
            Ok(abs) => cfg.data = abs,
            Err(_) if args.resume && args.data.is_none() => anyhow::bail!(
                "the run's manifest '{}' is not found from here (its path is relative to where \
                 the run started): resume from there, or pass --data",
                cfg.data.display()
            ),
            Err(_) => {}
        }
    }
    if let Some(spec) = &args.init {
        cfg.init = Some(spec.into());
    }
    if let Some(m) = &args.model {
        cfg.model = Some(
            m.parse::<ModelKind>()?
                .default_config(args.channels.unwrap_or(3)),
        );
    }
    if let Some(n) = &args.noise {
        cfg.noise = n.clone();
    }
    if let Some(v) = args.steps {
        cfg.steps = v;
    }
    if let Some(v) = args.batch {
        cfg.batch_size = v;
    }
    if let Some(v) = args.patch {
        cfg.patch_size = v;
    }
    if let Some(v) = args.lr {
        cfg.optimizer.lr = v;
    }
    if let Some(v) = args.ema_decay {
        cfg.ema_decay = v;
    }
    if let Some(v) = &args.device {
        cfg.device = v.clone();
    }
    if let Some(v) = args.precision {
        cfg.precision = v;
    }
    if let Some(v) = args.val_every {
        cfg.val_every = v;
    }
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    let mut fine_tune_note = None;
    if let (Some(spec), false) = (cfg.init.clone(), args.resume) {
        // A shipped name, a file or a run directory (from the flag or the config), saved as an
        // absolute file path, like the manifest.
        let path = crate::lookup::resolve_model(Some(&spec.to_string_lossy()))?;
        let path = denoise_models::artefact::resolve(&path)?;
        let asked = FineTune {
            // --channels with --model picks that model's channels instead.
            channels: args.channels.filter(|_| args.model.is_none()),
            model_alone: args.init.is_some() && args.config.is_none(),
            noise_given: args.noise.is_some(),
            lr_given: args.lr.is_some(),
        };
        fine_tune_note = denoise_train::init::prepare(&mut cfg, &path, &asked)?;
    }
    if args.cpu_budget.is_some_and(|m| m.is_nan() || m <= 0.0) {
        anyhow::bail!("--cpu-budget must be a positive number of minutes");
    }
    let stale_val_noise = match (&args.noise, &cfg.val_noise) {
        // A config copied from another run keeps that run's validation noise.
        (Some(noise), Some(val)) if !args.resume && noise != val => Some(format!(
            "validating on '{val}' (the config's val_noise), not on --noise '{noise}': set \
             val_noise in the config to change it"
        )),
        _ => None,
    };
    denoise_train::set_up_libtorch(&cfg)?;
    let mut trainer = Trainer::new(cfg, &args.out, args.resume)?
        .cpu_budget(args.cpu_budget.map(|minutes| minutes * 60.0))
        .profile(args.profile);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // SIGINT (Ctrl-C), SIGTERM (`kill`, a service manager, `docker stop`) and SIGHUP (a closed
    // terminal) all end the run at the next step with a checkpoint (ctrlc's "termination").
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: saving a checkpoint (a second Ctrl-C or signal quits at once)");
    })
    .context("cannot install the signal handler")?;
    for warning in trainer.warnings().iter().chain(&stale_val_noise) {
        eprintln!("warning: {warning}");
    }
    if trainer.step() >= trainer.planned_steps() {
        if trainer.step() > trainer.planned_steps() {
            eprintln!(
                "'{}' is at step {}, past --steps {}: pass more steps to extend it",
                args.out.display(),
                trainer.step(),
                trainer.planned_steps()
            );
        } else {
            eprintln!(
                "'{}' already finished at step {}: pass --steps N (more) to extend it",
                args.out.display(),
                trainer.step()
            );
        }
        return Ok(());
    }
    let decay = trainer.config().ema_decay;
    let validated = if decay > 0.0 {
        format!("validating a moving average of the weights, decay {decay}")
    } else {
        "validating the weights".to_owned()
    };
    eprintln!(
        "training in {} from step {} of {} ({validated}, on {} noise)",
        args.out.display(),
        trainer.step(),
        trainer.planned_steps(),
        trainer
            .config()
            .val_noise
            .as_deref()
            .unwrap_or("the training")
    );
    if let (Some(init), false) = (&trainer.config().init, args.resume) {
        eprintln!("starting from the weights of '{}'", init.display());
        if let Some(note) = &fine_tune_note {
            eprintln!("{note}");
        }
    }
    let outcome = trainer.run(&stop, None)?;
    let cost = trainer.cost();
    eprintln!(
        "{} at step {}: last loss {:.5}, {:.1} patches/s, best val PSNR {}, \
         {:.1} CPU-min ({:.1} min) of training so far",
        if outcome.finished {
            "finished"
        } else {
            "stopped"
        },
        outcome.step,
        outcome.last_loss,
        outcome.patches_per_s,
        outcome
            .best_val_psnr
            .map_or("-".into(), |p| format!("{p:.2} dB")),
        cost.cpu_seconds / 60.0,
        cost.seconds / 60.0
    );
    if outcome.times.steps > 0 {
        eprintln!("time: {}", outcome.times.summary());
    }
    let best = trainer.run_dir().join(denoise_models::artefact::FILE_NAME);
    if best.is_file() {
        eprintln!(
            "best model (by validation PSNR): {} (use it with --model)",
            best.display()
        );
    }
    let last = trainer
        .run_dir()
        .join(denoise_train::trainer::LAST_MODEL_FILE);
    if last.is_file() {
        eprintln!(
            "latest validated weights: {} (--model takes this file too)",
            last.display()
        );
    }
    if !outcome.finished {
        eprintln!(
            "resume with: denoise-cli train --out {} --resume (or cargo xtask train ...)",
            args.out.display()
        );
    }
    Ok(())
}
