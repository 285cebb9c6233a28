//! The subcommands, one module each; [`Cli`] is parsed once here and each command turns its raw
//! flags into checked values before doing any work.

mod bench;
mod doctor;
mod eval;
mod export;
mod infer;
mod metrics;
mod models;
mod noise;
mod plot;
mod prepare;
mod runs;
mod serve;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "denoise-cli",
    version,
    about = "Denoise images with trained CNNs (autoencoder, UNet, RIDNet, DnCNN, FFDNet, DRUNet) on libtorch",
    propagate_version = true
)]
pub struct Cli {
    /// libtorch threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Denoise image files or directories (keeps format, bit depth and alpha).
    Infer(Box<infer::Args>),
    /// Evaluate a model on clean images with seeded noise (the literature's protocol).
    Eval(Box<eval::Args>),
    /// Inference throughput in megapixels per second.
    Bench(bench::Args),
    /// Export a model as TorchScript.
    Export(export::Args),
    /// Show libtorch, CUDA, threads, CPU features and where the default model lives.
    Doctor(doctor::Args),
    /// List the model kinds with their parameter count and FLOPs per pixel.
    Models(models::Args),
    /// PSNR, SSIM, MSE and MAE between two images or two directories (matched by file name).
    Metrics(metrics::Args),
    /// Add synthetic noise to an image.
    Noise(noise::Args),
    /// Validate a folder of clean images and write a training manifest.
    PrepareData(prepare::Args),
    /// Train (or resume) a model on a manifest.
    Train(Box<train::Args>),
    /// Redraw a training run's loss and validation-PSNR plots from its log.
    Plot(plot::Args),
    /// Compare training runs: validation PSNR against the CPU time their training cost.
    Runs(runs::Args),
    /// Serve the web app and its HTTP API (upload, URL or sample; before/after; PNG download).
    Serve(Box<serve::Args>),
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        let n = i32::try_from(n)
            .ok()
            .filter(|n| (1..=4096).contains(n))
            .ok_or_else(|| anyhow::anyhow!("--threads must be in 1-4096, got {n}"))?;
        tch::set_num_threads(n);
    }
    match cli.command {
        Command::Infer(args) => infer::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Models(args) => models::run(&args),
        Command::Metrics(args) => metrics::run(&args),
        Command::Noise(args) => noise::run(&args),
        Command::PrepareData(args) => prepare::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Plot(args) => plot::run(&args),
        Command::Runs(args) => runs::run(&args),
    }
}
