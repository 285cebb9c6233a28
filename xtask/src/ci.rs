//! `cargo xtask ci`: formatting, lints and every test of the workspace, as `.ci/run` runs them.

use crate::{setup, util};
use anyhow::Result;
use std::time::Instant;

pub fn run() -> Result<()> {
    let start = Instant::now();
    setup::run(&setup::SetupArgs::default())?;
    util::run_step(
        "cargo fmt --all --check",
        util::cargo().args(["fmt", "--all", "--check"]),
    )?;
    util::run_step(
        "cargo clippy --workspace --all-targets -- -D warnings",
        util::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    util::run_step(
        "cargo test --workspace",
        util::cargo().args(["test", "--workspace"]),
    )?;
    eprintln!("ci: all green in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}
