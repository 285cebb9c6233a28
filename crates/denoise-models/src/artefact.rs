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
    Ok(denoise_data::io::write_atomic(path, &bytes)?)
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

pub(crate) fn parse_metadata(bytes: &[u8]) -> std::result::Result<Metadata, String> {
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
/// names and shapes match exactly. Before anything is built, the stored weights are checked
/// against the metadata's architecture ([`check_stored`]).
pub fn from_bytes(bytes: &[u8], device: Device) -> Result<(Model, Metadata)> {
    let bad = |m: String| ModelError::artefact(Path::new("<memory>"), m);
    let metadata = parse_metadata(bytes).map_err(bad)?;
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("corrupt or truncated weights ({e})")))?;
    metadata.model.validate()?;
    check_stored(&tensors, &metadata.model).map_err(bad)?;
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

/// What can be checked of the stored tensors without building the model:
///
/// * there are at least as many numbers as the metadata's architecture has weights
///   ([`weights_at_least`]). Building allocates (and initialises) what the metadata claims, so a
///   header that claims layers thousands wide over a small file must be refused before that;
/// * every number is finite: a model trained into NaN or infinity would turn every image black
///   without a word.
fn check_stored(
    tensors: &SafeTensors<'_>,
    config: &ModelConfig,
) -> std::result::Result<(), String> {
    let mut names = tensors.names();
    names.sort_unstable();
    let mut stored = 0f64;
    for name in &names {
        let view = tensors.tensor(name).map_err(|e| e.to_string())?;
        stored += view.shape().iter().map(|&d| d as f64).product::<f64>();
    }
    let needed = weights_at_least(config);
    if needed > stored {
        return Err(format!(
            "its metadata describes a {} of at least {needed:.0} weights, but the file holds \
             {stored:.0} numbers: the header does not match the weights",
            config.kind()
        ));
    }
    for name in &names {
        let view = tensors.tensor(name).map_err(|e| e.to_string())?;
        if view.dtype() != Dtype::F32 {
            // Refused by name once the model is built.
            continue;
        }
        let bad = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .find(|v| !v.is_finite());
        if let Some(v) = bad {
            return Err(format!(
                "tensor '{name}' holds {v} (weights must be finite: the training that wrote \
                 it diverged)"
            ));
        }
    }
    Ok(())
}

