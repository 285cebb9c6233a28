//! `cargo xtask demo`: the main job on the shipped default model. Adds seeded noise to the clean
//! samples in `assets/samples/`, denoises them with `denoise-cli infer`, and prints PSNR/SSIM of
//! the noisy and the denoised images (`denoise-cli metrics`). Outputs land in `target/demo/`.

use crate::{passthrough, util};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Noise added to the samples (a denoise-cli noise spec).
    #[arg(long, default_value = "gaussian:25")]
    noise: String,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model to use instead of the shipped default.
    #[arg(long)]
    model: Option<String>,
    /// Also write a figure: for the first two samples, a crop of the noisy, the denoised and
    /// the clean image side by side (2x nearest-neighbour zoom), one sample per row.
    #[arg(long)]
    figure: Option<std::path::PathBuf>,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let cli = passthrough::build_cli()?;
    let root = util::root();
    let out = util::target_dir().join("demo");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut samples: Vec<_> = std::fs::read_dir(root.join("assets/samples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    samples.sort();
    if samples.is_empty() {
        bail!("no PNG samples in assets/samples");
    }
    let mut rows = Vec::new();
    for clean in &samples {
        let stem = clean
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let noisy = out.join(format!("{stem}-noisy.png"));
        let denoised = out.join(format!("{stem}-denoised.png"));
        cli_ok(
            Command::new(&cli)
                .args([
                    "noise",
                    "--kind",
                    &args.noise,
                    "--seed",
                    &args.seed.to_string(),
                ])
                .arg(clean)
                .arg("-o")
                .arg(&noisy),
        )?;
        let mut infer = Command::new(&cli);
        infer.arg("infer");
        if let Some(m) = &args.model {
            infer.args(["--model", m]);
        }
        cli_ok(infer.arg(&noisy).arg("-o").arg(&denoised))?;
        rows.push((
            stem,
            metrics(&cli, clean, &noisy)?,
            metrics(&cli, clean, &denoised)?,
        ));
    }
    println!();
    println!(
        "{:<12} {:>14} {:>12} {:>16} {:>14}",
        "image", "noisy PSNR", "noisy SSIM", "denoised PSNR", "denoised SSIM"
    );
    for (name, n, d) in &rows {
        println!(
            "{name:<12} {:>11.2} dB {:>12.4} {:>13.2} dB {:>14.4}",
            n.0, n.1, d.0, d.1
        );
    }
    println!(
        "\nnoise {} (seed {}); images in {}",
        args.noise,
        args.seed,
        out.display()
    );
    if let Some(path) = &args.figure {
        let triples: Vec<[std::path::PathBuf; 3]> = samples
            .iter()
            .take(2)
            .map(|clean| {
                let stem = clean.file_stem().unwrap_or_default().to_string_lossy();
                [
                    out.join(format!("{stem}-noisy.png")),
                    out.join(format!("{stem}-denoised.png")),
                    clean.clone(),
                ]
            })
            .collect();
        figure(&triples, path)?;
        println!("figure (noisy | denoised | clean): {}", path.display());
    }
    Ok(())
}

/// Side of the square crop, before the 2x zoom, and the gap between panels.
const CROP: u32 = 160;
const GAP: u32 = 6;

/// Writes `[noisy, denoised, clean]` crops of each triple as one row of a PNG. The crop is the
/// image's centre, raised a little: faces in photos tend to sit above the middle.
fn figure(triples: &[[std::path::PathBuf; 3]], path: &Path) -> Result<()> {
    let side = 2 * CROP;
    let rows = triples.len() as u32;
    let (w, h) = (3 * side + 4 * GAP, rows * side + (rows + 1) * GAP);
    let mut canvas = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (r, triple) in triples.iter().enumerate() {
        for (c, file) in triple.iter().enumerate() {
            let img = image::open(file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .to_rgb8();
            if img.width() < CROP || img.height() < CROP {
                bail!("{} is smaller than the {CROP}px crop", file.display());
            }
            let x0 = (img.width() - CROP) / 2;
            let y0 = (img.height() - CROP) / 3;
            let (ox, oy) = (GAP + c as u32 * (side + GAP), GAP + r as u32 * (side + GAP));
            for y in 0..side {
                for x in 0..side {
                    let p = *img.get_pixel(x0 + x / 2, y0 + y / 2);
                    canvas.put_pixel(ox + x, oy + y, p);
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Encoded in memory and renamed into place: an interrupted run leaves the old figure.
    let mut bytes = std::io::Cursor::new(Vec::new());
    canvas
        .write_to(
            &mut bytes,
            image::ImageFormat::from_path(path).unwrap_or(image::ImageFormat::Png),
        )
        .context("cannot encode the figure")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes.into_inner())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn cli_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().context("failed to run denoise-cli")?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// (PSNR, SSIM) of `test` against `reference`, from `denoise-cli metrics --json`.
fn metrics(cli: &Path, reference: &Path, test: &Path) -> Result<(f64, f64)> {
    let out = Command::new(cli)
        .arg("metrics")
        .arg(reference)
        .arg(test)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!(
            "denoise-cli metrics failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("metrics printed no JSON")?;
    // Identical images have PSNR "inf" (JSON has no infinity).
    let psnr = v["psnr"].as_f64().unwrap_or(f64::INFINITY);
    Ok((psnr, v["ssim"].as_f64().unwrap_or(f64::NAN)))
}
