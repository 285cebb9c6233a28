//! `denoise-cli prepare-data`: validate folders of clean images and write `manifest.json`.

use anyhow::Result;
use denoise_data::manifest::{NoisyValidationConfig, PrepareConfig, Progress, prepare};
use denoise_data::noise::NoiseSpec;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Folder of clean images (scanned recursively); repeat for several, each split on its own.
    #[arg(long, required = true)]
    src: Vec<PathBuf>,
    /// Output folder for manifest.json (and noisy validation images).
    #[arg(long)]
    out: PathBuf,
    /// Fraction of the images of each source held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write fixed noisy validation images with this noise (e.g. gaussian:25).
    #[arg(long, value_name = "SPEC")]
    noisy_val: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        (0.0..1.0).contains(&args.val_fraction),
        "--val-fraction must be in [0, 1), got {}",
        args.val_fraction
    );
    let mut cfg = PrepareConfig::new(&args.src[0], &args.out);
    cfg.src.extend_from_slice(&args.src[1..]);
    cfg.val_fraction = args.val_fraction;
    cfg.seed = args.seed;
    if let Some(spec) = &args.noisy_val {
        cfg.noisy_validation = Some(NoisyValidationConfig::new(
            spec.parse::<NoiseSpec>()?,
            args.seed,
        ));
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = prepare(&cfg, &|p| match p {
        Progress::Scanned { files } => {
            bar.set_length(files as u64);
            bar.set_message("checking");
        }
        Progress::Checked { done, .. } => bar.set_position(done as u64),
        Progress::NoisyWritten { done, total } => {
            bar.set_message("noisy val");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Progress::Finished => bar.finish_and_clear(),
    })?;
    let m = &report.manifest;
    eprintln!(
        "wrote {}: {} training and {} validation images ({} decoded, {} reused)",
        report.manifest_path.display(),
        m.train_paths().len(),
        m.validation_paths().len(),
        report.decoded,
        report.reused
    );
    if args.src.len() > 1 {
        for (src, (train, val)) in args.src.iter().zip(m.split_counts()) {
            eprintln!("  {}: {train} training, {val} validation", src.display());
        }
    }
    // The colour balance of what the model will learn from: a set much darker, brighter or
    // more muted than the photos it will denoise is worth knowing about before training.
    let st = &m.statistics;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "training split: {} images, {:.1} megapixels; per-channel mean {} and standard deviation {} (0-1 scale)",
        st.images,
        st.pixels as f64 / 1e6,
        list(&st.mean),
        list(&st.std)
    );
    // Left out: said here, not only in the manifest, with the first few named.
    const SHOWN: usize = 5;
    if !m.rejected.is_empty() {
        eprintln!("left out {} unusable file(s):", m.rejected.len());
        for r in m.rejected.iter().take(SHOWN) {
            eprintln!("  {}: {}", r.path, r.error);
        }
    }
    if !m.duplicates.is_empty() {
        eprintln!("left out {} duplicate(s):", m.duplicates.len());
        for d in m.duplicates.iter().take(SHOWN) {
            eprintln!("  {} (same bytes as {})", d.path, d.duplicate_of);
        }
    }
    if m.rejected.len() > SHOWN || m.duplicates.len() > SHOWN {
        eprintln!(
            "  (all of them are listed in {})",
            report.manifest_path.display()
        );
    }
    if let Some(why) = &report.previous_ignored {
        eprintln!("note: previous manifest not reused: {why}");
    }
    Ok(())
}
