//! `denoise-cli eval`: the literature's protocol (DPIR / SwinIR / KAIR test scripts): noisy =
//! clean + N(0, sigma/255) unclipped, the seed reset for every image, the output rounded to 8
//! bits, RGB PSNR with no border crop; mean PSNR / SSIM per noise, beside the noisy input's.

use crate::runner::{PrecisionArg, Runner, Sigma};
use anyhow::{Context, Result, bail};
use denoise_data::noise::NoiseSpec;
use denoise_data::{dataset, io};
use denoise_metrics::Shape;
use denoise_models::{LevelUsed, ModelSource, NoiseLevel};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a shipped name, an artefact file or a training run directory (default: shipped).
    #[arg(long)]
    model: Option<String>,
    /// Folder of clean images.
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    data: Option<PathBuf>,
    /// Noise specs separated by commas, e.g. gaussian:15,gaussian:25,gaussian:50,method1,method2.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "pairs",
        conflicts_with = "pairs"
    )]
    noise: Vec<String>,
    /// Real noise: a folder holding `noisy/` and `clean/`, files paired by name without the
    /// extension (any supported format). Blind unless --sigma is given.
    #[arg(long, value_name = "DIR")]
    pairs: Option<PathBuf>,
    /// Give models with a noise-level input this level (0-255 scale) instead of the true or
    /// estimated one.
    #[arg(long, value_name = "S", conflicts_with = "blind")]
    sigma: Option<f32>,
    /// Seed, reset for every image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Models with a noise-level input get the true level (the non-blind protocol of FFDNet's
    /// paper) unless this is set, when they estimate it from the noisy image (blind).
    #[arg(long)]
    blind: bool,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto, fp32 or bf16, as for `infer` (see `infer --help`).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Memory budget in MB for one tile's activations (large images are denoised in tiles).
    #[arg(long, default_value_t = 1024)]
    max_mem_mb: usize,
    /// Self-ensemble: denoise every tile N times (N = 1, 2, 4 or 8), flipped or turned and on
    /// another phase of the model's 2x2 grid, and average the results put back; N passes cost
    /// N times the time, and each doubling removes a little more noise (docs/benchmarks.md gives
    /// the gains).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::runner::parse_ensemble)]
    ensemble: usize,
    /// Print JSON (on stdout, like the text report).
    #[arg(long)]
    json: bool,
    /// Also report every image (with --blind, also the noise level estimated for it).
    #[arg(long)]
    per_image: bool,
    /// Let a colour model evaluate a gray set, as `infer` runs it on a gray picture: each noisy
    /// image repeated into RGB, the model told the level times sqrt(3) (the noise is alike in
    /// the three channels), the result turned back to gray and scored against the gray image.
    #[arg(long)]
    gray_through_colour: bool,
    /// Evaluate at fp32 and at bf16 and record bf16's PSNR loss (the largest over the noise
    /// levels) in the model file's metadata, where `--precision auto` reads it.
    #[arg(long, conflicts_with_all = ["precision", "blind", "per_image", "ensemble", "gray_through_colour"])]
    record_bf16: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(s) = args.sigma {
        if !(0.0..=255.0).contains(&s) {
            bail!("--sigma must be in 0-255, got {s}");
        }
    }
    if let Some(dir) = &args.pairs {
        return run_pairs(args, dir);
    }
    let data = args
        .data
        .as_deref()
        .expect("clap requires --data without --pairs");
    let specs: Vec<(String, NoiseSpec)> = args
        .noise
        .iter()
        .map(|s| Ok((s.trim().to_owned(), s.trim().parse::<NoiseSpec>()?)))
        .collect::<Result<_>>()?;
    let files = dataset::scan(data)?;
    if files.is_empty() {
        bail!("no images in '{}'", data.display());
    }
    if args.record_bf16 {
        return record_bf16(args, data, &files, &specs);
    }
    let runner = load(args, args.precision, true)?;
    let want = Channels::of(&runner, args.gray_through_colour)?;
    check_files(&files, want)?;
    if !args.json {
        println!("{}", runner.describe());
        if want == Channels::GrayThroughColour {
            println!("gray images through the colour model (the level times sqrt(3))");
        }
    }
    let results = evaluate(args, data, &runner, &files, &specs, want)?;
    if args.json {
        let model = runner.source().to_string();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model,
                "ensemble": args.ensemble,
                "gray_through_colour": want == Channels::GrayThroughColour,
                "results": results
            }))?
        );
    }
    Ok(())
}

