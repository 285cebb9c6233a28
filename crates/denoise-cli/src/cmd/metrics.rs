//! `denoise-cli metrics`: PSNR, SSIM, MSE and MAE between two images or two directories.

use anyhow::{Context, Result, bail};
use denoise_data::{dataset, io};
use denoise_metrics::{Report, Shape};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Reference (clean) image or directory.
    reference: PathBuf,
    /// Test image or directory (files matched by name).
    test: PathBuf,
    /// Print JSON: an object with psnr, ssim, mse, mae for a pair; for directories
    /// {"files": [{"name", ...}], "mean": {...}}. Infinite PSNR (identical images) is "inf".
    #[arg(long)]
    json: bool,
}

fn compare(reference: &Path, test: &Path) -> Result<Report> {
    let a = io::load(reference)?.image;
    let b = io::load(test)?.image;
    if a.shape() != b.shape() {
        bail!(
            "'{}' is {:?} but '{}' is {:?} (channels, height, width)",
            reference.display(),
            a.shape(),
            test.display(),
            b.shape()
        );
    }
    let (channels, height, width) = a.shape();
    Ok(Report::compute(
        a.data(),
        b.data(),
        Shape {
            channels,
            height,
            width,
        },
    )?)
}

pub fn run(args: &Args) -> Result<()> {
    if args.reference.is_dir() != args.test.is_dir() {
        bail!("give two files or two directories");
    }
    if !args.reference.is_dir() {
        let report = compare(&args.reference, &args.test)?;
        if args.json {
            println!("{}", report.to_json());
        } else {
            print_row(&args.reference.display().to_string(), &report);
        }
        return Ok(());
    }
    let files = dataset::scan(&args.reference)?;
    let mut rows = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&args.reference).unwrap_or(file);
        let other = args.test.join(rel);
        if !other.is_file() {
            eprintln!(
                "denoise-cli: skipping '{}': no '{}'",
                rel.display(),
                other.display()
            );
            continue;
        }
        let report =
            compare(file, &other).with_context(|| format!("comparing '{}'", rel.display()))?;
        rows.push((rel.display().to_string(), report));
    }
    if rows.is_empty() {
        bail!(
            "no file of '{}' has a match in '{}'",
            args.reference.display(),
            args.test.display()
        );
    }
    let n = rows.len() as f64;
    let mean = Report {
        psnr: rows.iter().map(|r| r.1.psnr).sum::<f64>() / n,
        ssim: rows.iter().map(|r| r.1.ssim).sum::<f64>() / n,
        mse: rows.iter().map(|r| r.1.mse).sum::<f64>() / n,
        mae: rows.iter().map(|r| r.1.mae).sum::<f64>() / n,
    };
    if args.json {
        let files: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, r)| {
                let mut v = r.to_json();
                v["name"] = name.clone().into();
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"files": files, "mean": mean.to_json()})
        );
    } else {
        for (name, r) in &rows {
            print_row(name, r);
        }
        print_row("mean", &mean);
    }
    Ok(())
}

fn print_row(name: &str, r: &Report) {
    println!(
        "{name:<32} PSNR {:>7.3} dB  SSIM {:.4}  MSE {:.3e}  MAE {:.3e}",
        r.psnr, r.ssim, r.mse, r.mae
    );
}
