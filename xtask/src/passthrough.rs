//! Subcommands that are `denoise-cli` subcommands run from a release build after setup.

use crate::{setup, util};
use anyhow::{Result, bail};

/// Sets up libtorch, builds the release `denoise-cli` and runs `denoise-cli SUBCOMMAND ARGS...`.
///
/// On Unix the process becomes `denoise-cli` (exec): Ctrl-C and `kill` reach the training
/// itself, which checkpoints before it exits, the shell waits for that, and the exit status is
/// denoise-cli's own. A child process instead would die at once on Ctrl-C while the training
/// still wrote its checkpoint, or be orphaned by a `kill` of xtask.
pub fn run(subcommand: &str, args: &[String]) -> Result<()> {
    let cli = build_cli()?;
    let mut command = std::process::Command::new(&cli);
    command.arg(subcommand).args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let error = command.exec();
        bail!("failed to run {}: {error}", cli.display());
    }
    #[cfg(not(unix))]
    {
        use anyhow::Context;
        let status = command
            .status()
            .with_context(|| format!("failed to run {}", cli.display()))?;
        if !status.success() {
            bail!("denoise-cli {subcommand} failed ({status})");
        }
        Ok(())
    }
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
