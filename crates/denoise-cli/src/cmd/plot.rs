//! `denoise-cli plot RUN_DIR`: redraw a run's `loss.png` and `psnr.png` from its `train.jsonl`
//! (training redraws them at each validation; this is for a run stopped in between, or a copy).

use anyhow::{Context, Result};
use denoise_train::plot::{self, History};
use denoise_train::trainer::LOG_FILE;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A training run directory (holding train.jsonl).
    run_dir: PathBuf,
    /// Plot title (default: "KIND on NOISE" from the run's config.toml, else the directory's name).
    #[arg(long)]
    title: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let log = args.run_dir.join(LOG_FILE);
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("cannot read '{}'", log.display()))?;
    let history = History::parse(&text);
    let config = denoise_train::TrainConfig::from_file(&args.run_dir.join("config.toml")).ok();
    let title = args
        .title
        .clone()
        .or_else(|| config.as_ref().map(plot::run_title))
        .unwrap_or_else(|| {
            args.run_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "run".into())
        });
    plot::write_plots(&history, &args.run_dir, &title)?;
    println!(
        "{} steps, {} validations: wrote {} and {}",
        history.loss_len(),
        history.val_points().count(),
        args.run_dir.join(plot::LOSS_PLOT).display(),
        args.run_dir.join(plot::PSNR_PLOT).display()
    );
    Ok(())
}
