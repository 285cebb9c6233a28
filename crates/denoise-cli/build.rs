//! Embeds an rpath to libtorch (see `denoise-build`), and builds the shipped models and the
//! demo samples into the program, so a copied or installed binary has them too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    denoise_build::link_libtorch();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
    let mut code = String::new();
    for (name, dir, ext) in [
        ("MODELS", "models", "safetensors"),
        ("SAMPLES", "samples", "png"),
    ] {
        let dir = assets.join(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
        writeln!(code, "pub const {name}: &[(&str, &[u8])] = &[").unwrap();
        for file in files(&dir, ext) {
            let stem = file.file_name().unwrap().to_str().unwrap();
            let stem = if ext == "safetensors" {
                stem.trim_end_matches(".safetensors")
            } else {
                stem
            };
            writeln!(
                code,
                "    ({stem:?}, include_bytes!({:?})),",
                file.display()
            )
            .unwrap();
        }
        writeln!(code, "];").unwrap();
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("built_in.rs");
    std::fs::write(out, code).unwrap();
}

/// The files of `dir` ending in `.ext`, sorted; none when `dir` is missing.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext) && p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
        .collect();
    files.sort();
    files
}
