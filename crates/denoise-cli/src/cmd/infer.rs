//! `denoise-cli infer`: denoise files or directories, keeping format, bit depth and alpha.

use crate::common::{PrecisionArg, Runner, Sigma, describe};
use anyhow::{Context, Result, bail};
use denoise_data::{dataset, io};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Model: a shipped name, an artefact file or a training run directory (default: shipped).
    #[arg(long)]
    model: Option<String>,
    /// Noise level on the 0-255 scale, or 'auto' to estimate it (Immerkaer 1996), for models
    /// that take one; without it such models estimate it (blind).
    #[arg(long)]
    sigma: Option<Sigma>,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Tile side in pixels (default: from --max-mem-mb).
    #[arg(long)]
    tile: Option<usize>,
    /// Overlap between tiles in pixels, blended.
    #[arg(long, default_value_t = 32)]
    overlap: usize,
    /// Memory budget for one tile's activations.
    #[arg(long, default_value_t = 1024)]
    max_mem_mb: usize,
    /// Image files or directories (recursive).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output file (one input file only).
    #[arg(short, long, conflicts_with = "out_dir")]
    output: Option<PathBuf>,
    /// Output directory (keeps relative paths and file names).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    // (input, output) pairs, checked before any work.
    let mut jobs: Vec<(PathBuf, PathBuf)> = Vec::new();
    for input in &args.inputs {
        if input.is_dir() {
            let Some(out_dir) = &args.out_dir else {
                bail!("'{}' is a directory: give --out-dir", input.display());
            };
            for file in dataset::scan(input)? {
                let rel = file.strip_prefix(input).unwrap_or(&file).to_path_buf();
                jobs.push((file, out_dir.join(rel)));
            }
        } else if !input.exists() {
            bail!("'{}' does not exist", input.display());
        } else if let Some(out) = &args.output {
            if args.inputs.len() > 1 {
                bail!("-o takes one input; use --out-dir for several");
            }
            jobs.push((input.clone(), out.clone()));
        } else if let Some(out_dir) = &args.out_dir {
            let name = input.file_name().context("input has no file name")?;
            jobs.push((input.clone(), out_dir.join(name)));
        } else {
            bail!("give -o OUTPUT or --out-dir DIR");
        }
    }
    if jobs.is_empty() {
        bail!("no images found in the inputs");
    }
    let runner = Runner::load(
        args.model.as_deref(),
        &args.device,
        args.precision,
        args.tile,
        args.overlap,
        args.max_mem_mb,
    )?;
    eprintln!("{}", runner.describe());
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} files {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut failures = Vec::new();
    for (input, output) in &jobs {
        match denoise_one(
            &runner,
            input,
            output,
            args.sigma.unwrap_or(Sigma::Blind),
            &bar,
        ) {
            Ok(note) => {
                if let Some(note) = note {
                    say(&bar, note);
                }
            }
            Err(err) => {
                say(&bar, format!("denoise-cli: {}", describe(&err)));
                failures.push(input.display().to_string());
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !failures.is_empty() {
        bail!(
            "{} of {} image(s) failed: {}",
            failures.len(),
            jobs.len(),
            failures.join(", ")
        );
    }
    eprintln!("denoised {} image(s)", jobs.len());
    Ok(())
}

fn denoise_one(
    runner: &Runner,
    input: &Path,
    output: &Path,
    sigma: Sigma,
    bar: &indicatif::ProgressBar,
) -> Result<Option<String>> {
    let loaded = io::load(input)?;
    let mut progress = |done: usize, total: usize| {
        if total > 1 {
            bar.set_message(format!("tile {done}/{total}"));
        }
    };
    let (out, used) = runner.denoise(&loaded.image, sigma, &mut progress, None)?;
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    let depth = io::ImageFormat::from_path(output)
        .ok()
        .and_then(io::max_depth)
        .map_or(loaded.bit_depth, |max| match max {
            io::BitDepth::Eight => io::BitDepth::Eight,
            io::BitDepth::Sixteen => loaded.bit_depth,
        });
    io::save(output, &out, loaded.alpha.as_deref(), depth)
        .with_context(|| format!("failed to write '{}'", output.display()))?;
    Ok(match (sigma, used) {
        (Sigma::Auto, Some(s)) | (Sigma::Blind, Some(s)) => {
            Some(format!("{}: estimated sigma {s:.1}", input.display()))
        }
        _ => None,
    })
}

/// Prints above the bar, or plainly when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}
