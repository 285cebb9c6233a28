//! Resumable checkpoints: model weights, their moving average, Adam moments, step and best
//! validation PSNR, with the config, in one safetensors file written atomically (temporary file,
//! fsync, rename), so a crash or `kill -9` at any moment leaves the previous checkpoint intact.

use crate::config::TrainConfig;
use crate::{Result, TrainError};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FILE_NAME: &str = "checkpoint.safetensors";
/// The checkpoint before the latest, kept so that a latest one damaged on disk (a bad sector, a
/// copy cut short) costs one checkpoint interval, not the run.
pub const PREVIOUS_FILE_NAME: &str = "checkpoint.prev.safetensors";
const META_KEY: &str = "denoise-checkpoint";
const FORMAT_VERSION: u32 = 1;

/// What a checkpoint records besides tensors. The patch stream is a pure function of
/// `(config.seed, batch index)`, so `step` is the whole data-RNG state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: u64,
    pub optimizer_step: u64,
    pub best_val_psnr: Option<f64>,
    /// What the run has cost so far, over every resume (absent, so zero, in checkpoints written
    /// before this was recorded).
    #[serde(default)]
    pub cost: TrainCost,
    pub config: TrainConfig,
}

/// Time spent in training steps (loading batches, forward, backward, update), over every resume;
/// validation and checkpoint writes are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainCost {
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Process CPU seconds (all threads, loader workers included); 0 where unavailable.
    pub cpu_seconds: f64,
}

/// A loaded checkpoint: `model.NAME`, `optim.m.NAME` / `optim.v.NAME` and (with a moving
/// average) `ema.NAME` tensors on the CPU.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Test hook: when set, [`save`] writes half of the temporary file and fails before the rename,
/// as a crash mid-write would.
pub static FAIL_MID_WRITE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Serialises named fp32 tensors and the metadata; writes atomically.
pub fn save(path: &Path, meta: &CheckpointMeta, tensors: &[(String, Tensor)]) -> Result<()> {
    let json = serde_json::to_string(meta).expect("checkpoint metadata serialises");
    let bytes = denoise_models::artefact::serialize_named(tensors, META_KEY, json)?;
    if FAIL_MID_WRITE.load(std::sync::atomic::Ordering::SeqCst) {
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, &bytes[..bytes.len() / 2]).map_err(|source| TrainError::Io {
            path: tmp.clone(),
            source,
        })?;
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: "simulated crash".into(),
        });
    }
    denoise_data::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// [`save`]s the checkpoint of the run in `dir`, first keeping the one it replaces as
/// [`PREVIOUS_FILE_NAME`] (a hard link, so no copy; the latest file exists at every moment).
pub fn save_keeping_previous(
    dir: &Path,
    meta: &CheckpointMeta,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let latest = dir.join(FILE_NAME);
    if latest.is_file() {
        let previous = dir.join(PREVIOUS_FILE_NAME);
        let staged = dir.join(format!(".{PREVIOUS_FILE_NAME}.partial"));
        let _ = std::fs::remove_file(&staged);
        // Keeping the previous one is a spare: if neither a link nor a copy can be made (a
        // full disk), the new checkpoint is still saved.
        let kept = std::fs::hard_link(&latest, &staged)
            .or_else(|_| std::fs::copy(&latest, &staged).map(|_| ()))
            .and_then(|()| std::fs::rename(&staged, &previous));
        if kept.is_err() {
            let _ = std::fs::remove_file(&staged);
        }
    }
    save(&latest, meta, tensors)
}

/// A checkpoint loaded by [`load_latest`].
pub struct Latest {
    pub checkpoint: Checkpoint,
    /// The file it came from.
    pub path: PathBuf,
    /// Why the latest checkpoint was not used, when this is the previous one.
    pub fallback: Option<String>,
}

/// Loads the run in `dir`'s latest checkpoint, or the previous one when the latest is missing
/// or damaged (not a readable checkpoint; an I/O error such as a permission is not damage and
/// fails). Fails with the latest's error when neither loads.
pub fn load_latest(dir: &Path) -> Result<Latest> {
    let (latest, previous) = (dir.join(FILE_NAME), dir.join(PREVIOUS_FILE_NAME));
    let err = match load(&latest) {
        Ok(checkpoint) => {
            return Ok(Latest {
                checkpoint,
                path: latest,
                fallback: None,
            });
        }
        Err(err) => err,
    };
    let damaged = match &err {
        TrainError::Checkpoint { .. } => true,
        TrainError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    };
    if !damaged || !previous.is_file() {
        return Err(err);
    }
    match load(&previous) {
        Ok(checkpoint) => Ok(Latest {
            fallback: Some(format!(
                "{err}: resuming from the previous checkpoint, at step {}",
                checkpoint.meta.step
            )),
            checkpoint,
            path: previous,
        }),
        Err(_) => Err(err),
    }
}

