//! `denoise-cli infer`: denoise files or directories, keeping format, bit depth, alpha and
//! metadata.

use crate::common::{PrecisionArg, Runner, Sigma, Tiling, canonical, describe};
use anyhow::{Context, Result, bail};
use denoise_data::metadata::{DropReason, Dropped};
use denoise_data::{dataset, io};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The shipped gray model's name.
const GRAY_MODEL: &str = "gray";

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("destination").required(true).args(["output", "out_dir"]))]
pub struct Args {
    /// Model: a shipped name, an artefact file or a training run directory (default: shipped).
    #[arg(long)]
    model: Option<String>,
    /// Noise level on the 0-255 scale, for models that take one. Without it (or with 'auto',
    /// the same) the level is estimated from each image and reported: in colour from the
    /// covariance of its patches, group by group of brightness, so that a photo's shot noise
    /// (stronger where it is brighter) gets a map that follows it; in gray, and where the
    /// channels share their noise, one level by Immerkaer's filter. For a gray picture and a
    /// colour model the model is told this level times sqrt(3): its noise is alike in the three
    /// channels.
    #[arg(long, allow_negative_numbers = true)]
    sigma: Option<Sigma>,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto: bf16 only on hardware with native bf16 (AMX, AVX512-BF16, recent GPUs) and for a
    /// model whose recorded bf16 PSNR loss (`eval --record-bf16`), divided by the self-ensemble's
    /// passes (their rounding errors average out), is under 0.05 dB; else fp32.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Tile side in pixels, at least 32; 0 = the whole image at once (default: from
    /// --max-mem-mb).
    #[arg(long)]
    tile: Option<usize>,
    /// Overlap between tiles in pixels, blended (at most half the tile).
    #[arg(long, default_value_t = 32)]
    overlap: usize,
    /// Memory budget in MB for one tile's activations; decides the tile side unless --tile is
    /// given.
    #[arg(long, default_value_t = 1024)]
    max_mem_mb: usize,
    /// Self-ensemble: denoise every tile N times (N = 1, 2, 4 or 8), flipped or turned and on
    /// another phase of the model's 2x2 grid, and average the results put back; N passes cost
    /// N times the time, and each doubling removes a little more noise (docs/benchmarks.md gives
    /// the gains).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::common::parse_ensemble)]
    ensemble: usize,
    /// Image files or directories (recursive).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output file (one input file only).
    #[arg(short, long, conflicts_with = "out_dir")]
    output: Option<PathBuf>,
    /// Output directory (keeps relative paths and file names; created if missing).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(tile) = args.tile {
        if tile != 0 && tile < 32 {
            bail!("--tile must be 0 (whole image) or at least 32, got {tile}");
        }
        if tile != 0 && args.overlap > tile / 2 {
            bail!(
                "--overlap {} is more than half of --tile {tile}: give at most {}",
                args.overlap,
                tile / 2
            );
        }
    }
    if let Some(dir) = args.out_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        bail!("--out-dir '{}' is a file, not a directory", dir.display());
    }
    let jobs = plan(args)?;
    let runner = Runner::load(
        args.model.as_deref(),
        &args.device,
        args.precision,
        Tiling {
            tile: args.tile,
            overlap: args.overlap,
            max_mem_mb: args.max_mem_mb,
            ensemble: args.ensemble,
        },
    )?;
    eprintln!("{}", runner.describe());
    if args.sigma.is_some() && !runner.model.config().noise_map() {
        eprintln!(
            "note: --sigma is ignored: this {} takes no noise level (it denoises blind)",
            runner.model.config().kind().name()
        );
    }
    // The default is a colour model; gray pictures are told of the shipped gray one.
    let gray_hint = args.model.is_none()
        && runner.model.config().channels() == 3
        && crate::common::models_dir()
            .join(format!("{GRAY_MODEL}.safetensors"))
            .is_file();
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} files {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut failures = Vec::new();
    for (input, output) in &jobs {
        bar.set_message("");
        match denoise_one(
            &runner,
            input,
            output,
            args.sigma.unwrap_or(Sigma::Blind),
            &bar,
            gray_hint,
        ) {
            Ok(notes) => {
                for note in notes {
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

/// The (input, output) pairs, checked before any work: every input exists, no two inputs
/// share an output, no output is one of the inputs (nothing of the user's is overwritten), and
/// none is an existing device, FIFO or other file that is not a regular one.
fn plan(args: &Args) -> Result<Vec<(PathBuf, PathBuf)>> {
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
            if out.is_dir() {
                bail!(
                    "-o '{}' is a directory: give a file name, or use --out-dir",
                    out.display()
                );
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
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    for (input, _) in &jobs {
        seen.insert(canonical(input), input);
    }
    let mut targets: HashMap<PathBuf, &Path> = HashMap::new();
    for (input, output) in &jobs {
        crate::common::check_output_file(output)?;
        let target = canonical(output);
        if let Some(source) = seen.get(&target) {
            bail!(
                "'{}' would overwrite the input '{}': write the results elsewhere",
                output.display(),
                source.display()
            );
        }
        if let Some(other) = targets.insert(target, input) {
            bail!(
                "'{}' and '{}' would both be written to '{}': denoise them in separate runs or \
                 into different directories",
                other.display(),
                input.display(),
                output.display()
            );
        }
    }
    Ok(jobs)
}

/// Denoises one file; returns the notes to print (the estimated noise level).
fn denoise_one(
    runner: &Runner,
    input: &Path,
    output: &Path,
    sigma: Sigma,
    bar: &indicatif::ProgressBar,
    gray_hint: bool,
) -> Result<Vec<String>> {
    let (loaded, metadata) = io::load_with_metadata(input, io::DEFAULT_MAX_PIXELS)?;
    let depth = io::ImageFormat::from_path(output)
        .ok()
        .and_then(io::max_depth)
        .map_or(loaded.bit_depth, |max| match max {
            io::BitDepth::Eight => io::BitDepth::Eight,
            io::BitDepth::Sixteen => loaded.bit_depth,
        });
    // Before the (long) denoising: a result that cannot be written is known now.
    io::check_output(
        output,
        loaded.image.channels(),
        loaded.alpha.is_some(),
        depth,
    )?;
    // Not on a terminal (a log file, a service), a long image says where it is twice a minute.
    let mut last_line = std::time::Instant::now();
    // Steps are tiles, or passes over tiles with --ensemble.
    let unit = if runner.tile.ensemble > 1 {
        "pass"
    } else {
        "tile"
    };
    let mut progress = |done: usize, total: usize| {
        if total > 1 {
            bar.set_message(format!("{unit} {done}/{total}"));
            if bar.is_hidden() && done < total && last_line.elapsed().as_secs() >= 30 {
                last_line = std::time::Instant::now();
                eprintln!("{}: {unit} {done}/{total}", input.display());
            }
        }
    };
    let (out, used) = runner.denoise(&loaded.image, sigma, &mut progress, None)?;
    crate::common::create_parent_dir(output)?;
    // Its errors name the file.
    let dropped = io::save_with_metadata(output, &out, loaded.alpha.as_deref(), depth, &metadata)?;
    let mut notes = dropped_notes(output, &dropped);
    let gray_model = runner.model.config().channels() == 1;
    // Scanned only when a note could follow.
    let gray_picture = (gray_model || gray_hint)
        && loaded
            .image
            .is_gray_within(denoise_models::tile::GRAY_SPREAD);
    if gray_model && !gray_picture {
        notes.push(format!(
            "{}: a gray model: the result is gray (the default model keeps colour)",
            output.display()
        ));
    }
    if gray_hint && gray_picture {
        notes.push(format!(
            "{}: a gray picture: `--model {GRAY_MODEL}` (trained on gray images) denoises it better",
            input.display()
        ));
    }
    if loaded.bit_depth == io::BitDepth::Sixteen && depth == io::BitDepth::Eight {
        notes.push(format!(
            "{}: its format holds 8 bits, so the 16-bit input was written at 8 (.png or .tif \
             keep 16)",
            output.display()
        ));
    }
    if let (Sigma::Auto | Sigma::Blind, Some(s)) = (sigma, used) {
        notes.push(format!("{}: estimated sigma {s}", input.display()));
        if s.shared {
            notes.push(format!(
                "{}: its colour channels share their noise (a JPEG with subsampled colour, say), \
                 so the level is Immerkaer's filter's times {}, and the filter also counts \
                 texture: if a clean, busy photo comes out smoothed, give a small --sigma (2, say)",
                input.display(),
                denoise_data::estimate::SHARED_NOISE_GAIN
            ));
        }
        let (_, h, w) = loaded.image.shape();
        if h < 3 || w < 3 {
            notes.push(format!(
                "{}: {w}x{h} is too small to estimate the noise level; give --sigma",
                input.display()
            ));
        }
    }
    Ok(notes)
}

/// What of the input's metadata the output goes without: one line for what its format has no
/// place for, and one for each item dropped for another reason.
fn dropped_notes(output: &Path, dropped: &[Dropped]) -> Vec<String> {
    let (format, other): (Vec<&Dropped>, Vec<&Dropped>) =
        dropped.iter().partition(|d| d.reason == DropReason::Format);
    let mut notes = Vec::new();
    if !format.is_empty() {
        let items: Vec<String> = format.iter().map(|d| d.item.to_string()).collect();
        notes.push(format!(
            "note: {} cannot carry the input's {}; {} dropped",
            output.display(),
            items.join(", "),
            if items.len() == 1 {
                "it was"
            } else {
                "they were"
            }
        ));
    }
    for d in other {
        notes.push(format!(
            "note: {}: the input's {} was dropped: {}",
            output.display(),
            d.item,
            d.reason
        ));
    }
    notes
}

/// Prints above the bar, or plainly when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}
