//! Helpers shared by the subcommands: the shipped default model, model resolution and the demo
//! samples.

use anyhow::{Context, Result, bail};
use denoise_models::tile::TileConfig;
use denoise_models::{
    Denoiser, Job, LevelUsed, ModelSource, NoiseLevel, Precision, PrecisionPolicy, Settings,
};
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

/// `--precision`. `auto` runs bf16 only where the hardware does bf16 natively and the model's
/// metadata records a bf16 PSNR loss (`eval --record-bf16` measures it) that, divided by the
/// self-ensemble's passes, is under 0.05 dB; see
/// `denoise_models::artefact::Metadata::auto_precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Auto,
    Fp32,
    Bf16,
}

impl PrecisionArg {
    pub fn policy(self) -> PrecisionPolicy {
        match self {
            PrecisionArg::Auto => PrecisionPolicy::Auto,
            PrecisionArg::Fp32 => PrecisionPolicy::Fixed(Precision::Fp32),
            PrecisionArg::Bf16 => PrecisionPolicy::Fixed(Precision::Bf16),
        }
    }
}

/// A model loaded from `--model` as the flags say, ready to denoise images.
pub struct Runner {
    denoiser: Denoiser,
}

/// `--ensemble`: one of the sizes the tiler takes.
pub fn parse_ensemble(s: &str) -> Result<usize, String> {
    denoise_models::ensemble::ensemble_size(s).ok_or_else(|| {
        format!(
            "'{s}' is not one of {:?}",
            denoise_models::ensemble::ENSEMBLE_SIZES
        )
    })
}

/// How the noise level reaches models that take one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sigma {
    /// Not given: estimate it for models that need it (blind use).
    Blind,
    /// `--sigma auto`: estimate it, and say so.
    Auto,
    /// A fixed level on the 0-255 scale.
    Fixed(f32),
}

impl Sigma {
    /// The level the model is told.
    pub fn level(self) -> NoiseLevel<'static> {
        match self {
            Sigma::Fixed(s) => NoiseLevel::Uniform(s),
            Sigma::Auto | Sigma::Blind => NoiseLevel::Estimate,
        }
    }
}

impl std::str::FromStr for Sigma {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Sigma::Auto);
        }
        let v: f32 = s
            .parse()
            .map_err(|_| format!("'{s}' is not a number or 'auto'"))?;
        if !(0.0..=255.0).contains(&v) {
            return Err(format!("sigma must be in 0-255, got {v}"));
        }
        Ok(Sigma::Fixed(v))
    }
}

impl Runner {
    /// Loads `--model` (`spec`; the default when `None`) as `settings` say.
    pub fn load(spec: Option<&str>, settings: &Settings) -> Result<Self> {
        let path = resolve_model(spec)?;
        let denoiser = Denoiser::load(&ModelSource::Path(path), settings)?;
        Ok(Self { denoiser })
    }

    pub fn model(&self) -> &denoise_models::Model {
        self.denoiser.model()
    }

    pub fn metadata(&self) -> &denoise_models::Metadata {
        self.denoiser.metadata()
    }

    /// The model's file (a run directory's `model.safetensors`).
    pub fn source(&self) -> &ModelSource {
        self.denoiser.source()
    }

    pub fn tiles(&self) -> TileConfig {
        self.denoiser.tiles()
    }

    /// One line describing the model and what it was trained on.
    pub fn describe(&self) -> String {
        let m = self.metadata();
        format!(
            "model {} ({}, {} channel(s), {}), trained on {}{}",
            self.source(),
            m.model.kind(),
            m.model.channels(),
            self.model().precision(),
            m.noise.as_deref().unwrap_or("unknown noise"),
            m.val_psnr
                .map(|p| format!(", validation PSNR {p:.2} dB"))
                .unwrap_or_default()
        ) + &match self.tiles().ensemble {
            1 => String::new(),
            n => format!("; self-ensemble of {n} passes"),
        } + self.bf16_note()
    }

    /// A warning when bf16 was asked for where it is emulated (slower than fp32).
    fn bf16_note(&self) -> &'static str {
        let emulated = self.model().precision() == Precision::Bf16
            && !self.model().device().is_cuda()
            && !denoise_models::perf::CpuFeatures::detect().fast_bf16();
        if emulated {
            "\nnote: this CPU has no native bf16 (see `denoise-cli doctor`): bf16 runs emulated, \
             slower than fp32"
        } else {
            ""
        }
    }

    /// Denoises `image`, converting gray <-> colour explicitly when the model wants the other
    /// (and back). Returns the result and the level used, if any.
    pub fn denoise(
        &self,
        image: &denoise_data::Image,
        level: NoiseLevel<'_>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(denoise_data::Image, Option<LevelUsed>)> {
        let job = Job {
            progress: Some(progress),
            ..Job::default()
        };
        Ok(self.denoiser.denoise(image, level, job)?)
    }
}

/// `--device`: auto (CUDA when available), cpu, cuda or cuda:N, with an error about the flag
/// (the train config's parser would call it a config error).
pub fn parse_device(s: &str) -> Result<tch::Device> {
    denoise_train::config::parse_device(s).map_err(|err| match err {
        denoise_train::TrainError::Config(msg) => anyhow::anyhow!("--device: {msg}"),
        other => other.into(),
    })
}

/// An error and its causes on one line, `outer: cause: root`, like anyhow's `{:#}` but leaving
/// out a cause whose text the message before it already quotes (the data and model errors put
/// their I/O source in their own message, and also expose it as `source()`).
pub fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Makes the folder an output file goes into, if it is missing.
pub fn create_parent_dir(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    Ok(())
}

/// Refuses an output that exists and is not a regular file (a device such as `/dev/null`, a
/// FIFO, a socket, a directory): every output is written to a temporary file and renamed over
/// its path, which would replace the device or FIFO with a regular file, not write into it.
pub fn check_output_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => bail!(
            "'{}' exists and is not a regular file (a directory, device, FIFO or socket): \
             it would be replaced; write to a file",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// `path` made absolute, component by component: the part that exists resolved by the file
/// system (symbolic links), the rest lexically (`..` pops), as `create_dir_all` and the write
/// would resolve it. Two spellings of one file then compare equal, `new/../a.png` included.
pub fn canonical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut resolved = if path.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir()
            .and_then(|d| d.canonicalize())
            .unwrap_or_default()
    };
    for part in path.components() {
        match part {
            Component::Prefix(_) | Component::RootDir => resolved.push(part.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => {
                resolved.push(name);
                if let Ok(real) = resolved.canonicalize() {
                    resolved = real;
                }
            }
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(denoise_data::DataError::Io {
            path: "a.png".into(),
            source: io,
        })
        .context("loading inputs");
        assert_eq!(
            describe(&err),
            "loading inputs: failed to read 'a.png': No such file"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let err = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer");
        assert_eq!(describe(&err), "outer: middle: root cause");
    }
}
