//! Build-script helper for crates that link libtorch: embeds an rpath to libtorch's `lib/` so
//! binaries, tests and benches run with an empty environment (no `LD_LIBRARY_PATH`).
//!
//! Call [`link_libtorch`] from the `build.rs` of every crate that depends on `torch-sys`
//! directly: Cargo hands `DEP_TCH_LIBTORCH_LIB` (exported by torch-sys, whose `links` key is
//! `tch`) only to the build scripts of its direct dependents.

use std::path::{Path, PathBuf};

/// Prints the `cargo:` lines that make the current package's binaries find libtorch at run time.
///
/// - `-Wl,-rpath,DIR` for the lib directory torch-sys linked against, both as given (usually the
///   project's `.libtorch` link) and canonicalised (the real directory, so a copied binary keeps
///   working while the libtorch install exists);
/// - `-Wl,--no-as-needed -ltorch_cuda` when libtorch has CUDA: the linker would otherwise drop
///   `libtorch_cuda.so` (no symbol of it is referenced) and CUDA would be silently unavailable;
/// - `DENOISE_LIBTORCH_LIB`, a compile-time env var naming the directory, for `doctor`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=torch-sys exported no libtorch lib dir; binaries will need LD_LIBRARY_PATH"
        );
        return;
    };
    for dir in rpath_dirs(Path::new(&lib)) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-env=DENOISE_LIBTORCH_LIB={lib}");
}

/// The directories to put in the rpath: `lib` itself and, if different, its canonical form.
fn rpath_dirs(lib: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![lib.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(lib) {
        if real != lib {
            dirs.push(real);
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpath_adds_the_canonical_dir_once() {
        let dir = std::env::temp_dir();
        let dirs = rpath_dirs(&dir);
        assert_eq!(dirs[0], dir);
        assert!(dirs.len() <= 2);
        let missing = Path::new("/definitely/not/here");
        assert_eq!(rpath_dirs(missing), vec![missing.to_path_buf()]);
    }
}
