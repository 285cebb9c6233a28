//! Finding a model from `--model`: a file, a run directory, or a shipped model by name (the
//! default when none is given); and the demo samples the web app shows.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Where the shipped models live: `$DENOISE_MODELS`, else `assets/models` of the source tree
/// this binary was built from.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DENOISE_MODELS") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/models"));
    // Without the `crates/denoise-cli/../..` detour in what is printed.
    dir.canonicalize().unwrap_or(dir)
}

/// Where the demo images live: `$DENOISE_SAMPLES`, else `assets/samples` of the source tree.
pub fn samples_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DENOISE_SAMPLES") {
        return PathBuf::from(dir);
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/samples"))
}

/// The shipped default model file (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    models_dir().join("default.safetensors")
}

/// Resolves `--model`: a path (file or run directory), a shipped model name (`NAME` ->
/// `assets/models/NAME.safetensors`), or the default when `None`.
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    // The default is the photo model; `photo` names it too.
    let spec = spec.filter(|s| *s != "photo" || Path::new(s).exists());
    let Some(spec) = spec else {
        let path = default_model_path();
        if !path.is_file() {
            bail!(
                "no default model at '{}': train one (`cargo xtask train`) and pass --model PATH",
                path.display()
            );
        }
        return Ok(path);
    };
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let shipped = models_dir().join(format!("{spec}.safetensors"));
    if shipped.is_file() {
        return Ok(shipped);
    }
    let known = shipped_models().unwrap_or_default().join(", ");
    bail!("no model '{spec}': not a file or directory, and not a shipped model (shipped: {known})")
}

/// Names of the shipped models.
pub fn shipped_models() -> Result<Vec<String>> {
    let dir = models_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list '{}'", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".safetensors")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}