/// The fewest weights a model of `config` has: its 3x3 convolution kernels, without biases,
/// normalisation, attention or up-sampling layers. For every kind it is at least a quarter of
/// the true count (tested), so a file that passes [`check_stored`] cannot make a load allocate
/// more than about four times the weights it holds. In `f64`, so that no claimed size overflows.
fn weights_at_least(config: &ModelConfig) -> f64 {
    let conv3 = |cin: f64, cout: f64| 9.0 * cin * cout;
    let channels = config.channels() as f64;
    let cin = channels + f64::from(u8::from(config.noise_map()));
    match config {
        ModelConfig::Autoencoder(c) => {
            let widths: Vec<f64> = c.widths.iter().map(|&w| w as f64).collect();
            let encoder: f64 = std::iter::once(cin)
                .chain(widths.iter().copied())
                .zip(&widths)
                .map(|(a, &b)| conv3(a, b))
                .sum();
            let decoder: f64 = widths
                .iter()
                .rev()
                .zip(widths.iter().rev().skip(1).copied().chain([channels]))
                .map(|(&a, b)| conv3(a, b))
                .sum();
            encoder + decoder
        }
        ModelConfig::Unet(c) => {
            let double = |a: f64, b: f64| conv3(a, b) + conv3(b, b);
            let widths: Vec<f64> = (0..c.levels)
                .map(|i| c.base as f64 * 2f64.powi(i as i32))
                .collect();
            let deepest = widths.last().copied().unwrap_or(0.0);
            let down: f64 = std::iter::once(cin)
                .chain(widths.iter().copied())
                .zip(&widths)
                .map(|(a, &b)| double(a, b))
                .sum();
            let dec: f64 = widths.iter().map(|&w| double(2.0 * w, w)).sum();
            down + double(deepest, 2.0 * deepest) + dec
        }
        // Each EAM block: ten 3x3 kernels' worth of f x f (body3 takes 2f).
        ModelConfig::Ridnet(c) => {
            c.blocks as f64 * 10.0 * conv3(c.features as f64, c.features as f64)
        }
        ModelConfig::Dncnn(c) => {
            let f = c.features as f64;
            conv3(cin, f) + (c.depth as f64 - 2.0).max(0.0) * conv3(f, f) + conv3(f, channels)
        }
        // On the 2x2 sub-images: 4C channels and the level in, 4C out; the level estimator
        // reads the 4C channels and gives one.
        ModelConfig::Ffdnet(c) => {
            let stack = |cin: f64, f: f64, depth: usize, cout: f64| {
                conv3(cin, f) + (depth as f64 - 2.0).max(0.0) * conv3(f, f) + conv3(f, cout)
            };
            let sub = 4.0 * channels;
            let body = stack(sub + 1.0, c.features as f64, c.depth, sub);
            let estimator = c
                .estimator
                .as_ref()
                .map_or(0.0, |e| stack(sub, e.features as f64, e.depth, 1.0));
            body + estimator
        }
        // The residual blocks' kernels and the 2x2 down and up convs; head and tail.
        ModelConfig::Drunet(c) => {
            let w: Vec<f64> = c.widths.iter().map(|&w| w as f64).collect();
            let block = |f: f64| 2.0 * conv3(f, f);
            // Every scale has blocks down and up but the deepest, which has them once.
            let deepest = w.len() - 1;
            let blocks = w[..deepest]
                .iter()
                .enumerate()
                .map(|(i, &f)| (c.blocks.down(i) + c.blocks.up(i)) as f64 * block(f))
                .sum::<f64>()
                + c.blocks.bottom() as f64 * block(w[deepest]);
            let resample: f64 = w.windows(2).map(|p| 2.0 * 4.0 * p[0] * p[1]).sum();
            let ends = w
                .first()
                .map_or(0.0, |&f| conv3(cin, f) + conv3(f, channels));
            blocks + resample + ends
        }
    }
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

        // Weights of one architecture under the metadata of another (a smaller one: a larger
        // one is refused before it is built).
        let mut meta = Metadata::new(model.config());
        meta.model = serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":3}"#).unwrap();
        let mismatched = dir.path().join("mismatched.safetensors");
        save(&model, &meta, &mismatched).unwrap();
        let err = load(&mismatched, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("has shape"), "{err}");

        let missing = load(&dir.path().join("nope.safetensors"), Device::Cpu).unwrap_err();
        assert!(missing.to_string().contains("nope.safetensors"));
    }

    #[test]
    fn weights_that_are_not_finite_are_refused_naming_the_first_tensor() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(&tiny(), Device::Cpu).unwrap();
        let vars = model.var_store().variables();
        tch::no_grad(|| {
            let _ = vars["body.2.weight"].narrow(0, 1, 1).fill_(f64::NAN);
            let _ = vars["body.5.weight"].narrow(0, 0, 1).fill_(f64::INFINITY);
        });
        let path = dir.path().join("diverged.safetensors");
        save(&model, &Metadata::new(model.config()), &path).unwrap();
        let err = load(&path, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("diverged.safetensors")
                && err.contains("'body.2.weight'")
                && err.contains("NaN"),
            "{err}"
        );
        tch::no_grad(|| {
            let _ = vars["body.2.weight"].shallow_clone().fill_(0.5);
        });
        save(&model, &Metadata::new(model.config()), &path).unwrap();
        let err = load(&path, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("'body.5.weight'") && err.contains("inf"),
            "{err}"
        );
    }

    #[test]
    fn metadata_claiming_a_larger_model_than_the_file_holds_is_refused_before_building() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(&tiny(), Device::Cpu).unwrap();
        // Kept modest: without the check, the load would build what the metadata claims.
        for claim in [
            r#"{"kind":"dncnn","depth":20,"features":256}"#,
            r#"{"kind":"autoencoder","widths":[512,512]}"#,
            r#"{"kind":"ffdnet","depth":12,"features":512}"#,
            r#"{"kind":"ffdnet","depth":3,"features":4,"estimator":{"features":1024}}"#,
        ] {
            let mut meta = Metadata::new(model.config());
            meta.model = serde_json::from_str(claim).unwrap();
            let path = dir.path().join("lying.safetensors");
            save(&model, &meta, &path).unwrap();
            let err = load(&path, Device::Cpu).unwrap_err().to_string();
            assert!(
                err.contains("lying.safetensors")
                    && err.contains("at least")
                    && err.contains("the header does not match the weights"),
                "{claim}: {err}"
            );
        }
    }

    #[test]
    fn the_weight_bound_is_within_four_times_the_true_count_for_every_kind() {
        let _rng = crate::test_rng_lock();
        let mut configs: Vec<ModelConfig> = ModelKind::ALL
            .iter()
            .flat_map(|k| [k.default_config(1), k.default_config(3)])
            .collect();
        for json in [
            r#"{"kind":"autoencoder","widths":[1]}"#,
            r#"{"kind":"autoencoder","widths":[4,64,2],"noise_map":true}"#,
            r#"{"kind":"unet","base":4,"levels":1}"#,
            r#"{"kind":"unet","base":2,"levels":3,"up":"upsample","noise_map":true}"#,
            r#"{"kind":"ridnet","features":4,"blocks":1,"reduction":1}"#,
            r#"{"kind":"dncnn","depth":3,"features":1}"#,
            r#"{"kind":"dncnn","depth":5,"features":16,"batch_norm":true}"#,
            r#"{"kind":"ffdnet","depth":3,"features":1}"#,
            r#"{"kind":"ffdnet","depth":4,"features":8,"batch_norm":true}"#,
            r#"{"kind":"ffdnet","depth":4,"features":8,"estimator":{"depth":3,"features":64}}"#,
            r#"{"kind":"ffdnet","channels":1,"estimator":{}}"#,
            r#"{"kind":"drunet","widths":[1],"blocks":0}"#,
            r#"{"kind":"drunet","widths":[4,64,2],"blocks":2,"noise_map":false}"#,
        ] {
            configs.push(serde_json::from_str(json).unwrap());
        }
        for cfg in configs {
            let model = Model::new(&cfg, Device::Cpu).unwrap();
            let count: i64 = model
                .var_store()
                .variables()
                .values()
                .map(Tensor::numel)
                .map(|n| n as i64)
                .sum();
            let bound = weights_at_least(&cfg);
            assert!(
                bound <= count as f64 && count as f64 <= 4.0 * bound,
                "{cfg:?}: bound {bound}, true count {count}"
            );
        }
    }
}