/// Moves a damaged latest checkpoint aside (to `checkpoint.damaged.safetensors`, kept for
/// inspection), so that the next save does not keep it as the previous one. Returns where.
pub fn set_aside_damaged(dir: &Path) -> Option<PathBuf> {
    let (latest, aside) = (
        dir.join(FILE_NAME),
        dir.join("checkpoint.damaged.safetensors"),
    );
    (latest.is_file() && std::fs::rename(&latest, &aside).is_ok()).then_some(aside)
}

/// Loads a checkpoint written by [`save`], with clear errors for truncated or foreign files.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |message: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt or truncated ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad("no checkpoint metadata (not a denoise checkpoint?)".into()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| bad(format!("bad metadata: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} (expected {FORMAT_VERSION})",
            meta.format_version
        )));
    }
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor '{name}' is not f32")));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(
            name,
            Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?,
        );
    }
    Ok(Checkpoint { meta, tensors })
}

impl CheckpointMeta {
    pub fn new(
        step: u64,
        optimizer_step: u64,
        best_val_psnr: Option<f64>,
        cost: TrainCost,
        config: &TrainConfig,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            optimizer_step,
            best_val_psnr,
            cost,
            config: config.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_crash_mid_write_keeps_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let cfg = TrainConfig::default();
        let t = vec![(
            "model.w".to_owned(),
            Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]),
        )];
        let cost = TrainCost {
            seconds: 12.5,
            cpu_seconds: 24.0,
        };
        save(
            &path,
            &CheckpointMeta::new(5, 5, Some(30.0), cost, &cfg),
            &t,
        )
        .unwrap();
        let ck = load(&path).unwrap();
        assert_eq!(ck.meta.step, 5);
        assert_eq!(ck.meta.cost, cost);
        assert!(ck.tensors["model.w"].equal(&t[0].1));

        FAIL_MID_WRITE.store(true, std::sync::atomic::Ordering::SeqCst);
        let later = vec![(
            "model.w".to_owned(),
            Tensor::from_slice(&[9.0f32, 9.0, 9.0]).view([3, 1]),
        )];
        assert!(save(&path, &CheckpointMeta::new(6, 6, None, cost, &cfg), &later).is_err());
        FAIL_MID_WRITE.store(false, std::sync::atomic::Ordering::SeqCst);
        let ck = load(&path).unwrap();
        assert_eq!(ck.meta.step, 5, "the previous checkpoint survives");

        let partial = path.with_extension("partial");
        let err = load(&partial).unwrap_err().to_string();
        assert!(
            err.contains("truncated") || err.contains("corrupt"),
            "{err}"
        );
    }

    #[test]
    fn a_checkpoint_that_cannot_be_written_is_named_as_a_write_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // A folder in the checkpoint's place: the new file is written in full, then cannot
        // take its name, as when the disk fills up, the write fails.
        let blocked = dir.path().join(FILE_NAME);
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("kept"), b"").unwrap();
        let meta = CheckpointMeta::new(1, 1, None, TrainCost::default(), &TrainConfig::default());
        let t = vec![("model.w".to_owned(), Tensor::from_slice(&[1.0f32]))];
        let err = save_keeping_previous(dir.path(), &meta, &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("failed to write '{}': ", blocked.display())),
            "{err}"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "only the folder is left");
    }

    #[test]
    fn checkpoints_from_before_the_cost_record_read_as_zero_cost() {
        let mut json = serde_json::to_value(CheckpointMeta::new(
            3,
            3,
            None,
            TrainCost::default(),
            &TrainConfig::default(),
        ))
        .unwrap();
        json.as_object_mut().unwrap().remove("cost");
        let meta: CheckpointMeta = serde_json::from_value(json).unwrap();
        assert_eq!(meta.cost, TrainCost::default());
        assert_eq!(meta.step, 3);
    }
}
