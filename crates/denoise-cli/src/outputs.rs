//! Checks and helpers for the files the commands write: never over a device or FIFO, the
//! folder made when missing, and paths compared as the write would resolve them.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

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
