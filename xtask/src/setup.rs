//! `cargo xtask setup`: provisions libtorch 2.13.0 and points the git-ignored `.libtorch` link at
//! it, so plain `cargo build` / `cargo test` work (`.cargo/config.toml` sets `LIBTORCH` to that
//! link and each libtorch crate's build script embeds an rpath to its `lib/`).
//!
//! Order of preference: a `LIBTORCH` the user set; the existing link if still valid; a `python3`
//! (or `$DENOISE_PYTHON`) that imports torch 2.13.x; a cached virtualenv under
//! `$DENOISE_CACHE_DIR` (default `~/.cache/denoise`), created with `pip install torch==2.13.0`
//! when missing.

use crate::util;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The libtorch version tch 0.26 is built for.
pub const TORCH_VERSION: &str = "2.13.0";
/// Disk space a fresh torch install needs (the CUDA wheel and its dependencies are ~4.7 GB).
const NEEDED_BYTES: u64 = 6 << 30;

#[derive(clap::Args, Default)]
pub struct SetupArgs {
    /// Print only problems and the final line.
    #[arg(long)]
    pub quiet: bool,
    /// Re-resolve libtorch even if the `.libtorch` link is valid.
    #[arg(long)]
    pub force: bool,
}

/// Makes `.libtorch` point at a valid libtorch 2.13 and returns that directory.
pub fn run(args: &SetupArgs) -> Result<PathBuf> {
    let start = Instant::now();
    let root = util::root();
    let link = root.join(".libtorch");
    let say = |msg: &str| {
        if !args.quiet {
            eprintln!("setup: {msg}");
        }
    };

    let dir = if let Some(user) = user_libtorch(&link) {
        check_libtorch(&user).with_context(|| {
            format!(
                "LIBTORCH={} is not a usable libtorch {TORCH_VERSION}",
                user.display()
            )
        })?;
        say(&format!("using LIBTORCH={}", user.display()));
        user
    } else if !args.force && check_libtorch(&link).is_ok() {
        let real = std::fs::canonicalize(&link).unwrap_or(link.clone());
        say(&format!(
            "libtorch {TORCH_VERSION} already set up at {}",
            real.display()
        ));
        real
    } else if let Some(found) = python_torch(&python())? {
        say(&format!(
            "using the torch of {}: {}",
            python().display(),
            found.display()
        ));
        found
    } else {
        venv_torch(args.quiet)?
    };

    point_link(&link, &dir)?;
    invalidate_stale_build(&root, &dir)?;
    if !args.quiet {
        eprintln!(
            "setup: .libtorch -> {} (ready in {:.1}s)",
            dir.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(dir)
}

/// `LIBTORCH` from the environment, unless it is our own link (which `.cargo/config.toml` sets
/// for every process cargo starts, this one included).
fn user_libtorch(link: &Path) -> Option<PathBuf> {
    let value = PathBuf::from(std::env::var_os("LIBTORCH")?);
    if value == link || value.ends_with(".libtorch") {
        return None;
    }
    Some(value)
}

/// Checks that `dir` has `include/`, `lib/libtorch_cpu.so` and version 2.13.x.
pub fn check_libtorch(dir: &Path) -> Result<()> {
    if !dir.join("include/torch").is_dir() {
        bail!("{} has no include/torch directory", dir.display());
    }
    if !dir.join("lib/libtorch_cpu.so").is_file() {
        bail!("{} has no lib/libtorch_cpu.so", dir.display());
    }
    let version = libtorch_version(dir)?;
    let plain = version.split('+').next().unwrap_or(&version);
    if plain != TORCH_VERSION {
        bail!(
            "{} is libtorch {version}, but tch 0.26 needs {TORCH_VERSION}; \
             point LIBTORCH at a {TORCH_VERSION} install or unset it",
            dir.display()
        );
    }
    Ok(())
}

/// The version of a libtorch dir: `build-version` (libtorch zips) or `version.py` (a Python
/// `torch/` package), read without starting Python so a set-up check stays fast.
fn libtorch_version(dir: &Path) -> Result<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("build-version")) {
        return Ok(text.trim().to_owned());
    }
    let text = std::fs::read_to_string(dir.join("version.py"))
        .with_context(|| format!("{} has neither build-version nor version.py", dir.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("__version__"))
        .and_then(|rest| rest.split(['\'', '"']).nth(1))
        .map(str::to_owned)
        .with_context(|| format!("no __version__ in {}/version.py", dir.display()))
}

fn python() -> PathBuf {
    std::env::var_os("DENOISE_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// The `torch/` directory of `python` if it imports torch 2.13.x; `None` if it has no torch or
/// another version (or no python at all).
fn python_torch(python: &Path) -> Result<Option<PathBuf>> {
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))",
        ])
        .output();
    let Ok(out) = out else { return Ok(None) };
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(version), Some(dir)) = (lines.next(), lines.next()) else {
        return Ok(None);
    };
    if !version.starts_with(TORCH_VERSION) {
        return Ok(None);
    }
    let dir = PathBuf::from(dir);
    Ok(check_libtorch(&dir).is_ok().then_some(dir))
}

pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DENOISE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context(
        "HOME is not set: set DENOISE_CACHE_DIR to a directory for the torch virtualenv",
    )?;
    Ok(PathBuf::from(home).join(".cache/denoise"))
}

/// The torch of the cached virtualenv, creating it (`pip install torch==2.13.0`) when missing.
fn venv_torch(quiet: bool) -> Result<PathBuf> {
    let venv = cache_dir()?.join(format!("torch-{TORCH_VERSION}-venv"));
    let venv_python = venv.join("bin/python");
    if venv_python.exists() {
        if let Some(dir) = python_torch(&venv_python)? {
            if !quiet {
                eprintln!("setup: using the cached virtualenv {}", venv.display());
            }
            return Ok(dir);
        }
    }
    let base = python();
    let version = Command::new(&base)
        .arg("--version")
        .output()
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot run '{}' ({err}): install Python 3 with pip and venv, or set LIBTORCH to a \
             libtorch {TORCH_VERSION} directory (see README.md)",
                base.display()
            )
        })?;
    let parent = venv.parent().expect("venv path has a parent");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the cache directory {}", parent.display()))?;
    if let Some(free) = free_bytes(parent) {
        if free < NEEDED_BYTES {
            bail!(
                "only {:.1} GB free in {}, torch {TORCH_VERSION} needs about {:.0} GB: free some \
                 space, set DENOISE_CACHE_DIR to a bigger disk, or set LIBTORCH",
                free as f64 / 1e9,
                parent.display(),
                NEEDED_BYTES as f64 / 1e9
            );
        }
    }
    eprintln!(
        "setup: creating {} with {} and installing torch=={TORCH_VERSION} (about 4.7 GB, a minute \
         or more)",
        venv.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    let start = Instant::now();
    let status = Command::new(&base)
        .args(["-m", "venv"])
        .arg(&venv)
        .status()?;
    if !status.success() {
        bail!(
            "'{} -m venv {}' failed ({status}): install the venv module (Debian: apt-get install \
             python3-venv), or set LIBTORCH",
            base.display(),
            venv.display()
        );
    }
    let status = Command::new(&venv_python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
        ])
        .arg(format!("torch=={TORCH_VERSION}"))
        .status()
        .context("failed to run pip")?;
    if !status.success() {
        bail!(
            "'pip install torch=={TORCH_VERSION}' failed ({status}); see pip's output above \
             (network? disk space?), or set LIBTORCH to a libtorch {TORCH_VERSION} directory"
        );
    }
    let dir = python_torch(&venv_python)?.with_context(|| {
        format!(
            "torch installed in {} but cannot be imported",
            venv.display()
        )
    })?;
    eprintln!(
        "setup: installed torch {TORCH_VERSION} in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// Free bytes on the file system holding `dir`, from `df` (None when unknown).
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Points `link` at `target`, replacing an old link atomically (symlink to a temp name, rename).
fn point_link(link: &Path, target: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|old| old == target) {
        return Ok(());
    }
    if link.exists() && std::fs::symlink_metadata(link)?.is_dir() {
        bail!(
            "{} is a real directory, not a link: move it away and re-run setup",
            link.display()
        );
    }
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("cannot create a link at {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("cannot replace {}", link.display()))?;
    Ok(())
}

/// When the link now points somewhere else than at the last build, torch-sys must rebuild: its
/// build script only watches the *value* of `LIBTORCH`, which stays `.libtorch`.
fn invalidate_stale_build(root: &Path, dir: &Path) -> Result<()> {
    let stamp = root.join(".libtorch.stamp");
    let now = dir.display().to_string();
    match std::fs::read_to_string(&stamp) {
        Ok(old) if old == now => return Ok(()),
        Ok(_) => {
            eprintln!("setup: libtorch moved; cleaning torch-sys so it relinks");
            util::run_step(
                "cargo clean -p torch-sys",
                util::cargo().args(["clean", "-p", "torch-sys"]),
            )?;
        }
        Err(_) => {}
    }
    std::fs::write(&stamp, now).with_context(|| format!("cannot write {}", stamp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_version_py_and_build_version() {
        let dir = std::env::temp_dir().join(format!("xtask-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("version.py"),
            "from x import y\n__version__ = '2.13.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(libtorch_version(&dir).unwrap(), "2.13.0+cu130");
        std::fs::write(dir.join("build-version"), "2.13.0+cpu\n").unwrap();
        assert_eq!(libtorch_version(&dir).unwrap(), "2.13.0+cpu");
        assert!(check_libtorch(&dir).is_err(), "no include/ or lib/");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
