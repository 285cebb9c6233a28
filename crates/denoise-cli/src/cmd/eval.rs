//! `denoise-cli eval`: the literature's protocol (DPIR / SwinIR / KAIR test scripts): noisy =
//! clean + N(0, sigma/255) unclipped, the seed reset for every image, the output rounded to 8
//! bits, RGB PSNR with no border crop; mean PSNR / SSIM per noise, beside the noisy input's.

use crate::common::{PrecisionArg, Runner, Sigma};
use anyhow::{Result, bail};
use denoise_data::noise::NoiseSpec;
use denoise_data::{dataset, io};
use denoise_metrics::Shape;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a shipped name, an artefact file or a training run directory (default: shipped).
    #[arg(long)]
    model: Option<String>,
    /// Folder of clean images.
    #[arg(long)]
    data: PathBuf,
    /// Noise specs separated by commas, e.g. gaussian:15,gaussian:25,gaussian:50,method1,method2.
    #[arg(long, value_delimiter = ',', required = true)]
    noise: Vec<String>,
    /// Seed, reset for every image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Models with a noise-level input get the true level (the non-blind protocol of FFDNet's
    /// paper) unless this is set, when they estimate it from the noisy image (blind).
    #[arg(long)]
    blind: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    #[arg(long, default_value_t = 1024)]
    max_mem_mb: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also report every image.
    #[arg(long)]
    per_image: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let specs: Vec<(String, NoiseSpec)> = args
        .noise
        .iter()
        .map(|s| Ok((s.trim().to_owned(), s.trim().parse::<NoiseSpec>()?)))
        .collect::<Result<_>>()?;
    let files = dataset::scan(&args.data)?;
    if files.is_empty() {
        bail!("no images in '{}'", args.data.display());
    }
    let runner = Runner::load(
        args.model.as_deref(),
        &args.device,
        args.precision,
        None,
        32,
        args.max_mem_mb,
    )?;
    if !args.json {
        eprintln!("{}", runner.describe());
    }
    let want = runner.model.config().channels() as usize;
    let mut results = Vec::new();
    for (name, spec) in &specs {
        let (mut psnr, mut ssim, mut noisy_psnr, mut seconds, mut pixels) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut per_image = Vec::new();
        for file in &files {
            let clean = io::load(file)?.image;
            if clean.channels() != want {
                bail!(
                    "'{}' has {} channel(s) but the model takes {want}: evaluate on a matching set",
                    file.display(),
                    clean.channels()
                );
            }
            let noisy = spec.apply(&clean, args.seed);
            let map = if args.blind {
                None
            } else {
                noisy.sigma_map.as_ref()
            };
            let start = Instant::now();
            let (out, _) = runner.denoise(&noisy.image, Sigma::Blind, &mut |_, _| {}, map)?;
            seconds += start.elapsed().as_secs_f64();
            pixels += clean.pixels() as f64;
            let out = io::quantize_8bit(&out);
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
            let n = denoise_metrics::psnr(clean.data(), noisy.image.data(), 1.0)?;
            psnr += p;
            ssim += s;
            noisy_psnr += n;
            if args.per_image {
                let rel = file
                    .strip_prefix(&args.data)
                    .unwrap_or(file)
                    .display()
                    .to_string();
                per_image
                    .push(serde_json::json!({"name": rel, "psnr": p, "ssim": s, "noisy_psnr": n}));
            }
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
            eprintln!(
                "{name:<24} PSNR {:>6.2} dB  SSIM {:.4}  (noisy {:>6.2} dB)  {:.2} s/MP  {} images",
                psnr / k,
                ssim / k,
                noisy_psnr / k,
                seconds / (pixels / 1e6),
                files.len()
            );
            if let Some(rows) = row.get("per_image").and_then(|v| v.as_array()) {
                for r in rows {
                    eprintln!(
                        "    {:<28} {:>6.2} dB  SSIM {:.4}",
                        r["name"].as_str().unwrap_or(""),
                        r["psnr"].as_f64().unwrap_or(0.0),
                        r["ssim"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
        results.push(row);
    }
    if args.json {
        let model = runner.path.display().to_string();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"model": model, "results": results}))?
        );
    }
    Ok(())
}
