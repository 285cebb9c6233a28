//! The manifest reader (`manifest.json`, written by `prepare-data` and read by `train`).

use denoise_data::io::BitDepth;
use denoise_data::manifest::{self, Split};
use std::path::PathBuf;

pub struct Manifest {
    /// Holds the files inputs are written to and read back from: the reader takes a path.
    dir: tempfile::TempDir,
}

impl Manifest {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Self::new()
    }
}

impl super::Target for Manifest {
    fn run(&self, data: &[u8]) {
        let path = self.file("manifest.json");
        std::fs::write(&path, data).expect("the input is written");
        let Ok(read) = manifest::Manifest::load(&path) else {
            return;
        };
        let _ = (read.train_paths(), read.validation_paths());
        let _ = read.noisy_validation_pairs(self.dir.path());
        // `prepare-data` re-runs rewrite the manifest they read.
        let copy = self.file("again.json");
        read.save(&copy).expect("a manifest that was read saves");
        let again = manifest::Manifest::load(&copy).expect("a saved manifest reads back");
        assert_eq!(
            again, read,
            "a manifest changed in a save-and-load round trip"
        );
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let entry = |path: &str, split| manifest::FileEntry {
            path: path.into(),
            width: 64,
            height: 48,
            channels: 3,
            has_alpha: false,
            bit_depth: BitDepth::Eight,
            format: "png".into(),
            blake3: "ab".repeat(32),
            size: 1234,
            mtime_ns: Some(1_700_000_000_000_000_000),
            split,
            sum: vec![1.5, 2.5, 3.5],
            sum_sq: vec![0.5, 1.0, 1.5],
        };
        let full = manifest::Manifest {
            schema_version: manifest::MANIFEST_VERSION,
            source_dir: "/data/clean".into(),
            sources: Vec::new(),
            seed: 7,
            val_fraction: 0.1,
            files: vec![
                entry("a.png", Split::Train),
                entry("b/c.png", Split::Validation),
            ],
            duplicates: vec![manifest::Duplicate {
                path: "d.png".into(),
                duplicate_of: "a.png".into(),
                size: 1234,
                mtime_ns: None,
            }],
            rejected: vec![manifest::Rejected {
                path: "e.txt".into(),
                error: "unknown format".into(),
            }],
            statistics: manifest::Statistics {
                channels: 3,
                mean: vec![0.4, 0.5, 0.6],
                std: vec![0.2, 0.2, 0.2],
                images: 1,
                pixels: 3072,
            },
            noisy_validation: Some(manifest::NoisyValidation {
                noise: "gaussian:25".parse().expect("a spec"),
                seed: 3,
                bit_depth: BitDepth::Sixteen,
                files: vec![manifest::NoisyFile {
                    source: "b/c.png".into(),
                    source_blake3: "cd".repeat(32),
                    noisy: "val_noisy/c.png".into(),
                    seed: 11,
                }],
            }),
        };
        let mut bare = full.clone();
        bare.noisy_validation = None;
        bare.files.clear();
        [full, bare]
            .iter()
            .map(|m| serde_json::to_vec_pretty(m).expect("a manifest serialises"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn seeds_read_and_their_mutations_run_clean() {
        let target = Manifest::new();
        for seed in target.seeds() {
            let path = target.file("seed.json");
            std::fs::write(&path, seed).unwrap();
            manifest::Manifest::load(&path).expect("a seed reads");
        }
        for input in crate::mutations(&target.seeds()) {
            target.run(&input);
        }
    }
}