/// `--model` as `args` say; `paired`: with the default's white-noise model.
fn load(args: &Args, precision: PrecisionArg, paired: bool) -> Result<Runner> {
    let settings = denoise_models::Settings {
        device: denoise_models::parse_device(&args.device).context("--device")?,
        precision: precision.policy(),
        tile: None,
        max_mem_mb: args.max_mem_mb,
        overlap: 32,
        ensemble: args.ensemble,
    };
    Runner::load_as(args.model.as_deref(), &settings, paired)
}

/// The images a run evaluates: the model's own channel count, or gray images through a colour
/// model (`--gray-through-colour`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channels {
    Model(usize),
    GrayThroughColour,
}

impl Channels {
    fn of(runner: &Runner, gray_through_colour: bool) -> Result<Self> {
        let model = runner.model().config().channels() as usize;
        match (gray_through_colour, model) {
            (false, _) => Ok(Self::Model(model)),
            (true, 3) => Ok(Self::GrayThroughColour),
            (true, _) => bail!("--gray-through-colour needs a colour model; this one is gray"),
        }
    }

    /// Why an image with `got` channels does not fit.
    fn mismatch(self, got: usize) -> String {
        match self {
            Self::Model(3) if got == 1 => {
                "the model takes 3 (--gray-through-colour evaluates a gray set with it)".into()
            }
            Self::Model(c) => format!("the model takes {c}"),
            Self::GrayThroughColour => "--gray-through-colour takes gray images".into(),
        }
    }

    /// The channel count the clean images must have.
    fn images(self) -> usize {
        match self {
            Self::Model(c) => c,
            Self::GrayThroughColour => 1,
        }
    }
}

/// Decodes every file before any work, so that a set which cannot be evaluated fails at once,
/// naming all of its problem files: an unreadable or truncated file, a gray image for a colour model
/// (or the reverse; converting would change what the PSNR measures, so a gray set goes through a
/// colour model only when asked, `--gray-through-colour`), or an image too small for SSIM's
/// window. A mean over a set that silently skipped files would not be comparable with the
/// literature's, so nothing is skipped.
fn check_files(files: &[PathBuf], want: Channels) -> Result<()> {
    use denoise_metrics::SSIM_WINDOW;
    let channels = want.images();
    let mut problems = Vec::new();
    for file in files {
        match io::load(file) {
            Ok(loaded) if loaded.image.channels() != channels => problems.push(format!(
                "'{}' has {} channel(s) but {}",
                file.display(),
                loaded.image.channels(),
                want.mismatch(loaded.image.channels())
            )),
            Ok(loaded) if loaded.image.height().min(loaded.image.width()) < SSIM_WINDOW => {
                let (w, h) = (loaded.image.width(), loaded.image.height());
                problems.push(format!(
                    "'{}' is {w}x{h} pixels, smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window",
                    file.display()
                ));
            }
            Ok(_) => {}
            Err(err) => problems.push(err.to_string()),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of {} file(s) cannot be evaluated (evaluate on a set of readable {} images): {}",
            problems.len(),
            files.len(),
            if channels == 1 { "gray" } else { "colour" },
            problems.join("; ")
        );
    }
    Ok(())
}

