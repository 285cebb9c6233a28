//! Small helpers shared by the xtask subcommands: the repository root and running commands.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The repository root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// The cargo that runs us (so a rustup toolchain override is respected).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd` with inherited stdio, printing it first and its duration after; fails on non-zero.
pub fn run_step(label: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {label}");
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {label}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{label} failed ({status}) after {secs:.1}s");
    }
    eprintln!("    {label}: ok in {secs:.1}s");
    Ok(())
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}
