//! `cargo xtask ci`: formatting, lints, every test of the workspace and a short fuzzing pass, as
//! `.ci/run` runs them.
//! Installs what the tests drive first when missing: Chromium and chromedriver (the web app's
//! end-to-end test) and Slurm with munge (the job-array script's test, on a one-node Slurm it
//! starts), and runs the tests with `CI` set, so those tests fail rather than skip without them.

use crate::{setup, util};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub fn run() -> Result<()> {
    let start = Instant::now();
    crate::tidy::run()?;
    setup::run(&setup::SetupArgs::default())?;
    ensure_chromium()?;
    ensure_slurm()?;
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
    let ci = std::env::var_os("CI").unwrap_or_else(|| "1".into());
    util::run_step(
        "cargo test --workspace",
        util::cargo().args(["test", "--workspace"]).env("CI", ci),
    )?;
    crate::fuzz::smoke()?;
    eprintln!("ci: all green in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// `name` on `PATH` or in an sbin folder, where Debian puts daemons (not on every user's `PATH`).
fn installed(name: &str) -> bool {
    on_path(name)
        || ["/usr/sbin", "/usr/local/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(name).is_file())
}

/// Installs the Debian packages `slurmctld`, `slurmd` and `munge` (which bring `sbatch` and
/// `munged`) unless their daemons and client are already there.
fn ensure_slurm() -> Result<()> {
    if ["slurmctld", "slurmd", "sbatch", "munged"]
        .iter()
        .all(|n| installed(n))
    {
        return Ok(());
    }
    apt_install(
        &["slurmctld", "slurmd", "munge"],
        "the Slurm job-array test needs slurmctld, slurmd, sbatch and munged",
    )
}

/// Installs the Debian packages `chromium` and `chromium-driver` with apt-get unless a Chromium
/// and a chromedriver are already on `PATH` (as root, or through passwordless sudo).
fn ensure_chromium() -> Result<()> {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .any(|n| on_path(n));
    if browser && on_path("chromedriver") {
        return Ok(());
    }
    apt_install(
        &["chromium", "chromium-driver"],
        "the web app's end-to-end test needs Chromium and chromedriver on PATH",
    )
}

/// `apt-get update` and `apt-get install PACKAGES` (as root, or through passwordless sudo);
/// `why` is the error's start where there is no apt-get.
fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").is_file() {
        bail!("{why}, and there is no apt-get to install them");
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run `id -u`")?
        .stdout
        .starts_with(b"0");
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    util::run_step("apt-get update", &mut apt(&["update", "-qq"]))?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    util::run_step(
        &format!("apt-get install {}", packages.join(" ")),
        &mut apt(&install),
    )
}
