//! Fuzz targets: each feeds arbitrary bytes to one reader of outside input, as the product
//! reads it, and checks that nothing panics and, where cheap, that what was accepted survives a
//! round trip. `cargo xtask fuzz` drives them under libFuzzer (the `fuzz` binary); `cargo test`
//! replays their seeds and simple mutations of them.

pub mod artefact;
pub mod http;
pub mod image;
pub mod manifest;
pub mod noise;
pub mod train_config;

/// One fuzz target: built once per process, then run on every input.
pub trait Target: Send + Sync {
    /// Runs one input; panics when a property does not hold.
    fn run(&self, data: &[u8]);
    /// Valid inputs the engine starts from (it mutates them).
    fn seeds(&self) -> Vec<Vec<u8>>;
}

/// The targets' names, as `cargo xtask fuzz --target` takes them.
pub const TARGETS: [&str; 6] = [
    "image",
    "noise",
    "train_config",
    "manifest",
    "artefact",
    "http",
];

/// Builds the target named `name` (one of [`TARGETS`]).
pub fn target(name: &str) -> Option<Box<dyn Target>> {
    // One libtorch thread: fuzzing runs one input at a time, and a machine's other cores may
    // be busy.
    tch::set_num_threads(1);
    Some(match name {
        "image" => Box::new(image::Image),
        "noise" => Box::new(noise::Noise),
        "train_config" => Box::new(train_config::TrainConfig::new()),
        "manifest" => Box::new(manifest::Manifest::new()),
        "artefact" => Box::new(artefact::Artefact),
        "http" => Box::new(http::Http::new()),
        _ => return None,
    })
}

/// Writes `target`'s seeds into `dir` as `seed-N`, leaving files already there as they are.
pub fn write_seeds(target: &dyn Target, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, seed) in target.seeds().iter().enumerate() {
        let path = dir.join(format!("seed-{i}"));
        if !path.exists() {
            std::fs::write(path, seed)?;
        }
    }
    Ok(())
}

/// Inputs near `seeds`: each seed, its prefixes, and copies with one byte changed, so a plain
/// `cargo test` walks the error paths of truncated and corrupted files without an engine.
#[cfg(test)]
pub(crate) fn mutations(seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    for seed in seeds {
        out.push(seed.clone());
        let n = seed.len();
        for cut in [1, 2, n / 4, n / 2, n.saturating_sub(1)] {
            out.push(seed[..cut.min(n)].to_vec());
        }
        // A fixed stride keeps the count small on large seeds while reaching every region.
        let stride = (n / 24).max(1);
        for at in (0..n).step_by(stride) {
            for value in [0x00, 0xff, seed[at] ^ 0x01] {
                let mut changed = seed.clone();
                changed[at] = value;
                out.push(changed);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_target_name_builds_a_target() {
        for name in super::TARGETS {
            assert!(super::target(name).is_some(), "{name}");
        }
        assert!(super::target("nonesuch").is_none());
    }
}
