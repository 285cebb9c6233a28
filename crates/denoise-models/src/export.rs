//! TorchScript export: the network body traced with libtorch's JIT, loadable by `torch.jit.load`,
//! TorchServe, Triton or tch's `CModule`.
//!
//! The exported `forward` takes the network's input as it is after [`crate::Model`]'s
//! preparation: N x (C + m) x H x W in [0, 1], where m = 1 when the model takes a noise-level map
//! (its last channel, sigma / 255 per pixel) and H, W are multiples of
//! [`crate::ModelConfig::multiple`] (pad with edge replication and crop back otherwise).

use crate::{Model, Result};
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

/// Traces `model` on an example input of `size` x `size` and writes TorchScript to `path`.
pub fn torchscript(model: &Model, path: &Path, size: i64) -> Result<()> {
    let cfg = model.config();
    let m = cfg.multiple();
    let side = (size.max(m) + m - 1) / m * m;
    let channels = cfg.channels() + i64::from(cfg.noise_map());
    let example = Tensor::rand([1, channels, side, side], (Kind::Float, Device::Cpu))
        .to_device(model.device());
    // The tracer stores weights as constants, which it refuses for tensors requiring grad:
    // trace a frozen copy.
    let mut frozen = Model::new(cfg, model.device())?;
    frozen.var_store_mut().copy(model.var_store())?;
    frozen.var_store_mut().freeze();
    let module = tch::no_grad(|| {
        CModule::create_by_tracing("Denoiser", "forward", &[example], &mut |inputs| {
            vec![frozen.net_forward(&inputs[0])]
        })
    })?;
    // Atomically, as every file the project writes: a crash leaves the old file or the new one.
    denoise_data::io::write_atomic_with(path, |tmp| {
        module
            .save(tmp)
            .map_err(|e| std::io::Error::other(first_line(&e)))
    })?;
    Ok(())
}

/// The first line of a libtorch error: what failed, without the page of C++ stack frames that
/// follows it.
fn first_line(error: &tch::TchError) -> String {
    let text = error.to_string();
    text.lines().next().unwrap_or_default().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelConfig, ModelKind};

    #[test]
    fn an_unwritable_output_is_one_line_naming_it() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8}"#).unwrap();
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        // A folder that is a regular file, and one that does not exist: root may write
        // anywhere else.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for out in [file.join("model.pt"), dir.path().join("absent/model.pt")] {
            let e = torchscript(&model, &out, 16).unwrap_err().to_string();
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.contains(&out.display().to_string()), "{e}");
            assert!(!e.contains("frame #"), "{e}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn a_libtorch_error_is_cut_to_its_first_line() {
        let e = tch::TchError::Torch("open file failed\nframe #0: c10::Error\nframe #1: x".into());
        assert_eq!(first_line(&e), "Internal torch error: open file failed");
    }

    #[test]
    fn exported_modules_match_the_native_model() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        for kind in [
            ModelKind::Dncnn,
            ModelKind::Ffdnet,
            ModelKind::Unet,
            ModelKind::Autoencoder,
            ModelKind::Ridnet,
            ModelKind::Drunet,
        ] {
            tch::manual_seed(0);
            let json = match kind {
                ModelKind::Autoencoder => r#"{"kind":"autoencoder","widths":[8,16]}"#,
                ModelKind::Unet => r#"{"kind":"unet","base":8,"levels":2,"up":"upsample"}"#,
                ModelKind::Ridnet => r#"{"kind":"ridnet","features":16,"blocks":1,"reduction":4}"#,
                ModelKind::Dncnn => r#"{"kind":"dncnn","depth":4,"features":8}"#,
                ModelKind::Ffdnet => r#"{"kind":"ffdnet","depth":4,"features":8}"#,
                ModelKind::Drunet => r#"{"kind":"drunet","widths":[8,16],"blocks":1}"#,
            };
            let cfg: ModelConfig = serde_json::from_str(json).unwrap();
            let model = Model::new(&cfg, Device::Cpu).unwrap();
            let path = dir.path().join(format!("{kind}.pt"));
            torchscript(&model, &path, 32).unwrap();
            let loaded = CModule::load(&path).unwrap();
            let channels = cfg.channels() + i64::from(cfg.noise_map());
            // A size other than the traced one: the export is size-generic.
            let x = Tensor::rand([2, channels, 48, 40], (Kind::Float, Device::Cpu));
            let native = tch::no_grad(|| model.net_forward(&x));
            let traced = loaded.forward_ts(&[&x]).unwrap();
            let diff = (native - traced).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{kind}: max difference {diff}");
        }
    }
}
