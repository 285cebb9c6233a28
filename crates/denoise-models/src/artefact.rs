//! Saved models: one `.safetensors` file holding the weights and, in its header metadata, a JSON
//! [`Metadata`] (model config, training noise, validation PSNR, format version), so a model loads
//! without knowing its kind beforehand. A directory holding `model.safetensors` (a training run)
//! loads the same way.

use crate::config::ModelConfig;
use crate::perf::{CpuFeatures, Precision};
use crate::{Model, ModelError, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Current artefact format; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
/// The safetensors metadata key holding the JSON [`Metadata`].
const META_KEY: &str = "denoise";
/// The file name of the artefact inside a run directory.
pub const FILE_NAME: &str = "model.safetensors";

/// What travels with the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format_version: u32,
    pub model: ModelConfig,
    /// The noise the model was trained on, as a `denoise-data` spec (e.g. `gaussian:0-55`).
    pub noise: Option<String>,
    /// Input normalisation; all shipped models take images in [0, 1] (`unit`).
    pub normalisation: String,
    /// Free-form summary of the training data (set, images, patches, steps).
    pub training: Option<serde_json::Value>,
    /// Best validation PSNR (dB) seen during training.
    pub val_psnr: Option<f64>,
    /// How much PSNR (dB) bf16 inference loses against fp32, as measured on a test set by
    /// `denoise-cli eval --record-bf16` (the largest loss over the noise levels tried), with
    /// what it was measured on, for a single pass. `--precision auto` picks bf16 only when this
    /// is recorded and, divided by the self-ensemble's passes, under [`BF16_MAX_PSNR_LOSS_DB`]
    /// (see [`Metadata::auto_precision`]).
    #[serde(default)]
    pub bf16_psnr_loss_db: Option<f64>,
    #[serde(default)]
    pub bf16_measured_on: Option<String>,
    /// The denoise version that wrote the file.
    pub written_by: String,
}

impl Metadata {
    /// Metadata for an untrained model of `config`.
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            model: config.clone(),
            noise: None,
            normalisation: "unit".into(),
            training: None,
            val_psnr: None,
            bf16_psnr_loss_db: None,
            bf16_measured_on: None,
            written_by: concat!("denoise ", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// The most PSNR (dB) that `--precision auto` lets bf16 cost.
pub const BF16_MAX_PSNR_LOSS_DB: f64 = 0.05;

impl Metadata {
    /// The precision `--precision auto` runs this model at on `device` for a self-ensemble of
    /// `passes`: bf16 where it is native (CUDA, or a CPU with AMX or AVX512-BF16) and
    /// [`Metadata::bf16_is_cheap`]; fp32 otherwise (emulated bf16 is slower than fp32).
    pub fn auto_precision(&self, device: Device, passes: usize) -> Precision {
        let native = device.is_cuda() || CpuFeatures::detect().fast_bf16();
        if native && self.bf16_is_cheap(passes) {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }

    /// Whether bf16 is expected to cost under [`BF16_MAX_PSNR_LOSS_DB`] over a self-ensemble of
    /// `passes`: the recorded single-pass loss divided by the passes. Each pass rounds
    /// differently, so the errors average out like noise (docs/benchmarks.md has the measured
    /// losses). Unrecorded means not cheap.
    pub fn bf16_is_cheap(&self, passes: usize) -> bool {
        self.bf16_psnr_loss_db
            .is_some_and(|loss| loss / (passes.max(1) as f64) < BF16_MAX_PSNR_LOSS_DB)
    }
}

/// A model and its metadata, as loaded from disk.
#[derive(Debug)]
pub struct Artefact {
    pub model: Model,
    pub metadata: Metadata,
    pub path: PathBuf,
}

/// Writes `model` (as fp32) and `metadata` to `path` atomically: a temporary file in the same
/// directory, fsync, rename. A crash at any moment leaves the old file or the new one, never a
/// torn one.
pub fn save(model: &Model, metadata: &Metadata, path: &Path) -> Result<()> {
    let bytes = to_bytes(model, metadata)?;
    write_atomic(path, &bytes)
}

/// The artefact as bytes (see [`save`]).
pub fn to_bytes(model: &Model, metadata: &Metadata) -> Result<Vec<u8>> {
    let named: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    let meta_json = serde_json::to_string(metadata).expect("metadata serialises");
    serialize_named(&named, META_KEY, meta_json)
}

/// Serialises named tensors as fp32 safetensors, sorted by name, with one JSON string under
/// `meta_key` in the header metadata. Shared by model artefacts and training checkpoints.
pub fn serialize_named(
    named: &[(String, Tensor)],
    meta_key: &str,
    meta_json: String,
) -> Result<Vec<u8>> {
    let mut buffers = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        let n = t.numel();
        let mut data = vec![0f32; n];
        t.f_copy_data(&mut data, n)?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    let views = buffers.iter().map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("shape matches bytes");
        (name.clone(), view)
    });
    let info = HashMap::from([(meta_key.to_owned(), meta_json)]);
    safetensors::serialize(views, Some(info))
        .map_err(|e| ModelError::Config(format!("cannot serialise tensors: {e}")))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Resolves a path to the artefact file: itself, or `DIR/model.safetensors` for a directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join(FILE_NAME);
        if file.is_file() {
            return Ok(file);
        }
        return Err(ModelError::artefact(
            path,
            format!("directory has no {FILE_NAME}"),
        ));
    }
    Ok(path.to_path_buf())
}

