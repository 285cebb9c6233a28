//! Subcommands that are `denoise-cli` subcommands run from a release build after setup.

use crate::{setup, util};
use anyhow::{Context, Result, bail};

/// Sets up libtorch, builds the release `denoise-cli` and runs `denoise-cli SUBCOMMAND ARGS...`.
pub fn run(subcommand: &str, args: &[String]) -> Result<()> {
    let cli = build_cli()?;
    let status = std::process::Command::new(&cli)
        .arg(subcommand)
        .args(args)
        .status()
        .with_context(|| format!("failed to run {}", cli.display()))?;
    if !status.success() {
        bail!("denoise-cli {subcommand} failed ({status})");
    }
    Ok(())
}

/// Provisions libtorch and builds `target/release/denoise-cli`, returning its path.
pub fn build_cli() -> Result<std::path::PathBuf> {
    setup::run(&setup::SetupArgs {
        quiet: true,
        ..Default::default()
    })?;
    util::run_step(
        "cargo build --release -p denoise-cli",
        util::cargo().args(["build", "--release", "-p", "denoise-cli"]),
    )?;
    Ok(util::target_dir().join("release/denoise-cli"))
}
