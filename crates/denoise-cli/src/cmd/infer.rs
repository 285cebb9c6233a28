//! `denoise-cli infer`: denoise files or directories, keeping format, bit depth, alpha and
//! metadata.

use crate::batch::{self, FileReport, Report, Shard, ShardArg, ShardReport, Status};
use crate::outputs::canonical;
use crate::report::describe;
use crate::runner::{PrecisionArg, Runner, Sigma};
use anyhow::{Context, Result, bail};
use denoise_data::metadata::{DropReason, Dropped};
use denoise_data::{dataset, io};
use denoise_models::{LevelUsed, Settings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The shipped gray model's name.
const GRAY_MODEL: &str = "gray";

/// Which shipped models `infer` may point a picture to: the default model is in use and the
/// other one is shipped.
#[derive(Clone, Copy)]
struct Hints {
    /// The gray model, for a gray picture.
    gray: bool,
}

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
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::runner::parse_ensemble)]
    ensemble: usize,
    /// Image files or directories (recursive).
    #[arg(required_unless_present = "files_from")]
    inputs: Vec<PathBuf>,
    /// A file listing inputs, one path per line, relative to the list's folder or absolute;
    /// blank lines and lines starting with '#' are skipped. Each result goes to its path
    /// relative to the list's folder under --out-dir (a file outside that folder: its name).
    #[arg(long, value_name = "LIST", conflicts_with = "output")]
    files_from: Option<PathBuf>,
    /// Denoise only shard I of N (counted from 0) of the inputs, to split a batch over
    /// processes or machines: a file's shard is a hash of its path under --out-dir, so the N
    /// runs 0/N to N-1/N take every file once, and a file keeps its shard when others are
    /// added. 'auto' reads I and N from a Slurm job array (SLURM_ARRAY_TASK_ID less
    /// SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job
    /// (JOB_COMPLETION_INDEX, of --shards N).
    #[arg(long, value_name = "I/N|auto", conflicts_with = "output")]
    shard: Option<ShardArg>,
    /// With --shard auto in a Kubernetes Indexed Job: how many shards (the Job's completions).
    #[arg(long, value_name = "N", requires = "shard", value_parser = batch::parse_shards)]
    shards: Option<u64>,
    /// Leave alone an output that exists (outputs are written to a temporary file and renamed,
    /// so one that exists is complete): a batch run again after an interruption redoes only
    /// what is missing.
    #[arg(long)]
    skip_existing: bool,
    /// Write a JSON report to FILE: each input's status (done, skipped, or failed with the
    /// error), its seconds and the noise level used, and the totals.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Output file (one input file only).
    #[arg(short, long, conflicts_with = "out_dir")]
    output: Option<PathBuf>,
    /// Output directory (keeps relative paths and file names; created if missing).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
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
    let shard = resolve_shard(args)?;
    let batch = plan(args)?;
    let batch_files = batch.len();
    let jobs: Vec<Job> = match &shard {
        Some((shard, _)) => batch
            .into_iter()
            .filter(|job| shard.holds(&batch::key_bytes(&job.key)))
            .collect(),
        None => batch,
    };
    if let Some((shard, from)) = &shard {
        eprintln!(
            "shard {shard} (from {from}): {} of the batch's {batch_files} image(s)",
            jobs.len()
        );
    }
    let settings = Settings {
        device: denoise_models::parse_device(&args.device).context("--device")?,
        precision: args.precision.policy(),
        tile: args.tile,
        max_mem_mb: args.max_mem_mb,
        overlap: args.overlap,
        ensemble: args.ensemble,
    };
    let runner = Runner::load(args.model.as_deref(), &settings)?;
    eprintln!("{}", runner.describe());
    if args.sigma.is_some() && !runner.model().config().noise_map() {
        eprintln!(
            "note: --sigma is ignored: this {} takes no noise level (it denoises blind)",
            runner.model().config().kind().name()
        );
    }
    // The default is a colour model; gray pictures are told of the shipped gray one.
    let names = crate::lookup::shipped_models().unwrap_or_default();
    let shipped = |name: &str| names.iter().any(|n| n == name);
    let hints = Hints {
        gray: args.model.is_none()
            && runner.model().config().channels() == 3
            && shipped(GRAY_MODEL),
    };
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} files {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let sigma = args.sigma.unwrap_or(Sigma::Blind);
    let mut report = Report {
        model: runner.source().to_string(),
        shard: shard.map(|(shard, from)| ShardReport {
            index: shard.index,
            count: shard.count,
            from,
            batch_files,
        }),
        files: Vec::with_capacity(jobs.len()),
        totals: Default::default(),
    };
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for job in &jobs {
        bar.set_message("");
        let mut line = FileReport {
            input: job.input.display().to_string(),
            output: job.output.display().to_string(),
            status: Status::Done,
            seconds: 0.0,
            sigma: None,
            sigma_estimated: false,
            error: None,
        };
        if args.skip_existing && job.output.is_file() {
            line.status = Status::Skipped;
            skipped.push(job.output.display().to_string());
        } else {
            let start = Instant::now();
            match denoise_one(&runner, &job.input, &job.output, sigma, &bar, hints) {
                Ok((notes, used)) => {
                    for note in notes {
                        say(&bar, note);
                    }
                    line.sigma = used.map(|level| level.sigma);
                    line.sigma_estimated = used.is_some() && !matches!(sigma, Sigma::Fixed(_));
                }
                Err(err) => {
                    let text = describe(&err);
                    say(&bar, format!("denoise-cli: {text}"));
                    failures.push(job.input.display().to_string());
                    line.status = Status::Failed;
                    line.error = Some(text);
                }
            }
            line.seconds = start.elapsed().as_secs_f64();
        }
        report.files.push(line);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(path) = &args.report {
        report
            .write(path, started.elapsed().as_secs_f64())
            .with_context(|| format!("cannot write the report '{}'", path.display()))?;
    }
    if !skipped.is_empty() {
        const NAMED: usize = 5;
        let more = skipped.len().saturating_sub(NAMED);
        eprintln!(
            "skipped {} image(s) whose output exists: {}{}",
            skipped.len(),
            skipped[..skipped.len().min(NAMED)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} image(s) failed: {}",
            failures.len(),
            jobs.len(),
            failures.join(", ")
        );
    }
    eprintln!("denoised {} image(s)", jobs.len() - skipped.len());
    Ok(())
}

/// `--shard`, with where `auto` read it; `None` without `--shard`.
fn resolve_shard(args: &Args) -> Result<Option<(Shard, String)>> {
    match args.shard {
        None => Ok(None),
        Some(ShardArg::Fixed(shard)) => {
            if args.shards.is_some() {
                bail!("--shards goes with --shard auto; --shard {shard} already says how many");
            }
            Ok(Some((shard, "--shard".into())))
        }
        Some(ShardArg::Auto) => {
            batch::shard_from_env(args.shards, |name| std::env::var(name).ok()).map(Some)
        }
    }
}

/// One input, its output and its key: the path the output takes under `--out-dir`, which
/// decides its shard.
struct Job {
    input: PathBuf,
    output: PathBuf,
    key: PathBuf,
}

/// The whole batch, all shards, checked before any work (so every shard agrees it is sound):
/// every input exists, no two inputs share an output, no output (nor the report) is one of the
/// inputs (nothing of the user's is overwritten), and none is an existing device, FIFO or
/// other file that is not a regular one.
fn plan(args: &Args) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    for input in &args.inputs {
        if input.is_dir() {
            let Some(out_dir) = &args.out_dir else {
                bail!("'{}' is a directory: give --out-dir", input.display());
            };
            for file in dataset::scan(input)? {
                let key = file.strip_prefix(input).unwrap_or(&file).to_path_buf();
                jobs.push(Job {
                    output: out_dir.join(&key),
                    input: file,
                    key,
                });
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
            let key = out.file_name().map(PathBuf::from).unwrap_or_default();
            jobs.push(Job {
                input: input.clone(),
                output: out.clone(),
                key,
            });
        } else if let Some(out_dir) = &args.out_dir {
            let key = PathBuf::from(input.file_name().context("input has no file name")?);
            jobs.push(Job {
                input: input.clone(),
                output: out_dir.join(&key),
                key,
            });
        } else {
            bail!("give -o OUTPUT or --out-dir DIR");
        }
    }
    if let (Some(list), Some(out_dir)) = (&args.files_from, &args.out_dir) {
        for batch::Listed { file, key } in batch::read_list(list)? {
            jobs.push(Job {
                input: file,
                output: out_dir.join(&key),
                key,
            });
        }
    }
    if jobs.is_empty() {
        bail!("no images found in the inputs");
    }
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    for Job { input, .. } in &jobs {
        seen.insert(canonical(input), input);
    }
    if let Some(report) = &args.report {
        crate::outputs::check_output_file(report)?;
        if let Some(source) = seen.get(&canonical(report)) {
            bail!(
                "--report '{}' would overwrite the input '{}'",
                report.display(),
                source.display()
            );
        }
    }
    let mut targets: HashMap<PathBuf, &Path> = HashMap::new();
    for Job { input, output, .. } in &jobs {
        crate::outputs::check_output_file(output)?;
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
    if let Some(report) = args
        .report
        .as_ref()
        .filter(|r| targets.contains_key(&canonical(r)))
    {
        bail!(
            "--report '{}' is also an image's output: write it elsewhere",
            report.display()
        );
    }
    Ok(jobs)
}

/// Denoises one file; returns the notes to print (the estimated noise level) and the level the
/// model was told, if it takes one.
fn denoise_one(
    runner: &Runner,
    input: &Path,
    output: &Path,
    sigma: Sigma,
    bar: &indicatif::ProgressBar,
    hints: Hints,
) -> Result<(Vec<String>, Option<LevelUsed>)> {
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
    let unit = if runner.tiles().ensemble > 1 {
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
    let (out, used) = runner.denoise(&loaded.image, sigma.level(), &mut progress)?;
    crate::outputs::create_parent_dir(output)?;
    // Its errors name the file.
    let dropped = io::save_with_metadata(output, &out, loaded.alpha.as_deref(), depth, &metadata)?;
    let mut notes = dropped_notes(output, &dropped);
    let gray_model = runner.model().config().channels() == 1;
    // Scanned only when a note could follow.
    let gray_picture = (gray_model || hints.gray)
        && loaded
            .image
            .is_gray_within(denoise_models::level::GRAY_SPREAD);
    if gray_model && !gray_picture {
        notes.push(format!(
            "{}: a gray model: the result is gray (the default model keeps colour)",
            output.display()
        ));
    }
    if hints.gray && gray_picture {
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
    if let (Sigma::Blind, Some(s)) = (sigma, used) {
        notes.push(format!("{}: estimated sigma {s}", input.display()));
        // Under one 8-bit step the "noise" is a clean file's rounding: nothing to tell.
        if s.by_white_model && s.sigma >= 1.0 {
            notes.push(format!(
                "{}: its noise is white, independent from pixel to pixel and across colours (as \
                 synthetic noise is): denoised by the default's network for white noise",
                input.display()
            ));
        }
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
        // A model that reads the level itself reads any size.
        if (h < 3 || w < 3) && !s.by_model {
            notes.push(format!(
                "{}: {w}x{h} is too small to estimate the noise level; give --sigma",
                input.display()
            ));
        }
    }
    Ok((notes, used))
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
