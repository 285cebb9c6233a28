//! Finding a model from `--model`: a file, a run directory, or a shipped model by name (the
//! default when none is given); and the demo samples the web app shows.
//!
//! The shipped models and samples are built into the program, so a copied or installed binary
//! has them wherever it runs. The rest of the program reads models from files, so a built-in
//! one is unpacked into the data directory ([`data_dir`]) when first used, and rewritten there
//! when this program's copy differs. Where they are looked for, first hit wins:
//! 1. `$DENOISE_MODELS` (`$DENOISE_SAMPLES`), when set: that folder only;
//! 2. `models/` (`samples/`) beside the executable;
//! 3. the program's built-in copy;
//! 4. `models/` in the data directory, where a user may add their own by name.

use anyhow::{Context, Result, bail};
use denoise_models::artefact::read_metadata;
use std::path::{Path, PathBuf};

mod built_in {
    include!(concat!(env!("OUT_DIR"), "/built_in.rs"));
}

/// Where built-in models and samples are unpacked: `$DENOISE_DATA_DIR`, else
/// `$XDG_DATA_HOME/denoise`, else `~/.local/share/denoise`, else `denoise` in the temp dir.
pub fn data_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("DENOISE_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("denoise");
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".local/share/denoise");
    }
    std::env::temp_dir().join("denoise")
}

/// `NAME/` beside the executable, when it is a folder.
fn beside_executable(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.join(name);
    dir.is_dir().then_some(dir)
}

/// The folder `$DENOISE_MODELS` names, when set.
fn models_override() -> Option<PathBuf> {
    std::env::var_os("DENOISE_MODELS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Writes `bytes` to `path` unless it already holds them, and returns `path`.
fn unpack(path: PathBuf, bytes: &[u8]) -> Result<PathBuf> {
    if std::fs::read(&path).ok().as_deref() != Some(bytes) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create '{}'", dir.display()))?;
        }
        denoise_data::io::write_atomic(&path, bytes)?;
    }
    Ok(path)
}

/// The file of the shipped model `name`, or `None` when no such model is shipped.
pub fn shipped_model(name: &str) -> Result<Option<PathBuf>> {
    let file = format!("{name}.safetensors");
    if let Some(dir) = models_override() {
        let path = dir.join(file);
        return Ok(path.is_file().then_some(path));
    }
    if let Some(path) = beside_executable("models")
        .map(|dir| dir.join(&file))
        .filter(|p| p.is_file())
    {
        return Ok(Some(path));
    }
    let unpacked = data_dir().join("models").join(&file);
    if let Some((_, bytes)) = built_in::MODELS.iter().find(|(n, _)| *n == name) {
        return unpack(unpacked, bytes).map(Some);
    }
    Ok(unpacked.is_file().then_some(unpacked))
}

/// The shipped default model's name.
pub const DEFAULT_MODEL: &str = "default";

/// The shipped model that the default gives blind white noise to
/// (`Denoiser::with_white_noise_model`).
pub const WHITE_NOISE_MODEL: &str = "white";

/// The shipped default model's file.
pub fn default_model() -> Result<PathBuf> {
    shipped_model(DEFAULT_MODEL)?.with_context(|| {
        format!(
            "no default model: {} holds no default.safetensors; pass --model PATH",
            models_override()
                .unwrap_or_else(|| data_dir().join("models"))
                .display()
        )
    })
}

/// Where the demo images live: `$DENOISE_SAMPLES`, else `samples/` beside the executable, else
/// the built-in ones, unpacked into the data directory (or `None` when that fails).
pub fn samples_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DENOISE_SAMPLES").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = beside_executable("samples") {
        return Some(dir);
    }
    let dir = data_dir().join("samples");
    for (name, bytes) in built_in::SAMPLES {
        if let Err(e) = unpack(dir.join(name), bytes) {
            eprintln!("warning: the demo samples are not shown: {e:#}");
            return None;
        }
    }
    Some(dir)
}

/// Resolves `--model`: a path (file or run directory), a shipped model name, or the default
/// when `None`.
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    // The default is the photo model; `photo` names it too.
    let spec = spec.filter(|s| *s != "photo" || Path::new(s).exists());
    let Some(spec) = spec else {
        return default_model();
    };
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    if let Some(shipped) = shipped_model(spec)? {
        return Ok(shipped);
    }
    let known = shipped_models().unwrap_or_default().join(", ");
    bail!("no model '{spec}': not a file or directory, and not a shipped model (shipped: {known})")
}

/// The file of the model that `--model` (`spec`) pairs for white noise: the shipped white-noise
/// model when `spec` names the shipped default (`None`, `default` or `photo`, none of them a
/// path) and that model is shipped; `None` otherwise.
pub fn white_noise_model(spec: Option<&str>) -> Result<Option<PathBuf>> {
    let names_default = match spec {
        None => true,
        Some(s) => [DEFAULT_MODEL, "photo"].contains(&s) && !Path::new(s).exists(),
    };
    if !names_default {
        return Ok(None);
    }
    let (Some(white), Some(default)) = (
        shipped_model(WHITE_NOISE_MODEL)?,
        shipped_model(DEFAULT_MODEL)?,
    ) else {
        return Ok(None);
    };
    // Models a user put in place of the shipped ones may not fit together: then the default
    // runs alone, as a named file would.
    let (ours, theirs) = (read_metadata(&default)?.model, read_metadata(&white)?.model);
    match ours.white_noise_pair_problem(&theirs) {
        None => Ok(Some(white)),
        Some(problem) => {
            eprintln!(
                "warning: '{}' does not fit as the white-noise model of '{}' ({problem}): not used",
                white.display(),
                default.display()
            );
            Ok(None)
        }
    }
}

/// Names of the shipped models, sorted.
pub fn shipped_models() -> Result<Vec<String>> {
    let listed = |dir: &Path| -> Result<Vec<String>> {
        Ok(std::fs::read_dir(dir)
            .with_context(|| format!("cannot list '{}'", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".safetensors")
                    .map(str::to_owned)
            })
            .collect())
    };
    let mut names = match models_override() {
        Some(dir) => listed(&dir)?,
        None => {
            let mut names: Vec<String> = built_in::MODELS
                .iter()
                .map(|(n, _)| (*n).to_owned())
                .collect();
            for dir in [
                beside_executable("models"),
                Some(data_dir().join("models")).filter(|d| d.is_dir()),
            ]
            .into_iter()
            .flatten()
            {
                names.extend(listed(&dir)?);
            }
            names
        }
    };
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_models_are_built_in() {
        let names: Vec<&str> = built_in::MODELS.iter().map(|(n, _)| *n).collect();
        for name in ["default", "gaussian"] {
            assert!(names.contains(&name), "{names:?}");
        }
        assert!(built_in::MODELS.iter().all(|(_, b)| b.len() > 1000));
        assert!(!built_in::SAMPLES.is_empty());
    }

    #[test]
    fn unpacking_writes_only_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/a.safetensors");
        unpack(path.clone(), b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        unpack(path.clone(), b"one").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            written
        );
        unpack(path.clone(), b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