/// Loads an artefact (file or directory) onto `device` at fp32.
pub fn load(path: &Path, device: Device) -> Result<Artefact> {
    let file = resolve(path)?;
    let bytes = std::fs::read(&file).map_err(|source| ModelError::Io {
        path: file.clone(),
        source,
    })?;
    let (model, metadata) = from_bytes(&bytes, device).map_err(|e| match e {
        ModelError::Artefact { message, .. } => ModelError::artefact(&file, message),
        other => other,
    })?;
    Ok(Artefact {
        model,
        metadata,
        path: file,
    })
}

/// Reads the metadata only (cheap: the header, no weights copied into tensors).
pub fn read_metadata(path: &Path) -> Result<Metadata> {
    let file = resolve(path)?;
    let bytes = std::fs::read(&file).map_err(|source| ModelError::Io {
        path: file.clone(),
        source,
    })?;
    parse_metadata(&bytes).map_err(|m| ModelError::artefact(&file, m))
}

fn parse_metadata(bytes: &[u8]) -> std::result::Result<Metadata, String> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a safetensors file or truncated ({e})"))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or("no denoise metadata in the safetensors header (a plain weights file?)")?;
    let meta: Metadata =
        serde_json::from_str(json).map_err(|e| format!("bad denoise metadata: {e}"))?;
    if meta.format_version > FORMAT_VERSION {
        return Err(format!(
            "format version {} is newer than this build understands ({FORMAT_VERSION})",
            meta.format_version
        ));
    }
    Ok(meta)
}

/// Builds the model its metadata describes and fills it with the stored weights, checking that
/// names and shapes match exactly.
pub fn from_bytes(bytes: &[u8], device: Device) -> Result<(Model, Metadata)> {
    let bad = |m: String| ModelError::artefact(Path::new("<memory>"), m);
    let metadata = parse_metadata(bytes).map_err(bad)?;
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("corrupt or truncated weights ({e})")))?;
    let model = Model::new(&metadata.model, device)?;
    let vars = model.var_store().variables();
    let mut extra: Vec<String> = tensors
        .names()
        .into_iter()
        .filter(|n| !vars.contains_key(*n))
        .map(str::to_owned)
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(bad(format!(
            "unexpected tensors for a {} model: {}",
            metadata.model.kind(),
            extra.join(", ")
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            let view = tensors
                .tensor(&name)
                .map_err(|_| bad(format!("missing tensor '{name}'")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(bad(format!(
                    "tensor '{name}' has shape {shape:?}, the model needs {:?}",
                    var.size()
                )));
            }
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor '{name}' is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let src = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
            var.f_copy_(&src)?;
        }
        Ok(())
    })?;
    Ok((model, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelKind;

    fn tiny() -> ModelConfig {
        serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":4}"#).unwrap()
    }

    #[test]
    fn bf16_counts_as_cheap_when_its_loss_shared_over_the_passes_is_small() {
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":4}"#).unwrap();
        let mut meta = Metadata::new(&cfg);
        assert!(
            !meta.bf16_is_cheap(1) && !meta.bf16_is_cheap(8),
            "unrecorded"
        );
        meta.bf16_psnr_loss_db = Some(0.06);
        assert!(!meta.bf16_is_cheap(1));
        assert!(meta.bf16_is_cheap(2) && meta.bf16_is_cheap(4));
        assert!(!meta.bf16_is_cheap(0), "0 passes count as 1");
        meta.bf16_psnr_loss_db = Some(0.2);
        assert!(!meta.bf16_is_cheap(2) && meta.bf16_is_cheap(8));
    }

    #[test]
    fn save_then_load_gives_bit_identical_outputs() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let model = Model::new(&tiny(), Device::Cpu).unwrap();
        let mut meta = Metadata::new(model.config());
        meta.noise = Some("gaussian:0-55".into());
        save(&model, &meta, &path).unwrap();
        let loaded = load(&path, Device::Cpu).unwrap();
        assert_eq!(loaded.metadata, meta);
        let x = Tensor::rand([1, 3, 9, 11], (Kind::Float, Device::Cpu));
        let a = model.denoise(&x, None).unwrap();
        let b = loaded.model.denoise(&x, None).unwrap();
        assert!(a.equal(&b));
    }

    #[test]
    fn a_directory_with_model_safetensors_loads() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(&ModelKind::Ffdnet.default_config(1), Device::Cpu).unwrap();
        save(
            &model,
            &Metadata::new(model.config()),
            &dir.path().join(FILE_NAME),
        )
        .unwrap();
        assert_eq!(
            load(dir.path(), Device::Cpu)
                .unwrap()
                .model
                .config()
                .channels(),
            1
        );
        let empty = tempfile::tempdir().unwrap();
        let err = load(empty.path(), Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("has no model.safetensors"), "{err}");
    }

    #[test]
    fn truncated_wrong_and_mismatched_files_are_clear_errors() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(&tiny(), Device::Cpu).unwrap();
        let bytes = to_bytes(&model, &Metadata::new(model.config())).unwrap();

        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
        let err = load(&truncated, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("truncated.safetensors") && err.contains("truncated"),
            "{err}"
        );

        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"definitely not weights").unwrap();
        let err = load(&garbage, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("garbage.safetensors"), "{err}");

        // Weights of one architecture under the metadata of another.
        let mut meta = Metadata::new(model.config());
        meta.model = serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":5}"#).unwrap();
        let mismatched = dir.path().join("mismatched.safetensors");
        save(&model, &meta, &mismatched).unwrap();
        let err = load(&mismatched, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("has shape"), "{err}");

        let missing = load(&dir.path().join("nope.safetensors"), Device::Cpu).unwrap_err();
        assert!(missing.to_string().contains("nope.safetensors"));
    }
}
