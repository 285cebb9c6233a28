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
    Ok(())
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