/// Measures bf16's PSNR loss against fp32 and writes it into the model's metadata.
fn record_bf16(
    args: &Args,
    data: &Path,
    files: &[PathBuf],
    specs: &[(String, NoiseSpec)],
) -> Result<()> {
    // The loss is recorded in this model's file: measure it alone.
    let fp32 = load(args, PrecisionArg::Fp32, false)?;
    let ModelSource::Path(file) = fp32.source().clone() else {
        bail!(
            "--record-bf16 writes into the model's file, and {} has none: give --model FILE",
            fp32.source()
        );
    };
    let want = Channels::Model(fp32.model().config().channels() as usize);
    check_files(files, want)?;
    let bf16 = load(args, PrecisionArg::Bf16, false)?;
    eprintln!("{}", fp32.describe());
    let a = evaluate(args, data, &fp32, files, specs, want)?;
    let b = evaluate(args, data, &bf16, files, specs, want)?;
    let mut loss = f64::MIN;
    for (ra, rb) in a.iter().zip(&b) {
        let (pa, pb) = (ra["mean_psnr"].as_f64(), rb["mean_psnr"].as_f64());
        let (Some(pa), Some(pb)) = (pa, pb) else {
            bail!("no PSNR to compare");
        };
        eprintln!(
            "{:<24} fp32 {pa:.3} dB, bf16 {pb:.3} dB: bf16 loses {:.3} dB",
            ra["noise"].as_str().unwrap_or(""),
            pa - pb
        );
        loss = loss.max(pa - pb);
    }
    let mut meta = fp32.metadata().clone();
    meta.bf16_psnr_loss_db = Some(loss);
    meta.bf16_measured_on = Some(format!(
        "{} ({} images), {}",
        data.display(),
        files.len(),
        args.noise.join(",")
    ));
    denoise_models::artefact::save(fp32.model(), &meta, &file)?;
    let from = denoise_models::ensemble::ENSEMBLE_SIZES
        .into_iter()
        .find(|&n| meta.bf16_is_cheap(n));
    let verdict = match from {
        Some(1) => "--precision auto will use bf16 where it is native".to_owned(),
        Some(n) => format!(
            "--precision auto will keep fp32 for a single pass and use bf16 where it is native \
             from --ensemble {n} (the passes average bf16's errors out)"
        ),
        None => "--precision auto will keep fp32".to_owned(),
    };
    println!(
        "recorded bf16 PSNR loss {loss:.3} dB in '{}': {verdict}",
        file.display()
    );
    Ok(())
}

/// Mean PSNR / SSIM per noise spec (one JSON row each), printed as it goes unless `--json`.
fn evaluate(
    args: &Args,
    data: &Path,
    runner: &Runner,
    files: &[PathBuf],
    specs: &[(String, NoiseSpec)],
    want: Channels,
) -> Result<Vec<serde_json::Value>> {
    let want = want.images();
    // One untimed run first, so that the first noise level's time does not include the
    // allocator's and libtorch's first-call costs.
    let first = io::load(&files[0])?.image;
    let _ = runner.denoise(&first, NoiseLevel::Uniform(25.0), &mut |_, _| {})?;
    // Over every image of every noise level; drawn on a terminal only.
    let bar = indicatif::ProgressBar::new((specs.len() * files.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<24} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut results = Vec::new();
    for (name, spec) in specs {
        bar.set_message(name.clone());
        let (mut psnr, mut ssim, mut noisy_psnr, mut seconds, mut pixels) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut per_image = Vec::new();
        for file in files {
            let clean = io::load(file)?.image;
            if clean.channels() != want {
                bail!(
                    "'{}' has {} channel(s) where the set's others have {want}: evaluate on a matching set",
                    file.display(),
                    clean.channels()
                );
            }
            let noisy = spec.apply(&clean, args.seed);
            // A model that reads the level itself records bf16's loss as it is used: blind.
            let own_level = args.record_bf16 && runner.model().config().estimates_level();
            let map = if args.blind || args.sigma.is_some() || own_level {
                None
            } else {
                noisy.sigma_map.as_ref()
            };
            let start = Instant::now();
            let level = map.map_or(given(args).level(), |m| NoiseLevel::Map(m.data()));
            let (out, used) = runner.denoise(&noisy.image, level, &mut |_, _| {})?;
            seconds += start.elapsed().as_secs_f64();
            pixels += clean.pixels() as f64;
            let (p, s) = score(&clean, &io::quantize_8bit(&out))?;
            let n = denoise_metrics::psnr(clean.data(), noisy.image.data(), 1.0)?;
            psnr += p;
            ssim += s;
            noisy_psnr += n;
            if args.per_image {
                let rel = file
                    .strip_prefix(data)
                    .unwrap_or(file)
                    .display()
                    .to_string();
                let mut r = serde_json::json!({"name": rel, "psnr": p, "ssim": s, "noisy_psnr": n});
                // The level the model was given where it estimated one (--blind).
                if let Some(used) = used.filter(|_| map.is_none()) {
                    level_fields(&mut r, &used);
                }
                per_image.push(r);
            }
            bar.inc(1);
        }
        let k = files.len() as f64;
        let mut row = serde_json::json!({
            "noise": name,
            "mean_psnr": psnr / k,
            "mean_ssim": ssim / k,
            "noisy_psnr": noisy_psnr / k,
            "seconds_per_mp": seconds / (pixels / 1e6),
            "images": files.len(),
        });
        if args.per_image {
            row["per_image"] = per_image.into();
        }
        if !args.json {
            bar.suspend(|| print_row(name, &row));
        }
        results.push(row);
    }
    bar.finish_and_clear();
    Ok(results)
}

/// An image's estimated level in its `--per-image` entry: the level, its least and greatest
/// values where it varies over the image, whether the model read it itself, and whether the
/// picture went to the model's white-noise network.
fn level_fields(r: &mut serde_json::Value, used: &LevelUsed) {
    r["sigma_estimate"] = used.sigma.into();
    if let Some((lo, hi)) = used.range {
        r["sigma_range"] = serde_json::json!([lo, hi]);
    }
    r["read_by_model"] = used.by_model.into();
    r["white_noise_model"] = used.by_white_model.into();
}

/// One noise level's line (and its images' with `--per-image`), for a person to read.
fn print_row(name: &str, row: &serde_json::Value) {
    let num = |key: &str| row[key].as_f64().unwrap_or(f64::NAN);
    println!(
        "{name:<24} PSNR {:>6.2} dB  SSIM {:.4}  (noisy {:>6.2} dB)  {:.2} s/MP  {} images",
        decibels(&row["mean_psnr"]),
        num("mean_ssim"),
        decibels(&row["noisy_psnr"]),
        num("seconds_per_mp"),
        row["images"].as_u64().unwrap_or(0)
    );
    for r in row["per_image"].as_array().into_iter().flatten() {
        let how = if r["read_by_model"].as_bool() == Some(true) {
            "across the image, read by the model"
        } else if r["white_noise_model"].as_bool() == Some(true) {
            "with brightness, white noise: the white-noise network"
        } else {
            "with brightness"
        };
        let range = match r["sigma_range"].as_array().map(|v| v.as_slice()) {
            Some([lo, hi]) => format!(
                " ({:.1} to {:.1} {how})",
                lo.as_f64().unwrap_or(f64::NAN),
                hi.as_f64().unwrap_or(f64::NAN)
            ),
            _ => String::new(),
        };
        let estimate = r["sigma_estimate"].as_f64().map_or(String::new(), |s| {
            format!("  sigma estimated {s:.2}{range}")
        });
        println!(
            "    {:<28} {:>6.2} dB  SSIM {:.4}{estimate}",
            r["name"].as_str().unwrap_or(""),
            decibels(&r["psnr"]),
            r["ssim"].as_f64().unwrap_or(0.0)
        );
    }
}

/// A PSNR from the report: JSON has no infinity, so identical images (an infinite PSNR, e.g. a
/// clean photo scored against itself) are written as null, and read back here as infinite.
fn decibels(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::INFINITY)
}

