//! `cargo xtask`: project automation. Links no libtorch crate; it drives `cargo` and
//! `denoise-cli` as subprocesses so it compiles in seconds.

mod bench;
mod ci;
mod demo;
mod fuzz;
mod passthrough;
mod setup;
mod tidy;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project automation for denoise",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Provision libtorch 2.13.0 (LIBTORCH, an existing torch install, or a cached virtualenv).
    Setup(setup::SetupArgs),
    /// Denoise the sample images in assets/ with the default model and print a PSNR/SSIM table.
    Demo(demo::DemoArgs),
    /// Our inference (and training) throughput beside PyTorch's, measured in one run.
    Bench(bench::BenchArgs),
    /// Fuzz what reads outside input (images, noise specs, configs, manifests, model files,
    /// HTTP requests) under libFuzzer, each target for --seconds; crashing inputs are kept in
    /// fuzz/artifacts/.
    Fuzz(fuzz::FuzzArgs),
    /// Exactly what CI runs: tidy, fmt check, clippy -D warnings, every test of the workspace,
    /// a few seconds of fuzzing per target.
    Ci,
    /// Checks of the repository's text: no process words or outside paths, anyhow only in
    /// binaries, README within its limit, relative links that resolve, no figures in doc comments.
    Tidy,
    /// Scan a folder of clean images and write a training manifest (see `denoise-cli prepare-data`).
    #[command(disable_help_flag = true)]
    PrepareData {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Train a model (see `denoise-cli train --help`).
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Setup(args) => setup::run(&args).map(|_| ()),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Ci => ci::run(),
        Command::Tidy => tidy::run(),
        Command::PrepareData { args } => passthrough::run("prepare-data", &args),
        Command::Train { args } => passthrough::run("train", &args),
    };
    if let Err(err) = result {
        eprintln!("xtask: {err:#}");
        std::process::exit(1);
    }
}
