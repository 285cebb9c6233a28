//! `denoise-cli metrics`: PSNR, SSIM, MSE and MAE between two images or two directories.

use anyhow::{Result, bail};
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
    /// {"files": [{"name", ...}], "mean": {...}, "unmatched": [names], "failed": [{"name",
    /// "error"}]}. Infinite PSNR (identical images) is "inf"; ssim is null for an image under
    /// 11x11.
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
    let mut unmatched = Vec::new();
    let mut failed = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&args.reference).unwrap_or(file);
        let other = args.test.join(rel);
        if !other.is_file() {
            eprintln!(
                "denoise-cli: skipping '{}': no '{}'",
                rel.display(),
                other.display()
            );
            unmatched.push(rel.display().to_string());
            continue;
        }
        // A bad pair is reported and the others still compared; the exit status says so.
        match compare(file, &other) {
            Ok(report) => rows.push((rel.display().to_string(), report)),
            Err(e) => {
                eprintln!("denoise-cli: '{}': {e:#}", rel.display());
                failed.push((rel.display().to_string(), format!("{e:#}")));
            }
        }
    }
    if rows.is_empty() && failed.is_empty() {
        bail!(
            "no file of '{}' has a match in '{}'",
            args.reference.display(),
            args.test.display()
        );
    }
    let mean = mean_report(&rows);
    if args.json {
        let files: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, r)| {
                let mut v = r.to_json();
                v["name"] = name.clone().into();
                v
            })
            .collect();
        let failed: Vec<serde_json::Value> = failed
            .iter()
            .map(|(name, error)| serde_json::json!({"name": name, "error": error}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "files": files,
                "mean": mean.map(|m| m.to_json()),
                "unmatched": unmatched,
                "failed": failed,
            })
        );
    } else {
        for (name, r) in &rows {
            print_row(name, r);
        }
        if let Some(mean) = &mean {
            print_row("mean", mean);
        }
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "{} of {} pair(s) could not be compared: {}",
            failed.len(),
            failed.len() + rows.len(),
            names.join(", ")
        );
    }
    Ok(())
}

/// The mean of each score over `rows` (SSIM over the images that have one); `None` when empty.
fn mean_report(rows: &[(String, Report)]) -> Option<Report> {
    if rows.is_empty() {
        return None;
    }
    let n = rows.len() as f64;
    let ssims: Vec<f64> = rows.iter().filter_map(|r| r.1.ssim).collect();
    Some(Report {
        psnr: rows.iter().map(|r| r.1.psnr).sum::<f64>() / n,
        ssim: (!ssims.is_empty()).then(|| ssims.iter().sum::<f64>() / ssims.len() as f64),
        mse: rows.iter().map(|r| r.1.mse).sum::<f64>() / n,
        mae: rows.iter().map(|r| r.1.mae).sum::<f64>() / n,
    })
}

fn print_row(name: &str, r: &Report) {
    let ssim = r
        .ssim
        .map_or_else(|| "   n/a".to_owned(), |s| format!("{s:.4}"));
    println!(
        "{name:<32} PSNR {:>7.3} dB  SSIM {ssim}  MSE {:.3e}  MAE {:.3e}",
        r.psnr, r.mse, r.mae
    );
}