/// The level `--sigma` gives, or blind.
fn given(args: &Args) -> Sigma {
    args.sigma.map_or(Sigma::Blind, Sigma::Fixed)
}

/// A noisy photo and its clean reference, paired by name.
struct Pair {
    name: String,
    noisy: PathBuf,
    clean: PathBuf,
}

/// Pairs `DIR/noisy/*` with `DIR/clean/*` by file name without the extension; every file must
/// have its partner, and no name may appear twice on one side.
fn pair_files(dir: &Path) -> Result<Vec<Pair>> {
    let side = |name: &str| -> Result<std::collections::BTreeMap<String, PathBuf>> {
        let sub = dir.join(name);
        if !sub.is_dir() {
            bail!(
                "'{}' is not a folder: --pairs DIR needs DIR/noisy and DIR/clean",
                sub.display()
            );
        }
        let mut map = std::collections::BTreeMap::new();
        for file in dataset::scan(&sub)? {
            let rel = file.strip_prefix(&sub).unwrap_or(&file).with_extension("");
            let key = rel.to_string_lossy().into_owned();
            if let Some(other) = map.insert(key.clone(), file.clone()) {
                bail!(
                    "'{}' and '{}' share the name '{key}': a pair is matched by name",
                    other.display(),
                    file.display()
                );
            }
        }
        Ok(map)
    };
    let (noisy, mut clean) = (side("noisy")?, side("clean")?);
    let mut pairs = Vec::new();
    let mut unmatched = Vec::new();
    for (name, noisy) in noisy {
        match clean.remove(&name) {
            Some(clean) => pairs.push(Pair { name, noisy, clean }),
            None => unmatched.push(format!("'{}' has no clean partner", noisy.display())),
        }
    }
    unmatched.extend(
        clean
            .values()
            .map(|c| format!("'{}' has no noisy partner", c.display())),
    );
    if !unmatched.is_empty() {
        bail!(
            "{} unmatched file(s) in '{}': {}",
            unmatched.len(),
            dir.display(),
            unmatched.join("; ")
        );
    }
    if pairs.is_empty() {
        bail!("no image pairs in '{}'", dir.display());
    }
    Ok(pairs)
}

