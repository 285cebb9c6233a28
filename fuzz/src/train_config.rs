//! The training config reader (`config.toml`, as `train --config` and `--resume` read it) and
//! its validation.

use std::path::PathBuf;

pub struct TrainConfig {
    /// Holds the file each input is written to: the reader takes a path.
    dir: tempfile::TempDir,
}

impl TrainConfig {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl super::Target for TrainConfig {
    fn run(&self, data: &[u8]) {
        let path = self.file();
        std::fs::write(&path, data).expect("the input is written");
        let Ok(config) = denoise_train::TrainConfig::from_file(&path) else {
            return;
        };
        let _ = config.validate();
        // The run directory keeps the config as `to_toml` writes it; resuming reads that back.
        let text = config.to_toml();
        let again: denoise_train::TrainConfig = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("a config written as\n{text}\ndoes not read back: {e}"));
        assert_eq!(
            again.to_toml(),
            text,
            "a config changed in a TOML round trip"
        );
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let full = denoise_train::TrainConfig::default().to_toml();
        let model = r#"
data = "data/manifest.json"
noise = "gaussian:0-55"
steps = 100
[model]
kind = "ffdnet"
depth = 4
features = 8
"#;
        let init = r#"
data = "data/manifest.json"
init = "assets/models/gaussian.safetensors"
noise = "camera|gaussian:0-55+round"
val_noise = "gaussian:25"
loss = { kind = "mse-level", floor = 0.01 }
"#;
        vec![full.into_bytes(), model.into(), init.into(), Vec::new()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn seeds_read_and_their_mutations_run_clean() {
        let target = TrainConfig::new();
        let seeds = target.seeds();
        for seed in &seeds[..3] {
            std::fs::write(target.file(), seed).unwrap();
            denoise_train::TrainConfig::from_file(&target.file()).expect("a seed reads");
        }
        for input in crate::mutations(&seeds) {
            target.run(&input);
        }
    }
}