/// `eval --pairs`: real noisy photos against their references, one row with `"noise": "real"`.
fn run_pairs(args: &Args, dir: &Path) -> Result<()> {
    if args.record_bf16 || args.gray_through_colour {
        bail!("--pairs takes neither --record-bf16 nor --gray-through-colour");
    }
    let pairs = pair_files(dir)?;
    // Load and check every pair first, so a bad set fails at once, naming its files.
    let mut loaded = Vec::with_capacity(pairs.len());
    let mut problems = Vec::new();
    for pair in &pairs {
        match (io::load(&pair.noisy), io::load(&pair.clean)) {
            (Ok(n), Ok(c)) if n.image.shape() != c.image.shape() => problems.push(format!(
                "'{}' is {:?} but '{}' is {:?} (channels, height, width)",
                pair.noisy.display(),
                n.image.shape(),
                pair.clean.display(),
                c.image.shape()
            )),
            (Ok(n), Ok(c)) => loaded.push((pair, n.image, c.image)),
            (Err(e), _) | (_, Err(e)) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of {} pair(s) cannot be evaluated: {}",
            problems.len(),
            pairs.len(),
            problems.join("; ")
        );
    }
    let runner = load(args, args.precision, true)?;
    if !args.json {
        println!("{}", runner.describe());
    }
    let _ = runner.denoise(&loaded[0].1, NoiseLevel::Uniform(25.0), &mut |_, _| {})?;
    let bar = indicatif::ProgressBar::new(loaded.len() as u64);
    let (mut psnr, mut ssim, mut noisy_psnr, mut seconds, mut pixels) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut per_image = Vec::new();
    for (pair, noisy, clean) in &loaded {
        let start = Instant::now();
        let (out, used) = runner.denoise(noisy, given(args).level(), &mut |_, _| {})?;
        seconds += start.elapsed().as_secs_f64();
        pixels += clean.pixels() as f64;
        let (p, s) = score(clean, &io::quantize_8bit(&out))?;
        let n = denoise_metrics::psnr(clean.data(), noisy.data(), 1.0)?;
        psnr += p;
        ssim += s;
        noisy_psnr += n;
        if args.per_image {
            let mut r =
                serde_json::json!({"name": pair.name, "psnr": p, "ssim": s, "noisy_psnr": n});
            if let Some(used) = used.filter(|_| args.sigma.is_none()) {
                level_fields(&mut r, &used);
            }
            per_image.push(r);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let k = loaded.len() as f64;
    let mut row = serde_json::json!({
        "noise": "real",
        "mean_psnr": psnr / k,
        "mean_ssim": ssim / k,
        "noisy_psnr": noisy_psnr / k,
        "seconds_per_mp": seconds / (pixels / 1e6),
        "images": loaded.len(),
    });
    if let Some(s) = args.sigma {
        row["sigma"] = s.into();
    }
    if args.per_image {
        row["per_image"] = per_image.into();
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": runner.source().to_string(),
                "ensemble": args.ensemble,
                "gray_through_colour": false,
                "results": [row]
            }))?
        );
    } else {
        print_row("real", &row);
    }
    Ok(())
}

/// RGB (or gray) PSNR and SSIM of an 8-bit output against its reference, no border crop.
fn score(clean: &denoise_data::Image, out: &denoise_data::Image) -> Result<(f64, f64)> {
    let (c, h, w) = clean.shape();
    let p = denoise_metrics::psnr(clean.data(), out.data(), 1.0)?;
    let s = denoise_metrics::ssim(
        clean.data(),
        out.data(),
        Shape {
            channels: c,
            height: h,
            width: w,
        },
        1.0,
    )?;
    Ok((p, s))
}
